//! The built-in VMM of krun-oci.
//!
//! It boots the same guest kernel and guest-init as the QEMU backend, on
//! KVM through the rust-vmm crates, inside the runtime's own process: the
//! process whose pid is in the pid file is the VMM, so the workload's exit
//! status is that process's exit status.

pub mod devices;
pub mod virtio;
