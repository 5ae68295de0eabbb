//! VM snapshots: a paused VM's KVM state and guest memory in one file, and
//! a new KVM VM restored from it (issue #15: templates, checkpoint and
//! restore). The built-in VMM writes and restores templates with it
//! (`crate::vm`); the runtime's template manager keeps them.
//!
//! # What is captured
//! - each vCPU ([`VcpuState`]): mp_state, regs, sregs, FPU, xsave and
//!   xcrs (where KVM has them and the guest's xstate fits 4 KiB), debug
//!   registers, the LAPIC (with an in-kernel irqchip), CPUID, the MSRs KVM
//!   lists ([`msrs_to_save`]: KVM_GET_MSR_INDEX_LIST without the x2APIC
//!   range, only those the vCPU reads back) and the vCPU events;
//! - the VM ([`VmState`]): both PICs and the IOAPIC, the PIT, the KVM
//!   clock;
//! - guest memory, every region in order, page-aligned in the file so that
//!   a restore maps it MAP_PRIVATE ([`Loaded::map_memory`]): clones of one
//!   template share its clean pages through the page cache, and what a
//!   clone writes stays its own (copy on write), never reaching the file;
//! - the serial port's registers ([`SerialSnapshot`]);
//! - a [`Header`]: vCPU count, memory size, and the
//!   kernel, initramfs and guest-init hashes as the caller gives them
//!   (opaque strings: the template manager compares them, this module
//!   only carries them).
//!
//! # Order
//! Capture with every vCPU out of KVM_RUN (paused) and [`settle`]d (its
//! last exit completed, so that the value of an `in` is not lost): each
//! vCPU in the order [`VcpuState`] gives (mp_state first, events last),
//! then the VM. The built-in VMM has each parked vCPU do both on its own
//! thread, with vCPU ioctls only ([`CapturePlan`], probed before the
//! threads are confined), and the VM then either ends (a template) or
//! goes on (`BuiltinVm::capture`, for a checkpoint). Restore
//! into a new VM built with the same memory layout and the same irqchip
//! and PIT: memory registered first, then [`VmState::restore`] (irqchip,
//! PIT, the KVM clock: before any vCPU runs), then each vCPU's
//! [`VcpuState::restore`] (CPUID first, MSRs and LAPIC after sregs, events
//! last, then KVM_KVMCLOCK_CTRL), and only then the vCPUs run.
//!
//! - the virtio devices ([`TransportState`], in the order the caller
//!   keeps its transports): each transport's registers (status, features
//!   acked, selectors, interrupt status, config generation), each queue's
//!   set-up and next avail and used indices, and the device's own small
//!   state. The caller pauses every device's worker
//!   ([`crate::virtio::mmio::MmioTransport::pause`]) before capturing,
//!   and restores each with [`crate::virtio::mmio::MmioTransport::restore`]
//!   over the restored memory. Balloon, network card and console (its
//!   buffered bytes and port state; a restored console gets a new host
//!   socket), and a virtio-fs share only while the guest has not mounted
//!   it (a capture of a mounted share is refused).
//!
//! # Not captured yet (the next increment)
//! A mounted virtio-fs share (the file server's open inodes and
//! handles): a snapshot of a VM with a mounted share cannot be taken
//! yet, so the built-in VMM captures templates (booted to the point where
//! guest-init waits for its container, the share not mounted) but not a
//! running container.
//!
//! # Hazards the template manager must handle
//! Clones of one snapshot are identical at the instant of capture: the
//! guest kernel's RNG state (reseed each clone before the workload runs:
//! RNDADDENTROPY + RNDRESEEDCRNG from host entropy, or virtio-rng), the
//! clock (the KVM clock resumes at its captured value; set the guest's
//! wall clock to now), identity (MAC, hostname, machine-id, boot_id) and
//! the KASLR layout, which clones share. The guest TSC continues from its
//! captured value; a restore on a host whose TSC frequency differs beyond
//! calibration noise asks KVM to scale it, and fails if KVM cannot
//! ([`VcpuState::tsc_khz`]).
//!
//! # File format, version [`FORMAT_VERSION`]
//! ```text
//!  0  magic "KRUNSNAP"
//!  8  format version, u32 LE
//! 12  zero, u32
//! 16  state length, u64 LE (at most MAX_STATE_LEN)
//! 24  SHA-256 of bytes 0..24, of the state, then of each block after
//!     the state (the file's 4 KiB pages, the first from the state's end)
//!     that is not all zeros, as its offset (u64 LE) and its bytes, and
//!     last of the file's length (u64 LE): zero pages cost no hashing,
//!     and a reader that skips the file's holes reads only what the
//!     guest wrote
//! 56  the state, JSON (the header, memory regions, vCPUs, VM, devices)
//!     zeros up to the next 4 KiB boundary
//!     guest memory, region after region (zero pages left as holes)
//! ```
//! The file is the runtime's own, but it lives on disk: [`Snapshot::read`]
//! treats it as untrusted. Every length is checked against limits and
//! against the file's size before anything is allocated, the checksum is
//! verified before any state is returned, and a corrupt or foreign file
//! is an error that names what is wrong, never a VM. Version 1 (no
//! device state) is refused as another version.
//!
//! Verifying is a pass over what the guest wrote (the file's data; its
//! holes are zero pages, which the checksum skips): measured here
//! (release build, `tests::snapshot_costs`), 256 MiB with a quarter of its
//! pages written takes ~200 ms to write (64 MiB on disk), ~80 ms to read
//! and verify (~340 and ~230 ms when format 3 hashed every byte), ~25 us
//! to map, ~12-85 ms to fault every page in once from the page cache,
//! ~110-180 ms to copy instead. The checksum, not the
//! mapping, is a template start's cost: a template manager should verify
//! a template once (when it builds or first loads it) and keep it where
//! only root writes, never rewritten, rather than verify it per start.

