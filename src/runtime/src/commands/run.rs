//! `krun-oci run`: create, start and wait for a container in the
//! foreground. It exits with the workload's status (128+n for a signal, as
//! `runc run` does) and the container's state is removed when done. The
//! monitor is this process, or, where the host has a unified cgroup
//! hierarchy, a child forked straight into the container's cgroup, which
//! this process then joins and waits for (see `wait_for_monitor`).
//!
//! Like `create`'s monitor, it is confined (no_new_privs, the deny-list,
//! the monitor's capabilities: [`krun_hypervisor::Confinement::monitor`])
//! once the container is planned and its cgroup joined, before its first
//! thread and before the VM: a process that lives as long as the container
//! and serves its guest keeps no more than the monitor does. The hooks it
//! runs (all of them, poststop included) inherit that confinement.

use super::Context;
use crate::error::{Error, Result, ResultExt as _};
use crate::hooks;
use crate::monitor::{MainStdio, Monitor};
use crate::relay::SignalForwarder;
use crate::session::SessionError;

pub fn run(ctx: &Context, args: &liboci_cli::Run) -> Result<i32> {
    let id = &args.container_id;
    if args.detach {
        return Err(Error::Unsupported(
            "run --detach is not supported yet; use create and start".into(),
        ));
    }
    super::create::refuse_preserved_fds(args.preserve_fds)?;
    // Held until the forwarder runs, which is after the confinement: its
    // thread would otherwise keep every capability (they are per thread).
    let held = HeldSignals::block().context("blocking signals")?;
    let stdio = match &args.console_socket {
        Some(p) => MainStdio::ConsoleSocket(p.clone()),
        None => MainStdio::Inherit,
    };
    let bundle = crate::bundle::Bundle::load(&args.bundle)?;
    if let Some(leader) = crate::pod::leader_of(&bundle.spec, &ctx.root)? {
        return Err(Error::Unsupported(format!(
            "linux.namespaces: the container joins container {:?}, so it runs in that \
             container's VM; `run` cannot do that: create and start it",
            leader.id
        )));
    }
    let mut launch = super::create::launch(ctx, id, bundle, stdio)?;
    let cgroup = super::create::host_cgroup(ctx, &mut launch)?;
    // Where there is a unified hierarchy (cgroup v2, or a hybrid host's
    // `unified`), the monitor is a child forked straight into the cgroup
    // there, as `create`'s is: moving this process in through
    // `cgroup.procs` would wait for an RCU grace period (6-22 ms) before
    // the VM could start. This process joins afterwards, while the
    // monitor sets up, and waits for it, forwarding signals (see
    // `wait_for_monitor`).
    let into = match cgroup.cgroup() {
        Some(cg) => cg.unified_dir()?,
        None => None,
    };
    if let Some(dir) = into {
        match super::create::fork_monitor(Some(&dir)).context("cannot fork the monitor")? {
            (0, placed) => {
                drop(dir);
                // Killing `run` kills the monitor, as when it was one.
                // SAFETY: prctl(PR_SET_PDEATHSIG) has no memory effects.
                unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
                // The cgroup is the parent's to remove, once we are gone.
                if let Some(cg) = cgroup.keep() {
                    cg.join_self(placed)?;
                }
                return monitor(ctx, args, launch, held);
            }
            (pid, _) => {
                drop(dir);
                // The monitor owns the state directory now.
                let mut launch = launch;
                launch.state_dir.keep();
                drop(launch);
                return wait_for_monitor(pid, cgroup, held);
            }
        }
    }
    // This process is the monitor: it joins the host cgroup, and leaves and
    // removes it when `cgroup` goes, on every way out.
    if let Some(cg) = cgroup.cgroup() {
        cg.join_self(false)?;
    }
    let code = monitor(ctx, args, launch, held);
    drop(cgroup);
    code
}

