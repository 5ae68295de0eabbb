//! Guest port I/O and MMIO, dispatched to devices.

use std::fs::File;
use std::sync::Mutex;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial, Trigger};
use vmm_sys_util::eventfd::EventFd;

use crate::layout::SERIAL_PORT;
use crate::virtio::mmio::{MmioTransport, MMIO_LEN};

/// Raises the serial interrupt through an irqfd.
pub struct IrqTrigger(pub EventFd);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.write(1)
    }
}

pub type SerialDevice = Serial<IrqTrigger, NoEvents, File>;

/// What a guest access asks of the VMM beyond the device itself.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    None,
    /// The guest asked for a reset (keyboard controller pulse), which for
    /// a microVM means it is done.
    Reset,
}

/// The i8042 command port and its "pulse reset line" command.
const I8042_COMMAND: u16 = 0x64;
const I8042_RESET: u8 = 0xfe;

pub struct Bus {
    serial: Mutex<SerialDevice>,
    virtio: Vec<(u64, Mutex<MmioTransport>)>,
}

impl Bus {
    pub fn new(serial: SerialDevice, virtio: Vec<(u64, MmioTransport)>) -> Bus {
        Bus {
            serial: Mutex::new(serial),
            virtio: virtio
                .into_iter()
                .map(|(a, t)| (a, Mutex::new(t)))
                .collect(),
        }
    }

    pub fn pio_read(&self, port: u16, data: &mut [u8]) {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) && data.len() == 1 {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            data[0] = s.read((port - SERIAL_PORT) as u8);
        } else {
            // Nothing there: the bus floats high.
            data.fill(0xff);
        }
    }

    pub fn pio_write(&self, port: u16, data: &[u8]) -> Action {
        if (SERIAL_PORT..SERIAL_PORT + 8).contains(&port) && data.len() == 1 {
            let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
            // A failed console write must not stop the guest.
            let _ = s.write((port - SERIAL_PORT) as u8, data[0]);
        } else if port == I8042_COMMAND && data == [I8042_RESET] {
            return Action::Reset;
        }
        Action::None
    }

    fn transport(&self, addr: u64) -> Option<(&Mutex<MmioTransport>, u64)> {
        self.virtio
            .iter()
            .find(|(base, _)| (*base..*base + MMIO_LEN).contains(&addr))
            .map(|(base, t)| (t, addr - base))
    }

    pub fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.transport(addr) {
            Some((t, off)) => t.lock().unwrap_or_else(|e| e.into_inner()).read(off, data),
            None => data.fill(0),
        }
    }

    pub fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((t, off)) = self.transport(addr) {
            t.lock().unwrap_or_else(|e| e.into_inner()).write(off, data);
        }
    }
}
