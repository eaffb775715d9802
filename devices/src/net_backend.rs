//! vhost-user backend for virtio-net: one TAP and one worker thread per
//! queue pair (queue 2k = rx, 2k+1 = tx), plus a control queue when there is
//! more than one pair (Linux requires CTRL_VQ for MQ).

use std::fmt;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;

use clap::Parser;
use log::{error, info, warn};
use vhost::vhost_user::message::{VhostUserProtocolFeatures, VhostUserVirtioFeatures};
use vhost_user_backend::{VhostUserBackend, VhostUserDaemon, VringT};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_TSO4,
    VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MQ,
    VIRTIO_NET_F_STATUS,
};
use virtio_bindings::virtio_ring::{VIRTIO_RING_F_EVENT_IDX, VIRTIO_RING_F_INDIRECT_DESC};
use virtio_queue::QueueOwnedT;
use vm_memory::{GuestAddressSpace, GuestMemoryAtomic, GuestMemoryMmap};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::event::{EventConsumer, EventNotifier};

use crate::backend_common::{
    break_ring, host_fatal, protocol_features, worker_exit_event, BackendCommon, Mem,
};
use crate::metrics::{self, MetricsError};
use crate::net::{self, NetError, NetMetrics};
use crate::vring::{Vring, VringError};
use crate::vu_proxy::{self, ProxyError};
use crate::vu_socket::{SocketSource, VuSocketError};
use tapdev::{offload_flags, Tap, TapError};

/// Vring type used by the net backend.
pub type NetVring = Vring;

/// Most queue pairs (TAPs) skiff-net serves.
pub const MAX_PAIRS: usize = 16;

