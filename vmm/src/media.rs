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

fn bad(m: impl Into<String>) -> ApiFault {
    ApiFault::bad_request(m)
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
                    VhostUserDevice::new(DeviceKind::Block, stream, vcpus, b.ram.mem.clone())
                });
        let next = match prepared {
            Ok(n) => n,
            Err(e) => {
                process.stop(Duration::from_millis(500));
                return Err(bad(format!(
                    "the new {name} for {path} did not come up: {}; the old image is still served",
                    error_chain(&e)
                )));
            }
        };
        let transport = &b.bus.virtio[slot.transport];
        let mut t = transport.lock().unwrap_or_else(|p| p.into_inner());
        let acked = t.acked_features();
        let queues = t.queues().to_vec();
        let active = t.is_active();
        let Some(dev) = t.device_mut().as_vhost_user() else {
            process.stop(Duration::from_millis(500));
            return Err(ApiFault::internal("the drive is not a vhost-user device"));
        };
        let timings = match dev.take_over(next, acked, &queues, active) {
            Ok(t) => t,
            Err(e) => {
                drop(t);
                process.stop(Duration::from_millis(500));
                return Err(bad(format!(
                    "cannot switch drive '{drive_id}' to {path}: {}; the old image is still served",
                    error_chain(&e)
                )));
            }
        };
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
        self.rewatch_process(proc_idx, old_pidfd)
            .map_err(|e| ApiFault::internal(error_chain(&e)))?;
        // The old backend's connection is closed; it exits on its own.
        old.stop(Duration::from_secs(2));
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
