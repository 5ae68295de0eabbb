//! The checks every chain the guest offers goes through before a byte of a
//! frame is copied: direction, guest memory, size. A chain that fails
//! them is a [`BadChain`], never a panic or a partial copy past guest
//! memory.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use super::{MAX_FRAME_LEN, NET_HDR_LEN, NUM_BUFFERS};
use crate::virtio::Mem;

/// Why a chain was not used as it was meant to be.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum BadChain {
    WrongDirection,
    OutsideMemory,
    TooShort,
    TooLong,
}

/// The header in front of every received frame: no flags, no GSO, one
/// buffer.
pub(super) fn rx_header() -> [u8; NET_HDR_LEN] {
    let mut h = [0u8; NET_HDR_LEN];
    h[NUM_BUFFERS..].copy_from_slice(&1u16.to_le_bytes());
    h
}

/// Gathers a transmit chain (header and frame) into `out`.
pub(super) fn gather(mem: &Mem, descs: &[Descriptor], out: &mut Vec<u8>) -> Result<(), BadChain> {
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
pub(super) type Segment = (GuestAddress, usize);

/// The writable pieces of a mergeable receive chain: every descriptor must
/// be writable and in guest memory, and the first must have room for the
/// header.
pub(super) fn writable_segments(mem: &Mem, descs: &[Descriptor]) -> Result<Vec<Segment>, BadChain> {
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
pub(super) fn scatter(mem: &Mem, descs: &[Descriptor], data: &[u8]) -> Result<(), BadChain> {
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
