//! `krun-oci create` of a container that joins another's namespaces (a
//! podman pod's member; see [`crate::pod`]): no VM of its own. Its root
//! and volumes go into the leader's share, the leader's monitor creates it
//! in the VM, and a small process of its own stays behind on the host:
//! its pid is the container's (the pid file's, what conmon waits on), it
//! holds the state and exits as the container's process did.

use std::io::{Read, Write};
use std::os::fd::{AsRawFd, OwnedFd};

use krun_proto::ExitStatus;

use super::Context;
use crate::api::{Client, Request, Response};
use crate::bundle::Bundle;
use crate::cgroups;
use crate::container::Existing;
use crate::error::{Error, Result, ResultExt as _};
use crate::monitor::{creating, exit_like, stopped};
use crate::plan::{self, HostInfo};
use crate::state::{Member, Monitor, State, StateDir, Status};

/// Creates `args.container_id` in the VM of `leader`.
pub fn create(
    ctx: &Context,
    args: &liboci_cli::Create,
    bundle: Bundle,
    leader: Existing,
) -> Result<i32> {
    let id = args.container_id.as_str();
    let mut spec = bundle.spec.clone();
    crate::pod::forget_user_ns_path(&mut spec);
    let plan = plan::plan(id, &bundle.dir, &spec, &HostInfo::detect())?;
    for w in &plan.warnings {
        tracing::warn!(container = %id, "{w}");
    }
    let terminal = plan.setup.process.terminal;
    if terminal && args.console_socket.is_none() {
        return Err(Error::Invalid(
            "process.terminal is set, so create needs --console-socket".into(),
        ));
    }
    let mut state_dir = StateDir::create(&ctx.root, id)?;
    state_dir.write_file("config.json", &bundle.raw)?;
    let mut state = creating(id, &bundle);
    state.member = Some(Member {
        leader: leader.id.clone(),
        stream: 0,
    });
    // The host cgroup holds what the container has on the host: the
    // process below (the VM's are its leader's).
    let cgroup = cgroups::Owned::new(cgroups::for_container(
        &bundle.spec,
        id,
        ctx.systemd_cgroup,
        &plan.host,
    )?);
    state.cgroup = cgroup.cgroup().map(|c| c.paths().clone());
    state_dir.write(&state)?;
    crate::pod::place(&leader, &plan.paths)?;
    let placed_in = leader.id.clone();
    let left = |e: Error| {
        crate::pod::leave(&ctx.root, &placed_in, id);
        e
    };
    let mut setup = plan.setup;
    setup.share_with = Some(leader.id.clone());
    let stdio = stdio(
        terminal,
        args.console_socket.as_deref(),
        setup.process.console_size,
    )
    .map_err(left)?;
    let socket = leader
        .state
        .monitor
        .as_ref()
        .map(|m| m.socket.clone())
        .ok_or_else(|| {
            left(Error::Failed(format!(
                "container {:?}: no monitor",
                leader.id
            )))
        })?;
    let (mut ready_r, ready_w) = std::io::pipe().context("creating a pipe")?;
    let into = match cgroup.cgroup() {
        Some(cg) => cg.unified_dir()?,
        None => None,
    };
    match super::create::fork_monitor(into.as_ref()).context("cannot fork") {
        Err(e) => Err(left(e)),
        Ok((0, placed)) => {
            drop(ready_r);
            drop(into);
            state_dir.keep();
            let waiter = Waiter {
                state_dir,
                state,
                socket,
            };
            waiter.main(Box::new(setup), stdio, ready_w, placed)
        }
        Ok((pid, _)) => {
            drop(into);
            drop(ready_w);
            drop(stdio);
            let mut report = String::new();
            let _ = ready_r.read_to_string(&mut report);
            if report.trim() != "ok" {
                return Err(left(super::child_failed(
                    pid,
                    &report,
                    "the container's process on the host died while creating it",
                )));
            }
            state_dir.keep();
            if let Err(e) = super::create::create_hooks(ctx, id, &bundle.spec) {
                if let Ok(c) = Existing::open(&ctx.root, id) {
                    let _ = super::lifecycle::stop_now(&c);
                    let _ = c.dir.remove();
                }
                super::reap(pid);
                crate::pod::leave(&ctx.root, &leader.id, id);
                return Err(e);
            }
            let _ = cgroup.keep();
            if let Some(p) = &args.pid_file {
                super::create::write_pid_file(p, pid)?;
            }
            Ok(0)
        }
    }
}

