//! The devices of a krun-oci VM.

pub mod balloon;
pub mod console;
pub mod fs;
pub mod net;
