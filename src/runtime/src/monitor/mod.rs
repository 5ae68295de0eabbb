//! The monitor: the process that runs one container's VM for its whole
//! life. Its pid is the container's pid (the pid file's), it holds the
//! container's stdio, serves `start`, `kill`, `exec`, `ps`, `pause`,
//! `update` on a socket, and exits with the workload's status — so conmon,
//! which waits on that pid, sees the workload's exit.
//!
//! By job: this file brings the VM up ([`Monitor::prepare`]) and runs the
//! loop over its events ([`Monitor::serve`]); `container.rs` holds the
//! container's state, and decides, with no VM, what a guest frame
//! (`frames.rs`) or a client request (`requests.rs`) does to it and to
//! the table of what waits on each stream (`streams.rs`); `stdio.rs` is
//! the host end of the processes' stdio, `run_dir.rs` the files beside the
//! state directory, `acceptor.rs` the socket clients reach the monitor on,
//! and `report.rs` what the monitor tells whoever embeds it.

use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Sender, SyncSender};
use std::time::{Duration, Instant};

use krun_hypervisor::{Hypervisor, NetDevice, VmExit};
use krun_proto::{ExitStatus, NetworkSetup};

use crate::assets::Assets;
use crate::bundle::Bundle;
use crate::error::{Error, Result, ResultExt as _};
use crate::plan::VmPlan;
use crate::session::{Event, Session, SessionError, Timings};
use crate::staging::Staging;
use crate::state::{self, State, StateDir, Status};

mod acceptor;
mod container;
mod frames;
#[cfg(test)]
mod kit;
mod report;
mod requests;
mod run_dir;
mod stdio;
mod streams;

use acceptor::Acceptor;
use container::Container;
pub use report::{Notice, Outcome};
pub use run_dir::{console_copy_from_env, CONSOLE_COPY_VAR};
use run_dir::{ConsoleCopy, RunDir};
pub use stdio::MainStdio;

/// Everything needed to bring a container up.
pub struct Launch {
    pub id: String,
    pub bundle: Bundle,
    pub plan: VmPlan,
    pub assets: Assets,
    pub hypervisor: Box<dyn Hypervisor>,
    /// Freshly created; removed if the launch fails.
    pub state_dir: StateDir,
    pub stdio: MainStdio,
    /// Where [`Notice`]s go, if anyone listens.
    pub notices: Option<Sender<Notice>>,
    /// Where the VM's share is composed ([`crate::staging`]); None: the
    /// state directory's `share`. A pod's sandbox gives the pod directory.
    pub share_dir: Option<PathBuf>,
    /// Debug aid: a directory where the guest console log is kept, as
    /// `ID.log`, when the monitor ends (however it ends); the CLI and the
    /// shim take it from [`CONSOLE_COPY_VAR`].
    pub console_copy: Option<PathBuf>,
    /// A checkpoint's VM to restore instead of a boot (`krun-oci
    /// restore`): the container comes up running, as it was.
    pub restore: Option<std::fs::File>,
}

pub struct Monitor {
    container: Container,
    session: Session,
    host_setup_ms: f64,
    _run_dir: RunDir,
    _console_copy: ConsoleCopy,
    /// Stops accepting on the monitor socket when the monitor is done.
    _acceptor: Acceptor,
    /// Dropped after `session` (the VM): the tap goes with the VMM.
    _net: Option<crate::net::Guard>,
    /// The VM's share; unmounted once the VM is gone.
    staging: Option<Staging>,
}

