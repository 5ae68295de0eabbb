//! Snapshots of real KVM VMs running small guest programs of our own (as
//! `crate::kvm_tests` does: they run on kvm-pvm too): capture a VM in the
//! middle of a counting loop, restore it into a new VM from the file, and
//! see it count on from where it was.

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;

/// The guest's counter, in guest memory.
const COUNTER: u64 = 0x2000;
/// The port the guest reports each count on.
const PORT: u16 = 0x80;
/// The port the guest reads a number from after each count, and adds to
/// ebx: the VMM answers ten times the count.
const ASK: u16 = 0x81;

/// Real mode at 0x1000: optionally program PIT channel 0 (count 0x3412;
/// with an in-kernel PIT these writes do not exit), then loop: increment
/// the counter in memory, `out` it on PORT, `in` a number from ASK and
/// add it to ebx.
fn program(pit: bool) -> Vec<u8> {
    let mut code = Vec::new();
    if pit {
        code.extend_from_slice(&[0xb0, 0x34, 0xe6, 0x43]); // mov al, 0x34; out 0x43, al
        code.extend_from_slice(&[0xb0, 0x12, 0xe6, 0x40]); // mov al, 0x12; out 0x40, al
        code.extend_from_slice(&[0xb0, 0x34, 0xe6, 0x40]); // mov al, 0x34; out 0x40, al
    }
    code.extend_from_slice(&[0x66, 0xff, 0x06, 0x00, 0x20]); // inc dword [0x2000]
    code.extend_from_slice(&[0x66, 0xa1, 0x00, 0x20]); // mov eax, [0x2000]
    code.extend_from_slice(&[0x66, 0xe7, PORT as u8]); // out PORT, eax
    code.extend_from_slice(&[0x66, 0xe5, ASK as u8]); // in eax, ASK
    code.extend_from_slice(&[0x66, 0x01, 0xc3]); // add ebx, eax
    code.extend_from_slice(&[0xeb, 0xec]); // jmp back to the inc (-20)
    code
}

struct Vm {
    kvm: Kvm,
    vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap<()>,
}

/// A VM around `mem`, with an in-kernel irqchip and PIT if `irqchip`
/// (kvm-pvm must allow them; the test fails saying so if it does not).
fn vm(mem: GuestMemoryMmap<()>, irqchip: bool) -> Vm {
    let kvm = Kvm::new().expect("/dev/kvm must be usable for these tests");
    let vm = kvm.create_vm().unwrap();
    // SAFETY: the mapping is owned by `mem`, which lives in the Vm with
    // the VM.
    unsafe { crate::memory::register(&vm, &mem) }.unwrap();
    if irqchip {
        vm.set_tss_address(0xfffb_d000).unwrap();
        vm.create_irq_chip().unwrap_or_else(|e| {
            panic!("this host's KVM cannot create an in-kernel irqchip ({e}): the irqchip half of snapshots cannot be tested here")
        });
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        vm.create_pit2(pit).unwrap_or_else(|e| {
            panic!("this host's KVM cannot create an in-kernel PIT ({e}): the PIT half of snapshots cannot be tested here")
        });
    }
    let vcpu = vm.create_vcpu(0).unwrap();
    Vm { kvm, vm, vcpu, mem }
}

/// A fresh VM running [`program`] from its first instruction.
fn original(irqchip: bool) -> Vm {
    let v = vm(crate::memory::create(1 << 20).unwrap(), irqchip);
    v.vcpu
        .set_cpuid2(&crate::cpu::cpuid(&v.kvm, 0, 1).unwrap())
        .unwrap();
    v.mem
        .write_slice(&program(irqchip), GuestAddress(0x1000))
        .unwrap();
    let mut sregs = v.vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    v.vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip: 0x1000,
        rflags: 2,
        ..Default::default()
    };
    v.vcpu.set_regs(&regs).unwrap();
    v
}

