//! Builds a running microVM from a [`VmConfig`]: KVM VM, guest RAM, device processes,
//! devices, kernel, boot information and vCPUs.

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{cpuid, loader, mptable, regs};
use crate::config::{ConsoleConfig, DriveBackend, VmConfig};
use crate::device_binary::{BinaryDir, DeviceBinary, DeviceBinaryError};
use crate::device_process::{DeviceProcess, DeviceProcessError};
use crate::devices::bus::IoBus;
use crate::devices::i8042::I8042;
use crate::devices::metrics_page::{MetricsPage, MetricsPageError};
use crate::devices::serial::{CappedFile, ConsoleOut, ConsoleSink, SerialDevice};
use crate::devices::virtio::mmio::{MmioTransport, REG_QUEUE_NOTIFY};
use crate::devices::virtio::vhost_user::{
    connect_with_retry, DeviceKind, VhostUserDevice, VhostUserError,
};
use crate::devices::virtio::RamRanges;
use crate::devices::IrqLine;
use crate::exit::VmExit;
use crate::layout::*;
use crate::memory::{create_guest_ram, GuestRam, MemoryError};
use crate::metrics::{SerialMetrics, VcpuMetrics};
use crate::tap::{TapError, TapFd};
use crate::vcpu::{Vcpu, VcpuGate};

