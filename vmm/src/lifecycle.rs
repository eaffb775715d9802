//! The VM's lifecycle: InstanceStart (a boot, or a snapshot's state), the vCPU threads,
//! pause and resume, and the teardown.

use std::os::fd::AsRawFd;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_clock_data;
use vmm_sys_util::epoll::ControlOperation;
use vmm_sys_util::signal::Killable;

use crate::builder::{build, BuiltVm, Origin};
use crate::config::{ConsoleConfig, VmConfig};
use crate::vcpu::{install_kick_handler, kick_signal};
use crate::vmm::{
    ctl, Lifecycle, RunningVm, Vmm, VmmError, PAUSE_TIMEOUT, TOKEN_CONSOLE, TOKEN_EXIT,
    TOKEN_PROCESS, TOKEN_RING_ERR, TOKEN_STDIN,
};

impl Vmm {
    /// Builds and starts the VM (InstanceStart). On failure nothing is left running and
    /// the VMM stays Not started.
    pub fn start(&mut self) -> Result<(), VmmError> {
        if self.lifecycle != Lifecycle::NotStarted {
            return Err(VmmError::State(format!(
                "the VM is already started (state: {})",
                self.lifecycle.as_str()
            )));
        }
        if self.spec.boot_source.kernel_image_path.is_empty() {
            return Err(VmmError::State(
                "no kernel configured: PUT /boot-source before InstanceStart".into(),
            ));
        }
        let cfg = self.vm_config();
        let built = self.build_vm(&cfg, Origin::Boot)?;
        // Before the vCPUs run: tools/launchbench reads it from a VMM it ends at their first
        // KVM_RUN.
        log::info!("VM built in {}", built.steps);
        self.run_built(built, None)?;
        log::info!("VM started: {} vCPU(s), {} MiB", cfg.vcpus, cfg.mem_mib);
        Ok(())
    }

    /// Builds the VM `cfg` describes; on failure the device processes started are stopped.
    pub(crate) fn build_vm(&self, cfg: &VmConfig, origin: Origin<'_>) -> Result<BuiltVm, VmmError> {
        let mut processes = Vec::new();
        build(cfg, &self.opts, &mut processes, origin).map_err(|e| {
            for p in processes {
                p.stop(Duration::from_millis(500));
            }
            e.into()
        })
    }

    /// Starts the vCPU threads of `built` and makes it the VMM's VM. With `paused` (the
    /// clock a restored VM resumes with) the vCPUs park before they first run and the VM is
    /// Paused; otherwise it is Running. On failure nothing is left running.
    pub(crate) fn run_built(
        &mut self,
        built: BuiltVm,
        paused: Option<kvm_clock_data>,
    ) -> Result<(), VmmError> {
        let n = built.vcpus.len();
        let mut vm = RunningVm {
            built,
            handles: Vec::new(),
            started: Instant::now(),
            paused_since: paused.map(|_| Instant::now()),
            paused_total: Duration::ZERO,
            clock: paused,
        };
        if paused.is_some() {
            vm.built.gate.request_pause();
        }
        let launched = self.launch(&mut vm).and_then(|()| {
            let parked = paused.is_none() || vm.built.gate.wait_parked(n, PAUSE_TIMEOUT, || {});
            if parked {
                Ok(())
            } else {
                Err(VmmError::State(
                    "the restored vCPUs did not park before their first run".into(),
                ))
            }
        });
        if let Err(e) = launched {
            self.stop_console_input();
            self.stdin.pending.clear();
            teardown(vm);
            return Err(e);
        }
        if self.console == ConsoleConfig::Stdio {
            self.raw_terminal = crate::terminal::RawTerminal::enter();
        }
        self.vm = Some(vm);
        self.lifecycle = if paused.is_some() {
            Lifecycle::Paused
        } else {
            Lifecycle::Running
        };
        Ok(())
    }

