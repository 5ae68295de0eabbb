//! One vCPU's KVM state: capture from a paused vCPU, restore into a new
//! one. The order of both is the one KVM needs (see [`VcpuState`]).

use kvm_bindings::{
    kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_lapic_state, kvm_mp_state, kvm_msr_entry,
    kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, CpuId, Msrs, KVM_MAX_CPUID_ENTRIES,
    KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

use super::pod::{from_bytes, to_bytes, Pod};
use super::SnapshotError;

/// MSRs a snapshot never carries: the x2APIC registers (their state is
/// the LAPIC's, saved as such).
const X2APIC_MSRS: std::ops::Range<u32> = 0x800..0xc00;
/// IA32_TSC: restored before anything that is relative to it.
const MSR_IA32_TSC: u32 = 0x10;
/// IA32_TSC_DEADLINE: only restores once the TSC and the LAPIC are set.
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;
/// More MSRs than any host reports; a snapshot with more is refused.
pub const MAX_MSRS: usize = 1024;
/// The size KVM_GET_XSAVE fills; a guest whose xstate is larger (AMX)
/// needs KVM_GET_XSAVE2, which this increment does not do.
const XSAVE_SIZE: i32 = std::mem::size_of::<kvm_xsave>() as i32;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

/// The MSRs to save for vCPUs of this host: the list KVM reports
/// (KVM_GET_MSR_INDEX_LIST), without the x2APIC range, keeping only those
/// this vCPU can read (KVM lists some a given host or CPUID refuses), in
/// restore order: IA32_TSC first, IA32_TSC_DEADLINE last.
pub fn msrs_to_save(kvm_fd: &Kvm, vcpu: &VcpuFd) -> Result<Vec<u32>, SnapshotError> {
    let list = kvm_fd
        .get_msr_index_list()
        .map_err(kvm("reading the MSR index list"))?;
    let mut keep: Vec<u32> = list
        .as_slice()
        .iter()
        .copied()
        .filter(|i| !X2APIC_MSRS.contains(i))
        .filter(|&i| read_msrs(vcpu, &[i]).is_ok())
        .collect();
    keep.sort_by_key(|&i| match i {
        MSR_IA32_TSC => 0,
        MSR_IA32_TSC_DEADLINE => 2,
        _ => 1,
    });
    keep.truncate(MAX_MSRS);
    Ok(keep)
}

/// Lets KVM finish the exit the vCPU last made before it is captured:
/// after an `in`, the value the VMM supplied only reaches the guest's
/// register on the next KVM_RUN (and string or MMIO exits likewise), so a
/// capture right after the exit would lose it. A KVM_RUN with
/// immediate_exit set completes that and returns at once (EINTR) without
/// running guest code. Call it on each paused vCPU, from its own thread,
/// before [`VcpuState::capture`].
pub fn settle(vcpu: &mut VcpuFd) -> Result<(), SnapshotError> {
    vcpu.set_kvm_immediate_exit(1);
    let ran = vcpu.run().map(|_| ());
    vcpu.set_kvm_immediate_exit(0);
    match ran {
        Err(e) if e.errno() == libc::EINTR => Ok(()),
        Err(source) => Err(SnapshotError::Kvm {
            what: "completing the vCPU's last exit",
            source,
        }),
        // KVM ran nothing and reported an exit anyway: nothing pending.
        Ok(()) => Ok(()),
    }
}

/// Reads `indices` (at most KVM_MAX_MSR_ENTRIES at a time); an MSR KVM
/// does not return is an error naming it.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<(u32, u64)>, SnapshotError> {
    let mut out = Vec::with_capacity(indices.len());
    for chunk in indices.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Invalid {
            what: "too many MSRs for one KVM call".into(),
        })?;
        let n = vcpu.get_msrs(&mut msrs).map_err(kvm("reading MSRs"))?;
        if n != chunk.len() {
            return Err(SnapshotError::Msr {
                index: chunk[n.min(chunk.len() - 1)],
                op: "read",
            });
        }
        out.extend(msrs.as_slice().iter().map(|e| (e.index, e.data)));
    }
    Ok(out)
}

