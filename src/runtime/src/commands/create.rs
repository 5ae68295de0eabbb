//! `krun-oci create`: boot the VM and prepare the container up to the exec
//! of its process, in a monitor process whose pid goes into the pid file.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use super::Context;
use crate::assets::Assets;
use crate::bundle::Bundle;
use crate::cgroups;
use crate::container::Existing;
use crate::error::{Error, Result, ResultExt as _};
use crate::hooks;
use crate::monitor::{exit_like, Launch, MainStdio, Monitor};
use crate::plan::{self, HostInfo};
use crate::relay::SignalForwarder;
use crate::state::StateDir;

/// Everything a container of its own VM (not joining another's: see
/// [`crate::pod::leader_of`]) needs before its VM boots: the bundle (loaded
/// once, by the caller), its plan, the backend, its state directory. Bad
/// input fails here, before anything is started.
pub fn launch(ctx: &Context, id: &str, bundle: Bundle, stdio: MainStdio) -> Result<Launch> {
    let mut plan = plan::plan(id, &bundle.dir, &bundle.spec, &HostInfo::detect())?;
    if ctx.no_template {
        plan.template = Some(false);
    }
    // Checked here too, where /proc is the host's, to fail before anything
    // starts (the monitor has a /proc of its own).
    if let Some(ns) = &plan.netns {
        crate::net::refuse_our_own(ns).map_err(|e| Error::Network {
            netns: ns.clone(),
            source: e.into(),
        })?;
    }
    for w in &plan.warnings {
        tracing::warn!(container = %id, "{w}");
    }
    if plan.setup.process.terminal && matches!(stdio, MainStdio::Inherit) && ctx.detached {
        return Err(Error::Invalid(
            "process.terminal is set, so create needs --console-socket (it cannot \
             allocate a terminal for a container it leaves running)"
                .into(),
        ));
    }
    let assets = Assets::find()?;
    tracing::debug!(container = %id, vcpus = plan.vcpus, memory_mib = plan.memory_mib, "planned VM");
    let hypervisor = crate::backend::choose(
        ctx.hypervisor.or(plan.hypervisor),
        ctx.require_kvm || plan.require_kvm,
        &assets,
    )?;
    // Before the container's cgroup: a template's build is not its.
    crate::template::prepare(hypervisor.as_ref(), &plan, &assets);
    let state_dir = StateDir::create(&ctx.root, id)?;
    Ok(Launch {
        notices: None,
        id: id.to_string(),
        bundle,
        plan,
        assets,
        hypervisor,
        state_dir,
        stdio,
        share_dir: None,
        console_copy: ctx.console_copy.clone(),
        restore: None,
    })
}

pub fn create(ctx: &Context, args: &liboci_cli::Create) -> Result<i32> {
    create_with(ctx, args, None)
}

/// A restore's VM expects the mount points guest-init made in the root
/// ([`crate::mount_points`]); an imported checkpoint's new root lacks them.
fn restore_mount_points(launch: &Launch) -> Result<()> {
    let Some(root) = launch.plan.paths.binds.first() else {
        return Ok(());
    };
    if launch.plan.setup.root.readonly {
        return Ok(());
    }
    let made = crate::mount_points::make(&root.source, &launch.plan.setup.mounts)
        .context("restoring the container's mount points")?;
    if !made.is_empty() {
        tracing::debug!(container = %launch.id, ?made, "made mount points for the restore");
    }
    Ok(())
}

/// A checkpoint's VM for [`create_with`] to restore instead of booting one.
pub(super) struct RestoreFrom {
    pub snapshot: std::fs::File,
    /// The name the VM knows the container by (the checkpointed one's).
    pub guest_id: String,
}

