//! virtio-fs (virtio spec 5.11): a host directory shared with the guest,
//! served in-process by fuse-backend-rs's passthrough filesystem.
//!
//! Queues: 0 = hiprio (FORGET, BATCH_FORGET), 1 = the one request queue.
//! No virtio feature bits, no DAX window (SETUPMAPPING is refused).
//!
//! All the queue logic is [`process_queue`], a plain function over the FUSE
//! server, a queue and guest memory that tests drive directly; the
//! `virtio-fs-TAG` worker thread is only its epoll glue.
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
//!   ([`MAX_REQ_PAGES`] pages and a page of headers) is refused (EINVAL)
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
//!   2^20, Linux's default `fs.nr_open`; [`Fs::new`] first raises the soft
//!   limit to the hard one): beyond it a new inode or handle is ENFILE,
//!   after undoing the backend's lookup or open. FORGET
//!   is honoured: node ids are the host's inode numbers under a (device,
//!   mount) index (`use_host_ino`), so the backend drops its whole record
//!   of a forgotten inode, where its default numbering keeps an id->node
//!   entry for every inode ever seen. Two limits of that scheme: inode
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

use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::mem::size_of;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use fuse_backend_rs::abi::fuse_abi::{
    stat64, statvfs64, BatchForgetIn, CreateIn, ForgetOne, InHeader, Opcode, OutHeader,
    ATTR_SUBMOUNT, ROOT_ID,
};
use fuse_backend_rs::abi::virtio_fs::{RemovemappingOne, SetupmappingFlags};
use fuse_backend_rs::api::filesystem::{
    Context, DirEntry, Entry, FileLock, FileSystem, FsOptions, GetxattrReply, IoctlData,
    ListxattrReply, OpenOptions, SetattrValid, ZeroCopyReader, ZeroCopyWriter,
};
use fuse_backend_rs::api::server::{Server, MAX_REQ_PAGES};
use fuse_backend_rs::passthrough::{CachePolicy, Config, PassthroughFs};
use fuse_backend_rs::transport::{FsCacheReqHandler, Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue, QueueT};

use crate::virtio::worker::{self, QueueHandler};
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, Interrupt, Mem, VirtioDevice, TYPE_FS,
};

/// Maximum size of each queue.
pub const QUEUE_MAX_SIZE: u16 = 1024;
/// hiprio + one request queue.
pub const NUM_QUEUES: usize = 2;
/// Longest tag the configuration space holds.
pub const TAG_MAX_LEN: usize = 36;

/// Configuration space: `tag[36]` + `num_request_queues` (le32).
const CONFIG_LEN: usize = TAG_MAX_LEN + 4;
const NUM_REQUEST_QUEUES: u32 = 1;

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

/// The longest request Linux sends: a WRITE of `max_pages` pages (what
/// INIT offers), its headers in one more page.
const MAX_REQUEST_LEN: usize = MAX_REQ_PAGES as usize * 4096 + 4096;

const OUT_HEADER_LEN: usize = size_of::<OutHeader>();

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
        let server = Server::new(ShareFs::new(shared_dir, readonly)?);
        Ok(Fs {
            tag: tag.to_owned(),
            config,
            server: Some(server),
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

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the server in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let server = self.server.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other(
                "the virtio-fs device was already activated",
            ))
        })?;
        let worker = Worker {
            tag: self.tag.clone(),
            server,
            mem: activation.mem,
            interrupt: activation.interrupt,
            queues,
        };
        let name = format!("virtio-fs-{}", self.tag);
        self.worker = Some(worker::spawn(name, worker, notify, activation.stop)?);
        Ok(())
    }
}

/// The `virtio-fs-TAG` thread's side: the FUSE server and the queues.
struct Worker {
    tag: String,
    server: Server<ShareFs>,
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queues: [Queue; NUM_QUEUES],
}

impl QueueHandler for Worker {
    /// Serves the queues that were notified, each as far as it goes.
    fn serve(&mut self, notified: &[usize]) {
        for &q in notified {
            let Some(queue) = self.queues.get_mut(q) else {
                continue;
            };
            if process_queue(&self.server, queue, &self.mem) {
                self.interrupt.signal_used_queue();
            }
        }
    }

    fn on_start(&mut self) {
        if let Err(e) = private_fs_attrs() {
            // fuse-backend-rs clears the umask at FUSE_INIT; without a
            // private one that is the whole process's umask.
            let tag = &self.tag;
            tracing::warn!(tag, error = %e, "virtio-fs: cannot give the worker its own umask");
        }
    }
}

/// Gives the calling thread its own umask, root and working directory
/// (unshare `CLONE_FS`, which needs no privilege) and clears that umask:
/// the guest's modes are applied as it asks, its own umask already
/// applied. Without this, fuse-backend-rs clearing the umask (it does at
/// every import) would clear the whole runtime process's.
fn private_fs_attrs() -> io::Result<()> {
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

/// Serves every request the driver made available on `queue`: each chain
/// is handed to the FUSE server and completed, whatever it contains.
/// Returns whether the driver should be interrupted.
pub fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    queue: &mut Queue,
    mem: &Mem,
) -> bool {
    if !queue.ready() {
        return false;
    }
    let mut completed = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = serve_chain(server, mem, chain);
        match queue.add_used(mem, head, len) {
            Ok(()) => completed = true,
            Err(e) => tracing::debug!(head, error = %e, "virtio-fs: cannot complete a chain"),
        }
    }
    completed && queue.needs_notification(mem).unwrap_or(true)
}

/// Serves one request; returns the number of bytes written to the chain.
fn serve_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &Mem,
    chain: DescriptorChain<&Mem>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-fs: unusable request buffers");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-fs: unusable reply buffers");
            return 0;
        }
    };
    let capacity = writer.available_bytes();
    let Ok(header) = reader.clone().read_obj::<InHeader>() else {
        tracing::debug!("virtio-fs: request shorter than a FUSE header");
        return 0;
    };
    let opcode = header.opcode;
    let no_reply = [Opcode::Forget, Opcode::BatchForget, Opcode::Interrupt]
        .iter()
        .any(|&o| o as u32 == opcode);
    if let Err(errno) = check_request(&header, &reader) {
        tracing::debug!(
            opcode,
            len = header.len,
            "virtio-fs: request length refused"
        );
        return if no_reply {
            0
        } else {
            reply_error(mem, &chain, header.unique, errno)
        };
    }
    if no_reply {
        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
            tracing::debug!(opcode, error = %e, "virtio-fs: bad request");
        }
        return 0;
    }
    if opcode == Opcode::Ioctl as u32 {
        // The backend has no ioctls, and the server would first copy the
        // input into a host buffer as large as the guest makes the chain
        // (up to 4 GiB, with descriptors that repeat the same memory).
        return reply_error(mem, &chain, header.unique, libc::ENOTTY);
    }
    // Every reply starts with its header at the start of the writable
    // buffers, so a real reply overwrites this one; it stands when the
    // server fails without replying.
    let fallback = reply_error(mem, &chain, header.unique, libc::EIO);
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(n) if n > 0 => u32::try_from(n.min(capacity)).unwrap_or(u32::MAX),
        // DESTROY replies (16 bytes) yet returns 0.
        Ok(_) => fallback,
        Err(e) => {
            tracing::debug!(opcode, error = %e, "virtio-fs: bad request");
            fallback
        }
    }
}

/// Refuses (EINVAL) a request whose header claims fewer bytes than itself,
/// more than the chain holds, or more than Linux ever sends, before the
/// server allocates `len` bytes for its body; and a BATCH_FORGET whose
/// count runs past that length (the server reserves room for `count`).
fn check_request(header: &InHeader, reader: &Reader<'_>) -> Result<(), i32> {
    let len = header.len as usize;
    if len < size_of::<InHeader>() || len > reader.available_bytes() || len > MAX_REQUEST_LEN {
        return Err(libc::EINVAL);
    }
    if header.opcode == Opcode::BatchForget as u32 {
        let mut r = reader.clone();
        let count = r
            .read_obj::<InHeader>()
            .and_then(|_| r.read_obj::<BatchForgetIn>())
            .map_err(|_| libc::EINVAL)?
            .count;
        let need = (count as usize)
            .checked_mul(size_of::<ForgetOne>())
            .and_then(|n| n.checked_add(size_of::<InHeader>() + size_of::<BatchForgetIn>()));
        if need.is_none_or(|n| n > len) {
            return Err(libc::EINVAL);
        }
    }
    Ok(())
}

/// Writes an error reply at the start of the chain's writable buffers;
/// returns its length, or 0 if it does not fit.
fn reply_error(mem: &Mem, chain: &DescriptorChain<&Mem>, unique: u64, errno: i32) -> u32 {
    let out = OutHeader {
        len: OUT_HEADER_LEN as u32,
        error: -errno,
        unique,
    };
    match VirtioFsWriter::new(mem, chain.clone()).map(|mut w| w.write_obj(out)) {
        Ok(Ok(())) => OUT_HEADER_LEN as u32,
        _ => 0,
    }
}

/// The filesystem the guest sees: fuse-backend-rs's passthrough backend
/// rooted at the share, with a read-only switch, bounds on the buffer
/// sizes the guest picks, and a ledger of the descriptors the backend
/// holds for the guest.
///
/// Every method of fuse-backend-rs's `FileSystem` has a default (mostly
/// ENOSYS), so each one is spelled out here: reads are delegated, writes
/// refused with EROFS on a read-only share.
pub struct ShareFs {
    inner: PassthroughFs<()>,
    readonly: bool,
    /// How many host descriptors (live inodes plus open handles) the guest
    /// may pin.
    fd_budget: usize,
    ledger: Mutex<Ledger>,
}

/// What the guest holds of the backend: every inode it was given an entry
/// for and not yet forgotten, every handle it opened and not yet released.
/// Each costs the backend one host descriptor.
#[derive(Default)]
struct Ledger {
    inodes: HashMap<u64, LiveInode>,
    handles: HashMap<u64, OpenHandle>,
    /// The share root's device (the root is never forgotten, so it is not
    /// in `inodes`).
    root_dev: u64,
}

struct LiveInode {
    /// Lookups the guest has not yet forgotten.
    nlookup: u64,
    /// The host device: a directory on another device than its parent is
    /// announced as a submount.
    dev: u64,
}

struct OpenHandle {
    inode: u64,
    /// The flags the backend recorded at open; every READ and WRITE passes
    /// exactly these, so the backend never changes the descriptor's flags.
    flags: u32,
}

impl Ledger {
    fn fds(&self) -> usize {
        self.inodes.len() + self.handles.len()
    }

    fn dev_of(&self, inode: u64) -> Option<u64> {
        if inode == ROOT_ID {
            Some(self.root_dev)
        } else {
            self.inodes.get(&inode).map(|i| i.dev)
        }
    }