/// Errors raised by the net backend.
#[derive(Debug, thiserror::Error)]
pub enum NetBackendError {
    /// A TAP cannot be used.
    #[error(transparent)]
    Tap(#[from] TapError),
    /// The metrics page (`--metrics-fd`) cannot be used.
    #[error(transparent)]
    Metrics(#[from] MetricsError),
    /// Bad command-line value.
    #[error("invalid {0}")]
    InvalidArgument(String),
    /// The vhost-user daemon could not be created or failed.
    #[error("vhost-user daemon failed: {0}")]
    Daemon(String),
    /// The vhost-user relay failed.
    #[error(transparent)]
    Proxy(#[from] ProxyError),
    /// `--socket-fd` cannot be used.
    #[error(transparent)]
    Socket(#[from] VuSocketError),
    /// The TAP fd cannot be added to a worker's epoll.
    #[error("cannot register TAP {0} with the worker")]
    Register(String, #[source] io::Error),
    /// An event arrived for an unknown source.
    #[error("unexpected event {0} on thread {1}")]
    UnknownEvent(u16, usize),
    /// The guest left a ring in a state it cannot be served from: it is marked broken.
    #[error(transparent)]
    Ring(#[from] VringError),
    /// Signalling the guest failed.
    #[error("cannot signal the guest")]
    Signal(#[source] io::Error),
    /// The seccomp filters cannot be loaded or installed.
    #[error(transparent)]
    Seccomp(#[from] sandbox::SandboxError),
}

/// How one TAP (queue pair) is given on the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TapSpec {
    /// `--tap NAME`: skiff-net opens (or creates) the TAP itself.
    Name(String),
    /// `--tap-fd N`: an fd the VMM opened and passed down (see [`Tap::from_fd`]).
    Fd(RawFd),
}

impl TapSpec {
    /// The option that gives this kind of TAP.
    pub fn option(&self) -> &'static str {
        match self {
            TapSpec::Name(_) => "--tap",
            TapSpec::Fd(_) => "--tap-fd",
        }
    }

    /// Opens the TAP.
    pub fn open(&self) -> Result<Tap, TapError> {
        match self {
            TapSpec::Name(name) => Tap::open(name),
            TapSpec::Fd(fd) => Tap::from_fd(*fd),
        }
    }
}

impl fmt::Display for TapSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TapSpec::Name(name) => write!(f, "--tap {name}"),
            TapSpec::Fd(fd) => write!(f, "--tap-fd {fd}"),
        }
    }
}

/// vhost-user virtio-net backend; one TAP per queue pair.
#[derive(Debug, Parser)]
#[command(name = "skiff-net", version)]
#[command(group(clap::ArgGroup::new("tap_list").required(true).args(["taps", "tap_fds"])))]
pub struct NetArgs {
    /// The vhost-user frontend: --socket PATH or --socket-fd N.
    #[command(flatten)]
    pub frontend: crate::vu_socket::FrontendArgs,
    /// TAP interface to open (or create) by name; repeat for a multi-queue device (one TAP
    /// per queue pair). Either --tap or --tap-fd gives the TAPs, not both.
    #[arg(long = "tap", value_name = "NAME")]
    pub taps: Vec<String>,
    /// Inherited fd of a TAP the caller (the VMM) opened and keeps open; repeat for a
    /// multi-queue device (one TAP per queue pair).
    ///
    /// The TAP must have been opened with IFF_TAP|IFF_NO_PI|IFF_VNET_HDR (checked with
    /// TUNGETIFF, which also gives the interface name for logs). skiff-net sets O_NONBLOCK
    /// and FD_CLOEXEC on it, the vnet header size (12) and the offloads the guest acks,
    /// as for --tap. On exit it only closes the fd: it never deletes the interface or
    /// changes its persistence. The same open TAP may be shared with the VMM and, during
    /// an upgrade, with the previous skiff-net: skiff-net stops reading and writing it for
    /// a queue pair once that pair's rings are stopped (GET_VRING_BASE).
    #[arg(
        long = "tap-fd",
        value_name = "N",
        allow_negative_numbers = true,
        value_parser = clap::value_parser!(i32).range(0..)
    )]
    pub tap_fds: Vec<i32>,
    /// MAC address in the config space (aa:bb:cc:dd:ee:ff).
    #[arg(long, value_parser = parse_mac)]
    pub mac: Option<[u8; 6]>,
    /// Maximum size of each queue.
    #[arg(long, default_value_t = 256)]
    pub queue_size: u16,
    /// Inherited fd of the VMM's 4096-byte metrics memfd to count into (layout in
    /// docs/CONTRACTS.md); without it the counters stay in process memory.
    #[arg(long, value_name = "N")]
    pub metrics_fd: Option<i32>,
    /// seccomp: --no-seccomp or --seccomp-filter FILE (default: the built-in filters).
    #[command(flatten)]
    pub seccomp: sandbox::SeccompArgs,
}

impl From<NetArgs> for NetOptions {
    fn from(args: NetArgs) -> Self {
        let taps = if args.tap_fds.is_empty() {
            args.taps.into_iter().map(TapSpec::Name).collect()
        } else {
            args.tap_fds.into_iter().map(TapSpec::Fd).collect()
        };
        NetOptions {
            socket: args.frontend.source(),
            taps,
            mac: args.mac,
            queue_size: args.queue_size,
            metrics_fd: args.metrics_fd,
            seccomp: args.seccomp.choice(),
        }
    }
}

/// Everything skiff-net needs to start.
#[derive(Clone, Debug)]
pub struct NetOptions {
    /// The vhost-user socket: a path to listen on or an inherited connection.
    pub socket: SocketSource,
    /// The TAPs, one per queue pair, all given by name or all by fd.
    pub taps: Vec<TapSpec>,
    /// MAC address for the config space.
    pub mac: Option<[u8; 6]>,
    /// Maximum queue size.
    pub queue_size: u16,
    /// Inherited metrics page (`--metrics-fd`); counters stay in process memory without it.
    pub metrics_fd: Option<RawFd>,
    /// Which seccomp filters to install.
    pub seccomp: sandbox::SeccompChoice,
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let parts: Vec<&str> = s.split(':').collect();
    if parts.len() != 6 {
        return Err(format!("MAC {s:?} must have six ':'-separated bytes"));
    }
    let mut mac = [0u8; 6];
    for (out, p) in mac.iter_mut().zip(parts) {
        if p.len() != 2 {
            return Err(format!("MAC {s:?} has a bad byte {p:?}"));
        }
        *out = u8::from_str_radix(p, 16).map_err(|_| format!("MAC {s:?} has a bad byte {p:?}"))?;
    }
    Ok(mac)
}

/// virtio-net device state shared by all worker threads.
pub struct NetBackend {
    taps: Vec<Tap>,
    mac: Option<[u8; 6]>,
    queue_size: u16,
    /// One worker per queue pair (the last one also has the control queue); a busy flag
    /// per queue: `stop_vring` (GET_VRING_BASE) waits for the frame being moved.
    common: BackendCommon,
    metrics: NetMetrics,
}

impl NetBackend {
    /// Creates the backend over opened TAPs, counting into `metrics`.
    pub fn new(
        taps: Vec<Tap>,
        mac: Option<[u8; 6]>,
        queue_size: u16,
        mem: Mem,
        metrics: NetMetrics,
    ) -> Self {
        let pairs = taps.len() as u16;
        NetBackend {
            common: BackendCommon::new(
                mem,
                net::config_bytes(mac, pairs),
                2 * usize::from(pairs) + 1,
            ),
            taps,
            mac,
            queue_size,
            metrics,
        }
    }

