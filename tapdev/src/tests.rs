//! TAP tests. Those that create TAPs need root (CAP_NET_ADMIN and /dev/net/tun): without
//! it they fail when CI is set and are skipped with a loud message otherwise, as
//! tests/src/runner.rs does with the guest tests it cannot run. Every TAP they create is
//! named `sktfd<pid><tag>`, is non-persistent (or made non-persistent again by a guard) and
//! so is deleted by the kernel when its last fd closes, even if the test panics.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use vmm_sys_util::tempfile::TempFile;

use super::test_utils::can_create_taps;
use super::*;

/// `_IOW('T', 203, int)`
const TUNSETPERSIST: libc::c_ulong = 0x4004_54cb;
const IFF_PERSIST: libc::c_short = 0x0800;

#[test]
fn offloads_follow_acked_features() {
    assert_eq!(offload_flags(0), 0);
    // TSO without CSUM is not a valid combination: no offloads.
    assert_eq!(offload_flags(1 << 7), 0);
    assert_eq!(
        offload_flags((1 << 1) | (1 << 7) | (1 << 8)),
        TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6
    );
    assert_eq!(offload_flags((1 << 1) | (1 << 10)), TUN_F_CSUM | TUN_F_UFO);
    assert_eq!(std::mem::size_of::<IfReq>(), 40);
}

#[test]
fn rejects_bad_names() {
    assert!(matches!(Tap::open(""), Err(TapError::InvalidName(_))));
    assert!(matches!(
        Tap::open("a-very-long-tap-name"),
        Err(TapError::InvalidName(_))
    ));
}

#[test]
fn flag_problems_are_named() {
    assert_eq!(flags_problem(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR), None);
    // Extra flags (persist, multi-queue, one-queue) are fine.
    assert_eq!(
        flags_problem(IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | IFF_PERSIST | 0x0100 | 0x2000),
        None
    );
    let p = flags_problem(IFF_TAP | IFF_NO_PI).expect("no vnet hdr");
    assert_eq!(p, "was opened without IFF_VNET_HDR");
    let p = flags_problem(IFF_TAP).expect("neither");
    assert_eq!(p, "was opened without IFF_NO_PI and IFF_VNET_HDR");
    let p = flags_problem(IFF_TUN | IFF_NO_PI | IFF_VNET_HDR).expect("tun");
    assert!(p.contains("TUN device"), "{p}");
}

fn fd_is_open(fd: RawFd) -> bool {
    // SAFETY: F_GETFD only reads the flags of descriptor number `fd`, if it exists.
    unsafe { libc::fcntl(fd, libc::F_GETFD) >= 0 }
}

#[test]
fn tap_fd_refuses_std_closed_and_non_tun_fds() {
    let err = Tap::from_fd(1).expect_err("stdout");
    assert!(matches!(err, TapError::FdStdStream(1)), "{err}");
    assert_eq!(
        err.to_string(),
        "--tap-fd 1 is a standard stream, not a TAP"
    );

    let err = Tap::from_fd(65_000).expect_err("closed");
    assert!(matches!(err, TapError::FdNotOpen(65_000, _)), "{err}");
    assert_eq!(
        err.to_string(),
        "--tap-fd 65000 is not an open file descriptor"
    );

    let tmp = TempFile::new().expect("temp file");
    let fd = tmp.as_file().as_raw_fd();
    let err = Tap::from_fd(fd).expect_err("regular file");
    assert!(matches!(err, TapError::FdNotTun(f, _) if f == fd), "{err}");
    let msg = format!(
        "{err}: {}",
        std::error::Error::source(&err)
            .map(|e| e.to_string())
            .unwrap_or_default()
    );
    assert!(
        msg.starts_with(&format!(
            "--tap-fd {fd} is not a TUN/TAP file descriptor (TUNGETIFF failed): "
        )),
        "{msg}"
    );
    // Refused before taking it: still open, still the caller's.
    assert!(fd_is_open(fd));

    let (r, w) = pipe();
    let err = Tap::from_fd(r.as_raw_fd()).expect_err("pipe");
    assert!(matches!(err, TapError::FdNotTun(..)), "{err}");
    drop((r, w));
}

