//! virtio-console (virtio spec 5.3) with `VIRTIO_CONSOLE_F_MULTIPORT` and
//! exactly one port: port 0, a generic (non-console) port with a name, whose
//! host side is a connected unix stream socket.
//!
//! The guest finds the port by that name (`/sys/class/virtio-ports/*/name`)
//! and opens `/dev/vportNp0`; what flows over it is an opaque byte stream.
//!
//! Queues: 0 = port 0 receiveq (host -> guest), 1 = port 0 transmitq
//! (guest -> host), 2 = control receiveq (device -> driver), 3 = control
//! transmitq (driver -> device).
//!
//! The control handshake, as Linux's `drivers/char/virtio_console.c` drives
//! it (QEMU's `hw/char/virtio-serial-bus.c` answers the same way):
//!
//! ```text
//! driver                                   device
//! DEVICE_READY(id -1, 1)          ->
//!                                 <-       PORT_ADD(0)
//! PORT_READY(0, 1)                ->       (0 = the guest failed to add it)
//!                                 <-       PORT_NAME(0) + name + NUL
//!                                 <-       PORT_OPEN(0, 1)   host connected
//! PORT_OPEN(0, 1|0)               ->       the guest opened/closed the port
//!                                 <-       PORT_OPEN(0, 0)   host went away
//! ```
//!
//! Unlike QEMU, nothing the host sends is lost before the guest opens the
//! port: the Linux driver discards data arriving on a closed generic port,
//! so the device does not even read the socket until the guest opened it.
//!
//! All the device logic lives in [`Worker`], plain methods over the queues,
//! guest memory and the socket that tests drive directly; the
//! `virtio-console` thread is the one loop of [`crate::virtio::worker`].
//!
//! Every descriptor chain comes from the guest and is treated as hostile:
//! direction flags are checked, memory errors are handled (a chain is
//! truncated at the first bad descriptor), chain length is bounded by
//! virtio-queue's iterator, nothing panics on guest data.

use std::collections::VecDeque;
use std::io::{self, Read};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::Queue;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::virtio::worker::{self, QueueHandler};
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, Interrupt, Mem, VirtioDevice,
    TYPE_CONSOLE,
};

/// Feature bit: the device has a control queue and possibly several ports.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;

/// Maximum size of each of the device's queues.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Number of queues: port 0 rx/tx, control rx/tx.
pub const NUM_QUEUES: usize = 4;

/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;

/// Control events (`struct virtio_console_control.event`).
const DEVICE_READY: u16 = 0;
const PORT_ADD: u16 = 1;
const PORT_READY: u16 = 3;
const PORT_OPEN: u16 = 6;
const PORT_NAME: u16 = 7;

/// The only port.
const PORT_ID: u32 = 0;
/// `max_nr_ports` in the configuration space.
const MAX_NR_PORTS: u32 = 1;

/// Size of `struct virtio_console_control`.
const CONTROL_LEN: usize = 8;
/// Control messages held while the driver has no control buffer posted.
/// The handshake needs four; more is a driver spamming requests.
const MAX_PENDING_CONTROL: usize = 32;
/// Bytes moved between guest memory and the socket at a time.
const IO_CHUNK: usize = 64 * 1024;

/// The virtio-console device.
pub struct Console {
    port_name: String,
    backend: Option<UnixStream>,
    acked_features: u64,
    worker: Option<JoinHandle<()>>,
}

impl Console {
    /// A console whose port 0 is named `port_name` and carries the bytes of
    /// `backend`, a connected stream socket (its peer is the host side).
    ///
    /// The name must fit a driver's control buffer (Linux posts a page):
    /// a few dozen bytes, no NUL.
    pub fn new(port_name: &str, backend: UnixStream) -> Console {
        Console {
            port_name: port_name.to_owned(),
            backend: Some(backend),
            acked_features: 0,
            worker: None,
        }
    }

    /// The worker thread, once activated (it exits when the VM's stop
    /// event becomes readable).
    pub fn take_worker(&mut self) -> Option<JoinHandle<()>> {
        self.worker.take()
    }
}

