//! Signals and stdin: what flows from the host into a running container
//! besides requests.

use std::fs::File;
use std::io::Read;
use std::sync::mpsc::SyncSender;
use std::sync::{Arc, Mutex};

use signal_hook::consts::signal::*;

use crate::session::{Control, Event};

/// Signals the runtime passes on to the workload, as runc does (all but
/// SIGCHLD, SIGURG and the job-control stops; SIGWINCH becomes a terminal
/// resize).
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

/// Catches the forwarded signals and feeds them to a session's event loop.
/// Signals that arrive before there is a loop are held until there is.
pub struct SignalForwarder {
    inner: Arc<Mutex<Forwarding>>,
}

#[derive(Default)]
struct Forwarding {
    sender: Option<SyncSender<Event>>,
    pending: Vec<i32>,
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
                    match &f.sender {
                        Some(tx) => {
                            let _ = tx.send(Event::Signal(sig));
                        }
                        None => f.pending.push(sig),
                    }
                }
            })?;
        Ok(SignalForwarder { inner })
    }

    /// From now on signals go to `sender`; held ones go first.
    pub fn attach(&self, sender: SyncSender<Event>) {
        let mut f = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        for sig in std::mem::take(&mut f.pending) {
            let _ = sender.send(Event::Signal(sig));
        }
        f.sender = Some(sender);
    }
}

/// Copies `input` to the stdin of process `stream` in the guest, then
/// signals end of file. Runs on a thread of its own.
pub fn pump_stdin(control: Control, stream: u32, mut input: File) {
    control.open_stdin(stream);
    let _ = std::thread::Builder::new()
        .name(format!("stdin-{stream}"))
        .spawn(move || {
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match input.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => {
                        if control.stdin(stream, &buf[..n]).is_err() {
                            control.close_stdin(stream);
                            return;
                        }
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(_) => break,
                }
            }
            let _ = control.stdin_eof(stream);
            control.close_stdin(stream);
        });
}