fn pipe() -> (File, File) {
    let mut fds = [0; 2];
    // SAFETY: pipe2 writes two fds into the array on success.
    let ret = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    assert_eq!(ret, 0, "pipe2: {}", io::Error::last_os_error());
    // SAFETY: both fds were just created and are owned by nothing else.
    unsafe {
        (
            File::from(OwnedFd::from_raw_fd(fds[0])),
            File::from(OwnedFd::from_raw_fd(fds[1])),
        )
    }
}

/// A TAP as the VMM holds it: opened by name on /dev/net/tun, close-on-exec.
pub(crate) struct VmmTap {
    file: File,
    name: String,
    persist: bool,
}

impl VmmTap {
    /// Creates TAP `sktfd<pid><tag>` with `flags`; it is deleted when the last fd closes.
    fn create(tag: &str, flags: libc::c_short) -> Self {
        let name = format!("sktfd{}{tag}", std::process::id());
        assert!(name.len() < IFNAMSIZ, "{name}");
        assert!(!exists(&name), "{name} exists already");
        let file = open_tun();
        let mut req = IfReq::new(&name, flags);
        // SAFETY: as in `attach`: TUNSETIFF on a `struct ifreq` that lives across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        assert_eq!(ret, 0, "TUNSETIFF {name}: {}", io::Error::last_os_error());
        VmmTap {
            file,
            name,
            persist: false,
        }
    }

    fn name(&self) -> &str {
        &self.name
    }

    fn set_persist(&mut self, on: bool) {
        // SAFETY: TUNSETPERSIST takes its argument by value.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNSETPERSIST as _,
                libc::c_ulong::from(on),
            )
        };
        assert_eq!(ret, 0, "TUNSETPERSIST: {}", io::Error::last_os_error());
        self.persist = on;
    }

    /// TUNGETIFF flags, through the VMM's own fd.
    fn flags(&self) -> libc::c_short {
        let mut req = IfReq::new("", 0);
        // SAFETY: as in `Tap::from_fd`.
        let ret = unsafe {
            libc::ioctl(
                self.file.as_raw_fd(),
                TUNGETIFF as _,
                &mut req as *mut IfReq,
            )
        };
        assert_eq!(ret, 0, "TUNGETIFF: {}", io::Error::last_os_error());
        req.flags
    }

    /// A new fd on the same open file, without FD_CLOEXEC: what a device process inherits.
    fn inherited(&self) -> RawFd {
        // SAFETY: dup of an fd we own; the result is checked.
        let fd = unsafe { libc::dup(self.file.as_raw_fd()) };
        assert!(fd >= 0, "dup: {}", io::Error::last_os_error());
        fd
    }
}

impl Drop for VmmTap {
    fn drop(&mut self) {
        if self.persist {
            // Make it go away with our fd even when the test failed.
            // SAFETY: TUNSETPERSIST takes its argument by value.
            unsafe {
                libc::ioctl(
                    self.file.as_raw_fd(),
                    TUNSETPERSIST as _,
                    0 as libc::c_ulong,
                )
            };
        }
    }
}

fn open_tun() -> File {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_CLOEXEC)
        .open("/dev/net/tun")
        .expect("open /dev/net/tun")
}

fn exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn fd_flags(fd: RawFd) -> (libc::c_int, libc::c_int) {
    // SAFETY: F_GETFL/F_GETFD read the flags of an open fd.
    unsafe {
        (
            libc::fcntl(fd, libc::F_GETFL),
            libc::fcntl(fd, libc::F_GETFD),
        )
    }
}

