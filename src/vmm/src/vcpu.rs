//! The vCPU run loop: VM exits become device accesses, and the exits
//! that end a VM become a typed [`VmExit`].

use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex};

use krun_hypervisor::VmExit;
use kvm_ioctls::{VcpuExit, VcpuFd};
use vmm_sys_util::eventfd::EventFd;

use crate::bus::{Action, Bus};
use crate::seccomp;
use crate::spawner::Spawner;

/// The signal that knocks a vCPU thread out of KVM_RUN.
pub fn kick_signal() -> i32 {
    libc::SIGRTMIN() + 2
}

pub extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// Shared by the vCPU threads and the handle of the running VM.
pub struct Control {
    pub stopping: AtomicBool,
    /// Set to capture the VM: each vCPU leaves its loop without ending
    /// the VM, completes its last exit ([`crate::snapshot::settle`]) and
    /// hands its descriptor back (see `BuiltinVm::capture`).
    pub detaching: AtomicBool,
    /// While set, vCPUs wait in [`Control::park`] instead of running.
    pub paused: Mutex<bool>,
    pub unpaused: Condvar,
    /// How many vCPUs are parked.
    pub parked: std::sync::atomic::AtomicUsize,
    pub exit: Mutex<Option<VmExit>>,
    pub done: Condvar,
    /// Readable once the VM stops: device worker threads exit on it.
    pub stop: EventFd,
}

impl Control {
    pub fn new(stop: EventFd) -> Control {
        Control {
            stopping: AtomicBool::new(false),
            detaching: AtomicBool::new(false),
            paused: Mutex::new(false),
            unpaused: Condvar::new(),
            parked: std::sync::atomic::AtomicUsize::new(0),
            exit: Mutex::new(None),
            done: Condvar::new(),
            stop,
        }
    }

    /// Blocks the calling vCPU thread while the VM is paused.
    pub fn park(&self) {
        let mut paused = self.paused.lock().unwrap_or_else(|e| e.into_inner());
        if !*paused {
            return;
        }
        self.parked.fetch_add(1, Ordering::SeqCst);
        // A forbidden call (say the wait itself) ends the wait: the run
        // loop reports it.
        while *paused
            && !self.stopping.load(Ordering::SeqCst)
            && !self.detaching.load(Ordering::SeqCst)
            && !seccomp::violated()
        {
            paused = self
                .unpaused
                .wait(paused)
                .unwrap_or_else(|e| e.into_inner());
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sets or clears the pause flag (the caller kicks the vCPUs).
    pub fn set_paused(&self, on: bool) {
        *self.paused.lock().unwrap_or_else(|e| e.into_inner()) = on;
        if !on {
            self.unpaused.notify_all();
        }
    }

    /// Makes every vCPU leave its loop (kicked by the caller), the VM
    /// still alive: for a capture.
    pub fn detach(&self) {
        self.detaching.store(true, Ordering::SeqCst);
        self.unpaused.notify_all();
    }

    fn leaving(&self) -> bool {
        self.stopping.load(Ordering::SeqCst) || self.detaching.load(Ordering::SeqCst)
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
        self.unpaused.notify_all();
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

/// Runs `vcpu` until the VM stops or is detached for a capture, serving
/// its I/O from `bus`. A detached vCPU's last exit is completed
/// ([`crate::snapshot::settle`], here: its own thread, under its own
/// filter, which allows KVM_RUN) before it is handed back.
pub fn run(mut vcpu: VcpuFd, bus: &Bus, control: &Control) -> VcpuFd {
    while !control.leaving() {
        control.park();
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
    if control.detaching.load(Ordering::SeqCst) && !control.stopping.load(Ordering::SeqCst) {
        if let Err(e) = crate::snapshot::settle(&mut vcpu) {
            control.finish(VmExit::VmmFailed {
                code: 1,
                detail: format!("capturing a vCPU: {e}"),
            });
        }
    }
    vcpu
}
