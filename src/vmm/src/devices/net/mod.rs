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
//! [`crate::virtio::worker`]. Here is the device the transport sees;
//! `worker.rs` the thread's state and the transmit path, `rx.rs` the
//! receive path, `chain.rs` the checks every guest chain goes through,
//! [`tap`] every ioctl on the tap.

mod chain;
mod rx;
pub mod tap;
#[cfg(test)]
mod tests;
mod worker;

pub use worker::Worker;

use std::fs::File;
use std::io;
use std::mem::{offset_of, size_of};
use std::os::fd::OwnedFd;
use std::thread::JoinHandle;

use virtio_bindings::virtio_net::{self, virtio_net_hdr_v1};

use crate::virtio::state::{bad, StateError};
use crate::virtio::worker::spawn_pausable;
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, VirtioDevice, TYPE_NET,
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
        let vnet_hdr = tap::has_vnet_hdr(&tap);
        let mut offloads = false;
        if vnet_hdr {
            // Headers of the virtio 1.x size, num_buffers included; a tap
            // whose header size is not ours would shift every frame.
            tap::set_vnet_hdr_len(&tap, NET_HDR_LEN).map_err(NetError::Tap)?;
            // Until the driver says what it takes, the kernel hands over
            // only whole, checksummed frames.
            offloads = tap::set_offloads(&tap, tap::PROBE_OFFLOADS).is_ok();
            tap::set_offloads(&tap, 0).map_err(NetError::Tap)?;
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

    /// The MAC address, the whole configuration space.
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.mac.to_vec())
    }

    /// A restored card keeps its own MAC (this VM's) in its configuration
    /// space; the guest's driver keeps the one it read at probe, the
    /// captured one, until the guest changes it (guest-init does, told by
    /// the host: `InterfaceSetup::template_mac`).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state.len() != 6 {
            return bad("device", format!("a MAC of {} bytes", state.len()));
        }
        Ok(())
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the backend in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let tap = self.tap.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other("the network card was already activated"))
        })?;
        tap::set_nonblocking(&tap).map_err(DeviceError::Backend)?;
        if self.offloads {
            tap::set_offloads(&tap, tap::offloads_for(self.acked_features))
                .map_err(DeviceError::Backend)?;
        }
        let mergeable = self.acked_features & VIRTIO_NET_F_MRG_RXBUF != 0;
        let queues = DeviceQueues::new("virtio-net", activation.mem, activation.interrupt, queues);
        let worker = Worker::new(queues, File::from(tap), mergeable, self.vnet_hdr);
        let handle = spawn_pausable(
            "virtio-net".into(),
            worker,
            notify,
            activation.stop,
            activation.pause,
        )?;
        self.worker = Some(handle);
        Ok(())
    }
}
