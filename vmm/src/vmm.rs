//! The VMM: lifecycle (Not started → Running ⇄ Paused → Stopped) and the event loop on the
//! calling thread. The loop serves the control API (requests arrive over a channel and an
//! eventfd from the API thread), console input, SIGTERM/SIGINT, device-process deaths, the
//! periodic metrics flush and the guest's end; a clean teardown follows.

use std::collections::VecDeque;
use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;
use std::sync::mpsc::Receiver;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use api_server::metrics::ApiMetrics;
use api_server::models::{Logger, VmConfigFile};
use api_server::server::ApiCall;
use kvm_bindings::kvm_clock_data;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;
use vmm_sys_util::timerfd::TimerFd;

use crate::builder::{BuildError, BuildOptions, BuiltVm};
use crate::config::{ConsoleConfig, VmConfig};
use crate::exit::ExitReason;
use crate::lifecycle::teardown;
use crate::metrics::VmMetrics;

/// Errors running the VMM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    /// epoll, signalfd or thread creation failed.
    #[error("cannot set up the event loop: {0}")]
    EventLoop(&'static str, #[source] std::io::Error),
    /// The VM could not be built.
    #[error(transparent)]
    Build(#[from] BuildError),
    /// An operation is not allowed in the VM's current state.
    #[error("{0}")]
    State(String),
    /// KVM refused a VM-level operation.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// A thread's seccomp filter cannot be installed.
    #[error(transparent)]
    Seccomp(#[from] sandbox::SandboxError),
}

pub(crate) const TOKEN_EXIT: u64 = 0;
const TOKEN_SIGNAL: u64 = 1;
pub(crate) const TOKEN_STDIN: u64 = 2;
pub(crate) const TOKEN_CONSOLE: u64 = 3;
const TOKEN_API: u64 = 4;
const TOKEN_METRICS_TIMER: u64 = 5;
/// The VMM this one replaced passes on API requests and connections (see successor.rs).
pub(crate) const TOKEN_PREDECESSOR: u64 = 6;
/// `TOKEN_RING_ERR + i`: the ring-error eventfd of virtio transport `i` (fewer than 50).
pub(crate) const TOKEN_RING_ERR: u64 = 50;
pub(crate) const TOKEN_PROCESS: u64 = 100;

/// How long a pause may take to stop every vCPU.
pub(crate) const PAUSE_TIMEOUT: Duration = Duration::from_secs(2);
/// Firecracker flushes metrics every minute once a metrics file is set.
const METRICS_PERIOD: Duration = Duration::from_secs(60);

/// The VM's lifecycle as the API reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Lifecycle {
    /// Configuration phase: InstanceStart not yet received.
    NotStarted,
    /// vCPUs running.
    Running,
    /// vCPUs parked, guest clock stopped.
    Paused,
    /// The guest has ended; the VMM is tearing down.
    Stopped,
}

impl Lifecycle {
    /// Firecracker's spelling of the state.
    pub fn as_str(self) -> &'static str {
        match self {
            Lifecycle::NotStarted => "Not started",
            Lifecycle::Running => "Running",
            Lifecycle::Paused => "Paused",
            Lifecycle::Stopped => "Stopped",
        }
    }
}

/// The API thread's side of the link: requests and the eventfd that announces them.
pub struct ApiLink {
    /// Requests from the API thread.
    pub rx: Receiver<ApiCall>,
    /// Written by the API thread after each request.
    pub wake: EventFd,
    /// Request counters kept by the API thread.
    pub metrics: Arc<ApiMetrics>,
    /// Holds new API connections back while a new VMM takes the VM over.
    pub gate: api_server::server::AcceptGate,
}

/// A started VM.
pub(crate) struct RunningVm {
    pub(crate) built: BuiltVm,
    pub(crate) handles: Vec<JoinHandle<()>>,
    pub(crate) started: Instant,
    pub(crate) paused_since: Option<Instant>,
    pub(crate) paused_total: Duration,
    pub(crate) clock: Option<kvm_clock_data>,
}

/// Where console input stands.
pub(crate) struct Stdin {
    pub(crate) open: bool,
    pub(crate) watched: bool,
    pub(crate) pending: VecDeque<u8>,
}

/// Where metrics lines go.
pub(crate) struct MetricsOut {
    pub(crate) path: String,
    pub(crate) file: File,
}

