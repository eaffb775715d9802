//! The synthetic guest's virtio-net driver: a receive ring (queue 0) and a transmit ring
//! (queue 1) in guest memory, driven as Linux's virtio_net drives them (one buffer per frame,
//! the virtio-net header in front; with EVENT_IDX, as Linux negotiates it, a kick only when
//! the device's `avail_event` asks for one and an interrupt asked for at the next receive
//! buffer used or once three quarters of the transmitted frames are; without it, a kick
//! only when the device has not switched kicks off), against whichever device serves the
//! rings: skiff-net over vhost-user or the kernel's vhost-net. And the floor: the same
//! frames through the TAP's own read and write, no rings at all.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::frames::{Kind, Template, GSO_TCPV4, VNET_HDR};
use crate::split_ring::{wait_call, Ring, F_WRITE, QSIZE};
use crate::wire::{wait_readable, Received, Window};
use crate::BenchError;

/// Guest RAM of a run.
pub const RAM: u64 = 64 << 20;
/// Where the buffers start (the rings lie below).
const BUFFERS: u64 = 8 << 20;
/// One buffer: a virtio-net header and the largest frame, rounded up.
const SLOT: u64 = 0x10400;
/// The receive queue.
pub const RX: Ring = Ring::at(0);
/// The transmit queue.
pub const TX: Ring = Ring::at(1);
/// How long the device may keep frames after the window before the run counts them lost.
const DRAIN: Duration = Duration::from_secs(2);
/// The receiver raises the source's credit every this many frames.
const CREDIT_EVERY: u64 = 32;

const _: () = assert!(SLOT >= (VNET_HDR + Kind::Tso.len()) as u64);
const _: () = assert!(BUFFERS + 2 * SLOT * QSIZE as u64 <= RAM);

fn slot(ring: usize, s: u16) -> u64 {
    BUFFERS + (ring as u64 * u64::from(QSIZE) + u64::from(s)) * SLOT
}

/// The rings' notifications, as KVM would carry them.
pub struct Rings<'a> {
    /// Guest RAM.
    pub mem: &'a GuestMemoryMmap,
    /// Queue 0's and queue 1's kick eventfds.
    pub kicks: [&'a EventFd; 2],
    /// The interrupt (both queues').
    pub call: &'a EventFd,
    /// VIRTIO_RING_F_EVENT_IDX was negotiated.
    pub event_idx: bool,
}

impl Rings<'_> {
    /// Kicks queue `q` after its available index moved from `old` to `new`, if the device
    /// asks for it.
    fn kick(&self, q: usize, ring: Ring, old: u16, new: u16) {
        let wanted = if self.event_idx {
            ring.needs_kick(self.mem, old, new)
        } else {
            ring.wants_kick(self.mem)
        };
        if wanted {
            let _ = self.kicks[q].write(1);
        }
    }

    /// Before the driver sleeps: with EVENT_IDX, asks for an interrupt once the device has
    /// used entry `at`; whether the device has used more since `used` (then the driver must
    /// not sleep, or it may miss the interrupt it just asked for).
    fn arm(&self, ring: Ring, used: u16, at: u16) -> bool {
        if !self.event_idx {
            return false;
        }
        ring.set_used_event(self.mem, at);
        std::sync::atomic::fence(Ordering::SeqCst);
        ring.used_idx(self.mem) != used
    }
}

/// Sends frames 0, 1, ... on the transmit ring until the window ends, then waits for the
/// device to take the last ones. The frames sent.
pub fn transmit(r: &Rings<'_>, t: &Template, w: Window) -> Result<u64, BenchError> {
    let mem = r.mem;
    let len = (VNET_HDR + t.len()) as u32;
    let mut frame = vec![0u8; len as usize];
    frame[..VNET_HDR].copy_from_slice(&t.kind.vnet_hdr());
    t.write(0, &mut frame[VNET_HDR..]);
    for s in 0..QSIZE {
        mem.write_slice(&frame, GuestAddress(slot(1, s)))
            .map_err(|e| BenchError::Usage(format!("guest RAM: {e}")))?;
    }
    let (seq_at, _) = t.seq_field(0);
    let mut free: Vec<u16> = (0..QSIZE).rev().collect();
    let (mut avail, mut used) = (0u16, 0u16);
    let mut seq = 0u64;
    let mut drain_until = None;
    loop {
        let now = Instant::now();
        if now >= w.end && drain_until.is_none() {
            drain_until = Some(now + DRAIN);
        }
        if let Some(limit) = drain_until {
            if free.len() == usize::from(QSIZE) {
                return Ok(seq);
            }
            if now > limit {
                return Err(BenchError::Checks(format!(
                    "the device kept {} transmitted frames {DRAIN:?} after the run",
                    usize::from(QSIZE) - free.len()
                )));
            }
        } else if !free.is_empty() {
            let old = avail;
            while let Some(s) = free.pop() {
                let (_, bytes) = t.seq_field(seq);
                let at = GuestAddress(slot(1, s) + (VNET_HDR + seq_at) as u64);
                let _ = mem.write_slice(&bytes, at);
                TX.set_desc(mem, s, slot(1, s), len, 0, 0);
                TX.make_available(mem, avail, s);
                avail = avail.wrapping_add(1);
                seq += 1;
            }
            r.kick(1, TX, old, avail);
        }
        let mut reaped = 0;
        let now_used = TX.used_idx(mem);
        while used != now_used {
            let head = TX.used_head(mem, used);
            used = used.wrapping_add(1);
            if head >= QSIZE || free.contains(&head) {
                return Err(BenchError::Checks(format!(
                    "the device returned transmit buffer {head}, which it did not hold"
                )));
            }
            free.push(head);
            reaped += 1;
        }
        if reaped == 0 {
            let in_flight = avail.wrapping_sub(used);
            if r.arm(TX, used, used.wrapping_add(in_flight * 3 / 4)) {
                continue;
            }
            if !wait_call(r.call, 20) {
                // Nothing in 20 ms: kick in case one was lost.
                let _ = r.kicks[1].write(1);
            }
        }
    }
}

