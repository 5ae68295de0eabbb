//! Loading the guest: the kernel (an ELF vmlinux entered through its PVH
//! note), the initramfs, the command line, and the PVH start info with the
//! memory map that tells the kernel where its RAM is.

use std::fs::File;
use std::path::Path;

use linux_loader::configurator::pvh::PvhBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::elf::{Elf, PvhBootCapability};
use linux_loader::loader::{load_cmdline, Cmdline, KernelLoader};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

use crate::layout::*;

const XEN_HVM_START_MAGIC: u32 = 0x336e_c578;
const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("cannot open {path}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot load the kernel {path}")]
    Kernel {
        path: String,
        #[source]
        source: linux_loader::loader::Error,
    },
    #[error("the kernel {0} has no PVH entry point (build it with CONFIG_PVH=y)")]
    NoPvh(String),
    #[error("the initramfs {path} ({size} bytes) does not fit in guest memory")]
    InitrdTooBig { path: String, size: u64 },
    #[error("cannot load the initramfs")]
    Initrd(#[source] vm_memory::GuestMemoryError),
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    #[error("cannot write the boot parameters")]
    Params(#[source] linux_loader::configurator::Error),
    #[error("cannot write the GDT")]
    Gdt(#[source] vm_memory::GuestMemoryError),
}

/// Where the boot vCPU starts.
#[derive(Clone, Copy, Debug)]
pub struct Entry {
    /// The PVH entry point (32-bit protected mode).
    pub rip: u64,
    /// Passed in %ebx: the hvm_start_info address.
    pub start_info: u64,
}

/// The flat 32-bit segments of the boot GDT: null, code (0x08), data
/// (0x10), TSS (0x18).
pub const GDT: [u64; 4] = [
    0,
    0x00cf_9b00_0000_ffff,
    0x00cf_9300_0000_ffff,
    0x008f_8b00_0000_ffff,
];

/// Loads everything and returns the entry point.
pub fn load(
    mem: &GuestMemoryMmap<()>,
    kernel: &Path,
    initrd: &Path,
    cmdline: &str,
) -> Result<Entry, BootError> {
    let open = |p: &Path| {
        File::open(p).map_err(|source| BootError::Open {
            path: p.display().to_string(),
            source,
        })
    };
    let mut kernel_file = open(kernel)?;
    let loaded = Elf::load(mem, None, &mut kernel_file, Some(GuestAddress(HIMEM_START))).map_err(
        |source| BootError::Kernel {
            path: kernel.display().to_string(),
            source,
        },
    )?;
    let rip = match loaded.pvh_boot_cap {
        PvhBootCapability::PvhEntryPresent(addr) => addr.raw_value(),
        _ => return Err(BootError::NoPvh(kernel.display().to_string())),
    };

    // The initramfs goes at the top of low RAM, page aligned.
    let mut initrd_file = open(initrd)?;
    let size = initrd_file
        .metadata()
        .map_err(|source| BootError::Open {
            path: initrd.display().to_string(),
            source,
        })?
        .len();
    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    let initrd_addr = low_end
        .checked_sub(size)
        .map(|a| a & !0xfff)
        .filter(|a| *a >= loaded.kernel_end);
    let Some(initrd_addr) = initrd_addr else {
        return Err(BootError::InitrdTooBig {
            path: initrd.display().to_string(),
            size,
        });
    };
    mem.read_exact_volatile_from(GuestAddress(initrd_addr), &mut initrd_file, size as usize)
        .map_err(BootError::Initrd)?;

    let mut cl = Cmdline::new(CMDLINE_MAX).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cl.insert_str(cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_ADDR), &cl)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;

    let memmap = memory_map(mem);
    let start_info = hvm_start_info {
        magic: XEN_HVM_START_MAGIC,
        version: 1,
        nr_modules: 1,
        modlist_paddr: MODLIST_ADDR,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: MEMMAP_ADDR,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let module = hvm_modlist_entry {
        paddr: initrd_addr,
        size,
        ..Default::default()
    };
    let mut params = BootParams::new(&start_info, GuestAddress(START_INFO_ADDR));
    params.set_sections(&memmap, GuestAddress(MEMMAP_ADDR));
    params.set_modules(&[module], GuestAddress(MODLIST_ADDR));
    PvhBootConfigurator::write_bootparams(&params, mem).map_err(BootError::Params)?;

    let gdt: Vec<u8> = GDT.iter().flat_map(|d| d.to_le_bytes()).collect();
    mem.write_slice(&gdt, GuestAddress(GDT_ADDR))
        .map_err(BootError::Gdt)?;
    Ok(Entry {
        rip,
        start_info: START_INFO_ADDR,
    })
}

/// The E820-style map: low RAM below the EBDA, the BIOS area reserved (the
/// MP table lives there), then RAM from 1 MiB, split around the MMIO gap.
fn memory_map(mem: &GuestMemoryMmap<()>) -> Vec<hvm_memmap_table_entry> {
    let entry = |addr: u64, size: u64, type_: u32| hvm_memmap_table_entry {
        addr,
        size,
        type_,
        reserved: 0,
    };
    let mut map = vec![
        entry(0, EBDA_START, E820_RAM),
        entry(EBDA_START, HIMEM_START - EBDA_START, E820_RESERVED),
    ];
    for r in mem.iter() {
        let start = r.start_addr().raw_value().max(HIMEM_START);
        let end = r.start_addr().raw_value() + r.len();
        if end > start {
            map.push(entry(start, end - start, E820_RAM));
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn memory_map_covers_ram_and_reserves_the_bios_area() {
        let mem = crate::memory::create(256 << 20).unwrap();
        let map = memory_map(&mem);
        assert_eq!(
            (map[0].addr, map[0].size, map[0].type_),
            (0, EBDA_START, E820_RAM)
        );
        assert_eq!(map[1].type_, E820_RESERVED);
        assert!(map[1].addr <= MPTABLE_ADDR && MPTABLE_ADDR < map[1].addr + map[1].size);
        assert_eq!(
            (map[2].addr, map[2].addr + map[2].size),
            (HIMEM_START, 256 << 20)
        );
    }

    #[test]
    fn a_kernel_without_pvh_is_refused() {
        let mem = crate::memory::create(64 << 20).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k"), b"not an ELF").unwrap();
        std::fs::write(dir.path().join("i"), b"").unwrap();
        let e = load(&mem, &dir.path().join("k"), &dir.path().join("i"), "quiet").unwrap_err();
        assert!(matches!(e, BootError::Kernel { .. }), "{e}");
    }
}
