//! PCI bus 0 of a VM started with `--enable-pci`: a host bridge at 00:00.0 and one
//! virtio-pci function per device from 00:01.0, reached through configuration mechanism 1
//! (ports 0xcf8/0xcfc) and through ECAM (the MCFG window), and their BARs in the host
//! bridge's memory window.

use std::sync::Mutex;

use crate::layout::{
    PCI_BAR_SIZE, PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_DATA_PORT, PCI_ECAM_SIZE, PCI_ECAM_START,
    PCI_MMIO_START,
};

/// The host bridge's identity: Red Hat's "QEMU PCIe host bridge" id, which Linux knows as
/// a plain host bridge (class 06 00 00).
const HOST_BRIDGE_VENDOR: u32 = 0x1b36;
const HOST_BRIDGE_DEVICE: u32 = 0x0008;
const CLASS_HOST_BRIDGE: u32 = 0x06_00_00;

/// A configuration-space address: device and function on bus 0, and the register.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConfigAddress {
    /// Device number (0-31).
    pub device: u8,
    /// Function number (0-7).
    pub function: u8,
    /// Byte offset in the function's configuration space.
    pub offset: u64,
}

/// Where a guest access lands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    /// The configuration space of the function at this address (bus 0).
    Config(ConfigAddress),
    /// Offset in BAR 0 of virtio device `index` (its transport's index).
    Bar(usize, u64),
}

/// PCI decoding state: the configuration address port.
#[derive(Debug, Default)]
pub struct PciBus {
    address: Mutex<u32>,
    devices: usize,
}

impl PciBus {
    /// A bus with `devices` virtio functions.
    pub fn new(devices: usize) -> Self {
        PciBus {
            address: Mutex::new(0),
            devices,
        }
    }

    /// The BAR 0 address of virtio device `index` (at device number `index + 1`).
    pub fn bar_address(index: usize) -> u64 {
        PCI_MMIO_START + index as u64 * PCI_BAR_SIZE
    }

    fn address(&self) -> std::sync::MutexGuard<'_, u32> {
        self.address.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What a memory access at `addr` reaches, if it is PCI's.
    pub fn mmio_target(&self, addr: u64) -> Option<Target> {
        if let Some(off) = addr
            .checked_sub(PCI_ECAM_START)
            .filter(|&o| o < PCI_ECAM_SIZE)
        {
            return Some(Target::Config(ConfigAddress {
                device: ((off >> 15) & 0x1f) as u8,
                function: ((off >> 12) & 7) as u8,
                offset: off & 0xfff,
            }));
        }
        let off = addr.checked_sub(PCI_MMIO_START)?;
        let index = (off / PCI_BAR_SIZE) as usize;
        (index < self.devices).then_some(Target::Bar(index, off % PCI_BAR_SIZE))
    }

    /// A port read that is PCI's: `Some` with the configuration address for the data port,
    /// or the answer itself for the address port.
    pub fn pio_read(&self, port: u16, data: &mut [u8]) -> Option<ConfigAddress> {
        match port {
            PCI_CONFIG_ADDRESS_PORT if data.len() == 4 => {
                data.copy_from_slice(&self.address().to_le_bytes());
                None
            }
            p if (PCI_CONFIG_DATA_PORT..PCI_CONFIG_DATA_PORT + 4).contains(&p) => {
                let a = self.data_address(p);
                if a.is_none() {
                    data.fill(0xff);
                }
                a
            }
            _ => {
                data.fill(0xff);
                None
            }
        }
    }

    /// A port write that is PCI's: `Some` with the configuration address for the data port.
    pub fn pio_write(&self, port: u16, data: &[u8]) -> Option<ConfigAddress> {
        match port {
            PCI_CONFIG_ADDRESS_PORT => {
                if let Ok(b) = <[u8; 4]>::try_from(data) {
                    // Bits 30-24 are reserved, bits 1-0 are zero.
                    *self.address() = u32::from_le_bytes(b) & 0x80ff_fffc;
                }
                None
            }
            p if (PCI_CONFIG_DATA_PORT..PCI_CONFIG_DATA_PORT + 4).contains(&p) => {
                self.data_address(p)
            }
            _ => None,
        }
    }