/// Runs until the guest has reported `n` more counts, and stops at the
/// `in` that follows the last, answered but not yet completed (the state
/// a pause can find a vCPU in); returns the counts. Exits must alternate,
/// a count first: an `in` first means a restored vCPU repeated the one it
/// was captured at.
fn counts(v: &mut Vm, n: usize) -> Vec<u32> {
    let mut out: Vec<u32> = Vec::new();
    let mut asked = 0;
    while asked < n {
        match v.vcpu.run().expect("KVM_RUN") {
            VcpuExit::IoOut(PORT, data) if out.len() == asked => {
                out.push(u32::from_le_bytes(data.try_into().expect("a 4-byte out")))
            }
            VcpuExit::IoIn(ASK, data) if out.len() == asked + 1 => {
                data.copy_from_slice(&(out[asked] * 10).to_le_bytes());
                asked += 1;
            }
            exit => panic!("unexpected exit {exit:?} after counts {out:?}"),
        }
    }
    out
}

/// Captures `v` (its vCPU out of KVM_RUN) to a file at `path`.
fn capture(v: &mut Vm, path: &std::path::Path, irqchip: bool) -> Snapshot {
    settle(&mut v.vcpu).unwrap();
    let plan = CapturePlan::probe(&v.kvm, &v.vm, &v.vcpu, irqchip).unwrap();
    let cpu = VcpuState::capture(&v.vcpu, 0, &plan).unwrap();
    let state = VmState::capture(&v.vm, irqchip, irqchip).unwrap();
    let snap = Snapshot {
        header: Header {
            vcpus: 1,
            memory_size: 1 << 20,
            kernel: "k".into(),
            initramfs: "i".into(),
            guest_init: "g".into(),
        },
        vcpus: vec![cpu],
        vm: state,
        devices: vec![],
        serial: None,
    };
    snap.write(path, &v.mem).unwrap();
    snap
}

/// A new VM restored from the file: memory mapped MAP_PRIVATE, VM state
/// before the vCPU's.
fn restore(path: &std::path::Path, irqchip: bool) -> Vm {
    let loaded = Snapshot::read(path).unwrap();
    let v = vm(loaded.map_memory().unwrap(), irqchip);
    loaded.snapshot.vm.restore(&v.vm).unwrap();
    loaded.snapshot.vcpus[0].restore(&v.vm, &v.vcpu).unwrap();
    v
}

fn counter(mem: &GuestMemoryMmap<()>) -> u32 {
    mem.read_obj(GuestAddress(COUNTER)).unwrap()
}

#[test]
fn a_restored_vm_counts_on_from_where_it_was_captured() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let mut orig = original(false);
    assert_eq!(counts(&mut orig, 5), [1, 2, 3, 4, 5]);
    let snap = capture(&mut orig, &path, false);
    assert!(!snap.vcpus[0].msrs.is_empty(), "no MSRs captured");
    // The original is not disturbed by its capture.
    assert_eq!(counts(&mut orig, 2), [6, 7]);

    let mut clone = restore(&path, false);
    assert_eq!(counts(&mut clone, 3), [6, 7, 8]);
    // ebx sums ten times each count whose `in` completed: 1 to 7 (the
    // clone stopped at the 8th's), the first five of them before capture.
    assert_eq!(clone.vcpu.get_regs().unwrap().rbx, 280);
    assert_eq!(counter(&clone.mem), 8);
    // A second clone of the same file starts at the same point: the first
    // one's writes stayed in its private copy, never reached the file...
    let mut second = restore(&path, false);
    assert_eq!(counts(&mut second, 1), [6]);
    let on_disk = Snapshot::read(&path).unwrap().copy_memory().unwrap();
    assert_eq!(counter(&on_disk), 5);
    // ...nor the original's memory.
    assert_eq!(counter(&orig.mem), 7);
}

#[test]
fn with_an_irqchip_and_a_pit_their_state_travels_too() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let mut orig = original(true);
    assert_eq!(counts(&mut orig, 3), [1, 2, 3]);
    let snap = capture(&mut orig, &path, true);
    assert!(snap.vcpus[0].lapic.is_some());
    let pit = orig.vm.get_pit2().unwrap();
    assert_eq!(
        pit.channels[0].count, 0x3412,
        "the guest programmed the PIT"
    );

    let mut clone = restore(&path, true);
    assert_eq!(clone.vm.get_pit2().unwrap().channels[0].count, 0x3412);
    let restored = VmState::capture(&clone.vm, true, true).unwrap();
    assert_eq!(restored.irqchip, snap.vm.irqchip);
    assert_eq!(
        clone.vcpu.get_lapic().unwrap().regs[..0x100],
        orig.vcpu.get_lapic().unwrap().regs[..0x100]
    );
    assert_eq!(counts(&mut clone, 2), [4, 5]);
}

