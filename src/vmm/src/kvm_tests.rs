//! KVM tests with small guest programs of our own: vCPU set-up, guest
//! memory, port I/O and MMIO exits, through the same run loop and bus as
//! a real VM. They run wherever /dev/kvm runs simple guest code — also
//! under kvm-pvm, which cannot boot a Linux guest — and fail when /dev/kvm
//! is missing.

use std::io::Read;
use std::sync::Arc;

use krun_hypervisor::VmExit;
use kvm_bindings::kvm_segment;
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{Bus, IrqTrigger};
use crate::vcpu::Control;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::{Activation, DeviceError, Interrupt, VirtioDevice};

struct Guest {
    _kvm: Kvm,
    _vm: VmFd,
    vcpu: VcpuFd,
    mem: GuestMemoryMmap<()>,
}

/// A VM without interrupt controllers (so HLT exits to us) and `mib` MiB.
fn guest(mib: u64) -> Guest {
    let kvm = Kvm::new().expect("/dev/kvm must be usable for these tests");
    let vm = kvm.create_vm().unwrap();
    let mem = crate::memory::create(mib << 20).unwrap();
    // SAFETY: the mapping is owned by `mem`, which lives in the Guest
    // together with the VM.
    unsafe { crate::memory::register(&vm, &mem) }.unwrap();
    let vcpu = vm.create_vcpu(0).unwrap();
    Guest {
        _kvm: kvm,
        _vm: vm,
        vcpu,
        mem,
    }
}

struct Magic;

impl VirtioDevice for Magic {
    fn device_type(&self) -> u32 {
        7
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![8]
    }
    fn features(&self) -> u64 {
        0
    }
    fn read_config(&self, _: u64, data: &mut [u8]) {
        data.fill(0)
    }
    fn activate(&mut self, _: Activation) -> Result<(), DeviceError> {
        Ok(())
    }
}

/// Runs the guest to its HLT through the real run loop; returns the exit
/// and what it wrote to the serial port.
fn run(g: Guest) -> (VmExit, String, GuestMemoryMmap<()>) {
    let log = tempfile::NamedTempFile::new().unwrap();
    let serial = vm_superio::Serial::new(
        IrqTrigger(EventFd::new(EFD_NONBLOCK).unwrap()),
        log.reopen().unwrap(),
    );
    let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
    let t = MmioTransport::new(
        Box::new(Magic),
        g.mem.clone(),
        irq,
        EventFd::new(EFD_NONBLOCK).unwrap(),
    )
    .unwrap();
    let bus = Bus::new(serial, vec![(crate::layout::VIRTIO_MMIO_BASE, t)]);
    let control = Control::new(EventFd::new(EFD_NONBLOCK).unwrap());
    crate::vcpu::run(g.vcpu, 0, &bus, &control);
    let exit = control.exit.lock().unwrap().clone().unwrap();
    let mut out = String::new();
    log.reopen().unwrap().read_to_string(&mut out).unwrap();
    (exit, out, g.mem)
}

/// Puts `code` at `rip`, starts the vCPU there with its stack at `rsp`
/// (flags: only the reserved bit) and runs it as [`run`] does.
fn run_code(g: Guest, code: &[u8], rip: u64, rsp: u64) -> (VmExit, String, GuestMemoryMmap<()>) {
    g.mem.write_slice(code, GuestAddress(rip)).unwrap();
    let regs = kvm_bindings::kvm_regs {
        rip,
        rsp,
        rflags: 2,
        ..Default::default()
    };
    g.vcpu.set_regs(&regs).unwrap();
    run(g)
}

#[test]
fn real_mode_guest_writes_to_the_serial_port() {
    let g = guest(1);
    // mov dx, 0x3f8; mov al, 'K'; out dx, al; in al, 0x99 (nothing there:
    // 0xff); out dx, al... then a newline and hlt.
    let code = [0xba, 0xf8, 0x03, 0xb0, b'K', 0xee, 0xb0, b'\n', 0xee, 0xf4];
    let mut sregs = g.vcpu.get_sregs().unwrap();
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    g.vcpu.set_sregs(&sregs).unwrap();
    let (exit, out, _) = run_code(g, &code, 0x1000, 0);
    assert_eq!(exit, VmExit::GuestStopped);
    assert_eq!(out, "K\n");
}

