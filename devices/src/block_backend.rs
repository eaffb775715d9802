//! vhost-user backend for virtio-blk: feature negotiation, configuration
//! space and the per-queue worker (one thread per queue).

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::Arc;

use log::{error, info};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringRwLock, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::backend_common::{protocol_features, worker_exit_event, BackendCommon, Mem};
use crate::block::{process_chain, BlockConfigSpace, BlockMetrics};
use crate::disk::{DiskError, DiskImage, DiskOptions};
use crate::metrics::{self, MetricsError};

/// Vring type used by the block backend.
pub type BlockVring = VringRwLock<Mem>;

/// Most queues skiff-blk serves (one worker thread each).
pub const MAX_QUEUES: u16 = 64;

/// Errors raised by the block backend.
#[derive(Debug, thiserror::Error)]
pub enum BlockBackendError {
    /// The image cannot be used.
    #[error(transparent)]
    Disk(#[from] DiskError),
    /// The metrics page (`--metrics-fd`) cannot be used.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Bad command-line value.
    #[error("invalid {0}")]
    InvalidArgument(&'static str),
    /// The vhost-user daemon could not be created or failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// An event arrived for an unknown source.
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    /// A vring operation failed.
    #[error("vring operation failed")]
    Vring(#[source] virtio_queue::Error),
    /// Signalling the guest failed.
    #[error("cannot signal the guest")]
    Signal(#[source] io::Error),
}

/// Everything skiff-blk needs to start.
#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// vhost-user socket path.
    pub socket: PathBuf,
    /// Raw image path.
    pub image: PathBuf,
    /// Image options.
    pub disk: DiskOptions,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// Inherited metrics page (`--metrics-fd`); counters stay in process memory without it.
    pub metrics_fd: Option<RawFd>,
}

/// virtio-blk device state shared by all worker threads.
pub struct BlockBackend {
    disk: DiskImage,
    num_queues: u16,
    queue_size: u16,
    /// One worker per queue: `stop_vring` (GET_VRING_BASE) waits for its in-flight requests.
    common: BackendCommon,
    metrics: BlockMetrics,
}

impl BlockBackend {
    /// Creates the backend over an opened image, counting into `metrics`.
    pub fn new(
        disk: DiskImage,
        num_queues: u16,
        queue_size: u16,
        mem: Mem,
        metrics: BlockMetrics,
    ) -> Self {
        let config = BlockConfigSpace {
            capacity: disk.sectors(),
            seg_max: u32::from(queue_size.saturating_sub(2).max(1)),
            num_queues,
        }
        .to_bytes();
        BlockBackend {
            disk,
            num_queues,
            queue_size,
            common: BackendCommon::new(mem, config, usize::from(num_queues)),
            metrics,
        }
    }

    fn memory(&self) -> Mem {
        self.common.memory()
    }

    /// Pops and completes every available request; returns whether any was used.
    fn drain_queue(&self, vring: &BlockVring) -> Result<bool, BlockBackendError> {
        let mem = self.memory().memory();
        let mut used = false;
        loop {
            // Keep the vring lock only for the pop; add_used takes it again.
            let chain = vring
                .get_mut()
                .get_queue_mut()
                .pop_descriptor_chain(mem.clone());
            let Some(chain) = chain else { break };
            let head = chain.head_index();
            let len = process_chain(&self.disk, &self.metrics, chain);
            vring
                .add_used(head, len)
                .map_err(BlockBackendError::Vring)?;
            used = true;
        }
        Ok(used)
    }

    /// Processes a queue until it is empty with notifications re-enabled.
    pub fn process_queue(&self, vring: &BlockVring) -> Result<(), BlockBackendError> {
        let event_idx = self.common.event_idx();
        loop {
            if event_idx {
                vring
                    .disable_notification()
                    .map_err(BlockBackendError::Vring)?;
            }
            if self.drain_queue(vring)?
                && vring
                    .needs_notification()
                    .map_err(BlockBackendError::Vring)?
            {
                vring
                    .signal_used_queue()
                    .map_err(BlockBackendError::Signal)?;
            }
            if !event_idx {
                break;
            }
            if !vring
                .enable_notification()
                .map_err(BlockBackendError::Vring)?
            {
                break;
            }
        }
        Ok(())
    }
}

impl VhostUserBackend for BlockBackend {
    type Bitmap = ();
    type Vring = BlockVring;

    fn num_queues(&self) -> usize {
        usize::from(self.num_queues)
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_BLK_F_SEG_MAX)
            | (1 << VIRTIO_BLK_F_BLK_SIZE)
            | (1 << VIRTIO_BLK_F_FLUSH)
            | (1 << VIRTIO_BLK_F_DISCARD)
            | (1 << VIRTIO_BLK_F_WRITE_ZEROES)
            | (1 << VIRTIO_BLK_F_MQ)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.disk.read_only() {
            f |= 1 << VIRTIO_BLK_F_RO;
        }
        f
    }

    fn protocol_features(&self) -> VhostUserProtocolFeatures {
        protocol_features()
    }

    fn set_event_idx(&self, enabled: bool) {
        self.common.set_event_idx(enabled);
    }

    fn get_config(&self, offset: u32, size: u32) -> Vec<u8> {
        self.common.config(offset, size)
    }

    fn update_memory(&self, mem: Mem) -> io::Result<()> {
        self.common.set_memory(mem);
        Ok(())
    }

    fn stop_vring(&self, queue_index: u32) -> io::Result<()> {
        // The ring is already marked not ready, so the worker pops nothing new;
        // taking its lock waits for the requests it is completing.
        self.common.wait_idle(queue_index as usize);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        worker_exit_event()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        (0..self.num_queues).map(|q| 1u64 << q).collect()
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[BlockVring],
        thread_id: usize,
    ) -> io::Result<()> {
        let _ = evset;
        // One queue per thread: the thread's only vring is event 0.
        let vring = vrings
            .get(usize::from(device_event))
            .ok_or_else(|| io::Error::other(BlockBackendError::UnknownEvent(device_event)))?;
        let _busy = self.common.busy(thread_id);
        self.metrics.kicks.inc(1);
        if let Err(e) = self.process_queue(vring) {
            error!("queue {thread_id}: {}", crate::error_chain(&e));
            return Err(io::Error::other(e));
        }
        Ok(())
    }
}

/// Opens the image, listens on the socket and serves one frontend until it disconnects.
pub fn run(opts: &BlockOptions) -> Result<(), BlockBackendError> {
    if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
        return Err(BlockBackendError::InvalidArgument("--num-queues (1..=64)"));
    }
    if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
        return Err(BlockBackendError::InvalidArgument(
            "--queue-size (power of two up to 32768)",
        ));
    }
    // First, while the inherited fd is the only one this process did not open itself.
    let metrics = BlockMetrics::register(&metrics::page_from_arg(opts.metrics_fd)?)?;
    let disk = DiskImage::open(&opts.image, &opts.disk)?;
    info!(
        "image {} ({} sectors{}{}), {} queue(s) of {}",
        opts.image.display(),
        disk.sectors(),
        if disk.read_only() { ", read-only" } else { "" },
        if opts.disk.direct { ", O_DIRECT" } else { "" },
        opts.num_queues,
        opts.queue_size
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(BlockBackend::new(
        disk,
        opts.num_queues,
        opts.queue_size,
        mem.clone(),
        metrics,
    ));
    let mut daemon = VhostUserDaemon::new("skiff-blk".to_string(), backend, mem)
        .map_err(|e| BlockBackendError::Daemon(e.to_string()))?;
    info!("listening on {}", opts.socket.display());
    daemon
        .serve(&opts.socket)
        .map_err(|e| BlockBackendError::Daemon(e.to_string()))?;
    info!("frontend disconnected");
    Ok(())
}
