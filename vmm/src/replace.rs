//! Replacing a device process while the guest runs: a live upgrade of skiff-blk or
//! skiff-net (`PUT /skiff/devices/{id}/upgrade`, `PUT /skiff/upgrade`), and the medium
//! change of `PATCH /drives/{id}`, which is an upgrade to a skiff-blk serving another
//! image followed by a config-change interrupt.
//!
//! The new process is started and taken through the vhost-user handshake (owner,
//! features, protocol features, config, then the acked features and memory table) while
//! the old one still serves; only then are the rings handed over
//! ([`VhostUserDevice::take_over`]). The guest's device is never reset. On any failure
//! before the switch the new process is stopped and the old one keeps serving; a failure
//! during the switch gives the rings back to the old one.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use api_server::models::UpgradeReport;
use api_server::request::ApiFault;

use crate::builder::{blk_args, negotiate, net_args, spawn_connected, BuildError};
use crate::device_process::DeviceProcess;
use crate::devices::virtio::transport::VirtioTransport;
use crate::devices::virtio::vhost_user::{DeviceKind, VhostUserDevice, VhostUserError};
use crate::error_chain;
use crate::report::kind_name;
use crate::vmm::Vmm;

fn bad(m: impl Into<String>) -> ApiFault {
    ApiFault::bad_request(m)
}

/// The reaper threads' filter, set when the event loop installs its own (the reapers it
/// starts keep that one and add theirs).
pub(crate) static REAPER_FILTERS: std::sync::OnceLock<sandbox::ThreadFilters> =
    std::sync::OnceLock::new();

/// Stops and reaps a device process without holding up the event loop.
fn stop_in_background(p: DeviceProcess) {
    let spawned = std::thread::Builder::new()
        .name("skiff-reap".into())
        .spawn(move || {
            if let Some(f) = REAPER_FILTERS.get() {
                if let Err(e) = f.install("reaper") {
                    // It still runs under the event loop's filter.
                    log::warn!("{}", error_chain(&e));
                }
            }
            p.stop(Duration::from_secs(2))
        });
    if let Err(e) = spawned {
        log::warn!("cannot start a thread to stop a device process: {e}");
    }
}

fn micros(d: Duration) -> u64 {
    d.as_micros() as u64
}

/// What the driver has negotiated, compared before and after preparing the new backend.
type DriverState = (u64, bool, u32, Option<usize>);

fn driver_state(t: &mut VirtioTransport) -> DriverState {
    let in_use = t.device_mut().as_vhost_user().map(|d| d.queues_in_use());
    (t.acked_features(), t.is_active(), t.status(), in_use)
}

/// A new device process, started and negotiated, not yet serving.
struct Replacement {
    id: String,
    kind: DeviceKind,
    transport: usize,
    process: DeviceProcess,
    /// Taken when it becomes the device's backend.
    next: Option<VhostUserDevice>,
    /// The image the new process serves (block).
    image: Option<Arc<std::fs::File>>,
    binary: PathBuf,
    backing: String,
    started: Instant,
    spawn_us: u64,
    negotiate_us: u64,
}

impl Vmm {
    /// Index of the device `id` among the running VM's devices.
    pub(crate) fn device_index(&self, id: &str) -> Result<usize, ApiFault> {
        let vm = self.vm.as_ref().ok_or_else(|| {
            bad(format!(
                "device upgrades need a started VM (the VM is {})",
                self.lifecycle.as_str()
            ))
        })?;
        vm.built
            .device_index(id)
            .ok_or_else(|| bad(format!("no device '{id}'")))
    }

