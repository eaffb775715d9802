//! Devices the VMM emulates itself (serial, i8042), the virtio transports (MMIO, PCI) that
//! front vhost-user device processes, the PCI bus and MSI routing, plus the port-I/O and
//! MMIO dispatch for vCPU exits.

pub mod bus;
pub mod i8042;
pub mod metrics_page;
pub mod msi;
pub mod pci;
pub mod serial;
pub mod virtio;

use vmm_sys_util::eventfd::EventFd;

/// An interrupt line: an eventfd registered with KVM as an irqfd.
#[derive(Debug)]
pub struct IrqLine(pub EventFd);

impl vm_superio::Trigger for IrqLine {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}
