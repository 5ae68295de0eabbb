//! One VM and the control channel to its guest-init: boot, create, start,
//! and the stream of frames that follows.

use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::time::{Duration, Instant};

use krun_hypervisor::{CappedLog, Hypervisor, Vm, VmConfig, VmExit};
use krun_proto::{
    ContainerSetup, Frame, FrameKind, FrameReader, ProtoError, ToGuest, ToHost, CONTROL_PORT_NAME,
    MAIN_STREAM, PROTOCOL_VERSION,
};

use crate::assets::Assets;
use crate::plan::VmPlan;

mod control;
pub use control::{Control, Limits, Unresponsive};

/// How long a guest may take to boot to guest-init. Generous: under TCG on
/// a loaded 2-core host, twenty VMs booting at once take tens of seconds.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

/// Operator knob: the most bytes kept of a guest's console log (and of
/// QEMU's own log); the rest is dropped with a note.
pub const CONSOLE_LOG_LIMIT_VAR: &str = "KRUN_OCI_CONSOLE_LOG_LIMIT";
/// Operator knob: how many milliseconds a guest may take no byte of what
/// the host writes to it (while its VM runs and the host takes its output)
/// before its VM is killed. Generous by default: a loaded TCG host is slow.
pub const CONTROL_DEADLINE_VAR: &str = "KRUN_OCI_CONTROL_DEADLINE_MS";

/// Operator knob: how many bytes of a process's stdin the host may send
/// ahead of what guest-init reported taken (1 MiB by default). A larger
/// window is what a guest that reports bytes taken that it never took
/// gets: the tests use it to stand for one.
pub const STDIN_WINDOW_VAR: &str = "KRUN_OCI_STDIN_WINDOW";

/// The kernel command line beyond what the backend adds.
/// no_timer_check: on a loaded host (TCG, or many VMs booting at once) the
/// timer interrupt can miss the kernel's short test window at boot and it
/// panics with "IO-APIC + timer doesn't work"; virtual machines skip that
/// check.
pub const CMDLINE: &str = "quiet no_timer_check";

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

