//! The state every virtio transport shares (virtio 1.2 §3.1, §4): feature negotiation, the
//! device status, each virtqueue's configuration, activation and reset. The register
//! layouts that reach it are in [`super::mmio`] (virtio-mmio) and [`super::pci`]
//! (virtio-pci).

use super::pci::{PciFunction, PciState};
use super::{QueueConfig, RamRanges, VirtioDevice};
use crate::logger::LogThrottle;

/// Device status bits (virtio 1.2 §2.1).
pub(super) const STATUS_ACKNOWLEDGE: u32 = 1;
pub(super) const STATUS_DRIVER: u32 = 2;
pub(super) const STATUS_DRIVER_OK: u32 = 4;
pub(super) const STATUS_FEATURES_OK: u32 = 8;
pub(super) const STATUS_DEVICE_NEEDS_RESET: u32 = 0x40;
pub(super) const STATUS_FAILED: u32 = 0x80;
/// Interrupt status bits: used buffer, configuration change.
pub(super) const INT_VRING: u32 = 1;
pub(super) const INT_CONFIG: u32 = 2;

/// One virtio device and the transport state the driver sees, whichever register layout
/// (virtio-mmio or virtio-pci) it reaches it through.
pub struct VirtioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    name: String,
    pub(super) device_features_sel: u32,
    pub(super) driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    queues: Vec<QueueConfig>,
    status: u32,
    config_generation: u32,
    active: bool,
    config_changed: bool,
    /// Where guest RAM is, to check the rings against.
    ram: RamRanges,
    /// The PCI function (config space, BAR, MSI-X) when the device is on the PCI bus.
    pub(super) pci: Option<Box<PciFunction>>,
}

/// A transport's registers as data (snapshots, live upgrade). The device behind it keeps
/// its own state.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TransportState {
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
    /// The PCI function's state (absent: a virtio-mmio device, and every state from a skiff
    /// before virtio-pci).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pci: Option<PciState>,
}

/// Guest accesses that broke the virtio rules, in all transports.
static GUEST_MISUSE: LogThrottle = LogThrottle::new();

/// Counts one guest access that broke the rules; true for the ones worth a log line.
pub(super) fn guest_misuse() -> bool {
    GUEST_MISUSE.hit()
}

pub(super) fn set_half(v: &mut u64, high: bool, half: u32) {
    if high {
        *v = (*v & 0xffff_ffff) | (u64::from(half) << 32);
    } else {
        *v = (*v & !0xffff_ffff) | u64::from(half);
    }
}

impl VirtioTransport {
    /// A transport for `device` in a guest whose RAM is `ram`; `name` identifies it in logs.
    pub fn new(device: Box<dyn VirtioDevice>, name: String, ram: RamRanges) -> Self {
        let queues = vec![
            QueueConfig {
                max_size: device.queue_max_size(),
                ..Default::default()
            };
            device.num_queues()
        ];
        VirtioTransport {
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
            pci: None,
        }
    }

    /// The registers' state.
    pub fn state(&self) -> TransportState {
        TransportState {
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            queues: self.queues.clone(),
            status: self.status,
            config_generation: self.config_generation,
            active: self.active,
            config_changed: self.config_changed,
            pci: self.pci.as_ref().map(|p| p.state()),
        }
    }

    /// Puts the registers back as `state` has them, over a device the caller already set up
    /// to match (an active one runs its rings where the state left them). Refused when the
    /// device has fewer queues, smaller ones, or lacks features the driver acknowledged.
    pub fn restore(&mut self, state: &TransportState) -> Result<(), String> {
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
        match (&mut self.pci, &state.pci) {
            (Some(p), Some(s)) => p
                .restore(s, self.queues.len())
                .map_err(|e| format!("{}: {e}", self.name))?,
            (None, None) => {}
            (Some(_), None) => {
                return Err(format!(
                    "{}: the saved state is of a virtio-mmio device, this one is on PCI",
                    self.name
                ))
            }
            (None, Some(_)) => {
                return Err(format!(
                    "{}: the saved state is of a virtio-pci device, this one is virtio-mmio",
                    self.name
                ))
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

    /// The queue QueueSel selects.
    pub(super) fn queue(&mut self) -> Option<&mut QueueConfig> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// The selected queue, for a write to its register `reg`: only between FEATURES_OK and
    /// DRIVER_OK, and only a queue that exists (otherwise the write is counted as misuse).
    pub(super) fn configurable_queue(&mut self, reg: u64) -> Option<&mut QueueConfig> {
        if self.status & STATUS_FEATURES_OK == 0 || self.active {
            if guest_misuse() {
                log::warn!(
                    "{}: queue register {reg:#x} written in status {:#x}",
                    self.name,
                    self.status
                );
            }
            return None;
        }
        if self.queues.get(self.queue_sel as usize).is_none() {
            if guest_misuse() {
                log::warn!(
                    "{}: write to queue {} that does not exist",
                    self.name,
                    self.queue_sel
                );
            }
            return None;
        }
        self.queue()
    }

    /// The 32 feature bits DeviceFeaturesSel selects.
    pub(super) fn device_features_word(&self) -> u32 {
        match self.device_features_sel {
            0 => self.device.features() as u32,
            1 => (self.device.features() >> 32) as u32,
            _ => 0,
        }
    }

    /// The driver writes the 32 feature bits DriverFeaturesSel selects (only while it
    /// negotiates: after DRIVER, before FEATURES_OK).
    pub(super) fn write_driver_features(&mut self, v: u32) {
        if self.status & STATUS_DRIVER != 0 && self.status & STATUS_FEATURES_OK == 0 {
            match self.driver_features_sel {
                0 => set_half(&mut self.acked_features, false, v),
                1 => set_half(&mut self.acked_features, true, v),
                _ => {}
            }
        }
    }

    /// The interrupt status bits: a used-buffer notification once the device runs, a
    /// configuration change until the driver acknowledges it.
    pub(super) fn interrupt_status(&self) -> u32 {
        let vring = if self.active { INT_VRING } else { 0 };
        let config = if self.config_changed { INT_CONFIG } else { 0 };
        vring | config
    }

    /// The driver acknowledges interrupt bits `v`.
    pub(super) fn ack_interrupt(&mut self, v: u32) {
        if v & INT_CONFIG != 0 {
            self.config_changed = false;
        }
    }

    /// Writes the number of the queue the queue registers select.
    pub(super) fn select_queue(&mut self, v: u32) {
        self.queue_sel = v;
    }

    /// The queue the queue registers select.
    pub(super) fn selected_queue(&self) -> u32 {
        self.queue_sel
    }

    /// The configuration generation.
    pub(super) fn config_generation(&self) -> u32 {
        self.config_generation
    }

    /// The device's name in logs.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The driver writes the device status `v` (0 resets the device).
    pub(super) fn write_status(&mut self, v: u32) {
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
        if let Some(p) = &mut self.pci {
            p.reset_vectors();
        }
        for q in &mut self.queues {
            *q = QueueConfig {
                max_size: q.max_size,
                ..Default::default()
            };
        }
    }
}
