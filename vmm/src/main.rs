//! `skiff`: boot a Linux microVM on KVM.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use vmm::builder::BuildOptions;
use vmm::config::{ConsoleConfig, DriveBackend, DriveConfig, NetConfig, VmConfig};
use vmm::device_binary::BinaryDir;
use vmm::error_chain;
use vmm::exit::ExitReason;
use vmm::vmm::{Vmm, VmmOptions};

/// skiff: a KVM micro-hypervisor. Boots a Linux guest (ELF vmlinux with PVH or 64-bit
/// entry, or bzImage) with a serial console on stdio, virtio-blk drives served by
/// skiff-blk and virtio-net interfaces served by skiff-net device processes.
///
/// Ways to start:
///   skiff --api-sock PATH                      wait for configuration over the API
///   skiff --api-sock PATH --config-file FILE   boot from FILE, keep the API for runtime
///   skiff --no-api --config-file FILE          boot from FILE, no API
///   skiff run --kernel ... [--api-sock PATH]   boot from the command line
///
/// seccomp: every thread runs under a filter of its kind (vmm: the event loop once the VM
/// started; api; vcpu; reaper), and skiff-blk/skiff-net get the same choice (--no-seccomp,
/// --seccomp-filter FILE) on their command line. A forbidden system call kills the process
/// by SIGSYS after a line on stderr naming the call and the thread.
///
/// Exit status: 0 when the guest reboots or powers off, 1 on an error (message on stderr),
/// 3 when the guest kernel panicked, 128+N when stopped by signal N (SIGTERM, SIGINT,
/// SIGHUP end the VM cleanly).
#[derive(Parser, Debug)]
#[command(version, args_conflicts_with_subcommands = true, verbatim_doc_comment)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
    /// Boot from a Firecracker-format configuration file (boot-source, machine-config,
    /// drives, network-interfaces, logger, metrics).
    #[arg(long, value_name = "FILE")]
    config_file: Option<PathBuf>,
    /// Run without the control API (needs --config-file).
    #[arg(long, conflicts_with = "api_sock")]
    no_api: bool,
    /// Print the built-in seccomp filters in the --seccomp-filter format and exit.
    #[arg(long)]
    print_seccomp_filters: bool,
    #[command(flatten)]
    common: Common,
}

#[derive(Args, Debug)]
struct Common {
    /// Guest console: stdio, none, or file:PATH.
    #[arg(long, default_value = "stdio", global = true)]
    console: ConsoleConfig,
    /// The most a console file (--console file:PATH) holds, in MiB: past it, the oldest
    /// output is dropped (the newest half is kept) and skiff logs it once.
    #[arg(long, value_name = "MIB", default_value_t = 64, global = true)]
    console_file_limit_mib: u64,
    /// The only directory device processes are started from: skiff-blk, skiff-net and the
    /// binaries named by upgrade requests (default: the directory of skiff). It and the
    /// programs in it must be owned by root or skiff's user and writable by the owner only;
    /// programs run with a cleared environment (RUST_LOG excepted).
    #[arg(long, value_name = "DIR", global = true)]
    device_bin_dir: Option<PathBuf>,
    /// Serve the control API (Firecracker-compatible HTTP/JSON) on this Unix socket. A
    /// stale socket file is replaced; the socket is created owner-only (0600).
    #[arg(long, value_name = "PATH", global = true)]
    api_sock: Option<PathBuf>,
    /// Set by skiff-jailer: the fd of a launcher socket (SOCK_SEQPACKET) over which skiff
    /// asks the jailer to start its device processes, each in a cell of its own under
    /// another uid, instead of starting them itself (docs/confinement.md).
    #[arg(long, value_name = "N", global = true)]
    launcher_fd: Option<i32>,
    /// Set by skiff-jailer for a live upgrade of the VMM (`PUT /skiff/vmm/upgrade`): the
    /// fd of a socket to the running VMM, which hands this process its VM (its state,
    /// guest RAM, device connections and API socket) instead of booting one.
    #[arg(long, value_name = "N", global = true, requires = "launcher_fd")]
    handover_fd: Option<i32>,
    /// Put the virtio devices on PCI (virtio-pci with MSI-X behind one host bridge, ECAM in
    /// ACPI's MCFG) instead of virtio-mmio, as Firecracker's --enable-pci does; applies to
    /// `run`, --config-file and API-configured VMs. A snapshot or a live upgrade keeps the
    /// transport the VM booted with.
    #[arg(long, global = true)]
    enable_pci: bool,
    /// Instance id, reported by GET / and in log lines.
    #[arg(long, default_value = "anonymous-instance", global = true)]
    id: String,
    #[command(flatten)]
    seccomp: sandbox::SeccompArgs,
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
    /// Arguments appended to the default kernel command line. `acpi=off` here (or in
    /// --boot-args) boots the guest without ACPI tables: its devices are then declared on the
    /// command line (virtio_mmio.device=) and its poweroff cannot end the VM.
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
    /// How skiff-blk does the I/O of every image drive (--rootfs and --drive path=): sync
    /// (its worker threads read and write the image) or async (each queue's requests in
    /// flight together through io_uring; the API's `io_engine: Async`, as in Firecracker).
    #[arg(long, value_enum, default_value_t = IoEngine::Sync)]
    io_engine: IoEngine,
    /// Guest RAM's pages: none (the host's normal pages) or 2M (2 MiB hugetlbfs pages from
    /// the host's pool, vm.nr_hugepages; the machine-config's `huge_pages`, as in
    /// Firecracker). --memory must then be a multiple of 2.
    #[arg(long, value_enum, default_value_t = HugePages::None)]
    huge_pages: HugePages,
}

