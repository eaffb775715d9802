//! Snapshots, with Firecracker's API: `PUT /snapshot/create` writes a paused VM's state
//! ([`VmState`]) to a state file and its RAM to a memory file; `PUT /snapshot/load` makes a
//! new VM from the two in a skiff that has not started one.
//!
//! While a snapshot is taken the device processes' rings are stopped (GET_VRING_BASE, so
//! requests in progress complete and the used rings in guest memory are final, and nothing
//! writes guest memory during the copy) and started again at the same place afterwards,
//! whatever the outcome. A loaded VM gets new device processes, which take the rings where
//! the snapshot left them. A load that fails leaves skiff as it was: Not started, its
//! configuration unchanged, nothing running.

use std::path::Path;
use std::time::{Duration, Instant};

use api_server::models::{SnapshotCreateParams, SnapshotLoadParams};
use api_server::request::ApiFault;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use crate::builder::Origin;
use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialRegs;
use crate::devices::virtio::vhost_user::RingPosition;
use crate::error_chain;
use crate::state::{DeviceState, KvmVmState, VmState};
use crate::vmm::{Lifecycle, Vmm};

/// How long the parked vCPUs may take to save their state.
const SAVE_TIMEOUT: Duration = Duration::from_secs(5);

fn bad(m: impl Into<String>) -> ApiFault {
    ApiFault::bad_request(m)
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Vmm {
    /// Stops the rings of every running device; on failure the ones stopped run again.
    /// One entry per transport, in order.
    fn stop_all_rings(&mut self) -> Result<Vec<Vec<RingPosition>>, ApiFault> {
        let Some(vm) = &self.vm else {
            return Err(bad("no VM"));
        };
        let mut all: Vec<Vec<RingPosition>> = Vec::new();
        let mut failure = None;
        for (i, t) in vm.built.bus.virtio.iter().enumerate() {
            let mut t = lock(t);
            let active = t.is_active();
            let stopped = match t.device_mut().as_vhost_user() {
                Some(dev) if active => dev.stop_rings(),
                _ => Ok(Vec::new()),
            };
            match stopped {
                Ok(r) => all.push(r),
                Err(e) => {
                    failure = Some(format!(
                        "device '{}': cannot stop its rings: {}",
                        vm.built.devices.get(i).map_or("?", |d| d.id.as_str()),
                        error_chain(&e)
                    ));
                    break;
                }
            }
        }
        if let Some(why) = failure {
            self.resume_all_rings(&all);
            return Err(bad(why));
        }
        Ok(all)
    }

    /// Starts again the rings [`Vmm::stop_all_rings`] stopped.
    fn resume_all_rings(&mut self, rings: &[Vec<RingPosition>]) {
        let Some(vm) = &self.vm else {
            return;
        };
        for (t, rings) in vm.built.bus.virtio.iter().zip(rings) {
            if rings.is_empty() {
                continue;
            }
            let mut t = lock(t);
            let queues = t.queues().to_vec();
            if let Some(dev) = t.device_mut().as_vhost_user() {
                if let Err(e) = dev.resume_rings(&queues, rings) {
                    // The device process is likely gone: its death starts the crash recovery.
                    log::error!("cannot restart a device's rings after a snapshot: {e}");
                }
            }
        }
    }

    /// The paused VM's state; `rings` from [`Vmm::stop_all_rings`].
    pub(crate) fn save_state(&self, rings: &[Vec<RingPosition>]) -> Result<VmState, String> {
        let Some(vm) = &self.vm else {
            return Err("no VM".into());
        };
        let b = &vm.built;
        let n = u8::try_from(b.vcpu_metrics.len()).map_err(|_| "too many vCPUs")?;
        let vcpus = b.gate.save_all(n, SAVE_TIMEOUT)?;
        let clock = match vm.clock {
            Some(c) => c,
            None => {
                b.vm.get_clock()
                    .map_err(|e| format!("KVM refused to read the clock: {e}"))?
            }
        };
        let kvm = KvmVmState::save(&b.vm, clock).map_err(|e| error_chain(&e))?;
        let serial = SerialRegs::of(&lock(&b.bus.serial));
        let i8042: I8042State = lock(&b.bus.i8042).state();
        let mut devices = Vec::new();
        for slot in &b.devices {
            let mut t = lock(&b.bus.virtio[slot.transport]);
            let transport = t.state();
            let config = t
                .device_mut()
                .as_vhost_user()
                .map(|d| d.config_space().to_vec())
                .unwrap_or_default();
            devices.push(DeviceState {
                id: slot.id.clone(),
                kind: slot.kind,
                transport,
                rings: rings.get(slot.transport).cloned().unwrap_or_default(),
                config,
            });
        }
        let mut config = self.spec.clone();
        config.logger = None;
        config.metrics = None;
        Ok(VmState {
            config,
            extra_args: self.extra_args.clone(),
            mem_bytes: b.ram.mem.iter().map(|r| r.len()).sum(),
            vcpus,
            kvm,
            serial,
            i8042,
            devices,
            acpi: b.power_button.is_some(),
            pci: b.bus.pci.is_some(),
        })
    }

    /// `PUT /snapshot/create`.
    pub(crate) fn create_snapshot(&mut self, p: &SnapshotCreateParams) -> Result<(), ApiFault> {
        if self.lifecycle != Lifecycle::Paused {
            return Err(bad(format!(
                "a snapshot is taken of a paused VM: PATCH /vm {{\"state\": \"Paused\"}} first \
                 (the VM is {})",
                self.lifecycle.as_str()
            )));
        }
        for (what, path) in [
            ("snapshot_path", &p.snapshot_path),
            ("mem_file_path", &p.mem_file_path),
        ] {
            if path.is_empty() {
                return Err(bad(format!("{what} is empty")));
            }
        }
        if p.snapshot_path == p.mem_file_path {
            return Err(bad("snapshot_path and mem_file_path are the same file"));
        }
        let t = Instant::now();
        let rings = self.stop_all_rings()?;
        let result = self.write_snapshot(p, &rings);
        self.resume_all_rings(&rings);
        let (state_bytes, mem) = result.map_err(bad)?;
        log::info!(
            "snapshot written in {} ms: state {} ({state_bytes} bytes), memory {} ({} MiB of data copied in {} ms)",
            t.elapsed().as_millis(),
            p.snapshot_path,
            p.mem_file_path,
            mem.bytes >> 20,
            mem.us / 1000
        );
        Ok(())
    }

    fn write_snapshot(
        &self,
        p: &SnapshotCreateParams,
        rings: &[Vec<RingPosition>],
    ) -> Result<(usize, crate::state::memory::Copied), String> {
        let state = self.save_state(rings)?;
        let bytes = crate::state::file::encode(&state).map_err(|e| error_chain(&e))?;
        let path = Path::new(&p.snapshot_path);
        crate::state::file::write_bytes(path, &bytes).map_err(|e| error_chain(&e))?;
        let Some(vm) = &self.vm else {
            return Err("no VM".into());
        };
        let mem =
            crate::state::memory::save(&vm.built.ram, state.mem_bytes, Path::new(&p.mem_file_path))
                .map_err(|e| {
                    // A state file without its memory is no snapshot.
                    let _ = std::fs::remove_file(path);
                    error_chain(&e)
                })?;
        Ok((bytes.len(), mem))
    }

    /// `PUT /snapshot/load`.
    pub(crate) fn load_snapshot(&mut self, p: &SnapshotLoadParams) -> Result<(), ApiFault> {
        if self.lifecycle != Lifecycle::NotStarted {
            return Err(bad(format!(
                "a snapshot is loaded into a skiff that has not started a VM (the VM is {})",
                self.lifecycle.as_str()
            )));
        }
        if !self.spec.boot_source.kernel_image_path.is_empty()
            || !self.spec.drives.is_empty()
            || !self.spec.network_interfaces.is_empty()
        {
            return Err(bad(
                "a snapshot cannot be loaded after boot-source, drives or network interfaces \
                 were configured: the snapshot brings its own",
            ));
        }
        let mem_path = p.mem_file().map_err(|e| bad(e.to_string()))?;
        let t = Instant::now();
        let state = crate::state::file::read(Path::new(&p.snapshot_path))
            .map_err(|e| bad(format!("snapshot {}: {}", p.snapshot_path, error_chain(&e))))?;
        let mut spec = state.config.clone();
        if spec.machine_config.huge_pages_2m() {
            // The memory file is copied into the new guest RAM with file writes, which
            // hugetlbfs does not take; loading onto normal pages would change the VM.
            return Err(bad(format!(
                "snapshot {}: its VM ran on 2 MiB huge pages (machine-config huge_pages                  \"2M\"), and skiff loads snapshots onto normal pages only (as Firecracker                  without its Uffd backend)",
                p.snapshot_path
            )));
        }
        for o in &p.network_overrides {
            let Some(n) = spec
                .network_interfaces
                .iter_mut()
                .find(|n| n.iface_id == o.iface_id)
            else {
                return Err(bad(format!(
                    "network_overrides: the snapshot has no network interface '{}'",
                    o.iface_id
                )));
            };
            n.host_dev_name = o.host_dev_name.clone();
        }
        let mut cfg = crate::config::VmConfig::from_model(&spec);
        cfg.console = self.console.clone();
        cfg.extra_args = state.extra_args.clone();
        let (ram, copied) = crate::state::memory::load(Path::new(mem_path), state.mem_bytes)
            .map_err(|e| bad(error_chain(&e)))?;
        let built = self
            .build_vm(&cfg, Origin::Restore { state: &state, ram })
            .map_err(|e| bad(error_chain(&e)))?;
        self.run_built(built, Some(state.kvm.clock))
            .map_err(|e| bad(error_chain(&e)))?;
        self.spec = spec;
        self.extra_args = state.extra_args;
        log::info!(
            "snapshot {} loaded in {} ms ({} MiB of memory data copied in {} ms)",
            p.snapshot_path,
            t.elapsed().as_millis(),
            copied.bytes >> 20,
            copied.us / 1000
        );
        if p.resume_vm {
            self.resume().map_err(|e| bad(error_chain(&e)))?;
        }
        Ok(())
    }
}