    /// Registers the VM's fds with the event loop and starts the vCPU threads.
    fn launch(&mut self, vm: &mut RunningVm) -> Result<(), VmmError> {
        let b = &mut vm.built;
        ctl(
            &self.epoll,
            ControlOperation::Add,
            b.exit.evt.as_raw_fd(),
            TOKEN_EXIT,
        )?;
        ctl(
            &self.epoll,
            ControlOperation::Add,
            b.console_flush.as_raw_fd(),
            TOKEN_CONSOLE,
        )?;
        for (i, d) in b.devices.iter().enumerate() {
            if let Some(p) = &d.process {
                ctl(
                    &self.epoll,
                    ControlOperation::Add,
                    p.pidfd.as_raw_fd(),
                    TOKEN_PROCESS + i as u64,
                )?;
            }
        }
        for (i, t) in b.bus.virtio.iter().enumerate() {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(dev) = t.device_mut().as_vhost_user() {
                ctl(
                    &self.epoll,
                    ControlOperation::Add,
                    dev.err_fd().as_raw_fd(),
                    TOKEN_RING_ERR + i as u64,
                )?;
            }
        }
        if self.console == ConsoleConfig::Stdio {
            // stdin that is a regular file or /dev/null cannot be watched: no console input.
            self.stdin.open = ctl(
                &self.epoll,
                ControlOperation::Add,
                libc::STDIN_FILENO,
                TOKEN_STDIN,
            )
            .is_ok();
            self.stdin.watched = self.stdin.open;
        }
        install_kick_handler().map_err(|e| {
            VmmError::EventLoop(
                "the vCPU kick signal",
                std::io::Error::from_raw_os_error(e.errno()),
            )
        })?;
        // Each vCPU thread installs its filter before its first KVM_RUN and reports back;
        // one that cannot never runs the guest.
        let (installed_tx, installed) = std::sync::mpsc::channel();
        let count = b.vcpus.len();
        for vcpu in b.vcpus.drain(..) {
            let filters = self.opts.filters.clone();
            let installed_tx = installed_tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{}", vcpu.index))
                .spawn(move || {
                    let r = filters.install("vcpu");
                    let ok = r.is_ok();
                    let _ = installed_tx.send(r);
                    if ok {
                        vcpu.run()
                    }
                })
                .map_err(|e| VmmError::EventLoop("a vCPU thread", e))?;
            vm.handles.push(h);
        }
        for _ in 0..count {
            match installed.recv() {
                Ok(r) => r?,
                Err(_) => {
                    return Err(VmmError::State(
                        "a vCPU thread ended before installing its seccomp filter".into(),
                    ))
                }
            }
        }
        // The event loop's own filter, now that the VM is built: the reaper threads and the
        // device processes it starts from now on keep it. Under skiff-jailer the launcher
        // starts the device processes: no fork or exec at all.
        let kind = if self.opts.device_bins.launched() {
            "vmm_launched"
        } else {
            "vmm"
        };
        self.opts.filters.install(kind)?;
        let _ = crate::replace::REAPER_FILTERS.set(self.opts.filters.clone());
        Ok(())
    }

