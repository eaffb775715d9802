//! The virtio-mmio register interface (virtio 1.2 §4.2.2, version 2 "modern" only).
//!
//! Queue notifications never reach this code: the VMM registers a KVM ioeventfd on
//! QueueNotify for every queue, handed to the device process as its kick fd. Interrupts go
//! from the device process straight into KVM through an irqfd, so InterruptStatus always
//! reports a used-buffer notification once the device runs (the driver then checks its
//! queues), as Firecracker does for its vhost-user devices.

use super::transport::{guest_misuse, set_half, VirtioTransport};

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR_ID: u32 = 0x534b_4646; // "SKFF"

const REG_MAGIC: u64 = 0x000;
const REG_VERSION: u64 = 0x004;
const REG_DEVICE_ID: u64 = 0x008;
const REG_VENDOR_ID: u64 = 0x00c;
const REG_DEVICE_FEATURES: u64 = 0x010;
const REG_DEVICE_FEATURES_SEL: u64 = 0x014;
const REG_DRIVER_FEATURES: u64 = 0x020;
const REG_DRIVER_FEATURES_SEL: u64 = 0x024;
const REG_QUEUE_SEL: u64 = 0x030;
const REG_QUEUE_NUM_MAX: u64 = 0x034;
const REG_QUEUE_NUM: u64 = 0x038;
const REG_QUEUE_READY: u64 = 0x044;
/// QueueNotify: served by ioeventfds, listed here for the layout.
pub const REG_QUEUE_NOTIFY: u64 = 0x050;
const REG_INTERRUPT_STATUS: u64 = 0x060;
const REG_INTERRUPT_ACK: u64 = 0x064;
const REG_STATUS: u64 = 0x070;
const REG_QUEUE_DESC_LOW: u64 = 0x080;
const REG_QUEUE_DESC_HIGH: u64 = 0x084;
const REG_QUEUE_DRIVER_LOW: u64 = 0x090;
const REG_QUEUE_DRIVER_HIGH: u64 = 0x094;
const REG_QUEUE_DEVICE_LOW: u64 = 0x0a0;
const REG_QUEUE_DEVICE_HIGH: u64 = 0x0a4;
const REG_CONFIG_GENERATION: u64 = 0x0fc;
const REG_CONFIG: u64 = 0x100;