fn control_limits() -> Limits {
    let default = Limits::default();
    let ms = knob(CONTROL_DEADLINE_VAR, default.deadline.as_millis() as u64);
    let window = knob(STDIN_WINDOW_VAR, default.stdin_window as u64);
    Limits {
        deadline: Duration::from_millis(ms),
        stdin_window: usize::try_from(window).unwrap_or(usize::MAX).max(1),
        ..default
    }
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
    /// The guest stopped taking what the host writes to it.
    #[error("{0}; its VM was killed")]
    Unresponsive(Unresponsive),
    #[error("guest-init failed: {0}")]
    GuestFatal(String),
    #[error("the guest did not answer {what} within {after:?}; its VM was killed{tail}")]
    NoAnswer {
        what: &'static str,
        after: Duration,
        tail: ConsoleTail,
    },
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

pub(crate) fn console_tail(path: &Path) -> ConsoleTail {
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
    /// The guest stopped taking what the host writes to it; [`Session::next`]
    /// turns this into an error.
    Unresponsive(Unresponsive),
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
    /// The VM was restored from a template, not booted.
    pub restored: bool,
}

pub struct Session {
    vm: PausableVm,
    control: Control,
    events: Receiver<Event>,
    sender: SyncSender<Event>,
    console_log: PathBuf,
    console: CappedLog,
    pub timings: Timings,
}

impl Session {
    /// Boots the VM, its one share `shared_dir` (composed by
    /// [`crate::staging`]), and waits for guest-init's hello.
    /// `from`: a checkpoint's VM (`krun-oci restore`), restored instead
    /// of a boot; its guest-init, quiesced, waits for a Resume.
    #[allow(clippy::too_many_arguments)]
    pub fn boot(
        hv: &dyn Hypervisor,
        plan: &VmPlan,
        shared_dir: &Path,
        assets: &Assets,
        state_dir: &Path,
        run_dir: &Path,
        nets: Vec<krun_hypervisor::NetDevice>,
        from: Option<std::fs::File>,
    ) -> Result<Session, SessionError> {
        let (host_end, vm_end) = UnixStream::pair().map_err(SessionError::Channel)?;
        let console_log = state_dir.join("console.log");
        let log_limit = knob(CONSOLE_LOG_LIMIT_VAR, krun_hypervisor::DEFAULT_LOG_LIMIT);
        let (console, console_pipe) = CappedLog::create(&console_log, log_limit, "console log")
            .map_err(SessionError::Channel)?;
        let template = match from {
            Some(f) => Some(f),
            None => crate::template::for_vm(hv, plan, assets, nets.len()).map(|t| t.file),
        };
        let restored = template.is_some();
        let config = VmConfig {
            kernel: assets.kernel.clone(),
            initrd: assets.initrd.clone(),
            cmdline: CMDLINE.into(),
            vcpus: plan.vcpus,
            memory_mib: plan.memory_mib,
            shares: vec![krun_hypervisor::Share {
                tag: krun_proto::SHARE_TAG.to_string(),
                path: shared_dir.to_path_buf(),
                readonly: false,
            }],
            control: vm_end.into(),
            control_port_name: CONTROL_PORT_NAME.into(),
            console: console_pipe,
            log_limit,
            run_dir: run_dir.to_path_buf(),
            nets,
            snapshot: template
                .map(|file| krun_hypervisor::SnapshotIo::Restore { file: file.into() }),
        };
        let vm = hv.start(config).map_err(SessionError::Start)?;
        let spawned = Instant::now();
        let mut s = Session::attach(vm, host_end, control_limits(), console_log, console)?;
        s.timings.vmm_spawned = Some(spawned);
        if restored {
            // Its guest-init said hello to the template's builder and waits
            // for its container, as after a boot.
            s.timings.hello = Some(spawned);
            s.timings.restored = true;
            return Ok(s);
        }
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

    /// A session over a started VM whose end of the control channel is
    /// `host_end`: the writer with its `limits`, and a reader thread that
    /// turns the guest's frames into events.
    fn attach(
        vm: Box<dyn Vm>,
        host_end: UnixStream,
        limits: Limits,
        console_log: PathBuf,
        console: CappedLog,
    ) -> Result<Session, SessionError> {
        let reader = host_end.try_clone().map_err(SessionError::Channel)?;
        let (tx, events) = mpsc::sync_channel(64);
        let sender = tx.clone();
        let report = tx.clone();
        let control = Control::start(host_end, limits, move |u| {
            let _ = report.send(Event::Unresponsive(u));
        })
        .map_err(SessionError::Channel)?;
        let flag = control.clone();
        std::thread::Builder::new()
            .name("ctl-reader".into())
            .spawn(move || read_frames(FrameReader::new(reader), tx, flag))
            .map_err(SessionError::Channel)?;
        Ok(Session {
            vm: PausableVm {
                vm,
                control: control.clone(),
            },
            control,
            events,
            sender,
            console_log,
            console,
            timings: Timings::default(),
        })
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
        &mut self.vm
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
        .and_then(|e| match e {
            Some(Event::Unresponsive(u)) => Err(SessionError::Unresponsive(u)),
            e => Ok(e),
        })
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
    fn await_reply(&mut self, stream: u32, what: &'static str) -> Result<i32, SessionError> {
        // A guest that takes the request but never answers must not hang
        // the runtime: as long as a boot may take, then the VM goes.
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            match self.next(Some(deadline))? {
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
                None => {
                    return Err(SessionError::NoAnswer {
                        what,
                        after: BOOT_TIMEOUT,
                        tail: console_tail(&self.console_log),
                    })
                }
            }
        }
    }

    /// Has guest-init prepare the container up to the exec of its process.
    pub fn create(&mut self, setup: ContainerSetup) -> Result<i32, SessionError> {
        self.control
            .send(MAIN_STREAM, &ToGuest::Create(Box::new(setup)))
            .map_err(|e| SessionError::Protocol(e.into()))?;
        let pid = self.await_reply(MAIN_STREAM, "create")?;
        self.timings.created = Some(Instant::now());
        Ok(pid)
    }

    /// Execs the container's process.
    pub fn start(&mut self) -> Result<i32, SessionError> {
        self.control
            .send(MAIN_STREAM, &ToGuest::Start)
            .map_err(|e| SessionError::Protocol(e.into()))?;
        let pid = self.await_reply(MAIN_STREAM, "start")?;
        self.timings.started = Some(Instant::now());
        Ok(pid)
    }

    /// Asks the guest to power off and waits for the VM to end; kills it if
    /// it takes longer than `grace`, or at once if the guest was found
    /// unresponsive. Every host process of the VM is reaped.
    pub fn shutdown(mut self, grace: Duration) -> VmExit {
        let exit = self.stop_vm(grace);
        self.control.close();
        self.console.finish(CONSOLE_FLUSH);
        exit
    }

    fn stop_vm(&mut self, grace: Duration) -> VmExit {
        let grace = match self.control.unresponsive() {
            Some(_) => Duration::ZERO,
            // Queued, never waited for: the grace runs from now.
            None => match self.control.send(MAIN_STREAM, &ToGuest::Shutdown) {
                Ok(()) => grace,
                Err(_) => Duration::ZERO,
            },
        };
        let deadline = Instant::now() + grace;
        loop {
            match self.vm.try_wait() {
                Ok(Some(exit)) => return exit,
                Ok(None) if Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(2))
                }
                _ => {
                    self.vm.kill();
                    return self.vm.wait().unwrap_or(VmExit::Killed {
                        signal: libc::SIGKILL,
                    });
                }
            }
        }
    }
}

