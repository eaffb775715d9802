//! The virtio-pci transport (virtio 1.2 §4.1, modern devices only): a PCI function with
//! the virtio vendor capabilities, one 32-bit memory BAR and MSI-X.
//!
//! BAR 0 ([`PCI_BAR_SIZE`] bytes) holds the common configuration, the ISR, the device
//! configuration, the notification area (one 4-byte doorbell per queue, each a KVM
//! ioeventfd handed to the device process as its kick fd, so the VMM stays off the data
//! path) and the MSI-X table and PBA. skiff places every BAR itself, as firmware would; a
//! driver may size it but not move it.
//!
//! Interrupts are MSI-X only ([`PCI_MSIX_VECTORS`] vectors: Linux's virtio_pci then uses
//! one for configuration changes and one shared by the queues, which is what a vhost-user
//! device with one call eventfd can serve). Each enabled, unmasked vector has a KVM GSI
//! route ([`MsiRouter`]); the call eventfd is an irqfd on the queues' vector, a config
//! eventfd of the VMM's on the configuration vector. A masked vector's irqfd is detached,
//! so what its eventfd counts meanwhile is delivered when it is unmasked.

use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use super::transport::{guest_misuse, set_half, VirtioTransport, INT_CONFIG};
use crate::devices::msi::{MsiMessage, MsiRouter};
use crate::layout::{PCI_BAR_SIZE, PCI_MSIX_VECTORS, PCI_MSI_GSI_BASE};

const VENDOR_VIRTIO: u16 = 0x1af4;
/// Modern virtio devices: 0x1040 + the virtio device id.
const DEVICE_ID_BASE: u16 = 0x1040;
const SUBSYSTEM_ID: u16 = 0x1100;
/// "No vector" in the MSI-X vector registers.
pub const NO_VECTOR: u16 = 0xffff;

/// Offsets in BAR 0.
pub const COMMON_OFFSET: u64 = 0x0000;
const ISR_OFFSET: u64 = 0x1000;
const DEVICE_OFFSET: u64 = 0x2000;
/// The notification area: queue `q`'s doorbell is at `NOTIFY_OFFSET + q * NOTIFY_MULTIPLIER`.
pub const NOTIFY_OFFSET: u64 = 0x3000;
/// Bytes between two queues' doorbells.
pub const NOTIFY_MULTIPLIER: u64 = 4;
const MSIX_TABLE_OFFSET: u64 = 0x4000;
const MSIX_PBA_OFFSET: u64 = 0x4800;
const REGION_SIZE: u64 = 0x1000;

/// Configuration space: where the capabilities are.
const CAP_COMMON: usize = 0x40;
const CAP_ISR: usize = 0x50;
const CAP_DEVICE: usize = 0x60;
const CAP_NOTIFY: usize = 0x70;
const CAP_PCI_CFG: usize = 0x84;
const CAP_MSIX: usize = 0x98;

const COMMAND_MASK: u16 = 0x0406; // memory space, bus master, INTx disable
const COMMAND_BUS_MASTER: u16 = 0x0004;
const STATUS_CAP_LIST: u16 = 0x10;
const MSIX_ENABLE: u16 = 1 << 15;
const MSIX_FUNCTION_MASK: u16 = 1 << 14;
const MSIX_ENTRY_MASKED: u32 = 1;

/// One MSI-X table entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MsixEntry {
    /// Message address.
    pub address: u64,
    /// Message data.
    pub data: u32,
    /// Vector control (bit 0: masked).
    pub control: u32,
}

impl Default for MsixEntry {
    fn default() -> Self {
        MsixEntry {
            address: 0,
            data: 0,
            control: MSIX_ENTRY_MASKED,
        }
    }
}

/// A PCI function's state as data (snapshots, live upgrade).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    /// PCI command register.
    pub command: u16,
    /// Interrupt line register (written by the guest, unused).
    pub interrupt_line: u8,
    /// MSI-X message control (enable, function mask).
    pub msix_control: u16,
    /// The MSI-X table.
    pub table: Vec<MsixEntry>,
    /// The configuration change's vector.
    pub config_vector: u16,
    /// Each queue's vector.
    pub queue_vectors: Vec<u16>,
    /// The PCI configuration access capability's window: BAR, offset, length.
    pub cfg_window: (u8, u32, u32),
}

