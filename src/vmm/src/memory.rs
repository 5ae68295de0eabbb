//! Guest memory: anonymous mappings, backed by host pages only as the guest
//! touches them.

use vm_memory::{GuestAddress, GuestMemoryMmap};

use crate::layout::{HIGH_RAM_START, MMIO_GAP_START};

/// The RAM regions for `size` bytes of guest memory, around the MMIO gap.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, usize)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size as usize)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START as usize),
            (
                GuestAddress(HIGH_RAM_START),
                (size - MMIO_GAP_START) as usize,
            ),
        ]
    }
}

/// Maps `size` bytes of guest memory.
pub fn create(size: u64) -> Result<GuestMemoryMmap<()>, vm_memory::mmap::FromRangesError> {
    GuestMemoryMmap::from_ranges(&ram_regions(size))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_skips_the_mmio_gap() {
        assert_eq!(ram_regions(512 << 20), vec![(GuestAddress(0), 512 << 20)]);
        let r = ram_regions(4 << 30);
        assert_eq!(r[0], (GuestAddress(0), MMIO_GAP_START as usize));
        assert_eq!(
            r[1],
            (
                GuestAddress(HIGH_RAM_START),
                ((4u64 << 30) - MMIO_GAP_START) as usize
            )
        );
    }
}