    /// Starts a new process for device `slot_idx` (`binary`, default the current one;
    /// `image`, block only, default the current image) and negotiates with it, while the
    /// current process (if alive) keeps serving. On failure the new process is stopped.
    fn start_replacement(
        &mut self,
        slot_idx: usize,
        binary: Option<PathBuf>,
        image: Option<&str>,
    ) -> Result<Replacement, ApiFault> {
        let t0 = Instant::now();
        let Some(vm) = self.vm.as_mut() else {
            return Err(bad("the VM is not running"));
        };
        let b = &mut vm.built;
        let slot = &b.devices[slot_idx];
        let id = slot.id.clone();
        let (Some(current), Some(current_binary)) = (&slot.process, slot.binary.clone()) else {
            return Err(bad(format!(
                "device '{id}' is served by an external vhost-user backend ({}); skiff \
                 cannot replace it",
                slot.socket
                    .as_ref()
                    .map_or_else(|| slot.backing.clone(), |s| s.display().to_string())
            )));
        };
        // Whatever a client names, only a checked file of the operator's directory runs.
        let exe = self
            .opts
            .device_bins
            .resolve(&binary.unwrap_or(current_binary))
            .map_err(|e| {
                bad(format!(
                    "{}; device '{id}' keeps its current process",
                    error_chain(&e)
                ))
            })?;
        let binary = exe.path().to_path_buf();
        let name = current.name.clone();
        let backing = image.map(str::to_string).unwrap_or(slot.backing.clone());
        // A new image is opened and locked here; otherwise the drive's own open image is
        // handed over.
        let same_file = |path: &str| -> bool {
            use std::os::unix::fs::MetadataExt;
            let (Ok(new), Some(Ok(cur))) = (
                std::fs::metadata(path),
                slot.image.as_ref().map(|f| f.metadata()),
            ) else {
                return false;
            };
            (new.dev(), new.ino()) == (cur.dev(), cur.ino())
        };
        let image_file = match (slot.kind, image) {
            // The same file again (it may have been resized on the host): its open,
            // locked description is handed over.
            (DeviceKind::Block, Some(path)) if same_file(path) => slot.image.clone(),
            (DeviceKind::Block, Some(path)) => Some(Arc::new(
                crate::image::open_locked(path.as_ref(), slot.read_only)
                    .map_err(|e| bad(error_chain(&e)))?,
            )),
            (DeviceKind::Block, None) => slot.image.clone(),
            (DeviceKind::Net, _) => None,
        };
        let args = match (slot.kind, &slot.tap, &slot.metrics, &image_file) {
            (DeviceKind::Block, _, Some(page), Some(file)) => blk_args(
                file,
                slot.read_only,
                slot.io_uring,
                page,
                &self.opts.seccomp,
            ),
            (DeviceKind::Net, Some(tap), Some(page), _) => {
                net_args(tap, slot.mac.as_deref(), page, &self.opts.seccomp)
            }
            _ => {
                return Err(ApiFault::internal(format!(
                    "device '{id}' lacks its image, TAP or metrics page to hand over"
                )))
            }
        };
        let mut fds: Vec<BorrowedFd<'_>> = Vec::new();
        if let Some(page) = &slot.metrics {
            fds.push(page.fd());
        }
        if let Some(tap) = &slot.tap {
            fds.push(tap.as_fd());
        }
        if let Some(file) = &image_file {
            fds.push(file.as_fd());
        }
        fds.extend(self.opts.seccomp.fd());
        // Connected over a socketpair: nothing to wait for before the first request.
        let (mut process, stream) =
            spawn_connected(name.clone(), &exe, &args, &fds).map_err(|e| {
                bad(format!(
                    "{}; device '{id}' keeps its current process",
                    error_chain(&e)
                ))
            })?;
        let spawn_us = micros(t0.elapsed());
        let t1 = Instant::now();
        let mem = b.ram.mem.clone();
        match negotiate(&mut process, slot.kind, stream, slot.max_queues, mem) {
            Ok(next) => Ok(Replacement {
                id,
                kind: slot.kind,
                transport: slot.transport,
                process,
                next: Some(next),
                image: image_file,
                binary,
                backing,
                started: t0,
                spawn_us,
                negotiate_us: micros(t1.elapsed()),
            }),
            Err(e) => {
                stop_in_background(process);
                let what = match e {
                    BuildError::Ended(..) => "did not come up",
                    _ => "cannot take over",
                };
                Err(bad(format!(
                    "the new {name} ({}) {what}: {}; the old process keeps serving",
                    binary.display(),
                    error_chain(&e)
                )))
            }
        }
    }

