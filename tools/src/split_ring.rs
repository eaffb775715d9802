//! The synthetic guest driver's side of a split virtqueue (virtio 1.x, 2.7): the
//! descriptor table, available and used rings in guest memory, as a guest driver writes and
//! reads them. Shared by the benchmarks that play the guest on the rings (included with
//! `#[path]`); the device side they drive is skiff's shipped code or a peer's backend.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm::devices::virtio::QueueConfig;
use vmm_sys_util::eventfd::EventFd;

/// Ring size the driver chooses.
pub const QSIZE: u16 = 256;
/// Descriptor flag: the chain goes on at `next`.
#[allow(dead_code)] // netbench's frames fit one descriptor
pub const F_NEXT: u16 = 1;
/// Descriptor flag: the device writes this buffer.
pub const F_WRITE: u16 = 2;
const MIB: u64 = 1 << 20;

/// A split ring's guest-physical addresses.
#[derive(Clone, Copy)]
pub struct Ring {
    desc: u64,
    avail: u64,
    used: u64,
}

impl Ring {
    /// Ring `n`'s place in guest memory (64 KiB each from 1 MiB; at most 112 rings below
    /// the 8 MiB where the benchmarks' buffers start).
    pub const fn at(n: u64) -> Ring {
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

    /// Writes descriptor `i`.
    pub fn set_desc(
        &self,
        mem: &GuestMemoryMmap,
        i: u16,
        addr: u64,
        len: u32,
        flags: u16,
        next: u16,
    ) {
        let at = GuestAddress(self.desc + 16 * u64::from(i));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        let _ = mem.write_slice(&d, at);
    }

    /// Puts `head` at available position `pos` and publishes `pos + 1`.
    pub fn make_available(&self, mem: &GuestMemoryMmap, pos: u16, head: u16) {
        let slot = GuestAddress(self.avail + 4 + 2 * u64::from(pos % QSIZE));
        let _ = mem.write_obj(head, slot);
        let _ = mem.store(
            pos.wrapping_add(1),
            GuestAddress(self.avail + 2),
            Ordering::Release,
        );
    }

    /// The used ring's index as the device last published it.
    pub fn used_idx(&self, mem: &GuestMemoryMmap) -> u16 {
        mem.load(GuestAddress(self.used + 2), Ordering::Acquire)
            .unwrap_or(0)
    }

    /// The length the device wrote into the chain at used position `pos`.
    #[allow(dead_code)] // netbench's
    pub fn used_len(&self, mem: &GuestMemoryMmap, pos: u16) -> u32 {
        let at = GuestAddress(self.used + 8 + 8 * u64::from(pos % QSIZE));
        mem.read_obj::<u32>(at).unwrap_or(0)
    }

    /// Whether the device asks to be kicked (VRING_USED_F_NO_NOTIFY clear), read after a
    /// full barrier that orders it after the driver's last available index, as Linux's
    /// driver does before it kicks.
    #[allow(dead_code)] // netbench's
    pub fn wants_kick(&self, mem: &GuestMemoryMmap) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let flags: u16 = mem
            .load(GuestAddress(self.used), Ordering::Relaxed)
            .unwrap_or(0);
        flags & 1 == 0
    }

    /// The head of the chain at used position `pos`.
    pub fn used_head(&self, mem: &GuestMemoryMmap, pos: u16) -> u16 {
        let at = GuestAddress(self.used + 4 + 8 * u64::from(pos % QSIZE));
        mem.read_obj::<u32>(at).unwrap_or(u32::MAX) as u16
    }
}

impl Ring {
    /// VIRTIO_RING_F_EVENT_IDX: asks for an interrupt once the device has used the entry at
    /// used index `idx` (the avail ring's `used_event`).
    #[allow(dead_code)] // netbench's
    pub fn set_used_event(&self, mem: &GuestMemoryMmap, idx: u16) {
        let at = GuestAddress(self.avail + 4 + 2 * u64::from(QSIZE));
        let _ = mem.store(idx, at, Ordering::Release);
    }

    /// VIRTIO_RING_F_EVENT_IDX: whether the device wants a kick now that the driver has
    /// moved its available index from `old` to `new` (the used ring's `avail_event`, read
    /// after a full barrier; `vring_need_event` of the specification, 2.7.10).
    #[allow(dead_code)] // netbench's
    pub fn needs_kick(&self, mem: &GuestMemoryMmap, old: u16, new: u16) -> bool {
        std::sync::atomic::fence(Ordering::SeqCst);
        let at = GuestAddress(self.used + 4 + 8 * u64::from(QSIZE));
        let event: u16 = mem
            .load(at, Ordering::Relaxed)
            .unwrap_or(new.wrapping_sub(1));
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }
}

/// Waits up to `ms` for the device's interrupt (its call eventfd, KVM's irqfd in skiff) and
/// clears it; returns whether it came.
pub fn wait_call(call: &EventFd, ms: i32) -> bool {
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
