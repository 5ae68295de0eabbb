//! The filesystem the guest sees, [`ShareFs`]: the security boundary of
//! virtio-fs.
//!
//! # The guest is untrusted
//!
//! Root in the VM, possibly in control of the guest kernel: every FUSE
//! request is attacker-chosen. What holds:
//!
//! * Confinement. The passthrough backend holds an `O_PATH` fd per inode
//!   the guest knows and resolves every name with `openat(parent_fd, name,
//!   O_PATH | O_NOFOLLOW)`, one component at a time: names containing `/`
//!   are refused (EINVAL), and so are `.` and `..` (ENOENT; the guest
//!   kernel resolves those itself), so even a directory moved out of the
//!   share while the guest holds it leads no further up. A symlink is
//!   looked up as the link itself, never its target: a name under it
//!   fails with ENOTDIR, opening it fails (only regular files and
//!   directories are ever opened, which also keeps device nodes and FIFOs
//!   the guest creates from being opened on the host), and the metadata
//!   calls that go through `/proc/self/fd/N` land on the link (a magic link
//!   is never followed further). A symlink's target is only ever resolved
//!   by the guest kernel, in the guest. The guest never names a host path:
//!   the only absolute path used is the share's root, fixed here
//!   (canonical, so it is not itself a symlink).
//! * No openat2. Where the host has it (Linux 5.6+), `RESOLVE_BENEATH`
//!   would be the kernel's own guarantee; fuse-backend-rs 0.14 does not use
//!   it (it is a TODO there) and this wrapper cannot change how the
//!   backend resolves. What stands in its place is the above: one
//!   component at a time, with `O_NOFOLLOW`, beneath the backend's own
//!   `O_PATH` fds, and `.`/`..` refused here.
//! * Open flags. OPEN, OPENDIR and CREATE pass on only the access mode,
//!   `O_APPEND`, `O_NONBLOCK`, `O_SYNC`/`O_DSYNC`, `O_NOATIME`, `O_TRUNC`,
//!   `O_LARGEFILE`, `O_CLOEXEC`, `O_NOFOLLOW`, `O_DIRECTORY` and `FASYNC`
//!   (plus `O_CREAT`/`O_EXCL` for CREATE), always with `O_NOFOLLOW` and
//!   `O_CLOEXEC` added. `O_DIRECT` and the kernel-internal `__FMODE_EXEC`
//!   and `__FMODE_NONOTIFY` (Linux's FUSE client forwards `f_flags`) are
//!   accepted and dropped; `O_PATH`, `O_TMPFILE`, an invalid access mode
//!   and anything else are EINVAL. (With `O_PATH` the kernel ignores
//!   `O_CREAT | O_EXCL`, so the backend's CREATE followed a symlink the
//!   guest planted and handed out a descriptor of any host file.) CREATE
//!   is always exclusive in the backend; a name that exists, when the guest
//!   did not ask for `O_EXCL`, is looked up and opened as OPEN does.
//! * Descriptors stay owned. [`ShareFs`] records each handle's inode and
//!   the flags the backend opened it with, and READ and WRITE always pass
//!   those flags: when a request's flags differ from the handle's, the
//!   backend calls fcntl(F_SETFL), and when that fails (O_DIRECT where the
//!   filesystem has none, clearing O_APPEND on an append-only file) it
//!   returns having closed the handle's descriptor, whose number the next
//!   host open takes. A handle the guest was not given, or of another
//!   inode, is EBADF. The consequence: flags the guest changes with
//!   fcntl(F_SETFL) after open are not mirrored on the host (an O_APPEND
//!   cleared in the guest still appends on the host; O_NONBLOCK, O_NOATIME
//!   and FASYNC changes are ignored).
//! * Read-only shares. Every request that would modify the share gets EROFS
//!   before the backend sees it; everything that only reads is delegated.
//! * Bounded memory. A request whose header claims fewer bytes than
//!   itself, more than its chain holds or more than Linux ever sends
//!   (`MAX_REQ_PAGES` pages and a page of headers) is refused (EINVAL)
//!   before the server allocates that much for its body, and so is a
//!   BATCH_FORGET counting past its length. Sizes the guest picks are
//!   bounded before they become allocations (xattr and readdir buffers);
//!   FUSE_IOCTL, which the backend does not support, is refused before
//!   the server copies its input.
//! * Bounded descriptors. Every inode the guest holds costs the backend one
//!   `O_PATH` descriptor, every open handle one more. The ledger counts
//!   them (the lookups of each entry LOOKUP, CREATE, MKDIR, MKNOD, SYMLINK,
//!   LINK and READDIRPLUS return, less FORGET and BATCH_FORGET; handles
//!   until RELEASE) against a budget of RLIMIT_NOFILE's soft limit less a
//!   reserve for the VMM's own (1024, or half a limit under 2048; at most
//!   2^20, Linux's default `fs.nr_open`; [`Fs::new`](super::Fs::new) first
//!   raises the soft limit to the hard one): beyond it a new inode or
//!   handle is ENFILE, after undoing the backend's lookup or open. FORGET
//!   is honoured: the backend's node ids are the host's inode numbers
//!   under a (device, mount) index (`use_host_ino`), so it drops its whole
//!   record of a forgotten inode, where its default numbering keeps an
//!   id->node entry for every inode ever seen. The guest never sees those
//!   ids: its node ids and handles are the ledger's own, translated on
//!   every request (an unknown one is EBADF), so that a checkpoint
//!   (`checkpoint.rs`) can rebuild them over another backend; the backend
//!   is told to forget an inode when the guest's count reaches zero. Two limits of that scheme: inode
//!   numbers above 2^47 (overlayfs with xino) get a virtual number whose
//!   small id->node entry stays, and at most 254 (device, mount) pairs can
//!   be served (lookups beyond fail), which the runtime's few bind mounts
//!   per VM are far from. The budget is per share: a process serving
//!   several shares would need one shared budget.
//! * Submounts. A directory whose host device differs from its parent's (a
//!   bind mount of another filesystem in the composed share) is announced
//!   with `FUSE_ATTR_SUBMOUNT` in LOOKUP, READDIRPLUS and MKDIR alike, so
//!   the guest mounts it apart with its own st_dev and its inode numbers
//!   never collide with another filesystem's.
//! * Nothing on the request path panics on guest data, and a bad request
//!   never stops the worker: a chain whose buffers lie outside guest memory
//!   is completed with nothing written; a request the server cannot parse
//!   gets an EIO reply (pre-filled before the server runs, so it stands
//!   whenever the server fails without replying).
//!
//! What was checked in fuse-backend-rs 0.14 (passthrough `sync_io.rs`,
//! `mod.rs`, `util.rs`, `inode_store.rs`; server `sync_io.rs`), beyond the
//! two findings above:
//!
//! * Descriptor ownership: the only borrowed fds wrapped in a `File` are
//!   READ's and WRITE's (WRITE's `seal_size` stat has the same early
//!   return; `seal_size` is off). FLUSH closes a `dup` of its own.
//!   GETATTR, SETATTR, FSYNC, FALLOCATE and LSEEK with a handle check that
//!   it belongs to the inode.
//! * Leaked lookups: CREATE of an existing name looked it up and kept that
//!   lookup when the open then failed (a FIFO, a symlink): a descriptor per
//!   name the guest repeats this on. Closed by the exclusive CREATE above.
//!   READDIRPLUS keeps an entry's lookup when adding it to the reply fails:
//!   forgotten here. Plain READDIR looks each entry up and forgets it.
//! * Symlinks: MKDIR, MKNOD, SYMLINK, UNLINK, RMDIR, RENAME and LINK are
//!   `*at` calls on one validated name under the parent's fd, none of
//!   which follows a final symlink; LINK's source is the inode's own fd
//!   (`AT_EMPTY_PATH`); chown uses `AT_SYMLINK_NOFOLLOW`; chmod, utimes and
//!   the xattr calls go through `/proc/self/fd/N` of the `O_PATH` fd;
//!   truncate and OPEN reopen only regular files and directories (the type
//!   recorded at lookup). INIT and DESTROY import the root again by its
//!   absolute path, which the host chose.
//! * Allocations sized by the guest: message bodies (`len`, bounded above),
//!   BATCH_FORGET (`count`, checked above), getxattr/listxattr and readdir
//!   buffers (bounded here), FUSE_IOCTL's input (refused), readlink
//!   (PATH_MAX).
//! * Not closed: an entry whose reply cannot reach the guest (no room for
//!   it) stays counted, as it stays in the backend; it only uses up the
//!   guest's own budget.
//!
//! What is *not* confined, as with virtiofsd and runc bind mounts: the
//! requests that create files run with the guest's uid/gid (the worker
//! switches its own thread's credentials), so a guest root can create
//! setuid files, device nodes or security xattrs inside the share, which
//! host processes could then use. Unlike virtiofsd there is no
//! mount-namespace sandbox behind the path checks.

