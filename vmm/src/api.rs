//! The VMM's answers to API requests. Runs on the event-loop thread only. Configuration
//! requests are checked against the whole candidate configuration before they replace
//! it, so a bad request leaves the previous configuration intact; after InstanceStart
//! only what can change at runtime is accepted, as in Firecracker.

use api_server::models::{
    ActionType, Drive, InstanceInfo, NetworkInterface, PartialDrive, SkiffDevice, SkiffDevices,
    SkiffVmState, Version, VmConfigFile, VmStateChange,
};
use api_server::request::{ApiFault, ApiReply, ApiRequest, ApiResult};

use std::path::PathBuf;

use api_server::models::{UpgradeReport, UpgradeReports};

use crate::config::{ConfigError, VmConfig};
use crate::devices::virtio::vhost_user::DeviceKind;
use crate::error_chain;
use crate::report::{kind_name, Snapshot};
use crate::vmm::{Lifecycle, Vmm};

fn json<T: serde::Serialize>(v: &T) -> ApiResult {
    serde_json::to_value(v)
        .map(ApiReply::Json)
        .map_err(|e| ApiFault::internal(format!("cannot serialise the answer: {e}")))
}

fn bad(e: &dyn std::error::Error) -> ApiFault {
    ApiFault::bad_request(error_chain(e))
}

/// Which part of a candidate configuration to check.
enum Part {
    Machine,
    Boot,
    Devices,
}

fn max_vcpus() -> usize {
    kvm_ioctls::Kvm::new()
        .map(|k| k.get_max_vcpus())
        .unwrap_or(254)
}

fn check(spec: &VmConfigFile, part: Part) -> Result<(), ApiFault> {
    let cfg = VmConfig::from_model(spec);
    let r: Result<(), ConfigError> = match part {
        Part::Machine => cfg.validate_machine(max_vcpus(), crate::host::host_memory_bytes()),
        Part::Boot => cfg.validate_boot(),
        Part::Devices => cfg.validate_devices(),
    };
    r.map_err(|e| bad(&e))
}

impl Vmm {
    fn preboot(&self, what: &str) -> Result<(), ApiFault> {
        if self.lifecycle == Lifecycle::NotStarted {
            Ok(())
        } else {
            Err(ApiFault::bad_request(format!(
                "{what} cannot be changed after InstanceStart (the VM is {})",
                self.lifecycle.as_str()
            )))
        }
    }

    fn postboot(&self, what: &str) -> Result<(), ApiFault> {
        match self.lifecycle {
            Lifecycle::Running | Lifecycle::Paused => Ok(()),
            s => Err(ApiFault::bad_request(format!(
                "{what} is only allowed after InstanceStart (the VM is {})",
                s.as_str()
            ))),
        }
    }

    /// Tries `change` on a copy of the configuration, checks `part`, and keeps it.
    fn amend(
        &mut self,
        part: Part,
        change: impl FnOnce(&mut VmConfigFile),
    ) -> Result<ApiReply, ApiFault> {
        let mut candidate = self.spec.clone();
        change(&mut candidate);
        check(&candidate, part)?;
        self.spec = candidate;
        Ok(ApiReply::NoContent)
    }

