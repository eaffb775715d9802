//! The guest's part: a synthetic virtio-blk driver that keeps requests in flight on every
//! request queue of a device, checks every completion, and times each request. It is the
//! only side of the benchmark that is not the code under test: it plays the guest, the same
//! for every backend.
//!
//! Verification, so that a fast wrong answer cannot win: every 4 KiB block of the image
//! holds `(block, generation)` repeated; the driver knows each block's generation (0 after
//! the fill, a write's sequence number after it completes). A read's data must match it
//! block by block; a write carries a new generation, and no two requests in flight touch the
//! same block. After a workload the caller reads the image back and checks every block.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use crate::split_ring::{wait_call, Ring, F_NEXT, F_WRITE};

/// Bytes of a block, the unit of verification.
pub const BLOCK: u64 = 4096;
/// Guest RAM of the benchmark's VM: rings from 1 MiB, buffers from 8 MiB.
pub const RAM: u64 = 64 << 20;
/// Requests in flight per queue, at most.
pub const MAX_QD: u16 = 64;
/// Request queues, at most.
pub const MAX_QUEUES: usize = 4;
/// Largest request.
pub const MAX_BS: u64 = 128 << 10;
const BUFFERS: u64 = 8 << 20;
// Three descriptors per request in flight.
const _: () = assert!(3 * MAX_QD <= crate::split_ring::QSIZE);
/// One slot: the header and status in the first 4 KiB page, the data after it.
const SLOT: u64 = BLOCK + MAX_BS;
const T_IN: u32 = 0;
const T_OUT: u32 = 1;

/// What the driver does.
#[derive(Clone, Copy, Debug)]
pub struct Pattern {
    /// Writes (else reads).
    pub write: bool,
    /// Random offsets (else sequential, each queue through its own part of the image).
    pub random: bool,
    /// Bytes per request (a multiple of [`BLOCK`], at most [`MAX_BS`]).
    pub bs: u64,
    /// Requests in flight per queue.
    pub qd: u16,
}

/// What one run measured.
#[derive(Default)]
pub struct Outcome {
    /// Requests completed in the measured window.
    pub requests: u64,
    /// Their bytes.
    pub bytes: u64,
    /// The window's length.
    pub secs: f64,
    /// Each request's latency in the window, submission to completion seen.
    pub latencies: Vec<Duration>,
    /// Requests with a status other than OK, or completions of heads not in flight.
    pub errors: u64,
    /// Blocks a read returned with content other than what the image holds.
    pub bad_reads: u64,
    /// Completions found in a used ring without an interrupt within 20 ms (a guest would
    /// have waited for them forever).
    pub unsignalled: u64,
    /// `sample()` when the measured window began and when it ended (the backend's CPU time).
    pub sampled: (u64, u64),
}

/// The device as the driver sees it: its rings, their kick eventfds, its interrupt.
pub struct Device<'a> {
    /// Guest memory shared with the backend.
    pub mem: &'a GuestMemoryMmap,
    /// The request queues' rings, by queue index.
    pub rings: Vec<Ring>,
    /// Each queue's kick eventfd (KVM's ioeventfd in skiff).
    pub kicks: Vec<EventFd>,
    /// The device's interrupt (KVM's irqfd in skiff), shared by its queues.
    pub call: &'a EventFd,
}

/// Where the driver is on each queue's rings: the next available and used positions. They
/// run on across workloads, as a guest driver's do (a backend refuses a ring whose
/// available index jumps).
#[derive(Clone, Default)]
pub struct Positions {
    avail: Vec<u16>,
    used: Vec<u16>,
}

impl Positions {
    /// Fresh rings.
    pub fn new(queues: usize) -> Self {
        Positions {
            avail: vec![0; queues],
            used: vec![0; queues],
        }
    }
}

/// Guest address of queue `q`'s slot `s`.
fn slot_addr(q: usize, s: u16) -> u64 {
    BUFFERS + (q as u64 * u64::from(MAX_QD) + u64::from(s)) * SLOT
}

/// Ring `q`'s place: the request queues' rings.
pub fn ring(q: usize) -> Ring {
    Ring::at(q as u64)
}

/// xorshift64*: the offsets' random numbers (no need for a crate).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

/// Block `block`'s content at generation `generation`, into `out` (4 KiB).
pub fn fill_block(out: &mut [u8], block: u64, generation: u64) {
    for c in out.chunks_exact_mut(16) {
        c[..8].copy_from_slice(&block.to_le_bytes());
        c[8..].copy_from_slice(&generation.to_le_bytes());
    }
}