use std::ffi::CStr;
use std::io;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{stat64, statvfs64, CreateIn, ATTR_SUBMOUNT, ROOT_ID};
use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::FsCacheReqHandler;

use super::ledger::{default_fd_budget, Ledger, LiveInode, OpenHandle};
use super::FsError;

/// How long the guest may cache names and attributes: virtiofsd's
/// `--cache=auto`, so host changes show within a second.
const CACHE_TIMEOUT: Duration = Duration::from_secs(1);

/// Linux's XATTR_SIZE_MAX and XATTR_LIST_MAX: no value or name list is
/// larger, so a bigger guest buffer size only asks for a bigger host
/// allocation.
const XATTR_MAX: u32 = 64 * 1024;
/// The largest directory read handed to the backend (its getdents buffer);
/// Linux asks for a page at a time.
const READDIR_MAX: u32 = 1024 * 1024;

/// The filesystem the guest sees: fuse-backend-rs's passthrough backend
/// rooted at the share, with a read-only switch, bounds on the buffer
/// sizes the guest picks, and a ledger of the descriptors the backend
/// holds for the guest.
///
/// Every method of fuse-backend-rs's `FileSystem` has a default (mostly
/// ENOSYS), so each one is spelled out here: reads are delegated, writes
/// refused with EROFS on a read-only share.
pub struct ShareFs {
    pub(super) inner: PassthroughFs<()>,
    readonly: bool,
    /// How many host descriptors (live inodes plus open handles) the guest
    /// may pin.
    fd_budget: usize,
    ledger: Mutex<Ledger>,
    /// A FUSE session exists: the guest sent INIT and no DESTROY since
    /// (or a checkpoint rebuilt one).
    session: Arc<AtomicBool>,
    /// The FUSE options the guest's kernel offered at INIT (the backend's
    /// answer depends on nothing else): a rebuilt server initialises its
    /// backend with them.
    offered: AtomicU64,
}

