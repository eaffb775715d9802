//! The virtio-pci transport as a driver sees it: configuration space, BAR sizing, the
//! common configuration, activation, MSI-X routes in a real KVM VM, state and the PCI
//! configuration access window.

use std::sync::{Arc, Mutex};

use kvm_ioctls::{Kvm, VmFd};

use super::*;
use crate::devices::virtio::test_device::{ram, FakeDevice, Seen};
use crate::devices::virtio::transport::{
    STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};

const BAR: u64 = 0xc000_8000;

fn new_vm() -> (Kvm, VmFd) {
    let kvm = Kvm::new().expect("kvm");
    let vm = kvm.create_vm().expect("vm");
    vm.create_irq_chip().expect("irqchip");
    (kvm, vm)
}

/// Device 2 on the bus (slot 2), BAR 0 at [`BAR`].
fn function(kvm: &Kvm, vm: &VmFd) -> (VirtioTransport, Arc<Mutex<Seen>>, Arc<MsiRouter>) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let router = Arc::new(MsiRouter::new(kvm, vm).expect("router"));
    let mut t = VirtioTransport::new(Box::new(FakeDevice(seen.clone())), "vdb".into(), ram());
    t.set_pci(PciFunction::new(2, BAR, 2, 2, router.clone(), true).expect("function"));
    (t, seen, router)
}

fn cfg(t: &mut VirtioTransport, off: u64, len: usize) -> u32 {
    let mut b = [0u8; 4];
    t.pci_config_read(off, &mut b[..len]);
    u32::from_le_bytes(b)
}

fn cfg_w(t: &mut VirtioTransport, off: u64, v: u32, len: usize) {
    t.pci_config_write(off, &v.to_le_bytes()[..len]);
}

fn bar(t: &mut VirtioTransport, off: u64, len: usize) -> u64 {
    let mut b = [0u8; 8];
    t.pci_bar_read(off, &mut b[..len]);
    u64::from_le_bytes(b)
}

fn bar_w(t: &mut VirtioTransport, off: u64, v: u64, len: usize) {
    t.pci_bar_write(off, &v.to_le_bytes()[..len]);
}

#[test]
fn config_space_names_a_modern_virtio_block_function_and_its_capabilities() {
    let (kvm, vm) = new_vm();
    let (mut t, _, _) = function(&kvm, &vm);
    assert_eq!(cfg(&mut t, 0, 4), 0x1042_1af4);
    assert_eq!(cfg(&mut t, 2, 2), 0x1042);
    assert_eq!(cfg(&mut t, 8, 4) >> 8, 0x01_80_00);
    assert_eq!(cfg(&mut t, 6, 2) & 0x10, 0x10, "capability list");
    assert_eq!(cfg(&mut t, 0x3d, 1), 0, "no INTx pin");
    // Walk the capability list: four virtio structures (common, ISR, device, notify), the
    // configuration access window, then MSI-X, which ends it.
    let mut at = cfg(&mut t, 0x34, 1) as u64;
    let mut found = Vec::new();
    while at != 0 {
        let id = cfg(&mut t, at, 1);
        if id == 0x09 {
            let cfg_type = cfg(&mut t, at + 3, 1);
            let offset = cfg(&mut t, at + 8, 4);
            found.push((cfg_type, offset));
            if cfg_type == 2 {
                assert_eq!(cfg(&mut t, at + 16, 4), NOTIFY_MULTIPLIER as u32);
            }
        } else {
            assert_eq!(id, 0x11, "capability {id:#x}");
            // Two vectors (table size - 1 = 1), table and PBA in BAR 0.
            assert_eq!(cfg(&mut t, at + 2, 2) & 0x7ff, 1);
            assert_eq!(cfg(&mut t, at + 4, 4), MSIX_TABLE_OFFSET as u32);
            assert_eq!(cfg(&mut t, at + 8, 4), MSIX_PBA_OFFSET as u32);
            found.push((0x11, 0));
        }
        at = cfg(&mut t, at + 1, 1) as u64;
    }
    assert_eq!(
        found,
        [
            (1, COMMON_OFFSET as u32),
            (3, ISR_OFFSET as u32),
            (4, DEVICE_OFFSET as u32),
            (2, NOTIFY_OFFSET as u32),
            (5, 0),
            (0x11, 0)
        ]
    );
    // Identity registers are read-only.
    cfg_w(&mut t, 0, 0xdead_beef, 4);
    assert_eq!(cfg(&mut t, 0, 4), 0x1042_1af4);
    // Past the 256 bytes of a conventional function: zeros.
    assert_eq!(cfg(&mut t, 0x100, 4), 0);
}