/// Whether `data` (4 KiB) is block `block` at generation `generation`.
pub fn block_is(data: &[u8], block: u64, generation: u64) -> bool {
    let want = [block.to_le_bytes(), generation.to_le_bytes()].concat();
    data.chunks_exact(16).all(|c| c == want.as_slice())
}

/// A request in flight.
#[derive(Clone, Copy)]
struct Inflight {
    first: u64,
    seq: u64,
    at: Instant,
}

/// What the image holds: each block's generation, and the last write's number.
pub struct Contents {
    /// Every block's generation (0 after the fill).
    pub generations: Vec<u64>,
    /// The last write's sequence number (generations are unique across runs).
    pub seq: u64,
}

/// Where each queue's next request goes.
struct Offsets {
    rng: Rng,
    blocks: u64,
    per_req: u64,
    /// Sequential cursors, one per queue, each in its own part of the image.
    cursor: Vec<u64>,
}

impl Offsets {
    fn next(&mut self, p: &Pattern, q: usize, queues: usize, busy: &HashSet<u64>) -> u64 {
        let units = (self.blocks / self.per_req).max(1);
        if p.random {
            // Writes never overlap a write in flight (reads never race writes: a run is one
            // or the other).
            loop {
                let first = (self.rng.next() % units) * self.per_req;
                if !p.write || !busy.contains(&first) {
                    return first;
                }
            }
        }
        let part = (units / queues as u64).max(1);
        let unit = (q as u64 * part + self.cursor[q] % part) % units;
        self.cursor[q] += 1;
        unit * self.per_req
    }
}

