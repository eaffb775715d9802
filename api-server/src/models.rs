//! Firecracker-compatible configuration objects: the bodies of `PUT /boot-source`,
//! `/machine-config`, `/drives/{id}`, `/network-interfaces/{id}` and the sections of a
//! `--config-file`. Field names are Firecracker's. Unknown fields are rejected by serde;
//! fields Firecracker has and skiff does not support yet are accepted only at their
//! default value and otherwise rejected by name (see [`VmConfigFile::check_supported`]).

use serde::{Deserialize, Serialize};

mod snapshot;
mod vmm_upgrade;
pub use snapshot::{
    MemBackend, MemBackendType, NetworkOverride, SnapshotCreateParams, SnapshotLoadParams,
    SnapshotType,
};
pub use vmm_upgrade::{VmmUpgrade, VmmUpgradeReport};

/// Errors in a configuration document.
#[derive(Debug, thiserror::Error)]
pub enum ModelsError {
    /// The JSON did not match the schema (unknown field, wrong type, missing field).
    #[error("invalid configuration: {0}")]
    Json(#[from] serde_json::Error),
    /// A Firecracker feature skiff does not implement yet was requested.
    #[error("'{field}' is not supported by skiff yet ({detail})")]
    Unsupported {
        /// The Firecracker field, as a JSON path.
        field: String,
        /// What was asked for.
        detail: String,
    },
}

/// `boot-source`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BootSource {
    /// Host path of the guest kernel (ELF vmlinux or bzImage).
    pub kernel_image_path: String,
    /// Kernel command line; replaces skiff's default base when set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_args: Option<String>,
    /// Host path of an initrd.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd_path: Option<String>,
}

/// `machine-config`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfig {
    /// Number of vCPUs.
    pub vcpu_count: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// Firecracker's SMT switch; only `false` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// Dirty-page tracking; only `false` is supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// CPU template; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// Guest RAM's page size, as Firecracker names it: `"None"` (the host's normal pages,
    /// the default) or `"2M"` (hugetlbfs 2 MiB pages, from the host's pool: `vm.nr_hugepages`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl Default for MachineConfig {
    fn default() -> Self {
        MachineConfig {
            vcpu_count: 1,
            mem_size_mib: 128,
            smt: None,
            track_dirty_pages: None,
            cpu_template: None,
            huge_pages: None,
        }
    }
}

/// One entry of `drives`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Drive {
    /// Unique id of the drive.
    pub drive_id: String,
    /// Host path of the raw image (served by a `skiff-blk` that skiff starts).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Whether this is the guest's root device (`root=/dev/vda`).
    pub is_root_device: bool,
    /// Read-only drive.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub is_read_only: Option<bool>,
    /// Socket of an externally started vhost-user-blk backend (instead of `path_on_host`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub socket: Option<String>,
    /// Root partition UUID; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partuuid: Option<String>,
    /// `Unsafe` or `Writeback`: skiff always honours guest flushes, so both are accepted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_type: Option<String>,
    /// `Sync` (the default: skiff-blk's worker threads read and write the image) or `Async`
    /// (skiff-blk keeps each queue's requests in flight together through io_uring), as in
    /// Firecracker; only for `path_on_host` drives, whose skiff-blk skiff starts.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub io_engine: Option<String>,
    /// Rate limiter; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// One entry of `network-interfaces`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NetworkInterface {
    /// Unique id of the interface.
    pub iface_id: String,
    /// Host TAP device name (opened, or created when absent, by `skiff-net`).
    pub host_dev_name: String,
    /// Guest MAC address, `aa:bb:cc:dd:ee:ff`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_mac: Option<String>,
    /// Rate limiters; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Rate limiters; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// A Firecracker `--config-file` document.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct VmConfigFile {
    /// Kernel, initrd and command line.
    #[serde(rename = "boot-source")]
    pub boot_source: BootSource,
    /// vCPUs and memory.
    #[serde(rename = "machine-config", default)]
    pub machine_config: MachineConfig,
    /// Block devices.
    #[serde(default)]
    pub drives: Vec<Drive>,
    /// Network devices.
    #[serde(rename = "network-interfaces", default)]
    pub network_interfaces: Vec<NetworkInterface>,
    /// Logger (as `PUT /logger`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<Logger>,
    /// Metrics (as `PUT /metrics`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    /// Firecracker sections skiff does not implement yet: accepted only when absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub vsock: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub balloon: Option<serde_json::Value>,
    #[serde(
        rename = "mmds-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[allow(missing_docs)]
    pub mmds_config: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub entropy: Option<serde_json::Value>,
    #[serde(
        rename = "cpu-config",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    #[allow(missing_docs)]
    pub cpu_config: Option<serde_json::Value>,
}

