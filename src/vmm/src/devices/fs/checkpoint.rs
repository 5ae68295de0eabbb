//! A mounted share captured for a checkpoint and rebuilt in another VMM
//! process, so that the guest kernel, which holds the old server's node
//! ids and file handles, keeps working (possibly over another directory
//! with the same content, such as a re-created rootfs).
//!
//! What is carried: the FUSE options the guest's kernel offered at INIT
//! (the backend's answer depends on nothing else), and the
//! [ledger](super::ledger): every node the guest holds (its guest id,
//! its lookup count, its file type and its path beneath the share's
//! root) and every open handle (its guest handle, its node and the flags
//! the backend opened it with). The node ids and handles are the share's
//! own ([`ShareFs`] translates them to the backend's), so a rebuild can
//! give back the same ones.
//!
//! Paths come from the backend's `O_PATH` descriptor of each node
//! (readlink of `/proc/self/fd/N`, through fuse-backend-rs's
//! `readlinkat_proc_file`), made relative to the same reading of the
//! root's: the name the host sees now, whatever the guest renamed since
//! its lookup. A node whose descriptor reads as deleted (" (deleted)")
//! or that lies outside the share's root (moved out by the host) fails
//! the capture, naming it: a checkpoint cannot carry it. So does a path
//! that is not UTF-8, and a handle whose node the guest forgot.
//!
//! The state is untrusted when it comes back (a checkpoint directory can
//! be edited). Before anything is opened: a version, lengths and counts
//! (at most [`MAX_DEVICE_STATE`] bytes; nodes and handles within the
//! share's descriptor budget), ids neither 0, the root's nor repeated,
//! known file types, each path one or more components none of which is
//! empty, `.`, `..` or longer than `NAME_MAX`, and each handle's node
//! recorded, of the right type, and its flags ones `host_open_flags`
//! would have produced. Then each path is resolved one component at a
//! time through the share's own LOOKUP from the root (the same
//! `O_NOFOLLOW` walk beneath the backend's `O_PATH` fds a guest gets),
//! every component but the last a directory and the last of the recorded
//! type: a symlink planted in place of a directory stops the walk. Two
//! paths that lead to one file are refused. Each handle is opened again
//! through the share's OPEN or OPENDIR (so a read-only share refuses a
//! writable one). Any failure names the entry and leaves the share as a
//! DESTROY does. The rebuild runs on a thread of its own under the
//! virtio-fs worker's seccomp allowlist, as the root's import does.
//!
//! The rebuilt backend holds each node once, whatever the guest's lookup
//! count: the share tells the backend to forget a node only when the
//! guest's count reaches zero (see the ledger's `forget`).
//!
//! The bytes: one 0 byte for a share with no FUSE session (as before
//! mounted shares could be captured); otherwise the JSON of [`FsState`].

use std::collections::{HashMap, HashSet};
use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::Ordering;

use fuse_backend_rs::abi::fuse_abi::ROOT_ID;
use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};
use serde::{Deserialize, Serialize};

use super::ledger::LiveInode;
use super::share::{host_open_flags, on_import_thread, OpenKind, ShareFs};
use crate::virtio::state::MAX_DEVICE_STATE;

/// The state of a share the guest has not mounted.
pub const NO_SESSION: u8 = 0;
/// The version of [`FsState`] this VMM writes and reads.
pub const STATE_VERSION: u32 = 1;
/// The largest node id or handle a state may name: far beyond any a
/// share hands out, and far from overflowing its counters.
const MAX_ID: u64 = 1 << 48;
/// Linux's NAME_MAX and PATH_MAX.
const NAME_MAX: usize = 255;
const PATH_MAX: usize = 4096;
/// The open(2) flags that only matter at the first open: a rebuild must
/// neither create nor truncate.
const FIRST_OPEN_ONLY: u32 = (libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32;

/// A mounted share's state beyond its queues.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FsState {
    /// [`STATE_VERSION`].
    pub version: u32,
    /// The `FsOptions` bits the guest's kernel offered at INIT.
    pub offered: u64,
    pub nodes: Vec<NodeState>,
    pub handles: Vec<HandleState>,
}

/// A node the guest holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct NodeState {
    /// The guest's node id.
    pub id: u64,
    /// Lookups the guest has not forgotten.
    pub nlookup: u64,
    /// The file type, `S_IFMT` bits.
    pub kind: u32,
    /// Beneath the share's root, components joined by `/`.
    pub path: String,
}

