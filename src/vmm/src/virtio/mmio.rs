//! The virtio-mmio transport (virtio spec 4.2, version 2 registers): what
//! the guest driver reads and writes to discover a device, negotiate
//! features, set up queues and acknowledge interrupts.
//!
//! Every value here comes from the guest, so nothing is trusted: unknown
//! offsets read as zero and writes to them are ignored, bad sizes and
//! addresses make the queue invalid rather than anything panic.

use std::sync::Arc;

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
    queue_sel: u32,
    status: u32,
    config_generation: u32,
    activated: bool,
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
            queue_sel: 0,
            status: 0,
            config_generation: 0,
            activated: false,
        })
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
        };
        if let Err(e) = self.device.activate(activation) {
            tracing::warn!(device = self.device.device_type(), error = %e, "device activation failed");
            self.fail();
        }
    }

    fn fail(&mut self) {
        self.status |= STATUS_NEEDS_RESET;
        self.config_generation = self.config_generation.wrapping_add(1);
        self.interrupt.signal_config();
    }
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
