//! Where things live in guest physical memory and in the interrupt space.

/// Guest RAM below the MMIO gap ends here at most; RAM beyond continues
/// at [`HIGH_RAM_START`].
pub const MMIO_GAP_START: u64 = 0xc000_0000;
pub const HIGH_RAM_START: u64 = 1 << 32;

/// The GDT the vCPUs start with (PVH enters in 32-bit protected mode).
pub const GDT_ADDR: u64 = 0x500;
/// hvm_start_info, then the module list and the memory map.
pub const START_INFO_ADDR: u64 = 0x6000;
pub const MODLIST_ADDR: u64 = 0x6800;
pub const MEMMAP_ADDR: u64 = 0x7000;
/// The kernel command line.
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 4096;
/// The Intel MP table (CPUs, IOAPIC, interrupt routing), in the BIOS area
/// the kernel scans for it (0xf0000-0xfffff, not RAM in the memory map).
pub const MPTABLE_ADDR: u64 = 0xf0000;
/// End of the low RAM below 1 MiB that the guest may use.
pub const EBDA_START: u64 = 0x9fc00;
/// The kernel loads at or above 1 MiB.
pub const HIMEM_START: u64 = 0x10_0000;

/// virtio-mmio device windows, one page each, in the MMIO gap.
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// The local APIC and IOAPIC (fixed by the architecture).
pub const APIC_ADDR: u32 = 0xfee0_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;

/// The serial port (COM1) and its interrupt.
pub const SERIAL_PORT: u16 = 0x3f8;
pub const SERIAL_IRQ: u32 = 4;
/// The first interrupt for virtio devices; device N gets FIRST + N.
pub const VIRTIO_FIRST_IRQ: u32 = 5;
/// IOAPIC pins 0-23; ISA interrupts 5-15 and PCI-style 16-23 are free here
/// except the ones above.
pub const MAX_IRQ: u32 = 23;

/// The MMIO window of virtio device `n`.
pub fn virtio_mmio_addr(n: usize) -> u64 {
    VIRTIO_MMIO_BASE + n as u64 * crate::virtio::mmio::MMIO_LEN
}

/// The interrupt of virtio device `n`, skipping the ones legacy hardware
/// the kernel probes for might claim (8: RTC, 12: PS/2 mouse, 14/15: IDE).
pub fn virtio_irq(n: usize) -> Option<u32> {
    (VIRTIO_FIRST_IRQ..=MAX_IRQ)
        .filter(|i| ![8, 12, 14, 15].contains(i))
        .nth(n)
}
