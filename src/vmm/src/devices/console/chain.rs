//! The console's chains in guest memory: a transmit chain's readable
//! segments, kept until the socket took them all, and the copy of host
//! bytes into a receive chain. Neither reads or writes outside guest
//! memory, whatever the descriptors say.

use virtio_queue::desc::split::Descriptor;
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use crate::virtio::Mem;

/// Bytes moved between guest memory and the socket at a time.
pub(super) const IO_CHUNK: usize = 64 * 1024;

/// A transmit chain being written to the socket: its readable,
/// non-empty descriptors and how far the socket took them.
pub(super) struct TxChain {
    pub(super) head: u16,
    pub(super) segments: Vec<(GuestAddress, usize)>,
    pub(super) segment: usize,
    pub(super) offset: usize,
}

impl TxChain {
    /// Keeps the chain's readable descriptors that lie in guest memory.
    pub(super) fn new(mem: &Mem, head: u16, descs: &[Descriptor]) -> TxChain {
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

    /// The chain's bytes the socket took so far.
    pub(super) fn sent(&self) -> u64 {
        let done: usize = self.segments.iter().take(self.segment).map(|s| s.1).sum();
        (done + self.offset) as u64
    }

    /// Counts the first `n` bytes as taken by the socket (a restored
    /// console, whose old socket took them).
    pub(super) fn skip(&mut self, mut n: u64) {
        while let Some(&(_, len)) = self.segments.get(self.segment) {
            let left = (len - self.offset) as u64;
            if n < left {
                self.offset += n as usize;
                return;
            }
            n -= left;
            self.segment += 1;
            self.offset = 0;
        }
    }
}

/// Writes a prefix of `data` into the chain's writable descriptors, in
/// order; stops at the first one outside guest memory so the count returned
/// (the used length) covers exactly the bytes the guest will find.
pub(super) fn write_chain(mem: &Mem, descs: &[Descriptor], data: &[u8]) -> usize {
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
