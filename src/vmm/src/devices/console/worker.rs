//! What the `virtio-console` thread serves: the queues, the port's state
//! and the socket, in plain methods that tests and the fuzz targets drive
//! without the thread.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::chain::{TxChain, IO_CHUNK};
use super::control::{ControlMsg, CONTROL_LEN, PORT_NAME, PORT_OPEN};
use super::state::Saved;
use super::{NUM_QUEUES, RX, TX};
use crate::virtio::pause::DeviceReport;
use crate::virtio::state::QueueSnapshot;
use crate::virtio::worker::QueueHandler;
use crate::virtio::DeviceQueues;

/// The device side of the console: queues, port state and the socket.
#[doc(hidden)] // pub for the fuzz targets (src/fuzz) only
pub struct Worker {
    /// The queues, guest memory and interrupt.
    pub(super) q: DeviceQueues<NUM_QUEUES>,
    pub(super) socket: UnixStream,
    pub(super) port_name: Vec<u8>,
    /// The driver negotiated MULTIPORT (it always does on Linux); without it
    /// port 0 is a console the driver treats as always open.
    pub(super) multiport: bool,
    /// Control messages waiting for a buffer on the control receiveq.
    pub(super) control_out: VecDeque<Vec<u8>>,
    /// The driver added the port (PORT_READY 1).
    pub(super) port_ready: bool,
    /// The guest has the port open (PORT_OPEN from the driver).
    pub(super) guest_open: bool,
    /// The host side can still send: no EOF or error read on the socket.
    pub(super) host_connected: bool,
    /// Writing to the socket failed: guest bytes are dropped from now on.
    pub(super) host_write_closed: bool,
    /// Bytes read from the socket, not yet in guest buffers:
    /// `rx_buf[rx_start..rx_end]`.
    pub(super) rx_buf: Vec<u8>,
    pub(super) rx_start: usize,
    pub(super) rx_end: usize,
    /// The transmit chain the socket has not taken entirely yet.
    pub(super) tx_pending: Option<TxChain>,
    /// Guest bytes on their way to the socket.
    pub(super) tx_scratch: Vec<u8>,
}

impl Worker {
    #[doc(hidden)]
    pub fn new(
        q: DeviceQueues<NUM_QUEUES>,
        socket: UnixStream,
        port_name: &str,
        multiport: bool,
    ) -> Worker {
        Worker {
            q,
            socket,
            port_name: port_name.as_bytes().to_vec(),
            multiport,
            control_out: VecDeque::new(),
            // A single-port console needs no handshake: Linux hooks port 0
            // to hvc and treats it as open.
            port_ready: !multiport,
            guest_open: !multiport,
            host_connected: true,
            host_write_closed: false,
            rx_buf: vec![0; IO_CHUNK],
            rx_start: 0,
            rx_end: 0,
            tx_pending: None,
            tx_scratch: vec![0; IO_CHUNK],
        }
    }

    /// What the worker needs to hear from the socket.
    pub(super) fn socket_interest(&self) -> EventSet {
        let mut ev = EventSet::empty();
        if self.wants_socket_data() && self.q.has_avail(RX) {
            ev |= EventSet::IN;
        }
        if self.tx_pending.is_some() && !self.host_write_closed {
            ev |= EventSet::OUT;
        }
        ev
    }

    fn wants_socket_data(&self) -> bool {
        self.guest_open && self.host_connected && self.rx_start == self.rx_end
    }

    /// Serves every queue and the socket as far as they go, then interrupts
    /// the guest if it needs it.
    #[doc(hidden)]
    pub fn process_all(&mut self) {
        self.process_control_tx();
        self.process_control_rx();
        self.process_tx();
        self.process_rx();
        // The receive path may have queued PORT_OPEN(0) on end of file.
        self.process_control_rx();
        self.q.signal_used();
    }

    /// What a snapshot keeps of the worker beyond its queues (on the
    /// parked worker's thread).
    pub(super) fn save(&self) -> Saved {
        let control = self
            .control_out
            .iter()
            .filter_map(|m| {
                Some(ControlMsg::from_bytes(
                    m.get(..CONTROL_LEN)?.try_into().ok()?,
                ))
            })
            .collect();
        Saved {
            port_ready: self.port_ready,
            guest_open: self.guest_open,
            host_connected: self.host_connected,
            tx_sent: self.tx_pending.as_ref().map(TxChain::sent),
            control,
            rx: self.rx_buf[self.rx_start..self.rx_end].to_vec(),
        }
    }

    /// Takes back what [`Worker::save`] kept, over a new socket, before
    /// the thread starts (on the thread that activates the device: the
    /// VM's set-up thread for a restore).
    pub(super) fn restore(&mut self, saved: Saved) {
        if self.multiport {
            self.port_ready = saved.port_ready;
            self.guest_open = saved.guest_open;
        }
        for m in saved.control {
            let mut msg = m.to_bytes();
            if m.event == PORT_NAME {
                msg.extend_from_slice(&self.port_name);
                msg.push(0);
            }
            self.queue_control(msg);
        }
        // The new socket is connected: a guest told the host had gone
        // hears that it is back.
        if !saved.host_connected && self.multiport && self.port_ready {
            self.queue_control(ControlMsg::new(PORT_OPEN, 1).to_bytes());
        }
        let n = saved.rx.len().min(self.rx_buf.len());
        self.rx_buf[..n].copy_from_slice(&saved.rx[..n]);
        (self.rx_start, self.rx_end) = (0, n);
        // The chain the old socket had not taken whole was given back:
        // it is the next one, and what the old socket took is not sent
        // again.
        if let Some(sent) = saved.tx_sent {
            match self.q.pop(TX) {
                Some((head, descs)) => {
                    let mut chain = TxChain::new(&self.q.mem, head, &descs);
                    chain.skip(sent);
                    self.tx_pending = Some(chain);
                }
                None => {
                    tracing::warn!("virtio-console: the transmit chain held at the capture is gone")
                }
            }
        }
    }
}

/// The `virtio-console` thread: every wake-up serves every queue, and the
/// socket is watched only for what can make progress.
impl QueueHandler for Worker {
    fn serve(&mut self, _notified: &[usize]) {
        self.process_all();
    }

    fn backend(&self) -> Option<(RawFd, EventSet)> {
        Some((self.socket.as_raw_fd(), self.socket_interest()))
    }

    /// A transmit chain the socket has not taken whole is given back: it
    /// was the last one popped, so its entry comes again.
    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        let mut queues = self.q.capture();
        if self.tx_pending.is_some() {
            let tx = &mut queues[TX];
            tx.next_avail = tx.next_avail.wrapping_sub(1);
        }
        Some(queues)
    }

    fn capture_device(&self) -> DeviceReport {
        Ok(Some(self.save().to_bytes()))
    }
}
