//! Confining the host processes of a container: `no_new_privs`, a reduced
//! capability set and a seccomp deny-list, for QEMU, virtiofsd and the
//! monitor itself.
//!
//! A [`Confinement`] is built before a fork, with everything it needs
//! allocated up front (the BPF program, the capset data), so that applying
//! it between fork and exec takes only async-signal-safe raw system calls.
//! Applying it sets, in this order:
//!
//! 1. `PR_SET_NO_NEW_PRIVS`: no exec can gain privileges again (for uid 0,
//!    an exec then keeps at most the permitted set it had).
//! 2. The bounding set: every capability outside the keep-set is dropped
//!    (`PR_CAPBSET_DROP`; capabilities the kernel does not know are skipped).
//! 3. When asked ([`Confinement::with_ids`], QEMU's jail): the uid and gid,
//!    with no supplementary groups.
//! 4. The permitted, effective and inheritable sets = the keep-set (raw
//!    `capset`), the ambient set cleared.
//! 5. The seccomp filter: a deny-list. Every other system call is allowed;
//!    the listed ones fail with EPERM. It stacks under the filters QEMU and
//!    virtiofsd install themselves (the strictest verdict wins), and it is
//!    the only filter of virtiofsd's two waiting parents. A helper of a
//!    process that is itself confined ([`confine_self`]: the monitor,
//!    `run`, the shim) gets no second copy: it inherits the first.
//!
//! The keep-sets, and why each capability is in them:
//!
//! - **QEMU**: none. It runs as an unprivileged uid of its own in its
//!   jail (src/hypervisor/src/jail.rs), where `/dev/kvm` is its own node,
//!   and the kernel, initramfs, firmware and libraries are world-readable;
//!   taps, the console pipe, the control socket and the virtio-fs
//!   connections come in as descriptors.
//! - **virtiofsd** (the daemon and the two parents of its namespace sandbox,
//!   which inherit from the exec): `SYS_ADMIN` for the sandbox itself
//!   (unshare of the PID, mount and network namespaces, mount, pivot_root,
//!   umount2), then the eight virtiofsd 1.14 keeps for the guest's users
//!   (main.rs `drop_capabilities`): `CHOWN`, `DAC_OVERRIDE`, `FOWNER`,
//!   `FSETID`, `SETGID`, `SETUID`, `MKNOD`, `SETFCAP`, and `SETPCAP`, for
//!   applying its own smaller sets with libcap-ng (without it the daemon
//!   dies there of its own seccomp filter, SIGSYS: tried with `setpriv`).
//!   Not `DAC_READ_SEARCH`: it runs with `--inode-file-handles=never`.
//! - **the built-in VMM** (`krun-oci __krun-vmm`, a child of the monitor
//!   or of the shim, see krun_vmm's `process` module): it execs with the
//!   virtiofsd set above (`SYS_ADMIN` to build its jail, `SETPCAP` to drop
//!   from its bounding set), and once jailed keeps only [`VMM_CAPS`], the
//!   eight virtiofsd keeps for the guest's users (its virtio-fs threads
//!   switch to the guest's uid and gid and create files as the guest asks).
//!   When every share is read-only it keeps [`VMM_READONLY_CAPS`] alone:
//!   `DAC_OVERRIDE`, so that it still reads whatever the guest's root may
//!   read.
//! - **the monitor** (the pid-file process of `krun-oci create`, or
//!   `krun-oci run` itself): the
//!   virtiofsd set above, which it hands on to the built-in VMM it
//!   starts, plus `DAC_READ_SEARCH` (it reads what the guest's root may
//!   read), `KILL` (its children), `NET_ADMIN` (the tap and its tc
//!   redirect, made and released in the container's network namespace)
//!   and `SYS_ADMIN` (the staging mounts, setns into that namespace, and
//!   the helpers' sandbox). Everything else (modules, raw I/O, boot, time,
//!   accounting, audit, MAC, syslog, BPF, perfmon, ptrace, ...) is dropped.
//!
//! The deny-list ([`DENIED`]) holds what none of QEMU, virtiofsd, the
//! monitor or the built-in VMM calls, and what would let a compromised
//! helper reach beyond its container: load kernel code, trace or read
//! other processes, change the host's clock, keys or swap.

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};

