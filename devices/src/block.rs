//! virtio-blk request handling (virtio 1.2 §5.2) on one descriptor chain,
//! and the device configuration space.

use std::mem::{offset_of, size_of};
use std::ops::Deref;

use log::{debug, warn};
use virtio_bindings::virtio_blk::{
    virtio_blk_config, VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
    VIRTIO_BLK_T_DISCARD, VIRTIO_BLK_T_FLUSH, VIRTIO_BLK_T_GET_ID, VIRTIO_BLK_T_IN,
    VIRTIO_BLK_T_OUT, VIRTIO_BLK_T_WRITE_ZEROES, VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP,
};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::{self, ChainError};
use crate::disk::{DiskError, DiskImage, MAX_TRANSFER, SECTOR_SIZE, SERIAL_LEN};
use crate::iov::GuestSegment;

crate::metric_set! {
    /// skiff-blk's counters. Every request chain popped from a queue counts once in
    /// exactly one of: a `*_requests` counter of its type (it succeeded), `io_errors`,
    /// `invalid_requests`.
    pub struct BlockMetrics {
        /// VIRTIO_BLK_T_IN requests completed with VIRTIO_BLK_S_OK.
        read_requests,
        /// VIRTIO_BLK_T_OUT requests completed with VIRTIO_BLK_S_OK.
        write_requests,
        /// VIRTIO_BLK_T_FLUSH requests completed with VIRTIO_BLK_S_OK.
        flush_requests,
        /// VIRTIO_BLK_T_DISCARD requests completed with VIRTIO_BLK_S_OK.
        discard_requests,
        /// VIRTIO_BLK_T_WRITE_ZEROES requests completed with VIRTIO_BLK_S_OK.
        write_zeroes_requests,
        /// VIRTIO_BLK_T_GET_ID requests completed with VIRTIO_BLK_S_OK.
        get_id_requests,
        /// Bytes read from the image into guest buffers.
        read_bytes,
        /// Bytes written from guest buffers to the image.
        write_bytes,
        /// Requests failed by host I/O on the image (VIRTIO_BLK_S_IOERR).
        io_errors,
        /// Malformed chains, unsupported types or flags, writes to a read-only disk,
        /// out-of-range sectors, buffers outside guest memory.
        invalid_requests,
        /// Queue notifications (kicks) handled.
        kicks,
        /// Rings marked broken by a guest fault they cannot go on from (see `vring`).
        broken_rings,
    }
}

/// Length of `struct virtio_blk_outhdr`.
const HEADER_LEN: usize = 16;
/// Length of `struct virtio_blk_discard_write_zeroes`.
const RANGE_LEN: usize = 16;
/// Sectors per discard range advertised to the guest (and enforced). A discard writes
/// nothing: it punches a hole, or is skipped where the filesystem cannot.
pub const MAX_DISCARD_SECTORS: u32 = 0x3f_ffff;
/// Sectors per write-zeroes range advertised to the guest (and enforced). Where the
/// filesystem lacks FALLOC_FL_ZERO_RANGE (or PUNCH_HOLE with UNMAP) the zeroes are written
/// out, so a request is bounded as one carrying data is: [`MAX_TRANSFER`] bytes.
pub const MAX_WRITE_ZEROES_SECTORS: u32 = (MAX_TRANSFER as u64 / SECTOR_SIZE) as u32;
/// Ranges per discard / write-zeroes request advertised to the guest (and enforced: a
/// request with more, overlapping or not, fails with VIRTIO_BLK_S_IOERR).
pub const MAX_DISCARD_SEG: u32 = 1;
/// Most data segments per request advertised (`seg_max`, lower with smaller queues).
pub const MAX_SEGMENTS: u32 = 256;
/// Largest data segment advertised (`size_max`): with [`MAX_SEGMENTS`] a driver that
/// follows the config space never sends more than [`MAX_TRANSFER`] bytes in one request.
pub const SIZE_MAX: u32 = (MAX_TRANSFER / MAX_SEGMENTS as usize) as u32;

