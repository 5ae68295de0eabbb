//! One VM and the control channel to its guest-init: boot, create, start,
//! and the stream of frames that follows.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use krun_hypervisor::{CappedLog, Hypervisor, Vm, VmConfig, VmExit};
use krun_proto::{
    encode_frame, ContainerSetup, Frame, FrameKind, FrameReader, ProtoError, ToGuest, ToHost,
    CONTROL_PORT_NAME, MAIN_STREAM, PROTOCOL_VERSION,
};

use crate::assets::Assets;
use crate::plan::VmPlan;

/// How long a guest may take to boot to guest-init. Generous: under TCG on
/// a loaded 2-core host, twenty VMs booting at once take tens of seconds.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Operator knob: the most bytes kept of a guest's console log (and of
/// QEMU's own log); the rest is dropped with a note.
pub const CONSOLE_LOG_LIMIT_VAR: &str = "KRUN_OCI_CONSOLE_LOG_LIMIT";

/// How long the console log may take to catch up once the VM is gone.
const CONSOLE_FLUSH: Duration = Duration::from_secs(1);

/// A numeric knob from the environment, or `default` (with a warning when
/// it is set but not a number).
fn knob(name: &str, default: u64) -> u64 {
    let Ok(v) = std::env::var(name) else {
        return default;
    };
    v.trim().parse().unwrap_or_else(|_| {
        tracing::warn!("{name}={v:?} is not a number; using {default}");
        default
    })
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("cannot create the control channel")]
    Channel(#[source] std::io::Error),
    #[error("cannot start the VM")]
    Start(#[source] krun_hypervisor::Error),
    #[error("the guest did not come up within {0:?}{1}")]
    BootTimeout(Duration, ConsoleTail),
    #[error("the VM stopped unexpectedly ({exit}){tail}")]
    VmStopped { exit: String, tail: ConsoleTail },
    #[error("guest-init speaks protocol version {guest}, this runtime {host}")]
    Version { guest: u32, host: u32 },
    #[error("control channel")]
    Protocol(#[from] ProtoError),
    #[error("guest-init failed: {0}")]
    GuestFatal(String),
    /// The container process could not be created or started.
    #[error("{message}")]
    Process { code: i32, message: String },
}

/// The last lines of the guest console, shown when a VM fails.
#[derive(Debug, Default)]
pub struct ConsoleTail(pub String);

impl std::fmt::Display for ConsoleTail {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, "; guest console ends with: {}", self.0)
        }
    }
}

fn console_tail(path: &Path) -> ConsoleTail {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    ConsoleTail(lines[lines.len().saturating_sub(8)..].join(" | "))
}

fn describe(exit: &VmExit) -> String {
    match exit {
        VmExit::GuestStopped => "the guest powered off".into(),
        VmExit::Killed { signal } => format!("the VMM was killed by signal {signal}"),
        VmExit::VmmFailed { code, detail } => {
            format!("the VMM exited with status {code}: {detail}")
        }
    }
}

/// What the loop that owns a session reacts to: what arrives from the
/// guest, and what arrives from outside (a client request, a signal).
pub enum Event {
    Frame(Frame),
    /// The channel ended (the VM stopped or guest-init died).
    Closed(Option<ProtoError>),
    /// A request on the monitor's socket.
    Request(crate::api::Incoming),
    /// A signal the runtime process received.
    Signal(i32),
}

/// Moments of a container's start, for `--debug` timings and hack/bench.
#[derive(Debug, Default, Clone)]
pub struct Timings {
    pub vmm_spawned: Option<Instant>,
    pub hello: Option<Instant>,
    /// Guest CLOCK_BOOTTIME at guest-init start and at its hello.
    pub guest_init_ns: u64,
    pub guest_hello_ns: u64,
    pub created: Option<Instant>,
    pub started: Option<Instant>,
}

/// A shareable writer of frames to the guest.
#[derive(Clone)]
pub struct Control(Arc<Mutex<UnixStream>>);

impl Control {
    pub fn send(&self, stream: u32, msg: &ToGuest) -> std::io::Result<()> {
        self.write(&Frame::control(stream, msg).encode())
    }

