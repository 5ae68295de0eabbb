//! The host descriptors a guest pins: every inode it holds costs the
//! backend an `O_PATH` descriptor and every open handle one more. The
//! `Ledger` counts them against a budget derived from RLIMIT_NOFILE (see
//! the share's module doc), and remembers each handle's inode and flags.

use std::collections::HashMap;
use std::io;

use fuse_backend_rs::abi::fuse_abi::ROOT_ID;

/// What the guest holds of the backend: every inode it was given an entry
/// for and not yet forgotten, every handle it opened and not yet released.
/// Each costs the backend one host descriptor.
///
/// The ids the guest sees are the ledger's own, not the backend's: node
/// ids and handles are numbered here (the root keeps `ROOT_ID`), and
/// every request's ids are translated to the backend's, one map lookup
/// each. A checkpoint can then rebuild the same guest ids over a new
/// backend, whose own ids differ (they derive from host inode numbers).
/// Both maps are bounded by the descriptor budget.
pub(super) struct Ledger {
    /// By guest node id.
    pub(super) inodes: HashMap<u64, LiveInode>,
    /// The backend's node id -> the guest's: the same host inode looked
    /// up twice keeps one guest id, whose lookups add up.
    pub(super) by_backend: HashMap<u64, u64>,
    /// By guest handle.
    pub(super) handles: HashMap<u64, OpenHandle>,
    /// The share root's device (the root is never forgotten, so it is not
    /// in `inodes`).
    pub(super) root_dev: u64,
    /// The next guest node id and handle handed out: never reused, not
    /// even after DESTROY, so a stale id is never someone else's.
    next_inode: u64,
    next_handle: u64,
}

impl Default for Ledger {
    fn default() -> Ledger {
        Ledger {
            inodes: HashMap::new(),
            by_backend: HashMap::new(),
            handles: HashMap::new(),
            root_dev: 0,
            next_inode: ROOT_ID + 1,
            next_handle: 1,
        }
    }
}

pub(super) struct LiveInode {
    /// The backend's node id.
    pub(super) backend: u64,
    /// Lookups the guest has not yet forgotten.
    pub(super) nlookup: u64,
    /// The host device: a directory on another device than its parent is
    /// announced as a submount.
    pub(super) dev: u64,
    /// The file type (`S_IFMT` bits of the mode) at lookup.
    pub(super) kind: u32,
}

pub(super) struct OpenHandle {
    /// The guest's node id of the inode it was opened on.
    pub(super) inode: u64,
    /// The backend's node id of that inode (kept here: a hostile guest
    /// may forget the inode before it releases the handle).
    pub(super) backend_inode: u64,
    /// The backend's handle.
    pub(super) backend: u64,
    /// The flags the backend recorded at open; every READ and WRITE passes
    /// exactly these, so the backend never changes the descriptor's flags.
    pub(super) flags: u32,
    /// Opened with OPENDIR (released with RELEASEDIR).
    pub(super) dir: bool,
}

impl Ledger {
    pub(super) fn fds(&self) -> usize {
        self.inodes.len() + self.handles.len()
    }

    pub(super) fn dev_of(&self, inode: u64) -> Option<u64> {
        if inode == ROOT_ID {
            Some(self.root_dev)
        } else {
            self.inodes.get(&inode).map(|i| i.dev)
        }
    }

    /// The backend's node id of the guest's `inode`, if the guest holds it.
    pub(super) fn backend_inode(&self, inode: u64) -> Option<u64> {
        if inode == ROOT_ID {
            Some(ROOT_ID)
        } else {
            self.inodes.get(&inode).map(|i| i.backend)
        }
    }

    /// The guest's handle `handle`, if it is one of the guest's `inode`.
    pub(super) fn handle(&self, inode: u64, handle: u64) -> Option<&OpenHandle> {
        self.handles.get(&handle).filter(|h| h.inode == inode)
    }

    /// Records `live` under a new guest node id, which it returns.
    pub(super) fn insert_inode(&mut self, live: LiveInode) -> u64 {
        let id = self.next_inode;
        self.next_inode += 1;
        self.insert_inode_as(id, live);
        id
    }

    /// Records `live` under the guest node id `id` (a rebuilt one).
    pub(super) fn insert_inode_as(&mut self, id: u64, live: LiveInode) {
        self.next_inode = self.next_inode.max(id.saturating_add(1));
        self.by_backend.insert(live.backend, id);
        self.inodes.insert(id, live);
    }

    /// Records `open` under a new guest handle, which it returns.
    pub(super) fn insert_handle(&mut self, open: OpenHandle) -> u64 {
        let fh = self.next_handle;
        self.next_handle += 1;
        self.insert_handle_as(fh, open);
        fh
    }

    /// Records `open` under the guest handle `fh` (a rebuilt one).
    pub(super) fn insert_handle_as(&mut self, fh: u64, open: OpenHandle) {
        self.next_handle = self.next_handle.max(fh.saturating_add(1));
        self.handles.insert(fh, open);
    }

    /// Takes `count` lookups off the guest's `inode`; the backend's id of
    /// it once the guest holds it no more. The backend is then told to
    /// forget it entirely, never before: its own count may differ from
    /// the guest's (a rebuilt share holds each inode once, whatever the
    /// guest's count), and it keeps the inode while the guest does.
    pub(super) fn forget(&mut self, inode: u64, count: u64) -> Option<u64> {
        let live = self.inodes.get_mut(&inode)?;
        live.nlookup = live.nlookup.saturating_sub(count);
        if live.nlookup > 0 {
            return None;
        }
        let backend = live.backend;
        self.inodes.remove(&inode);
        self.by_backend.remove(&backend);
        Some(backend)
    }

    /// Forgets every inode and handle (the backend dropped its own) and
    /// records the root's device; the id counters go on.
    pub(super) fn reset(&mut self, root_dev: u64) {
        self.inodes.clear();
        self.by_backend.clear();
        self.handles.clear();
        self.root_dev = root_dev;
    }
}

/// Descriptors of the VMM's own kept out of the guest's budget.
const FD_RESERVE: u64 = 1024;
/// The budget's ceiling whatever RLIMIT_NOFILE says (Linux's default
/// `fs.nr_open`): it also bounds the ledger's and the backend's maps.
pub(super) const FD_BUDGET_MAX: u64 = 1 << 20;

/// RLIMIT_NOFILE's soft limit less a reserve (half of it when it is under
/// twice the reserve), at most [`FD_BUDGET_MAX`].
pub(super) fn default_fd_budget() -> usize {
    let soft = nofile_limit().map_or(1024, |l| l.rlim_cur);
    let budget = (soft - FD_RESERVE.min(soft / 2)).min(FD_BUDGET_MAX);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

pub(super) fn nofile_limit() -> io::Result<libc::rlimit> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit(2) writes one rlimit, which `limit` is.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(limit)
}

/// Raises RLIMIT_NOFILE's soft limit to the hard one (which needs no
/// privilege): the guest's descriptor budget is derived from it, and a
/// guest that caches a large tree holds one host descriptor per inode.
pub(super) fn raise_nofile_limit() -> io::Result<()> {
    let limit = nofile_limit()?;
    if limit.rlim_cur >= limit.rlim_max {
        return Ok(());
    }
    let raised = libc::rlimit {
        rlim_cur: limit.rlim_max,
        ..limit
    };
    // SAFETY: setrlimit(2) reads one rlimit, which `raised` is.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raised) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
