//! Per-thread seccomp allowlists for the built-in VMM's threads, and the
//! report of a forbidden system call.
//!
//! Every thread of the VMM process (`process.rs`) runs under a list of
//! its kind, stacked on the deny-lists the process inherits from the
//! monitor (or the shim) and from its own spawn (NNP is already set):
//!
//! - the vCPU threads ([`Kind::Vcpu`]), confined at the top of the thread
//!   before the first KVM_RUN (`vcpu.rs` `confine`): ioctl only with the
//!   requests a running vCPU makes (KVM_RUN; FIONBIO and the tap's flags
//!   and offloads when the guest activates the console or a network
//!   card; the KVM_GET_* reads of its own state when a capture asks it
//!   while parked), eventfd and console writes, eventfd copies at activation,
//!   locks, the allocator, the kick signal's return and the thread's end;
//!   openat fails with EACCES unreported (glibc's heap trim probes a
//!   /proc file once per process, and does without);
//! - the VM's spawner ([`Kind::Spawner`], `spawner.rs`), the one thread
//!   that starts device workers, so that no worker inherits a vCPU's
//!   filter: the union of the workers' lists and what starting a thread
//!   takes (clone with pthread_create's flags only; clone3, whose flags a
//!   filter cannot read, answered ENOSYS so that glibc falls back to
//!   clone);
//! - the device workers ([`Kind::Console`], [`Kind::Net`],
//!   [`Kind::Balloon`], [`Kind::Fs`]), confined first thing in the worker
//!   ([`confine_worker`], from `virtio/worker.rs`) on top of the
//!   spawner's list they inherit.
//!
//! - the process's main thread ([`Kind::Main`]), once it has started the
//!   spawner and the vCPUs (they would inherit its list): it only waits for
//!   the VM's end, kicks and joins the vCPUs, reports and exits.
//!
//! So a vCPU thread, the spawner and the main thread each run under one
//! filter more than the process started with, a worker under two more. The lists were measured (strace and
//! a logging filter in the nested test host, through boot, exec, console
//! output, the network, pause and resume, the balloon and kill), not
//! guessed.
//!
//! A system call outside the list traps (`SECCOMP_RET_TRAP`): the SIGSYS
//! handler, installed once, records the first violation, writes a
//! pre-formatted line to stderr with async-signal-safe calls only, makes
//! the call fail with EPERM instead of running it, and writes the thread's
//! stop eventfd so that every device worker of the VM ends. The VM then
//! reports itself failed with "the VMM's virtio-fs worker made a forbidden
//! system call: mkdirat (258)" ([`violation`], read by `vm.rs`), which the
//! runtime turns into a stopped container with that error: never a hang.
//! A vCPU checks the record ([`violated`], one atomic load) after every
//! exit and while it is parked, and ends the VM with it at once.
//!
//! The short `virtio-fs-import` thread runs under the virtio-fs list too
//! (there is no VM to stop yet: its forbidden call fails the import).
//! The record is process-wide: one VM per VMM process. The filters are per thread, so
//! they are the same wherever the VMM runs.
//!
//! Test-only knob (as Firecracker's custom-filter tests): the environment
//! variable `KRUN_OCI_SECCOMP_DROP=<kind>:<syscall>` (kind `console`,
//! `net`, `balloon`, `fs`, `vcpu` or `spawner`) removes one system call
//! from one kind's list, so a test can prove the report works. It only
//! ever narrows a filter. Dropping `write` or `rt_sigreturn`, which the
//! handler itself makes, ends the whole process with SIGSYS instead,
//! without the report; so does a trap while SIGSYS is blocked (glibc
//! blocks every signal around clone).

use std::cell::Cell;
use std::collections::BTreeMap;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Once;

use seccompiler::{
    sock_filter, BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition,
    SeccompFilter, SeccompRule, TargetArch,
};

/// The environment variable of the test-only knob.
pub const DROP_ENV: &str = "KRUN_OCI_SECCOMP_DROP";

/// A kind of VMM thread with an allowlist of its own.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Console = 1,
    Net = 2,
    Balloon = 3,
    Fs = 4,
    Vcpu = 5,
    Spawner = 6,
    Main = 7,
}

impl Kind {
    pub const ALL: [Kind; 7] = [
        Kind::Console,
        Kind::Net,
        Kind::Balloon,
        Kind::Fs,
        Kind::Vcpu,
        Kind::Spawner,
        Kind::Main,
    ];
    /// The device workers' kinds, whose lists the spawner's joins.
    const WORKERS: [Kind; 4] = [Kind::Console, Kind::Net, Kind::Balloon, Kind::Fs];

    /// The kind of a device worker, from its thread's name.
    pub fn of_thread(name: &str) -> Option<Kind> {
        match name {
            "virtio-console" => Some(Kind::Console),
            "virtio-net" => Some(Kind::Net),
            "virtio-balloon" => Some(Kind::Balloon),
            n if n.starts_with("virtio-fs-") => Some(Kind::Fs),
            _ => None,
        }
    }