impl Drop for Session {
    /// The writer thread goes with the session (the VM goes with `vm`).
    fn drop(&mut self) {
        self.control.close();
    }
}

/// The ctl-reader thread: frames from the guest into the event loop. When
/// the loop is not taking them (it is blocked writing the guest's output
/// to a reader that is not reading), guest-init soon blocks writing to the
/// port and reads nothing: the control writer is told, so as not to blame
/// the guest.
fn read_frames(mut r: FrameReader<UnixStream>, tx: SyncSender<Event>, control: Control) {
    loop {
        let event = match r.read_frame() {
            Ok(Some(f)) => Event::Frame(f),
            Ok(None) => return drop(tx.send(Event::Closed(None))),
            Err(e) => return drop(tx.send(Event::Closed(Some(e)))),
        };
        match tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => {
                control.set_inbound_blocked(true);
                let sent = tx.send(event);
                control.set_inbound_blocked(false);
                if sent.is_err() {
                    return;
                }
            }
            Err(TrySendError::Disconnected(_)) => return,
        }
    }
}

/// The VM, with pauses known to the control writer: a paused guest reads
/// nothing, and is not to blame for it.
struct PausableVm {
    vm: Box<dyn Vm>,
    control: Control,
}

impl Vm for PausableVm {
    fn pid(&self) -> u32 {
        self.vm.pid()
    }

