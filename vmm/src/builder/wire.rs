//! Putting a vhost-user device on the VM's transport: virtio-mmio (an IOAPIC pin and a
//! window of its own) or virtio-pci (a function on bus 0, MSI-X through the VM's router).

use std::sync::Arc;

use kvm_ioctls::{IoEventAddress, Kvm, NoDatamatch, VmFd};

use super::BuildError;
use crate::devices::msi::MsiRouter;
use crate::devices::pci::PciBus;
use crate::devices::virtio::mmio::REG_QUEUE_NOTIFY;
use crate::devices::virtio::pci::{PciFunction, NOTIFY_MULTIPLIER, NOTIFY_OFFSET};
use crate::devices::virtio::transport::VirtioTransport;
use crate::devices::virtio::vhost_user::VhostUserDevice;
use crate::devices::virtio::{RamRanges, VirtioDevice};
use crate::layout::{PCI_MAX_DEVICES, VIRTIO_IRQ_BASE, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};

/// The VM's transport for its virtio devices.
pub(crate) enum Bus {
    /// virtio-mmio.
    Mmio,
    /// virtio-pci, with the VM's MSI router.
    Pci(Arc<MsiRouter>),
}

impl Bus {
    /// The transport of a VM (`pci`: Firecracker's `--enable-pci`).
    pub(crate) fn new(kvm: &Kvm, vm: &VmFd, pci: bool) -> Result<Self, BuildError> {
        Ok(match pci {
            true => Bus::Pci(Arc::new(MsiRouter::new(kvm, vm)?)),
            false => Bus::Mmio,
        })
    }
}

/// Connects device `i`'s eventfds to KVM: each kick eventfd as an ioeventfd on its doorbell
/// (virtio-mmio: QueueNotify with the queue's index; virtio-pci: the queue's own address in
/// the notification area), and on virtio-mmio its call eventfd as the irqfd of its GSI
/// (unless `restoring`: then [`super::finish`] does it once the saved interrupt state is
/// in; virtio-pci connects vectors as the driver enables them). Returns the device's base
/// address (window or BAR 0) and its virtio-mmio GSI.
pub(crate) fn wire_device(
    vm: &VmFd,
    dev: &VhostUserDevice,
    i: usize,
    restoring: bool,
    pci: bool,
) -> Result<(u64, u32), BuildError> {
    let gsi = VIRTIO_IRQ_BASE + i as u32;
    let ioevent = |kick, addr| {
        vm.register_ioevent(kick, &IoEventAddress::Mmio(addr), NoDatamatch)
            .map_err(|e| BuildError::KvmVm("register a virtio ioeventfd", e))
    };
    if pci {
        let base = PciBus::bar_address(i);
        for (q, kick) in dev.kick_fds().iter().enumerate() {
            ioevent(kick, base + NOTIFY_OFFSET + q as u64 * NOTIFY_MULTIPLIER)?;
        }
        return Ok((base, gsi));
    }
    let base = VIRTIO_MMIO_START + i as u64 * VIRTIO_MMIO_SIZE;
    if !restoring {
        vm.register_irqfd(dev.call_fd(), gsi)
            .map_err(|e| BuildError::KvmVm("register a virtio irqfd", e))?;
    }
    for (q, kick) in dev.kick_fds().iter().enumerate() {
        vm.register_ioevent(
            kick,
            &IoEventAddress::Mmio(base + REG_QUEUE_NOTIFY),
            q as u32,
        )
        .map_err(|e| BuildError::KvmVm("register a virtio ioeventfd", e))?;
    }
    Ok((base, gsi))
}

/// The transport of device `i` (`name` in logs) on `bus`; `restoring`: its interrupts are
/// connected later, once the saved interrupt controllers are back.
pub(crate) fn transport(
    device: Box<dyn VirtioDevice>,
    name: String,
    ram: RamRanges,
    bus: &Bus,
    i: usize,
    restoring: bool,
) -> Result<VirtioTransport, BuildError> {
    let (device_type, queues) = (device.device_type(), device.num_queues());
    let mut t = VirtioTransport::new(device, name, ram);
    if let Bus::Pci(router) = bus {
        let slot = u8::try_from(i + 1)
            .ok()
            .filter(|&s| usize::from(s) <= PCI_MAX_DEVICES)
            .ok_or(BuildError::TooManyPciDevices(i + 1))?;
        let f = PciFunction::new(
            slot,
            PciBus::bar_address(i),
            device_type,
            queues,
            router.clone(),
            !restoring,
        )
        .map_err(|e| BuildError::Host("the config-change eventfd of a PCI device", e))?;
        t.set_pci(f);
    }
    Ok(t)
}
