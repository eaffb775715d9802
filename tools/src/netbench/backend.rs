//! The paths under test, each set up as a user sets it up, on a TAP of its own made in the
//! benchmark's network namespace:
//! - skiff-net, started by the VMM's own code (`vmm::builder::spawn_connected` with
//!   `vmm::builder::net_args`, negotiated by `vmm::builder::negotiate`) and driven through
//!   the VMM's vhost-user front end (`VhostUserDevice`);
//! - the kernel's vhost-net (/dev/vhost-net through the rust-vmm `vhost` crate's
//!   `vhost_kern::net`), set up as QEMU and Firecracker-with-vhost set it up: owner, memory
//!   table, rings, the TAP as its backend, the TAP's offloads from the driver's features;
//! - the floor: nothing between the driver and the TAP.

use std::os::fd::{AsFd, BorrowedFd};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tapdev::{offload_flags, Tap};
use vhost::net::VhostNet;
use vhost::vhost_kern::net::Net;
use vhost::{VhostBackend, VhostUserMemoryRegionInfo, VringConfigData};
use virtio_bindings::virtio_config::VIRTIO_F_VERSION_1;
use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_HOST_TSO4,
};
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;
use vm_memory::{GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion};
use vmm::builder::{negotiate, net_args, spawn_connected, BuildError, DeviceSeccomp};
use vmm::device_binary::BinaryDir;
use vmm::device_process::DeviceProcess;
use vmm::devices::metrics_page::MetricsPage;
use vmm::devices::virtio::vhost_user::{DeviceKind, VhostUserDevice};
use vmm::devices::virtio::{QueueConfig, RamRanges, VirtioDevice};
use vmm::memory::{create_guest_ram, GuestRam};
use vmm_sys_util::eventfd::EventFd;

use crate::driver::{Rings, RAM, RX, TX};
use crate::frames::Kind;
use crate::proc_cpu::{cpu_ns, own_cpu_ns, vhost_worker_cpu_ns};
use crate::split_ring::QSIZE;
use crate::wire::bring_up;
use crate::BenchError;

/// Which path moves the frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Which {
    /// skiff's device process.
    SkiffNet,
    /// The kernel's vhost-net.
    VhostNet,
    /// The TAP alone (the floor).
    Tap,
}

impl Which {
    /// The name in the report.
    pub fn name(self) -> &'static str {
        match self {
            Which::SkiffNet => "skiff-net",
            Which::VhostNet => "vhost-net",
            Which::Tap => "tap",
        }
    }
}

/// The virtio-net features the driver acks for frames of `kind`: VERSION_1, EVENT_IDX when
/// `event_idx`, and for TSO frames checksum and TCPv4 segmentation offload both ways, as a
/// Linux guest acks them.
pub fn driver_features(kind: Kind, event_idx: bool) -> u64 {
    let mut f = 1u64 << VIRTIO_F_VERSION_1;
    if event_idx {
        f |= 1 << VIRTIO_RING_F_EVENT_IDX;
    }
    if kind == Kind::Tso {
        for bit in [
            VIRTIO_NET_F_CSUM,
            VIRTIO_NET_F_GUEST_CSUM,
            VIRTIO_NET_F_GUEST_TSO4,
            VIRTIO_NET_F_HOST_TSO4,
        ] {
            f |= 1 << bit;
        }
    }
    f
}

/// How every path is set up.
pub struct Common<'a> {
    /// skiff-net's binary directory.
    pub bins: &'a BinaryDir,
    /// skiff-net's seccomp choice, as skiff passes it.
    pub seccomp: &'a DeviceSeccomp,
    /// The driver negotiates VIRTIO_RING_F_EVENT_IDX.
    pub event_idx: bool,
}

enum Device {
    SkiffNet {
        dev: Box<VhostUserDevice>,
        process: DeviceProcess,
        _page: MetricsPage,
    },
    VhostNet(Net<Arc<GuestMemoryMmap>>),
    Tap,
}

/// A path ready to move frames.
pub struct Running {
    /// Which one.
    pub which: Which,
    /// Its TAP.
    pub tap: Tap,
    /// The TAP's interface index.
    pub ifindex: libc::c_int,
    /// Guest RAM, shared with the device.
    pub ram: GuestRam,
    event_idx: bool,
    kicks: [EventFd; 2],
    call: EventFd,
    device: Device,
}