/// `create`, or with `restore` (a checkpoint's VM) `restore`: the same
/// set-up, the VM restored instead of booted, and the container running
/// when it returns.
pub(super) fn create_with(
    ctx: &Context,
    args: &liboci_cli::Create,
    restore: Option<RestoreFrom>,
) -> Result<i32> {
    let id = &args.container_id;
    refuse_preserved_fds(args.preserve_fds)?;
    // One that joins another container's namespaces runs in its VM.
    let bundle = Bundle::load(&args.bundle)?;
    if let Some(leader) = crate::pod::leader_of(&bundle.spec, &ctx.root)? {
        if restore.is_some() {
            return Err(Error::Unsupported(format!(
                "a container in another container's VM ({}'s) cannot be restored",
                leader.id
            )));
        }
        return super::member::create(ctx, args, bundle, leader);
    }
    let stdio = match &args.console_socket {
        Some(p) => MainStdio::ConsoleSocket(p.clone()),
        None => MainStdio::Inherit,
    };
    let ctx = Context {
        detached: true,
        ..ctx.clone()
    };
    let mut launch = launch(&ctx, id, bundle, stdio)?;
    if let Some(r) = restore {
        // The share is laid out as the VM knows it.
        launch.plan.paths.id = r.guest_id;
        restore_mount_points(&launch)?;
        launch.restore = Some(r.snapshot);
    }
    let cgroup = host_cgroup(&ctx, &mut launch)?;
    let spec = launch.bundle.spec.clone();
    let (mut ready_r, ready_w) = std::io::pipe().context("creating a pipe")?;
    // The monitor is the init of a PID namespace of its own: what runs on
    // the host for this container (the monitor, QEMU, virtiofsd) is all
    // that `podman top` sees in it, and if the monitor dies the kernel
    // kills every one of them.
    let own_pid_ns =
        std::fs::File::open("/proc/self/ns/pid").context("opening our PID namespace")?;
    // SAFETY: unshare has no memory effects; it only affects children.
    if unsafe { libc::unshare(libc::CLONE_NEWPID) } != 0 {
        return Err(std::io::Error::last_os_error())
            .context("cannot create a PID namespace for the monitor");
    }
    // On cgroup v2 the monitor starts inside its cgroup: no migration.
    let into = match cgroup.cgroup() {
        Some(cg) => cg.unified_dir()?,
        None => None,
    };
    match fork_monitor(into.as_ref()).context("cannot fork the monitor")? {
        (0, placed) => {
            drop(ready_r);
            drop(into);
            monitor_main(launch, ready_w, placed)
        }
        (pid, _) => {
            drop(into);
            drop(ready_w);
            // Our own later children (hooks) belong in our namespace.
            nix::sched::setns(&own_pid_ns, nix::sched::CloneFlags::CLONE_NEWPID)
                .context("returning to our PID namespace")?;
            // The monitor owns the state directory now.
            let mut launch = launch;
            launch.state_dir.keep();
            drop(launch);
            let mut report = String::new();
            let _ = ready_r.read_to_string(&mut report);
            if report.trim() == "ok" {
                if let Err(e) = create_hooks(&ctx, id, &spec) {
                    // The container is taken down, as the runtime-spec says,
                    // and its poststop hooks run, as runc's destroy runs
                    // them (their failures only warn).
                    let mut stopped = None;
                    if let Ok(c) = Existing::open(&ctx.root, id) {
                        let mut state = c.state.to_oci();
                        state["status"] = "stopped".into();
                        state["pid"] = 0.into();
                        stopped = Some(state);
                        let _ = super::lifecycle::stop_now(&c);
                        let _ = c.dir.remove();
                    }
                    super::reap(pid);
                    drop(cgroup);
                    if let Some(state) = stopped {
                        hooks::run_warn(hooks::Kind::Poststop, &spec, &state);
                    }
                    return Err(e);
                }
                // The container lives: its cgroup is delete's to remove.
                let _ = cgroup.keep();
                if let Some(p) = &args.pid_file {
                    write_pid_file(p, pid)?;
                }
                return Ok(0);
            }
            Err(super::child_failed(
                pid,
                &report,
                "the monitor died while creating the container",
            ))
        }
    }
}

/// `CLONE_INTO_CGROUP` (linux/sched.h), a clone3 flag.
const CLONE_INTO_CGROUP: u64 = 0x2_0000_0000;

/// `struct clone_args` of clone3, as far as `cgroup` (version 2).
#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}