/// Why a request failed.
#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    /// The chain has no writable status byte.
    #[error("descriptor chain has no writable status byte")]
    NoStatus,
    /// The request header could not be read.
    #[error("request header is missing or not readable")]
    BadHeader,
    /// A data descriptor has the wrong direction.
    #[error("data descriptor has the wrong direction for the request")]
    WrongDirection,
    /// Data length is not a multiple of the sector size (or range size).
    #[error("data length {0} is not a multiple of the unit size")]
    Unaligned(usize),
    /// The request touches sectors past the end of the disk.
    #[error("sector range {sector}+{count} is beyond capacity {capacity}")]
    OutOfRange {
        /// First sector.
        sector: u64,
        /// Number of sectors.
        count: u64,
        /// Disk capacity in sectors.
        capacity: u64,
    },
    /// A discard / write-zeroes payload is malformed, or has more ranges than advertised.
    #[error("malformed discard/write-zeroes payload")]
    BadRanges,
    /// A discard / write-zeroes range is larger than advertised.
    #[error("range of {count} sectors, more than the {max} advertised")]
    RangeTooLarge {
        /// Sectors asked for.
        count: u32,
        /// The advertised limit.
        max: u32,
    },
    /// The request moves more data than one request may.
    #[error("{0} bytes of data, more than the {MAX_TRANSFER} a request may move")]
    TooLarge(usize),
    /// A write-type request on a read-only disk.
    #[error("write request on a read-only disk")]
    ReadOnly,
    /// Unsupported request type or flags.
    #[error("unsupported request type {0}")]
    Unsupported(u32),
    /// Guest memory access failed.
    #[error("guest memory access failed")]
    GuestMemory,
    /// The image I/O failed.
    #[error("image I/O failed")]
    Disk(#[from] DiskError),
}

impl BlockError {
    fn status(&self) -> u8 {
        match self {
            BlockError::Unsupported(_) => VIRTIO_BLK_S_UNSUPP as u8,
            _ => VIRTIO_BLK_S_IOERR as u8,
        }
    }

    /// Whether the host failed the request (as opposed to the guest sending a bad one).
    fn is_host_io(&self) -> bool {
        matches!(self, BlockError::Disk(d) if !matches!(d, DiskError::Guest(_) | DiskError::TooLarge(_)))
    }
}

/// Parsed layout of a request chain.
struct Request {
    kind: u32,
    sector: u64,
    /// Data segments with their direction (true = device writes).
    data: Vec<(GuestSegment, bool)>,
    status: GuestAddress,
}

fn parse(mem: &GuestMemoryMmap<()>, descs: &[Descriptor]) -> Result<Request, BlockError> {
    let last = descs.last().ok_or(BlockError::NoStatus)?;
    if !last.is_write_only() || last.len() == 0 {
        return Err(BlockError::NoStatus);
    }
    let status = last
        .addr()
        .0
        .checked_add(u64::from(last.len()) - 1)
        .map(GuestAddress)
        .ok_or(BlockError::NoStatus)?;
    if !GuestMemoryBackend::check_range(mem, status, 1) {
        return Err(BlockError::NoStatus);
    }
    let mut segs: Vec<(GuestSegment, bool)> = descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let len = if i + 1 == descs.len() {
                d.len() as usize - 1
            } else {
                d.len() as usize
            };
            (
                GuestSegment {
                    addr: d.addr(),
                    len,
                },
                d.is_write_only(),
            )
        })
        .filter(|(s, _)| s.len > 0)
        .collect();

    // Gather the 16-byte header from the leading device-readable bytes.
    let mut header = [0u8; HEADER_LEN];
    let mut got = 0;
    let mut consumed = 0;
    for (seg, writable) in segs.iter_mut() {
        if got == HEADER_LEN {
            break;
        }
        if *writable {
            return Err(BlockError::BadHeader);
        }
        let take = (HEADER_LEN - got).min(seg.len);
        mem.read_slice(&mut header[got..got + take], seg.addr)
            .map_err(|_| BlockError::BadHeader)?;
        got += take;
        seg.addr = GuestAddress(seg.addr.0 + take as u64);
        seg.len -= take;
        if seg.len == 0 {
            consumed += 1;
        }
    }
    if got < HEADER_LEN {
        return Err(BlockError::BadHeader);
    }
    segs.drain(..consumed);
    let kind = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let mut sector_bytes = [0u8; 8];
    sector_bytes.copy_from_slice(&header[8..16]);
    Ok(Request {
        kind,
        sector: u64::from_le_bytes(sector_bytes),
        data: segs,
        status,
    })
}

fn data_segments(req: &Request, device_writes: bool) -> Result<Vec<GuestSegment>, BlockError> {
    req.data
        .iter()
        .map(|(s, w)| {
            if *w == device_writes {
                Ok(*s)
            } else {
                Err(BlockError::WrongDirection)
            }
        })
        .collect()
}

/// Bytes of data of a read or write: whole sectors, at most [`MAX_TRANSFER`].
fn data_len(segs: &[GuestSegment]) -> Result<usize, BlockError> {
    let len = segs
        .iter()
        .try_fold(0usize, |sum, s| sum.checked_add(s.len))
        .ok_or(BlockError::TooLarge(usize::MAX))?;
    if len > MAX_TRANSFER {
        return Err(BlockError::TooLarge(len));
    }
    if len % SECTOR_SIZE as usize != 0 {
        return Err(BlockError::Unaligned(len));
    }
    Ok(len)
}