    pub fn stdin(&self, stream: u32, data: &[u8]) -> std::io::Result<()> {
        for chunk in data.chunks(krun_proto::MAX_PAYLOAD) {
            self.write(&encode_frame(FrameKind::Stdin, stream, chunk))?;
        }
        Ok(())
    }

    pub fn stdin_eof(&self, stream: u32) -> std::io::Result<()> {
        self.write(&encode_frame(FrameKind::Stdin, stream, &[]))
    }

    fn write(&self, bytes: &[u8]) -> std::io::Result<()> {
        let mut s = self.0.lock().unwrap_or_else(|e| e.into_inner());
        s.write_all(bytes)
    }
}

pub struct Session {
    vm: Box<dyn Vm>,
    control: Control,
    events: Receiver<Event>,
    sender: SyncSender<Event>,
    console_log: PathBuf,
    console: CappedLog,
    pub timings: Timings,
}

impl Session {
    /// Boots the VM and waits for guest-init's hello.
    pub fn boot(
        hv: &dyn Hypervisor,
        plan: &VmPlan,
        assets: &Assets,
        state_dir: &Path,
        run_dir: &Path,
        nets: Vec<krun_hypervisor::NetDevice>,
    ) -> Result<Session, SessionError> {
        let (host_end, vm_end) = UnixStream::pair().map_err(SessionError::Channel)?;
        let console_log = state_dir.join("console.log");
        let log_limit = knob(CONSOLE_LOG_LIMIT_VAR, krun_hypervisor::DEFAULT_LOG_LIMIT);
        let (console, console_pipe) = CappedLog::create(&console_log, log_limit, "console log")
            .map_err(SessionError::Channel)?;
        let config = VmConfig {
            kernel: assets.kernel.clone(),
            initrd: assets.initrd.clone(),
            // no_timer_check: on a loaded host (TCG, or many VMs booting at
            // once) the timer interrupt can miss the kernel's short test
            // window at boot and it panics with "IO-APIC + timer doesn't
            // work"; virtual machines skip that check.
            cmdline: "quiet no_timer_check".into(),
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            shares: plan.shares.clone(),
            control: vm_end.into(),
            control_port_name: CONTROL_PORT_NAME.into(),
            console: console_pipe,
            log_limit,
            run_dir: run_dir.to_path_buf(),
            nets,
        };
        let vm = hv.start(config).map_err(SessionError::Start)?;
        let spawned = Instant::now();
        let reader = host_end.try_clone().map_err(SessionError::Channel)?;
        let (tx, events) = mpsc::sync_channel(64);
        let sender = tx.clone();
        std::thread::Builder::new()
            .name("ctl-reader".into())
            .spawn(move || {
                let mut r = FrameReader::new(reader);
                loop {
                    match r.read_frame() {
                        Ok(Some(f)) => {
                            if tx.send(Event::Frame(f)).is_err() {
                                return;
                            }
                        }
                        Ok(None) => return drop(tx.send(Event::Closed(None))),
                        Err(e) => return drop(tx.send(Event::Closed(Some(e)))),
                    }
                }
            })
            .map_err(SessionError::Channel)?;
        let mut s = Session {
            vm,
            control: Control(Arc::new(Mutex::new(host_end))),
            events,
            sender,
            console_log,
            console,
            timings: Timings {
                vmm_spawned: Some(spawned),
                ..Default::default()
            },
        };
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match s.next(Some(deadline))? {
                Some(Event::Frame(f)) if f.kind == FrameKind::Control => {
                    if let ToHost::Hello {
                        version,
                        init_started_ns,
                        sent_ns,
                    } = f.message()?
                    {
                        if version != PROTOCOL_VERSION {
                            return Err(SessionError::Version {
                                guest: version,
                                host: PROTOCOL_VERSION,
                            });
                        }
                        s.timings.hello = Some(Instant::now());
                        s.timings.guest_init_ns = init_started_ns;
                        s.timings.guest_hello_ns = sent_ns;
                        return Ok(s);
                    }
                }
                Some(Event::Closed(e)) => return Err(s.stopped_error(e)),
                Some(_) => {}
                None => {
                    return Err(SessionError::BootTimeout(
                        BOOT_TIMEOUT,
                        console_tail(&s.console_log),
                    ))
                }
            }
        }
    }

    pub fn control(&self) -> Control {
        self.control.clone()
    }

    pub fn vmm_pid(&self) -> u32 {
        self.vm.pid()
    }

    /// Feeds the session's event loop from other threads.
    pub fn sender(&self) -> SyncSender<Event> {
        self.sender.clone()
    }

    /// The VM, for pause and resume.
    pub fn vm_mut(&mut self) -> &mut dyn Vm {
        self.vm.as_mut()
    }

    /// The next event, or None at the deadline.
    pub fn next(&mut self, deadline: Option<Instant>) -> Result<Option<Event>, SessionError> {
        match deadline {
            None => Ok(Some(self.events.recv().unwrap_or(Event::Closed(None)))),
            Some(d) => match self
                .events
                .recv_timeout(d.saturating_duration_since(Instant::now()))
            {
                Ok(e) => Ok(Some(e)),
                Err(RecvTimeoutError::Timeout) => Ok(None),
                Err(RecvTimeoutError::Disconnected) => Ok(Some(Event::Closed(None))),
            },
        }
    }

    /// The error for a channel that closed: what the VM's exit says, and
    /// what the guest console last said.
    pub fn stopped_error(&mut self, e: Option<ProtoError>) -> SessionError {
        if let Some(e) = e.filter(|e| !matches!(e, ProtoError::Io(_) | ProtoError::Truncated)) {
            return SessionError::Protocol(e);
        }
        // The channel closes as the VMM exits; give it a moment to be reaped.
        let deadline = Instant::now() + Duration::from_secs(2);
        let exit = loop {
            match self.vm.try_wait() {
                Ok(Some(exit)) => break describe(&exit),
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                Ok(None) => break "the control channel closed".to_string(),
                Err(e) => break e.to_string(),
            }
        };
        self.console.finish(CONSOLE_FLUSH);
        SessionError::VmStopped {
            exit,
            tail: console_tail(&self.console_log),
        }
    }

    /// Waits for the reply to a create or start of `stream`.
    fn await_reply(&mut self, stream: u32) -> Result<i32, SessionError> {
        loop {
            match self.next(None)? {
                Some(Event::Frame(f)) if f.kind == FrameKind::Control && f.stream == stream => {
                    match f.message()? {
                        ToHost::Created { pid } | ToHost::Started { pid } => return Ok(pid),
                        ToHost::Failed { code, message } => {
                            return Err(SessionError::Process { code, message })
                        }
                        ToHost::Fatal { message } => return Err(SessionError::GuestFatal(message)),
                        _ => {}
                    }
                }
                Some(Event::Closed(e)) => return Err(self.stopped_error(e)),
                Some(_) => {}
                None => return Err(self.stopped_error(None)),
            }
        }
    }

    /// Has guest-init prepare the container up to the exec of its process.
    pub fn create(&mut self, setup: ContainerSetup) -> Result<i32, SessionError> {
        self.control
            .send(MAIN_STREAM, &ToGuest::Create(Box::new(setup)))
            .map_err(|e| SessionError::Protocol(e.into()))?;
        let pid = self.await_reply(MAIN_STREAM)?;
        self.timings.created = Some(Instant::now());
        Ok(pid)
    }

    /// Execs the container's process.
    pub fn start(&mut self) -> Result<i32, SessionError> {
        self.control
            .send(MAIN_STREAM, &ToGuest::Start)
            .map_err(|e| SessionError::Protocol(e.into()))?;
        let pid = self.await_reply(MAIN_STREAM)?;
        self.timings.started = Some(Instant::now());
        Ok(pid)
    }

    /// Asks the guest to power off and waits for the VM to end; kills it if
    /// it takes longer than `grace`. Every host process of the VM is reaped.
    pub fn shutdown(mut self, grace: Duration) -> VmExit {
        let _ = self.control.send(MAIN_STREAM, &ToGuest::Shutdown);
        let deadline = Instant::now() + grace;
        loop {
            match self.vm.try_wait() {
                Ok(Some(exit)) => {
                    self.console.finish(CONSOLE_FLUSH);
                    return exit;
                }
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    self.vm.kill();
                    let exit = self.vm.wait().unwrap_or(VmExit::Killed {
                        signal: libc::SIGKILL,
                    });
                    self.console.finish(CONSOLE_FLUSH);
                    return exit;
                }
            }
        }
    }
}
