//! The monitor: the process that runs one container's VM for its whole
//! life. Its pid is the container's pid (the pid file's), it holds the
//! container's stdio, serves `start`, `kill`, `exec`, `ps`, `pause`,
//! `update` on a socket, and exits with the workload's status — so conmon,
//! which waits on that pid, sees the workload's exit.

use std::collections::{HashMap, VecDeque};

use krun_proto::ContainerSetup;
use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::mpsc::{Sender, SyncSender};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use krun_hypervisor::{Hypervisor, VmExit};
use krun_proto::{ExitStatus, Frame, FrameKind, ToGuest, ToHost, MAIN_STREAM};

use crate::api::{Incoming, Request, Response};
use crate::assets::Assets;
use crate::bundle::Bundle;
use crate::error::{Error, Result, ResultExt as _};
use crate::plan::VmPlan;
use crate::relay::pump_stdin;
use crate::session::{Control, Event, Session, SessionError, Timings};
use crate::staging::Staging;
use crate::state::{self, State, StateDir, Status};
use crate::tty;

mod acceptor;
mod report;
mod run_dir;
mod stdio;

use acceptor::Acceptor;
pub use report::{Notice, Outcome};
pub use run_dir::{console_copy_from_env, CONSOLE_COPY_VAR};
use run_dir::{ConsoleCopy, RunDir};
pub use stdio::MainStdio;
use stdio::{exec_stdio, main_io, member_stdio, write_output, MainIo};

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
}

struct ExecIo {
    out: Option<File>,
    err: Option<File>,
    reply: Sender<Response>,
}