    fn pairs(&self) -> usize {
        self.taps.len()
    }

    fn has_ctrl(&self) -> bool {
        self.pairs() > 1
    }

    /// Event id of a pair's TAP on its worker's epoll (beyond the queue and exit ids).
    pub fn tap_event(&self) -> u16 {
        self.num_queues() as u16 + 1
    }

    fn memory(&self) -> Mem {
        self.common.memory()
    }

    fn signal(&self, vring: &NetVring) -> Result<(), NetBackendError> {
        if vring.needs_notification().map_err(VringError::Queue)? {
            vring.signal_used_queue().map_err(NetBackendError::Signal)?;
        }
        Ok(())
    }

    /// Moves frames from the TAP into rx buffers until either runs dry.
    ///
    /// Every error but [`NetBackendError::Signal`] is the guest's: the caller marks the
    /// ring broken. A chain that cannot take a frame is returned unused, so rx goes on.
    fn process_rx(&self, tap: &Tap, vring: &NetVring) -> Result<(), NetBackendError> {
        if !vring.running() {
            return Ok(());
        }
        let mem = self.memory().memory();
        let mut used = false;
        loop {
            let Some(mut chain) = vring.pop(mem.clone())? else {
                // The frontend stopped the ring (GET_VRING_BASE during an upgrade): stop
                // here, or the loop below would spin on a reset queue.
                if !vring.running() {
                    break;
                }
                // No rx buffers: stop reading; the guest's next kick resumes us. Buffers
                // made available meanwhile are popped (a pop that finds nothing while the
                // index says otherwise is an error, so this does not spin).
                if vring.enable_notification().map_err(VringError::Queue)? {
                    continue;
                }
                break;
            };
            let head = chain.head_index();
            match net::rx_frame(tap.as_raw_fd(), &mut chain, &self.metrics) {
                Ok(len) => {
                    vring.add_used(head, len).map_err(VringError::Queue)?;
                    used = true;
                }
                Err(NetError::WouldBlock) => {
                    vring.get_mut().get_queue_mut().go_to_previous_position();
                    break;
                }
                Err(e @ NetError::Io(_)) => {
                    if worth_logging(&self.metrics, &e, false) {
                        warn!("TAP {tap} read: {}", crate::error_chain(&e));
                    }
                    vring.get_mut().get_queue_mut().go_to_previous_position();
                    break;
                }
                Err(e) => {
                    if worth_logging(&self.metrics, &e, false) {
                        warn!("rx chain {head} dropped: {}", crate::error_chain(&e));
                    }
                    vring.add_used(head, 0).map_err(VringError::Queue)?;
                    used = true;
                }
            }
        }
        if used {
            self.signal(vring)?;
        }
        Ok(())
    }

