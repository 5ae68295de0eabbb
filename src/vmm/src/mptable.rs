//! The Intel MultiProcessor table (MP spec 1.4): how a guest without ACPI
//! learns its CPUs, its IOAPIC and how ISA interrupts reach it.

use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::layout::{APIC_ADDR, IOAPIC_ADDR, MAX_IRQ};

const SPEC_REV: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BSP: u8 = 2;
// Entry types.
const ENTRY_PROCESSOR: u8 = 0;
const ENTRY_BUS: u8 = 1;
const ENTRY_IOAPIC: u8 = 2;
const ENTRY_IO_INTERRUPT: u8 = 3;
const ENTRY_LOCAL_INTERRUPT: u8 = 4;
// Interrupt types.
const INT_INT: u8 = 0;
const INT_NMI: u8 = 1;
const INT_EXTINT: u8 = 3;

#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    #[error("{0} vCPUs do not fit an MP table (at most 254)")]
    TooManyCpus(u32),
    #[error("the MP table does not fit in guest memory")]
    Write(#[source] vm_memory::GuestMemoryError),
}

fn checksum(bytes: &[u8]) -> u8 {
    0u8.wrapping_sub(bytes.iter().fold(0u8, |a, b| a.wrapping_add(*b)))
}

/// The table's bytes for `cpus` vCPUs when placed at `addr`.
pub fn build(cpus: u32, addr: u64) -> Result<Vec<u8>, MpTableError> {
    if cpus == 0 || cpus > 254 {
        return Err(MpTableError::TooManyCpus(cpus));
    }
    let ioapic_id = cpus as u8;
    let mut entries: Vec<u8> = Vec::new();
    let mut count: u16 = 0;
    for cpu in 0..cpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BSP } else { 0 };
        entries.extend_from_slice(&[ENTRY_PROCESSOR, cpu as u8, APIC_VERSION, flags]);
        entries.extend_from_slice(&0x600u32.to_le_bytes()); // signature: family 6
        entries.extend_from_slice(&0x201u32.to_le_bytes()); // features: FPU, APIC
        entries.extend_from_slice(&[0; 8]);
        count += 1;
    }
    entries.extend_from_slice(&[ENTRY_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    count += 1;
    entries.extend_from_slice(&[ENTRY_IOAPIC, ioapic_id, IOAPIC_VERSION, 1]);
    entries.extend_from_slice(&IOAPIC_ADDR.to_le_bytes());
    count += 1;
    // Every ISA interrupt, the timer's included, goes to the IOAPIC pin of
    // the same number (KVM's default routing); the 8259 reaches the CPU
    // through LINT0 below. Flags 0: polarity and trigger as the bus says.
    for irq in 0..=MAX_IRQ as u8 {
        entries.extend_from_slice(&[ENTRY_IO_INTERRUPT, INT_INT, 0, 0, 0, irq, ioapic_id, irq]);
        count += 1;
    }
    // LINT0 carries the 8259's interrupts, LINT1 the NMI, on every CPU.
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_EXTINT, 0, 0, 0, 0, 0xff, 0]);
    entries.extend_from_slice(&[ENTRY_LOCAL_INTERRUPT, INT_NMI, 0, 0, 0, 0, 0xff, 1]);
    count += 2;

    let mut table = Vec::new();
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(SPEC_REV);
    table.push(0); // checksum, below
    table.extend_from_slice(b"KRUN-OCI");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // no OEM table
    table.extend_from_slice(&0u16.to_le_bytes());
    table.extend_from_slice(&count.to_le_bytes());
    table.extend_from_slice(&APIC_ADDR.to_le_bytes());
    table.extend_from_slice(&0u16.to_le_bytes()); // no extended entries
    table.push(0);
    table.push(0);
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    // The floating pointer structure comes first and points at the table.
    let mut fp = Vec::new();
    fp.extend_from_slice(b"_MP_");
    fp.extend_from_slice(&((addr + 16) as u32).to_le_bytes());
    fp.extend_from_slice(&[1, SPEC_REV, 0, 0, 0, 0, 0, 0]);
    fp[10] = checksum(&fp);
    fp.extend_from_slice(&table);
    Ok(fp)
}

/// Writes the MP table for `cpus` vCPUs at `addr`.
pub fn write<M: GuestMemory>(mem: &M, cpus: u32, addr: u64) -> Result<usize, MpTableError> {
    let bytes = build(cpus, addr)?;
    mem.write_slice(&bytes, GuestAddress(addr))
        .map_err(MpTableError::Write)?;
    Ok(bytes.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn checksums_and_pointers_are_right() {
        let t = build(4, 0xf0000).unwrap();
        assert_eq!(&t[..4], b"_MP_");
        assert_eq!(t[..16].iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        assert_eq!(u32::from_le_bytes(t[4..8].try_into().unwrap()), 0xf0010);
        let table = &t[16..];
        assert_eq!(&table[..4], b"PCMP");
        let len = u16::from_le_bytes([table[4], table[5]]) as usize;
        assert_eq!(len, table.len());
        assert_eq!(table.iter().fold(0u8, |a, b| a.wrapping_add(*b)), 0);
        let count = u16::from_le_bytes([table[34], table[35]]);
        assert_eq!(count as u32, 4 + 1 + 1 + (MAX_IRQ + 1) + 2);
        // Even the largest table fits in the BIOS area below 1 MiB.
        assert!(0xf0000 + build(254, 0xf0000).unwrap().len() < 0x10_0000);
    }

    #[test]
    fn cpu_counts_are_bounded() {
        assert!(build(0, 0).is_err());
        assert!(build(255, 0).is_err());
        assert!(build(254, 0xf0000).is_ok());
    }
}
