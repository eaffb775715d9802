//! `skiff`: boot a Linux microVM on KVM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::builder::{build, BuildOptions};
use vmm::config::{ConsoleConfig, DriveBackend, DriveConfig, NetConfig, VmConfig};
use vmm::exit::ExitReason;

/// skiff: a KVM micro-hypervisor. Boots a Linux guest (ELF vmlinux with PVH or 64-bit
/// entry, or bzImage) with a serial console on stdio, virtio-blk drives served by
/// skiff-blk and virtio-net interfaces served by skiff-net device processes.
///
/// Exit status: 0 when the guest reboots or powers off, 1 on an error (message on stderr),
/// 3 when the guest kernel panicked, 128+N when stopped by signal N.
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Boot from a Firecracker-format configuration file (boot-source, machine-config,
    /// drives, network-interfaces).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the control API (required until the API lands; accepted for
    /// Firecracker compatibility).
    #[arg(long)]
    no_api: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    /// Guest console: stdio, none, or file:PATH.
    #[arg(long, default_value = "stdio", global = true)]
    console: ConsoleConfig,
    /// Directory holding skiff-blk and skiff-net (default: next to skiff, then PATH).
    #[arg(long, value_name = "DIR", global = true)]
    device_bin_dir: Option<PathBuf>,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Boot a microVM described on the command line.
    Run(RunArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Guest kernel: ELF vmlinux or bzImage.
    #[arg(long, value_name = "PATH")]
    kernel: PathBuf,
    /// Root filesystem image (raw), attached as /dev/vda.
    #[arg(long, value_name = "PATH")]
    rootfs: Option<PathBuf>,
    /// Attach the root filesystem read-only.
    #[arg(long)]
    rootfs_ro: bool,
    /// Initrd.
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u32,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Arguments appended to the default kernel command line.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    cmdline: Option<String>,
    /// Replace the default kernel command line base.
    #[arg(long, value_name = "ARGS", allow_hyphen_values = true)]
    boot_args: Option<String>,
    /// Extra drive: path=IMAGE[,ro][,id=ID] or socket=SOCK[,id=ID] (repeatable; /dev/vdb, ...).
    #[arg(long, value_name = "SPEC")]
    drive: Vec<String>,
    /// Network interface: tap=NAME[,mac=MAC][,id=ID] (repeatable).
    #[arg(long, value_name = "SPEC")]
    net: Vec<String>,
}

fn parse_kv(spec: &str, what: &str) -> Result<Vec<(String, String)>, String> {
    spec.split(',')
        .filter(|p| !p.is_empty())
        .map(|p| match p.split_once('=') {
            Some((k, v)) => Ok((k.to_string(), v.to_string())),
            None if p == "ro" => Ok(("ro".into(), "true".into())),
            None => Err(format!("--{what} '{spec}': '{p}' is not key=value")),
        })
        .collect()
}

fn config_from_run(a: RunArgs, console: ConsoleConfig) -> Result<VmConfig, String> {
    let mut drives = Vec::new();
    if let Some(root) = a.rootfs {
        drives.push(DriveConfig {
            id: "rootfs".into(),
            backend: DriveBackend::Image(root),
            is_root: true,
            read_only: a.rootfs_ro,
        });
    }
    for (i, spec) in a.drive.iter().enumerate() {
        let mut d = DriveConfig {
            id: format!("drive{}", i + 1),
            backend: DriveBackend::Image(PathBuf::new()),
            is_root: false,
            read_only: false,
        };
        let mut have_backend = false;
        for (k, v) in parse_kv(spec, "drive")? {
            match k.as_str() {
                "path" => {
                    d.backend = DriveBackend::Image(v.into());
                    have_backend = true;
                }
                "socket" => {
                    d.backend = DriveBackend::Socket(v.into());
                    have_backend = true;
                }
                "ro" => d.read_only = v != "false",
                "id" => d.id = v,
                other => {
                    return Err(format!(
                        "--drive '{spec}': unknown key '{other}' (path, socket, ro, id)"
                    ))
                }
            }
        }
        if !have_backend {
            return Err(format!("--drive '{spec}': needs path=IMAGE or socket=SOCK"));
        }
        drives.push(d);
    }
    let mut nets = Vec::new();
    for (i, spec) in a.net.iter().enumerate() {
        let mut n = NetConfig {
            id: format!("eth{i}"),
            tap: String::new(),
            mac: None,
        };
        for (k, v) in parse_kv(spec, "net")? {
            match k.as_str() {
                "tap" => n.tap = v,
                "mac" => n.mac = Some(v),
                "id" => n.id = v,
                other => {
                    return Err(format!(
                        "--net '{spec}': unknown key '{other}' (tap, mac, id)"
                    ))
                }
            }
        }
        if n.tap.is_empty() {
            return Err(format!("--net '{spec}': needs tap=NAME"));
        }
        nets.push(n);
    }
    Ok(VmConfig {
        kernel: a.kernel,
        initrd: a.initrd,
        boot_args: a.boot_args,
        extra_args: a.cmdline,
        vcpus: a.vcpus,
        mem_mib: a.memory,
        drives,
        nets,
        console,
    })
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("skiff: error: {msg}");
    ExitCode::from(1)
}

fn main() -> ExitCode {
    vmm::logger::init();
    let cli = Cli::parse();
    let console = cli.common.console.clone();
    let cfg = match (cli.command, cli.config_file) {
        (Some(Command::Run(a)), _) => config_from_run(a, console.clone()),
        (None, Some(file)) => {
            if !cli.no_api {
                return fail("the control API is not available yet: pass --no-api with --config-file");
            }
            vmm::config::VmConfig::from_file(&file)
                .map(|mut c| {
                    c.console = console.clone();
                    c
                })
                .map_err(|e| error_chain(&e))
        }
        (None, None) => Err("nothing to boot: use `skiff --no-api --config-file FILE` or `skiff run --kernel ...` (see --help)".into()),
    };
    let cfg = match cfg {
        Ok(c) => c,
        Err(e) => return fail(&e),
    };
    let pvm = vmm::host::is_pvm_host();
    if pvm {
        log::warn!("{}", vmm::host::PVM_EXPLANATION);
    }
    let signals = match vmm::vmm::block_termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(&error_chain(&e)),
    };
    let opts = BuildOptions {
        device_bin_dir: cli.common.device_bin_dir,
    };
    let mut processes = Vec::new();
    let mut runtime = None;
    let built = build(&cfg, &opts, &mut processes, &mut runtime);
    let vm = match built {
        Ok(vm) => vm,
        Err(e) => {
            for p in processes {
                p.stop(std::time::Duration::from_millis(500));
            }
            if let Some(dir) = runtime {
                let _ = std::fs::remove_dir_all(dir);
            }
            return fail(&error_chain(&e));
        }
    };
    let panic = vm.panic.clone();
    let raw = if cfg.console == ConsoleConfig::Stdio {
        vmm::terminal::RawTerminal::enter()
    } else {
        None
    };
    let reason = vmm::vmm::run(vm, &cfg.console, &signals);
    drop(raw);
    let panicked = panic.lock().map(|p| p.clone()).unwrap_or(None);
    match (reason, panicked) {
        (Err(e), _) => fail(&error_chain(&e)),
        (Ok(_), Some(line)) => {
            eprintln!("skiff: guest kernel panicked: {line}");
            ExitCode::from(3)
        }
        (Ok(ExitReason::Reset(how)), None) => {
            log::info!("guest rebooted ({how}); exiting");
            ExitCode::SUCCESS
        }
        (Ok(ExitReason::Halted), None) => {
            fail("a vCPU halted with interrupts disabled; the guest cannot continue")
        }
        (Ok(ExitReason::Panic(line)), None) => {
            eprintln!("skiff: guest kernel panicked: {line}");
            ExitCode::from(3)
        }
        (Ok(ExitReason::KvmFailure(why)), None) => {
            if pvm {
                fail(&format!("{why}. {}", vmm::host::PVM_EXPLANATION))
            } else {
                fail(&why)
            }
        }
        (Ok(ExitReason::DeviceFailure(why)), None) => {
            fail(&format!("device process failed: {why}"))
        }
        (Ok(ExitReason::Signal(sig)), None) => {
            log::info!("stopped by signal {sig}");
            ExitCode::from(128 + sig as u8)
        }
    }
}
