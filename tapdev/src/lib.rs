//! TAP devices with a 12-byte virtio-net header, the one copy of TAP handling that the VMM,
//! skiff-net and the benchmarks link (DESIGN.md: a mechanism two crates need lives once, in a
//! small crate below both).
//!
//! - The VMM opens each network interface's TAP itself ([`Tap::open`]) and hands the fd to
//!   the skiff-net it starts (`--tap-fd`). Keeping the fd lets a replacement skiff-net take
//!   over the same TAP during a live upgrade: a TAP without IFF_MULTI_QUEUE accepts one
//!   attached file only, so a second open would fail while the old process still has it. A
//!   VMM that replaces another takes the fd over with [`Tap::adopt`].
//! - skiff-net opens a TAP by name (`--tap`, [`Tap::open`]) or takes over the inherited fd
//!   (`--tap-fd`, [`Tap::from_fd`]).
//!
//! Nothing here ever calls TUNSETPERSIST: a TAP that an open created disappears when the
//! last fd on it closes (the VMM's and its device processes'), as with Firecracker; a
//! persistent one stays.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`
pub const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOR('T', 210, unsigned int)`, fills a `struct ifreq` with the name and flags.
pub const TUNGETIFF: libc::c_ulong = 0x8004_54d2;
/// `_IOW('T', 208, unsigned int)`
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
/// `IFF_TUN`: A TUN device (IP packets).
pub const IFF_TUN: libc::c_short = 0x0001;
/// `IFF_TAP`: A TAP device (Ethernet frames).
pub const IFF_TAP: libc::c_short = 0x0002;
/// `IFF_NO_PI`: No packet-information prefix before each frame.
pub const IFF_NO_PI: libc::c_short = 0x1000;
/// `IFF_VNET_HDR`: A virtio-net header before each frame.
pub const IFF_VNET_HDR: libc::c_short = 0x4000;
/// Offload flags for TUNSETOFFLOAD.
pub const TUN_F_CSUM: u32 = 0x01;
/// TCPv4 segmentation offload.
pub const TUN_F_TSO4: u32 = 0x02;
/// TCPv6 segmentation offload.
pub const TUN_F_TSO6: u32 = 0x04;
/// UDP fragmentation offload.
pub const TUN_F_UFO: u32 = 0x10;
/// Size of `struct virtio_net_hdr_v1` (VERSION_1, no hash report).
pub const VNET_HDR_LEN: usize = 12;
/// Longest interface name plus its NUL.
pub const IFNAMSIZ: usize = 16;

/// Errors raised while opening or configuring a TAP.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// Name empty or too long.
    #[error("invalid TAP name {0:?} (1 to 15 bytes)")]
    InvalidName(String),
    /// /dev/net/tun cannot be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] io::Error),
    /// TUNSETIFF returned EBUSY: another process has the TAP open.
    #[error("TAP {0} is already in use")]
    InUse(String),
    /// Not allowed to create or attach the TAP.
    #[error("permission denied to open TAP {0} (needs CAP_NET_ADMIN or TAP owner)")]
    Permission(String, #[source] io::Error),
    /// TUNSETIFF failed for another reason.
    #[error("cannot attach TAP {0}")]
    SetIff(String, #[source] io::Error),
    /// TUNSETVNETHDRSZ failed.
    #[error("cannot set the vnet header size of TAP {0}")]
    VnetHdrSize(String, #[source] io::Error),
    /// TUNSETOFFLOAD failed.
    #[error("cannot set offloads {1:#x} on TAP {0}")]
    Offload(String, u32, #[source] io::Error),
    /// `--tap-fd` is 0, 1 or 2.
    #[error("--tap-fd {0} is a standard stream, not a TAP")]
    FdStdStream(RawFd),
    /// `--tap-fd` is not open in this process.
    #[error("--tap-fd {0} is not an open file descriptor")]
    FdNotOpen(RawFd, #[source] io::Error),
    /// `--tap-fd` does not answer TUNGETIFF: not a TUN/TAP fd.
    #[error("--tap-fd {0} is not a TUN/TAP file descriptor (TUNGETIFF failed)")]
    FdNotTun(RawFd, #[source] io::Error),
    /// `--tap-fd` is /dev/net/tun but attached to no interface (EBADFD).
    #[error(
        "--tap-fd {0} is /dev/net/tun but attached to no interface \
         (no TUNSETIFF on it, or the interface was deleted)"
    )]
    FdDetached(RawFd),
    /// `--tap-fd` is a TUN/TAP fd opened with the wrong flags.
    #[error(
        "--tap-fd {fd} (interface {name}) {problem}; skiff-net needs a TAP opened with \
         IFF_TAP|IFF_NO_PI|IFF_VNET_HDR"
    )]
    FdFlags {
        /// The fd.
        fd: RawFd,
        /// Interface name from TUNGETIFF.
        name: String,
        /// What is wrong.
        problem: String,
    },
    /// fcntl on `--tap-fd` failed.
    #[error("--tap-fd {0}: cannot set O_NONBLOCK and FD_CLOEXEC")]
    FdFlagsSet(RawFd, #[source] io::Error),
}

/// `struct ifreq` as TUNSETIFF and TUNGETIFF use it: a name and flags, padded to 40 bytes.
#[repr(C)]
pub struct IfReq {
    /// The interface name, NUL-terminated.
    pub name: [u8; IFNAMSIZ],
    /// IFF_* flags.
    pub flags: libc::c_short,
    _pad: [u8; 22],
}

impl IfReq {
    /// A request for interface `name` (at most 15 bytes, not checked here) with `flags`.
    pub fn new(name: &str, flags: libc::c_short) -> Self {
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags,
            _pad: [0; 22],
        };
        let n = name.len().min(IFNAMSIZ - 1);
        req.name[..n].copy_from_slice(&name.as_bytes()[..n]);
        req
    }
}

/// Opens /dev/net/tun (non-blocking, close-on-exec) and attaches it to TAP or TUN `name` with
/// `flags` (TUNSETIFF), creating the interface when it does not exist. [`Tap::open`] uses it
/// with skiff's flags; skiff-net's tests use it as the VMM does, with the right flags and the
/// wrong ones.
pub fn attach(name: &str, flags: libc::c_short) -> Result<File, TapError> {
    if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
        return Err(TapError::InvalidName(name.to_string()));
    }
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .map_err(TapError::OpenTun)?;
    let mut req = IfReq::new(name, flags);
    // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its size and
    // layout (16-byte name, short flags, padding to 40 bytes) and lives across the call.
    let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
    if ret < 0 {
        let err = io::Error::last_os_error();
        return Err(match err.raw_os_error() {
            Some(libc::EBUSY) => TapError::InUse(name.to_string()),
            Some(libc::EPERM) | Some(libc::EACCES) => TapError::Permission(name.to_string(), err),
            _ => TapError::SetIff(name.to_string(), err),
        });
    }
    Ok(file)
}

/// An attached TAP queue. Dropping it closes the fd and nothing else.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
    /// The `--tap-fd` number when the fd was inherited.
    inherited: Option<RawFd>,
}

impl Tap {
    /// Opens (or creates) TAP `name` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, non-blocking,
    /// vnet header size 12 and no offloads.
    pub fn open(name: &str) -> Result<Self, TapError> {
        let file = attach(name, IFF_TAP | IFF_NO_PI | IFF_VNET_HDR)?;
        Tap {
            file,
            name: name.to_string(),
            inherited: None,
        }
        .configure()
    }

    /// Takes over fd `fd`, inherited from the VMM (`--tap-fd`): a TAP it opened with
    /// IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, checked with TUNGETIFF, which also gives the
    /// interface name. Sets O_NONBLOCK (on the open file description, which the VMM and a
    /// previous skiff-net may share) and FD_CLOEXEC (on this fd only), then configures it
    /// as [`Tap::open`] does: vnet header size 12, no offloads.
    ///
    /// The fd is checked before this takes ownership of it: on an error from the checks
    /// it is left open and untouched. The caller must not use or close it after success,
    /// nor pass the same number twice.
    pub fn from_fd(fd: RawFd) -> Result<Self, TapError> {
        if (0..=2).contains(&fd) {
            return Err(TapError::FdStdStream(fd));
        }
        // SAFETY: F_GETFD only reads the flags of descriptor number `fd`, if it exists.
        if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
            return Err(TapError::FdNotOpen(fd, io::Error::last_os_error()));
        }
        let mut req = IfReq::new("", 0);
        // SAFETY: TUNGETIFF writes a `struct ifreq` (see `attach`) into `req`, which lives
        // across the call; other fds reject the request number without writing.
        let ret = unsafe { libc::ioctl(fd, TUNGETIFF as _, &mut req as *mut IfReq) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBADFD) => TapError::FdDetached(fd),
                _ => TapError::FdNotTun(fd, err),
            });
        }
        let len = req.name.iter().position(|&b| b == 0).unwrap_or(IFNAMSIZ);
        let name = String::from_utf8_lossy(&req.name[..len]).into_owned();
        if let Some(problem) = flags_problem(req.flags) {
            return Err(TapError::FdFlags { fd, name, problem });
        }
        // SAFETY: `fd` is open and a TAP (checked above); it was inherited for --tap-fd
        // and nothing else in this process owns it (the caller passes each number once).
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        set_fd_flags(&file).map_err(|e| TapError::FdFlagsSet(fd, e))?;
        Tap {
            file,
            name,
            inherited: Some(fd),
        }
        .configure()
    }

    /// TAP `name` that the VMM this one replaces had open, handed over as `file` (its
    /// device process serves it: nothing is set on it, its offloads stay as they are).
    pub fn adopt(name: &str, file: File) -> Self {
        Tap {
            file,
            name: name.to_string(),
            inherited: None,
        }
    }

    /// Vnet header size 12, no offloads (the guest's acked features set them later).
    fn configure(self) -> Result<Self, TapError> {
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is valid for the call.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETVNETHDRSZ as _,
                &size as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(TapError::VnetHdrSize(
                self.name.clone(),
                io::Error::last_os_error(),
            ));
        }
        self.set_offload(0)?;
        Ok(self)
    }

    /// Sets the TUN_F_* offloads the guest can receive.
    pub fn set_offload(&self, flags: u32) -> Result<(), TapError> {
        // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory is passed.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETOFFLOAD as _,
                libc::c_ulong::from(flags),
            )
        };
        if ret < 0 {
            return Err(TapError::Offload(
                self.name.clone(),
                flags,
                io::Error::last_os_error(),
            ));
        }
        Ok(())
    }

    /// Interface name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The open TAP, for an API that takes a file (vhost-net's VHOST_NET_SET_BACKEND).
    pub fn as_file(&self) -> &File {
        &self.file
    }

    /// The `--tap-fd` number when the fd was inherited, None when opened by name.
    pub fn inherited_fd(&self) -> Option<RawFd> {
        self.inherited
    }
}

#[cfg(feature = "test-utils")]
impl Tap {
    /// A "TAP" over any fd that reads and writes whole frames (a datagram socket), for
    /// backend tests that need no TAP device.
    pub fn for_tests(file: File, name: &str) -> Self {
        Tap {
            file,
            name: name.to_string(),
            inherited: None,
        }
    }
}

impl std::fmt::Display for Tap {
    /// `NAME`, or `NAME (--tap-fd N)` for an inherited fd.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.inherited {
            Some(fd) => write!(f, "{} (--tap-fd {fd})", self.name),
            None => f.write_str(&self.name),
        }
    }
}

/// What is wrong with TUNGETIFF flags for skiff-net, None when they are usable.
fn flags_problem(flags: libc::c_short) -> Option<String> {
    if flags & IFF_TAP == 0 {
        return Some(if flags & IFF_TUN != 0 {
            "is a TUN device (IFF_TUN), not a TAP".to_string()
        } else {
            format!("is not a TAP (flags {flags:#06x})")
        });
    }
    let missing: Vec<&str> = [(IFF_NO_PI, "IFF_NO_PI"), (IFF_VNET_HDR, "IFF_VNET_HDR")]
        .into_iter()
        .filter(|&(bit, _)| flags & bit == 0)
        .map(|(_, name)| name)
        .collect();
    if missing.is_empty() {
        None
    } else {
        Some(format!("was opened without {}", missing.join(" and ")))
    }
}

/// Sets O_NONBLOCK (if missing) and FD_CLOEXEC on an inherited fd.
fn set_fd_flags(file: &File) -> io::Result<()> {
    let fd = file.as_raw_fd();
    // SAFETY: F_GETFL/F_SETFL/F_GETFD/F_SETFD read or set flags of an fd we own.
    unsafe {
        let fl = libc::fcntl(fd, libc::F_GETFL);
        if fl < 0 {
            return Err(io::Error::last_os_error());
        }
        if fl & libc::O_NONBLOCK == 0 && libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
        let fdfl = libc::fcntl(fd, libc::F_GETFD);
        if fdfl < 0 || libc::fcntl(fd, libc::F_SETFD, fdfl | libc::FD_CLOEXEC) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}

impl AsFd for Tap {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}

/// TUN_F_* offloads matching the guest's acked virtio-net features.
pub fn offload_flags(acked: u64) -> u32 {
    use virtio_bindings::virtio_net::{
        VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
        VIRTIO_NET_F_GUEST_UFO,
    };
    let has = |bit: u32| acked & (1u64 << bit) != 0;
    let mut flags = 0;
    if has(VIRTIO_NET_F_GUEST_CSUM) {
        flags |= TUN_F_CSUM;
        if has(VIRTIO_NET_F_GUEST_TSO4) {
            flags |= TUN_F_TSO4;
        }
        if has(VIRTIO_NET_F_GUEST_TSO6) {
            flags |= TUN_F_TSO6;
        }
        if has(VIRTIO_NET_F_GUEST_UFO) {
            flags |= TUN_F_UFO;
        }
    }
    flags
}

/// For the tests of the crates that use TAPs (feature `test-utils`).
#[cfg(any(test, feature = "test-utils"))]
pub mod test_utils {
    use std::io::Write;

    /// Whether CI is set (root-only tests then fail instead of skipping).
    pub fn in_ci() -> bool {
        std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
    }

    /// Whether this test may create TAPs: root. Not root: a failure under CI, else a loud
    /// skip.
    pub fn can_create_taps(test: &str) -> bool {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } == 0 {
            return true;
        }
        assert!(
            !in_ci(),
            "{test} needs root to create TAP devices and CI is set: run the tests as root"
        );
        // Straight to fd 2, not eprintln!: libtest hides a passing test's captured output.
        let msg = format!(
            "!!!!! SKIPPED {test}: needs root to create TAP devices \
             (run as root; with CI=true this is a failure) !!!!!\n"
        );
        let _ = std::io::stderr().write_all(msg.as_bytes());
        false
    }
}

#[cfg(test)]
mod tests;
