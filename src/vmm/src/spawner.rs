//! The VM's "vmm-spawner" thread: the one thread that starts device
//! workers, so that no vCPU thread needs to.
//!
//! A device starts its worker when the driver writes DRIVER_OK, an MMIO
//! write served on a vCPU thread; a thread inherits its creator's seccomp
//! filters, so a worker started there would carry the vCPU's allowlist,
//! which would then have to allow everything every worker does. Instead
//! the vCPU hands the worker's body to this thread over a channel and
//! waits for the handle (or the error) back:
//!
//! ```text
//! vm.rs start ─ Spawner::start ─ thread "vmm-spawner": confine(Spawner)
//!                                  └ for each request: spawn it, reply
//!             ─ vCPU thread: Spawner::enter, confine(Vcpu), run
//!                  └ DRIVER_OK ─ worker::spawn ─ spawner::spawn ─ request
//! ```
//!
//! The spawner is created before the vCPU threads, by the thread that
//! builds the VM, so it carries no vCPU filter; its own allowlist
//! (crate::seccomp, kind `Spawner`) is the union of the workers' lists and
//! what starting a thread takes. Each worker then narrows that to its own.
//! The spawner ends when the last vCPU thread (the last holder of its
//! channel) does. A thread that entered no spawner (unit tests, fuzz
//! targets driving a device without a VM) starts its workers itself.

use std::cell::RefCell;
use std::io;
use std::os::fd::AsRawFd;
use std::sync::mpsc;
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::EventFd;

use crate::seccomp::{self, Kind};

/// The name of the spawner thread.
pub const THREAD_NAME: &str = "vmm-spawner";

/// A thread to start: its name and body, and where its handle goes.
struct Request {
    name: String,
    body: Box<dyn FnOnce() + Send>,
    reply: mpsc::SyncSender<io::Result<JoinHandle<()>>>,
}

/// The way to a VM's spawner thread.
#[derive(Clone)]
pub struct Spawner {
    requests: mpsc::Sender<Request>,
}

thread_local! {
    /// The spawner that starts the calling thread's workers, if any.
    static CURRENT: RefCell<Option<Spawner>> = const { RefCell::new(None) };
}

impl Spawner {
    /// Starts a VM's spawner thread; a forbidden system call there writes
    /// `stop`, the VM's stop event.
    pub fn start(stop: &EventFd) -> io::Result<Spawner> {
        let stop = stop.try_clone()?;
        let (requests, incoming) = mpsc::channel::<Request>();
        std::thread::Builder::new()
            .name(THREAD_NAME.into())
            .spawn(move || serve(&incoming, &stop))?;
        Ok(Spawner { requests })
    }

    /// Makes this spawner start every worker the calling thread asks for.
    pub fn enter(self) {
        CURRENT.with(|c| *c.borrow_mut() = Some(self));
    }
}

/// The spawner thread's body.
fn serve(incoming: &mpsc::Receiver<Request>, stop: &EventFd) {
    if let Err(e) = seccomp::confine(Kind::Spawner, stop.as_raw_fd()) {
        tracing::error!(error = %e, "cannot install the spawner's seccomp filter");
    }
    for r in incoming {
        let started = std::thread::Builder::new().name(r.name).spawn(r.body);
        // The asker is gone only if its VM is: the thread ends on the
        // VM's stop event.
        let _ = r.reply.send(started);
    }
}

/// Starts the thread `name` running `body`: on the calling thread's
/// spawner if it entered one, else directly.
pub fn spawn<F>(name: String, body: F) -> io::Result<JoinHandle<()>>
where
    F: FnOnce() + Send + 'static,
{
    let Some(requests) = CURRENT.with(|c| c.borrow().as_ref().map(|s| s.requests.clone())) else {
        return std::thread::Builder::new().name(name).spawn(body);
    };
    let gone = || io::Error::other("the VM's spawner thread is gone");
    let (reply, answer) = mpsc::sync_channel(1);
    let body = Box::new(body);
    requests
        .send(Request { name, body, reply })
        .map_err(|_| gone())?;
    answer.recv().map_err(|_| gone())?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn filters() -> u32 {
        std::fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Seccomp_filters:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    }

    #[test]
    fn without_a_spawner_a_thread_starts_its_workers_itself() {
        let h = spawn("direct".into(), || ()).unwrap();
        assert_eq!(h.thread().name(), Some("direct"));
        h.join().unwrap();
    }

    #[test]
    fn workers_start_on_the_spawner_under_its_filter_not_the_askers() {
        let stop = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let spawner = Spawner::start(&stop).unwrap();
        // The asker, a thread of its own: the spawner stays with it.
        let (asker, worker) = std::thread::spawn(move || {
            spawner.enter();
            let (tx, rx) = mpsc::channel();
            let h = spawn("virtio-test".into(), move || {
                let name = std::thread::current().name().map(String::from);
                tx.send((name, filters())).unwrap();
            })
            .unwrap();
            h.join().unwrap();
            (filters(), rx.recv().unwrap())
        })
        .join()
        .unwrap();
        assert_eq!(worker.0.as_deref(), Some("virtio-test"));
        // The worker carries the spawner's filter (started there, with
        // clone3 answered ENOSYS and clone allowed), the asker does not.
        assert_eq!(worker.1, asker + 1);
        assert!(stop.read().is_err(), "no forbidden call was made");
    }
}
