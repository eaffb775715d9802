//! skiffctl's command line and what each subcommand asks of the API: parsing is clap's,
//! the mapping to an [`Op`] is pure and unit-tested here.

use std::path::PathBuf;

use api_server::models::{
    ActionType, BootSource, Drive, LogLevel, Logger, MachineConfig, MachineConfigUpdate,
    MemBackend, MemBackendType, Metrics, NetworkInterface, NetworkOverride, PartialDrive,
    PartialNetworkInterface, SnapshotCreateParams, SnapshotLoadParams, SnapshotType, VmStateChange,
    VmUpgrade, VmmUpgrade,
};
use clap::{Args, Parser, Subcommand, ValueEnum};

/// Environment variable that names the API socket when `--socket` is not given.
pub const SOCKET_ENV: &str = "SKIFF_API_SOCK";

const EXIT_CODES: &str = "\
Environment:
  SKIFF_API_SOCK  the API socket, when --socket is not given

Exit status:
  0  success
  1  the API answered with an error (stderr: `skiffctl: <status>: <fault_message>`)
  2  usage error
  3  cannot reach the socket, a connection or protocol error, or stdout failed

Paths (kernel, drives, logger, metrics) are opened by skiff, so a relative path is
relative to skiff's working directory (or its jail), not skiffctl's.";