    /// Stops the vCPUs and the guest clock.
    pub fn pause(&mut self) -> Result<(), VmmError> {
        let vm = match (self.lifecycle, self.vm.as_mut()) {
            (Lifecycle::Paused, _) => return Ok(()),
            (Lifecycle::Running, Some(vm)) => vm,
            (state, _) => {
                return Err(VmmError::State(format!(
                    "the VM cannot be paused in state {}",
                    state.as_str()
                )))
            }
        };
        let gate = vm.built.gate.clone();
        gate.request_pause();
        let handles = &vm.handles;
        // A vCPU thread that has ended (it panicked) can never park.
        let live = handles.iter().filter(|h| !h.is_finished()).count();
        let parked = gate.wait_parked(live, PAUSE_TIMEOUT, || {
            for h in handles.iter().filter(|h| !h.is_finished()) {
                let _ = h.kill(kick_signal());
            }
        });
        if !parked {
            gate.abort();
            return Err(VmmError::State(format!(
                "the vCPUs did not stop within {} s; the VM keeps running",
                PAUSE_TIMEOUT.as_secs()
            )));
        }
        match vm.built.vm.get_clock() {
            Ok(c) => vm.clock = Some(c),
            Err(e) => log::warn!("KVM_GET_CLOCK failed ({e}); the guest clock will jump"),
        }
        vm.paused_since = Some(Instant::now());
        self.lifecycle = Lifecycle::Paused;
        self.vm_metrics.pauses.fetch_add(1, Ordering::Relaxed);
        log::info!("VM paused");
        Ok(())
    }

    /// Runs the vCPUs again, with the guest clock where it stopped.
    pub fn resume(&mut self) -> Result<(), VmmError> {
        let vm = match (self.lifecycle, self.vm.as_mut()) {
            (Lifecycle::Running, _) => return Ok(()),
            (Lifecycle::Paused, Some(vm)) => vm,
            (state, _) => {
                return Err(VmmError::State(format!(
                    "the VM cannot be resumed in state {}",
                    state.as_str()
                )))
            }
        };
        if let Some(c) = vm.clock.take() {
            // flags 0: not KVM_CLOCK_REALTIME, which would add the time spent paused.
            let data = kvm_clock_data {
                clock: c.clock,
                ..Default::default()
            };
            if let Err(e) = vm.built.vm.set_clock(&data) {
                log::warn!("KVM_SET_CLOCK failed ({e}); the guest clock jumps by the pause");
            }
        }
        if let Some(since) = vm.paused_since.take() {
            vm.paused_total += since.elapsed();
        }
        vm.built.gate.resume();
        self.lifecycle = Lifecycle::Running;
        self.vm_metrics.resumes.fetch_add(1, Ordering::Relaxed);
        log::info!("VM resumed");
        Ok(())
    }
}

/// Stops the vCPU threads of `vm` and waits for them; returns what is left.
fn join_vcpus(vm: RunningVm) -> BuiltVm {
    let RunningVm { built, handles, .. } = vm;
    built.stop.store(true, Ordering::Release);
    // Parked vCPUs must wake to see the stop flag.
    built.gate.resume();
    // Kick every vCPU out of KVM_RUN until its thread has finished.
    loop {
        let running: Vec<&JoinHandle<()>> = handles.iter().filter(|h| !h.is_finished()).collect();
        if running.is_empty() {
            break;
        }
        for h in running {
            let _ = h.kill(kick_signal());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    for h in handles {
        if h.join().is_err() {
            log::error!("a vCPU thread panicked");
        }
    }
    built
}

/// Stops the vCPU threads of a VM another VMM process took over (a live upgrade) and
/// nothing else: the device processes, their connections and the guest RAM are the new
/// VMM's; this process's copies of the fds close as it exits.
pub(crate) fn stop_vcpus(vm: RunningVm) {
    let built = join_vcpus(vm);
    // Closing the vhost-user connections here sends nothing: the new VMM holds them too.
    drop(built);
}

/// Stops the vCPUs, writes out the console, ends the device processes, frees the VM.
pub(crate) fn teardown(vm: RunningVm) {
    let built = join_vcpus(vm);
    let BuiltVm {
        vm: vm_fd,
        bus,
        devices,
        ram,
        ..
    } = built;
    if let Err(e) = bus
        .serial
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .writer_mut()
        .drain()
    {
        log::warn!("console output: {e}");
    }
    // Closing the vhost-user connections tells the device processes to exit.
    drop(bus);
    for p in devices.into_iter().filter_map(|d| d.process) {
        p.stop(Duration::from_secs(2));
    }
    drop(vm_fd);
    drop(ram);
}