    /// Takes `count` lookups off `inode`.
    fn forget(&mut self, inode: u64, count: u64) {
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
const FD_BUDGET_MAX: u64 = 1 << 20;

/// RLIMIT_NOFILE's soft limit less a reserve (half of it when it is under
/// twice the reserve), at most [`FD_BUDGET_MAX`].
fn default_fd_budget() -> usize {
    let soft = nofile_limit().map_or(1024, |l| l.rlim_cur);
    let budget = (soft - FD_RESERVE.min(soft / 2)).min(FD_BUDGET_MAX);
    usize::try_from(budget).unwrap_or(usize::MAX)
}

fn nofile_limit() -> io::Result<libc::rlimit> {
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
fn raise_nofile_limit() -> io::Result<()> {
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

/// What a guest open asks for.
#[derive(Clone, Copy, PartialEq)]
enum OpenKind {
    File,
    Dir,
    Create,
}

/// O_LARGEFILE as the kernel defines it (libc's is 0 on 64-bit hosts, but
/// the guest kernel sets the real bit on every open).
#[cfg(target_arch = "aarch64")]
const KERNEL_O_LARGEFILE: i32 = 0o400000;
#[cfg(not(target_arch = "aarch64"))]
const KERNEL_O_LARGEFILE: i32 = 0o100000;

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
fn host_open_flags(flags: u32, kind: OpenKind) -> io::Result<u32> {
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

    /// Inodes the guest holds (looked up and not forgotten), the root aside.
    pub fn live_inodes(&self) -> usize {
        self.ledger().inodes.len()
    }

    /// Files and directories the guest has open.
    pub fn open_handles(&self) -> usize {
        self.ledger().handles.len()
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        self.ledger.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Forgets every inode and handle (the backend has just dropped its
    /// own) and records the root's device.
    fn reset_ledger(&self) -> io::Result<()> {
        let (root, _) = self.inner.getattr(&Context::default(), ROOT_ID, None)?;
        *self.ledger() = Ledger {
            root_dev: root.st_dev,
            ..Ledger::default()
        };
        Ok(())
    }

    fn check_writable(&self) -> io::Result<()> {
        if self.readonly {
            Err(erofs())
        } else {
            Ok(())
        }
    }

    /// Records the lookup an entry the backend made gives the guest, and
    /// marks a directory on another device than its parent as a submount.
    /// A new inode beyond the budget is forgotten again: ENFILE.
    fn admit(&self, ctx: &Context, parent: u64, mut entry: Entry) -> io::Result<Entry> {
        let mut ledger = self.ledger();
        let is_dir = entry.attr.st_mode & libc::S_IFMT == libc::S_IFDIR;
        if is_dir
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
        if let Some(live) = ledger.inodes.get_mut(&entry.inode) {
            live.nlookup = live.nlookup.saturating_add(1);
            return Ok(entry);
        }
        if ledger.fds() >= self.fd_budget {
            drop(ledger);
            self.inner.forget(ctx, entry.inode, 1);
            return Err(enfile());
        }
        let live = LiveInode {
            nlookup: 1,
            dev: entry.attr.st_dev,
        };
        ledger.inodes.insert(entry.inode, live);
        Ok(entry)
    }

    /// Records a handle the backend opened with `flags`; beyond the budget
    /// it is released again: ENFILE.
    fn admit_handle(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
        flags: u32,
        kind: OpenKind,
    ) -> io::Result<Option<u64>> {
        let Some(handle) = handle else {
            return Ok(None);
        };
        let mut ledger = self.ledger();
        if ledger.fds() < self.fd_budget {
            ledger.handles.insert(handle, OpenHandle { inode, flags });
            return Ok(Some(handle));
        }
        drop(ledger);
        let _ = if kind == OpenKind::Dir {
            self.inner.releasedir(ctx, inode, 0, handle)
        } else {
            self.inner
                .release(ctx, inode, 0, handle, false, false, None)
        };
        Err(enfile())
    }

    /// The flags `handle` was opened with, if it is a handle of `inode`.
    fn handle_flags(&self, inode: u64, handle: u64) -> io::Result<u32> {
        match self.ledger().handles.get(&handle) {
            Some(h) if h.inode == inode => Ok(h.flags),
            _ => Err(io::Error::from_raw_os_error(libc::EBADF)),
        }
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

/// Opens the share's root in the backend (FUSE_INIT does it again), on a
/// thread of its own: the backend clears the umask as it does.
fn import_root(fs: &PassthroughFs<()>) -> io::Result<()> {
    std::thread::scope(|s| {
        std::thread::Builder::new()
            .name("virtio-fs-import".into())
            .spawn_scoped(s, || {
                private_fs_attrs()?;
                fs.import()
            })?
            .join()
            .unwrap_or_else(|_| Err(io::Error::other("importing the share panicked")))
    })
}

fn erofs() -> io::Error {
    io::Error::from_raw_os_error(libc::EROFS)
}

fn enfile() -> io::Error {
    io::Error::from_raw_os_error(libc::ENFILE)
}

/// Whether open(2) flags ask for write access or truncation.
fn opens_for_writing(flags: u32) -> bool {
    let flags = flags as i32;
    flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0
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
        Ok(want)
    }

    fn destroy(&self) {
        // The backend drops every inode and handle and imports the root
        // again.
        self.inner.destroy();
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
        let entry = self.inner.lookup(ctx, parent, name)?;
        self.admit(ctx, parent, entry)
    }

    fn forget(&self, ctx: &Context, inode: u64, count: u64) {
        self.ledger().forget(inode, count);
        self.inner.forget(ctx, inode, count)
    }

    fn batch_forget(&self, ctx: &Context, requests: Vec<(u64, u64)>) {
        {
            let mut ledger = self.ledger();
            for &(inode, count) in &requests {
                ledger.forget(inode, count);
            }
        }
        self.inner.batch_forget(ctx, requests)
    }

    fn getattr(
        &self,
        ctx: &Context,
        inode: u64,
        handle: Option<u64>,
    ) -> io::Result<(stat64, Duration)> {
        self.inner.getattr(ctx, inode, handle)
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
        self.inner.setattr(ctx, inode, attr, handle, valid)
    }

    fn readlink(&self, ctx: &Context, inode: u64) -> io::Result<Vec<u8>> {
        self.inner.readlink(ctx, inode)
    }

    fn symlink(
        &self,
        ctx: &Context,
        linkname: &CStr,
        parent: u64,
        name: &CStr,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let entry = self.inner.symlink(ctx, linkname, parent, name)?;
        self.admit(ctx, parent, entry)
    }

    fn mknod(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        mode: u32,
        rdev: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let entry = self.inner.mknod(ctx, inode, name, mode, rdev, umask)?;
        self.admit(ctx, inode, entry)
    }

    fn mkdir(
        &self,
        ctx: &Context,
        parent: u64,
        name: &CStr,
        mode: u32,
        umask: u32,
    ) -> io::Result<Entry> {
        self.check_writable()?;
        let entry = self.inner.mkdir(ctx, parent, name, mode, umask)?;
        self.admit(ctx, parent, entry)
    }

    fn unlink(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.unlink(ctx, parent, name)
    }

    fn rmdir(&self, ctx: &Context, parent: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.rmdir(ctx, parent, name)
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
        self.inner
            .rename(ctx, olddir, oldname, newdir, newname, flags)
    }

    fn link(&self, ctx: &Context, inode: u64, newparent: u64, newname: &CStr) -> io::Result<Entry> {
        self.check_writable()?;
        let entry = self.inner.link(ctx, inode, newparent, newname)?;
        self.admit(ctx, newparent, entry)
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
        let (handle, opts, passthrough) = self.inner.open(ctx, inode, flags, fuse_flags)?;
        let handle = self.admit_handle(ctx, inode, handle, flags, OpenKind::File)?;
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
        let (entry, handle, opts, passthrough) = match self.inner.create(ctx, parent, name, excl) {
            Err(e)
                if e.raw_os_error() == Some(libc::EEXIST) && flags & libc::O_EXCL as u32 == 0 =>
            {
                return self.open_existing(ctx, parent, name, flags);
            }
            created => created?,
        };
        let handle = self
            .admit_handle(ctx, entry.inode, handle, excl.flags, OpenKind::Create)
            .inspect_err(|_| self.inner.forget(ctx, entry.inode, 1))?;
        let inode = entry.inode;
        let entry = self.admit(ctx, parent, entry).inspect_err(|_| {
            if let Some(h) = handle {
                let _ = self.release(ctx, inode, 0, h, false, false, None);
            }
        })?;
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
        let flags = self.handle_flags(inode, handle)?;
        self.inner
            .read(ctx, inode, handle, w, size, offset, lock_owner, flags)
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
        let flags = self.handle_flags(inode, handle)?;
        self.inner.write(
            ctx,
            inode,
            handle,
            r,
            size,
            offset,
            lock_owner,
            delayed_write,
            flags,
            fuse_flags,
        )
    }

    fn flush(&self, ctx: &Context, inode: u64, handle: u64, lock_owner: u64) -> io::Result<()> {
        self.inner.flush(ctx, inode, handle, lock_owner)
    }

    fn fsync(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsync(ctx, inode, datasync, handle)
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
        self.inner
            .fallocate(ctx, inode, handle, mode, offset, length)
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
        self.inner
            .release(ctx, inode, flags, handle, flush, flock_release, lock_owner)?;
        self.ledger().handles.remove(&handle);
        Ok(())
    }

    fn statfs(&self, ctx: &Context, inode: u64) -> io::Result<statvfs64> {
        self.inner.statfs(ctx, inode)
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
        self.inner.setxattr(ctx, inode, name, value, flags)
    }

    fn getxattr(
        &self,
        ctx: &Context,
        inode: u64,
        name: &CStr,
        size: u32,
    ) -> io::Result<GetxattrReply> {
        self.inner.getxattr(ctx, inode, name, size.min(XATTR_MAX))
    }

    fn listxattr(&self, ctx: &Context, inode: u64, size: u32) -> io::Result<ListxattrReply> {
        self.inner.listxattr(ctx, inode, size.min(XATTR_MAX))
    }

    fn removexattr(&self, ctx: &Context, inode: u64, name: &CStr) -> io::Result<()> {
        self.check_writable()?;
        self.inner.removexattr(ctx, inode, name)
    }

    fn opendir(
        &self,
        ctx: &Context,
        inode: u64,
        flags: u32,
    ) -> io::Result<(Option<u64>, OpenOptions)> {
        let flags = host_open_flags(flags, OpenKind::Dir)?;
        let (handle, opts) = self.inner.opendir(ctx, inode, flags)?;
        let handle = self.admit_handle(ctx, inode, handle, flags, OpenKind::Dir)?;
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
        self.inner
            .readdir(ctx, inode, handle, size.min(READDIR_MAX), offset, add_entry)
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
        // Each entry is a lookup, accounted as LOOKUP's are. The backend
        // forgets an entry that did not fit (add_entry returned 0) but not
        // one whose add_entry failed: that one is forgotten here.
        let mut add = |dirent: DirEntry, entry: Entry| {
            let entry = self.admit(ctx, inode, entry)?;
            let node = entry.inode;
            let added = add_entry(dirent, entry);
            if !matches!(added, Ok(n) if n > 0) && node != ROOT_ID {
                self.ledger().forget(node, 1);
            }
            if added.is_err() {
                self.inner.forget(ctx, node, 1);
            }
            added
        };
        self.inner
            .readdirplus(ctx, inode, handle, size.min(READDIR_MAX), offset, &mut add)
    }

    fn fsyncdir(&self, ctx: &Context, inode: u64, datasync: bool, handle: u64) -> io::Result<()> {
        self.inner.fsyncdir(ctx, inode, datasync, handle)
    }

    fn releasedir(&self, ctx: &Context, inode: u64, flags: u32, handle: u64) -> io::Result<()> {
        self.inner.releasedir(ctx, inode, flags, handle)?;
        self.ledger().handles.remove(&handle);
        Ok(())
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
        self.inner
            .setupmapping(ctx, inode, handle, foffset, len, flags, moffset, vu_req)
    }

    fn removemapping(
        &self,
        ctx: &Context,
        inode: u64,
        requests: Vec<RemovemappingOne>,
        vu_req: &mut dyn FsCacheReqHandler,
    ) -> io::Result<()> {
        self.inner.removemapping(ctx, inode, requests, vu_req)
    }

    fn access(&self, ctx: &Context, inode: u64, mask: u32) -> io::Result<()> {
        if mask & libc::W_OK as u32 != 0 {
            self.check_writable()?;
        }
        self.inner.access(ctx, inode, mask)
    }

    fn lseek(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        offset: u64,
        whence: u32,
    ) -> io::Result<u64> {
        self.inner.lseek(ctx, inode, handle, offset, whence)
    }

    fn getlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<FileLock> {
        self.inner.getlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlk(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlk(ctx, inode, handle, owner, lock, flags)
    }

    fn setlkw(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        owner: u64,
        lock: FileLock,
        flags: u32,
    ) -> io::Result<()> {
        self.inner.setlkw(ctx, inode, handle, owner, lock, flags)
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
        self.inner
            .ioctl(ctx, inode, handle, flags, cmd, data, out_size)
    }

    fn bmap(&self, ctx: &Context, inode: u64, block: u64, blocksize: u32) -> io::Result<u64> {
        self.inner.bmap(ctx, inode, block, blocksize)
    }

    fn poll(
        &self,
        ctx: &Context,
        inode: u64,
        handle: u64,
        khandle: u64,
        flags: u32,
        events: u32,
    ) -> io::Result<u32> {
        self.inner.poll(ctx, inode, handle, khandle, flags, events)
    }

    fn notify_reply(&self) -> io::Result<()> {
        self.inner.notify_reply()
    }

    fn id_remap(&self, ctx: &mut Context) -> io::Result<()> {
        self.inner.id_remap(ctx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;
    use std::mem::size_of;
    use std::os::fd::{AsRawFd, FromRawFd};
    use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};

    use fuse_backend_rs::abi::fuse_abi::{
        AccessIn, AttrOut, EntryOut, FallocateIn, ForgetIn, GetattrIn, GetxattrIn, InitIn, InitOut,
        IoctlIn, LinkIn, MkdirIn, MknodIn, OpenIn, OpenOut, ReadIn, ReleaseIn, RenameIn, SetattrIn,
        SetxattrIn, WriteIn, WriteOut, GETATTR_FH, KERNEL_MINOR_VERSION, KERNEL_VERSION, ROOT_ID,
    };
    use proptest::prelude::*;
    use vm_memory::{ByteValued, Bytes, GuestAddress};

    use crate::virtio::test_utils::*;

    const MEM_SIZE: usize = 0x10_0000;
    /// Where requests and replies go in guest memory (the queues sit below
    /// 0x2000, and a second share's at 0x8000).
    const IN_HDR: u64 = 0x1_0000;
    const IN_BODY: u64 = 0x1_1000;
    const OUT_HDR: u64 = 0x4_0000;
    const OUT_BODY: u64 = 0x4_1000;
    const OUT_BODY_LEN: u32 = 0x1_0000;
    /// Where the queue of a second share goes.
    const SECOND_QUEUE: u64 = 0x8000;

    const FATTR_MODE: u32 = 0x1;
    const FATTR_SIZE: u32 = 0x8;
    const FATTR_MTIME: u32 = 0x20;

    const HELLO: &[u8] = b"hello from the host\n";

    fn test_mem() -> Mem {
        memory(MEM_SIZE)
    }

    fn cstr(s: &str) -> Vec<u8> {
        let mut v = s.as_bytes().to_vec();
        v.push(0);
        v
    }

    fn cat(parts: &[&[u8]]) -> Vec<u8> {
        parts.concat()
    }

    /// A FUSE structure from the start of `bytes`.
    fn obj<T: ByteValued + Default>(bytes: &[u8]) -> T {
        let mut t = T::default();
        let n = size_of::<T>();
        assert!(bytes.len() >= n, "reply too short: {} < {n}", bytes.len());
        t.as_mut_slice().copy_from_slice(&bytes[..n]);
        t
    }

    /// A FUSE reply structure, compared by its bytes.
    #[derive(Clone, Copy, Debug)]
    struct P<T>(T);

    impl<T: ByteValued> PartialEq for P<T> {
        fn eq(&self, other: &Self) -> bool {
            self.0.as_slice() == other.0.as_slice()
        }
    }

    impl<T> std::ops::Deref for P<T> {
        type Target = T;
        fn deref(&self) -> &T {
            &self.0
        }
    }

    /// Writes a request into guest memory, as Linux lays it out (header,
    /// arguments, then the reply header and the reply body), and returns
    /// its descriptors.
    fn stage_request(mem: &Mem, opcode: u32, nodeid: u64, unique: u64, args: &[u8]) -> Vec<Desc> {
        let header = InHeader {
            len: (size_of::<InHeader>() + args.len()) as u32,
            opcode,
            unique,
            nodeid,
            uid: 0,
            gid: 0,
            pid: 1,
            padding: 0,
        };
        mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
        mem.write_slice(args, GuestAddress(IN_BODY)).unwrap();
        // A stale reply must not pass for a new one.
        mem.write_slice(&[0xa5; OUT_HEADER_LEN], GuestAddress(OUT_HDR))
            .unwrap();
        mem.write_slice(&vec![0; OUT_BODY_LEN as usize], GuestAddress(OUT_BODY))
            .unwrap();
        let mut descs = vec![(IN_HDR, size_of::<InHeader>() as u32, 0)];
        if !args.is_empty() {
            descs.push((IN_BODY, args.len() as u32, 0));
        }
        descs.push((OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE));
        descs.push((OUT_BODY, OUT_BODY_LEN, F_WRITE));
        descs
    }

    struct Reply {
        header: OutHeader,
        body: Vec<u8>,
    }

    impl Reply {
        fn read(mem: &Mem, used: u32) -> Reply {
            let header: OutHeader = mem.read_obj(GuestAddress(OUT_HDR)).unwrap();
            let n = (header.len as usize)
                .saturating_sub(OUT_HEADER_LEN)
                .min(OUT_BODY_LEN as usize)
                .min((used as usize).saturating_sub(OUT_HEADER_LEN));
            let mut body = vec![0; n];
            mem.read_slice(&mut body, GuestAddress(OUT_BODY)).unwrap();
            Reply { header, body }
        }

        /// The reply body, or the errno.
        fn result(&self) -> Result<&[u8], i32> {
            if self.header.error == 0 {
                Ok(&self.body)
            } else {
                Err(-self.header.error)
            }
        }
    }

    /// A share served over a mock request queue.
    struct Harness<'m> {
        /// The share is `base/share`; `base` holds what must stay out of
        /// reach.
        _dir: Option<tempfile::TempDir>,
        root: PathBuf,
        /// The request queue, the driver's side and the device's.
        guest: Guest<'m>,
        queue: Queue,
        server: Server<Arc<ShareFs>>,
        /// The server's filesystem, to read its ledger.
        fs: Arc<ShareFs>,
        unique: u64,
    }

    impl<'m> Harness<'m> {
        /// A fresh share: `hello.txt`, `sub/`, and `../outside.txt`,
        /// `../outside_dir/secret` next to it.
        fn new(mem: &'m Mem, readonly: bool) -> Harness<'m> {
            Harness::with_budget(mem, readonly, None)
        }

        /// A fresh share whose guest may pin `budget` host descriptors.
        fn with_budget(mem: &'m Mem, readonly: bool, budget: Option<usize>) -> Harness<'m> {
            // INIT clears the umask: keep that to this test's thread.
            private_fs_attrs().unwrap();
            let dir = tempfile::tempdir().unwrap();
            let base = dir.path();
            fs::write(base.join("outside.txt"), b"outside secret").unwrap();
            fs::set_permissions(base.join("outside.txt"), fs::Permissions::from_mode(0o644))
                .unwrap();
            fs::create_dir(base.join("outside_dir")).unwrap();
            fs::write(base.join("outside_dir/secret"), b"secret").unwrap();
            let root = base.join("share");
            fs::create_dir(&root).unwrap();
            fs::write(root.join("hello.txt"), HELLO).unwrap();
            fs::create_dir(root.join("sub")).unwrap();
            let mut share = ShareFs::new(&root, readonly).unwrap();
            if let Some(budget) = budget {
                share = share.with_fd_budget(budget);
            }
            let mut h = Harness::sharing(mem, 0, &root, share);
            h._dir = Some(dir);
            h
        }

        /// Serves an existing directory over a queue at `queue_base`.
        fn serving(mem: &'m Mem, queue_base: u64, root: &Path, readonly: bool) -> Harness<'m> {
            Harness::sharing(mem, queue_base, root, ShareFs::new(root, readonly).unwrap())
        }

        fn sharing(mem: &'m Mem, queue_base: u64, root: &Path, share: ShareFs) -> Harness<'m> {
            let fs = Arc::new(share);
            let guest = Guest::at(mem, queue_base, 1);
            Harness {
                _dir: None,
                root: root.canonicalize().unwrap(),
                queue: guest.queue(0),
                guest,
                server: Server::new(fs.clone()),
                fs,
                unique: 0,
            }
        }

        fn base(&self) -> &Path {
            self.root.parent().unwrap()
        }

        /// Serves whatever chain is posted: its head and the bytes it
        /// got, if completed.
        fn complete(&mut self) -> Option<(u16, u32)> {
            process_queue(&self.server, &mut self.queue, self.guest.mem);
            let used = self.guest.used(0);
            assert!(used.len() <= 1, "one chain, one completion: {used:?}");
            used.first().copied()
        }

        /// Serves whatever chain is posted; the bytes it got, if completed.
        fn serve(&mut self) -> Option<u32> {
            self.complete().map(|(_, len)| len)
        }

        fn submit(&mut self, descs: &[Desc]) -> Option<u32> {
            let head = self.guest.post(0, descs);
            self.complete().map(|(used, len)| {
                assert_eq!(used, head);
                len
            })
        }

        fn call_raw(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
            self.unique += 1;
            let descs = stage_request(self.guest.mem, opcode, nodeid, self.unique, args);
            let used = self.submit(&descs).expect("the request was completed");
            let reply = Reply::read(self.guest.mem, used);
            assert!(
                used as usize >= OUT_HEADER_LEN,
                "no reply to opcode {opcode}"
            );
            assert_eq!(reply.header.unique, self.unique);
            assert_eq!(reply.header.len, used, "the used length is the reply's");
            reply
        }

        fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) -> Reply {
            self.call_raw(opcode as u32, nodeid, args)
        }

        fn init(&mut self) -> InitOut {
            let flags = FsOptions::ASYNC_READ
                | FsOptions::BIG_WRITES
                | FsOptions::MAX_PAGES
                | FsOptions::DO_READDIRPLUS
                | FsOptions::READDIRPLUS_AUTO
                | FsOptions::PARALLEL_DIROPS
                | FsOptions::AUTO_INVAL_DATA
                | FsOptions::WRITEBACK_CACHE
                | FsOptions::PERFILE_DAX
                | FsOptions::SUBMOUNTS;
            let args = InitIn {
                major: KERNEL_VERSION,
                minor: KERNEL_MINOR_VERSION,
                max_readahead: 0x20000,
                flags: flags.bits() as u32,
            };
            obj(self
                .call(Opcode::Init, 0, args.as_slice())
                .result()
                .unwrap())
        }

        fn lookup(&mut self, parent: u64, name: &str) -> Result<P<EntryOut>, i32> {
            self.lookup_bytes(parent, &cstr(name))
        }

        fn lookup_bytes(&mut self, parent: u64, name: &[u8]) -> Result<P<EntryOut>, i32> {
            let r = self.call(Opcode::Lookup, parent, name);
            r.result().map(|b| P(obj(b)))
        }

        fn getattr(&mut self, node: u64) -> Result<P<AttrOut>, i32> {
            let r = self.call(Opcode::Getattr, node, GetattrIn::default().as_slice());
            r.result().map(|b| P(obj(b)))
        }

        fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
            let args = OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            };
            let r = self.call(Opcode::Open, node, args.as_slice());
            r.result().map(|b| obj::<OpenOut>(b).fh)
        }

        fn opendir(&mut self, node: u64) -> Result<u64, i32> {
            let args = OpenIn {
                flags: (libc::O_RDONLY | libc::O_DIRECTORY) as u32,
                fuse_flags: 0,
            };
            let r = self.call(Opcode::Opendir, node, args.as_slice());
            r.result().map(|b| obj::<OpenOut>(b).fh)
        }

        /// FORGET, which gets no reply.
        fn forget(&mut self, node: u64, nlookup: u64) {
            self.unique += 1;
            let args = ForgetIn { nlookup };
            let descs = stage_request(
                self.guest.mem,
                Opcode::Forget as u32,
                node,
                self.unique,
                args.as_slice(),
            );
            assert_eq!(self.submit(&descs[..2]), Some(0));
        }

        fn batch_forget(&mut self, forgets: &[(u64, u64)]) {
            self.unique += 1;
            let head = BatchForgetIn {
                count: forgets.len() as u32,
                dummy: 0,
            };
            let mut body = head.as_slice().to_vec();
            for &(nodeid, nlookup) in forgets {
                body.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
            }
            let descs = stage_request(
                self.guest.mem,
                Opcode::BatchForget as u32,
                0,
                self.unique,
                &body,
            );
            assert_eq!(self.submit(&descs[..2]), Some(0));
        }

        /// One READDIRPLUS: (name, entry) for each directory entry.
        fn readdirplus(
            &mut self,
            node: u64,
            fh: u64,
            size: u32,
        ) -> Result<Vec<(String, P<EntryOut>)>, i32> {
            let args = ReadIn {
                fh,
                size,
                ..Default::default()
            };
            let r = self.call(Opcode::Readdirplus, node, args.as_slice());
            let mut rest = r.result()?;
            let mut entries = Vec::new();
            while !rest.is_empty() {
                let entry: EntryOut = obj(rest);
                let dirent = &rest[size_of::<EntryOut>()..];
                let namelen = u32::from_ne_bytes(dirent[16..20].try_into().unwrap()) as usize;
                let name = String::from_utf8(dirent[24..24 + namelen].to_vec()).unwrap();
                entries.push((name, P(entry)));
                rest = &rest[size_of::<EntryOut>() + (24 + namelen).next_multiple_of(8)..];
            }
            Ok(entries)
        }

        fn opendir_flags(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
            let args = OpenIn {
                flags: flags as u32,
                fuse_flags: 0,
            };
            let r = self.call(Opcode::Opendir, node, args.as_slice());
            r.result().map(|b| obj::<OpenOut>(b).fh)
        }

        fn getattr_fh(&mut self, node: u64, fh: u64) -> Result<P<AttrOut>, i32> {
            let args = GetattrIn {
                flags: GETATTR_FH,
                dummy: 0,
                fh,
            };
            let r = self.call(Opcode::Getattr, node, args.as_slice());
            r.result().map(|b| P(obj(b)))
        }

        fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
            self.read_flags(node, fh, offset, size, 0)
        }

        /// READ as Linux sends it: `flags` are the guest file's f_flags.
        fn read_flags(
            &mut self,
            node: u64,
            fh: u64,
            offset: u64,
            size: u32,
            flags: i32,
        ) -> Result<Vec<u8>, i32> {
            let args = ReadIn {
                fh,
                offset,
                size,
                flags: flags as u32,
                ..Default::default()
            };
            let r = self.call(Opcode::Read, node, args.as_slice());
            r.result().map(<[u8]>::to_vec)
        }

        fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
            self.write_flags(node, fh, offset, data, 0)
        }

        fn write_flags(
            &mut self,
            node: u64,
            fh: u64,
            offset: u64,
            data: &[u8],
            flags: i32,
        ) -> Result<u32, i32> {
            let args = WriteIn {
                fh,
                offset,
                size: data.len() as u32,
                flags: flags as u32,
                ..Default::default()
            };
            let r = self.call(Opcode::Write, node, &cat(&[args.as_slice(), data]));
            r.result().map(|b| obj::<WriteOut>(b).size)
        }

        fn create(
            &mut self,
            parent: u64,
            name: &str,
            flags: i32,
        ) -> Result<(P<EntryOut>, u64), i32> {
            let args = CreateIn {
                flags: flags as u32,
                mode: libc::S_IFREG | 0o644,
                umask: 0o022,
                fuse_flags: 0,
            };
            let r = self.call(
                Opcode::Create,
                parent,
                &cat(&[args.as_slice(), &cstr(name)]),
            );
            r.result().map(|b| {
                let entry: EntryOut = obj(b);
                let open: OpenOut = obj(&b[size_of::<EntryOut>()..]);
                (P(entry), open.fh)
            })
        }

        fn mkdir(&mut self, parent: u64, name: &str) -> Result<P<EntryOut>, i32> {
            let args = MkdirIn {
                mode: 0o755,
                umask: 0o022,
            };
            let r = self.call(Opcode::Mkdir, parent, &cat(&[args.as_slice(), &cstr(name)]));
            r.result().map(|b| P(obj(b)))
        }

        fn mknod(
            &mut self,
            parent: u64,
            name: &str,
            mode: u32,
            rdev: u32,
        ) -> Result<P<EntryOut>, i32> {
            let args = MknodIn {
                mode,
                rdev,
                umask: 0,
                padding: 0,
            };
            let r = self.call(Opcode::Mknod, parent, &cat(&[args.as_slice(), &cstr(name)]));
            r.result().map(|b| P(obj(b)))
        }

        fn symlink(&mut self, parent: u64, name: &str, target: &str) -> Result<P<EntryOut>, i32> {
            let r = self.call(Opcode::Symlink, parent, &cat(&[&cstr(name), &cstr(target)]));
            r.result().map(|b| P(obj(b)))
        }

        fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
            let r = self.call(Opcode::Readlink, node, &[]);
            r.result().map(<[u8]>::to_vec)
        }

        fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
            self.call(Opcode::Unlink, parent, &cstr(name))
                .result()
                .map(drop)
        }

        fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), i32> {
            self.call(Opcode::Rmdir, parent, &cstr(name))
                .result()
                .map(drop)
        }

        fn rename(&mut self, parent: u64, old: &str, newdir: u64, new: &str) -> Result<(), i32> {
            let args = RenameIn { newdir };
            let body = cat(&[args.as_slice(), &cstr(old), &cstr(new)]);
            self.call(Opcode::Rename, parent, &body).result().map(drop)
        }

        fn link(&mut self, node: u64, newparent: u64, name: &str) -> Result<P<EntryOut>, i32> {
            let args = LinkIn { oldnodeid: node };
            let r = self.call(
                Opcode::Link,
                newparent,
                &cat(&[args.as_slice(), &cstr(name)]),
            );
            r.result().map(|b| P(obj(b)))
        }

        fn setattr(&mut self, node: u64, args: SetattrIn) -> Result<P<AttrOut>, i32> {
            let r = self.call(Opcode::Setattr, node, args.as_slice());
            r.result().map(|b| P(obj(b)))
        }

        fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> Result<(), i32> {
            let args = SetxattrIn {
                size: value.len() as u32,
                flags: 0,
            };
            let body = cat(&[args.as_slice(), &cstr(name), value]);
            self.call(Opcode::Setxattr, node, &body).result().map(drop)
        }

        fn getxattr(&mut self, node: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
            let args = GetxattrIn { size, padding: 0 };
            let r = self.call(
                Opcode::Getxattr,
                node,
                &cat(&[args.as_slice(), &cstr(name)]),
            );
            r.result().map(<[u8]>::to_vec)
        }

        fn removexattr(&mut self, node: u64, name: &str) -> Result<(), i32> {
            self.call(Opcode::Removexattr, node, &cstr(name))
                .result()
                .map(drop)
        }

        fn access(&mut self, node: u64, mask: i32) -> Result<(), i32> {
            let args = AccessIn {
                mask: mask as u32,
                padding: 0,
            };
            self.call(Opcode::Access, node, args.as_slice())
                .result()
                .map(drop)
        }

        fn fallocate(&mut self, node: u64, fh: u64, length: u64) -> Result<(), i32> {
            let args = FallocateIn {
                fh,
                offset: 0,
                length,
                mode: 0,
                padding: 0,
            };
            self.call(Opcode::Fallocate, node, args.as_slice())
                .result()
                .map(drop)
        }
    }

    fn is_symlink(mode: u32) -> bool {
        mode & libc::S_IFMT == libc::S_IFLNK
    }

    /// This process's descriptors that lead to `path`, with their open(2)
    /// flags (from /proc/self/fdinfo).
    fn fds_at(path: &Path) -> Vec<(i32, i32)> {
        fds_where(|target| target == path)
    }

    /// How many of this process's descriptors lead into `dir`.
    fn fds_under(dir: &Path) -> usize {
        fds_where(|target| target.starts_with(dir)).len()
    }

    fn fds_where(keep: impl Fn(&Path) -> bool) -> Vec<(i32, i32)> {
        let mut fds = Vec::new();
        for entry in fs::read_dir("/proc/self/fd").unwrap() {
            let Some(fd) = entry
                .ok()
                .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
            else {
                continue;
            };
            // Other tests open and close descriptors meanwhile.
            let Ok(target) = fs::read_link(format!("/proc/self/fd/{fd}")) else {
                continue;
            };
            if !keep(&target) {
                continue;
            }
            let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
                continue;
            };
            let flags = info
                .lines()
                .find_map(|l| l.strip_prefix("flags:"))
                .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
                .unwrap();
            fds.push((fd, flags));
        }
        fds
    }

    /// The descriptors at `path` that can read or write (not `O_PATH`).
    fn io_fds_at(path: &Path) -> Vec<i32> {
        fds_at(path)
            .into_iter()
            .filter(|&(_, flags)| flags & libc::O_PATH == 0)
            .map(|(fd, _)| fd)
            .collect()
    }

    /// A file on which the host refuses a flag change: fcntl(F_SETFL)
    /// from `open_flags` to `bad_flags` fails.
    struct FlagTrap {
        path: PathBuf,
        append_only: bool,
        open_flags: i32,
        bad_flags: i32,
    }

    /// FS_APPEND_FL (linux/fs.h), which libc does not define.
    const FS_APPEND_FL: libc::c_int = 0x20;

    impl FlagTrap {
        /// O_DIRECT where the filesystem has no direct I/O; otherwise
        /// chattr +a, which makes clearing O_APPEND fail.
        fn new(path: &Path) -> FlagTrap {
            let f = fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(path)
                .unwrap();
            // SAFETY: fcntl(2) on a descriptor this function owns; no pointers.
            let direct = unsafe { libc::fcntl(f.as_raw_fd(), libc::F_SETFL, libc::O_DIRECT) };
            if direct != 0 {
                return FlagTrap {
                    path: path.to_owned(),
                    append_only: false,
                    open_flags: libc::O_RDWR,
                    bad_flags: libc::O_RDWR | libc::O_DIRECT,
                };
            }
            set_inode_flags(&f, FS_APPEND_FL).expect("chattr +a on the test directory");
            FlagTrap {
                path: path.to_owned(),
                append_only: true,
                open_flags: libc::O_RDWR | libc::O_APPEND,
                bad_flags: libc::O_RDWR,
            }
        }
    }

    impl Drop for FlagTrap {
        fn drop(&mut self) {
            if self.append_only {
                // Or the temporary directory could not be removed.
                let f = fs::File::open(&self.path).unwrap();
                set_inode_flags(&f, 0).unwrap();
            }
        }
    }

    fn set_inode_flags(f: &fs::File, flags: libc::c_int) -> io::Result<()> {
        // SAFETY: FS_IOC_SETFLAGS reads one int from the pointer, which
        // points to a live c_int.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), libc::FS_IOC_SETFLAGS, &flags) };
        if r == 0 {
            Ok(())
        } else {
            Err(io::Error::last_os_error())
        }
    }

    #[test]
    fn create_with_o_path_never_follows_a_planted_symlink() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let outside = h.base().join("outside.txt");
        let shadow = Path::new("/etc/shadow");
        symlink(&outside, h.root.join("link")).unwrap();
        symlink(shadow, h.root.join("shadow")).unwrap();
        let before = fs::metadata(&outside).unwrap();
        let tmpfile = libc::O_TMPFILE & !libc::O_DIRECTORY;
        for name in ["link", "shadow"] {
            for flags in [
                libc::O_PATH,
                libc::O_PATH | libc::O_RDWR,
                libc::O_PATH | libc::O_CREAT,
                libc::O_PATH | libc::O_EXCL,
                libc::O_PATH | libc::O_NOFOLLOW,
                libc::O_PATH | libc::O_DIRECTORY,
                libc::O_PATH | libc::O_CLOEXEC,
                libc::O_TMPFILE | libc::O_RDWR,
                tmpfile | libc::O_RDWR,
                libc::O_ACCMODE,
                libc::O_RDWR | libc::O_NOCTTY,
                libc::O_RDWR | 0x4000_0000,
            ] {
                assert_eq!(
                    h.create(ROOT_ID, name, flags).map(drop),
                    Err(libc::EINVAL),
                    "CREATE {name} with {flags:#o}"
                );
            }
        }
        // Without O_PATH the link is not followed either (it exists, so
        // the file server opens what is there: a symlink, which it refuses).
        for flags in [libc::O_RDWR, libc::O_RDONLY, libc::O_WRONLY | libc::O_TRUNC] {
            assert!(h.create(ROOT_ID, "link", flags).is_err(), "{flags:#o}");
        }
        assert_eq!(
            h.create(ROOT_ID, "link", libc::O_RDWR | libc::O_EXCL)
                .map(drop),
            Err(libc::EEXIST)
        );
        for target in [outside.as_path(), shadow] {
            assert_eq!(fds_at(target), [], "{} was opened", target.display());
        }
        // Whatever handle the guest names, GETATTR on the link stats the
        // link.
        let link = h.lookup(ROOT_ID, "link").unwrap();
        for fh in 0..32 {
            if let Ok(a) = h.getattr_fh(link.nodeid, fh) {
                assert!(is_symlink(a.attr.mode), "handle {fh}");
                assert_ne!(a.attr.ino, before.ino(), "handle {fh}");
            }
        }
        // OPEN and OPENDIR take the same flags.
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        assert_eq!(h.open(hello.nodeid, libc::O_PATH), Err(libc::EINVAL));
        assert_eq!(h.open(sub.nodeid, libc::O_PATH), Err(libc::EINVAL));
        assert_eq!(
            h.open(sub.nodeid, libc::O_TMPFILE | libc::O_RDWR),
            Err(libc::EINVAL)
        );
        assert_eq!(
            h.opendir_flags(sub.nodeid, libc::O_PATH | libc::O_DIRECTORY),
            Err(libc::EINVAL)
        );
        let after = fs::metadata(&outside).unwrap();
        assert_eq!(
            (after.mode(), after.len(), after.mtime()),
            (before.mode(), before.len(), before.mtime())
        );
        assert_eq!(fs::read(&outside).unwrap(), b"outside secret");
    }

    #[test]
    fn a_failed_flag_change_never_frees_the_handles_descriptor() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let file = h.root.join("log.txt");
        fs::write(&file, b"share data\n").unwrap();
        let outside = h.base().join("outside.txt");
        let trap = FlagTrap::new(&file);
        let e = h.lookup(ROOT_ID, "log.txt").unwrap();
        assert_eq!(io_fds_at(&file), []);
        let fh = h.open(e.nodeid, trap.open_flags).unwrap();
        let [fd] = io_fds_at(&file)[..] else {
            panic!("one descriptor for the handle");
        };

        // The guest asks, in READ and WRITE, for a flag change that the
        // host refuses.
        let _ = h.read_flags(e.nodeid, fh, 0, 64, trap.bad_flags);
        let _ = h.write_flags(e.nodeid, fh, 0, b"", trap.bad_flags);
        assert_eq!(
            fs::read_link(format!("/proc/self/fd/{fd}")).ok().as_deref(),
            Some(file.as_path()),
            "the handle keeps its descriptor"
        );

        // The next file the host opens would take a freed number.
        let victim = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&outside)
            .unwrap();
        // SAFETY: F_DUPFD_CLOEXEC makes a new descriptor, owned below.
        let dup = unsafe { libc::fcntl(victim.as_raw_fd(), libc::F_DUPFD_CLOEXEC, fd) };
        assert!(dup >= 0);
        // SAFETY: `dup` was just made and nothing else owns it.
        let _dup = unsafe { std::os::fd::OwnedFd::from_raw_fd(dup) };
        let got = h.read_flags(e.nodeid, fh, 0, 64, trap.open_flags).unwrap();
        assert_eq!(got, b"share data\n");
        let n = h.write_flags(e.nodeid, fh, 0, b"guest", trap.open_flags);
        assert_eq!(n, Ok(5));
        assert_eq!(fs::read(&outside).unwrap(), b"outside secret");
        let content = fs::read(&file).unwrap();
        assert!(content.starts_with(b"share data\n") || content.starts_with(b"guest"));
        assert!(content.windows(5).any(|w| w == b"guest"));
    }

