//! The virtio-mmio transport (virtio spec 4.2, version 2 registers): what
//! the guest driver reads and writes to discover a device, negotiate
//! features, set up queues and acknowledge interrupts.
//!
//! Every value here comes from the guest, so nothing is trusted: unknown
//! offsets read as zero and writes to them are ignored, bad sizes and
//! addresses make the queue invalid rather than anything panic.
//!
//! For snapshots a transport built with a pause line
//! ([`MmioTransport::enable_pause`], on the VM's set-up thread) parks its
//! device's worker ([`MmioTransport::pause`]), captures its registers and
//! the worker's queues ([`MmioTransport::capture`], a
//! [`super::state::TransportState`]), and a new transport is built from
//! such a state over restored memory ([`MmioTransport::restore`]).
//! `vm.rs` gives every transport a pause line; one without (device
//! tests) runs the same, and cannot be captured once activated.

use std::sync::Arc;
use std::time::Duration;

use virtio_bindings::virtio_config::{
    VIRTIO_CONFIG_S_ACKNOWLEDGE, VIRTIO_CONFIG_S_DRIVER, VIRTIO_CONFIG_S_DRIVER_OK,
    VIRTIO_CONFIG_S_FAILED, VIRTIO_CONFIG_S_FEATURES_OK, VIRTIO_CONFIG_S_NEEDS_RESET,
};
use virtio_bindings::virtio_mmio::{
    VIRTIO_MMIO_CONFIG, VIRTIO_MMIO_CONFIG_GENERATION, VIRTIO_MMIO_DEVICE_FEATURES,
    VIRTIO_MMIO_DEVICE_FEATURES_SEL, VIRTIO_MMIO_DEVICE_ID, VIRTIO_MMIO_DRIVER_FEATURES,
    VIRTIO_MMIO_DRIVER_FEATURES_SEL, VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INTERRUPT_STATUS,
    VIRTIO_MMIO_MAGIC_VALUE, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, VIRTIO_MMIO_QUEUE_AVAIL_LOW,
    VIRTIO_MMIO_QUEUE_DESC_HIGH, VIRTIO_MMIO_QUEUE_DESC_LOW, VIRTIO_MMIO_QUEUE_NOTIFY,
    VIRTIO_MMIO_QUEUE_NUM, VIRTIO_MMIO_QUEUE_NUM_MAX, VIRTIO_MMIO_QUEUE_READY,
    VIRTIO_MMIO_QUEUE_SEL, VIRTIO_MMIO_QUEUE_USED_HIGH, VIRTIO_MMIO_QUEUE_USED_LOW,
    VIRTIO_MMIO_SHM_LEN_HIGH, VIRTIO_MMIO_SHM_LEN_LOW, VIRTIO_MMIO_STATUS, VIRTIO_MMIO_VENDOR_ID,
    VIRTIO_MMIO_VERSION,
};
use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::pause::{Pause, PauseError, Paused};
use super::state::{bad, StateError, TransportState};
use super::{Activation, ActiveQueue, Interrupt, Mem, VirtioDevice, VIRTIO_F_VERSION_1};

/// Size of one device's register window.
pub const MMIO_LEN: u64 = 0x1000;
/// Offset of QueueNotify, where ioeventfds are registered.
pub const NOTIFY_OFFSET: u64 = VIRTIO_MMIO_QUEUE_NOTIFY as u64;
/// Where the device's configuration space starts in the window.
const CONFIG_OFFSET: u64 = VIRTIO_MMIO_CONFIG as u64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VERSION: u32 = 2;
const VENDOR: u32 = 0x4e55_524b; // "KRUN"

/// Device status bits (virtio spec 2.1).
pub const STATUS_ACKNOWLEDGE: u32 = VIRTIO_CONFIG_S_ACKNOWLEDGE;
pub const STATUS_DRIVER: u32 = VIRTIO_CONFIG_S_DRIVER;
pub const STATUS_DRIVER_OK: u32 = VIRTIO_CONFIG_S_DRIVER_OK;
pub const STATUS_FEATURES_OK: u32 = VIRTIO_CONFIG_S_FEATURES_OK;
pub const STATUS_NEEDS_RESET: u32 = VIRTIO_CONFIG_S_NEEDS_RESET;
pub const STATUS_FAILED: u32 = VIRTIO_CONFIG_S_FAILED;

