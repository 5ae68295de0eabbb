//! The vCPU run loop: VM exits become device accesses, and the exits
//! that end a VM become a typed [`VmExit`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use krun_hypervisor::VmExit;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Action, Bus};
use crate::seccomp;
use crate::snapshot::{CapturePlan, SnapshotError, VcpuState};
use crate::spawner::Spawner;

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

pub extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Shared by the vCPU threads and the handle of the running VM.
pub struct Control {
    pub stopping: AtomicBool,
    /// Whether the VM is paused, and a capture asked of its parked vCPUs.
    parking: Mutex<Parking>,
    /// Wakes the parked vCPUs: resumed, stopping, or a capture asked.
    pub unpaused: Condvar,
    /// Wakes whoever waits for the parked vCPUs' captured states.
    captured: Condvar,
    /// How many vCPUs are parked.
    pub parked: AtomicUsize,
    pub exit: Mutex<Option<VmExit>>,
    pub done: Condvar,
    /// Readable once the VM stops: device worker threads exit on it.
    pub stop: EventFd,
}

/// What the parked vCPUs look at, under one lock with the pause flag so
/// that no request is missed between a check and a wait.
#[derive(Default)]
struct Parking {
    /// While set, vCPUs wait in [`Control::park`] instead of running.
    paused: bool,
    /// A capture of every parked vCPU, while one is asked.
    capture: Option<CaptureRequest>,
    /// Numbers the requests: a late answer to one taken back (timed out)
    /// is never taken for an answer to the next.
    generation: u64,
}

/// A capture asked of the parked vCPUs ([`Control::capture_parked`]):
/// each takes its own job, captures itself on its own thread (it owns
/// its `VcpuFd`) and hands the state back here.
struct CaptureRequest {
    generation: u64,
    plan: Arc<CapturePlan>,
    /// By vCPU id: its thread has taken the job.
    taken: Vec<bool>,
    /// By vCPU id: what it handed back.
    states: Vec<Option<Result<VcpuState, SnapshotError>>>,
}

impl Parking {
    /// The capture job of vCPU `id`, if one is asked and not yet taken.
    fn take_job(&mut self, id: usize) -> Option<(u64, Arc<CapturePlan>)> {
        let r = self.capture.as_mut()?;
        let taken = r.taken.get_mut(id)?;
        if *taken {
            return None;
        }
        *taken = true;
        Some((r.generation, r.plan.clone()))
    }

    /// Records vCPU `id`'s answer to request `generation`, if that is
    /// still the one asked.
    fn answer(&mut self, generation: u64, id: usize, state: Result<VcpuState, SnapshotError>) {
        if let Some(r) = self.capture.as_mut().filter(|r| r.generation == generation) {
            if let Some(slot) = r.states.get_mut(id) {
                *slot = Some(state);
            }
        }
    }
}

/// Why the parked vCPUs' states could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum VcpuCaptureError {
    #[error("vCPU {0} did not hand its state back within {1:?}")]
    Timeout(usize, Duration),
    #[error("the VM stopped before every vCPU was captured")]
    Stopped,
    #[error("vCPU {0}")]
    Vcpu(usize, #[source] SnapshotError),
}

