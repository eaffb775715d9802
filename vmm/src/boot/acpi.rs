//! ACPI tables: how a guest that boots with ACPI (the default) learns about every vCPU, the
//! IOAPIC, COM1, the i8042, each virtio-mmio device and the power button, and how it powers
//! the machine off. Written with the rust-vmm `acpi_tables` crate.
//!
//! The machine is ACPI "hardware-reduced" (as Firecracker's and Cloud Hypervisor's are): no
//! fixed-feature PM blocks, no SCI. Instead:
//! - sleep control and status registers at [`ACPI_SLEEP_CONTROL_PORT`] and
//!   [`ACPI_SLEEP_STATUS_PORT`]: writing SLP_TYP 5 (`_S5_`) with SLP_EN powers off;
//! - a reset register at [`ACPI_RESET_PORT`] (value [`ACPI_RESET_VALUE`]);
//! - a Generic Event Device (ACPI0013) on [`GED_IRQ`] whose `_EVT` notifies the power button
//!   (PNP0C0C): the API's power-button press.
//!
//! Layout (below 1 MiB, outside the E820 RAM, where the guest also scans for the RSDP):
//! RSDP at [`ACPI_START`], then DSDT, FADT, MADT and XSDT, all below [`MPTABLE_START`].
//!
//! The MADT needs no interrupt source overrides: KVM wires ISA interrupts 0-15 to the
//! IOAPIC pins of the same number, edge-triggered and active high, which is what a guest
//! assumes without an override, and a hardware-reduced machine has no SCI to route.

use acpi_tables::aml::{
    self, AddressSpace as AmlAddressSpace, AddressSpaceCacheable, Device, EISAName, Interrupt,
    Memory32Fixed, Method, Name, Notify, Package, Path, ResourceTemplate, IO,
};
use acpi_tables::fadt::{FADTBuilder, Flags};
use acpi_tables::gas::{AccessSize, AddressSpace, GAS};
use acpi_tables::madt::{
    EnabledStatus, IoApic, LocalInterruptController, ProcessorLocalApic, MADT,
};
use acpi_tables::mcfg::MCFG;
use acpi_tables::rsdp::Rsdp;
use acpi_tables::sdt::Sdt;
use acpi_tables::xsdt::XSDT;
use acpi_tables::Aml;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{
    ACPI_RESET_PORT, ACPI_RESET_VALUE, ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_STATUS_PORT, ACPI_START,
    APIC_ADDR, GED_IRQ, I8042_DATA_PORT, IOAPIC_ADDR, MPTABLE_START, PCI_CONFIG_ADDRESS_PORT,
    PCI_ECAM_SIZE, PCI_ECAM_START, PCI_MMIO_SIZE, PCI_MMIO_START, SERIAL_IRQ, SERIAL_PORT,
    VIRTIO_MMIO_SIZE,
};

/// Errors writing the ACPI tables.
#[derive(Debug, thiserror::Error)]
pub enum AcpiError {
    /// More vCPUs than 8-bit APIC ids below the IOAPIC's.
    #[error("{0} vCPUs do not fit in the ACPI MADT (at most 254)")]
    TooManyCpus(u32),
    /// The tables outgrew their window.
    #[error("the ACPI tables ({0} bytes) do not fit below the MP table")]
    TooBig(usize),
    /// Guest memory write failed.
    #[error("cannot write the ACPI tables into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

/// Our OEM id in every table.
const OEM_ID: [u8; 6] = *b"SKIFF ";
/// OEM revision of every table.
const OEM_REVISION: u32 = 1;
/// FADT hypervisor vendor identity.
const HYPERVISOR_VENDOR: [u8; 8] = *b"SKIFFKVM";
/// The sleep type `_S5_` names; SLP_TYP in the sleep control register.
pub const S5_SLEEP_TYPE: u8 = 5;
/// Sleep control register: SLP_EN.
pub const SLEEP_ENABLE: u8 = 1 << 5;
/// Sleep control register: where SLP_TYP starts.
pub const SLEEP_TYPE_SHIFT: u8 = 2;
/// Sleep control register: the SLP_TYP bits.
pub const SLEEP_TYPE_MASK: u8 = 0b111 << SLEEP_TYPE_SHIFT;

/// IA-PC boot architecture flags (FADT): legacy devices, an 8042, no VGA, no CMOS RTC.
const IAPC_LEGACY_DEVICES: u16 = 1 << 0;
const IAPC_8042: u16 = 1 << 1;
const IAPC_NO_VGA: u16 = 1 << 2;
const IAPC_NO_CMOS_RTC: u16 = 1 << 5;

/// One virtio-mmio device as the DSDT describes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MmioDevice {
    /// Base of its window ([`VIRTIO_MMIO_SIZE`] bytes).
    pub base: u64,
    /// Its GSI.
    pub gsi: u32,
}

