//! The serial port's registers in a snapshot: the guest's 8250 driver
//! programs them once at boot (interrupt enable, line control), and a
//! restored port with the power-on values would leave a guest writing to
//! its console waiting for an interrupt that never comes.

use serde::{Deserialize, Serialize};
use vm_superio::serial::SerialState;

use super::{invalid, SnapshotError};

/// The most bytes the port's receive FIFO holds (vm-superio's FIFO_SIZE).
pub const MAX_SERIAL_INPUT: usize = 64;

/// [`SerialState`] in a form the snapshot file carries.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct SerialSnapshot {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

impl From<SerialState> for SerialSnapshot {
    fn from(s: SerialState) -> SerialSnapshot {
        SerialSnapshot {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

impl SerialSnapshot {
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if self.in_buffer.len() > MAX_SERIAL_INPUT {
            return invalid(format!(
                "serial: {} bytes of input (at most {MAX_SERIAL_INPUT})",
                self.in_buffer.len()
            ));
        }
        Ok(())
    }

    pub fn state(&self) -> SerialState {
        SerialState {
            baud_divisor_low: self.baud_divisor_low,
            baud_divisor_high: self.baud_divisor_high,
            interrupt_enable: self.interrupt_enable,
            interrupt_identification: self.interrupt_identification,
            line_control: self.line_control,
            line_status: self.line_status,
            modem_control: self.modem_control,
            modem_status: self.modem_status,
            scratch: self.scratch,
            in_buffer: self.in_buffer.clone(),
        }
    }
}