/// What a guest open asks for.
#[derive(Clone, Copy, PartialEq)]
pub(super) enum OpenKind {
    File,
    Dir,
    Create,
}

/// O_LARGEFILE as the kernel defines it (libc's is 0 on 64-bit hosts, but
/// the guest kernel sets the real bit on every open).
#[cfg(target_arch = "aarch64")]
pub(super) const KERNEL_O_LARGEFILE: i32 = 0o400000;
#[cfg(not(target_arch = "aarch64"))]
pub(super) const KERNEL_O_LARGEFILE: i32 = 0o100000;

/// The open(2) flags passed on to the backend, besides the access mode.
const OPEN_FLAGS: i32 = libc::O_APPEND
    | libc::O_NONBLOCK
    | libc::O_SYNC
    | libc::O_DSYNC
    | libc::O_DIRECT
    | libc::O_NOATIME
    | libc::O_TRUNC
    | KERNEL_O_LARGEFILE
    | libc::O_CLOEXEC
    | libc::O_NOFOLLOW
    | libc::O_DIRECTORY
    | libc::O_ASYNC;

/// Bits of the guest file's `f_flags` that Linux's FUSE client forwards
/// although they are no open(2) flags: `__FMODE_EXEC` (every exec opens
/// the binary with it) and `__FMODE_NONOTIFY` (fanotify's own opens).
/// Accepted, never passed on.
const KERNEL_INTERNAL_FLAGS: i32 = 0x20 | 0x400_0000;

