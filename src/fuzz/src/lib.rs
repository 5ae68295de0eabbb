//! Helpers shared by krun-oci's fuzz targets (`fuzz_targets/*.rs`).
//!
//! [`ring`] is the driver's side of a virtio split queue, written into
//! guest memory by hand (so that targets control every byte of the
//! descriptor table and rings, and need none of virtio-queue's test
//! helpers); [`fds`] reads the process's descriptor table, for targets
//! whose invariant is "the host opened nothing it should not";
//! [`scratch`] is where targets make their shares and bundles.
#![forbid(unsafe_code)]

pub mod fds;
pub mod ring;
pub mod scratch;