fn check_range(disk: &DiskImage, sector: u64, count: u64) -> Result<u64, BlockError> {
    let capacity = disk.sectors();
    match sector.checked_add(count) {
        Some(end) if end <= capacity => Ok(sector * SECTOR_SIZE),
        _ => Err(BlockError::OutOfRange {
            sector,
            count,
            capacity,
        }),
    }
}

/// Executes the request and counts it when it succeeds; returns bytes written into guest
/// buffers (status excluded).
fn execute(
    disk: &DiskImage,
    mem: &GuestMemoryMmap<()>,
    req: &Request,
    metrics: &BlockMetrics,
) -> Result<u32, BlockError> {
    match req.kind {
        VIRTIO_BLK_T_IN => {
            let segs = data_segments(req, true)?;
            let len = data_len(&segs)?;
            let offset = check_range(disk, req.sector, (len as u64) / SECTOR_SIZE)?;
            let n = disk.read_into(mem, &segs, offset)?;
            let used = u32::try_from(n).map_err(|_| BlockError::Unaligned(n))?;
            metrics.read_requests.inc(1);
            metrics.read_bytes.inc(n as u64);
            Ok(used)
        }
        VIRTIO_BLK_T_OUT => {
            if disk.read_only() {
                return Err(BlockError::ReadOnly);
            }
            let segs = data_segments(req, false)?;
            let len = data_len(&segs)?;
            let offset = check_range(disk, req.sector, (len as u64) / SECTOR_SIZE)?;
            disk.write_from(mem, &segs, offset)?;
            metrics.write_requests.inc(1);
            metrics.write_bytes.inc(len as u64);
            Ok(0)
        }
        VIRTIO_BLK_T_FLUSH => {
            if !disk.read_only() {
                disk.flush()?;
            }
            metrics.flush_requests.inc(1);
            Ok(0)
        }
        VIRTIO_BLK_T_GET_ID => {
            let segs = data_segments(req, true)?;
            let serial = disk.serial();
            let mut written = 0usize;
            for seg in segs {
                if written == SERIAL_LEN {
                    break;
                }
                let n = seg.len.min(SERIAL_LEN - written);
                mem.write_slice(&serial[written..written + n], seg.addr)
                    .map_err(|_| BlockError::GuestMemory)?;
                written += n;
            }
            metrics.get_id_requests.inc(1);
            Ok(written as u32)
        }
        VIRTIO_BLK_T_DISCARD | VIRTIO_BLK_T_WRITE_ZEROES => {
            if disk.read_only() {
                return Err(BlockError::ReadOnly);
            }
            let segs = data_segments(req, false)?;
            let len: usize = segs.iter().map(|s| s.len).sum();
            if len == 0 || len % RANGE_LEN != 0 || len / RANGE_LEN > MAX_DISCARD_SEG as usize {
                return Err(BlockError::BadRanges);
            }
            let mut payload = [0u8; RANGE_LEN * MAX_DISCARD_SEG as usize];
            let mut pos = 0;
            for seg in &segs {
                mem.read_slice(&mut payload[pos..pos + seg.len], seg.addr)
                    .map_err(|_| BlockError::GuestMemory)?;
                pos += seg.len;
            }
            for range in payload[..len].chunks_exact(RANGE_LEN) {
                let mut s = [0u8; 8];
                s.copy_from_slice(&range[0..8]);
                let sector = u64::from_le_bytes(s);
                let count = u32::from_le_bytes([range[8], range[9], range[10], range[11]]);
                let flags = u32::from_le_bytes([range[12], range[13], range[14], range[15]]);
                let unmap = flags & VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0;
                if flags & !VIRTIO_BLK_WRITE_ZEROES_FLAG_UNMAP != 0
                    || (req.kind == VIRTIO_BLK_T_DISCARD && unmap)
                {
                    return Err(BlockError::Unsupported(req.kind));
                }
                let max = if req.kind == VIRTIO_BLK_T_DISCARD {
                    MAX_DISCARD_SECTORS
                } else {
                    MAX_WRITE_ZEROES_SECTORS
                };
                if count > max {
                    return Err(BlockError::RangeTooLarge { count, max });
                }
                let offset = check_range(disk, sector, u64::from(count))?;
                let bytes = u64::from(count) * SECTOR_SIZE;
                if req.kind == VIRTIO_BLK_T_DISCARD {
                    disk.discard(offset, bytes)?;
                } else {
                    disk.write_zeroes(offset, bytes, unmap)?;
                }
            }
            if req.kind == VIRTIO_BLK_T_DISCARD {
                metrics.discard_requests.inc(1);
            } else {
                metrics.write_zeroes_requests.inc(1);
            }
            Ok(0)
        }
        other => Err(BlockError::Unsupported(other)),
    }
}