/// A handle the guest holds.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HandleState {
    /// The guest's handle.
    pub fh: u64,
    /// The guest's node id of its file or directory.
    pub node: u64,
    /// The flags the backend opened it with (less `O_CREAT`, `O_EXCL`
    /// and `O_TRUNC`).
    pub flags: u32,
    /// Opened with OPENDIR.
    pub dir: bool,
}

/// Why a share cannot be captured or rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("node {id} ({path}): an open file was deleted: a checkpoint cannot carry it")]
    Deleted { id: u64, path: String },
    #[error("node {id}: {path} is not beneath the share's root {root}")]
    OutsideShare { id: u64, path: String, root: String },
    #[error("node {id}: its path {path} is not UTF-8, which a checkpoint needs")]
    NotUtf8 { id: u64, path: String },
    #[error("node {id}: reading its path")]
    Path {
        id: u64,
        #[source]
        err: io::Error,
    },
    #[error("handle {fh}: its node {node} was forgotten: a checkpoint cannot carry it")]
    Orphan { fh: u64, node: u64 },
    #[error("the share's state is {0} bytes, more than {MAX_DEVICE_STATE}: the guest holds too many files")]
    TooLarge(usize),
    #[error("not a virtio-fs state")]
    Decode(#[source] serde_json::Error),
    #[error("virtio-fs state version {0}; this VMM reads version {STATE_VERSION}")]
    Version(u32),
    #[error("{0}")]
    Invalid(String),
    #[error("{what}")]
    Rebuild {
        what: String,
        #[source]
        err: io::Error,
    },
}

fn invalid<T>(why: String) -> Result<T, CheckpointError> {
    Err(CheckpointError::Invalid(why))
}

impl ShareFs {
    /// The share's state for a checkpoint (the worker serving it parked,
    /// or none started): [`NO_SESSION`] while the guest has not mounted
    /// it, else the JSON of an [`FsState`].
    pub fn capture(&self) -> Result<Vec<u8>, CheckpointError> {
        if !self.session().load(Ordering::SeqCst) {
            return Ok(vec![NO_SESSION]);
        }
        let root_err = |err| CheckpointError::Path { id: ROOT_ID, err };
        let root = self.inner.readlinkat_proc_file(ROOT_ID).map_err(root_err)?;
        let ledger = self.ledger();
        let mut nodes = Vec::with_capacity(ledger.inodes.len());
        for (&id, live) in &ledger.inodes {
            nodes.push(NodeState {
                id,
                nlookup: live.nlookup,
                kind: live.kind,
                path: self.path_of(id, live, &root)?,
            });
        }
        let mut handles = Vec::with_capacity(ledger.handles.len());
        for (&fh, h) in &ledger.handles {
            if h.inode != ROOT_ID && !ledger.inodes.contains_key(&h.inode) {
                return Err(CheckpointError::Orphan { fh, node: h.inode });
            }
            handles.push(HandleState {
                fh,
                node: h.inode,
                flags: h.flags & !FIRST_OPEN_ONLY,
                dir: h.dir,
            });
        }
        drop(ledger);
        nodes.sort_by_key(|n| n.id);
        handles.sort_by_key(|h| h.fh);
        let state = FsState {
            version: STATE_VERSION,
            offered: self.offered(),
            nodes,
            handles,
        };
        let bytes = serde_json::to_vec(&state).map_err(CheckpointError::Decode)?;
        if bytes.len() > MAX_DEVICE_STATE {
            return Err(CheckpointError::TooLarge(bytes.len()));
        }
        Ok(bytes)
    }

    /// The path of the guest's node `id` beneath `root`, as the backend's
    /// descriptor of it reads now.
    fn path_of(&self, id: u64, live: &LiveInode, root: &Path) -> Result<String, CheckpointError> {
        let path = self
            .inner
            .readlinkat_proc_file(live.backend)
            .map_err(|err| CheckpointError::Path { id, err })?;
        let shown = || path.display().to_string();
        if path.as_os_str().as_bytes().ends_with(b" (deleted)") {
            return Err(CheckpointError::Deleted { id, path: shown() });
        }
        let relative = match path.strip_prefix(root) {
            Ok(r) if !r.as_os_str().is_empty() => r,
            _ => {
                return Err(CheckpointError::OutsideShare {
                    id,
                    path: shown(),
                    root: root.display().to_string(),
                })
            }
        };
        match relative.to_str() {
            Some(r) => Ok(r.to_owned()),
            None => Err(CheckpointError::NotUtf8 { id, path: shown() }),
        }
    }

