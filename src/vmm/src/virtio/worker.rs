//! The worker thread of every virtio device: one epoll loop over the
//! queues' notification eventfds, the VM's stop event and at most one
//! backend descriptor (the console's socket, the network card's tap), and
//! the one place such a thread is started.
//!
//! A device keeps its logic in plain methods over its queues that tests
//! drive without a thread; it hands them to [`spawn`] as a
//! [`QueueHandler`], and this module does the rest (the pattern of Cloud
//! Hypervisor's `epoll_helper.rs` and `thread_helper.rs`):
//!
//! ```text
//! spawn(name) ─ (on the VM's spawner) thread "name": on_start ─ confine ─ serve(all queues)
//!                 └ loop: watch the backend for what the handler wants now
//!                         wait ─ stop event readable? ─ on_exit, end
//!                         clear the notified queues' counters ─ serve(them)
//! ```
//!
//! The stop event is the VM's, shared by every device: it is seen, never
//! read, so each device's thread sees it.
//!
//! A device that can be captured starts its thread with
//! [`spawn_pausable`]: the loop then also watches the transport's pause
//! line ([`super::pause`]) and, when asked, parks between two rounds of
//! serving, after reporting its queues ([`QueueHandler::capture_queues`]).
//! Every transport `vm.rs` builds has a pause line (so that any VM can be
//! captured); without one (device tests) the loop is the same, less the
//! pause.

use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::EventFd;

use super::pause::{DeviceReport, Pause};
use super::state::QueueSnapshot;
use super::DeviceError;

/// epoll token of the VM's stop event; queue notifications use their
/// queue index.
pub const TOKEN_STOP: u64 = u64::MAX;
/// epoll token of the device's backend descriptor.
pub const TOKEN_BACKEND: u64 = u64::MAX - 1;
/// epoll token of the transport's pause line.
pub const TOKEN_PAUSE: u64 = u64::MAX - 2;

/// Events taken from epoll at a time.
const EVENTS: usize = 8;

/// A device's side of its worker thread.
pub trait QueueHandler: Send + 'static {
    /// Serves what can be served now: `notified` are the queues whose
    /// notification woke the thread (every queue when it starts, none when
    /// only the backend did). Interrupts the guest as needed.
    fn serve(&mut self, notified: &[usize]);

    /// The backend descriptor and what to watch it for now. epoll is
    /// level-triggered here, so only what can make progress should be
    /// asked for (an empty set stops watching; a readable socket the
    /// device cannot take from would wake the thread forever).
    fn backend(&self) -> Option<(RawFd, EventSet)> {
        None
    }

    /// Runs first on the new thread, before it is confined: the set-up
    /// the thread needs once.
    fn on_start(&mut self) {}

    /// Runs last on the thread, after the loop ended.
    fn on_exit(&mut self) {}

    /// The state of every queue, by queue index, as a restored device
    /// must continue from it (a chain popped and not used yet is given
    /// back: its entry comes again). Called on the worker's thread between
    /// two rounds of serving. None: this device cannot be captured yet.
    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        None
    }

    /// The device's own state where the worker holds it (the console's
    /// buffered bytes), called right after [`QueueHandler::capture_queues`]
    /// on the parked worker. `Ok(None)`: the device's
    /// [`super::VirtioDevice::save_state`] says it all. `Err(why)`: the
    /// device cannot be captured in the state it is in now.
    fn capture_device(&self) -> DeviceReport {
        Ok(None)
    }
}

/// Starts the thread `name` serving `handler`: `notify[i]` is the eventfd
/// queue `i`'s notifications arrive on, `stop` the VM's stop event.
pub fn spawn<H: QueueHandler>(
    name: String,
    handler: H,
    notify: Vec<EventFd>,
    stop: EventFd,
) -> Result<JoinHandle<()>, DeviceError> {
    spawn_pausable(name, handler, notify, stop, None)
}