/// The register at `offset` in the window (a `VIRTIO_MMIO_*` offset), or
/// None past the registers, in the configuration space.
fn register(offset: u64) -> Option<u32> {
    if offset >= CONFIG_OFFSET {
        None
    } else {
        u32::try_from(offset).ok()
    }
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    queues: Vec<Queue>,
    notify: Vec<EventFd>,
    interrupt: Arc<Interrupt>,
    mem: Mem,
    stop: EventFd,
    device_features_sel: u32,
    driver_features_sel: u32,
    driver_features: u64,
    /// What the device was last told the driver accepted (at
    /// FEATURES_OK); the driver may write the register after that.
    acked_features: u64,
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
    /// The activation failed: the device has no worker (NEEDS_RESET was
    /// set, but the driver may write the status over it).
    failed: bool,
    /// The line that parks the device's worker for a snapshot, if the
    /// transport was built with one ([`MmioTransport::enable_pause`]).
    pause: Option<Arc<Pause>>,
    /// Restored as activated, its worker not started yet
    /// ([`MmioTransport::activate_restored`]).
    pending: bool,
}

/// Why a transport's state could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("virtio device {0}: the transport has no pause line (enable_pause)")]
    NotPausable(u32),
    #[error("virtio device {0}: pausing its worker")]
    Pause(u32, #[source] PauseError),
    #[error("virtio device {0}: captured without pausing it first")]
    NotPaused(u32),
    #[error("virtio device {0}: its worker is not running (activation failed or the VM stopped)")]
    NotRunning(u32),
    #[error("virtio device {0} cannot be captured yet")]
    Unsupported(u32),
    /// The device refuses to be captured in the state it is in now (the
    /// second field says why).
    #[error("virtio device {0} cannot be captured now: {1}")]
    Busy(u32, String),
}

