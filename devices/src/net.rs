//! virtio-net frame movement (virtio 1.2 §5.1) between descriptor chains and
//! a TAP-like fd, straight from/to guest memory with readv/writev, plus the
//! control queue and the configuration space.

use std::io;
use std::mem::{offset_of, size_of};
use std::ops::Deref;
use std::os::fd::RawFd;

use virtio_bindings::virtio_net::{
    virtio_net_config, VIRTIO_NET_CTRL_MQ, VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, VIRTIO_NET_ERR,
    VIRTIO_NET_OK, VIRTIO_NET_S_LINK_UP,
};
use virtio_queue::DescriptorChain;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::chain::{self, ChainError, MAX_DESCRIPTORS};
use crate::iov::{self, GuestSegment};
use tapdev::VNET_HDR_LEN;

/// Offset of `num_buffers` in `struct virtio_net_hdr_v1`.
const NUM_BUFFERS_OFFSET: usize = 10;

crate::metric_set! {
    /// skiff-net's counters. Bytes are Ethernet frame bytes, virtio-net header excluded.
    pub struct NetMetrics {
        /// Frames delivered into guest rx buffers.
        rx_frames,
        /// Bytes of the frames in `rx_frames`.
        rx_bytes,
        /// Frames read from the TAP but not delivered: larger than the guest's rx buffer,
        /// shorter than the virtio-net header, or the header could not be written.
        rx_dropped,
        /// TAP reads that failed (other than EAGAIN).
        rx_errors,
        /// Frames from guest tx chains written to the TAP.
        tx_frames,
        /// Bytes of the frames in `tx_frames`.
        tx_bytes,
        /// Frames from the guest lost because the TAP write failed (other than EAGAIN).
        tx_errors,
        /// rx or tx chains with the wrong direction, smaller than the virtio-net header or
        /// outside guest memory; control commands without an ack byte.
        invalid_requests,
        /// Queue notifications (kicks) handled, control queue included.
        kicks,
        /// Rings marked broken by a guest fault they cannot go on from (see `vring`).
        broken_rings,
    }
}

