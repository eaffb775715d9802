//! vhost-user backend for virtio-blk: feature negotiation, configuration
//! space and the per-queue worker (one thread per queue).

use std::io;
use std::os::fd::RawFd;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use clap::Parser;
use log::{info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringT};
use virtio_bindings::virtio_blk::{
    VIRTIO_BLK_F_BLK_SIZE, VIRTIO_BLK_F_DISCARD, VIRTIO_BLK_F_FLUSH, VIRTIO_BLK_F_MQ,
    VIRTIO_BLK_F_RO, VIRTIO_BLK_F_SEG_MAX, VIRTIO_BLK_F_SIZE_MAX, VIRTIO_BLK_F_WRITE_ZEROES,
};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::backend_common::{
    break_ring, host_fatal, protocol_features, worker_exit_event, BackendCommon, Mem,
};
use crate::block::{process_chain, process_request, reject_chain, BlockConfigSpace, BlockMetrics};
use crate::disk::{DiskError, DiskImage, DiskOptions};
use crate::inflight::{chain_descriptors, InflightArea, QueueInflight};
use crate::metrics::{self, MetricsError};
use crate::uring::{ImageRing, UringError};
use crate::vring::{Vring, VringError};
use crate::vu_proxy::{self, InflightHost, ProxyError};
use crate::vu_socket::{SocketSource, VuSocketError};