/// Control a skiff microVM over its API socket.
#[derive(Debug, Parser)]
#[command(name = "skiffctl", version, after_help = EXIT_CODES)]
pub struct Cli {
    /// The API socket (default: $SKIFF_API_SOCK).
    #[arg(long, short = 's', global = true, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Print the API's JSON answers as received instead of readable text.
    #[arg(long, global = true)]
    pub json: bool,
    /// Seconds to wait for each answer (`upgrade`: at least 60), and for the socket in
    /// `wait-ready`.
    #[arg(long, global = true, value_name = "SECS", default_value_t = 10.0)]
    pub timeout: f64,
    #[command(subcommand)]
    pub command: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Cmd {
    /// Instance id, state and version (GET /).
    Info,
    /// skiff's version (GET /version).
    Version,
    /// vCPUs and memory (GET, PUT, PATCH /machine-config).
    #[command(subcommand)]
    MachineConfig(MachineConfigCmd),
    /// Kernel, command line and initrd (PUT /boot-source).
    BootSource {
        /// Guest kernel: ELF vmlinux or bzImage.
        #[arg(long, value_name = "PATH")]
        kernel: String,
        /// Kernel command line (replaces skiff's default base).
        #[arg(long, value_name = "ARGS")]
        boot_args: Option<String>,
        /// Initrd.
        #[arg(long, value_name = "PATH")]
        initrd: Option<String>,
    },
    /// Block devices (PUT, PATCH /drives/{id}).
    #[command(subcommand)]
    Drive(DriveCmd),
    /// Network interfaces (PUT, PATCH /network-interfaces/{id}).
    #[command(subcommand)]
    Net(NetCmd),
    /// Boot the configured VM (PUT /actions InstanceStart).
    Start,
    /// Press Ctrl+Alt+Del in the guest (PUT /actions SendCtrlAltDel).
    CtrlAltDel,
    /// Press the guest's ACPI power button: a guest that handles it (systemd, acpid)
    /// shuts down cleanly (PUT /skiff/power-button).
    PowerButton,
    /// Write one metrics line to the metrics file now (PUT /actions FlushMetrics).
    FlushMetrics,
    /// Pause the vCPUs (PATCH /vm Paused).
    Pause,
    /// Resume the vCPUs (PATCH /vm Resumed).
    Resume,
    /// The whole configuration as a Firecracker config file (GET /vm/config).
    Config,
    /// Where and how skiff logs (PUT /logger).
    Logger {
        /// Log file or named pipe.
        #[arg(long, value_name = "PATH")]
        path: Option<String>,
        /// Level.
        #[arg(long, value_enum)]
        level: Option<Level>,
        /// Print the level on each line.
        #[arg(long)]
        show_level: bool,
        /// Print file:line on each line.
        #[arg(long)]
        show_origin: bool,
        /// Only log records of this module path prefix.
        #[arg(long, value_name = "PREFIX")]
        module: Option<String>,
    },
    /// The file that receives metrics lines (PUT /metrics).
    MetricsFile {
        /// Metrics file or named pipe.
        #[arg(long, value_name = "PATH")]
        path: String,
    },
    /// Lifecycle state, uptime, vCPUs, memory (GET /skiff/vm).
    State,
    /// Device processes, one line each (GET /skiff/devices).
    Devices,
    /// Counters in Prometheus text format (GET /skiff/metrics).
    Metrics,
    /// Replace a device's process, or every device's, or the VMM's own, while the guest
    /// runs (PUT /skiff/devices/{id}/upgrade, PUT /skiff/upgrade, PUT /skiff/vmm/upgrade).
    #[command(after_help = "\
The new process is started and negotiated before the old one is touched; if it fails,
the old process keeps serving and skiffctl exits 1 with the reason. With --all the
devices are upgraded one after the other and the first failure stops the run: the
devices before it stay upgraded. With --vmm (under skiff-jailer) a new skiff takes the
guest over from the running one; --binary names it, a program of the cell's /bin.")]
    Upgrade {
        /// Device id (drive_id or iface_id).
        #[arg(required_unless_present_any = ["all", "vmm"], conflicts_with_all = ["all", "vmm"])]
        id: Option<String>,
        /// Upgrade the VMM process itself.
        #[arg(long, conflicts_with = "all")]
        vmm: bool,
        /// Upgrade every device instead of one.
        #[arg(long)]
        all: bool,
        /// New device binary (default: the one running now).
        #[arg(long, value_name = "PATH", conflicts_with = "all")]
        binary: Option<String>,
        /// With --all: new skiff-blk binary for every drive (default: the current one).
        #[arg(long, value_name = "PATH", requires = "all", conflicts_with = "id")]
        blk_binary: Option<String>,
        /// With --all: new skiff-net binary for every interface (default: the current one).
        #[arg(long, value_name = "PATH", requires = "all", conflicts_with = "id")]
        net_binary: Option<String>,
    },
    /// Snapshots: the paused VM to files, or a VM from them (PUT /snapshot/create,
    /// PUT /snapshot/load).
    #[command(subcommand)]
    Snapshot(SnapshotCmd),
    /// Any request; the response body goes to stdout as received.
    Raw {
        /// HTTP method (GET, PUT, PATCH, ...).
        method: String,
        /// Request path, e.g. /machine-config.
        path: String,
        /// JSON body, or `-` to read it from stdin.
        body: Option<String>,
    },
    /// Wait until the socket accepts connections (at most --timeout seconds).
    WaitReady,
}

/// `snapshot` subcommands.
#[derive(Debug, Subcommand)]
pub enum SnapshotCmd {
    /// Write the paused VM's state and memory to two files (the VM stays paused).
    Create {
        /// The state file.
        #[arg(long, value_name = "PATH")]
        state: String,
        /// The memory file.
        #[arg(long, value_name = "PATH")]
        mem: String,
    },
    /// Make the VM from a snapshot, in a skiff that has not started one and has no boot
    /// source, drive or interface configured.
    Load {
        /// The state file.
        #[arg(long, value_name = "PATH")]
        state: String,
        /// The memory file.
        #[arg(long, value_name = "PATH")]
        mem: String,
        /// Run the VM once loaded (default: it stays paused).
        #[arg(long)]
        resume: bool,
        /// Move an interface to another TAP (repeatable).
        #[arg(long, value_name = "IFACE=TAP")]
        net: Vec<String>,
    },
}

impl SnapshotCmd {
    fn op(self) -> Result<Op, String> {
        Ok(match self {
            SnapshotCmd::Create { state, mem } => Op::CreateSnapshot(SnapshotCreateParams {
                snapshot_type: SnapshotType::Full,
                snapshot_path: state,
                mem_file_path: mem,
            }),
            SnapshotCmd::Load {
                state,
                mem,
                resume,
                net,
            } => Op::LoadSnapshot(SnapshotLoadParams {
                snapshot_path: state,
                mem_backend: Some(MemBackend {
                    backend_type: MemBackendType::File,
                    backend_path: mem,
                }),
                resume_vm: resume,
                network_overrides: net
                    .iter()
                    .map(|n| match n.split_once('=') {
                        Some((iface, tap)) if !iface.is_empty() && !tap.is_empty() => {
                            Ok(NetworkOverride {
                                iface_id: iface.into(),
                                host_dev_name: tap.into(),
                            })
                        }
                        _ => Err(format!("--net {n}: give IFACE=TAP")),
                    })
                    .collect::<Result<_, _>>()?,
                ..Default::default()
            }),
        })
    }
}

/// `machine-config` subcommands.
#[derive(Debug, Subcommand)]
pub enum MachineConfigCmd {
    /// Show the machine configuration.
    Get,
    /// Replace the machine configuration (PUT).
    Set {
        /// Number of vCPUs.
        #[arg(long)]
        vcpus: u32,
        /// Guest RAM in MiB.
        #[arg(long, value_name = "MIB")]
        mem_mib: u64,
        #[command(flatten)]
        extra: MachineExtra,
    },
    /// Change only the fields given (PATCH).
    Patch {
        /// Number of vCPUs.
        #[arg(long)]
        vcpus: Option<u32>,
        /// Guest RAM in MiB.
        #[arg(long, value_name = "MIB")]
        mem_mib: Option<u64>,
        #[command(flatten)]
        extra: MachineExtra,
    },
}

/// Firecracker's optional machine-config fields (skiff accepts only their defaults).
#[derive(Debug, Args)]
pub struct MachineExtra {
    /// Simultaneous multithreading (skiff: only false).
    #[arg(long, value_name = "BOOL")]
    smt: Option<bool>,
    /// Dirty-page tracking (skiff: only false).
    #[arg(long, value_name = "BOOL")]
    track_dirty_pages: Option<bool>,
    /// CPU template (skiff: only None).
    #[arg(long, value_name = "NAME")]
    cpu_template: Option<String>,
    /// Guest RAM pages: None or 2M (2 MiB huge pages from the host's pool).
    #[arg(long, value_name = "NAME")]
    huge_pages: Option<String>,
}

/// `drive` subcommands.
#[derive(Debug, Subcommand)]
pub enum DriveCmd {
    /// Add or replace a drive before boot (PUT).
    Put {
        /// Drive id.
        id: String,
        /// Raw image, served by a skiff-blk that skiff starts.
        #[arg(long, value_name = "PATH", required_unless_present = "vhost_socket")]
        path: Option<String>,
        /// Socket of an external vhost-user-blk backend, instead of --path (Firecracker's
        /// `socket` field; the global --socket is the API socket).
        #[arg(long, value_name = "SOCK", conflicts_with = "path")]
        vhost_socket: Option<String>,
        /// The guest's root device.
        #[arg(long)]
        root: bool,
        /// Read-only.
        #[arg(long)]
        read_only: bool,
    },
    /// Swap the medium of a running VM's drive (PATCH).
    Patch {
        /// Drive id.
        id: String,
        /// New image.
        #[arg(long, value_name = "PATH")]
        path: String,
    },
}

/// `net` subcommands.
#[derive(Debug, Subcommand)]
pub enum NetCmd {
    /// Add or replace a network interface before boot (PUT).
    Put {
        /// Interface id.
        id: String,
        /// Host TAP device (opened, or created, by skiff-net).
        #[arg(long, value_name = "NAME")]
        tap: String,
        /// Guest MAC, aa:bb:cc:dd:ee:ff.
        #[arg(long)]
        mac: Option<String>,
    },
    /// Change a running VM's interface (PATCH; Firecracker changes only rate limiters).
    Patch {
        /// Interface id.
        id: String,
        /// Receive rate limiter, as JSON (skiff: not supported).
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        rx_rate_limiter: Option<serde_json::Value>,
        /// Transmit rate limiter, as JSON (skiff: not supported).
        #[arg(long, value_name = "JSON", value_parser = parse_json)]
        tx_rate_limiter: Option<serde_json::Value>,
    },
}

/// Log levels, as Firecracker names them.
#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Level {
    Off,
    Error,
    Warning,
    Info,
    Debug,
    Trace,
}

