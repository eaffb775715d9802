//! The virtio-pci transport: any sequence of guest configuration-space and BAR accesses,
//! of any size at any offset, and broken-ring reports, never panics, a device is only ever
//! activated with queues that passed the checks, and the MSI-X routes it asks of KVM (a
//! real KVM VM: the router's table is KVM's) always take.
//!
//! Input: records of 7 bytes: op, offset (u16 LE), value (u32 LE). op & 7: 0 config read,
//! 1 config write, 2 BAR read, 3 BAR write, 4 a broken-ring report, 5 detach and attach the
//! interrupts (a VMM upgrade), 6 a configuration-change interrupt, 7 a write of the value to
//! the device status; op >> 3 & 3 picks the access size (4, 1, 2, 8).
#![no_main]

#[path = "common/device.rs"]
mod device;

use std::sync::{Arc, Mutex, OnceLock};

use device::{ram, CheckingDevice};
use kvm_ioctls::{Kvm, VmFd};
use libfuzzer_sys::fuzz_target;
use vmm::devices::msi::MsiRouter;
use vmm::devices::virtio::pci::PciFunction;
use vmm::devices::virtio::transport::VirtioTransport;

/// One KVM VM with an irqchip for the whole run, and its router.
fn vm() -> &'static (Kvm, VmFd, Arc<MsiRouter>) {
    static VM: OnceLock<(Kvm, VmFd, Arc<MsiRouter>)> = OnceLock::new();
    VM.get_or_init(|| {
        let kvm = Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().expect("a KVM VM");
        vm.create_irq_chip().expect("an irqchip");
        let router = Arc::new(MsiRouter::new(&kvm, &vm).expect("the router"));
        (kvm, vm, router)
    })
}

static LOCK: Mutex<()> = Mutex::new(());

fuzz_target!(|data: &[u8]| {
    let _one = LOCK.lock().unwrap_or_else(|p| p.into_inner());
    let (_, vmfd, router) = vm();
    let mut t = VirtioTransport::new(
        Box::new(CheckingDevice {
            device_type: 1,
            queues: 3,
            activations: Arc::default(),
        }),
        "fuzz".into(),
        ram(),
    );
    let f = PciFunction::new(1, 0xc000_0000, 1, 3, router.clone(), true).expect("function");
    t.set_pci(f);
    for r in data.chunks_exact(7) {
        let offset = u64::from(u16::from_le_bytes([r[1], r[2]]));
        let value = [r[3], r[4], r[5], r[6], r[3], r[4], r[5], r[6]];
        let size = [4, 1, 2, 8][usize::from(r[0] >> 3) & 3];
        let mut buf = [0u8; 8];
        match r[0] & 7 {
            0 => t.pci_config_read(offset % 0x1000, &mut buf[..size.min(4)]),
            1 => t.pci_config_write(offset % 0x1000, &value[..size.min(4)]),
            2 => t.pci_bar_read(offset % 0x8000, &mut buf[..size]),
            3 => t.pci_bar_write(offset % 0x8000, &value[..size]),
            4 => {
                let _ = t.ring_broken();
            }
            5 => {
                t.detach_interrupts(vmfd, 0).expect("detach");
                t.attach_interrupts(vmfd, 0).expect("attach");
            }
            6 => t.signal_config().expect("config interrupt"),
            _ => t.pci_bar_write(0x14, &value[..1]),
        }
    }
    // Leave no route or irqfd behind for the next input.
    t.detach_interrupts(vmfd, 0).expect("detach");
});