/// `PATCH /machine-config`: only the fields present change.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MachineConfigUpdate {
    /// Number of vCPUs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub vcpu_count: Option<u32>,
    /// Guest RAM in MiB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mem_size_mib: Option<u64>,
    /// See [`MachineConfig::smt`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub smt: Option<bool>,
    /// See [`MachineConfig::track_dirty_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub track_dirty_pages: Option<bool>,
    /// See [`MachineConfig::cpu_template`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_template: Option<String>,
    /// See [`MachineConfig::huge_pages`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub huge_pages: Option<String>,
}

impl MachineConfigUpdate {
    /// `base` with this update applied.
    pub fn apply(&self, base: &MachineConfig) -> MachineConfig {
        MachineConfig {
            vcpu_count: self.vcpu_count.unwrap_or(base.vcpu_count),
            mem_size_mib: self.mem_size_mib.unwrap_or(base.mem_size_mib),
            smt: self.smt.or(base.smt),
            track_dirty_pages: self.track_dirty_pages.or(base.track_dirty_pages),
            cpu_template: self.cpu_template.clone().or(base.cpu_template.clone()),
            huge_pages: self.huge_pages.clone().or(base.huge_pages.clone()),
        }
    }

    /// Rejects Firecracker options skiff does not implement, with the rules of
    /// [`MachineConfig::check_supported`] applied to the fields present.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        MachineConfig {
            smt: self.smt,
            track_dirty_pages: self.track_dirty_pages,
            cpu_template: self.cpu_template.clone(),
            huge_pages: self.huge_pages.clone(),
            ..MachineConfig::default()
        }
        .check_supported()
    }
}

/// `PATCH /drives/{drive_id}`: after boot, `path_on_host` swaps the medium.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartialDrive {
    /// The drive to change.
    pub drive_id: String,
    /// New image path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_on_host: Option<String>,
    /// Rate limiter; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limiter: Option<serde_json::Value>,
}

/// `PATCH /network-interfaces/{iface_id}`: Firecracker changes only rate limiters here.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PartialNetworkInterface {
    /// The interface to change.
    pub iface_id: String,
    /// Rate limiter; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rx_rate_limiter: Option<serde_json::Value>,
    /// Rate limiter; not supported.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tx_rate_limiter: Option<serde_json::Value>,
}

/// `PUT /actions` action types.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum ActionType {
    /// Boot the configured VM.
    InstanceStart,
    /// Press Ctrl+Alt+Del on the guest's i8042 keyboard.
    SendCtrlAltDel,
    /// Write one metrics line to the metrics file now.
    FlushMetrics,
}

/// `PUT /actions` body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct InstanceActionInfo {
    /// What to do.
    pub action_type: ActionType,
}

/// `PATCH /vm` states.
#[derive(Clone, Copy, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub enum VmStateChange {
    /// Stop the vCPUs (and the guest clock).
    Paused,
    /// Run them again.
    Resumed,
}

/// `PATCH /vm` body.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Vm {
    /// Requested state.
    pub state: VmStateChange,
}

/// Log levels of `PUT /logger` (Firecracker's names; matched case-insensitively).
#[derive(Clone, Copy, Debug, Serialize, PartialEq, Eq)]
pub enum LogLevel {
    /// Nothing.
    Off,
    /// Errors.
    Error,
    /// And warnings.
    Warning,
    /// And information (the default).
    Info,
    /// And debug messages.
    Debug,
    /// Everything.
    Trace,
}