/// Vring type used by the block backend.
pub type BlockVring = Vring;

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
    InvalidArgument(String),
    /// The vhost-user daemon could not be created or failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// An event arrived for an unknown source.
    #[error("unexpected event {0}")]
    UnknownEvent(u16),
    /// The vhost-user relay failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `--socket-fd` cannot be used.
    #[error(transparent)]
    Socket(#[from] VuSocketError),
    /// The guest left a ring in a state it cannot be served from: it is marked broken.
    #[error(transparent)]
    Ring(#[from] VringError),
    /// Signalling the guest failed.
    #[error("cannot signal the guest")]
    Signal(#[source] io::Error),
    /// The seccomp filters cannot be loaded or installed.
    #[error(transparent)]
    Seccomp(#[from] sandbox::SandboxError),
    /// The queue's io_uring failed (not a guest fault).
    #[error(transparent)]
    Uring(#[from] UringError),
}

/// How skiff-blk moves data between guest memory and the image.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum IoEngine {
    /// One io_uring per queue (crate::uring): every request a ring holds is submitted at
    /// once and completes as its I/O ends. Falls back to `sync`, with a warning, where the
    /// kernel has no io_uring or refuses it. Not the default yet: a guest's fio stalled
    /// once with it, under skiff-jailer, during VMM live upgrades over virtio-pci, and the
    /// cause is not known.
    IoUring,
    /// preadv/pwritev, one request after the other on each queue.
    #[default]
    Sync,
}

/// How the image is given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ImageSource {
    /// `--image PATH`: skiff-blk opens (and locks) the file itself.
    Path(PathBuf),
    /// `--image-fd N`: an fd the VMM opened (and locked) and passed down
    /// (see [`DiskImage::from_fd`]).
    Fd(RawFd),
}

impl ImageSource {
    /// Opens and locks the image.
    pub fn open(&self, opts: &DiskOptions) -> Result<DiskImage, DiskError> {
        match self {
            ImageSource::Path(path) => DiskImage::open(path, opts),
            ImageSource::Fd(fd) => DiskImage::from_fd(*fd, opts),
        }
    }
}

/// vhost-user virtio-blk backend serving a raw image file.
#[derive(Debug, Parser)]
#[command(name = "skiff-blk", version)]
#[command(group(clap::ArgGroup::new("image_source").required(true).args(["image", "image_fd"])))]
pub struct BlkArgs {
    /// The vhost-user frontend: --socket PATH or --socket-fd N.
    #[command(flatten)]
    pub frontend: crate::vu_socket::FrontendArgs,
    /// Raw disk image (regular file or block device) to open and flock (LOCK_EX, LOCK_SH
    /// with --read-only). Either --image or --image-fd gives the image, not both.
    #[arg(long, value_name = "PATH")]
    pub image: Option<PathBuf>,
    /// Inherited fd of the raw image (regular file or block device), opened and usually
    /// flocked by the caller (the VMM), which keeps it open.
    ///
    /// It must be open O_RDWR, or O_RDONLY/O_RDWR with --read-only. skiff-blk sets
    /// FD_CLOEXEC on it and takes the same flock as for --image on it: flock locks belong to
    /// the open file description, so a lock already held on this description (by the VMM or
    /// a previous skiff-blk during an upgrade) is no conflict, while another open of the
    /// image is. With --direct it sets O_DIRECT on the description (F_SETFL), without it
    /// clears it. Messages name the image by its /proc/self/fd path; the default serial is
    /// the same as with --image.
    #[arg(
        long = "image-fd",
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    pub image_fd: Option<i32>,
    /// Expose the disk read-only (VIRTIO_BLK_F_RO, shared lock).
    #[arg(long)]
    pub read_only: bool,
    /// Do I/O with O_DIRECT (opened with it, or set on --image-fd).
    #[arg(long)]
    pub direct: bool,
    /// Number of request queues.
    #[arg(long, default_value_t = 1)]
    pub num_queues: u16,
    /// Maximum size of each queue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// How reads and writes reach the image: io-uring (requests of a queue in flight
    /// together) or sync (one after the other).
    #[arg(long, value_enum, default_value_t = IoEngine::Sync)]
    pub io_engine: IoEngine,
    /// Inherited fd of the VMM's 4096-byte metrics memfd to count into (layout in
    /// docs/CONTRACTS.md); without it the counters stay in process memory.
    #[arg(long, value_name = "N")]
    pub metrics_fd: Option<i32>,
    /// Serial returned by GET_ID (up to 20 bytes; default derived from the image's
    /// device and inode numbers).
    #[arg(long)]
    pub serial: Option<String>,
    /// seccomp: --no-seccomp or --seccomp-filter FILE (default: the built-in filters).
    #[command(flatten)]
    pub seccomp: sandbox::SeccompArgs,
}

impl From<BlkArgs> for BlockOptions {
    fn from(args: BlkArgs) -> Self {
        let image = match (args.image, args.image_fd) {
            (_, Some(fd)) => ImageSource::Fd(fd),
            (Some(path), None) => ImageSource::Path(path),
            // clap requires one of the two.
            (None, None) => ImageSource::Path(PathBuf::new()),
        };
        BlockOptions {
            socket: args.frontend.source(),
            image,
            disk: DiskOptions {
                read_only: args.read_only,
                direct: args.direct,
                serial: args.serial,
            },
            num_queues: args.num_queues,
            queue_size: args.queue_size,
            io_engine: args.io_engine,
            metrics_fd: args.metrics_fd,
            seccomp: args.seccomp.choice(),
        }
    }
}

/// Everything skiff-blk needs to start.
#[derive(Clone, Debug)]
pub struct BlockOptions {
    /// The vhost-user socket: a path to listen on or an inherited connection.
    pub socket: SocketSource,
    /// The raw image, by path or inherited fd.
    pub image: ImageSource,
    /// Image options.
    pub disk: DiskOptions,
    /// Number of request queues.
    pub num_queues: u16,
    /// Maximum queue size.
    pub queue_size: u16,
    /// How reads and writes reach the image.
    pub io_engine: IoEngine,
    /// Inherited metrics page (`--metrics-fd`); counters stay in process memory without it.
    pub metrics_fd: Option<RawFd>,
    /// Which seccomp filters to install.
    pub seccomp: sandbox::SeccompChoice,
}

/// virtio-blk device state shared by all worker threads.
pub struct BlockBackend {
    disk: DiskImage,
    num_queues: u16,
    queue_size: u16,
    /// One worker per queue; `stop_vring` (GET_VRING_BASE) waits for its in-flight requests.
    common: BackendCommon,
    metrics: BlockMetrics,
    /// The inflight area, once the frontend asked for one (see `inflight`).
    inflight: RwLock<Option<Arc<InflightArea>>>,
    /// Per queue: a new area arrived, so look for requests to resubmit before popping.
    resubmit_pending: Vec<AtomicBool>,
    /// Whether "ring larger than the inflight area" was logged.
    untracked_logged: AtomicBool,
    /// Each queue's io_uring (see [`BlockBackend::use_io_uring`]); none: synchronous I/O.
    rings: Vec<Mutex<Option<ImageRing>>>,
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
            // Room for the header and the status descriptors; at most MAX_SEGMENTS.
            seg_max: u32::from(queue_size.saturating_sub(2)),
            num_queues,
        }
        .to_bytes();
        BlockBackend {
            disk,
            num_queues,
            queue_size,
            common: BackendCommon::new(mem, config, usize::from(num_queues)),
            metrics,
            inflight: RwLock::new(None),
            resubmit_pending: (0..num_queues).map(|_| AtomicBool::new(false)).collect(),
            untracked_logged: AtomicBool::new(false),
            rings: Vec::new(),
        }
    }

    /// Gives every queue an io_uring of its size on the image (before any seccomp filter:
    /// the workers may only enter their rings). All or none: on failure the queues keep
    /// synchronous I/O and the error says why.
    pub fn use_io_uring(&mut self) -> Result<(), UringError> {
        let fd = self.disk.raw_fd();
        let rings = (0..self.num_queues)
            .map(|_| ImageRing::new(fd, u32::from(self.queue_size)).map(|r| Mutex::new(Some(r))))
            .collect::<Result<Vec<_>, _>>()?;
        self.rings = rings;
        Ok(())
    }

    /// The image.
    pub(crate) fn disk(&self) -> &DiskImage {
        &self.disk
    }

    /// The counters.
    pub(crate) fn block_metrics(&self) -> &BlockMetrics {
        &self.metrics
    }

    /// Whether the driver negotiated EVENT_IDX.
    pub(crate) fn event_idx(&self) -> bool {
        self.common.event_idx()
    }

    /// Queue `queue`'s part of `area`, if the area can track the whole ring. A ring
    /// larger than the area (the frontend sized it so) is not tracked at all: tracking
    /// some of its requests and not others would make recovery resubmit wrong ones.
    fn tracker<'a>(
        &self,
        area: &'a InflightArea,
        vring: &BlockVring,
        queue: usize,
    ) -> Option<QueueInflight<'a>> {
        let track = area.queue(queue)?;
        let size = vring.get_ref().get_queue().size();
        if size > track.capacity() {
            if !self.untracked_logged.swap(true, Ordering::Relaxed) {
                warn!(
                    "queue {queue}: the ring ({size}) is larger than the inflight area ({}); its requests are not tracked",
                    track.capacity()
                );
            }
            return None;
        }
        Some(track)
    }

    fn inflight_area(&self) -> Option<Arc<InflightArea>> {
        self.inflight
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Puts request `head` in the used ring; returns the used index after it.
    fn publish(vring: &BlockVring, head: u16, len: u32) -> Result<u16, BlockBackendError> {
        vring.add_used(head, len).map_err(VringError::Queue)?;
        Ok(vring.get_ref().get_queue().next_used())
    }

    /// Completes `head`, recording it in the inflight area when it was tracked.
    pub(crate) fn complete(
        vring: &BlockVring,
        track: Option<&QueueInflight<'_>>,
        head: u16,
        len: u32,
    ) -> Result<(), BlockBackendError> {
        match track {
            Some(t) => t.complete(head, || Self::publish(vring, head, len)),
            None => Self::publish(vring, head, len).map(|_| ()),
        }
    }

    /// After a new inflight area arrived (a restart after a crash, or an upgrade): marks
    /// the last batch the previous backend published as done, restarts the ring after
    /// every request the area still holds, and processes those requests again in the order
    /// they were taken. The frontend's SET_VRING_BASE is overridden: the area knows better
    /// which requests were taken.
    fn resubmit(&self, vring: &BlockVring, queue: usize) -> Result<(), BlockBackendError> {
        let Some(area) = self.inflight_area() else {
            return Ok(());
        };
        let Some(track) = self.tracker(&area, vring, queue).filter(|t| t.valid()) else {
            return Ok(());
        };
        let mem = self.memory().memory();
        let (desc_table, size, used) = {
            let state = vring.get_ref();
            let q = state.get_queue();
            (
                q.desc_table(),
                q.size(),
                q.used_idx(&*mem, std::sync::atomic::Ordering::Acquire),
            )
        };
        let used = used.map_err(VringError::Queue)?.0;
        let mut heads = track.recover(used);
        // A recorded head this ring cannot hold is not a request of it (a stale area).
        heads.retain(|&h| {
            if h >= size {
                warn!("queue {queue}: the inflight area records head {h}, beyond the ring of {size}; ignored");
                track.forget(h);
            }
            h < size
        });
        vring.set_queue_next_avail(used.wrapping_add(heads.len() as u16));
        if heads.is_empty() {
            return Ok(());
        }
        info!(
            "queue {queue}: resubmitting {} request(s) from the inflight area",
            heads.len()
        );
        for head in heads {
            let table = vm_memory::GuestAddress(desc_table);
            let len = match chain_descriptors(&*mem, table, size, head) {
                Ok(descs) => process_request(&self.disk, &self.metrics, &mem, head, &descs),
                Err(e) => reject_chain(&self.metrics, head, &e),
            };
            Self::complete(vring, Some(&track), head, len)?;
        }
        vring.signal_used_queue().map_err(BlockBackendError::Signal)
    }

    pub(crate) fn memory(&self) -> Mem {
        self.common.memory()
    }

    /// Pops and completes every available request; returns whether any was used.
    fn drain_queue(&self, vring: &BlockVring, queue: usize) -> Result<bool, BlockBackendError> {
        let area = self.inflight_area();
        let track = area.as_ref().and_then(|a| self.tracker(a, vring, queue));
        if let Some(slot) = self.rings.get(queue) {
            let mut ring = slot.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(ring) = ring.as_mut() {
                return self.drain_uring(vring, ring, track.as_ref());
            }
        }
        let mem = self.memory().memory();
        let mut used = false;
        loop {
            // Keep the vring lock only for the pop; add_used takes it again.
            let Some(chain) = vring.pop(mem.clone())? else {
                break;
            };
            let head = chain.head_index();
            if let Some(t) = &track {
                t.begin(head);
            }
            let len = process_chain(&self.disk, &self.metrics, chain);
            Self::complete(vring, track.as_ref(), head, len)?;
            used = true;
        }
        Ok(used)
    }

    /// Processes queue `queue` until it is empty with notifications re-enabled.
    ///
    /// Every error but [`BlockBackendError::Signal`] is the guest's: the caller marks the
    /// ring broken. Each turn of the loop takes at least one request or ends it: a pop
    /// that finds nothing while notifications report more is an error, not a retry.
    pub fn process_queue(&self, vring: &BlockVring, queue: usize) -> Result<(), BlockBackendError> {
        let event_idx = self.common.event_idx();
        loop {
            if event_idx {
                vring.disable_notification().map_err(VringError::Queue)?;
            }
            if self.drain_queue(vring, queue)?
                && vring.needs_notification().map_err(VringError::Queue)?
            {
                vring
                    .signal_used_queue()
                    .map_err(BlockBackendError::Signal)?;
            }
            // A ring the frontend stopped (GET_VRING_BASE) must not be polled again, or the
            // loop would spin on the reset queue.
            if !event_idx || !vring.get_ref().get_queue().ready() {
                break;
            }
            if !vring.enable_notification().map_err(VringError::Queue)? {
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
            | (1 << VIRTIO_BLK_F_SIZE_MAX)
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
        // The ring is already marked not ready, so the worker pops nothing new; this waits
        // for the requests it is completing.
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
        self.common.enter_worker();
        // One queue per thread: the thread's only vring is event 0; the crate registers no
        // other fd for this backend.
        let Some(vring) = vrings.get(usize::from(device_event)) else {
            host_fatal(&BlockBackendError::UnknownEvent(device_event))
        };
        let _busy = self.common.busy(thread_id);
        self.metrics.kicks.inc(1);
        if !vring.running() {
            // A kick for a ring that was stopped (an upgrade), is not set up yet or is
            // broken: the ring's next backend, or its first kick once running, does the work.
            return Ok(());
        }
        let pending = self
            .resubmit_pending
            .get(thread_id)
            .is_some_and(|p| p.swap(false, Ordering::AcqRel));
        let result = if pending {
            self.resubmit(vring, thread_id)
        } else {
            Ok(())
        };
        // Nothing the guest does ends the worker thread: a guest fault breaks the ring.
        match result.and_then(|()| self.process_queue(vring, thread_id)) {
            Ok(()) => {}
            Err(BlockBackendError::Ring(e)) => {
                break_ring(vring, thread_id, &e, self.metrics.broken_rings)
            }
            Err(e) => host_fatal(&e),
        }
        Ok(())
    }
}

impl InflightHost for BlockBackend {
    fn max_queues(&self) -> u16 {
        self.num_queues
    }

    fn set_inflight(&self, area: Arc<InflightArea>) {
        *self.inflight.write().unwrap_or_else(|p| p.into_inner()) = Some(area);
        for p in &self.resubmit_pending {
            p.store(true, Ordering::Release);
        }
    }
}

/// Checks the command-line values that clap cannot.
pub fn check_options(opts: &BlockOptions) -> Result<(), BlockBackendError> {
    if opts.num_queues == 0 || opts.num_queues > MAX_QUEUES {
        return Err(BlockBackendError::InvalidArgument(
            "--num-queues (1..=64)".into(),
        ));
    }
    if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
        return Err(BlockBackendError::InvalidArgument(
            "--queue-size (power of two up to 32768)".into(),
        ));
    }
    if let ImageSource::Fd(fd) = opts.image {
        if opts.metrics_fd == Some(fd) {
            return Err(BlockBackendError::InvalidArgument(format!(
                "--image-fd {fd}: it is also the --metrics-fd"
            )));
        }
    }
    if let Some(fd) = opts.socket.fd() {
        let other = if opts.metrics_fd == Some(fd) {
            Some("--metrics-fd")
        } else if opts.image == ImageSource::Fd(fd) {
            Some("--image-fd")
        } else {
            None
        };
        if let Some(other) = other {
            return Err(BlockBackendError::InvalidArgument(format!(
                "--socket-fd {fd}: it is also the {other}"
            )));
        }
    }
    Ok(())
}

/// Opens the image, takes the frontend's connection (or listens for it) and serves that one
/// frontend until it disconnects.
pub fn run(opts: &BlockOptions) -> Result<(), BlockBackendError> {
    check_options(opts)?;
    // First, while the inherited fds (metrics page, --image-fd, --socket-fd, checked
    // distinct above) are the only ones this process did not open itself.
    let frontend = opts.socket.open()?;
    let metrics = BlockMetrics::register(&metrics::page_from_arg(opts.metrics_fd)?)?;
    let disk = opts.image.open(&opts.disk)?;
    info!(
        "image {} ({} sectors{}{}), {} queue(s) of {}",
        disk.name(),
        disk.sectors(),
        if disk.read_only() { ", read-only" } else { "" },
        if opts.disk.direct { ", O_DIRECT" } else { "" },
        opts.num_queues,
        opts.queue_size
    );
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let mut backend =
        BlockBackend::new(disk, opts.num_queues, opts.queue_size, mem.clone(), metrics);
    if opts.io_engine == IoEngine::IoUring && crate::uring::inherited_seccomp() {
        warn!(
            "started under its parent's seccomp filter (a skiff not under skiff-jailer starts \
             device processes so once its own filter is in force: upgrades, restarts), which \
             allows no io_uring: reads and writes are synchronous (--io-engine sync)"
        );
    } else if opts.io_engine == IoEngine::IoUring {
        match backend.use_io_uring() {
            Ok(()) => info!("I/O through io_uring, one ring per queue"),
            Err(e) => warn!(
                "{}; reads and writes are synchronous (--io-engine sync)",
                crate::error_chain(&e)
            ),
        }
    }
    let backend = Arc::new(backend);
    // Everything opened: from here on only the vhost-user frontend's messages and the
    // guest's requests are served. The workers the daemon starts keep this filter and add
    // their own on their first event, before they touch a ring.
    let filters =
        sandbox::ThreadFilters::load(&opts.seccomp, "skiff-blk", sandbox::filters::BLK_KINDS)?;
    backend
        .common
        .set_worker_filter(filters.clone(), "blk_worker");
    filters.install("blk_main")?;
    let host: Arc<dyn InflightHost> = backend.clone();
    let mut daemon = VhostUserDaemon::new("skiff-blk".to_string(), backend, mem)
        .map_err(|e| BlockBackendError::Daemon(e.to_string()))?;
    info!("{}", opts.socket.activity());
    // The relay adds the inflight area, which vhost-user-backend lacks.
    vu_proxy::serve(frontend, &mut daemon, Some(host))?;
    info!("frontend disconnected");
    Ok(())
}

#[cfg(test)]
#[path = "block_backend_tests.rs"]
mod tests;