/// The flags the backend opens with for the guest's `flags`: an invalid
/// access mode, `O_PATH`, `O_TMPFILE` and anything else outside
/// [`OPEN_FLAGS`] (plus `O_CREAT`/`O_EXCL` for CREATE) is EINVAL.
/// `O_NOFOLLOW` and `O_CLOEXEC` are always added, `O_DIRECTORY` for OPENDIR
/// (as the backend does, so that the flags recorded here are the
/// backend's); `O_DIRECT` is dropped (guest buffers are not aligned for
/// it; the backend drops it at OPEN but not at CREATE).
pub(super) fn host_open_flags(flags: u32, kind: OpenKind) -> io::Result<u32> {
    let flags = flags as i32;
    let mut allowed = OPEN_FLAGS | KERNEL_INTERNAL_FLAGS | libc::O_ACCMODE;
    if kind == OpenKind::Create {
        allowed |= libc::O_CREAT | libc::O_EXCL;
    }
    if flags & libc::O_ACCMODE == libc::O_ACCMODE || flags & !allowed != 0 {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    let mut host =
        (flags & !(KERNEL_INTERNAL_FLAGS | libc::O_DIRECT)) | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    if kind == OpenKind::Dir {
        host |= libc::O_DIRECTORY;
    }
    Ok(host as u32)
}

impl ShareFs {
    /// The passthrough backend for `shared_dir`, with its root imported.
    pub fn new(shared_dir: &Path, readonly: bool) -> Result<ShareFs, FsError> {
        let root = shared_dir
            .canonicalize()
            .map_err(|err| FsError::SharedDir {
                path: shared_dir.to_owned(),
                err,
            })?;
        if !root.is_dir() {
            return Err(FsError::NotADirectory(root));
        }
        let root_dir = root
            .to_str()
            .ok_or_else(|| FsError::UnsupportedPath(root.clone()))?
            .to_owned();
        let backend_err = |err| FsError::Backend {
            path: root.clone(),
            err,
        };
        let inner = PassthroughFs::<()>::new(backend_config(root_dir)).map_err(backend_err)?;
        import_root(&inner).map_err(backend_err)?;
        let fs = ShareFs {
            inner,
            readonly,
            fd_budget: default_fd_budget(),
            ledger: Mutex::default(),
            session: Arc::default(),
            offered: AtomicU64::new(0),
        };
        fs.reset_ledger().map_err(backend_err)?;
        Ok(fs)
    }

    /// The same share with room for `budget` host descriptors (live inodes
    /// plus open handles) instead of the one derived from RLIMIT_NOFILE.
    pub fn with_fd_budget(mut self, budget: usize) -> ShareFs {
        self.fd_budget = budget;
        self
    }

    /// Whether a FUSE session exists (INIT and no DESTROY since), as the
    /// worker thread that serves the share last set it.
    pub fn session(&self) -> Arc<AtomicBool> {
        self.session.clone()
    }

    /// Inodes the guest holds (looked up and not forgotten), the root aside.
    pub fn live_inodes(&self) -> usize {
        self.ledger().inodes.len()
    }

    /// Files and directories the guest has open.
    pub fn open_handles(&self) -> usize {
        self.ledger().handles.len()
    }

    /// How many host descriptors the guest may pin.
    pub(super) fn fd_budget(&self) -> usize {
        self.fd_budget
    }

    /// The FUSE options the guest's kernel offered at INIT.
    pub(super) fn offered(&self) -> u64 {
        self.offered.load(Ordering::SeqCst)
    }

    pub(super) fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every inode and handle (the backend has just dropped its
    /// own) and records the root's device.
    fn reset_ledger(&self) -> io::Result<()> {
        let (root, _) = self.inner.getattr(&Context::default(), ROOT_ID, None)?;
        self.ledger().reset(root.st_dev);
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// The backend's node id of the guest's `inode`: EBADF for one the
    /// guest does not hold, as the backend answers an id it does not know.
    pub(super) fn node(&self, inode: u64) -> io::Result<u64> {
        self.ledger().backend_inode(inode).ok_or_else(ebadf)
    }

    /// The backend's node id, handle and open flags of the guest's
    /// `handle`: EBADF for a handle the guest was not given, or of another
    /// inode.
    fn opened(&self, inode: u64, handle: u64) -> io::Result<Opened> {
        let ledger = self.ledger();
        let h = ledger.handle(inode, handle).ok_or_else(ebadf)?;
        Ok(Opened {
            inode: h.backend_inode,
            handle: h.backend,
            flags: h.flags,
        })
    }

    /// Records the lookup an entry the backend made gives the guest, and
    /// marks a directory on another device than its parent as a submount;
    /// the entry as the guest sees it, under its guest node id (the same
    /// host inode keeps one). A new inode beyond the budget is forgotten
    /// again: ENFILE.
    pub(super) fn admit(&self, ctx: &Context, parent: u64, mut entry: Entry) -> io::Result<Entry> {
        let mut ledger = self.ledger();
        let kind = entry.attr.st_mode & libc::S_IFMT;
        if kind == libc::S_IFDIR
            && ledger
                .dev_of(parent)
                .is_some_and(|d| d != entry.attr.st_dev)
        {
            entry.attr_flags |= ATTR_SUBMOUNT;
        }
        if entry.inode == ROOT_ID {
            // Never forgotten by the backend, so never counted.
            return Ok(entry);
        }
        if let Some(&id) = ledger.by_backend.get(&entry.inode) {
            if let Some(live) = ledger.inodes.get_mut(&id) {
                live.nlookup = live.nlookup.saturating_add(1);
                entry.inode = id;
                return Ok(entry);
            }
        }
        if ledger.fds() >= self.fd_budget {
            drop(ledger);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(enfile());
        }
        entry.inode = ledger.insert_inode(LiveInode {
            backend: entry.inode,
            nlookup: 1,
            dev: entry.attr.st_dev,
            kind,
        });
        Ok(entry)
    }

    /// Records a handle the backend opened with `flags` on the guest's
    /// `inode` (the backend's `backend_inode`); the guest's handle.
    /// Beyond the budget it is released again: ENFILE.
    pub(super) fn admit_handle(
        &self,
        ctx: &Context,
        (inode, backend_inode): (u64, u64),
        handle: Option<u64>,
        flags: u32,
        kind: OpenKind,
    ) -> io::Result<Option<u64>> {
        let Some(handle) = handle else {
            return Ok(None);
        };
        let mut ledger = self.ledger();
        if ledger.fds() < self.fd_budget {
            return Ok(Some(ledger.insert_handle(OpenHandle {
                inode,
                backend_inode,
                backend: handle,
                flags,
                dir: kind == OpenKind::Dir,
            })));
        }
        drop(ledger);
        self.release_backend(ctx, backend_inode, handle, kind == OpenKind::Dir);
        Err(enfile())
    }

    /// Releases a backend handle the guest never got.
    fn release_backend(&self, ctx: &Context, inode: u64, handle: u64, dir: bool) {
        let _ = if dir {
            self.inner.releasedir(ctx, inode, 0, handle)
        } else {
            self.inner
                .release(ctx, inode, 0, handle, false, false, None)
        };
    }

    /// CREATE of a name that exists, for a guest that did not ask for
    /// O_EXCL: the backend would look the name up, then leak that lookup
    /// when the open fails, so it is done here with both steps accounted.
    fn open_existing(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        flags: u32,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        let entry = self.lookup(ctx, parent, name)?;
        let flags = flags & !((libc::O_CREAT | libc::O_EXCL) as u32);
        let opened = if entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR {
            Err(io::Error::from_raw_os_error(libc::EISDIR))
        } else {
            self.open(ctx, entry.inode, flags, 0)
        };
        match opened {
            Ok((handle, opts, passthrough)) => Ok((entry, handle, opts, passthrough)),
            Err(e) => {
                self.forget(ctx, entry.inode, 1);
                Err(e)
            }
        }
    }

    /// Releases the guest's `handle` of `inode` (RELEASE or RELEASEDIR,
    /// `release` calling the backend's); it leaves the ledger once the
    /// backend has let it go.
    fn release_with(
        &self,
        inode: u64,
        handle: u64,
        release: impl FnOnce(&Opened) -> io::Result<()>,
    ) -> io::Result<()> {
        let opened = self.opened(inode, handle)?;
        release(&opened)?;
        self.ledger().handles.remove(&handle);
        Ok(())
    }
}

/// A guest handle in the backend's terms.
struct Opened {
    inode: u64,
    handle: u64,
    flags: u32,
}

/// The backend's configuration for the share rooted at `root_dir`.
fn backend_config(root_dir: String) -> Config {
    Config {
        root_dir,
        // Imported here rather than by a VFS layer: this also turns on
        // the backend's own checks of the names the guest sends.
        do_import: true,
        xattr: true,
        cache_policy: CachePolicy::Auto,
        writeback: false,
        entry_timeout: CACHE_TIMEOUT,
        attr_timeout: CACHE_TIMEOUT,
        // O_PATH fds: file handles need CAP_DAC_READ_SEARCH and go stale
        // on some filesystems (FUSE ones among them).
        inode_file_handles: false,
        // Guest buffers are not aligned for the host's O_DIRECT.
        allow_direct_io: false,
        // Node ids derived from (device, mount, host inode): FORGET then
        // drops the backend's whole record of an inode, where its own
        // numbering keeps an id->node entry for every inode ever seen.
        use_host_ino: true,
        ..Default::default()
    }
}

/// Opens the share's root in the backend (FUSE_INIT does it again).
fn import_root(fs: &PassthroughFs<()>) -> io::Result<()> {
    on_import_thread(|| fs.import())
}

/// Runs `f` on a thread of its own, as the backend's imports of the root
/// outside FUSE_INIT and a checkpoint's rebuild need: the backend clears
/// the umask as it imports, so the thread has its own, and it runs under
/// the virtio-fs worker's allowlist, as FUSE_INIT's import does (no VM to
/// stop yet: a forbidden call fails the call).
pub(super) fn on_import_thread<T: Send>(f: impl FnOnce() -> io::Result<T> + Send) -> io::Result<T> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("virtio-fs-import".into())
            .spawn_scoped(s, || {
                private_fs_attrs()?;
                crate::seccomp::confine_worker("virtio-fs-import", -1).map_err(io::Error::other)?;
                f()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("the virtio-fs import thread panicked")))
    })
}

