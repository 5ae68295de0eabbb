//! Creating the container: its cgroup, its stdio, and the child that
//! becomes its init (PID 1 of new PID, mount, UTS and IPC namespaces),
//! prepared up to the exec of the workload; and exec'ing more processes in
//! it. The pieces live beside this file: the cgroup in [`cgroup`] (its
//! device rules' program in [`device_program`]), stdio
//! and the terminal in [`stdio`], the child's setup report in [`report`],
//! the process list in [`ps`], the user namespace in [`userns`] (whose
//! doc says how the container gets one). None of them imports this module.

mod cgroup;
mod device_program;
mod ps;
mod report;
mod stdio;
mod userns;

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{OwnedFd, RawFd};
use std::path::{Path, PathBuf};

use krun_proto::{
    CgroupSetup, CgroupStats, ContainerSetup, ProcessInfo, ProcessSetup, UserNsSetup,
};

use crate::failure::{Failure, OrFail};
use crate::{mounts, process, sys};
use cgroup::OomEvents;
use stdio::ChildStdio;
pub use stdio::Stdio;

/// Pipes to a created, not yet started process.
pub struct Pending {
    start: OwnedFd,
    report: OwnedFd,
}

/// A created container.
pub struct Container {
    pub init_pid: i32,
    /// The stream of its main process.
    pub main_stream: u32,
    cgroup: PathBuf,
    oom: OomEvents,
    /// The maps of its user namespace, if it has one of its own (which
    /// exec'd processes join).
    user_ns: Option<UserNsSetup>,
}

impl Container {
    /// Removes what is left of the container once its processes are gone
    /// (its cgroup).
    pub fn remove(self) {
        cgroup::remove(&self.cgroup);
    }

    pub fn oom_fd(&self) -> Option<RawFd> {
        self.oom.fd()
    }

    /// True when the kernel OOM-killed something in the container since the
    /// last call.
    pub fn new_oom_kills(&mut self) -> bool {
        self.oom.new_kills()
    }

    /// What the container has used, from its cgroup.
    pub fn stats(&self) -> CgroupStats {
        cgroup::stats(&self.cgroup)
    }

    /// Changes the container's limits (`update`).
    pub fn update(&self, limits: &CgroupSetup) -> Result<(), Failure> {
        cgroup::apply_limits(&self.cgroup, limits)
    }

    /// Freezes (or thaws) every process of the container.
    pub fn freeze(&self, frozen: bool) -> Result<(), Failure> {
        cgroup::freeze(&self.cgroup, frozen)
    }

    /// The container's processes, with their pids as the container sees
    /// them.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        cgroup::pids(&self.cgroup)
            .into_iter()
            .filter_map(ps::process_info)
            .collect()
    }

    /// Sends `signal` to every process in the container's cgroup.
    pub fn signal_all(&self, signal: i32) {
        for pid in cgroup::pids(&self.cgroup) {
            let _ = sys::kill(pid, signal);
        }
    }
}