/// The configuration space: cols, rows, max_nr_ports, emerg_wr.
fn config_space() -> [u8; 12] {
    let mut c = [0u8; 12];
    c[4..8].copy_from_slice(&MAX_NR_PORTS.to_le_bytes());
    c
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(), offset, data)
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the backend in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let socket = self.backend.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other("the console was already activated"))
        })?;
        // Reads must never block the worker; writes wait on EPOLLOUT.
        socket.set_nonblocking(true).map_err(DeviceError::Backend)?;
        let multiport = self.acked_features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        if !multiport {
            tracing::warn!(
                "the guest's virtio-console driver refused MULTIPORT: the port has no name"
            );
        }
        let worker = Worker::new(
            activation.mem,
            activation.interrupt,
            queues,
            socket,
            &self.port_name,
            multiport,
        );
        let handle = worker::spawn("virtio-console".into(), worker, notify, activation.stop)?;
        self.worker = Some(handle);
        Ok(())
    }
}

/// `struct virtio_console_control`, little endian on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct ControlMsg {
    id: u32,
    event: u16,
    value: u16,
}

impl ControlMsg {
    fn new(event: u16, value: u16) -> ControlMsg {
        ControlMsg {
            id: PORT_ID,
            event,
            value,
        }
    }

    fn from_bytes(b: [u8; CONTROL_LEN]) -> ControlMsg {
        ControlMsg {
            id: u32::from_le_bytes([b[0], b[1], b[2], b[3]]),
            event: u16::from_le_bytes([b[4], b[5]]),
            value: u16::from_le_bytes([b[6], b[7]]),
        }
    }

    fn to_bytes(self) -> Vec<u8> {
        let mut v = Vec::with_capacity(CONTROL_LEN);
        v.extend_from_slice(&self.id.to_le_bytes());
        v.extend_from_slice(&self.event.to_le_bytes());
        v.extend_from_slice(&self.value.to_le_bytes());
        v
    }
}

/// A transmit chain being written to the socket: its readable,
/// non-empty descriptors and how far the socket took them.
struct TxChain {
    head: u16,
    segments: Vec<(GuestAddress, usize)>,
    segment: usize,
    offset: usize,
}

impl TxChain {
    /// Keeps the chain's readable descriptors that lie in guest memory.
    fn new(mem: &Mem, head: u16, descs: &[Descriptor]) -> TxChain {
        let mut segments = Vec::new();
        for d in descs {
            let len = d.len() as usize;
            if d.is_write_only() {
                tracing::debug!("virtio-console: write-only descriptor on the transmitq, skipped");
            } else if !mem.check_range(d.addr(), len) {
                tracing::debug!("virtio-console: transmit buffer outside guest memory, skipped");
            } else if len > 0 {
                segments.push((d.addr(), len));
            }
        }
        TxChain {
            head,
            segments,
            segment: 0,
            offset: 0,
        }
    }
}

/// Whether a transmit chain was fully consumed.
#[derive(Debug, PartialEq, Eq)]
enum TxProgress {
    Done,
    Blocked,
}

/// The device side of the console: queues, port state and the socket.
#[doc(hidden)] // pub for the fuzz targets (src/fuzz) only
pub struct Worker {
    /// The queues, guest memory and interrupt.
    q: DeviceQueues<NUM_QUEUES>,
    socket: UnixStream,
    port_name: Vec<u8>,
    /// The driver negotiated MULTIPORT (it always does on Linux); without it
    /// port 0 is a console the driver treats as always open.
    multiport: bool,
    /// Control messages waiting for a buffer on the control receiveq.
    control_out: VecDeque<Vec<u8>>,
    /// The driver added the port (PORT_READY 1).
    port_ready: bool,
    /// The guest has the port open (PORT_OPEN from the driver).
    guest_open: bool,
    /// The host side can still send: no EOF or error read on the socket.
    host_connected: bool,
    /// Writing to the socket failed: guest bytes are dropped from now on.
    host_write_closed: bool,
    /// Bytes read from the socket, not yet in guest buffers:
    /// `rx_buf[rx_start..rx_end]`.
    rx_buf: Vec<u8>,
    rx_start: usize,
    rx_end: usize,
    /// The transmit chain the socket has not taken entirely yet.
    tx_pending: Option<TxChain>,
    /// Guest bytes on their way to the socket.
    tx_scratch: Vec<u8>,
}

