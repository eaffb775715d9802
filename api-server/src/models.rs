//! Firecracker-compatible configuration objects: the bodies of `PUT /boot-source`,
//! `/machine-config`, `/drives/{id}`, `/network-interfaces/{id}` and the sections of a
//! `--config-file`. Field names are Firecracker's. Unknown fields are rejected by serde;
//! fields Firecracker has and skiff does not support yet are accepted only at their
//! default value and otherwise rejected by name (see [`VmConfigFile::check_supported`]).

use serde::{Deserialize, Serialize};

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
    /// Huge pages; only `"None"` is supported.
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
    /// Only `Sync` (the default) is accepted.
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
    /// Firecracker sections skiff does not implement yet: accepted only when absent or null.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logger: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[allow(missing_docs)]
    pub metrics: Option<serde_json::Value>,
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
            if h != "None" {
                return Err(unsupported("machine-config.huge_pages", h.clone()));
            }
        }
        Ok(())
    }
}

impl Drive {
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
        if let Some(e) = &self.io_engine {
            if e != "Sync" {
                return Err(unsupported(at("io_engine"), e.clone()));
            }
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
            ("logger", &self.logger),
            ("metrics", &self.metrics),
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
    fn missing_kernel_is_an_error() {
        let err = VmConfigFile::from_json(r#"{"boot-source": {}}"#)
            .unwrap_err()
            .to_string();
        assert!(err.contains("kernel_image_path"), "{err}");
    }
}
