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
//! A share is captured for a snapshot only while the guest has not
//! mounted it (no FUSE session: no INIT, or a DESTROY since); its state is
//! then its queues and a flag, and a restore serves whatever directory
//! the caller gives [`Fs::new`]. A mounted share is refused, saying why:
//! the server's inodes and handles are host descriptors a snapshot cannot
//! carry yet.

mod ledger;
mod queue;
mod share;
#[cfg(test)]
mod tests;

pub use queue::process_queue;
pub use share::ShareFs;

use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
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
    server: Option<Server<ShareFs>>,
    /// The server's FUSE session flag ([`ShareFs::session`]).
    session: Arc<AtomicBool>,
    worker: Option<JoinHandle<()>>,
}

/// The device's own state in a snapshot: it is captured only while no
/// FUSE session exists, so all there is to say is that (one byte, 0).
const NO_SESSION: u8 = 0;

impl Fs {
    /// A device the guest mounts as `mount -t virtiofs TAG`, serving
    /// `shared_dir` (refusing every modification when `readonly`).
    pub fn new(tag: &str, shared_dir: &Path, readonly: bool) -> Result<Fs, FsError> {
        let config = config_space(tag)?;
        if let Err(e) = raise_nofile_limit() {
            tracing::debug!(tag, error = %e, "virtio-fs: RLIMIT_NOFILE stays as it is");
        }
        let share = ShareFs::new(shared_dir, readonly)?;
        let session = share.session();
        Ok(Fs {
            tag: tag.to_owned(),
            config,
            server: Some(Server::new(share)),
            session,
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

    /// A share is captured only while the guest has not mounted it (the
    /// worker refuses otherwise): its queues and this flag are all. A
    /// restore builds the device over whatever share directory the caller
    /// gives [`Fs::new`].
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(vec![NO_SESSION])
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        if state != [NO_SESSION] {
            return bad(
                "device",
                format!(
                    "{state:?}: a virtio-fs state is [{NO_SESSION}] (captured with no FUSE session)"
                ),
            );
        }
        Ok(())
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
            self.session.clone(),
        );
        let name = format!("virtio-fs-{}", self.tag);
        self.worker = Some(spawn_pausable(
            name,
            worker,
            notify,
            activation.stop,
            activation.pause,
        )?);
        Ok(())
    }
}
