//! A VM of the built-in VMM captured while it runs
//! ([`BuiltinVm::capture`]), on real KVM with small counting
//! guests of our own (they run on kvm-pvm too): the VM is assembled and
//! run as `vm::build` does (its vCPU threads confined to their seccomp
//! list, a device with a pause line), so the capture goes through the
//! parked vCPUs' handshake, each vCPU reading its own state on its own
//! thread. The guests go on counting after it; a VM restored from the
//! file counts on from the captured values, each vCPU as itself.

use std::fs::File;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use krun_hypervisor::{AfterCapture, Vm, VmExit};
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{Bus, IrqTrigger};
use crate::devices::balloon::Balloon;
use crate::snapshot::{Header, Snapshot};
use crate::vcpu::Control;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::Interrupt;
use crate::vm::{Built, BuiltinVm, VmmError};

/// Per vCPU: where its program is, where its counter is, and what the
/// counter starts at (far apart, so that swapped vCPUs would show).
const CODE: [u64; 2] = [0x1000, 0x1100];
const COUNTER: [u16; 2] = [0x2000, 0x2010];
const START: [u32; 2] = [0, 1_000_000];
/// The port each count is written to, and the one read after it (the
/// bus answers 0xffffffff there: nothing at that port).
const OUT: u16 = 0x80;
const ASK: u16 = 0x81;
const MEMORY: u64 = 1 << 20;

/// Real mode: increment the counter, `out` it, `in` a number and add it
/// to ebx, and again. ebx is then minus the number of completed `in`s,
/// which a vCPU captured with its last exit not completed (or restored
/// with another's registers) would get wrong.
fn program(counter: u16) -> Vec<u8> {
    let [lo, hi] = counter.to_le_bytes();
    let mut code = vec![0x66, 0xff, 0x06, lo, hi]; // inc dword [counter]
    code.extend_from_slice(&[0x66, 0xa1, lo, hi]); // mov eax, [counter]
    code.extend_from_slice(&[0x66, 0xe7, OUT as u8]); // out OUT, eax
    code.extend_from_slice(&[0x66, 0xe5, ASK as u8]); // in eax, ASK
    code.extend_from_slice(&[0x66, 0x01, 0xc3]); // add ebx, eax
    code.extend_from_slice(&[0xeb, 0xec]); // jmp back to the inc (-20)
    code
}

/// Points vCPU `id` of `cpus` at its program in real mode, runnable
/// (with an in-kernel LAPIC an AP would wait for a SIPI).
fn start_at_program(kvm: &Kvm, vcpu: &VcpuFd, id: usize, cpus: u8) {
    crate::snapshot::kvm_tests::start_in_real_mode(kvm, vcpu, id as u8, cpus, CODE[id]);
    vcpu.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .unwrap();
}

/// A running VM of two vCPUs counting, built as `vm::build` builds one
/// (the same VM set-up, irqchip and PIT; the same assembly and run), with
/// a serial port and a balloon behind a pause line; and its memory.
fn counting_vm() -> (BuiltinVm, GuestMemoryMmap<()>) {
    let kvm = Kvm::new().expect("/dev/kvm must be usable for these tests");
    let vm = crate::vm::create_vm(&kvm)
        .unwrap_or_else(|e| panic!("this host's KVM cannot make the VMM's VM (irqchip, PIT): {e}"));
    let mem = crate::memory::create(MEMORY).unwrap();
    // SAFETY: the mapping is shared by `mem`'s clones, one of which the
    // VM keeps for as long as its vCPUs run.
    unsafe { crate::memory::register(&vm, &mem) }.unwrap();
    let mut vcpus = Vec::new();
    for id in 0..2 {
        mem.write_slice(&program(COUNTER[id]), GuestAddress(CODE[id]))
            .unwrap();
        mem.write_obj(START[id], GuestAddress(COUNTER[id].into()))
            .unwrap();
        let vcpu = vm.create_vcpu(id as u64).unwrap();
        start_at_program(&kvm, &vcpu, id, 2);
        vcpus.push(vcpu);
    }
    let control = Arc::new(Control::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let serial = vm_superio::Serial::new(
        IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap()),
        tempfile::tempfile().unwrap(),
    );
    let mut balloon = MmioTransport::new(
        Box::new(Balloon::new()),
        mem.clone(),
        Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap())),
        control.stop.try_clone().unwrap(),
    )
    .unwrap();
    balloon.enable_pause().unwrap();
    let bus = Arc::new(Bus::new(
        serial,
        vec![(crate::layout::VIRTIO_MMIO_BASE, balloon)],
    ));
    let running = Built::assemble(&kvm, vm, mem.clone(), bus, control, vcpus)
        .unwrap()
        .run()
        .unwrap();
    (running, mem)
}