/// Errors building the VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// /dev/kvm could not be opened.
    #[error("cannot open /dev/kvm (is KVM available and are you allowed to use it?)")]
    Kvm(#[source] kvm_ioctls::Error),
    /// A KVM VM-level ioctl failed.
    #[error("KVM refused to {0}")]
    KvmVm(&'static str, #[source] kvm_ioctls::Error),
    /// Configuration rejected.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// Guest memory.
    #[error(transparent)]
    Memory(#[from] MemoryError),
    /// Kernel loading.
    #[error(transparent)]
    Loader(#[from] loader::LoaderError),
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// vCPU registers.
    #[error(transparent)]
    Regs(#[from] regs::RegsError),
    /// A device process could not be started.
    #[error(transparent)]
    DeviceProcess(#[from] DeviceProcessError),
    /// A device binary was refused.
    #[error(transparent)]
    DeviceBinary(#[from] DeviceBinaryError),
    /// A vhost-user backend failed during setup.
    #[error("{0}")]
    Backend(String, #[source] VhostUserError),
    /// A device process ended before it answered (how it ended, from
    /// [`DeviceProcess::check_alive`]); the request that found out.
    #[error("{0} before it answered")]
    Ended(String, #[source] VhostUserError),
    /// Too many devices for the IOAPIC pins.
    #[error("{0} virtio devices are more than the {max} interrupt lines skiff has for them", max = IRQ_MAX - VIRTIO_IRQ_BASE + 1)]
    TooManyDevices(usize),
    /// An eventfd or other host resource.
    #[error("cannot create {0}")]
    Host(&'static str, #[source] std::io::Error),
    /// A drive's image.
    #[error("drive '{0}'")]
    Image(String, #[source] crate::image::ImageError),
    /// A network interface's TAP device.
    #[error("network interface '{0}'")]
    Tap(String, #[source] TapError),
    /// A device's metrics page.
    #[error(transparent)]
    MetricsPage(#[from] MetricsPageError),
    /// The console file.
    #[error("cannot open console file {0}")]
    ConsoleFile(String, #[source] std::io::Error),
}

/// A built, not yet running, VM.
pub struct BuiltVm {
    /// KVM VM (kept alive for the vCPUs).
    pub vm: VmFd,
    /// Guest RAM.
    pub ram: GuestRam,
    /// Devices.
    pub bus: Arc<IoBus>,
    /// vCPUs, ready to run.
    pub vcpus: Vec<Vcpu>,
    /// Device processes skiff started.
    pub processes: Vec<DeviceProcess>,
    /// The VM's end latch.
    pub exit: Arc<VmExit>,
    /// Set to stop the vCPUs.
    pub stop: Arc<AtomicBool>,
    /// Signalled when the console holds a partial line to write out.
    pub console_flush: EventFd,
    /// The first panic line seen on the console.
    pub panic: Arc<Mutex<Option<String>>>,
    /// Pause/resume of the vCPUs.
    pub gate: Arc<VcpuGate>,
    /// Exit counters, one block per vCPU.
    pub vcpu_metrics: Vec<Arc<VcpuMetrics>>,
    /// Console counters.
    pub serial_metrics: Arc<SerialMetrics>,
    /// The virtio devices, drives first, in transport order.
    pub devices: Vec<DeviceSlot>,
}

/// One virtio device of a built VM.
pub struct DeviceSlot {
    /// drive_id or iface_id.
    pub id: String,
    /// Block or net.
    pub kind: DeviceKind,
    /// Index into [`IoBus::virtio`].
    pub transport: usize,
    /// Index into [`BuiltVm::processes`] (None for an externally started backend).
    pub process: Option<usize>,
    /// The vhost-user socket of an externally started backend (None for a device process
    /// skiff started: its connection is a socketpair, see [`spawn_connected`]).
    pub socket: Option<PathBuf>,
    /// The device binary skiff started.
    pub binary: Option<PathBuf>,
    /// Image path or TAP name.
    pub backing: String,
    /// Read-only drive.
    pub read_only: bool,
    /// Times the device process was replaced.
    pub restarts: u32,
    /// Times its process died (crash restarts are among `restarts`).
    pub crashes: u32,
    /// How its process last died ("killed by seccomp (SIGSYS)", ...).
    pub last_exit: Option<String>,
    /// The page the device process counts in (kept across its replacements).
    pub metrics: Option<Arc<MetricsPage>>,
    /// The TAP device (net), opened by the VMM and handed to each skiff-net it starts.
    pub tap: Option<Arc<TapFd>>,
    /// The guest MAC (net).
    pub mac: Option<String>,
    /// The maximum number of queues asked of the backend.
    pub max_queues: usize,
    /// The drive's image (block), opened and locked by the VMM and handed to each
    /// skiff-blk it starts.
    pub image: Option<Arc<File>>,
}

impl DeviceSlot {
    /// The counters the device process reports.
    pub fn counters(&self) -> Vec<(String, u64)> {
        self.metrics
            .as_ref()
            .map(|m| m.snapshot())
            .unwrap_or_default()
    }
}

/// Where to find device binaries, and what to hand them.
pub struct BuildOptions {
    /// The directory device binaries (skiff-blk, skiff-net, upgrades) come from.
    pub device_bins: BinaryDir,
    /// The most bytes a console file (`--console file:PATH`) holds.
    pub console_file_limit: u64,
    /// The seccomp choice, handed to the device processes.
    pub seccomp: DeviceSeccomp,
    /// The VMM's own compiled filters (vcpu, vmm, reaper; the API thread's is installed
    /// before the VMM exists).
    pub filters: sandbox::ThreadFilters,
}

/// The seccomp choice as device processes get it: `--seccomp-filter FILE` becomes an fd
/// skiff opened at start (`--seccomp-filter /proc/self/fd/N`, N inherited), so that a
/// device process in a cell of its own, where no path of skiff's is visible, reads the same
/// file, and a file replaced later changes nothing.
pub struct DeviceSeccomp {
    choice: sandbox::SeccompChoice,
    file: Option<File>,
}

impl DeviceSeccomp {
    /// From skiff's own choice; opens the filter file.
    pub fn new(choice: &sandbox::SeccompChoice) -> std::io::Result<Self> {
        Ok(match choice {
            sandbox::SeccompChoice::File(path) => {
                let file = File::open(path)?;
                DeviceSeccomp {
                    choice: sandbox::SeccompChoice::File(PathBuf::from(format!(
                        "/proc/self/fd/{}",
                        file.as_raw_fd()
                    ))),
                    file: Some(file),
                }
            }
            other => DeviceSeccomp {
                choice: other.clone(),
                file: None,
            },
        })
    }

    /// The device process's arguments.
    pub fn args(&self) -> Vec<String> {
        self.choice.to_args()
    }

    /// The fd the device process must inherit, if any.
    pub fn fd(&self) -> Option<BorrowedFd<'_>> {
        self.file.as_ref().map(|f| f.as_fd())
    }
}

/// How the VMM reaches a device's backend.
enum Link {
    /// A device process skiff started ([`BuiltVm::processes`] index), connected over a
    /// socketpair: the VMM's end.
    Process(usize, UnixStream),
    /// An externally started backend listening on this socket.
    External(PathBuf),
}

struct PendingDevice {
    kind: DeviceKind,
    id: String,
    name: String,
    link: Link,
    binary: Option<PathBuf>,
    backing: String,
    read_only: bool,
    max_queues: usize,
    metrics: Option<Arc<MetricsPage>>,
    tap: Option<Arc<TapFd>>,
    mac: Option<String>,
    image: Option<Arc<File>>,
}

/// How long a backend may take to answer one vhost-user request (and an external one to
/// accept the connection).
pub(crate) const BACKEND_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a device process whose connection failed may take to be seen ended: its end
/// of the socketpair closes as it exits, a moment before it can be reaped.
const ENDED_GRACE: Duration = Duration::from_millis(500);

/// Starts device process `name` (`bin args...` with `fds` inherited) connected to the VMM
/// over a socketpair (AF_UNIX, SOCK_STREAM, close-on-exec): the child inherits one end as
/// `--socket-fd N`, appended to `args`, and the VMM closes its copy of that end once the
/// child runs; the other end is returned, with [`BACKEND_TIMEOUT`] on reads and writes as
/// on every vhost-user connection of skiff (the vhost crate retries a read or write that
/// timed out, though, so they do not end a request a live backend never answers). No
/// socket path is shared with the child and there is no connect to retry: the first
/// request waits until the child serves, or fails when it died (see [`negotiate`]).
pub fn spawn_connected(
    name: String,
    bin: &DeviceBinary,
    args: &[String],
    fds: &[BorrowedFd<'_>],
) -> Result<(DeviceProcess, UnixStream), BuildError> {
    let (ours, theirs) = UnixStream::pair()
        .map_err(|e| BuildError::Host("the socketpair of a device process", e))?;
    let mut args = args.to_vec();
    args.push("--socket-fd".into());
    args.push(theirs.as_raw_fd().to_string());
    let mut inherit = fds.to_vec();
    inherit.push(theirs.as_fd());
    // No socket path: DeviceProcess keeps one for processes that listen on a path.
    let process = DeviceProcess::spawn_with_fds(name, bin, &args, &inherit)?;
    // Only the child holds its end now, so its exit shows as the end of the connection.
    drop(theirs);
    for set in [UnixStream::set_read_timeout, UnixStream::set_write_timeout] {
        set(&ours, Some(BACKEND_TIMEOUT))
            .map_err(|e| BuildError::Host("the timeouts of a device connection", e))?;
    }
    Ok((process, ours))
}

/// Negotiates with device process `process` over `stream`, its connection from
/// [`spawn_connected`]. When that fails because the process ended (it exited before or
/// while answering), the error says so and how it ended ([`DeviceProcess::check_alive`]).
pub fn negotiate(
    process: &mut DeviceProcess,
    kind: DeviceKind,
    stream: UnixStream,
    max_queues: usize,
    mem: vm_memory::GuestMemoryMmap,
) -> Result<VhostUserDevice, BuildError> {
    // Kept open while a failure is looked into: a live process that refused a request must
    // not exit because its connection closed and then be reported as ended.
    let hold = stream.try_clone().ok();
    match VhostUserDevice::new(kind, stream, max_queues, mem) {
        Ok(dev) => Ok(dev),
        Err(e) => {
            let ended = ended_within(process, ENDED_GRACE);
            drop(hold);
            Err(match ended {
                Some(why) => BuildError::Ended(why, e),
                None => BuildError::Backend(
                    format!("{}: vhost-user negotiation failed", process.name),
                    e,
                ),
            })
        }
    }
}

/// How `p` ended, if it has or does within `grace` (its pidfd becomes readable).
fn ended_within(p: &mut DeviceProcess, grace: Duration) -> Option<String> {
    let mut pfd = libc::pollfd {
        fd: p.pidfd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = libc::c_int::try_from(grace.as_millis()).unwrap_or(libc::c_int::MAX);
    // SAFETY: poll reads and writes the one pollfd, which lives across the call.
    unsafe { libc::poll(&mut pfd, 1, ms) };
    p.check_alive().err()
}

/// skiff-blk's arguments for serving the image open on `image`, counting in `page` (the
/// connection, `--socket-fd`, is added by [`spawn_connected`]).
pub fn blk_args(
    image: &File,
    read_only: bool,
    page: &MetricsPage,
    seccomp: &DeviceSeccomp,
) -> Vec<String> {
    let mut args = vec![
        "--image-fd".to_string(),
        image.as_raw_fd().to_string(),
        "--metrics-fd".to_string(),
        page.fd().as_raw_fd().to_string(),
    ];
    if read_only {
        args.push("--read-only".into());
    }
    args.extend(seccomp.args());
    args
}

/// skiff-net's arguments for serving the TAP `tap`, counting in `page` (the connection,
/// `--socket-fd`, is added by [`spawn_connected`]).
pub fn net_args(
    tap: &TapFd,
    mac: Option<&str>,
    page: &MetricsPage,
    seccomp: &DeviceSeccomp,
) -> Vec<String> {
    let mut args = vec![
        "--tap-fd".to_string(),
        tap.as_fd().as_raw_fd().to_string(),
        "--metrics-fd".to_string(),
        page.fd().as_raw_fd().to_string(),
    ];
    if let Some(mac) = mac {
        args.push("--mac".into());
        args.push(mac.to_string());
    }
    args.extend(seccomp.args());
    args
}

/// Starts one device process per drive and network interface.
fn start_device_processes(
    cfg: &VmConfig,
    opts: &BuildOptions,
    processes: &mut Vec<DeviceProcess>,
) -> Result<Vec<PendingDevice>, BuildError> {
    let mut pending = Vec::new();
    let blk = opts.device_bins.resolve(Path::new("skiff-blk"))?;
    let net = opts.device_bins.resolve(Path::new("skiff-net"))?;
    for d in &cfg.drives {
        let name = match &d.backend {
            DriveBackend::Socket(s) => {
                format!("vhost-user backend at {} for drive '{}'", s.display(), d.id)
            }
            DriveBackend::Image(_) => format!("skiff-blk for drive '{}'", d.id),
        };
        let mut metrics = None;
        let mut image_file = None;
        let (link, binary, backing) = match &d.backend {
            DriveBackend::Socket(s) => (Link::External(s.clone()), None, s.display().to_string()),
            DriveBackend::Image(image) => {
                let file = Arc::new(
                    crate::image::open_locked(image, d.read_only)
                        .map_err(|e| BuildError::Image(d.id.clone(), e))?,
                );
                let page = Arc::new(MetricsPage::create(&d.id)?);
                let args = blk_args(&file, d.read_only, &page, &opts.seccomp);
                let mut fds = vec![file.as_fd(), page.fd()];
                fds.extend(opts.seccomp.fd());
                let (process, stream) = spawn_connected(name.clone(), &blk, &args, &fds)?;
                processes.push(process);
                metrics = Some(page);
                image_file = Some(file);
                (
                    Link::Process(processes.len() - 1, stream),
                    Some(blk.path().to_path_buf()),
                    image.display().to_string(),
                )
            }
        };
        pending.push(PendingDevice {
            kind: DeviceKind::Block,
            id: d.id.clone(),
            name,
            link,
            binary,
            backing,
            read_only: d.read_only,
            max_queues: cfg.vcpus.max(1) as usize,
            metrics,
            tap: None,
            mac: None,
            image: image_file,
        });
    }
    for n in &cfg.nets {
        let name = format!("skiff-net for interface '{}' (TAP {})", n.id, n.tap);
        let tap = Arc::new(TapFd::open(&n.tap).map_err(|e| BuildError::Tap(n.id.clone(), e))?);
        let page = Arc::new(MetricsPage::create(&n.id)?);
        let args = net_args(&tap, n.mac.as_deref(), &page, &opts.seccomp);
        let mut fds = vec![tap.as_fd(), page.fd()];
        fds.extend(opts.seccomp.fd());
        let (process, stream) = spawn_connected(name.clone(), &net, &args, &fds)?;
        processes.push(process);
        pending.push(PendingDevice {
            kind: DeviceKind::Net,
            id: n.id.clone(),
            name,
            link: Link::Process(processes.len() - 1, stream),
            binary: Some(net.path().to_path_buf()),
            backing: n.tap.clone(),
            read_only: false,
            metrics: Some(page),
            tap: Some(tap),
            mac: n.mac.clone(),
            image: None,
            // One rx/tx pair per TAP, plus a control queue when there are several.
            max_queues: 33,
        });
    }
    Ok(pending)
}

fn create_vm(kvm: &Kvm, ram: &GuestRam) -> Result<VmFd, BuildError> {
    let vm = kvm
        .create_vm()
        .map_err(|e| BuildError::KvmVm("create a VM", e))?;
    vm.set_tss_address(KVM_TSS_ADDRESS)
        .map_err(|e| BuildError::KvmVm("set the TSS address", e))?;
    if let Err(e) = vm.set_identity_map_address(KVM_IDENTITY_MAP_ADDRESS) {
        log::debug!("KVM_SET_IDENTITY_MAP_ADDR: {e} (needed on Intel only)");
    }
    vm.create_irq_chip()
        .map_err(|e| BuildError::KvmVm("create the in-kernel irqchip", e))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit)
        .map_err(|e| BuildError::KvmVm("create the PIT", e))?;
    for (slot, region) in ram.mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: 0,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping of guest RAM that outlives the VM (BuiltVm
        // owns both and drops the VM's vCPUs first).
        unsafe { vm.set_user_memory_region(r) }
            .map_err(|e| BuildError::KvmVm("map guest memory", e))?;
    }
    Ok(vm)
}

fn console_sink(c: &ConsoleConfig, cap: u64) -> Result<ConsoleSink, BuildError> {
    Ok(match c {
        ConsoleConfig::Stdio => ConsoleSink::Stdout(std::io::stdout()),
        ConsoleConfig::None => ConsoleSink::Null,
        ConsoleConfig::File(p) => {
            let err = |e| BuildError::ConsoleFile(p.display().to_string(), e);
            // Not O_APPEND: the cap rewrites the file from its start.
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .read(true)
                .write(true)
                .custom_flags(libc::O_CLOEXEC)
                .open(p)
                .map_err(err)?;
            ConsoleSink::File(CappedFile::new(file, cap).map_err(err)?)
        }
    })
}

fn irq_line(vm: &VmFd, gsi: u32) -> Result<IrqLine, BuildError> {
    let evt = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BuildError::Host("an interrupt eventfd", e))?;
    vm.register_irqfd(&evt, gsi)
        .map_err(|e| BuildError::KvmVm("register an irqfd", e))?;
    Ok(IrqLine(evt))
}

/// Builds the VM. On error everything created so far is released by the caller through
/// the returned partial state in `processes` (device processes are reaped).
pub fn build(
    cfg: &VmConfig,
    opts: &BuildOptions,
    processes: &mut Vec<DeviceProcess>,
) -> Result<BuiltVm, BuildError> {
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    cfg.validate(kvm.get_max_vcpus(), crate::host::host_memory_bytes())?;
    let n_dev = cfg.drives.len() + cfg.nets.len();
    if n_dev > (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize {
        return Err(BuildError::TooManyDevices(n_dev));
    }

    // Device processes start first so that their start-up overlaps the kernel load.
    let pending = start_device_processes(cfg, opts, processes)?;

    let mem_bytes = cfg.mem_mib << 20;
    let ram = create_guest_ram(mem_bytes)?;
    let vm = create_vm(&kvm, &ram)?;
    let kernel = loader::load_kernel(&ram.mem, &cfg.kernel, cfg.initrd.as_deref())?;

    let exit = Arc::new(VmExit::new().map_err(|e| BuildError::Host("the exit eventfd", e))?);
    let panic = Arc::new(Mutex::new(None));
    let console_flush = EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BuildError::Host("the console eventfd", e))?;
    let serial_metrics = Arc::new(SerialMetrics::default());
    let serial = SerialDevice::new(
        irq_line(&vm, SERIAL_IRQ)?,
        ConsoleOut::new(
            console_sink(&cfg.console, opts.console_file_limit)?,
            panic.clone(),
            Some(
                console_flush
                    .try_clone()
                    .map_err(|e| BuildError::Host("the console eventfd", e))?,
            ),
        )
        .with_metrics(serial_metrics.clone()),
    );
    let i8042 = I8042::new(irq_line(&vm, 1)?);

    let ram_ranges = RamRanges(
        ram.mem
            .iter()
            .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
            .collect(),
    );
    let mut transports = Vec::new();
    let mut mmio_args = Vec::new();
    let mut devices = Vec::new();
    for (i, p) in pending.into_iter().enumerate() {
        let (dev, process, socket) = match p.link {
            Link::Process(idx, stream) => {
                let proc = &mut processes[idx];
                let dev = negotiate(proc, p.kind, stream, p.max_queues, ram.mem.clone())?;
                (dev, Some(idx), None)
            }
            Link::External(socket) => {
                // An external backend (qemu-storage-daemon, ...) may still be starting.
                let stream = connect_with_retry(&socket, BACKEND_TIMEOUT, || Ok(()))
                    .map_err(|e| BuildError::Backend(format!("{} is not reachable", p.name), e))?;
                // A backend that stops answering fails the request instead of hanging a vCPU.
                let _ = stream.set_read_timeout(Some(BACKEND_TIMEOUT));
                let _ = stream.set_write_timeout(Some(BACKEND_TIMEOUT));
                let dev = VhostUserDevice::new(p.kind, stream, p.max_queues, ram.mem.clone())
                    .map_err(|e| {
                        BuildError::Backend(format!("{}: vhost-user negotiation failed", p.name), e)
                    })?;
                (dev, None, Some(socket))
            }
        };
        let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
        let gsi = VIRTIO_IRQ_BASE + i as u32;
        vm.register_irqfd(dev.call_fd(), gsi)
            .map_err(|e| BuildError::KvmVm("register a virtio irqfd", e))?;
        for (q, kick) in dev.kick_fds().iter().enumerate() {
            vm.register_ioevent(
                kick,
                &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
                q as u32,
            )
            .map_err(|e| BuildError::KvmVm("register a virtio ioeventfd", e))?;
        }
        mmio_args.push(format!("virtio_mmio.device=4K@{base:#x}:{gsi}"));
        transports.push(Mutex::new(MmioTransport::new(
            Box::new(dev),
            p.name.clone(),
            ram_ranges.clone(),
        )));
        devices.push(DeviceSlot {
            id: p.id,
            kind: p.kind,
            transport: i,
            process,
            socket,
            binary: p.binary,
            backing: p.backing,
            read_only: p.read_only,
            restarts: 0,
            crashes: 0,
            last_exit: None,
            metrics: p.metrics,
            tap: p.tap,
            mac: p.mac,
            image: p.image,
            max_queues: p.max_queues,
        });
    }

    let cmdline = cfg.cmdline(&mmio_args);
    log::debug!("kernel command line: {cmdline}");
    loader::load_cmdline(&ram.mem, &cmdline)?;
    loader::write_boot_info(&ram.mem, &kernel, cmdline.len(), mem_bytes)?;
    mptable::setup(&ram.mem, cfg.vcpus as u8)?;

    let bus = Arc::new(IoBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        virtio: transports,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(VcpuGate::default());
    let mut vcpu_metrics = Vec::new();
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::KvmVm("report its supported CPUID", e))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus as u8 {
        let fd = vm
            .create_vcpu(u64::from(i))
            .map_err(|e| BuildError::KvmVm("create a vCPU", e))?;
        let mut c = supported.clone();
        cpuid::configure(&mut c, i, cfg.vcpus as u8, tsc_deadline);
        fd.set_cpuid2(&c)
            .map_err(|e| BuildError::KvmVm("set CPUID", e))?;
        regs::setup_msrs(&fd)?;
        regs::setup_fpu(&fd)?;
        regs::setup_lapic(&fd)?;
        if i == 0 {
            regs::setup_sregs(&ram.mem, &fd, kernel.entry)?;
            regs::setup_regs(&fd, kernel.entry)?;
        }
        let metrics = Arc::new(VcpuMetrics::default());
        vcpu_metrics.push(metrics.clone());
        vcpus.push(Vcpu {
            index: i,
            fd,
            bus: bus.clone(),
            exit: exit.clone(),
            stop: stop.clone(),
            gate: gate.clone(),
            metrics,
        });
    }
    Ok(BuiltVm {
        vm,
        ram,
        bus,
        vcpus,
        processes: std::mem::take(processes),
        exit,
        stop,
        console_flush,
        panic,
        gate,
        vcpu_metrics,
        serial_metrics,
        devices,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sh() -> DeviceBinary {
        let dir = BinaryDir::open(Some(Path::new("/bin"))).expect("/bin");
        dir.resolve(Path::new("sh")).expect("sh")
    }

    fn start(script: &str) -> (DeviceProcess, UnixStream) {
        let args = vec!["-c".to_string(), script.to_string()];
        spawn_connected("sh for a test".into(), &sh(), &args, &[]).expect("spawn")
    }

    #[test]
    fn the_child_inherits_its_end_as_socket_fd_and_the_vmm_keeps_the_other() {
        // `sh -c script --socket-fd N`: $0 and $1 are the appended option; fd N is a socket
        // in the child, and the only one besides stdio.
        let (mut p, ours) = start(
            r#"[ "$0" = --socket-fd ] && [ -S /proc/self/fd/$1 ] && echo up >&$1 && read x <&$1 && [ "$x" = go ]"#,
        );
        use std::io::{BufRead, BufReader, Write};
        let mut line = String::new();
        BufReader::new(&ours).read_line(&mut line).expect("read");
        assert_eq!(line, "up\n");
        (&ours).write_all(b"go\n").expect("write");
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while p.check_alive().is_ok() {
            assert!(std::time::Instant::now() < deadline, "sh did not exit");
            std::thread::sleep(Duration::from_millis(5));
        }
        assert_eq!(p.ended_how().as_deref(), Some("exited with status 0"));
        // The VMM's end is close-on-exec and has the request timeouts.
        // SAFETY: F_GETFD on an fd the test owns.
        let flags = unsafe { libc::fcntl(ours.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
        assert_eq!(ours.read_timeout().expect("timeout"), Some(BACKEND_TIMEOUT));
    }

    #[test]
    fn a_process_that_ends_before_answering_is_named_with_how_it_ended() {
        let (mut p, ours) = start("exit 3");
        let pid = p.pid();
        let mem = vm_memory::GuestMemoryMmap::new();
        let e = match negotiate(&mut p, DeviceKind::Block, ours, 1, mem) {
            Ok(_) => panic!("negotiated with sh"),
            Err(e) => e,
        };
        assert!(matches!(e, BuildError::Ended(..)), "{e:?}");
        let chain = crate::error_chain(&e);
        assert!(
            chain.starts_with(&format!(
                "sh for a test (pid {pid}) exited with status 3 before it answered: vhost-user "
            )),
            "{chain}"
        );
    }

    #[test]
    fn a_live_process_that_hangs_up_is_not_said_to_have_ended() {
        // It closes its end without answering, and lives on.
        let (mut p, ours) = start(r#"eval "exec $1>&-"; sleep 5"#);
        let mem = vm_memory::GuestMemoryMmap::new();
        let e = match negotiate(&mut p, DeviceKind::Block, ours, 1, mem) {
            Ok(_) => panic!("negotiated with sh"),
            Err(e) => e,
        };
        assert!(matches!(e, BuildError::Backend(..)), "{e:?}");
        assert!(
            crate::error_chain(&e).starts_with("sh for a test: vhost-user negotiation failed"),
            "{e}"
        );
        p.stop(Duration::ZERO);
    }
}
