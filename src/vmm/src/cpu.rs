//! vCPUs: their initial state for the PVH entry, and the run loop that
//! turns VM exits into device accesses.

use kvm_bindings::{
    kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
};
use kvm_ioctls::{Kvm, VcpuFd};

use crate::boot::{Entry, GDT};
use crate::layout::GDT_ADDR;

#[derive(Debug, thiserror::Error)]
pub enum CpuError {
    #[error("KVM: {what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM: {0}")]
    Msr(String),
}

fn kvm_err(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> CpuError {
    move |source| CpuError::Kvm { what, source }
}

const CPUID_HYPERVISOR: u32 = 1 << 31; // leaf 1 ECX
const CPUID_HTT: u32 = 1 << 28; // leaf 1 EDX
const MSR_IA32_MISC_ENABLE: u32 = 0x1a0;
const MISC_ENABLE_FAST_STRING: u64 = 1;
const APIC_LVT0: usize = 0x350;
const APIC_LVT1: usize = 0x360;
const APIC_MODE_NMI: u32 = 4;
const APIC_MODE_EXTINT: u32 = 7;

/// The CPUID a vCPU sees: exactly what this KVM supports (so nothing the
/// host cannot honour), with its own APIC id and the topology of `cpus`.
pub fn cpuid(kvm: &Kvm, id: u8, cpus: u8) -> Result<CpuId, CpuError> {
    let mut cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_err("reading the supported CPUID"))?;
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | ((id as u32) << 24) | ((cpus as u32) << 16);
                e.ecx |= CPUID_HYPERVISOR;
                if cpus > 1 {
                    e.edx |= CPUID_HTT;
                } else {
                    e.edx &= !CPUID_HTT;
                }
            }
            // x2APIC topology: the APIC id of this CPU.
            0xb | 0x1f => e.edx = id as u32,
            // AMD's extended APIC id.
            0x8000_001e => e.eax = id as u32,
            _ => {}
        }
    }
    Ok(cpuid)
}

fn segment(selector: u16, type_: u8, s: u8) -> kvm_segment {
    let d = GDT[(selector >> 3) as usize];
    kvm_segment {
        base: 0,
        limit: if s == 1 { 0xffff_ffff } else { 0x000f_ffff },
        selector,
        type_,
        present: 1,
        dpl: 0,
        db: ((d >> 54) & 1) as u8,
        s,
        l: 0,
        g: ((d >> 55) & 1) as u8,
        avl: 0,
        unusable: 0,
        padding: 0,
    }
}

/// Puts vCPU `id` of `cpus` in its initial state. The boot CPU (`entry`
/// given) starts at the kernel's PVH entry in 32-bit protected mode with
/// flat segments and %ebx pointing at the start info; the others wait for
/// the boot CPU's startup IPI.
pub fn configure(
    kvm: &Kvm,
    vcpu: &VcpuFd,
    id: u8,
    cpus: u8,
    entry: Option<Entry>,
) -> Result<(), CpuError> {
    vcpu.set_cpuid2(&cpuid(kvm, id, cpus)?)
        .map_err(kvm_err("setting CPUID"))?;
    let msrs = Msrs::from_entries(&[kvm_msr_entry {
        index: MSR_IA32_MISC_ENABLE,
        data: MISC_ENABLE_FAST_STRING,
        ..Default::default()
    }])
    .map_err(|e| CpuError::Msr(format!("{e:?}")))?;
    vcpu.set_msrs(&msrs).map_err(kvm_err("setting MSRs"))?;

    let mut lapic = vcpu
        .get_lapic()
        .map_err(kvm_err("reading the local APIC"))?;
    for (off, mode) in [(APIC_LVT0, APIC_MODE_EXTINT), (APIC_LVT1, APIC_MODE_NMI)] {
        let mut b = [0u8; 4];
        for (i, v) in b.iter_mut().enumerate() {
            *v = lapic.regs[off + i] as u8;
        }
        let v = (u32::from_le_bytes(b) & !0x700) | (mode << 8);
        for (i, byte) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[off + i] = *byte as i8;
        }
    }
    vcpu.set_lapic(&lapic)
        .map_err(kvm_err("setting the local APIC"))?;

    let Some(entry) = entry else { return Ok(()) };
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm_err("setting the FPU"))?;
    let regs = kvm_regs {
        rflags: 0x2,
        rip: entry.rip,
        rbx: entry.start_info,
        ..Default::default()
    };
    vcpu.set_regs(&regs).map_err(kvm_err("setting registers"))?;
    let mut sregs = vcpu
        .get_sregs()
        .map_err(kvm_err("reading special registers"))?;
    let code = segment(0x08, 0xb, 1);
    let data = segment(0x10, 0x3, 1);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(0x18, 0xb, 0);
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (GDT.len() * 8 - 1) as u16;
    sregs.idt.base = 0;
    sregs.idt.limit = 0;
    sregs.cr0 = 0x1 | 0x10; // PE, ET
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    vcpu.set_sregs(&sregs)
        .map_err(kvm_err("setting special registers"))?;
    Ok(())
}