/// One microVM monitor.
pub struct Vmm {
    pub(crate) id: String,
    /// The configuration collected before InstanceStart (Firecracker's objects).
    pub(crate) spec: VmConfigFile,
    /// Arguments appended to the kernel command line (`skiff run --cmdline`).
    pub(crate) extra_args: Option<String>,
    pub(crate) console: ConsoleConfig,
    pub(crate) opts: BuildOptions,
    pub(crate) signals: OwnedFd,
    pub(crate) epoll: Epoll,
    pub(crate) api: Option<ApiLink>,
    pub(crate) vm: Option<RunningVm>,
    pub(crate) lifecycle: Lifecycle,
    pub(crate) vm_metrics: Arc<VmMetrics>,
    pub(crate) metrics_out: Option<MetricsOut>,
    metrics_timer: Option<TimerFd>,
    pub(crate) logger: Option<Logger>,
    pub(crate) stdin: Stdin,
    /// A reason the VMM must end for (a signal before the VM started, a live upgrade).
    pub(crate) pending_exit: Option<ExitReason>,
    /// A copy of the API's listening socket, for the VMM that replaces this one.
    pub(crate) api_listener: Option<OwnedFd>,
    /// Whether console input was read before a VMM upgrade stopped reading it (restored
    /// if the upgrade fails).
    pub(crate) stdin_open_before_upgrade: bool,
    /// The guest kernel's panic line, kept past teardown.
    panic_seen: Option<String>,
    /// The terminal in raw mode while the guest owns the console.
    pub(crate) raw_terminal: Option<crate::terminal::RawTerminal>,
    /// When each device's process was last restarted after dying.
    pub(crate) restart_log: std::collections::HashMap<usize, VecDeque<Instant>>,
    /// The VMM this one handed the VM over to (live upgrade), which answers what this
    /// one's API still gets.
    pub(crate) successor: Option<std::os::unix::net::UnixStream>,
    /// The VM was handed over (the link to the successor may have broken since): this
    /// VMM serves no request itself any more.
    pub(crate) handed_over: bool,
    /// The VMM this one took the VM over from, while it passes on what its API held.
    pub(crate) predecessor: Option<std::os::unix::net::UnixStream>,
}

/// Blocks SIGTERM, SIGINT and SIGHUP in this thread (and the threads it starts) and returns a
/// signalfd that reads them.
pub fn block_termination_signals() -> Result<OwnedFd, VmmError> {
    // SAFETY: sigset operations on a local, zero-initialised set.
    let fd = unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGHUP);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK)
    };
    if fd < 0 {
        return Err(VmmError::EventLoop(
            "signalfd",
            std::io::Error::last_os_error(),
        ));
    }
    // SAFETY: a fresh fd owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn read_signal(fd: &OwnedFd) -> Option<i32> {
    // SAFETY: signalfd_siginfo is plain data; read() fills at most its size.
    let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
    let size = std::mem::size_of::<libc::signalfd_siginfo>();
    // SAFETY: valid fd and buffer of `size` bytes.
    let n = unsafe {
        libc::read(
            fd.as_raw_fd(),
            (&mut info as *mut libc::signalfd_siginfo).cast(),
            size,
        )
    };
    (n as usize == size).then_some(info.ssi_signo as i32)
}

pub(crate) fn ctl(
    epoll: &Epoll,
    op: ControlOperation,
    fd: i32,
    token: u64,
) -> Result<(), VmmError> {
    epoll
        .ctl(op, fd, EpollEvent::new(EventSet::IN, token))
        .map_err(|e| VmmError::EventLoop("epoll_ctl", e))
}

/// What the VMM is created with.
pub struct VmmOptions {
    /// Instance id (Firecracker's `--id`).
    pub id: String,
    /// Console.
    pub console: ConsoleConfig,
    /// Device binaries.
    pub build: BuildOptions,
    /// SIGTERM/SIGINT.
    pub signals: OwnedFd,
    /// The control API, when enabled.
    pub api: Option<ApiLink>,
    /// A copy of the API's listening socket (handed to a VMM that replaces this one).
    pub api_listener: Option<OwnedFd>,
}