/// Forks the monitor: 0 in the child, its pid in the parent, and whether
/// it started inside `cgroup` (a directory of the unified hierarchy, v2's
/// or a hybrid host's): there with `clone3(CLONE_INTO_CGROUP)`, as crun
/// does, so that it needs no migration there, whose write to
/// `cgroup.procs` waits an RCU grace period (6-22 ms measured on this
/// machine). A kernel without it (before 5.7) gets a plain fork, and the
/// monitor joins as [`cgroups::Cgroup::join_self`] says.
///
/// Only while no other thread runs (a fork copies the calling thread
/// alone). After the raw clone3 the child's C library still holds its
/// parent's thread id for the main thread: the monitor never signals its
/// own main thread by `pthread_kill` (nor `raise`s), and the threads it
/// starts get their own ids.
pub(super) fn fork_monitor(cgroup: Option<&OwnedFd>) -> std::io::Result<(libc::pid_t, bool)> {
    if let Some(dir) = cgroup {
        let args = CloneArgs {
            flags: CLONE_INTO_CGROUP,
            exit_signal: libc::SIGCHLD as u64,
            cgroup: dir.as_raw_fd() as u64,
            ..CloneArgs::default()
        };
        // SAFETY: clone3 without CLONE_VM and without a stack is a fork:
        // the child gets a copy of this single-threaded process. The
        // kernel reads `args` (alive for the call) and writes nothing back.
        let rc = unsafe {
            libc::syscall(
                libc::SYS_clone3,
                &args as *const CloneArgs,
                std::mem::size_of::<CloneArgs>(),
            )
        };
        match rc {
            -1 => {
                let e = std::io::Error::last_os_error();
                if !matches!(
                    e.raw_os_error(),
                    Some(libc::ENOSYS | libc::E2BIG | libc::EINVAL)
                ) {
                    return Err(e);
                }
                tracing::debug!(error = %e, "clone3(CLONE_INTO_CGROUP) unavailable; forking");
            }
            pid => return Ok((pid as libc::pid_t, true)),
        }
    }
    // SAFETY: fork in a single-threaded process; the child only continues
    // running this program.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()),
        pid => Ok((pid, false)),
    }
}

/// The container's cgroup on the host, created (in the create command,
/// before the monitor, so that a monitor that fails or dies still has its
/// cgroup removed here) and recorded in the plan, for the monitor to join
/// and keep in the state. Removed when the value goes, unless kept.
pub(super) fn host_cgroup(ctx: &Context, launch: &mut Launch) -> Result<cgroups::Owned> {
    let cg = cgroups::for_container(
        &launch.bundle.spec,
        &launch.id,
        ctx.systemd_cgroup,
        &launch.plan.host,
    )?;
    launch.plan.host_cgroup = Some(cg.paths().clone());
    Ok(cgroups::Owned::new(cg))
}

/// The hooks that run when a container is created, in the runtime-spec's
/// order, with its state on stdin. Its status is `creating`, as runc gives
/// these three (libcontainer sets `specs.StateCreating` for prestart and
/// createRuntime, and for createContainer in the container's init);
/// startContainer gets `created`, poststart `running`, poststop `stopped`.
pub fn create_hooks(ctx: &Context, id: &str, spec: &oci_spec::runtime::Spec) -> Result<()> {
    let c = Existing::open(&ctx.root, id)?;
    let mut state = c.state.to_oci();
    state["status"] = "creating".into();
    for kind in [
        hooks::Kind::Prestart,
        hooks::Kind::CreateRuntime,
        hooks::Kind::CreateContainer,
    ] {
        hooks::run(kind, spec, &state)?;
    }
    Ok(())
}

/// `--preserve-fds N`: host file descriptors cannot cross into a VM.
pub fn refuse_preserved_fds(n: i32) -> Result<()> {
    if n > 0 {
        return Err(Error::Unsupported(format!(
            "--preserve-fds {n}: host file descriptors cannot be passed into the container's VM"
        )));
    }
    Ok(())
}

/// The pid file: written atomically, as runc does, and never through a
/// link someone planted beside it.
pub fn write_pid_file(path: &Path, pid: i32) -> Result<()> {
    crate::state::replace_file(path, pid.to_string().as_bytes(), 0o644)
        .with_context(|| format!("--pid-file {}", path.display()))
}

/// Gives the monitor (init of its own PID namespace) a mount namespace
/// with a /proc of that namespace, so that what looks at the container's
/// pid through /proc (`podman top`) sees the VM's host processes and
/// nothing else of the host. Host mounts still propagate in.
fn own_proc() -> std::io::Result<()> {
    use nix::mount::{mount, MsFlags};
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)?;
    mount(
        None::<&str>,
        "/",
        None::<&str>,
        MsFlags::MS_REC | MsFlags::MS_SLAVE,
        None::<&str>,
    )?;
    mount(
        Some("proc"),
        "/proc",
        Some("proc"),
        MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
        None::<&str>,
    )?;
    Ok(())
}

/// NNP, the deny-list and the monitor's capabilities
/// ([`krun_hypervisor::Confinement::monitor`]: what preparing the VM and serving
/// it still need) for the monitor, all its threads and its children.
pub(super) fn confine_monitor() -> anyhow::Result<()> {
    let c = krun_hypervisor::Confinement::monitor()?;
    krun_hypervisor::confine_self(&c)?;
    Ok(())
}