#[test]
fn bar_0_can_be_sized_but_not_moved() {
    let (kvm, vm) = new_vm();
    let (mut t, _, _) = function(&kvm, &vm);
    assert_eq!(cfg(&mut t, 0x10, 4) as u64, BAR);
    cfg_w(&mut t, 0x10, 0xffff_ffff, 4);
    assert_eq!(cfg(&mut t, 0x10, 4), !(PCI_BAR_SIZE as u32 - 1));
    cfg_w(&mut t, 0x10, BAR as u32, 4);
    assert_eq!(cfg(&mut t, 0x10, 4) as u64, BAR);
    cfg_w(&mut t, 0x10, 0xc100_0000, 4);
    assert_eq!(cfg(&mut t, 0x10, 4) as u64, BAR, "moved");
    // BARs 1-5 do not exist: sizing them reads 0.
    cfg_w(&mut t, 0x14, 0xffff_ffff, 4);
    assert_eq!(cfg(&mut t, 0x14, 4), 0);
    // Memory decoding and bus mastering can be turned on.
    cfg_w(&mut t, 4, 0x0006, 2);
    assert_eq!(cfg(&mut t, 4, 2), 0x0006);
}

/// Negotiates, sets queue 1 up and writes DRIVER_OK through the common configuration.
fn bring_up(t: &mut VirtioTransport) {
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    bar_w(t, 0x14, u64::from(STATUS_ACKNOWLEDGE | STATUS_DRIVER), 1);
    bar_w(t, 0x00, 1, 4);
    assert_eq!(bar(t, 0x04, 4), 1, "device features 32-63");
    bar_w(t, 0x08, 1, 4);
    bar_w(t, 0x0c, 1, 4);
    bar_w(t, 0x08, 0, 4);
    bar_w(t, 0x0c, 0b100, 4);
    bar_w(t, 0x14, u64::from(ok), 1);
    assert_eq!(
        bar(t, 0x14, 1) as u32 & STATUS_FEATURES_OK,
        STATUS_FEATURES_OK
    );
    assert_eq!(bar(t, 0x12, 2), 2, "num_queues");
    bar_w(t, 0x16, 1, 2);
    assert_eq!(bar(t, 0x18, 2), 256, "a queue's size starts at its maximum");
    assert_eq!(bar(t, 0x1e, 2), 1, "queue_notify_off");
    bar_w(t, 0x18, 128, 2);
    bar_w(t, 0x20, 0x1000, 4);
    bar_w(t, 0x24, 0, 4);
    bar_w(t, 0x28, 0x2000, 8);
    bar_w(t, 0x30, 0x3000, 4);
    bar_w(t, 0x34, 0, 4);
    bar_w(t, 0x1c, 1, 2);
    bar_w(t, 0x14, u64::from(ok | STATUS_DRIVER_OK), 1);
}

#[test]
fn a_driver_activates_the_device_through_the_common_configuration() {
    let (kvm, vm) = new_vm();
    let (mut t, seen, _) = function(&kvm, &vm);
    bring_up(&mut t);
    assert!(t.is_active());
    let (acked, queues) = seen.lock().unwrap().activated.clone().unwrap();
    assert_eq!(acked, (1 << 32) | 0b100);
    assert_eq!(queues[1].size, 128);
    assert_eq!(
        (queues[1].desc, queues[1].avail, queues[1].used),
        (0x1000, 0x2000, 0x3000)
    );
    assert!(!queues[0].ready && queues[1].ready);
    assert_eq!(bar(&mut t, 0x28, 8), 0x2000);
    // The device configuration is the device's, at its offset.
    assert_eq!(bar(&mut t, DEVICE_OFFSET + 5, 1), 5);
    // Queue registers cannot change once the device runs.
    bar_w(&mut t, 0x18, 64, 2);
    assert_eq!(bar(&mut t, 0x18, 2), 128);
    // A reset stops it and unmaps the vectors.
    bar_w(&mut t, 0x10, 0, 2);
    bar_w(&mut t, 0x14, 0, 1);
    assert!(!t.is_active());
    assert_eq!(seen.lock().unwrap().resets, 1);
    assert_eq!(bar(&mut t, 0x10, 2), u64::from(NO_VECTOR));
}

