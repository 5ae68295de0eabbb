//! Quiescing a device's worker thread for a snapshot: the controller asks
//! the worker to stop between two rounds of serving, the worker parks and
//! hands over its queues' state, and waits until it is let go.
//!
//! ```text
//! controller: request ─ write evt ─ wait until parked ─ (capture) ─ resume
//! worker:     epoll: TOKEN_PAUSE ─ read evt ─ park: publish queues ─ wait ─ serve on
//! ```
//!
//! Every descriptor this takes (one eventfd) is made by [`Pause::new`],
//! on the thread that builds the transport (the VM's set-up thread), never
//! on a vCPU or worker thread: their seccomp allowlists have no eventfd2.
//! A worker only reads that eventfd and takes a mutex and a condvar
//! (read, futex), which every worker's allowlist has. The pause is
//! checked once per wake-up of the worker, outside the queue serving:
//! the per-request path takes no lock it did not take before.
//!
//! A parked worker does not see the VM's stop event: whoever pauses must
//! resume (or drop the [`Paused`] guard, which resumes).

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::state::QueueSnapshot;

/// The pause line between one device's controller and its worker thread.
pub struct Pause {
    evt: EventFd,
    state: Mutex<State>,
    changed: Condvar,
}

struct State {
    /// The controller wants the worker parked.
    requested: bool,
    /// A worker serves this device (set when it is spawned, cleared when
    /// its thread ends).
    attached: bool,
    /// The worker is parked: it touches no queue until `requested` clears.
    parked: bool,
    /// What the parked worker reported of its queues (None: its device
    /// cannot be captured yet).
    queues: Option<Vec<QueueSnapshot>>,
    /// What it reported of its device's own state.
    device: DeviceReport,
}

impl Default for State {
    fn default() -> State {
        State {
            requested: false,
            attached: false,
            parked: false,
            queues: None,
            device: Ok(None),
        }
    }
}

/// What a parked worker reports of its device's own state, beside the
/// queues ([`super::worker::QueueHandler::capture_device`]): `Ok(None)`
/// when the device's [`super::VirtioDevice::save_state`] says it all,
/// `Ok(Some(bytes))` when the worker holds it, `Err(why)` when the device
/// cannot be captured in the state it is in now.
pub type DeviceReport = Result<Option<Vec<u8>>, String>;

/// Why a worker could not be paused.
#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the device's worker did not pause within {0:?}")]
    Timeout(Duration),
    #[error("the device is already paused")]
    AlreadyPaused,
    #[error("signalling the device's worker")]
    Signal(#[source] io::Error),
}

impl Pause {
    /// A pause line; call on the VM's set-up thread (it makes an eventfd).
    pub fn new() -> io::Result<Pause> {
        Ok(Pause {
            evt: EventFd::new(EFD_NONBLOCK)?,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The descriptor the worker's epoll watches.
    pub fn fd(&self) -> RawFd {
        self.evt.as_raw_fd()
    }

    /// A worker now serves the device (called as it is spawned).
    pub fn attach(&self) {
        self.lock().attached = true;
    }

    /// The worker's thread ends: a pause no longer waits for it.
    pub fn detach(&self) {
        let mut s = self.lock();
        s.attached = false;
        s.parked = false;
        s.queues = None;
        s.device = Ok(None);
        self.changed.notify_all();
    }

    /// Whether a worker serves the device.
    pub fn attached(&self) -> bool {
        self.lock().attached
    }

    /// Asks the worker to park and waits (at most `timeout`) until it has.
    /// Returns what it reported of its queues: `Ok(None)` when no worker
    /// runs or it cannot report them. On an error the request is taken
    /// back.
    pub fn request(self: &Arc<Self>, timeout: Duration) -> Result<Paused, PauseError> {
        let deadline = Instant::now() + timeout;
        let mut s = self.lock();
        if s.requested {
            // One pause at a time: the first guard's drop would let the
            // worker go under the second.
            return Err(PauseError::AlreadyPaused);
        }
        s.requested = true;
        if s.attached {
            if let Err(e) = self.evt.write(1) {
                s.requested = false;
                return Err(PauseError::Signal(e));
            }
        }
        while s.attached && !s.parked {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                s.requested = false;
                self.changed.notify_all();
                return Err(PauseError::Timeout(timeout));
            }
            s = self
                .changed
                .wait_timeout(s, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        Ok(Paused {
            pause: Some(self.clone()),
            queues: s.queues.clone(),
            device: s.device.clone(),
        })
    }

    /// Lets the worker go on.
    fn resume(&self) {
        let mut s = self.lock();
        s.requested = false;
        self.changed.notify_all();
    }

    /// On the worker's thread, woken by the pause eventfd: parks until
    /// resumed, after publishing `capture()` (its queues' state and its
    /// device's). A wake-up with no request pending (one taken back)
    /// returns at once.
    pub fn park(&self, capture: impl FnOnce() -> (Option<Vec<QueueSnapshot>>, DeviceReport)) {
        let _ = self.evt.read();
        let mut s = self.lock();
        if !s.requested {
            return;
        }
        (s.queues, s.device) = capture();
        s.parked = true;
        self.changed.notify_all();
        while s.requested {
            s = self.changed.wait(s).unwrap_or_else(|e| e.into_inner());
        }
        s.parked = false;
        s.queues = None;
        s.device = Ok(None);
    }
}

/// A parked worker (or a device with none running): resumed on drop.
pub struct Paused {
    pause: Option<Arc<Pause>>,
    /// The worker's queues as it left them (None: no worker reported).
    pub queues: Option<Vec<QueueSnapshot>>,
    /// What the worker reported of its device's own state.
    pub device: DeviceReport,
}

impl Paused {
    /// A device with no pause line and no worker: nothing to park.
    pub fn nothing() -> Paused {
        Paused {
            pause: None,
            queues: None,
            device: Ok(None),
        }
    }

    /// Whether this is the pause of `line`.
    pub fn is_of(&self, line: Option<&Arc<Pause>>) -> bool {
        match (&self.pause, line) {
            (Some(a), Some(b)) => Arc::ptr_eq(a, b),
            (None, None) => true,
            _ => false,
        }
    }
}

impl Drop for Paused {
    fn drop(&mut self) {
        if let Some(p) = &self.pause {
            p.resume();
        }
    }
}
