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
    /// The host's pool of 2 MiB huge pages cannot hold guest RAM.
    #[error(
        "cannot reserve {needed} huge pages of 2 MiB for guest RAM: the host's pool has {free} \
         free (vm.nr_hugepages, /sys/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages)"
    )]
    HugePages {
        /// Pages guest RAM needs.
        needed: u64,
        /// Pages free in the pool, as read from sysfs (or why it could not be read).
        free: String,
    },
    /// Guest RAM on huge pages must be made of whole pages.
    #[error("guest RAM of {0} bytes is not a multiple of the 2 MiB huge page")]
    HugeSize(u64),
    /// The host's pool of huge pages could not be read or resized ([`HugePool`]).
    #[error("{0}")]
    Pool(String, #[source] std::io::Error),
}

/// The huge page guest RAM can be made of (`huge_pages: "2M"`).
pub const HUGE_PAGE: u64 = 2 << 20;

/// The host's pool of 2 MiB pages (`/sys/kernel/mm/hugepages/hugepages-2048kB`).
const POOL: &str = "/sys/kernel/mm/hugepages/hugepages-2048kB";

/// One number of the pool (`nr_hugepages`, `free_hugepages`, `resv_hugepages`).
fn pool_count(name: &str) -> Result<u64, MemoryError> {
    let p = format!("{POOL}/{name}");
    let text = std::fs::read_to_string(&p).map_err(|e| MemoryError::Pool(p.clone(), e))?;
    text.trim()
        .parse()
        .map_err(|e| MemoryError::Pool(p, std::io::Error::new(std::io::ErrorKind::InvalidData, e)))
}

/// 2 MiB pages of the host's pool a new reservation can take: free, less those other
/// mappings reserved and have not touched yet.
fn available_huge_pages() -> Result<u64, MemoryError> {
    Ok(pool_count("free_hugepages")?.saturating_sub(pool_count("resv_hugepages")?))
}

/// [`available_huge_pages`] as text for a message.
fn free_huge_pages() -> String {
    available_huge_pages().map_or_else(
        |e| format!("an unknown number of pages ({e})"),
        |n| n.to_string(),
    )
}

/// The host's pool of 2 MiB pages grown for a run (a benchmark, a test) and put back to its
/// size when dropped. Needs root. The operator sizes the pool for real VMs
/// (`vm.nr_hugepages`); skiff itself never changes it.
#[derive(Debug)]
pub struct HugePool {
    was: u64,
}

impl HugePool {
    /// Grows the pool until `pages` are available to new reservations; `None` when they
    /// already are. The kernel may grant fewer when memory is short: [`create_guest_ram_on`]
    /// then names the shortfall.
    pub fn with_room(pages: u64) -> Result<Option<HugePool>, MemoryError> {
        let have = available_huge_pages()?;
        if have >= pages {
            return Ok(None);
        }
        let was = pool_count("nr_hugepages")?;
        let p = format!("{POOL}/nr_hugepages");
        std::fs::write(&p, (was + pages - have).to_string())
            .map_err(|e| MemoryError::Pool(p, e))?;
        Ok(Some(HugePool { was }))
    }
}

