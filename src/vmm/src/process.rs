//! The built-in VMM in a process of its own, jailed.
//!
//! [`Builtin`] starts the VMM as a child of the process asking for the VM
//! (the monitor of `krun-oci create`, or the containerd shim): an exec of
//! `/proc/self/exe` with the hidden first argument [`ARG`], which both
//! binaries hand to [`main`] before anything else. The child is started
//! through krun_hypervisor's `spawn`, as QEMU is: its own process group,
//! SIGKILL when its parent dies, `no_new_privs`, the runtime's seccomp
//! deny-list, the capabilities of virtiofsd's set (`VIRTIOFSD_CAPS`), and
//! the cgroup of its parent (the monitor and the shim join the
//! container's before starting it). It gets:
//!
//! - on stdin, the VM's configuration as JSON (`Wire`: paths, sizes,
//!   the shares, the MACs);
//! - at fixed numbers, the descriptors: the control socket (3), the
//!   console pipe (4), the taps (5, 6, ...);
//! - on stdout, a pipe on which it writes one byte once the VM is built
//!   and it is jailed; EOF instead means it failed, and [`Builtin::start`]
//!   returns what it said;
//! - as stderr, the capped log `vmm.log` in the run directory: its own
//!   log lines (info and above; debug too when the parent logs debug,
//!   `--debug`), and last, why it ended; the last lines of it are the
//!   detail of a failure (`VmExit::VmmFailed`).
//!
//! In the child, in this order, before the guest's first instruction:
//!
//! 1. The VM is built (`vm::build`): `/dev/kvm`, guest memory, the
//!    devices, each share's root, the kernel and initramfs: every file it
//!    needs of the host is open from here on. No thread is left running.
//! 2. The jail (krun_hypervisor's `Jail`, as QEMU's): a private mount
//!    namespace, `/` a recursive slave, and as root a small read-only
//!    tmpfs (on the empty directory `vmm-root` in the run directory, empty
//!    on the host) holding ONLY each share, bound recursively at the same
//!    absolute path it has on the host (the virtio-fs server imports the
//!    share's root again by that path at FUSE_INIT and DESTROY; the share's
//!    top mount read-only, `nosuid,nodev`, the mounts beneath it, such as
//!    the container's writable rootfs, keep their own flags). Then
//!    `pivot_root`, the old root detached. There is no `/dev`, and of
//!    `/proc` only the process's own descriptor table: the virtio-fs
//!    backend (fuse-backend-rs 0.14) reopens its `O_PATH` descriptors
//!    through the `/proc/self/fd` directory it opened at step 1, which
//!    stays usable (the detached `/proc` lives on through it), but its
//!    xattr calls name them by the absolute path `/proc/self/fd/N`
//!    (`sync_io.rs` setxattr, getxattr, listxattr, removexattr; the
//!    guest's every exec asks for `security.capability`, and ENOENT there
//!    fails the exec). So the jail holds `/proc/self/fd`: a read-only bind
//!    of this process's `/proc/PID/fd`, descriptors it holds anyway.
//! 3. Resource limits: `RLIMIT_NOFILE` fixed (soft = hard) at the soft
//!    limit step 1 raised to the hard one (the virtio-fs server holds a
//!    descriptor per guest inode and budgets them against it).
//!    `RLIMIT_CORE` 0: a crashed VMM leaves no core file (nor a
//!    core-dump handler's copy) holding the guest's memory on the host.
//!    `RLIMIT_FSIZE` stays unlimited: the guest's writes into its rootfs
//!    are bounded by the host's file system, as a runc container's are, and
//!    a finite limit would let the guest kill its VMM with SIGXFSZ.
//!    `RLIMIT_NPROC` is not the bound on threads: for uid 0 the kernel
//!    never enforces it (and counts every root process on the host); the
//!    bound is that the VMM starts a fixed set of threads, under the
//!    deny-list and its threads' seccomp filters, in the container's cgroup
//!    (`pids.max`).
//! 4. Capabilities: `SYS_ADMIN` and `SETPCAP` (needed only for steps 2 and
//!    4) are dropped from the bounding, permitted and effective sets,
//!    leaving the eight the virtio-fs server needs for the guest's users
//!    (`VMM_CAPS`: CHOWN DAC_OVERRIDE FOWNER FSETID SETGID SETUID MKNOD
//!    SETFCAP, `CapEff: 00000000880000db`), or `DAC_OVERRIDE` alone
//!    (`VMM_READONLY_CAPS`, to read what the guest's root may read) when
//!    every share is read-only. See krun_hypervisor's `confine` module.
//! 5. The byte on stdout; the vCPUs and the spawner of device workers
//!    start (each thread installs its own filter, see the `seccomp`
//!    module); then the main thread confines itself to its own list
//!    (`Kind::Main`: it only waits, kicks and joins the vCPUs, reports
//!    and exits; after them, which would inherit it), waits for the VM to
//!    end, and exits 0 when the guest stopped, or 1 with the reason as the
//!    last line of its stderr (a forbidden system call: "the VMM's
//!    virtio-fs worker made a forbidden system call: mkdirat (258)").
//!
//! For the parent the VM is a krun_hypervisor `VmProcess`, as QEMU's:
//! its pid is the child's, pause and resume are SIGSTOP and SIGCONT, kill
//! is SIGKILL.