/// Writes `msrs` in order. An MSR KVM refuses is an error naming it,
/// unless the new vCPU already holds the saved value: KVM lists some MSRs
/// it refuses to write in some VMs even with the value they read (the KVM
/// async-PF interrupt MSR without an in-kernel LAPIC, say).
fn write_msrs(vcpu: &VcpuFd, msrs: &[(u32, u64)]) -> Result<(), SnapshotError> {
    let mut rest = msrs;
    while !rest.is_empty() {
        let chunk = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|&(index, data)| kvm_msr_entry {
                index,
                data,
                ..Default::default()
            })
            .collect();
        let kvm_msrs = Msrs::from_entries(&entries).map_err(|_| SnapshotError::Invalid {
            what: "too many MSRs for one KVM call".into(),
        })?;
        let n = vcpu.set_msrs(&kvm_msrs).map_err(kvm("writing MSRs"))?;
        if n >= chunk.len() {
            rest = &rest[chunk.len()..];
            continue;
        }
        let (index, data) = chunk[n];
        match read_msrs(vcpu, &[index]) {
            Ok(now) if now == [(index, data)] => rest = &rest[n + 1..],
            _ => return Err(SnapshotError::Msr { index, op: "write" }),
        }
    }
    Ok(())
}

/// A vCPU's state. Each KVM struct is kept as its UAPI bytes.
///
/// Capture order (Firecracker's and Cloud Hypervisor's, for the same
/// reasons): mp_state first (reading it lets KVM accept pending INIT/SIPI
/// events, which changes the LAPIC), then regs, sregs, FPU/xsave, xcrs,
/// debug registers, LAPIC, CPUID, MSRs, and vCPU events last (the other
/// reads may change what is pending).
///
/// Restore order: CPUID first (everything after is checked against it),
/// mp_state, regs, sregs (sets EFER and the APIC base, which the MSRs and
/// the LAPIC depend on), FPU then xsave, xcrs, debug registers, LAPIC
/// (before the MSRs: IA32_TSC_DEADLINE only takes with the LAPIC set up),
/// MSRs (IA32_TSC first, IA32_TSC_DEADLINE last), vCPU events last
/// (KVM_SET_REGS drops a pending exception, the events bring it back);
/// then KVM_KVMCLOCK_CTRL tells a kvmclock guest it was paused, so its
/// soft-lockup watchdog does not fire.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct VcpuState {
    pub id: u32,
    /// The TSC frequency (KVM_GET_TSC_KHZ), where KVM reports it.
    pub tsc_khz: Option<u32>,
    pub mp_state: Vec<u8>,
    pub regs: Vec<u8>,
    pub sregs: Vec<u8>,
    pub fpu: Vec<u8>,
    /// KVM_GET_XSAVE and KVM_GET_XCRS, where the host has them.
    pub xsave: Option<Vec<u8>>,
    pub xcrs: Option<Vec<u8>>,
    /// KVM_GET_DEBUGREGS, where the host has it.
    pub debugregs: Option<Vec<u8>>,
    /// Only in a VM with an in-kernel irqchip.
    pub lapic: Option<Vec<u8>>,
    /// Entries of KVM_GET_CPUID2, each its bytes.
    pub cpuid: Vec<Vec<u8>>,
    /// (index, value), in restore order.
    pub msrs: Vec<(u32, u64)>,
    pub events: Option<Vec<u8>>,
}

fn blob<T: Pod>(bytes: &[u8], what: &'static str) -> Result<T, SnapshotError> {
    from_bytes(bytes).ok_or_else(|| SnapshotError::Invalid {
        what: format!(
            "{what}: {} bytes, KVM's struct has {}",
            bytes.len(),
            std::mem::size_of::<T>()
        ),
    })
}

fn opt_blob<T: Pod>(
    bytes: &Option<Vec<u8>>,
    what: &'static str,
) -> Result<Option<T>, SnapshotError> {
    bytes.as_deref().map(|b| blob(b, what)).transpose()
}

/// What [`VcpuState::capture`] reads from the vCPUs of one VM on this
/// host, found once with calls a vCPU's own thread does not make
/// (KVM_GET_MSR_INDEX_LIST on /dev/kvm, KVM_CHECK_EXTENSION on the VM):
/// the VM's set-up thread probes it before any vCPU thread is confined
/// (`crate::vm`), and each vCPU then captures itself with vCPU ioctls
/// only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CapturePlan {
    /// The MSRs to read, in restore order ([`msrs_to_save`]).
    pub msrs: Vec<u32>,
    /// KVM_GET_XSAVE carries the whole xstate (the host has it, and the
    /// guest's xstate fits its 4 KiB).
    pub xsave: bool,
    /// KVM_GET_XCRS, KVM_GET_DEBUGREGS, KVM_GET_VCPU_EVENTS exist.
    pub xcrs: bool,
    pub debugregs: bool,
    pub events: bool,
    /// The VM has an in-kernel irqchip: there is a LAPIC to read.
    pub lapic: bool,
}