impl<'de> Deserialize<'de> for LogLevel {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Ok(match s.to_ascii_lowercase().as_str() {
            "off" => LogLevel::Off,
            "error" => LogLevel::Error,
            "warning" | "warn" => LogLevel::Warning,
            "info" => LogLevel::Info,
            "debug" => LogLevel::Debug,
            "trace" => LogLevel::Trace,
            _ => {
                return Err(serde::de::Error::custom(format!(
                    "unknown log level '{s}' (Off, Error, Warning, Info, Debug, Trace)"
                )))
            }
        })
    }
}

/// `PUT /logger` body.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Logger {
    /// File or named pipe the log goes to (opened for appending, created if absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub log_path: Option<String>,
    /// Level (default Info).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub level: Option<LogLevel>,
    /// Print the level on each line (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_level: Option<bool>,
    /// Print file:line on each line (default false).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub show_log_origin: Option<bool>,
    /// Only log records from this module path prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub module: Option<String>,
}

impl Logger {
    /// Rejects what skiff cannot honour.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        if self.log_path.as_deref() == Some("") {
            return Err(unsupported("logger.log_path", "an empty path"));
        }
        Ok(())
    }
}

/// `PUT /metrics` body.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Metrics {
    /// File or named pipe that receives one JSON line per flush.
    pub metrics_path: String,
}

/// `GET /`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct InstanceInfo {
    /// Always "skiff".
    pub app_name: String,
    /// The instance id given with `--id`.
    pub id: String,
    /// "Not started", "Running" or "Paused" (Firecracker's values).
    pub state: String,
    /// skiff's version.
    pub vmm_version: String,
}

/// `GET /version`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
pub struct Version {
    /// Firecracker's field name, holding skiff's version.
    pub firecracker_version: String,
}

/// `GET /skiff/vm`: skiff's view of the VM's lifecycle.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SkiffVmState {
    /// "Not started", "Running", "Paused" or "Stopped".
    pub state: String,
    /// Milliseconds since InstanceStart (absent before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uptime_ms: Option<u64>,
    /// Milliseconds spent paused in total.
    pub paused_ms: u64,
    /// vCPUs.
    pub vcpus: u32,
    /// Guest RAM in MiB.
    pub mem_size_mib: u64,
    /// The VMM's pid.
    pub pid: u32,
}

/// One device in `GET /skiff/devices`.
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SkiffDevice {
    /// drive_id or iface_id.
    pub id: String,
    /// "block" or "net".
    pub kind: String,
    /// The vhost-user socket of an externally started backend; empty for a device process
    /// skiff started (it is connected over a socketpair, no socket path exists).
    pub socket: String,
    /// The device process's pid (absent for an externally started backend or before boot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// The device process's binary.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
    /// Image path (block) or TAP name (net).
    pub backing: String,
    /// How many times the device process was replaced or restarted.
    pub restarts: u32,
    /// How many times the device process died and was restarted.
    #[serde(default)]
    pub crashes: u32,
    /// How the device process last died: `exited with status N`, `killed by signal N
    /// (NAME)`, or `killed by seccomp (SIGSYS)` (a system call its filter forbids).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_exit: Option<String>,
    /// Whether the guest driver has activated the device.
    pub activated: bool,
}

/// `GET /skiff/devices`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SkiffDevices {
    /// Drives first, then network interfaces.
    pub devices: Vec<SkiffDevice>,
}

/// `PUT /skiff/devices/{id}/upgrade` body: replace the device's process while the guest
/// runs.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DeviceUpgrade {
    /// The new device binary (default: the one running now, started afresh).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub binary: Option<String>,
}

/// `PUT /skiff/upgrade` body: replace the process of every device of the VM.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VmUpgrade {
    /// New skiff-blk binary for every skiff-served drive (default: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub blk_binary: Option<String>,
    /// New skiff-net binary for every network interface (default: the current one).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_binary: Option<String>,
}