    fn wait(&mut self) -> Result<VmExit, krun_hypervisor::Error> {
        self.vm.wait()
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, krun_hypervisor::Error> {
        self.vm.try_wait()
    }

    fn kill(&mut self) {
        self.vm.kill()
    }

    fn pause(&mut self) -> Result<(), krun_hypervisor::Error> {
        self.control.set_paused(true);
        let r = self.vm.pause();
        if r.is_err() {
            self.control.set_paused(false);
        }
        r
    }

    fn resume(&mut self) -> Result<(), krun_hypervisor::Error> {
        self.vm.resume()?;
        self.control.set_paused(false);
        Ok(())
    }

    fn can_capture(&self) -> Result<(), krun_hypervisor::Error> {
        self.vm.can_capture()
    }

    // The guest is parked, and reads nothing, while it is captured.
    fn capture(
        &mut self,
        file: &std::fs::File,
        then: krun_hypervisor::AfterCapture,
    ) -> Result<(), krun_hypervisor::Error> {
        self.control.set_paused(true);
        let r = self.vm.capture(file, then);
        self.control.set_paused(false);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    /// A VM that runs until it is killed.
    struct FakeVm(Arc<AtomicBool>);

    impl Vm for FakeVm {
        fn pid(&self) -> u32 {
            0
        }
        fn wait(&mut self) -> Result<VmExit, krun_hypervisor::Error> {
            assert!(self.0.load(Ordering::SeqCst), "would wait forever");
            Ok(VmExit::Killed { signal: 9 })
        }
        fn try_wait(&mut self) -> Result<Option<VmExit>, krun_hypervisor::Error> {
            Ok(self
                .0
                .load(Ordering::SeqCst)
                .then_some(VmExit::Killed { signal: 9 }))
        }
        fn kill(&mut self) {
            self.0.store(true, Ordering::SeqCst);
        }
        fn pause(&mut self) -> Result<(), krun_hypervisor::Error> {
            Ok(())
        }
        fn resume(&mut self) -> Result<(), krun_hypervisor::Error> {
            Ok(())
        }
    }

    fn limits(deadline_ms: u64) -> Limits {
        Limits {
            deadline: Duration::from_millis(deadline_ms),
            tick: Duration::from_millis(10),
            ..Limits::default()
        }
    }

    /// A session over a fake VM whose guest never reads the control
    /// channel (its end is returned, to keep it open); stdin is being
    /// pumped, so the writer is stuck mid-frame.
    fn silent_session(dir: &Path, limits: Limits) -> (Session, Arc<AtomicBool>, UnixStream) {
        let (host, guest) = UnixStream::pair().unwrap();
        let killed = Arc::new(AtomicBool::new(false));
        let console_log = dir.join("console.log");
        let (console, _) = CappedLog::create(&console_log, 1000, "console log").unwrap();
        let vm = Box::new(FakeVm(killed.clone()));
        let session = Session::attach(vm, host, limits, console_log, console).unwrap();
        let pump = session.control.clone();
        std::thread::spawn(move || while pump.stdin(MAIN_STREAM, &[0; 65536]).is_ok() {});
        (session, killed, guest)
    }

    #[test]
    fn shutdown_kills_a_silent_guest_after_its_grace() {
        let dir = tempfile::tempdir().unwrap();
        let (session, killed, _guest) = silent_session(dir.path(), limits(60_000));
        let grace = Duration::from_millis(300);
        let start = Instant::now();
        let exit = session.shutdown(grace);
        let took = start.elapsed();
        assert_eq!(exit, VmExit::Killed { signal: 9 });
        assert!(killed.load(Ordering::SeqCst));
        assert!(took >= grace, "{took:?}");
        assert!(took < grace + Duration::from_secs(2), "{took:?}");
    }

    #[test]
    fn an_unresponsive_guest_is_an_error_and_killed_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let (mut session, killed, _guest) = silent_session(dir.path(), limits(200));
        let start = Instant::now();
        let err = match session.next(None) {
            Err(e) => e,
            Ok(_) => panic!("an event instead of the error"),
        };
        assert!(start.elapsed() >= Duration::from_millis(200));
        assert_eq!(
            err.to_string(),
            "the guest stopped reading its control channel for 200 ms; its VM was killed"
        );
        let start = Instant::now();
        session.shutdown(Duration::from_secs(30));
        assert!(killed.load(Ordering::SeqCst));
        assert!(start.elapsed() < Duration::from_secs(2));
    }

    /// While the event loop does not take the guest's frames, the guest is
    /// not blamed for not reading; once it does, the clock runs again.
    #[test]
    fn the_reader_blocked_on_the_event_loop_excuses_the_guest() {
        let (host, _guest) = UnixStream::pair().unwrap();
        let (tx, reports) = mpsc::channel();
        let control = Control::start(host, limits(200), move |u| tx.send(u).unwrap()).unwrap();
        let (events_tx, events) = mpsc::sync_channel(1);
        let (from_guest, mut guest_out) = UnixStream::pair().unwrap();
        let flag = control.clone();
        std::thread::spawn(move || read_frames(FrameReader::new(from_guest), events_tx, flag));
        for _ in 0..3 {
            let f = Frame::control(MAIN_STREAM, &ToHost::Oom).encode().unwrap();
            guest_out.write_all(&f).unwrap();
        }
        // One event fits in the channel; the reader blocks on the second.
        let _first = events.recv().unwrap();
        let deadline = Instant::now() + Duration::from_secs(20);
        while !control.inbound_blocked() {
            assert!(Instant::now() < deadline, "the reader did not block");
            std::thread::sleep(Duration::from_millis(1));
        }
        let pump = control.clone();
        std::thread::spawn(move || while pump.stdin(MAIN_STREAM, &[0; 65536]).is_ok() {});
        assert!(
            reports.recv_timeout(Duration::from_millis(600)).is_err(),
            "blamed while the host held the guest back"
        );
        let released = Instant::now();
        events.recv().unwrap();
        events.recv().unwrap();
        assert_eq!(
            reports.recv_timeout(Duration::from_secs(20)).unwrap(),
            Unresponsive::Stalled(Duration::from_millis(200))
        );
        assert!(released.elapsed() >= Duration::from_millis(200));
    }
}