/// Errors moving frames.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// The fd has no frame to read / no room to write right now.
    #[error("operation would block")]
    WouldBlock,
    /// The descriptor chain cannot carry a frame.
    #[error("bad descriptor chain: {0}")]
    BadChain(&'static str),
    /// The descriptor chain is too long to walk.
    #[error(transparent)]
    Chain(#[from] ChainError),
    /// A buffer is outside guest memory.
    #[error("guest buffer is not in guest memory")]
    Guest(#[from] iov::IovError),
    /// Writing into guest memory failed.
    #[error("cannot write the virtio-net header into guest memory")]
    GuestWrite,
    /// The TAP gave a frame shorter than the virtio-net header.
    #[error("{0}-byte frame from TAP is shorter than the virtio-net header")]
    ShortFrame(usize),
    /// The frame (virtio-net header included) is larger than the rx chain.
    #[error("frame is larger than the {0}-byte rx chain")]
    Truncated(usize),
    /// readv/writev failed.
    #[error("TAP I/O failed")]
    Io(#[source] io::Error),
}

fn segments<M>(
    chain: &mut DescriptorChain<M>,
    device_writes: bool,
) -> Result<Vec<GuestSegment>, NetError>
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let descs = chain::collect(chain.by_ref())?;
    if descs.is_empty() {
        return Err(NetError::BadChain("empty chain"));
    }
    descs
        .iter()
        .map(|d| {
            if d.is_write_only() == device_writes {
                Ok(GuestSegment {
                    addr: d.addr(),
                    len: d.len() as usize,
                })
            } else {
                Err(NetError::BadChain("descriptor has the wrong direction"))
            }
        })
        .collect()
}

/// The iovecs of `segs` (a buffer across a memory-region boundary takes two), at most
/// `max`: more than one readv/writev takes would fail every time, and the chain with them.
fn to_iovecs(
    mem: &GuestMemoryMmap<()>,
    segs: &[GuestSegment],
    max: usize,
) -> Result<Vec<libc::iovec>, NetError> {
    let mut iovs = Vec::with_capacity(segs.len());
    for seg in segs {
        iov::push_segment(mem, *seg, &mut iovs)?;
    }
    if iovs.len() > max {
        return Err(NetError::BadChain(
            "more buffers than one readv/writev takes",
        ));
    }
    if iov::iov_len(&iovs) < VNET_HDR_LEN {
        return Err(NetError::BadChain(
            "buffer smaller than the virtio-net header",
        ));
    }
    Ok(iovs)
}

fn check(ret: isize) -> Result<usize, NetError> {
    if ret < 0 {
        let err = io::Error::last_os_error();
        if err.kind() == io::ErrorKind::WouldBlock {
            return Err(NetError::WouldBlock);
        }
        return Err(NetError::Io(err));
    }
    Ok(ret as usize)
}

/// Reads one frame (virtio-net header included) from `fd` into the
/// device-writable buffers of an rx chain and sets `num_buffers = 1`.
/// Returns the used length. Counts the outcome in `metrics` (EAGAIN counts nothing).
pub fn rx_frame<M>(
    fd: RawFd,
    chain: &mut DescriptorChain<M>,
    metrics: &NetMetrics,
) -> Result<u32, NetError>
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let res = read_frame(fd, chain);
    match &res {
        Ok(len) => {
            metrics.rx_frames.inc(1);
            metrics
                .rx_bytes
                .inc((*len as u64).saturating_sub(VNET_HDR_LEN as u64));
        }
        Err(NetError::WouldBlock) => {}
        Err(NetError::Io(_)) => metrics.rx_errors.inc(1),
        Err(NetError::ShortFrame(_) | NetError::Truncated(_) | NetError::GuestWrite) => {
            metrics.rx_dropped.inc(1)
        }
        Err(NetError::BadChain(_) | NetError::Chain(_) | NetError::Guest(_)) => {
            metrics.invalid_requests.inc(1)
        }
    }
    res
}

fn read_frame<M>(fd: RawFd, chain: &mut DescriptorChain<M>) -> Result<u32, NetError>
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let segs = segments(chain, true)?;
    let mem: &GuestMemoryMmap<()> = chain.memory();
    // One iovec is left for the spill byte.
    let mut iovs = to_iovecs(mem, &segs, MAX_DESCRIPTORS - 1)?;
    // A TAP read truncates a frame that does not fit, silently; one spare byte past the
    // guest's buffers tells a frame that did not fit from one that fits exactly.
    let buffer = iov::iov_len(&iovs);
    let mut spill = [0u8; 1];
    iovs.push(libc::iovec {
        iov_base: spill.as_mut_ptr().cast(),
        iov_len: spill.len(),
    });
    let n = loop {
        let cnt = libc::c_int::try_from(iovs.len())
            .map_err(|_| NetError::BadChain("too many buffers"))?;
        // SAFETY: the iovecs point into mapped guest memory checked by vm-memory and kept
        // alive by the chain's memory guard, and to `spill`, alive across the call; the
        // kernel writes only within their bounds.
        let ret = unsafe { libc::readv(fd, iovs.as_ptr(), cnt) };
        match check(ret) {
            Err(NetError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => break other?,
        }
    };
    if n < VNET_HDR_LEN {
        return Err(NetError::ShortFrame(n));
    }
    if n > buffer {
        return Err(NetError::Truncated(buffer));
    }
    for (i, byte) in 1u16.to_le_bytes().iter().enumerate() {
        let addr: GuestAddress =
            iov::addr_at(&segs, NUM_BUFFERS_OFFSET + i).ok_or(NetError::GuestWrite)?;
        mem.write_obj(*byte, addr)
            .map_err(|_| NetError::GuestWrite)?;
    }
    u32::try_from(n).map_err(|_| NetError::BadChain("frame too long"))
}

/// Writes the device-readable buffers of a tx chain (header included) to `fd`
/// as one frame. Returns the number of bytes written. Counts the outcome in `metrics`
/// (EAGAIN counts nothing: the chain is retried).
pub fn tx_frame<M>(
    fd: RawFd,
    chain: &mut DescriptorChain<M>,
    metrics: &NetMetrics,
) -> Result<usize, NetError>
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let res = write_frame(fd, chain);
    match &res {
        Ok(n) => {
            metrics.tx_frames.inc(1);
            metrics
                .tx_bytes
                .inc((*n as u64).saturating_sub(VNET_HDR_LEN as u64));
        }
        Err(NetError::WouldBlock) => {}
        Err(NetError::BadChain(_) | NetError::Chain(_) | NetError::Guest(_)) => {
            metrics.invalid_requests.inc(1)
        }
        Err(_) => metrics.tx_errors.inc(1),
    }
    res
}