/// Gives the calling thread its own umask, root and working directory
/// (unshare `CLONE_FS`, which needs no privilege) and clears that umask:
/// the guest's modes are applied as it asks, its own umask already
/// applied. Without this, fuse-backend-rs clearing the umask (it does at
/// every import) would clear the whole runtime process's.
pub(super) fn private_fs_attrs() -> io::Result<()> {
    // SAFETY: unshare(2) takes no pointers; CLONE_FS only detaches this
    // thread's root, cwd and umask from the other threads'.
    if unsafe { libc::unshare(libc::CLONE_FS) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: umask(2) touches no memory and cannot fail; after the
    // unshare it only affects this thread.
    unsafe { libc::umask(0) };
    Ok(())
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

fn ebadf() -> io::Error {
    io::Error::from_raw_os_error(libc::EBADF)
}

/// Whether open(2) flags ask for write access or truncation.
fn opens_for_writing(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
}

/// Implements each listed [`FileSystem`] method by handing it to the
/// backend with the guest's node id translated (the first argument after
/// the context): the calls the share neither checks nor records.
macro_rules! forward_node {
    ($(fn $name:ident(&self, $ctx:ident: &Context, $inode:ident: u64 $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self, $ctx: &Context, $inode: u64 $(, $arg: $ty)*) -> $ret {
            let $inode = self.node($inode)?;
            self.inner.$name($ctx, $inode $(, $arg)*)
        })*
    };
}

/// Implements each listed [`FileSystem`] method on an open handle (the
/// two arguments after the context, node id and handle) by handing it to
/// the backend with both translated.
macro_rules! forward_handle {
    ($(fn $name:ident(&self, $ctx:ident: &Context, $inode:ident: u64, $handle:ident: u64 $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self, $ctx: &Context, $inode: u64, $handle: u64 $(, $arg: $ty)*) -> $ret {
            let opened = self.opened($inode, $handle)?;
            self.inner.$name($ctx, opened.inode, opened.handle $(, $arg)*)
        })*
    };
}

/// Implements each listed [`FileSystem`] method that makes a new entry in
/// the directory named by the argument in brackets: refused on a read-only
/// share, and the entry [admitted](ShareFs::admit) as a lookup's is.
macro_rules! forward_new_entries {
    ($([$parent:ident] fn $name:ident(&self, $ctx:ident: &Context $(, $arg:ident: $ty:ty)*) -> $ret:ty;)*) => {
        $(fn $name(&self, $ctx: &Context $(, $arg: $ty)*) -> $ret {
            self.check_writable()?;
            let guest_parent = $parent;
            let entry = {
                let $parent = self.node($parent)?;
                self.inner.$name($ctx $(, $arg)*)?
            };
            self.admit($ctx, guest_parent, entry)
        })*
    };
}

impl FileSystem for ShareFs {
    type Inode = u64;
    type Handle = u64;

    fn init(&self, capable: FsOptions) -> io::Result<FsOptions> {
        let mut want = self.inner.init(capable)?
            // Large requests (1 MiB writes rather than 4 KiB), concurrent
            // reads and lookups, and page cache invalidation when a
            // file's mtime or size changes under the guest (host writes).
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::ASYNC_READ
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA;
        // Bind mounts in the share become submounts in the guest, each
        // with its own st_dev (the server keeps only what the kernel
        // offered).
        want |= FsOptions::SUBMOUNTS;
        // No DAX window.
        want.remove(FsOptions::PERFILE_DAX);
        if self.readonly {
            want.remove(FsOptions::WRITEBACK_CACHE);
        }
        // The backend has imported the root again.
        self.ledger().root_dev = self
            .inner
            .getattr(&Context::default(), ROOT_ID, None)?
            .0
            .st_dev;
        // What a rebuilt server initialises its backend with.
        self.offered.store(capable.bits(), Ordering::SeqCst);
        self.session.store(true, Ordering::SeqCst);
        Ok(want)
    }

    fn destroy(&self) {
        // The backend drops every inode and handle and imports the root
        // again.
        self.inner.destroy();
        self.session.store(false, Ordering::SeqCst);
        if let Err(e) = self.reset_ledger() {
            tracing::warn!(error = %e, "virtio-fs: the share's root is gone after DESTROY");
        }
    }

    fn lookup(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<Entry> {
        // The backend resolves `..` against the host's tree, special-casing
        // only the root: from a directory moved out of the share (by the
        // host, or by another guest sharing an overlapping directory) it
        // would climb on to the host's root. Linux's FUSE client asks for
        // `.` and `..` only to export over NFS, which virtio-fs does not.
        if matches!(name.to_bytes(), b"." | b"..") {
            return Err(io::Error::from_raw_os_error(libc::ENOENT));
        }
        let entry = self.inner.lookup(ctx, self.node(parent)?, name)?;
        self.admit(ctx, parent, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        // The root is never counted (nor forgotten by the backend).
        if let Some(backend) = self.ledger().forget(inode, count) {
            self.inner.forget(ctx, backend, u64::MAX)
        }
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        let forgotten: Vec<_> = {
            let mut ledger = self.ledger();
            requests
                .into_iter()
                .filter_map(|(inode, count)| ledger.forget(inode, count))
                .map(|backend| (backend, u64::MAX))
                .collect()
        };
        if !forgotten.is_empty() {
            self.inner.batch_forget(ctx, forgotten)
        }
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        match handle {
            Some(h) => {
                let opened = self.opened(inode, h)?;
                self.inner.getattr(ctx, opened.inode, Some(opened.handle))
            }
            None => self.inner.getattr(ctx, self.node(inode)?, None),
        }
    }

    fn setattr(
        &self,
        ctx: &Context,
        inode: u64,
        attr: stat64,
        handle: Option<u64>,
        valid: SetattrValid,
    ) -> io::Result<(stat64, Duration)> {
        if !valid.is_empty() {
            self.check_writable()?;
        }
        let (inode, handle) = match handle {
            Some(h) => {
                let opened = self.opened(inode, h)?;
                (opened.inode, Some(opened.handle))
            }
            None => (self.node(inode)?, None),
        };
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn open(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        fuse_flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions, Option<u32>)> {
        if opens_for_writing(flags) {
            self.check_writable()?;
        }
        let flags = host_open_flags(flags, OpenKind::File)?;
        let backend = self.node(inode)?;
        let (handle, opts, passthrough) = self.inner.open(ctx, backend, flags, fuse_flags)?;
        let handle = self.admit_handle(ctx, (inode, backend), handle, flags, OpenKind::File)?;
        Ok((handle, opts, passthrough))
    }

    fn create(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        args: CreateIn,
    ) -> io::Result<(Entry, Option<u64>, OpenOptions, Option<u32>)> {
        self.check_writable()?;
        let flags = host_open_flags(args.flags, OpenKind::Create)?;
        // Always exclusive in the backend: see open_existing.
        let excl = CreateIn {
            flags: flags | libc::O_EXCL as u32,
            ..args
        };
        let created = self.inner.create(ctx, self.node(parent)?, name, excl);
        let (entry, handle, opts, passthrough) = match created {
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL as u32 == 0 =>
            {
                return self.open_existing(ctx, parent, name, flags);
            }
            created => created?,
        };
        let backend = entry.inode;
        let entry = self.admit(ctx, parent, entry).inspect_err(|_| {
            if let Some(h) = handle {
                self.release_backend(ctx, backend, h, false);
            }
        })?;
        let handle = self
            .admit_handle(
                ctx,
                (entry.inode, backend),
                handle,
                excl.flags,
                OpenKind::Create,
            )
            .inspect_err(|_| self.forget(ctx, entry.inode, 1))?;
        Ok((entry, handle, opts, passthrough))
    }

    fn read(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        w: &mut dyn ZeroCopyWriter,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        _flags: u32,
    ) -> io::Result<usize> {
        // The flags recorded at open, never the request's: a difference
        // makes the backend change the descriptor's flags, and when that
        // fails it closes the descriptor while the handle keeps its number.
        let h = self.opened(inode, handle)?;
        self.inner
            .read(ctx, h.inode, h.handle, w, size, offset, lock_owner, h.flags)
    }

    fn write(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        r: &mut dyn ZeroCopyReader,
        size: u32,
        offset: u64,
        lock_owner: Option<u64>,
        delayed_write: bool,
        _flags: u32,
        fuse_flags: u32,
    ) -> io::Result<usize> {
        self.check_writable()?;
        // As in read.
        let h = self.opened(inode, handle)?;
        self.inner.write(
            ctx,
            h.inode,
            h.handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            h.flags,
            fuse_flags,
        )
    }

    fn fallocate(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        mode: u32,
        offset: u64,
        length: u64,
    ) -> io::Result<()> {
        self.check_writable()?;
        let h = self.opened(inode, handle)?;
        self.inner
            .fallocate(ctx, h.inode, h.handle, mode, offset, length)
    }

    fn release(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
        handle: u64,
        flush: bool,
        flock_release: bool,
        lock_owner: Option<u64>,
    ) -> io::Result<()> {
        self.release_with(inode, handle, |h| {
            self.inner.release(
                ctx,
                h.inode,
                flags,
                h.handle,
                flush,
                flock_release,
                lock_owner,
            )
        })
    }

    fn setxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        value: &[u8],
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        self.inner
            .setxattr(ctx, self.node(inode)?, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner
            .getxattr(ctx, self.node(inode)?, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner
            .listxattr(ctx, self.node(inode)?, size.min(XATTR_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, self.node(inode)?, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let flags = host_open_flags(flags, OpenKind::Dir)?;
        let backend = self.node(inode)?;
        let (handle, opts) = self.inner.opendir(ctx, backend, flags)?;
        let handle = self.admit_handle(ctx, (inode, backend), handle, flags, OpenKind::Dir)?;
        Ok((handle, opts))
    }

    fn readdir(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let h = self.opened(inode, handle)?;
        self.inner.readdir(
            ctx,
            h.inode,
            h.handle,
            size.min(READDIR_MAX),
            offset,
            add_entry,
        )
    }

    fn readdirplus(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        size: u32,
        offset: u64,
        add_entry: &mut dyn FnMut(DirEntry, Entry) -> io::Result<usize>,
    ) -> io::Result<()> {
        let h = self.opened(inode, handle)?;
        // Each entry is a lookup, accounted as LOOKUP's are. The backend
        // forgets an entry that did not fit (add_entry returned 0) but not
        // one whose add_entry failed: that one is forgotten here. Either
        // way both counts are back where they were (an inode the guest
        // did not hold before is gone from both).
        let mut add = |dirent: DirEntry, entry: Entry| {
            let backend = entry.inode;
            let entry = self.admit(ctx, inode, entry)?;
            let node = entry.inode;
            let added = add_entry(dirent, entry);
            if !matches!(added, Ok(n) if n > 0) && node != ROOT_ID {
                self.ledger().forget(node, 1);
            }
            if added.is_err() {
                self.inner.forget(ctx, backend, 1);
            }
            added
        };
        self.inner.readdirplus(
            ctx,
            h.inode,
            h.handle,
            size.min(READDIR_MAX),
            offset,
            &mut add,
        )
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.release_with(inode, handle, |h| {
            self.inner.releasedir(ctx, h.inode, flags, h.handle)
        })
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let h = self.opened(inode, handle)?;
        self.inner.fsync(ctx, h.inode, datasync, h.handle)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        let h = self.opened(inode, handle)?;
        self.inner.fsyncdir(ctx, h.inode, datasync, h.handle)
    }

    fn setupmapping(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        foffset: u64,
        len: u64,
        flags: u64,
        moffset: u64,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        if flags & SetupmappingFlags::WRITE.bits() != 0 {
            self.check_writable()?;
        }
        let h = self.opened(inode, handle)?;
        self.inner
            .setupmapping(ctx, h.inode, h.handle, foffset, len, flags, moffset, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, self.node(inode)?, mask)
    }

    fn ioctl(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        flags: u32,
        cmd: u32,
        data: IoctlData,
        out_size: u32,
    ) -> io::Result<IoctlData<'_>> {
        // An ioctl may modify; the backend implements none anyway.
        if self.readonly {
            return Err(io::Error::from_raw_os_error(libc::ENOTTY));
        }
        let h = self.opened(inode, handle)?;
        self.inner
            .ioctl(ctx, h.inode, h.handle, flags, cmd, data, out_size)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, self.node(parent)?, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, self.node(parent)?, name)
    }

    fn rename(
        &self,
        ctx: &Context,
        olddir: u64,
        oldname: &CStr,
        newdir: u64,
        newname: &CStr,
        flags: u32,
    ) -> io::Result<()> {
        self.check_writable()?;
        let (olddir, newdir) = (self.node(olddir)?, self.node(newdir)?);
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        let (backend, parent) = (self.node(inode)?, self.node(newparent)?);
        let entry = self.inner.link(ctx, backend, parent, newname)?;
        self.admit(ctx, newparent, entry)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }

    // Calls on a node the share neither checks nor records.
    forward_node! {
        fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>>;
        fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64>;
        fn removemapping(&self, ctx: &Context, inode: u64, requests: Vec<RemovemappingOne>, vu_req: &mut dyn FsCacheReqHandler) -> io::Result<()>;
        fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64>;
    }

    // Calls on an open handle the share neither checks nor records.
    forward_handle! {
        fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()>;
        fn lseek(&self, ctx: &Context, inode: u64, handle: u64, offset: u64, whence: u32) -> io::Result<u64>;
        fn getlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<FileLock>;
        fn setlk(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn setlkw(&self, ctx: &Context, inode: u64, handle: u64, owner: u64, lock: FileLock, flags: u32) -> io::Result<()>;
        fn poll(&self, ctx: &Context, inode: u64, handle: u64, khandle: u64, flags: u32, events: u32) -> io::Result<u32>;
    }

    // New entries, refused on a read-only share and admitted like a lookup.
    forward_new_entries! {
        [parent] fn symlink(&self, ctx: &Context, linkname: &CStr, parent: u64, name: &CStr) -> io::Result<Entry>;
        [inode] fn mknod(&self, ctx: &Context, inode: u64, name: &CStr, mode: u32, rdev: u32, umask: u32) -> io::Result<Entry>;
        [parent] fn mkdir(&self, ctx: &Context, parent: u64, name: &CStr, mode: u32, umask: u32) -> io::Result<Entry>;
    }
}