use caps::Capability;
use seccompiler::{BpfProgram, SeccompAction, SeccompFilter, TargetArch};

/// What QEMU keeps: nothing (see the module doc).
pub const QEMU_CAPS: &[Capability] = &[];

/// What virtiofsd and its sandbox's parents keep (see the module doc):
/// `SYS_ADMIN` and `SETPCAP`, then [`VMM_CAPS`].
pub const VIRTIOFSD_CAPS: &[Capability] = &[
    Capability::CAP_SYS_ADMIN,
    Capability::CAP_SETPCAP,
    Capability::CAP_CHOWN,
    Capability::CAP_DAC_OVERRIDE,
    Capability::CAP_FOWNER,
    Capability::CAP_FSETID,
    Capability::CAP_SETGID,
    Capability::CAP_SETUID,
    Capability::CAP_MKNOD,
    Capability::CAP_SETFCAP,
];

/// What the built-in VMM keeps once jailed (see the module doc): the file
/// server's eight, virtiofsd's set without `SYS_ADMIN` and `SETPCAP`.
pub const VMM_CAPS: &[Capability] = VIRTIOFSD_CAPS.split_at(2).1;

/// What the built-in VMM keeps when every share is read-only.
pub const VMM_READONLY_CAPS: &[Capability] = &[Capability::CAP_DAC_OVERRIDE];

/// What the monitor keeps beyond virtiofsd's set (see the module doc).
pub const MONITOR_EXTRA_CAPS: &[Capability] = &[
    Capability::CAP_DAC_READ_SEARCH,
    Capability::CAP_KILL,
    Capability::CAP_NET_ADMIN,
];

/// The system calls every confined process is refused, with their names
/// for reports.
pub const DENIED: &[(&str, libc::c_long)] = &[
    ("kexec_load", libc::SYS_kexec_load),
    ("kexec_file_load", libc::SYS_kexec_file_load),
    ("init_module", libc::SYS_init_module),
    ("finit_module", libc::SYS_finit_module),
    ("delete_module", libc::SYS_delete_module),
    ("bpf", libc::SYS_bpf),
    ("perf_event_open", libc::SYS_perf_event_open),
    ("ptrace", libc::SYS_ptrace),
    ("process_vm_readv", libc::SYS_process_vm_readv),
    ("process_vm_writev", libc::SYS_process_vm_writev),
    ("pidfd_getfd", libc::SYS_pidfd_getfd),
    ("kcmp", libc::SYS_kcmp),
    ("keyctl", libc::SYS_keyctl),
    ("add_key", libc::SYS_add_key),
    ("request_key", libc::SYS_request_key),
    ("userfaultfd", libc::SYS_userfaultfd),
    ("io_uring_setup", libc::SYS_io_uring_setup),
    ("reboot", libc::SYS_reboot),
    ("swapon", libc::SYS_swapon),
    ("swapoff", libc::SYS_swapoff),
    ("acct", libc::SYS_acct),
    ("settimeofday", libc::SYS_settimeofday),
    ("clock_settime", libc::SYS_clock_settime),
    ("clock_adjtime", libc::SYS_clock_adjtime),
    ("adjtimex", libc::SYS_adjtimex),
    ("open_by_handle_at", libc::SYS_open_by_handle_at),
    ("iopl", libc::SYS_iopl),
    ("ioperm", libc::SYS_ioperm),
    ("lookup_dcookie", libc::SYS_lookup_dcookie),
    ("quotactl", libc::SYS_quotactl),
    ("quotactl_fd", libc::SYS_quotactl_fd),
    ("uselib", libc::SYS_uselib),
    ("syslog", libc::SYS_syslog),
    ("vhangup", libc::SYS_vhangup),
    ("nfsservctl", libc::SYS_nfsservctl),
    ("_sysctl", libc::SYS__sysctl),
    ("fanotify_init", libc::SYS_fanotify_init),
];