/// Waits for the monitor `pid`, forked into `cgroup`, and returns the exit
/// code it ended with (128+n for a signal). Meanwhile this process joins
/// the cgroup too, confines itself as the monitor is confined, and
/// forwards to the monitor each signal sent to it, but those the terminal
/// sent (`SI_KERNEL`: the monitor, in the same process group, got them
/// too). At the end it leaves and removes the cgroup.
fn wait_for_monitor(
    pid: libc::pid_t,
    cgroup: crate::cgroups::Owned,
    held: HeldSignals,
) -> Result<i32> {
    use nix::sys::signal::{SigSet, SigmaskHow, Signal};
    let kill_monitor = || {
        // SAFETY: kill has no memory effects; `pid` is our unreaped child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        let mut st = 0;
        // SAFETY: waitpid on our child.
        unsafe { libc::waitpid(pid, &mut st, 0) };
    };
    let mut set = held.0;
    set.add(Signal::SIGCHLD);
    nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), None)
        .map_err(std::io::Error::from)
        .context("blocking signals")?;
    if let Some(cg) = cgroup.cgroup() {
        if let Err(e) = cg.join_self(false) {
            kill_monitor();
            return Err(e.into());
        }
    }
    if let Err(e) = super::create::confine_monitor() {
        kill_monitor();
        return Err(std::io::Error::other(format!("{e:#}"))).context("confining the runtime");
    }
    let ended = |st: i32| {
        if libc::WIFEXITED(st) {
            Some(libc::WEXITSTATUS(st))
        } else if libc::WIFSIGNALED(st) {
            Some(128 + libc::WTERMSIG(st))
        } else {
            None
        }
    };
    let code = loop {
        let mut st = 0;
        // SAFETY: waitpid on our child, not blocking.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            if let Some(code) = ended(st) {
                break code;
            }
        }
        // SAFETY: an all-zero siginfo_t is valid for the kernel to fill.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let set_ref: &SigSet = &set;
        // SAFETY: sigwaitinfo reads the set and writes `info`, both ours.
        let sig = unsafe { libc::sigwaitinfo(set_ref.as_ref(), &mut info) };
        if sig > 0 && sig != libc::SIGCHLD && info.si_code != libc::SI_KERNEL {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(pid, sig) };
        }
    };
    drop(cgroup);
    Ok(code)
}

/// The container's life in the foreground, in the monitor (this process,
/// or the child `run` forked): confinement, the VM, the hooks, the
/// process's exit code.
fn monitor(
    ctx: &Context,
    args: &liboci_cli::Run,
    launch: crate::monitor::Launch,
    held: HeldSignals,
) -> Result<i32> {
    let id = &args.container_id;
    super::create::confine_monitor()
        .map_err(|e| std::io::Error::other(format!("{e:#}")))
        .context("confining the runtime")?;
    let signals = SignalForwarder::install().context("installing signal handlers")?;
    drop(held);
    let spec = launch.bundle.spec.clone();
    let mut monitor = Monitor::prepare(launch)?;
    let hooked = super::create::create_hooks(ctx, id, &spec).and_then(|()| {
        Ok(hooks::run(
            hooks::Kind::StartContainer,
            &spec,
            &monitor.oci_state(),
        )?)
    });
    if let Err(e) = hooked {
        // The process never runs: the container is taken down at once and
        // its poststop hooks run, as runc's destroy does after a failed
        // hook (their failures only warn).
        take_down(monitor, &spec);
        return Err(e);
    }
    if let Some(p) = &args.pid_file {
        if let Err(e) = super::create::write_pid_file(p, std::process::id() as i32) {
            take_down(monitor, &spec);
            return Err(e);
        }
    }
    signals.attach(monitor.sender());
    let started = monitor.start_now();
    if started.is_ok() {
        hooks::run_warn(hooks::Kind::Poststart, &spec, &monitor.oci_state());
    }
    let mut stopped = monitor.oci_state();
    stopped["status"] = "stopped".into();
    if let Err(e) = started {
        let _ = monitor.serve(false);
        hooks::run_warn(hooks::Kind::Poststop, &spec, &stopped);
        return Err(match e {
            SessionError::Process { code, message } => Error::Exit { code, message },
            source => Error::Vm {
                id: id.clone(),
                source,
            },
        });
    }
    let result = monitor.serve(false);
    hooks::run_warn(hooks::Kind::Poststop, &spec, &stopped);
    match result {
        Ok(outcome) => Ok(outcome.status.shell_code()),
        Err(source) => Err(Error::Vm {
            id: id.clone(),
            source,
        }),
    }
}

/// Stops a container whose process never started, removes everything of
/// it, then runs its poststop hooks with its state, now `stopped`.
fn take_down(monitor: Monitor, spec: &oci_spec::runtime::Spec) {
    let mut stopped = monitor.oci_state();
    stopped["status"] = "stopped".into();
    stopped["pid"] = 0.into();
    monitor.abort();
    hooks::run_warn(hooks::Kind::Poststop, spec, &stopped);
}

/// The forwarded signals blocked on the calling thread until dropped; one
/// of each that arrives meanwhile stays pending and is delivered then.
struct HeldSignals(nix::sys::signal::SigSet);

impl HeldSignals {
    fn block() -> std::io::Result<HeldSignals> {
        use nix::sys::signal::{SigSet, SigmaskHow, Signal};
        let mut set = SigSet::empty();
        for &sig in crate::relay::FORWARDED {
            if let Ok(s) = Signal::try_from(sig) {
                set.add(s);
            }
        }
        let mut old = SigSet::empty();
        nix::sys::signal::pthread_sigmask(SigmaskHow::SIG_BLOCK, Some(&set), Some(&mut old))?;
        // Only what was not blocked before is unblocked again.
        let mut added = SigSet::empty();
        for s in set.iter() {
            if !old.contains(s) {
                added.add(s);
            }
        }
        Ok(HeldSignals(added))
    }
}

impl Drop for HeldSignals {
    fn drop(&mut self) {
        let _ = nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_UNBLOCK,
            Some(&self.0),
            None,
        );
    }
}