/// What an irqfd connects to a vector.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Source {
    Config,
    Queues,
}

/// The PCI side of a virtio-pci device: configuration space, BAR and MSI-X.
pub struct PciFunction {
    /// Device number on bus 0.
    slot: u8,
    /// Where BAR 0 is.
    bar: u64,
    device_id: u16,
    class: u32,
    bar_probe: bool,
    state: PciState,
    router: Arc<MsiRouter>,
    config_evt: EventFd,
    /// The irqfds registered now.
    attached: Vec<(Source, u32)>,
    /// Whether interrupts reach KVM at all (not while a VMM upgrade hands the VM over, and
    /// not before a restored VM's interrupt controllers are back).
    connected: bool,
}

impl PciFunction {
    /// Function `slot` (1-31) of bus 0 for a virtio device of type `device_type` with
    /// `queues` queues, BAR 0 at `bar`; its MSI-X vectors use GSIs from `first_gsi` through
    /// `router`. `connected`: interrupts may reach KVM from now on (false when restoring).
    pub fn new(
        slot: u8,
        bar: u64,
        device_type: u32,
        queues: usize,
        router: Arc<MsiRouter>,
        connected: bool,
    ) -> std::io::Result<Self> {
        let class = match device_type {
            1 => 0x02_00_00, // network controller, Ethernet
            2 => 0x01_80_00, // mass storage, other
            _ => 0xff_00_00,
        };
        Ok(PciFunction {
            slot,
            bar,
            device_id: DEVICE_ID_BASE + device_type as u16,
            class,
            bar_probe: false,
            state: PciState {
                command: 0,
                interrupt_line: 0,
                msix_control: 0,
                table: vec![MsixEntry::default(); usize::from(PCI_MSIX_VECTORS)],
                config_vector: NO_VECTOR,
                queue_vectors: vec![NO_VECTOR; queues],
                cfg_window: (0, 0, 0),
            },
            router,
            config_evt: EventFd::new(libc::EFD_NONBLOCK | libc::EFD_CLOEXEC)?,
            attached: Vec::new(),
            connected,
        })
    }

    /// The function's state.
    pub fn state(&self) -> PciState {
        self.state.clone()
    }

    /// Puts the saved `s` back (a device with `queues` queues). Interrupts are connected
    /// afterwards ([`VirtioTransport::attach_interrupts`]).
    pub fn restore(&mut self, s: &PciState, queues: usize) -> Result<(), String> {
        if s.table.len() != self.state.table.len() {
            return Err(format!(
                "the saved MSI-X table has {} vectors, this one {}",
                s.table.len(),
                self.state.table.len()
            ));
        }
        if s.queue_vectors.len() > queues {
            return Err(format!(
                "the saved state has vectors for {} queues, the device {queues}",
                s.queue_vectors.len()
            ));
        }
        let ok = |v: u16| v == NO_VECTOR || v < PCI_MSIX_VECTORS;
        if !ok(s.config_vector) || !s.queue_vectors.iter().all(|&v| ok(v)) {
            return Err("the saved state has MSI-X vectors past the table".into());
        }
        let mut state = s.clone();
        state.queue_vectors.resize(queues, NO_VECTOR);
        // Only the bits a driver can write.
        state.command &= COMMAND_MASK;
        state.msix_control &= MSIX_ENABLE | MSIX_FUNCTION_MASK;
        for e in &mut state.table {
            e.control &= MSIX_ENTRY_MASKED;
        }
        self.state = state;
        Ok(())
    }

    /// A device reset: no vector is mapped any more.
    pub fn reset_vectors(&mut self) {
        self.state.config_vector = NO_VECTOR;
        self.state.queue_vectors.fill(NO_VECTOR);
    }

    /// Device number on bus 0.
    pub fn slot(&self) -> u8 {
        self.slot
    }

    /// Where BAR 0 is.
    pub fn bar(&self) -> u64 {
        self.bar
    }

    fn gsi(&self, vector: u16) -> u32 {
        PCI_MSI_GSI_BASE
            + u32::from(self.slot - 1) * u32::from(PCI_MSIX_VECTORS)
            + u32::from(vector)
    }