/// `_LINUX_CAPABILITY_VERSION_3`: 64-bit sets in two 32-bit halves.
const CAP_VERSION_3: u32 = 0x2008_0522;
/// Capabilities are numbered below this (the kernel has 41 today).
const CAP_SLOTS: u8 = 64;

/// Errors building or applying a [`Confinement`].
#[derive(Debug, thiserror::Error)]
pub enum ConfineError {
    #[error("cannot compile the seccomp filter")]
    Filter(#[source] seccompiler::BackendError),
    #[error("cannot {what}")]
    Apply {
        what: &'static str,
        #[source]
        source: io::Error,
    },
}

impl ConfineError {
    /// The OS error, for a `pre_exec` closure (which has nowhere to say
    /// which step failed).
    pub(crate) fn into_io(self) -> io::Error {
        match self {
            ConfineError::Apply { source, .. } => source,
            ConfineError::Filter(_) => io::Error::from_raw_os_error(libc::EINVAL),
        }
    }
}

/// `struct __user_cap_header_struct`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CapHeader {
    version: u32,
    pid: libc::c_int,
}

/// `struct __user_cap_data_struct`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
struct CapData {
    effective: u32,
    permitted: u32,
    inheritable: u32,
}

/// A confinement ready to apply (see the module doc).
#[derive(Clone, Debug)]
pub struct Confinement {
    keep: u64,
    filter: Vec<libc::sock_filter>,
    /// The uid and gid to switch to (no supplementary groups), if any.
    ids: Option<(u32, u32)>,
}

impl Confinement {
    /// NNP, the deny-list, and `keep` as the only capabilities.
    pub fn new(keep: &[Capability]) -> Result<Self, ConfineError> {
        Ok(Confinement {
            keep: cap_mask(keep),
            filter: deny_list()?,
            ids: None,
        })
    }

    /// The same, switching to `uid` and `gid` (QEMU's jail, see
    /// [`crate::jail`]) with no supplementary groups once the bounding set
    /// is dropped (after which the capabilities are gone: only a keep-set
    /// of none makes sense with it).
    pub fn with_ids(mut self, uid: u32, gid: u32) -> Self {
        self.ids = Some((uid, gid));
        self
    }

    /// QEMU's confinement.
    pub fn qemu() -> Result<Self, ConfineError> {
        Self::new(QEMU_CAPS)
    }

    /// virtiofsd's confinement.
    pub fn virtiofsd() -> Result<Self, ConfineError> {
        Self::new(VIRTIOFSD_CAPS)
    }

    /// The monitor's confinement: virtiofsd's capabilities (it hands them
    /// on to virtiofsd and the built-in VMM's process) and its own.
    pub fn monitor() -> Result<Self, ConfineError> {
        let mut c = Self::new(VIRTIOFSD_CAPS)?;
        c.keep |= cap_mask(MONITOR_EXTRA_CAPS);
        Ok(c)
    }

    /// The capabilities kept, as a bit mask (as `/proc/PID/status` shows
    /// `CapEff`).
    pub fn keep_mask(&self) -> u64 {
        self.keep
    }

    /// The number of BPF instructions of the filter.
    pub fn filter_len(&self) -> usize {
        self.filter.len()
    }