/// Hands every receive buffer to the device and takes frames from it until the window ends,
/// raising `received` (the next sequence number expected) and `credit` for the source.
pub fn receive(
    r: &Rings<'_>,
    t: &Template,
    w: Window,
    received: &AtomicU64,
    credit: &EventFd,
) -> Result<Received, BenchError> {
    let mem = r.mem;
    let mut out = Received::default();
    for s in 0..QSIZE {
        RX.set_desc(mem, s, slot(0, s), SLOT as u32, F_WRITE, 0);
        RX.make_available(mem, s, s);
    }
    let mut avail = QSIZE;
    let mut used = 0u16;
    let mut credited = 0u64;
    r.arm(RX, 0, 0);
    let _ = r.kicks[0].write(1);
    let want_gso = if t.kind == Kind::Tso { GSO_TCPV4 } else { 0 };
    while Instant::now() < w.end {
        let now_used = RX.used_idx(mem);
        let at = Instant::now();
        let mut reaped = 0;
        let old = avail;
        while used != now_used {
            let head = RX.used_head(mem, used);
            let len = RX.used_len(mem, used) as usize;
            used = used.wrapping_add(1);
            if head >= QSIZE || len > SLOT as usize || len < VNET_HDR {
                out.corrupt += 1;
                continue;
            }
            match in_place(mem, slot(0, head), len) {
                Some(frame) => out.note(t, &frame[VNET_HDR..], frame[1] == want_gso, at, &w),
                None => out.corrupt += 1,
            }
            RX.make_available(mem, avail, head);
            avail = avail.wrapping_add(1);
            reaped += 1;
            credited = raise(credited, out.order.next, received, credit);
        }
        if reaped > 0 {
            received.store(out.order.next, Ordering::Release);
            let _ = credit.write(1);
            credited = out.order.next;
            r.kick(0, RX, old, avail);
        } else if !r.arm(RX, used, used) && !wait_call(r.call, 20) {
            // Nothing in 20 ms: kick in case one was lost.
            let _ = r.kicks[0].write(1);
        }
    }
    Ok(out)
}

/// The floor: frames 0, 1, ... written straight to the TAP until the window ends. The
/// frames sent.
pub fn tap_transmit(tap: RawFd, t: &Template, w: Window) -> Result<u64, BenchError> {
    let mut frame = vec![0u8; VNET_HDR + t.len()];
    frame[..VNET_HDR].copy_from_slice(&t.kind.vnet_hdr());
    t.write(0, &mut frame[VNET_HDR..]);
    let (seq_at, _) = t.seq_field(0);
    let mut seq = 0u64;
    while Instant::now() < w.end {
        let (_, bytes) = t.seq_field(seq);
        frame[VNET_HDR + seq_at..VNET_HDR + seq_at + 8].copy_from_slice(&bytes);
        // SAFETY: write reads `frame`, valid for its length across the call.
        let n = unsafe { libc::write(tap, frame.as_ptr().cast(), frame.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                continue;
            }
            return Err(BenchError::Host("writing to the TAP".into(), e));
        }
        seq += 1;
    }
    Ok(seq)
}

/// The floor: frames read straight from the TAP until the window ends.
pub fn tap_receive(
    tap: &impl AsRawFd,
    t: &Template,
    w: Window,
    received: &AtomicU64,
    credit: &EventFd,
) -> Result<Received, BenchError> {
    let fd = tap.as_raw_fd();
    let mut out = Received::default();
    let mut buf = vec![0u8; SLOT as usize];
    let want_gso = if t.kind == Kind::Tso { GSO_TCPV4 } else { 0 };
    let mut credited = 0u64;
    while Instant::now() < w.end {
        // SAFETY: read writes at most `buf.len()` bytes into `buf`, valid across the call.
        let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::EAGAIN) {
                wait_readable(fd, 10);
                continue;
            }
            return Err(BenchError::Host("reading from the TAP".into(), e));
        }
        let at = Instant::now();
        let frame = &buf[..n as usize];
        if frame.len() < VNET_HDR {
            out.corrupt += 1;
        } else {
            out.note(t, &frame[VNET_HDR..], frame[1] == want_gso, at, &w);
        }
        credited = raise(credited, out.order.next, received, credit);
    }
    Ok(out)
}

/// Tells the source how far the receiver has got once it is [`CREDIT_EVERY`] frames past
/// the last time; the new mark.
fn raise(credited: u64, next: u64, received: &AtomicU64, credit: &EventFd) -> u64 {
    if next < credited + CREDIT_EVERY {
        return credited;
    }
    received.store(next, Ordering::Release);
    let _ = credit.write(1);
    next
}

/// The `len` bytes at `addr` in guest RAM, read where they are (a guest's driver hands the
/// buffer up without copying it either), or None outside guest RAM.
fn in_place(mem: &GuestMemoryMmap, addr: u64, len: usize) -> Option<&[u8]> {
    let slice = mem.get_slice(GuestAddress(addr), len).ok()?;
    let ptr = slice.ptr_guard();
    // SAFETY: get_slice checked that the `len` bytes lie in one mapped region of `mem`,
    // which stays mapped while `mem` is borrowed. The device wrote them and gave the buffer
    // back through the used ring (its index read with Acquire), and does not write it again
    // until the driver makes it available again, after this slice is gone.
    Some(unsafe { std::slice::from_raw_parts(ptr.as_ptr(), len) })
}