    fn vector_enabled(&self, v: u16) -> bool {
        let c = self.state.msix_control;
        // MSI-X messages are memory writes: none without Bus Master.
        self.state.command & COMMAND_BUS_MASTER != 0
            && c & MSIX_ENABLE != 0
            && c & MSIX_FUNCTION_MASK == 0
            && self
                .state
                .table
                .get(usize::from(v))
                .is_some_and(|e| e.control & MSIX_ENTRY_MASKED == 0)
    }

    /// The vector the queues' interrupts go to: the first queue's that has one. A driver
    /// that gives queues different vectors gets them all on the first (one call eventfd).
    fn queues_vector(&self, name: &str) -> Option<u16> {
        let mut valid = self.state.queue_vectors.iter().filter(|&&v| v != NO_VECTOR);
        let first = *valid.next()?;
        if valid.any(|&v| v != first) && guest_misuse() {
            log::warn!(
                "{name}: queues use different MSI-X vectors; all interrupt on vector {first}"
            );
        }
        Some(first)
    }

    fn config_dword(&self, reg: usize) -> u32 {
        let s = &self.state;
        let vendor_cap = |next: usize, cfg_type: u32, len: u32| {
            0x09 | (next as u32) << 8 | len << 16 | cfg_type << 24
        };
        match reg {
            0x00 => u32::from(VENDOR_VIRTIO) | u32::from(self.device_id) << 16,
            0x04 => u32::from(s.command) | u32::from(STATUS_CAP_LIST) << 16,
            0x08 => 1 | self.class << 8, // revision 1
            0x0c => 0,                   // header type 0, single function
            0x10 => {
                if self.bar_probe {
                    !(PCI_BAR_SIZE as u32 - 1)
                } else {
                    self.bar as u32
                }
            }
            0x2c => u32::from(VENDOR_VIRTIO) | u32::from(SUBSYSTEM_ID) << 16,
            0x34 => CAP_COMMON as u32,
            0x3c => u32::from(s.interrupt_line), // no INTx pin
            // The virtio capabilities: type, BAR 0, offset, length.
            r if r == CAP_COMMON => vendor_cap(CAP_ISR, 1, 16),
            r if r == CAP_ISR => vendor_cap(CAP_DEVICE, 3, 16),
            r if r == CAP_DEVICE => vendor_cap(CAP_NOTIFY, 4, 16),
            r if r == CAP_NOTIFY => vendor_cap(CAP_PCI_CFG, 2, 20),
            r if r == CAP_PCI_CFG => vendor_cap(CAP_MSIX, 5, 20),
            r if r == CAP_COMMON + 8 => COMMON_OFFSET as u32,
            r if r == CAP_ISR + 8 => ISR_OFFSET as u32,
            r if r == CAP_DEVICE + 8 => DEVICE_OFFSET as u32,
            r if r == CAP_NOTIFY + 8 => NOTIFY_OFFSET as u32,
            r if r == CAP_COMMON + 12 || r == CAP_ISR + 12 || r == CAP_DEVICE + 12 => {
                REGION_SIZE as u32
            }
            r if r == CAP_NOTIFY + 12 => REGION_SIZE as u32,
            r if r == CAP_NOTIFY + 16 => NOTIFY_MULTIPLIER as u32,
            r if r == CAP_PCI_CFG + 4 => u32::from(s.cfg_window.0),
            r if r == CAP_PCI_CFG + 8 => s.cfg_window.1,
            r if r == CAP_PCI_CFG + 12 => s.cfg_window.2,
            r if r == CAP_MSIX => 0x11 | u32::from(s.msix_control | (PCI_MSIX_VECTORS - 1)) << 16,
            r if r == CAP_MSIX + 4 => MSIX_TABLE_OFFSET as u32, // BIR 0
            r if r == CAP_MSIX + 8 => MSIX_PBA_OFFSET as u32,
            _ => 0,
        }
    }
}

/// Merges the bytes `data` written at byte `offset & 3` of a dword into `old`.
fn merge(old: u32, offset: u64, data: &[u8]) -> u32 {
    let mut b = old.to_le_bytes();
    let start = (offset & 3) as usize;
    for (i, v) in data.iter().enumerate().take(4 - start) {
        b[start + i] = *v;
    }
    u32::from_le_bytes(b)
}

fn read_le(data: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    let n = data.len().min(8);
    b[..n].copy_from_slice(&data[..n]);
    u64::from_le_bytes(b)
}

fn put_le(data: &mut [u8], v: u64) {
    let b = v.to_le_bytes();
    let n = data.len().min(8);
    data[..n].copy_from_slice(&b[..n]);
}

