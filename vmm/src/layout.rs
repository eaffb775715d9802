//! Guest physical memory map of a skiff microVM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT           0x0000_0520 IDT
//! 0x0000_6000  PVH start_info, module list and memory map
//! 0x0000_7000  Linux zero page (boot_params)
//! 0x0000_8ff0  boot stack    0x0000_9000 PML4, 0xa000 PDPT, 0xb000 PD (1 GiB identity map)
//! 0x0002_0000  kernel command line (up to 2 KiB)
//! 0x0009_fc00  EBDA (reserved)
//! 0x000e_0000  ACPI tables (RSDP first, where the guest searches for it)
//! 0x000f_0000  MP table (BIOS area, where the guest searches for it)
//! 0x0010_0000  high memory: kernel, then initrd near the top of low RAM
//! 0xc000_0000  32-bit MMIO hole: virtio-pci BARs (with --enable-pci), virtio-mmio devices
//!              from 0xd000_0000, the PCI ECAM window at 0xe000_0000, IOAPIC, LAPIC
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location.
pub const IDT_START: u64 = 0x520;
/// PVH `hvm_start_info`.
pub const PVH_INFO_START: u64 = 0x6000;
/// PVH module list (initrd).
pub const PVH_MODLIST_START: u64 = 0x6040;
/// PVH memory map.
pub const PVH_MEMMAP_START: u64 = 0x6100;
/// Linux zero page.
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer for the 64-bit entry.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page tables for the 64-bit entry.
pub const PML4_START: u64 = 0x9000;
/// Page-directory-pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (512 × 2 MiB).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the guest kernel accepts (including the NUL).
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the extended BIOS data area, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// ACPI tables: the RSDP, then the DSDT, FADT, MADT and XSDT (up to [`MPTABLE_START`]).
pub const ACPI_START: u64 = 0xe_0000;
/// MP floating pointer and configuration table.
pub const MPTABLE_START: u64 = 0xf_0000;
/// Start of high memory: the kernel is loaded at or above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Start of the 32-bit MMIO hole.
pub const MMIO_HOLE_START: u64 = 0xc000_0000;
/// First address above 4 GiB.
pub const RAM_ABOVE_4G_START: u64 = 0x1_0000_0000;
/// First virtio-mmio device window.
pub const VIRTIO_MMIO_START: u64 = 0xd000_0000;
/// Size of one virtio-mmio window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (0-4 are legacy: timer, keyboard, cascade, COM2, COM1).
pub const VIRTIO_IRQ_BASE: u32 = 5;
/// Last GSI the IOAPIC has.
pub const IRQ_MAX: u32 = 23;
/// IOAPIC MMIO base.
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
/// Local APIC MMIO base.
pub const APIC_ADDR: u32 = 0xfee0_0000;
/// KVM TSS (Intel needs three pages below 4 GiB, outside RAM).
pub const KVM_TSS_ADDRESS: usize = 0xfffb_d000;
/// KVM identity-map page (Intel), just below the TSS.
pub const KVM_IDENTITY_MAP_ADDRESS: u64 = 0xfffb_c000;
/// Serial port (COM1) base and IRQ.
pub const SERIAL_PORT: u16 = 0x3f8;
/// COM1 IRQ.
pub const SERIAL_IRQ: u32 = 4;
/// i8042 data port (the command port is 0x64).
pub const I8042_DATA_PORT: u16 = 0x60;
/// ACPI sleep control register (hardware-reduced ACPI; one byte): S5 powers off.
pub const ACPI_SLEEP_CONTROL_PORT: u16 = 0x600;
/// ACPI sleep status register (one byte, reads as zero).
pub const ACPI_SLEEP_STATUS_PORT: u16 = 0x601;
/// ACPI reset register (one byte).
pub const ACPI_RESET_PORT: u16 = 0x602;
/// What the guest writes to [`ACPI_RESET_PORT`] to reset.
pub const ACPI_RESET_VALUE: u8 = 1;
/// The ACPI Generic Event Device's interrupt (the power button). ISA IRQ 3 is COM2's, and
/// skiff has no COM2.
pub const GED_IRQ: u32 = 3;

/// PCI: the host bridge's memory window, where each virtio-pci function's BAR 0 is.
pub const PCI_MMIO_START: u64 = MMIO_HOLE_START;
/// PCI: size of the host bridge's memory window.
pub const PCI_MMIO_SIZE: u64 = 0x1000_0000;
/// PCI: size of a virtio-pci function's BAR 0 (a power of two).
pub const PCI_BAR_SIZE: u64 = 0x8000;
/// PCI: the ECAM (memory-mapped configuration) window of bus 0, as ACPI's MCFG gives it.
pub const PCI_ECAM_START: u64 = 0xe000_0000;
/// PCI: size of the ECAM window (one bus: 32 devices of 8 functions of 4 KiB).
pub const PCI_ECAM_SIZE: u64 = 0x10_0000;
/// PCI: the configuration address port (type 1 access; data at 0xcfc-0xcff).
pub const PCI_CONFIG_ADDRESS_PORT: u16 = 0xcf8;
/// PCI: the configuration data port.
pub const PCI_CONFIG_DATA_PORT: u16 = 0xcfc;
/// PCI: devices on bus 0 besides the host bridge (slot 0).
pub const PCI_MAX_DEVICES: usize = 31;
/// First GSI of the MSI-X vectors (above the IOAPIC's pins).
pub const PCI_MSI_GSI_BASE: u32 = IRQ_MAX + 1;
/// MSI-X vectors of each virtio-pci function: the configuration change and the queues
/// (which share one vhost-user call eventfd).
pub const PCI_MSIX_VECTORS: u16 = 2;