fn parse_json(s: &str) -> Result<serde_json::Value, String> {
    serde_json::from_str(s).map_err(|e| format!("not JSON: {e}"))
}

/// Body of a `raw` request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RawBody {
    /// No body.
    None,
    /// Given on the command line.
    Arg(String),
    /// Read from stdin.
    Stdin,
}

/// One thing to ask of the API.
#[derive(Clone, Debug, PartialEq)]
pub enum Op {
    Info,
    Version,
    GetMachineConfig,
    PutMachineConfig(MachineConfig),
    PatchMachineConfig(MachineConfigUpdate),
    PutBootSource(BootSource),
    PutDrive(Drive),
    PatchDrive(PartialDrive),
    PutNet(NetworkInterface),
    PatchNet(PartialNetworkInterface),
    Action(ActionType),
    PatchVm(VmStateChange),
    VmConfig,
    PutLogger(Logger),
    PutMetrics(Metrics),
    SkiffVm,
    SkiffDevices,
    SkiffMetrics,
    UpgradeDevice {
        id: String,
        binary: Option<String>,
    },
    UpgradeAll(VmUpgrade),
    UpgradeVmm(VmmUpgrade),
    PowerButton,
    CreateSnapshot(SnapshotCreateParams),
    LoadSnapshot(SnapshotLoadParams),
    Raw {
        method: String,
        path: String,
        body: RawBody,
    },
    WaitReady,
}

