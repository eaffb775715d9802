//! Dispatch of vCPU port-I/O and MMIO exits to the emulated devices. Unclaimed port reads
//! return 0xff (what a machine with nothing on the port gives), so probes fail fast.

use std::sync::Mutex;

use super::i8042::I8042;
use super::serial::SerialDevice;
use super::virtio::mmio::MmioTransport;
use crate::layout::{I8042_DATA_PORT, SERIAL_PORT, VIRTIO_MMIO_SIZE, VIRTIO_MMIO_START};
use crate::logger::LogThrottle;

/// Guest accesses to MMIO addresses no device claims (logged throttled).
static UNCLAIMED: LogThrottle = LogThrottle::new();

/// The devices vCPU exits can reach.
pub struct IoBus {
    /// COM1.
    pub serial: Mutex<SerialDevice>,
    /// Keyboard controller (reset).
    pub i8042: Mutex<I8042>,
    /// virtio-mmio windows, in address order from [`VIRTIO_MMIO_START`].
    pub virtio: Vec<Mutex<MmioTransport>>,
}

/// What an I/O access asks of the VM as a whole.
#[derive(Debug, PartialEq, Eq)]
pub enum BusAction {
    /// Nothing beyond the access.
    None,
    /// The guest reset the machine through the i8042.
    Reset,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A poisoned lock means a vCPU thread panicked mid-access; the device state is still
    // the best there is, and the panic itself ends the VM.
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl IoBus {
    /// A port read.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        match port {
            p if (SERIAL_PORT..SERIAL_PORT + 8).contains(&p) && data.len() == 1 => {
                data[0] = lock(&self.serial).read((p - SERIAL_PORT) as u8);
            }
            0x60 | 0x64 if data.len() == 1 => {
                data[0] = lock(&self.i8042).read((port - I8042_DATA_PORT) as u8);
            }
            // The i8042's port 0x61 (speaker/PIT gate) reads as zero.
            0x61 => data.fill(0),
            _ => data.fill(0xff),
        }
    }

    /// A port write.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> BusAction {
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
                return BusAction::Reset;
            }
            _ => {}
        }
        BusAction::None
    }

    fn virtio_at(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        let rel = addr.checked_sub(VIRTIO_MMIO_START)?;
        let dev = self.virtio.get((rel / VIRTIO_MMIO_SIZE) as usize)?;
        Some((dev, rel % VIRTIO_MMIO_SIZE))
    }

    /// An MMIO read.
    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((dev, off)) => lock(dev).read(off, data),
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
        match self.virtio_at(addr) {
            Some((dev, off)) => lock(dev).write(off, data),
            None => {
                if UNCLAIMED.hit() {
                    log::debug!("MMIO write to unclaimed address {addr:#x}");
                }
            }
        }
    }
}
