//! The console's own state in a snapshot: what its worker holds between
//! two rounds of serving, so that a restored console loses and repeats no
//! byte. The host socket is not part of it: a restored console is built
//! over a new one, as at boot.
//!
//! What is held, and how a restore takes it back:
//! * the port's handshake (the driver added the port, the guest opened
//!   it, whether the guest was told the host side is connected): a
//!   restored guest does not handshake again;
//! * control messages waiting for a control buffer, at most
//!   `MAX_PENDING_CONTROL` (32), each by its 8-byte header (a PORT_NAME
//!   gets the restored console's name again);
//! * host bytes read from the socket and not yet in guest buffers, at
//!   most [`IO_CHUNK`] (64 KiB);
//! * the transmit chain the socket had not taken whole: the capture gives
//!   it back (its transmitq's `next_avail` moves back by one, it was the
//!   last chain popped) and keeps how many of its bytes the old socket
//!   took; the restored worker pops it again and skips those.
//!
//! The bytes, little endian: version (1), flags, the bytes of the given
//! back chain already sent (u64), the count of control messages (u8) and
//! their headers, the count of host bytes (u32) and the bytes. At most
//! [`MAX_SAVED`] bytes; a restore checks every count and names the field
//! it refuses.

use super::chain::IO_CHUNK;
use super::control::{
    ControlMsg, CONTROL_LEN, MAX_PENDING_CONTROL, PORT_ADD, PORT_NAME, PORT_OPEN,
};
use crate::virtio::state::{bad, StateError, MAX_DEVICE_STATE};

const VERSION: u8 = 1;
const PORT_READY: u8 = 1;
const GUEST_OPEN: u8 = 2;
const HOST_CONNECTED: u8 = 4;
const TX_HELD: u8 = 8;

/// The longest console state.
pub(super) const MAX_SAVED: usize = 2 + 8 + 1 + MAX_PENDING_CONTROL * CONTROL_LEN + 4 + IO_CHUNK;
const _: () = assert!(MAX_SAVED <= MAX_DEVICE_STATE);

/// The console's state beyond its queues.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Saved {
    pub(super) port_ready: bool,
    pub(super) guest_open: bool,
    /// The guest was last told the host side is connected.
    pub(super) host_connected: bool,
    /// Bytes of the given back transmit chain the old socket took (None:
    /// no chain was held).
    pub(super) tx_sent: Option<u64>,
    /// Control messages waiting for a buffer, in order.
    pub(super) control: Vec<ControlMsg>,
    /// Host bytes not yet in guest buffers.
    pub(super) rx: Vec<u8>,
}

impl Saved {
    /// A console that was never activated.
    pub(super) fn fresh() -> Saved {
        Saved {
            port_ready: false,
            guest_open: false,
            host_connected: true,
            tx_sent: None,
            control: Vec::new(),
            rx: Vec::new(),
        }
    }

    pub(super) fn to_bytes(&self) -> Vec<u8> {
        let mut flags = 0;
        for (set, bit) in [
            (self.port_ready, PORT_READY),
            (self.guest_open, GUEST_OPEN),
            (self.host_connected, HOST_CONNECTED),
            (self.tx_sent.is_some(), TX_HELD),
        ] {
            if set {
                flags |= bit;
            }
        }
        let mut v = Vec::with_capacity(15 + self.control.len() * CONTROL_LEN + self.rx.len());
        v.push(VERSION);
        v.push(flags);
        v.extend_from_slice(&self.tx_sent.unwrap_or(0).to_le_bytes());
        v.push(self.control.len() as u8);
        for m in &self.control {
            v.extend_from_slice(&m.to_bytes());
        }
        v.extend_from_slice(&(self.rx.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.rx);
        v
    }

    /// Reads back [`Saved::to_bytes`]; the bytes are untrusted.
    pub(super) fn from_bytes(b: &[u8]) -> Result<Saved, StateError> {
        let mut r = Reader { b, at: 0 };
        let version = r.take("device.version", 1)?[0];
        if version != VERSION {
            return bad(
                "device.version",
                format!("{version} (this console reads {VERSION})"),
            );
        }
        let flags = r.take("device.flags", 1)?[0];
        if flags & !(PORT_READY | GUEST_OPEN | HOST_CONNECTED | TX_HELD) != 0 {
            return bad("device.flags", format!("unknown bits in {flags:#x}"));
        }
        let tx_sent = u64::from_le_bytes(r.array("device.tx_sent")?);
        let count = usize::from(r.take("device.control", 1)?[0]);
        if count > MAX_PENDING_CONTROL {
            return bad(
                "device.control",
                format!("{count} messages (at most {MAX_PENDING_CONTROL})"),
            );
        }
        let mut control = Vec::with_capacity(count);
        for i in 0..count {
            let at = format!("device.control[{i}]");
            let m = ControlMsg::from_bytes(r.array(&at)?);
            if !matches!(m.event, PORT_ADD | PORT_NAME | PORT_OPEN) {
                return bad(at, format!("event {} is none the device sends", m.event));
            }
            control.push(m);
        }
        let len = u32::from_le_bytes(r.array("device.rx")?) as usize;
        if len > IO_CHUNK {
            return bad("device.rx", format!("{len} bytes (at most {IO_CHUNK})"));
        }
        let rx = r.take("device.rx", len)?.to_vec();
        if r.at != b.len() {
            return bad("device", format!("{} bytes after the end", b.len() - r.at));
        }
        Ok(Saved {
            port_ready: flags & PORT_READY != 0,
            guest_open: flags & GUEST_OPEN != 0,
            host_connected: flags & HOST_CONNECTED != 0,
            tx_sent: (flags & TX_HELD != 0).then_some(tx_sent),
            control,
            rx,
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, field: &str, n: usize) -> Result<&'a [u8], StateError> {
        match self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
        {
            Some(s) => {
                self.at += n;
                Ok(s)
            }
            None => bad(field, format!("cut short at byte {}", self.b.len())),
        }
    }

    fn array<const N: usize>(&mut self, field: &str) -> Result<[u8; N], StateError> {
        let s = self.take(field, N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
}