/// A non-blocking, close-on-exec eventfd.
pub fn eventfd() -> Result<EventFd, BenchError> {
    EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)
        .map_err(|e| BenchError::Host("an eventfd".into(), e))
}

fn dup(e: &EventFd) -> Result<EventFd, BenchError> {
    e.try_clone()
        .map_err(|e| BenchError::Host("an eventfd".into(), e))
}

impl Running {
    /// Sets `which` up on a new TAP `tap_name` for frames of `kind`.
    pub fn start(
        which: Which,
        tap_name: &str,
        kind: Kind,
        c: &Common<'_>,
    ) -> Result<Running, BenchError> {
        let tap = Tap::open(tap_name).map_err(|e| BenchError::Vmm("the TAP", e.into()))?;
        let ifindex = bring_up(tap_name)?;
        let ram = create_guest_ram(RAM).map_err(|e| BenchError::Vmm("guest RAM", e.into()))?;
        let features = driver_features(kind, c.event_idx);
        let configs = [RX.queue_config(QSIZE), TX.queue_config(QSIZE)];
        let (device, kicks, call) = match which {
            Which::SkiffNet => {
                let page = MetricsPage::create("netbench")
                    .map_err(|e| BenchError::Vmm("the metrics page", e.into()))?;
                let args = net_args(&tap, None, &page, c.seccomp);
                let mut fds: Vec<BorrowedFd<'_>> = vec![tap.as_fd(), page.fd()];
                fds.extend(c.seccomp.fd());
                let bin = c
                    .bins
                    .resolve(Path::new("skiff-net"))
                    .map_err(|e| BenchError::Vmm("skiff-net", e.into()))?;
                let (mut process, stream) =
                    spawn_connected("skiff-net for netbench".into(), &bin, &args, &fds)
                        .map_err(vmm_err)?;
                let mut dev = negotiate(&mut process, DeviceKind::Net, stream, 2, ram.mem.clone())
                    .map_err(vmm_err)?;
                if dev.features() & features != features {
                    return Err(BenchError::Usage(format!(
                        "skiff-net does not offer the features the driver needs ({features:#x})"
                    )));
                }
                let ranges = RamRanges(vec![(0, RAM)]);
                for (q, c) in configs.iter().enumerate() {
                    c.check(&ranges)
                        .map_err(|e| BenchError::Usage(format!("queue {q}: {e}")))?;
                }
                dev.activate(features, &configs)
                    .map_err(|e| BenchError::Backend("skiff-net".into(), Box::new(e)))?;
                let kicks = [dup(&dev.kick_fds()[0])?, dup(&dev.kick_fds()[1])?];
                let call = dup(dev.call_fd())?;
                let device = Device::SkiffNet {
                    dev: Box::new(dev),
                    process,
                    _page: page,
                };
                (device, kicks, call)
            }
            Which::VhostNet => {
                let kicks = [eventfd()?, eventfd()?];
                let call = eventfd()?;
                let net = vhost_net(&tap, &ram.mem, features, &configs, &kicks, &call)?;
                (Device::VhostNet(net), kicks, call)
            }
            Which::Tap => {
                tap.set_offload(offload_flags(features))
                    .map_err(|e| BenchError::Vmm("the TAP's offloads", e.into()))?;
                (Device::Tap, [eventfd()?, eventfd()?], eventfd()?)
            }
        };
        Ok(Running {
            which,
            tap,
            ifindex,
            ram,
            event_idx: c.event_idx,
            kicks,
            call,
            device,
        })
    }