/// Sets up 64-bit long mode: the first 4 GiB identity-mapped with 2 MiB
/// pages (so the MMIO gap is reachable), a 64-bit code segment.
fn long_mode(g: &Guest) {
    let (pml4, pdpt) = (0x9000u64, 0xa000u64);
    g.mem.write_obj(pdpt | 0x3, GuestAddress(pml4)).unwrap();
    for gib in 0..4u64 {
        let pd = 0xb000 + gib * 0x1000;
        g.mem
            .write_obj(pd | 0x3, GuestAddress(pdpt + gib * 8))
            .unwrap();
        for i in 0..512u64 {
            g.mem
                .write_obj(((gib << 30) | (i << 21)) | 0x83, GuestAddress(pd + i * 8))
                .unwrap();
        }
    }
    let gdt: [u64; 3] = [0, 0x00af_9b00_0000_ffff, 0x00cf_9300_0000_ffff];
    for (i, d) in gdt.iter().enumerate() {
        g.mem
            .write_obj(*d, GuestAddress(0x500 + i as u64 * 8))
            .unwrap();
    }
    let mut sregs = g.vcpu.get_sregs().unwrap();
    let code = kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector: 0x8,
        type_: 0xb,
        present: 1,
        dpl: 0,
        db: 0,
        s: 1,
        l: 1,
        g: 1,
        avl: 0,
        unusable: 0,
        padding: 0,
    };
    let data = kvm_segment {
        selector: 0x10,
        type_: 0x3,
        l: 0,
        db: 1,
        ..code
    };
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.ss = data;
    sregs.gdt.base = 0x500;
    sregs.gdt.limit = 23;
    sregs.cr3 = pml4;
    sregs.cr4 = 0x20; // PAE
    sregs.cr0 = 0x8000_0011; // PG, ET, PE
    sregs.efer = 0x500; // LME, LMA
    g.vcpu.set_sregs(&sregs).unwrap();
}

#[test]
fn long_mode_guest_uses_memory_above_1mib_and_mmio() {
    let g = guest(4);
    long_mode(&g);
    let mut code = Vec::new();
    code.extend_from_slice(&[0x48, 0xb8]); // mov rax, imm64
    code.extend_from_slice(&0x1122_3344_5566_7788u64.to_le_bytes());
    code.extend_from_slice(&[0x48, 0x89, 0x04, 0x25, 0x00, 0x00, 0x20, 0x00]); // mov [0x200000], rax
    code.extend_from_slice(&[0x48, 0xbb]); // mov rbx, imm64: the virtio-mmio window
    code.extend_from_slice(&crate::layout::VIRTIO_MMIO_BASE.to_le_bytes());
    code.extend_from_slice(&[0x8b, 0x03]); // mov eax, [rbx]: MagicValue "virt"
    code.extend_from_slice(&[0x66, 0xba, 0xf8, 0x03]); // mov dx, 0x3f8
    code.extend_from_slice(&[0xee]); // out dx, al: 'v'
    code.extend_from_slice(&[0xc1, 0xe8, 0x08, 0xee]); // shr eax, 8; out: 'i'
    code.extend_from_slice(&[0xe4, 0x99]); // in al, 0x99: nothing there
    code.extend_from_slice(&[0x3c, 0xff, 0x75, 0x04]); // cmp al, 0xff; jne +4
    code.extend_from_slice(&[0xb0, b'!', 0xee]); // mov al, '!'; out
    code.extend_from_slice(&[0x90]);
    code.extend_from_slice(&[0xf4]); // hlt
    let (exit, out, mem) = run_code(g, &code, 0x10_0000, 0x8000);
    assert_eq!(exit, VmExit::GuestStopped);
    assert_eq!(out, "vi!");
    assert_eq!(
        mem.read_obj::<u64>(GuestAddress(0x20_0000)).unwrap(),
        0x1122_3344_5566_7788
    );
}

#[test]
fn a_guest_that_faults_ends_the_vm_with_a_typed_exit() {
    let g = guest(1);
    long_mode(&g);
    // Jump to an address with no page mapped: the fault has no IDT to go
    // to, so the guest triple-faults, which KVM reports as a shutdown.
    let code = [0x48, 0xb8, 0, 0, 0, 0, 0x80, 0, 0, 0, 0xff, 0xe0]; // mov rax, 0x80_0000_0000; jmp rax
    let (exit, _, _) = run_code(g, &code, 0x1000, 0);
    assert!(
        matches!(exit, VmExit::GuestStopped | VmExit::VmmFailed { .. }),
        "{exit:?}"
    );
}