    /// The name the drop knob uses.
    pub fn key(self) -> &'static str {
        match self {
            Kind::Console => "console",
            Kind::Net => "net",
            Kind::Balloon => "balloon",
            Kind::Fs => "fs",
            Kind::Vcpu => "vcpu",
            Kind::Spawner => "spawner",
            Kind::Main => "main",
        }
    }

    /// What the report calls the thread.
    fn label(self) -> &'static str {
        match self {
            Kind::Console => "virtio-console worker",
            Kind::Net => "virtio-net worker",
            Kind::Balloon => "virtio-balloon worker",
            Kind::Fs => "virtio-fs worker",
            Kind::Vcpu => "vCPU",
            Kind::Spawner => "worker spawner",
            Kind::Main => "main thread",
        }
    }

    fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| *k as u8 == v)
    }

    /// The system calls this kind may make.
    pub fn allowed(self) -> Vec<(&'static str, i64)> {
        let mut v: Vec<_> = match self {
            Kind::Vcpu => [LIVING, VCPU].concat(),
            Kind::Main => [LIVING, MAIN].concat(),
            Kind::Spawner => {
                let mut v: Vec<_> = Kind::WORKERS.iter().flat_map(|k| k.allowed()).collect();
                v.extend_from_slice(SPAWNER);
                v
            }
            _ => [LIVING, COMMON].concat(),
        };
        v.extend_from_slice(match self {
            Kind::Console => CONSOLE,
            Kind::Net => NET,
            Kind::Fs => FS,
            Kind::Balloon | Kind::Vcpu | Kind::Spawner | Kind::Main => &[],
        });
        v.sort_by_key(|(_, n)| *n);
        v.dedup_by_key(|(_, n)| *n);
        v
    }
}

/// Lists `(name, number)` pairs of system calls.
macro_rules! sys {
    ($($name:ident),* $(,)?) => {
        &[$((stringify!($name), libc::$name)),*]
    };
}