use std::ffi::OsStr;
use std::io::{self, Read, Write};
use std::os::fd::{FromRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use krun_hypervisor::{
    reduce_caps, spawn, AfterCapture, CappedLog, ConfineError, EmptyDir, Error, Hypervisor, Jail,
    NetDevice, PassFd, Share, SnapshotIo, Vm, VmConfig, VmExit, VmProcess, CAPTURE_FD, CONSOLE_FD,
    CONTROL_FD, NET_FD, REQUEST_FD, SNAPSHOT_FD, VIRTIOFSD_CAPS, VMM_CAPS, VMM_READONLY_CAPS,
};
use serde::{Deserialize, Serialize};

use crate::vm::{self, VmmError};

/// The hidden first argument that makes `krun-oci` (or the shim) the VMM.
pub const ARG: &str = "__krun-vmm";

/// The process name the VMM shows (`/proc/PID/status` Name).
pub const NAME: &str = "krun-vmm";

/// Where the child reads its configuration, and where it says it is ready.
const CONFIG_FD: RawFd = 0;
const READY_FD: RawFd = 1;
/// The jail's directory in the run directory, and the VMM's log there.
const JAIL_DIR: &str = "vmm-root";
const LOG: &str = "vmm.log";
/// The one path of `/proc` in the jail (see the module doc).
const PROC_SELF_FD: &str = "/proc/self/fd";
/// How many of the log's last lines make a failure's detail.
const DETAIL_LINES: usize = 3;
/// How often the VMM checks for a forbidden system call of its threads.
const VIOLATION_POLL: Duration = Duration::from_millis(100);

/// The part of a [`VmConfig`] that is not descriptors, as the child gets
/// it on stdin.
#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct Wire {
    kernel: PathBuf,
    initrd: PathBuf,
    cmdline: String,
    vcpus: u32,
    memory_mib: u64,
    shares: Vec<WireShare>,
    control_port_name: String,
    /// One per tap, in order.
    macs: Vec<String>,
    log_limit: u64,
    run_dir: PathBuf,
    /// Whether the parent logs debug lines (`--debug`): the VMM's own go
    /// to its log then; info and above always do.
    debug: bool,
    /// A template to capture or start from (its descriptors at
    /// SNAPSHOT_FD and REQUEST_FD).
    #[serde(default)]
    snapshot: Option<WireSnapshot>,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
enum WireSnapshot {
    Capture { kernel: String, initramfs: String },
    Restore,
}

#[derive(Debug, PartialEq, Serialize, Deserialize)]
struct WireShare {
    tag: String,
    path: PathBuf,
    readonly: bool,
}

impl Wire {
    fn of(c: &VmConfig) -> Wire {
        Wire {
            kernel: c.kernel.clone(),
            initrd: c.initrd.clone(),
            cmdline: c.cmdline.clone(),
            vcpus: c.vcpus,
            memory_mib: c.memory_mib,
            shares: c
                .shares
                .iter()
                .map(|s| WireShare {
                    tag: s.tag.clone(),
                    path: s.path.clone(),
                    readonly: s.readonly,
                })
                .collect(),
            control_port_name: c.control_port_name.clone(),
            macs: c.nets.iter().map(|n| n.mac.clone()).collect(),
            log_limit: c.log_limit,
            run_dir: c.run_dir.clone(),
            debug: tracing::enabled!(tracing::Level::DEBUG),
            snapshot: c.snapshot.as_ref().map(|s| match s {
                SnapshotIo::Capture {
                    kernel, initramfs, ..
                } => WireSnapshot::Capture {
                    kernel: kernel.clone(),
                    initramfs: initramfs.clone(),
                },
                SnapshotIo::Restore { .. } => WireSnapshot::Restore,
            }),
        }
    }

    /// The configuration back, with the descriptors `fd` gives for each
    /// fixed number.
    fn into_config<E>(
        self,
        mut fd: impl FnMut(RawFd) -> Result<OwnedFd, E>,
    ) -> Result<VmConfig, E> {
        let mut nets = Vec::new();
        for (i, mac) in self.macs.into_iter().enumerate() {
            nets.push(NetDevice {
                tap: fd(NET_FD + i as RawFd)?,
                mac,
            });
        }
        let snapshot = match self.snapshot {
            None => None,
            Some(WireSnapshot::Capture { kernel, initramfs }) => Some(SnapshotIo::Capture {
                file: fd(SNAPSHOT_FD)?,
                request: fd(REQUEST_FD)?,
                kernel,
                initramfs,
            }),
            Some(WireSnapshot::Restore) => Some(SnapshotIo::Restore {
                file: fd(SNAPSHOT_FD)?,
            }),
        };
        Ok(VmConfig {
            snapshot,
            kernel: self.kernel,
            initrd: self.initrd,
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            shares: self
                .shares
                .into_iter()
                .map(|s| Share {
                    tag: s.tag,
                    path: s.path,
                    readonly: s.readonly,
                })
                .collect(),
            control: fd(CONTROL_FD)?,
            control_port_name: self.control_port_name,
            console: fd(CONSOLE_FD)?,
            log_limit: self.log_limit,
            run_dir: self.run_dir,
            nets,
        })
    }
}

/// The built-in VMM as a [`Hypervisor`] backend: a jailed child process
/// (see the module doc).
#[derive(Clone, Copy, Debug, Default)]
pub struct Builtin;

/// The VMM process ended before its VM was ready.
#[derive(Debug, thiserror::Error)]
#[error("the VMM process ended before the guest started: {0}")]
pub struct Ended(String);

impl Hypervisor for Builtin {
    fn name(&self) -> &'static str {
        "builtin"
    }

    fn start(&self, config: VmConfig) -> Result<Box<dyn Vm>, Error> {
        if config.vcpus == 0 || config.vcpus > 254 {
            return Err(Error::InvalidConfig(format!(
                "a VM needs 1 to 254 vCPUs, not {}",
                config.vcpus
            )));
        }
        let started = Instant::now();
        let program = "/proc/self/exe";
        let spawn_err = |source| Error::Spawn {
            program: format!("{program} {ARG}"),
            source,
        };
        let json =
            serde_json::to_vec(&Wire::of(&config)).map_err(|e| spawn_err(io::Error::other(e)))?;
        // The configuration is small: it fits the pipe before the child
        // reads it.
        let (config_r, mut config_w) = io::pipe().map_err(spawn_err)?;
        config_w.write_all(&json).map_err(spawn_err)?;
        drop(config_w);
        let (mut ready_r, ready_w) = io::pipe().map_err(spawn_err)?;
        let log_path = config.run_dir.join(LOG);
        let (log, stderr) =
            CappedLog::create(&log_path, config.log_limit, "VMM log").map_err(spawn_err)?;
        let jail_dir = EmptyDir::create(config.run_dir.join(JAIL_DIR)).map_err(spawn_err)?;
        if config.nets.len() > 30 {
            return Err(Error::InvalidConfig(format!(
                "{} network devices (at most 30)",
                config.nets.len()
            )));
        }
        let mut fds = PassFd::vm_fds(config.control, config.console, config.nets);
        match config.snapshot {
            None => {}
            Some(SnapshotIo::Capture { file, request, .. }) => {
                fds.push(PassFd {
                    fd: file,
                    target: SNAPSHOT_FD,
                });
                fds.push(PassFd {
                    fd: request,
                    target: REQUEST_FD,
                });
            }
            Some(SnapshotIo::Restore { file }) => fds.push(PassFd {
                fd: file,
                target: SNAPSHOT_FD,
            }),
        }
        // Every VMM answers capture requests (a checkpoint).
        let (captures, vmm_captures) = krun_hypervisor::capture::channel().map_err(spawn_err)?;
        fds.push(PassFd {
            fd: vmm_captures,
            target: CAPTURE_FD,
        });
        fds.push(PassFd {
            fd: config_r.into(),
            target: CONFIG_FD,
        });
        fds.push(PassFd {
            fd: ready_w.into(),
            target: READY_FD,
        });
        let mut cmd = Command::new(program);
        cmd.arg(ARG).stdout(Stdio::null()).stderr(stderr);
        // Not jailed here: the exec needs the host's binary. It jails
        // itself once the VM is built.
        let child = spawn(&mut cmd, fds, VIRTIOFSD_CAPS, None)?;
        let mut vm = VmProcess::new(child, log_path, log, DETAIL_LINES, Box::new(jail_dir))
            .with_capture_channel(captures);
        let mut byte = [0u8; 1];
        if let Ok(1) = ready_r.read(&mut byte) {
            tracing::debug!(pid = vm.pid(), took = ?started.elapsed(), "VMM process ready");
            return Ok(Box::new(vm));
        }
        let why = match vm.wait()? {
            VmExit::VmmFailed { detail, .. } => detail,
            VmExit::Killed { signal } => format!("killed by signal {signal}"),
            VmExit::GuestStopped => "it exited without a word".into(),
        };
        Err(Error::Backend(Box::new(Ended(why))))
    }
}