/// Runs `p` on every queue of `dev` for `warmup` then `secs` (measured), then drains.
/// Completed writes update `contents`. `sample` is read as the measured window begins and
/// ends.
pub fn run(
    dev: &Device<'_>,
    p: &Pattern,
    (warmup, secs): (Duration, Duration),
    contents: &mut Contents,
    pos: &mut Positions,
    sample: &dyn Fn() -> u64,
) -> Outcome {
    let Contents { generations, seq } = contents;
    let mem = dev.mem;
    let queues = dev.rings.len();
    let per_req = p.bs / BLOCK;
    let mut offsets = Offsets {
        rng: Rng(0x9e37_79b9_7f4a_7c15 ^ *seq),
        blocks: generations.len() as u64,
        per_req,
        cursor: vec![0; queues],
    };
    let mut out = Outcome::default();
    let Positions { avail, used } = pos;
    let mut free: Vec<Vec<u16>> = (0..queues).map(|_| (0..p.qd).rev().collect()).collect();
    let mut inflight: Vec<Vec<Option<Inflight>>> = vec![vec![None; usize::from(MAX_QD)]; queues];
    let mut busy: HashSet<u64> = HashSet::new();
    let mut in_flight = 0usize;
    let mut data = vec![0u8; p.bs as usize];
    let start = Instant::now();
    let window = start + warmup;
    let end = window + secs;
    let mut measuring = false;
    loop {
        let now = Instant::now();
        let stopping = now >= end;
        if !measuring && now >= window {
            measuring = true;
            out.sampled.0 = sample();
        }
        if stopping && out.sampled.1 == 0 {
            out.sampled.1 = sample().max(1);
        }
        if stopping && in_flight == 0 {
            break;
        }
        for q in 0..queues {
            let ring = dev.rings[q];
            let mut posted = false;
            while let Some(s) = if stopping { None } else { free[q].pop() } {
                let first = offsets.next(p, q, queues, &busy);
                let base = slot_addr(q, s);
                let mut hdr = [0u8; 16];
                let t = if p.write { T_OUT } else { T_IN };
                hdr[0..4].copy_from_slice(&t.to_le_bytes());
                hdr[8..16].copy_from_slice(&(first * (BLOCK / 512)).to_le_bytes());
                let _ = mem.write_slice(&hdr, GuestAddress(base));
                let _ = mem.write_obj(0xffu8, GuestAddress(base + 16));
                let mut this = 0;
                if p.write {
                    *seq += 1;
                    this = *seq;
                    for (i, b) in data.chunks_exact_mut(BLOCK as usize).enumerate() {
                        fill_block(b, first + i as u64, this);
                    }
                    let _ = mem.write_slice(&data, GuestAddress(base + BLOCK));
                    busy.insert(first);
                }
                let head = s * 3;
                let data_flags = if p.write { F_NEXT } else { F_NEXT | F_WRITE };
                ring.set_desc(mem, head, base, 16, F_NEXT, head + 1);
                ring.set_desc(
                    mem,
                    head + 1,
                    base + BLOCK,
                    p.bs as u32,
                    data_flags,
                    head + 2,
                );
                ring.set_desc(mem, head + 2, base + 16, 1, F_WRITE, 0);
                inflight[q][usize::from(s)] = Some(Inflight {
                    first,
                    seq: this,
                    at: Instant::now(),
                });
                ring.make_available(mem, avail[q], head);
                avail[q] = avail[q].wrapping_add(1);
                in_flight += 1;
                posted = true;
            }
            if posted {
                let _ = dev.kicks[q].write(1);
            }
        }
        let signalled = wait_call(dev.call, 20);
        let mut any = false;
        for q in 0..queues {
            let ring = dev.rings[q];
            let now_used = ring.used_idx(mem);
            while used[q] != now_used {
                any = true;
                let head = ring.used_head(mem, used[q]);
                used[q] = used[q].wrapping_add(1);
                let s = head / 3;
                let Some(r) = head
                    .is_multiple_of(3)
                    .then(|| inflight[q].get_mut(usize::from(s)).and_then(Option::take))
                    .flatten()
                else {
                    out.errors += 1;
                    continue;
                };
                in_flight -= 1;
                free[q].push(s);
                let done = Instant::now();
                let base = slot_addr(q, s);
                let status: u8 = mem.read_obj(GuestAddress(base + 16)).unwrap_or(0xff);
                if status != 0 {
                    out.errors += 1;
                } else if p.write {
                    for b in 0..per_req {
                        generations[(r.first + b) as usize] = r.seq;
                    }
                } else if mem
                    .read_slice(&mut data, GuestAddress(base + BLOCK))
                    .is_ok()
                {
                    for (i, b) in data.chunks_exact(BLOCK as usize).enumerate() {
                        let block = r.first + i as u64;
                        if !block_is(b, block, generations[block as usize]) {
                            out.bad_reads += 1;
                        }
                    }
                } else {
                    out.errors += 1;
                }
                busy.remove(&r.first);
                if measuring && r.at >= window && done <= end {
                    out.requests += 1;
                    out.bytes += p.bs;
                    out.latencies.push(done - r.at);
                }
            }
        }
        if any && !signalled {
            out.unsignalled += 1;
        }
        if !any && in_flight > 0 {
            // Nothing yet: kick again in case a kick was missed.
            for k in &dev.kicks {
                let _ = k.write(1);
            }
        }
    }
    out.secs = secs.as_secs_f64();
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_name_themselves_and_their_generation() {
        let mut b = vec![0u8; BLOCK as usize];
        fill_block(&mut b, 7, 3);
        assert!(block_is(&b, 7, 3));
        assert!(
            !block_is(&b, 7, 4),
            "an older write must not pass for a newer one"
        );
        assert!(!block_is(&b, 8, 3), "another block's data must not pass");
        b[4095] ^= 1;
        assert!(!block_is(&b, 7, 3), "one flipped byte must show");
    }

    #[test]
    fn sequential_queues_keep_to_their_parts_and_random_writes_never_overlap() {
        let seq = Pattern {
            write: true,
            random: false,
            bs: 128 << 10,
            qd: 8,
        };
        let mut o = Offsets {
            rng: Rng(1),
            blocks: 1024,
            per_req: 32,
            cursor: vec![0; 4],
        };
        let busy = HashSet::new();
        // 32 units of 32 blocks, 8 per queue.
        let q1: Vec<u64> = (0..9).map(|_| o.next(&seq, 1, 4, &busy)).collect();
        assert_eq!(q1[0], 8 * 32);
        assert_eq!(q1[7], 15 * 32);
        assert_eq!(q1[8], 8 * 32, "queue 1 wraps within its part");
        let rand = Pattern {
            random: true,
            ..seq
        };
        let busy: HashSet<u64> = (0..31).map(|u| u * 32).collect();
        for _ in 0..20 {
            assert_eq!(o.next(&rand, 0, 4, &busy), 31 * 32);
        }
    }

    #[test]
    fn slots_fit_in_guest_ram() {
        let last = slot_addr(MAX_QUEUES - 1, MAX_QD - 1) + SLOT;
        assert!(last <= RAM);
        assert!(Ring::at(MAX_QUEUES as u64).queue_config(256).desc <= BUFFERS);
    }
}