impl Monitor {
    /// Boots the VM, prepares the container in it up to the exec of its
    /// process, and starts serving requests: the container is `created`.
    /// On error the state directory is removed.
    pub fn prepare(l: Launch) -> Result<Monitor> {
        let Launch {
            id,
            bundle,
            plan,
            assets,
            hypervisor,
            mut state_dir,
            stdio,
            notices,
            share_dir,
            console_copy,
            restore,
        } = l;
        let restoring = restore.is_some();
        state_dir.discard_on_drop();
        // The config as create saw it, for start, delete and their hooks.
        state_dir.write_file("config.json", &bundle.raw)?;
        let run_dir = RunDir::new(&state_dir.dir)?;
        let console_copy = ConsoleCopy {
            id: id.clone(),
            log: state_dir.console_log(),
            dir: console_copy,
        };
        let mut state = creating(&id, &bundle);
        state.cgroup = plan.host_cgroup.clone();
        if plan.paths.id != id {
            state.guest_id = Some(plan.paths.id.clone());
        }
        let net = carry_network(plan.netns.as_deref(), &mut state)?;
        state_dir.write(&state)?;
        // What the guest sees of the host: its root and volumes, composed
        // into one share (torn down when this value goes, after the VM).
        let staging = Staging::create(&share_dir.unwrap_or_else(|| state_dir.dir.join("share")))?;
        staging.add(&plan.paths)?;
        let host_setup_ms = crate::since_start_ms();
        let mut session = Session::boot(
            hypervisor.as_ref(),
            &plan,
            &staging.shared_dir(),
            &assets,
            &state_dir.dir,
            &run_dir.0,
            net.devices,
            restore,
        )?;
        let mut setup = plan.setup.clone();
        setup.network = net.setup;
        if session.timings.restored && !restoring {
            // The cards have their template's MACs in the guest.
            for (i, iface) in setup
                .network
                .iter_mut()
                .flat_map(|n| n.interfaces.iter_mut())
                .enumerate()
            {
                iface.template_mac = Some(crate::template::builder_mac(i));
            }
        }
        requests::stamp(&mut setup);
        let process = &mut setup.process;
        let main = stdio::main_io(stdio, process.terminal, &mut process.console_size)?;
        if !restoring {
            session.create(setup)?;
        }
        let (socket, acceptor) = listen(&run_dir, &session)?;
        state.status = Status::Created;
        let monitor = state::Monitor::this(socket);
        state.pid = Some(monitor.pid);
        state.monitor = Some(monitor);
        state_dir.write(&state)?;
        let control = session.control();
        let memory_limit = plan.memory_mib << 20;
        let mut container = Container::new(state_dir, state, control, main, notices, memory_limit);
        if restoring {
            // Its process runs on from the checkpoint: the guest resumes
            // with the host's clock and fresh entropy.
            container.on_started();
            requests::resume_guest(&container.control);
        }
        Ok(Monitor {
            container,
            session,
            host_setup_ms,
            _run_dir: run_dir,
            _console_copy: console_copy,
            _acceptor: acceptor,
            _net: net.guard,
            staging: Some(staging),
        })
    }

    /// The runtime-spec state of the container now.
    pub fn oci_state(&self) -> serde_json::Value {
        self.container.state.to_oci()
    }

    /// Where signals for this container should be sent.
    pub fn sender(&self) -> SyncSender<Event> {
        self.session.sender()
    }

    /// Starts the container's process now (for `run`).
    pub fn start_now(&mut self) -> Result<(), SessionError> {
        self.session.start()?;
        self.container.on_started();
        Ok(())
    }

    /// Serves the container until its process exits (or the VM stops),
    /// then stops the VM. `keep_state`: leave the state directory, now
    /// `stopped`, for `delete` (a detached container); otherwise remove it.
    pub fn serve(mut self, keep_state: bool) -> Result<Outcome, SessionError> {
        let result = self.event_loop();
        self.finish(result, keep_state)
    }

    /// Takes the container down without serving it (its process never
    /// started, or `run` gave up on it): the VM is stopped and everything
    /// of the container on the host goes, its state directory included.
    pub fn abort(self) {
        let killed = Outcome {
            status: ExitStatus::Signal(libc::SIGKILL),
            oom_killed: false,
        };
        let _ = self.finish(Ok(killed), false);
    }

    /// Stops the VM after the event loop ended with `result`, and records
    /// the container as stopped (`keep_state`) or removes its state.
    fn finish(
        mut self,
        result: Result<Outcome, SessionError>,
        keep_state: bool,
    ) -> Result<Outcome, SessionError> {
        let exited_ms = crate::since_start_ms();
        self.container.streams.container_stopped();
        let timings = self.session.timings.clone();
        let Monitor {
            container,
            session,
            host_setup_ms,
            staging,
            _console_copy: console_copy,
            ..
        } = self;
        let Container {
            id,
            state_dir,
            mut state,
            ..
        } = container;
        let vm_exit = session.shutdown(Duration::from_secs(3));
        drop(staging);
        // Before the state directory (and the log in it) may go.
        drop(console_copy);
        log_timings(&id, host_setup_ms, &timings, exited_ms);
        tracing::debug!(container = %id, ?vm_exit, vm_stopped_ms = crate::since_start_ms(), teardown_ms = crate::since_start_ms() - exited_ms, "VM stopped");
        let outcome = match &result {
            Ok(o) => *o,
            // The VM died under the container: it is stopped, and was
            // killed as far as anyone waiting can tell.
            Err(_) => Outcome {
                status: vm_death_status(&vm_exit),
                oom_killed: state.oom_killed,
            },
        };
        stopped(&mut state, outcome.status);
        if keep_state {
            let _ = state_dir.write(&state);
            let mut sd = state_dir;
            sd.keep();
        } else {
            drop(state_dir);
        }
        result
    }

    fn event_loop(&mut self) -> Result<Outcome, SessionError> {
        loop {
            let deadline = self.container.checkpoint_deadline();
            let Some(event) = self.session.next(deadline)? else {
                // A checkpoint's deadline.
                if let Some(outcome) = self.container.checkpoint_due(self.session.vm_mut()) {
                    return Ok(outcome);
                }
                continue;
            };
            let outcome = match event {
                Event::Frame(f) => self.container.on_frame(f)?,
                Event::Closed(e) => return Err(self.session.stopped_error(e)),
                Event::Request(inc) => self.container.on_request(inc, self.session.vm_mut()),
                Event::Signal(sig) => {
                    self.container.on_signal(sig);
                    None
                }
                Event::Unresponsive(u) => return Err(SessionError::Unresponsive(u)),
            };
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
            if let Some(outcome) = self.container.checkpoint_due(self.session.vm_mut()) {
                return Ok(outcome);
            }
        }
    }
}