    /// Puts the replacement's process in the device's place and returns the old one.
    fn install(
        &mut self,
        slot_idx: usize,
        r: Replacement,
    ) -> (Option<DeviceProcess>, Option<PathBuf>) {
        let Some(vm) = self.vm.as_mut() else {
            return (Some(r.process), None);
        };
        let slot = &mut vm.built.devices[slot_idx];
        let old = slot.process.replace(r.process);
        let old_binary = slot.binary.replace(r.binary);
        if r.image.is_some() {
            slot.image = r.image;
        }
        slot.backing = r.backing;
        slot.restarts += 1;
        let old_pidfd = old.as_ref().map_or(-1, |p| p.pidfd.as_raw_fd());
        if let Err(e) = self.rewatch_process(slot_idx, old_pidfd) {
            log::error!(
                "device '{}': cannot watch the new device process: {}",
                r.id,
                error_chain(&e)
            );
        }
        (old, old_binary)
    }

    /// Replaces the process of device `slot_idx` with `binary` (default: the current
    /// one) serving `image` (block only; default: the current image). With
    /// `config_change`, the guest is told that the device's configuration changed.
    pub(crate) fn replace_device_process(
        &mut self,
        slot_idx: usize,
        binary: Option<PathBuf>,
        image: Option<&str>,
        config_change: bool,
    ) -> Result<UpgradeReport, ApiFault> {
        let mut r = self.start_replacement(slot_idx, binary, image)?;
        let Some(mut next) = r.next.take() else {
            stop_in_background(r.process);
            return Err(ApiFault::internal("no prepared backend"));
        };
        let Some(vm) = self.vm.as_mut() else {
            stop_in_background(r.process);
            return Err(bad("the VM is not running"));
        };
        let Some(old_pid) = vm.built.devices[slot_idx].process.as_ref().map(|p| p.pid()) else {
            stop_in_background(r.process);
            return Err(ApiFault::internal("the device has no process"));
        };
        let new_pid = r.process.pid();
        let id = r.id.clone();
        let transport = &vm.built.bus.virtio[r.transport];
        // What the driver negotiated, read under a short lock: vCPUs keep running while the
        // new backend is prepared.
        let (before, inflight) = {
            let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
            let inflight = t.device_mut().as_vhost_user().and_then(|d| d.inflight());
            (driver_state(&mut t), inflight)
        };
        let (acked, active, status, in_use) = before;
        let Some(in_use) = in_use else {
            stop_in_background(r.process);
            return Err(ApiFault::internal("not a vhost-user device"));
        };
        if status != 0 && !active {
            stop_in_background(r.process);
            return Err(bad(format!(
                "the guest driver is setting up device '{id}' (status {status:#x}); try again"
            )));
        }
        let failed = |process: DeviceProcess, binary: &std::path::Path, e: &VhostUserError| {
            stop_in_background(process);
            bad(format!(
                "the new process for '{id}' ({}) cannot take over: {}; the old process keeps serving",
                binary.display(),
                error_chain(e)
            ))
        };
        let prepare_us = match next.prepare_takeover(r.kind, acked, in_use, active, inflight) {
            Ok(us) => us,
            Err(e) => return Err(failed(r.process, &r.binary, &e)),
        };
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        if driver_state(&mut t) != before {
            drop(t);
            stop_in_background(r.process);
            return Err(bad(format!(
                "the guest driver reset or set up device '{id}' during the upgrade; try again"
            )));
        }
        let queues = t.queues().to_vec();
        let result = match t.device_mut().as_vhost_user() {
            Some(dev) => dev.take_over(next, &queues),
            None => Err(VhostUserError::Incompatible(
                "not a vhost-user device".into(),
            )),
        };
        let timings = match result {
            Ok(t) => t,
            Err(e) => {
                drop(t);
                return Err(failed(r.process, &r.binary, &e));
            }
        };
        if config_change && active {
            t.config_changed();
            if let Err(e) = t.signal_config() {
                log::warn!("device '{id}': cannot raise the config-change interrupt: {e}");
            }
        }
        drop(t);
        let (kind, spawn_us, negotiate_us, started) =
            (r.kind, r.spawn_us, r.negotiate_us, r.started);
        let new_binary = r.binary.display().to_string();
        let (old, old_binary) = self.install(slot_idx, r);
        // The old connection is closed; the old process exits on its own and is reaped off
        // the event loop.
        if let Some(old) = old {
            stop_in_background(old);
        }
        self.vm_metrics.switch_pause.record(timings.pause_us);
        let report = UpgradeReport {
            id: id.clone(),
            kind: kind_name(kind).into(),
            old_pid,
            new_pid,
            old_binary: old_binary
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            new_binary,
            pause_us: timings.pause_us,
            spawn_us,
            negotiate_us,
            prepare_us,
            total_us: micros(started.elapsed()),
            rings: timings.rings,
        };
        log::info!(
            "device '{id}': pid {old_pid} -> {new_pid} ({}), pause {} us over {} ring(s), total {} us",
            report.new_binary,
            report.pause_us,
            report.rings,
            report.total_us
        );
        Ok(report)
    }

