//! virtio-net (virtio spec 5.1) over a tap device: one receiveq, one
//! transmitq, a MAC address in the configuration space, checksum and TCP
//! segmentation offloads when the tap carries virtio-net headers.
//!
//! The guest's side of every buffer starts with a 12-byte `struct
//! virtio_net_hdr` (the virtio 1.x layout, `num_buffers` included). Two
//! kinds of tap:
//!
//! - `IFF_VNET_HDR` (what krun-oci opens): the tap reads and writes the
//!   same header in front of every frame (its size set to 12 with
//!   `TUNSETVNETHDRSZ`), so headers pass through untouched, as in
//!   Firecracker and QEMU. The device then offers checksum offload and TSO
//!   both ways (`CSUM`, `GUEST_CSUM`, `HOST_TSO4/6`, `GUEST_TSO4/6`): the
//!   guest sends 64 KiB segments with partial checksums, the host kernel
//!   finishes them (or hands them on as GSO packets), and the tap is told
//!   with `TUNSETOFFLOAD` which of those the guest takes, so that the
//!   kernel segments and checksums only what the guest cannot.
//!   The host kernel validates every header the guest writes
//!   (`virtio_net_hdr_to_skb`); a bad one makes the write fail and the
//!   frame is dropped.
//! - without it: what is read from or written to the tap is exactly one
//!   Ethernet frame; the device strips the header on the transmit path and
//!   writes a zeroed one (no checksum to complete, no GSO, `num_buffers` 1)
//!   in front of every received frame, and offers no offloads.
//!
//! Queues: 0 = receiveq (host -> guest), 1 = transmitq (guest -> host).
//!
//! Transmit: on a notification, each available chain is gathered (its
//! readable descriptors, in order), the header dropped and the frame
//! written to the tap with one write(2). A chain that is not a well-formed
//! frame (a write-only descriptor, memory outside the guest's, shorter than
//! the header, longer than any frame) is completed without sending
//! anything, as a NIC drops a bad frame.
//!
//! Receive: the tap is watched (epoll, level-triggered) only while the
//! guest has receive buffers available and no frame is waiting for one; a
//! frame read is held until a buffer takes it, so the device never spins
//! on a readable tap it cannot empty, and never drops a frame for want of
//! buffers (the tap's own queue holds the rest, and drops as a NIC would).
//! With `VIRTIO_NET_F_MRG_RXBUF` (offered, and what Linux takes) a frame
//! spreads over as many receive chains as it needs, `num_buffers` saying
//! how many; the device holds the chains it popped until a frame fills
//! them, and publishes a frame's used elements at once (the driver reads
//! them all on seeing the first). Without it every frame goes into a
//! single chain, and a frame bigger than the guest's buffers is dropped
//! (Linux posts buffers for an MTU of 1500 then).
//!
//! Every descriptor chain comes from the guest and is treated as hostile:
//! direction flags and guest memory ranges are checked, chain length (and
//! loops) are bounded by virtio-queue's iterator, nothing panics on guest
//! data.
//!
//! As in the console, the device logic is in [`Worker`], plain methods
//! that tests drive directly; the `virtio-net` thread is the one loop of
//! [`crate::virtio::worker`].

use std::fs::File;
use std::io::{self, Read, Write};
use std::mem::{offset_of, size_of};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::{self, virtio_net_hdr_v1};
use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemory};
use vmm_sys_util::epoll::EventSet;

use crate::virtio::worker::{self, QueueHandler};
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, Interrupt, Mem, VirtioDevice,
    TYPE_NET,
};

/// A feature bit as the driver sees it.
const fn feature(bit: u32) -> u64 {
    1 << bit
}

/// Feature bit: the device takes frames with partial checksums.
pub const VIRTIO_NET_F_CSUM: u64 = feature(virtio_net::VIRTIO_NET_F_CSUM);
/// Feature bit: the driver takes frames with partial checksums.
pub const VIRTIO_NET_F_GUEST_CSUM: u64 = feature(virtio_net::VIRTIO_NET_F_GUEST_CSUM);
/// Feature bit: the configuration space holds the MAC address.
pub const VIRTIO_NET_F_MAC: u64 = feature(virtio_net::VIRTIO_NET_F_MAC);
/// Feature bits: the driver takes TCP segments bigger than the MTU.
pub const VIRTIO_NET_F_GUEST_TSO4: u64 = feature(virtio_net::VIRTIO_NET_F_GUEST_TSO4);
pub const VIRTIO_NET_F_GUEST_TSO6: u64 = feature(virtio_net::VIRTIO_NET_F_GUEST_TSO6);
/// Feature bits: the device takes TCP segments bigger than the MTU.
pub const VIRTIO_NET_F_HOST_TSO4: u64 = feature(virtio_net::VIRTIO_NET_F_HOST_TSO4);
pub const VIRTIO_NET_F_HOST_TSO6: u64 = feature(virtio_net::VIRTIO_NET_F_HOST_TSO6);
/// The offloads offered over a tap that carries virtio-net headers.
pub const OFFLOAD_FEATURES: u64 = VIRTIO_NET_F_CSUM
    | VIRTIO_NET_F_GUEST_CSUM
    | VIRTIO_NET_F_GUEST_TSO4
    | VIRTIO_NET_F_GUEST_TSO6
    | VIRTIO_NET_F_HOST_TSO4
    | VIRTIO_NET_F_HOST_TSO6;
/// Feature bit: a received frame may span several receive buffers.
pub const VIRTIO_NET_F_MRG_RXBUF: u64 = feature(virtio_net::VIRTIO_NET_F_MRG_RXBUF);

/// Maximum size of each of the device's queues.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Number of queues: receiveq, transmitq.
pub const NUM_QUEUES: usize = 2;

/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;