impl CapturePlan {
    /// Probes what to capture of `vm`'s vCPUs: `vcpu` is one of them, set
    /// up (its CPUID set: which MSRs it can read depends on it); `irqchip`
    /// says whether the VM has an in-kernel irqchip.
    pub fn probe(
        kvm_fd: &Kvm,
        vm: &VmFd,
        vcpu: &VcpuFd,
        irqchip: bool,
    ) -> Result<CapturePlan, SnapshotError> {
        Ok(CapturePlan {
            msrs: msrs_to_save(kvm_fd, vcpu)?,
            xsave: xsave_usable(vm),
            xcrs: vm.check_extension(Cap::Xcrs),
            debugregs: vm.check_extension(Cap::Debugregs),
            events: vm.check_extension(Cap::VcpuEvents),
            lapic: irqchip,
        })
    }
}

impl VcpuState {
    /// Captures the state of `vcpu` (vCPU `id`), which must not be running
    /// (its thread out of KVM_RUN, as a paused VM's are) and should be
    /// [`settle`]d, as `plan` says: vCPU ioctls only, so that the vCPU's
    /// own thread can make them under its seccomp list.
    pub fn capture(vcpu: &VcpuFd, id: u32, plan: &CapturePlan) -> Result<VcpuState, SnapshotError> {
        let tsc_khz = vcpu.get_tsc_khz().ok();
        let mp_state = vcpu.get_mp_state().map_err(kvm("reading mp_state"))?;
        let regs = vcpu.get_regs().map_err(kvm("reading registers"))?;
        let sregs = vcpu.get_sregs().map_err(kvm("reading sregs"))?;
        let fpu = vcpu.get_fpu().map_err(kvm("reading the FPU"))?;
        let xsave = if plan.xsave {
            Some(to_bytes(&vcpu.get_xsave().map_err(kvm("reading xsave"))?))
        } else {
            None
        };
        let xcrs = if plan.xcrs {
            Some(to_bytes(&vcpu.get_xcrs().map_err(kvm("reading xcrs"))?))
        } else {
            None
        };
        let debugregs = if plan.debugregs {
            Some(to_bytes(
                &vcpu
                    .get_debug_regs()
                    .map_err(kvm("reading debug registers"))?,
            ))
        } else {
            None
        };
        let lapic = if plan.lapic {
            Some(to_bytes(
                &vcpu.get_lapic().map_err(kvm("reading the LAPIC"))?,
            ))
        } else {
            None
        };
        let cpuid = vcpu
            .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
            .map_err(kvm("reading CPUID"))?
            .as_slice()
            .iter()
            .map(to_bytes)
            .collect();
        let msrs = read_msrs(vcpu, &plan.msrs)?;
        let events = if plan.events {
            Some(to_bytes(
                &vcpu.get_vcpu_events().map_err(kvm("reading vCPU events"))?,
            ))
        } else {
            None
        };
        Ok(VcpuState {
            id,
            tsc_khz,
            mp_state: to_bytes(&mp_state),
            regs: to_bytes(&regs),
            sregs: to_bytes(&sregs),
            fpu: to_bytes(&fpu),
            xsave,
            xcrs,
            debugregs,
            lapic,
            cpuid,
            msrs,
            events,
        })
    }