#[test]
fn inherited_tap_fd_taken_over_and_handed_on() {
    if !can_create_taps("inherited_tap_fd_taken_over_and_handed_on") {
        return;
    }
    let vmm = VmmTap::create("a", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    let name = vmm.name().to_string();
    let before = vmm.flags();
    assert_eq!(before & IFF_PERSIST, 0);

    // skiff-net #1 takes over its --tap-fd.
    let fd = vmm.inherited();
    assert_eq!(fd_flags(fd).0 & libc::O_NONBLOCK, 0);
    assert_eq!(fd_flags(fd).1 & libc::FD_CLOEXEC, 0);
    let first = Tap::from_fd(fd).expect("open inherited fd");
    let tap = &first;
    assert_eq!(tap.name(), name, "name from TUNGETIFF");
    assert_eq!(tap.to_string(), format!("{name} (--tap-fd {fd})"));
    assert_eq!(tap.inherited_fd(), Some(fd));
    assert_eq!(tap.as_raw_fd(), fd);
    let (fl, fdfl) = fd_flags(fd);
    assert_ne!(fl & libc::O_NONBLOCK, 0, "O_NONBLOCK set");
    assert_ne!(fdfl & libc::FD_CLOEXEC, 0, "FD_CLOEXEC set");
    // What acked_features does.
    tap.set_offload(TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6)
        .expect("offloads on an inherited fd");
    tap.set_offload(0).expect("no offloads");

    // The TAP is attached: opening it by name is refused, hence --tap-fd.
    assert!(matches!(Tap::open(&name), Err(TapError::InUse(_))));

    // Upgrade: skiff-net #2 takes the same TAP while #1 still has it.
    let fd2 = vmm.inherited();
    let second = Tap::from_fd(fd2).expect("second skiff-net");
    assert_eq!(second.name(), name);

    // #1 exits: its fd is closed, the TAP stays, unchanged.
    drop(first);
    assert!(!fd_is_open(fd));
    assert!(exists(&name));
    assert_eq!(vmm.flags(), before);
    drop(second);
    assert!(exists(&name), "the VMM's fd keeps the TAP");
    assert_eq!(vmm.flags(), before, "persistence unchanged");

    // The VMM closes it: the kernel deletes the non-persistent TAP.
    drop(vmm);
    assert!(!exists(&name), "{name} left behind");
}

#[test]
fn tap_fd_never_changes_persistence() {
    if !can_create_taps("tap_fd_never_changes_persistence") {
        return;
    }
    let mut vmm = VmmTap::create("b", IFF_TAP | IFF_NO_PI | IFF_VNET_HDR);
    let name = vmm.name().to_string();
    vmm.set_persist(true);
    let before = vmm.flags();
    assert_ne!(before & IFF_PERSIST, 0);
    let tap = Tap::from_fd(vmm.inherited()).expect("persistent TAP");
    drop(tap);
    assert_eq!(vmm.flags(), before, "still persistent");
    drop(vmm);
    assert!(!exists(&name), "{name} left behind");
}

#[test]
fn tap_fd_with_wrong_flags_is_refused() {
    if !can_create_taps("tap_fd_with_wrong_flags_is_refused") {
        return;
    }
    // No case without IFF_NO_PI: Linux 6.18 reports IFF_NO_PI on every TAP
    // (flag_problems_are_named covers that check).
    let cases: [(&str, libc::c_short, &str); 2] = [
        ("c", IFF_TAP | IFF_NO_PI, "was opened without IFF_VNET_HDR"),
        (
            "e",
            IFF_TUN | IFF_NO_PI | IFF_VNET_HDR,
            "is a TUN device (IFF_TUN), not a TAP",
        ),
    ];
    for (tag, flags, problem) in cases {
        let vmm = VmmTap::create(tag, flags);
        let fd = vmm.inherited();
        let err = Tap::from_fd(fd).expect_err(problem);
        assert_eq!(
            err.to_string(),
            format!(
                "--tap-fd {fd} (interface {}) {problem}; skiff-net needs a TAP opened with \
                 IFF_TAP|IFF_NO_PI|IFF_VNET_HDR",
                vmm.name()
            )
        );
        // Not taken: still the caller's to close.
        assert!(fd_is_open(fd));
        // SAFETY: `fd` is our dup, used by nothing else.
        drop(unsafe { OwnedFd::from_raw_fd(fd) });
        let name = vmm.name().to_string();
        drop(vmm);
        assert!(!exists(&name), "{name} left behind");
    }

    // /dev/net/tun never attached to an interface.
    let tun = open_tun();
    let fd = tun.try_clone().expect("dup").into_raw_fd();
    let err = Tap::from_fd(fd).expect_err("detached");
    assert!(matches!(err, TapError::FdDetached(f) if f == fd), "{err}");
    assert!(
        err.to_string()
            .contains("is /dev/net/tun but attached to no interface"),
        "{err}"
    );
    // SAFETY: `fd` is our dup, used by nothing else.
    drop(unsafe { OwnedFd::from_raw_fd(fd) });
}
