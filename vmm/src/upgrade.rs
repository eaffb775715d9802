//! The VMM's live upgrade (`PUT /skiff/vmm/upgrade`): a new skiff process takes the running
//! guest over from this one, with the same guest RAM, device processes and connections.
//!
//! skiff-jailer's supervisor starts the new process (`--handover-fd`) in a cell like this
//! one: this VMM has seccomp filters in force and could not start an unfiltered program,
//! and the supervisor is the process the operator watches, so it follows the new VMM. A
//! plain skiff, without the jailer, answers 400.
//!
//! Old side, in order: start the new VMM and wait for its hello; have it map the guest RAM
//! and create its KVM VM (the guest runs on meanwhile: that is most of the rebuild); pause
//! the vCPUs; detach the devices' interrupt eventfds from this KVM VM (an interrupt a
//! device raises from now on stays pending in its eventfd, and the new VM's irqfd delivers
//! it as soon as it is attached); save the state; send it with the fds ([`crate::handover`]);
//! wait for READY; tell the supervisor (commit); send GO; wait for RUNNING; answer; exit
//! without stopping anything. Until the commit, any failure kills the new process, attaches
//! the eventfds again and resumes the guest here: the VM keeps running on the old VMM.

use std::os::fd::{AsFd, AsRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_server::models::VmmUpgradeReport;
use api_server::request::ApiFault;
use sandbox::launch::LauncherClient;

use crate::error_chain;
use crate::exit::ExitReason;
use crate::handover::{self, DeviceHandover, Handover, HandoverError, Hello, FEATURE_PREPARE};
use crate::layout::VIRTIO_IRQ_BASE;
use crate::state::file::{MIN_VERSION, VERSION};
use crate::vmm::{Lifecycle, Vmm};

/// How long the new VMM may take to start and say hello.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to map the guest RAM and create its KVM VM (before the pause; the
/// API waits meanwhile).
const PREPARE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long it may take to rebuild the VM.
const RESTORE_TIMEOUT: Duration = Duration::from_secs(20);
/// How long it may take to run the vCPUs once told to.
const RUN_TIMEOUT: Duration = Duration::from_secs(10);

/// What a plain skiff answers.
const NEEDS_JAILER: &str = "a live upgrade of the VMM needs skiff-jailer: its supervisor \
    starts the new VMM in the cell and follows it (a VMM under seccomp filters cannot start \
    one itself); the VM runs on";

fn bad(m: impl Into<String>) -> ApiFault {
    ApiFault::bad_request(m)
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// The hello line: the state versions this binary reads, and that it prepares its KVM VM
/// before the pause.
pub fn hello() -> String {
    Hello {
        min: MIN_VERSION,
        max: VERSION,
        features: vec![FEATURE_PREPARE.to_string()],
    }
    .line()
}

/// The new VMM, until it takes over.
struct Candidate {
    launcher: Arc<LauncherClient>,
    pid: u32,
    pidfd: OwnedFd,
    binary: String,
}

impl Candidate {
    /// How it ended, once its pidfd says so (within a second) and the launcher has reaped
    /// it.
    fn status(&self) -> Option<i32> {
        if !crate::wait_readable(self.pidfd.as_raw_fd(), Duration::from_secs(1)) {
            return None;
        }
        for _ in 0..20 {
            if let Ok(Some(st)) = self.launcher.status(self.pid) {
                return Some(st);
            }
            std::thread::sleep(Duration::from_millis(25));
        }
        None
    }

    /// Why it failed, with how it ended if it did.
    fn ended(&self, e: &HandoverError) -> String {
        match self.status() {
            Some(st) => format!(
                "the new VMM (pid {}, {}) {} ({})",
                self.pid,
                self.binary,
                crate::device_process::how_it_ended(
                    std::os::unix::process::ExitStatusExt::from_raw(st)
                ),
                error_chain(e)
            ),
            _ => format!(
                "the new VMM (pid {}, {}): {}",
                self.pid,
                self.binary,
                error_chain(e)
            ),
        }
    }

    fn kill(&self) {
        if let Err(e) = self.launcher.kill(self.pid) {
            log::warn!("cannot stop the new VMM (pid {}): {e}", self.pid);
        }
    }
}

impl Vmm {
    /// Whether the VM's devices are on PCI.
    fn on_pci(&self) -> bool {
        self.vm
            .as_ref()
            .is_some_and(|vm| vm.built.bus.pci.is_some())
    }

    /// Detaches (`attach` false) or attaches again the devices' call eventfds from this
    /// KVM VM.
    fn device_irqfds(&self, attach: bool) -> Result<(), String> {
        let Some(vm) = &self.vm else {
            return Ok(());
        };
        for (i, t) in vm.built.bus.virtio.iter().enumerate() {
            let mut t = lock(t);
            let gsi = VIRTIO_IRQ_BASE + i as u32;
            if attach {
                t.attach_interrupts(&vm.built.vm, gsi)?;
            } else {
                t.detach_interrupts(&vm.built.vm, gsi)?;
            }
        }
        Ok(())
    }

    /// The hand-over and its fds (borrowed from the running VM).
    fn handover(&self, running: bool) -> Result<(Handover, Vec<RawFd>), String> {
        let state = self.save_state(&[])?;
        let Some(vm) = &self.vm else {
            return Err("no VM".into());
        };
        let b = &vm.built;
        let mut fds = vec![b.ram.memfd.as_raw_fd()];
        let mut devices = Vec::new();
        for slot in &b.devices {
            let mut t = lock(&b.bus.virtio[slot.transport]);
            let Some(dev) = t.device_mut().as_vhost_user() else {
                return Err(format!("device '{}' is not a vhost-user device", slot.id));
            };
            let frontend = dev.handover_state(slot.max_queues);
            fds.extend(dev.handover_fds().iter().map(|f| f.as_raw_fd()));
            drop(t);
            if let Some(m) = &slot.metrics {
                fds.push(m.fd().as_raw_fd());
            }
            if let Some(tap) = &slot.tap {
                fds.push(tap.as_fd().as_raw_fd());
            }
            if let Some(f) = &slot.image {
                fds.push(f.as_raw_fd());
            }
            let process = match &slot.process {
                Some(p) if p.launched() => {
                    fds.push(p.pidfd.as_raw_fd());
                    Some((p.pid(), p.name.clone()))
                }
                Some(p) => {
                    return Err(format!(
                        "{} is a child of this VMM, not of the launcher",
                        p.name
                    ))
                }
                None => None,
            };
            devices.push(DeviceHandover {
                id: slot.id.clone(),
                frontend,
                binary: slot.binary.clone(),
                socket: slot.socket.clone(),
                backing: slot.backing.clone(),
                read_only: slot.read_only,
                io_uring: slot.io_uring,
                restarts: slot.restarts,
                crashes: slot.crashes,
                last_exit: slot.last_exit.clone(),
                mac: slot.mac.clone(),
                process,
                metrics: slot.metrics.is_some(),
                tap: slot.tap.is_some(),
                image: slot.image.is_some(),
            });
        }
        let api_listener = self.api_listener.as_ref().map(|l| l.as_raw_fd());
        fds.extend(api_listener);
        Ok((
            Handover {
                version: crate::state::file::version_for(state.pci),
                state,
                devices,
                running,
                logger: self.logger.clone(),
                metrics_path: self.metrics_out.as_ref().map(|m| m.path.clone()),
                api_listener: api_listener.is_some(),
                counters: self.vm_metrics.export(),
                console_pending: self.stdin.pending.iter().copied().collect(),
            },
            fds,
        ))
    }

    /// Step 2 of the hand-over: the new VMM maps the guest RAM and creates its KVM VM.
    fn prepare_candidate(&self, ours: &UnixStream, c: &Candidate) -> Result<(), String> {
        let Some(vm) = &self.vm else {
            return Err("no VM".into());
        };
        let memfd = &vm.built.ram.memfd;
        let bytes = memfd
            .metadata()
            .map_err(|e| format!("the guest RAM memfd: {e}"))?
            .len();
        let answer = handover::send_prepare(ours, bytes, memfd.as_raw_fd())
            .and_then(|()| handover::read_line(ours, PREPARE_TIMEOUT));
        match answer {
            Ok(l) if l == "PREPARED" => Ok(()),
            Ok(l) => Err(match l.strip_prefix("ERROR ") {
                Some(w) => format!("the new VMM ({}) cannot prepare a VM: {w}", c.binary),
                None => format!("the new VMM ({}) said {l:?}, not PREPARED", c.binary),
            }),
            Err(e) => Err(c.ended(&e)),
        }
    }

    /// Gives up a hand-over before the commit: the new VMM is stopped and the guest runs on
    /// here.
    fn roll_back(&mut self, c: &Candidate, running: bool, why: String) -> ApiFault {
        c.kill();
        self.hold_api_connections(false);
        self.stdin.open = self.stdin_open_before_upgrade;
        if let Err(e) = self.device_irqfds(true) {
            log::error!("after a failed VMM upgrade: {e}");
        }
        if running {
            if let Err(e) = self.resume() {
                log::error!("after a failed VMM upgrade: {}", error_chain(&e));
            }
        }
        self.vm_metrics
            .upgrades_failed
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        bad(format!("{why}; the VM runs on"))
    }

    /// `PUT /skiff/vmm/upgrade`.
    pub(crate) fn upgrade_vmm(
        &mut self,
        binary: Option<String>,
    ) -> Result<VmmUpgradeReport, ApiFault> {
        let t0 = Instant::now();
        let running = match self.lifecycle {
            Lifecycle::Running => true,
            Lifecycle::Paused => false,
            s => {
                return Err(bad(format!(
                    "a VMM upgrade needs a started VM (the VM is {})",
                    s.as_str()
                )))
            }
        };
        let launcher = self
            .opts
            .device_bins
            .launcher()
            .cloned()
            .ok_or_else(|| bad(NEEDS_JAILER))?;
        let name = match binary {
            Some(b) => b,
            None => std::env::current_exe()
                .ok()
                .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .ok_or_else(|| ApiFault::internal("cannot name the running binary"))?,
        };
        let exe = self
            .opts
            .device_bins
            .resolve(Path::new(&name))
            .map_err(|e| bad(format!("{}; the VM runs on", error_chain(&e))))?;
        let (ours, theirs) = UnixStream::pair()
            .map_err(|e| ApiFault::internal(format!("the hand-over socketpair: {e}")))?;
        let (pid, pidfd) = launcher
            .start_vmm(exe.relative(), theirs.as_fd())
            .map_err(|e| {
                bad(format!(
                    "cannot start the new VMM ({name}): {}; the VM runs on",
                    error_chain(&e)
                ))
            })?;
        drop(theirs);
        let c = Candidate {
            launcher,
            pid,
            pidfd,
            binary: exe.relative().display().to_string(),
        };
        let hello = match handover::read_line(&ours, HELLO_TIMEOUT) {
            Ok(h) => h,
            Err(e) => {
                let why = c.ended(&e);
                c.kill();
                return Err(bad(format!("{why}; the VM runs on")));
            }
        };
        let writes = crate::state::file::version_for(self.on_pci());
        let hello = match Hello::parse(&hello) {
            Some(h) if (h.min..=h.max).contains(&writes) => h,
            Some(h) => {
                c.kill();
                return Err(bad(format!(
                    "the new VMM ({}) reads state versions {} to {}; this one writes \
                     version {writes}; the VM runs on",
                    c.binary, h.min, h.max
                )));
            }
            None => {
                c.kill();
                return Err(bad(format!(
                    "the new VMM ({}) said {hello:?}, not a hand-over hello; the VM runs on",
                    c.binary
                )));
            }
        };
        let start_us = micros(t0.elapsed());
        // The new VMM builds its KVM VM over the guest RAM while the guest runs on here.
        let tprep = Instant::now();
        if hello.has(FEATURE_PREPARE) {
            if let Err(why) = self.prepare_candidate(&ours, &c) {
                c.kill();
                return Err(bad(format!("{why}; the VM runs on")));
            }
        }
        let prepare_us = micros(tprep.elapsed());

        // The pause. Console input stops being read here: what was read and not yet taken
        // by the UART goes to the new VMM, and what is typed from now on is its to read.
        // New API connections wait in the socket's backlog from here on: the new VMM,
        // which accepts on the same socket, serves them once it runs the guest (or this
        // one does after a roll back), never this one after it has handed the VM over.
        let tp = Instant::now();
        self.hold_api_connections(true);
        self.stdin_open_before_upgrade = self.stop_console_input();
        if running {
            if let Err(e) = self.pause() {
                c.kill();
                self.hold_api_connections(false);
                return Err(bad(format!("{}; the VM runs on", error_chain(&e))));
            }
        }
        // Output the guest wrote before the pause (a prompt without its newline) goes out
        // now, before anything the new VMM writes.
        if let Some(vm) = &self.vm {
            if let Err(e) = lock(&vm.built.bus.serial).writer_mut().drain() {
                log::warn!("console output: {e}");
            }
        }
        if let Err(why) = self.device_irqfds(false) {
            return Err(self.roll_back(&c, running, why));
        }
        let (h, fds) = match self.handover(running) {
            Ok(x) => x,
            Err(why) => return Err(self.roll_back(&c, running, why)),
        };
        let save_us = micros(tp.elapsed());
        let tr = Instant::now();
        let sent = handover::send(&ours, &h, &fds)
            .and_then(|()| handover::read_line(&ours, RESTORE_TIMEOUT));
        match sent {
            Ok(line) if line == "READY" => {}
            Ok(line) => {
                let why = match line.strip_prefix("ERROR ") {
                    Some(w) => format!("the new VMM ({}) cannot take over: {w}", c.binary),
                    None => format!("the new VMM ({}) said {line:?}", c.binary),
                };
                return Err(self.roll_back(&c, running, why));
            }
            Err(e) => {
                let why = c.ended(&e);
                return Err(self.roll_back(&c, running, why));
            }
        }
        let restore_us = micros(tr.elapsed());
        let tc = Instant::now();
        match c.launcher.commit_vmm(pid) {
            Ok(()) => {}
            // Refused: skiff-jailer still follows this VMM, which keeps the VM.
            Err(e @ sandbox::launch::LaunchError::Refused(_)) => {
                let why = format!(
                    "skiff-jailer did not follow the new VMM: {}",
                    error_chain(&e)
                );
                return Err(self.roll_back(&c, running, why));
            }
            // No answer: skiff-jailer may have followed the new VMM already. Resuming the
            // guest here could run it in two VMMs at once; going on cannot (if it did not
            // follow, the VM ends when this VMM exits).
            Err(e) => log::error!(
                "skiff-jailer's answer to the commit was lost ({}); handing the VM over anyway",
                error_chain(&e)
            ),
        }
        // From here on the new VMM has the VM, whatever happens to this one.
        let went = handover::send_line(&ours, &format!("GO {}", micros(tp.elapsed())))
            .and_then(|()| handover::read_line(&ours, RUN_TIMEOUT));
        let resume_us = micros(tc.elapsed());
        self.pending_exit = Some(ExitReason::HandedOver(pid));
        // API requests this VMM still gets, and its connections, go to the new one.
        self.handed_over = true;
        // A new VMM that stops reading cannot block this one for long.
        if let Err(e) = ours.set_write_timeout(Some(Duration::from_secs(5))) {
            log::warn!("the hand-over socket: {e}");
        }
        self.successor = Some(ours);
        // The new VMM measured the end of the pause (and records it in its histogram).
        let pause_us = match went.as_deref().map(|l| l.strip_prefix("RUNNING ")) {
            Ok(Some(us)) => us.parse().unwrap_or_else(|_| micros(tp.elapsed())),
            other => {
                log::error!(
                    "the new VMM (pid {pid}) took the VM over but did not say it runs: {other:?}"
                );
                micros(tp.elapsed())
            }
        };
        let report = VmmUpgradeReport {
            old_pid: std::process::id(),
            new_pid: pid,
            new_binary: c.binary.clone(),
            pause_us,
            start_us,
            prepare_us,
            save_us,
            restore_us,
            resume_us,
            total_us: micros(t0.elapsed()),
        };
        log::info!(
            "VMM upgraded: pid {} -> {pid} ({}), pause {pause_us} us (save {save_us}, restore \
             {restore_us}, resume {resume_us}), start {start_us} us, prepare {prepare_us} us",
            report.old_pid,
            report.new_binary
        );
        Ok(report)
    }

    /// The new VMM's side: rebuilds the VM `h` describes over `fds` (the API listener taken
    /// out already), says READY, waits for GO and runs it. An error is sent to the old VMM
    /// and returned; the caller then exits without touching anything of the VM's.
    pub fn take_over(
        &mut self,
        stream: &UnixStream,
        h: Handover,
        fds: Vec<OwnedFd>,
        prepared: crate::builder::Prepared,
    ) -> Result<(), String> {
        let r = self.rebuild(h, fds, prepared);
        let running = match r {
            Ok(running) => running,
            Err(why) => {
                let _ = handover::send_line(stream, &format!("ERROR {}", ours_line(&why)));
                return Err(why);
            }
        };
        handover::send_line(stream, "READY").map_err(|e| error_chain(&e))?;
        let before = match handover::read_line(stream, Duration::from_secs(60)) {
            Ok(l) => match l.strip_prefix("GO ").and_then(|us| us.parse::<u64>().ok()) {
                Some(us) => us,
                None => return Err(format!("the old VMM said {l:?}, not GO")),
            },
            // The old VMM committed and ended before it could say GO: it cannot resume the
            // guest any more (the supervisor kills this one if it did not commit).
            Err(HandoverError::Closed) => {
                log::warn!("the old VMM hung up after READY; running the guest");
                0
            }
            Err(e) => return Err(format!("the old VMM did not say GO: {}", error_chain(&e))),
        };
        let go = Instant::now();
        if running {
            self.resume().map_err(|e| error_chain(&e))?;
        }
        let pause_us = before + micros(go.elapsed());
        self.vm_metrics.vmm_upgrade_pause.record(pause_us);
        let _ = handover::send_line(stream, &format!("RUNNING {pause_us}"));
        // The old VMM passes on what its API still holds over the same socket.
        if let Err(e) = self.link_predecessor(stream) {
            log::warn!("API requests the old VMM still holds will not reach this one: {e}");
        }
        log::info!("took the VM over (live upgrade of the VMM)");
        Ok(())
    }

    fn rebuild(
        &mut self,
        h: Handover,
        fds: Vec<OwnedFd>,
        prepared: crate::builder::Prepared,
    ) -> Result<bool, String> {
        self.vm_metrics.import(&h.counters);
        self.stdin.pending.extend(&h.console_pending);
        if !(MIN_VERSION..=VERSION).contains(&h.version) {
            return Err(format!(
                "state version {} (this VMM reads {MIN_VERSION} to {VERSION})",
                h.version
            ));
        }
        if let Some(l) = &h.logger {
            self.set_logger(l)?;
        }
        if let Some(p) = &h.metrics_path {
            self.set_metrics(p)?;
        }
        let mut cfg = crate::config::VmConfig::from_model(&h.state.config);
        cfg.console = self.console.clone();
        cfg.extra_args = h.state.extra_args.clone();
        let (built, _) = crate::builder::adopt(&cfg, &self.opts, &h, fds, prepared)
            .map_err(|e| error_chain(&e))?;
        let t = Instant::now();
        self.run_built(built, Some(h.state.kvm.clock))
            .map_err(|e| error_chain(&e))?;
        log::info!(
            "vCPU threads started and parked in {} us",
            micros(t.elapsed())
        );
        self.spec = h.state.config;
        self.extra_args = h.state.extra_args;
        Ok(h.running)
    }
}

/// An error as one line.
fn ours_line(why: &str) -> String {
    why.replace('\n', " ")
}