impl Control {
    pub fn new(stop: EventFd) -> Control {
        Control {
            stopping: AtomicBool::new(false),
            parking: Mutex::new(Parking::default()),
            unpaused: Condvar::new(),
            captured: Condvar::new(),
            parked: AtomicUsize::new(0),
            exit: Mutex::new(None),
            done: Condvar::new(),
            stop,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Parking> {
        self.parking.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Blocks the calling vCPU thread (vCPU `id`) while the VM is paused.
    /// Parked, it serves a capture request: `capture` reads its state
    /// (its last exit completed first), on this thread, outside the lock.
    pub fn park(
        &self,
        id: usize,
        mut capture: impl FnMut(&CapturePlan) -> Result<VcpuState, SnapshotError>,
    ) {
        let mut p = self.lock();
        if !p.paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        // A forbidden call (say the wait itself) ends the wait: the run
        // loop reports it.
        while p.paused && !self.stopping.load(Ordering::SeqCst) && !seccomp::violated() {
            if let Some((generation, plan)) = p.take_job(id) {
                drop(p);
                let state = capture(&plan);
                p = self.lock();
                p.answer(generation, id, state);
                self.captured.notify_all();
                continue;
            }
            p = self.unpaused.wait(p).unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sets or clears the pause flag (the caller kicks the vCPUs).
    pub fn set_paused(&self, on: bool) {
        self.lock().paused = on;
        if !on {
            self.unpaused.notify_all();
        }
    }

    /// Whether the pause flag is set.
    pub fn is_paused(&self) -> bool {
        self.lock().paused
    }

    /// Has each of the `vcpus` parked vCPUs (all of them parked: the
    /// caller paused the VM and waited) capture its own state as `plan`
    /// says, and returns the states by vCPU id; waits at most `timeout`.
    /// The vCPUs stay parked. However it ends, the request is taken back.
    pub fn capture_parked(
        &self,
        vcpus: usize,
        plan: &Arc<CapturePlan>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, VcpuCaptureError> {
        let deadline = Instant::now() + timeout;
        let mut p = self.lock();
        p.generation += 1;
        p.capture = Some(CaptureRequest {
            generation: p.generation,
            plan: plan.clone(),
            taken: vec![false; vcpus],
            states: (0..vcpus).map(|_| None).collect(),
        });
        self.unpaused.notify_all();
        let waited = loop {
            let missing = p
                .capture
                .as_ref()
                .and_then(|r| r.states.iter().position(Option::is_none));
            let Some(missing) = missing else {
                break Ok(());
            };
            if self.stopping.load(Ordering::SeqCst) || seccomp::violated() {
                break Err(VcpuCaptureError::Stopped);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break Err(VcpuCaptureError::Timeout(missing, timeout));
            }
            p = self
                .captured
                .wait_timeout(p, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        };
        let request = p.capture.take();
        drop(p);
        let states = request.map(|r| r.states).unwrap_or_default();
        // A vCPU's own error first: it is why the others may not have
        // answered (a forbidden call stops the VM).
        let mut done = Vec::with_capacity(states.len());
        for (id, s) in states.into_iter().enumerate() {
            match s {
                Some(Ok(state)) => done.push(state),
                Some(Err(e)) => return Err(VcpuCaptureError::Vcpu(id, e)),
                None => {}
            }
        }
        waited?;
        if done.len() != vcpus {
            return Err(VcpuCaptureError::Stopped);
        }
        Ok(done)
    }

    fn leaving(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    /// Records how the VM ended (the first reason wins) and stops it.
    pub fn finish(&self, exit: VmExit) {
        let mut e = self.exit.lock().unwrap_or_else(|e| e.into_inner());
        if e.is_none() {
            tracing::debug!(?exit, "VM stopping");
            *e = Some(exit);
        }
        self.stopping.store(true, Ordering::SeqCst);
        let _ = self.stop.write(1);
        self.done.notify_all();
        drop(e);
        // Under the parking lock, so that no parked vCPU or capture
        // waiter misses it between its check and its wait.
        let _p = self.lock();
        self.unpaused.notify_all();
        self.captured.notify_all();
    }
}

/// Sets up the calling vCPU thread before its first KVM_RUN: the device
/// workers it activates start on `spawner` (crate::spawner), and it runs
/// under the vCPU's allowlist (crate::seccomp), whose report stops the VM.
pub fn confine(spawner: Spawner, control: &Control) {
    spawner.enter();
    if let Err(e) = seccomp::confine(seccomp::Kind::Vcpu, control.stop.as_raw_fd()) {
        tracing::error!(error = %e, "cannot install the vCPU's seccomp filter");
    }
}

/// Ends the VM with the report of a forbidden system call, if one was
/// made (on this thread or any other of the VMM's).
fn check_violation(control: &Control) {
    if seccomp::violated() {
        let detail = seccomp::violation().unwrap_or_default();
        control.finish(VmExit::VmmFailed { code: 1, detail });
    }
}

/// Runs `vcpu` (vCPU `id`) until the VM stops, serving its I/O from
/// `bus`. While the VM is paused it parks, and there captures itself when
/// asked ([`Control::capture_parked`]): its last exit completed
/// ([`crate::snapshot::settle`]), then its state read, here on its own
/// thread under its own filter (which allows exactly those ioctls).
pub fn run(mut vcpu: VcpuFd, id: usize, bus: &Bus, control: &Control) -> VcpuFd {
    while !control.leaving() {
        control.park(id, |plan| {
            crate::snapshot::settle(&mut vcpu)?;
            VcpuState::capture(&vcpu, id as u32, plan)
        });
        check_violation(control);
        if control.leaving() {
            break;
        }
        let exit = vcpu.run();
        check_violation(control);
        match exit {
            Ok(VcpuExit::IoIn(port, data)) => bus.pio_read(port, data),
            Ok(VcpuExit::IoOut(port, data)) => {
                if bus.pio_write(port, data) == Action::Reset {
                    control.finish(VmExit::GuestStopped);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => bus.mmio_read(addr, data),
            Ok(VcpuExit::MmioWrite(addr, data)) => bus.mmio_write(addr, data),
            // reboot=t makes a guest reset a triple fault; a power-off or
            // reset event is the same: the guest is done.
            Ok(VcpuExit::Shutdown) | Ok(VcpuExit::SystemEvent(..)) | Ok(VcpuExit::Hlt) => {
                control.finish(VmExit::GuestStopped)
            }
            Ok(VcpuExit::FailEntry(reason, cpu)) => control.finish(VmExit::VmmFailed {
                code: 1,
                detail: format!(
                    "KVM could not enter vCPU {cpu} (hardware entry failure reason {reason:#x})"
                ),
            }),
            Ok(VcpuExit::InternalError) => control.finish(VmExit::VmmFailed {
                code: 1,
                detail: "KVM internal error (emulation failure)".into(),
            }),
            Ok(other) => {
                let detail = format!("unexpected VM exit {other:?}");
                control.finish(VmExit::VmmFailed { code: 1, detail });
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => control.finish(VmExit::VmmFailed {
                code: 1,
                detail: format!("KVM_RUN failed: {e}"),
            }),
        }
    }
    vcpu
}