impl Op {
    /// The route this operation uses: method and path pattern as in the router's table
    /// (`None` for `raw` and `wait-ready`).
    pub fn endpoint(&self) -> Option<(&'static str, &'static str)> {
        Some(match self {
            Op::Info => ("GET", "/"),
            Op::Version => ("GET", "/version"),
            Op::GetMachineConfig => ("GET", "/machine-config"),
            Op::PutMachineConfig(_) => ("PUT", "/machine-config"),
            Op::PatchMachineConfig(_) => ("PATCH", "/machine-config"),
            Op::PutBootSource(_) => ("PUT", "/boot-source"),
            Op::PutDrive(_) => ("PUT", "/drives/{drive_id}"),
            Op::PatchDrive(_) => ("PATCH", "/drives/{drive_id}"),
            Op::PutNet(_) => ("PUT", "/network-interfaces/{iface_id}"),
            Op::PatchNet(_) => ("PATCH", "/network-interfaces/{iface_id}"),
            Op::Action(_) => ("PUT", "/actions"),
            Op::PatchVm(_) => ("PATCH", "/vm"),
            Op::VmConfig => ("GET", "/vm/config"),
            Op::PutLogger(_) => ("PUT", "/logger"),
            Op::PutMetrics(_) => ("PUT", "/metrics"),
            Op::SkiffVm => ("GET", "/skiff/vm"),
            Op::SkiffDevices => ("GET", "/skiff/devices"),
            Op::SkiffMetrics => ("GET", "/skiff/metrics"),
            Op::UpgradeDevice { .. } => ("PUT", "/skiff/devices/{id}/upgrade"),
            Op::UpgradeAll(_) => ("PUT", "/skiff/upgrade"),
            Op::UpgradeVmm(_) => ("PUT", "/skiff/vmm/upgrade"),
            Op::PowerButton => ("PUT", "/skiff/power-button"),
            Op::CreateSnapshot(_) => ("PUT", "/snapshot/create"),
            Op::LoadSnapshot(_) => ("PUT", "/snapshot/load"),
            Op::Raw { .. } | Op::WaitReady => return None,
        })
    }
}

impl MachineExtra {
    fn update(self, vcpu_count: Option<u32>, mem_size_mib: Option<u64>) -> MachineConfigUpdate {
        MachineConfigUpdate {
            vcpu_count,
            mem_size_mib,
            smt: self.smt,
            track_dirty_pages: self.track_dirty_pages,
            cpu_template: self.cpu_template,
            huge_pages: self.huge_pages,
        }
    }
}

impl From<Level> for LogLevel {
    fn from(l: Level) -> Self {
        match l {
            Level::Off => LogLevel::Off,
            Level::Error => LogLevel::Error,
            Level::Warning => LogLevel::Warning,
            Level::Info => LogLevel::Info,
            Level::Debug => LogLevel::Debug,
            Level::Trace => LogLevel::Trace,
        }
    }
}

/// Flags that are on only when given: sent as `true`, left out otherwise.
fn flag(on: bool) -> Option<bool> {
    on.then_some(true)
}

