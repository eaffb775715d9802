//! Scatter-gather helpers: turn guest-memory ranges into `iovec`s that point
//! straight into the mapped guest RAM, so data moves with one
//! `preadv`/`pwritev`/`readv`/`writev` and no intermediate copy.

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryMmap, VolatileSlice};

/// A guest-physical range taken from one descriptor.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct GuestSegment {
    /// Guest-physical start address.
    pub addr: GuestAddress,
    /// Length in bytes.
    pub len: usize,
}

/// Errors raised while mapping guest ranges.
#[derive(Debug, thiserror::Error)]
pub enum IovError {
    /// The range is not (entirely) backed by guest memory.
    #[error("guest range {addr:#x}+{len:#x} is outside guest memory")]
    OutOfGuestMemory {
        /// Start of the range.
        addr: u64,
        /// Length of the range.
        len: usize,
    },
}

fn slice_to_iovec(slice: &VolatileSlice<'_, ()>) -> libc::iovec {
    libc::iovec {
        iov_base: slice.ptr_guard_mut().as_ptr().cast(),
        iov_len: slice.len(),
    }
}

/// Appends iovecs covering `seg` (split at region boundaries) to `out`.
///
/// The pointers stay valid as long as the memory object `mem` is alive.
pub fn push_segment(
    mem: &GuestMemoryMmap<()>,
    seg: GuestSegment,
    out: &mut Vec<libc::iovec>,
) -> Result<(), IovError> {
    if seg.len == 0 {
        return Ok(());
    }
    let oob = || IovError::OutOfGuestMemory {
        addr: seg.addr.0,
        len: seg.len,
    };
    if !GuestMemoryBackend::check_range(mem, seg.addr, seg.len) {
        return Err(oob());
    }
    for slice in GuestMemoryBackend::get_slices(mem, seg.addr, seg.len) {
        let slice = slice.map_err(|_| oob())?;
        out.push(slice_to_iovec(&slice));
    }
    Ok(())
}

/// Total length of a set of iovecs.
pub fn iov_len(iovs: &[libc::iovec]) -> usize {
    iovs.iter().map(|v| v.iov_len).sum()
}

/// Drops the first `n` bytes from `iovs`, returning the index of the first
/// iovec that still has data (which has been shortened in place).
pub fn advance(iovs: &mut [libc::iovec], start: usize, mut n: usize) -> usize {
    let mut idx = start;
    while n > 0 && idx < iovs.len() {
        let cur = &mut iovs[idx];
        if n >= cur.iov_len {
            n -= cur.iov_len;
            cur.iov_len = 0;
            idx += 1;
        } else {
            // Pointer arithmetic within the same guest mapping; no dereference here.
            cur.iov_base = cur.iov_base.cast::<u8>().wrapping_add(n).cast();
            cur.iov_len -= n;
            n = 0;
        }
    }
    while idx < iovs.len() && iovs[idx].iov_len == 0 {
        idx += 1;
    }
    idx
}

/// Returns the guest address of logical byte `offset` within `segs`.
pub fn addr_at(segs: &[GuestSegment], mut offset: usize) -> Option<GuestAddress> {
    for seg in segs {
        if offset < seg.len {
            return seg.addr.0.checked_add(offset as u64).map(GuestAddress);
        }
        offset -= seg.len;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_split_across_regions() {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[
            (GuestAddress(0), 0x1000),
            (GuestAddress(0x1000), 0x1000),
        ])
        .expect("mem");
        let mut iovs = Vec::new();
        push_segment(
            &mem,
            GuestSegment {
                addr: GuestAddress(0xf00),
                len: 0x200,
            },
            &mut iovs,
        )
        .expect("in range");
        assert_eq!(iovs.len(), 2);
        assert_eq!(iovs[0].iov_len, 0x100);
        assert_eq!(iovs[1].iov_len, 0x100);
        assert!(push_segment(
            &mem,
            GuestSegment {
                addr: GuestAddress(0x1f00),
                len: 0x200
            },
            &mut iovs
        )
        .is_err());
    }

    #[test]
    fn advance_partial() {
        let mut a = [0u8; 8];
        let mut b = [0u8; 8];
        let mut iovs = vec![
            libc::iovec {
                iov_base: a.as_mut_ptr().cast(),
                iov_len: 8,
            },
            libc::iovec {
                iov_base: b.as_mut_ptr().cast(),
                iov_len: 8,
            },
        ];
        let idx = advance(&mut iovs, 0, 10);
        assert_eq!(idx, 1);
        assert_eq!(iovs[1].iov_len, 6);
        assert_eq!(iov_len(&iovs[idx..]), 6);
        let segs = [
            GuestSegment {
                addr: GuestAddress(0x100),
                len: 4,
            },
            GuestSegment {
                addr: GuestAddress(0x200),
                len: 4,
            },
        ];
        assert_eq!(addr_at(&segs, 5), Some(GuestAddress(0x201)));
        assert_eq!(addr_at(&segs, 8), None);
    }
}
