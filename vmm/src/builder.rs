//! Builds a running microVM from a [`VmConfig`]: KVM VM, guest RAM, device processes,
//! devices, kernel, boot information and vCPUs.

use std::fs::File;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VmFd};
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{acpi, cpuid, loader, mptable, regs};
use crate::config::{DriveBackend, VmConfig};
use crate::device_binary::{BinaryDir, DeviceBinaryError};
use crate::device_process::{DeviceProcess, DeviceProcessError};
use crate::devices::bus::IoBus;
use crate::devices::metrics_page::{MetricsPage, MetricsPageError};
use crate::devices::virtio::transport::VirtioTransport;
use crate::devices::virtio::vhost_user::{DeviceKind, VhostUserError};
use crate::devices::virtio::RamRanges;
use crate::devices::IrqLine;
use crate::exit::VmExit;
use crate::layout::*;
use crate::memory::{create_guest_ram_on, GuestRam, MemoryError};
use crate::metrics::{SerialMetrics, VcpuMetrics};
use crate::state::VmState;
use crate::vcpu::{Vcpu, VcpuGate};
use tapdev::{Tap, TapError};

mod adopt;
mod legacy;
mod spawn;
mod steps;
mod wire;
pub use adopt::{adopt, prepare, Prepared};
pub(crate) use legacy::{legacy_devices, Legacy};
pub use spawn::{blk_args, connect_external, negotiate, net_args, spawn_connected, DeviceSeccomp};
pub use steps::BuildSteps;
pub(crate) use wire::{transport, wire_device, Bus};

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
    /// The thread loading the kernel panicked.
    #[error("the thread loading the kernel panicked")]
    LoaderPanicked,
    /// MP table.
    #[error(transparent)]
    Mptable(#[from] mptable::MptableError),
    /// ACPI tables.
    #[error(transparent)]
    Acpi(#[from] acpi::AcpiError),
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
    /// Too many devices for the IOAPIC pins (virtio-mmio).
    #[error("{0} virtio devices are more than the {max} interrupt lines skiff has for them (virtio-mmio; --enable-pci takes up to {pci})", max = IRQ_MAX - VIRTIO_IRQ_BASE + 1, pci = PCI_MAX_DEVICES)]
    TooManyDevices(usize),
    /// Too many devices for the PCI bus's slots.
    #[error("{0} virtio devices are more than the {max} slots of the PCI bus", max = PCI_MAX_DEVICES)]
    TooManyPciDevices(usize),
    /// The MSI router.
    #[error(transparent)]
    Msi(#[from] crate::devices::msi::MsiError),
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
    /// A saved state does not fit, or cannot be put back.
    #[error("cannot restore the saved state: {0}")]
    Restore(String),
    /// KVM refused a saved vCPU or VM state.
    #[error("cannot restore the saved state")]
    KvmState(#[from] crate::state::KvmStateError),
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
    /// The ACPI power button's interrupt (the Generic Event Device's); `None` when the guest
    /// boots without ACPI (`acpi=off`).
    pub power_button: Option<IrqLine>,
    /// The virtio devices, drives first, in transport order: each with its transport, its
    /// device process and what it hands that process.
    pub devices: Vec<DeviceSlot>,
    /// Where the build's time went.
    pub steps: BuildSteps,
}

impl BuiltVm {
    /// The device `id`'s index in [`BuiltVm::devices`] (= its transport's in the bus).
    pub fn device_index(&self, id: &str) -> Option<usize> {
        self.devices.iter().position(|d| d.id == id)
    }
}

/// One virtio device of a built VM.
pub struct DeviceSlot {
    /// drive_id or iface_id.
    pub id: String,
    /// Block or net.
    pub kind: DeviceKind,
    /// Index into [`IoBus::virtio`].
    pub transport: usize,
    /// The device process skiff started (None for an externally started backend).
    pub process: Option<DeviceProcess>,
    /// The vhost-user socket of an externally started backend (None for a device process
    /// skiff started: its connection is a socketpair, see [`spawn_connected`]).
    pub socket: Option<PathBuf>,
    /// The device binary skiff started.
    pub binary: Option<PathBuf>,
    /// Image path or TAP name.
    pub backing: String,
    /// Read-only drive.
    pub read_only: bool,
    /// skiff-blk serves the drive through io_uring (`--io-engine io-uring`).
    pub io_uring: bool,
    /// Times the device process was replaced.
    pub restarts: u32,
    /// Times its process died (crash restarts are among `restarts`).
    pub crashes: u32,
    /// How its process last died ("killed by seccomp (SIGSYS)", ...).
    pub last_exit: Option<String>,
    /// The page the device process counts in (kept across its replacements).
    pub metrics: Option<Arc<MetricsPage>>,
    /// The TAP device (net), opened by the VMM and handed to each skiff-net it starts.
    pub tap: Option<Arc<Tap>>,
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
    /// Boot with the virtio devices on PCI (`--enable-pci`) instead of virtio-mmio. A
    /// restored or adopted VM keeps the transport its state has.
    pub pci: bool,
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
    io_uring: bool,
    max_queues: usize,
    metrics: Option<Arc<MetricsPage>>,
    tap: Option<Arc<Tap>>,
    mac: Option<String>,
    image: Option<Arc<File>>,
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
                let args = blk_args(&file, d.read_only, d.io_uring, &page, &opts.seccomp);
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
            io_uring: d.io_uring,
            max_queues: cfg.vcpus.max(1) as usize,
            metrics,
            tap: None,
            mac: None,
            image: image_file,
        });
    }
    for n in &cfg.nets {
        let name = format!("skiff-net for interface '{}' (TAP {})", n.id, n.tap);
        let tap = Arc::new(Tap::open(&n.tap).map_err(|e| BuildError::Tap(n.id.clone(), e))?);
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
            io_uring: false,
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

/// The guest kernel (and initrd) loading into guest RAM on a thread of its own.
enum KernelLoad {
    Thread(std::thread::JoinHandle<Result<loader::LoadedKernel, loader::LoaderError>>),
    /// The thread could not be started: loaded on the caller's.
    Done(Result<loader::LoadedKernel, loader::LoaderError>),
}

impl KernelLoad {
    fn start(ram: &GuestRam, cfg: &VmConfig) -> KernelLoad {
        let (mem, kernel, initrd) = (ram.mem.clone(), cfg.kernel.clone(), cfg.initrd.clone());
        let load = move || loader::load_kernel(&mem, &kernel, initrd.as_deref());
        // The closure moves into the thread only when it starts; a failed start returns the
        // error alone, so the loading then happens here from a second copy.
        match std::thread::Builder::new()
            .name("kernel-loader".into())
            .spawn(load)
        {
            Ok(h) => KernelLoad::Thread(h),
            Err(e) => {
                log::warn!("cannot start a thread to load the kernel ({e}); loading it inline");
                KernelLoad::Done(loader::load_kernel(
                    &ram.mem,
                    &cfg.kernel,
                    cfg.initrd.as_deref(),
                ))
            }
        }
    }

    fn wait(self) -> Result<loader::LoadedKernel, BuildError> {
        match self {
            KernelLoad::Thread(h) => match h.join() {
                Ok(r) => Ok(r?),
                Err(_) => Err(BuildError::LoaderPanicked),
            },
            KernelLoad::Done(r) => Ok(r?),
        }
    }
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

/// Where the VM's memory and state come from.
pub enum Origin<'a> {
    /// A fresh boot: new RAM, the kernel loaded into it, vCPU 0 at the kernel's entry.
    Boot,
    /// A saved state, with RAM that already holds the guest (a snapshot's memory).
    Restore {
        /// The state.
        state: &'a VmState,
        /// Guest RAM.
        ram: GuestRam,
    },
}

/// Builds the VM. On error everything created so far is released by the caller through
/// the returned partial state in `processes` (device processes are reaped).
pub fn build(
    cfg: &VmConfig,
    opts: &BuildOptions,
    processes: &mut Vec<DeviceProcess>,
    origin: Origin<'_>,
) -> Result<BuiltVm, BuildError> {
    let kvm = Kvm::new().map_err(BuildError::Kvm)?;
    cfg.validate_machine(kvm.get_max_vcpus(), crate::host::host_memory_bytes())?;
    // A restored guest is in its memory already: its kernel need not be around.
    if matches!(origin, Origin::Boot) {
        cfg.validate_boot()?;
    }
    cfg.validate_devices()?;
    // A restored VM keeps its transport, whatever today's switch says.
    let pci = match &origin {
        Origin::Boot => opts.pci,
        Origin::Restore { state, .. } => state.pci,
    };
    if pci && matches!(origin, Origin::Boot) {
        cfg.check_pci()?;
    }
    let n_dev = cfg.drives.len() + cfg.nets.len();
    if pci && n_dev > PCI_MAX_DEVICES {
        return Err(BuildError::TooManyPciDevices(n_dev));
    }
    if !pci && n_dev > (IRQ_MAX - VIRTIO_IRQ_BASE + 1) as usize {
        return Err(BuildError::TooManyDevices(n_dev));
    }
    let mem_bytes = cfg.mem_mib << 20;
    let (saved, ram) = match origin {
        Origin::Boot => (None, None),
        Origin::Restore { state, ram } => {
            check_restorable(cfg, state, mem_bytes)?;
            (Some(state), Some(ram))
        }
    };

    let mut steps = BuildSteps::default();
    let ram = match ram {
        Some(r) => r,
        None => create_guest_ram_on(mem_bytes, cfg.huge_pages)?,
    };
    // The kernel (tens of MiB copied into fresh guest pages, the longest step) loads on a
    // thread of its own while the device processes start and KVM and the devices are set
    // up; the device processes' own start-up overlaps everything up to their negotiation.
    let kernel = match saved {
        None => Some(KernelLoad::start(&ram, cfg)),
        Some(_) => None,
    };
    steps.mark("guest RAM");
    let pending = start_device_processes(cfg, opts, processes)?;
    steps.mark("device processes");
    let vm = create_vm(&kvm, &ram)?;
    let legacy = legacy_devices(&vm, cfg, opts, saved)?;
    let bus = Bus::new(&kvm, &vm, pci)?;
    steps.mark("KVM VM");

    let ram_ranges = RamRanges(
        ram.mem
            .iter()
            .map(|r| (r.start_addr().0, r.start_addr().0 + r.len()))
            .collect(),
    );
    let mut transports = Vec::new();
    let mut mmio = Vec::new();
    let mut devices = Vec::new();
    // Which of `processes` serves each device (moved into its slot at the end, so that a
    // failure before then still finds every process in `processes`).
    let mut owner: Vec<Option<usize>> = Vec::new();
    for (i, p) in pending.into_iter().enumerate() {
        let (mut dev, proc_idx, socket) = match p.link {
            Link::Process(idx, stream) => {
                let proc = &mut processes[idx];
                let dev = negotiate(proc, p.kind, stream, p.max_queues, ram.mem.clone())?;
                (dev, Some(idx), None)
            }
            Link::External(socket) => {
                let dev =
                    connect_external(&p.name, p.kind, &socket, p.max_queues, ram.mem.clone())?;
                (dev, None, Some(socket))
            }
        };
        let saved_dev = saved.map(|s| &s.devices[i]);
        if let Some(d) = saved_dev {
            d.check_same_device(dev.config_space())
                .map_err(BuildError::Restore)?;
            if d.transport.active {
                dev.start_at(d.transport.acked_features, &d.transport.queues, &d.rings)
                    .map_err(|e| {
                        BuildError::Backend(format!("{}: cannot restart its rings", p.name), e)
                    })?;
            }
        }
        let (base, gsi) = wire_device(&vm, &dev, i, saved.is_some(), pci)?;
        if !pci {
            mmio.push(acpi::MmioDevice { base, gsi });
        }
        let mut transport = transport(
            Box::new(dev),
            p.name.clone(),
            ram_ranges.clone(),
            &bus,
            i,
            saved.is_some(),
        )?;
        if let Some(d) = saved_dev {
            transport
                .restore(&d.transport)
                .map_err(BuildError::Restore)?;
        }
        transports.push(Mutex::new(transport));
        owner.push(proc_idx);
        devices.push(DeviceSlot {
            id: p.id,
            kind: p.kind,
            transport: i,
            process: None,
            socket,
            binary: p.binary,
            backing: p.backing,
            read_only: p.read_only,
            io_uring: p.io_uring,
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

    steps.mark("devices");
    let kernel = kernel.map(KernelLoad::wait).transpose()?;
    steps.mark("kernel");
    if let Some(kernel) = &kernel {
        // The devices are described both ways, as Firecracker does: in the DSDT (a stock
        // kernel, whose virtio_mmio cannot take command-line declarations, finds them there)
        // and on the command line (a kernel without ACPI, or booted with acpi=off). A kernel
        // that reads both binds each device once; the second probe finds the window taken.
        let rsdp = acpi::setup(&ram.mem, cfg.vcpus, &mmio, pci)?;
        let mmio_args = mmio
            .iter()
            .map(|d| format!("virtio_mmio.device=4K@{:#x}:{}", d.base, d.gsi))
            .collect::<Vec<_>>();
        let cmdline = cfg.cmdline(&mmio_args, pci);
        log::debug!("kernel command line: {cmdline}");
        loader::load_cmdline(&ram.mem, &cmdline)?;
        loader::write_boot_info(&ram.mem, kernel, cmdline.len(), mem_bytes, Some(rsdp))?;
        // The MP table too: a kernel without ACPI support still finds every vCPU.
        mptable::setup(&ram.mem, cfg.vcpus as u8)?;
    }

    steps.mark("boot tables");
    let mut started: Vec<Option<DeviceProcess>> = processes.drain(..).map(Some).collect();
    for (slot, idx) in devices.iter_mut().zip(owner) {
        slot.process = idx.and_then(|i| started.get_mut(i).and_then(Option::take));
    }
    finish(
        &kvm,
        Parts {
            vm,
            ram,
            legacy,
            transports,
            devices,
            pci,
            steps,
        },
        cfg,
        match (saved, kernel) {
            (Some(s), _) => Vcpus::Restore(s),
            (None, Some(k)) => Vcpus::Boot(k.entry),
            (None, None) => {
                return Err(BuildError::Restore(
                    "neither a kernel nor a saved state".into(),
                ))
            }
        },
    )
}

/// A VM's parts before its vCPUs exist.
pub(crate) struct Parts {
    vm: VmFd,
    ram: GuestRam,
    legacy: Legacy,
    transports: Vec<Mutex<VirtioTransport>>,
    devices: Vec<DeviceSlot>,
    /// The devices are on PCI.
    pci: bool,
    /// Where the build's time went so far.
    pub(crate) steps: BuildSteps,
}

/// How the vCPUs begin.
pub(crate) enum Vcpus<'a> {
    /// vCPU 0 at the kernel's entry, the others waiting for their start-up IPI.
    Boot(crate::boot::loader::BootEntry),
    /// As the state has them (and the VM's irqchip and PIT too).
    Restore(&'a VmState),
}

/// Creates the vCPUs and puts the VM together.
pub(crate) fn finish(
    kvm: &Kvm,
    parts: Parts,
    cfg: &VmConfig,
    how: Vcpus<'_>,
) -> Result<BuiltVm, BuildError> {
    let Parts {
        vm,
        ram,
        legacy,
        transports,
        devices,
        pci,
        mut steps,
    } = parts;
    let Legacy {
        serial,
        i8042,
        irqfds,
        exit,
        panic,
        console_flush,
        serial_metrics,
        power_button,
    } = legacy;
    let bus = Arc::new(IoBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        pci: pci.then(|| crate::devices::pci::PciBus::new(transports.len())),
        virtio: transports,
    });
    let stop = Arc::new(AtomicBool::new(false));
    let gate = Arc::new(VcpuGate::default());
    let mut vcpu_metrics = Vec::new();
    let supported = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(|e| BuildError::KvmVm("report its supported CPUID", e))?;
    let tsc_deadline = kvm.check_extension(Cap::TscDeadlineTimer);
    let msr_list = Arc::new(
        kvm.get_msr_index_list()
            .map_err(|e| BuildError::KvmVm("list the MSRs it saves", e))?
            .as_slice()
            .to_vec(),
    );
    let mut vcpus = Vec::new();
    for i in 0..cfg.vcpus as u8 {
        let fd = vm
            .create_vcpu(u64::from(i))
            .map_err(|e| BuildError::KvmVm("create a vCPU", e))?;
        match &how {
            Vcpus::Restore(s) => s.vcpus[usize::from(i)].restore(&fd)?,
            Vcpus::Boot(entry) => {
                let mut c = supported.clone();
                cpuid::configure(&mut c, i, cfg.vcpus as u8, tsc_deadline);
                fd.set_cpuid2(&c)
                    .map_err(|e| BuildError::KvmVm("set CPUID", e))?;
                regs::setup_msrs(&fd)?;
                regs::setup_fpu(&fd)?;
                regs::setup_lapic(&fd)?;
                if i == 0 {
                    regs::setup_sregs(&ram.mem, &fd, *entry)?;
                    regs::setup_regs(&fd, *entry)?;
                }
            }
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
            msr_list: msr_list.clone(),
        });
    }
    if let Vcpus::Restore(s) = how {
        s.kvm.restore(&vm)?;
        // Only now, with the IOAPIC, PICs and LAPICs as saved, are the interrupt lines
        // connected: KVM then injects what a device signalled meanwhile (during a live
        // upgrade's pause, or since its rings were restarted). Injected into the fresh
        // controllers, such an interrupt would hit a masked IOAPIC pin and be lost, and
        // the guest would wait for it for good.
        for (evt, gsi) in &irqfds {
            vm.register_irqfd(evt, *gsi)
                .map_err(|e| BuildError::KvmVm("register an irqfd", e))?;
        }
        for (i, t) in bus.virtio.iter().enumerate() {
            let mut t = t.lock().unwrap_or_else(|p| p.into_inner());
            t.attach_interrupts(&vm, VIRTIO_IRQ_BASE + i as u32)
                .map_err(BuildError::Restore)?;
        }
    }
    steps.mark("vCPUs");
    Ok(BuiltVm {
        vm,
        ram,
        bus,
        vcpus,
        exit,
        stop,
        console_flush,
        panic,
        gate,
        vcpu_metrics,
        serial_metrics,
        power_button,
        devices,
        steps,
    })
}

/// Checks that `state` fits the VM `cfg` describes (the snapshot's own configuration):
/// memory, vCPUs and devices, by id and kind, in transport order.
fn check_restorable(cfg: &VmConfig, state: &VmState, mem_bytes: u64) -> Result<(), BuildError> {
    let bad = |m: String| Err(BuildError::Restore(m));
    if state.mem_bytes != mem_bytes {
        return bad(format!(
            "the state has {} bytes of RAM, the configuration {mem_bytes}",
            state.mem_bytes
        ));
    }
    if state.vcpus.len() != cfg.vcpus as usize {
        return bad(format!(
            "the state has {} vCPUs, the configuration {}",
            state.vcpus.len(),
            cfg.vcpus
        ));
    }
    if let Some((i, v)) = state
        .vcpus
        .iter()
        .enumerate()
        .find(|(i, v)| usize::from(v.index) != *i)
    {
        return bad(format!("vCPU state {i} is vCPU {}'s", v.index));
    }
    let configured: Vec<(&str, DeviceKind)> = cfg
        .drives
        .iter()
        .map(|d| (d.id.as_str(), DeviceKind::Block))
        .chain(cfg.nets.iter().map(|n| (n.id.as_str(), DeviceKind::Net)))
        .collect();
    let saved: Vec<(&str, DeviceKind)> = state
        .devices
        .iter()
        .map(|d| (d.id.as_str(), d.kind))
        .collect();
    if configured != saved {
        return bad(format!(
            "the state's devices {saved:?} are not the configuration's {configured:?}"
        ));
    }
    Ok(())
}