/// What one device upgrade did (answer of the upgrade endpoints).
#[derive(Clone, Debug, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpgradeReport {
    /// drive_id or iface_id.
    pub id: String,
    /// "block" or "net".
    pub kind: String,
    /// The process that served the device before.
    pub old_pid: u32,
    /// The process that serves it now.
    pub new_pid: u32,
    /// Binary of the old process.
    pub old_binary: String,
    /// Binary of the new process.
    pub new_binary: String,
    /// The guest-visible pause: first ring stopped on the old process to last ring
    /// enabled on the new one, in microseconds.
    pub pause_us: u64,
    /// Starting the new process (its connection is a socketpair made before, so there is
    /// nothing to wait for), in microseconds.
    pub spawn_us: u64,
    /// vhost-user negotiation with the new process (owner, features, protocol features,
    /// config), in microseconds; it includes the process's own start-up until it answers.
    pub negotiate_us: u64,
    /// Features and memory table sent to the new process before the switch, in
    /// microseconds.
    pub prepare_us: u64,
    /// The whole upgrade, in microseconds.
    pub total_us: u64,
    /// Rings handed over.
    pub rings: usize,
}

/// Answer of `PUT /skiff/upgrade`.
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct UpgradeReports {
    /// One report per device, in device order.
    pub devices: Vec<UpgradeReport>,
}

fn unsupported(field: impl Into<String>, detail: impl Into<String>) -> ModelsError {
    ModelsError::Unsupported {
        field: field.into(),
        detail: detail.into(),
    }
}

impl MachineConfig {
    /// Rejects Firecracker options skiff does not implement.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        if self.smt == Some(true) {
            return Err(unsupported("machine-config.smt", "true"));
        }
        if self.track_dirty_pages == Some(true) {
            return Err(unsupported("machine-config.track_dirty_pages", "true"));
        }
        if let Some(t) = &self.cpu_template {
            if t != "None" {
                return Err(unsupported("machine-config.cpu_template", t.clone()));
            }
        }
        if let Some(h) = &self.huge_pages {
            if h != "None" && h != "2M" {
                return Err(unsupported("machine-config.huge_pages", h.clone()));
            }
        }
        Ok(())
    }

    /// Whether guest RAM is on 2 MiB huge pages (`huge_pages: "2M"`).
    pub fn huge_pages_2m(&self) -> bool {
        self.huge_pages.as_deref() == Some("2M")
    }
}

impl Drive {
    /// Whether skiff-blk serves this drive through io_uring (`io_engine: Async`).
    pub fn io_uring(&self) -> bool {
        self.io_engine.as_deref() == Some("Async")
    }

    /// Rejects Firecracker options skiff does not implement.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        let at = |f: &str| format!("drives[{}].{f}", self.drive_id);
        if let Some(p) = &self.partuuid {
            return Err(unsupported(at("partuuid"), p.clone()));
        }
        if let Some(c) = &self.cache_type {
            if c != "Unsafe" && c != "Writeback" {
                return Err(unsupported(at("cache_type"), c.clone()));
            }
        }
        match self.io_engine.as_deref() {
            None | Some("Sync") => {}
            Some("Async") if self.socket.is_some() => {
                return Err(unsupported(
                    at("io_engine"),
                    "Async with socket: an external backend's engine is its own",
                ))
            }
            Some("Async") => {}
            Some(e) => return Err(unsupported(at("io_engine"), e.to_string())),
        }
        if self.rate_limiter.as_ref().is_some_and(|v| !v.is_null()) {
            return Err(unsupported(at("rate_limiter"), "rate limiting"));
        }
        match (&self.path_on_host, &self.socket) {
            (Some(_), Some(_)) => Err(unsupported(
                at("socket"),
                "path_on_host and socket together; give one",
            )),
            (None, None) => Err(unsupported(
                at("path_on_host"),
                "a drive needs path_on_host or socket",
            )),
            _ => Ok(()),
        }
    }
}

impl NetworkInterface {
    /// Rejects Firecracker options skiff does not implement.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        for (name, v) in [
            ("rx_rate_limiter", &self.rx_rate_limiter),
            ("tx_rate_limiter", &self.tx_rate_limiter),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(unsupported(
                    format!("network-interfaces[{}].{name}", self.iface_id),
                    "rate limiting",
                ));
            }
        }
        Ok(())
    }
}

impl VmConfigFile {
    /// Parses a config file and rejects what skiff cannot honour, naming the field.
    pub fn from_json(text: &str) -> Result<Self, ModelsError> {
        let cfg: VmConfigFile = serde_json::from_str(text)?;
        cfg.check_supported()?;
        Ok(cfg)
    }