impl VirtioTransport {
    /// A read at `offset` within the device's virtio-mmio window.
    pub fn mmio_read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            if guest_misuse() {
                log::warn!(
                    "{}: {}-byte read of register {offset:#x} ignored",
                    self.name(),
                    data.len()
                );
            }
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MAGIC,
            REG_VERSION => VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => VENDOR_ID,
            REG_DEVICE_FEATURES => self.device_features_word(),
            REG_QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => self.interrupt_status(),
            REG_STATUS => self.status(),
            REG_CONFIG_GENERATION => self.config_generation(),
            _ => {
                if guest_misuse() {
                    log::debug!("{}: read of unknown register {offset:#x}", self.name());
                }
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// A write at `offset` within the device's virtio-mmio window.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            if guest_misuse() {
                log::warn!(
                    "{}: {}-byte write of register {offset:#x} ignored",
                    self.name(),
                    data.len()
                );
            }
            return;
        };
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => self.write_driver_features(v),
            REG_QUEUE_SEL => self.select_queue(v),
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                let name = self.name().to_string();
                let Some(q) = self.configurable_queue(offset) else {
                    return;
                };
                match offset {
                    REG_QUEUE_NUM => {
                        if v == 0 || v > u32::from(q.max_size) || !v.is_power_of_two() {
                            if guest_misuse() {
                                log::warn!("{name}: invalid queue size {v}");
                            }
                        } else {
                            q.size = v as u16;
                        }
                    }
                    REG_QUEUE_READY => q.ready = v == 1,
                    REG_QUEUE_DESC_LOW => set_half(&mut q.desc, false, v),
                    REG_QUEUE_DESC_HIGH => set_half(&mut q.desc, true, v),
                    REG_QUEUE_DRIVER_LOW => set_half(&mut q.avail, false, v),
                    REG_QUEUE_DRIVER_HIGH => set_half(&mut q.avail, true, v),
                    REG_QUEUE_DEVICE_LOW => set_half(&mut q.used, false, v),
                    _ => set_half(&mut q.used, true, v),
                }
            }
            REG_INTERRUPT_ACK => self.ack_interrupt(v),
            REG_STATUS => self.write_status(v),
            _ => {
                if guest_misuse() {
                    log::debug!("{}: write of unknown register {offset:#x}", self.name());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_device::{ram, FakeDevice, Seen};
    use crate::devices::virtio::transport::{
        INT_CONFIG, INT_VRING, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET, STATUS_DRIVER,
        STATUS_DRIVER_OK, STATUS_FEATURES_OK,
    };
    use std::sync::{Arc, Mutex};

    fn r(t: &mut VirtioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.mmio_read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut VirtioTransport, off: u64, v: u32) {
        t.mmio_write(off, &v.to_le_bytes());
    }

    #[test]
    fn driver_init_sequence_activates() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = VirtioTransport::new(Box::new(FakeDevice(seen.clone())), "vda".into(), ram());
        assert_eq!(r(&mut t, REG_MAGIC), MAGIC);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 2);
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 1);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0b100);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 256);
        w(&mut t, REG_QUEUE_NUM, 128);
        w(&mut t, REG_QUEUE_DESC_LOW, 0x1000);
        w(&mut t, REG_QUEUE_DESC_HIGH, 0x1);
        w(&mut t, REG_QUEUE_DRIVER_LOW, 0x2000);
        w(&mut t, REG_QUEUE_DEVICE_LOW, 0x3000);
        w(&mut t, REG_QUEUE_READY, 1);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert!(t.is_active());
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), INT_VRING);
        let (acked, queues) = seen.lock().unwrap().activated.clone().unwrap();
        assert_eq!(acked, (1 << 32) | 0b100);
        assert_eq!(queues[1].size, 128);
        assert_eq!(queues[1].desc, 0x1_0000_1000);
        assert!(!queues[0].ready && queues[1].ready);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_active());
        assert_eq!(seen.lock().unwrap().resets, 1);
    }

    #[test]
    fn unoffered_features_fail_negotiation() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = VirtioTransport::new(Box::new(FakeDevice(seen)), "vda".into(), ram());
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_DRIVER_FEATURES, 0b1);
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_eq!(r(&mut t, REG_STATUS) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn bad_queue_size_is_ignored() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = VirtioTransport::new(Box::new(FakeDevice(seen)), "vda".into(), ram());
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, REG_QUEUE_NUM, 100);
        w(&mut t, REG_QUEUE_NUM, 1024);
        assert_eq!(t.queues()[0].size, 0);
    }

    /// Negotiates, sets queue 1 up with `size` and the three addresses, makes it ready and
    /// writes DRIVER_OK; returns the transport and what the device saw.
    fn bring_up(
        size: u32,
        desc: u64,
        avail: u64,
        used: u64,
    ) -> (VirtioTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = VirtioTransport::new(Box::new(FakeDevice(seen.clone())), "vda".into(), ram());
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w(&mut t, REG_STATUS, ok);
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_NUM, size);
        for (lo, hi, v) in [
            (REG_QUEUE_DESC_LOW, REG_QUEUE_DESC_HIGH, desc),
            (REG_QUEUE_DRIVER_LOW, REG_QUEUE_DRIVER_HIGH, avail),
            (REG_QUEUE_DEVICE_LOW, REG_QUEUE_DEVICE_HIGH, used),
        ] {
            w(&mut t, lo, v as u32);
            w(&mut t, hi, (v >> 32) as u32);
        }
        w(&mut t, REG_QUEUE_READY, 1);
        w(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK);
        (t, seen)
    }

    #[test]
    fn rings_a_backend_cannot_serve_are_refused_at_driver_ok() {
        let end = 256u64 << 20;
        for (what, size, desc, avail, used) in [
            ("size 0", 0, 0x1000, 0x2000, 0x3000),
            ("size not set (invalid 100)", 100, 0x1000, 0x2000, 0x3000),
            (
                "descriptors past the end of RAM",
                256,
                end - 16,
                0x2000,
                0x3000,
            ),
            (
                "used ring in the MMIO hole",
                256,
                0x1000,
                0x2000,
                0xd000_0000,
            ),
            (
                "available ring across the end of RAM",
                256,
                0x1000,
                end - 64,
                0x3000,
            ),
            (
                "descriptors from the hole into the high region",
                256,
                (4 << 30) - 2048,
                0x2000,
                0x3000,
            ),
            ("misaligned used ring", 256, 0x1000, 0x2000, 0x3002),
            ("address wraps", 256, u64::MAX - 15, 0x2000, 0x3000),
        ] {
            let (mut t, seen) = bring_up(size, desc, avail, used);
            assert!(!t.is_active(), "{what}: activated");
            assert!(
                seen.lock().unwrap().activated.is_none(),
                "{what}: reached the device"
            );
            assert_ne!(
                r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET,
                0,
                "{what}: no DEVICE_NEEDS_RESET"
            );
            // A reset clears it, and a good setup then works.
            w(&mut t, REG_STATUS, 0);
            assert_eq!(r(&mut t, REG_STATUS), 0);
        }
        let (t, seen) = bring_up(256, 0x1000, 0x2000, 0x3000);
        assert!(t.is_active());
        assert!(seen.lock().unwrap().activated.is_some());
    }

    #[test]
    fn a_broken_ring_needs_a_reset_once_per_session() {
        let (mut t, _) = bring_up(256, 0x1000, 0x2000, 0x3000);
        assert!(t.ring_broken());
        assert!(!t.ring_broken(), "reported twice");
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS) & INT_CONFIG, INT_CONFIG);
        w(&mut t, REG_STATUS, 0);
        assert!(!t.ring_broken(), "an inactive device has no rings to break");
    }
}
