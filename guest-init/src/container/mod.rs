//! Creating the container: its cgroup, its stdio, and the child that
//! becomes its init (PID 1 of new PID, mount, UTS and IPC namespaces),
//! prepared up to the exec of the workload.

use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use krun_proto::{CgroupSetup, CgroupStats, ContainerSetup, ProcessInfo, ProcessSetup};

use crate::failure::{Failure, OrFail};
use crate::{mounts, process, sys};

/// guest-init's ends of a process's stdio.
#[derive(Default)]
pub struct Stdio {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The pty master when the process has a terminal (also in stdin/stdout).
    pub tty: Option<File>,
}

/// The child's side of its stdio.
enum ChildStdio {
    /// Pipe ends, dup'ed onto 0, 1 and 2.
    Pipes([OwnedFd; 3]),
    /// The child allocates a pty in the container's own devpts (so that
    /// `tty` and job control work inside) and sends the master back.
    Tty {
        sock: OwnedFd,
        size: Option<(u16, u16)>,
        uid: u32,
    },
}

/// guest-init's side until the child is ready.
enum ParentStdio {
    Ready(Stdio),
    /// The pty master arrives over this socket.
    Tty(OwnedFd),
}

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
    oom_events: Option<File>,
    oom_kills: u64,
}

impl Container {
    /// Removes what is left of the container once its processes are gone
    /// (its cgroup).
    pub fn remove(self) {
        for _ in 0..100 {
            if fs::remove_dir(&self.cgroup).is_ok() || !self.cgroup.exists() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(2));
        }
    }

    pub fn oom_fd(&self) -> Option<i32> {
        self.oom_events.as_ref().map(|f| f.as_raw_fd())
    }

    /// True when the kernel OOM-killed something in the container since the
    /// last call.
    pub fn new_oom_kills(&mut self) -> bool {
        let Some(f) = self.oom_events.as_mut() else {
            return false;
        };
        let mut text = String::new();
        if f.rewind().is_err() || f.read_to_string(&mut text).is_err() {
            return false;
        }
        let kills = text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let new = kills > self.oom_kills;
        self.oom_kills = kills;
        new
    }

    /// What the container has used, from its cgroup.
    pub fn stats(&self) -> CgroupStats {
        let read = |f: &str| fs::read_to_string(self.cgroup.join(f)).unwrap_or_default();
        let keyed = |text: &str, key: &str| -> u64 {
            text.lines()
                .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0)
        };
        let num = |f: &str, unlimited: u64| -> u64 {
            let t = read(f);
            let t = t.trim();
            if t == "max" {
                unlimited
            } else {
                t.parse().unwrap_or(0)
            }
        };
        let cpu = read("cpu.stat");
        let mem = read("memory.stat");
        CgroupStats {
            cpu_usage_usec: keyed(&cpu, "usage_usec"),
            cpu_user_usec: keyed(&cpu, "user_usec"),
            cpu_system_usec: keyed(&cpu, "system_usec"),
            memory_usage: num("memory.current", 0),
            memory_limit: num("memory.max", u64::MAX),
            memory_anon: keyed(&mem, "anon"),
            memory_file: keyed(&mem, "file"),
            pids_current: num("pids.current", 0),
            pids_limit: num("pids.max", 0),
        }
    }

    /// Changes the container's limits (`update`).
    pub fn update(&self, limits: &CgroupSetup) -> Result<(), Failure> {
        apply_limits(&self.cgroup, limits)
    }

    /// The container's processes, with their pids as the container sees
    /// them.
    pub fn processes(&self) -> Vec<ProcessInfo> {
        let procs = fs::read_to_string(self.cgroup.join("cgroup.procs")).unwrap_or_default();
        procs
            .lines()
            .filter_map(|l| l.trim().parse::<i32>().ok())
            .filter_map(process_info)
            .collect()
    }

    /// Sends `signal` to every process in the container's cgroup.
    pub fn signal_all(&self, signal: i32) {
        if let Ok(procs) = fs::read_to_string(self.cgroup.join("cgroup.procs")) {
            for pid in procs.lines().filter_map(|l| l.trim().parse::<i32>().ok()) {
                let _ = sys::kill(pid, signal);
            }
        }
    }
}

