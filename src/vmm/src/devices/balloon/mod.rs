//! virtio-balloon (virtio spec 5.5) with free page reporting
//! (`VIRTIO_BALLOON_F_REPORTING`): the guest tells the host which of its
//! pages are free, and the host gives their backing back to the host's
//! kernel (`madvise(MADV_DONTNEED)` on guest RAM, an anonymous private
//! mapping: the next guest access finds a zeroed page).
//!
//! Queues, as Linux 6.1's `virtio_balloon` numbers them over virtio-mmio:
//! the driver asks for inflate, deflate, stats, free_page and reporting but
//! `vm_find_vqs` gives the next index only to the queues it wants, so with
//! the features offered here (no STATS_VQ, no FREE_PAGE_HINT) they are
//! 0 = inflateq, 1 = deflateq, 2 = reporting_vq. A driver that did not
//! negotiate REPORTING leaves queue 2 not ready; the device then never
//! serves it.
//!
//! * inflateq: readable buffers of little-endian u32 page frame numbers
//!   (4 KiB pages); each page in guest RAM is released. The device never
//!   asks for a balloon (num_pages stays 0), so a Linux guest never sends
//!   any; a guest that does only gets its own pages zeroed.
//! * deflateq: the guest takes pages back; nothing to do but return them.
//! * reporting_vq: writable buffers (Linux's `virtqueue_add_inbuf`) whose
//!   descriptors are free guest-physical ranges (2 MiB and up on Linux);
//!   each range is released, rounded inward to whole pages.
//!
//! Every chain is returned with a used length of 0. Every address comes
//! from the guest: a range is released only if it lies entirely inside
//! one region of guest RAM (no overflow, nothing in the MMIO gap);
//! anything else is skipped and logged, rate-limited (`release.rs`).
//! Nothing the guest sends can touch host memory outside guest RAM.
//!
//! The device logic lives in [`Worker`], plain methods that tests and the
//! fuzz target drive; the `virtio-balloon` thread is the one loop of
//! [`crate::virtio::worker`].

mod release;
#[cfg(test)]
mod tests;
mod worker;

pub use release::{release_range, BadRange};
pub use worker::Worker;

use std::thread::JoinHandle;

use crate::virtio::state::{bad, StateError};
use crate::virtio::worker::spawn_pausable;
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, VirtioDevice, TYPE_BALLOON,
};

/// Feature bit: the driver reports free pages on the reporting queue
/// (Linux `VIRTIO_BALLOON_F_REPORTING`, bit 5; virtio-bindings has no
/// balloon header).
pub const VIRTIO_BALLOON_F_REPORTING: u64 = 1 << 5;

/// Maximum size of each queue: Linux refuses a reporting queue smaller
/// than `PAGE_REPORTING_CAPACITY` (32).
pub const QUEUE_MAX_SIZE: u16 = 128;
const _: () = assert!(QUEUE_MAX_SIZE >= 32);

/// Number of queues: inflate, deflate, reporting.
pub const NUM_QUEUES: usize = 3;

/// Queue indices.
pub(crate) const INFLATE: usize = 0;
pub(crate) const DEFLATE: usize = 1;
pub(crate) const REPORTING: usize = 2;

/// The size of a balloon page, whatever the guest's page size.
pub const BALLOON_PAGE: u64 = 4096;

/// Bytes of the configuration space: num_pages, actual.
const CONFIG_LEN: usize = 8;
/// Where `actual` (the driver's count of pages in the balloon) lives.
const ACTUAL: u64 = 4;

/// The virtio-balloon device.
pub struct Balloon {
    /// `actual` as the driver last wrote it.
    actual: u32,
    acked_features: u64,
    worker: Option<JoinHandle<()>>,
}

impl Default for Balloon {
    fn default() -> Self {
        Balloon::new()
    }
}

impl Balloon {
    /// A balloon that never asks the guest for memory and takes back what
    /// the guest reports free.
    pub fn new() -> Balloon {
        Balloon {
            actual: 0,
            acked_features: 0,
            worker: None,
        }
    }

    /// The worker thread, once activated (it exits when the VM's stop
    /// event becomes readable).
    pub fn take_worker(&mut self) -> Option<JoinHandle<()>> {
        self.worker.take()
    }

    /// The configuration space: num_pages (always 0), actual.
    fn config_space(&self) -> [u8; CONFIG_LEN] {
        let mut c = [0u8; CONFIG_LEN];
        c[4..8].copy_from_slice(&self.actual.to_le_bytes());
        c
    }
}

impl VirtioDevice for Balloon {
    fn device_type(&self) -> u32 {
        TYPE_BALLOON
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_BALLOON_F_REPORTING
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config_space(), offset, data)
    }

    /// Only `actual` is the driver's to write (num_pages is the device's);
    /// bytes of it in `data` update it, the rest is ignored.
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let mut actual = self.actual.to_le_bytes();
        for (i, &b) in data.iter().enumerate() {
            let Some(at) = offset.checked_add(i as u64) else {
                break;
            };
            if let Some(slot) = at
                .checked_sub(ACTUAL)
                .and_then(|k| actual.get_mut(usize::try_from(k).ok()?))
            {
                *slot = b;
            }
        }
        self.actual = u32::from_le_bytes(actual);
    }

    /// `actual`, little-endian: all the state beyond the queues.
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(self.actual.to_le_bytes().to_vec())
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        let Ok(actual) = <[u8; 4]>::try_from(state) else {
            return bad(
                "device",
                format!("{} bytes, the balloon's are 4", state.len()),
            );
        };
        self.actual = u32::from_le_bytes(actual);
        Ok(())
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        if self.acked_features & VIRTIO_BALLOON_F_REPORTING == 0 {
            tracing::info!("the guest's virtio-balloon driver refused free page reporting");
        }
        let queues = DeviceQueues::new(
            "virtio-balloon",
            activation.mem,
            activation.interrupt,
            queues,
        );
        let handle = spawn_pausable(
            "virtio-balloon".into(),
            Worker::new(queues),
            notify,
            activation.stop,
            activation.pause,
        )?;
        self.worker = Some(handle);
        Ok(())
    }
}
