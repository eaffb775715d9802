//! Dispatch of vCPU port-I/O and MMIO exits to the emulated devices. Unclaimed port reads
//! return 0xff (what a machine with nothing on the port gives), so probes fail fast.

use std::sync::Mutex;

use super::i8042::I8042;
use super::pci::{ConfigAddress, PciBus, Target};
use super::serial::SerialDevice;
use super::virtio::transport::VirtioTransport;
use crate::boot::acpi;
use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT,
    I8042_DATA_PORT, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT, SERIAL_PORT, VIRTIO_MMIO_SIZE,
    VIRTIO_MMIO_START,
};
use crate::logger::LogThrottle;

/// Guest accesses to MMIO addresses no device claims (logged throttled).
static UNCLAIMED: LogThrottle = LogThrottle::new();

/// The devices vCPU exits can reach.
pub struct IoBus {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// Keyboard controller (reset).
    pub i8042: Mutex<I8042>,
    /// The virtio devices: virtio-mmio windows in address order from [`VIRTIO_MMIO_START`],
    /// or (with `pci`) PCI functions from device number 1.
    pub virtio: Vec<Mutex<VirtioTransport>>,
    /// PCI bus 0, when the VM has one (then every virtio device is on it).
    pub pci: Option<PciBus>,
}

/// What an I/O access asks of the VM as a whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing beyond the access.
    None,
    /// The guest reset or powered off the machine; how.
    Reset(&'static str),
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a vCPU thread panicked mid-access; the device state is still
    // the best there is, and the panic itself ends the VM.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IoBus {
    fn is_pci_port(&self, port: u16) -> bool {
        self.pci.is_some()
            && (port == PCI_CONFIG_ADDRESS_PORT
                || (PCI_CONFIG_DATA_PORT..PCI_CONFIG_DATA_PORT + 4).contains(&port))
    }

    fn config_read(&self, bus: &PciBus, a: ConfigAddress, data: &mut [u8]) {
        match bus.device_index(a).and_then(|i| self.virtio.get(i)) {
            Some(t) => lock(t).pci_config_read(a.offset, data),
            None => PciBus::bridge_read(a, data),
        }
    }

    fn config_write(&self, bus: &PciBus, a: ConfigAddress, data: &[u8]) {
        if let Some(t) = bus.device_index(a).and_then(|i| self.virtio.get(i)) {
            lock(t).pci_config_write(a.offset, data);
        }
    }

    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if let Some(bus) = self.pci.as_ref().filter(|_| self.is_pci_port(port)) {
            if let Some(a) = bus.pio_read(port, data) {
                self.config_read(bus, a, data);
            }
            return;
        }
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT) as u8);
            }
            0x60 | 0x64 if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            // The i8042's port 0x61 (speaker/PIT gate) reads as zero, and so do the ACPI
            // sleep and reset registers (no wake status to report).
            0x61 | ACPI_SLEEP_CONTROL_PORT | ACPI_SLEEP_STATUS_PORT | ACPI_RESET_PORT => {
                data.fill(0)
            }
            _ => data.fill(0xff),
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
        if let Some(bus) = self.pci.as_ref().filter(|_| self.is_pci_port(port)) {
            if let Some(a) = bus.pio_write(port, data) {
                self.config_write(bus, a, data);
            }
            return BusAction::None;
        }
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                if let Err(e) = lock(&self.serial).write((p - SERIAL_PORT) as u8, data[0]) {
                    log::warn!("serial: {e}");
                }
            }
            0x60 | 0x64
                if data.len() == 1
                    && lock(&self.i8042).write((port - I8042_DATA_PORT) as u8, data[0]) =>
            {
                return BusAction::Reset("i8042 reset command");
            }
            ACPI_SLEEP_CONTROL_PORT if data.len() == 1 && acpi::is_power_off(data[0]) => {
                return BusAction::Reset("ACPI S5: power off");
            }
            ACPI_RESET_PORT if data == [ACPI_RESET_VALUE] => {
                return BusAction::Reset("ACPI reset register");
            }
            _ => {}
        }
        BusAction::None
    }

    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<VirtioTransport>, u64)> {
        if self.pci.is_some() {
            return None;
        }
        let rel = addr.checked_sub(VIRTIO_MMIO_START)?;
        let dev = self.virtio.get((rel / VIRTIO_MMIO_SIZE) as usize)?;
        Some((dev, rel % VIRTIO_MMIO_SIZE))
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        if let Some(bus) = &self.pci {
            match bus.mmio_target(addr) {
                Some(Target::Config(a)) => return self.config_read(bus, a, data),
                Some(Target::Bar(i, off)) => {
                    if let Some(t) = self.virtio.get(i) {
                        return lock(t).pci_bar_read(off, data);
                    }
                }
                None => {}
            }
        }
        match self.virtio_at(addr) {
            Some((dev, off)) => lock(dev).mmio_read(off, data),
            None => {
                if UNCLAIMED.hit() {
                    log::debug!("MMIO read of unclaimed address {addr:#x}");
                }
                data.fill(0xff);
            }
        }
    }

    /// An MMIO write.
    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some(bus) = &self.pci {
            match bus.mmio_target(addr) {
                Some(Target::Config(a)) => return self.config_write(bus, a, data),
                Some(Target::Bar(i, off)) => {
                    if let Some(t) = self.virtio.get(i) {
                        return lock(t).pci_bar_write(off, data);
                    }
                }
                None => {}
            }
        }
        match self.virtio_at(addr) {
            Some((dev, off)) => lock(dev).mmio_write(off, data),
            None => {
                if UNCLAIMED.hit() {
                    log::debug!("MMIO write to unclaimed address {addr:#x}");
                }
            }
        }
    }
}
