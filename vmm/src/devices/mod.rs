//! Devices the VMM emulates itself (serial, i8042) and the virtio-mmio transport that
//! fronts vhost-user device processes, plus the port-I/O and MMIO dispatch for vCPU exits.

pub mod bus;
pub mod i8042;
pub mod metrics_page;
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