/// The state of a container being created.
pub(crate) fn creating(id: &str, bundle: &Bundle) -> State {
    State {
        oci_version: bundle.spec.version().clone(),
        id: id.to_string(),
        status: Status::Creating,
        pid: None,
        bundle: bundle.dir.clone(),
        annotations: bundle.spec.annotations().clone().unwrap_or_default(),
        created: crate::logging::rfc3339_now(),
        monitor: None,
        exit: None,
        oom_killed: false,
        network: None,
        cgroup: None,
        member: None,
        guest_id: None,
    }
}

/// The state of a container whose process ended with `status`.
pub(crate) fn stopped(state: &mut State, status: ExitStatus) {
    state.status = Status::Stopped;
    state.exit = Some(state::Exit {
        code: status.shell_code(),
        signal: match status {
            ExitStatus::Signal(s) => Some(s),
            ExitStatus::Code(_) => None,
        },
    });
}

/// A network namespace carried into the VM: the VM's card, the guest's
/// setup, and the guard that releases it when the VM is gone.
#[derive(Default)]
struct Network {
    devices: Vec<NetDevice>,
    setup: Option<NetworkSetup>,
    guard: Option<crate::net::Guard>,
}

/// Carries the container's network namespace in, if it has one with an
/// interface (released by the guard, or by `delete` after a kill -9, as
/// the state records it).
fn carry_network(netns: Option<&Path>, state: &mut State) -> Result<Network> {
    let Some(ns) = netns else {
        return Ok(Network::default());
    };
    let carried = crate::net::carry(ns).map_err(|e| Error::Network {
        netns: ns.to_path_buf(),
        source: e.into(),
    })?;
    let Some(c) = carried else {
        return Ok(Network::default());
    };
    state.network = Some(c.record.clone());
    Ok(Network {
        devices: vec![NetDevice {
            tap: c.tap,
            mac: c.mac,
        }],
        setup: Some(c.setup),
        guard: Some(crate::net::Guard(c.record)),
    })
}

/// Listens on the monitor's socket; requests go to the session's loop.
fn listen(run_dir: &RunDir, session: &Session) -> Result<(PathBuf, Acceptor)> {
    let socket = run_dir.0.join("monitor.sock");
    let listener = UnixListener::bind(&socket)
        .with_context(|| format!("cannot listen on {}", socket.display()))?;
    let acceptor = Acceptor::spawn(listener, session.sender())?;
    Ok((socket, acceptor))
}

/// The status to report when the VM died before the process exited.
fn vm_death_status(exit: &VmExit) -> ExitStatus {
    match exit {
        VmExit::Killed { signal } => ExitStatus::Signal(*signal),
        _ => ExitStatus::Signal(libc::SIGKILL),
    }
}

fn log_timings(id: &str, host_setup_ms: f64, t: &Timings, exited_ms: f64) {
    let start = crate::started_at();
    let ms = |i: Option<Instant>| {
        i.map(|i| (i - start).as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let hello = ms(t.hello);
    // Guest boot time runs from the kernel's start: the host saw the hello
    // `guest_hello_ns` after the guest kernel started.
    let kernel_start = hello - t.guest_hello_ns as f64 / 1e6;
    tracing::debug!(
        container = %id,
        host_setup_ms,
        vmm_spawned_ms = ms(t.vmm_spawned),
        vmm_start_ms = kernel_start - host_setup_ms,
        kernel_boot_ms = t.guest_init_ns as f64 / 1e6,
        guest_init_ms = ms(t.started) - kernel_start - t.guest_init_ns as f64 / 1e6,
        started_ms = ms(t.started),
        exited_ms,
        "timings"
    );
}

/// Ends this process the way the container's process ended: its exit code,
/// or death by the same signal (so a waiting parent sees 128+n). The init
/// of a PID namespace (a detached monitor) cannot kill itself with a
/// signal; it exits with 128+n, which conmon reports the same way.
pub fn exit_like(status: ExitStatus) -> ! {
    if let ExitStatus::Signal(sig) = status {
        // SAFETY: resetting a disposition and raising a signal at ourselves
        // have no memory effects; no core dump is wanted from the monitor.
        unsafe {
            let no_core = libc::rlimit {
                rlim_cur: 0,
                rlim_max: 0,
            };
            libc::setrlimit(libc::RLIMIT_CORE, &no_core);
            libc::signal(sig, libc::SIG_DFL);
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, sig);
            libc::pthread_sigmask(libc::SIG_UNBLOCK, &set, std::ptr::null_mut());
            libc::kill(libc::getpid(), sig);
        }
    }
    std::process::exit(status.shell_code())
}
