//! The vhost-user inflight area (VHOST_USER_PROTOCOL_F_INFLIGHT_SHMFD) for split rings.
//!
//! The backend allocates a shared memfd on GET_INFLIGHT_FD; the frontend keeps it and hands
//! it to every later backend of the device with SET_INFLIGHT_FD. Each queue's part records
//! which descriptor heads the backend took from the available ring and has not completed
//! yet, so a backend started after a crash can resubmit exactly those requests, in the order
//! they were taken, whatever order the dead one completed them in. The layout and the
//! algorithm are those of the vhost-user specification ("Inflight I/O tracking"):
//!
//! ```text
//! queue region (aligned to 64 bytes), one per queue:
//!   u64 features; u16 version (1; 0 = reset); u16 desc_num; u16 last_batch_head;
//!   u16 used_idx; then desc_num entries of
//!   { u8 inflight; u8 padding[5]; u16 next; u64 counter }
//! ```
//!
//! vhost-user-backend has no support for the area; skiff-blk implements it around the crate
//! (see `vu_proxy` for the messages and `block_backend` for the tracking).

use std::fs::File;
use std::num::Wrapping;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};

use vhost::vhost_user::message::VhostUserInflight;
use virtio_queue::desc::split::Descriptor;
use vm_memory::mmap::MmapRegion;
use vm_memory::{
    Address, Bytes, FileOffset, GuestAddress, GuestMemory, VolatileMemory, VolatileSlice,
};

use crate::chain::{ChainError, MAX_DESCRIPTORS};

/// Bytes of a queue region's header.
const HEADER: usize = 16;
/// Bytes of one descriptor's state.
const DESC: usize = 16;
/// Queue regions are aligned to this many bytes.
const ALIGN: usize = 64;
/// The only version of the region layout.
const VERSION: u16 = 1;

// Offsets in the queue header and in a descriptor's state.
const OFF_VERSION: usize = 8;
const OFF_DESC_NUM: usize = 10;
const OFF_LAST_BATCH_HEAD: usize = 12;
const OFF_USED_IDX: usize = 14;
const D_INFLIGHT: usize = 0;
const D_NEXT: usize = 6;
const D_COUNTER: usize = 8;

/// Errors of the inflight area.
#[derive(Debug, thiserror::Error)]
pub enum InflightError {
    /// The frontend asked for an area the backend cannot serve.
    #[error("inflight area for {queues} queue(s) of {size}: {why}")]
    BadGeometry {
        /// Queues asked for.
        queues: u16,
        /// Queue size asked for.
        size: u16,
        /// What is wrong.
        why: &'static str,
    },
    /// The area's size or offset does not match its geometry.
    #[error(
        "inflight area of {got} bytes at offset {offset}; {queues} queue(s) of {size} need {want}"
    )]
    BadSize {
        /// Size given.
        got: u64,
        /// Offset given.
        offset: u64,
        /// Queues.
        queues: u16,
        /// Queue size.
        size: u16,
        /// Size needed.
        want: u64,
    },
    /// Creating or sizing the memfd failed.
    #[error("cannot create the inflight memfd")]
    Memfd(#[source] std::io::Error),
    /// Mapping the area failed.
    #[error("cannot map the inflight area")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

/// Bytes one queue's region takes for queues of `queue_size`.
pub fn queue_region_size(queue_size: u16) -> usize {
    (HEADER + DESC * usize::from(queue_size)).next_multiple_of(ALIGN)
}

/// A mapped inflight area.
pub struct InflightArea {
    region: MmapRegion<()>,
    file: File,
    num_queues: u16,
    queue_size: u16,
    /// The next counter value of each queue (only its worker uses it).
    counters: Vec<AtomicU64>,
}

impl std::fmt::Debug for InflightArea {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("InflightArea")
            .field("num_queues", &self.num_queues)
            .field("queue_size", &self.queue_size)
            .finish()
    }
}

