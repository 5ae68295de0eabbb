//! The control queues of the console: the handshake that adds port 0,
//! names it and tells the guest whether the host side is connected (see
//! the module above), one `struct virtio_console_control` per buffer.

use virtio_queue::desc::split::Descriptor;
use vm_memory::Bytes;

use super::chain::write_chain;
use super::worker::Worker;
use super::{CTRL_RX, CTRL_TX};
use crate::virtio::Mem;

/// Control events (`struct virtio_console_control.event`).
pub(super) const DEVICE_READY: u16 = 0;
pub(super) const PORT_ADD: u16 = 1;
pub(super) const PORT_READY: u16 = 3;
pub(super) const PORT_OPEN: u16 = 6;
pub(super) const PORT_NAME: u16 = 7;

/// The only port.
pub(super) const PORT_ID: u32 = 0;

/// Size of `struct virtio_console_control`.
pub(super) const CONTROL_LEN: usize = 8;
/// Control messages held while the driver has no control buffer posted.
/// The handshake needs four; more is a driver spamming requests.
pub(super) const MAX_PENDING_CONTROL: usize = 32;

/// `struct virtio_console_control`, little endian on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) struct ControlMsg {
    pub(super) id: u32,
    pub(super) event: u16,
    pub(super) value: u16,
}

impl ControlMsg {
    pub(super) fn new(event: u16, value: u16) -> ControlMsg {
        ControlMsg {
            id: PORT_ID,
            event,
            value,
        }
    }

    pub(super) fn from_bytes(b: [u8; CONTROL_LEN]) -> ControlMsg {
        ControlMsg {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    pub(super) fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_LEN);
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v
    }
}

impl Worker {
    pub(super) fn queue_control(&mut self, msg: Vec<u8>) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            tracing::warn!("virtio-console: too many control messages pending, one dropped");
            return;
        }
        self.control_out.push_back(msg);
    }

    /// Control messages from the driver.
    pub(super) fn process_control_tx(&mut self) {
        if !self.multiport {
            return;
        }
        while let Some((head, descs)) = self.q.pop(CTRL_TX) {
            let msg = read_control(&self.q.mem, &descs);
            self.q.add_used(CTRL_TX, head, 0);
            match msg {
                Some(msg) => self.handle_control(msg),
                None => tracing::debug!("virtio-console: short or unreadable control message"),
            }
        }
    }

    fn handle_control(&mut self, msg: ControlMsg) {
        match msg.event {
            // id is VIRTIO_CONSOLE_BAD_ID (-1) here.
            DEVICE_READY => {
                if msg.value == 0 {
                    tracing::warn!("the guest's virtio-console driver failed to initialise");
                    return;
                }
                self.queue_control(ControlMsg::new(PORT_ADD, 1).to_bytes());
            }
            PORT_READY if msg.id == PORT_ID => {
                if msg.value == 0 {
                    tracing::warn!("the guest failed to add virtio-console port 0");
                    return;
                }
                self.port_ready = true;
                // Linux copies the name up to the buffer's end or a NUL; the
                // NUL is sent as QEMU does.
                let mut name = ControlMsg::new(PORT_NAME, 1).to_bytes();
                name.extend_from_slice(&self.port_name);
                name.push(0);
                self.queue_control(name);
                if self.host_connected {
                    self.queue_control(ControlMsg::new(PORT_OPEN, 1).to_bytes());
                }
            }
            PORT_OPEN if msg.id == PORT_ID && self.port_ready => {
                self.guest_open = msg.value != 0;
            }
            _ => tracing::debug!(?msg, "virtio-console: control message ignored"),
        }
    }

    /// Control messages to the driver, one per buffer it posted.
    pub(super) fn process_control_rx(&mut self) {
        while !self.control_out.is_empty() {
            let Some((head, descs)) = self.q.pop(CTRL_RX) else {
                break;
            };
            let Some(msg) = self.control_out.front() else {
                break;
            };
            let n = write_chain(&self.q.mem, &descs, msg);
            self.q.add_used(CTRL_RX, head, n);
            // A chain with no room for anything does not eat the message.
            if n > 0 {
                self.control_out.pop_front();
            }
        }
    }
}

/// The first `CONTROL_LEN` readable bytes of a chain, if it has them.
fn read_control(mem: &Mem, descs: &[Descriptor]) -> Option<ControlMsg> {
    let mut buf = [0u8; CONTROL_LEN];
    let mut got = 0;
    for d in descs.iter().filter(|d| !d.is_write_only()) {
        if got == CONTROL_LEN {
            break;
        }
        let n = (CONTROL_LEN - got).min(d.len() as usize);
        mem.read_slice(&mut buf[got..got + n], d.addr()).ok()?;
        got += n;
    }
    (got == CONTROL_LEN).then(|| ControlMsg::from_bytes(buf))
}