fn counters(mem: &GuestMemoryMmap<()>) -> [u32; 2] {
    [0, 1].map(|id| mem.read_obj(GuestAddress(COUNTER[id].into())).unwrap())
}

/// Waits (10 s at most) until every counter in `mem` is past `at`.
fn counting_past(mem: &GuestMemoryMmap<()>, at: [u32; 2], what: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = counters(mem);
        if now[0] > at[0] && now[1] > at[1] {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the counters stayed at {now:?}, not past {at:?}"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

fn header() -> Header {
    Header {
        vcpus: 2,
        memory_size: MEMORY,
        ..Default::default()
    }
}

/// Restores `path` into a new VM (the restore order of `vm::build`) and
/// runs each vCPU here, by hand: its first count must be the one it was
/// at (the captured counter, or the next one), ebx must match the count,
/// and it counts on. Returns the counts each vCPU wrote first.
fn restored_counts(path: &std::path::Path, captured: [u32; 2]) -> [u32; 2] {
    let loaded = Snapshot::read(path).unwrap();
    let kvm = Kvm::new().unwrap();
    let vm = crate::vm::create_vm(&kvm).unwrap();
    let mem = loaded.map_memory().unwrap();
    // SAFETY: `mem` outlives the vCPUs run below (dropped after them, at
    // the end of this function).
    unsafe { crate::memory::register(&vm, &mem) }.unwrap();
    assert_eq!(counters(&mem), captured);
    loaded.snapshot.vm.restore(&vm).unwrap();
    let mut firsts = [0; 2];
    for (id, state) in loaded.snapshot.vcpus.iter().enumerate() {
        let mut vcpu = vm.create_vcpu(id as u64).unwrap();
        state.restore(&vm, &vcpu).unwrap();
        let first = first_count(&mut vcpu, id);
        assert!(
            first == captured[id] || first == captured[id] + 1,
            "vCPU {id} resumed at count {first}, captured at {}",
            captured[id]
        );
        for more in 1..=3 {
            answer_ask(&mut vcpu, id);
            assert_eq!(next_count(&mut vcpu, id), first + more, "vCPU {id}");
        }
        firsts[id] = first;
    }
    firsts
}

/// Runs a restored `vcpu` to its first count: a vCPU kicked out of the
/// guest right before its `in` executes that first (a vCPU parked after
/// its `in` exit had it completed by the capture: the same here, since
/// every answer is the same).
fn first_count(vcpu: &mut VcpuFd, id: usize) -> u32 {
    let count = match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(OUT, data) => Some(u32::from_le_bytes(data.try_into().unwrap())),
        VcpuExit::IoIn(ASK, data) => {
            data.fill(0xff);
            None
        }
        exit => panic!("vCPU {id}: expected a count or an in, got {exit:?}"),
    };
    match count {
        Some(count) => checked(vcpu, id, count),
        None => next_count(vcpu, id),
    }
}

/// Runs `vcpu` to its next `out` and returns the count, checking ebx.
fn next_count(vcpu: &mut VcpuFd, id: usize) -> u32 {
    let count = match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoOut(OUT, data) => u32::from_le_bytes(data.try_into().unwrap()),
        exit => panic!("vCPU {id}: expected a count, got {exit:?}"),
    };
    checked(vcpu, id, count)
}

/// `count`, after checking ebx: one -1 per `in` completed before it.
fn checked(vcpu: &VcpuFd, id: usize, count: u32) -> u32 {
    let completed = count - START[id] - 1;
    let ebx = vcpu.get_regs().unwrap().rbx as u32;
    assert_eq!(
        ebx.wrapping_add(completed),
        0,
        "vCPU {id}: ebx {ebx:#x} at count {count}"
    );
    count
}

/// Runs `vcpu` to the `in` after a count and answers it as the bus does.
fn answer_ask(vcpu: &mut VcpuFd, id: usize) {
    match vcpu.run().expect("KVM_RUN") {
        VcpuExit::IoIn(ASK, data) => data.fill(0xff),
        exit => panic!("vCPU {id}: expected the in after a count, got {exit:?}"),
    }
}

