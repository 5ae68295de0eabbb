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

/// The CMOS real-time clock's index and data ports.
const CMOS_INDEX: u16 = 0x70;
const CMOS_DATA: u16 = 0x71;

pub struct Bus {
    serial: Mutex<SerialDevice>,
    cmos_index: std::sync::atomic::AtomicU8,
    virtio: Vec<(u64, Mutex<MmioTransport>)>,
}

impl Bus {
    pub fn new(serial: SerialDevice, virtio: Vec<(u64, MmioTransport)>) -> Bus {
        Bus {
            serial: Mutex::new(serial),
            cmos_index: std::sync::atomic::AtomicU8::new(0),
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
        } else if port == CMOS_DATA && data.len() == 1 {
            data[0] = cmos_read(
                self.cmos_index.load(std::sync::atomic::Ordering::Relaxed),
                std::time::SystemTime::now(),
            );
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
        } else if port == CMOS_INDEX && data.len() == 1 {
            // Bit 7 is the NMI mask, not part of the index.
            self.cmos_index
                .store(data[0] & 0x7f, std::sync::atomic::Ordering::Relaxed);
        } else if port == I8042_COMMAND && data == [I8042_RESET] {
            return Action::Reset;
        }
        Action::None
    }

    /// The virtio transports, in the order the VM was built with.
    pub fn transports(&self) -> impl Iterator<Item = &Mutex<MmioTransport>> {
        self.virtio.iter().map(|(_, t)| t)
    }

    /// The serial port's registers and buffered input.
    pub fn serial_state(&self) -> vm_superio::serial::SerialState {
        self.serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
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

/// A read-only CMOS clock showing the host's UTC time. Linux reads it at
/// boot when it has no kvm-clock wall time; with nothing at these ports it
/// would wait a second for the "update in progress" bit to clear.
fn cmos_read(index: u8, now: std::time::SystemTime) -> u8 {
    let t = time::OffsetDateTime::from(now);
    let year = i64::from(t.year());
    let bcd = |v: i64| -> u8 { (((v / 10) % 10) << 4 | (v % 10)) as u8 };
    match index {
        0x00 => bcd(t.second().into()),
        0x02 => bcd(t.minute().into()),
        0x04 => bcd(t.hour().into()),
        0x06 => bcd(t.weekday().number_from_sunday().into()),
        0x07 => bcd(t.day().into()),
        0x08 => bcd(u8::from(t.month()).into()),
        0x09 => bcd(year % 100),
        0x32 => bcd(year / 100),
        0x0a => 0x26, // status A: divider set, no update in progress
        0x0b => 0x02, // status B: 24-hour, BCD
        0x0d => 0x80, // status D: the clock's battery is fine
        _ => 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cmos_clock_reads_the_time_in_bcd() {
        // 2026-11-22 07:05:09 UTC, a Sunday.
        let t = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_795_331_109);
        let r = |i| cmos_read(i, t);
        assert_eq!(
            (r(0x32), r(0x09), r(0x08), r(0x07)),
            (0x20, 0x26, 0x11, 0x22)
        );
        assert_eq!((r(0x04), r(0x02), r(0x00)), (0x07, 0x05, 0x09));
        assert_eq!(r(0x06), 1, "Sunday is day 1");
        assert_eq!(r(0x0a) & 0x80, 0, "never an update in progress");
    }
}