pub struct Monitor {
    id: String,
    state_dir: StateDir,
    state: State,
    session: Session,
    control: Control,
    plan_memory_limit: u64,
    main: MainIo,
    started: bool,
    execs: HashMap<u32, ExecIo>,
    next_stream: u32,
    pending_start: Option<Sender<Response>>,
    /// Requests guest-init answers on a container's stream, in order.
    pending_guest: HashMap<u32, VecDeque<Sender<Response>>>,
    /// Starts of a pod's further containers, by stream.
    pending_member_start: HashMap<u32, Sender<Response>>,
    held_signals: Vec<i32>,
    notices: Option<Sender<Notice>>,
    host_setup_ms: f64,
    first_output: bool,
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
        } = l;
        state_dir.discard_on_drop();
        // The config as create saw it, for start, delete and their hooks.
        state_dir.write_file("config.json", &bundle.raw)?;
        let run_dir = RunDir::new(&state_dir.dir)?;
        let console_copy = ConsoleCopy {
            id: id.clone(),
            log: state_dir.console_log(),
            dir: console_copy,
        };
        let mut state = State {
            oci_version: bundle.spec.version().clone(),
            id: id.clone(),
            status: Status::Creating,
            pid: None,
            bundle: bundle.dir.clone(),
            annotations: bundle.spec.annotations().clone().unwrap_or_default(),
            created: crate::logging::rfc3339_now(),
            monitor: None,
            exit: None,
            oom_killed: false,
            network: None,
        };
        // The container's network namespace, carried in (released by the
        // guard when the VM is gone, or by `delete` after a kill -9).
        let carried = match &plan.netns {
            Some(ns) => crate::net::carry(ns).map_err(|e| Error::Network {
                netns: ns.clone(),
                source: e.into(),
            })?,
            None => None,
        };
        let mut nets = Vec::new();
        let mut network = None;
        let net_guard = carried.map(|c| {
            nets.push(krun_hypervisor::NetDevice {
                tap: c.tap,
                mac: c.mac,
            });
            network = Some(c.setup);
            state.network = Some(c.record.clone());
            crate::net::Guard(c.record)
        });
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
            nets,
        )?;

        let mut setup = plan.setup.clone();
        setup.network = network;
        setup.realtime_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        let main = main_io(
            stdio,
            setup.process.terminal,
            &mut setup.process.console_size,
        )?;
        session.create(setup)?;

        let socket = run_dir.0.join("monitor.sock");
        let listener = UnixListener::bind(&socket)
            .with_context(|| format!("cannot listen on {}", socket.display()))?;
        let acceptor = Acceptor::spawn(listener, session.sender())?;
        state.status = Status::Created;
        let monitor = state::Monitor::this(socket);
        state.pid = Some(monitor.pid);
        state.monitor = Some(monitor);
        state_dir.write(&state)?;
        let control = session.control();
        let plan_memory_limit = plan.memory_mib << 20;
        Ok(Monitor {
            id,
            state_dir,
            state,
            session,
            control,
            plan_memory_limit,
            main,
            started: false,
            execs: HashMap::new(),
            next_stream: 1,
            pending_start: None,
            pending_guest: HashMap::new(),
            pending_member_start: HashMap::new(),
            held_signals: Vec::new(),
            notices,
            host_setup_ms,
            first_output: true,
            _run_dir: run_dir,
            _console_copy: console_copy,
            _acceptor: acceptor,
            _net: net_guard,
            staging: Some(staging),
        })
    }

    /// The runtime-spec state of the container now.
    pub fn oci_state(&self) -> serde_json::Value {
        self.state.to_oci()
    }

    /// Where signals for this container should be sent.
    pub fn sender(&self) -> SyncSender<Event> {
        self.session.sender()
    }

    fn save(&mut self) {
        if let Err(e) = self.state_dir.write(&self.state) {
            tracing::warn!(container = %self.id, error = %e, "cannot record the container's state");
        }
    }

    /// Starts the container's process now (for `run`).
    pub fn start_now(&mut self) -> Result<(), SessionError> {
        self.session.start()?;
        self.on_started();
        Ok(())
    }

    fn on_started(&mut self) {
        self.started = true;
        self.state.status = Status::Running;
        self.save();
        if let Some(input) = self.main.input.take() {
            pump_stdin(self.control.clone(), MAIN_STREAM, input);
        }
        if self.main.tty.is_some() {
            self.resize_from_tty();
        }
        for sig in std::mem::take(&mut self.held_signals) {
            let _ = self.control.send(
                MAIN_STREAM,
                &ToGuest::Signal {
                    signal: sig,
                    all: false,
                },
            );
        }
    }

    fn resize_from_tty(&mut self) {
        if let Some((rows, cols)) = self.main.tty.as_ref().and_then(|t| tty::size(t.as_fd())) {
            let _ = self
                .control
                .send(MAIN_STREAM, &ToGuest::Resize { rows, cols });
        }
    }

    /// Serves the container until its process exits (or the VM stops),
    /// then stops the VM. `keep_state`: leave the state directory, now
    /// `stopped`, for `delete` (a detached container); otherwise remove it.
    pub fn serve(mut self, keep_state: bool) -> Result<Outcome, SessionError> {
        let result = self.event_loop();
        let exited_ms = crate::since_start_ms();
        for (_, e) in self.execs.drain() {
            let _ = e.reply.send(Response::Error {
                code: 255,
                message: "the container stopped".into(),
            });
        }
        if let Some(r) = self.pending_start.take() {
            let _ = r.send(Response::Error {
                code: 1,
                message: "the container stopped".into(),
            });
        }
        let timings = self.session.timings.clone();
        let Monitor {
            id,
            state_dir,
            mut state,
            session,
            host_setup_ms,
            staging,
            _console_copy: console_copy,
            ..
        } = self;
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
        state.status = Status::Stopped;
        state.exit = Some(state::Exit {
            code: outcome.status.shell_code(),
            signal: match outcome.status {
                ExitStatus::Signal(s) => Some(s),
                ExitStatus::Code(_) => None,
            },
        });
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
            let event = self.session.next(None)?.unwrap_or(Event::Closed(None));
            match event {
                Event::Frame(f) => {
                    if let Some(outcome) = self.on_frame(f)? {
                        return Ok(outcome);
                    }
                }
                Event::Closed(e) => return Err(self.session.stopped_error(e)),
                Event::Request(inc) => {
                    if let Some(outcome) = self.on_request(inc) {
                        return Ok(outcome);
                    }
                }
                Event::Signal(sig) => self.on_signal(sig),
                Event::Unresponsive(u) => return Err(SessionError::Unresponsive(u)),
            }
        }
    }

    fn on_signal(&mut self, sig: i32) {
        if sig == libc::SIGWINCH {
            if self.started {
                self.resize_from_tty();
            }
        } else if self.started {
            let _ = self.control.send(
                MAIN_STREAM,
                &ToGuest::Signal {
                    signal: sig,
                    all: false,
                },
            );
        } else {
            self.held_signals.push(sig);
        }
    }

    fn on_frame(&mut self, f: Frame) -> Result<Option<Outcome>, SessionError> {
        let stream = f.stream;
        match f.kind {
            FrameKind::Stdout | FrameKind::Stderr => {
                if stream == MAIN_STREAM && self.first_output {
                    self.first_output = false;
                    tracing::debug!(since_start_ms = crate::since_start_ms(), "first output");
                }
                let sink = if stream == MAIN_STREAM {
                    if f.kind == FrameKind::Stdout {
                        &mut self.main.out
                    } else {
                        &mut self.main.err
                    }
                } else {
                    match self.execs.get_mut(&stream) {
                        Some(e) if f.kind == FrameKind::Stdout => &mut e.out,
                        Some(e) => &mut e.err,
                        None => return Ok(None),
                    }
                };
                write_output(sink, &f.payload);
            }
            FrameKind::Control => match f.message::<ToHost>()? {
                ToHost::Created { pid } => {
                    if let Some(e) = self.execs.get(&stream) {
                        let _ = e.reply.send(Response::Created { stream, pid });
                    }
                }
                ToHost::Started { pid } => {
                    if let Some(r) = self.pending_member_start.remove(&stream) {
                        let _ = r.send(Response::Ok);
                    } else if stream == MAIN_STREAM {
                        self.on_started();
                        if let Some(r) = self.pending_start.take() {
                            let _ = r.send(Response::Ok);
                        }
                    } else if let Some(e) = self.execs.get(&stream) {
                        let _ = e.reply.send(Response::Started { stream, pid });
                    }
                }
                ToHost::Failed { code, message } => {
                    let err = Response::Error {
                        code,
                        message: message.clone(),
                    };
                    if let Some(r) = self.pending_member_start.remove(&stream) {
                        // A pod member's process could not start: it is
                        // done, with the status a shell would give.
                        let _ = r.send(err);
                        if let Some(e) = self.execs.remove(&stream) {
                            let _ = e.reply.send(Response::Exited { code, signal: None });
                        }
                    } else if let Some(r) = self
                        .pending_guest
                        .get_mut(&stream)
                        .and_then(|q| q.pop_front())
                    {
                        let _ = r.send(err);
                    } else if stream != MAIN_STREAM {
                        if let Some(e) = self.execs.remove(&stream) {
                            let _ = e.reply.send(err);
                        }
                    } else if let Some(r) = self.pending_start.take() {
                        // The process could not be started: the container
                        // is stopped, with the status a shell would give.
                        let _ = r.send(err);
                        tracing::debug!(container = %self.id, %message, "start failed");
                        return Ok(Some(Outcome {
                            status: ExitStatus::Code(code),
                            oom_killed: false,
                        }));
                    }
                }
                ToHost::Exited { status } => {
                    if stream == MAIN_STREAM {
                        return Ok(Some(Outcome {
                            status,
                            oom_killed: self.state.oom_killed,
                        }));
                    }
                    if let Some(e) = self.execs.remove(&stream) {
                        let signal = match status {
                            ExitStatus::Signal(s) => Some(s),
                            ExitStatus::Code(_) => None,
                        };
                        let _ = e.reply.send(Response::Exited {
                            code: status.shell_code(),
                            signal,
                        });
                    }
                }
                ToHost::Oom => {
                    tracing::warn!(container = %self.id, "the container hit its memory limit and the guest kernel killed a process (OOM)");
                    self.state.oom_killed = true;
                    self.save();
                    // conmon's record of an OOM kill, which podman and
                    // CRI-O read after the exit: a file `oom` in the bundle.
                    let oom = self.state.bundle.join("oom");
                    if let Err(e) = state::replace_file(&oom, b"", 0o644) {
                        tracing::warn!(container = %self.id, error = %e, "cannot write {}", oom.display());
                    }
                    if let Some(n) = &self.notices {
                        let _ = n.send(Notice::Oom);
                    }
                }
                ToHost::Processes { processes } => {
                    if let Some(r) = self
                        .pending_guest
                        .get_mut(&stream)
                        .and_then(|q| q.pop_front())
                    {
                        let _ = r.send(Response::Processes { processes });
                    }
                }
                ToHost::Stats(stats) => {
                    if let Some(r) = self
                        .pending_guest
                        .get_mut(&stream)
                        .and_then(|q| q.pop_front())
                    {
                        let _ = r.send(Response::Stats { stats });
                    }
                }
                ToHost::Updated => {
                    if let Some(r) = self
                        .pending_guest
                        .get_mut(&stream)
                        .and_then(|q| q.pop_front())
                    {
                        let _ = r.send(Response::Ok);
                    }
                }
                ToHost::Fatal { message } => return Err(SessionError::GuestFatal(message)),
                ToHost::Hello { .. } => {}
            },
            FrameKind::Stdin => {}
        }
        Ok(None)
    }

    /// Handles one client request; returns an outcome when the request
    /// ends the container (shutdown).
    fn on_request(&mut self, inc: Incoming) -> Option<Outcome> {
        let Incoming { req, fds, reply } = inc;
        let error = |code: i32, message: &str| Response::Error {
            code,
            message: message.to_string(),
        };
        let status = self.state.status;
        match req {
            Request::Start => {
                if self.started || self.pending_start.is_some() {
                    let _ = reply.send(error(
                        1,
                        &format!("cannot start a container that is {status}"),
                    ));
                } else if self.control.send(MAIN_STREAM, &ToGuest::Start).is_err() {
                    let _ = reply.send(error(1, "the VM is gone"));
                } else {
                    self.pending_start = Some(reply);
                }
            }
            Request::Kill {
                signal,
                all,
                stream,
            } => {
                let _ = self.control.send(stream, &ToGuest::Signal { signal, all });
                let _ = reply.send(Response::Ok);
            }
            Request::CreateContainer { setup } => {
                self.create_member(setup, fds, reply);
            }
            Request::StartContainer { stream } => {
                if !self.execs.contains_key(&stream)
                    || self.control.send(stream, &ToGuest::Start).is_err()
                {
                    let _ = reply.send(error(1, "no such container to start"));
                } else {
                    self.pending_member_start.insert(stream, reply);
                }
            }
            Request::Exec { process, container } => {
                if !self.started {
                    let _ = reply.send(error(
                        1,
                        &format!("cannot exec in a container that is {status}"),
                    ));
                    return None;
                }
                let stream = self.next_stream;
                self.next_stream += 1;
                let (input, out, err) = match exec_stdio(fds) {
                    Ok(s) => s,
                    Err(n) => {
                        let _ = reply
                            .send(error(1, &format!("exec needs 1 or 3 descriptors, got {n}")));
                        return None;
                    }
                };
                if self
                    .control
                    .send(
                        stream,
                        &ToGuest::Exec {
                            container: container.unwrap_or_else(|| self.id.clone()),
                            process,
                        },
                    )
                    .is_err()
                {
                    let _ = reply.send(error(1, "the VM is gone"));
                    return None;
                }
                if let Some(input) = input {
                    pump_stdin(self.control.clone(), stream, input);
                }
                self.execs.insert(stream, ExecIo { out, err, reply });
            }
            Request::CloseStdin { stream } => {
                let _ = self.control.stdin_eof(stream);
                let _ = reply.send(Response::Ok);
            }
            Request::SignalExec { stream, signal } => {
                if self.execs.contains_key(&stream) {
                    let _ = self
                        .control
                        .send(stream, &ToGuest::Signal { signal, all: false });
                }
                let _ = reply.send(Response::Ok);
            }
            Request::Resize { stream, rows, cols } => {
                let _ = self.control.send(stream, &ToGuest::Resize { rows, cols });
                let _ = reply.send(Response::Ok);
            }
            Request::Ps { stream } => self.ask_guest(stream, ToGuest::Ps, reply),
            Request::Stats { stream } => self.ask_guest(stream, ToGuest::Stats, reply),
            Request::Update { limits, stream } => {
                if let Some(m) = limits.memory_max.filter(|m| *m > self.plan_memory_limit) {
                    let _ = reply.send(error(
                        1,
                        &format!(
                            "memory limit {} MiB: the VM has {} MiB and krun-oci cannot add memory to a running VM",
                            m >> 20,
                            self.plan_memory_limit >> 20
                        ),
                    ));
                } else {
                    self.ask_guest(stream, ToGuest::Update(limits), reply);
                }
            }
            Request::Pause | Request::Resume => {
                let pause = req == Request::Pause;
                let vm = self.session.vm_mut();
                let r = if pause { vm.pause() } else { vm.resume() };
                match r {
                    Ok(()) => {
                        self.state.status = if pause {
                            Status::Paused
                        } else if self.started {
                            Status::Running
                        } else {
                            Status::Created
                        };
                        self.save();
                        let _ = reply.send(Response::Ok);
                    }
                    Err(e) => {
                        let _ = reply.send(error(1, &format!("{e}")));
                    }
                }
            }
            Request::Shutdown => {
                let _ = reply.send(Response::Ok);
                // As if the kernel had killed the process.
                return Some(Outcome {
                    status: ExitStatus::Signal(libc::SIGKILL),
                    oom_killed: self.state.oom_killed,
                });
            }
        }
        None
    }
}