/// Why a transport could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    #[error("invalid device state")]
    State(#[from] StateError),
    #[error("setting up the transport")]
    Io(#[source] std::io::Error),
    #[error("virtio device {0}: activation failed on restore")]
    Activation(u32),
}

impl MmioTransport {
    /// Wraps `device`; `interrupt` is its (irqfd-backed) interrupt line and
    /// `stop` the VM-wide stop event handed to it on activation.
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        stop: EventFd,
    ) -> std::io::Result<MmioTransport> {
        let sizes = device.queue_max_sizes();
        let mut queues = Vec::with_capacity(sizes.len());
        let mut notify = Vec::with_capacity(sizes.len());
        for max in sizes {
            queues.push(
                Queue::new(max)
                    .map_err(|e| std::io::Error::other(format!("queue of size {max}: {e:?}")))?,
            );
            notify.push(EventFd::new(EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            queues,
            notify,
            interrupt,
            mem,
            stop,
            device_features_sel: 0,
            driver_features_sel: 0,
            driver_features: 0,
            acked_features: 0,
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
            failed: false,
            pause: None,
            pending: false,
        })
    }

    /// Gives the transport a pause line, so that its device can be
    /// captured: call on the VM's set-up thread, before the guest runs
    /// (it makes an eventfd, which no vCPU or worker thread may).
    pub fn enable_pause(&mut self) -> std::io::Result<()> {
        if self.pause.is_none() {
            self.pause = Some(Arc::new(Pause::new()?));
        }
        Ok(())
    }

    /// Whether the device's worker thread runs (as far as the pause line
    /// knows: false without one).
    pub fn worker_running(&self) -> bool {
        self.pause.as_ref().is_some_and(|p| p.attached())
    }

    /// Parks the device's worker (waiting at most `timeout`) so that no
    /// queue is touched until the returned guard is dropped. A device not
    /// activated has nothing to park.
    pub fn pause(&self, timeout: Duration) -> Result<Paused, CaptureError> {
        let ty = self.device.device_type();
        match &self.pause {
            Some(p) => p.request(timeout).map_err(|e| CaptureError::Pause(ty, e)),
            None if !self.activated => Ok(Paused::nothing()),
            None => Err(CaptureError::NotPausable(ty)),
        }
    }

    /// The transport's and its device's state, `paused` being this
    /// transport's [`MmioTransport::pause`].
    pub fn capture(&self, paused: &Paused) -> Result<TransportState, CaptureError> {
        let ty = self.device.device_type();
        if !paused.is_of(self.pause.as_ref()) {
            return Err(CaptureError::NotPaused(ty));
        }
        let saved = self
            .device
            .save_state()
            .ok_or(CaptureError::Unsupported(ty))?;
        // A device whose activation failed has no worker: ours are all.
        let running = self.activated && !self.failed;
        let queues = if running {
            // The worker owns the live queues; ours stopped at DRIVER_OK.
            if !self.worker_running() {
                return Err(CaptureError::NotRunning(ty));
            }
            let queues = paused.queues.clone().ok_or(CaptureError::Unsupported(ty))?;
            if queues.len() != self.queues.len() {
                return Err(CaptureError::Unsupported(ty));
            }
            queues
        } else {
            self.queues.iter().map(|q| q.state().into()).collect()
        };
        // A running device's worker may hold its state, or refuse.
        let device = match &paused.device {
            Ok(Some(held)) if running => held.clone(),
            Err(why) if running => return Err(CaptureError::Busy(ty, why.clone())),
            _ => saved,
        };
        Ok(TransportState {
            device_type: ty,
            status: self.status,
            driver_features: self.driver_features,
            acked_features: self.acked_features,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            queue_sel: self.queue_sel,
            interrupt_status: self.interrupt.status(),
            config_generation: self.config_generation,
            activated: self.activated,
            failed: self.failed,
            queues,
            device,
        })
    }

    /// A transport around `device` as `state` captured it, over restored
    /// guest memory `mem`; with a pause line. An activated device is
    /// activated again here, its worker continuing from the captured queue
    /// indices. Call on the VM's set-up thread, before the vCPUs run.
    pub fn restore(
        device: Box<dyn VirtioDevice>,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        stop: EventFd,
        state: &TransportState,
    ) -> Result<MmioTransport, RestoreError> {
        let mut t = MmioTransport::restore_inactive(device, mem, interrupt, stop, state)?;
        t.activate_restored()?;
        Ok(t)
    }

    /// [`MmioTransport::restore`] without starting the device's worker:
    /// [`MmioTransport::activate_restored`] does, later. The VMM restores
    /// its devices before it jails itself and drops capabilities, and a
    /// thread started then would keep the host's mount namespace and the
    /// capabilities (both are per thread): workers start only once the
    /// process is confined.
    pub fn restore_inactive(
        mut device: Box<dyn VirtioDevice>,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        stop: EventFd,
        state: &TransportState,
    ) -> Result<MmioTransport, RestoreError> {
        state.validate()?;
        check_device(device.as_ref(), state)?;
        // Whether a ready queue lies in the restored memory is checked
        // by the activation, as for the driver's own set-up.
        let mut queues = Vec::with_capacity(state.queues.len());
        for (i, q) in state.queues.iter().enumerate() {
            match Queue::try_from(virtio_queue::QueueState::from(*q)) {
                Ok(queue) => queues.push(queue),
                Err(e) => {
                    let e = StateError {
                        field: format!("queues[{i}]"),
                        why: format!("not a queue: {e:?}"),
                    };
                    return Err(e.into());
                }
            }
        }
        if state.status & STATUS_FEATURES_OK != 0 {
            device.set_acked_features(state.acked_features);
        }
        device.restore_state(&state.device)?;
        let mut t = MmioTransport::new(device, mem, interrupt, stop).map_err(RestoreError::Io)?;
        t.enable_pause().map_err(RestoreError::Io)?;
        t.queues = queues;
        t.status = state.status;
        t.driver_features = state.driver_features;
        t.acked_features = state.acked_features;
        t.device_features_sel = state.device_features_sel;
        t.driver_features_sel = state.driver_features_sel;
        t.queue_sel = state.queue_sel;
        t.config_generation = state.config_generation;
        t.interrupt.restore_status(state.interrupt_status);
        if state.activated {
            // It failed before the capture: it stays failed.
            t.activated = true;
            t.failed = state.failed;
            t.pending = !state.failed;
        }
        Ok(t)
    }

    /// Starts the worker of a device [`MmioTransport::restore_inactive`]
    /// found activated, continuing from the captured queue indices; does
    /// nothing for any other.
    pub fn activate_restored(&mut self) -> Result<(), RestoreError> {
        // Every restored device, activated or not: its interrupt, pending
        // at the capture, raised again now that the vCPUs' and interrupt
        // controllers' state is in place (see Interrupt::reassert).
        self.interrupt.reassert();
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        self.activate();
        if self.failed {
            return Err(RestoreError::Activation(self.device.device_type()));
        }
        Ok(())
    }

    /// The eventfd each queue's notifications arrive on, by queue index.
    /// The VMM registers them as ioeventfds on [`NOTIFY_OFFSET`].
    pub fn notify_eventfds(&self) -> &[EventFd] {
        &self.notify
    }

    pub fn device_type(&self) -> u32 {
        self.device.device_type()
    }

    pub fn status(&self) -> u32 {
        self.status
    }

    fn features(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1
    }

    fn selected(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    /// A guest read of `data.len()` bytes at `offset` in the window.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(register) = register(offset) else {
            self.device.read_config(offset - CONFIG_OFFSET, data);
            return;
        };
        let v: u32 = match register {
            VIRTIO_MMIO_MAGIC_VALUE => MAGIC,
            VIRTIO_MMIO_VERSION => VERSION,
            VIRTIO_MMIO_DEVICE_ID => self.device.device_type(),
            VIRTIO_MMIO_VENDOR_ID => VENDOR,
            VIRTIO_MMIO_DEVICE_FEATURES => match self.device_features_sel {
                0 => self.features() as u32,
                1 => (self.features() >> 32) as u32,
                _ => 0,
            },
            VIRTIO_MMIO_QUEUE_NUM_MAX => self.selected().map_or(0, |q| q.max_size() as u32),
            VIRTIO_MMIO_QUEUE_READY => self.selected().map_or(0, |q| q.ready() as u32),
            VIRTIO_MMIO_INTERRUPT_STATUS => self.interrupt.status(),
            VIRTIO_MMIO_STATUS => self.status,
            // No shared memory regions: their length reads as all ones.
            VIRTIO_MMIO_SHM_LEN_LOW | VIRTIO_MMIO_SHM_LEN_HIGH => u32::MAX,
            VIRTIO_MMIO_CONFIG_GENERATION => self.config_generation,
            _ => 0,
        };
        let bytes = v.to_le_bytes();
        for (i, b) in data.iter_mut().enumerate() {
            *b = bytes.get(i).copied().unwrap_or(0);
        }
    }

    /// A guest write of `data` at `offset` in the window.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(register) = register(offset) else {
            self.device.write_config(offset - CONFIG_OFFSET, data);
            return;
        };
        // Registers are 32-bit; other widths are a driver bug, ignored.
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        let v = u32::from_le_bytes(bytes);
        // Queue set-up is only allowed before the device runs.
        let setting_up = !self.activated;
        match register {
            VIRTIO_MMIO_DEVICE_FEATURES_SEL => self.device_features_sel = v,
            VIRTIO_MMIO_DRIVER_FEATURES => match self.driver_features_sel {
                0 => self.driver_features = (self.driver_features & !0xffff_ffff) | v as u64,
                1 => {
                    self.driver_features = (self.driver_features & 0xffff_ffff) | ((v as u64) << 32)
                }
                _ => {}
            },
            VIRTIO_MMIO_DRIVER_FEATURES_SEL => self.driver_features_sel = v,
            VIRTIO_MMIO_QUEUE_SEL => self.queue_sel = v,
            VIRTIO_MMIO_QUEUE_NUM if setting_up => {
                if let Some(q) = self.selected() {
                    q.set_size(v.min(u16::MAX as u32) as u16);
                }
            }
            VIRTIO_MMIO_QUEUE_READY if setting_up => {
                if let Some(q) = self.selected() {
                    q.set_ready(v == 1);
                }
            }
            VIRTIO_MMIO_QUEUE_NOTIFY => {
                // Without an ioeventfd the notification lands here.
                if let Some(e) = self.notify.get(v as usize) {
                    let _ = e.write(1);
                }
            }
            VIRTIO_MMIO_INTERRUPT_ACK => self.interrupt.ack(v),
            VIRTIO_MMIO_STATUS => self.set_status(v),
            VIRTIO_MMIO_QUEUE_DESC_LOW
            | VIRTIO_MMIO_QUEUE_DESC_HIGH
            | VIRTIO_MMIO_QUEUE_AVAIL_LOW
            | VIRTIO_MMIO_QUEUE_AVAIL_HIGH
            | VIRTIO_MMIO_QUEUE_USED_LOW
            | VIRTIO_MMIO_QUEUE_USED_HIGH
                if setting_up =>
            {
                let Some(q) = self.selected() else { return };
                // Each address is a low and a high word, 4 bytes apart.
                let (lo, hi) = if register & 4 == 0 {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                match register & !4 {
                    VIRTIO_MMIO_QUEUE_DESC_LOW => q.set_desc_table_address(lo, hi),
                    VIRTIO_MMIO_QUEUE_AVAIL_LOW => q.set_avail_ring_address(lo, hi),
                    _ => q.set_used_ring_address(lo, hi),
                }
            }
            _ => {}
        }
    }

    fn set_status(&mut self, v: u32) {
        if v == 0 {
            // A reset. A running device cannot be taken back (its worker
            // owns the queues); a driver only resets one it gives up on.
            if !self.activated {
                self.status = 0;
                self.driver_features = 0;
                for q in &mut self.queues {
                    q.reset();
                }
            }
            return;
        }
        if v & STATUS_FEATURES_OK != 0 && self.status & STATUS_FEATURES_OK == 0 {
            let offered = self.features();
            if self.driver_features & !offered != 0
                || self.driver_features & VIRTIO_F_VERSION_1 == 0
            {
                // The driver accepted something never offered, or is legacy.
                self.status = v & !STATUS_FEATURES_OK;
                return;
            }
            self.acked_features = self.driver_features;
            self.device.set_acked_features(self.driver_features);
        }
        self.status = v;
        if v & STATUS_DRIVER_OK != 0 && !self.activated {
            self.activate();
        }
    }

    fn activate(&mut self) {
        self.activated = true;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            let valid = q.ready() && q.is_valid(&self.mem);
            let notify = match self.notify[i].try_clone() {
                Ok(e) => e,
                Err(_) => return self.fail(),
            };
            if !valid && q.ready() {
                tracing::warn!(
                    device = self.device.device_type(),
                    queue = i,
                    "driver set up an invalid queue"
                );
                return self.fail();
            }
            // The device gets its own copy; the registers keep reading ours.
            // A queue the driver left unused stays not ready.
            let copy = if q.ready() {
                Queue::try_from(q.state()).ok()
            } else {
                Queue::new(q.max_size()).ok()
            };
            let Some(queue) = copy else {
                return self.fail();
            };
            queues.push(ActiveQueue { queue, notify });
        }
        let stop = match self.stop.try_clone() {
            Ok(e) => e,
            Err(_) => return self.fail(),
        };
        let activation = Activation {
            mem: self.mem.clone(),
            interrupt: self.interrupt.clone(),
            queues,
            stop,
            pause: self.pause.clone(),
        };
        if let Err(e) = self.device.activate(activation) {
            tracing::warn!(device = self.device.device_type(), error = %e, "device activation failed");
            self.fail();
        }
    }

    fn fail(&mut self) {
        self.failed = true;
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config();
    }
}