    /// Rejects Firecracker sections and options skiff does not implement.
    pub fn check_supported(&self) -> Result<(), ModelsError> {
        for (name, v) in [
            ("vsock", &self.vsock),
            ("balloon", &self.balloon),
            ("mmds-config", &self.mmds_config),
            ("entropy", &self.entropy),
            ("cpu-config", &self.cpu_config),
        ] {
            if v.as_ref().is_some_and(|v| !v.is_null()) {
                return Err(unsupported(name, "section present"));
            }
        }
        self.machine_config.check_supported()?;
        if let Some(l) = &self.logger {
            l.check_supported()?;
        }
        self.drives.iter().try_for_each(Drive::check_supported)?;
        self.network_interfaces
            .iter()
            .try_for_each(NetworkInterface::check_supported)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const FC_EXAMPLE: &str = r#"{
      "boot-source": {"kernel_image_path": "vmlinux", "boot_args": "console=ttyS0 reboot=k panic=1 pci=off"},
      "drives": [{"drive_id": "rootfs", "path_on_host": "rootfs.ext4", "is_root_device": true, "is_read_only": false}],
      "network-interfaces": [{"iface_id": "eth0", "guest_mac": "AA:FC:00:00:00:01", "host_dev_name": "tap0"}],
      "machine-config": {"vcpu_count": 2, "mem_size_mib": 1024, "smt": false, "track_dirty_pages": false}
    }"#;

    #[test]
    fn parses_firecracker_example() {
        let cfg = VmConfigFile::from_json(FC_EXAMPLE).unwrap();
        assert_eq!(cfg.machine_config.vcpu_count, 2);
        assert_eq!(cfg.machine_config.mem_size_mib, 1024);
        assert_eq!(cfg.drives[0].path_on_host.as_deref(), Some("rootfs.ext4"));
        assert_eq!(cfg.network_interfaces[0].host_dev_name, "tap0");
    }

    #[test]
    fn unknown_field_is_named() {
        let text = FC_EXAMPLE.replace("\"smt\": false", "\"smtx\": false");
        let err = VmConfigFile::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("smtx"), "{err}");
    }

    #[test]
    fn unsupported_section_is_named() {
        let text = FC_EXAMPLE.replacen(
            '{',
            r#"{"vsock": {"guest_cid": 3, "uds_path": "v.sock"},"#,
            1,
        );
        let err = VmConfigFile::from_json(&text).unwrap_err().to_string();
        assert!(
            err.contains("vsock") && err.contains("not supported"),
            "{err}"
        );
    }

    #[test]
    fn unsupported_drive_option_is_named() {
        let text = FC_EXAMPLE.replace("\"is_read_only\": false", "\"partuuid\": \"abc\"");
        let err = VmConfigFile::from_json(&text).unwrap_err().to_string();
        assert!(err.contains("drives[rootfs].partuuid"), "{err}");
    }

    #[test]
    fn io_engine_async_is_taken_for_images_only() {
        let with = |engine: &str| {
            FC_EXAMPLE.replace(
                "\"is_read_only\": false",
                &format!("\"is_read_only\": false, \"io_engine\": \"{engine}\""),
            )
        };
        let f = VmConfigFile::from_json(&with("Async")).expect("Async");
        assert!(f.drives[0].io_uring());
        let f = VmConfigFile::from_json(&with("Sync")).expect("Sync");
        assert!(!f.drives[0].io_uring());
        let err = VmConfigFile::from_json(&with("Uring"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("drives[rootfs].io_engine") && err.contains("Uring"),
            "{err}"
        );
        let mut d: Drive = serde_json::from_str(
            r#"{"drive_id": "d", "socket": "/s", "is_root_device": false, "io_engine": "Async"}"#,
        )
        .expect("drive");
        let err = d.check_supported().unwrap_err().to_string();
        assert!(err.contains("external backend"), "{err}");
        d.io_engine = None;
        assert!(d.check_supported().is_ok());
    }

    #[test]
    fn missing_kernel_is_an_error() {
        let err = VmConfigFile::from_json(r#"{"boot-source": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel_image_path"), "{err}");
    }
}