    /// Answers one request.
    pub fn handle(&mut self, req: ApiRequest) -> ApiResult {
        match req {
            ApiRequest::GetInstanceInfo => json(&InstanceInfo {
                app_name: "skiff".into(),
                id: self.id.clone(),
                state: self.lifecycle.as_str().into(),
                vmm_version: env!("CARGO_PKG_VERSION").into(),
            }),
            ApiRequest::GetVersion => json(&Version {
                firecracker_version: env!("CARGO_PKG_VERSION").into(),
            }),
            ApiRequest::GetMachineConfig => json(&self.spec.machine_config),
            ApiRequest::PutMachineConfig(mc) => {
                self.preboot("machine-config")?;
                self.amend(Part::Machine, |s| s.machine_config = mc)
            }
            ApiRequest::PatchMachineConfig(update) => {
                self.preboot("machine-config")?;
                self.amend(Part::Machine, |s| {
                    s.machine_config = update.apply(&s.machine_config)
                })
            }
            ApiRequest::PutBootSource(b) => {
                self.preboot("boot-source")?;
                self.amend(Part::Boot, |s| s.boot_source = b)
            }
            ApiRequest::PutDrive(d) => {
                self.preboot("drives")?;
                self.amend(Part::Devices, |s| upsert_drive(&mut s.drives, d))
            }
            ApiRequest::PutNetworkInterface(n) => {
                self.preboot("network-interfaces")?;
                self.amend(Part::Devices, |s| upsert_net(&mut s.network_interfaces, n))
            }
            ApiRequest::PatchDrive(p) => self.patch_drive(p),
            ApiRequest::PatchNetworkInterface(p) => {
                self.postboot("PATCH /network-interfaces")?;
                if !self
                    .spec
                    .network_interfaces
                    .iter()
                    .any(|n| n.iface_id == p.iface_id)
                {
                    return Err(ApiFault::bad_request(format!(
                        "no network interface '{}'",
                        p.iface_id
                    )));
                }
                // Only rate limiters can change here, and the router refuses those as not
                // supported: nothing is left to change.
                Ok(ApiReply::NoContent)
            }
            ApiRequest::Action(a) => match a.action_type {
                ActionType::InstanceStart => match self.start() {
                    Ok(()) => Ok(ApiReply::NoContent),
                    Err(e) => Err(bad(&e)),
                },
                ActionType::SendCtrlAltDel => self.ctrl_alt_del(),
                ActionType::FlushMetrics => self
                    .flush_metrics()
                    .map(|_| ApiReply::NoContent)
                    .map_err(ApiFault::bad_request),
            },
            ApiRequest::PatchVm(v) => {
                let r = match v.state {
                    VmStateChange::Paused => self.pause(),
                    VmStateChange::Resumed => self.resume(),
                };
                r.map(|_| ApiReply::NoContent).map_err(|e| bad(&e))
            }
            ApiRequest::GetVmConfig => {
                let mut full = self.spec.clone();
                full.logger = self.logger.clone();
                full.metrics = self
                    .metrics_out
                    .as_ref()
                    .map(|m| api_server::models::Metrics {
                        metrics_path: m.path.clone(),
                    });
                json(&full)
            }
            ApiRequest::PutLogger(l) => {
                self.preboot("logger")?;
                self.set_logger(&l).map_err(ApiFault::bad_request)?;
                Ok(ApiReply::NoContent)
            }
            ApiRequest::PutMetrics(m) => {
                self.preboot("metrics")?;
                self.set_metrics(&m.metrics_path)
                    .map_err(ApiFault::bad_request)?;
                Ok(ApiReply::NoContent)
            }
            ApiRequest::GetSkiffVm => {
                let snap = Snapshot::take(self);
                json(&SkiffVmState {
                    state: self.lifecycle.as_str().into(),
                    uptime_ms: snap.uptime_ms,
                    paused_ms: snap.paused_ms,
                    vcpus: self.spec.machine_config.vcpu_count,
                    mem_size_mib: self.spec.machine_config.mem_size_mib,
                    pid: std::process::id(),
                })
            }
            ApiRequest::GetSkiffDevices => json(&self.device_states()),
            ApiRequest::UpgradeDevice(id, u) => {
                let idx = self.device_index(&id)?;
                let r = self.replace_device_process(idx, u.binary.map(PathBuf::from), None, false);
                self.count_upgrade(&r);
                json(&r?)
            }
            ApiRequest::UpgradeAll(u) => {
                let n = self.vm.as_ref().map_or(0, |vm| vm.built.devices.len());
                if self.vm.is_none() {
                    return Err(ApiFault::bad_request(format!(
                        "device upgrades need a started VM (the VM is {})",
                        self.lifecycle.as_str()
                    )));
                }
                let mut reports = Vec::new();
                for idx in 0..n {
                    let (kind, external) = match &self.vm {
                        Some(vm) => (
                            vm.built.devices[idx].kind,
                            vm.built.devices[idx].process.is_none(),
                        ),
                        None => break,
                    };
                    if external {
                        continue;
                    }
                    let binary = match kind {
                        DeviceKind::Block => u.blk_binary.clone(),
                        DeviceKind::Net => u.net_binary.clone(),
                    };
                    let r =
                        self.replace_device_process(idx, binary.map(PathBuf::from), None, false);
                    self.count_upgrade(&r);
                    match r {
                        Ok(rep) => reports.push(rep),
                        Err(f) => {
                            let done: Vec<&str> = reports.iter().map(|r| r.id.as_str()).collect();
                            return Err(ApiFault::bad_request(format!(
                                "{} (devices upgraded before this one: {})",
                                f.message,
                                if done.is_empty() {
                                    "none".into()
                                } else {
                                    done.join(", ")
                                }
                            )));
                        }
                    }
                }
                json(&UpgradeReports { devices: reports })
            }
            ApiRequest::UpgradeVmm(u) => json(&self.upgrade_vmm(u.binary)?),
            ApiRequest::PressPowerButton => self.power_button(),
            ApiRequest::CreateSnapshot(p) => {
                self.create_snapshot(&p)?;
                Ok(ApiReply::NoContent)
            }
            ApiRequest::LoadSnapshot(p) => {
                self.load_snapshot(&p)?;
                Ok(ApiReply::NoContent)
            }
            ApiRequest::GetSkiffMetrics => {
                Ok(ApiReply::Prometheus(Snapshot::take(self).prometheus()))
            }
        }
    }

