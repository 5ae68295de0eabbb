//! The built-in VMM of krun-oci.
//!
//! It boots the same guest kernel and guest-init as the QEMU backend, on
//! KVM through the rust-vmm crates, in a process of its own: a child of
//! the monitor (the pid-file process, which reports the workload's exit
//! status) or of the containerd shim, jailed in a mount namespace that
//! holds only the container's share, with the file server's eight
//! capabilities ([`process`]).
//!
//! Layout: [`process`] is that process, both its start
//! ([`Builtin`], the backend) and its `main`; [`vm`] builds and runs a VM
//! (KVM, memory, devices, vCPU threads; in the calling process, as the
//! KVM tests use it); [`boot`] loads the kernel through its PVH entry; [`cpu`] sets
//! vCPUs up; [`mptable`] describes CPUs and interrupts to a guest without
//! ACPI; [`bus`] dispatches guest I/O; [`virtio`] is the transport and
//! device trait; [`devices`] the virtio devices; [`snapshot`] captures a
//! paused VM's state and memory and restores them into a new VM.

pub mod boot;
pub mod bus;
pub mod cpu;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod mptable;
pub mod process;
pub mod seccomp;
pub mod snapshot;
pub mod spawner;
pub mod vcpu;
pub mod virtio;
pub mod vm;

pub use process::Builtin;
pub use vm::{BuiltinVm, VmmError};

#[cfg(test)]
mod capture_kvm_tests;
#[cfg(test)]
mod kvm_tests;
