//! Guest memory: anonymous mappings, backed by host pages only as the guest
//! touches them.

use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::VmFd;
use vm_memory::{GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

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

/// Gives the VM every region of `mem`, one KVM memory slot each.
///
/// # Safety
///
/// The VM reads and writes the regions' host mappings for as long as it
/// exists: `mem` (or a clone of it, which shares the mappings) must stay
/// alive at least as long as `vm`.
pub unsafe fn register(vm: &VmFd, mem: &GuestMemoryMmap<()>) -> Result<(), kvm_ioctls::Error> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the caller keeps the mapping alive as long as the VM.
        unsafe { vm.set_user_memory_region(r) }?;
    }
    Ok(())
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