/// Processes one request chain, counts it in `metrics` and returns the used length to
/// report.
///
/// Never panics on guest-controlled input: a malformed chain gets
/// `VIRTIO_BLK_S_IOERR` when a status byte can be written, otherwise a used
/// length of 0 (so does a chain longer than [`chain::MAX_DESCRIPTORS`], whose status
/// byte is not looked for).
pub fn process_chain<M>(
    disk: &DiskImage,
    metrics: &BlockMetrics,
    mut chain: DescriptorChain<M>,
) -> u32
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let head = chain.head_index();
    match chain::collect(chain.by_ref()) {
        Ok(descs) => process_request(disk, metrics, chain.memory(), head, &descs),
        Err(e) => reject_chain(metrics, head, &e),
    }
}

/// Counts a chain that cannot be walked and returns the used length to report for it (0:
/// its status byte is not known).
pub fn reject_chain(metrics: &BlockMetrics, head: u16, e: &ChainError) -> u32 {
    if metrics.invalid_requests.inc_logged() {
        warn!(
            "dropping request {head}: {e} ({} invalid requests so far)",
            metrics.invalid_requests.get()
        );
    }
    0
}

/// Executes the request whose chain (headed by `head`) is `descs`, writes its status and
/// returns the used length, as [`process_chain`] does. Crash recovery uses it for requests
/// resubmitted from the inflight area, whose chains it walks itself.
pub fn process_request(
    disk: &DiskImage,
    metrics: &BlockMetrics,
    mem: &GuestMemoryMmap<()>,
    head: u16,
    descs: &[Descriptor],
) -> u32 {
    let req = match parse(mem, descs) {
        Ok(req) => req,
        Err(BlockError::NoStatus) => {
            if metrics.invalid_requests.inc_logged() {
                warn!(
                    "dropping request {head}: no writable status byte ({} invalid requests so far)",
                    metrics.invalid_requests.get()
                );
            }
            return 0;
        }
        Err(e) => {
            if metrics.invalid_requests.inc_logged() {
                warn!(
                    "bad request {head}: {e} ({} invalid requests so far)",
                    metrics.invalid_requests.get()
                );
            }
            return write_status(mem, descs_status(descs), VIRTIO_BLK_S_IOERR as u8, 0);
        }
    };
    let (status, written) = match execute(disk, mem, &req, metrics) {
        Ok(n) => (VIRTIO_BLK_S_OK as u8, n),
        Err(e) => {
            let counter = if e.is_host_io() {
                &metrics.io_errors
            } else {
                &metrics.invalid_requests
            };
            let log_it = counter.inc_logged();
            match &e {
                BlockError::Unsupported(_) | BlockError::ReadOnly => debug!("request failed: {e}"),
                _ if log_it => warn!(
                    "request type {} sector {} failed: {} ({} so far)",
                    req.kind,
                    req.sector,
                    crate::error_chain(&e),
                    counter.get()
                ),
                _ => {}
            }
            (e.status(), 0)
        }
    };
    write_status(mem, Some(req.status), status, written)
}

/// A read or write of the image that goes to the image asynchronously (crate::uring):
/// checked as [`process_request`] checks it, its buffers mapped.
pub struct ImageIo {
    /// A write to the image (else a read into guest memory).
    pub write: bool,
    /// Byte offset in the image.
    pub offset: u64,
    /// Bytes to move.
    pub len: usize,
    /// The guest's buffers, straight into guest memory.
    pub iovs: Vec<libc::iovec>,
    status: GuestAddress,
    kind: u32,
    sector: u64,
}

/// The request `descs` as an asynchronous image transfer, when it is a well-formed read or
/// write that can be one; `None` for every other request, well-formed or not, which
/// [`process_request`] then serves (and fails with the right status and counters).
pub fn image_io(
    disk: &DiskImage,
    mem: &GuestMemoryMmap<()>,
    descs: &[Descriptor],
) -> Option<ImageIo> {
    let req = parse(mem, descs).ok()?;
    let write = match req.kind {
        VIRTIO_BLK_T_IN => false,
        VIRTIO_BLK_T_OUT if !disk.read_only() => true,
        _ => return None,
    };
    let segs = data_segments(&req, !write).ok()?;
    let len = data_len(&segs).ok()?;
    let offset = check_range(disk, req.sector, (len as u64) / SECTOR_SIZE).ok()?;
    u32::try_from(len).ok()?;
    let iovs = disk.async_iovecs(mem, &segs)?;
    Some(ImageIo {
        write,
        offset,
        len,
        iovs,
        status: req.status,
        kind: req.kind,
        sector: req.sector,
    })
}