    #[test]
    fn config_space_holds_the_tag_and_one_request_queue() {
        let dir = tempfile::tempdir().unwrap();
        let fs = Fs::new("myshare", dir.path(), false).unwrap();
        assert_eq!(fs.device_type(), TYPE_FS);
        assert_eq!(fs.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 2]);
        assert_eq!(fs.features(), 0);
        let mut cfg = [0xffu8; 48];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..7], b"myshare");
        assert!(cfg[7..36].iter().all(|&b| b == 0), "NUL padded");
        assert_eq!(&cfg[36..40], &1u32.to_le_bytes());
        assert!(cfg[40..].iter().all(|&b| b == 0), "zero past the end");
        let mut word = [0u8; 4];
        fs.read_config(36, &mut word);
        assert_eq!(u32::from_le_bytes(word), 1);

        let long = "x".repeat(TAG_MAX_LEN);
        let fs = Fs::new(&long, dir.path(), true).unwrap();
        let mut cfg = [0u8; 40];
        fs.read_config(0, &mut cfg);
        assert_eq!(&cfg[..36], long.as_bytes());
    }

    #[test]
    fn bad_tags_and_directories_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        for tag in ["", &"x".repeat(TAG_MAX_LEN + 1), "a\0b"] {
            assert!(
                matches!(Fs::new(tag, dir.path(), false), Err(FsError::InvalidTag(_))),
                "{tag:?}"
            );
        }
        assert!(matches!(
            Fs::new("t", &dir.path().join("missing"), false),
            Err(FsError::SharedDir { .. })
        ));
        fs::write(dir.path().join("file"), b"").unwrap();
        assert!(matches!(
            Fs::new("t", &dir.path().join("file"), false),
            Err(FsError::NotADirectory(_))
        ));
        // A symlink to a directory is the directory (resolved once, here).
        symlink(dir.path(), dir.path().join("link")).unwrap();
        assert!(Fs::new("t", &dir.path().join("link"), false).is_ok());
    }

    #[test]
    fn init_negotiates_large_requests_and_no_dax() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        let out = h.init();
        assert_eq!(out.major, KERNEL_VERSION);
        assert_eq!(out.minor, KERNEL_MINOR_VERSION);
        let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
        assert!(flags.contains(FsOptions::MAX_PAGES | FsOptions::DO_READDIRPLUS));
        assert!(flags.contains(FsOptions::SUBMOUNTS));
        assert!(!flags.contains(FsOptions::PERFILE_DAX));
        assert!(!flags.contains(FsOptions::WRITEBACK_CACHE));
        assert_eq!(out.max_pages, 256);
        assert_eq!(out.max_write, 1 << 20);
    }

    #[test]
    fn lookup_getattr_and_read_a_file() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let e = h.lookup(ROOT_ID, "hello.txt").unwrap();
        assert!(e.nodeid > ROOT_ID);
        assert_eq!(e.attr.size, HELLO.len() as u64);
        assert_eq!(e.attr.mode & libc::S_IFMT, libc::S_IFREG);
        assert_eq!(e.attr_valid, 1);
        let attr = h.getattr(e.nodeid).unwrap();
        assert_eq!(attr.attr.size, HELLO.len() as u64);
        assert_eq!(
            attr.attr.ino,
            fs::metadata(h.root.join("hello.txt")).unwrap().ino()
        );
        let fh = h.open(e.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(h.read(e.nodeid, fh, 0, 4096).unwrap(), HELLO);
        assert_eq!(h.read(e.nodeid, fh, 6, 4).unwrap(), b"from");
        assert_eq!(h.lookup(ROOT_ID, "missing"), Err(libc::ENOENT));
        // The root itself and the directory below it.
        assert_eq!(
            h.getattr(ROOT_ID).unwrap().attr.ino,
            fs::metadata(&h.root).unwrap().ino()
        );
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        assert_eq!(sub.attr.mode & libc::S_IFMT, libc::S_IFDIR);
        h.opendir(sub.nodeid).unwrap();
    }

    #[test]
    fn guest_writes_reach_the_host_and_host_writes_reach_the_guest() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let (e, fh) = h.create(ROOT_ID, "new.txt", libc::O_RDWR).unwrap();
        assert_eq!(h.write(e.nodeid, fh, 0, b"from the guest").unwrap(), 14);
        // No write-back cache: the host has it as soon as WRITE returns.
        assert_eq!(fs::read(h.root.join("new.txt")).unwrap(), b"from the guest");
        let new_mode = fs::metadata(h.root.join("new.txt")).unwrap().mode();
        assert_eq!(new_mode & 0o777, 0o644, "the guest's mode and umask");

        fs::write(h.root.join("hello.txt"), b"changed on the host").unwrap();
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        assert_eq!(hello.attr.size, 19);
        let fh = h.open(hello.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(
            h.read(hello.nodeid, fh, 0, 100).unwrap(),
            b"changed on the host"
        );

        let d = h.mkdir(ROOT_ID, "newdir").unwrap();
        assert!(h.root.join("newdir").is_dir());
        h.rename(ROOT_ID, "new.txt", d.nodeid, "moved.txt").unwrap();
        assert!(h.root.join("newdir/moved.txt").is_file());
        h.unlink(d.nodeid, "moved.txt").unwrap();
        h.rmdir(ROOT_ID, "newdir").unwrap();
        assert!(!h.root.join("newdir").exists());
    }

    #[test]
    fn dotdot_at_the_root_stays_at_the_root() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let root_ino = fs::metadata(&h.root).unwrap().ino();
        assert_ne!(root_ino, fs::metadata(h.base()).unwrap().ino());

        // The guest kernel resolves `.` and `..` itself; asked anyway,
        // neither leads anywhere, at the root or below it.
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        for node in [ROOT_ID, sub.nodeid] {
            assert_eq!(h.lookup(node, "..").err(), Some(libc::ENOENT));
            assert_eq!(h.lookup(node, ".").err(), Some(libc::ENOENT));
        }
        // What is next to the share is never found from its root.
        for name in ["outside.txt", "outside_dir", "share"] {
            assert_eq!(h.lookup(ROOT_ID, name).err(), Some(libc::ENOENT));
        }

        // Beneath the wrapper, the backend clamps `..` at the root itself.
        let backend = ShareFs::new(&h.root, false).unwrap().inner;
        let ctx = Context::default();
        let up = backend.lookup(&ctx, ROOT_ID, c"..").unwrap();
        assert_eq!((up.inode, up.attr.st_ino), (ROOT_ID, root_ino));
        let upup = backend.lookup(&ctx, up.inode, c"..").unwrap();
        assert_eq!(upup.inode, ROOT_ID);
        assert!(backend.lookup(&ctx, upup.inode, c"outside.txt").is_err());
        let sub = backend.lookup(&ctx, ROOT_ID, c"sub").unwrap();
        assert_eq!(
            backend.lookup(&ctx, sub.inode, c"..").unwrap().inode,
            ROOT_ID
        );

        // Paths are not names.
        for name in ["../outside.txt", "sub/..", "/etc/passwd", "/"] {
            assert_eq!(h.lookup(ROOT_ID, name), Err(libc::EINVAL), "{name}");
        }
        let abs = h.base().join("outside.txt");
        assert_eq!(h.lookup(ROOT_ID, abs.to_str().unwrap()), Err(libc::EINVAL));
        assert!(h.lookup(ROOT_ID, "").is_err());
        // A name with a NUL inside is cut there, never read past.
        assert_eq!(
            h.lookup_bytes(ROOT_ID, b"hello.txt\0/../x\0")
                .unwrap()
                .attr
                .size,
            HELLO.len() as u64
        );
        // Unknown nodeids are refused, not guessed.
        assert_eq!(h.lookup(0, "hello.txt"), Err(libc::EBADF));
        assert_eq!(h.lookup(999_999, "outside.txt"), Err(libc::EBADF));
        assert_eq!(h.getattr(u64::MAX), Err(libc::EBADF));
    }

    #[test]
    fn a_directory_moved_out_of_the_share_leads_no_further() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        fs::create_dir(h.root.join("sub/inner")).unwrap();
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        let inner = h.lookup(sub.nodeid, "inner").unwrap();
        // The host (or another guest sharing the parent directory) moves
        // the directory the guest holds out of the share.
        fs::rename(h.root.join("sub/inner"), h.base().join("moved")).unwrap();
        // The guest keeps the directory it holds, and nothing above it.
        assert_eq!(h.lookup(inner.nodeid, "..").err(), Some(libc::ENOENT));
        assert_eq!(
            h.lookup(inner.nodeid, "outside.txt").err(),
            Some(libc::ENOENT)
        );
        h.opendir(inner.nodeid).unwrap();
    }

    #[test]
    fn host_symlinks_are_never_followed() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        symlink("/etc", h.root.join("etc")).unwrap();
        symlink("..", h.root.join("up")).unwrap();
        symlink("../outside.txt", h.root.join("out")).unwrap();
        symlink("../outside_dir", h.root.join("outdir")).unwrap();
        symlink(h.base().join("outside_dir"), h.root.join("absdir")).unwrap();
        h.init();

        let etc = h.lookup(ROOT_ID, "etc").unwrap();
        assert!(is_symlink(etc.attr.mode), "the link itself, not /etc");
        assert_eq!(etc.attr.size, 4);
        assert_eq!(h.readlink(etc.nodeid).unwrap(), b"/etc");
        // A name under a symlink is never resolved through it.
        assert_eq!(h.lookup(etc.nodeid, "passwd"), Err(libc::ENOTDIR));
        assert_eq!(h.lookup(etc.nodeid, ".."), Err(libc::ENOENT));
        assert!(h.opendir(etc.nodeid).is_err());

        let up = h.lookup(ROOT_ID, "up").unwrap();
        assert!(is_symlink(up.attr.mode));
        assert_eq!(h.lookup(up.nodeid, "outside.txt"), Err(libc::ENOTDIR));
        assert_eq!(h.lookup(up.nodeid, "share"), Err(libc::ENOTDIR));

        for name in ["outdir", "absdir"] {
            let d = h.lookup(ROOT_ID, name).unwrap();
            assert!(is_symlink(d.attr.mode));
            assert_eq!(h.lookup(d.nodeid, "secret"), Err(libc::ENOTDIR), "{name}");
            assert!(h.opendir(d.nodeid).is_err(), "{name}");
        }

        let out = h.lookup(ROOT_ID, "out").unwrap();
        assert!(is_symlink(out.attr.mode));
        assert_eq!(h.getattr(out.nodeid).unwrap().attr.size, 14);
        // Opening a symlink would open its target: it is refused.
        assert!(h.open(out.nodeid, libc::O_RDONLY).is_err());
        assert!(h.open(out.nodeid, libc::O_RDWR).is_err());
        assert_eq!(
            fs::read(h.base().join("outside.txt")).unwrap(),
            b"outside secret"
        );
    }

    #[test]
    fn guest_made_symlinks_are_never_followed() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let esc = h.symlink(ROOT_ID, "esc", "/etc").unwrap();
        assert!(is_symlink(esc.attr.mode));
        assert_eq!(
            fs::read_link(h.root.join("esc")).unwrap(),
            Path::new("/etc"),
            "the guest's target, stored as is for the guest to resolve"
        );
        assert_eq!(h.lookup(esc.nodeid, "passwd"), Err(libc::ENOTDIR));
        assert!(h.open(esc.nodeid, libc::O_RDONLY).is_err());

        let up = h.symlink(ROOT_ID, "up", "../outside.txt").unwrap();
        assert!(h.open(up.nodeid, libc::O_RDONLY).is_err());
        let upd = h.symlink(ROOT_ID, "upd", "../../../..").unwrap();
        assert_eq!(h.lookup(upd.nodeid, "outside.txt"), Err(libc::ENOTDIR));

        // /proc/self/fd tricks: links into the VMM's own fd table resolve
        // nowhere, and a path is not a name.
        let procfd = h.symlink(ROOT_ID, "procfd", "/proc/self/fd").unwrap();
        for fd in ["0", "1", "3", "4", "5"] {
            assert_eq!(h.lookup(procfd.nodeid, fd), Err(libc::ENOTDIR));
        }
        let fd3 = h.symlink(ROOT_ID, "fd3", "/proc/self/fd/3").unwrap();
        assert!(h.open(fd3.nodeid, libc::O_RDONLY).is_err());
        assert!(h.opendir(fd3.nodeid).is_err());
        assert_eq!(h.lookup(ROOT_ID, "/proc/self/fd/3"), Err(libc::EINVAL));
        assert_eq!(h.lookup(ROOT_ID, "/proc/self/root"), Err(libc::EINVAL));
        // A symlink over an existing name cannot be made, nor one named
        // like a path.
        assert_eq!(
            h.symlink(ROOT_ID, "hello.txt", "/etc/passwd"),
            Err(libc::EEXIST)
        );
        assert_eq!(h.symlink(ROOT_ID, "../x", "/etc"), Err(libc::EINVAL));
        assert!(!h.base().join("x").exists());
    }

    #[test]
    fn metadata_calls_through_a_symlink_stay_on_the_link() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let outside = h.base().join("outside.txt");
        let before = fs::metadata(&outside).unwrap();
        symlink("../outside.txt", h.root.join("out")).unwrap();
        let out = h.lookup(ROOT_ID, "out").unwrap();

        // chmod, truncate and utimes go through /proc/self/fd/N or
        // reopen the inode: none may reach the target.
        let _ = h.setattr(
            out.nodeid,
            SetattrIn {
                valid: FATTR_MODE,
                mode: 0o777,
                ..Default::default()
            },
        );
        assert_eq!(
            h.setattr(
                out.nodeid,
                SetattrIn {
                    valid: FATTR_SIZE,
                    size: 0,
                    ..Default::default()
                },
            )
            .map(drop),
            Err(libc::EBADF)
        );
        let _ = h.setattr(
            out.nodeid,
            SetattrIn {
                valid: FATTR_MTIME,
                mtime: 12345,
                ..Default::default()
            },
        );
        let after = fs::metadata(&outside).unwrap();
        assert_eq!(after.mode(), before.mode());
        assert_eq!(after.len(), before.len());
        assert_eq!(after.mtime(), before.mtime());
        assert_eq!(fs::read(&outside).unwrap(), b"outside secret");

        // Extended attributes go through /proc/self/fd/N with calls that
        // follow symlinks: the magic link must land on the link itself.
        // A second server rooted one level up can see (and label) the target.
        let mut admin = Harness::serving(&mem, SECOND_QUEUE, h.base(), false);
        let target = admin.lookup(ROOT_ID, "outside.txt").unwrap();
        match admin.setxattr(target.nodeid, "user.secret", b"s3cret") {
            Ok(()) => {}
            Err(e) if e == libc::EOPNOTSUPP || e == libc::ENOTSUP => {
                eprintln!("no user xattrs on this filesystem: xattr part skipped");
                return;
            }
            Err(e) => panic!("setxattr on the target: {e}"),
        }
        assert_eq!(
            admin.getxattr(target.nodeid, "user.secret", 64).unwrap(),
            b"s3cret"
        );
        assert_ne!(
            h.getxattr(out.nodeid, "user.secret", 64),
            Ok(b"s3cret".to_vec())
        );
        assert_ne!(
            h.getxattr(out.nodeid, "user.secret", 0),
            admin.getxattr(target.nodeid, "user.secret", 0)
        );
        let _ = h.setxattr(out.nodeid, "user.planted", b"x");
        let _ = h.removexattr(out.nodeid, "user.secret");
        assert_eq!(
            admin.getxattr(target.nodeid, "user.planted", 64),
            Err(libc::ENODATA)
        );
        assert_eq!(
            admin.getxattr(target.nodeid, "user.secret", 64).unwrap(),
            b"s3cret"
        );
        // A huge buffer size is bounded, not allocated.
        assert_eq!(
            admin
                .getxattr(target.nodeid, "user.secret", u32::MAX)
                .unwrap(),
            b"s3cret"
        );
    }

    #[test]
    fn special_files_are_never_opened() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        // A FIFO: opening it on the host could block the worker forever.
        let fifo = h.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o666, 0).unwrap();
        assert!(h
            .open(fifo.nodeid, libc::O_RDONLY | libc::O_NONBLOCK)
            .is_err());
        assert!(h.open(fifo.nodeid, libc::O_RDWR).is_err());
        // A block device (loop0): the guest may create it (as a container
        // with CAP_MKNOD may) but never open the host's device through it.
        match h.mknod(ROOT_ID, "blk", libc::S_IFBLK | 0o666, 7 << 8) {
            Ok(blk) => {
                assert_eq!(blk.attr.mode & libc::S_IFMT, libc::S_IFBLK);
                assert!(h.open(blk.nodeid, libc::O_RDONLY).is_err());
                assert!(h.open(blk.nodeid, libc::O_RDWR).is_err());
            }
            Err(e) => eprintln!("mknod of a block device: errno {e}, part skipped"),
        }
    }

    #[test]
    fn names_that_are_paths_are_refused_everywhere() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        for bad in ["../escaped", "sub/../../escaped", "..", ".", "/tmp/escaped"] {
            assert_eq!(
                h.mkdir(ROOT_ID, bad).map(drop),
                Err(libc::EINVAL),
                "mkdir {bad}"
            );
            assert_eq!(
                h.create(ROOT_ID, bad, libc::O_RDWR).map(drop),
                Err(libc::EINVAL),
                "create {bad}"
            );
            assert_eq!(
                h.mknod(ROOT_ID, bad, libc::S_IFREG | 0o644, 0).map(drop),
                Err(libc::EINVAL),
                "mknod {bad}"
            );
            assert_eq!(
                h.link(hello.nodeid, ROOT_ID, bad).map(drop),
                Err(libc::EINVAL),
                "link {bad}"
            );
            assert_eq!(
                h.rename(ROOT_ID, "hello.txt", ROOT_ID, bad),
                Err(libc::EINVAL),
                "rename to {bad}"
            );
            assert_eq!(h.unlink(ROOT_ID, bad), Err(libc::EINVAL), "unlink {bad}");
            assert_eq!(h.rmdir(ROOT_ID, bad), Err(libc::EINVAL), "rmdir {bad}");
        }
        assert_eq!(
            h.rename(ROOT_ID, "../outside.txt", ROOT_ID, "stolen"),
            Err(libc::EINVAL)
        );
        assert!(!h.base().join("escaped").exists());
        assert!(!Path::new("/tmp/escaped").exists());
        assert!(h.base().join("outside.txt").exists());
        assert!(h.root.join("hello.txt").exists());
    }

    #[test]
    fn a_readonly_share_refuses_every_modification() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, true);
        let out = h.init();
        assert!(!FsOptions::from_bits_truncate(u64::from(out.flags))
            .contains(FsOptions::WRITEBACK_CACHE));
        let erofs: Result<(), i32> = Err(libc::EROFS);

        // Reads work.
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        let fh = h.open(hello.nodeid, libc::O_RDONLY).unwrap();
        assert_eq!(h.read(hello.nodeid, fh, 0, 4096).unwrap(), HELLO);
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        h.opendir(sub.nodeid).unwrap();
        h.getattr(ROOT_ID).unwrap();
        h.access(hello.nodeid, libc::R_OK).unwrap();
        assert!(matches!(h.getxattr(hello.nodeid, "user.none", 64), Err(e) if e != libc::EROFS));

        // Writes do not.
        assert_eq!(
            h.write(hello.nodeid, fh, 0, b"overwritten").map(drop),
            erofs
        );
        assert_eq!(h.open(hello.nodeid, libc::O_RDWR).map(drop), erofs);
        assert_eq!(h.open(hello.nodeid, libc::O_WRONLY).map(drop), erofs);
        assert_eq!(
            h.open(hello.nodeid, libc::O_RDONLY | libc::O_TRUNC)
                .map(drop),
            erofs
        );
        assert_eq!(h.create(ROOT_ID, "new.txt", libc::O_RDWR).map(drop), erofs);
        assert_eq!(
            h.create(ROOT_ID, "new.txt", libc::O_RDONLY).map(drop),
            erofs
        );
        assert_eq!(h.mkdir(ROOT_ID, "newdir").map(drop), erofs);
        assert_eq!(
            h.mknod(ROOT_ID, "node", libc::S_IFREG | 0o644, 0).map(drop),
            erofs
        );
        assert_eq!(
            h.mknod(ROOT_ID, "fifo", libc::S_IFIFO | 0o644, 0).map(drop),
            erofs
        );
        assert_eq!(h.symlink(ROOT_ID, "link", "hello.txt").map(drop), erofs);
        assert_eq!(h.link(hello.nodeid, ROOT_ID, "hard").map(drop), erofs);
        assert_eq!(h.unlink(ROOT_ID, "hello.txt"), erofs);
        assert_eq!(h.rmdir(ROOT_ID, "sub"), erofs);
        assert_eq!(h.rename(ROOT_ID, "hello.txt", ROOT_ID, "renamed"), erofs);
        for valid in [FATTR_MODE, FATTR_SIZE, FATTR_MTIME, 0x2, 0x4] {
            let args = SetattrIn {
                valid,
                mode: 0o777,
                ..Default::default()
            };
            assert_eq!(
                h.setattr(hello.nodeid, args).map(drop),
                erofs,
                "valid {valid:#x}"
            );
        }
        assert_eq!(h.setxattr(hello.nodeid, "user.x", b"y"), erofs);
        assert_eq!(h.removexattr(hello.nodeid, "user.x"), erofs);
        assert_eq!(h.fallocate(hello.nodeid, fh, 1 << 20), erofs);
        assert_eq!(h.access(hello.nodeid, libc::W_OK), erofs);

        assert_eq!(fs::read(h.root.join("hello.txt")).unwrap(), HELLO);
        let meta = fs::metadata(h.root.join("hello.txt")).unwrap();
        assert_eq!(meta.len(), HELLO.len() as u64);
        let mut names: Vec<_> = fs::read_dir(&h.root)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["hello.txt", "sub"]);
    }

    #[test]
    fn hostile_chains_complete_and_the_device_keeps_working() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let reply_descs = [
            (OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE),
            (OUT_BODY, OUT_BODY_LEN, F_WRITE),
        ];
        let lookup_args = cstr("hello.txt");
        let stage_lookup = |mem: &Mem, unique: u64| {
            stage_request(mem, Opcode::Lookup as u32, ROOT_ID, unique, &lookup_args)
        };
        let check_alive = |h: &mut Harness| {
            assert_eq!(
                h.lookup(ROOT_ID, "hello.txt").unwrap().attr.size,
                HELLO.len() as u64
            );
        };

        // Buffers outside guest memory, or straddling its end.
        let mut descs = vec![(0xffff_0000, 40, 0)];
        descs.extend_from_slice(&reply_descs);
        assert_eq!(h.submit(&descs), Some(0));
        check_alive(&mut h);
        let mut descs = stage_lookup(&mem, 1000);
        descs[3] = (MEM_SIZE as u64 - 8, 4096, F_WRITE);
        assert_eq!(h.submit(&descs), Some(0));
        let mut descs = stage_lookup(&mem, 1001);
        descs[0] = (u64::MAX - 16, 40, 0);
        assert_eq!(h.submit(&descs), Some(0));
        check_alive(&mut h);

        // A header claiming more than the chain holds, or less than itself.
        for len in [40 + 4096, u32::MAX, 10, 0] {
            let descs = stage_lookup(&mem, 2000);
            let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
            header.len = len;
            mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
            assert_eq!(h.submit(&descs), Some(16), "len {len}");
            let r = Reply::read(&mem, 16);
            assert_eq!(r.header.unique, 2000);
            assert!(r.header.error < 0, "len {len}: an error reply");
            check_alive(&mut h);
        }

        // An unknown opcode.
        let r = h.call_raw(9999, ROOT_ID, &[]);
        assert_eq!(r.result(), Err(libc::ENOSYS));
        check_alive(&mut h);

        // Zero-length chains, a chain with only a reply buffer, a request
        // shorter than a FUSE header.
        assert_eq!(h.submit(&[(IN_HDR, 0, 0)]), Some(0));
        assert_eq!(h.submit(&[(IN_HDR, 0, 0), (OUT_HDR, 0, F_WRITE)]), Some(0));
        assert_eq!(h.submit(&reply_descs), Some(0));
        assert_eq!(h.submit(&[(IN_HDR, 39, 0), reply_descs[0]]), Some(0));
        check_alive(&mut h);

        // No room for a reply, or no reply buffer at all.
        let descs = stage_lookup(&mem, 3000);
        assert_eq!(
            h.submit(&[descs[0], descs[1], (OUT_HDR, 8, F_WRITE)]),
            Some(0)
        );
        assert_eq!(h.submit(&descs[..2]), Some(0));
        // Room for the header only: an error rather than a cut reply.
        let descs = stage_lookup(&mem, 3001);
        assert_eq!(h.submit(&descs[..3]), Some(16));
        assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EIO));
        check_alive(&mut h);

        // A readable descriptor after the writable ones, and a descriptor
        // that loops onto itself (the chain ends at the queue size).
        let descs = stage_lookup(&mem, 4000);
        assert_eq!(
            h.submit(&[descs[0], descs[2], descs[1], descs[3]]),
            Some((OUT_HEADER_LEN + size_of::<EntryOut>()) as u32)
        );
        let looping = h.guest.next_desc[0];
        h.guest.set_desc(0, looping, (IN_HDR, 40, F_NEXT), looping);
        h.guest.make_avail(0, looping);
        assert_eq!(h.serve(), Some(0));
        check_alive(&mut h);

        // A head index past the queue: skipped, nothing to complete.
        h.guest.make_avail(0, QSIZE + 3);
        assert_eq!(h.serve(), None);
        check_alive(&mut h);

        // Guest-chosen sizes that would be host allocations.
        let ioctl = IoctlIn {
            in_size: u32::MAX,
            out_size: u32::MAX,
            ..Default::default()
        };
        let r = h.call(Opcode::Ioctl, ROOT_ID, ioctl.as_slice());
        assert_eq!(r.result(), Err(libc::ENOTTY));
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        let fh = h.open(hello.nodeid, libc::O_RDONLY).unwrap();
        assert!(h.read(hello.nodeid, fh, 0, u32::MAX).is_err());
        assert!(h.read(hello.nodeid, fh + 1000, 0, 16).is_err());
        assert!(
            h.read(ROOT_ID, fh, 0, 16).is_err(),
            "a handle of another inode"
        );
        let batch = BatchForgetIn {
            count: u32::MAX,
            dummy: 0,
        };
        let descs = stage_request(&mem, Opcode::BatchForget as u32, 0, 5000, batch.as_slice());
        assert_eq!(h.submit(&descs), Some(0));
        // FORGET needs no reply, even malformed; the root is never forgotten.
        let descs = stage_request(&mem, Opcode::Forget as u32, ROOT_ID, 5001, &[1, 2]);
        assert_eq!(h.submit(&descs), Some(0));
        let forget = ForgetIn { nlookup: u64::MAX };
        let descs = stage_request(
            &mem,
            Opcode::Forget as u32,
            ROOT_ID,
            5002,
            forget.as_slice(),
        );
        assert_eq!(h.submit(&descs), Some(0));
        // SETUPMAPPING without a DAX window.
        let r = h.call(Opcode::SetupMapping, hello.nodeid, &[0; 40]);
        assert!(r.result().is_err());
        // DESTROY resets the backend, which keeps serving the root.
        let r = h.call(Opcode::Destroy, 0, &[]);
        assert_eq!(r.result(), Ok(&[][..]));
        check_alive(&mut h);
    }

    #[test]
    fn the_worker_serves_notifications_until_stopped() {
        // This thread shares the process's umask (it does not unshare).
        let umask = || {
            fs::read_to_string("/proc/thread-self/status")
                .unwrap()
                .lines()
                .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_owned()))
                .unwrap()
        };
        let process_umask = umask();
        let mem = test_mem();
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
        let mut dev = Fs::new("worker", dir.path(), false).unwrap();
        // Queue 0 is hiprio, queue 1 the request queue.
        let (hiprio, requests) = (0, 1);
        let mut g = Guest::new(&mem, NUM_QUEUES);
        let interrupt = interrupt();
        let notify = [eventfd(), eventfd()];
        let stop = eventfd();
        let activation = |queues| activation(&mem, &interrupt, queues, &notify, &stop);
        assert!(matches!(
            dev.activate(activation(vec![Queue::new(QSIZE).unwrap()])),
            Err(DeviceError::QueueCount { got: 1, want: 2 })
        ));
        dev.activate(activation(g.device_queues::<NUM_QUEUES>().into()))
            .unwrap();
        let worker = dev.take_worker().unwrap();
        assert_eq!(worker.thread().name(), Some("virtio-fs-worker"));
        let completed = |g: &mut Guest, q: usize| wait_for("virtio-fs", || g.used(q).pop());

        let init = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0,
            flags: 0,
        };
        let descs = stage_request(&mem, Opcode::Init as u32, 0, 6, init.as_slice());
        g.post(requests, &descs);
        notify[requests].write(1).unwrap();
        let (_, len) = completed(&mut g, requests);
        assert!(Reply::read(&mem, len).result().is_ok());
        // INIT made the backend clear the umask: the worker's own only.
        assert_eq!(umask(), process_umask);

        let descs = stage_request(&mem, Opcode::Lookup as u32, ROOT_ID, 7, &cstr("hello.txt"));
        let posted = g.post(requests, &descs);
        notify[requests].write(1).unwrap();
        let (head, len) = completed(&mut g, requests);
        assert_eq!(head, posted);
        let r = Reply::read(&mem, len);
        assert_eq!(r.header.unique, 7);
        let e: EntryOut = obj(r.result().unwrap());
        assert_eq!(e.attr.size, HELLO.len() as u64);
        assert_ne!(interrupt.status() & crate::virtio::INT_VRING, 0);
        assert!(interrupt.eventfd().read().unwrap() >= 1);

        // FORGET on the hiprio queue: completed, nothing written.
        let forget = ForgetIn { nlookup: 1 };
        let mut descs = stage_request(&mem, Opcode::Forget as u32, e.nodeid, 8, forget.as_slice());
        descs.truncate(2);
        let posted = g.post(hiprio, &descs);
        notify[hiprio].write(1).unwrap();
        assert_eq!(completed(&mut g, hiprio), (posted, 0));

        // A malformed request does not stop the worker.
        let posted = g.post(requests, &[(0xffff_0000, 40, 0)]);
        notify[requests].write(1).unwrap();
        assert_eq!(completed(&mut g, requests), (posted, 0));
        let descs = stage_request(
            &mem,
            Opcode::Getattr as u32,
            ROOT_ID,
            9,
            GetattrIn::default().as_slice(),
        );
        g.post(requests, &descs);
        notify[requests].write(1).unwrap();
        let (_, len) = completed(&mut g, requests);
        assert!(Reply::read(&mem, len).result().is_ok());

        stop.write(1).unwrap();
        wait_for("stop", || worker.is_finished().then_some(()));
        worker.join().unwrap();
        // The stop event is the VM's: still readable for the other devices.
        assert_eq!(stop.read().unwrap(), 1);
        // A device activates once.
        let queues = vec![Queue::new(QSIZE).unwrap(), Queue::new(QSIZE).unwrap()];
        assert!(matches!(
            dev.activate(activation(queues)),
            Err(DeviceError::Backend(_))
        ));
    }

    #[test]
    fn the_flags_linux_sends_still_open_files() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
        let sub = h.lookup(ROOT_ID, "sub").unwrap();
        let path = h.root.join("hello.txt");
        // execve(2) opens the binary with __FMODE_EXEC in f_flags.
        let exec = libc::O_RDONLY | KERNEL_O_LARGEFILE | 0x20;
        let fh = h.open(hello.nodeid, exec).unwrap();
        assert_eq!(h.read_flags(hello.nodeid, fh, 0, 64, exec).unwrap(), HELLO);
        let flags = libc::O_RDWR
            | KERNEL_O_LARGEFILE
            | libc::O_NONBLOCK
            | libc::O_NOATIME
            | libc::O_SYNC
            | libc::O_DIRECT
            | libc::O_APPEND;
        h.open(hello.nodeid, flags).unwrap();
        // The host descriptors: never O_DIRECT, always close-on-exec.
        let fds = fds_at(&path);
        assert!(fds.iter().all(|&(_, f)| f & libc::O_DIRECT == 0), "{fds:?}");
        assert!(
            fds.iter().all(|&(_, f)| f & libc::O_CLOEXEC != 0),
            "{fds:?}"
        );
        let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_NONBLOCK | KERNEL_O_LARGEFILE;
        let dh = h.opendir_flags(sub.nodeid, dir_flags).unwrap();
        assert_eq!(h.readdirplus(sub.nodeid, dh, 4096).unwrap(), []);
        // READ and WRITE whose flags differ from the handle's still work
        // (the guest changed them with fcntl).
        let fh = h.open(hello.nodeid, libc::O_RDWR).unwrap();
        let flags = libc::O_RDWR | libc::O_NONBLOCK | libc::O_NOATIME;
        assert_eq!(h.write_flags(hello.nodeid, fh, 0, b"HELLO", flags), Ok(5));
        assert_eq!(
            &h.read_flags(hello.nodeid, fh, 0, 5, flags).unwrap(),
            b"HELLO"
        );
        // Handles of another inode, or none, are EBADF.
        assert_eq!(h.read(sub.nodeid, fh, 0, 5), Err(libc::EBADF));
        assert_eq!(h.read(hello.nodeid, fh + 1000, 0, 5), Err(libc::EBADF));
        assert_eq!(h.read(hello.nodeid, dh, 0, 5), Err(libc::EBADF));

        // CREATE as open(O_CREAT) sends it, exclusive or not.
        let create = libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | KERNEL_O_LARGEFILE;
        let (new, fh) = h.create(ROOT_ID, "new.txt", create).unwrap();
        assert_eq!(h.write_flags(new.nodeid, fh, 0, b"new", create), Ok(3));
        let excl = libc::O_RDWR | libc::O_CREAT | libc::O_EXCL;
        assert_eq!(
            h.create(ROOT_ID, "new.txt", excl).map(drop),
            Err(libc::EEXIST)
        );
        // An existing file (another guest or the host made it meanwhile)
        // is opened, and truncated when asked.
        let (again, fh) = h.create(ROOT_ID, "new.txt", create).unwrap();
        assert_eq!(again.nodeid, new.nodeid);
        assert_eq!(fs::read(h.root.join("new.txt")).unwrap(), b"");
        assert_eq!(h.write_flags(new.nodeid, fh, 0, b"again", create), Ok(5));
        assert_eq!(
            h.create(ROOT_ID, "sub", libc::O_RDONLY | libc::O_CREAT)
                .map(drop),
            Err(libc::EISDIR)
        );
        let fds = fds_at(&h.root.join("new.txt"));
        assert!(
            fds.iter().all(|&(_, f)| f & libc::O_CLOEXEC != 0),
            "{fds:?}"
        );
        assert_eq!(h.fs.open_handles(), 6);
        assert_eq!(h.fs.live_inodes(), 3, "hello.txt, sub, new.txt");
    }

    #[test]
    fn request_lengths_past_the_chain_or_the_largest_request_are_refused() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let name = cstr("hello.txt");
        let stage = |mem: &Mem, unique: u64, len: u32| {
            let descs = stage_request(mem, Opcode::Lookup as u32, ROOT_ID, unique, &name);
            let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
            header.len = len;
            mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
            descs
        };
        let exact = (size_of::<InHeader>() + name.len()) as u32;
        // One byte more than the chain: the server would first allocate
        // it (EIO once the read fell short).
        let descs = stage(&mem, 10, exact + 1);
        assert_eq!(h.submit(&descs), Some(16));
        assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EINVAL));

        // A chain that really holds more than Linux ever sends (the same
        // guest memory twice): the largest request passes, one byte more
        // does not (the server would say ENOMEM).
        let big = |descs: &[Desc]| {
            let mut v = descs[..2].to_vec();
            v.push((0, MEM_SIZE as u32, 0));
            v.push((0, MEM_SIZE as u32, 0));
            v.extend_from_slice(&descs[2..]);
            v
        };
        let descs = big(&stage(&mem, 11, MAX_REQUEST_LEN as u32));
        let used = h.submit(&descs).unwrap();
        let e: EntryOut = obj(Reply::read(&mem, used).result().unwrap());
        assert_eq!(e.attr.size, HELLO.len() as u64);
        let descs = big(&stage(&mem, 12, MAX_REQUEST_LEN as u32 + 1));
        assert_eq!(h.submit(&descs), Some(16));
        assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EINVAL));

        // FORGETs get no reply, even refused.
        let batch = BatchForgetIn {
            count: 1000,
            dummy: 0,
        };
        let body = cat(&[batch.as_slice(), ForgetOne::default().as_slice()]);
        let descs = stage_request(&mem, Opcode::BatchForget as u32, 0, 13, &body);
        assert_eq!(h.submit(&descs), Some(0));
        let descs = stage_request(&mem, Opcode::Forget as u32, 2, 14, &[0; 8]);
        let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
        header.len = u32::MAX;
        mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
        assert_eq!(h.submit(&descs), Some(0));
        assert!(h.lookup(ROOT_ID, "hello.txt").is_ok());
    }

    #[test]
    fn forgotten_inodes_give_their_descriptors_back() {
        let mem = test_mem();
        let mut h = Harness::new(&mem, false);
        h.init();
        let names: Vec<String> = (0..20).map(|i| format!("f{i}")).collect();
        for name in &names {
            fs::write(h.root.join(name), name).unwrap();
        }
        let baseline = fds_under(&h.root);
        let mut nodes = Vec::new();
        for name in &names {
            nodes.push(h.lookup(ROOT_ID, name).unwrap().nodeid);
        }
        assert_eq!(fds_under(&h.root), baseline + 20);
        assert_eq!(h.fs.live_inodes(), 20);
        // Node ids are the host's inode numbers, under the (device, mount)
        // index: the same file gets the same one back after FORGET.
        let ino = fs::metadata(h.root.join("f0")).unwrap().ino();
        assert_eq!(nodes[0] & ((1 << 47) - 1), ino);

        // Two lookups need two forgets.
        assert_eq!(h.lookup(ROOT_ID, "f0").unwrap().nodeid, nodes[0]);
        h.forget(nodes[0], 1);
        assert_eq!(fds_under(&h.root), baseline + 20);
        for &node in &nodes[..10] {
            h.forget(node, 1);
        }
        let batch: Vec<_> = nodes[10..].iter().map(|&n| (n, 1)).collect();
        h.batch_forget(&batch);
        assert_eq!(fds_under(&h.root), baseline);
        assert_eq!(h.fs.live_inodes(), 0);
        assert_eq!(h.lookup(ROOT_ID, "f0").unwrap().nodeid, nodes[0]);
        h.forget(nodes[0], u64::MAX);

        // READDIRPLUS entries are lookups too; a handle is a descriptor
        // until released.
        let dh = h.opendir(ROOT_ID).unwrap();
        assert_eq!(fds_under(&h.root), baseline + 1);
        let entries = h.readdirplus(ROOT_ID, dh, 64 * 1024).unwrap();
        assert_eq!(entries.len(), 22, "f0..f19, hello.txt, sub");
        assert_eq!(h.fs.live_inodes(), 22);
        assert_eq!(h.fs.open_handles(), 1);
        let release = ReleaseIn {
            fh: dh,
            ..Default::default()
        };
        let r = h.call(Opcode::Releasedir, ROOT_ID, release.as_slice());
        assert_eq!(r.result(), Ok(&[][..]));
        let batch: Vec<_> = entries.iter().map(|(_, e)| (e.nodeid, 1)).collect();
        h.batch_forget(&batch);
        assert_eq!(fds_under(&h.root), baseline);
        assert_eq!((h.fs.live_inodes(), h.fs.open_handles()), (0, 0));
        // Forgetting what was never looked up, or more than was, changes
        // nothing.
        h.forget(nodes[3], 5);
        h.forget(ROOT_ID, 5);
        assert!(h.getattr(ROOT_ID).is_ok());
        assert_eq!(fds_under(&h.root), baseline);
    }

    #[test]
    fn beyond_the_descriptor_budget_new_inodes_get_enfile() {
        let mem = test_mem();
        let mut h = Harness::with_budget(&mem, false, Some(4));
        h.init();
        for i in 0..8 {
            fs::write(h.root.join(format!("f{i}")), b"x").unwrap();
        }
        let baseline = fds_under(&h.root);
        let mut nodes = Vec::new();
        for i in 0..4 {
            nodes.push(h.lookup(ROOT_ID, &format!("f{i}")).unwrap().nodeid);
        }
        assert_eq!(h.lookup(ROOT_ID, "f4"), Err(libc::ENFILE));
        assert_eq!(h.mkdir(ROOT_ID, "d").map(drop), Err(libc::ENFILE));
        // What the guest holds still works; opening takes a descriptor too.
        assert_eq!(h.lookup(ROOT_ID, "f0").unwrap().nodeid, nodes[0]);
        assert_eq!(h.open(nodes[0], libc::O_RDONLY), Err(libc::ENFILE));
        assert_eq!(h.opendir(ROOT_ID), Err(libc::ENFILE));
        assert_eq!(fds_under(&h.root), baseline + 4);
        assert_eq!(h.fs.live_inodes(), 4);

        // Room for a handle but not for the inode CREATE makes: neither
        // is kept.
        h.forget(nodes[0], 2);
        let dh = h.opendir(ROOT_ID).unwrap();
        h.forget(nodes[1], 1);
        assert_eq!(
            h.create(ROOT_ID, "new", libc::O_RDWR | libc::O_CREAT)
                .map(drop),
            Err(libc::ENFILE)
        );
        assert_eq!(fds_under(&h.root), baseline + 3);
        // READDIRPLUS stops at the budget, keeping what it returned.
        let listed = h.readdirplus(ROOT_ID, dh, 64 * 1024);
        let listed = listed.unwrap_or_default();
        assert!(listed.len() < 11, "{} entries", listed.len());
        assert!(h.fs.live_inodes() <= 3);
        assert_eq!(fds_under(&h.root), baseline + 1 + h.fs.live_inodes());
        let batch: Vec<_> = listed.iter().map(|(_, e)| (e.nodeid, 1)).collect();
        h.batch_forget(&batch);
        h.forget(nodes[2], 1);
        h.forget(nodes[3], 1);
        assert_eq!(h.fs.live_inodes(), 0);
        assert_eq!(fds_under(&h.root), baseline + 1);
        assert!(h.lookup(ROOT_ID, "f4").is_ok());
    }

    #[test]
    fn the_default_budget_leaves_the_vmm_a_reserve() {
        // As Fs::new, which other tests run meanwhile, does.
        raise_nofile_limit().unwrap();
        let soft = nofile_limit().unwrap().rlim_cur;
        let budget = default_fd_budget() as u64;
        assert!(budget < soft && budget >= soft / 2, "{budget} of {soft}");
        assert!(budget <= FD_BUDGET_MAX);
    }

    #[test]
    fn bind_mounts_are_announced_as_submounts() {
        // A mount namespace of its own: the thread's, which unshare gives.
        std::thread::spawn(submounts_in_a_private_namespace)
            .join()
            .unwrap();
    }

    fn mount(source: &str, target: &Path, fstype: &str, flags: libc::c_ulong) {
        let c = |s: &str| std::ffi::CString::new(s).unwrap();
        let (source, fstype) = (c(source), c(fstype));
        let target = c(target.to_str().unwrap());
        // SAFETY: mount(2) reads the NUL-terminated strings, which outlive
        // the call; no data argument.
        let r = unsafe {
            libc::mount(
                source.as_ptr(),
                target.as_ptr(),
                fstype.as_ptr(),
                flags,
                std::ptr::null(),
            )
        };
        assert_eq!(r, 0, "mount {target:?}: {}", io::Error::last_os_error());
    }

    fn submounts_in_a_private_namespace() {
        // SAFETY: unshare(2) takes no pointers; only this thread's mount
        // namespace (and root, cwd, umask) are detached.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNS) }, 0);
        mount("none", Path::new("/"), "", libc::MS_REC | libc::MS_PRIVATE);
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().canonicalize().unwrap();
        let root = base.join("share");
        for d in [
            "share/plain",
            "share/tmpfs",
            "share/bind",
            "share/vol",
            "src",
            "other",
        ] {
            fs::create_dir_all(base.join(d)).unwrap();
        }
        fs::write(root.join("file.txt"), b"x").unwrap();
        // Another filesystem, a bind of the same one, a bind of another.
        mount("tmpfs", &root.join("tmpfs"), "tmpfs", 0);
        fs::create_dir(root.join("tmpfs/inner")).unwrap();
        fs::create_dir(root.join("tmpfs/nested")).unwrap();
        fs::write(root.join("tmpfs/f.txt"), b"x").unwrap();
        mount("tmpfs", &root.join("tmpfs/nested"), "tmpfs", 0);
        mount(
            base.join("src").to_str().unwrap(),
            &root.join("bind"),
            "",
            libc::MS_BIND,
        );
        mount("tmpfs", &base.join("other"), "tmpfs", 0);
        fs::create_dir(base.join("other/d")).unwrap();
        mount(
            base.join("other/d").to_str().unwrap(),
            &root.join("vol"),
            "",
            libc::MS_BIND,
        );

        let mem = test_mem();
        let mut h = Harness::serving(&mem, 0, &root, false);
        let init = h.init();
        assert!(FsOptions::from_bits_truncate(u64::from(init.flags)).contains(FsOptions::SUBMOUNTS));
        let want = [
            ("plain", 0),
            ("tmpfs", ATTR_SUBMOUNT),
            ("bind", 0),
            ("vol", ATTR_SUBMOUNT),
            ("file.txt", 0),
            ("sub_missing", u32::MAX),
        ];
        let mut tmpfs = 0;
        for (name, flags) in want {
            match h.lookup(ROOT_ID, name) {
                Ok(e) => {
                    assert_eq!(e.attr.flags, flags, "LOOKUP {name}");
                    if name == "tmpfs" {
                        tmpfs = e.nodeid;
                    }
                }
                Err(e) => assert_eq!((e, flags), (libc::ENOENT, u32::MAX), "{name}"),
            }
        }
        // Below a submount, its parent is the submount.
        let within = [("inner", 0), ("nested", ATTR_SUBMOUNT), ("f.txt", 0)];
        for (name, flags) in within {
            assert_eq!(h.lookup(tmpfs, name).unwrap().attr.flags, flags, "{name}");
        }
        assert_eq!(h.mkdir(tmpfs, "made").unwrap().attr.flags, 0);
        // READDIRPLUS says what LOOKUP says.
        for (dir, expected) in [(ROOT_ID, &want[..5]), (tmpfs, &within[..])] {
            let dh = h.opendir(dir).unwrap();
            let entries = h.readdirplus(dir, dh, 64 * 1024).unwrap();
            for &(name, flags) in expected {
                let (_, e) = entries.iter().find(|(n, _)| n == name).unwrap();
                assert_eq!(e.attr.flags, flags, "READDIRPLUS {name}");
            }
        }
        drop(h);
        for m in [
            "share/vol",
            "other",
            "share/bind",
            "share/tmpfs/nested",
            "share/tmpfs",
        ] {
            let target = std::ffi::CString::new(base.join(m).to_str().unwrap()).unwrap();
            // SAFETY: umount2(2) reads the NUL-terminated path, which
            // outlives the call.
            let r = unsafe { libc::umount2(target.as_ptr(), libc::MNT_DETACH) };
            assert_eq!(r, 0, "umount {m}");
        }
    }

    /// Opcodes the server knows, and a few it does not.
    fn any_opcode() -> impl Strategy<Value = u32> {
        prop_oneof![8 => 1u32..=52, 1 => any::<u32>()]
    }

    fn any_nodeid() -> impl Strategy<Value = u64> {
        prop_oneof![Just(0u64), Just(ROOT_ID), 2u64..6, any::<u64>()]
    }

    fn any_reply_room() -> impl Strategy<Value = u32> {
        prop_oneof![Just(0u32), Just(8), Just(16), Just(200), Just(OUT_BODY_LEN)]
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(96))]

        /// Well-framed requests with random opcodes, targets and
        /// arguments (a few in a row, so later ones see what earlier ones
        /// made) are all completed, and the device then still works.
        #[test]
        fn random_requests_never_panic(
            reqs in proptest::collection::vec(
                (any_opcode(), any_nodeid(), proptest::collection::vec(any::<u8>(), 0..160), -48i64..48, any_reply_room()),
                1..5,
            ),
        ) {
            let mem = test_mem();
            let mut h = Harness::new(&mem, false);
            h.init();
            for (i, (opcode, nodeid, args, len_delta, room)) in reqs.into_iter().enumerate() {
                let unique = 100 + i as u64;
                let mut descs = stage_request(&mem, opcode, nodeid, unique, &args);
                let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
                header.len = (i64::from(header.len) + len_delta).clamp(0, u32::MAX.into()) as u32;
                header.uid = (nodeid % 3) as u32 * 1000;
                mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
                let last = descs.len() - 1;
                descs[last].1 = room;
                let used = h.submit(&descs);
                prop_assert!(used.is_some());
                prop_assert!(used.unwrap() as usize <= OUT_HEADER_LEN + room as usize);
            }
            prop_assert!(h.getattr(ROOT_ID).is_ok());
        }

        /// Arbitrary bytes as a request, split across descriptors anyhow.
        #[test]
        fn random_bytes_as_a_request_never_panic(
            bytes in proptest::collection::vec(any::<u8>(), 0..400),
            split in 0usize..400,
            room in any_reply_room(),
        ) {
            let mem = test_mem();
            let mut h = Harness::new(&mem, false);
            h.init();
            mem.write_slice(&bytes, GuestAddress(IN_HDR)).unwrap();
            let split = split.min(bytes.len());
            let descs = [
                (IN_HDR, split as u32, 0),
                (IN_HDR + split as u64, (bytes.len() - split) as u32, 0),
                (OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE),
                (OUT_BODY, room, F_WRITE),
            ];
            prop_assert!(h.submit(&descs).is_some());
            prop_assert!(h.getattr(ROOT_ID).is_ok());
        }
    }
}
