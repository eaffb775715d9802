//! Guest RAM: one memfd, mapped `MAP_SHARED`, split around the 32-bit MMIO hole, so that
//! device processes can map the same pages through vhost-user's memory table.

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_HOLE_START, RAM_ABOVE_4G_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The seals against shrinking and growing could not be set.
    #[error("cannot seal the guest memory memfd against resizing")]
    Seal(#[source] std::io::Error),
    /// memfd_create failed.
    #[error("cannot create the guest memory memfd")]
    Memfd(#[source] std::io::Error),
    /// ftruncate to the guest size failed.
    #[error("cannot size the guest memory memfd to {0} bytes")]
    Truncate(u64, #[source] std::io::Error),
    /// mmap failed.
    #[error("cannot map {size} bytes of guest memory")]
    Mmap {
        /// Region size.
        size: usize,
        /// Cause.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A memfd handed over is not guest RAM as skiff makes it.
    #[error("{0}")]
    Handed(String),
    /// Regions overlapped or were empty.
    #[error("invalid guest memory layout")]
    Layout(#[source] vm_memory::GuestRegionCollectionError),
}

/// Guest RAM and the memfd behind it.
pub struct GuestRam {
    /// The mapping, as the rust-vmm crates use it.
    pub mem: GuestMemoryMmap,
    /// The memfd the regions map (kept for vhost-user and for a live upgrade).
    pub memfd: File,
}

/// The guest-physical RAM ranges for `size` bytes of RAM.
pub fn ram_ranges(size: u64) -> Vec<(GuestAddress, u64)> {
    if size <= MMIO_HOLE_START {
        vec![(GuestAddress(0), size)]
    } else {
        vec![
            (GuestAddress(0), MMIO_HOLE_START),
            (GuestAddress(RAM_ABOVE_4G_START), size - MMIO_HOLE_START),
        ]
    }
}

/// Creates `size` bytes of guest RAM in one memfd.
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"skiff-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    };
    if fd < 0 {
        return Err(MemoryError::Memfd(std::io::Error::last_os_error()));
    }
    // SAFETY: fd was just created and is owned by nobody else.
    let memfd = unsafe { File::from_raw_fd(fd) };
    memfd
        .set_len(size)
        .map_err(|e| MemoryError::Truncate(size, e))?;
    // Every device process maps this memfd: sealed, none of them can shrink it (the VMM
    // would die of SIGBUS in KVM_RUN) or grow it, and nobody can lift the seals.
    // SAFETY: F_ADD_SEALS on the memfd we own; no memory is passed.
    let sealed = unsafe {
        libc::fcntl(
            memfd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    };
    if sealed != 0 {
        return Err(MemoryError::Seal(std::io::Error::last_os_error()));
    }
    map_guest_ram(memfd, size)
}

/// Guest RAM over an existing memfd of `size` bytes (from [`create_guest_ram`], handed over
/// by the VMM this one replaces): mapped again, never copied. The memfd must be that size
/// and sealed against resizing, as [`create_guest_ram`] leaves it.
pub fn map_guest_ram(memfd: File, size: u64) -> Result<GuestRam, MemoryError> {
    let len = memfd.metadata().map_err(MemoryError::Memfd)?.len();
    if len != size {
        return Err(MemoryError::Handed(format!(
            "the guest RAM memfd is {len} bytes, not {size}"
        )));
    }
    // SAFETY: F_GET_SEALS on a memfd we own; no memory is passed.
    let seals = unsafe { libc::fcntl(memfd.as_raw_fd(), libc::F_GET_SEALS) };
    let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
    if seals < 0 || seals & want != want {
        return Err(MemoryError::Handed(format!(
            "the guest RAM memfd is not sealed against resizing (seals {seals:#x})"
        )));
    }
    let mut regions = Vec::new();
    let mut offset = 0u64;
    for (base, len) in ram_ranges(size) {
        let file = memfd.try_clone().map_err(MemoryError::Memfd)?;
        let mapping = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Mmap {
            size: len as usize,
            source,
        })?;
        let region = GuestRegionMmap::new(mapping, base).ok_or(MemoryError::Layout(
            vm_memory::GuestRegionCollectionError::NoMemoryRegion,
        ))?;
        regions.push(region);
        offset += len;
    }
    let mem = GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Layout)?;
    Ok(GuestRam { mem, memfd })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn splits_around_the_hole() {
        assert_eq!(ram_ranges(1 << 30), vec![(GuestAddress(0), 1 << 30)]);
        let r = ram_ranges(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_HOLE_START));
        assert_eq!(
            r[1],
            (
                GuestAddress(RAM_ABOVE_4G_START),
                (4 << 30) - MMIO_HOLE_START
            )
        );
    }

    #[test]
    fn memfd_backs_both_regions() {
        let ram = create_guest_ram(MMIO_HOLE_START + (2 << 20)).unwrap();
        assert_eq!(ram.mem.num_regions(), 2);
        ram.mem
            .write_obj(0xabcd_u32, GuestAddress(RAM_ABOVE_4G_START))
            .unwrap();
        let mut buf = [0u8; 4];
        use std::os::unix::fs::FileExt;
        ram.memfd.read_exact_at(&mut buf, MMIO_HOLE_START).unwrap();
        assert_eq!(u32::from_le_bytes(buf), 0xabcd);
    }

    /// A device process maps this memfd: it must not be able to shrink it (the VMM would
    /// die of SIGBUS in KVM_RUN) or grow it, nor to lift the seals.
    #[test]
    fn guest_ram_memfd_is_sealed_against_resizing() {
        let ram = create_guest_ram(4 << 20).unwrap();
        // SAFETY: F_GET_SEALS on a memfd the test owns.
        let seals = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GET_SEALS) };
        let want = libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL;
        assert_eq!(seals & want, want, "seals {seals:#x}");
        assert!(ram.memfd.set_len(2 << 20).is_err(), "the memfd shrank");
        assert!(ram.memfd.set_len(8 << 20).is_err(), "the memfd grew");
        // Writes within it still work.
        use std::os::unix::fs::FileExt;
        ram.memfd.write_all_at(&[1, 2, 3], 4096).unwrap();
    }
}