    /// Checks every length and count, without KVM: what a restore would
    /// refuse, refused before anything is set.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        blob::<kvm_mp_state>(&self.mp_state, "mp_state")?;
        blob::<kvm_regs>(&self.regs, "regs")?;
        blob::<kvm_sregs>(&self.sregs, "sregs")?;
        blob::<kvm_fpu>(&self.fpu, "fpu")?;
        opt_blob::<kvm_xsave>(&self.xsave, "xsave")?;
        opt_blob::<kvm_xcrs>(&self.xcrs, "xcrs")?;
        opt_blob::<kvm_debugregs>(&self.debugregs, "debugregs")?;
        opt_blob::<kvm_lapic_state>(&self.lapic, "lapic")?;
        opt_blob::<kvm_vcpu_events>(&self.events, "vcpu events")?;
        if self.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
            return Err(SnapshotError::Invalid {
                what: format!("{} CPUID entries", self.cpuid.len()),
            });
        }
        for e in &self.cpuid {
            blob::<kvm_cpuid_entry2>(e, "a CPUID entry")?;
        }
        if self.msrs.len() > MAX_MSRS {
            return Err(SnapshotError::Invalid {
                what: format!("{} MSRs", self.msrs.len()),
            });
        }
        Ok(())
    }

    /// Restores this state into `vcpu`, a new vCPU of a VM set up like the
    /// captured one (same memory layout; an irqchip if `lapic` is set).
    pub fn restore(&self, vm: &VmFd, vcpu: &VcpuFd) -> Result<(), SnapshotError> {
        self.validate()?;
        let entries: Vec<kvm_cpuid_entry2> = self
            .cpuid
            .iter()
            .map(|e| blob(e, "a CPUID entry"))
            .collect::<Result<_, _>>()?;
        let cpuid = CpuId::from_entries(&entries).map_err(|_| SnapshotError::Invalid {
            what: "too many CPUID entries".into(),
        })?;
        vcpu.set_cpuid2(&cpuid).map_err(kvm("setting CPUID"))?;
        if let Some(khz) = self.tsc_khz {
            restore_tsc_khz(vcpu, khz)?;
        }
        vcpu.set_mp_state(blob(&self.mp_state, "mp_state")?)
            .map_err(kvm("setting mp_state"))?;
        vcpu.set_regs(&blob(&self.regs, "regs")?)
            .map_err(kvm("setting registers"))?;
        vcpu.set_sregs(&blob(&self.sregs, "sregs")?)
            .map_err(kvm("setting sregs"))?;
        vcpu.set_fpu(&blob(&self.fpu, "fpu")?)
            .map_err(kvm("setting the FPU"))?;
        if let Some(xsave) = opt_blob::<kvm_xsave>(&self.xsave, "xsave")? {
            if !xsave_usable(vm) {
                return Err(SnapshotError::Unsupported("xsave state (KVM_SET_XSAVE)"));
            }
            // SAFETY: KVM reads past the 4 KiB struct only when the guest's
            // xstate is larger than that; xsave_usable checked that
            // KVM_CAP_XSAVE2 reports at most 4 KiB.
            unsafe { vcpu.set_xsave(&xsave) }.map_err(kvm("setting xsave"))?;
        }
        if let Some(xcrs) = opt_blob::<kvm_xcrs>(&self.xcrs, "xcrs")? {
            vcpu.set_xcrs(&xcrs).map_err(kvm("setting xcrs"))?;
        }
        if let Some(d) = opt_blob::<kvm_debugregs>(&self.debugregs, "debugregs")? {
            vcpu.set_debug_regs(&d)
                .map_err(kvm("setting debug registers"))?;
        }
        if let Some(lapic) = opt_blob::<kvm_lapic_state>(&self.lapic, "lapic")? {
            vcpu.set_lapic(&lapic).map_err(kvm("setting the LAPIC"))?;
        }
        write_msrs(vcpu, &self.msrs)?;
        if let Some(events) = opt_blob::<kvm_vcpu_events>(&self.events, "vcpu events")? {
            vcpu.set_vcpu_events(&events)
                .map_err(kvm("setting vCPU events"))?;
        }
        // EINVAL unless the guest enabled kvmclock: nothing to tell then.
        let _ = vcpu.kvmclock_ctrl();
        Ok(())
    }
}

/// Scales the vCPU's TSC to `khz` when this host's differs by more than
/// calibration noise (250 ppm, as Firecracker allows).
fn restore_tsc_khz(vcpu: &VcpuFd, khz: u32) -> Result<(), SnapshotError> {
    let here = match vcpu.get_tsc_khz() {
        Ok(here) => here,
        // A host that does not say cannot be compared: the TSC MSR still
        // restores the counter.
        Err(_) => return Ok(()),
    };
    let diff = (i64::from(here) - i64::from(khz)).abs();
    if diff * 4000 <= i64::from(khz) {
        return Ok(());
    }
    vcpu.set_tsc_khz(khz)
        .map_err(kvm("scaling the TSC to the snapshot's frequency"))
}

/// Whether KVM_GET/SET_XSAVE carry the whole xstate: the host has them,
/// and (with KVM_CAP_XSAVE2) the size it needs fits the 4 KiB struct.
fn xsave_usable(vm: &VmFd) -> bool {
    if !vm.check_extension(Cap::Xsave) {
        return false;
    }
    // Asked of the VM: the size its guests may use, not all the host has.
    let size = vm.check_extension_int(Cap::Xsave2);
    size <= XSAVE_SIZE
}
