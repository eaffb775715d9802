//! What both vhost-user backends share: the guest memory the frontend mapped, the
//! negotiated EVENT_IDX flag, the config space, the per-queue busy flags that make
//! GET_VRING_BASE wait for in-flight work, the workers' exit events, and what a worker does
//! when a ring or the host fails.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use log::{error, warn};
use vhost::vhost_user::message::VhostUserProtocolFeatures;
use vm_memory::{GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::event::{
    new_event_consumer_and_notifier, EventConsumer, EventFlag, EventNotifier,
};

use crate::block::config_slice;
use crate::metrics::Counter;
use crate::vring::{Breaking, Vring};

/// Guest memory as vhost-user-backend hands it over.
pub type Mem = GuestMemoryAtomic<GuestMemoryMmap<()>>;

/// The vhost-user protocol features both backends implement.
pub fn protocol_features() -> VhostUserProtocolFeatures {
    VhostUserProtocolFeatures::CONFIG
        | VhostUserProtocolFeatures::MQ
        | VhostUserProtocolFeatures::REPLY_ACK
}

/// Marks queue `queue`'s ring broken after the guest fault `why` (see [`crate::vring`]):
/// it is not touched again and its error eventfd is written, once, until the frontend
/// resets it. Counts the break in `broken_rings`, which also throttles the log line.
pub fn break_ring(vring: &Vring, queue: usize, why: &dyn std::error::Error, broken_rings: Counter) {
    let outcome = vring.mark_broken();
    if matches!(outcome, Breaking::Already) || !broken_rings.inc_logged() {
        return;
    }
    let why = crate::error_chain(why);
    let n = broken_rings.get();
    match outcome {
        Breaking::Signalled => warn!(
            "queue {queue}: ring broken ({why}); stopped until the frontend resets it, error eventfd signalled ({n} broken so far)"
        ),
        Breaking::NoErrorFd => warn!(
            "queue {queue}: ring broken ({why}); stopped until the frontend resets it, no error eventfd to signal yet ({n} broken so far)"
        ),
        Breaking::SignalFailed(e) => error!(
            "queue {queue}: ring broken ({why}); stopped until the frontend resets it, but its error eventfd cannot be signalled: {e}"
        ),
        Breaking::Already => {}
    }
}

/// Ends the process after a host-side failure the worker cannot go on from (signalling the
/// guest failed, an event the worker never registered). A worker returning an error from
/// `handle_event` would end its thread only, leaving the device silently dead; exiting
/// lets the VMM see the device process die and restart it.
pub fn host_fatal(what: &dyn std::error::Error) -> ! {
    error!(
        "{}; the device process cannot go on and exits",
        crate::error_chain(what)
    );
    std::process::exit(1)
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

thread_local! {
    /// Whether this worker thread has installed its seccomp filter.
    static WORKER_FILTERED: Cell<bool> = const { Cell::new(false) };
}

/// Backend state common to skiff-blk and skiff-net.
pub struct BackendCommon {
    mem: Mutex<Mem>,
    event_idx: AtomicBool,
    config: Vec<u8>,
    busy: Vec<AtomicBool>,
    /// The workers' seccomp filter and its kind, set once before the daemon starts them.
    worker_filter: OnceLock<(sandbox::ThreadFilters, &'static str)>,
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
            worker_filter: OnceLock::new(),
        }
    }

    /// The seccomp filter each worker thread installs on its first event (kind `kind`).
    pub fn set_worker_filter(&self, filters: sandbox::ThreadFilters, kind: &'static str) {
        let _ = self.worker_filter.set((filters, kind));
    }

    /// Called first in every `handle_event`: a worker thread that has not installed its
    /// filter yet does so now, before it touches a ring. The workers are threads of
    /// vhost-user-backend, which offers no hook at their start; until their first event they
    /// only wait in epoll, under the main thread's filter, which they keep. A filter that
    /// cannot be installed ends the process (the VMM restarts it).
    pub fn enter_worker(&self) {
        if WORKER_FILTERED.with(Cell::get) {
            return;
        }
        WORKER_FILTERED.with(|f| f.set(true));
        if let Some((filters, kind)) = self.worker_filter.get() {
            if let Err(e) = filters.install(kind) {
                host_fatal(&e);
            }
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
    /// from the queue ([`Vring::pop`] checks that the ring still runs under the vring lock),
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