    /// Applies the confinement to the calling thread (`tsync`: the filter
    /// and NNP to every thread of the process). Only raw system calls on
    /// data prepared by [`Confinement::new`]: safe between fork and exec.
    pub(crate) fn apply(&self, tsync: bool) -> Result<(), ConfineError> {
        let fail = |what| ConfineError::Apply {
            what,
            source: io::Error::last_os_error(),
        };
        // SAFETY: prctl(PR_SET_NO_NEW_PRIVS) takes no pointers.
        if unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) } != 0 {
            return Err(fail("set no_new_privs"));
        }
        self.drop_bounding()
            .map_err(|_| fail("drop from the bounding set"))?;
        if let Some((uid, gid)) = self.ids {
            // SAFETY: setgroups reads no entries for a count of 0; the
            // setres* calls take integers only.
            let rc = unsafe {
                if libc::setgroups(0, std::ptr::null()) != 0 || libc::setresgid(gid, gid, gid) != 0
                {
                    -1
                } else {
                    libc::setresuid(uid, uid, uid)
                }
            };
            if rc != 0 {
                return Err(fail("switch to the jail's uid and gid"));
            }
        }
        self.set_caps().map_err(|_| fail("set the capabilities"))?;
        // A child of a process confined by `confine_self` already runs
        // under this very deny-list (filters survive fork and exec): a
        // second copy would only run again on every system call.
        if !tsync && SELF_CONFINED.load(Ordering::Relaxed) {
            return Ok(());
        }
        let prog = libc::sock_fprog {
            len: self.filter.len() as u16,
            filter: self.filter.as_ptr() as *mut libc::sock_filter,
        };
        let flags = if tsync {
            libc::SECCOMP_FILTER_FLAG_TSYNC
        } else {
            0
        };
        // SAFETY: the kernel copies the program, which `prog` points to and
        // which outlives the call; it writes nothing back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_seccomp,
                libc::SECCOMP_SET_MODE_FILTER,
                flags,
                &prog as *const libc::sock_fprog,
            )
        };
        // With TSYNC, a positive value names a thread that could not follow.
        if rc != 0 {
            return Err(fail("install the seccomp filter"));
        }
        Ok(())
    }

    /// Drops from the bounding set every capability outside the keep-set
    /// that is still in it (dropping needs CAP_SETPCAP, even for one
    /// already gone; the kernel's unknown capabilities read as EINVAL).
    fn drop_bounding(&self) -> Result<(), ()> {
        for cap in 0..CAP_SLOTS {
            if self.keep & (1 << cap) != 0 {
                continue;
            }
            let c = cap as libc::c_ulong;
            // SAFETY: prctl(PR_CAPBSET_READ/DROP) takes no pointers.
            if unsafe { libc::prctl(libc::PR_CAPBSET_READ, c, 0, 0, 0) } != 1 {
                continue;
            }
            // SAFETY: as above.
            if unsafe { libc::prctl(libc::PR_CAPBSET_DROP, c, 0, 0, 0) } != 0 {
                return Err(());
            }
        }
        Ok(())
    }

    /// Sets permitted = effective = inheritable = the keep-set and clears
    /// the ambient set.
    fn set_caps(&self) -> Result<(), ()> {
        // SAFETY: prctl(PR_CAP_AMBIENT) takes no pointers. Kernels without
        // ambient capabilities (EINVAL) have none to clear.
        unsafe {
            libc::prctl(
                libc::PR_CAP_AMBIENT,
                libc::PR_CAP_AMBIENT_CLEAR_ALL,
                0,
                0,
                0,
            )
        };
        let mut header = CapHeader {
            version: CAP_VERSION_3,
            pid: 0,
        };
        let half = |shift: u32| {
            let bits = (self.keep >> shift) as u32;
            CapData {
                effective: bits,
                permitted: bits,
                inheritable: bits,
            }
        };
        let data = [half(0), half(32)];
        // SAFETY: capset reads a version 3 header and two data structs,
        // which live on this stack frame for the call.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_capset,
                &mut header as *mut CapHeader,
                data.as_ptr(),
            )
        };
        if rc != 0 {
            return Err(());
        }
        Ok(())
    }
}