/// Creates the container: returns once its init is ready to exec, or with
/// the reason it cannot be.
/// `share`: a running container of the same pod whose IPC and UTS
/// namespaces this one joins. `stream`: the stream of its main process.
pub fn create(
    setup: &ContainerSetup,
    share: Option<&Container>,
    stream: u32,
) -> Result<(Container, Stdio, Pending), Failure> {
    let joined = match share {
        Some(c) => {
            let open = |ns: &str| {
                File::open(format!("/proc/{}/ns/{ns}", c.init_pid))
                    .or_fail(|| "joining the pod's namespaces".into())
            };
            vec![
                (open("ipc")?, libc::CLONE_NEWIPC),
                (open("uts")?, libc::CLONE_NEWUTS),
            ]
        }
        None => Vec::new(),
    };
    let cgroup = cgroup::create(&setup.id, &setup.cgroup, setup.device_rules.as_deref())?;
    let (stdio, child_stdio) = stdio::make(&setup.process)?;
    let (report_r, report_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    let (start_r, start_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    // A pod's container joins the user namespace of the container it
    // shares the VM with, when that one has one (a user-namespaced pod).
    let join_user = match (share, &setup.user_ns) {
        (Some(c), Some(ns)) if c.user_ns.is_some() => {
            if c.user_ns.as_ref() != Some(ns) {
                return Err(Failure::new(
                    1,
                    "linux.uidMappings: the pod's user namespace is joined, but these \
                     mappings differ from its",
                ));
            }
            Some(
                File::open(format!("/proc/{}/ns/user", c.init_pid))
                    .or_fail(|| "joining the pod's user namespace".into())?,
            )
        }
        _ => None,
    };
    let userns = match &setup.user_ns {
        Some(_) if join_user.is_none() => Some(userns::pipes()?),
        _ => None,
    };
    let (outside, inside) = userns.unzip();
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS;
    if joined.is_empty() {
        flags |= libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    let pid = sys::fork_into(flags).or_fail(|| "creating the container's namespaces".into())?;
    if pid == 0 {
        drop((report_r, start_w, stdio, outside));
        for (ns, kind) in &joined {
            if let Err(e) = sys::setns(ns, *kind) {
                let f = Failure::new(1, format!("joining the pod's namespaces: {e}"));
                report::fail_and_exit(&report_w, f);
            }
        }
        let userns = match join_user {
            Some(ns) => Some(userns::UserNs::Join(ns)),
            None => inside.map(userns::UserNs::New),
        };
        child(setup, &cgroup, child_stdio, userns, report_w, start_r);
    }
    drop(join_user);
    drop((report_w, start_r, child_stdio, inside));
    let mapped = match (outside, &setup.user_ns) {
        (Some(o), Some(ns)) => o.map(pid, ns),
        _ => Ok(()),
    };
    let mut report = File::from(report_r);
    // A failed mapping lets the child fail too; its report is the echo.
    let reported = report::read(&mut report, false);
    mapped?;
    reported?;
    let stdio = stdio.finish()?;
    let oom = OomEvents::open(&cgroup);
    let mut c = Container {
        init_pid: pid,
        main_stream: stream,
        cgroup,
        oom,
        user_ns: setup.user_ns.clone(),
    };
    c.new_oom_kills();
    Ok((
        c,
        stdio,
        Pending {
            start: start_w,
            report: report.into(),
        },
    ))
}

/// Lets the created process exec; returns once it did, or why it could not.
pub fn start(pending: Pending) -> Result<(), Failure> {
    let mut start = File::from(pending.start);
    start
        .write_all(b"s")
        .or_fail(|| "starting the container process".into())?;
    drop(start);
    let mut report = File::from(pending.report);
    // End of file without a record: the exec succeeded.
    report::read(&mut report, true)
}

/// The container's init, between clone and exec. Never returns.
fn child(
    setup: &ContainerSetup,
    cgroup: &Path,
    stdio: ChildStdio,
    userns: Option<userns::UserNs>,
    report: OwnedFd,
    start: OwnedFd,
) -> ! {
    let exe = match prepare(setup, cgroup, stdio, userns) {
        Ok(exe) => exe,
        Err(f) => report::fail_and_exit(&report, f),
    };
    report::ready(&report);
    let mut go = [0u8; 1];
    if File::from(start).read(&mut go).unwrap_or(0) == 0 {
        // guest-init is gone, or the host deleted the container unstarted.
        sys::exit_now(1);
    }
    report::fail_and_exit(&report, process::exec(&exe, &setup.process));
}

/// The first steps of a container process after the fork: a clean signal
/// state, a session of its own, its stdio and the container's cgroup.
fn enter(stdio: &ChildStdio, cgroup: &Path) -> Result<(), Failure> {
    sys::reset_signals();
    sys::setsid();
    stdio.dup_pipes()?;
    cgroup::join(cgroup)
}

fn set_oom_score_adj(adj: Option<i32>) -> Result<(), Failure> {
    match adj {
        Some(adj) => std::fs::write("/proc/self/oom_score_adj", adj.to_string())
            .or_fail(|| "process.oomScoreAdj".into()),
        None => Ok(()),
    }
}

/// Everything up to the exec, in the order runc does it. Returns the
/// resolved path of the program.
fn prepare(
    setup: &ContainerSetup,
    cgroup: &Path,
    stdio: ChildStdio,
    userns: Option<userns::UserNs>,
) -> Result<PathBuf, Failure> {
    enter(&stdio, cgroup)?;
    // Its own cgroup namespace, rooted at its cgroup: /sys/fs/cgroup in the
    // container shows the container's limits, as under runc.
    sys::unshare(libc::CLONE_NEWCGROUP)
        .or_fail(|| "creating the container's cgroup namespace".into())?;
    set_oom_score_adj(setup.process.oom_score_adj)?;
    mounts::setup_root(setup)?;
    process::set_rlimits(&setup.process)?;
    if let Some(inside) = userns {
        inside.enter()?;
        mounts::mount_in_user_ns(setup)?;
    }
    // In the user namespace, if any: the owner is the container's uid.
    if let ChildStdio::Tty { sock, size, uid } = stdio {
        stdio::attach_terminal(&sock, size, uid)?;
    }
    mounts::set_root_propagation(setup)?;
    process::apply(&setup.process)
}

/// `uid` as the initial user namespace knows it: through the container's
/// uid map, if it has a user namespace.
fn outside_uid(ns: Option<&UserNsSetup>, uid: u32) -> Result<u32, Failure> {
    match ns {
        None => Ok(uid),
        Some(ns) => ns.host_uid(uid).ok_or_else(|| {
            Failure::new(
                1,
                format!("process.user.uid: {uid} is not mapped in linux.uidMappings"),
            )
        }),
    }
}

/// Runs one more process in the running container `c`: in its namespaces,
/// its root and its cgroup. Returns once the program was exec'd.
pub fn exec(c: &Container, p: &ProcessSetup) -> Result<(i32, Stdio), Failure> {
    let open =
        |path: String| File::open(&path).or_fail(|| format!("entering the container: {path}"));
    let open_ns = |kind: &str| open(format!("/proc/{}/ns/{kind}", c.init_pid));
    let pid_ns = open_ns("pid")?;
    let own_pid_ns = open("/proc/self/ns/pid".into())?;
    let others = [
        (open_ns("uts")?, libc::CLONE_NEWUTS),
        (open_ns("ipc")?, libc::CLONE_NEWIPC),
        (open_ns("cgroup")?, libc::CLONE_NEWCGROUP),
        (open_ns("mnt")?, libc::CLONE_NEWNS),
    ];
    let user_ns = if c.user_ns.is_some() {
        Some(open_ns("user")?)
    } else {
        None
    };
    let root = open(format!("/proc/{}/root", c.init_pid))?;
    let (stdio, child_stdio) = stdio::make(p)?;
    let (report_r, report_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    // New children of guest-init go into the container's pid namespace
    // until it switches back right after the fork.
    sys::setns(&pid_ns, libc::CLONE_NEWPID)
        .or_fail(|| "entering the container's pid namespace".into())?;
    let forked = sys::fork_into(0);
    let restored = sys::setns(&own_pid_ns, libc::CLONE_NEWPID);
    let pid = forked.or_fail(|| "starting the process".into())?;
    if pid == 0 {
        drop((report_r, stdio));
        let f = match exec_child(c, p, &others, user_ns, &root, child_stdio) {
            Ok(exe) => process::exec(&exe, p),
            Err(f) => f,
        };
        report::fail_and_exit(&report_w, f);
    }
    restored.or_fail(|| "leaving the container's pid namespace".into())?;
    drop((report_w, child_stdio));
    let mut report = File::from(report_r);
    report::read(&mut report, true)?;
    Ok((pid, stdio.finish()?))
}

/// The exec'd process between fork and exec: join the container, apply the
/// process config. Returns the program to exec.
fn exec_child(
    c: &Container,
    p: &ProcessSetup,
    ns: &[(File, libc::c_int)],
    user_ns: Option<File>,
    root: &File,
    stdio: ChildStdio,
) -> Result<PathBuf, Failure> {
    enter(&stdio, &c.cgroup)?;
    set_oom_score_adj(p.oom_score_adj)?;
    for (f, kind) in ns {
        sys::setns(f, *kind).or_fail(|| "entering the container's namespaces".into())?;
    }
    sys::fchdir(root).or_fail(|| "entering the container's root".into())?;
    sys::chroot(Path::new(".")).or_fail(|| "entering the container's root".into())?;
    std::env::set_current_dir("/").or_fail(|| "entering /".into())?;
    if let ChildStdio::Tty { sock, size, uid } = stdio {
        // Still outside the user namespace: the owner as it is seen here.
        let uid = outside_uid(c.user_ns.as_ref(), uid)?;
        stdio::attach_terminal(&sock, size, uid)?;
    }
    process::set_rlimits(p)?;
    if let Some(ns) = user_ns {
        sys::setns(&ns, libc::CLONE_NEWUSER)
            .or_fail(|| "entering the container's user namespace".into())?;
        userns::become_root()?;
    }
    process::apply(p)
}
