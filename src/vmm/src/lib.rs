//! The built-in VMM of krun-oci.
//!
//! It boots the same guest kernel and guest-init as the QEMU backend, on
//! KVM through the rust-vmm crates, inside the runtime's own process: the
//! process whose pid is in the pid file is the VMM, so the workload's exit
//! status is that process's exit status.
//!
//! Layout: [`vm`] builds and runs a VM (KVM, memory, devices, vCPU
//! threads); [`boot`] loads the kernel through its PVH entry; [`cpu`] sets
//! vCPUs up; [`mptable`] describes CPUs and interrupts to a guest without
//! ACPI; [`bus`] dispatches guest I/O; [`virtio`] is the transport and
//! device trait; [`devices`] the virtio devices.

pub mod boot;
pub mod bus;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod process;
pub mod seccomp;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use process::Builtin;
pub use vm::{BuiltinVm, VmmError};

#[cfg(test)]
mod kvm_tests;