/// `run --huge-pages`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum HugePages {
    None,
    #[value(name = "2M")]
    TwoM,
}

/// `run --io-engine`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
enum IoEngine {
    Sync,
    Async,
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
            io_uring: a.io_engine == IoEngine::Async,
        });
    }
    for (i, spec) in a.drive.iter().enumerate() {
        let mut d = DriveConfig {
            id: format!("drive{}", i + 1),
            backend: DriveBackend::Image(PathBuf::new()),
            is_root: false,
            read_only: false,
            io_uring: false,
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
        d.io_uring = a.io_engine == IoEngine::Async && matches!(d.backend, DriveBackend::Image(_));
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
        huge_pages: a.huge_pages == HugePages::TwoM,
        drives,
        nets,
        console,
    })
}

/// What the VMM being replaced handed this one.
struct Received {
    stream: std::os::unix::net::UnixStream,
    handover: vmm::handover::Handover,
    fds: Vec<std::os::fd::OwnedFd>,
    prepared: vmm::builder::Prepared,
}

/// Says hello on the hand-over socket at `fd`, prepares the KVM VM over the guest RAM
/// while the old VMM still runs the guest, and reads the hand-over.
fn receive_handover(fd: i32) -> Result<Received, String> {
    use std::os::fd::FromRawFd;
    // SAFETY: F_GETFD on a number; no memory is passed.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(format!("--handover-fd {fd} is not open"));
    }
    // SAFETY: the fd is open and skiff-jailer handed it to this process to own.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    // SAFETY: fcntl on an fd we own.
    unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
    let stream = std::os::unix::net::UnixStream::from(owned);
    let timeout = std::time::Duration::from_secs(60);
    vmm::handover::send_line(&stream, &vmm::upgrade::hello()).map_err(|e| error_chain(&e))?;
    // The hello lists FEATURE_PREPARE: the old VMM sends the guest RAM first.
    let (bytes, memfd) =
        vmm::handover::recv_prepare(&stream, timeout).map_err(|e| error_chain(&e))?;
    let prepared = match vmm::builder::prepare(std::fs::File::from(memfd), bytes) {
        Ok(p) => p,
        Err(e) => {
            let why = error_chain(&e);
            let _ = vmm::handover::send_line(&stream, &format!("ERROR {}", why.replace('\n', " ")));
            return Err(why);
        }
    };
    vmm::handover::send_line(&stream, "PREPARED").map_err(|e| error_chain(&e))?;
    let (handover, fds) = vmm::handover::recv(&stream, timeout).map_err(|e| error_chain(&e))?;
    Ok(Received {
        stream,
        handover,
        fds,
        prepared,
    })
}

