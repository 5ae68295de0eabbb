//! The device side of a device's queues, as its worker thread serves them:
//! what the console and the network card share.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use virtio_queue::desc::split::Descriptor;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::EventFd;

use super::state::QueueSnapshot;
use super::{ActiveQueue, DeviceError, Interrupt, Mem};

/// `N` queues with the guest memory they live in and the device's
/// interrupt; remembers which queues got used buffers since the guest was
/// last told.
pub struct DeviceQueues<const N: usize> {
    pub mem: Mem,
    pub interrupt: Arc<Interrupt>,
    pub queues: [Queue; N],
    used: [bool; N],
    /// The device's name in logs ("virtio-net", ...).
    name: &'static str,
}

impl<const N: usize> DeviceQueues<N> {
    pub fn new(
        name: &'static str,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: [Queue; N],
    ) -> DeviceQueues<N> {
        DeviceQueues {
            mem,
            interrupt,
            queues,
            used: [false; N],
            name,
        }
    }

    /// Splits an activation's queues into the rings and, in queue order,
    /// the eventfds their notifications arrive on.
    pub fn split(queues: Vec<ActiveQueue>) -> Result<([Queue; N], Vec<EventFd>), DeviceError> {
        let (queues, notify): (Vec<Queue>, Vec<EventFd>) =
            queues.into_iter().map(|q| (q.queue, q.notify)).unzip();
        let queues: [Queue; N] =
            queues
                .try_into()
                .map_err(|q: Vec<Queue>| DeviceError::QueueCount {
                    got: q.len(),
                    want: N,
                })?;
        Ok((queues, notify))
    }

    /// Every queue's state, by queue index (for a snapshot, on the
    /// worker's thread while it is parked).
    pub fn capture(&self) -> Vec<QueueSnapshot> {
        self.queues.iter().map(|q| q.state().into()).collect()
    }

    /// Interrupts the guest if a queue got used buffers and the driver
    /// wants to hear of it (event index or flags).
    pub fn signal_used(&mut self) {
        let mut signal = false;
        for q in 0..N {
            if std::mem::take(&mut self.used[q]) {
                signal |= self.queues[q].needs_notification(&self.mem).unwrap_or(true);
            }
        }
        if signal {
            self.interrupt.signal_used_queue();
        }
    }

    /// Whether the driver made buffers available on queue `q`.
    pub fn has_avail(&self, q: usize) -> bool {
        let queue = &self.queues[q];
        queue.ready()
            && queue
                .avail_idx(&self.mem, Ordering::Acquire)
                .is_ok_and(|idx| idx.0 != queue.next_avail())
    }

    /// The next available chain of queue `q`: its head and descriptors (the
    /// chain iterator stops loops: at most the table's size).
    pub fn pop(&mut self, q: usize) -> Option<(u16, Vec<Descriptor>)> {
        let queue = &mut self.queues[q];
        if !queue.ready() {
            return None;
        }
        let chain = queue.pop_descriptor_chain(&self.mem)?;
        let head = chain.head_index();
        Some((head, chain.collect()))
    }

    /// Gives chain `head` of queue `q` back with `len` bytes written.
    pub fn add_used(&mut self, q: usize, head: u16, len: usize) {
        let len = u32::try_from(len).unwrap_or(u32::MAX);
        match self.queues[q].add_used(&self.mem, head, len) {
            Ok(()) => self.used[q] = true,
            Err(e) => {
                tracing::debug!(device = self.name, queue = q, head, error = %e, "add_used failed")
            }
        }
    }

    /// Adds several used elements and makes them visible to the driver at
    /// once: the elements are written first, the index last (add_used's
    /// release store orders them).
    pub fn add_used_batch(&mut self, q: usize, used: &[(u16, usize)]) {
        let Some((&(last, last_len), rest)) = used.split_last() else {
            return;
        };
        let queue = &mut self.queues[q];
        let start = queue.next_used();
        let size = queue.size().max(1);
        for (i, &(head, len)) in rest.iter().enumerate() {
            let slot = start.wrapping_add(i as u16) % size;
            let len = u32::try_from(len).unwrap_or(u32::MAX);
            let elem = u64::from(head) | (u64::from(len) << 32);
            let addr = queue
                .used_ring()
                .checked_add(4 + 8 * u64::from(slot))
                .map(GuestAddress);
            if addr.is_none_or(|a| self.mem.write_obj(elem.to_le(), a).is_err()) {
                tracing::debug!(
                    device = self.name,
                    queue = q,
                    "writing a used element failed"
                );
            }
        }
        queue.set_next_used(start.wrapping_add(rest.len() as u16));
        self.add_used(q, last, last_len);
    }
}