/// `struct virtio_net_hdr` with `num_buffers` (virtio 1.x): 12 bytes.
pub const NET_HDR_LEN: usize = size_of::<virtio_net_hdr_v1>();
/// Where `num_buffers` (le16) sits in the header.
const NUM_BUFFERS: usize = offset_of!(virtio_net_hdr_v1, num_buffers);
/// The largest frame a tap gives or takes: a 64 KiB IP packet plus an
/// Ethernet header with a VLAN tag.
pub const MAX_FRAME_LEN: usize = 65535 + 18;

/// Errors making a device.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("{0:?} is not a MAC address (aa:bb:cc:dd:ee:ff)")]
    Mac(String),
    #[error("setting up the tap's virtio-net headers: {0}")]
    Tap(io::Error),
}

/// Parses "aa:bb:cc:dd:ee:ff".
pub fn parse_mac(s: &str) -> Result<[u8; 6], NetError> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut mac {
        let p = parts.next().ok_or_else(|| NetError::Mac(s.into()))?;
        if p.len() != 2 || !p.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(NetError::Mac(s.into()));
        }
        *b = u8::from_str_radix(p, 16).map_err(|_| NetError::Mac(s.into()))?;
    }
    if parts.next().is_some() {
        return Err(NetError::Mac(s.into()));
    }
    Ok(mac)
}

/// The virtio-net device.
pub struct Net {
    mac: [u8; 6],
    tap: Option<OwnedFd>,
    /// The tap reads and writes virtio-net headers (`IFF_VNET_HDR`).
    vnet_hdr: bool,
    /// ... and takes `TUNSETOFFLOAD`: the offloads are offered.
    offloads: bool,
    acked_features: u64,
    worker: Option<JoinHandle<()>>,
}

impl Net {
    /// A network card with address `mac` whose frames go through `tap` (a
    /// tap without packet information, with or without virtio-net headers;
    /// anything else that is not a tap passes whole frames, as in tests).
    pub fn new(tap: OwnedFd, mac: &str) -> Result<Net, NetError> {
        let mac = parse_mac(mac)?;
        let vnet_hdr = tap_flags(&tap).is_some_and(|f| f & libc::IFF_VNET_HDR != 0);
        let mut offloads = false;
        if vnet_hdr {
            // Headers of the virtio 1.x size, num_buffers included; a tap
            // whose header size is not ours would shift every frame.
            let size = NET_HDR_LEN as libc::c_int;
            // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
            if unsafe { libc::ioctl(tap.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) } != 0 {
                return Err(NetError::Tap(io::Error::last_os_error()));
            }
            // Until the driver says what it takes, the kernel hands over
            // only whole, checksummed frames.
            offloads = set_tap_offloads(&tap, TAP_OFFLOADS).is_ok();
            set_tap_offloads(&tap, 0).map_err(NetError::Tap)?;
        }
        Ok(Net {
            mac,
            tap: Some(tap),
            vnet_hdr,
            offloads,
            acked_features: 0,
            worker: None,
        })
    }

    /// The worker thread, once activated (it exits when the VM's stop
    /// event becomes readable).
    pub fn take_worker(&mut self) -> Option<JoinHandle<()>> {
        self.worker.take()
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        let offloads = if self.offloads { OFFLOAD_FEATURES } else { 0 };
        VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF | offloads
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    /// The configuration space: mac, then (without STATUS, MQ, MTU...)
    /// nothing the driver reads.
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.mac, offset, data)
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the backend in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let tap = self.tap.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other("the network card was already activated"))
        })?;
        set_nonblocking(&tap).map_err(DeviceError::Backend)?;
        if self.offloads {
            set_tap_offloads(&tap, tap_offloads(self.acked_features))
                .map_err(DeviceError::Backend)?;
        }
        let mergeable = self.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let worker = Worker::new(
            activation.mem,
            activation.interrupt,
            queues,
            File::from(tap),
            mergeable,
            self.vnet_hdr,
        );
        let handle = worker::spawn("virtio-net".into(), worker, notify, activation.stop)?;
        self.worker = Some(handle);
        Ok(())
    }
}

/// The `TUNSETOFFLOAD` flags the tap is probed with: checksum offload and
/// TSO for IPv4 and IPv6.
const TAP_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// What the tap may hand the guest, from the features the driver took:
/// partial checksums with GUEST_CSUM, segments bigger than the MTU with
/// GUEST_TSO4/6 (which need GUEST_CSUM).
fn tap_offloads(acked: u64) -> libc::c_uint {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    f
}

/// The tap's flags (`TUNGETIFF`), None when `fd` is not a tap.
fn tap_flags(fd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF as _, &mut req) };
    // SAFETY: TUNGETIFF filled in the flags member of the union.
    (r == 0).then(|| libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
}