fn fail(msg: &str) -> ExitCode {
    eprintln!("skiff: error: {msg}");
    ExitCode::from(1)
}

/// What to boot at start-up, if anything.
enum Boot {
    /// Wait for InstanceStart over the API.
    Later,
    /// A config file.
    File(Box<api_server::models::VmConfigFile>),
    /// `skiff run` arguments.
    Run(VmConfig),
}

/// The API thread's link, its handle, and a copy of the listening socket (for a VMM that
/// replaces this one).
type Api = (
    vmm::vmm::ApiLink,
    api_server::server::ApiServerHandle,
    std::os::fd::OwnedFd,
);

/// Serves the API on `path`: binds it, or accepts on `inherited`, the listening socket a
/// VMM this one replaces handed over.
fn start_api(
    path: &std::path::Path,
    inherited: Option<std::os::fd::OwnedFd>,
    filters: &sandbox::ThreadFilters,
) -> Result<Api, String> {
    let server = match inherited {
        Some(fd) => api_server::server::ApiServer::from_listener(
            std::os::unix::net::UnixListener::from(fd),
            path.to_path_buf(),
        ),
        None => api_server::server::ApiServer::bind(path).map_err(|e| error_chain(&e))?,
    };
    let listener = server
        .listener()
        .try_clone()
        .map_err(|e| format!("cannot keep a copy of the API socket: {e}"))?
        .into();
    let wake = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| format!("cannot create the API eventfd: {e}"))?;
    let wake_api = wake
        .try_clone()
        .map_err(|e| format!("cannot create the API eventfd: {e}"))?;
    let metrics = std::sync::Arc::new(api_server::metrics::ApiMetrics::new());
    let (tx, rx) = std::sync::mpsc::channel();
    let filters = filters.clone();
    let init: api_server::server::ThreadInit =
        Box::new(move || filters.install("api").map_err(|e| error_chain(&e)));
    let handle = server
        .spawn_with_init(tx, wake_api, metrics.clone(), init)
        .map_err(|e| error_chain(&e))?;
    let gate = handle.accept_gate();
    Ok((
        vmm::vmm::ApiLink {
            rx,
            wake,
            metrics,
            gate,
        },
        handle,
        listener,
    ))
}

