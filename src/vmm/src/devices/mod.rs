//! The devices of a krun-oci VM.