impl Vmm {
    /// A VMM in the Not started state.
    pub fn new(o: VmmOptions) -> Result<Self, VmmError> {
        let epoll = Epoll::new().map_err(|e| VmmError::EventLoop("epoll", e))?;
        ctl(
            &epoll,
            ControlOperation::Add,
            o.signals.as_raw_fd(),
            TOKEN_SIGNAL,
        )?;
        if let Some(api) = &o.api {
            ctl(
                &epoll,
                ControlOperation::Add,
                api.wake.as_raw_fd(),
                TOKEN_API,
            )?;
        }
        crate::logger::set_instance_id(&o.id);
        Ok(Vmm {
            id: o.id,
            spec: VmConfigFile::default(),
            extra_args: None,
            console: o.console,
            opts: o.build,
            signals: o.signals,
            epoll,
            api: o.api,
            vm: None,
            lifecycle: Lifecycle::NotStarted,
            vm_metrics: Arc::new(VmMetrics::default()),
            metrics_out: None,
            metrics_timer: None,
            logger: None,
            stdin: Stdin {
                open: false,
                watched: false,
                pending: VecDeque::new(),
            },
            pending_exit: None,
            api_listener: o.api_listener,
            stdin_open_before_upgrade: false,
            panic_seen: None,
            raw_terminal: None,
            restart_log: Default::default(),
            successor: None,
            handed_over: false,
            predecessor: None,
        })
    }

    /// Replaces the pre-boot configuration (a config file, or `skiff run` arguments).
    pub fn configure(&mut self, spec: VmConfigFile, extra_args: Option<String>) {
        self.spec = spec;
        self.extra_args = extra_args;
    }

    /// The VM description InstanceStart would boot.
    pub(crate) fn vm_config(&self) -> VmConfig {
        let mut cfg = VmConfig::from_model(&self.spec);
        cfg.console = self.console.clone();
        cfg.extra_args = self.extra_args.clone();
        cfg
    }

    /// The first guest kernel panic line seen on the console.
    pub fn panic_line(&self) -> Option<String> {
        match &self.vm {
            Some(vm) => vm.built.panic.lock().map(|p| p.clone()).unwrap_or(None),
            None => self.panic_seen.clone(),
        }
    }

    /// Applies a logger configuration (config file or `PUT /logger`).
    pub fn set_logger(&mut self, l: &Logger) -> Result<(), String> {
        crate::logger::configure(l).map_err(|e| crate::error_chain(&e))?;
        self.logger = Some(l.clone());
        Ok(())
    }

    /// Sets the metrics file (config file or `PUT /metrics`).
    pub fn set_metrics(&mut self, path: &str) -> Result<(), String> {
        self.set_metrics_file(path)
            .map_err(|e| format!("cannot open metrics_path {path}: {e}"))
    }

    /// Sets (or replaces) the metrics file and arms the periodic flush.
    pub(crate) fn set_metrics_file(&mut self, path: &str) -> Result<(), std::io::Error> {
        use std::os::unix::fs::OpenOptionsExt;
        let file = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open(path)?;
        if self.metrics_timer.is_none() {
            let mut t = TimerFd::new()?;
            t.reset(METRICS_PERIOD, Some(METRICS_PERIOD))?;
            ctl(
                &self.epoll,
                ControlOperation::Add,
                t.as_raw_fd(),
                TOKEN_METRICS_TIMER,
            )
            .map_err(|e| std::io::Error::other(e.to_string()))?;
            self.metrics_timer = Some(t);
        }
        self.metrics_out = Some(MetricsOut {
            path: path.to_string(),
            file,
        });
        Ok(())
    }

    /// Re-points the pidfd watch of device `idx`'s process (after it was replaced; `old`
    /// is the previous pidfd, or -1).
    pub(crate) fn rewatch_process(&mut self, idx: usize, old: i32) -> Result<(), VmmError> {
        if old >= 0 {
            let _ = ctl(
                &self.epoll,
                ControlOperation::Delete,
                old,
                TOKEN_PROCESS + idx as u64,
            );
        }
        let Some(vm) = &self.vm else {
            return Ok(());
        };
        if let Some(p) = vm.built.devices.get(idx).and_then(|d| d.process.as_ref()) {
            ctl(
                &self.epoll,
                ControlOperation::Add,
                p.pidfd.as_raw_fd(),
                TOKEN_PROCESS + idx as u64,
            )?;
        }
        Ok(())
    }