/// Confines the calling process where it runs: NNP and the seccomp filter
/// on every thread (TSYNC); the capability sets of the calling thread only
/// — threads keep the capabilities they had, so call this before starting
/// any (the threads started later inherit the reduced sets). Needs
/// CAP_SETPCAP to reduce the bounding set. A process cannot undo it.
pub fn confine_self(confinement: &Confinement) -> Result<(), ConfineError> {
    confinement.apply(true)?;
    SELF_CONFINED.store(true, Ordering::Relaxed);
    Ok(())
}

/// Set once this process runs under the deny-list ([`confine_self`]):
/// the helpers it spawns inherit it, and [`Confinement::apply`] installs
/// no second copy in them.
static SELF_CONFINED: AtomicBool = AtomicBool::new(false);

/// Reduces the calling thread's bounding, permitted, effective and
/// inheritable sets to `keep` (a subset of what it has), and clears its
/// ambient set: for a process already under a [`Confinement`] (NNP and
/// the deny-list stay as they are) that gives up more once set up. Needs
/// CAP_SETPCAP for the bounding set; threads started later inherit the
/// sets, threads running already keep theirs.
pub fn reduce_caps(keep: &[Capability]) -> Result<(), ConfineError> {
    let c = Confinement {
        keep: cap_mask(keep),
        filter: Vec::new(),
        ids: None,
    };
    let fail = |what| ConfineError::Apply {
        what,
        source: io::Error::last_os_error(),
    };
    c.drop_bounding()
        .map_err(|_| fail("drop from the bounding set"))?;
    c.set_caps().map_err(|_| fail("set the capabilities"))
}

/// `set` as a bit mask, as `/proc/PID/status` shows capability sets.
pub fn cap_mask(set: &[Capability]) -> u64 {
    set.iter().fold(0, |m, c| m | 1 << c.index())
}