impl Worker {
    #[doc(hidden)]
    pub fn new(
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: [Queue; NUM_QUEUES],
        socket: UnixStream,
        port_name: &str,
        multiport: bool,
    ) -> Worker {
        Worker {
            q: DeviceQueues::new("virtio-console", mem, interrupt, queues),
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
    fn socket_interest(&self) -> EventSet {
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

    fn queue_control(&mut self, msg: Vec<u8>) {
        if self.control_out.len() >= MAX_PENDING_CONTROL {
            tracing::warn!("virtio-console: too many control messages pending, one dropped");
            return;
        }
        self.control_out.push_back(msg);
    }

    /// Control messages from the driver.
    fn process_control_tx(&mut self) {
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
    fn process_control_rx(&mut self) {
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

    /// Guest -> host: every readable byte of every chain, in order.
    fn process_tx(&mut self) {
        loop {
            let mut chain = match self.tx_pending.take() {
                Some(c) => c,
                None => match self.q.pop(TX) {
                    Some((head, descs)) => TxChain::new(&self.q.mem, head, &descs),
                    None => break,
                },
            };
            if self.write_tx(&mut chain) == TxProgress::Blocked {
                self.tx_pending = Some(chain);
                break;
            }
            self.q.add_used(TX, chain.head, 0);
        }
    }

    /// Writes what remains of `chain` to the socket.
    fn write_tx(&mut self, chain: &mut TxChain) -> TxProgress {
        while let Some(&(addr, len)) = chain.segments.get(chain.segment) {
            if self.host_write_closed {
                // Nobody reads: the bytes are dropped, the buffer completed.
                return TxProgress::Done;
            }
            if chain.offset >= len {
                chain.segment += 1;
                chain.offset = 0;
                continue;
            }
            let n = IO_CHUNK.min(len - chain.offset);
            let buf = &mut self.tx_scratch[..n];
            let read = addr
                .checked_add(chain.offset as u64)
                .is_some_and(|a| self.q.mem.read_slice(buf, a).is_ok());
            if !read {
                tracing::debug!("virtio-console: transmit buffer outside guest memory, skipped");
                chain.segment += 1;
                chain.offset = 0;
                continue;
            }
            let mut sent = 0;
            while sent < n {
                // sendmsg with MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
                match self.socket.send_with_fds(&[&buf[sent..]], &[]) {
                    Ok(0) => {
                        self.host_write_closed = true;
                        return TxProgress::Done;
                    }
                    Ok(k) => sent += k,
                    Err(e) if e.errno() == libc::EINTR => {}
                    Err(e) if e.errno() == libc::EAGAIN => {
                        chain.offset += sent;
                        return TxProgress::Blocked;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "virtio-console: the host stopped reading; guest output dropped");
                        self.host_write_closed = true;
                        return TxProgress::Done;
                    }
                }
            }
            chain.offset += n;
        }
        TxProgress::Done
    }

    /// Host -> guest: socket bytes into the receiveq's buffers, only while
    /// the guest has the port open (the driver drops data otherwise).
    fn process_rx(&mut self) {
        if !self.guest_open {
            return;
        }
        loop {
            let empty = self.rx_start == self.rx_end;
            if empty && !(self.host_connected && self.q.has_avail(RX) && self.fill_rx()) {
                break;
            }
            let Some((head, descs)) = self.q.pop(RX) else {
                break;
            };
            let n = write_chain(
                &self.q.mem,
                &descs,
                &self.rx_buf[self.rx_start..self.rx_end],
            );
            self.rx_start += n;
            self.q.add_used(RX, head, n);
        }
    }

    /// Reads the socket into the empty `rx_buf`; false if nothing came.
    fn fill_rx(&mut self) -> bool {
        loop {
            match self.socket.read(&mut self.rx_buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.rx_start = 0;
                    self.rx_end = n;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::info!(error = %e, "virtio-console: reading the host socket failed");
                    break;
                }
            }
        }
        // End of file: the guest reads EOF once it has read what came before.
        self.host_connected = false;
        if self.multiport && self.port_ready {
            self.queue_control(ControlMsg::new(PORT_OPEN, 0).to_bytes());
        }
        false
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

/// Writes a prefix of `data` into the chain's writable descriptors, in
/// order; stops at the first one outside guest memory so the count returned
/// (the used length) covers exactly the bytes the guest will find.
fn write_chain(mem: &Mem, descs: &[Descriptor], data: &[u8]) -> usize {
    let mut written = 0;
    for d in descs {
        if written == data.len() {
            break;
        }
        if !d.is_write_only() {
            tracing::debug!("virtio-console: read-only descriptor in a receive chain, skipped");
            continue;
        }
        let n = (d.len() as usize).min(data.len() - written);
        if n == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), n)
            || mem
                .write_slice(&data[written..written + n], d.addr())
                .is_err()
        {
            tracing::debug!("virtio-console: receive buffer outside guest memory");
            break;
        }
        written += n;
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;
    use virtio_queue::QueueT;
    use vmm_sys_util::eventfd::EventFd;

    use crate::virtio::test_utils::*;

    const PORT_REMOVE: u16 = 2;

    /// The driver sends a control message.
    fn send_control(g: &mut Guest, id: u32, event: u16, value: u16) {
        let msg = ControlMsg { id, event, value }.to_bytes();
        g.post_out(CTRL_TX, &msg);
    }

    /// A worker over the guest's queues; the other end of its socket.
    fn worker(mem: &Mem, g: &Guest) -> (Worker, UnixStream, Arc<Interrupt>) {
        let (dev, host) = UnixStream::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        let irq = interrupt();
        let w = Worker::new(
            mem.clone(),
            irq.clone(),
            g.device_queues(),
            dev,
            "krun.ctl",
            true,
        );
        (w, host, irq)
    }

    fn ctl(event: u16, value: u16) -> Vec<u8> {
        ControlMsg::new(event, value).to_bytes()
    }

    fn name_msg() -> Vec<u8> {
        let mut m = ctl(PORT_NAME, 1);
        m.extend_from_slice(b"krun.ctl\0");
        m
    }

    /// The whole handshake, then the guest opens the port.
    fn open_port(g: &mut Guest, w: &mut Worker) {
        for _ in 0..3 {
            g.post_in(CTRL_RX, 4096);
        }
        send_control(g, u32::MAX, DEVICE_READY, 1);
        w.process_all();
        send_control(g, PORT_ID, PORT_READY, 1);
        w.process_all();
        send_control(g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert_eq!(
            g.received(CTRL_RX),
            vec![ctl(PORT_ADD, 1), name_msg(), ctl(PORT_OPEN, 1)]
        );
        assert_eq!(g.used(CTRL_TX).len(), 3);
        assert!(w.guest_open);
    }

    /// Reads from `s` until `len` bytes came (or a second passed).
    fn read_exact_timeout(s: &mut UnixStream, len: usize) -> Vec<u8> {
        s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut v = vec![0; len];
        s.read_exact(&mut v).unwrap();
        v
    }

    fn assert_nothing_to_read(s: &UnixStream) {
        s.set_nonblocking(true).unwrap();
        let mut b = [0u8; 1];
        let r = (&*s).read(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        s.set_nonblocking(false).unwrap();
    }

    #[test]
    fn device_surface() {
        let (a, _b) = UnixStream::pair().unwrap();
        let c = Console::new("krun.ctl", a);
        assert_eq!(c.device_type(), TYPE_CONSOLE);
        assert_eq!(c.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 4]);
        assert_eq!(c.features(), VIRTIO_CONSOLE_F_MULTIPORT);
        let mut cfg = [0xffu8; 16];
        c.read_config(0, &mut cfg);
        assert_eq!(cfg, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
        let mut max = [0u8; 4];
        c.read_config(4, &mut max);
        assert_eq!(u32::from_le_bytes(max), 1);
    }

    #[test]
    fn control_handshake() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, _host, irq) = worker(&mem, &g);
        for _ in 0..4 {
            g.post_in(CTRL_RX, 4096);
        }
        w.process_all();
        assert!(
            g.used(CTRL_RX).is_empty(),
            "nothing to say before DEVICE_READY"
        );

        send_control(&mut g, u32::MAX, DEVICE_READY, 1);
        w.process_all();
        assert_eq!(g.used(CTRL_TX).len(), 1);
        assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_ADD, 1)]);
        assert!(irq.eventfd().read().unwrap() > 0, "interrupt raised");
        assert_ne!(irq.status() & crate::virtio::INT_VRING, 0);

        send_control(&mut g, PORT_ID, PORT_READY, 1);
        w.process_all();
        let msgs = g.received(CTRL_RX);
        assert_eq!(msgs, vec![name_msg(), ctl(PORT_OPEN, 1)]);
        // The name bytes exactly, as the driver's strscpy will see them.
        assert_eq!(&msgs[0][8..], b"krun.ctl\0");
        assert!(!w.guest_open);

        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert!(w.guest_open);
        send_control(&mut g, PORT_ID, PORT_OPEN, 0);
        w.process_all();
        assert!(!w.guest_open);
        assert!(g.used(CTRL_RX).is_empty());
    }

    #[test]
    fn control_messages_wait_for_buffers() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, _host, _irq) = worker(&mem, &g);
        send_control(&mut g, u32::MAX, DEVICE_READY, 1);
        w.process_all();
        send_control(&mut g, PORT_ID, PORT_READY, 1);
        w.process_all();
        assert_eq!(g.used(CTRL_TX).len(), 2, "driver's messages completed");
        assert!(g.used(CTRL_RX).is_empty());
        // Buffers appear one at a time (notification on queue 2).
        g.post_in(CTRL_RX, 4096);
        w.process_all();
        assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_ADD, 1)]);
        g.post_in(CTRL_RX, 4096);
        g.post_in(CTRL_RX, 4096);
        g.post_in(CTRL_RX, 4096);
        w.process_all();
        assert_eq!(
            g.received(CTRL_RX),
            vec![name_msg(), ctl(PORT_OPEN, 1)],
            "in order, one per buffer"
        );
    }

    #[test]
    fn failures_and_unknown_messages_are_ignored() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, _host, _irq) = worker(&mem, &g);
        for _ in 0..4 {
            g.post_in(CTRL_RX, 4096);
        }
        send_control(&mut g, u32::MAX, DEVICE_READY, 0);
        send_control(&mut g, PORT_ID, PORT_READY, 0);
        // Opening a port the driver never added.
        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert!(!w.guest_open && !w.port_ready);
        send_control(&mut g, 7, PORT_READY, 1);
        send_control(&mut g, PORT_ID, 0x1234, 1);
        send_control(&mut g, PORT_ID, PORT_REMOVE, 1);
        w.process_all();
        assert_eq!(g.used(CTRL_TX).len(), 6);
        assert!(g.used(CTRL_RX).is_empty());
        assert!(!w.port_ready);
    }

    #[test]
    fn guest_to_host_multi_descriptor_chains() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);
        let _ = irq.eventfd().read();

        let parts: [&[u8]; 3] = [b"hello ", b"virtio ", b"world"];
        let mut descs = Vec::new();
        for p in parts {
            let a = g.alloc(p.len() as u64);
            g.write(a, p);
            descs.push((a, p.len() as u32, 0));
        }
        let h1 = g.post(TX, &descs);
        let h2 = g.post_out(TX, b"|second chain");
        w.process_all();
        assert_eq!(g.used(TX), vec![(h1, 0), (h2, 0)]);
        assert!(irq.eventfd().read().unwrap() > 0);
        let want = b"hello virtio world|second chain";
        assert_eq!(read_exact_timeout(&mut host, want.len()), want);
        assert_nothing_to_read(&host);
    }

    #[test]
    fn host_to_guest_fills_posted_buffers() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);

        host.write_all(b"ping").unwrap();
        w.process_all();
        assert!(g.used(RX).is_empty(), "no buffer, nothing read");
        assert!(!w.socket_interest().contains(EventSet::IN));

        g.post_in(RX, 4096);
        assert!(w.socket_interest().contains(EventSet::IN));
        w.process_all();
        assert_eq!(g.received(RX), vec![b"ping".to_vec()]);
        assert!(!w.socket_interest().contains(EventSet::IN));

        // 40 bytes over buffers of 16: split in order, exact used lengths.
        let data: Vec<u8> = (0u8..40).collect();
        host.write_all(&data).unwrap();
        for _ in 0..3 {
            g.post_in(RX, 16);
        }
        w.process_all();
        let got = g.received(RX);
        assert_eq!(
            got.iter().map(Vec::len).collect::<Vec<_>>(),
            vec![16, 16, 8]
        );
        assert_eq!(got.concat(), data);

        // One chain of two writable descriptors.
        let (a, b) = (g.alloc(3), g.alloc(100));
        g.post(RX, &[(a, 3, F_WRITE), (b, 100, F_WRITE)]);
        host.write_all(b"abcdefg").unwrap();
        w.process_all();
        assert_eq!(g.received(RX), vec![b"abcdefg".to_vec()]);
        assert_eq!(g.read(a, 3), b"abc");
        assert_eq!(g.read(b, 4), b"defg");
    }

    #[test]
    fn host_data_before_the_guest_opens_is_kept() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        host.write_all(b"early bytes").unwrap();
        for _ in 0..4 {
            g.post_in(CTRL_RX, 4096);
        }
        // As Linux does in add_port: receive buffers before PORT_READY.
        g.post_in(RX, 4096);
        g.post_in(RX, 4096);
        send_control(&mut g, u32::MAX, DEVICE_READY, 1);
        w.process_all();
        send_control(&mut g, PORT_ID, PORT_READY, 1);
        w.process_all();
        assert!(g.used(RX).is_empty(), "the port is not open yet");
        assert!(
            w.socket_interest().is_empty(),
            "the socket is not even watched"
        );
        host.write_all(b", more").unwrap();
        w.process_all();
        assert!(g.used(RX).is_empty());

        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert_eq!(g.received(RX).concat(), b"early bytes, more");

        // Closed again: bytes wait for the next open.
        send_control(&mut g, PORT_ID, PORT_OPEN, 0);
        w.process_all();
        host.write_all(b"later").unwrap();
        w.process_all();
        assert!(g.used(RX).is_empty());
        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert_eq!(g.received(RX).concat(), b"later");
    }

    #[test]
    fn bytes_read_beyond_the_buffers_wait_for_more_buffers() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);
        let data: Vec<u8> = (0..100u8).collect();
        host.write_all(&data).unwrap();
        g.post_in(RX, 30);
        w.process_all();
        assert_eq!(g.received(RX), vec![data[..30].to_vec()]);
        // The rest sits in the device, the socket is not watched meanwhile.
        assert!(w.socket_interest().is_empty());
        g.post_in(RX, 4096);
        g.post_in(RX, 4096);
        w.process_all();
        assert_eq!(g.received(RX), vec![data[30..].to_vec()]);
        // A buffer left, the socket drained: now it is watched.
        assert_eq!(w.socket_interest(), EventSet::IN);
    }

    #[test]
    fn blocked_socket_keeps_every_byte() {
        // 1 MiB in one chain is far more than a socket buffer takes.
        let mem = memory(0x40_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);
        let data: Vec<u8> = (0..0x10_0000u32).map(|i| (i * 7 % 251) as u8).collect();
        let base = g.alloc(data.len() as u64);
        g.write(base, &data);
        let quarter = data.len() as u64 / 4;
        let descs: Vec<_> = (0..4)
            .map(|i| (base + i * quarter, quarter as u32, 0))
            .collect();
        let h = g.post(TX, &descs);
        let h2 = g.post_out(TX, b"tail");
        w.process_all();
        assert!(
            g.used(TX).is_empty(),
            "not completed while the socket is full"
        );
        assert!(w.socket_interest().contains(EventSet::OUT));

        let mut got = Vec::new();
        host.set_nonblocking(true).unwrap();
        let mut buf = vec![0; 0x10000];
        let deadline = Instant::now() + Duration::from_secs(10);
        while got.len() < data.len() + 4 {
            assert!(Instant::now() < deadline, "stuck at {} bytes", got.len());
            match host.read(&mut buf) {
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.process_all(),
                Err(e) => panic!("{e}"),
            }
        }
        assert_eq!(&got[..data.len()], &data[..]);
        assert_eq!(&got[data.len()..], b"tail");
        assert_eq!(g.used(TX), vec![(h, 0), (h2, 0)]);
        assert!(w.socket_interest().is_empty() || w.socket_interest() == EventSet::IN);
    }

    #[test]
    fn host_eof_tells_the_guest_and_output_is_dropped() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);
        for _ in 0..4 {
            g.post_in(CTRL_RX, 4096);
        }
        host.write_all(b"last words").unwrap();
        drop(host);
        g.post_in(RX, 4096);
        g.post_in(RX, 4096);
        w.process_all();
        assert_eq!(g.received(RX), vec![b"last words".to_vec()]);
        assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_OPEN, 0)]);
        assert!(!w.host_connected);
        assert!(
            w.socket_interest().is_empty(),
            "EOF: the socket is not watched"
        );

        // The guest still writes: completed, dropped, no SIGPIPE.
        let h = g.post_out(TX, b"anyone there?");
        w.process_all();
        assert_eq!(g.used(TX), vec![(h, 0)]);
        let h = g.post_out(TX, b"still writing");
        w.process_all();
        assert_eq!(g.used(TX), vec![(h, 0)]);
        assert!(w.host_write_closed);
        assert!(w.socket_interest().is_empty());
        // The second receive buffer stays with the device, unused.
        assert!(g.used(RX).is_empty());
    }

    #[test]
    fn hostile_chains_are_survived() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, mut host, _irq) = worker(&mem, &g);
        open_port(&mut g, &mut w);
        let outside = mem.last_addr().raw_value() + 1;

        // Transmitq: a write-only descriptor between readable ones is
        // skipped; out of memory, zero length, huge length, overflow.
        let a = g.alloc(4);
        g.write(a, b"good");
        let w_only = g.alloc(4);
        g.write(w_only, b"EVIL");
        g.post(
            TX,
            &[
                (a, 2, 0),
                (w_only, 4, F_WRITE),
                (outside, 100, 0),
                (a, 0, 0),
                (u64::MAX - 2, 16, 0),
                (a + 2, 2, 0),
            ],
        );
        g.post(TX, &[(a, u32::MAX, 0)]);
        g.post(TX, &[(outside - 2, 4, 0)]);
        // A looping chain: 0 -> 1 -> 0 ... within the table.
        g.post_loop(TX, a, 1);
        // A head index beyond the table (its used entry cannot be written).
        g.make_avail(TX, QSIZE + 3);
        w.process_all();
        let used = g.used(TX);
        assert_eq!(used.len(), 4, "{used:?}");
        // The loop is cut after as many descriptors as the queue has.
        let mut want = b"good".to_vec();
        want.extend([b'g'; QSIZE as usize]);
        assert_eq!(read_exact_timeout(&mut host, want.len()), want);
        assert_nothing_to_read(&host);

        // Then a good chain works.
        let h = g.post_out(TX, b"next");
        w.process_all();
        assert_eq!(g.used(TX), vec![(h, 0)]);
        assert_eq!(read_exact_timeout(&mut host, 4), b"next");

        // Receiveq: read-only, outside memory, zero length: nothing is
        // lost, the bytes land in the next good buffer.
        host.write_all(b"for the guest").unwrap();
        let r = g.alloc(64);
        g.post(RX, &[(r, 64, 0)]);
        g.post(RX, &[(outside, 64, F_WRITE)]);
        g.post(RX, &[(r, 0, F_WRITE)]);
        g.post(
            RX,
            &[
                (r, 2, F_WRITE),
                (outside, 64, F_WRITE),
                (r + 8, 64, F_WRITE),
            ],
        );
        w.process_all();
        assert_eq!(
            g.used(RX).iter().map(|u| u.1).collect::<Vec<_>>(),
            vec![0, 0, 0, 2]
        );
        g.post_in(RX, 4096);
        w.process_all();
        assert_eq!(g.received(RX), vec![b"r the guest".to_vec()]);
        assert_eq!(g.read(r, 2), b"fo");

        // Control: 3 bytes, a control message split over 8 descriptors of
        // one byte (fine), write-only, outside memory; then a good one.
        let c = g.alloc(8);
        g.write(c, &ctl(PORT_OPEN, 0));
        g.post(CTRL_TX, &[(c, 3, 0)]);
        g.post(CTRL_TX, &[(c, 8, F_WRITE)]);
        g.post(CTRL_TX, &[(outside, 8, 0)]);
        w.process_all();
        assert_eq!(g.used(CTRL_TX).len(), 3);
        assert!(w.guest_open, "none of them was a PORT_OPEN(0)");
        let split: Vec<_> = (0..8).map(|i| (c + i, 1, 0)).collect();
        g.post(CTRL_TX, &split);
        w.process_all();
        assert!(!w.guest_open, "a message over many descriptors counts");
        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        w.process_all();
        assert!(w.guest_open);

        // Control receiveq with no room: the message waits.
        g.post(CTRL_RX, &[(c, 8, 0)]);
        g.post(CTRL_RX, &[(outside, 64, F_WRITE)]);
        drop(host);
        g.post_in(RX, 64);
        w.process_all();
        assert!(g.received(CTRL_RX).iter().all(Vec::is_empty));
        g.post_in(CTRL_RX, 4096);
        w.process_all();
        assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_OPEN, 0)]);
    }

    #[test]
    fn without_multiport_the_port_is_simply_open() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (dev, mut host) = UnixStream::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        let mut w = Worker::new(mem.clone(), interrupt(), g.device_queues(), dev, "x", false);
        host.write_all(b"hi").unwrap();
        g.post_in(RX, 64);
        g.post_out(TX, b"yo");
        w.process_all();
        assert_eq!(g.received(RX), vec![b"hi".to_vec()]);
        assert_eq!(read_exact_timeout(&mut host, 2), b"yo");
    }

    /// The real thing: activation, the worker thread and its eventfds.
    #[test]
    fn worker_thread_serves_notifications_and_stops() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (dev, mut host) = UnixStream::pair().unwrap();
        let mut console = Console::new("krun.ctl", dev);
        console.set_acked_features(VIRTIO_CONSOLE_F_MULTIPORT | crate::virtio::VIRTIO_F_VERSION_1);
        let irq = interrupt();
        let notify: Vec<EventFd> = (0..NUM_QUEUES).map(|_| eventfd()).collect();
        let stop = eventfd();
        let queues = g.device_queues::<NUM_QUEUES>().into();
        console
            .activate(activation(&mem, &irq, queues, &notify, &stop))
            .unwrap();
        let kick = |q: usize| notify[q].write(1).unwrap();
        let wait_used = |g: &mut Guest, q: usize, count: usize| {
            let mut got = Vec::new();
            wait_for(&format!("queue {q}"), || {
                got.extend(g.received(q));
                (got.len() >= count).then_some(())
            });
            got
        };

        for _ in 0..4 {
            g.post_in(CTRL_RX, 4096);
        }
        kick(CTRL_RX);
        send_control(&mut g, u32::MAX, DEVICE_READY, 1);
        kick(CTRL_TX);
        assert_eq!(wait_used(&mut g, CTRL_RX, 1), vec![ctl(PORT_ADD, 1)]);
        g.post_in(RX, 4096);
        kick(RX);
        send_control(&mut g, PORT_ID, PORT_READY, 1);
        kick(CTRL_TX);
        assert_eq!(
            wait_used(&mut g, CTRL_RX, 2),
            vec![name_msg(), ctl(PORT_OPEN, 1)]
        );
        // The host speaks before the guest opened the port.
        host.write_all(b"hello guest").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        assert!(g.used(RX).is_empty());
        send_control(&mut g, PORT_ID, PORT_OPEN, 1);
        kick(CTRL_TX);
        assert_eq!(wait_used(&mut g, RX, 1), vec![b"hello guest".to_vec()]);
        // Waiting for the socket: more bytes, delivered on EPOLLIN.
        g.post_in(RX, 4096);
        kick(RX);
        host.write_all(b"again").unwrap();
        assert_eq!(wait_used(&mut g, RX, 1), vec![b"again".to_vec()]);

        g.post_out(TX, b"hello host");
        kick(TX);
        assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");
        assert!(irq.eventfd().read().unwrap() > 0);

        stop.write(1).unwrap();
        console.take_worker().unwrap().join().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Random descriptor tables, available rings and memory contents on
        /// all four queues, in every port state: no panic, and afterwards the
        /// device still serves a good chain.
        #[test]
        fn random_rings_never_panic(
            rings in arb_rings(NUM_QUEUES, 0x2_0000),
            noise in proptest::collection::vec(any::<u8>(), 0x800),
            host_bytes in proptest::collection::vec(any::<u8>(), 0..300),
            open in any::<bool>(),
            rounds in 1usize..4,
        ) {
            let mem = memory(0x2_0000);
            let g = Guest::new(&mem, NUM_QUEUES);
            let (mut w, mut host, _irq) = worker(&mem, &g);
            if open {
                w.port_ready = true;
                w.guest_open = true;
            }
            // Plausible control messages and junk in the data area.
            g.write(0x1_0000, &noise);
            g.write(0x1_0000, &ctl(PORT_OPEN, 1));
            g.write(0x1_0008, &ControlMsg { id: u32::MAX, event: DEVICE_READY, value: 1 }.to_bytes());
            for (q, ring) in rings.iter().enumerate() {
                g.load(q, ring);
            }
            host.write_all(&host_bytes).unwrap();
            host.set_nonblocking(true).unwrap();
            let mut sink = vec![0; 0x10000];
            for _ in 0..rounds {
                w.process_all();
                let _ = w.socket_interest();
                while matches!(host.read(&mut sink), Ok(n) if n > 0) {}
            }
            // Still alive: a valid transmit chain goes through, provided the
            // ring itself is sane again (the driver owns it).
            g.write(0x1_1000, b"end");
            g.repost(TX, w.q.queues[TX].next_avail(), 0, (0x1_1000, 3, 0));
            w.host_write_closed = false;
            w.tx_pending = None;
            w.process_all();
            host.set_nonblocking(false).unwrap();
            host.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            let mut end = [0u8; 3];
            host.read_exact(&mut end).unwrap();
            prop_assert_eq!(&end, b"end");
        }
    }
}