    /// Runs until the VM ends (or, before InstanceStart, until a signal) and tears down.
    pub fn run(&mut self) -> Result<ExitReason, VmmError> {
        let result = self.event_loop();
        if self.vm.is_some() {
            self.lifecycle = Lifecycle::Stopped;
            // A last metrics line, so the final counters are not lost.
            if self.metrics_out.is_some() {
                let _ = self.flush_metrics();
            }
        }
        self.panic_seen = self.panic_line();
        if let Some(vm) = self.vm.take() {
            match result {
                // Everything of the VM's now belongs to the new VMM: only the vCPU threads
                // stop here; the rest closes with the process.
                Ok(ExitReason::HandedOver(_)) => crate::lifecycle::stop_vcpus(vm),
                _ => teardown(vm),
            }
        }
        // What the API still holds goes to the VMM that took over.
        if matches!(result, Ok(ExitReason::HandedOver(_))) {
            self.leave();
        }
        self.raw_terminal = None;
        result
    }

    fn exit_reason(&self) -> Option<ExitReason> {
        if let Some(r) = &self.pending_exit {
            return Some(r.clone());
        }
        self.vm.as_ref().and_then(|vm| vm.built.exit.reason())
    }

    fn feed_console(&mut self) -> Result<(), VmmError> {
        let Some(vm) = &self.vm else {
            return Ok(());
        };
        if !self.stdin.pending.is_empty() {
            let mut serial = vm
                .built
                .bus
                .serial
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            let chunk: Vec<u8> = self
                .stdin
                .pending
                .iter()
                .take(serial.fifo_capacity())
                .copied()
                .collect();
            if !chunk.is_empty() {
                if let Ok(n) = serial.enqueue_raw_bytes(&chunk) {
                    self.stdin.pending.drain(..n);
                    vm.built
                        .serial_metrics
                        .bytes_in
                        .fetch_add(n as u64, Ordering::Relaxed);
                }
            }
        }
        if self.stdin.open && self.stdin.pending.is_empty() && !self.stdin.watched {
            ctl(
                &self.epoll,
                ControlOperation::Add,
                libc::STDIN_FILENO,
                TOKEN_STDIN,
            )?;
            self.stdin.watched = true;
        }
        Ok(())
    }

    fn event_loop(&mut self) -> Result<ExitReason, VmmError> {
        let mut events = vec![EpollEvent::default(); 16];
        loop {
            if let Some(reason) = self.exit_reason() {
                return Ok(reason);
            }
            self.feed_console()?;
            let timeout = if self.stdin.pending.is_empty() { -1 } else { 2 };
            let n = match self.epoll.wait(timeout, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(VmmError::EventLoop("epoll_wait", e)),
            };
            for ev in &events[..n] {
                // Once the VM is handed over (or ends), nothing more of it is served here:
                // a device process's death or a broken ring is the new VMM's to handle.
                if self.pending_exit.is_some() {
                    break;
                }
                self.dispatch(ev.data())?;
            }
        }
    }

    fn dispatch(&mut self, token: u64) -> Result<(), VmmError> {
        match token {
            TOKEN_EXIT => {
                if let Some(vm) = &self.vm {
                    let _ = vm.built.exit.evt.read();
                }
            }
            TOKEN_CONSOLE => {
                if let Some(vm) = &self.vm {
                    let _ = vm.built.console_flush.read();
                    let mut serial = vm
                        .built
                        .bus
                        .serial
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    if let Err(e) = serial.writer_mut().drain() {
                        log::warn!("console output: {e}");
                    }
                }
            }
            TOKEN_SIGNAL => {
                if let Some(sig) = read_signal(&self.signals) {
                    match &self.vm {
                        Some(vm) => vm.built.exit.report(ExitReason::Signal(sig)),
                        None => self.pending_exit = Some(ExitReason::Signal(sig)),
                    }
                }
            }
            TOKEN_STDIN => self.read_stdin()?,
            TOKEN_API => self.serve_api(),
            TOKEN_PREDECESSOR => self.serve_predecessor(),
            TOKEN_METRICS_TIMER => {
                if let Some(t) = &mut self.metrics_timer {
                    let _ = t.wait();
                }
                if let Err(e) = self.flush_metrics() {
                    log::warn!("periodic metrics flush: {e}");
                }
            }
            t if t >= TOKEN_PROCESS => self.device_process_died((t - TOKEN_PROCESS) as usize)?,
            t if t >= TOKEN_RING_ERR => self.ring_broken((t - TOKEN_RING_ERR) as usize),
            _ => {}
        }
        Ok(())
    }