/// [`spawn`], and the thread parks when `pause` asks it to (None: as
/// [`spawn`]).
pub fn spawn_pausable<H: QueueHandler>(
    name: String,
    handler: H,
    notify: Vec<EventFd>,
    stop: EventFd,
    pause: Option<Arc<Pause>>,
) -> Result<JoinHandle<()>, DeviceError> {
    // Before the thread exists: a pause asked from now on waits for it.
    if let Some(p) = &pause {
        p.attach();
    }
    let detach = pause.clone();
    // On the VM's spawner thread, not on the vCPU that activates the
    // device (crate::spawner).
    crate::spawner::spawn(name, move || run(handler, &notify, &stop, pause.as_deref()))
        .inspect_err(|_| {
            if let Some(p) = detach {
                p.detach();
            }
        })
        .map_err(DeviceError::Worker)
}

/// The body of every device thread.
fn run<H: QueueHandler>(mut handler: H, notify: &[EventFd], stop: &EventFd, pause: Option<&Pause>) {
    // However the thread ends (a panic too), a pause no longer waits.
    let _detach = Detach(pause);
    handler.on_start();
    confine(stop);
    if let Err(e) = event_loop(&mut handler, notify, stop, pause) {
        let thread = std::thread::current();
        tracing::error!(thread = thread.name(), error = %e, "virtio device worker failed");
    }
    handler.on_exit();
}

/// Detaches the worker from its pause line when its thread ends.
struct Detach<'a>(Option<&'a Pause>);

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        if let Some(p) = self.0 {
            p.detach();
        }
    }
}

/// Where a device thread gives up what it does not need, after its own
/// set-up and before it touches the first guest byte: the allowlist of
/// its kind (crate::seccomp), whose report stops the VM through `stop`.
fn confine(stop: &EventFd) {
    let thread = std::thread::current();
    let name = thread.name().unwrap_or_default();
    if let Err(e) = crate::seccomp::confine_worker(name, stop.as_raw_fd()) {
        tracing::error!(thread = name, error = %e, "cannot install the worker's seccomp filter");
    }
}

fn event_loop<H: QueueHandler>(
    handler: &mut H,
    notify: &[EventFd],
    stop: &EventFd,
    pause: Option<&Pause>,
) -> io::Result<()> {
    let epoll = Epoll::new()?;
    for (i, evt) in notify.iter().enumerate() {
        add(&epoll, evt.as_raw_fd(), i as u64)?;
    }
    add(&epoll, stop.as_raw_fd(), TOKEN_STOP)?;
    if let Some(p) = pause {
        add(&epoll, p.fd(), TOKEN_PAUSE)?;
    }
    let all: Vec<usize> = (0..notify.len()).collect();
    // Anything the driver queued before it set DRIVER_OK.
    handler.serve(&all);
    let mut backend = Backend::new();
    let mut events = [EpollEvent::default(); EVENTS];
    let mut notified = Vec::with_capacity(notify.len());
    loop {
        backend.watch(&epoll, handler.backend())?;
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let ready = &events[..n];
        if ready.iter().any(|ev| ev.data() == TOKEN_STOP) {
            return Ok(());
        }
        notified.clear();
        for ev in ready {
            if ev.data() == TOKEN_PAUSE {
                // Between two rounds of serving: no queue is in use.
                if let Some(p) = pause {
                    p.park(|| (handler.capture_queues(), handler.capture_device()));
                }
                continue;
            }
            let Some(i) = usize::try_from(ev.data()).ok() else {
                continue;
            };
            if let Some(evt) = notify.get(i) {
                // Cleared before serving, so a notification that arrives
                // while the queue is served wakes the loop again.
                let _ = evt.read();
                notified.push(i);
            }
        }
        handler.serve(&notified);
    }
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// What the backend descriptor is registered for.
struct Backend {
    registered: EventSet,
}

impl Backend {
    fn new() -> Backend {
        Backend {
            registered: EventSet::empty(),
        }
    }

    /// Registers, changes or removes the backend's interest so that epoll
    /// watches it for `want` (None: the device has no backend).
    fn watch(&mut self, epoll: &Epoll, want: Option<(RawFd, EventSet)>) -> io::Result<()> {
        let Some((fd, want)) = want else {
            return Ok(());
        };
        if want == self.registered {
            return Ok(());
        }
        let op = if self.registered.is_empty() {
            ControlOperation::Add
        } else if want.is_empty() {
            ControlOperation::Delete
        } else {
            ControlOperation::Modify
        };
        epoll.ctl(op, fd, EpollEvent::new(want, TOKEN_BACKEND))?;
        self.registered = want;
        Ok(())
    }
}