impl Monitor {
    /// Sends `msg` about the container on `stream`; guest-init's answer
    /// goes to `reply`.
    fn ask_guest(&mut self, stream: u32, msg: ToGuest, reply: Sender<Response>) {
        if self.control.send(stream, &msg).is_ok() {
            self.pending_guest
                .entry(stream)
                .or_default()
                .push_back(reply);
        } else {
            let _ = reply.send(Response::Error {
                code: 1,
                message: "the VM is gone".into(),
            });
        }
    }

    /// One more container in this VM (a pod member): its stdio is handled
    /// as an exec's, its replies are `Created`, then `Exited`.
    fn create_member(
        &mut self,
        mut setup: Box<ContainerSetup>,
        fds: Vec<OwnedFd>,
        reply: Sender<Response>,
    ) {
        let (input, out, err) = match member_stdio(fds) {
            Ok(s) => s,
            Err(n) => {
                let _ = reply.send(Response::Error {
                    code: 1,
                    message: format!("create needs 3 descriptors, got {n}"),
                });
                return;
            }
        };
        let stream = self.next_stream;
        self.next_stream += 1;
        setup.realtime_ns = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos() as u64;
        if self.control.send(stream, &ToGuest::Create(setup)).is_err() {
            let _ = reply.send(Response::Error {
                code: 1,
                message: "the VM is gone".into(),
            });
            return;
        }
        if let Some(input) = input {
            pump_stdin(self.control.clone(), stream, input);
        }
        self.execs.insert(stream, ExecIo { out, err, reply });
    }
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