    /// Stops reading console input (a VMM upgrade hands the rest to the new VMM); returns
    /// whether it was being read.
    pub(crate) fn stop_console_input(&mut self) -> bool {
        if self.stdin.watched {
            let _ = ctl(
                &self.epoll,
                ControlOperation::Delete,
                libc::STDIN_FILENO,
                TOKEN_STDIN,
            );
            self.stdin.watched = false;
        }
        std::mem::replace(&mut self.stdin.open, false)
    }

    fn read_stdin(&mut self) -> Result<(), VmmError> {
        // An event of the same batch as the request that stopped reading (a VMM upgrade).
        if !self.stdin.watched {
            return Ok(());
        }
        let mut buf = [0u8; 256];
        // Straight from the fd: std's buffered stdin would keep bytes that epoll then never
        // reports again.
        // SAFETY: valid fd and buffer of buf.len() bytes.
        let n = unsafe { libc::read(libc::STDIN_FILENO, buf.as_mut_ptr().cast(), buf.len()) };
        // Stop watching stdin either way: at EOF or error for good, otherwise until the
        // UART has taken what was read.
        ctl(
            &self.epoll,
            ControlOperation::Delete,
            libc::STDIN_FILENO,
            TOKEN_STDIN,
        )?;
        self.stdin.watched = false;
        let err = std::io::Error::last_os_error();
        match usize::try_from(n) {
            Ok(n) if n > 0 => self.stdin.pending.extend(&buf[..n]),
            // Spurious wake-up: watch again (feed_console re-adds it).
            Err(_) if matches!(err.raw_os_error(), Some(libc::EAGAIN | libc::EINTR)) => {}
            _ => self.stdin.open = false,
        }
        Ok(())
    }

    fn serve_api(&mut self) {
        let Some(api) = &self.api else {
            return;
        };
        let _ = api.wake.read();
        let calls: Vec<ApiCall> = api.rx.try_iter().collect();
        for call in calls {
            // Once the VM is handed over (a call before this one upgraded the VMM), the
            // rest are answered by the VMM that took over, never here.
            if self.handed_over {
                self.forward(call);
                continue;
            }
            let result = self.handle(call.request);
            // The API thread may have given up on a client that went away.
            let _ = call.reply.send(result);
        }
    }

    /// Holds new API connections back in the socket's backlog (`hold`), or takes them
    /// again.
    pub(crate) fn hold_api_connections(&self, hold: bool) {
        let Some(api) = &self.api else { return };
        if !hold {
            api.gate.open();
        } else if !api.gate.hold() {
            log::warn!("the API thread did not stop taking connections in time");
        }
    }

    /// Request counters of the API thread.
    pub(crate) fn api_metrics(&self) -> Option<&ApiMetrics> {
        self.api.as_ref().map(|a| a.metrics.as_ref())
    }

    /// Writes one metrics line now.
    pub(crate) fn flush_metrics(&mut self) -> Result<(), String> {
        let snapshot = crate::report::Snapshot::take(self);
        let Some(out) = &mut self.metrics_out else {
            return Err("no metrics file is set: PUT /metrics first".into());
        };
        // One write: on a FIFO whose reader is slow a line is written whole or not at all
        // (lines up to PIPE_BUF), never half.
        let line = snapshot.json_line();
        match std::io::Write::write(&mut out.file, line.as_bytes()) {
            Ok(n) if n == line.len() => {}
            Ok(n) => {
                self.vm_metrics
                    .flushes_missed
                    .fetch_add(1, Ordering::Relaxed);
                return Err(format!(
                    "metrics line cut short at {n} of {} bytes on {}",
                    line.len(),
                    out.path
                ));
            }
            Err(e) => {
                self.vm_metrics
                    .flushes_missed
                    .fetch_add(1, Ordering::Relaxed);
                return Err(format!("cannot write metrics to {}: {e}", out.path));
            }
        }
        self.vm_metrics.flushes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
