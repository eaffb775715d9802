//! The guest's part: a synthetic virtio driver that keeps requests in flight on a split ring
//! in guest memory and records when their completions arrive. This is the only side of the
//! benchmark that is not skiff's code: it plays the guest.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

pub use crate::split_ring::Ring;
use crate::split_ring::{wait_call, F_NEXT, F_WRITE};

/// Guest RAM of the benchmark's VM (below the 32-bit MMIO hole: one region).
pub const RAM: u64 = 64 << 20;
/// Bytes of one block write.
pub const BLOCK: usize = 4096;
const MIB: u64 = 1 << 20;

/// Phases the driver threads attribute completion gaps to.
pub const WARMUP: u8 = 0;
/// Load without upgrades.
pub const BASELINE: u8 = 1;
/// Load while upgrading.
pub const UPGRADES: u8 = 2;
/// Draining at the end.
pub const DONE: u8 = 3;

/// skiff-blk's request ring.
pub const BLK_RING: Ring = Ring::at(0);
/// skiff-net's RX ring (it gets no buffers: nothing is sent to the TAP's far side).
pub const NET_RX: Ring = Ring::at(1);
/// skiff-net's TX ring.
pub const NET_TX: Ring = Ring::at(2);

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
