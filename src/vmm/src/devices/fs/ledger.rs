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
#[derive(Default)]
pub(super) struct Ledger {
    pub(super) inodes: HashMap<u64, LiveInode>,
    pub(super) handles: HashMap<u64, OpenHandle>,
    /// The share root's device (the root is never forgotten, so it is not
    /// in `inodes`).
    pub(super) root_dev: u64,
}

pub(super) struct LiveInode {
    /// Lookups the guest has not yet forgotten.
    pub(super) nlookup: u64,
    /// The host device: a directory on another device than its parent is
    /// announced as a submount.
    pub(super) dev: u64,
}

pub(super) struct OpenHandle {
    pub(super) inode: u64,
    /// The flags the backend recorded at open; every READ and WRITE passes
    /// exactly these, so the backend never changes the descriptor's flags.
    pub(super) flags: u32,
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

    /// Takes `count` lookups off `inode`.
    pub(super) fn forget(&mut self, inode: u64, count: u64) {
        let Some(live) = self.inodes.get_mut(&inode) else {
            return;
        };
        live.nlookup = live.nlookup.saturating_sub(count);
        if live.nlookup == 0 {
            self.inodes.remove(&inode);
        }
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