impl Drop for HugePool {
    fn drop(&mut self) {
        let p = format!("{POOL}/nr_hugepages");
        if let Err(e) = std::fs::write(&p, self.was.to_string()) {
            log::warn!(
                "cannot put the huge page pool back to {} pages: {p}: {e}",
                self.was
            );
        }
    }
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

/// Creates `size` bytes of guest RAM in one memfd, on the host's normal pages.
pub fn create_guest_ram(size: u64) -> Result<GuestRam, MemoryError> {
    create_guest_ram_on(size, false)
}

/// Creates `size` bytes of guest RAM in one memfd; `huge`: on 2 MiB hugetlbfs pages, every
/// one of them reserved from the host's pool here (a pool too small fails now, with the
/// counts, rather than with SIGBUS when the guest first touches a page). Writing the guest
/// kernel into fresh huge pages takes a few hundred page faults instead of thousands (15 MiB:
/// 14 ms on 4 KiB pages, 2 ms on 2 MiB pages, measured on the kvm_pvm machine).
pub fn create_guest_ram_on(size: u64, huge: bool) -> Result<GuestRam, MemoryError> {
    if huge && !size.is_multiple_of(HUGE_PAGE) {
        return Err(MemoryError::HugeSize(size));
    }
    let pages = if huge {
        libc::MFD_HUGETLB | libc::MFD_HUGE_2MB
    } else {
        0
    };
    // SAFETY: the name is a valid NUL-terminated string; the flags are valid.
    let fd = unsafe {
        libc::memfd_create(
            c"skiff-guest-ram".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING | pages,
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
    map_guest_ram(memfd, size).map_err(|e| match e {
        MemoryError::Mmap {
            source: vm_memory::mmap::MmapRegionError::Mmap(ref io),
            ..
        } if huge && io.raw_os_error() == Some(libc::ENOMEM) => MemoryError::HugePages {
            needed: size / HUGE_PAGE,
            free: free_huge_pages(),
        },
        e => e,
    })
}

/// Guest RAM over an existing memfd of `size` bytes (from [`create_guest_ram`], handed over
/// by the VMM this one replaces): mapped again, never copied. The memfd must be that size
/// and sealed against resizing, as [`create_guest_ram`] leaves it.
pub fn map_guest_ram(memfd: File, size: u64) -> Result<GuestRam, MemoryError> {
    let meta = memfd.metadata().map_err(MemoryError::Memfd)?;
    let len = meta.len();
    // A hugetlbfs file reports its page size as its block size. Its mapping reserves the
    // pages (no MAP_NORESERVE): a shortage fails the mmap instead of a later fault.
    let huge = std::os::unix::fs::MetadataExt::blksize(&meta) == HUGE_PAGE;
    let flags = if huge {
        libc::MAP_SHARED
    } else {
        libc::MAP_SHARED | libc::MAP_NORESERVE
    };
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
            flags,
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
        // Close-on-exec: no child the VMM starts inherits it.
        // SAFETY: F_GETFD on an fd the test owns.
        let fd_flags = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(fd_flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        // Writes within it still work.
        use std::os::unix::fs::FileExt;
        ram.memfd.write_all_at(&[1, 2, 3], 4096).unwrap();
    }

    /// Guest RAM on 2 MiB pages (needs root when the host's pool has fewer than 2 available:
    /// the test grows it for its run): sealed, mapped again over the same memfd (as a live
    /// upgrade's new VMM does), whole pages only, and a pool too small is named with its
    /// counts.
    #[test]
    fn guest_ram_on_huge_pages() {
        let pool = HugePool::with_room(2).expect("growing the huge page pool (needs root)");
        let r = std::panic::catch_unwind(|| {
            let ram = create_guest_ram_on(4 << 20, true).unwrap();
            // SAFETY: F_GETFD on an fd the test owns.
            let fd_flags = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GETFD) };
            assert_eq!(
                fd_flags & libc::FD_CLOEXEC,
                libc::FD_CLOEXEC,
                "not close-on-exec"
            );
            assert_eq!(
                std::os::unix::fs::MetadataExt::blksize(&ram.memfd.metadata().unwrap()),
                HUGE_PAGE
            );
            // SAFETY: F_GET_SEALS on a memfd the test owns.
            let seals = unsafe { libc::fcntl(ram.memfd.as_raw_fd(), libc::F_GET_SEALS) };
            assert_ne!(seals & libc::F_SEAL_GROW, 0, "seals {seals:#x}");
            ram.mem
                .write_obj(0x5eed_u64, GuestAddress(3 << 20))
                .unwrap();
            let again = map_guest_ram(ram.memfd.try_clone().unwrap(), 4 << 20).unwrap();
            assert_eq!(
                again.mem.read_obj::<u64>(GuestAddress(3 << 20)).unwrap(),
                0x5eed
            );
            assert!(matches!(
                create_guest_ram_on(3 << 20, true),
                Err(MemoryError::HugeSize(_))
            ));
            // One more page than the pool has left cannot be reserved.
            let left = available_huge_pages().unwrap();
            let e = create_guest_ram_on((left + 1) * HUGE_PAGE, true)
                .err()
                .unwrap();
            let msg = e.to_string();
            assert!(
                matches!(e, MemoryError::HugePages { needed, .. } if needed == left + 1)
                    && msg.contains(&format!("pool has {left} free")),
                "{msg}"
            );
        });
        drop(pool);
        r.unwrap();
    }
}
