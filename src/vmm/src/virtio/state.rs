//! The captured state of a virtio-mmio transport and its device: what a
//! restore needs so that the driver finds the device where it left it and
//! the device continues from the same queue indices.
//!
//! A state is read back from a snapshot file, so it is untrusted:
//! [`TransportState::validate`] bounds every count and length and checks
//! every field a restore relies on, and an error names the field.

use serde::{Deserialize, Serialize};
use virtio_queue::QueueState;

use super::{INT_CONFIG, INT_VRING};

/// The most queues a captured device may have.
pub const MAX_QUEUES: usize = 64;
/// The most bytes of a device's own state: room for a mounted virtio-fs
/// share's nodes and handles, each by path (some ten thousand), and for
/// the console's 64 KiB of host bytes. (The snapshot's JSON spells a byte
/// in up to 4 characters: a few such devices stay within its 16 MiB.)
pub const MAX_DEVICE_STATE: usize = 1024 * 1024;
/// The largest queue virtio allows (split rings).
const MAX_QUEUE_SIZE: u16 = 32768;

/// One queue: as the driver set it up, and where the device is in it.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
pub struct QueueSnapshot {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
    /// The next available ring entry the device takes.
    pub next_avail: u16,
    /// The next used ring entry the device fills.
    pub next_used: u16,
    pub event_idx: bool,
}

impl From<QueueState> for QueueSnapshot {
    fn from(q: QueueState) -> QueueSnapshot {
        QueueSnapshot {
            max_size: q.max_size,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx: q.event_idx_enabled,
        }
    }
}

impl From<QueueSnapshot> for QueueState {
    fn from(q: QueueSnapshot) -> QueueState {
        QueueState {
            max_size: q.max_size,
            next_avail: q.next_avail,
            next_used: q.next_used,
            event_idx_enabled: q.event_idx,
            size: q.size,
            ready: q.ready,
            desc_table: q.desc_table,
            avail_ring: q.avail_ring,
            used_ring: q.used_ring,
        }
    }
}

/// A virtio-mmio transport's registers and queues, and its device's own
/// state.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct TransportState {
    /// The virtio device type, checked against the device restored into.
    pub device_type: u32,
    pub status: u32,
    /// The DriverFeatures register, both words, as the driver last wrote
    /// them.
    pub driver_features: u64,
    /// The features the device was told the driver accepted (at
    /// FEATURES_OK).
    pub acked_features: u64,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub queue_sel: u32,
    pub interrupt_status: u32,
    pub config_generation: u32,
    /// Whether the device was activated (DRIVER_OK seen).
    pub activated: bool,
    /// Whether that activation failed (the device has no worker and
    /// stays failed).
    pub failed: bool,
    pub queues: Vec<QueueSnapshot>,
    /// The device's own state ([`super::VirtioDevice::save_state`]).
    pub device: Vec<u8>,
}

/// A captured state that cannot be restored: which field, and why.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("device state field {field}: {why}")]
pub struct StateError {
    pub field: String,
    pub why: String,
}

pub(crate) fn bad<T>(field: impl Into<String>, why: impl Into<String>) -> Result<T, StateError> {
    Err(StateError {
        field: field.into(),
        why: why.into(),
    })
}

impl TransportState {
    /// Checks what needs no device or memory: counts, lengths, bits,
    /// queue sizes and ring alignments. What the guest may set to anything
    /// (the status and selector registers, the features it wrote) is
    /// taken as it is: a guest must not be able to make its own capture
    /// unrestorable.
    pub fn validate(&self) -> Result<(), StateError> {
        if self.interrupt_status & !(INT_VRING | INT_CONFIG) != 0 {
            return bad(
                "interrupt_status",
                format!("unknown bits in {:#x}", self.interrupt_status),
            );
        }
        if self.queues.len() > MAX_QUEUES {
            return bad(
                "queues",
                format!("{} queues (at most {MAX_QUEUES})", self.queues.len()),
            );
        }
        if self.device.len() > MAX_DEVICE_STATE {
            return bad(
                "device",
                format!("{} bytes (at most {MAX_DEVICE_STATE})", self.device.len()),
            );
        }
        for (i, q) in self.queues.iter().enumerate() {
            q.validate(&format!("queues[{i}]"))?;
        }
        Ok(())
    }
}

impl QueueSnapshot {
    fn validate(&self, at: &str) -> Result<(), StateError> {
        let size_ok = |n: u16| n.is_power_of_two() && n <= MAX_QUEUE_SIZE;
        if !size_ok(self.max_size) {
            return bad(format!("{at}.max_size"), format!("{}", self.max_size));
        }
        if !size_ok(self.size) || self.size > self.max_size {
            return bad(
                format!("{at}.size"),
                format!(
                    "{} (a power of two up to max_size {})",
                    self.size, self.max_size
                ),
            );
        }
        for (name, addr, align) in [
            ("desc_table", self.desc_table, 16),
            ("avail_ring", self.avail_ring, 2),
            ("used_ring", self.used_ring, 4),
        ] {
            if addr % align != 0 {
                return bad(
                    format!("{at}.{name}"),
                    format!("{addr:#x} is not {align}-byte aligned"),
                );
            }
        }
        Ok(())
    }
}