/// Errors of the VMM process before its VM runs.
#[derive(Debug, thiserror::Error)]
pub enum ProcessError {
    #[error("cannot read the VM's configuration")]
    Config(#[source] serde_json::Error),
    #[error("descriptor {0} was not passed")]
    Fd(RawFd, #[source] io::Error),
    #[error("cannot build the VM")]
    Build(#[source] VmmError),
    #[error("cannot enter the jail")]
    Jail(#[source] io::Error),
    #[error("cannot set the resource limits")]
    Limits(#[source] io::Error),
    #[error("cannot drop capabilities")]
    Caps(#[source] ConfineError),
    #[error("cannot report the VM ready")]
    Ready(#[source] io::Error),
    #[error("cannot start the vCPUs")]
    Run(#[source] VmmError),
    #[error("cannot install the main thread's seccomp filter")]
    Seccomp(#[source] seccompiler::Error),
    #[error("cannot read the template")]
    Template(#[source] crate::snapshot::SnapshotError),
}

/// The VMM process: [`Builtin`]'s child (see the module doc). Never
/// returns.
pub fn main() -> ! {
    name_process();
    let code = match serve() {
        Ok(VmExit::GuestStopped) => 0,
        Ok(VmExit::VmmFailed { detail, .. }) => {
            // A forbidden system call's handler has written it already.
            if crate::seccomp::violation().as_deref() != Some(detail.as_str()) {
                eprintln!("{detail}");
            }
            1
        }
        Ok(VmExit::Killed { signal }) => {
            eprintln!("the VM was stopped by signal {signal}");
            1
        }
        Err(e) => {
            eprintln!("{}", krun_hypervisor::error_chain(&e));
            1
        }
    };
    std::process::exit(code)
}

/// Whether the process was started as the VMM (its first argument is
/// [`ARG`]).
pub fn is_vmm(first_arg: Option<&OsStr>) -> bool {
    first_arg == Some(OsStr::new(ARG))
}

fn serve() -> Result<VmExit, ProcessError> {
    let t0 = Instant::now();
    let wire: Wire = serde_json::from_reader(io::stdin().lock()).map_err(ProcessError::Config)?;
    log_to_stderr(wire.debug);
    let readonly = wire.shares.iter().all(|s| s.readonly);
    let mut config = wire.into_config(take_fd)?;
    let captures = take_fd(CAPTURE_FD)?;
    let run_dir = config.run_dir.clone();
    let shares = config.shares.clone();
    let header = crate::snapshot::Header {
        vcpus: config.vcpus,
        memory_size: config.memory_mib << 20,
        ..Default::default()
    };
    let (built, capture) = match config.snapshot.take() {
        None => (vm::build(config, vm::Start::Boot), None),
        Some(SnapshotIo::Restore { file }) => {
            // Verified whole by the parent, which keeps the file unchanged:
            // the shape (every length and field) is checked again here.
            let loaded = crate::snapshot::Snapshot::open(
                std::fs::File::from(file),
                Path::new("the template"),
                crate::snapshot::Verify::ShapeOnly,
            )
            .map_err(ProcessError::Template)?;
            tracing::debug!(took = ?t0.elapsed(), "VMM: template state read");
            (vm::build(config, vm::Start::Restore(&loaded)), None)
        }
        Some(SnapshotIo::Capture {
            file,
            request,
            kernel,
            initramfs,
        }) => {
            let header = crate::snapshot::Header {
                kernel,
                guest_init: initramfs.clone(),
                initramfs,
                ..header.clone()
            };
            let built = vm::build(config, vm::Start::Boot);
            (built, Some((std::fs::File::from(file), request, header)))
        }
    };
    let built = built.map_err(ProcessError::Build)?;
    let t_built = t0.elapsed();
    jail(&run_dir, &shares).map_err(ProcessError::Jail)?;
    limit_resources().map_err(ProcessError::Limits)?;
    reduce_caps(if readonly {
        VMM_READONLY_CAPS
    } else {
        VMM_CAPS
    })
    .map_err(ProcessError::Caps)?;
    ready().map_err(ProcessError::Ready)?;
    tracing::debug!(
        ?run_dir,
        readonly,
        built = ?t_built,
        jailed = ?t0.elapsed(),
        "VMM: the VM is built and the process jailed; starting the vCPUs"
    );
    let mut vm = built.run().map_err(ProcessError::Run)?;
    if let Some((file, request, header)) = capture {
        return Ok(capture_when_asked(vm, &file, &request, header));
    }
    // Only now: the spawner and the vCPUs start from this thread and would
    // inherit its filter.
    if let Err(e) = vm.confine_waiter() {
        vm.kill();
        return Err(ProcessError::Seccomp(e));
    }
    Ok(serve_captures(vm, captures, header))
}

/// Runs the VM to its end, answering the parent's capture requests on
/// `channel` (krun_hypervisor::capture) as they come: each captured into
/// the file the request carries, with `header`, the VM going on or ending
/// as it asks. A forbidden system call of any thread is looked for every
/// [`VIOLATION_POLL`]. Runs under the main thread's filter.
fn serve_captures(
    mut vm: vm::BuiltinVm,
    channel: OwnedFd,
    header: crate::snapshot::Header,
) -> VmExit {
    use krun_hypervisor::capture;
    use std::os::fd::AsFd;
    let mut channel = Some(channel);
    loop {
        if let Ok(Some(exit)) = vm.try_wait() {
            return exit;
        }
        let Some(ch) = channel.as_ref() else {
            return vm.wait_until_end(VIOLATION_POLL);
        };
        if !vm.wait_for_request(ch.as_fd(), VIOLATION_POLL) {
            continue;
        }
        match capture::read_ask(ch.as_fd()) {
            // The parent is gone (it dies with its VMM's end in sight).
            Ok(None) => channel = None,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!(error = %e, "VMM: a malformed capture request");
                let _ = capture::answer(ch.as_fd(), Err(e.to_string()));
            }
            Ok(Some((then, file))) => {
                let started = Instant::now();
                let file = std::fs::File::from(file);
                let result = vm
                    .capture(&file, Path::new("the capture"), header.clone(), then)
                    .map_err(|e| krun_hypervisor::error_chain(&e));
                tracing::debug!(took = ?started.elapsed(), ?then, ok = result.is_ok(), "VMM: capture");
                if let Err(e) = capture::answer(ch.as_fd(), result) {
                    tracing::warn!(error = %e, "VMM: cannot answer a capture request");
                }
            }
        }
    }
}

/// A template's VMM: runs the VM until a byte arrives on `request`, then
/// captures it into `file` and ends it. Its main thread stays without the
/// main thread's filter (it reads the KVM state and writes the file): a
/// template's guest runs only the runtime's own kernel, initramfs and
/// guest-init, never a container's code, and the vCPU and device threads
/// keep their own filters.
fn capture_when_asked(
    mut vm: vm::BuiltinVm,
    file: &std::fs::File,
    request: &OwnedFd,
    header: crate::snapshot::Header,
) -> VmExit {
    use std::os::fd::AsRawFd;
    loop {
        if let Ok(Some(exit)) = vm.try_wait() {
            return exit;
        }
        let mut pfd = libc::pollfd {
            fd: request.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, VIOLATION_POLL.as_millis() as i32) };
        if n <= 0 {
            continue;
        }
        let mut byte = [0u8; 1];
        // SAFETY: read(2) into a one-byte buffer that outlives the call.
        let got = unsafe { libc::read(request.as_raw_fd(), byte.as_mut_ptr().cast(), 1) };
        if got != 1 {
            // The parent is gone without asking: no capture.
            vm.kill();
            return VmExit::VmmFailed {
                code: 1,
                detail: "the template's builder went away before asking for the capture".into(),
            };
        }
        let started = Instant::now();
        return match vm.capture(file, Path::new("the template"), header, AfterCapture::End) {
            Ok(()) => {
                tracing::debug!(took = ?started.elapsed(), "VMM: template captured");
                VmExit::GuestStopped
            }
            Err(e) => VmExit::VmmFailed {
                code: 1,
                detail: krun_hypervisor::error_chain(&e),
            },
        };
    }
}

/// The VMM's own log lines (the `tracing` events of this crate and of
/// krun_hypervisor) go to its stderr, the capped `vmm.log`: info and
/// above, debug too when the parent logs debug. One `write` per line,
/// which every thread's filter allows.
fn log_to_stderr(debug: bool) {
    let level = if debug {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let _ = tracing_subscriber::fmt()
        .with_writer(io::stderr)
        .with_max_level(level)
        .with_thread_names(true)
        .try_init();
}

/// The descriptor the parent passed at `fd`.
fn take_fd(fd: RawFd) -> Result<OwnedFd, ProcessError> {
    // SAFETY: fcntl(F_GETFD) only asks whether `fd` is open.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(ProcessError::Fd(fd, io::Error::last_os_error()));
    }
    // SAFETY: `fd` is open, put there by the parent (spawn's dup2), and
    // nothing else in this process owns it: `main` runs first, and takes
    // each number once.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Names the process [`NAME`] (it would show as `exe`).
fn name_process() {
    let name = c"krun-vmm";
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16
    // bytes, which outlives the call.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

/// Enters the jail (module doc, step 2): only the shares, at their paths,
/// and this process's own descriptor table.
fn jail(run_dir: &Path, shares: &[Share]) -> io::Result<()> {
    let mut jail = Jail::new(&run_dir.join(JAIL_DIR))?;
    for share in shares {
        // Canonical, as the virtio-fs server imports it.
        let path = share.path.canonicalize()?;
        jail.bind(&path, &path)?;
    }
    // Bound from inside the new mount namespace, where `self` is this
    // process: its `fd` directory, nothing else of `/proc`.
    jail.bind(Path::new(PROC_SELF_FD), Path::new(PROC_SELF_FD))?;
    jail.enter()
}

/// Sets the resource limits (module doc, step 3).
fn limit_resources() -> io::Result<()> {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit read or write one rlimit, which
    // outlives the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) != 0 {
            return Err(io::Error::last_os_error());
        }
        l.rlim_max = l.rlim_cur;
        if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
            return Err(io::Error::last_os_error());
        }
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::setrlimit(libc::RLIMIT_CORE, &none) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Tells the parent the VM is ready (one byte on stdout), then points
/// stdout at the log.
fn ready() -> io::Result<()> {
    // SAFETY: write(2) of one byte from a static buffer; dup2 takes
    // integers.
    unsafe {
        if libc::write(READY_FD, [1u8].as_ptr().cast(), 1) != 1 {
            return Err(io::Error::last_os_error());
        }
        if libc::dup2(libc::STDERR_FILENO, READY_FD) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_configuration_survives_the_pipe() {
        let w = Wire {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "quiet".into(),
            vcpus: 2,
            memory_mib: 512,
            shares: vec![WireShare {
                tag: "root".into(),
                path: "/run/s".into(),
                readonly: false,
            }],
            control_port_name: "ctl".into(),
            macs: vec!["02:00:00:00:00:01".into()],
            log_limit: 1 << 20,
            run_dir: "/run/r".into(),
            // What Wire::of gives without a subscriber that logs debug.
            debug: false,
            snapshot: Some(WireSnapshot::Capture {
                kernel: "k".into(),
                initramfs: "i".into(),
            }),
        };
        let json = serde_json::to_vec(&w).unwrap();
        let back: Wire = serde_json::from_slice(&json).unwrap();
        assert_eq!(back, w);
        let mut asked = Vec::new();
        let config = back
            .into_config(|fd| {
                asked.push(fd);
                std::fs::File::open("/dev/null").map(OwnedFd::from)
            })
            .unwrap();
        assert_eq!(
            asked,
            [NET_FD, SNAPSHOT_FD, REQUEST_FD, CONTROL_FD, CONSOLE_FD]
        );
        assert_eq!(Wire::of(&config), w);
    }

    #[test]
    fn only_the_hidden_argument_makes_the_vmm() {
        assert!(is_vmm(Some(OsStr::new("__krun-vmm"))));
        assert!(!is_vmm(Some(OsStr::new("create"))));
        assert!(!is_vmm(None));
    }
}