impl Cmd {
    /// What this subcommand asks of the API. `Err` is a usage error clap cannot express.
    pub fn op(self) -> Result<Op, String> {
        Ok(match self {
            Cmd::Info => Op::Info,
            Cmd::Version => Op::Version,
            Cmd::MachineConfig(MachineConfigCmd::Get) => Op::GetMachineConfig,
            Cmd::MachineConfig(MachineConfigCmd::Set {
                vcpus,
                mem_mib,
                extra,
            }) => Op::PutMachineConfig(extra.update(None, None).apply(&MachineConfig {
                vcpu_count: vcpus,
                mem_size_mib: mem_mib,
                ..MachineConfig::default()
            })),
            Cmd::MachineConfig(MachineConfigCmd::Patch {
                vcpus,
                mem_mib,
                extra,
            }) => {
                let update = extra.update(vcpus, mem_mib);
                if update == MachineConfigUpdate::default() {
                    return Err("machine-config patch: give at least one field to change".into());
                }
                Op::PatchMachineConfig(update)
            }
            Cmd::BootSource {
                kernel,
                boot_args,
                initrd,
            } => Op::PutBootSource(BootSource {
                kernel_image_path: kernel,
                boot_args,
                initrd_path: initrd,
            }),
            Cmd::Drive(DriveCmd::Put {
                id,
                path,
                vhost_socket,
                root,
                read_only,
            }) => Op::PutDrive(Drive {
                drive_id: id,
                path_on_host: path,
                socket: vhost_socket,
                is_root_device: root,
                is_read_only: flag(read_only),
                ..Drive::default()
            }),
            Cmd::Drive(DriveCmd::Patch { id, path }) => Op::PatchDrive(PartialDrive {
                drive_id: id,
                path_on_host: Some(path),
                rate_limiter: None,
            }),
            Cmd::Net(NetCmd::Put { id, tap, mac }) => Op::PutNet(NetworkInterface {
                iface_id: id,
                host_dev_name: tap,
                guest_mac: mac,
                ..NetworkInterface::default()
            }),
            Cmd::Net(NetCmd::Patch {
                id,
                rx_rate_limiter,
                tx_rate_limiter,
            }) => Op::PatchNet(PartialNetworkInterface {
                iface_id: id,
                rx_rate_limiter,
                tx_rate_limiter,
            }),
            Cmd::Start => Op::Action(ActionType::InstanceStart),
            Cmd::CtrlAltDel => Op::Action(ActionType::SendCtrlAltDel),
            Cmd::PowerButton => Op::PowerButton,
            Cmd::FlushMetrics => Op::Action(ActionType::FlushMetrics),
            Cmd::Pause => Op::PatchVm(VmStateChange::Paused),
            Cmd::Resume => Op::PatchVm(VmStateChange::Resumed),
            Cmd::Config => Op::VmConfig,
            Cmd::Logger {
                path,
                level,
                show_level,
                show_origin,
                module,
            } => Op::PutLogger(Logger {
                log_path: path,
                level: level.map(LogLevel::from),
                show_level: flag(show_level),
                show_log_origin: flag(show_origin),
                module,
            }),
            Cmd::MetricsFile { path } => Op::PutMetrics(Metrics { metrics_path: path }),
            Cmd::State => Op::SkiffVm,
            Cmd::Devices => Op::SkiffDevices,
            Cmd::Metrics => Op::SkiffMetrics,
            Cmd::Upgrade {
                id,
                all,
                vmm,
                binary,
                blk_binary,
                net_binary,
            } => match (id, all) {
                _ if vmm => Op::UpgradeVmm(VmmUpgrade { binary }),
                (None, true) => Op::UpgradeAll(VmUpgrade {
                    blk_binary,
                    net_binary,
                }),
                (Some(id), false) => Op::UpgradeDevice { id, binary },
                _ => return Err("upgrade: give a device id or --all".into()),
            },
            Cmd::Snapshot(c) => c.op()?,
            Cmd::Raw { method, path, body } => Op::Raw {
                method: method.to_ascii_uppercase(),
                path,
                body: match body.as_deref() {
                    None => RawBody::None,
                    Some("-") => RawBody::Stdin,
                    Some(_) => RawBody::Arg(body.unwrap_or_default()),
                },
            },
            Cmd::WaitReady => Op::WaitReady,
        })
    }
}

#[cfg(test)]
#[path = "cli_tests.rs"]
mod tests;
