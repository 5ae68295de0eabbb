//! The container as its monitor keeps it: its state (saved to the state
//! directory as it changes), the host end of its process's stdio, and the
//! table of what waits on each stream. What a guest frame
//! ([`super::frames`]) or a client request ([`super::requests`]) does to
//! it is decided here without a VM: the guest is reached through
//! [`Control`] alone, which a test gives a socket.

use std::os::fd::AsFd;
use std::sync::mpsc::Sender;

use krun_proto::{ToGuest, MAIN_STREAM};

use super::report::Notice;
use super::stdio::MainIo;
use super::streams::Streams;
use crate::relay::pump_stdin;
use crate::session::Control;
use crate::state::{State, StateDir, Status};
use crate::tty;

pub(super) struct Container {
    pub id: String,
    pub state_dir: StateDir,
    pub state: State,
    pub control: Control,
    pub main: MainIo,
    /// The container's process was started.
    pub started: bool,
    pub streams: Streams,
    /// Signals for the process that came before its start.
    pub held_signals: Vec<i32>,
    pub notices: Option<Sender<Notice>>,
    /// The VM's memory, in bytes: no `update` can give the container more.
    pub memory_limit: u64,
    /// No output of the container's process was seen yet (for timings).
    pub first_output: bool,
    /// A checkpoint waiting for its guest to quiesce (`requests.rs`).
    pub checkpoint: Option<super::requests::PendingCheckpoint>,
}

impl Container {
    /// The name the VM knows this container by ([`State::guest_id`]).
    pub fn guest_id(&self) -> &str {
        self.state.guest_id.as_deref().unwrap_or(&self.id)
    }

    /// A container just created in its VM.
    pub fn new(
        state_dir: StateDir,
        state: State,
        control: Control,
        main: MainIo,
        notices: Option<Sender<Notice>>,
        memory_limit: u64,
    ) -> Container {
        Container {
            id: state.id.clone(),
            state_dir,
            state,
            control,
            main,
            started: false,
            streams: Streams::new(),
            held_signals: Vec::new(),
            notices,
            memory_limit,
            first_output: true,
            checkpoint: None,
        }
    }

    /// Records the state; a failure is logged, the container goes on.
    pub fn save(&mut self) {
        if let Err(e) = self.state_dir.write(&self.state) {
            tracing::warn!(container = %self.id, error = %e, "cannot record the container's state");
        }
    }

    /// The container's process runs: it is `running`, its stdin flows, its
    /// terminal gets its size, and the signals held for it go.
    pub fn on_started(&mut self) {
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
            self.signal_main(sig);
        }
    }

    /// A signal for the container: SIGWINCH is a resize, the rest go to its
    /// process (held until it is started).
    pub fn on_signal(&mut self, sig: i32) {
        if sig == libc::SIGWINCH {
            if self.started {
                self.resize_from_tty();
            }
        } else if self.started {
            self.signal_main(sig);
        } else {
            self.held_signals.push(sig);
        }
    }

    fn signal_main(&self, signal: i32) {
        let _ = self
            .control
            .send(MAIN_STREAM, &ToGuest::Signal { signal, all: false });
    }

    fn resize_from_tty(&mut self) {
        if let Some((rows, cols)) = self.main.tty.as_ref().and_then(|t| tty::size(t.as_fd())) {
            let _ = self
                .control
                .send(MAIN_STREAM, &ToGuest::Resize { rows, cols });
        }
    }
}