fn io_gas(port: u16) -> GAS {
    GAS::new(
        AddressSpace::SystemIo,
        8,
        0,
        AccessSize::ByteAccess,
        port.into(),
    )
}

/// PCI bus 0's host bridge (PNP0A08, with configuration mechanism 1's ports and the memory
/// window of the functions' BARs).
fn pci_devices(aml: &mut Vec<u8>) {
    Device::new(
        "_SB_.PCI0".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0A08")),
            &Name::new("_CID".into(), &EISAName::new("PNP0A03")),
            &Name::new("_ADR".into(), &aml::ZERO),
            &Name::new("_SEG".into(), &aml::ZERO),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_BBN".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &AmlAddressSpace::new_bus_number(0u16, 0u16),
                    &IO::new(PCI_CONFIG_ADDRESS_PORT, PCI_CONFIG_ADDRESS_PORT, 1, 8),
                    &AmlAddressSpace::new_memory(
                        AddressSpaceCacheable::NotCacheable,
                        true,
                        PCI_MMIO_START as u32,
                        (PCI_MMIO_START + PCI_MMIO_SIZE - 1) as u32,
                        None,
                    ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(aml);
}

/// Motherboard resources (PNP0C02): the sleep and reset registers' ports, and with PCI the
/// ECAM window (Linux uses an MCFG area only when ACPI reserves it), so that nothing else is
/// placed there.
fn motherboard_resources(aml: &mut Vec<u8>, pci: bool) {
    let ports = IO::new(ACPI_SLEEP_CONTROL_PORT, ACPI_SLEEP_CONTROL_PORT, 1, 3);
    let ecam = Memory32Fixed::new(false, PCI_ECAM_START as u32, PCI_ECAM_SIZE as u32);
    let mut resources: Vec<&dyn Aml> = vec![&ports];
    if pci {
        resources.push(&ecam);
    }
    Device::new(
        "_SB_.MRES".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C02")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &ResourceTemplate::new(resources)),
        ],
    )
    .to_aml_bytes(aml);
}

fn dsdt_body(devices: &[MmioDevice], pci: bool) -> Vec<u8> {
    // Temporaries live to the end of each statement: each device is one statement.
    let irq = |n: u32| Interrupt::new(true, true, false, false, n);
    let mut aml: Vec<u8> = Vec::new();
    // COM1.
    Device::new(
        "_SB_.COM1".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0501")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(SERIAL_PORT, SERIAL_PORT, 1, 8),
                    &irq(SERIAL_IRQ),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    // The i8042 (Ctrl+Alt+Del, reset): a guest with ACPI finds it only through its PNP id.
    Device::new(
        "_SB_.PS2K".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0303")),
            &Name::new(
                "_CRS".into(),
                &ResourceTemplate::new(vec![
                    &IO::new(I8042_DATA_PORT, I8042_DATA_PORT, 1, 1),
                    &IO::new(I8042_DATA_PORT + 4, I8042_DATA_PORT + 4, 1, 1),
                    &irq(1),
                ]),
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    // Every virtio-mmio device, with the identity Linux's virtio_mmio driver matches.
    let hid = String::from("LNRO0005");
    for (i, d) in devices.iter().enumerate() {
        Device::new(
            format!("_SB_.V{i:03X}").as_str().into(),
            vec![
                &Name::new("_HID".into(), &hid),
                &Name::new("_UID".into(), &(i as u32)),
                &Name::new("_CCA".into(), &aml::ONE),
                &Name::new(
                    "_CRS".into(),
                    &ResourceTemplate::new(vec![
                        // The window is below 4 GiB (the 32-bit MMIO hole).
                        &Memory32Fixed::new(true, d.base as u32, VIRTIO_MMIO_SIZE as u32),
                        &irq(d.gsi),
                    ]),
                ),
            ],
        )
        .to_aml_bytes(&mut aml);
    }
    if pci {
        pci_devices(&mut aml);
    }
    motherboard_resources(&mut aml, pci);
    // The power button, and the event device that presses it.
    Device::new(
        "_SB_.PWRB".into(),
        vec![
            &Name::new("_HID".into(), &EISAName::new("PNP0C0C")),
            &Name::new("_UID".into(), &aml::ZERO),
        ],
    )
    .to_aml_bytes(&mut aml);
    Device::new(
        "_SB_.GED_".into(),
        vec![
            &Name::new("_HID".into(), &String::from("ACPI0013")),
            &Name::new("_UID".into(), &aml::ZERO),
            &Name::new("_CRS".into(), &ResourceTemplate::new(vec![&irq(GED_IRQ)])),
            // One event source so far: every event is a power-button press.
            &Method::new(
                "_EVT".into(),
                1,
                true,
                vec![&Notify::new(&Path::new("\\_SB_.PWRB"), &0x80u8)],
            ),
        ],
    )
    .to_aml_bytes(&mut aml);
    // S5: what the guest writes to the sleep control register to power off.
    Name::new("_S5_".into(), &Package::new(vec![&S5_SLEEP_TYPE])).to_aml_bytes(&mut aml);
    aml
}

/// The tables for `vcpus` vCPUs, the virtio-mmio `devices` and (`pci`) PCI bus 0, laid out
/// from [`ACPI_START`] (the RSDP first).
pub fn build(vcpus: u32, devices: &[MmioDevice], pci: bool) -> Result<Vec<u8>, AcpiError> {
    if vcpus > 254 {
        return Err(AcpiError::TooManyCpus(vcpus));
    }
    // RSDP first (16-byte aligned at ACPI_START); it is written last, with the XSDT's address.
    let mut out = vec![0u8; Rsdp::len()];
    let align = |v: &mut Vec<u8>| v.resize(v.len().next_multiple_of(16), 0);
    align(&mut out);

    let dsdt_addr = ACPI_START + out.len() as u64;
    let mut dsdt = Sdt::new(*b"DSDT", 36, 6, OEM_ID, *b"SKIFDSDT", OEM_REVISION);
    dsdt.append_slice(&dsdt_body(devices, pci));
    out.extend_from_slice(dsdt.as_slice());
    align(&mut out);

    let fadt_addr = ACPI_START + out.len() as u64;
    let mut fadt = FADTBuilder::new(OEM_ID, *b"SKIFFACP", OEM_REVISION)
        .dsdt_64(dsdt_addr)
        .flag(Flags::HwReducedAcpi)
        .flag(Flags::PwrButton)
        .flag(Flags::SlpButton)
        .flag(Flags::ResetRegSup);
    fadt.iapc_boot_arch = (IAPC_LEGACY_DEVICES | IAPC_8042 | IAPC_NO_VGA | IAPC_NO_CMOS_RTC).into();
    fadt.sleep_control_reg = io_gas(ACPI_SLEEP_CONTROL_PORT);
    fadt.sleep_status_reg = io_gas(ACPI_SLEEP_STATUS_PORT);
    fadt.reset_reg = io_gas(ACPI_RESET_PORT);
    fadt.reset_value = ACPI_RESET_VALUE;
    fadt.hypervisor_vendor_identity = u64::from_le_bytes(HYPERVISOR_VENDOR).into();
    fadt.finalize().to_aml_bytes(&mut out);
    align(&mut out);

    let madt_addr = ACPI_START + out.len() as u64;
    let mut madt = MADT::new(
        OEM_ID,
        *b"SKIFAPIC",
        OEM_REVISION,
        LocalInterruptController::Address(APIC_ADDR),
    );
    for cpu in 0..vcpus as u8 {
        madt.add_structure(ProcessorLocalApic::new(cpu, cpu, EnabledStatus::Enabled));
    }
    // The IOAPIC's id follows the vCPUs' (as in the MP table).
    madt.add_structure(IoApic::new(vcpus as u8, IOAPIC_ADDR, 0));
    madt.to_aml_bytes(&mut out);
    align(&mut out);

    let mcfg_addr = ACPI_START + out.len() as u64;
    if pci {
        let mut mcfg = MCFG::new(OEM_ID, *b"SKIFMCFG", OEM_REVISION);
        mcfg.add_ecam(PCI_ECAM_START, 0, 0, 0);
        mcfg.to_aml_bytes(&mut out);
        align(&mut out);
    }

    let xsdt_addr = ACPI_START + out.len() as u64;
    let mut xsdt = XSDT::new(OEM_ID, *b"SKIFXSDT", OEM_REVISION);
    xsdt.add_entry(fadt_addr);
    xsdt.add_entry(madt_addr);
    if pci {
        xsdt.add_entry(mcfg_addr);
    }
    xsdt.to_aml_bytes(&mut out);

    let mut rsdp = Vec::new();
    Rsdp::new(OEM_ID, xsdt_addr).to_aml_bytes(&mut rsdp);
    out[..rsdp.len()].copy_from_slice(&rsdp);

    if ACPI_START + out.len() as u64 > MPTABLE_START {
        return Err(AcpiError::TooBig(out.len()));
    }
    Ok(out)
}

/// Writes the tables into guest memory; returns the RSDP's address.
pub fn setup(
    mem: &GuestMemoryMmap,
    vcpus: u32,
    devices: &[MmioDevice],
    pci: bool,
) -> Result<u64, AcpiError> {
    let bytes = build(vcpus, devices, pci)?;
    mem.write_slice(&bytes, GuestAddress(ACPI_START))
        .map_err(AcpiError::GuestMemory)?;
    Ok(ACPI_START)
}

/// What a write of `value` to the sleep control register asks for: `true` for S5.
pub fn is_power_off(value: u8) -> bool {
    value & SLEEP_ENABLE != 0 && (value & SLEEP_TYPE_MASK) >> SLEEP_TYPE_SHIFT == S5_SLEEP_TYPE
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    fn u32_at(b: &[u8], at: usize) -> u32 {
        u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
    }

    fn u64_at(b: &[u8], at: usize) -> u64 {
        u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
    }

    /// The table at guest address `addr`, checked: signature, length inside the blob,
    /// checksum zero.
    fn table<'a>(blob: &'a [u8], addr: u64, sig: &[u8; 4]) -> &'a [u8] {
        let off = (addr - ACPI_START) as usize;
        assert_eq!(&blob[off..off + 4], sig);
        let len = u32_at(blob, off + 4) as usize;
        let t = &blob[off..off + len];
        assert_eq!(sum(t), 0, "{} checksum", String::from_utf8_lossy(sig));
        t
    }

    #[test]
    fn tables_chain_from_the_rsdp_and_check_out() {
        let devs = [
            MmioDevice {
                base: 0xd000_0000,
                gsi: 5,
            },
            MmioDevice {
                base: 0xd000_1000,
                gsi: 6,
            },
        ];
        let blob = build(4, &devs, false).unwrap();
        assert_eq!(&blob[0..8], b"RSD PTR ");
        assert_eq!(sum(&blob[0..20]), 0);
        assert_eq!(sum(&blob[0..36]), 0);
        let xsdt = table(&blob, u64_at(&blob, 24), b"XSDT");
        let entries: Vec<u64> = (36..xsdt.len())
            .step_by(8)
            .map(|o| u64_at(xsdt, o))
            .collect();
        assert_eq!(entries.len(), 2);
        let fadt = table(&blob, entries[0], b"FACP");
        // Hardware-reduced, with a reset register; the DSDT through X_DSDT.
        assert_ne!(u32_at(fadt, 112) & Flags::HwReducedAcpi as u32, 0);
        let dsdt = table(&blob, u64_at(fadt, 140), b"DSDT");
        let madt = table(&blob, entries[1], b"APIC");
        // Four local APICs (type 0), then one IOAPIC (type 1) with id 4.
        let mut at = 44;
        let mut kinds = Vec::new();
        while at < madt.len() {
            kinds.push(madt[at]);
            if madt[at] == 1 {
                assert_eq!(madt[at + 2], 4);
                assert_eq!(u32_at(madt, at + 4), IOAPIC_ADDR);
            }
            at += madt[at + 1] as usize;
        }
        assert_eq!(kinds, [0, 0, 0, 0, 1]);
        // The DSDT names each device and the pieces a guest looks for.
        let body = &dsdt[36..];
        let has = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
        for needle in [
            &b"LNRO0005"[..],
            b"V000",
            b"V001",
            b"ACPI0013",
            b"_EVT",
            b"PWRB",
            b"_S5_",
            b"COM1",
            b"PS2K",
        ] {
            assert!(
                has(needle),
                "DSDT lacks {}",
                String::from_utf8_lossy(needle)
            );
        }
        assert!(!has(b"V002"));
        // The second device's window: Memory32Fixed (0x86) with its base.
        let mut win = vec![0x86, 9, 0, 1];
        win.extend_from_slice(&0xd000_1000u32.to_le_bytes());
        assert!(has(&win));
    }

    #[test]
    fn the_most_devices_and_vcpus_fit() {
        let devs: Vec<MmioDevice> = (0..19)
            .map(|i| MmioDevice {
                base: 0xd000_0000 + i * 0x1000,
                gsi: 5 + i as u32,
            })
            .collect();
        assert!(build(254, &devs, true).is_ok());
        assert!(matches!(
            build(255, &devs, false),
            Err(AcpiError::TooManyCpus(255))
        ));
    }

    /// ACPICA's own disassembler (iasl, Debian's acpica-tools: what Linux's interpreter is
    /// built from) reads every table without an error, and finds the DSDT's objects.
    #[test]
    fn acpica_reads_the_tables() {
        let have_iasl = std::process::Command::new("iasl")
            .arg("-v")
            .output()
            .is_ok_and(|o| o.status.success());
        if !have_iasl {
            assert!(
                std::env::var("CI").is_err(),
                "iasl is missing (apt-get install acpica-tools)"
            );
            eprintln!("acpica_reads_the_tables: iasl missing (acpica-tools); not checked");
            return;
        }
        let devs = [MmioDevice {
            base: 0xd000_0000,
            gsi: 5,
        }];
        // Both kinds of device description at once (skiff writes one or the other).
        let blob = build(2, &devs, true).unwrap();
        let dir = std::env::temp_dir().join(format!("skiff-acpi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let xsdt = table(&blob, u64_at(&blob, 24), b"XSDT");
        let fadt_at = u64_at(xsdt, 36);
        let madt_at = u64_at(xsdt, 44);
        let mcfg_at = u64_at(xsdt, 52);
        let fadt = table(&blob, fadt_at, b"FACP");
        let dsdt_at = u64_at(fadt, 140);
        for (name, t) in [
            ("dsdt", table(&blob, dsdt_at, b"DSDT")),
            ("facp", fadt),
            ("apic", table(&blob, madt_at, b"APIC")),
            ("mcfg", table(&blob, mcfg_at, b"MCFG")),
        ] {
            let path = dir.join(format!("{name}.dat"));
            std::fs::write(&path, t).unwrap();
            let out = std::process::Command::new("iasl")
                .arg("-d")
                .arg(&path)
                .output()
                .unwrap();
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            // iasl can exit 0 and still report errors or warnings about what it read.
            assert!(
                out.status.success()
                    && !text.contains("Error")
                    && !text.contains("Warning")
                    && (text.contains("Disassembly completed") || text.contains("decoded")),
                "iasl -d {name}: {text}"
            );
            // The data-table decoder writes what it objects to into the output, after "****".
            let dsl = std::fs::read_to_string(dir.join(format!("{name}.dsl"))).unwrap();
            assert!(!dsl.contains("****"), "iasl objects to {name}:\n{dsl}");
        }
        let dsl = std::fs::read_to_string(dir.join("dsdt.dsl")).unwrap();
        for want in [
            "Device (_SB.V000)",
            "Name (_HID, \"LNRO0005\")",
            "Memory32Fixed (ReadWrite,",
            "0xD0000000",
            "Device (_SB.GED)",
            "Method (_EVT, 1, Serialized)",
            "Notify (\\_SB.PWRB, 0x80)",
            "Name (_S5, Package (0x01)",
            "EisaId (\"PNP0303\")",
            "Device (_SB.PCI0)",
            "EisaId (\"PNP0A08\")",
            "WordBusNumber (ResourceProducer,",
            "DWordMemory (ResourceProducer,",
            "0xCFFFFFFF",
            "EisaId (\"PNP0C02\")",
            "0xE0000000",
            "0x0600,",
        ] {
            assert!(dsl.contains(want), "the DSDT lacks {want}:\n{dsl}");
        }
        let mcfg = std::fs::read_to_string(dir.join("mcfg.dsl")).unwrap();
        assert!(mcfg.contains("00000000E0000000"), "{mcfg}");
        let facp = std::fs::read_to_string(dir.join("facp.dsl")).unwrap();
        assert!(facp.contains("Hardware Reduced (V5) : 1"), "{facp}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn only_s5_with_slp_en_powers_off() {
        assert!(is_power_off((5 << 2) | (1 << 5)));
        assert!(!is_power_off(5 << 2));
        assert!(!is_power_off((3 << 2) | (1 << 5)));
        assert!(!is_power_off(0));
    }
}