/// Whether `state` fits `device`: its type, queue count and sizes, and
/// features it offers.
fn check_device(device: &dyn VirtioDevice, state: &TransportState) -> Result<(), StateError> {
    if state.device_type != device.device_type() {
        return bad(
            "device_type",
            format!(
                "{} where the device is of type {}",
                state.device_type,
                device.device_type()
            ),
        );
    }
    let sizes = device.queue_max_sizes();
    if state.queues.len() != sizes.len() {
        return bad(
            "queues",
            format!(
                "{} where the device has {}",
                state.queues.len(),
                sizes.len()
            ),
        );
    }
    for (i, (q, max)) in state.queues.iter().zip(sizes).enumerate() {
        if q.max_size != max {
            return bad(
                format!("queues[{i}].max_size"),
                format!("{} where the device's is {max}", q.max_size),
            );
        }
    }
    // The register may hold anything the driver wrote; what the device
    // was told it accepted was checked against the offer.
    let offered = device.features() | VIRTIO_F_VERSION_1;
    if state.acked_features & !offered != 0 {
        return bad(
            "acked_features",
            format!("{:#x} were never offered", state.acked_features & !offered),
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::virtio::DeviceError;
    use std::sync::Mutex;
    use vm_memory::GuestAddress;

    struct Dummy {
        activated: Arc<Mutex<Option<usize>>>,
    }

    impl VirtioDevice for Dummy {
        fn device_type(&self) -> u32 {
            42
        }
        fn queue_max_sizes(&self) -> Vec<u16> {
            vec![16, 16]
        }
        fn features(&self) -> u64 {
            1 << 3
        }
        fn read_config(&self, offset: u64, data: &mut [u8]) {
            crate::virtio::read_config_bytes(&[1, 2, 3, 4], offset, data)
        }
        fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
            *self.activated.lock().unwrap() = Some(a.queues.len());
            Ok(())
        }
    }

    fn transport() -> (MmioTransport, Arc<Mutex<Option<usize>>>) {
        let mem = Mem::from_ranges(&[(GuestAddress(0), 0x10000)]).unwrap();
        let activated = Arc::new(Mutex::new(None));
        let dev = Box::new(Dummy {
            activated: activated.clone(),
        });
        let irq = Arc::new(Interrupt::new(EventFd::new(EFD_NONBLOCK).unwrap()));
        (
            MmioTransport::new(dev, mem, irq, EventFd::new(EFD_NONBLOCK).unwrap()).unwrap(),
            activated,
        )
    }

    fn r32(t: &mut MmioTransport, off: u64) -> u32 {
        let mut b = [0u8; 4];
        t.read(off, &mut b);
        u32::from_le_bytes(b)
    }

    fn w32(t: &mut MmioTransport, off: u64, v: u32) {
        t.write(off, &v.to_le_bytes());
    }

    fn setup_queue(t: &mut MmioTransport, i: u32, base: u64) {
        w32(t, 0x30, i);
        w32(t, 0x38, 16);
        w32(t, 0x80, base as u32);
        w32(t, 0x90, (base + 0x100) as u32);
        w32(t, 0xa0, (base + 0x200) as u32);
        w32(t, 0x44, 1);
    }

    #[test]
    fn identifies_and_negotiates() {
        let (mut t, activated) = transport();
        assert_eq!(r32(&mut t, 0), MAGIC);
        assert_eq!(r32(&mut t, 4), 2);
        assert_eq!(r32(&mut t, 8), 42);
        w32(&mut t, 0x14, 1);
        assert_eq!(r32(&mut t, 0x10), 1, "VERSION_1 in the high word");
        w32(&mut t, 0x14, 0);
        assert_eq!(r32(&mut t, 0x10), 1 << 3);
        w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        w32(&mut t, 0x24, 0);
        w32(&mut t, 0x20, 1 << 3);
        w32(&mut t, 0x24, 1);
        w32(&mut t, 0x20, 1);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
        );
        assert_ne!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
        setup_queue(&mut t, 0, 0x1000);
        setup_queue(&mut t, 1, 0x2000);
        w32(
            &mut t,
            0x70,
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
        assert_eq!(*activated.lock().unwrap(), Some(2));
        let mut cfg = [0u8; 8];
        t.read(0x102, &mut cfg);
        assert_eq!(cfg, [3, 4, 0, 0, 0, 0, 0, 0]);
    }

    #[test]
    fn features_never_offered_are_refused() {
        let (mut t, _) = transport();
        w32(&mut t, 0x24, 0);
        w32(&mut t, 0x20, 1 << 7);
        w32(&mut t, 0x24, 1);
        w32(&mut t, 0x20, 1);
        w32(&mut t, 0x70, STATUS_FEATURES_OK);
        assert_eq!(r32(&mut t, 0x70) & STATUS_FEATURES_OK, 0);
    }

    #[test]
    fn a_queue_outside_guest_memory_fails_the_device() {
        let (mut t, activated) = transport();
        w32(&mut t, 0x24, 1);
        w32(&mut t, 0x20, 1);
        w32(&mut t, 0x70, STATUS_FEATURES_OK);
        setup_queue(&mut t, 0, 0xffff_0000);
        w32(&mut t, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
        assert_eq!(*activated.lock().unwrap(), None);
        assert_ne!(r32(&mut t, 0x70) & STATUS_NEEDS_RESET, 0);
    }

    proptest::proptest! {
        /// Any sequence of guest register accesses is survived.
        #[test]
        fn random_register_traffic_never_panics(ops in proptest::collection::vec((0u64..0x200, proptest::collection::vec(proptest::prelude::any::<u8>(), 0..9), proptest::prelude::any::<bool>()), 0..200)) {
            let (mut t, _) = transport();
            for (off, mut data, is_read) in ops {
                if is_read { t.read(off, &mut data) } else { t.write(off, &data) }
            }
        }
    }
}