/// What every worker does beyond [`LIVING`]: its epoll loop, eventfd
/// reads, descriptor flags, sleeps and clocks.
const COMMON: &[(&str, i64)] = sys!(
    SYS_read,
    SYS_readv,
    SYS_epoll_create1,
    SYS_gettimeofday,
    SYS_time,
    SYS_epoll_wait,
    SYS_epoll_pwait,
    SYS_epoll_ctl,
    SYS_sched_getaffinity,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_fcntl,
    SYS_munlock,
    SYS_rseq,
);
/// The console's socket.
const CONSOLE: &[(&str, i64)] = sys!(
    SYS_sendto,
    SYS_recvfrom,
    SYS_sendmsg,
    SYS_recvmsg,
    SYS_shutdown,
);
/// The tap.
const NET: &[(&str, i64)] = sys!(SYS_sendto, SYS_recvfrom, SYS_sendmsg, SYS_recvmsg);
/// fuse-backend-rs's passthrough file system (virtiofsd's list, less what
/// a thread that starts nothing and listens on nothing needs).
const FS: &[(&str, i64)] = sys!(
    SYS_pread64,
    SYS_pwrite64,
    SYS_preadv,
    SYS_pwritev,
    SYS_preadv2,
    SYS_pwritev2,
    SYS_open,
    SYS_openat,
    SYS_openat2,
    SYS_fstat,
    SYS_newfstatat,
    SYS_statx,
    SYS_fstatfs,
    SYS_statfs,
    SYS_getdents64,
    SYS_readlinkat,
    SYS_mkdirat,
    SYS_mknodat,
    SYS_symlinkat,
    SYS_linkat,
    SYS_unlinkat,
    SYS_renameat,
    SYS_renameat2,
    SYS_fchownat,
    SYS_fchown,
    SYS_fchmod,
    SYS_fchmodat,
    SYS_utimensat,
    SYS_ftruncate,
    SYS_fallocate,
    SYS_fsync,
    SYS_fdatasync,
    SYS_syncfs,
    SYS_lseek,
    SYS_copy_file_range,
    SYS_fadvise64,
    SYS_flock,
    SYS_dup,
    SYS_dup3,
    SYS_umask,
    SYS_unshare,
    SYS_fchdir,
    SYS_chdir,
    SYS_setresuid,
    SYS_setresgid,
    SYS_setfsuid,
    SYS_setfsgid,
    SYS_capget,
    SYS_capset,
    SYS_prctl,
    SYS_getuid,
    SYS_geteuid,
    SYS_getgid,
    SYS_getegid,
    SYS_faccessat,
    SYS_faccessat2,
    SYS_fgetxattr,
    SYS_fsetxattr,
    SYS_flistxattr,
    SYS_fremovexattr,
    SYS_getxattr,
    SYS_setxattr,
    SYS_listxattr,
    SYS_removexattr,
    SYS_lgetxattr,
    SYS_lsetxattr,
    SYS_llistxattr,
    SYS_lremovexattr,
    SYS_name_to_handle_at,
    SYS_open_by_handle_at,
    SYS_close_range,
    SYS_eventfd2,
);
/// What a vCPU thread does once it runs the guest, with [`LIVING`]: KVM_RUN
/// (ioctl, by request number: [`VCPU_IOCTLS`]), the exits it serves on the way
/// (the serial console's write, interrupts and notifications as eventfd
/// writes, device activation: eventfd copies, the tap's flags and
/// offloads, handing the worker to the spawner and waiting for it), locks
/// and the pause condvar, the kick signal's return, the allocator, the
/// SIGSYS handler's own calls, and the thread's end (the last vCPU drops
/// the devices: their descriptors, threads and guest memory).
const VCPU: &[(&str, i64)] = sys!(SYS_ioctl, SYS_read, SYS_fcntl, SYS_sched_getaffinity);
/// What every VMM thread does (a vCPU, the main thread, a worker): the
/// console's and the report's writes, closing descriptors, locks and
/// condvars, the allocator, signals' return (the kick, SIGSYS), kicking
/// (tgkill), and their end.
const LIVING: &[(&str, i64)] = sys!(
    SYS_write,
    SYS_writev,
    SYS_close,
    SYS_futex,
    SYS_brk,
    SYS_mmap,
    SYS_munmap,
    SYS_mremap,
    SYS_mprotect,
    SYS_madvise,
    SYS_rt_sigprocmask,
    SYS_rt_sigreturn,
    SYS_sigaltstack,
    SYS_restart_syscall,
    SYS_sched_yield,
    SYS_clock_gettime,
    SYS_gettid,
    SYS_getpid,
    SYS_tgkill,
    SYS_getrandom,
    SYS_exit,
    SYS_exit_group,
);
/// The ioctls a running vCPU makes: KVM_RUN, the tap's at the network
/// card's activation (a DRIVER_OK write), and the reads of its own state
/// when a capture asks it while it is parked (`vcpu.rs` `Control::park`,
/// `snapshot::VcpuState::capture`, after `snapshot::settle`'s KVM_RUN):
/// each a read of this vCPU only; what needs /dev/kvm or the VM
/// (KVM_GET_MSR_INDEX_LIST, KVM_CHECK_EXTENSION) is probed before the
/// thread is confined (`snapshot::CapturePlan`).
const VCPU_IOCTLS: &[(&str, u64)] = &[
    ("KVM_RUN", KVM_RUN),
    ("TUNSETOFFLOAD", libc::TUNSETOFFLOAD),
    ("TUNSETVNETHDRSZ", libc::TUNSETVNETHDRSZ),
    ("TUNGETIFF", libc::TUNGETIFF),
    ("FIONBIO", libc::FIONBIO),
    ("KVM_GET_TSC_KHZ", kvm_io(0xa3)),
    (
        "KVM_GET_MP_STATE",
        kvm_ior::<kvm_bindings::kvm_mp_state>(0x98),
    ),
    ("KVM_GET_REGS", kvm_ior::<kvm_bindings::kvm_regs>(0x81)),
    ("KVM_GET_SREGS", kvm_ior::<kvm_bindings::kvm_sregs>(0x83)),
    ("KVM_GET_FPU", kvm_ior::<kvm_bindings::kvm_fpu>(0x8c)),
    ("KVM_GET_XSAVE", kvm_ior::<kvm_bindings::kvm_xsave>(0xa4)),
    ("KVM_GET_XCRS", kvm_ior::<kvm_bindings::kvm_xcrs>(0xa6)),
    (
        "KVM_GET_DEBUGREGS",
        kvm_ior::<kvm_bindings::kvm_debugregs>(0xa1),
    ),
    (
        "KVM_GET_LAPIC",
        kvm_ior::<kvm_bindings::kvm_lapic_state>(0x8e),
    ),
    ("KVM_GET_CPUID2", kvm_iowr::<kvm_bindings::kvm_cpuid2>(0x91)),
    ("KVM_GET_MSRS", kvm_iowr::<kvm_bindings::kvm_msrs>(0x88)),
    (
        "KVM_GET_VCPU_EVENTS",
        kvm_ior::<kvm_bindings::kvm_vcpu_events>(0x9f),
    ),
];
/// `_IO(KVMIO, 0x80)`.
const KVM_RUN: u64 = 0xae80;
/// The type of KVM's ioctls.
const KVMIO: u64 = 0xae;
/// `_IO(KVMIO, nr)`.
const fn kvm_io(nr: u64) -> u64 {
    (KVMIO << 8) | nr
}
/// `_IOR(KVMIO, nr, T)`: the kernel writes a `T`.
const fn kvm_ior<T>(nr: u64) -> u64 {
    (2 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | kvm_io(nr)
}
/// `_IOWR(KVMIO, nr, T)`: the kernel reads and writes a `T`.
const fn kvm_iowr<T>(nr: u64) -> u64 {
    (3 << 30) | ((std::mem::size_of::<T>() as u64) << 16) | kvm_io(nr)
}
/// What the VMM process's main thread does once the vCPUs run (the
/// `process` module), beyond [`LIVING`]: it waits for the VM's end or a
/// capture request from its parent (poll), kicks the vCPUs out of
/// KVM_RUN (tgkill) and joins them (sleeping between kicks), writes the
/// reason to its stderr, and exits. A capture request (recvmsg, one
/// descriptor: the file, opened by the parent) is answered (sendto) once
/// the VM-wide KVM state is read ([`MAIN_IOCTLS`]) and the file written
/// by offset (pwrite64) and sized (ftruncate). `fcntl(F_GETFD)` only:
/// Rust's I/O-safety check of a descriptor it closes, in builds with
/// debug assertions (the tests'). Nothing else: it opens, reads, maps
/// nothing new of the host's, starts nothing.
const MAIN: &[(&str, i64)] = sys!(
    SYS_fcntl,
    SYS_clock_nanosleep,
    SYS_nanosleep,
    SYS_poll,
    SYS_ppoll,
    SYS_recvmsg,
    SYS_sendto,
    SYS_ioctl,
    SYS_pwrite64,
    SYS_ftruncate,
);
/// The VM-wide reads of a capture on the main thread
/// (`snapshot::VmState::capture`): the clock (after asking whether KVM can
/// set it back), the three interrupt controllers and the PIT. Reads only.
const MAIN_IOCTLS: &[(&str, u64)] = &[
    ("KVM_CHECK_EXTENSION", kvm_io(0x03)),
    (
        "KVM_GET_CLOCK",
        kvm_ior::<kvm_bindings::kvm_clock_data>(0x7c),
    ),
    (
        "KVM_GET_IRQCHIP",
        kvm_iowr::<kvm_bindings::kvm_irqchip>(0x62),
    ),
    (
        "KVM_GET_PIT2",
        kvm_ior::<kvm_bindings::kvm_pit_state2>(0x9f),
    ),
];
/// What starting a thread takes, beyond the workers' lists: glibc's
/// pthread_create (the stack, its guard page, clone, the new thread's
/// robust list and rseq), Rust's thread start (its name, the signal
/// stack), and the worker installing its own filter (seccomp: it can only
/// narrow). clone3 is not here: its flags live in memory a filter cannot
/// read, so the filter answers it ENOSYS ([`quietly_fail`]) and
/// glibc falls back to clone, whose flags [`THREAD_CLONE_FLAGS`] pins
/// (Firecracker's choice; Cloud Hypervisor allows clone3 instead). Not a
/// trap: glibc blocks every signal around clone, and a trap while SIGSYS
/// is blocked kills the process.
const SPAWNER: &[(&str, i64)] = sys!(
    SYS_clone,
    SYS_mmap,
    SYS_mprotect,
    SYS_munmap,
    SYS_madvise,
    SYS_set_robust_list,
    SYS_rseq,
    SYS_sigaltstack,
    SYS_prctl,
    SYS_sched_getaffinity,
    SYS_seccomp,
);
/// The clone flags of glibc's pthread_create: a thread in this process,
/// sharing everything (no new process, no namespace).
const THREAD_CLONE_FLAGS: u64 = (libc::CLONE_VM
    | libc::CLONE_FS
    | libc::CLONE_FILES
    | libc::CLONE_SYSVSEM
    | libc::CLONE_SIGHAND
    | libc::CLONE_THREAD
    | libc::CLONE_SETTLS
    | libc::CLONE_PARENT_SETTID
    | libc::CLONE_CHILD_CLEARTID) as u64;
/// Names of calls no list allows, for the report.
const OTHERS: &[(&str, i64)] = sys!(
    SYS_ioctl,
    SYS_execve,
    SYS_execveat,
    SYS_clone,
    SYS_clone3,
    SYS_fork,
    SYS_vfork,
    SYS_socket,
    SYS_connect,
    SYS_bind,
    SYS_listen,
    SYS_accept4,
    SYS_kill,
    SYS_getppid,
    SYS_epoll_create,
    SYS_ptrace,
    SYS_mount,
    SYS_umount2,
    SYS_pivot_root,
    SYS_chroot,
    SYS_setns,
    SYS_bpf,
    SYS_perf_event_open,
    SYS_process_vm_readv,
    SYS_process_vm_writev,
    SYS_keyctl,
    SYS_add_key,
    SYS_init_module,
    SYS_finit_module,
    SYS_reboot,
    SYS_seccomp,
    SYS_rt_sigaction,
    SYS_set_robust_list,
    SYS_getdents,
    SYS_truncate,
    SYS_mkdir,
    SYS_rmdir,
    SYS_unlink,
    SYS_rename,
    SYS_link,
    SYS_symlink,
    SYS_chmod,
    SYS_chown,
    SYS_memfd_create,
    SYS_pipe2,
    SYS_wait4,
    SYS_userfaultfd,
    SYS_io_uring_setup,
);

/// The name of system call `nr`, if a list knows it.
fn name_of(nr: i64) -> Option<&'static str> {
    [
        COMMON, CONSOLE, NET, FS, VCPU, LIVING, SPAWNER, MAIN, OTHERS,
    ]
    .iter()
    .flat_map(|l| l.iter())
    .find(|(_, n)| *n == nr)
    .map(|(name, _)| name.trim_start_matches("SYS_"))
}

