//! The VM description skiff boots, built from a Firecracker config file or from
//! `skiff run` arguments, and checked before any resource is created.

use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use api_server::models::VmConfigFile;

/// Errors in a VM description.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {0}")]
    Read(String, #[source] std::io::Error),
    /// The config file is not valid.
    #[error("config file {0}")]
    Parse(String, #[source] api_server::models::ModelsError),
    /// A value is out of range or inconsistent.
    #[error("{0}")]
    Invalid(String),
    /// A file the VM needs is missing or unreadable.
    #[error("{what} {path} cannot be opened")]
    File {
        /// What the file is.
        what: String,
        /// Path.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where the guest console goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ConsoleConfig {
    /// stdin/stdout (raw mode on a terminal).
    Stdio,
    /// Output to a file, no input.
    File(PathBuf),
    /// No console.
    None,
}

impl std::str::FromStr for ConsoleConfig {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "stdio" => Ok(ConsoleConfig::Stdio),
            "none" => Ok(ConsoleConfig::None),
            _ => match s.strip_prefix("file:") {
                Some(p) if !p.is_empty() => Ok(ConsoleConfig::File(p.into())),
                _ => Err(format!(
                    "console must be stdio, none or file:PATH, not '{s}'"
                )),
            },
        }
    }
}

/// How a drive is served.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DriveBackend {
    /// A raw image served by a `skiff-blk` that skiff starts.
    Image(PathBuf),
    /// An externally started vhost-user-blk backend listening on this socket.
    Socket(PathBuf),
}

/// One block device.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DriveConfig {
    /// Drive id.
    pub id: String,
    /// Backend.
    pub backend: DriveBackend,
    /// Root device (becomes /dev/vda).
    pub is_root: bool,
    /// Read-only.
    pub read_only: bool,
    /// skiff-blk serves it through io_uring (`io_engine: Async`; `--io-engine io-uring`).
    pub io_uring: bool,
}

/// One network interface.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NetConfig {
    /// Interface id.
    pub id: String,
    /// Host TAP name.
    pub tap: String,
    /// Guest MAC.
    pub mac: Option<String>,
}

/// The default base of the kernel command line. The guest boots with ACPI (`acpi=off` in
/// the command line, base or extra, turns it off). skiff adds `pci=off` unless the devices
/// are on PCI (`--enable-pci`) or the command line has a `pci=` option already, as
/// Firecracker does.
pub const DEFAULT_CMDLINE: &str = "console=ttyS0 reboot=k panic=1 \
8250.nr_uarts=1 i8042.noaux i8042.nomux i8042.dumbkbd";

/// Everything needed to boot.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VmConfig {
    /// Kernel image.
    pub kernel: PathBuf,
    /// Initrd.
    pub initrd: Option<PathBuf>,
    /// Command-line base (replaces [`DEFAULT_CMDLINE`]).
    pub boot_args: Option<String>,
    /// Appended to the command line.
    pub extra_args: Option<String>,
    /// vCPUs.
    pub vcpus: u32,
    /// RAM in MiB.
    pub mem_mib: u64,
    /// Guest RAM on 2 MiB hugetlbfs pages (`huge_pages: "2M"`).
    pub huge_pages: bool,
    /// Drives, root first.
    pub drives: Vec<DriveConfig>,
    /// Network interfaces.
    pub nets: Vec<NetConfig>,
    /// Console.
    pub console: ConsoleConfig,
}

