//! Message-signalled interrupts through KVM: the VM's GSI routing table, shared by every
//! PCI function. KVM_SET_GSI_ROUTING replaces the whole table, so the router keeps it: the
//! default routes of the PICs and the IOAPIC (what KVM sets up with the irqchip, and what
//! the legacy devices and virtio-mmio use) plus one MSI route per MSI-X vector a driver
//! enabled. An eventfd (a vhost-user call fd, a config-change eventfd) reaches a vector as
//! a KVM irqfd on that vector's GSI.

use std::collections::BTreeMap;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Mutex;

use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE, KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::{Kvm, VmFd};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::IRQ_MAX;

/// Errors of the MSI router.
#[derive(Debug, thiserror::Error)]
pub enum MsiError {
    /// The VM fd could not be duplicated.
    #[error("cannot duplicate the KVM VM fd for the MSI router")]
    Dup(#[source] std::io::Error),
    /// A KVM ioctl failed.
    #[error("KVM refused to {0}")]
    Kvm(&'static str, #[source] kvm_ioctls::Error),
    /// The routing table outgrew KVM's.
    #[error("{0} GSI routes are more than KVM takes")]
    TooMany(usize),
}

/// One MSI message: where the write goes and what it writes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsiMessage {
    /// Message address (the LAPIC window, with the destination).
    pub address: u64,
    /// Message data (vector and delivery mode).
    pub data: u32,
}

/// The VM's GSI routing table and irqfds for MSI vectors.
pub struct MsiRouter {
    vm: VmFd,
    msi: Mutex<BTreeMap<u32, MsiMessage>>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_IRQCHIP,
        ..Default::default()
    };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

fn msi_route(gsi: u32, m: MsiMessage) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry {
        gsi,
        type_: KVM_IRQ_ROUTING_MSI,
        ..Default::default()
    };
    e.u.msi.address_lo = m.address as u32;
    e.u.msi.address_hi = (m.address >> 32) as u32;
    e.u.msi.data = m.data;
    e
}

impl MsiRouter {
    /// A router for `vm` (an irqchip VM), through a handle of its own on the same VM.
    pub fn new(kvm: &Kvm, vm: &VmFd) -> Result<Self, MsiError> {
        // SAFETY: F_DUPFD_CLOEXEC on a live fd returns a new fd or -1.
        let fd = unsafe { libc::fcntl(vm.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 0) };
        if fd < 0 {
            return Err(MsiError::Dup(std::io::Error::last_os_error()));
        }
        // SAFETY: `fd` is a new fd only this function holds.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        let raw = std::os::fd::IntoRawFd::into_raw_fd(owned);
        // SAFETY: `raw` is a KVM VM fd (a duplicate of `vm`'s) whose ownership passes to the
        // new VmFd.
        let vm = unsafe { kvm.create_vmfd_from_rawfd(raw) }
            .map_err(|e| MsiError::Kvm("open the VM for the MSI router", e))?;
        Ok(MsiRouter {
            vm,
            msi: Mutex::new(BTreeMap::new()),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u32, MsiMessage>> {
        self.msi.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Routes `gsi` to the MSI `message`, or (None) removes its route.
    pub fn set_route(&self, gsi: u32, message: Option<MsiMessage>) -> Result<(), MsiError> {
        let mut msi = self.lock();
        let before = msi.get(&gsi).copied();
        if before == message {
            return Ok(());
        }
        match message {
            Some(m) => msi.insert(gsi, m),
            None => msi.remove(&gsi),
        };
        let r = self.push(&msi);
        if r.is_err() {
            // The table KVM has is still the old one.
            match before {
                Some(m) => msi.insert(gsi, m),
                None => msi.remove(&gsi),
            };
        }
        r
    }

    /// The MSI route of `gsi`.
    pub fn route(&self, gsi: u32) -> Option<MsiMessage> {
        self.lock().get(&gsi).copied()
    }

    fn push(&self, msi: &BTreeMap<u32, MsiMessage>) -> Result<(), MsiError> {
        // KVM's defaults (kvm_setup_default_irq_routing): ISA IRQs to both PICs and the
        // IOAPIC, the rest of the IOAPIC's pins to itself.
        let mut entries = Vec::with_capacity(16 + IRQ_MAX as usize + 1 + msi.len());
        for i in 0..16 {
            let (chip, pin) = if i < 8 {
                (KVM_IRQCHIP_PIC_MASTER, i)
            } else {
                (KVM_IRQCHIP_PIC_SLAVE, i - 8)
            };
            entries.push(irqchip(i, chip, pin));
        }
        for i in 0..=IRQ_MAX {
            entries.push(irqchip(i, KVM_IRQCHIP_IOAPIC, i));
        }
        entries.extend(msi.iter().map(|(&gsi, &m)| msi_route(gsi, m)));
        let n = entries.len();
        let table = KvmIrqRouting::from_entries(&entries).map_err(|_| MsiError::TooMany(n))?;
        self.vm
            .set_gsi_routing(&table)
            .map_err(|e| MsiError::Kvm("set the GSI routing table", e))
    }

    /// Connects `evt` to `gsi` (a KVM irqfd).
    pub fn attach(&self, evt: &EventFd, gsi: u32) -> Result<(), MsiError> {
        self.vm
            .register_irqfd(evt, gsi)
            .map_err(|e| MsiError::Kvm("register an MSI irqfd", e))
    }

    /// Disconnects `evt` from `gsi`. What it signals meanwhile stays counted in the eventfd,
    /// and KVM injects it when it is attached again.
    pub fn detach(&self, evt: &EventFd, gsi: u32) -> Result<(), MsiError> {
        self.vm
            .unregister_irqfd(evt, gsi)
            .map_err(|e| MsiError::Kvm("unregister an MSI irqfd", e))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes_go_into_kvm_and_an_unknown_gsi_is_refused_nothing() {
        let kvm = Kvm::new().expect("kvm");
        let vm = kvm.create_vm().expect("vm");
        vm.create_irq_chip().expect("irqchip");
        let r = MsiRouter::new(&kvm, &vm).expect("router");
        let m = MsiMessage {
            address: 0xfee0_0000,
            data: 0x4041,
        };
        r.set_route(24, Some(m)).expect("route");
        assert_eq!(r.route(24), Some(m));
        let evt = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        r.attach(&evt, 24).expect("attach");
        // Signalled while attached: KVM consumes it into the (vCPU-less) VM.
        evt.write(1).expect("write");
        r.detach(&evt, 24).expect("detach");
        // Detached: the count stays in the eventfd.
        evt.write(1).expect("write");
        assert_eq!(evt.read().expect("read"), 1);
        r.set_route(24, None).expect("unroute");
        assert_eq!(r.route(24), None);
        // The router's handle is close-on-exec.
        // SAFETY: F_GETFD on the router's own fd.
        let flags = unsafe { libc::fcntl(r.vm.as_raw_fd(), libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, libc::FD_CLOEXEC);
    }
}