/// Writes `limits` into the cgroup at `dir`; limits left unset are kept.
fn apply_limits(dir: &Path, limits: &CgroupSetup) -> Result<(), Failure> {
    let set = |file: &str, value: String| {
        fs::write(dir.join(file), &value)
            .or_fail(|| format!("setting {file} to {value} in the guest's cgroup"))
    };
    if let Some(m) = limits.memory_max {
        set("memory.max", m.to_string())?;
        // No swap in the guest; say so explicitly for kernels that have it.
        let _ = fs::write(dir.join("memory.swap.max"), "0");
    }
    if let Some(p) = limits.pids_max {
        set(
            "pids.max",
            if p < 0 {
                "max".to_string()
            } else {
                p.to_string()
            },
        )?;
    }
    if let Some((quota, period)) = limits.cpu_max {
        let q = if quota < 0 {
            "max".to_string()
        } else {
            quota.to_string()
        };
        set("cpu.max", format!("{q} {period}"))?;
    }
    if let Some(w) = limits.cpu_weight {
        set("cpu.weight", w.to_string())?;
    }
    Ok(())
}

/// The container's cgroup in the guest, with the bundle's limits.
fn make_cgroup(id: &str, limits: &CgroupSetup) -> Result<PathBuf, Failure> {
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let dir = Path::new("/sys/fs/cgroup").join(format!("krun-{name}"));
    fs::create_dir_all(&dir).or_fail(|| format!("creating cgroup {}", dir.display()))?;
    apply_limits(&dir, limits)?;
    Ok(dir)
}

fn make_stdio(p: &ProcessSetup) -> Result<(ParentStdio, ChildStdio), Failure> {
    if p.terminal {
        let (parent, child) = sys::socketpair().or_fail(|| "allocating a terminal".into())?;
        return Ok((
            ParentStdio::Tty(parent),
            ChildStdio::Tty {
                sock: child,
                size: p.console_size,
                uid: p.uid,
            },
        ));
    }
    let pipe = || sys::pipe().or_fail(|| "creating stdio pipes".into());
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    sys::set_nonblocking(&in_w).or_fail(|| "creating stdio pipes".into())?;
    let stdio = Stdio {
        stdin: Some(in_w.into()),
        stdout: Some(out_r.into()),
        stderr: Some(err_r.into()),
        tty: None,
    };
    Ok((
        ParentStdio::Ready(stdio),
        ChildStdio::Pipes([in_r, out_w, err_w]),
    ))
}