    /// Writes every available tx chain to the TAP; on EAGAIN leaves the chain
    /// queued and waits for EPOLLOUT.
    fn process_tx(&self, tap: &Tap, vring: &NetVring) -> Result<(), NetBackendError> {
        if !vring.running() {
            return Ok(());
        }
        let event_idx = self.common.event_idx();
        let mem = self.memory().memory();
        loop {
            if event_idx {
                vring.disable_notification().map_err(VringError::Queue)?;
            }
            let mut used = false;
            let mut blocked = false;
            loop {
                let Some(mut chain) = vring.pop(mem.clone())? else {
                    break;
                };
                let head = chain.head_index();
                match net::tx_frame(tap.as_raw_fd(), &mut chain, &self.metrics) {
                    Ok(_) => {}
                    Err(NetError::WouldBlock) => {
                        vring.get_mut().get_queue_mut().go_to_previous_position();
                        blocked = true;
                        break;
                    }
                    Err(e) => {
                        if worth_logging(&self.metrics, &e, true) {
                            warn!("tx frame dropped on TAP {tap}: {}", crate::error_chain(&e))
                        }
                    }
                }
                vring.add_used(head, 0).map_err(VringError::Queue)?;
                used = true;
            }
            if used {
                self.signal(vring)?;
            }
            if blocked || !event_idx || !vring.running() {
                break;
            }
            if !vring.enable_notification().map_err(VringError::Queue)? {
                break;
            }
        }
        Ok(())
    }

    fn process_ctrl(&self, vring: &NetVring) -> Result<(), NetBackendError> {
        let mem = self.memory().memory();
        let mut used = false;
        loop {
            let Some(mut chain) = vring.pop(mem.clone())? else {
                break;
            };
            let head = chain.head_index();
            let len = net::ctrl_command(&mut chain, self.pairs() as u16, &self.metrics);
            vring.add_used(head, len).map_err(VringError::Queue)?;
            used = true;
        }
        if used {
            self.signal(vring)?;
        }
        Ok(())
    }

    /// Runs `work` on queue `queue` (marked busy meanwhile, see [`BackendCommon::busy`]).
    /// Nothing the guest does ends the worker thread: a guest fault breaks the ring; only
    /// a host failure ends the process.
    fn serve(
        &self,
        queue: usize,
        vring: &NetVring,
        work: impl FnOnce() -> Result<(), NetBackendError>,
    ) {
        let _busy = self.common.busy(queue);
        match work() {
            Ok(()) => {}
            Err(NetBackendError::Ring(e)) => {
                break_ring(vring, queue, &e, self.metrics.broken_rings)
            }
            Err(e) => host_fatal(&e),
        }
    }

    fn dispatch(&self, device_event: u16, evset: EventSet, vrings: &[NetVring], thread_id: usize) {
        // The crate delivers the kicks of the thread's rings and the TAP registered in
        // `run`, nothing else.
        let unknown = || host_fatal(&NetBackendError::UnknownEvent(device_event, thread_id));
        if thread_id >= self.pairs() {
            let Some(ctrl) = vrings.first() else {
                unknown()
            };
            self.metrics.kicks.inc(1);
            return self.serve(2 * self.pairs(), ctrl, || self.process_ctrl(ctrl));
        }
        let (rx_q, tx_q) = (2 * thread_id, 2 * thread_id + 1);
        let (Some(tap), [rx, tx, ..]) = (self.taps.get(thread_id), vrings) else {
            unknown()
        };
        match device_event {
            0 => {
                self.metrics.kicks.inc(1);
                self.serve(rx_q, rx, || self.process_rx(tap, rx));
            }
            1 => {
                self.metrics.kicks.inc(1);
                self.serve(tx_q, tx, || self.process_tx(tap, tx));
            }
            e if e == self.tap_event() => {
                if evset.contains(EventSet::OUT) {
                    self.serve(tx_q, tx, || self.process_tx(tap, tx));
                }
                if evset.intersects(EventSet::IN | EventSet::HANG_UP | EventSet::ERROR) {
                    self.serve(rx_q, rx, || self.process_rx(tap, rx));
                }
            }
            _ => unknown(),
        }
    }
}

impl VhostUserBackend for NetBackend {
    type Bitmap = ();
    type Vring = NetVring;