impl VirtioTransport {
    /// Puts the device on PCI as `function`.
    pub fn set_pci(&mut self, function: PciFunction) {
        self.pci = Some(Box::new(function));
    }

    /// The device's PCI function, when it is on PCI.
    pub fn pci(&self) -> Option<&PciFunction> {
        self.pci.as_deref()
    }

    /// A read of `data.len()` bytes at `offset` of the function's configuration space.
    pub fn pci_config_read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(p) = &self.pci else {
            data.fill(0xff);
            return;
        };
        let reg = (offset & !3) as usize;
        if reg == CAP_PCI_CFG + 16 {
            // The configuration access window's data: a read of the BAR through it.
            let (bar, off, len) = p.state.cfg_window;
            let mut buf = [0u8; 4];
            if bar == 0 && matches!(len, 1 | 2 | 4) {
                self.pci_bar_read(u64::from(off), &mut buf[..len as usize]);
            }
            let v = u32::from_le_bytes(buf);
            put_le(data, u64::from(v >> ((offset & 3) * 8)));
            return;
        }
        let v = if reg >= 0x100 { 0 } else { p.config_dword(reg) };
        put_le(data, u64::from(v >> ((offset & 3) * 8)));
    }

    /// A write of `data` at `offset` of the function's configuration space.
    pub fn pci_config_write(&mut self, offset: u64, data: &[u8]) {
        let name = self.name().to_string();
        let Some(p) = &mut self.pci else {
            return;
        };
        let reg = (offset & !3) as usize;
        let new = merge(p.config_dword(reg), offset, data);
        let full = offset & 3 == 0 && data.len() == 4;
        let covers = |byte: u64| (offset & 3) <= byte && byte < (offset & 3) + data.len() as u64;
        match reg {
            0x04 if covers(0) || covers(1) => {
                p.state.command = new as u16 & COMMAND_MASK;
                self.update_interrupts();
            }
            0x10 if full => {
                let addr = u64::from(new & !0xf);
                if new & !0xf == !0xf {
                    p.bar_probe = true;
                } else {
                    p.bar_probe = false;
                    if addr != p.bar && guest_misuse() {
                        log::warn!(
                            "{name}: BAR 0 moves to {addr:#x} refused; it stays at {:#x}",
                            p.bar
                        );
                    }
                }
            }
            0x3c if covers(0) => p.state.interrupt_line = new as u8,
            r if r == CAP_PCI_CFG + 4 && covers(0) => p.state.cfg_window.0 = new as u8,
            r if r == CAP_PCI_CFG + 8 => p.state.cfg_window.1 = new,
            r if r == CAP_PCI_CFG + 12 => p.state.cfg_window.2 = new,
            r if r == CAP_PCI_CFG + 16 => {
                let (bar, off, len) = p.state.cfg_window;
                if bar == 0 && matches!(len, 1 | 2 | 4) {
                    let bytes = new.to_le_bytes();
                    self.pci_bar_write(u64::from(off), &bytes[..len as usize]);
                }
            }
            r if r == CAP_MSIX && (covers(2) || covers(3)) => {
                p.state.msix_control = (new >> 16) as u16 & (MSIX_ENABLE | MSIX_FUNCTION_MASK);
                self.update_interrupts();
            }
            // Everything else is read-only (or a BAR that does not exist).
            _ => {}
        }
    }

    /// A read of BAR 0 at `offset`.
    pub fn pci_bar_read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            o if o < ISR_OFFSET => {
                let v = self.common_read(o, data.len());
                put_le(data, v);
            }
            o if o < DEVICE_OFFSET => {
                data.fill(0);
                if o == ISR_OFFSET {
                    // Read to clear (only a driver without MSI-X reads it).
                    let v = self.interrupt_status();
                    self.ack_interrupt(INT_CONFIG);
                    data[0] = v as u8;
                }
            }
            o if o < NOTIFY_OFFSET => self.device.read_config(o - DEVICE_OFFSET, data),
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                let v = self.msix_read(o - MSIX_TABLE_OFFSET, data.len());
                put_le(data, v);
            }
            // Notification area and PBA (pending bits are kept in the eventfds).
            _ => data.fill(0),
        }
    }

    /// A write of BAR 0 at `offset`.
    pub fn pci_bar_write(&mut self, offset: u64, data: &[u8]) {
        match offset {
            o if o < ISR_OFFSET => self.common_write(o, data),
            o if o < DEVICE_OFFSET => {}
            o if o < NOTIFY_OFFSET => self.device.write_config(o - DEVICE_OFFSET, data),
            o if o < MSIX_TABLE_OFFSET => {
                // A doorbell the ioeventfd did not take (it always should): pass it on.
                let q = ((o - NOTIFY_OFFSET) / NOTIFY_MULTIPLIER) as usize;
                if let Some(kick) = self
                    .device
                    .as_vhost_user()
                    .and_then(|d| d.kick_fds().get(q))
                {
                    let _ = kick.write(1);
                }
            }
            o if (MSIX_TABLE_OFFSET..MSIX_PBA_OFFSET).contains(&o) => {
                self.msix_write(o - MSIX_TABLE_OFFSET, data)
            }
            _ => {}
        }
    }

    fn msix_read(&self, offset: u64, len: usize) -> u64 {
        let Some(p) = &self.pci else { return 0 };
        let Some(e) = p.state.table.get((offset / 16) as usize) else {
            return 0;
        };
        let dwords = [
            e.address as u32,
            (e.address >> 32) as u32,
            e.data,
            e.control,
        ];
        let i = ((offset % 16) / 4) as usize;
        let lo = u64::from(dwords[i]);
        match len {
            8 if i.is_multiple_of(2) => lo | u64::from(dwords[i + 1]) << 32,
            4 | 8 => lo,
            _ => 0,
        }
    }

    fn msix_write(&mut self, offset: u64, data: &[u8]) {
        let Some(p) = &mut self.pci else { return };
        let Some(e) = p.state.table.get_mut((offset / 16) as usize) else {
            return;
        };
        if !offset.is_multiple_of(4) || !matches!(data.len(), 4 | 8) {
            if guest_misuse() {
                log::warn!(
                    "{}-byte MSI-X table write at {offset:#x} ignored",
                    data.len()
                );
            }
            return;
        }
        let v = read_le(data);
        let mut put = |i: u64, v: u32| match i {
            0 => set_half(&mut e.address, false, v),
            1 => set_half(&mut e.address, true, v),
            2 => e.data = v,
            _ => e.control = v & MSIX_ENTRY_MASKED,
        };
        let i = (offset % 16) / 4;
        put(i, v as u32);
        if data.len() == 8 && i.is_multiple_of(2) {
            put(i + 1, (v >> 32) as u32);
        }
        self.update_interrupts();
    }

    fn common_read(&mut self, offset: u64, len: usize) -> u64 {
        let nq = self.queues().len();
        let sel = self.selected_queue() as usize;
        let q = self.queues().get(sel).copied();
        let vectors = self.pci.as_ref().map(|p| &p.state);
        let v: u64 = match (offset, len) {
            (0x00, 4) => self.device_features_sel.into(),
            (0x04, 4) => self.device_features_word().into(),
            (0x08, 4) => self.driver_features_sel.into(),
            (0x0c, 4) => match self.driver_features_sel {
                0 => self.acked_features() & 0xffff_ffff,
                1 => self.acked_features() >> 32,
                _ => 0,
            },
            (0x10, 2) => vectors.map_or(NO_VECTOR, |s| s.config_vector).into(),
            (0x12, 2) => nq as u64,
            (0x14, 1) => self.status().into(),
            (0x15, 1) => u64::from(self.config_generation() as u8),
            (0x16, 2) => sel as u64,
            // On reset a queue's size is its maximum (virtio 1.2 §4.1.4.3).
            (0x18, 2) => q
                .map_or(0, |q| if q.size == 0 { q.max_size } else { q.size })
                .into(),
            (0x1a, 2) => vectors
                .and_then(|s| s.queue_vectors.get(sel).copied())
                .unwrap_or(NO_VECTOR)
                .into(),
            (0x1c, 2) => q.map_or(0, |q| u64::from(q.ready)),
            (0x1e, 2) => q.map_or(0, |_| sel as u64),
            (0x20 | 0x28 | 0x30, 8) | (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) => {
                let q = q.unwrap_or_default();
                let full = match offset & !7 {
                    0x20 => q.desc,
                    0x28 => q.avail,
                    _ => q.used,
                };
                match (len, offset & 4) {
                    (8, _) => full,
                    (_, 0) => full & 0xffff_ffff,
                    _ => full >> 32,
                }
            }
            (0x38 | 0x3a, 2) => 0,
            _ => {
                if guest_misuse() {
                    log::debug!(
                        "{}: {len}-byte read of common configuration {offset:#x}",
                        self.name()
                    );
                }
                0
            }
        };
        v
    }

    fn common_write(&mut self, offset: u64, data: &[u8]) {
        let v = read_le(data);
        let valid_vector = |v: u16| if v < PCI_MSIX_VECTORS { v } else { NO_VECTOR };
        match (offset, data.len()) {
            (0x00, 4) => self.device_features_sel = v as u32,
            (0x08, 4) => self.driver_features_sel = v as u32,
            (0x0c, 4) => self.write_driver_features(v as u32),
            (0x10, 2) => {
                if let Some(p) = &mut self.pci {
                    p.state.config_vector = valid_vector(v as u16);
                }
                self.update_interrupts();
            }
            (0x14, 1) => {
                self.write_status(v as u32);
                // A reset unmapped every vector.
                self.update_interrupts();
            }
            (0x16, 2) => self.select_queue(v as u32),
            (0x18, 2) => {
                let name = self.name().to_string();
                if let Some(q) = self.configurable_queue(offset) {
                    let n = v as u16;
                    if n == 0 || n > q.max_size || !n.is_power_of_two() {
                        if guest_misuse() {
                            log::warn!("{name}: invalid queue size {n}");
                        }
                    } else {
                        q.size = n;
                    }
                }
            }
            (0x1a, 2) => {
                let sel = self.selected_queue() as usize;
                if let Some(p) = self.pci.as_mut() {
                    // All queues share one call eventfd, so they share one vector: a
                    // mapping to another is refused (NO_VECTOR, virtio 1.2 §4.1.5.1.2), and
                    // a driver falls back to one vector for all its queues.
                    let mut v = valid_vector(v as u16);
                    let other = p
                        .state
                        .queue_vectors
                        .iter()
                        .enumerate()
                        .any(|(i, &o)| i != sel && o != NO_VECTOR && o != v);
                    if other {
                        v = NO_VECTOR;
                    }
                    if let Some(slot) = p.state.queue_vectors.get_mut(sel) {
                        *slot = v;
                    }
                }
                self.update_interrupts();
            }
            (0x1c, 2) => {
                if let Some(q) = self.configurable_queue(offset) {
                    if v == 1 {
                        if q.size == 0 {
                            q.size = q.max_size;
                        }
                        q.ready = true;
                    }
                }
            }
            (0x20 | 0x28 | 0x30, 8) | (0x20 | 0x24 | 0x28 | 0x2c | 0x30 | 0x34, 4) => {
                if let Some(q) = self.configurable_queue(offset) {
                    let field = match offset & !7 {
                        0x20 => &mut q.desc,
                        0x28 => &mut q.avail,
                        _ => &mut q.used,
                    };
                    match (data.len(), offset & 4) {
                        (8, _) => *field = v,
                        (_, 0) => set_half(field, false, v as u32),
                        _ => set_half(field, true, v as u32),
                    }
                }
            }
            _ => {
                if guest_misuse() {
                    log::debug!(
                        "{}: {}-byte write of common configuration {offset:#x} ignored",
                        self.name(),
                        data.len()
                    );
                }
            }
        }
    }

    /// Brings the GSI routes and irqfds in line with the MSI-X table, the vectors the driver
    /// chose, Bus Master and whether interrupts are connected; a guest's access that fails
    /// here is logged (throttled): the guest then misses that vector's interrupts, nothing
    /// else.
    fn update_interrupts(&mut self) {
        if let Err(e) = self.sync_interrupts() {
            if guest_misuse() {
                log::error!("{}: MSI-X: {e}", self.name());
            }
        }
    }

    /// As [`Self::update_interrupts`], returning what failed. What KVM refused stays as it
    /// was in the bookkeeping (an irqfd that could not be detached is still attached; one
    /// that could not be attached is not), so a later change tries again; an irqfd goes on
    /// a vector only once its route is in.
    fn sync_interrupts(&mut self) -> Result<(), String> {
        let name = self.name().to_string();
        let call = self.device.as_vhost_user().map(|d| d.call_fd());
        let Some(p) = &mut self.pci else {
            return Ok(());
        };
        let mut failed = Vec::new();
        let mut routed = [false; PCI_MSIX_VECTORS as usize];
        for v in 0..PCI_MSIX_VECTORS {
            let msg = p.vector_enabled(v).then(|| {
                let e = p.state.table[usize::from(v)];
                MsiMessage {
                    address: e.address,
                    data: e.data,
                }
            });
            match p.router.set_route(p.gsi(v), msg) {
                Ok(()) => routed[usize::from(v)] = msg.is_some(),
                Err(e) => failed.push(crate::error_chain(&e)),
            }
        }
        let mut want: Vec<(Source, u32)> = Vec::new();
        if p.connected {
            let config = p.state.config_vector;
            if config != NO_VECTOR && routed.get(usize::from(config)) == Some(&true) {
                want.push((Source::Config, p.gsi(config)));
            }
            if let Some(v) = p.queues_vector(&name) {
                if call.is_some() && routed.get(usize::from(v)) == Some(&true) {
                    want.push((Source::Queues, p.gsi(v)));
                }
            }
        }
        let evt = |s: Source| match s {
            Source::Config => Some(&p.config_evt),
            Source::Queues => call,
        };
        let mut attached = Vec::new();
        for &(s, gsi) in &p.attached {
            if want.contains(&(s, gsi)) {
                attached.push((s, gsi));
                continue;
            }
            if let Some(e) = evt(s) {
                if let Err(e) = p.router.detach(e, gsi) {
                    failed.push(crate::error_chain(&e));
                    attached.push((s, gsi));
                }
            }
        }
        for &(s, gsi) in &want {
            // An eventfd is an irqfd once per VM: one still on another vector waits.
            if attached.iter().any(|&(a, _)| a == s) {
                continue;
            }
            if let Some(e) = evt(s) {
                match p.router.attach(e, gsi) {
                    Ok(()) => attached.push((s, gsi)),
                    Err(e) => failed.push(crate::error_chain(&e)),
                }
            }
        }
        p.attached = attached;
        match failed.is_empty() {
            true => Ok(()),
            false => Err(failed.join("; ")),
        }
    }

    /// Connects the device's interrupts to KVM: the call eventfd as the irqfd of `gsi`
    /// (virtio-mmio), or the routes and irqfds of the MSI-X vectors the driver set up
    /// (virtio-pci). A configuration change still unacknowledged is signalled again (its
    /// eventfd's count belonged to the process that saved the state).
    pub fn attach_interrupts(&mut self, vm: &kvm_ioctls::VmFd, gsi: u32) -> Result<(), String> {
        if let Some(p) = &mut self.pci {
            p.connected = true;
            let pending = self.interrupt_status() & INT_CONFIG != 0;
            let r = self.sync_interrupts();
            if pending {
                let _ = self.signal_config();
            }
            return r.map_err(|e| format!("{}: MSI-X: {e}", self.name()));
        }
        if let Some(dev) = self.device.as_vhost_user() {
            vm.register_irqfd(dev.call_fd(), gsi)
                .map_err(|e| format!("KVM refused the irqfd of GSI {gsi}: {e}"))?;
        }
        Ok(())
    }

    /// Disconnects what [`Self::attach_interrupts`] connected: what the device signals
    /// meanwhile stays counted in its eventfds.
    pub fn detach_interrupts(&mut self, vm: &kvm_ioctls::VmFd, gsi: u32) -> Result<(), String> {
        if let Some(p) = &mut self.pci {
            p.connected = false;
            return self
                .sync_interrupts()
                .map_err(|e| format!("{}: MSI-X: {e}", self.name()));
        }
        if let Some(dev) = self.device.as_vhost_user() {
            vm.unregister_irqfd(dev.call_fd(), gsi)
                .map_err(|e| format!("KVM refused to drop the irqfd of GSI {gsi}: {e}"))?;
        }
        Ok(())
    }

    /// Raises the configuration-change interrupt (after [`Self::config_changed`] or
    /// [`Self::ring_broken`]).
    pub fn signal_config(&mut self) -> std::io::Result<()> {
        if let Some(p) = &self.pci {
            return p.config_evt.write(1);
        }
        match self.device.as_vhost_user() {
            Some(dev) => dev.call_fd().write(1),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
#[path = "pci_tests.rs"]
mod tests;
