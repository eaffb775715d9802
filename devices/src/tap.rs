//! TAP devices opened through /dev/net/tun with a 12-byte virtio-net header.

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

/// `_IOW('T', 202, int)`
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// `_IOW('T', 208, unsigned int)`
const TUNSETOFFLOAD: libc::c_ulong = 0x4004_54d0;
/// `_IOW('T', 216, int)`
const TUNSETVNETHDRSZ: libc::c_ulong = 0x4004_54d8;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;
const IFF_VNET_HDR: libc::c_short = 0x4000;
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
const IFNAMSIZ: usize = 16;

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
}

#[repr(C)]
struct IfReq {
    name: [u8; IFNAMSIZ],
    flags: libc::c_short,
    _pad: [u8; 22],
}

/// An attached TAP queue.
#[derive(Debug)]
pub struct Tap {
    file: File,
    name: String,
}

impl Tap {
    /// Opens (or creates) TAP `name` with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR, non-blocking,
    /// vnet header size 12 and no offloads.
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
        // layout (16-byte name, short flags, padding to 40 bytes) and lives across the call.
        let ret = unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF as _, &mut req as *mut IfReq) };
        if ret < 0 {
            let err = io::Error::last_os_error();
            return Err(match err.raw_os_error() {
                Some(libc::EBUSY) => TapError::InUse(name.to_string()),
                Some(libc::EPERM) | Some(libc::EACCES) => {
                    TapError::Permission(name.to_string(), err)
                }
                _ => TapError::SetIff(name.to_string(), err),
            });
        }
        let tap = Tap {
            file,
            name: name.to_string(),
        };
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads an int through the pointer, which is valid for the call.
        let ret = unsafe {
            libc::ioctl(
                tap.file.as_raw_fd(),
                TUNSETVNETHDRSZ as _,
                &size as *const libc::c_int,
            )
        };
        if ret < 0 {
            return Err(TapError::VnetHdrSize(
                name.to_string(),
                io::Error::last_os_error(),
            ));
        }
        tap.set_offload(0)?;
        Ok(tap)
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
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
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

#[cfg(test)]
mod tests {
    use super::*;

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
}