/// The monitor's life: bring the container to `created`, tell the create
/// command, serve it, and exit as its process did.
fn monitor_main(launch: Launch, mut ready: std::io::PipeWriter, placed: bool) -> ! {
    // Its own session: the user's terminal's signals are not its own, and a
    // console terminal can become its controlling one.
    // SAFETY: setsid has no memory effects.
    unsafe { libc::setsid() };
    crate::state::capture_identity();
    let id = launch.id.clone();
    // Into the host cgroup first (the unified hierarchy's part done if it
    // started there; this process has one thread, so v1 hierarchies take
    // it without a grace period): every helper spawned from here on (QEMU,
    // virtiofsd) and every thread starts in it.
    if let Some(paths) = launch.plan.host_cgroup.as_ref() {
        if let Err(e) = cgroups::Cgroup::from_paths(paths.clone()).join_self(placed) {
            let _ = write!(ready, "1 {}", Error::from(e).message());
            std::process::exit(1);
        }
    }
    // Its pid on the host (it is pid 1 of its own PID namespace), noted
    // while the host's /proc is still its own: QEMU's jail uid is made of it.
    krun_hypervisor::note_host_pid();
    if let Err(e) = own_proc() {
        let _ = write!(ready, "1 cannot give the monitor its own /proc: {e}");
        std::process::exit(1);
    }
    // Confined before its first thread starts, so that every thread and
    // every helper (the built-in VMM's process included) inherits the
    // reduced capability sets: capabilities are per thread.
    if let Err(e) = confine_monitor() {
        let _ = write!(ready, "1 cannot confine the monitor: {e:#}");
        std::process::exit(1);
    }
    let signals = SignalForwarder::install();
    let monitor = match Monitor::prepare(launch) {
        Ok(m) => m,
        Err(e) => {
            let (code, msg) = (e.exit_code(), e.message());
            tracing::debug!(container = %id, error = %msg, "create failed");
            let _ = write!(ready, "{code} {msg}");
            std::process::exit(code);
        }
    };
    if let Ok(s) = &signals {
        s.attach(monitor.sender());
    }
    let _ = ready.write_all(b"ok");
    drop(ready);
    // Nothing of the create command's stdio but the container's own is
    // kept (conmon waits for the runtime's pipes to close).
    match monitor.serve(true) {
        Ok(outcome) => exit_like(outcome.status),
        Err(e) => {
            tracing::error!(container = %id, "{e:#}");
            exit_like(krun_proto::ExitStatus::Signal(libc::SIGKILL))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The monitor's fork lands in a cgroup v2 directory when given one:
    /// on this machine's hybrid layout the `unified` hierarchy, on a v2
    /// host the only one. Needs root.
    #[test]
    fn a_monitor_forked_into_a_v2_cgroup_starts_there() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root and a writable /sys/fs/cgroup: run it as root"
        );
        let layout = cgroups::Layout::detect().unwrap();
        let unified = layout.hierarchies.iter().find(|h| h.unified).unwrap();
        let name = format!("krun-oci-test-into-{}", std::process::id());
        let dir = unified.mount.join(&name);
        std::fs::create_dir(&dir).unwrap();
        let fd: OwnedFd = std::fs::File::open(&dir).unwrap().into();
        let want = format!("0::/{name}\n");
        let forked = fork_monitor(Some(&fd));
        if let Ok((0, _)) = forked {
            // The child: raw calls only (the test harness has threads).
            let mut buf = [0u8; 4096];
            // SAFETY: open/read/close on a NUL-terminated literal and a
            // stack buffer; _exit ends the child at once.
            unsafe {
                let f = libc::open(c"/proc/self/cgroup".as_ptr(), libc::O_RDONLY);
                let n = libc::read(f, buf.as_mut_ptr().cast(), buf.len());
                let text = &buf[..n.max(0) as usize];
                let found = text.windows(want.len()).any(|w| w == want.as_bytes());
                libc::_exit(if found { 0 } else { 1 });
            }
        }
        let status = forked.map(|(pid, placed)| {
            let mut st = 0;
            // SAFETY: waitpid writes the status of our own child.
            unsafe { libc::waitpid(pid, &mut st, 0) };
            (placed, st)
        });
        std::fs::remove_dir(&dir).unwrap();
        assert_eq!(status.unwrap(), (true, 0), "the child was not in {name}");
    }
}