    /// Rebuilds the share `state` describes (a [`ShareFs::capture`]),
    /// before the guest sends anything: its nodes and handles under the
    /// same guest ids, the backend initialised as the guest's INIT did.
    /// The state is untrusted (see the module doc); on failure the share
    /// is left with no session.
    pub fn rebuild(&self, state: &[u8]) -> Result<(), CheckpointError> {
        if state == [NO_SESSION] {
            return Ok(());
        }
        let state = decode(state)?;
        self.validate(&state)?;
        let rebuilt = on_import_thread(|| Ok(self.rebuild_session(&state)))
            .map_err(|err| rebuild_err("starting the rebuild".into(), err))
            .and_then(|r| r);
        if rebuilt.is_err() {
            // The backend drops whatever was rebuilt; the session ends.
            on_import_thread(|| {
                self.destroy();
                Ok(())
            })
            .ok();
        }
        rebuilt
    }

    /// Checks what needs no file: counts, ids, types, names, flags.
    fn validate(&self, state: &FsState) -> Result<(), CheckpointError> {
        if self.session().load(Ordering::SeqCst) || self.live_inodes() + self.open_handles() > 0 {
            return invalid("the share to rebuild into is already in use".into());
        }
        let count = state.nodes.len().saturating_add(state.handles.len());
        if count > self.fd_budget() {
            return invalid(format!(
                "{} nodes and {} handles: more than the {} host descriptors the share may hold",
                state.nodes.len(),
                state.handles.len(),
                self.fd_budget()
            ));
        }
        let mut kinds = HashMap::with_capacity(state.nodes.len());
        kinds.insert(ROOT_ID, libc::S_IFDIR);
        for n in &state.nodes {
            let at = format!("node {}", n.id);
            check_id(n.id, &at)?;
            if n.nlookup == 0 {
                return invalid(format!("{at}: no lookup"));
            }
            if !KINDS.contains(&n.kind) {
                return invalid(format!("{at}: file type {:#o}", n.kind));
            }
            check_path(&n.path).map_err(|why| CheckpointError::Invalid(format!("{at}: {why}")))?;
            if kinds.insert(n.id, n.kind).is_some() {
                return invalid(format!("{at}: the id is given twice"));
            }
        }
        let mut fhs = HashSet::with_capacity(state.handles.len());
        for h in &state.handles {
            let at = format!("handle {}", h.fh);
            if h.fh == 0 || h.fh > MAX_ID {
                return invalid(format!("{at}: the handle is 0 or above {MAX_ID}"));
            }
            if !fhs.insert(h.fh) {
                return invalid(format!("{at}: the handle is given twice"));
            }
            let (want, kind) = if h.dir {
                (libc::S_IFDIR, OpenKind::Dir)
            } else {
                (libc::S_IFREG, OpenKind::File)
            };
            match kinds.get(&h.node) {
                None => return invalid(format!("{at}: node {} is not recorded", h.node)),
                Some(&k) if k != want => {
                    return invalid(format!("{at}: node {} has file type {k:#o}", h.node))
                }
                Some(_) => {}
            }
            if host_open_flags(h.flags, kind).ok() != Some(h.flags)
                || h.flags & FIRST_OPEN_ONLY != 0
            {
                return invalid(format!("{at}: open flags {:#o}", h.flags));
            }
        }
        Ok(())
    }

    /// Initialises the backend, walks every path and opens every handle
    /// (on the import thread).
    fn rebuild_session(&self, state: &FsState) -> Result<(), CheckpointError> {
        let ctx = Context::default();
        let offered = FsOptions::from_bits_truncate(state.offered);
        self.init(offered)
            .map_err(|err| rebuild_err("initialising the share".into(), err))?;
        // Each path's node under the id the walk gave it (temporary).
        let mut walked: HashMap<u64, &NodeState> = HashMap::with_capacity(state.nodes.len());
        for n in &state.nodes {
            let temp = self.walk(&ctx, n)?;
            if let Some(other) = walked.insert(temp, n) {
                return invalid(format!(
                    "nodes {} and {} ({} and {}) are one file",
                    other.id, n.id, other.path, n.path
                ));
            }
        }
        self.relabel(&ctx, &walked);
        for h in &state.handles {
            self.reopen(&ctx, h)?;
        }
        Ok(())
    }

