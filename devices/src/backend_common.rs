//! What both vhost-user backends share: the guest memory the frontend mapped, the
//! negotiated EVENT_IDX flag, the config space, the per-queue busy flags that make
//! GET_VRING_BASE wait for in-flight work, and the workers' exit events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Duration;

use std::ops::Deref;

use log::error;
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vhost_user_backend::{VringRwLock, VringT};
use virtio_queue::{DescriptorChain, QueueT};
use vm_memory::GuestMemory;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::block::config_slice;

/// Guest memory as vhost-user-backend hands it over.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The vhost-user protocol features both backends implement.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// Pops the next available chain of `vring`, or `None` when there is none or the frontend
/// has stopped the ring (GET_VRING_BASE during an upgrade resets the queue). The check and
/// the pop hold one vring lock, so a ring stopped meanwhile is not read (virtio-queue would
/// log an error for each such pop).
pub fn pop_chain<M>(vring: &VringRwLock<Mem>, mem: M) -> Option<DescriptorChain<M>>
where
    M: Clone + Deref,
    M::Target: GuestMemory,
{
    let mut state = vring.get_mut();
    let queue = state.get_queue_mut();
    if !queue.ready() {
        return None;
    }
    queue.pop_descriptor_chain(mem)
}

/// An exit event per worker thread, so the daemon can join every worker on disconnect
/// (without one the library waits for the workers forever and the process never exits).
pub fn worker_exit_event() -> Option<(EventConsumer, EventNotifier)> {
    match new_event_consumer_and_notifier(EventFlag::NONBLOCK | EventFlag::CLOEXEC) {
        Ok(pair) => Some(pair),
        Err(e) => {
            error!("cannot create a worker exit event: {e}");
            None
        }
    }
}

/// Backend state common to skiff-blk and skiff-net.
pub struct BackendCommon {
    mem: Mutex<Mem>,
    event_idx: AtomicBool,
    config: Vec<u8>,
    busy: Vec<AtomicBool>,
}

/// Marks a queue busy while it lives (see [`BackendCommon::busy`]).
pub struct Busy<'a>(Option<&'a AtomicBool>);

impl Drop for Busy<'_> {
    fn drop(&mut self) {
        if let Some(flag) = self.0 {
            flag.store(false, Ordering::SeqCst);
        }
    }
}

impl BackendCommon {
    /// State for `queues` queues serving `config` over `mem`.
    pub fn new(mem: Mem, config: Vec<u8>, queues: usize) -> Self {
        BackendCommon {
            mem: Mutex::new(mem),
            event_idx: AtomicBool::new(false),
            config,
            busy: (0..queues).map(|_| AtomicBool::new(false)).collect(),
        }
    }

    /// The current guest memory.
    pub fn memory(&self) -> Mem {
        self.mem.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Replaces the guest memory (SET_MEM_TABLE).
    pub fn set_memory(&self, mem: Mem) {
        *self.mem.lock().unwrap_or_else(|p| p.into_inner()) = mem;
    }

    /// Whether the driver negotiated VIRTIO_RING_F_EVENT_IDX.
    pub fn event_idx(&self) -> bool {
        self.event_idx.load(Ordering::Acquire)
    }

    /// Records the EVENT_IDX negotiation.
    pub fn set_event_idx(&self, enabled: bool) {
        self.event_idx.store(enabled, Ordering::Release);
    }

    /// `size` bytes of config space from `offset` (GET_CONFIG).
    pub fn config(&self, offset: u32, size: u32) -> Vec<u8> {
        config_slice(&self.config, offset, size)
    }

    /// Marks queue `queue` busy until the guard drops. A worker takes it *before* popping
    /// from the queue ([`pop_chain`] checks that the ring still runs under the vring lock),
    /// so a GET_VRING_BASE that marked the ring stopped and then sees the flag clear knows
    /// that no request of the queue is being processed, nor will be.
    ///
    /// A flag per queue, not a lock per worker: a worker busy with one queue (a guest
    /// kicking tx without pause) would otherwise hold off the stop of its other queue for as
    /// long as it kept re-taking the lock, which made net upgrades take tens of ms.
    pub fn busy(&self, queue: usize) -> Busy<'_> {
        let flag = self.busy.get(queue);
        if let Some(f) = flag {
            f.store(true, Ordering::SeqCst);
        }
        Busy(flag)
    }

    /// Waits until queue `queue` is not being processed (GET_VRING_BASE, after the ring was
    /// marked stopped). Requests take microseconds, or as long as one disk I/O.
    pub fn wait_idle(&self, queue: usize) {
        let Some(flag) = self.busy.get(queue) else {
            return;
        };
        let mut spins = 0u32;
        while flag.load(Ordering::SeqCst) {
            spins += 1;
            if spins < 100 {
                std::hint::spin_loop();
            } else if spins < 200 {
                std::thread::yield_now();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}
