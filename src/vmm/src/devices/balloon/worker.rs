//! What the `virtio-balloon` thread serves: the three queues, in plain
//! methods that tests and the fuzz target drive without the thread.

use vm_memory::{Bytes, GuestAddress};

use super::release::{release_range, LogLimit};
use super::{BALLOON_PAGE, DEFLATE, INFLATE, NUM_QUEUES, REPORTING};
use crate::virtio::state::QueueSnapshot;
use crate::virtio::worker::QueueHandler;
use crate::virtio::DeviceQueues;

/// Page frame numbers read from one inflate chain at most (Linux sends
/// 256 at a time): bounds the work one chain costs.
pub const MAX_PFNS_PER_CHAIN: u64 = 4096;

/// The device side of the balloon.
#[doc(hidden)] // pub for the fuzz targets (src/fuzz) only
pub struct Worker {
    /// The queues, guest memory and interrupt.
    pub(super) q: DeviceQueues<NUM_QUEUES>,
    log: LogLimit,
    /// Bytes of guest RAM given back to the host since the start.
    released: u64,
}

impl Worker {
    #[doc(hidden)]
    pub fn new(q: DeviceQueues<NUM_QUEUES>) -> Worker {
        Worker {
            q,
            log: LogLimit::new(),
            released: 0,
        }
    }

    /// Bytes of guest RAM given back to the host so far.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Serves every queue as far as it goes, then interrupts the guest if
    /// it needs it.
    #[doc(hidden)]
    pub fn process_all(&mut self) {
        self.process_reporting();
        self.process_inflate();
        self.process_deflate();
        self.q.signal_used();
    }

    /// Releases `[addr, addr + len)`, or logs why not.
    fn release(&mut self, addr: u64, len: u64) {
        match release_range(&self.q.mem, addr, len) {
            Ok(n) => self.released += n,
            Err(e) => self.log.warn("a guest range", &e),
        }
    }

    /// Free page reports: each writable descriptor is a free range.
    pub(super) fn process_reporting(&mut self) {
        while let Some((head, descs)) = self.q.pop(REPORTING) {
            let before = self.released;
            for d in &descs {
                if !d.is_write_only() {
                    self.log
                        .warn("a descriptor", &"read-only on the reporting queue");
                    continue;
                }
                self.release(d.addr().0, u64::from(d.len()));
            }
            tracing::trace!(bytes = self.released - before, "virtio-balloon: report");
            self.q.add_used(REPORTING, head, 0);
        }
    }

    /// Inflation: readable buffers of u32 page frame numbers; runs of
    /// consecutive frames are released in one call.
    pub(super) fn process_inflate(&mut self) {
        while let Some((head, descs)) = self.q.pop(INFLATE) {
            let mut budget = MAX_PFNS_PER_CHAIN;
            let mut run: Option<(u64, u64)> = None;
            for d in &descs {
                if d.is_write_only() {
                    self.log
                        .warn("a descriptor", &"write-only on the inflate queue");
                    continue;
                }
                let count = (u64::from(d.len()) / 4).min(budget);
                budget -= count;
                for i in 0..count {
                    let Some(pfn) = d
                        .addr()
                        .0
                        .checked_add(4 * i)
                        .and_then(|a| self.q.mem.read_obj::<u32>(GuestAddress(a)).ok())
                    else {
                        self.log.warn("a page frame list", &"outside guest memory");
                        break;
                    };
                    let page = u64::from(u32::from_le(pfn)) * BALLOON_PAGE;
                    run = match run {
                        Some((start, len)) if start + len == page => {
                            Some((start, len + BALLOON_PAGE))
                        }
                        Some((start, len)) => {
                            self.release(start, len);
                            Some((page, BALLOON_PAGE))
                        }
                        None => Some((page, BALLOON_PAGE)),
                    };
                }
            }
            if let Some((start, len)) = run {
                self.release(start, len);
            }
            self.q.add_used(INFLATE, head, 0);
        }
    }

    /// Deflation: the guest takes pages back; the host has nothing to do.
    pub(super) fn process_deflate(&mut self) {
        while let Some((head, _)) = self.q.pop(DEFLATE) {
            self.q.add_used(DEFLATE, head, 0);
        }
    }
}

/// The `virtio-balloon` thread: every wake-up serves every queue.
impl QueueHandler for Worker {
    fn serve(&mut self, _notified: &[usize]) {
        self.process_all();
    }

    /// Every chain is done with by the end of a round: nothing is held.
    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        Some(self.q.capture())
    }

    fn on_exit(&mut self) {
        tracing::debug!(
            bytes = self.released,
            "virtio-balloon: guest RAM given back"
        );
    }
}
