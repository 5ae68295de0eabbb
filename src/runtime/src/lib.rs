//! krun-oci: an OCI runtime that runs every container in its own microVM.
//!
//! The pipeline of one container:
//! parse args ([`commands`]) -> [`bundle`] -> [`plan`] (pure
//! `Spec -> VmPlan`) -> [`state`] (record it) -> [`monitor`] (the process
//! that owns the VM for its life: [`staging`] composes the share the
//! guest sees, [`session`] boots the VM and creates the container, then
//! the monitor serves `start`, `exec`, `kill`... with [`relay`] carrying
//! stdio and signals until the process exits) -> teardown (the VM and
//! the share gone; the state `stopped` for `delete`, or removed). The
//! commands after `create` reach a running monitor through [`container`].

pub mod api;
pub mod assets;
pub mod backend;
pub mod bundle;
pub mod cgroups;
pub mod commands;
pub mod container;
pub mod error;
pub mod hooks;
pub mod idmap;
pub mod logging;
pub mod monitor;
pub mod mount_points;
pub mod net;
pub mod plan;
pub mod pod;
pub mod relay;
pub mod session;
pub mod staging;
pub mod state;
pub mod template;
pub mod tty;

pub use error::{Error, Result};

use std::sync::OnceLock;
use std::time::Instant;

static START: OnceLock<Instant> = OnceLock::new();

/// Marks the moment the runtime started (call first thing in main).
pub fn mark_start() {
    let _ = START.set(Instant::now());
}

/// When the runtime started.
pub fn started_at() -> Instant {
    *START.get_or_init(Instant::now)
}

/// Milliseconds since the runtime started, for timing logs.
pub fn since_start_ms() -> f64 {
    started_at().elapsed().as_secs_f64() * 1000.0
}