/// The deny-list as a BPF program for this machine.
fn deny_list() -> Result<Vec<libc::sock_filter>, ConfineError> {
    let rules = DENIED.iter().map(|&(_, nr)| (nr, Vec::new())).collect();
    let arch = TargetArch::try_from(std::env::consts::ARCH).map_err(ConfineError::Filter)?;
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::Allow,
        SeccompAction::Errno(libc::EPERM as u32),
        arch,
    )
    .map_err(ConfineError::Filter)?;
    let prog = BpfProgram::try_from(filter).map_err(ConfineError::Filter)?;
    Ok(prog
        .iter()
        .map(|i| libc::sock_filter {
            code: i.code,
            jt: i.jt,
            jf: i.jf,
            k: i.k,
        })
        .collect())
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_vmm_keeps_the_file_servers_eight_and_virtiofsd_two_more() {
        assert_eq!(cap_mask(VMM_CAPS), 0x8800_00db);
        assert_eq!(
            cap_mask(VIRTIOFSD_CAPS),
            0x8800_00db
                | 1 << Capability::CAP_SYS_ADMIN.index()
                | 1 << Capability::CAP_SETPCAP.index()
        );
    }
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    use super::*;

    /// kcmp(self, self, KCMP_FILE, 0, 0): 0 for anyone, EPERM when denied.
    fn kcmp_self() -> io::Result<()> {
        // SAFETY: kcmp compares two of our own descriptors; no pointers.
        let pid = unsafe { libc::getpid() } as libc::c_long;
        // SAFETY: as above.
        let rc = unsafe { libc::syscall(libc::SYS_kcmp, pid, pid, 0 as libc::c_long, 0, 0) };
        if rc < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// `cat /proc/self/status` run under `c` (or none), after checking in
    /// the child that kcmp is refused (or allowed).
    fn status_under(c: Option<Confinement>) -> String {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/status");
        // SAFETY: the closure makes only raw system calls on data built
        // before the fork.
        unsafe {
            cmd.pre_exec(move || {
                let Some(c) = &c else {
                    return kcmp_self();
                };
                c.apply(false).map_err(ConfineError::into_io)?;
                match kcmp_self() {
                    Err(e) if e.raw_os_error() == Some(libc::EPERM) => Ok(()),
                    _ => Err(io::Error::from_raw_os_error(libc::ENOTRECOVERABLE)),
                }
            })
        };
        let out = cmd.output().expect("cat runs under the confinement");
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    }

    fn field<'a>(status: &'a str, name: &str) -> &'a str {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap_or_else(|| panic!("no {name} in {status}"))
            .trim()
    }

    #[test]
    fn the_deny_list_compiles_for_this_machine() {
        let c = Confinement::qemu().unwrap();
        assert_eq!(DENIED.len(), 37);
        // The arch check, then a few instructions per system call (190
        // for 37 with seccompiler 0.5): far below the kernel's 4096.
        assert!(c.filter_len() > DENIED.len(), "{}", c.filter_len());
        assert!(c.filter_len() <= 6 * DENIED.len(), "{}", c.filter_len());
    }

    #[test]
    fn keep_sets_are_the_documented_ones() {
        assert_eq!(Confinement::qemu().unwrap().keep_mask(), 0);
        // SYS_ADMIN (21) and CHOWN DAC_OVERRIDE FOWNER FSETID SETGID
        // SETUID SETPCAP (0 1 3 4 6 7 8) MKNOD (27) SETFCAP (31).
        assert_eq!(Confinement::virtiofsd().unwrap().keep_mask(), 0x8820_01db);
        // ... plus DAC_READ_SEARCH (2), KILL (5), NET_ADMIN (12).
        assert_eq!(Confinement::monitor().unwrap().keep_mask(), 0x8820_11ff);
        // The built-in VMM once jailed: virtiofsd's without SYS_ADMIN and
        // SETPCAP.
        assert_eq!(cap_mask(VMM_CAPS), 0x8800_00db);
        assert_eq!(cap_mask(VMM_READONLY_CAPS), 0x2);
    }

    #[test]
    fn a_child_reducing_its_caps_keeps_nnp_the_filter_and_the_smaller_set() {
        let mut cmd = Command::new("cat");
        cmd.arg("/proc/self/status");
        let c = Confinement::virtiofsd().unwrap();
        // SAFETY: the closure makes only raw system calls on data built
        // before the fork (reduce_caps' capset data lives on its stack).
        unsafe {
            cmd.pre_exec(move || {
                c.apply(false).map_err(ConfineError::into_io)?;
                reduce_caps(VMM_CAPS).map_err(ConfineError::into_io)
            })
        };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let status = String::from_utf8(out.stdout).unwrap();
        assert_eq!(field(&status, "Seccomp"), "2");
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(field(&status, set), "00000000880000db", "{set}");
        }
    }

    #[test]
    fn a_confined_child_has_nnp_the_filter_and_the_keep_set() {
        let plain = status_under(None);
        assert_eq!(field(&plain, "Seccomp"), "0", "the tests run unconfined");
        let c = Confinement::virtiofsd().unwrap();
        let status = status_under(Some(c.clone()));
        assert_eq!(field(&status, "NoNewPrivs"), "1");
        assert_eq!(field(&status, "Seccomp"), "2");
        let keep = format!("{:016x}", c.keep_mask());
        for set in ["CapEff", "CapPrm", "CapBnd"] {
            assert_eq!(field(&status, set), keep, "{set}");
        }
        assert_eq!(field(&status, "CapAmb"), "0000000000000000");
    }

    #[test]
    fn an_empty_keep_set_leaves_a_root_child_no_capability() {
        let status = status_under(Some(Confinement::qemu().unwrap()));
        for set in ["CapEff", "CapPrm", "CapBnd", "CapInh"] {
            assert_eq!(field(&status, set), "0000000000000000", "{set}");
        }
    }
}