/// Completes `io` after its asynchronous transfer returned `result` (bytes moved, or a
/// negative errno): a short transfer is finished synchronously; the request is counted as
/// [`process_request`] counts it and its status written. Returns the used length.
pub fn finish_image_io(
    disk: &DiskImage,
    metrics: &BlockMetrics,
    mem: &GuestMemoryMmap<()>,
    io: &mut ImageIo,
    result: i32,
) -> u32 {
    let moved = match usize::try_from(result) {
        Ok(n) if n >= io.len => Ok(io.len),
        Ok(0) => Err(DiskError::ShortIo),
        Ok(n) => disk.finish_transfer(&mut io.iovs, io.offset, n, io.write),
        Err(_) => Err(DiskError::Io(std::io::Error::from_raw_os_error(-result))),
    };
    match moved {
        Ok(n) if io.write => {
            metrics.write_requests.inc(1);
            metrics.write_bytes.inc(n as u64);
            write_status(mem, Some(io.status), VIRTIO_BLK_S_OK as u8, 0)
        }
        Ok(n) => {
            metrics.read_requests.inc(1);
            metrics.read_bytes.inc(n as u64);
            // At most MAX_TRANSFER: image_io checked it fits.
            write_status(mem, Some(io.status), VIRTIO_BLK_S_OK as u8, n as u32)
        }
        Err(e) => {
            if metrics.io_errors.inc_logged() {
                warn!(
                    "request type {} sector {} failed: {} ({} so far)",
                    io.kind,
                    io.sector,
                    crate::error_chain(&e),
                    metrics.io_errors.get()
                );
            }
            write_status(mem, Some(io.status), VIRTIO_BLK_S_IOERR as u8, 0)
        }
    }
}

fn descs_status(descs: &[Descriptor]) -> Option<GuestAddress> {
    descs.last().map(|d| {
        GuestAddress(
            d.addr()
                .0
                .wrapping_add(u64::from(d.len()).saturating_sub(1)),
        )
    })
}

fn write_status(
    mem: &GuestMemoryMmap<()>,
    addr: Option<GuestAddress>,
    status: u8,
    written: u32,
) -> u32 {
    match addr {
        Some(addr) if mem.write_obj(status, addr).is_ok() => written.saturating_add(1),
        _ => 0,
    }
}

/// Parameters that go into the virtio-blk configuration space.
#[derive(Clone, Copy, Debug)]
pub struct BlockConfigSpace {
    /// Capacity in 512-byte sectors.
    pub capacity: u64,
    /// Maximum data segments per request (advertised as at most [`MAX_SEGMENTS`]).
    pub seg_max: u32,
    /// Number of request queues.
    pub num_queues: u16,
}

impl BlockConfigSpace {
    /// Serializes as `struct virtio_blk_config`, little endian.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut b = vec![0u8; size_of::<virtio_blk_config>()];
        let mut put = |off: usize, v: &[u8]| b[off..off + v.len()].copy_from_slice(v);
        put(
            offset_of!(virtio_blk_config, capacity),
            &self.capacity.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, size_max),
            &SIZE_MAX.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, seg_max),
            &self.seg_max.clamp(1, MAX_SEGMENTS).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, blk_size),
            &(SECTOR_SIZE as u32).to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, num_queues),
            &self.num_queues.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_sectors),
            &MAX_DISCARD_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_discard_seg),
            &MAX_DISCARD_SEG.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, discard_sector_alignment),
            &8u32.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_sectors),
            &MAX_WRITE_ZEROES_SECTORS.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, max_write_zeroes_seg),
            &MAX_DISCARD_SEG.to_le_bytes(),
        );
        put(
            offset_of!(virtio_blk_config, write_zeroes_may_unmap),
            &[1u8],
        );
        b
    }
}

/// Returns `len` bytes of `config` from `offset` (zero-filled past the end).
pub fn config_slice(config: &[u8], offset: u32, len: u32) -> Vec<u8> {
    let mut out = vec![0u8; len as usize];
    let start = (offset as usize).min(config.len());
    let end = (offset as usize)
        .saturating_add(len as usize)
        .min(config.len());
    out[..end - start].copy_from_slice(&config[start..end]);
    out
}

#[cfg(test)]
#[path = "block_tests.rs"]
mod tests;