/// The filter of `kind`, less the system call `drop` (the test knob).
pub fn program(kind: Kind, drop: Option<&str>) -> Result<BpfProgram, seccompiler::Error> {
    let rules = kind
        .allowed()
        .into_iter()
        .filter(|(name, _)| Some(name.trim_start_matches("SYS_")) != drop)
        .map(|(_, nr)| Ok((nr, conditions(kind, nr)?)))
        .collect::<Result<BTreeMap<i64, Vec<SeccompRule>>, seccompiler::Error>>()?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Trap,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    let prog = BpfProgram::try_from(filter)?;
    Ok(match kind {
        Kind::Spawner => [&quietly_fail(libc::SYS_clone3, libc::ENOSYS)[..], &prog].concat(),
        Kind::Vcpu => [
            &run_first()[..],
            &quietly_fail(libc::SYS_openat, libc::EACCES)[..],
            &prog,
        ]
        .concat(),
        _ => prog,
    })
}

/// The vCPU's hot path first: `ioctl(_, KVM_RUN)` on x86_64, the call of
/// every VM exit, is allowed in 7 instructions instead of after the
/// compiled filter's walk past every lower system call number (a tree the
/// size of the list); every other call goes on to the next instruction.
/// The same rule as the compiled one ([`conditions`]: the request's low 32
/// bits, which is all the kernel reads), only sooner. x32's calls carry
/// bit 30 in their number, so they never match.
fn run_first() -> [sock_filter; 7] {
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    [
        op(LD_W_ABS, 0, 0, DATA_ARCH),
        op(JEQ_K, 0, 5, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, DATA_NR),
        op(JEQ_K, 0, 3, libc::SYS_ioctl as u32),
        op(LD_W_ABS, 0, 0, DATA_ARG1_LOW),
        op(JEQ_K, 0, 1, KVM_RUN as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ALLOW),
    ]
}

/// Classic BPF as a seccomp filter uses it: load a word of the
/// `seccomp_data`, compare, return.
const LD_W_ABS: u16 = 0x20;
const JEQ_K: u16 = 0x15;
const RET_K: u16 = 0x06;
const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
const SECCOMP_RET_ERRNO: u32 = 0x0005_0000;
const SECCOMP_RET_ALLOW: u32 = 0x7fff_0000;
/// Offsets in `seccomp_data`: the call's number, its architecture, and
/// the low half of its second argument (little-endian).
const DATA_NR: u32 = 0;
const DATA_ARCH: u32 = 4;
const DATA_ARG1_LOW: u32 = 16 + 8;

/// Instructions that make system call `nr` fail with `errno` on x86_64,
/// without a trap or a report, and go on to the next instruction for
/// every other call (jumps are relative, so the compiled filter that
/// follows is unchanged; it checks the architecture again itself).
///
/// The spawner's clone3: glibc falls back to clone, whose flags the
/// filter checks. The vCPU's openat: the only one measured is glibc's,
/// once per process, when free() first shrinks a thread's heap (it reads
/// /proc/sys/vm/overcommit_memory, and without it uses MADV_DONTNEED,
/// which is allowed); on a vCPU that is the last one to drop the devices
/// at the VM's end. A vCPU still opens nothing.
fn quietly_fail(nr: i64, errno: i32) -> [sock_filter; 5] {
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    [
        op(LD_W_ABS, 0, 0, DATA_ARCH),
        op(JEQ_K, 0, 3, AUDIT_ARCH_X86_64),
        op(LD_W_ABS, 0, 0, DATA_NR),
        op(JEQ_K, 0, 1, nr as u32),
        op(RET_K, 0, 0, SECCOMP_RET_ERRNO | errno as u32),
    ]
}