    /// Brings device `slot_idx` back after its process died (`why`): a new process with
    /// the same binary takes the rings at the used index the dead one last published, so
    /// the requests it had taken but not completed are processed again, in order.
    pub(crate) fn recover_device(&mut self, slot_idx: usize, why: &str) -> Result<(), String> {
        let mut r = self
            .start_replacement(slot_idx, None, None)
            .map_err(|f| f.message)?;
        let id = r.id.clone();
        let Some(next) = r.next.take() else {
            stop_in_background(r.process);
            return Err("no prepared backend".into());
        };
        let Some(vm) = self.vm.as_mut() else {
            stop_in_background(r.process);
            return Err("the VM is not running".into());
        };
        let transport = &vm.built.bus.virtio[r.transport];
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        let (acked, active, _, _) = driver_state(&mut t);
        let queues = t.queues().to_vec();
        let result = match t.device_mut().as_vhost_user() {
            Some(dev) => dev.recover(next, acked, &queues, active),
            None => Err(VhostUserError::Incompatible(
                "not a vhost-user device".into(),
            )),
        };
        drop(t);
        let pause = match result {
            Ok(p) => p,
            Err(e) => {
                stop_in_background(r.process);
                return Err(error_chain(&e));
            }
        };
        let new_pid = r.process.pid();
        if let (Some(old), _) = self.install(slot_idx, r) {
            stop_in_background(old);
        }
        self.vm_metrics
            .crash_restarts
            .fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "device '{id}' restarted after its process died ({why}): new pid {new_pid}, rings resumed in {} us",
            pause
        );
        Ok(())
    }

    /// Serves drive `drive_id` from `path` from now on. On any failure the old image keeps
    /// being served and the reason is returned.
    pub(crate) fn change_media(&mut self, drive_id: &str, path: &str) -> Result<(), ApiFault> {
        // The whole configuration must stay valid with the new image (it exists, and no
        // writable image is shared by two drives).
        let mut candidate = self.vm_config();
        for d in &mut candidate.drives {
            if d.id == drive_id {
                d.backend = crate::config::DriveBackend::Image(PathBuf::from(path));
            }
        }
        candidate
            .validate_devices()
            .map_err(|e| bad(error_chain(&e)))?;
        let idx = self.device_index(drive_id)?;
        if let Some(vm) = &self.vm {
            if vm.built.devices[idx].kind != DeviceKind::Block {
                return Err(bad(format!("no drive '{drive_id}'")));
            }
        }
        self.replace_device_process(idx, None, Some(path), true)?;
        self.vm_metrics
            .media_changes
            .fetch_add(1, Ordering::Relaxed);
        Ok(())
    }
}