impl VmConfig {
    /// Reads and parses a Firecracker config file.
    pub fn read_file(path: &std::path::Path) -> Result<VmConfigFile, ConfigError> {
        let p = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::Read(p.clone(), e))?;
        VmConfigFile::from_json(&text).map_err(|e| ConfigError::Parse(p, e))
    }

    /// From a Firecracker config file.
    pub fn from_file(path: &std::path::Path) -> Result<Self, ConfigError> {
        Ok(Self::from_model(&Self::read_file(path)?))
    }

    /// From the Firecracker configuration objects (a config file, or what the API
    /// collected before InstanceStart). The console is stdio; set it afterwards.
    pub fn from_model(file: &VmConfigFile) -> Self {
        let drives = file
            .drives
            .iter()
            .map(|d| DriveConfig {
                id: d.drive_id.clone(),
                backend: match (&d.path_on_host, &d.socket) {
                    (_, Some(s)) => DriveBackend::Socket(s.into()),
                    (Some(p), None) => DriveBackend::Image(p.into()),
                    // check_supported() rejected drives with neither.
                    (None, None) => DriveBackend::Image(PathBuf::new()),
                },
                is_root: d.is_root_device,
                read_only: d.is_read_only.unwrap_or(false),
                io_uring: d.io_uring(),
            })
            .collect();
        let nets = file
            .network_interfaces
            .iter()
            .map(|n| NetConfig {
                id: n.iface_id.clone(),
                tap: n.host_dev_name.clone(),
                mac: n.guest_mac.clone(),
            })
            .collect();
        let mut cfg = VmConfig {
            kernel: file.boot_source.kernel_image_path.clone().into(),
            initrd: file.boot_source.initrd_path.clone().map(Into::into),
            boot_args: file.boot_source.boot_args.clone(),
            extra_args: None,
            vcpus: file.machine_config.vcpu_count,
            mem_mib: file.machine_config.mem_size_mib,
            huge_pages: file.machine_config.huge_pages_2m(),
            drives,
            nets,
            console: ConsoleConfig::Stdio,
        };
        cfg.order_drives();
        cfg
    }

    /// The Firecracker configuration objects describing this VM (`GET /vm/config`). Extra
    /// command-line arguments of `skiff run --cmdline` are not part of them.
    pub fn to_model(&self) -> VmConfigFile {
        use api_server::models::{BootSource, Drive, MachineConfig, NetworkInterface};
        VmConfigFile {
            boot_source: BootSource {
                kernel_image_path: self.kernel.display().to_string(),
                boot_args: self.boot_args.clone(),
                initrd_path: self.initrd.as_ref().map(|p| p.display().to_string()),
            },
            machine_config: MachineConfig {
                vcpu_count: self.vcpus,
                mem_size_mib: self.mem_mib,
                huge_pages: self.huge_pages.then(|| "2M".to_string()),
                ..Default::default()
            },
            drives: self
                .drives
                .iter()
                .map(|d| Drive {
                    drive_id: d.id.clone(),
                    path_on_host: match &d.backend {
                        DriveBackend::Image(p) => Some(p.display().to_string()),
                        DriveBackend::Socket(_) => None,
                    },
                    socket: match &d.backend {
                        DriveBackend::Socket(p) => Some(p.display().to_string()),
                        DriveBackend::Image(_) => None,
                    },
                    is_root_device: d.is_root,
                    is_read_only: Some(d.read_only),
                    io_engine: d.io_uring.then(|| "Async".to_string()),
                    ..Default::default()
                })
                .collect(),
            network_interfaces: self
                .nets
                .iter()
                .map(|n| NetworkInterface {
                    iface_id: n.id.clone(),
                    host_dev_name: n.tap.clone(),
                    guest_mac: n.mac.clone(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    /// Puts the root drive first so that it becomes /dev/vda, as Firecracker does.
    pub fn order_drives(&mut self) {
        self.drives.sort_by_key(|d| !d.is_root);
    }

    /// Whether the guest boots with ACPI: yes unless its command line (base or extra) says
    /// `acpi=off`. skiff describes the machine both ways (ACPI tables; the MP table and the
    /// virtio-mmio devices on the command line); this decides whether the guest has the
    /// power button.
    pub fn acpi(&self) -> bool {
        let base = self.boot_args.as_deref().unwrap_or(DEFAULT_CMDLINE);
        let extra = self.extra_args.as_deref().unwrap_or("");
        !base
            .split_ascii_whitespace()
            .chain(extra.split_ascii_whitespace())
            .any(|w| w == "acpi=off")
    }

    /// The full kernel command line for this VM with `mmio` device declarations.
    pub fn cmdline(&self, mmio: &[String], pci: bool) -> String {
        let mut parts: Vec<String> = vec![self
            .boot_args
            .clone()
            .unwrap_or_else(|| DEFAULT_CMDLINE.to_string())];
        // A guest without a PCI bus need not probe for one.
        if !pci && !self.cmdline_words().any(|w| w.starts_with("pci=")) {
            parts.push("pci=off".into());
        }
        if let Some(root) = self.drives.first().filter(|d| d.is_root) {
            parts.push(format!(
                "root=/dev/vda {}",
                if root.read_only { "ro" } else { "rw" }
            ));
        }
        parts.extend(mmio.iter().cloned());
        if let Some(extra) = &self.extra_args {
            parts.push(extra.clone());
        }
        parts.join(" ")
    }

    /// The words of the command line's base and extra arguments.
    fn cmdline_words(&self) -> impl Iterator<Item = &str> {
        let base = self.boot_args.as_deref().unwrap_or(DEFAULT_CMDLINE);
        let extra = self.extra_args.as_deref().unwrap_or("");
        base.split_ascii_whitespace()
            .chain(extra.split_ascii_whitespace())
    }

    /// With the devices on PCI, a command line that turns the guest's PCI off (`pci=off`)
    /// or its MSI (`pci=nomsi`: skiff's functions have no INTx) is refused: the guest could
    /// not use its devices. Linux reads `pci=` as a comma-separated list.
    pub fn check_pci(&self) -> Result<(), ConfigError> {
        let bad = self
            .cmdline_words()
            .filter_map(|w| w.strip_prefix("pci="))
            .flat_map(|v| v.split(','))
            .find(|o| matches!(*o, "off" | "nomsi"));
        match bad {
            Some(o) => Err(ConfigError::Invalid(format!(
                "the kernel command line has pci={o}, but the devices are on PCI \
                 (--enable-pci) with MSI-X only: the guest could not use them"
            ))),
            None => Ok(()),
        }
    }

    /// Checks everything that can be checked without KVM.
    pub fn validate(&self, max_vcpus: usize, host_mem: Option<u64>) -> Result<(), ConfigError> {
        self.validate_machine(max_vcpus, host_mem)?;
        self.validate_boot()?;
        self.validate_devices()
    }

    /// Checks vCPU count and memory size.
    pub fn validate_machine(
        &self,
        max_vcpus: usize,
        host_mem: Option<u64>,
    ) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.vcpus == 0 {
            return invalid("vcpu_count is 0: a VM needs at least one vCPU".into());
        }
        let limit = max_vcpus.min(254);
        if self.vcpus as usize > limit {
            return invalid(format!(
                "vcpu_count {} is more than this host's KVM allows ({limit})",
                self.vcpus
            ));
        }
        if self.mem_mib == 0 {
            return invalid("mem_size_mib is 0: a VM needs memory".into());
        }
        if self.huge_pages && !self.mem_mib.is_multiple_of(2) {
            return invalid(format!(
                "mem_size_mib {} is not a multiple of 2: with huge_pages \"2M\" guest RAM is \
                 made of 2 MiB pages",
                self.mem_mib
            ));
        }
        let bytes = self.mem_mib.checked_mul(1 << 20);
        if let (Some(host), b) = (host_mem, bytes) {
            if b.is_none_or(|b| b > host) {
                return invalid(format!(
                    "mem_size_mib {} is more than the host has ({} MiB of RAM and swap)",
                    self.mem_mib,
                    host >> 20
                ));
            }
        }
        Ok(())
    }

    /// Checks that the kernel and initrd can be opened.
    pub fn validate_boot(&self) -> Result<(), ConfigError> {
        open_file("kernel image", &self.kernel)?;
        if let Some(i) = &self.initrd {
            open_file("initrd", i)?;
        }
        Ok(())
    }

    /// Checks drives and network interfaces: ids, images, TAP names, MACs.
    pub fn validate_devices(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        let open = open_file;
        if self.drives.iter().filter(|d| d.is_root).count() > 1 {
            return invalid("more than one drive has is_root_device set".into());
        }
        let mut seen_ids = HashMap::new();
        let mut seen_images: HashMap<(u64, u64), (&str, bool)> = HashMap::new();
        for id in self
            .drives
            .iter()
            .map(|d| &d.id)
            .chain(self.nets.iter().map(|n| &n.id))
        {
            if !api_server::router::valid_id(id) {
                return invalid(format!(
                    "device id '{id}' must be 1 to {} letters, digits or underscores",
                    api_server::router::MAX_ID_LEN
                ));
            }
        }
        for d in &self.drives {
            if seen_ids.insert(d.id.as_str(), ()).is_some() {
                return invalid(format!("drive id '{}' is used twice", d.id));
            }
            if let DriveBackend::Image(p) = &d.backend {
                let meta = open(&format!("drive '{}' image", d.id), p)?
                    .metadata()
                    .map_err(|source| ConfigError::File {
                        what: format!("drive '{}' image", d.id),
                        path: p.display().to_string(),
                        source,
                    })?;
                let key = (meta.dev(), meta.ino());
                if let Some((other, other_ro)) = seen_images.get(&key) {
                    if !(d.read_only && *other_ro) {
                        return invalid(format!(
                            "drives '{other}' and '{}' use the same image {}; only read-only drives may share an image",
                            d.id,
                            p.display()
                        ));
                    }
                }
                seen_images.insert(key, (d.id.as_str(), d.read_only));
            }
        }
        let mut seen_taps = HashMap::new();
        for n in &self.nets {
            if seen_ids.insert(n.id.as_str(), ()).is_some() {
                return invalid(format!("device id '{}' is used twice", n.id));
            }
            if n.tap.is_empty() || n.tap.len() > 15 {
                return invalid(format!(
                    "network interface '{}': host_dev_name '{}' must be 1 to 15 characters",
                    n.id, n.tap
                ));
            }
            if seen_taps.insert(n.tap.as_str(), ()).is_some() {
                return invalid(format!("TAP device {} is used by two interfaces", n.tap));
            }
            if let Some(mac) = &n.mac {
                if parse_mac(mac).is_none() {
                    return invalid(format!(
                        "network interface '{}': guest_mac '{mac}' is not a MAC address",
                        n.id
                    ));
                }
            }
        }
        Ok(())
    }
}

fn open_file(what: &str, p: &PathBuf) -> Result<std::fs::File, ConfigError> {
    std::fs::File::open(p).map_err(|source| ConfigError::File {
        what: what.into(),
        path: p.display().to_string(),
        source,
    })
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn base() -> VmConfig {
        VmConfig {
            kernel: "/proc/self/exe".into(),
            initrd: None,
            boot_args: None,
            extra_args: Some("quiet".into()),
            vcpus: 1,
            mem_mib: 128,
            huge_pages: false,
            drives: vec![],
            nets: vec![],
            console: ConsoleConfig::Stdio,
        }
    }

    #[test]
    fn limits_are_named() {
        let mut c = base();
        c.vcpus = 0;
        assert!(c
            .validate(8, None)
            .unwrap_err()
            .to_string()
            .contains("vcpu_count is 0"));
        c.vcpus = 9;
        assert!(c
            .validate(8, None)
            .unwrap_err()
            .to_string()
            .contains("more than"));
        c.vcpus = 1;
        c.mem_mib = 0;
        assert!(c
            .validate(8, None)
            .unwrap_err()
            .to_string()
            .contains("mem_size_mib is 0"));
        c.mem_mib = 1 << 20;
        assert!(c
            .validate(8, Some(1 << 30))
            .unwrap_err()
            .to_string()
            .contains("more than the host"));
        c.mem_mib = 129;
        c.huge_pages = true;
        assert!(c
            .validate(8, None)
            .unwrap_err()
            .to_string()
            .contains("mem_size_mib 129 is not a multiple of 2"));
        c.mem_mib = 130;
        assert!(c.validate(8, None).is_ok());
    }

    #[test]
    fn same_image_twice_rw_is_refused() {
        let mut c = base();
        for id in ["a", "b"] {
            c.drives.push(DriveConfig {
                id: id.into(),
                backend: DriveBackend::Image("/proc/self/exe".into()),
                is_root: false,
                read_only: false,
                io_uring: false,
            });
        }
        assert!(c
            .validate(8, None)
            .unwrap_err()
            .to_string()
            .contains("same image"));
        c.drives[0].read_only = true;
        c.drives[1].read_only = true;
        c.validate(8, None).unwrap();
    }

    #[test]
    fn cmdline_has_root_devices_and_extra() {
        let mut c = base();
        c.drives.push(DriveConfig {
            id: "root".into(),
            backend: DriveBackend::Image("x".into()),
            is_root: true,
            read_only: false,
            io_uring: false,
        });
        let line = c.cmdline(&["virtio_mmio.device=4K@0xd0000000:5".into()], false);
        assert!(line.starts_with(DEFAULT_CMDLINE));
        assert!(line.contains("pci=off root=/dev/vda rw virtio_mmio.device=4K@0xd0000000:5 quiet"));
    }

    #[test]
    fn pci_off_unless_on_pci_or_chosen() {
        let mut c = base();
        assert!(c.cmdline(&[], false).contains(" pci=off"));
        assert!(!c.cmdline(&[], true).contains("pci="));
        assert!(c.check_pci().is_ok());
        c.extra_args = Some("pci=conf1".into());
        assert!(!c.cmdline(&[], false).contains("pci=off"));
        assert!(c.check_pci().is_ok());
        c.boot_args = Some("console=ttyS0 pci=off".into());
        let e = c.check_pci().unwrap_err().to_string();
        assert!(e.contains("pci=off") && e.contains("--enable-pci"), "{e}");
        c.boot_args = Some("console=ttyS0 pci=conf1,nomsi".into());
        let e = c.check_pci().unwrap_err().to_string();
        assert!(e.contains("pci=nomsi"), "{e}");
    }

    #[test]
    fn acpi_unless_the_command_line_turns_it_off() {
        let mut c = base();
        assert!(c.acpi());
        c.boot_args = Some("console=ttyS0 acpi=off".into());
        assert!(!c.acpi());
        c.boot_args = Some("console=ttyS0 noacpi=off".into());
        assert!(c.acpi());
        c.extra_args = Some("quiet acpi=off".into());
        assert!(!c.acpi());
    }

    #[test]
    fn macs() {
        assert_eq!(
            parse_mac("AA:fc:00:00:00:01"),
            Some([0xaa, 0xfc, 0, 0, 0, 1])
        );
        assert_eq!(parse_mac("aa:fc:00:00:00"), None);
        assert_eq!(parse_mac("aa:fc:00:00:00:01:02"), None);
    }
}