#[test]
fn a_running_vm_is_captured_goes_on_and_its_clone_counts_on_from_the_capture() {
    // The vCPU threads are confined: no other test's forbidden call may
    // land in the process's record meanwhile.
    let _turn = crate::seccomp::take_turn();
    let (mut vm, mem) = counting_vm();
    counting_past(&mem, START.map(|s| s + 100), "before the capture");

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let file = File::create_new(&path).unwrap();
    vm.capture(&file, &path, header(), AfterCapture::GoOn)
        .unwrap_or_else(|e| panic!("{}", krun_hypervisor::error_chain(&e)));
    assert_eq!(crate::seccomp::violation(), None);
    let captured = counters(&Snapshot::read(&path).unwrap().copy_memory().unwrap());
    assert!(
        captured[0] > START[0] + 100 && captured[1] > START[1] + 100,
        "captured at {captured:?}"
    );
    // The original goes on, from where it was.
    assert_eq!(vm.try_wait().unwrap(), None, "the VM ended");
    counting_past(&mem, captured, "after the capture");

    // A clone counts on from the captured counts, not from the start.
    restored_counts(&path, captured);

    // A VM paused before a capture stays paused after it.
    vm.pause().unwrap();
    let before = counters(&mem);
    let again = dir.path().join("again");
    let file = File::create_new(&again).unwrap();
    vm.capture(&file, &again, header(), AfterCapture::GoOn)
        .unwrap();
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(counters(&mem), before, "the paused VM ran");
    restored_counts(&again, before);
    vm.resume().unwrap();
    counting_past(&mem, before, "resumed after the second capture");

    // A capture that ends the VM: stopped, its last counts in the file.
    let last = dir.path().join("last");
    let file = File::create_new(&last).unwrap();
    vm.capture(&file, &last, header(), AfterCapture::End)
        .unwrap();
    let at_end = counters(&mem);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(counters(&mem), at_end, "the ended VM ran on");
    assert_eq!(vm.wait().unwrap(), VmExit::GuestStopped);
    restored_counts(&last, at_end);
}

#[test]
fn a_capture_that_fails_leaves_the_vm_running() {
    let _turn = crate::seccomp::take_turn();
    let (mut vm, mem) = counting_vm();
    counting_past(&mem, START, "before the capture");
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    File::create_new(&path).unwrap();
    // Opened read-only: the capture parks everything, then cannot write.
    let read_only = File::open(&path).unwrap();
    let err = vm
        .capture(&read_only, &path, header(), AfterCapture::End)
        .expect_err("a capture into a read-only file");
    assert!(matches!(err, VmmError::Snapshot(_)), "{err:?}");
    let after = counters(&mem);
    counting_past(&mem, after, "after the failed capture");
    assert_eq!(vm.try_wait().unwrap(), None, "the VM ended");
    vm.kill();
}

/// The VMM process's main thread captures under its own filter
/// (seccomp `Kind::Main`): a capture that goes on, then one that ends the
/// VM, with no forbidden call, each file a VM that restores.
#[test]
fn the_main_thread_captures_under_its_filter() {
    let _turn = crate::seccomp::take_turn();
    let (vm, mem) = counting_vm();
    counting_past(&mem, START, "before the capture");
    let dir = tempfile::tempdir().unwrap();
    let (first, last) = (dir.path().join("first"), dir.path().join("last"));
    let files = [
        File::create_new(&first).unwrap(),
        File::create_new(&last).unwrap(),
    ];
    let (captured_tx, captured) = std::sync::mpsc::channel();
    let (go_tx, go) = std::sync::mpsc::channel::<()>();
    let main = std::thread::spawn(move || {
        let mut vm = vm;
        vm.confine_waiter().unwrap();
        let r = vm.capture(&files[0], Path::new("first"), header(), AfterCapture::GoOn);
        captured_tx.send(r.map_err(|e| e.to_string())).unwrap();
        go.recv().unwrap();
        let r = vm.capture(&files[1], Path::new("last"), header(), AfterCapture::End);
        (r.map_err(|e| e.to_string()), vm.wait().unwrap())
    });
    captured.recv().unwrap().unwrap();
    assert_eq!(crate::seccomp::violation(), None);
    let at_first = counters(&Snapshot::read(&first).unwrap().copy_memory().unwrap());
    counting_past(&mem, at_first, "after the capture that goes on");
    go_tx.send(()).unwrap();
    let (r, exit) = main.join().unwrap();
    r.unwrap();
    assert_eq!(exit, VmExit::GuestStopped);
    assert_eq!(crate::seccomp::violation(), None);
    let at_end = counters(&mem);
    restored_counts(&last, at_end);
}
