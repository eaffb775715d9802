//! The virtio-mmio register interface (virtio 1.2 §4.2.2, version 2 "modern" only).
//!
//! Queue notifications never reach this code: the VMM registers a KVM ioeventfd on
//! QueueNotify for every queue, handed to the device process as its kick fd. Interrupts go
//! from the device process straight into KVM through an irqfd, so InterruptStatus always
//! reports a used-buffer notification once the device runs (the driver then checks its
//! queues), as Firecracker does for its vhost-user devices.

use super::{QueueConfig, RamRanges, VirtioDevice};
use crate::logger::LogThrottle;

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

const STATUS_ACKNOWLEDGE: u32 = 1;
const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
const STATUS_FAILED: u32 = 0x80;
const INT_VRING: u32 = 1;
const INT_CONFIG: u32 = 2;

/// One virtio-mmio window and the device behind it.
pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    name: String,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    config_generation: u32,
    active: bool,
    config_changed: bool,
    /// Where guest RAM is, to check the rings against.
    ram: RamRanges,
}

/// A transport's registers as data (snapshots, live upgrade). The device behind it keeps
/// its own state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioState {
    device_features_sel: u32,
    driver_features_sel: u32,
    /// Features the driver acknowledged.
    pub acked_features: u64,
    queue_sel: u32,
    /// The queues as the driver configured them.
    pub queues: Vec<QueueConfig>,
    status: u32,
    config_generation: u32,
    /// The device processes its queues (DRIVER_OK was accepted).
    pub active: bool,
    config_changed: bool,
}

/// Guest accesses that broke the virtio-mmio rules, in all transports.
static GUEST_MISUSE: LogThrottle = LogThrottle::new();

/// Counts one guest access that broke the rules; true for the ones worth a log line.
fn guest_misuse() -> bool {
    GUEST_MISUSE.hit()
}

fn set_half(v: &mut u64, high: bool, half: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(half);
    }
}

impl MmioTransport {
    /// A transport for `device` in a guest whose RAM is `ram`; `name` identifies it in logs.
    pub fn new(device: Box<dyn VirtioDevice>, name: String, ram: RamRanges) -> Self {
        let queues = vec![
            QueueConfig {
                max_size: device.queue_max_size(),
                ..Default::default()
            };
            device.num_queues()
        ];
        MmioTransport {
            device,
            name,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            queues,
            status: 0,
            config_generation: 0,
            active: false,
            config_changed: false,
            ram,
        }
    }