#[test]
fn a_queue_enabled_without_a_size_takes_its_maximum() {
    let (kvm, vm) = new_vm();
    let (mut t, _, _) = function(&kvm, &vm);
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    bar_w(&mut t, 0x14, u64::from(ok), 1);
    bar_w(&mut t, 0x18, 100, 2); // not a power of two: refused
    bar_w(&mut t, 0x1c, 1, 2);
    assert_eq!(t.queues()[0].size, 256);
    assert!(t.queues()[0].ready);
}

#[test]
fn msix_vectors_become_kvm_routes_only_when_enabled_and_unmasked() {
    let (kvm, vm) = new_vm();
    let (mut t, _, router) = function(&kvm, &vm);
    // Slot 2: GSIs PCI_MSI_GSI_BASE + 2, + 3.
    let gsi = |v: u32| PCI_MSI_GSI_BASE + 2 + v;
    let msix = CAP_MSIX as u64;
    cfg_w(&mut t, 4, 0x0006, 2); // memory space, bus master
                                 // Program vector 0 and map the configuration change to it.
    bar_w(&mut t, MSIX_TABLE_OFFSET, 0xfee0_1000, 8);
    bar_w(&mut t, MSIX_TABLE_OFFSET + 8, 0x41, 4);
    bar_w(&mut t, 0x10, 0, 2);
    assert_eq!(bar(&mut t, 0x10, 2), 0);
    // Still masked (entry) and MSI-X disabled: no route.
    bar_w(&mut t, MSIX_TABLE_OFFSET + 12, 0, 4);
    assert_eq!(router.route(gsi(0)), None);
    cfg_w(&mut t, msix + 2, u32::from(MSIX_ENABLE), 2);
    let want = MsiMessage {
        address: 0xfee0_1000,
        data: 0x41,
    };
    assert_eq!(router.route(gsi(0)), Some(want));
    assert_eq!(cfg(&mut t, msix + 2, 2) as u16 & MSIX_ENABLE, MSIX_ENABLE);
    // The function mask and the entry mask each take the route away.
    cfg_w(
        &mut t,
        msix + 2,
        u32::from(MSIX_ENABLE | MSIX_FUNCTION_MASK),
        2,
    );
    assert_eq!(router.route(gsi(0)), None);
    cfg_w(&mut t, msix + 2, u32::from(MSIX_ENABLE), 2);
    assert_eq!(router.route(gsi(0)), Some(want));
    // Without Bus Master there are no messages.
    cfg_w(&mut t, 4, 0x0002, 2);
    assert_eq!(router.route(gsi(0)), None);
    cfg_w(&mut t, 4, 0x0006, 2);
    assert_eq!(router.route(gsi(0)), Some(want));
    bar_w(&mut t, MSIX_TABLE_OFFSET + 12, 1, 4);
    assert_eq!(router.route(gsi(0)), None);
    assert_eq!(bar(&mut t, MSIX_TABLE_OFFSET + 12, 4), 1);
    assert_eq!(bar(&mut t, MSIX_TABLE_OFFSET, 8), 0xfee0_1000);
    // A vector past the table maps to NO_VECTOR.
    bar_w(&mut t, 0x16, 0, 2);
    bar_w(&mut t, 0x1a, 7, 2);
    assert_eq!(bar(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    bar_w(&mut t, 0x1a, 1, 2);
    assert_eq!(bar(&mut t, 0x1a, 2), 1);
    // The queues share one call eventfd: another queue on another vector is refused, on
    // the same one accepted.
    bar_w(&mut t, 0x16, 1, 2);
    bar_w(&mut t, 0x1a, 0, 2);
    assert_eq!(bar(&mut t, 0x1a, 2), u64::from(NO_VECTOR));
    bar_w(&mut t, 0x1a, 1, 2);
    assert_eq!(bar(&mut t, 0x1a, 2), 1);
    // Past the table: ignored, reads 0; the PBA reads 0.
    bar_w(&mut t, MSIX_TABLE_OFFSET + 32, 5, 4);
    assert_eq!(bar(&mut t, MSIX_TABLE_OFFSET + 32, 4), 0);
    assert_eq!(bar(&mut t, MSIX_PBA_OFFSET, 8), 0);
}

#[test]
fn the_state_goes_back_into_a_new_function() {
    let (kvm, vm) = new_vm();
    let (mut t, _, _) = function(&kvm, &vm);
    cfg_w(&mut t, 4, 0x0006, 2);
    bar_w(&mut t, MSIX_TABLE_OFFSET + 16, 0xfee0_0000, 8);
    bar_w(&mut t, MSIX_TABLE_OFFSET + 24, 0x51, 4);
    bar_w(&mut t, MSIX_TABLE_OFFSET + 28, 0, 4);
    cfg_w(&mut t, CAP_MSIX as u64 + 2, u32::from(MSIX_ENABLE), 2);
    bring_up(&mut t);
    bar_w(&mut t, 0x16, 1, 2);
    bar_w(&mut t, 0x1a, 1, 2);
    let saved = t.state();
    let json = serde_json::to_string(&saved).expect("json");
    let back: crate::devices::virtio::transport::TransportState =
        serde_json::from_str(&json).expect("parse");
    assert_eq!(back, saved);
    let (kvm2, vm2) = new_vm();
    let (mut t2, _, router2) = function(&kvm2, &vm2);
    t2.restore(&back).expect("restore");
    assert_eq!(t2.state(), saved);
    // Connected again, the vector's route is back in the new VM.
    t2.attach_interrupts(&vm2, 0).expect("attach");
    assert_eq!(
        router2.route(PCI_MSI_GSI_BASE + 2 + 1),
        Some(MsiMessage {
            address: 0xfee0_0000,
            data: 0x51
        })
    );
    // A virtio-mmio state does not go into a PCI function, nor the other way round.
    let mut mmio_state = saved.clone();
    mmio_state.pci = None;
    assert!(t2.restore(&mmio_state).unwrap_err().contains("virtio-mmio"));
    let mut mmio = VirtioTransport::new(
        Box::new(FakeDevice(Arc::new(Mutex::new(Seen::default())))),
        "vdc".into(),
        ram(),
    );
    assert!(mmio.restore(&saved).unwrap_err().contains("virtio-pci"));
    // Bits a driver cannot write do not come back from a state either.
    let mut odd = saved.clone();
    if let Some(p) = &mut odd.pci {
        p.msix_control |= 0x07ff;
        p.command |= 0xf000;
        p.table[0].control |= 0xfffe;
    }
    t2.restore(&odd).expect("restore");
    assert_eq!(
        cfg(&mut t2, CAP_MSIX as u64 + 2, 2) & 0x7ff,
        1,
        "table size"
    );
    assert_eq!(cfg(&mut t2, 4, 2), 0x0006);
    assert_eq!(t2.state(), saved);
}

#[test]
fn the_configuration_access_window_reaches_bar_0() {
    let (kvm, vm) = new_vm();
    let (mut t, _, _) = function(&kvm, &vm);
    let w = CAP_PCI_CFG as u64;
    cfg_w(&mut t, w + 4, 0, 1); // BAR 0
    cfg_w(&mut t, w + 8, 0x12, 4); // num_queues
    cfg_w(&mut t, w + 12, 2, 4);
    assert_eq!(cfg(&mut t, w + 16, 4) & 0xffff, 2);
    // A write through it: queue_select.
    cfg_w(&mut t, w + 8, 0x16, 4);
    cfg_w(&mut t, w + 16, 1, 4);
    assert_eq!(bar(&mut t, 0x16, 2), 1);
    // A length other than 1, 2 or 4 reads nothing.
    cfg_w(&mut t, w + 12, 3, 4);
    assert_eq!(cfg(&mut t, w + 16, 4), 0);
}