    /// Looks `node`'s path up from the root, one component at a time
    /// through the share's LOOKUP; the id it got.
    fn walk(&self, ctx: &Context, node: &NodeState) -> Result<u64, CheckpointError> {
        let at = |what: &str| format!("node {} ({}): {what}", node.id, node.path);
        let mut parent = ROOT_ID;
        let mut parts = node.path.split('/').peekable();
        while let Some(part) = parts.next() {
            // Checked by validate: no NUL inside.
            let name = CString::new(part).map_err(|_| CheckpointError::Invalid(at("a NUL")))?;
            let entry = self
                .lookup(ctx, parent, &name)
                .map_err(|err| rebuild_err(at(&format!("looking up {part:?}")), err))?;
            let kind = entry.attr.st_mode & libc::S_IFMT;
            let last = parts.peek().is_none();
            if !last && kind != libc::S_IFDIR {
                return invalid(at(&format!(
                    "{part:?} is not a directory (file type {kind:#o})"
                )));
            }
            if last && kind != node.kind {
                return invalid(at(&format!(
                    "the file type is {kind:#o}, the checkpoint's {:#o}",
                    node.kind
                )));
            }
            parent = entry.inode;
        }
        if parent == ROOT_ID {
            return invalid(at("it is the share's root"));
        }
        Ok(parent)
    }

    /// Moves each walked node to its recorded id and lookup count, and
    /// lets go of the directories walked through that the guest did not
    /// hold.
    fn relabel(&self, ctx: &Context, walked: &HashMap<u64, &NodeState>) {
        let mut ledger = self.ledger();
        let temp: Vec<_> = ledger.inodes.drain().collect();
        ledger.by_backend.clear();
        let mut unheld = Vec::new();
        for (id, mut live) in temp {
            match walked.get(&id) {
                Some(n) => {
                    live.nlookup = n.nlookup;
                    ledger.insert_inode_as(n.id, live);
                }
                None => unheld.push((live.backend, u64::MAX)),
            }
        }
        drop(ledger);
        if !unheld.is_empty() {
            self.inner.batch_forget(ctx, unheld);
        }
    }

    /// Opens `h`'s node again with its flags, through OPEN or OPENDIR,
    /// and gives the handle its recorded number.
    fn reopen(&self, ctx: &Context, h: &HandleState) -> Result<(), CheckpointError> {
        let at = || format!("handle {} (node {})", h.fh, h.node);
        let opened = if h.dir {
            self.opendir(ctx, h.node, h.flags).map(|(fh, _)| fh)
        } else {
            self.open(ctx, h.node, h.flags, 0).map(|(fh, _, _)| fh)
        };
        let fh = opened.map_err(|err| rebuild_err(format!("{}: opening it", at()), err))?;
        let Some(fh) = fh else {
            return invalid(format!("{}: the backend gave no handle", at()));
        };
        let mut ledger = self.ledger();
        if let Some(open) = ledger.handles.remove(&fh) {
            ledger.insert_handle_as(h.fh, open);
        }
        Ok(())
    }
}

/// The file types a node may have.
const KINDS: [u32; 7] = [
    libc::S_IFREG,
    libc::S_IFDIR,
    libc::S_IFLNK,
    libc::S_IFCHR,
    libc::S_IFBLK,
    libc::S_IFIFO,
    libc::S_IFSOCK,
];

fn decode(bytes: &[u8]) -> Result<FsState, CheckpointError> {
    if bytes.len() > MAX_DEVICE_STATE {
        return Err(CheckpointError::TooLarge(bytes.len()));
    }
    let state: FsState = serde_json::from_slice(bytes).map_err(CheckpointError::Decode)?;
    if state.version != STATE_VERSION {
        return Err(CheckpointError::Version(state.version));
    }
    Ok(state)
}

fn check_id(id: u64, at: &str) -> Result<(), CheckpointError> {
    if id == 0 || id == ROOT_ID || id > MAX_ID {
        return invalid(format!("{at}: the id is 0, the root's or above {MAX_ID}"));
    }
    Ok(())
}

/// One or more components joined by `/`, none empty, `.`, `..` or longer
/// than NAME_MAX, no NUL, at most PATH_MAX bytes.
fn check_path(path: &str) -> Result<(), String> {
    if path.is_empty() || path.len() > PATH_MAX {
        return Err(format!("a path of {} bytes", path.len()));
    }
    if path.contains('\0') {
        return Err("a NUL in the path".into());
    }
    for part in path.split('/') {
        if part.is_empty() || part == "." || part == ".." || part.len() > NAME_MAX {
            return Err(format!("the path {path:?} has a component {part:?}"));
        }
    }
    Ok(())
}

fn rebuild_err(what: String, err: io::Error) -> CheckpointError {
    CheckpointError::Rebuild { what, err }
}
