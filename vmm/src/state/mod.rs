//! The VM's whole state as one serialisable, versioned value ([`VmState`]): what a snapshot
//! writes to a file and, for the VMM's live upgrade, what the old process hands the new
//! one. Guest RAM is not part of it (it is the memory file, or the memfd itself).

pub mod file;
pub mod kvm;
pub mod memory;

use api_server::models::VmConfigFile;
use serde::{Deserialize, Serialize};

use crate::devices::i8042::I8042State;
use crate::devices::serial::SerialRegs;
use crate::devices::virtio::transport::TransportState;
use crate::devices::virtio::vhost_user::{DeviceKind, RingPosition};
pub use kvm::{KvmStateError, KvmVmState, VcpuState};

/// The VM's state.
#[derive(Debug, Serialize, Deserialize)]
pub struct VmState {
    /// The configuration the VM was started with (Firecracker's objects; logger and metrics
    /// left out: they belong to the process, not the VM).
    pub config: VmConfigFile,
    /// Arguments appended to the kernel command line (`skiff run --cmdline`).
    #[serde(default)]
    pub extra_args: Option<String>,
    /// Bytes of guest RAM.
    pub mem_bytes: u64,
    /// Every vCPU, in index order.
    pub vcpus: Vec<VcpuState>,
    /// Interrupt controllers, PIT and clock.
    pub kvm: KvmVmState,
    /// COM1.
    pub serial: SerialRegs,
    /// The keyboard controller.
    pub i8042: I8042State,
    /// Every virtio device, in transport order.
    pub devices: Vec<DeviceState>,
    /// Whether the guest booted with ACPI (and so has the power button's GED). A state from a
    /// skiff before ACPI lacks the field: those guests booted without ACPI tables.
    #[serde(default)]
    pub acpi: bool,
    /// Whether the devices are on PCI (`--enable-pci`). Absent in states from a skiff
    /// before virtio-pci: those are virtio-mmio.
    #[serde(default)]
    pub pci: bool,
}

/// One virtio device: its transport's registers and where its rings stand.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct DeviceState {
    /// drive_id or iface_id.
    pub id: String,
    /// Block or net.
    pub kind: DeviceKind,
    /// The transport's registers (virtio-mmio, or virtio-pci with its PCI function).
    pub transport: TransportState,
    /// The running rings (empty when the driver has not started the device).
    pub rings: Vec<RingPosition>,
    /// The device's config space as the guest saw it (capacity, MAC, ...).
    pub config: Vec<u8>,
}

impl DeviceState {
    /// Checks that a new backend serves the same device the guest knew: the same disk size
    /// (blk) or MAC (net), from the config space. The error says what differs.
    pub fn check_same_device(&self, config: &[u8]) -> Result<(), String> {
        let (what, len) = match self.kind {
            DeviceKind::Block => ("disk size (sectors)", 8),
            DeviceKind::Net => ("MAC address", 6),
        };
        let (Some(saved), Some(now)) = (self.config.get(..len), config.get(..len)) else {
            return Err(format!("device '{}': config space too short", self.id));
        };
        if saved == now {
            return Ok(());
        }
        Err(match self.kind {
            DeviceKind::Block => format!(
                "drive '{}' changed size: {} sectors at the snapshot, {} now",
                self.id,
                u64::from_le_bytes(saved.try_into().unwrap_or_default()),
                u64::from_le_bytes(now.try_into().unwrap_or_default())
            ),
            DeviceKind::Net => format!(
                "network interface '{}': {what} {} at the snapshot, {} now",
                self.id,
                hex_mac(saved),
                hex_mac(now)
            ),
        })
    }
}

fn hex_mac(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}