fn set_tap_offloads(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD as _,
            flags as libc::c_ulong,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a file descriptor we own; no memory.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Why a chain was not used as it was meant to be.
#[derive(Debug, PartialEq, Eq)]
enum BadChain {
    WrongDirection,
    OutsideMemory,
    TooShort,
    TooLong,
}

/// The device side of the network card: queues and the tap.
#[doc(hidden)] // pub for the fuzz targets (src/fuzz) only
pub struct Worker {
    /// The queues, guest memory and interrupt.
    q: DeviceQueues<NUM_QUEUES>,
    tap: File,
    /// Reading the tap failed for good: nothing more is received.
    tap_dead: bool,
    /// A frame read from the tap, header in front, waiting for a receive
    /// buffer: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: Option<usize>,
    /// The driver negotiated VIRTIO_NET_F_MRG_RXBUF.
    mergeable: bool,
    /// The tap reads and writes the virtio-net header with each frame.
    vnet_hdr: bool,
    /// Mergeable receive chains popped and not used yet: their heads and
    /// writable segments, and how many bytes they hold in all.
    rx_chains: Vec<(u16, Vec<Segment>)>,
    rx_room: usize,
    /// A frame gathered from the guest, header in front.
    tx_buf: Vec<u8>,
    /// Counters, for tests and logs.
    rx_frames: u64,
    tx_frames: u64,
    dropped: u64,
}

impl Worker {
    #[doc(hidden)]
    pub fn new(
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: [Queue; NUM_QUEUES],
        tap: File,
        mergeable: bool,
        vnet_hdr: bool,
    ) -> Worker {
        Worker {
            q: DeviceQueues::new("virtio-net", mem, interrupt, queues),
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
    fn tap_interest(&self) -> EventSet {
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

    /// Tap -> guest: one frame per chain, while the guest has buffers.
    fn process_rx(&mut self) {
        if self.mergeable {
            return self.process_rx_mergeable();
        }
        loop {
            if self.rx_len.is_none() && !(self.q.has_avail(RX) && self.read_frame()) {
                break;
            }
            let Some(len) = self.rx_len else { break };
            let Some((head, descs)) = self.q.pop(RX) else {
                break;
            };
            match scatter(&self.q.mem, &descs, &self.rx_buf[..len]) {
                Ok(()) => {
                    self.rx_len = None;
                    self.rx_frames += 1;
                    self.q.add_used(RX, head, len);
                }
                Err(BadChain::TooShort) => {
                    // A well-formed buffer, only too small for this frame:
                    // the frame is dropped, the buffer stays for the next.
                    tracing::debug!(
                        len,
                        "virtio-net: frame larger than the guest's buffers dropped"
                    );
                    self.rx_len = None;
                    self.dropped += 1;
                    let q = &mut self.q.queues[RX];
                    q.set_next_avail(q.next_avail().wrapping_sub(1));
                }
                Err(e) => {
                    // A hostile chain: given back empty, the frame waits
                    // for the next one.
                    tracing::debug!(reason = ?e, "virtio-net: bad receive chain");
                    self.q.add_used(RX, head, 0);
                }
            }
        }
    }

    /// Tap -> guest with mergeable buffers: each frame over as many chains
    /// as it takes.
    fn process_rx_mergeable(&mut self) {
        loop {
            let room = self.q.has_avail(RX) || !self.rx_chains.is_empty();
            if self.rx_len.is_none() && !(room && self.read_frame()) {
                break;
            }
            let Some(len) = self.rx_len else { break };
            // Gather chains until the frame fits.
            while self.rx_room < len {
                if self.rx_chains.len() >= usize::from(self.q.queues[RX].size()) {
                    // Every buffer the ring can hold is too little.
                    tracing::debug!(
                        len,
                        "virtio-net: frame larger than all the receive buffers dropped"
                    );
                    self.rx_len = None;
                    self.dropped += 1;
                    break;
                }
                let Some((head, descs)) = self.q.pop(RX) else {
                    break;
                };
                match writable_segments(&self.q.mem, &descs) {
                    Ok(segs) => {
                        self.rx_room += segs.iter().map(|s| s.1).sum::<usize>();
                        self.rx_chains.push((head, segs));
                    }
                    Err(e) => {
                        tracing::debug!(reason = ?e, "virtio-net: bad receive chain");
                        self.q.add_used(RX, head, 0);
                    }
                }
            }
            if self.rx_len.is_none() {
                continue;
            }
            if self.rx_room < len {
                // The rest of the frame waits for the driver's next buffers.
                break;
            }
            self.deliver_mergeable(len);
        }
    }

    /// Writes the frame in `rx_buf[..len]` over the held chains (they hold
    /// enough), `num_buffers` set, and publishes them as used.
    fn deliver_mergeable(&mut self, len: usize) {
        let mut used = Vec::new();
        let mut written = 0;
        let mut failed = false;
        for (head, segs) in &self.rx_chains {
            if written == len {
                break;
            }
            let mut in_chain = 0;
            for &(addr, seg_len) in segs {
                let n = seg_len.min(len - written);
                if n == 0 {
                    continue;
                }
                // Checked when the chain was popped; the guest cannot unmap
                // memory, but an error is handled all the same.
                failed |= self
                    .q
                    .mem
                    .write_slice(&self.rx_buf[written..written + n], addr)
                    .is_err();
                written += n;
                in_chain += n;
            }
            used.push((*head, in_chain));
        }
        let count = used.len();
        let num_buffers = u16::try_from(count).unwrap_or(u16::MAX).to_le_bytes();
        if let Some(&(first, _)) = self.rx_chains.first().and_then(|c| c.1.first()) {
            // Every chain's first segment holds a header.
            failed |= first
                .checked_add(NUM_BUFFERS as u64)
                .is_none_or(|a| self.q.mem.write_slice(&num_buffers, a).is_err());
        }
        if failed {
            tracing::debug!("virtio-net: writing a received frame failed");
        }
        self.rx_chains.drain(..count);
        self.rx_room = self.rx_chains.iter().flat_map(|c| &c.1).map(|s| s.1).sum();
        self.rx_len = None;
        self.rx_frames += 1;
        self.q.add_used_batch(RX, &used);
    }

    /// Reads one frame from the tap into `rx_buf`, header in front (the
    /// tap's, or a zeroed one), `num_buffers` 1; false if none came.
    fn read_frame(&mut self) -> bool {
        if self.tap_dead {
            return false;
        }
        let start = if self.vnet_hdr { 0 } else { NET_HDR_LEN };
        loop {
            match self.tap.read(&mut self.rx_buf[start..]) {
                Ok(0) => {
                    tracing::info!("virtio-net: the tap is gone");
                    self.tap_dead = true;
                    return false;
                }
                Ok(n) if start + n <= NET_HDR_LEN => {
                    // A header without a frame: nothing a tap gives.
                    tracing::debug!(len = n, "virtio-net: empty frame from the tap dropped");
                    self.dropped += 1;
                }
                Ok(n) => {
                    if self.vnet_hdr {
                        // The tap leaves num_buffers alone (it is 1 without
                        // mergeable buffers; deliver_mergeable sets it).
                        self.rx_buf[NUM_BUFFERS..NET_HDR_LEN].copy_from_slice(&1u16.to_le_bytes());
                    } else {
                        self.rx_buf[..NET_HDR_LEN].copy_from_slice(&rx_header());
                    }
                    self.rx_len = Some(start + n);
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::info!(error = %e, "virtio-net: reading the tap failed");
                    self.tap_dead = true;
                    return false;
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

    fn on_exit(&mut self) {
        tracing::debug!(
            rx = self.rx_frames,
            tx = self.tx_frames,
            dropped = self.dropped,
            "virtio-net worker done"
        );
    }
}

/// The header in front of every received frame: no flags, no GSO, one
/// buffer.
fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
    h
}

/// Gathers a transmit chain (header and frame) into `out`.
fn gather(mem: &Mem, descs: &[Descriptor], out: &mut Vec<u8>) -> Result<(), BadChain> {
    out.clear();
    for d in descs {
        if d.is_write_only() {
            return Err(BadChain::WrongDirection);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if out.len() + len > NET_HDR_LEN + MAX_FRAME_LEN {
            return Err(BadChain::TooLong);
        }
        if !mem.check_range(d.addr(), len) {
            return Err(BadChain::OutsideMemory);
        }
        let start = out.len();
        out.resize(start + len, 0);
        mem.read_slice(&mut out[start..], d.addr())
            .map_err(|_| BadChain::OutsideMemory)?;
    }
    if out.len() < NET_HDR_LEN {
        return Err(BadChain::TooShort);
    }
    Ok(())
}

/// A writable piece of a receive chain.
type Segment = (GuestAddress, usize);

/// The writable pieces of a mergeable receive chain: every descriptor must
/// be writable and in guest memory, and the first must have room for the
/// header.
fn writable_segments(mem: &Mem, descs: &[Descriptor]) -> Result<Vec<Segment>, BadChain> {
    let mut segs = Vec::with_capacity(descs.len());
    for d in descs {
        if !d.is_write_only() {
            return Err(BadChain::WrongDirection);
        }
        let len = d.len() as usize;
        if len == 0 {
            continue;
        }
        if !mem.check_range(d.addr(), len) {
            return Err(BadChain::OutsideMemory);
        }
        segs.push((d.addr(), len));
    }
    // num_buffers is written into the first segment.
    if segs.first().is_none_or(|s| s.1 < NET_HDR_LEN) {
        return Err(BadChain::TooShort);
    }
    Ok(segs)
}

/// Writes `data` (header and frame) into a receive chain: every descriptor
/// must be writable and in guest memory, and together big enough.
fn scatter(mem: &Mem, descs: &[Descriptor], data: &[u8]) -> Result<(), BadChain> {
    let mut room = 0usize;
    for d in descs {
        if !d.is_write_only() {
            return Err(BadChain::WrongDirection);
        }
        let len = d.len() as usize;
        if len > 0 && !mem.check_range(d.addr(), len) {
            return Err(BadChain::OutsideMemory);
        }
        room = room.saturating_add(len);
    }
    if room < data.len() {
        // Not even room for a header is a broken buffer, not a small one.
        return Err(if room < NET_HDR_LEN {
            BadChain::WrongDirection
        } else {
            BadChain::TooShort
        });
    }
    let mut written = 0;
    for d in descs {
        if written == data.len() {
            break;
        }
        let n = (d.len() as usize).min(data.len() - written);
        if n == 0 {
            continue;
        }
        mem.write_slice(&data[written..written + n], d.addr())
            .map_err(|_| BadChain::OutsideMemory)?;
        written += n;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixDatagram;
    use std::time::Duration;

    use proptest::prelude::*;
    use vmm_sys_util::eventfd::EventFd;

    use crate::virtio::test_utils::*;

    /// Transmits `frame` behind a header, in one descriptor.
    fn send(g: &mut Guest, frame: &[u8]) -> u16 {
        let mut data = vec![0u8; NET_HDR_LEN];
        data.extend_from_slice(frame);
        g.post_out(TX, &data)
    }

    /// A datagram socket pair stands in for the tap: one frame per
    /// datagram, as a tap reads and writes.
    fn tap_pair() -> (File, UnixDatagram) {
        let (dev, host) = UnixDatagram::pair().unwrap();
        dev.set_nonblocking(true).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        (File::from(OwnedFd::from(dev)), host)
    }

    /// A worker without mergeable receive buffers.
    fn worker(mem: &Mem, g: &Guest) -> (Worker, UnixDatagram, Arc<Interrupt>) {
        worker_with(mem, g, false)
    }

    fn worker_with(
        mem: &Mem,
        g: &Guest,
        mergeable: bool,
    ) -> (Worker, UnixDatagram, Arc<Interrupt>) {
        worker_full(mem, g, mergeable, false)
    }

    /// A worker over a "tap" that carries virtio-net headers.
    fn worker_full(
        mem: &Mem,
        g: &Guest,
        mergeable: bool,
        vnet_hdr: bool,
    ) -> (Worker, UnixDatagram, Arc<Interrupt>) {
        let (dev, host) = tap_pair();
        let irq = interrupt();
        let w = Worker::new(
            mem.clone(),
            irq.clone(),
            g.device_queues(),
            dev,
            mergeable,
            vnet_hdr,
        );
        (w, host, irq)
    }

    /// `f` behind the header a mergeable receive gives: `n` buffers.
    fn with_header_n(f: &[u8], n: u16) -> Vec<u8> {
        let mut v = with_header(f);
        v[NUM_BUFFERS..NET_HDR_LEN].copy_from_slice(&n.to_le_bytes());
        v
    }

    fn frame(len: usize, seed: u8) -> Vec<u8> {
        (0..len)
            .map(|i| (i as u8).wrapping_mul(31) ^ seed)
            .collect()
    }

    fn with_header(f: &[u8]) -> Vec<u8> {
        let mut v = rx_header().to_vec();
        v.extend_from_slice(f);
        v
    }

    fn recv(host: &UnixDatagram) -> Vec<u8> {
        let mut buf = vec![0u8; 70_000];
        let n = host.recv(&mut buf).unwrap();
        buf.truncate(n);
        buf
    }

    fn assert_nothing_sent(host: &UnixDatagram) {
        host.set_nonblocking(true).unwrap();
        let mut b = [0u8; 16];
        let r = host.recv(&mut b);
        assert!(
            matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
            "{r:?}"
        );
        host.set_nonblocking(false).unwrap();
    }

    #[test]
    fn device_surface() {
        let (a, _b) = UnixDatagram::pair().unwrap();
        let n = Net::new(OwnedFd::from(a), "02:aB:cd:00:11:ff").unwrap();
        assert_eq!(n.device_type(), 1);
        assert_eq!(n.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 2]);
        assert_eq!(n.features(), VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF);
        let mut cfg = [0xffu8; 10];
        n.read_config(0, &mut cfg);
        assert_eq!(cfg, [0x02, 0xab, 0xcd, 0x00, 0x11, 0xff, 0, 0, 0, 0]);
        let mut tail = [0xffu8; 2];
        n.read_config(4, &mut tail);
        assert_eq!(tail, [0x11, 0xff]);
        n.read_config(u64::MAX, &mut tail);
        assert_eq!(tail, [0, 0]);
    }

    /// A virtio-net header: flags, gso_type, hdr_len, gso_size,
    /// csum_start, csum_offset, num_buffers.
    fn vnet_header(flags: u8, gso_type: u8, gso_size: u16, num_buffers: u16) -> Vec<u8> {
        let mut h = vec![flags, gso_type];
        for v in [54u16, gso_size, 34, 16, num_buffers] {
            h.extend_from_slice(&v.to_le_bytes());
        }
        h
    }

    #[test]
    fn headers_pass_through_a_tap_that_carries_them() {
        for mergeable in [false, true] {
            let mem = memory(0x10_0000);
            let mut g = Guest::new(&mem, NUM_QUEUES);
            let (mut w, host, _irq) = worker_full(&mem, &g, mergeable, true);
            // Transmit: a TSO segment with a partial checksum goes to the
            // tap header and all.
            let seg = frame(20_000, 1);
            let mut data = vnet_header(1, 1, 1448, 0);
            data.extend_from_slice(&seg);
            let a = g.alloc(data.len() as u64);
            g.write(a, &data);
            let h = g.post(TX, &[(a, data.len() as u32, 0)]);
            w.process_all();
            assert_eq!(g.used(TX), vec![(h, 0)]);
            assert_eq!(recv(&host), data, "mergeable: {mergeable}");
            // A header alone is no frame.
            send(&mut g, &[]);
            w.process_all();
            assert_nothing_sent(&host);

            // Receive: the tap's header reaches the guest as it was but for
            // num_buffers, which the tap leaves alone.
            let f = frame(1000, 2);
            let mut from_tap = vnet_header(2, 0, 0, 0xffff);
            from_tap.extend_from_slice(&f);
            host.send(&from_tap).unwrap();
            g.post_in(RX, 1526);
            w.process_all();
            let mut want = vnet_header(2, 0, 0, 1);
            want.extend_from_slice(&f);
            assert_eq!(g.received(RX), vec![want]);
            // A GSO packet of 30000 bytes: over mergeable buffers, or one
            // big buffer (Linux's "big packets" without them).
            let f = frame(30_000, 3);
            let mut from_tap = vnet_header(1, 1, 1448, 0xffff);
            from_tap.extend_from_slice(&f);
            host.send(&from_tap).unwrap();
            let n = if mergeable {
                for _ in 0..8 {
                    g.post_in(RX, 4096);
                }
                8
            } else {
                g.post_in(RX, 40_000);
                1
            };
            w.process_all();
            let mut want = vnet_header(1, 1, 1448, n);
            want.extend_from_slice(&f);
            assert_eq!(g.received(RX).concat(), want, "mergeable: {mergeable}");
            // Something shorter than a header from the tap is dropped.
            host.send(&[0u8; 5]).unwrap();
            g.post_in(RX, 1526);
            w.process_all();
            assert_eq!(w.dropped, 1);
            assert!(g.used(RX).is_empty(), "the buffer stays for a frame");
        }
    }

    #[test]
    fn the_tap_gets_the_offloads_the_driver_took() {
        assert_eq!(tap_offloads(0), 0);
        assert_eq!(tap_offloads(OFFLOAD_FEATURES & !VIRTIO_NET_F_GUEST_CSUM), 0);
        assert_eq!(tap_offloads(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(tap_offloads(OFFLOAD_FEATURES), TAP_OFFLOADS);
        assert_eq!(
            tap_offloads(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
    }

    /// A real tap (the kernel names it; it goes when closed): with
    /// `IFF_VNET_HDR` the offloads are offered, without it not. Needs
    /// /dev/net/tun and CAP_NET_ADMIN, as the runtime does.
    #[test]
    fn offloads_are_offered_over_a_tap_with_headers() {
        for (flags, offered) in [
            (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR, true),
            (libc::IFF_TAP | libc::IFF_NO_PI, false),
        ] {
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("this test needs /dev/net/tun");
            // SAFETY: ifreq is plain data; all zeroes is a valid value.
            let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
            req.ifr_ifru.ifru_flags = flags as libc::c_short;
            // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
            assert_eq!(
                r,
                0,
                "TUNSETIFF (needs CAP_NET_ADMIN): {}",
                io::Error::last_os_error()
            );
            let n = Net::new(OwnedFd::from(tun), "02:00:00:00:00:02").unwrap();
            assert_eq!(n.vnet_hdr, offered);
            assert_eq!(n.features() & OFFLOAD_FEATURES == OFFLOAD_FEATURES, offered);
            assert_eq!(
                n.features() & !OFFLOAD_FEATURES,
                VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF
            );
        }
    }

    #[test]
    fn a_wrong_queue_count_fails_and_keeps_the_tap() {
        let mem = memory(0x10_0000);
        let g = Guest::new(&mem, NUM_QUEUES);
        let (dev, _host) = UnixDatagram::pair().unwrap();
        let mut net = Net::new(OwnedFd::from(dev), "02:00:00:00:00:03").unwrap();
        let [queue, _] = g.device_queues();
        let r = net.activate(activation(
            &mem,
            &interrupt(),
            vec![queue],
            &[eventfd()],
            &eventfd(),
        ));
        assert!(
            matches!(r, Err(DeviceError::QueueCount { got: 1, want: 2 })),
            "{:?}",
            r.err()
        );
        assert!(net.tap.is_some(), "the tap stays for a good activation");
    }

    #[test]
    fn macs_are_parsed_strictly() {
        assert_eq!(
            parse_mac("aa:bb:cc:dd:ee:0f").unwrap(),
            [0xaa, 0xbb, 0xcc, 0xdd, 0xee, 0x0f]
        );
        for bad in [
            "",
            "aa:bb:cc:dd:ee",
            "aa:bb:cc:dd:ee:ff:00",
            "aa:bb:cc:dd:ee:f",
            "aa:bb:cc:dd:ee:fff",
            "aa:bb:cc:dd:ee:gg",
            "aa-bb-cc-dd-ee-ff",
            "+a:bb:cc:dd:ee:ff",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn transmit_strips_the_header() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, irq) = worker(&mem, &g);
        let f1 = frame(60, 1);
        let h1 = send(&mut g, &f1);
        // A frame over three descriptors, the header split across two.
        let f2 = frame(1514, 2);
        let mut data = vec![0xeeu8; NET_HDR_LEN];
        data.extend_from_slice(&f2);
        let (a, b, c) = (g.alloc(5), g.alloc(100), g.alloc(2000));
        g.write(a, &data[..5]);
        g.write(b, &data[5..105]);
        g.write(c, &data[105..]);
        let h2 = g.post(
            TX,
            &[(a, 5, 0), (b, 100, 0), (c, (data.len() - 105) as u32, 0)],
        );
        w.process_all();
        assert_eq!(g.used(TX), vec![(h1, 0), (h2, 0)]);
        assert_eq!(recv(&host), f1);
        assert_eq!(recv(&host), f2);
        assert_nothing_sent(&host);
        assert!(irq.eventfd().read().unwrap() > 0);
        assert_eq!(w.tx_frames, 2);
    }

    #[test]
    fn receive_puts_a_header_in_front() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, irq) = worker(&mem, &g);
        let f = frame(98, 7);
        host.send(&f).unwrap();
        w.process_all();
        assert!(g.used(RX).is_empty(), "no buffer, nothing read");
        assert!(w.tap_interest().is_empty(), "the tap is not watched");
        assert_eq!(w.rx_len, None, "and not read either");

        g.post_in(RX, 1526);
        assert_eq!(w.tap_interest(), EventSet::IN);
        w.process_all();
        let got = g.received(RX);
        assert_eq!(got, vec![with_header(&f)]);
        assert_eq!(
            &got[0][..NET_HDR_LEN],
            &[0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0]
        );
        assert!(irq.eventfd().read().unwrap() > 0);
        assert_ne!(irq.status() & crate::virtio::INT_VRING, 0);

        // A chain of two descriptors: header in one, frame in the other
        // (the layout of Linux without ANY_LAYOUT is also covered).
        let (a, b) = (g.alloc(NET_HDR_LEN as u64), g.alloc(2000));
        g.post(RX, &[(a, NET_HDR_LEN as u32, F_WRITE), (b, 2000, F_WRITE)]);
        let f = frame(1514, 9);
        host.send(&f).unwrap();
        w.process_all();
        assert_eq!(g.received(RX), vec![with_header(&f)]);
        assert_eq!(g.read(b, 4), f[..4]);
    }

    #[test]
    fn frames_wait_for_buffers_in_order() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker(&mem, &g);
        let frames: Vec<_> = (0..5).map(|i| frame(60 + i * 10, i as u8)).collect();
        for f in &frames {
            host.send(f).unwrap();
        }
        g.post_in(RX, 1526);
        g.post_in(RX, 1526);
        w.process_all();
        assert_eq!(
            g.received(RX),
            vec![with_header(&frames[0]), with_header(&frames[1])]
        );
        assert!(w.tap_interest().is_empty());
        for _ in 0..4 {
            g.post_in(RX, 1526);
        }
        w.process_all();
        assert_eq!(
            g.received(RX),
            frames[2..]
                .iter()
                .map(|f| with_header(f))
                .collect::<Vec<_>>()
        );
        assert_eq!(w.tap_interest(), EventSet::IN, "buffers left, tap empty");
    }

    #[test]
    fn a_frame_too_big_for_the_buffers_is_dropped_and_the_buffer_kept() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker(&mem, &g);
        let h = g.post_in(RX, 1526);
        host.send(&frame(4000, 1)).unwrap();
        let small = frame(64, 2);
        host.send(&small).unwrap();
        w.process_all();
        assert_eq!(g.used(RX), vec![(h, (NET_HDR_LEN + small.len()) as u32)]);
        g.used_seen[RX] = 0;
        assert_eq!(g.received(RX), vec![with_header(&small)]);
        assert_eq!(w.dropped, 1);
    }

    #[test]
    fn hostile_transmit_chains_are_dropped() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker(&mem, &g);
        let outside = mem.last_addr().raw_value() + 1;
        let a = g.alloc(0x100);
        g.write(a, &[0u8; 0x100]);
        // Shorter than the header.
        g.post(TX, &[(a, 11, 0)]);
        // A write-only descriptor.
        g.post(TX, &[(a, 12, 0), (a, 20, F_WRITE)]);
        // Outside guest memory, straddling its end, overflowing.
        g.post(TX, &[(a, 12, 0), (outside, 20, 0)]);
        g.post(TX, &[(outside - 4, 20, 0)]);
        g.post(TX, &[(u64::MAX - 2, 16, 0)]);
        // Huge lengths.
        g.post(TX, &[(a, u32::MAX, 0)]);
        g.post(TX, &[(0, 0x8000, 0), (0, 0x8000, 0), (0, 0x8000, 0)]);
        // Only a header: nothing to send, but fine.
        g.post(TX, &[(a, 12, 0)]);
        w.process_all();
        assert_eq!(g.used(TX).len(), 8);
        assert_nothing_sent(&host);
        // A looping chain: 0 -> 1 -> 0 ... is cut by the iterator; what it
        // has read is then far too short or too long, never a hang.
        g.post_loop(TX, a, 1);
        // A head beyond the table.
        g.make_avail(TX, QSIZE + 3);
        w.process_all();
        let _ = g.used(TX);
        let _ = recv_any(&host);
        // Then a good frame goes through.
        let f = frame(100, 3);
        send(&mut g, &f);
        w.process_all();
        assert_eq!(recv(&host), f);
    }

    /// Drains whatever was sent.
    fn recv_any(host: &UnixDatagram) -> Vec<Vec<u8>> {
        host.set_nonblocking(true).unwrap();
        let mut out = Vec::new();
        let mut buf = vec![0u8; 70_000];
        while let Ok(n) = host.recv(&mut buf) {
            out.push(buf[..n].to_vec());
        }
        host.set_nonblocking(false).unwrap();
        out
    }

    #[test]
    fn hostile_receive_chains_are_given_back_empty() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker(&mem, &g);
        let outside = mem.last_addr().raw_value() + 1;
        let r = g.alloc(2000);
        let f = frame(200, 5);
        host.send(&f).unwrap();
        // Read-only, partly read-only, outside memory, straddling the end,
        // no room for even a header, overflowing address.
        let bad = [
            g.post(RX, &[(r, 2000, 0)]),
            g.post(RX, &[(r, 12, F_WRITE), (r + 12, 1000, 0)]),
            g.post(RX, &[(outside, 2000, F_WRITE)]),
            g.post(RX, &[(outside - 100, 2000, F_WRITE)]),
            g.post(RX, &[(r, 4, F_WRITE)]),
            g.post(RX, &[(u64::MAX - 10, 2000, F_WRITE)]),
        ];
        w.process_all();
        assert_eq!(g.used(RX), bad.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
        assert_eq!(w.rx_len, Some(NET_HDR_LEN + f.len()), "the frame waits");
        assert!(w.tap_interest().is_empty());
        g.post_in(RX, 1526);
        w.process_all();
        assert_eq!(g.received(RX), vec![with_header(&f)]);
    }

    #[test]
    fn a_dead_tap_is_not_watched() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker(&mem, &g);
        g.post_in(RX, 1526);
        drop(host);
        w.process_all();
        // A datagram socket whose peer is gone reads EOF as 0 or an error.
        assert!(w.tap_dead || w.tap_interest() == EventSet::IN);
        // Transmitting still completes the chains.
        let h = send(&mut g, &frame(60, 0));
        w.process_all();
        assert_eq!(g.used(TX), vec![(h, 0)]);
    }

    #[test]
    fn mergeable_frames_span_buffers() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, irq) = worker_with(&mem, &g, true);
        // Small frames take one buffer each.
        let f = frame(60, 1);
        host.send(&f).unwrap();
        g.post_in(RX, 1526);
        w.process_all();
        assert_eq!(g.received(RX), vec![with_header_n(&f, 1)]);
        let _ = irq.eventfd().read();

        // A jumbo frame: held until enough buffers came, then over three,
        // their used elements published together.
        let f = frame(4000, 2);
        host.send(&f).unwrap();
        let h1 = g.post_in(RX, 1526);
        w.process_all();
        assert!(g.used(RX).is_empty(), "one buffer is not enough");
        assert!(w.tap_interest().is_empty(), "the frame waits, the tap too");
        assert!(irq.eventfd().read().is_err(), "no interrupt");
        let h2 = g.post_in(RX, 1526);
        let h3 = g.post_in(RX, 1526);
        let h4 = g.post_in(RX, 1526);
        w.process_all();
        let used = g.used(RX);
        assert_eq!(
            used,
            vec![
                (h1, 1526),
                (h2, 1526),
                (h3, (NET_HDR_LEN + 4000 - 2 * 1526) as u32)
            ]
        );
        g.used_seen[RX] = g.used_seen[RX].wrapping_sub(3);
        assert_eq!(g.received(RX).concat(), with_header_n(&f, 3));
        assert!(irq.eventfd().read().unwrap() > 0);
        // The fourth buffer stays for the next frame.
        assert!(w.rx_chains.is_empty());
        assert_eq!(w.tap_interest(), EventSet::IN);
        let f = frame(100, 3);
        host.send(&f).unwrap();
        w.process_all();
        assert_eq!(g.used(RX), vec![(h4, (NET_HDR_LEN + 100) as u32)]);

        // The biggest frame a tap gives, over small buffers.
        let f = frame(MAX_FRAME_LEN, 4);
        host.send(&f).unwrap();
        for _ in 0..QSIZE {
            g.post_in(RX, 8192);
        }
        w.process_all();
        let got = g.received(RX);
        assert_eq!(got.len(), 9);
        assert_eq!(got.concat(), with_header_n(&f, 9));
    }

    #[test]
    fn mergeable_hostile_chains_and_a_frame_bigger_than_the_ring() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker_with(&mem, &g, true);
        let outside = mem.last_addr().raw_value() + 1;
        let r = g.alloc(2000);
        let f = frame(2000, 5);
        host.send(&f).unwrap();
        let bad = [
            g.post(RX, &[(r, 2000, 0)]),
            g.post(RX, &[(r, 100, F_WRITE), (r + 100, 1000, 0)]),
            g.post(RX, &[(outside, 2000, F_WRITE)]),
            g.post(RX, &[(outside - 100, 2000, F_WRITE)]),
            // The header would straddle two descriptors.
            g.post(RX, &[(r, 4, F_WRITE), (r + 4, 2000, F_WRITE)]),
            g.post(RX, &[(r, 0, F_WRITE)]),
            g.post(RX, &[(u64::MAX - 10, 2000, F_WRITE)]),
        ];
        let good = g.post_in(RX, 1526);
        w.process_all();
        assert_eq!(g.used(RX), bad.iter().map(|&h| (h, 0)).collect::<Vec<_>>());
        assert_eq!(w.rx_chains.len(), 1);
        assert!(w.rx_len.is_some(), "the frame waits for more room");
        let good2 = g.post_in(RX, 1526);
        w.process_all();
        assert_eq!(
            g.used(RX),
            vec![(good, 1526), (good2, (NET_HDR_LEN + 2000 - 1526) as u32)]
        );

        // Buffers of 12 bytes: the whole ring holds no frame of 1000 bytes.
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (mut w, host, _irq) = worker_with(&mem, &g, true);
        host.send(&frame(1000, 6)).unwrap();
        for _ in 0..QSIZE {
            g.post_in(RX, NET_HDR_LEN as u32);
        }
        w.process_all();
        assert!(g.used(RX).is_empty());
        assert_eq!(w.dropped, 1);
        assert_eq!(w.rx_len, None);
        // The buffers stay with the device, for smaller frames.
        assert_eq!(w.rx_chains.len(), QSIZE as usize);
    }

    /// The real thing: activation, the worker thread, its eventfds.
    #[test]
    fn worker_thread_serves_notifications_and_stops() {
        let mem = memory(0x10_0000);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let (dev, host) = UnixDatagram::pair().unwrap();
        host.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let mut net = Net::new(OwnedFd::from(dev), "02:00:00:00:00:01").unwrap();
        net.set_acked_features(VIRTIO_NET_F_MAC | crate::virtio::VIRTIO_F_VERSION_1);
        let irq = interrupt();
        let notify: Vec<EventFd> = (0..NUM_QUEUES).map(|_| eventfd()).collect();
        let stop = eventfd();
        let queues = g.device_queues::<NUM_QUEUES>().into();
        net.activate(activation(&mem, &irq, queues, &notify, &stop))
            .unwrap();
        let wait_used = |g: &mut Guest, q: usize| {
            wait_for(&format!("queue {q}"), || {
                let got = g.received(q);
                (!got.is_empty()).then_some(got)
            })
        };

        // A frame before any buffer waits in the tap.
        let f = frame(90, 4);
        host.send(&f).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        g.post_in(RX, 1526);
        notify[RX].write(1).unwrap();
        assert_eq!(wait_used(&mut g, RX), vec![with_header(&f)]);
        // A buffer waiting: the tap wakes the worker.
        g.post_in(RX, 1526);
        notify[RX].write(1).unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let f = frame(1514, 5);
        host.send(&f).unwrap();
        assert_eq!(wait_used(&mut g, RX), vec![with_header(&f)]);

        let out = frame(300, 6);
        send(&mut g, &out);
        notify[TX].write(1).unwrap();
        assert_eq!(recv(&host), out);
        assert_eq!(wait_used(&mut g, TX).len(), 1);
        assert!(irq.eventfd().read().unwrap() > 0);

        stop.write(1).unwrap();
        net.take_worker().unwrap().join().unwrap();
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(128))]
        /// Random descriptor tables, available rings and frames on both
        /// queues: no panic, and afterwards the device still sends and
        /// receives through good chains.
        #[test]
        fn random_rings_never_panic(
            rings in arb_rings(NUM_QUEUES, 0x2_0000),
            frames in proptest::collection::vec(proptest::collection::vec(any::<u8>(), 1..3000), 0..6),
            rounds in 1usize..4,
            mergeable in any::<bool>(),
        ) {
            let mem = memory(0x2_0000);
            let g = Guest::new(&mem, NUM_QUEUES);
            let (mut w, host, _irq) = worker_with(&mem, &g, mergeable);
            for (q, ring) in rings.iter().enumerate() {
                g.load(q, ring);
            }
            for f in &frames {
                let _ = host.send(f);
            }
            for _ in 0..rounds {
                w.process_all();
                let _ = w.tap_interest();
                let _ = recv_any(&host);
            }
            // Still alive: a valid transmit chain goes through, provided the
            // ring itself is sane again (the driver owns it).
            let mut data = vec![0u8; NET_HDR_LEN];
            data.extend_from_slice(b"end");
            g.write(0x1_1000, &data);
            g.repost(TX, w.q.queues[TX].next_avail(), 0, (0x1_1000, data.len() as u32, 0));
            w.process_all();
            prop_assert_eq!(recv(&host), b"end".to_vec());
            // And a frame reaches a good receive buffer (one still held or
            // still in the tap, or a new one), unless held chains took it.
            let held = !w.rx_chains.is_empty();
            g.repost(RX, w.q.queues[RX].next_avail(), 1, (0x1_2000, 4000, F_WRITE));
            host.send(b"in").unwrap();
            w.process_all();
            if !held {
                prop_assert_eq!(g.read(0x1_2000, NET_HDR_LEN), rx_header().to_vec());
            }
        }
    }
}
