//! virtio devices over the MMIO transport: the device trait, interrupts,
//! and the register interface the guest driver talks to.
//!
//! A device is plain logic over `virtio-queue` queues and `vm-memory`
//! guest memory; it knows nothing of KVM. The VMM wires the queue
//! notifications (ioeventfds) and the interrupt (an irqfd) to KVM.

pub mod mmio;
pub mod pause;
mod queues;
#[cfg(test)]
pub(crate) mod snapshot_tests;
pub mod state;
#[cfg(test)]
pub mod test_utils;
pub mod worker;

pub use queues::DeviceQueues;

use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use virtio_bindings::{virtio_config, virtio_ids, virtio_mmio};
use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

/// Guest memory as every device sees it.
pub type Mem = GuestMemoryMmap<()>;

/// Feature bit: the device conforms to virtio 1.x.
pub const VIRTIO_F_VERSION_1: u64 = 1 << virtio_config::VIRTIO_F_VERSION_1;

/// Device type numbers (virtio spec 5), one per device of [`crate::devices`].
pub const TYPE_NET: u32 = virtio_ids::VIRTIO_ID_NET;
pub const TYPE_CONSOLE: u32 = virtio_ids::VIRTIO_ID_CONSOLE;
pub const TYPE_FS: u32 = virtio_ids::VIRTIO_ID_FS;
pub const TYPE_BALLOON: u32 = virtio_ids::VIRTIO_ID_BALLOON;

/// Interrupt status bits (virtio spec 4.2.2, InterruptStatus).
pub const INT_VRING: u32 = virtio_mmio::VIRTIO_MMIO_INT_VRING;
pub const INT_CONFIG: u32 = virtio_mmio::VIRTIO_MMIO_INT_CONFIG;

/// A device's interrupt line: the status register the driver reads and
/// acknowledges, and the eventfd that injects the interrupt (an irqfd).
pub struct Interrupt {
    status: AtomicU32,
    evt: EventFd,
}

impl Interrupt {
    pub fn new(evt: EventFd) -> Interrupt {
        Interrupt {
            status: AtomicU32::new(0),
            evt,
        }
    }

    /// Tells the driver that a queue has new used buffers.
    pub fn signal_used_queue(&self) {
        self.signal(INT_VRING);
    }

    /// Tells the driver that the configuration space changed.
    pub fn signal_config(&self) {
        self.signal(INT_CONFIG);
    }

    fn signal(&self, bit: u32) {
        self.status.fetch_or(bit, Ordering::SeqCst);
        // A full eventfd counter already means "interrupt pending".
        let _ = self.evt.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    /// Sets the status bits to a captured `status` (a restore, before the
    /// vCPUs run). The interrupt is raised again by [`Interrupt::reassert`]
    /// once the vCPUs' and interrupt controllers' state is restored: raised
    /// here, it would land in controllers that the restore then overwrites.
    pub fn restore_status(&self, status: u32) {
        self.status.store(status, Ordering::SeqCst);
    }

    /// Raises the interrupt again if a status bit is set (a restored
    /// device, its interrupt controllers restored): a driver finds nothing
    /// to do on a spurious one, but would wait forever on a lost one (a
    /// capture can read a vCPU's LAPIC before a device's last interrupt
    /// reaches it).
    pub fn reassert(&self) {
        if self.status() != 0 {
            let _ = self.evt.write(1);
        }
    }

    /// The eventfd (for irqfd registration and tests).
    pub fn eventfd(&self) -> &EventFd {
        &self.evt
    }
}

/// A queue the driver set up, with the eventfd its notifications arrive on.
pub struct ActiveQueue {
    pub queue: Queue,
    pub notify: EventFd,
}

/// Everything a device needs to start serving its queues.
pub struct Activation {
    pub mem: Mem,
    pub interrupt: Arc<Interrupt>,
    pub queues: Vec<ActiveQueue>,
    /// Becomes readable when the VM stops; device threads then exit.
    pub stop: EventFd,
    /// The transport's pause line, for a device that can be captured
    /// ([`worker::spawn_pausable`]); None unless the transport was built
    /// with one ([`mmio::MmioTransport::enable_pause`]).
    pub pause: Option<Arc<pause::Pause>>,
}

/// Errors activating a device.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("the driver set up {got} queues, the device needs {want}")]
    QueueCount { got: usize, want: usize },
    #[error("cannot start the device's worker")]
    Worker(#[source] std::io::Error),
    #[error("device backend failed")]
    Backend(#[source] std::io::Error),
}

/// A virtio device behind the MMIO transport.
pub trait VirtioDevice: Send {
    /// The virtio device type ([`TYPE_CONSOLE`], [`TYPE_FS`], ...).
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; its length is the number of queues.
    fn queue_max_sizes(&self) -> Vec<u16>;
    /// Feature bits the device offers (VIRTIO_F_VERSION_1 is added by the
    /// transport).
    fn features(&self) -> u64;
    /// The features the driver accepted.
    fn set_acked_features(&mut self, _features: u64) {}
    /// Reads the device-specific configuration space at `offset`. Bytes
    /// beyond the space read as zero.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Writes the configuration space; most devices ignore it.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver is ready (DRIVER_OK): serve the queues from now on,
    /// usually on a worker thread of the device's own.
    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError>;
    /// The device's own state for a snapshot (what the driver wrote to
    /// its configuration space...), at most [`state::MAX_DEVICE_STATE`]
    /// bytes. None: the device cannot be captured yet.
    fn save_state(&self) -> Option<Vec<u8>> {
        None
    }
    /// Takes back what [`VirtioDevice::save_state`] gave, before
    /// activation; the bytes are untrusted.
    fn restore_state(&mut self, _state: &[u8]) -> Result<(), state::StateError> {
        state::bad("device", "this device cannot be restored")
    }
}

/// Copies `src` (a config space) into `data` at `offset`, zero past its end.
pub fn read_config_bytes(src: &[u8], offset: u64, data: &mut [u8]) {
    for (i, b) in data.iter_mut().enumerate() {
        *b = usize::try_from(offset)
            .ok()
            .and_then(|o| o.checked_add(i))
            .and_then(|o| src.get(o))
            .copied()
            .unwrap_or(0);
    }
}