    fn num_queues(&self) -> usize {
        2 * self.pairs() + usize::from(self.has_ctrl())
    }

    fn max_queue_size(&self) -> usize {
        usize::from(self.queue_size)
    }

    fn features(&self) -> u64 {
        let mut f = (1u64 << VIRTIO_F_VERSION_1)
            | (1 << VIRTIO_NET_F_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_CSUM)
            | (1 << VIRTIO_NET_F_GUEST_TSO4)
            | (1 << VIRTIO_NET_F_GUEST_TSO6)
            | (1 << VIRTIO_NET_F_GUEST_UFO)
            | (1 << VIRTIO_NET_F_HOST_TSO4)
            | (1 << VIRTIO_NET_F_HOST_TSO6)
            | (1 << VIRTIO_NET_F_HOST_UFO)
            | (1 << VIRTIO_NET_F_STATUS)
            | (1 << VIRTIO_RING_F_EVENT_IDX)
            | (1 << VIRTIO_RING_F_INDIRECT_DESC)
            | VhostUserVirtioFeatures::PROTOCOL_FEATURES.bits();
        if self.mac.is_some() {
            f |= 1 << VIRTIO_NET_F_MAC;
        }
        if self.has_ctrl() {
            f |= (1 << VIRTIO_NET_F_MQ) | (1 << VIRTIO_NET_F_CTRL_VQ);
        }
        f
    }

    fn acked_features(&self, features: u64) {
        let flags = offload_flags(features);
        for tap in &self.taps {
            if let Err(e) = tap.set_offload(flags) {
                error!("{}", crate::error_chain(&e));
            }
        }
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
        self.common.wait_idle(queue_index as usize);
        Ok(())
    }

    fn exit_event(&self, _thread_index: usize) -> Option<(EventConsumer, EventNotifier)> {
        worker_exit_event()
    }

    fn queues_per_thread(&self) -> Vec<u64> {
        let mut threads: Vec<u64> = (0..self.pairs()).map(|k| 0b11u64 << (2 * k)).collect();
        if self.has_ctrl() {
            threads.push(1u64 << (2 * self.pairs()));
        }
        threads
    }