/// The rules under which `kind` may make system call `nr` (none: always).
fn conditions(kind: Kind, nr: i64) -> Result<Vec<SeccompRule>, seccompiler::Error> {
    let arg_is = |index, len, value| -> Result<SeccompRule, seccompiler::Error> {
        let c = SeccompCondition::new(index, len, SeccompCmpOp::Eq, value)?;
        Ok(SeccompRule::new(vec![c])?)
    };
    match (kind, nr) {
        // The request is an unsigned int to the kernel.
        (Kind::Vcpu, libc::SYS_ioctl) => VCPU_IOCTLS
            .iter()
            .map(|(_, req)| arg_is(1, SeccompCmpArgLen::Dword, *req))
            .collect(),
        (Kind::Main, libc::SYS_ioctl) => MAIN_IOCTLS
            .iter()
            .map(|(_, req)| arg_is(1, SeccompCmpArgLen::Dword, *req))
            .collect(),
        (Kind::Main, libc::SYS_fcntl) => Ok(vec![arg_is(
            1,
            SeccompCmpArgLen::Dword,
            libc::F_GETFD as u64,
        )?]),
        (Kind::Spawner, libc::SYS_clone) => Ok(vec![arg_is(
            0,
            SeccompCmpArgLen::Qword,
            THREAD_CLONE_FLAGS,
        )?]),
        _ => Ok(Vec::new()),
    }
}

/// The system call the test knob removes from `kind`'s list, if any.
fn dropped(kind: Kind) -> Option<String> {
    let v = std::env::var(DROP_ENV).ok()?;
    let (k, call) = v.split_once(':')?;
    (k == kind.key()).then(|| call.to_string())
}

/// The first forbidden call in this process: `kind << 32 | (nr + 1)`,
/// 0 while there was none.
static VIOLATION: AtomicU64 = AtomicU64::new(0);

/// Tests that make forbidden calls, and tests whose confined threads must
/// not see another test's, take turns: the record is the process's.
#[cfg(test)]
static RECORD: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A test's turn with the process's record ([`RECORD`]).
#[cfg(test)]
pub(crate) fn take_turn() -> std::sync::MutexGuard<'static, ()> {
    RECORD.lock().unwrap_or_else(|e| e.into_inner())
}

thread_local! {
    /// The calling thread's kind (0: none) and its VM's stop eventfd, for
    /// the SIGSYS handler (plain TLS reads, no allocation).
    static THREAD_KIND: Cell<u8> = const { Cell::new(0) };
    static THREAD_STOP: Cell<RawFd> = const { Cell::new(-1) };
}

/// Confines the calling device worker thread, named `name`, whose VM stops
/// on `stop`. A thread of no known kind is left as it is.
pub fn confine_worker(name: &str, stop: RawFd) -> Result<(), seccompiler::Error> {
    match Kind::of_thread(name) {
        Some(kind) => confine(kind, stop),
        None => Ok(()),
    }
}

/// Confines the calling thread to the allowlist of `kind`; a forbidden
/// call is recorded and writes `stop` (the VM's stop event).
pub fn confine(kind: Kind, stop: RawFd) -> Result<(), seccompiler::Error> {
    let prog = program(kind, dropped(kind).as_deref())?;
    install_handler();
    THREAD_KIND.with(|k| k.set(kind as u8));
    THREAD_STOP.with(|s| s.set(stop));
    seccompiler::apply_filter(&prog)
}

/// Whether a forbidden system call was made in this process: one atomic
/// load, cheap enough for every VM exit.
pub fn violated() -> bool {
    VIOLATION.load(Ordering::Relaxed) != 0
}

/// The report of the first forbidden system call made in this process.
pub fn violation() -> Option<String> {
    let v = VIOLATION.load(Ordering::SeqCst);
    if v == 0 {
        return None;
    }
    let kind = Kind::from_u8((v >> 32) as u8).map_or("VMM thread", |k| k.label());
    let nr = (v & 0xffff_ffff) as i64 - 1;
    let name = name_of(nr).unwrap_or("unknown");
    Some(format!(
        "the VMM's {kind} made a forbidden system call: {name} ({nr})"
    ))
}

fn install_handler() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: a zeroed sigaction is valid; the handler is an
        // extern "C" fn of the SA_SIGINFO shape and async-signal-safe.
        unsafe {
            let mut act: libc::sigaction = std::mem::zeroed();
            act.sa_sigaction = on_sigsys as *const () as usize;
            act.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut act.sa_mask);
            if libc::sigaction(libc::SIGSYS, &act, std::ptr::null_mut()) != 0 {
                tracing::error!("cannot install the SIGSYS handler");
            }
        }
    });
}

/// Offset of `si_syscall` in a SIGSYS siginfo on x86_64 (after signo,
/// errno, code, padding and `si_call_addr`).
const SI_SYSCALL_OFFSET: usize = 24;

/// The SIGSYS handler: async-signal-safe calls and stack memory only.
extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, ctx: *mut libc::c_void) {
    // SAFETY: the kernel passes a SIGSYS siginfo, whose si_syscall is an
    // int at this offset.
    let nr = unsafe { *(info.cast::<u8>().add(SI_SYSCALL_OFFSET).cast::<i32>()) } as i64;
    let kind = THREAD_KIND.with(|k| k.get());
    let stop = THREAD_STOP.with(|s| s.get());
    let record = (u64::from(kind) << 32) | (nr as u64 + 1);
    if VIOLATION
        .compare_exchange(0, record, Ordering::SeqCst, Ordering::SeqCst)
        .is_ok()
    {
        report(kind, nr);
    }
    if stop >= 0 {
        let one = 1u64.to_ne_bytes();
        // SAFETY: write(2) of 8 bytes from the stack to an eventfd.
        unsafe { libc::write(stop, one.as_ptr().cast(), one.len()) };
    }
    set_result(ctx, -libc::EPERM);
}