fn write_frame<M>(fd: RawFd, chain: &mut DescriptorChain<M>) -> Result<usize, NetError>
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let segs = segments(chain, false)?;
    let mem: &GuestMemoryMmap<()> = chain.memory();
    let iovs = to_iovecs(mem, &segs, MAX_DESCRIPTORS)?;
    loop {
        let cnt = libc::c_int::try_from(iovs.len())
            .map_err(|_| NetError::BadChain("too many buffers"))?;
        // SAFETY: the iovecs point into mapped guest memory checked by vm-memory; writev
        // only reads from them.
        let ret = unsafe { libc::writev(fd, iovs.as_ptr(), cnt) };
        match check(ret) {
            Err(NetError::Io(e)) if e.kind() == io::ErrorKind::Interrupted => continue,
            other => return other,
        }
    }
}

/// Handles one control-queue command; returns the used length (0 when no
/// ack byte can be written, counted in `invalid_requests`).
pub fn ctrl_command<M>(chain: &mut DescriptorChain<M>, max_pairs: u16, metrics: &NetMetrics) -> u32
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let len = ctrl_reply(chain, max_pairs);
    if len == 0 {
        metrics.invalid_requests.inc(1);
    }
    len
}

fn ctrl_reply<M>(chain: &mut DescriptorChain<M>, max_pairs: u16) -> u32
where
    M: Deref<Target = GuestMemoryMmap<()>>,
{
    let Ok(descs) = chain::collect(chain.by_ref()) else {
        return 0;
    };
    let mem: &GuestMemoryMmap<()> = chain.memory();
    let Some(ack) = descs
        .iter()
        .rev()
        .find(|d| d.is_write_only() && d.len() > 0)
    else {
        return 0;
    };
    let ack_addr = GuestAddress(ack.addr().0.wrapping_add(u64::from(ack.len()) - 1));
    if !GuestMemoryBackend::check_range(mem, ack_addr, 1) {
        return 0;
    }
    let mut cmd = [0u8; 4];
    let mut got = 0;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        let take = (cmd.len() - got).min(d.len() as usize);
        if mem.read_slice(&mut cmd[got..got + take], d.addr()).is_err() {
            break;
        }
        got += take;
        if got == cmd.len() {
            break;
        }
    }
    let pairs = u16::from_le_bytes([cmd[2], cmd[3]]);
    let ok = got == cmd.len()
        && u32::from(cmd[0]) == VIRTIO_NET_CTRL_MQ
        && u32::from(cmd[1]) == VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET
        && (1..=max_pairs).contains(&pairs);
    let status = if ok { VIRTIO_NET_OK } else { VIRTIO_NET_ERR } as u8;
    match mem.write_obj(status, ack_addr) {
        Ok(()) => 1,
        Err(_) => 0,
    }
}

/// Serializes `struct virtio_net_config`, little endian.
pub fn config_bytes(mac: Option<[u8; 6]>, max_pairs: u16) -> Vec<u8> {
    let mut b = vec![0u8; size_of::<virtio_net_config>()];
    if let Some(mac) = mac {
        b[offset_of!(virtio_net_config, mac)..][..6].copy_from_slice(&mac);
    }
    b[offset_of!(virtio_net_config, status)..][..2]
        .copy_from_slice(&(VIRTIO_NET_S_LINK_UP as u16).to_le_bytes());
    b[offset_of!(virtio_net_config, max_virtqueue_pairs)..][..2]
        .copy_from_slice(&max_pairs.to_le_bytes());
    b
}

#[cfg(test)]
#[path = "net_tests.rs"]
mod tests;
