//! `PATCH /drives/{id}` with a new `path_on_host` on a running VM: the drive's medium is
//! changed by replacing its skiff-blk with one serving the new image, through the same
//! ring hand-over as a device-process upgrade, and the guest is told that the device's
//! configuration (its capacity) changed. The guest's driver is never reset.

use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::time::Duration;

use api_server::request::ApiFault;

use crate::builder::blk_args;
use crate::device_process::{find_binary, DeviceProcess};
use crate::devices::virtio::vhost_user::{connect_with_retry, DeviceKind, VhostUserDevice};
use crate::error_chain;
use crate::vmm::Vmm;

/// How long a replacement backend may take to answer one vhost-user request.
const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

fn bad(m: impl Into<String>) -> ApiFault {
    ApiFault::bad_request(m)
}

/// Stops and reaps a device process without holding up the event loop.
fn stop_in_background(p: DeviceProcess) {
    let spawned = std::thread::Builder::new()
        .name("skiff-reap".into())
        .spawn(move || p.stop(Duration::from_secs(2)));
    if let Err(e) = spawned {
        log::warn!("cannot start a thread to stop a device process: {e}");
    }
}

impl Vmm {
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
        let vcpus = self.spec.machine_config.vcpu_count.max(1) as usize;
        let bin_dir = self.opts.device_bin_dir.clone();
        let Some(vm) = self.vm.as_mut() else {
            return Err(bad("the VM is not running"));
        };
        let b = &mut vm.built;
        let Some(slot_idx) = b
            .devices
            .iter()
            .position(|d| d.id == drive_id && d.kind == DeviceKind::Block)
        else {
            return Err(bad(format!("no drive '{drive_id}'")));
        };
        let slot = &b.devices[slot_idx];
        let Some(proc_idx) = slot.process else {
            return Err(bad(format!(
                "drive '{drive_id}' is served by an external vhost-user backend ({}); \
                 change its medium there",
                slot.socket.display()
            )));
        };
        let generation = slot.restarts + 1;
        let socket = b
            .runtime_dir
            .join(format!("blk{}.{generation}.sock", slot.transport));
        let binary = slot
            .binary
            .clone()
            .unwrap_or_else(|| find_binary("skiff-blk", bin_dir.as_deref()));
        let name = format!("skiff-blk for drive '{drive_id}'");
        let args = blk_args(&socket, path.as_ref(), slot.read_only);
        let spawned = match &slot.metrics {
            Some(page) => DeviceProcess::spawn_with_metrics(
                name.clone(),
                &binary,
                &args,
                socket.clone(),
                page,
            ),
            None => DeviceProcess::spawn(name.clone(), &binary, &args, socket.clone()),
        };
        let mut process = spawned.map_err(|e| bad(error_chain(&e)))?;
        let prepared =
            connect_with_retry(&socket, Duration::from_secs(10), || process.check_alive())
                .and_then(|stream| {
                    // A backend that stops answering must not hang the event loop.
                    let _ = stream.set_read_timeout(Some(BACKEND_TIMEOUT));
                    let _ = stream.set_write_timeout(Some(BACKEND_TIMEOUT));
                    VhostUserDevice::new(DeviceKind::Block, stream, vcpus, b.ram.mem.clone())
                });
        let mut next = match prepared {
            Ok(n) => n,
            Err(e) => {
                stop_in_background(process);
                return Err(bad(format!(
                    "the new {name} for {path} did not come up: {}; the old image is still served",
                    error_chain(&e)
                )));
            }
        };
        let transport = &b.bus.virtio[slot.transport];
        // What the driver negotiated, read under a short lock; vCPUs keep running while the
        // new backend is prepared.
        let snapshot = |t: &mut crate::devices::virtio::mmio::MmioTransport| {
            let in_use = t.device_mut().as_vhost_user().map(|d| d.queues_in_use());
            (t.acked_features(), t.is_active(), t.status(), in_use)
        };
        let before = snapshot(&mut transport.lock().unwrap_or_else(|p| p.into_inner()));
        let (acked, active, status, in_use) = before;
        let Some(in_use) = in_use else {
            stop_in_background(process);
            return Err(ApiFault::internal("the drive is not a vhost-user device"));
        };
        if status != 0 && !active {
            stop_in_background(process);
            return Err(bad(format!(
                "the guest driver is setting up drive '{drive_id}' (status {status:#x}); try again"
            )));
        }
        let prepare_us = match next.prepare_takeover(DeviceKind::Block, acked, in_use, active) {
            Ok(us) => us,
            Err(e) => {
                stop_in_background(process);
                return Err(bad(format!(
                    "cannot switch drive '{drive_id}' to {path}: {}; the old image is still served",
                    error_chain(&e)
                )));
            }
        };
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        if snapshot(&mut t) != before {
            drop(t);
            stop_in_background(process);
            return Err(bad(format!(
                "the guest driver reset or set up drive '{drive_id}' during the switch; try again"
            )));
        }
        let queues = t.queues().to_vec();
        let result = match t.device_mut().as_vhost_user() {
            Some(dev) => dev.take_over(next, &queues),
            None => Err(
                crate::devices::virtio::vhost_user::VhostUserError::Incompatible(
                    "not a vhost-user device".into(),
                ),
            ),
        };
        let mut timings = match result {
            Ok(t) => t,
            Err(e) => {
                drop(t);
                stop_in_background(process);
                return Err(bad(format!(
                    "cannot switch drive '{drive_id}' to {path}: {}; the old image is still served",
                    error_chain(&e)
                )));
            }
        };
        timings.prepare_us = prepare_us;
        if active {
            t.config_changed();
            if let Some(dev) = t.device_mut().as_vhost_user() {
                if let Err(e) = dev.call_fd().write(1) {
                    log::warn!("drive '{drive_id}': cannot raise the config-change interrupt: {e}");
                }
            }
        }
        drop(t);
        let old = std::mem::replace(&mut b.processes[proc_idx], process);
        let old_pidfd = old.pidfd.as_raw_fd();
        let old_socket = old.socket.clone();
        let slot = &mut b.devices[slot_idx];
        slot.socket = socket;
        slot.backing = path.to_string();
        slot.restarts += 1;
        if let Err(e) = self.rewatch_process(proc_idx, old_pidfd) {
            log::error!(
                "drive '{drive_id}': cannot watch the new device process: {}",
                error_chain(&e)
            );
        }
        // The old backend's connection is closed; it exits on its own and is reaped off
        // the event loop.
        stop_in_background(old);
        let _ = std::fs::remove_file(old_socket);
        self.vm_metrics
            .media_changes
            .fetch_add(1, Ordering::Relaxed);
        log::info!(
            "drive '{drive_id}' now serves {path} (pause {} us over {} ring(s), set-up {} us)",
            timings.pause_us,
            timings.rings,
            timings.prepare_us
        );
        Ok(())
    }
}