/// Makes the trapped call, which was not run, return `result` (-errno).
fn set_result(ctx: *mut libc::c_void, result: i32) {
    if !ctx.is_null() {
        // SAFETY: ctx is the interrupted thread's ucontext; its result
        // register is what the trapped call returns.
        unsafe {
            let uc = ctx.cast::<libc::ucontext_t>();
            (*uc).uc_mcontext.gregs[libc::REG_RAX as usize] = i64::from(result);
        }
    }
}

/// Writes the report line to stderr from a stack buffer.
fn report(kind: u8, nr: i64) {
    let mut buf = [0u8; 160];
    let mut len = 0;
    let label = Kind::from_u8(kind).map_or("VMM thread", |k| k.label());
    let name = name_of(nr).unwrap_or("unknown");
    let mut num = [0u8; 20];
    for part in [
        "krun-oci: the VMM's ".as_bytes(),
        label.as_bytes(),
        b" made a forbidden system call: ",
        name.as_bytes(),
        b" (",
        decimal(nr, &mut num),
        b")\n",
    ] {
        let n = part.len().min(buf.len() - len);
        buf[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: write(2) from a stack buffer of `len` initialized bytes.
    unsafe { libc::write(libc::STDERR_FILENO, buf.as_ptr().cast(), len) };
}

/// `n` in decimal, in `out`.
fn decimal(n: i64, out: &mut [u8; 20]) -> &[u8] {
    let mut v = n.unsigned_abs();
    let mut i = out.len();
    loop {
        i -= 1;
        out[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 || i == 1 {
            break;
        }
    }
    if n < 0 {
        i -= 1;
        out[i] = b'-';
    }
    &out[i..]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_filter_compiles_and_counts_its_calls() {
        for kind in Kind::ALL {
            let n = kind.allowed().len();
            let prog = program(kind, None).expect("filter compiles");
            println!(
                "seccomp allowlist {}: {n} system calls, {} BPF instructions",
                kind.key(),
                prog.len()
            );
            assert!(prog.len() > n, "one comparison per call at least");
        }
    }

    #[test]
    fn the_spawner_may_do_what_every_worker_does_and_start_threads() {
        let spawner: Vec<i64> = Kind::Spawner.allowed().iter().map(|(_, n)| *n).collect();
        for kind in Kind::WORKERS {
            for (name, nr) in kind.allowed() {
                assert!(spawner.contains(&nr), "{name} of {kind:?}");
            }
        }
        assert!(spawner.contains(&libc::SYS_clone));
        assert!(
            !spawner.contains(&libc::SYS_clone3),
            "answered ENOSYS, not allowed"
        );
        for nr in [libc::SYS_ioctl, libc::SYS_execve, libc::SYS_socket] {
            assert!(!spawner.contains(&nr), "{:?}", name_of(nr));
        }
        let vcpu: Vec<i64> = Kind::Vcpu.allowed().iter().map(|(_, n)| *n).collect();
        for nr in [
            libc::SYS_openat,
            libc::SYS_clone,
            libc::SYS_socket,
            libc::SYS_epoll_wait,
        ] {
            assert!(!vcpu.contains(&nr), "{:?}", name_of(nr));
        }
    }

    /// Runs the classic BPF `prog` on `data` (nr, arch, args) as the
    /// kernel's seccomp does (the instructions seccompiler and this module
    /// emit): Some(return value) and how many instructions ran, or None
    /// when it runs past its end (on to what follows).
    fn eval(prog: &[sock_filter], data: (u32, u32, [u64; 6])) -> (Option<u32>, usize) {
        const JA: u16 = 0x05;
        const JGT_K: u16 = 0x25;
        const JGE_K: u16 = 0x35;
        const JSET_K: u16 = 0x45;
        const AND_K: u16 = 0x54;
        let word = |off: u32| -> u32 {
            match off {
                DATA_NR => data.0,
                DATA_ARCH => data.1,
                o if (16..64).contains(&o) => {
                    let a = data.2[(o as usize - 16) / 8];
                    if o % 8 == 0 {
                        a as u32
                    } else {
                        (a >> 32) as u32
                    }
                }
                o => panic!("load at {o}"),
            }
        };
        let (mut pc, mut acc, mut ran) = (0usize, 0u32, 0usize);
        while let Some(i) = prog.get(pc) {
            ran += 1;
            let jump = |taken: bool| if taken { i.jt } else { i.jf } as usize;
            match i.code {
                LD_W_ABS => acc = word(i.k),
                JEQ_K => pc += jump(acc == i.k),
                JGT_K => pc += jump(acc > i.k),
                JGE_K => pc += jump(acc >= i.k),
                JSET_K => pc += jump(acc & i.k != 0),
                AND_K => acc &= i.k,
                JA => pc += i.k as usize,
                RET_K => return (Some(i.k), ran),
                c => panic!("instruction {c:#x} at {pc}"),
            }
            pc += 1;
        }
        (None, ran)
    }

    #[test]
    fn kvm_run_is_allowed_before_anything_else_on_a_vcpu() {
        let compiled = run_first().len() + quietly_fail(0, 0).len();
        let full = program(Kind::Vcpu, None).unwrap();
        let prog = &full[..compiled];
        let ioctl = libc::SYS_ioctl as u32;
        let args = |req: u64| [5, req, 0, 0, 0, 0];
        // KVM_RUN: allowed by the 7th instruction.
        assert_eq!(
            eval(prog, (ioctl, AUDIT_ARCH_X86_64, args(KVM_RUN))),
            (Some(SECCOMP_RET_ALLOW), 7)
        );
        // The kernel reads only the low half of the request.
        assert_eq!(
            eval(prog, (ioctl, AUDIT_ARCH_X86_64, args(KVM_RUN | 1 << 32))).0,
            Some(SECCOMP_RET_ALLOW)
        );
        // Anything else goes on, past the quiet openat, to the compiled
        // filter: another ioctl, another call, another architecture (i386's
        // 16 is lchown), x32's ioctl.
        let i386 = 0x4000_0003;
        for data in [
            (ioctl, AUDIT_ARCH_X86_64, args(libc::TIOCGWINSZ)),
            (libc::SYS_read as u32, AUDIT_ARCH_X86_64, args(KVM_RUN)),
            (ioctl, i386, args(KVM_RUN)),
            (0x4000_0000 | 514, AUDIT_ARCH_X86_64, args(KVM_RUN)),
        ] {
            assert_eq!(eval(prog, data).0, None, "{data:x?}");
        }
        // The quiet openat still answers first.
        assert_eq!(
            eval(prog, (libc::SYS_openat as u32, AUDIT_ARCH_X86_64, args(0))).0,
            Some(SECCOMP_RET_ERRNO | libc::EACCES as u32)
        );
        // The whole program: what the compiled part decides is unchanged,
        // and KVM_RUN no longer walks it.
        const TRAP: u32 = 0x0003_0000;
        let x86 = |nr: i64, a1: u64| (nr as u32, AUDIT_ARCH_X86_64, args(a1));
        for (data, want) in [
            (x86(libc::SYS_write, 0), SECCOMP_RET_ALLOW),
            (x86(libc::SYS_ioctl, libc::TUNSETOFFLOAD), SECCOMP_RET_ALLOW),
            (x86(libc::SYS_ioctl, libc::TIOCGWINSZ), TRAP),
            (x86(libc::SYS_execve, 0), TRAP),
            (x86(libc::SYS_clone, 0), TRAP),
        ] {
            assert_eq!(
                eval(&full, data).0.map(|r| r & 0xffff_0000),
                Some(want),
                "{data:x?}"
            );
        }
        let now = eval(&full, x86(libc::SYS_ioctl, KVM_RUN));
        let before = eval(&full[run_first().len()..], x86(libc::SYS_ioctl, KVM_RUN));
        assert_eq!(
            (now.0, before.0),
            (Some(SECCOMP_RET_ALLOW), Some(SECCOMP_RET_ALLOW))
        );
        println!(
            "KVM_RUN: {} BPF instructions, {} without the shortcut",
            now.1, before.1
        );
        assert!(now.1 < before.1);
    }

    /// The capture's requests as linux/kvm.h numbers them on x86_64
    /// (`strace -e raw=ioctl` shows the same): a wrong size would make the
    /// filter trap the real call.
    #[test]
    fn a_vcpu_may_read_its_own_state_for_a_capture() {
        let want: &[(&str, u64)] = &[
            ("KVM_GET_TSC_KHZ", 0xaea3),
            ("KVM_GET_MP_STATE", 0x8004_ae98),
            ("KVM_GET_REGS", 0x8090_ae81),
            ("KVM_GET_SREGS", 0x8138_ae83),
            ("KVM_GET_FPU", 0x81a0_ae8c),
            ("KVM_GET_XSAVE", 0x9000_aea4),
            ("KVM_GET_XCRS", 0x8188_aea6),
            ("KVM_GET_DEBUGREGS", 0x8080_aea1),
            ("KVM_GET_LAPIC", 0x8400_ae8e),
            ("KVM_GET_CPUID2", 0xc008_ae91),
            ("KVM_GET_MSRS", 0xc008_ae88),
            ("KVM_GET_VCPU_EVENTS", 0x8040_ae9f),
        ];
        for (name, req) in want {
            assert_eq!(
                VCPU_IOCTLS.iter().find(|(n, _)| n == name).map(|(_, r)| *r),
                Some(*req),
                "{name}"
            );
        }
        // Nothing else: KVM_RUN and the tap's five, and these; no setter,
        // no VM-wide or /dev/kvm call.
        assert_eq!(VCPU_IOCTLS.len(), 5 + want.len());
        let prog = program(Kind::Vcpu, None).unwrap();
        let x86 = |req: u64| {
            (
                libc::SYS_ioctl as u32,
                AUDIT_ARCH_X86_64,
                [5, req, 0, 0, 0, 0],
            )
        };
        for (name, req) in want {
            assert_eq!(eval(&prog, x86(*req)).0, Some(SECCOMP_RET_ALLOW), "{name}");
        }
        const TRAP: u32 = 0x0003_0000;
        for (name, req) in [
            ("KVM_SET_REGS", 0x4090_ae82u64),
            ("KVM_GET_MSR_INDEX_LIST", 0xc004_ae02),
            ("KVM_CHECK_EXTENSION", 0xae03),
            ("KVM_GET_CLOCK", 0x8030_ae7c),
        ] {
            assert_eq!(
                eval(&prog, x86(req)).0.map(|r| r & 0xffff_0000),
                Some(TRAP),
                "{name}"
            );
        }
    }

    #[test]
    fn the_main_thread_may_read_the_vm_for_a_capture_and_nothing_more() {
        let want: &[(&str, u64)] = &[
            ("KVM_CHECK_EXTENSION", 0xae03),
            ("KVM_GET_CLOCK", 0x8030_ae7c),
            ("KVM_GET_IRQCHIP", 0xc208_ae62),
            ("KVM_GET_PIT2", 0x8070_ae9f),
        ];
        assert_eq!(MAIN_IOCTLS.len(), want.len());
        let prog = program(Kind::Main, None).unwrap();
        let x86 = |req: u64| {
            (
                libc::SYS_ioctl as u32,
                AUDIT_ARCH_X86_64,
                [5, req, 0, 0, 0, 0],
            )
        };
        for (name, req) in want {
            assert_eq!(
                MAIN_IOCTLS.iter().find(|(n, _)| n == name).map(|(_, r)| *r),
                Some(*req),
                "{name}"
            );
            assert_eq!(eval(&prog, x86(*req)).0, Some(SECCOMP_RET_ALLOW), "{name}");
        }
        const TRAP: u32 = 0x0003_0000;
        for (name, req) in [
            ("KVM_RUN", KVM_RUN),
            ("KVM_SET_CLOCK", 0x4030_ae7b),
            ("KVM_SET_IRQCHIP", 0x8208_ae63),
            ("KVM_CREATE_VCPU", 0xae41),
            ("KVM_GET_REGS", 0x8090_ae81),
        ] {
            assert_eq!(
                eval(&prog, x86(req)).0.map(|r| r & 0xffff_0000),
                Some(TRAP),
                "{name}"
            );
        }
        // fcntl only to look at a descriptor's close-on-exec flag.
        let fcntl = |cmd: i32| {
            (
                libc::SYS_fcntl as u32,
                AUDIT_ARCH_X86_64,
                [3, cmd as u64, 0, 0, 0, 0],
            )
        };
        assert_eq!(eval(&prog, fcntl(libc::F_GETFD)).0, Some(SECCOMP_RET_ALLOW));
        for cmd in [libc::F_SETFL, libc::F_DUPFD, libc::F_SETFD] {
            assert_eq!(
                eval(&prog, fcntl(cmd)).0.map(|r| r & 0xffff_0000),
                Some(TRAP),
                "{cmd}"
            );
        }
        // It receives a descriptor; it opens none.
        for call in [libc::SYS_openat, libc::SYS_open, libc::SYS_socket] {
            let c = (call as u32, AUDIT_ARCH_X86_64, [0; 6]);
            assert_eq!(eval(&prog, c).0.map(|r| r & 0xffff_0000), Some(TRAP));
        }
    }

    #[test]
    fn the_knob_drops_exactly_one_call() {
        let full = program(Kind::Fs, None).unwrap().len();
        let less = program(Kind::Fs, Some("mkdirat")).unwrap().len();
        assert!(less < full);
        assert_eq!(program(Kind::Fs, Some("nonesuch")).unwrap().len(), full);
    }

    #[test]
    fn kinds_follow_the_thread_names() {
        assert_eq!(Kind::of_thread("virtio-fs-rootfs"), Some(Kind::Fs));
        assert_eq!(Kind::of_thread("virtio-net"), Some(Kind::Net));
        assert_eq!(Kind::of_thread("vcpu0"), None);
    }

    #[test]
    fn names_and_numbers_print_for_the_report() {
        assert_eq!(name_of(libc::SYS_mkdirat), Some("mkdirat"));
        assert_eq!(name_of(libc::SYS_execve), Some("execve"));
        let mut b = [0u8; 20];
        assert_eq!(decimal(258, &mut b), b"258");
        assert_eq!(decimal(0, &mut b), b"0");
    }

    #[test]
    fn a_vcpu_may_run_kvm_but_no_other_ioctl() {
        let _turn = take_turn();
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stop);
        let errno = || std::io::Error::last_os_error().raw_os_error();
        let (open, run, other) = std::thread::spawn(move || {
            confine(Kind::Vcpu, fd).unwrap();
            let path = c"/proc/sys/vm/overcommit_memory";
            // SAFETY: a NUL-terminated path that outlives the call.
            let open = (
                unsafe { libc::open(path.as_ptr(), libc::O_RDONLY) },
                errno(),
            );
            // SAFETY: ioctls on an invalid descriptor, with no memory.
            let run = (unsafe { libc::ioctl(-1, KVM_RUN as _, 0) }, errno());
            // SAFETY: as above.
            let other = (
                unsafe { libc::ioctl(-1, libc::TIOCGWINSZ as _, 0) },
                errno(),
            );
            (open, run, other)
        })
        .join()
        .unwrap();
        assert_eq!(open, (-1, Some(libc::EACCES)), "openat failed, unreported");
        assert_eq!(run, (-1, Some(libc::EBADF)), "KVM_RUN reached the kernel");
        assert_eq!(other, (-1, Some(libc::EPERM)), "TIOCGWINSZ trapped");
        let v = violation().expect("recorded");
        VIOLATION.store(0, Ordering::SeqCst);
        assert!(
            v.contains("the VMM's vCPU made a forbidden system call: ioctl (16)"),
            "{v}"
        );
        assert_eq!(stop.read().unwrap(), 1, "the VM's stop event was written");
    }

    #[test]
    fn a_forbidden_call_traps_reports_and_fails_with_eperm() {
        let _turn = take_turn();
        // On a thread of its own: the filter stays with it.
        let stop = vmm_sys_util::eventfd::EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&stop);
        let r = std::thread::Builder::new()
            .name("virtio-balloon".into())
            .spawn(move || {
                // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
                unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) };
                confine_worker("virtio-balloon", fd).unwrap();
                // SAFETY: getppid takes nothing; it is not in the list.
                let r = unsafe { libc::syscall(libc::SYS_getppid) };
                (r, std::io::Error::last_os_error().raw_os_error())
            })
            .unwrap()
            .join()
            .unwrap();
        assert_eq!(r, (-1, Some(libc::EPERM)));
        assert_eq!(stop.read().unwrap(), 1, "the VM's stop event was written");
        let v = violation().expect("recorded");
        // Cleared again at once: VMs of other tests in this process
        // would report it.
        VIOLATION.store(0, Ordering::SeqCst);
        assert!(
            v.contains("virtio-balloon worker made a forbidden system call: getppid"),
            "{v}"
        );
    }
}
