//! What the `virtio-net` thread serves: both queues and the tap, in plain
//! methods that tests and the fuzz targets drive without the thread; the
//! transmit path (one frame per chain, to the tap) is here, the receive
//! path in `rx.rs`.

use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, RawFd};

use vmm_sys_util::epoll::EventSet;

use super::chain::{gather, Segment};
use super::{MAX_FRAME_LEN, NET_HDR_LEN, NUM_QUEUES, RX, TX};
use crate::virtio::state::QueueSnapshot;
use crate::virtio::worker::QueueHandler;
use crate::virtio::DeviceQueues;

/// The device side of the network card: queues and the tap.
#[doc(hidden)] // pub for the fuzz targets (src/fuzz) only
pub struct Worker {
    /// The queues, guest memory and interrupt.
    pub(super) q: DeviceQueues<NUM_QUEUES>,
    pub(super) tap: File,
    /// Reading the tap failed for good: nothing more is received.
    pub(super) tap_dead: bool,
    /// A frame read from the tap, header in front, waiting for a receive
    /// buffer: `rx_buf[..rx_len]`.
    pub(super) rx_buf: Vec<u8>,
    pub(super) rx_len: Option<usize>,
    /// The driver negotiated VIRTIO_NET_F_MRG_RXBUF.
    pub(super) mergeable: bool,
    /// The tap reads and writes the virtio-net header with each frame.
    pub(super) vnet_hdr: bool,
    /// Mergeable receive chains popped and not used yet: their heads and
    /// writable segments, and how many bytes they hold in all.
    pub(super) rx_chains: Vec<(u16, Vec<Segment>)>,
    pub(super) rx_room: usize,
    /// A frame gathered from the guest, header in front.
    pub(super) tx_buf: Vec<u8>,
    /// Counters, for tests and logs.
    pub(super) rx_frames: u64,
    pub(super) tx_frames: u64,
    pub(super) dropped: u64,
}

impl Worker {
    #[doc(hidden)]
    pub fn new(q: DeviceQueues<NUM_QUEUES>, tap: File, mergeable: bool, vnet_hdr: bool) -> Worker {
        Worker {
            q,
            tap,
            tap_dead: false,
            rx_buf: vec![0; NET_HDR_LEN + MAX_FRAME_LEN],
            rx_len: None,
            mergeable,
            vnet_hdr,
            rx_chains: Vec::new(),
            rx_room: 0,
            tx_buf: Vec::with_capacity(NET_HDR_LEN + MAX_FRAME_LEN),
            rx_frames: 0,
            tx_frames: 0,
            dropped: 0,
        }
    }

    /// What the worker needs to hear from the tap.
    pub(super) fn tap_interest(&self) -> EventSet {
        let room = self.q.has_avail(RX) || (self.mergeable && !self.rx_chains.is_empty());
        if !self.tap_dead && self.rx_len.is_none() && room {
            EventSet::IN
        } else {
            EventSet::empty()
        }
    }

    /// Serves both queues as far as they go, then interrupts the guest if
    /// it needs it.
    #[doc(hidden)]
    pub fn process_all(&mut self) {
        self.process_tx();
        self.process_rx();
        self.q.signal_used();
    }

    /// Guest -> tap: one frame per chain.
    fn process_tx(&mut self) {
        while let Some((head, descs)) = self.q.pop(TX) {
            match gather(&self.q.mem, &descs, &mut self.tx_buf) {
                Ok(()) => self.send_frame(),
                Err(e) => {
                    tracing::debug!(reason = ?e, "virtio-net: bad transmit chain dropped");
                    self.dropped += 1;
                }
            }
            self.q.add_used(TX, head, 0);
        }
    }

    /// Writes `tx_buf` to the tap: past its header, or with it when the
    /// tap takes headers.
    fn send_frame(&mut self) {
        if self.tx_buf.len() == NET_HDR_LEN {
            return;
        }
        let frame = if self.vnet_hdr {
            &self.tx_buf[..]
        } else {
            &self.tx_buf[NET_HDR_LEN..]
        };
        loop {
            match self.tap.write(frame) {
                Ok(_) => {
                    self.tx_frames += 1;
                    return;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A full queue or a tap that is down: dropped, as a
                    // NIC would.
                    tracing::trace!(error = %e, "virtio-net: frame not sent");
                    self.dropped += 1;
                    return;
                }
            }
        }
    }
}

/// The `virtio-net` thread: every wake-up serves both queues, and the tap
/// is watched only while a frame read from it can go somewhere.
impl QueueHandler for Worker {
    fn serve(&mut self, _notified: &[usize]) {
        self.process_all();
    }

    fn backend(&self) -> Option<(RawFd, EventSet)> {
        Some((self.tap.as_raw_fd(), self.tap_interest()))
    }

    /// The receive chains held for a frame were the last ones popped:
    /// the restored device takes them again (a frame read and not yet
    /// given to the guest is lost, as a NIC drops one).
    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        let mut queues = self.q.capture();
        let held = u16::try_from(self.rx_chains.len()).ok()?;
        let rx = &mut queues[RX];
        rx.next_avail = rx.next_avail.wrapping_sub(held);
        Some(queues)
    }

    fn on_exit(&mut self) {
        tracing::debug!(
            rx = self.rx_frames,
            tx = self.tx_frames,
            dropped = self.dropped,
            "virtio-net worker done"
        );
    }
}