    /// The registers' state.
    pub fn state(&self) -> MmioState {
        MmioState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            config_changed: self.config_changed,
        }
    }

    /// Puts the registers back as `state` has them, over a device the caller already set up
    /// to match (an active one runs its rings where the state left them). Refused when the
    /// device has fewer queues, smaller ones, or lacks features the driver acknowledged.
    pub fn restore(&mut self, state: &MmioState) -> Result<(), String> {
        if state.queues.len() > self.queues.len() {
            return Err(format!(
                "{}: the saved state has {} queues, the device {}",
                self.name,
                state.queues.len(),
                self.queues.len()
            ));
        }
        for (i, (saved, q)) in state.queues.iter().zip(&self.queues).enumerate() {
            if saved.size > q.max_size {
                return Err(format!(
                    "{}: queue {i} was {} entries, the device takes at most {}",
                    self.name, saved.size, q.max_size
                ));
            }
        }
        let missing = state.acked_features & !self.device.features();
        if missing != 0 {
            return Err(format!(
                "{}: the device lacks features {missing:#x} the driver uses",
                self.name
            ));
        }
        for (q, saved) in self.queues.iter_mut().zip(&state.queues) {
            *q = QueueConfig {
                max_size: q.max_size,
                ..*saved
            };
        }
        self.device_features_sel = state.device_features_sel;
        self.driver_features_sel = state.driver_features_sel;
        self.acked_features = state.acked_features;
        self.queue_sel = state.queue_sel;
        self.status = state.status;
        self.config_generation = state.config_generation;
        self.active = state.active;
        self.config_changed = state.config_changed;
        Ok(())
    }

    /// The device behind the transport.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// The device status the driver wrote (0 after a reset).
    pub fn status(&self) -> u32 {
        self.status
    }

    /// Features the driver acknowledged.
    pub fn acked_features(&self) -> u64 {
        self.acked_features
    }

    /// The queues as the driver configured them.
    pub fn queues(&self) -> &[QueueConfig] {
        &self.queues
    }

    /// Records a device configuration change: the generation moves on and InterruptStatus
    /// reports it until the driver acknowledges. The caller raises the interrupt.
    pub fn config_changed(&mut self) {
        self.config_generation = self.config_generation.wrapping_add(1);
        self.config_changed = true;
    }

    /// The backend found a ring the driver broke: the device needs a reset
    /// (DEVICE_NEEDS_RESET) and the configuration-change interrupt tells the driver. True
    /// the first time in a driver session (the caller logs it and raises the interrupt).
    pub fn ring_broken(&mut self) -> bool {
        if !self.active || self.status & STATUS_DEVICE_NEEDS_RESET != 0 {
            return false;
        }
        self.status |= STATUS_DEVICE_NEEDS_RESET;
        self.config_changed();
        true
    }

    /// Whether the device processes its queues.
    pub fn is_active(&self) -> bool {
        self.active
    }

    fn queue(&mut self) -> Option<&mut QueueConfig> {
        // Queue registers can change only before the driver marks the queue ready.
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// An MMIO read at `offset` within the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= REG_CONFIG {
            self.device.read_config(offset - REG_CONFIG, data);
            return;
        }
        if data.len() != 4 {
            if guest_misuse() {
                log::warn!(
                    "{}: {}-byte read of register {offset:#x} ignored",
                    self.name,
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
            REG_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.device.features() as u32,
                1 => (self.device.features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.queue().map_or(0, |q| u32::from(q.max_size)),
            REG_QUEUE_READY => self.queue().map_or(0, |q| u32::from(q.ready)),
            REG_INTERRUPT_STATUS => {
                let vring = if self.active { INT_VRING } else { 0 };
                let config = if self.config_changed { INT_CONFIG } else { 0 };
                vring | config
            }
            REG_STATUS => self.status,
            REG_CONFIG_GENERATION => self.config_generation,
            _ => {
                if guest_misuse() {
                    log::debug!("{}: read of unknown register {offset:#x}", self.name);
                }
                0
            }
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// An MMIO write at `offset` within the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= REG_CONFIG {
            self.device.write_config(offset - REG_CONFIG, data);
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            if guest_misuse() {
                log::warn!(
                    "{}: {}-byte write of register {offset:#x} ignored",
                    self.name,
                    data.len()
                );
            }
            return;
        };
        let v = u32::from_le_bytes(bytes);
        let configurable = self.status & STATUS_FEATURES_OK != 0 && !self.active;
        match offset {
            REG_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            REG_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            REG_DRIVER_FEATURES => {
                if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
                    match self.driver_features_sel {
                        0 => set_half(&mut self.acked_features, false, v),
                        1 => set_half(&mut self.acked_features, true, v),
                        _ => {}
                    }
                }
            }
            REG_QUEUE_SEL => self.queue_sel = v,
            REG_QUEUE_NUM
            | REG_QUEUE_READY
            | REG_QUEUE_DESC_LOW
            | REG_QUEUE_DESC_HIGH
            | REG_QUEUE_DRIVER_LOW
            | REG_QUEUE_DRIVER_HIGH
            | REG_QUEUE_DEVICE_LOW
            | REG_QUEUE_DEVICE_HIGH => {
                if !configurable {
                    if guest_misuse() {
                        log::warn!(
                            "{}: queue register {offset:#x} written in status {:#x}",
                            self.name,
                            self.status
                        );
                    }
                    return;
                }
                let name = self.name.clone();
                let Some(q) = self.queue() else {
                    if guest_misuse() {
                        log::warn!("{name}: write to a queue that does not exist");
                    }
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
            REG_INTERRUPT_ACK => {
                if v & INT_CONFIG != 0 {
                    self.config_changed = false;
                }
            }
            REG_STATUS => self.write_status(v),
            _ => {
                if guest_misuse() {
                    log::debug!("{}: write of unknown register {offset:#x}", self.name);
                }
            }
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let new = v & !self.status;
        if new & STATUS_FEATURES_OK != 0 {
            let offered = self.device.features();
            if self.acked_features & !offered != 0 {
                if guest_misuse() {
                    log::warn!(
                        "{}: driver acked features {:#x} that were not offered",
                        self.name,
                        self.acked_features & !offered
                    );
                }
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
        }
        self.status = v;
        if new & STATUS_DRIVER_OK != 0 && !self.active {
            if v & (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
                != (STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK)
            {
                if guest_misuse() {
                    log::warn!("{}: DRIVER_OK without feature negotiation", self.name);
                }
                self.status |= STATUS_FAILED;
                return;
            }
            // A ring a backend cannot serve never reaches it.
            for (i, q) in self.queues.iter().enumerate().filter(|(_, q)| q.ready) {
                if let Err(why) = q.check(&self.ram) {
                    if guest_misuse() {
                        log::warn!(
                            "{}: queue {i} refused at DRIVER_OK: {why}; the device needs a reset",
                            self.name
                        );
                    }
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                    return;
                }
            }
            match self.device.activate(self.acked_features, &self.queues) {
                Ok(()) => {
                    self.active = true;
                    log::debug!(
                        "{}: activated with features {:#x}",
                        self.name,
                        self.acked_features
                    );
                }
                Err(e) => {
                    // The guest can retry in a loop (reset, set up, DRIVER_OK).
                    if guest_misuse() {
                        log::error!("{}: activation failed: {e}", self.name);
                    }
                    self.status |= STATUS_DEVICE_NEEDS_RESET;
                }
            }
        }
    }

    fn reset(&mut self) {
        // Also after a failed activation: queues it started in the backend must stop.
        if let Err(e) = self.device.reset() {
            log::error!("{}: reset failed: {e}", self.name);
        }
        self.active = false;
        self.config_changed = false;
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        for q in &mut self.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                ..Default::default()
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Default)]
    struct Seen {
        activated: Option<(u64, Vec<QueueConfig>)>,
        resets: u32,
    }

    struct FakeDevice(Arc<Mutex<Seen>>);

    impl VirtioDevice for FakeDevice {
        fn device_type(&self) -> u32 {
            2
        }
        fn num_queues(&self) -> usize {
            2
        }
        fn queue_max_size(&self) -> u16 {
            256
        }
        fn features(&self) -> u64 {
            (1 << 32) | 0b110
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            data.fill(offset as u8);
        }
        fn write_config(&mut self, _: u64, _: &[u8]) {}
        fn activate(
            &mut self,
            acked: u64,
            queues: &[QueueConfig],
        ) -> Result<(), super::super::VirtioError> {
            self.0.lock().unwrap().activated = Some((acked, queues.to_vec()));
            Ok(())
        }
        fn reset(&mut self) -> Result<(), super::super::VirtioError> {
            self.0.lock().unwrap().resets += 1;
            Ok(())
        }
    }

    /// 256 MiB of RAM below a hole, 64 MiB above it.
    fn ram() -> RamRanges {
        RamRanges(vec![(0, 256 << 20), (4 << 30, (4 << 30) + (64 << 20))])
    }

    fn r(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }
    fn w(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    #[test]
    fn driver_init_sequence_activates() {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(Box::new(FakeDevice(seen.clone())), "vda".into(), ram());
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
        let mut t = MmioTransport::new(Box::new(FakeDevice(seen)), "vda".into(), ram());
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
        let mut t = MmioTransport::new(Box::new(FakeDevice(seen)), "vda".into(), ram());
        w(
            &mut t,
            REG_STATUS,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        w(&mut t, REG_QUEUE_NUM, 100);
        w(&mut t, REG_QUEUE_NUM, 1024);
        assert_eq!(t.queues[0].size, 0);
    }

    /// Negotiates, sets queue 1 up with `size` and the three addresses, makes it ready and
    /// writes DRIVER_OK; returns the transport and what the device saw.
    fn bring_up(size: u32, desc: u64, avail: u64, used: u64) -> (MmioTransport, Arc<Mutex<Seen>>) {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut t = MmioTransport::new(Box::new(FakeDevice(seen.clone())), "vda".into(), ram());
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