mod file;
mod pod;
mod serial;
mod vcpu;
mod vmstate;

#[cfg(test)]
pub(crate) mod kvm_tests;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use crate::virtio::state::TransportState;
pub use file::{frame, Loaded, Region, Verify};
pub use serial::{SerialSnapshot, MAX_SERIAL_INPUT};
pub use vcpu::{msrs_to_save, settle, CapturePlan, VcpuState, MAX_MSRS};
pub use vmstate::VmState;

/// The format this module writes and the only one it reads.
/// (2: device state added; 3: the serial port.)
pub const FORMAT_VERSION: u32 = 4;
/// The most vCPUs a snapshot may describe.
pub const MAX_VCPUS: u32 = 256;
/// The most guest memory a snapshot may hold (1 TiB).
pub const MAX_MEMORY: u64 = 1 << 40;
/// The most bytes of state (vCPUs, VM) a snapshot may hold.
pub const MAX_STATE_LEN: u64 = 16 << 20;
/// The most memory regions.
pub const MAX_REGIONS: usize = 16;
/// The most virtio devices.
pub const MAX_DEVICES: usize = 64;
/// The longest hash or name string in the header.
pub const MAX_HEADER_STRING: usize = 256;

/// What the snapshot is of: the template manager's key and the shape a
/// restore must rebuild.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Header {
    pub vcpus: u32,
    pub memory_size: u64,
    /// Hashes of the boot inputs, as the caller computes them.
    pub kernel: String,
    pub initramfs: String,
    pub guest_init: String,
}

/// A VM's state, without its memory (which stays in the file, see
/// [`Loaded`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub header: Header,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// Each virtio-mmio transport, in the caller's order.
    pub devices: Vec<TransportState>,
    /// The serial port's registers, if the VM has one.
    pub serial: Option<SerialSnapshot>,
}

/// Why a snapshot could not be written, read or restored. A read that
/// fails says which check the file failed.
#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{what} {path}")]
    Io {
        what: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("not a krun-oci snapshot (bad magic)")]
    BadMagic,
    #[error("snapshot format version {found}; this runtime reads version {expected}")]
    Version { found: u32, expected: u32 },
    #[error("snapshot truncated: {what}")]
    Truncated { what: String },
    #[error("snapshot checksum mismatch: the file is corrupt")]
    Checksum,
    #[error("snapshot state is not valid JSON of this format")]
    State(#[source] serde_json::Error),
    #[error("snapshot invalid: {what}")]
    Invalid { what: String },
    #[error("{what}")]
    Kvm {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("KVM refused to {op} MSR {index:#x}")]
    Msr { index: u32, op: &'static str },
    #[error("this host cannot restore {0}")]
    Unsupported(&'static str),
    #[error("mapping guest memory from the snapshot")]
    Map(#[source] vm_memory::mmap::MmapRegionError),
}

impl Snapshot {
    /// Checks the shape: counts and lengths against the limits and the
    /// header, every KVM struct's size.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        let h = &self.header;
        if h.vcpus == 0 || h.vcpus > MAX_VCPUS {
            return invalid(format!("{} vCPUs (1 to {MAX_VCPUS})", h.vcpus));
        }
        if self.vcpus.len() != h.vcpus as usize {
            return invalid(format!(
                "the header says {} vCPUs, the state has {}",
                h.vcpus,
                self.vcpus.len()
            ));
        }
        if h.memory_size == 0 || h.memory_size > MAX_MEMORY || !h.memory_size.is_multiple_of(PAGE) {
            return invalid(format!("memory size {:#x}", h.memory_size));
        }
        for (name, s) in [
            ("kernel", &h.kernel),
            ("initramfs", &h.initramfs),
            ("guest_init", &h.guest_init),
        ] {
            if s.len() > MAX_HEADER_STRING {
                return invalid(format!("{name} hash of {} bytes", s.len()));
            }
        }
        for (i, v) in self.vcpus.iter().enumerate() {
            if v.id as usize != i {
                return invalid(format!("vCPU {i} has id {}", v.id));
            }
            v.validate()?;
        }
        self.vm.validate()?;
        if self.devices.len() > MAX_DEVICES {
            return invalid(format!(
                "{} devices (at most {MAX_DEVICES})",
                self.devices.len()
            ));
        }
        for (i, d) in self.devices.iter().enumerate() {
            d.validate()
                .or_else(|e| invalid(format!("devices[{i}]: {e}")))?;
        }
        if let Some(s) = &self.serial {
            s.validate()?;
        }
        Ok(())
    }
}

/// Guest pages, and the alignment of memory in the file.
pub const PAGE: u64 = 4096;

fn invalid<T>(what: String) -> Result<T, SnapshotError> {
    Err(SnapshotError::Invalid { what })
}