impl ParentStdio {
    /// The stdio of a child that reported ready.
    fn finish(self) -> Result<Stdio, Failure> {
        match self {
            ParentStdio::Ready(s) => Ok(s),
            ParentStdio::Tty(sock) => {
                let master = sys::recv_fd(&sock).or_fail(|| "receiving the terminal".into())?;
                sys::set_nonblocking(&master).or_fail(|| "receiving the terminal".into())?;
                let m = File::from(master);
                let dup = |f: &File| f.try_clone().or_fail(|| "receiving the terminal".into());
                Ok(Stdio {
                    stdin: Some(dup(&m)?),
                    stdout: Some(dup(&m)?),
                    stderr: None,
                    tty: Some(m),
                })
            }
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
    let cgroup = make_cgroup(&setup.id, &setup.cgroup)?;
    let (stdio, child_stdio) = make_stdio(&setup.process)?;
    let (report_r, report_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    let (start_r, start_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    let mut flags = libc::CLONE_NEWPID | libc::CLONE_NEWNS;
    if joined.is_empty() {
        flags |= libc::CLONE_NEWUTS | libc::CLONE_NEWIPC;
    }
    let pid = sys::fork_into(flags).or_fail(|| "creating the container's namespaces".into())?;
    if pid == 0 {
        drop((report_r, start_w, stdio));
        for (ns, kind) in &joined {
            if let Err(e) = sys::setns(ns, *kind) {
                let f = Failure::new(1, format!("joining the pod's namespaces: {e}"));
                report_and_exit(&report_w, f);
            }
        }
        child(setup, &cgroup, child_stdio, report_w, start_r);
    }
    drop((report_w, start_r, child_stdio));
    let mut report = File::from(report_r);
    read_report(&mut report, false)?;
    let stdio = stdio.finish()?;
    let oom_events = File::open(cgroup.join("memory.events")).ok();
    let mut c = Container {
        init_pid: pid,
        main_stream: stream,
        cgroup,
        oom_events,
        oom_kills: 0,
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
    match read_report(&mut report, true) {
        // End of file without a record: the exec succeeded.
        Ok(()) => Ok(()),
        Err(f) => Err(f),
    }
}

/// Records the child writes on the report pipe: a tag byte (`R`eady or
/// `E`rror), the exit code (i32 LE), then the message up to end of file.
fn write_report(fd: &OwnedFd, tag: u8, code: i32, message: &str) {
    let mut rec = vec![tag];
    rec.extend_from_slice(&code.to_le_bytes());
    rec.extend_from_slice(message.as_bytes());
    let mut f = fs::File::from(fd.try_clone().expect("dup of the report pipe"));
    let _ = f.write_all(&rec);
}

/// Reports `f` as the child's error record and exits with its code.
fn report_and_exit(report: &OwnedFd, f: Failure) -> ! {
    write_report(report, b'E', f.code, &f.message);
    sys::exit_now(f.code);
}

/// Reads one record. `eof_ok`: end of file before any record is success
/// (the exec closed the pipe).
fn read_report(report: &mut File, eof_ok: bool) -> Result<(), Failure> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match report.read(&mut head[got..]) {
            Ok(0) if got == 0 && eof_ok => return Ok(()),
            Ok(0) => {
                return Err(Failure::new(
                    1,
                    "the container process died while being set up",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Failure::new(
                    1,
                    format!("reading the container's setup report: {e}"),
                ))
            }
        }
    }
    let code = i32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    match head[0] {
        b'R' => Ok(()),
        _ => {
            let mut message = String::new();
            let _ = report.read_to_string(&mut message);
            Err(Failure::new(code, message))
        }
    }
}

/// The container's init, between clone and exec. Never returns.
fn child(
    setup: &ContainerSetup,
    cgroup: &Path,
    stdio: ChildStdio,
    report: OwnedFd,
    start: OwnedFd,
) -> ! {
    let exe = match prepare(setup, cgroup, stdio) {
        Ok(exe) => exe,
        Err(f) => report_and_exit(&report, f),
    };
    write_report(&report, b'R', 0, "");
    let mut go = [0u8; 1];
    if File::from(start).read(&mut go).unwrap_or(0) == 0 {
        // guest-init is gone, or the host deleted the container unstarted.
        sys::exit_now(1);
    }
    report_and_exit(&report, process::exec(&exe, &setup.process));
}

/// Allocates the container's terminal from its own /dev/ptmx, hands the
/// master to guest-init and makes the slave this process's controlling
/// terminal, stdio and /dev/console (as runc does).
fn attach_terminal(sock: &OwnedFd, size: Option<(u16, u16)>, uid: u32) -> Result<(), Failure> {
    let (master, slave) = sys::open_pty(Path::new("/dev/ptmx")).or_fail(|| {
        "process.terminal: opening /dev/ptmx (the bundle needs a devpts mount on /dev/pts)".into()
    })?;
    if let Some((rows, cols)) = size {
        sys::set_winsize(master.as_raw_fd(), rows, cols)
            .or_fail(|| "process.consoleSize".into())?;
    }
    sys::fchown(&slave, uid)
        .or_fail(|| "process.terminal: handing the terminal to the user".into())?;
    if let Ok(n) = sys::pty_number(&master) {
        let console = Path::new("/dev/console");
        if fs::symlink_metadata(console).is_err() {
            let _ = fs::File::create(console);
        }
        let _ = sys::mount(
            Some(&format!("/dev/pts/{n}")),
            console,
            None,
            libc::MS_BIND,
            None,
        );
    }
    sys::send_fd(sock, &master)
        .or_fail(|| "process.terminal: sending the terminal to guest-init".into())?;
    drop(master);
    sys::set_controlling_tty(slave.as_raw_fd())
        .or_fail(|| "process.terminal: setting the controlling terminal".into())?;
    sys::set_stdio(&slave, &slave, &slave)
        .or_fail(|| "process.terminal: setting up stdio".into())?;
    Ok(())
}

/// The first steps of a container process after the fork: a clean signal
/// state, a session of its own, its stdio and the container's cgroup.
fn enter(stdio: &ChildStdio, cgroup: &Path) -> Result<(), Failure> {
    sys::reset_signals();
    sys::setsid();
    if let ChildStdio::Pipes([stdin, stdout, stderr]) = stdio {
        sys::set_stdio(stdin, stdout, stderr).or_fail(|| "setting up stdio".into())?;
    }
    fs::write(cgroup.join("cgroup.procs"), "0").or_fail(|| "joining the container's cgroup".into())
}

fn set_oom_score_adj(adj: Option<i32>) -> Result<(), Failure> {
    match adj {
        Some(adj) => fs::write("/proc/self/oom_score_adj", adj.to_string())
            .or_fail(|| "process.oomScoreAdj".into()),
        None => Ok(()),
    }
}

/// Everything up to the exec, in the order runc does it. Returns the
/// resolved path of the program.
fn prepare(setup: &ContainerSetup, cgroup: &Path, stdio: ChildStdio) -> Result<PathBuf, Failure> {
    enter(&stdio, cgroup)?;
    // Its own cgroup namespace, rooted at its cgroup: /sys/fs/cgroup in the
    // container shows the container's limits, as under runc.
    sys::unshare(libc::CLONE_NEWCGROUP)
        .or_fail(|| "creating the container's cgroup namespace".into())?;
    set_oom_score_adj(setup.process.oom_score_adj)?;
    mounts::setup_root(setup)?;
    if let ChildStdio::Tty { sock, size, uid } = stdio {
        attach_terminal(&sock, size, uid)?;
    }
    process::apply(&setup.process)
}

/// A guest pid's pid as its own (innermost) pid namespace sees it.
fn ns_pid(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|p| p.parse().ok())
}

fn process_info(pid: i32) -> Option<ProcessInfo> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let ppid_global: i32 = field("PPid:")?.parse().ok()?;
    // A parent outside the container (guest-init) shows as 0, as for a
    // container's init under runc.
    let ppid = fs::read_to_string(format!("/proc/{ppid_global}/status"))
        .ok()
        .filter(|st| ns_pid(st).is_some_and(|p| p != ppid_global) || ppid_global == 0)
        .and_then(|st| ns_pid(&st))
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, in parentheses.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = 100u64; // USER_HZ
    let num = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd = String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .trim_end()
        .to_string();
    if cmd.is_empty() {
        cmd = format!("[{}]", field("Name:").unwrap_or_default());
    }
    Some(ProcessInfo {
        pid: ns_pid(&status).unwrap_or(pid),
        ppid,
        uid: field("Uid:")
            .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
            .unwrap_or(0),
        state: rest.first().map(|s| s.to_string()).unwrap_or_default(),
        start_secs: num(19) / ticks,
        cpu_secs: (num(11) + num(12)) / ticks,
        cmd,
    })
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
    let root = open(format!("/proc/{}/root", c.init_pid))?;
    let (stdio, child_stdio) = make_stdio(p)?;
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
        let f = match exec_child(c, p, &others, &root, child_stdio) {
            Ok(exe) => process::exec(&exe, p),
            Err(f) => f,
        };
        report_and_exit(&report_w, f);
    }
    restored.or_fail(|| "leaving the container's pid namespace".into())?;
    drop((report_w, child_stdio));
    let mut report = File::from(report_r);
    read_report(&mut report, true)?;
    Ok((pid, stdio.finish()?))
}

/// The exec'd process between fork and exec: join the container, apply the
/// process config. Returns the program to exec.
fn exec_child(
    c: &Container,
    p: &ProcessSetup,
    ns: &[(File, libc::c_int)],
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
        attach_terminal(&sock, size, uid)?;
    }
    process::apply(p)
}
