//! What the `virtio-console` thread serves: the queues, the port's state
//! and the socket, in plain methods that tests and the fuzz targets drive
//! without the thread.

use std::collections::VecDeque;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;

use vmm_sys_util::epoll::EventSet;

use super::chain::{TxChain, IO_CHUNK};
use super::{NUM_QUEUES, RX};
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
}
