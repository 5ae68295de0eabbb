//! virtio-fs (virtio spec 5.11): a host directory shared with the guest,
//! served in-process by fuse-backend-rs's passthrough filesystem.
//!
//! Queues: 0 = hiprio (FORGET, BATCH_FORGET), 1 = the one request queue.
//! No virtio feature bits, no DAX window (SETUPMAPPING is refused).
//!
//! All the queue logic is [`process_queue`], a plain function over the FUSE
//! server, a queue and guest memory that tests drive directly; the
//! `virtio-fs-TAG` thread is the one loop of [`crate::virtio::worker`].
//!
//! Here is the device the transport sees; `queue.rs` the way from the
//! queues to the FUSE server; [`ShareFs`] (`share.rs`) the filesystem the
//! guest sees, the security boundary, whose module doc says what holds
//! against a hostile guest; `ledger.rs` the host descriptors the guest
//! pins.
//!
//! A share is captured for a snapshot with its queues and, once the guest
//! has mounted it, the file server's state (`checkpoint.rs`: the nodes and
//! handles the guest holds, by path beneath the share's root); a restore
//! rebuilds that over whatever directory the caller gives [`Fs::new`]
//! (the same content, possibly another copy of it). Unmounted, the state
//! is one byte.

mod checkpoint;
mod ledger;
mod queue;
mod share;
#[cfg(test)]
mod tests;

pub use checkpoint::{CheckpointError, FsState, HandleState, NodeState, NO_SESSION, STATE_VERSION};
pub use queue::process_queue;
pub use share::ShareFs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread::JoinHandle;

use fuse_backend_rs::api::server::Server;

use crate::virtio::state::{bad, StateError};
use crate::virtio::worker::spawn_pausable;
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, VirtioDevice, TYPE_FS,
};
use ledger::raise_nofile_limit;
use queue::Worker;

/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 1024;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Longest tag the configuration space holds.
pub const TAG_MAX_LEN: usize = 36;

/// Configuration space: `tag[36]` + `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
const NUM_REQUEST_QUEUES: u32 = 1;

/// Errors setting up a share.
#[derive(Debug, thiserror::Error)]
pub enum FsError {
    #[error("virtio-fs tag {0:?}: it must be 1 to {TAG_MAX_LEN} bytes, without NUL")]
    InvalidTag(String),
    #[error("shared directory {path}: {err}")]
    SharedDir { path: PathBuf, err: io::Error },
    #[error("shared directory {0} is not a directory")]
    NotADirectory(PathBuf),
    #[error("shared directory {0}: the path is not UTF-8, which the passthrough backend needs")]
    UnsupportedPath(PathBuf),
    #[error("serving {path}: {err}")]
    Backend { path: PathBuf, err: io::Error },
}

/// The virtio-fs device of one share.
pub struct Fs {
    tag: String,
    config: [u8; CONFIG_LEN],
    server: Option<Server<Arc<ShareFs>>>,
    /// The server's filesystem, for a capture or a restore while no worker
    /// holds the server.
    share: Arc<ShareFs>,
    /// A worker was started: it captures the share, not this.
    activated: bool,
    worker: Option<JoinHandle<()>>,
}

impl Fs {
    /// A device the guest mounts as `mount -t virtiofs TAG`, serving
    /// `shared_dir` (refusing every modification when `readonly`).
    pub fn new(tag: &str, shared_dir: &Path, readonly: bool) -> Result<Fs, FsError> {
        let config = config_space(tag)?;
        if let Err(e) = raise_nofile_limit() {
            tracing::debug!(tag, error = %e, "virtio-fs: RLIMIT_NOFILE stays as it is");
        }
        let share = Arc::new(ShareFs::new(shared_dir, readonly)?);
        Ok(Fs {
            tag: tag.to_owned(),
            config,
            server: Some(Server::new(share.clone())),
            share,
            activated: false,
            worker: None,
        })
    }

    pub fn tag(&self) -> &str {
        &self.tag
    }

    /// The worker thread, once activated (it exits when the VM's stop
    /// event becomes readable).
    pub fn take_worker(&mut self) -> Option<JoinHandle<()>> {
        self.worker.take()
    }
}

fn config_space(tag: &str) -> Result<[u8; CONFIG_LEN], FsError> {
    let bytes = tag.as_bytes();
    if bytes.is_empty() || bytes.len() > TAG_MAX_LEN || bytes.contains(&0) {
        return Err(FsError::InvalidTag(tag.to_owned()));
    }
    let mut c = [0u8; CONFIG_LEN];
    c[..bytes.len()].copy_from_slice(bytes);
    c[TAG_MAX_LEN..].copy_from_slice(&NUM_REQUEST_QUEUES.to_le_bytes());
    Ok(c)
}

impl VirtioDevice for Fs {
    fn device_type(&self) -> u32 {
        TYPE_FS
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data)
    }

    /// The share's state (`checkpoint.rs`) when no worker serves it; a
    /// running worker captures it itself, parked, and its report replaces
    /// this (so this is then empty, never read).
    fn save_state(&self) -> Option<Vec<u8>> {
        if self.activated {
            return Some(Vec::new());
        }
        match self.share.capture() {
            Ok(state) => Some(state),
            Err(e) => {
                let e = krun_hypervisor::error_chain(&e);
                tracing::warn!(
                    tag = self.tag,
                    error = e,
                    "virtio-fs: the share cannot be captured"
                );
                None
            }
        }
    }

    /// Rebuilds the captured share over this device's directory (on the
    /// set-up thread, before the guest runs).
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        self.share
            .rebuild(state)
            .or_else(|e| bad("device", krun_hypervisor::error_chain(&e)))
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the server in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let server = self.server.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other(
                "the virtio-fs device was already activated",
            ))
        })?;
        let worker = Worker::new(
            self.tag.clone(),
            server,
            activation.mem,
            activation.interrupt,
            queues,
            self.share.clone(),
        );
        let name = format!("virtio-fs-{}", self.tag);
        self.worker = Some(spawn_pausable(
            name,
            worker,
            notify,
            activation.stop,
            activation.pause,
        )?);
        self.activated = true;
        Ok(())
    }
}