/// Points `vcpu` (vCPU `id` of `cpus`) at `rip` in real mode, with its
/// CPUID.
pub(crate) fn start_in_real_mode(kvm: &Kvm, vcpu: &VcpuFd, id: u8, cpus: u8, rip: u64) {
    vcpu.set_cpuid2(&crate::cpu::cpuid(kvm, id, cpus).unwrap())
        .unwrap();
    let mut sregs = vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    sregs.ds.base = 0;
    sregs.ds.selector = 0;
    vcpu.set_sregs(&sregs).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip,
        rflags: 2,
        ..Default::default()
    };
    vcpu.set_regs(&regs).unwrap();
}

/// Runs `vcpu` to its next count and answers the `in` after it with ten
/// times the count plus `id` (so that each vCPU's ebx sums answers only it
/// got); returns the count.
fn one_count(vcpu: &mut VcpuFd, id: u32) -> u32 {
    let count = match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(PORT, data) => u32::from_le_bytes(data.try_into().unwrap()),
        exit => panic!("vCPU {id}: expected a count, got {exit:?}"),
    };
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoIn(ASK, data) => data.copy_from_slice(&(count * 10 + id).to_le_bytes()),
        exit => panic!("vCPU {id}: expected the in after count {count}, got {exit:?}"),
    }
    count
}

#[test]
fn each_vcpu_of_a_two_vcpu_vm_comes_back_as_itself() {
    // Both vCPUs run the same loop on one counter, driven in turn from
    // this thread, so the counts interleave deterministically.
    let kvm = Kvm::new().expect("/dev/kvm must be usable for these tests");
    let mem = crate::memory::create(1 << 20).unwrap();
    let vm = kvm.create_vm().unwrap();
    // SAFETY: `mem` outlives `vm` (declared before it, dropped after).
    unsafe { crate::memory::register(&vm, &mem) }.unwrap();
    mem.write_slice(&program(false), GuestAddress(0x1000))
        .unwrap();
    let mut vcpus: Vec<VcpuFd> = (0..2).map(|i| vm.create_vcpu(i).unwrap()).collect();
    for (i, v) in vcpus.iter().enumerate() {
        start_in_real_mode(&kvm, v, i as u8, 2, 0x1000);
    }
    let mut seen = Vec::new();
    for _ in 0..2 {
        for (i, v) in vcpus.iter_mut().enumerate() {
            seen.push(one_count(v, i as u32));
        }
    }
    assert_eq!(seen, [1, 2, 3, 4]);
    let plan = CapturePlan::probe(&kvm, &vm, &vcpus[0], false).unwrap();
    let mut states = Vec::new();
    for (i, v) in vcpus.iter_mut().enumerate() {
        settle(v).unwrap();
        states.push(VcpuState::capture(v, i as u32, &plan).unwrap());
    }
    let snap = Snapshot {
        header: Header {
            vcpus: 2,
            memory_size: 1 << 20,
            ..Default::default()
        },
        vcpus: states,
        vm: VmState::capture(&vm, false, false).unwrap(),
        devices: vec![],
        serial: None,
    };
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    snap.write(&path, &mem).unwrap();

    let loaded = Snapshot::read(&path).unwrap();
    let mem2 = loaded.map_memory().unwrap();
    let vm2 = kvm.create_vm().unwrap();
    // SAFETY: `mem2` outlives `vm2` (declared before it, dropped after).
    unsafe { crate::memory::register(&vm2, &mem2) }.unwrap();
    loaded.snapshot.vm.restore(&vm2).unwrap();
    let mut clones: Vec<VcpuFd> = (0..2).map(|i| vm2.create_vcpu(i).unwrap()).collect();
    for (state, v) in loaded.snapshot.vcpus.iter().zip(&clones) {
        state.restore(&vm2, v).unwrap();
    }
    let mut next = Vec::new();
    for (i, v) in clones.iter_mut().enumerate() {
        next.push(one_count(v, i as u32));
    }
    assert_eq!(next, [5, 6]);
    // ebx: the answers each vCPU's completed `in`s got (counts 1 and 3
    // for vCPU 0, 2 and 4 for vCPU 1); swapped states would swap them.
    let ebx: Vec<u64> = clones.iter().map(|v| v.get_regs().unwrap().rbx).collect();
    assert_eq!(ebx, [10 + 30, 21 + 41]);
}
