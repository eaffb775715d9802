//! Crash recovery of device processes: a device process that dies (its pidfd becomes
//! readable) is restarted with bounded back-off and a restart limit, and its rings are
//! restored on the new process ([`Vmm::recover_device`] in `replace.rs`); when that fails,
//! or it died too often, the VM ends with the cause.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::epoll::ControlOperation;

use crate::exit::ExitReason;
use crate::vmm::{ctl, Vmm, VmmError, TOKEN_PROCESS};

/// Delays before the attempts to restart a device process that died (bounded back-off).
const RESTART_BACKOFF_MS: [u64; 4] = [0, 50, 250, 1000];
/// At most this many restarts of one device within [`RESTART_WINDOW`].
const RESTART_LIMIT: usize = 30;
/// See [`RESTART_LIMIT`].
const RESTART_WINDOW: Duration = Duration::from_secs(60);

impl Vmm {
    /// A backend signalled that the guest driver broke a ring of transport `i`: the device
    /// needs a reset, and the driver is told with a configuration-change interrupt.
    pub(crate) fn ring_broken(&mut self, i: usize) {
        let Some(vm) = &self.vm else { return };
        let Some(t) = vm.built.bus.virtio.get(i) else {
            return;
        };
        let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
        let name = vm
            .built
            .devices
            .iter()
            .find(|d| d.transport == i)
            .map_or_else(
                || format!("virtio transport {i}"),
                |d| format!("device '{}'", d.id),
            );
        let newly = t.ring_broken();
        let Some(dev) = t.device_mut().as_vhost_user() else {
            return;
        };
        let _ = dev.err_fd().read();
        if newly {
            log::warn!(
                "{name}: the backend stopped a ring the guest driver broke; the device needs \
                 a reset (DEVICE_NEEDS_RESET)"
            );
            if let Err(e) = t.signal_config() {
                log::warn!("{name}: cannot raise the config-change interrupt: {e}");
            }
        }
    }

    /// The process of device `slot_idx` may have died (its pidfd is readable): restart it
    /// with back-off and reconnect its rings, or end the VM with the cause when that fails
    /// or it died too often.
    pub(crate) fn device_process_died(&mut self, slot_idx: usize) -> Result<(), VmmError> {
        let Some(vm) = &mut self.vm else {
            return Ok(());
        };
        let Some(d) = vm.built.devices.get_mut(slot_idx) else {
            return Ok(());
        };
        let Some(p) = d.process.as_mut() else {
            return Ok(());
        };
        // A pidfd is readable only once its process has exited; an event for a live
        // process is a stale one for a process that was replaced in the same batch.
        let Err(why) = p.check_alive() else {
            return Ok(());
        };
        ctl(
            &self.epoll,
            ControlOperation::Delete,
            p.pidfd.as_raw_fd(),
            TOKEN_PROCESS + slot_idx as u64,
        )?;
        let how = p.ended_how();
        d.crashes += 1;
        d.last_exit = how.clone();
        if how.as_deref() == Some("killed by seccomp (SIGSYS)") {
            log::error!(
                "{why}: it made a system call its seccomp filter forbids (its own line on \
                 stderr names the call and the thread); restarting it"
            );
        } else {
            log::warn!("{why}");
        }
        match self.restart_allowed(slot_idx) {
            Ok(()) => {
                for (attempt, backoff_ms) in RESTART_BACKOFF_MS.iter().enumerate() {
                    std::thread::sleep(Duration::from_millis(*backoff_ms));
                    match self.recover_device(slot_idx, &why) {
                        Ok(()) => return Ok(()),
                        Err(e) => log::warn!(
                            "restart attempt {} of {} failed: {e}",
                            attempt + 1,
                            RESTART_BACKOFF_MS.len()
                        ),
                    }
                }
            }
            Err(e) => log::error!("{e}"),
        }
        if let Some(vm) = &self.vm {
            vm.built.exit.report(ExitReason::DeviceFailure(why));
        }
        Ok(())
    }

    /// Whether device `slot_idx` may be restarted once more: at most
    /// [`RESTART_LIMIT`] restarts within [`RESTART_WINDOW`].
    fn restart_allowed(&mut self, slot_idx: usize) -> Result<(), String> {
        let now = Instant::now();
        let log = self.restart_log.entry(slot_idx).or_default();
        while log
            .front()
            .is_some_and(|t| now.duration_since(*t) > RESTART_WINDOW)
        {
            log.pop_front();
        }
        if log.len() >= RESTART_LIMIT {
            return Err(format!(
                "device process restarted {RESTART_LIMIT} times within {} s; giving up",
                RESTART_WINDOW.as_secs()
            ));
        }
        log.push_back(now);
        Ok(())
    }
}
