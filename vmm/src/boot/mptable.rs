//! Intel MultiProcessor Specification 1.4 table: how the guest learns about every vCPU
//! (with its APIC id), the IOAPIC and the routing of ISA interrupts 0-23, without ACPI.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_ADDR, HIMEM_START, IOAPIC_ADDR, IRQ_MAX, MPTABLE_START};

/// Errors writing the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MptableError {
    /// More vCPUs than APIC ids below the IOAPIC's id.
    #[error("{0} vCPUs do not fit in an MP table (at most 254)")]
    TooManyCpus(u8),
    /// The table does not fit in the EBDA.
    #[error("the MP table ({0} bytes) does not fit below 1 MiB")]
    TooBig(usize),
    /// Guest memory write failed.
    #[error("cannot write the MP table into guest memory")]
    GuestMemory(#[source] vm_memory::GuestMemoryError),
}

const MPC_SIGNATURE: &[u8; 4] = b"PCMP";
const MPF_SIGNATURE: &[u8; 4] = b"_MP_";
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_IRQTYPE_INT: u8 = 0;
const MP_IRQTYPE_EXTINT: u8 = 3;
const MP_IRQTYPE_NMI: u8 = 1;
const APIC_VERSION: u8 = 0x14;
const MP_APIC_ALL: u8 = 0xff;
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 0x200;
const CPU_FEATURE_FPU: u32 = 0x001;
const ISA_BUS_ID: u8 = 0;

fn checksum(bytes: &[u8]) -> u8 {
    bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b))
}

/// Builds the MP floating pointer followed by the configuration table, for `num_cpus` vCPUs
/// with APIC ids 0..num_cpus and the IOAPIC at id `num_cpus`.
pub fn build(num_cpus: u8) -> Result<Vec<u8>, MptableError> {
    if num_cpus > 254 {
        return Err(MptableError::TooManyCpus(num_cpus));
    }
    let table_addr = MPTABLE_START as u32 + 16;
    let ioapic_id = num_cpus;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..num_cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0u8; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[MP_BUS, ISA_BUS_ID]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, APIC_VERSION, CPU_ENABLED]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    for irq in 0..=IRQ_MAX as u8 {
        // Type, IRQ type, flags (conforming polarity/trigger), source bus, bus IRQ,
        // destination IOAPIC, destination pin.
        entries.extend_from_slice(&[
            MP_INTSRC,
            MP_IRQTYPE_INT,
            0,
            0,
            ISA_BUS_ID,
            irq,
            ioapic_id,
            irq,
        ]);
        count += 1;
    }
    entries.extend_from_slice(&[
        MP_LINTSRC,
        MP_IRQTYPE_EXTINT,
        0,
        0,
        ISA_BUS_ID,
        0,
        MP_APIC_ALL,
        0,
    ]);
    entries.extend_from_slice(&[
        MP_LINTSRC,
        MP_IRQTYPE_NMI,
        0,
        0,
        ISA_BUS_ID,
        0,
        MP_APIC_ALL,
        1,
    ]);
    count += 2;

    let mut header = Vec::with_capacity(44);
    header.extend_from_slice(MPC_SIGNATURE);
    let length = (44 + entries.len()) as u16;
    header.extend_from_slice(&length.to_le_bytes());
    header.push(4); // spec revision 1.4
    header.push(0); // checksum, below
    header.extend_from_slice(b"SKIFF   "); // OEM id
    header.extend_from_slice(b"MICROVM     "); // product id
    header.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    header.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    header.extend_from_slice(&count.to_le_bytes());
    header.extend_from_slice(&APIC_ADDR.to_le_bytes());
    header.extend_from_slice(&[0u8; 4]); // extended length, checksum, reserved
    let mut table = header;
    table.extend_from_slice(&entries);
    table[7] = 0u8.wrapping_sub(checksum(&table));

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(MPF_SIGNATURE);
    mpf.extend_from_slice(&table_addr.to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(4); // spec revision 1.4
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0u8; 5]); // features: a configuration table is present
    mpf[10] = 0u8.wrapping_sub(checksum(&mpf));

    let mut out = mpf;
    out.extend_from_slice(&table);
    if MPTABLE_START as usize + out.len() > HIMEM_START as usize {
        return Err(MptableError::TooBig(out.len()));
    }
    Ok(out)
}

/// Writes the MP table for `num_cpus` vCPUs in the BIOS area.
pub fn setup(mem: &GuestMemoryMmap, num_cpus: u8) -> Result<(), MptableError> {
    let bytes = build(num_cpus)?;
    mem.write_slice(&bytes, GuestAddress(MPTABLE_START))
        .map_err(MptableError::GuestMemory)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_counts() {
        let t = build(4).unwrap();
        assert_eq!(&t[0..4], MPF_SIGNATURE);
        assert_eq!(checksum(&t[0..16]), 0);
        let table = &t[16..];
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(table.len(), len);
        assert_eq!(checksum(table), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count, 4 + 1 + 1 + 24 + 2);
        // The second processor entry carries APIC id 1 and is not the BSP.
        let cpu1 = &table[44 + 20..44 + 40];
        assert_eq!((cpu1[0], cpu1[1], cpu1[3]), (MP_PROCESSOR, 1, CPU_ENABLED));
    }

    #[test]
    fn too_many_cpus() {
        assert!(build(255).is_err());
        // The largest VM fits in the BIOS area.
        assert!(build(254).unwrap().len() < (HIMEM_START - MPTABLE_START) as usize);
    }
}
