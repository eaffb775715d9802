//! Unit-test helpers: split rings laid out by hand in guest memory (so a test can put
//! anything a hostile guest could there), vrings over them as vhost-user-backend sets them
//! up, error eventfds, and a timeout for calls that must not spin.

use std::fs::File;
use std::io::Read;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::mpsc;
use std::time::Duration;

use vhost_user_backend::VringT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryAtomic, GuestMemoryMmap};

use crate::backend_common::Mem;

/// Bytes of guest memory the helpers map.
pub const MEM_SIZE: usize = 4 << 20;
/// Where data buffers may go (above every ring).
pub const BUFFERS: u64 = 0x10_0000;

/// Guest memory shared by the test and the backend under test.
pub fn memory() -> (GuestMemoryMmap<()>, Mem) {
    let m =
        GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory");
    let atomic = GuestMemoryAtomic::new(m.clone());
    (m, atomic)
}

/// A split ring of `size` (at most 256) entries at `base`: descriptor table at `base`,
/// available ring at `base + 0x1000`, used ring at `base + 0x2000`.
pub struct Ring {
    /// The guest memory the ring lives in.
    pub mem: GuestMemoryMmap<()>,
    /// Descriptor table address.
    pub base: u64,
    /// Queue size.
    pub size: u16,
}

impl Ring {
    /// A ring at `base` (a multiple of 0x4000 below [`BUFFERS`]).
    pub fn new(mem: &GuestMemoryMmap<()>, base: u64, size: u16) -> Self {
        assert!(size <= 256 && base + 0x4000 <= BUFFERS);
        Ring {
            mem: mem.clone(),
            base,
            size,
        }
    }

    /// Available ring address.
    pub fn avail(&self) -> u64 {
        self.base + 0x1000
    }

    /// Used ring address.
    pub fn used(&self) -> u64 {
        self.base + 0x2000
    }

    /// A started, enabled vring over this ring, as the crate's handler sets one up.
    pub fn vring<V: VringT<Mem>>(&self, mem: &Mem, event_idx: bool) -> V {
        let v = V::new(mem.clone(), self.size).expect("vring");
        v.set_queue_size(self.size);
        v.set_queue_info(self.base, self.avail(), self.used())
            .expect("queue addresses");
        v.set_queue_event_idx(event_idx);
        v.set_queue_ready(true);
        v.set_enabled(true);
        v
    }

    /// Writes descriptor `index`.
    pub fn desc(&self, index: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(self.base + 16 * u64::from(index));
        let mut d = [0u8; 16];
        d[0..8].copy_from_slice(&addr.to_le_bytes());
        d[8..12].copy_from_slice(&len.to_le_bytes());
        d[12..14].copy_from_slice(&flags.to_le_bytes());
        d[14..16].copy_from_slice(&next.to_le_bytes());
        self.mem.write_slice(&d, at).expect("descriptor");
    }

    /// The available index.
    pub fn avail_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.avail() + 2))
            .expect("avail idx")
    }

    /// Sets the available index (to anything, as a guest can).
    pub fn set_avail_idx(&self, idx: u16) {
        self.mem
            .write_obj(idx, GuestAddress(self.avail() + 2))
            .expect("avail idx");
    }

    /// Makes `head` available: next available entry, then the index.
    pub fn push(&self, head: u16) {
        let idx = self.avail_idx();
        let slot = self.avail() + 4 + 2 * u64::from(idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(slot))
            .expect("avail entry");
        self.set_avail_idx(idx.wrapping_add(1));
    }

    /// The used index.
    pub fn used_idx(&self) -> u16 {
        self.mem
            .read_obj(GuestAddress(self.used() + 2))
            .expect("used idx")
    }

    /// Used element `i`: (head, length).
    pub fn used_elem(&self, i: u16) -> (u32, u32) {
        let at = self.used() + 4 + 8 * u64::from(i % self.size);
        let id = self.mem.read_obj(GuestAddress(at)).expect("used id");
        let len = self.mem.read_obj(GuestAddress(at + 4)).expect("used len");
        (id, len)
    }
}

/// An eventfd as SET_VRING_ERR hands it to the backend, and the frontend's end of it.
pub fn err_eventfd() -> (File, File) {
    // SAFETY: eventfd takes no pointers; the result is checked.
    let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nothing else.
    let ours = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
    let theirs = ours.try_clone().expect("dup eventfd");
    (theirs, ours)
}

/// The eventfd's counter, reset to 0 by the read; `None` when it is 0.
pub fn eventfd_count(f: &File) -> Option<u64> {
    let mut b = [0u8; 8];
    let mut r = f;
    match r.read(&mut b) {
        Ok(8) => Some(u64::from_ne_bytes(b)),
        Ok(n) => panic!("short eventfd read of {n} bytes"),
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => None,
        Err(e) => panic!("eventfd read: {e}"),
    }
}

/// Runs `f` on a thread and returns its result, failing the test when it takes more than
/// 5 s (a worker that spins never returns).
pub fn within<T: Send + 'static>(what: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(5))
        .unwrap_or_else(|_| panic!("{what} did not return within 5 s"))
}