    fn count_upgrade(&self, r: &Result<UpgradeReport, ApiFault>) {
        if r.is_err() {
            self.vm_metrics
                .upgrades_failed
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The built VM, for a request (`what`) that needs the guest running.
    fn running_vm(&self, what: &str) -> Result<&crate::builder::BuiltVm, ApiFault> {
        if self.lifecycle != Lifecycle::Running {
            return Err(ApiFault::bad_request(format!(
                "{what} needs a running VM (the VM is {})",
                self.lifecycle.as_str()
            )));
        }
        self.vm
            .as_ref()
            .map(|vm| &vm.built)
            .ok_or_else(|| ApiFault::internal("no VM"))
    }

    fn ctrl_alt_del(&mut self) -> ApiResult {
        self.running_vm("SendCtrlAltDel")?
            .bus
            .i8042
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .press_ctrl_alt_del()
            .map(|_| ApiReply::NoContent)
            .map_err(ApiFault::bad_request)
    }

    fn power_button(&mut self) -> ApiResult {
        let vm = self.running_vm("the power button")?;
        let Some(button) = &vm.power_button else {
            return Err(ApiFault::bad_request(
                "the guest boots without ACPI (acpi=off on its command line): it has no power \
                 button; use SendCtrlAltDel",
            ));
        };
        vm_superio::Trigger::trigger(button)
            .map(|_| ApiReply::NoContent)
            .map_err(|e| ApiFault::internal(format!("cannot press the power button: {e}")))
    }

    fn patch_drive(&mut self, p: PartialDrive) -> ApiResult {
        self.postboot("PATCH /drives")?;
        let Some(path) = p.path_on_host else {
            // Nothing to change (rate limiters are refused by the router).
            return if self.spec.drives.iter().any(|d| d.drive_id == p.drive_id) {
                Ok(ApiReply::NoContent)
            } else {
                Err(ApiFault::bad_request(format!("no drive '{}'", p.drive_id)))
            };
        };
        self.change_media(&p.drive_id, &path)?;
        if let Some(d) = self
            .spec
            .drives
            .iter_mut()
            .find(|d| d.drive_id == p.drive_id)
        {
            d.path_on_host = Some(path);
        }
        Ok(ApiReply::NoContent)
    }

    fn device_states(&self) -> SkiffDevices {
        let Some(vm) = &self.vm else {
            // Before boot: what is configured.
            let cfg = self.vm_config();
            let mut devices: Vec<SkiffDevice> = cfg
                .drives
                .iter()
                .map(|d| SkiffDevice {
                    id: d.id.clone(),
                    kind: "block".into(),
                    socket: match &d.backend {
                        crate::config::DriveBackend::Socket(s) => s.display().to_string(),
                        crate::config::DriveBackend::Image(_) => String::new(),
                    },
                    pid: None,
                    binary: None,
                    backing: match &d.backend {
                        crate::config::DriveBackend::Image(p) => p.display().to_string(),
                        crate::config::DriveBackend::Socket(s) => s.display().to_string(),
                    },
                    restarts: 0,
                    crashes: 0,
                    last_exit: None,
                    activated: false,
                })
                .collect();
            devices.extend(cfg.nets.iter().map(|n| SkiffDevice {
                id: n.id.clone(),
                kind: "net".into(),
                socket: String::new(),
                pid: None,
                binary: None,
                backing: n.tap.clone(),
                restarts: 0,
                crashes: 0,
                last_exit: None,
                activated: false,
            }));
            return SkiffDevices { devices };
        };
        let b = &vm.built;
        SkiffDevices {
            devices: b
                .devices
                .iter()
                .map(|d| SkiffDevice {
                    id: d.id.clone(),
                    kind: kind_name(d.kind).into(),
                    socket: d
                        .socket
                        .as_ref()
                        .map(|s| s.display().to_string())
                        .unwrap_or_default(),
                    pid: d.process.as_ref().map(|p| p.pid()),
                    binary: d.binary.as_ref().map(|p| p.display().to_string()),
                    backing: d.backing.clone(),
                    restarts: d.restarts,
                    crashes: d.crashes,
                    last_exit: d.last_exit.clone(),
                    activated: b
                        .bus
                        .virtio
                        .get(d.transport)
                        .map(|t| t.lock().unwrap_or_else(|p| p.into_inner()).is_active())
                        .unwrap_or(false),
                })
                .collect(),
        }
    }
}

fn upsert_drive(drives: &mut Vec<Drive>, d: Drive) {
    match drives.iter_mut().find(|x| x.drive_id == d.drive_id) {
        Some(x) => *x = d,
        None => drives.push(d),
    }
}

fn upsert_net(nets: &mut Vec<NetworkInterface>, n: NetworkInterface) {
    match nets.iter_mut().find(|x| x.iface_id == n.iface_id) {
        Some(x) => *x = n,
        None => nets.push(n),
    }
}