    fn data_address(&self, port: u16) -> Option<ConfigAddress> {
        let a = *self.address();
        // Enabled, bus 0 (the only one).
        if a & 0x8000_0000 == 0 || (a >> 16) & 0xff != 0 {
            return None;
        }
        Some(ConfigAddress {
            device: ((a >> 11) & 0x1f) as u8,
            function: ((a >> 8) & 7) as u8,
            offset: u64::from(a & 0xfc) + u64::from(port - PCI_CONFIG_DATA_PORT),
        })
    }

    /// The virtio device behind configuration address `a`, or None for the host bridge or
    /// an empty slot.
    pub fn device_index(&self, a: ConfigAddress) -> Option<usize> {
        let index = usize::from(a.device).checked_sub(1)?;
        (a.function == 0 && index < self.devices).then_some(index)
    }

    /// A read of the host bridge's configuration space, or of an empty slot (all ones).
    pub fn bridge_read(a: ConfigAddress, data: &mut [u8]) {
        if a.device != 0 || a.function != 0 {
            data.fill(0xff);
            return;
        }
        let v: u32 = match a.offset & !3 {
            0x00 => HOST_BRIDGE_VENDOR | HOST_BRIDGE_DEVICE << 16,
            0x08 => CLASS_HOST_BRIDGE << 8,
            _ => 0,
        };
        let b = (v >> ((a.offset & 3) * 8)).to_le_bytes();
        let n = data.len().min(4);
        data[..n].copy_from_slice(&b[..n]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mechanism_one_and_ecam_reach_the_same_functions() {
        let bus = PciBus::new(2);
        // Device 1, function 0, register 0x10 through 0xcf8/0xcfc.
        bus.pio_write(0xcf8, &(0x8000_0000u32 | 1 << 11 | 0x10).to_le_bytes());
        let mut d = [0u8; 4];
        assert_eq!(bus.pio_read(0xcf8, &mut d), None);
        assert_eq!(u32::from_le_bytes(d), 0x8000_0810);
        let a = bus.pio_read(0xcfe, &mut [0u8; 2]).expect("data port");
        assert_eq!((a.device, a.function, a.offset), (1, 0, 0x12));
        assert_eq!(bus.device_index(a), Some(0));
        // The same through ECAM.
        let Some(Target::Config(e)) = bus.mmio_target(PCI_ECAM_START + (1 << 15) + 0x12) else {
            panic!("not config");
        };
        assert_eq!(e, a);
        // Disabled, another bus, a slot past the devices, a function other than 0.
        bus.pio_write(0xcf8, &(1u32 << 11).to_le_bytes());
        assert_eq!(bus.pio_read(0xcfc, &mut d), None);
        assert_eq!(d, [0xff; 4]);
        bus.pio_write(0xcf8, &(0x8001_0000u32 | 1 << 11).to_le_bytes());
        assert_eq!(bus.pio_read(0xcfc, &mut [0u8; 4]), None);
        for (dev, func) in [(3u8, 0u8), (1, 1), (0, 0)] {
            let a = ConfigAddress {
                device: dev,
                function: func,
                offset: 0,
            };
            assert_eq!(bus.device_index(a), None, "{dev}.{func}");
        }
        // BARs: device 1's window; nothing past the last device.
        assert_eq!(
            bus.mmio_target(PciBus::bar_address(1) + 0x3004),
            Some(Target::Bar(1, 0x3004))
        );
        assert_eq!(bus.mmio_target(PciBus::bar_address(2)), None);
        assert_eq!(bus.mmio_target(PCI_ECAM_START + PCI_ECAM_SIZE), None);
    }

    #[test]
    fn the_host_bridge_is_a_host_bridge_and_empty_slots_read_all_ones() {
        let mut d = [0u8; 4];
        let at = |device, offset| ConfigAddress {
            device,
            function: 0,
            offset,
        };
        PciBus::bridge_read(at(0, 0), &mut d);
        assert_eq!(u32::from_le_bytes(d), 0x0008_1b36);
        PciBus::bridge_read(at(0, 8), &mut d);
        assert_eq!(u32::from_le_bytes(d) >> 8, 0x06_00_00);
        let mut w = [0u8; 2];
        PciBus::bridge_read(at(0, 0xa), &mut w);
        assert_eq!(u16::from_le_bytes(w), 0x0600);
        PciBus::bridge_read(at(5, 0), &mut d);
        assert_eq!(d, [0xff; 4]);
    }
}