fn main() -> ExitCode {
    vmm::logger::init();
    let cli = Cli::parse();
    if cli.print_seccomp_filters {
        print!("{}", sandbox::filters::all_json());
        return ExitCode::SUCCESS;
    }
    let seccomp = cli.common.seccomp.choice();
    let filters = match sandbox::ThreadFilters::load(&seccomp, "skiff", sandbox::filters::VMM_KINDS)
    {
        Ok(f) => f,
        Err(e) => return fail(&error_chain(&e)),
    };
    if !filters.is_on() {
        log::warn!(
            "seccomp is off (--no-seccomp): no thread of skiff or its device processes is filtered"
        );
    }
    let console = cli.common.console.clone();
    let api_sock = cli.common.api_sock.clone();
    let boot = match (cli.command, cli.config_file) {
        (Some(Command::Run(a)), _) => config_from_run(a, console.clone()).map(Boot::Run),
        (None, Some(file)) => {
            if !cli.no_api && api_sock.is_none() {
                return fail("--config-file needs --api-sock PATH (keep the API for runtime requests) or --no-api");
            }
            VmConfig::read_file(&file)
                .map(|f| Boot::File(Box::new(f)))
                .map_err(|e| error_chain(&e))
        }
        (None, None) if api_sock.is_some() => Ok(Boot::Later),
        (None, None) => Err("nothing to boot: use `skiff --api-sock PATH`, `skiff --no-api --config-file FILE` or `skiff run --kernel ...` (see --help)".into()),
    };
    let boot = match boot {
        Ok(b) => b,
        Err(e) => return fail(&e),
    };
    let pvm = vmm::host::is_pvm_host();
    if pvm {
        log::warn!("{}", vmm::host::PVM_EXPLANATION);
    }
    // Signals are blocked and the API socket bound before any other thread starts.
    let signals = match vmm::vmm::block_termination_signals() {
        Ok(s) => s,
        Err(e) => return fail(&error_chain(&e)),
    };
    let device_bins = match BinaryDir::open(cli.common.device_bin_dir.as_deref()) {
        Ok(d) => d,
        Err(e) => return fail(&error_chain(&e)),
    };
    let device_bins = match cli.common.launcher_fd {
        Some(fd) => match sandbox::launch::LauncherClient::from_raw_fd(fd) {
            Ok(l) => device_bins.with_launcher(std::sync::Arc::new(l)),
            Err(e) => return fail(&error_chain(&e)),
        },
        None => device_bins,
    };
    // A live upgrade: the running VMM hands this one its VM (after the hello, it pauses
    // the guest and sends everything).
    let handover = match cli.common.handover_fd {
        Some(fd) => match receive_handover(fd) {
            Ok(h) => Some(h),
            Err(e) => return fail(&format!("live upgrade: {e}")),
        },
        None => None,
    };
    let mut handover = handover;
    let inherited = handover.as_mut().and_then(|r| {
        if r.handover.api_listener {
            r.handover.api_listener = false;
            r.fds.pop()
        } else {
            None
        }
    });
    let (api, api_handle, api_listener) = match &api_sock {
        Some(p) => match start_api(p, inherited, &filters) {
            Ok((link, handle, listener)) => (Some(link), Some(handle), Some(listener)),
            Err(e) => return fail(&e),
        },
        None => (None, None, None),
    };
    let device_seccomp = match vmm::builder::DeviceSeccomp::new(&seccomp) {
        Ok(d) => d,
        Err(e) => return fail(&format!("cannot open the --seccomp-filter file: {e}")),
    };
    let mut vmm = match Vmm::new(VmmOptions {
        id: cli.common.id.clone(),
        console: console.clone(),
        build: BuildOptions {
            device_bins,
            console_file_limit: cli.common.console_file_limit_mib.saturating_mul(1 << 20),
            seccomp: device_seccomp,
            filters,
            pci: cli.common.enable_pci,
        },
        signals,
        api,
        api_listener,
    }) {
        Ok(v) => v,
        Err(e) => return fail(&error_chain(&e)),
    };
    if let Some(r) = handover {
        if let Err(e) = vmm.take_over(&r.stream, r.handover, r.fds, r.prepared) {
            eprintln!("skiff: error: live upgrade: cannot take the VM over: {e}");
            // Nothing of the VM's may be stopped or closed in order here: the old VMM
            // resumes it.
            std::process::exit(1);
        }
    }
    let boot_now = match boot {
        _ if cli.common.handover_fd.is_some() => false,
        Boot::Later => false,
        Boot::File(spec) => {
            if let Some(l) = &spec.logger {
                if let Err(e) = vmm.set_logger(l) {
                    return fail(&e);
                }
            }
            if let Some(m) = &spec.metrics {
                if let Err(e) = vmm.set_metrics(&m.metrics_path) {
                    return fail(&e);
                }
            }
            vmm.configure(*spec, None);
            true
        }
        Boot::Run(cfg) => {
            vmm.configure(cfg.to_model(), cfg.extra_args.clone());
            true
        }
    };
    if boot_now {
        if let Err(e) = vmm.start() {
            return fail(&error_chain(&e));
        }
    }
    // The terminal goes raw when the VM starts (Vmm::start) and back at its end.
    let reason = vmm.run();
    let panicked = vmm.panic_line();
    match (reason, panicked) {
        (Err(e), _) => fail(&error_chain(&e)),
        (Ok(_), Some(line)) => {
            eprintln!("skiff: guest kernel panicked: {line}");
            ExitCode::from(3)
        }
        (Ok(ExitReason::Reset(how)), None) => {
            log::info!("guest rebooted or powered off ({how}); exiting");
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
        (Ok(ExitReason::HandedOver(pid)), _) => {
            log::info!("the VM is handed over to the new VMM, pid {pid}; exiting");
            // The answer to the upgrade request goes out; the socket file stays, the new
            // VMM accepts on it.
            if let Some(h) = api_handle {
                h.release();
            }
            ExitCode::SUCCESS
        }
        (Ok(ExitReason::Signal(sig)), None) => {
            log::info!("stopped by signal {sig}");
            ExitCode::from(128 + sig as u8)
        }
    }
}