    /// The rings' notifications for the driver.
    pub fn rings(&self) -> Rings<'_> {
        Rings {
            mem: &self.ram.mem,
            kicks: [&self.kicks[0], &self.kicks[1]],
            call: &self.call,
            event_idx: self.event_idx,
        }
    }

    /// CPU time the device has used so far, ns (None for the floor, which has none).
    pub fn device_cpu_ns(&self) -> Option<u64> {
        match &self.device {
            Device::SkiffNet { process, .. } => Some(cpu_ns(process.pid())),
            Device::VhostNet(_) => Some(vhost_worker_cpu_ns(std::process::id()).0),
            Device::Tap => None,
        }
    }

    /// CPU time of everything the run uses so far (this process, with the driver and the
    /// far end; skiff-net; the vhost worker), ns.
    pub fn total_cpu_ns(&self) -> u64 {
        let own = own_cpu_ns();
        match &self.device {
            Device::SkiffNet { process, .. } => own + cpu_ns(process.pid()),
            Device::VhostNet(_) => match vhost_worker_cpu_ns(std::process::id()) {
                (_, true) => own,
                (kthread, false) => own + kthread,
            },
            Device::Tap => own,
        }
    }

    /// How skiff-net ended, when it has (killed by its seccomp filter, a crash).
    pub fn ended(&mut self) -> Option<String> {
        match &mut self.device {
            Device::SkiffNet { process, .. } => process.check_alive().err(),
            _ => None,
        }
    }

    /// Whether the device found a ring broken (skiff-net's error eventfd).
    pub fn broken_rings(&self) -> u64 {
        match &self.device {
            Device::SkiffNet { dev, .. } => dev.err_fd().read().unwrap_or(0),
            _ => 0,
        }
    }

    /// Stops the device; the TAP goes with the last fd on it.
    pub fn stop(self) {
        match self.device {
            Device::SkiffNet { dev, process, .. } => {
                drop(dev);
                process.stop(Duration::from_secs(2));
            }
            Device::VhostNet(net) => {
                for q in 0..2 {
                    let _ = net.set_backend(q, None);
                }
            }
            Device::Tap => {}
        }
    }
}

/// A vhost-net instance serving `tap` on the rings `configs` in `mem`.
fn vhost_net(
    tap: &Tap,
    mem: &GuestMemoryMmap,
    features: u64,
    configs: &[QueueConfig; 2],
    kicks: &[EventFd; 2],
    call: &EventFd,
) -> Result<Net<Arc<GuestMemoryMmap>>, BenchError> {
    let err = |what: &'static str| {
        move |e: vhost::Error| BenchError::Backend(format!("vhost-net: {what}"), Box::new(e))
    };
    let net = Net::new(Arc::new(mem.clone())).map_err(err("opening /dev/vhost-net"))?;
    net.set_owner().map_err(err("VHOST_SET_OWNER"))?;
    let offered = net.get_features().map_err(err("VHOST_GET_FEATURES"))?;
    // vhost-net moves the header to and from the TAP; the offloads are the TAP's.
    let ring_features = features & ((1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX));
    if offered & ring_features != ring_features {
        return Err(BenchError::Usage(format!(
            "vhost-net does not offer the features the driver needs ({ring_features:#x})"
        )));
    }
    let vhost_features = ring_features;
    net.set_features(vhost_features)
        .map_err(err("VHOST_SET_FEATURES"))?;
    let regions: Vec<VhostUserMemoryRegionInfo> = mem
        .iter()
        .map(|r| VhostUserMemoryRegionInfo {
            guest_phys_addr: r.start_addr().0,
            memory_size: r.len(),
            userspace_addr: r.as_ptr() as u64,
            ..Default::default()
        })
        .collect();
    net.set_mem_table(&regions)
        .map_err(err("VHOST_SET_MEM_TABLE"))?;
    for (q, c) in configs.iter().enumerate() {
        net.set_vring_num(q, c.size)
            .map_err(err("VHOST_SET_VRING_NUM"))?;
        let data = VringConfigData {
            queue_max_size: c.max_size,
            queue_size: c.size,
            flags: 0,
            desc_table_addr: c.desc,
            used_ring_addr: c.used,
            avail_ring_addr: c.avail,
            log_addr: None,
        };
        net.set_vring_addr(q, &data)
            .map_err(err("VHOST_SET_VRING_ADDR"))?;
        net.set_vring_base(q, 0)
            .map_err(err("VHOST_SET_VRING_BASE"))?;
        net.set_vring_call(q, call)
            .map_err(err("VHOST_SET_VRING_CALL"))?;
        net.set_vring_kick(q, &kicks[q])
            .map_err(err("VHOST_SET_VRING_KICK"))?;
    }
    tap.set_offload(offload_flags(features))
        .map_err(|e| BenchError::Vmm("the TAP's offloads", e.into()))?;
    for q in 0..2 {
        net.set_backend(q, Some(tap.as_file()))
            .map_err(err("VHOST_NET_SET_BACKEND"))?;
    }
    Ok(net)
}

fn vmm_err(e: BuildError) -> BenchError {
    BenchError::Backend("skiff-net".into(), Box::new(e))
}
