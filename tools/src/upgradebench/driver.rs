//! The guest's part: a synthetic virtio driver that keeps requests in flight on a split ring
//! in guest memory and records when their completions arrive. This is the only side of the
//! benchmark that is not skiff's code: it plays the guest.

use std::collections::HashMap;
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::QueueConfig;
use vmm_sys_util::eventfd::EventFd;

/// Guest RAM of the benchmark's VM (below the 32-bit MMIO hole: one region).
pub const RAM: u64 = 64 << 20;
/// Ring size the driver chooses.
pub const QSIZE: u16 = 256;
/// Bytes of one block write.
pub const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;
const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;

/// Phases the driver threads attribute completion gaps to.
pub const WARMUP: u8 = 0;
/// Load without upgrades.
pub const BASELINE: u8 = 1;
/// Load while upgrading.
pub const UPGRADES: u8 = 2;
/// Draining at the end.
pub const DONE: u8 = 3;

/// A split ring's guest-physical addresses.
#[derive(Clone, Copy)]
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

/// skiff-blk's request ring.
pub const BLK_RING: Ring = Ring::at(0);
/// skiff-net's RX ring (it gets no buffers: nothing is sent to the TAP's far side).
pub const NET_RX: Ring = Ring::at(1);
/// skiff-net's TX ring.
pub const NET_TX: Ring = Ring::at(2);

impl Ring {
    /// Ring `n`'s place in guest memory (64 KiB each from 1 MiB).
    const fn at(n: u64) -> Ring {
        let base = MIB + n * 0x10000;
        Ring {
            desc: base,
            avail: base + 0x1000,
            used: base + 0x2000,
        }
    }

    /// What the driver writes to the transport for this ring (queue size `QSIZE`, ready).
    pub fn queue_config(&self, max_size: u16) -> QueueConfig {
        QueueConfig {
            max_size,
            size: QSIZE,
            ready: true,
            desc: self.desc,
            avail: self.avail,
            used: self.used,
        }
    }

    fn set_desc(&self, mem: &GuestMemoryMmap, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&d, at);
    }

    /// Puts `head` at available position `pos` and publishes `pos + 1`.
    fn make_available(&self, mem: &GuestMemoryMmap, pos: u16, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(pos % QSIZE));
        let _ = mem.write_obj(head, slot);
        let _ = mem.store(
            pos.wrapping_add(1),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        );
    }

    fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap_or(0)
    }

    fn used_head(&self, mem: &GuestMemoryMmap, pos: u16) -> u16 {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(pos % QSIZE));
        mem.read_obj::<u32>(at).unwrap_or(u32::MAX) as u16
    }
}

/// What a driver thread saw.
#[derive(Default)]
pub struct LoadResult {
    /// Requests completed.
    pub completions: u64,
    /// Requests that failed, or completions of heads not in flight.
    pub errors: u64,
    /// Times completions were in the used ring 20 ms without an interrupt.
    pub unsignalled: u64,
    /// Gaps between completion batches, per phase.
    pub gaps: [Vec<Duration>; 4],
    /// blk: block -> generation of the last completed write.
    pub written: HashMap<u64, u64>,
}

/// One device's driver: its ring's kick eventfd (KVM's ioeventfd in skiff) and the device's
/// call eventfd (KVM's irqfd), both the VMM's device's own (duplicated).
pub struct Driver {
    /// Guest memory, shared with the VMM's device and the device process.
    pub mem: GuestMemoryMmap,
    /// The kick eventfd of the ring the driver uses.
    pub kick: EventFd,
    /// The device's interrupt.
    pub call: EventFd,
    /// The phase the main thread is in.
    pub phase: Arc<AtomicU8>,
    /// Set to drain and stop.
    pub stop: Arc<AtomicBool>,
    /// Requests kept in flight.
    pub depth: u16,
}

/// Waits up to `ms` for the device's interrupt; returns whether it came.
fn wait_call(call: &EventFd, ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd: call.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: poll on one valid pollfd that lives across the call.
    let ready = unsafe { libc::poll(&mut pfd, 1, ms) } > 0;
    let _ = call.read();
    ready
}