impl InflightArea {
    /// Creates a zeroed area for `num_queues` queues of up to `queue_size` descriptors
    /// (GET_INFLIGHT_FD); `max_queues` is how many queues the backend serves.
    pub fn create(
        num_queues: u16,
        queue_size: u16,
        max_queues: u16,
    ) -> Result<Self, InflightError> {
        check_geometry(num_queues, queue_size, max_queues)?;
        let size = usize::from(num_queues) * queue_region_size(queue_size);
        // SAFETY: memfd_create takes a NUL-terminated name and flags; the result is checked.
        let fd = unsafe {
            libc::memfd_create(
                c"skiff-blk-inflight".as_ptr(),
                libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
            )
        };
        if fd < 0 {
            return Err(InflightError::Memfd(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` was just created and is owned by nothing else.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        file.set_len(size as u64).map_err(InflightError::Memfd)?;
        // Nobody holding the fd (a later backend included) may shrink it under a mapping.
        // SAFETY: F_ADD_SEALS on a memfd we own; no memory is passed.
        let sealed = unsafe {
            libc::fcntl(
                file.as_raw_fd(),
                libc::F_ADD_SEALS,
                libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
            )
        };
        if sealed < 0 {
            return Err(InflightError::Memfd(std::io::Error::last_os_error()));
        }
        let area = Self::map(file, 0, size, num_queues, queue_size)?;
        let s = area.slice();
        for q in 0..usize::from(num_queues) {
            let base = q * queue_region_size(queue_size);
            store16(&s, base + OFF_VERSION, VERSION);
            store16(&s, base + OFF_DESC_NUM, queue_size);
        }
        Ok(area)
    }

    /// Maps an area the frontend handed over (SET_INFLIGHT_FD) without changing it.
    ///
    /// An area for more queues than this backend serves is fine (a previous backend served
    /// more); the extra regions are left alone. The file must hold the whole area.
    pub fn open(file: File, info: &VhostUserInflight) -> Result<Self, InflightError> {
        check_geometry(info.num_queues, info.queue_size, u16::MAX)?;
        let want = (usize::from(info.num_queues) * queue_region_size(info.queue_size)) as u64;
        let file_size = file.metadata().map_err(InflightError::Memfd)?.len();
        let fits = info
            .mmap_offset
            .checked_add(want)
            .is_some_and(|end| end <= file_size);
        if info.mmap_size < want || info.mmap_size > want + ALIGN as u64 * 1024 || !fits {
            return Err(InflightError::BadSize {
                got: if fits { info.mmap_size } else { file_size },
                offset: info.mmap_offset,
                queues: info.num_queues,
                size: info.queue_size,
                want,
            });
        }
        Self::map(
            file,
            info.mmap_offset,
            want as usize,
            info.num_queues,
            info.queue_size,
        )
    }

    fn map(
        file: File,
        offset: u64,
        size: usize,
        num_queues: u16,
        queue_size: u16,
    ) -> Result<Self, InflightError> {
        let mapped = file.try_clone().map_err(InflightError::Memfd)?;
        let region = MmapRegion::from_file(FileOffset::new(mapped, offset), size)
            .map_err(InflightError::Map)?;
        Ok(InflightArea {
            region,
            file,
            num_queues,
            queue_size,
            counters: (0..num_queues).map(|_| AtomicU64::new(1)).collect(),
        })
    }

    fn slice(&self) -> VolatileSlice<'_> {
        self.region.as_volatile_slice()
    }

    /// What GET_INFLIGHT_FD answers for this area.
    pub fn info(&self) -> VhostUserInflight {
        VhostUserInflight {
            mmap_size: self.region.size() as u64,
            mmap_offset: 0,
            num_queues: self.num_queues,
            queue_size: self.queue_size,
        }
    }

    /// The memfd behind the area.
    pub fn file(&self) -> &File {
        &self.file
    }

    /// Queue `q`'s part of the area, if the area has one.
    pub fn queue(&self, q: usize) -> Option<QueueInflight<'_>> {
        if q >= usize::from(self.num_queues) {
            return None;
        }
        let len = queue_region_size(self.queue_size);
        let slice = self.slice().subslice(q * len, len).ok()?;
        Some(QueueInflight {
            slice,
            counter: &self.counters[q],
            desc_num: self.queue_size,
        })
    }
}

fn check_geometry(queues: u16, size: u16, max_queues: u16) -> Result<(), InflightError> {
    let why = if queues == 0 || queues > max_queues {
        "the queue count is 0 or more than the backend serves"
    } else if size == 0 || size > 32768 {
        "the queue size is 0 or above 32768"
    } else {
        return Ok(());
    };
    Err(InflightError::BadGeometry { queues, size, why })
}

fn store16(s: &VolatileSlice<'_>, off: usize, v: u16) {
    // In bounds by construction (offsets within the queue region); an error cannot happen.
    let _ = s.store(v, off, Ordering::Release);
}

fn load16(s: &VolatileSlice<'_>, off: usize) -> u16 {
    s.load(off, Ordering::Acquire).unwrap_or(0)
}

/// One queue's inflight records. Only the queue's worker thread uses it.
pub struct QueueInflight<'a> {
    slice: VolatileSlice<'a>,
    counter: &'a AtomicU64,
    /// Descriptors per queue, as the area was made (not read back from shared memory).
    desc_num: u16,
}

impl QueueInflight<'_> {
    fn desc_num(&self) -> u16 {
        self.desc_num
    }

    /// The largest ring the area can track.
    pub fn capacity(&self) -> u16 {
        self.desc_num
    }

    /// Clears `head`'s flag without completing it (a recorded head the ring cannot hold).
    pub fn forget(&self, head: u16) {
        if let Some(d) = self.desc(head) {
            let _ = self.slice.store(0u8, d + D_INFLIGHT, Ordering::Release);
        }
    }

    fn desc(&self, head: u16) -> Option<usize> {
        (head < self.desc_num()).then(|| HEADER + DESC * usize::from(head))
    }

    /// Whether the region is in use (version 1; 0 means the frontend reset it).
    pub fn valid(&self) -> bool {
        load16(&self.slice, OFF_VERSION) == VERSION
    }

    /// Records that `head` was taken from the available ring. Returns false when the head
    /// is beyond the area's queue size (the frontend sized the area below the ring), so
    /// the request is not tracked.
    pub fn begin(&self, head: u16) -> bool {
        let Some(d) = self.desc(head) else {
            return false;
        };
        let counter = self.counter.fetch_add(1, Ordering::Relaxed);
        let _ = self.slice.store(counter, d + D_COUNTER, Ordering::Release);
        let _ = self.slice.store(1u8, d + D_INFLIGHT, Ordering::Release);
        true
    }

    /// Completes `head`: records it as the last batch, runs `publish` (which puts it in the
    /// used ring and returns the used index after it), then records the new used index and
    /// clears the head's inflight flag. A crash between the two records is repaired by
    /// [`QueueInflight::recover`].
    pub fn complete<E>(
        &self,
        head: u16,
        publish: impl FnOnce() -> Result<u16, E>,
    ) -> Result<(), E> {
        let Some(d) = self.desc(head) else {
            return publish().map(|_| ());
        };
        let last = load16(&self.slice, OFF_LAST_BATCH_HEAD);
        store16(&self.slice, d + D_NEXT, last);
        store16(&self.slice, OFF_LAST_BATCH_HEAD, head);
        let used = publish()?;
        // Flag first, then the index: a crash between the two leaves the recorded index
        // behind the ring's, which `recover` repairs (the other order would leave a
        // completed head flagged with nothing to show it).
        let _ = self.slice.store(0u8, d + D_INFLIGHT, Ordering::Release);
        store16(&self.slice, OFF_USED_IDX, used);
        Ok(())
    }

    /// After a backend change: given the used index in guest memory, repairs the last
    /// batch (completed in the ring but still flagged), and returns the heads still in
    /// flight, oldest first. Also sets the counter past every recorded one.
    pub fn recover(&self, ring_used: u16) -> Vec<u16> {
        let n = self.desc_num();
        let recorded = load16(&self.slice, OFF_USED_IDX);
        let mut batch = (Wrapping(ring_used) - Wrapping(recorded)).0;
        let mut head = load16(&self.slice, OFF_LAST_BATCH_HEAD);
        // Walk the last batch list; a fresh or foreign region simply has nothing flagged.
        let mut steps = 0u16;
        while batch > 0 && steps < n {
            let Some(d) = self.desc(head) else { break };
            if self
                .slice
                .load::<u8>(d + D_INFLIGHT, Ordering::Acquire)
                .unwrap_or(0)
                == 0
            {
                break;
            }
            let _ = self.slice.store(0u8, d + D_INFLIGHT, Ordering::Release);
            head = load16(&self.slice, d + D_NEXT);
            batch -= 1;
            steps += 1;
        }
        store16(&self.slice, OFF_USED_IDX, ring_used);
        let mut inflight: Vec<(u64, u16)> = Vec::new();
        let mut max = 0u64;
        for h in 0..n {
            let d = HEADER + DESC * usize::from(h);
            let counter: u64 = self
                .slice
                .load(d + D_COUNTER, Ordering::Acquire)
                .unwrap_or(0);
            max = max.max(counter);
            if self
                .slice
                .load::<u8>(d + D_INFLIGHT, Ordering::Acquire)
                .unwrap_or(0)
                != 0
            {
                inflight.push((counter, h));
            }
        }
        self.counter.store(max + 1, Ordering::Relaxed);
        inflight.sort_unstable();
        inflight.into_iter().map(|(_, h)| h).collect()
    }
}

/// The descriptors of the split-ring chain headed by `head`, walked the way
/// virtio-queue's `DescriptorChain` walks one (an indirect table replaces the descriptor
/// that refers to it; no nested tables; at most `queue_size` descriptors, or the table's
/// length inside one). virtio-queue builds chains only from the available ring, and a
/// resubmitted head may no longer be there, so recovery walks it here. Like the crate, an
/// invalid descriptor ends the chain; the request parser then rejects what is left.
///
/// Everything here is guest memory: a chain of more than [`MAX_DESCRIPTORS`] descriptors
/// (an indirect table may hold 65536) or of 4 GiB or more is refused, as the live path
/// refuses it ([`crate::chain`]).
pub fn chain_descriptors<M: GuestMemory>(
    mem: &M,
    desc_table: GuestAddress,
    queue_size: u16,
    head: u16,
) -> Result<Vec<Descriptor>, ChainError> {
    let mut out = Vec::new();
    let mut table = desc_table;
    let mut size = u32::from(queue_size);
    let mut ttl = size;
    let mut index = u32::from(head);
    let mut indirect = false;
    let mut bytes = 0u32;
    while ttl > 0 && index < size {
        let Some(addr) = table.checked_add(u64::from(index) * 16) else {
            break;
        };
        let Ok(desc) = mem.read_obj::<Descriptor>(addr) else {
            break;
        };
        if desc.refers_to_indirect_table() {
            let len = desc.len();
            if indirect || len == 0 || len % 16 != 0 || len / 16 > u32::from(u16::MAX) + 1 {
                break;
            }
            indirect = true;
            table = GuestAddress(desc.addr().raw_value());
            size = len / 16;
            ttl = size;
            index = 0;
            continue;
        }
        if out.len() == MAX_DESCRIPTORS {
            return Err(ChainError::TooLong);
        }
        bytes = bytes.checked_add(desc.len()).ok_or(ChainError::TooLarge)?;
        out.push(desc);
        ttl -= 1;
        if !desc.has_next() {
            break;
        }
        index = u32::from(desc.next());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use vm_memory::GuestMemoryMmap;

    use super::*;

    #[test]
    fn sizes_follow_the_layout() {
        assert_eq!(queue_region_size(256), 16 + 256 * 16 + 48);
        assert_eq!(queue_region_size(1), 64);
        let a = InflightArea::create(2, 128, 4).unwrap();
        let info = a.info();
        assert_eq!(info.mmap_size, 2 * queue_region_size(128) as u64);
        assert_eq!((info.num_queues, info.queue_size), (2, 128));
        assert!(a.queue(1).unwrap().valid());
        assert!(a.queue(2).is_none());
        assert!(InflightArea::create(5, 128, 4).is_err());
        assert!(InflightArea::create(1, 0, 4).is_err());
    }

    #[test]
    fn out_of_order_completions_resubmit_in_taken_order() {
        let a = InflightArea::create(1, 8, 1).unwrap();
        let q = a.queue(0).unwrap();
        for h in [5, 2, 7, 0] {
            assert!(q.begin(h));
        }
        // 2 completes first, then 0.
        let mut used = 0u16;
        for h in [2, 0] {
            q.complete(h, || -> Result<u16, ()> {
                used += 1;
                Ok(used)
            })
            .unwrap();
        }
        // Another backend maps the same memfd after this one died.
        let info = a.info();
        let b = InflightArea::open(a.file().try_clone().unwrap(), &info).unwrap();
        assert_eq!(b.queue(0).unwrap().recover(used), vec![5, 7]);
    }

    #[test]
    fn a_crash_after_publishing_clears_the_last_batch() {
        let a = InflightArea::create(1, 8, 1).unwrap();
        let q = a.queue(0).unwrap();
        assert!(q.begin(3) && q.begin(4));
        // The backend published 3 in the used ring (used idx 1) and died before recording it.
        let _ = q.complete(3, || -> Result<u16, ()> { Err(()) });
        assert_eq!(q.recover(1), vec![4]);
        // Counters continue after the largest recorded one.
        assert!(q.begin(6));
        assert_eq!(q.recover(1), vec![4, 6]);
    }

    #[test]
    fn a_crash_after_clearing_the_flag_loses_nothing() {
        let a = InflightArea::create(1, 8, 1).unwrap();
        let q = a.queue(0).unwrap();
        assert!(q.begin(2) && q.begin(5));
        // Completed and cleared, killed before recording used index 1.
        q.complete(2, || -> Result<u16, ()> { Ok(1) }).unwrap();
        store16(&a.slice(), OFF_USED_IDX, 0);
        assert_eq!(q.recover(1), vec![5]);
        // Completed, recorded, and the next one taken: nothing is repaired twice.
        q.complete(5, || -> Result<u16, ()> { Ok(2) }).unwrap();
        assert!(q.begin(1));
        assert_eq!(q.recover(2), vec![1]);
    }

    #[test]
    fn areas_are_sealed_and_checked_against_their_file() {
        let a = InflightArea::create(1, 8, 1).unwrap();
        assert!(a.file().set_len(10).is_err(), "the memfd can be shrunk");
        let e = InflightArea::open(memfd_of(10), &a.info()).unwrap_err();
        assert!(e.to_string().contains("of 10 bytes"), "{e}");
        // More queues than this backend serves: accepted (a previous one served more).
        let two = InflightArea::create(2, 8, 2).unwrap();
        let b = InflightArea::open(two.file().try_clone().unwrap(), &two.info()).unwrap();
        assert!(b.queue(1).is_some());
    }

    fn memfd_of(len: u64) -> File {
        // SAFETY: memfd_create with a NUL-terminated name; the result is checked.
        let fd = unsafe { libc::memfd_create(c"t".as_ptr(), libc::MFD_CLOEXEC) };
        assert!(fd >= 0);
        // SAFETY: `fd` was just created and is owned by nothing else.
        let f = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        f.set_len(len).unwrap();
        f
    }

    /// Writes descriptor `i` of the table at `table`.
    fn put_desc(mem: &GuestMemoryMmap<()>, table: u64, i: u64, d: (u64, u32, u16, u16)) {
        let at = GuestAddress(table + 16 * i);
        mem.write_obj(d.0, at).unwrap();
        mem.write_obj(d.1, GuestAddress(at.0 + 8)).unwrap();
        mem.write_obj(d.2, GuestAddress(at.0 + 12)).unwrap();
        mem.write_obj(d.3, GuestAddress(at.0 + 14)).unwrap();
    }

    #[test]
    fn the_recovery_walk_is_bounded() {
        const NEXT: u16 = 1;
        const INDIRECT: u16 = 4;
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 0x10_0000)]).unwrap();
        // Head 0 of a queue of 16 refers to an indirect table of 4000 descriptors.
        let n = 4000u64;
        put_desc(&mem, 0, 0, (0x1000, 16 * n as u32, INDIRECT, 0));
        for i in 0..n {
            let flags = if i + 1 < n { NEXT } else { 0 };
            put_desc(&mem, 0x1000, i, (0x8_0000, 16, flags, i as u16 + 1));
        }
        let walked = chain_descriptors(&mem, GuestAddress(0), 16, 0);
        assert!(matches!(walked, Err(ChainError::TooLong)), "{walked:?}");
        // One within the bound is walked.
        put_desc(
            &mem,
            0,
            0,
            (0x1000, 16 * MAX_DESCRIPTORS as u32, INDIRECT, 0),
        );
        put_desc(
            &mem,
            0x1000,
            MAX_DESCRIPTORS as u64 - 1,
            (0x8_0000, 16, 0, 0),
        );
        let walked = chain_descriptors(&mem, GuestAddress(0), 16, 0).unwrap();
        assert_eq!(walked.len(), MAX_DESCRIPTORS);
        // Head 1: three descriptors of 2 GiB each, 6 GiB in all (a chain is under 4 GiB).
        for i in 1..4u64 {
            let flags = if i < 3 { NEXT } else { 0 };
            put_desc(&mem, 0, i, (0x8_0000, 1 << 31, flags, i as u16 + 1));
        }
        let walked = chain_descriptors(&mem, GuestAddress(0), 16, 1);
        assert!(matches!(walked, Err(ChainError::TooLarge)), "{walked:?}");
    }

    #[test]
    fn bad_sizes_are_refused() {
        let a = InflightArea::create(1, 8, 1).unwrap();
        let mut info = a.info();
        info.mmap_size = 10;
        let e = InflightArea::open(a.file().try_clone().unwrap(), &info).unwrap_err();
        assert!(e.to_string().contains("need 192"), "{e}");
    }
}
