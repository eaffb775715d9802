//! The VMM opens each network interface's TAP device itself and hands the open fd to the
//! skiff-net it starts (`--tap-fd`). Keeping the fd lets a replacement skiff-net take over
//! the same TAP during a live upgrade: a TAP without IFF_MULTI_QUEUE accepts one attached
//! file only, so a second open would fail while the old process still has it. A TAP that
//! did not exist is created by the open and disappears when the VMM and its device
//! processes have closed it, as with Firecracker.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;

/// Errors opening a TAP device.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// The name cannot be an interface name.
    #[error("'{0}' is not a valid interface name (1 to 15 bytes)")]
    InvalidName(String),
    /// /dev/net/tun could not be opened.
    #[error("cannot open /dev/net/tun")]
    OpenTun(#[source] std::io::Error),
    /// Another process holds the TAP.
    #[error("TAP device {0} is in use by another process")]
    InUse(String),
    /// TUNSETIFF failed.
    #[error("cannot attach TAP device {0}")]
    Attach(String, #[source] std::io::Error),
}

const IFNAMSIZ: usize = 16;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
/// _IOW('T', 202, int)
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An open TAP device.
#[derive(Debug)]
pub struct TapFd {
    file: File,
    name: String,
}

impl TapFd {
    /// Opens (or creates) TAP `name` with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, the flags
    /// skiff-net expects of an inherited fd. The fd is close-on-exec: it reaches a device
    /// process only through [`crate::device_process::DeviceProcess::spawn_with_fds`].
    pub fn open(name: &str) -> Result<Self, TapError> {
        if name.is_empty() || name.len() >= IFNAMSIZ || name.contains('\0') {
            return Err(TapError::InvalidName(name.to_string()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = IfReq {
            name: [0; IFNAMSIZ],
            flags: IFF_TAP | IFF_NO_PI | IFF_VNET_HDR,
            _pad: [0; 22],
        };
        req.name[..name.len()].copy_from_slice(name.as_bytes());
        // SAFETY: TUNSETIFF reads and writes a `struct ifreq`; `IfReq` has its size and
        // layout (16-byte name, short flags, padding to 40 bytes) and outlives the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if ret < 0 {
            let err = std::io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::InUse(name.to_string()),
                _ => TapError::Attach(name.to_string(), err),
            });
        }
        Ok(TapFd {
            file,
            name: name.to_string(),
        })
    }

    /// The TAP `name` that the VMM this one replaces opened, handed over as `file`.
    pub fn adopt(name: &str, file: File) -> Self {
        TapFd {
            file,
            name: name.to_string(),
        }
    }

    /// The interface name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl AsFd for TapFd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.file.as_fd()
    }
}