impl Driver {
    /// Keeps `depth` requests in flight on `ring` until stopped and drained. `fill(slot,
    /// seq)` writes request `seq` into slot `slot` and returns its head; `done(slot, seq)`
    /// checks a completed one.
    fn run(
        &self,
        ring: Ring,
        mut fill: impl FnMut(&GuestMemoryMmap, u16, u64) -> u16,
        mut done: impl FnMut(&GuestMemoryMmap, u16, u64, &mut LoadResult),
        heads_per_slot: u16,
    ) -> LoadResult {
        let mem = &self.mem;
        let mut r = LoadResult::default();
        let mut avail: u16 = 0;
        let mut used: u16 = 0;
        let mut seq: u64 = 0;
        let mut free: Vec<u16> = (0..self.depth).rev().collect();
        let mut inflight: HashMap<u16, u64> = HashMap::new();
        let mut last = Instant::now();
        let mut last_phase = self.phase.load(Ordering::Acquire);
        loop {
            let stopping = self.stop.load(Ordering::Acquire);
            if stopping && inflight.is_empty() {
                break;
            }
            let mut posted = false;
            while let Some(slot) = if stopping { None } else { free.pop() } {
                seq += 1;
                let head = fill(mem, slot, seq);
                inflight.insert(slot, seq);
                ring.make_available(mem, avail, head);
                avail = avail.wrapping_add(1);
                posted = true;
            }
            if posted {
                let _ = self.kick.write(1);
            }
            let signalled = wait_call(&self.call, 20);
            let now_used = ring.used_idx(mem);
            if !signalled && now_used != used {
                // A guest would have waited for these forever.
                r.unsignalled += 1;
            }
            if now_used == used {
                // Nothing: kick again in case a kick fell between two backends.
                let _ = self.kick.write(1);
                continue;
            }
            let phase = self.phase.load(Ordering::Acquire);
            let now = Instant::now();
            if phase == last_phase {
                r.gaps[usize::from(phase.min(DONE))].push(now - last);
            }
            last = now;
            last_phase = phase;
            while used != now_used {
                let head = ring.used_head(mem, used);
                let slot = head / heads_per_slot;
                match inflight.remove(&slot) {
                    Some(s) => {
                        done(mem, slot, s, &mut r);
                        r.completions += 1;
                        free.push(slot);
                    }
                    None => r.errors += 1,
                }
                used = used.wrapping_add(1);
            }
        }
        r
    }
}

/// Guest address of slot `slot`'s buffers for ring `n`.
fn buffers(n: u64, slot: u16) -> u64 {
    8 * MIB + n * 4 * MIB + u64::from(slot) * 0x2000
}

/// 4 KiB writes over the first `blocks` blocks of the image, on [`BLK_RING`].
pub fn blk_load(d: &Driver, blocks: u64) -> LoadResult {
    let ring = BLK_RING;
    d.run(
        ring,
        |mem, slot, seq| {
            let base = buffers(0, slot);
            let block = seq % blocks;
            let mut hdr = [0u8; 16];
            hdr[0..4].copy_from_slice(&1u32.to_le_bytes()); // VIRTIO_BLK_T_OUT
            hdr[8..16].copy_from_slice(&(block * (BLOCK as u64 / 512)).to_le_bytes());
            let _ = mem.write_slice(&hdr, GuestAddress(base));
            let _ = mem.write_slice(&pattern(block, seq), GuestAddress(base + 0x1000));
            let _ = mem.write_obj(0xffu8, GuestAddress(base + 0x10));
            let head = slot * 3;
            ring.set_desc(mem, head, base, 16, F_NEXT, head + 1);
            ring.set_desc(mem, head + 1, base + 0x1000, BLOCK as u32, F_NEXT, head + 2);
            ring.set_desc(mem, head + 2, base + 0x10, 1, F_WRITE, 0);
            head
        },
        |mem, slot, seq, r| {
            let status: u8 = mem
                .read_obj(GuestAddress(buffers(0, slot) + 0x10))
                .unwrap_or(0xff);
            if status == 0 {
                r.written.insert(seq % blocks, seq);
            } else {
                r.errors += 1;
            }
        },
        3,
    )
}

/// A block's content for write `seq`: (block, seq) repeated.
pub fn pattern(block: u64, seq: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(BLOCK);
    while b.len() < BLOCK {
        b.extend_from_slice(&block.to_le_bytes());
        b.extend_from_slice(&seq.to_le_bytes());
    }
    b
}

/// 1514-byte frames on [`NET_TX`]; [`NET_RX`] gets no buffers.
pub fn net_load(d: &Driver) -> LoadResult {
    let ring = NET_TX;
    d.run(
        ring,
        |mem, slot, seq| {
            let base = buffers(2, slot);
            let mut frame = vec![0u8; 12 + 1514];
            // virtio_net_hdr_v1 is 12 zero bytes; then Ethernet: a locally administered
            // destination nobody has, our source, the local experimental ethertype.
            frame[12..18].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x01]);
            frame[18..24].copy_from_slice(&[0x06, 0, 0, 0, 0, 0x02]);
            frame[24..26].copy_from_slice(&0x88b5u16.to_be_bytes());
            frame[26..34].copy_from_slice(&seq.to_le_bytes());
            let _ = mem.write_slice(&frame, GuestAddress(base));
            ring.set_desc(mem, slot, base, frame.len() as u32, 0, 0);
            slot
        },
        |_, _, _, _| {},
        1,
    )
}