/// The descriptors the container's process gets: a terminal sent to the
/// console socket, or our stdin, stdout and stderr (conmon's pipes).
fn stdio(
    terminal: bool,
    console_socket: Option<&std::path::Path>,
    size: Option<(u16, u16)>,
) -> Result<Vec<OwnedFd>> {
    use std::os::fd::AsFd;
    if let (true, Some(sock)) = (terminal, console_socket) {
        let pty = crate::tty::Pty::open(size)?;
        pty.send_master(sock)?;
        return Ok(vec![pty.slave]);
    }
    Ok(vec![
        std::io::stdin().as_fd().try_clone_to_owned()?,
        std::io::stdout().as_fd().try_clone_to_owned()?,
        std::io::stderr().as_fd().try_clone_to_owned()?,
    ])
}

/// The container's process on the host.
struct Waiter {
    state_dir: StateDir,
    state: State,
    /// The leader's monitor's socket.
    socket: std::path::PathBuf,
}

impl Waiter {
    /// Has the leader's monitor create the container, tells `create`, and
    /// waits for the container's process to end; exits as it did.
    fn main(
        mut self,
        setup: Box<krun_proto::ContainerSetup>,
        stdio: Vec<OwnedFd>,
        mut ready: std::io::PipeWriter,
        placed: bool,
    ) -> ! {
        // SAFETY: setsid has no memory effects.
        unsafe { libc::setsid() };
        crate::state::capture_identity();
        let mut client = match self.created(setup, stdio, placed) {
            Ok(c) => c,
            Err(e) => {
                let (code, msg) = (e.exit_code(), e.message());
                let _ = write!(ready, "{code} {msg}");
                std::process::exit(code);
            }
        };
        // conmon waits for create's stdio to close: the container's is the
        // leader's monitor's to hold now.
        quiet_stdio();
        let _ = ready.write_all(b"ok");
        drop(ready);
        let status = match client.recv() {
            Ok(Response::Exited {
                signal: Some(s), ..
            }) => ExitStatus::Signal(s),
            Ok(Response::Exited { code, .. }) => ExitStatus::Code(code),
            // The VM went (its leader stopped), or the answer made no sense.
            _ => ExitStatus::Signal(libc::SIGKILL),
        };
        // `start` may be writing the state: after it.
        let lock = self.state_dir.lock();
        let mut state = self.state_dir.read().unwrap_or(self.state);
        stopped(&mut state, status);
        let _ = self.state_dir.write(&state);
        drop(lock);
        exit_like(status)
    }

    /// Up to `created`: in the host cgroup, confined, the container made
    /// in the VM, the state written.
    fn created(
        &mut self,
        setup: Box<krun_proto::ContainerSetup>,
        stdio: Vec<OwnedFd>,
        placed: bool,
    ) -> Result<Client> {
        if let Some(paths) = self.state.cgroup.as_ref() {
            cgroups::Cgroup::from_paths(paths.clone()).join_self(placed)?;
        }
        super::create::confine_monitor()
            .map_err(|e| Error::Failed(format!("cannot confine the container's process: {e:#}")))?;
        let mut client =
            Client::connect(&self.socket).context("cannot reach the monitor of the VM to join")?;
        let fds: Vec<i32> = stdio.iter().map(AsRawFd::as_raw_fd).collect();
        client
            .send(&Request::CreateContainer { setup }, &fds)
            .context("asking the VM's monitor to create the container")?;
        drop(stdio);
        let stream = match client.recv().context("creating the container in the VM")? {
            Response::Created { stream, .. } => stream,
            Response::Error { code, message } => return Err(Error::Exit { code, message }),
            other => {
                return Err(Error::Unexpected {
                    answer: Some(Box::new(other)),
                })
            }
        };
        let monitor = Monitor::this(self.socket.clone());
        self.state.pid = Some(monitor.pid);
        self.state.monitor = Some(monitor);
        if let Some(m) = &mut self.state.member {
            m.stream = stream;
        }
        self.state.status = Status::Created;
        self.state_dir.write(&self.state)?;
        Ok(client)
    }
}

/// Points stdin, stdout and stderr at /dev/null.
fn quiet_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto a standard descriptor has no memory effects.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}