    fn handle_event(
        &self,
        device_event: u16,
        evset: EventSet,
        vrings: &[NetVring],
        thread_id: usize,
    ) -> io::Result<()> {
        self.common.enter_worker();
        self.dispatch(device_event, evset, vrings, thread_id);
        Ok(())
    }
}

/// Checks the TAP list: 1..=MAX_PAIRS TAPs, all given the same way, no fd number twice
/// nor equal to `--metrics-fd` or `--socket-fd` (`socket_fd`), and that `--socket-fd` is
/// not the `--metrics-fd` either.
pub fn check_taps(
    taps: &[TapSpec],
    metrics_fd: Option<RawFd>,
    socket_fd: Option<RawFd>,
) -> Result<(), NetBackendError> {
    if let Some(fd) = socket_fd {
        let other = if metrics_fd == Some(fd) {
            Some("the --metrics-fd")
        } else if taps.contains(&TapSpec::Fd(fd)) {
            Some("a --tap-fd")
        } else {
            None
        };
        if let Some(other) = other {
            return Err(NetBackendError::InvalidArgument(format!(
                "--socket-fd {fd}: it is also {other}"
            )));
        }
    }
    let Some(first) = taps.first() else {
        return Err(NetBackendError::InvalidArgument(format!(
            "TAP list: give 1..={MAX_PAIRS} --tap NAME or --tap-fd N"
        )));
    };
    let option = first.option();
    if taps.len() > MAX_PAIRS {
        return Err(NetBackendError::InvalidArgument(format!(
            "number of {option} ({}, at most {MAX_PAIRS})",
            taps.len()
        )));
    }
    if let Some(other) = taps.iter().find(|t| t.option() != option) {
        return Err(NetBackendError::InvalidArgument(format!(
            "{other}: the TAPs are given either by --tap NAME or by --tap-fd N, not both"
        )));
    }
    for (i, t) in taps.iter().enumerate() {
        let TapSpec::Fd(fd) = t else { continue };
        if taps[..i].contains(t) {
            return Err(NetBackendError::InvalidArgument(format!(
                "--tap-fd {fd}: given twice (one fd per TAP)"
            )));
        }
        if metrics_fd == Some(*fd) {
            return Err(NetBackendError::InvalidArgument(format!(
                "--tap-fd {fd}: it is also the --metrics-fd"
            )));
        }
    }
    Ok(())
}

/// Opens every TAP, in order (queue pair k uses TAP k). Call [`check_taps`] first.
pub fn open_taps(taps: &[TapSpec]) -> Result<Vec<Tap>, NetBackendError> {
    Ok(taps
        .iter()
        .map(TapSpec::open)
        .collect::<Result<Vec<_>, _>>()?)
}

/// Opens the TAPs, takes the frontend's connection (or listens for it) and serves that one
/// frontend until it disconnects.
pub fn run(opts: &NetOptions) -> Result<(), NetBackendError> {
    check_taps(&opts.taps, opts.metrics_fd, opts.socket.fd())?;
    if opts.queue_size == 0 || !opts.queue_size.is_power_of_two() || opts.queue_size > 32768 {
        return Err(NetBackendError::InvalidArgument(
            "--queue-size (power of two up to 32768)".into(),
        ));
    }
    // Before opening anything, while the inherited fds (metrics page, --tap-fd, --socket-fd,
    // checked distinct above) are the only ones this process did not open itself.
    let frontend = opts.socket.open()?;
    let metrics = NetMetrics::register(&metrics::page_from_arg(opts.metrics_fd)?)?;
    let taps = open_taps(&opts.taps)?;
    let names: Vec<String> = taps.iter().map(Tap::to_string).collect();
    info!("TAP {} with {} queue pair(s)", names.join(","), taps.len());
    let mem = GuestMemoryAtomic::new(GuestMemoryMmap::new());
    let backend = Arc::new(NetBackend::new(
        taps,
        opts.mac,
        opts.queue_size,
        mem.clone(),
        metrics,
    ));
    // Everything opened (the TAPs configured): the workers the daemon starts keep this
    // filter and add their own on their first event.
    let filters =
        sandbox::ThreadFilters::load(&opts.seccomp, "skiff-net", sandbox::filters::NET_KINDS)?;
    backend
        .common
        .set_worker_filter(filters.clone(), "net_worker");
    filters.install("net_main")?;
    let mut daemon = VhostUserDaemon::new("skiff-net".to_string(), backend.clone(), mem)
        .map_err(|e| NetBackendError::Daemon(e.to_string()))?;
    let handlers = daemon.get_epoll_handlers();
    for (tap, handler) in backend.taps.iter().zip(handlers.iter()) {
        handler
            .register_listener(
                tap.as_raw_fd(),
                EventSet::IN | EventSet::OUT | EventSet::EDGE_TRIGGERED,
                u64::from(backend.tap_event()),
            )
            .map_err(|e| NetBackendError::Register(tap.to_string(), e))?;
    }
    info!("{}", opts.socket.activity());
    // The relay, as for skiff-blk (vhost-user-backend cannot serve a connected stream);
    // skiff-net has no inflight area, so the crate sees every message as sent.
    vu_proxy::serve(frontend, &mut daemon, None)?;
    info!("frontend disconnected");
    Ok(())
}

/// Whether an error, already counted, is worth a log line: the 1st, 2nd, 4th, 8th, ...
/// of its counter, so a guest sending bad frames in a loop cannot flood the log.
fn worth_logging(m: &NetMetrics, e: &NetError, tx: bool) -> bool {
    let counter = match e {
        NetError::BadChain(_) | NetError::Chain(_) | NetError::Guest(_) => &m.invalid_requests,
        _ if tx => &m.tx_errors,
        NetError::Io(_) => &m.rx_errors,
        _ => &m.rx_dropped,
    };
    counter.get().is_power_of_two()
}

#[cfg(test)]
#[path = "net_backend_tests.rs"]
mod tests;
