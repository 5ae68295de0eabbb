//! Moving a running container's stdio and signals between the host and the
//! guest, until its process exits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Mutex};

use krun_proto::{ExitStatus, FrameKind, ToGuest, ToHost, MAIN_STREAM};
use signal_hook::consts::signal::*;

use crate::session::{Control, Event, Session, SessionError};

/// Signals a foreground runtime passes on to the workload, as runc does
/// (all but SIGCHLD, SIGURG and the job-control stops; SIGWINCH becomes a
/// terminal resize).
pub const FORWARDED: &[i32] = &[
    SIGHUP,
    SIGINT,
    SIGQUIT,
    SIGUSR1,
    SIGUSR2,
    SIGTERM,
    SIGALRM,
    SIGCONT,
    libc::SIGPWR,
    SIGVTALRM,
    SIGPROF,
    SIGXCPU,
    SIGXFSZ,
    SIGSYS,
    SIGTRAP,
    SIGWINCH,
];

/// Forwards signals the runtime receives. Signals that arrive before the
/// container's process runs are held and delivered once it does.
pub struct SignalForwarder {
    inner: Arc<Mutex<Forwarding>>,
}

#[derive(Default)]
struct Forwarding {
    control: Option<Control>,
    pending: Vec<i32>,
    winsize_from: Option<OwnedFd>,
}

impl SignalForwarder {
    /// Installs the handlers now (so a Ctrl-C during boot is not lost).
    pub fn install() -> std::io::Result<SignalForwarder> {
        let inner = Arc::new(Mutex::new(Forwarding::default()));
        let mut signals = signal_hook::iterator::Signals::new(FORWARDED)?;
        let shared = inner.clone();
        std::thread::Builder::new()
            .name("signals".into())
            .spawn(move || {
                for sig in signals.forever() {
                    let mut f = shared.lock().unwrap_or_else(|e| e.into_inner());
                    f.deliver(sig);
                }
            })?;
        Ok(SignalForwarder { inner })
    }

    /// From now on signals go to the running process; held ones go first.
    /// `tty` is the host terminal whose size changes are forwarded.
    pub fn attach(&self, control: Control, tty: Option<OwnedFd>) {
        let mut f = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        f.control = Some(control);
        f.winsize_from = tty;
        for sig in std::mem::take(&mut f.pending) {
            f.deliver(sig);
        }
        if f.winsize_from.is_some() {
            f.deliver(SIGWINCH);
        }
    }
}

impl Forwarding {
    fn deliver(&mut self, sig: i32) {
        let Some(control) = &self.control else {
            if sig != SIGWINCH {
                self.pending.push(sig);
            }
            return;
        };
        let msg = if sig == SIGWINCH {
            let Some((rows, cols)) = self
                .winsize_from
                .as_ref()
                .and_then(|fd| crate::tty::size(fd.as_fd()))
            else {
                return;
            };
            ToGuest::Resize { rows, cols }
        } else {
            ToGuest::Signal {
                signal: sig,
                all: false,
            }
        };
        let _ = control.send(MAIN_STREAM, &msg);
    }
}

/// Copies `input` to the process's stdin in the guest, then signals EOF.
pub fn pump_stdin(control: Control, mut input: File) {
    let _ = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if control.stdin(MAIN_STREAM, &buf[..n]).is_err() {
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = control.stdin_eof(MAIN_STREAM);
        });
}

/// How the container's process ended.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: ExitStatus,
    pub oom_killed: bool,
}

/// Writes the process's output to `stdout`/`stderr` until it exits.
/// A host side that stops reading (EPIPE) does not stop the container.
pub fn relay_output(
    session: &mut Session,
    mut stdout: Option<File>,
    mut stderr: Option<File>,
) -> Result<Outcome, SessionError> {
    let mut oom_killed = false;
    let mut first_output = true;
    loop {
        let event = session.next(None)?.unwrap_or(Event::Closed(None));
        match event {
            Event::Frame(f) if f.stream != MAIN_STREAM => {}
            Event::Frame(f) => match f.kind {
                FrameKind::Stdout | FrameKind::Stderr => {
                    if first_output {
                        first_output = false;
                        tracing::debug!(since_start_ms = crate::since_start_ms(), "first output");
                    }
                    let out = if f.kind == FrameKind::Stdout {
                        &mut stdout
                    } else {
                        &mut stderr
                    };
                    if let Some(w) = out {
                        if w.write_all(&f.payload).is_err() {
                            *out = None;
                        }
                    }
                }
                FrameKind::Control => match f.message::<ToHost>()? {
                    ToHost::Exited { status } => return Ok(Outcome { status, oom_killed }),
                    ToHost::Oom => {
                        oom_killed = true;
                        tracing::warn!("the container hit its memory limit and the guest kernel killed a process (OOM)");
                    }
                    ToHost::Fatal { message } => return Err(SessionError::GuestFatal(message)),
                    _ => {}
                },
                FrameKind::Stdin => {}
            },
            Event::Closed(e) => return Err(session.stopped_error(e)),
        }
    }
}
