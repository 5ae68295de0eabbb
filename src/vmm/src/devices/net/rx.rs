//! The receive path: frames read from the tap into the receiveq's
//! chains, one chain per frame, or with mergeable buffers as many as the
//! frame takes (see the module above).

use std::io::{self, Read};

use virtio_queue::QueueT;
use vm_memory::{Address, Bytes};

use super::chain::{rx_header, scatter, writable_segments, BadChain};
use super::worker::Worker;
use super::{NET_HDR_LEN, NUM_BUFFERS, RX};

impl Worker {
    /// Tap -> guest: one frame per chain, while the guest has buffers.
    pub(super) fn process_rx(&mut self) {
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
