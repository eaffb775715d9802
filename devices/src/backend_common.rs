//! What both vhost-user backends share: the guest memory the frontend mapped, the
//! negotiated EVENT_IDX flag, the config space, the per-worker busy locks that make
//! GET_VRING_BASE wait for in-flight work, and the workers' exit events.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, MutexGuard};

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
    busy: Vec<Mutex<()>>,
}

impl BackendCommon {
    /// State for `workers` worker threads serving `config` over `mem`.
    pub fn new(mem: Mem, config: Vec<u8>, workers: usize) -> Self {
        BackendCommon {
            mem: Mutex::new(mem),
            event_idx: AtomicBool::new(false),
            config,
            busy: (0..workers).map(|_| Mutex::new(())).collect(),
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

    /// Held by worker `worker` while it processes its queues.
    pub fn busy(&self, worker: usize) -> Option<MutexGuard<'_, ()>> {
        self.busy
            .get(worker)
            .map(|m| m.lock().unwrap_or_else(|p| p.into_inner()))
    }

    /// Waits until worker `worker` has finished what it is processing (GET_VRING_BASE).
    pub fn wait_idle(&self, worker: usize) {
        drop(self.busy(worker));
    }
}
