//! The one directory of the host a VM's guest sees: composed per VM.
//!
//! A guest reaches the host's files only through its virtio-fs share, and
//! that share is not any directory of the host but one the runtime builds
//! for the VM (for a pod's VM, for the pod), Kata's shared-directory model:
//!
//! ```text
//! DIR/w            tmpfs, read-write, seen only by the host (MS_SHARED)
//! DIR/s            a read-only bind of DIR/w, its peer: THE share
//! DIR/w/ID/rootfs  the container's root filesystem, bind-mounted
//! DIR/w/ID/mHASH   the source of one of the bundle's mounts (named by its
//!                  destination: [`bind_name`]), a directory or a single
//!                  file, bind-mounted (read-only when the mount is)
//! ```
//!
//! What the guest can reach is exactly its containers' roots and volumes:
//! nothing of a bind source's parent directory (a bound `/etc/hosts` does
//! not bring the engine's run directory along), nothing of the staging
//! directory itself (the tmpfs is read-only as the guest sees it, so it
//! cannot plant a name there for the host to trip over later), and every
//! bind is a clone of its source mount tree with `nosuid`, `nodev` and
//! `nosymfollow` on the host side (`rdonly` too for a read-only mount), so
//! a guest that remounts its volume read-write still gets EROFS and no
//! host-side path walk through the share follows a symlink the guest made.
//! The guest sees the file modes it always did: those flags only govern
//! what the host does through these mounts.
//!
//! Bind sources are resolved on the host, symlinks followed, as runc does
//! (`/usr/libexec/podman/catatonit` is a symlink). Mount points are made
//! with `mkdirat`/`openat(O_EXCL|O_NOFOLLOW)` below a descriptor of the
//! staging tmpfs and filled with `move_mount` onto a descriptor, so no
//! path is followed on the way. Mounts made under `w` later (a pod's next
//! container) propagate to `s`, in every mount namespace that has a copy
//! (virtiofsd's sandbox).
//!
//! Removal never deletes recursively through a mount: [`teardown`] and
//! [`remove_tree`] unmount, then remove only what is left on the parent
//! filesystem.

use std::ffi::{CString, OsStr};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

pub use krun_proto::SHARE_TAG;

/// Errors composing a share.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("preparing the VM's share at {path}: {what}")]
    Prepare {
        path: PathBuf,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("{field}: binding {source_path} into the VM's share")]
    Bind {
        field: String,
        source_path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{field}: {source_path} changed between planning and mounting (it is now {now})")]
    Changed {
        field: String,
        source_path: PathBuf,
        now: &'static str,
    },
    #[error("container {0:?} is already in this VM's share")]
    Exists(String),
}

/// A host path given to a container: its root or one bind mount's source.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostBind {
    /// The name in the container's directory of the share (`rootfs`, or
    /// [`bind_name`]'s).
    pub name: String,
    /// The config field it comes from, for errors (`root.path`,
    /// `mounts[3].source`).
    pub field: String,
    pub source: PathBuf,
    pub readonly: bool,
    /// A regular file rather than a directory.
    pub file: bool,
    /// Bound idmapped through these mappings ([`crate::idmap`]).
    pub idmap: Option<krun_proto::UserNsSetup>,
}

/// What of the host one container is given.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ContainerPaths {
    pub id: String,
    /// The root filesystem first, then the bind sources in mount order.
    pub binds: Vec<HostBind>,
}

/// Where the root filesystem of container `id` is in the share.
pub fn root_path(id: &str) -> String {
    format!("{id}/rootfs")
}

/// The name in the share of the source of the `nth` (from 0) mount of a
/// container on `destination`. Named by destination, not by place in the
/// mount list: a restored VM finds its binds again by these names, and an
/// engine may list the same mounts in another order for the restore
/// (podman's `restore --import` does).
pub fn bind_name(destination: &Path, nth: usize) -> String {
    use sha2::Digest as _;
    let hash = sha2::Sha256::digest(destination.as_os_str().as_bytes());
    let hex: String = hash[..8].iter().map(|b| format!("{b:02x}")).collect();
    match nth {
        0 => format!("m{hex}"),
        n => format!("m{hex}-{n}"),
    }
}

/// Where bind `name` ([`bind_name`]) of container `id` is in the share.
pub fn bind_path(id: &str, name: &str) -> String {
    format!("{id}/{name}")
}

/// A composed share. The value [`Staging::create`] returns owns it:
/// dropping that one unmounts and removes it. One from [`Staging::open`]
/// (adding a pod's member) leaves it be.
pub struct Staging {
    dir: PathBuf,
    /// `DIR/w`, opened O_PATH: every mount point is made beneath it.
    work: OwnedFd,
    owner: bool,
}

impl Drop for Staging {
    fn drop(&mut self) {
        if self.owner {
            teardown(&self.dir);
        }
    }
}

impl Staging {
    /// Makes the staging directory `dir` (which must not exist, or be left
    /// over empty from a crash) and mounts its two views.
    pub fn create(dir: &Path) -> Result<Staging, StagingError> {
        let err = |what| {
            let path = dir.to_path_buf();
            move |source| StagingError::Prepare { path, what, source }
        };
        teardown(dir);
        if let Some(parent) = dir.parent() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)
                .map_err(err("creating its parent directory"))?;
        }
        mkdir(dir, 0o700).map_err(err("creating the directory"))?;
        let (w, s) = (dir.join("w"), dir.join("s"));
        let made = (|| {
            mkdir(&w, 0o700).map_err(err("creating w"))?;
            mkdir(&s, 0o700).map_err(err("creating s"))?;
            let fsflags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC | MS_NOSYMFOLLOW;
            mount(
                Some(Path::new("krun-share")),
                &w,
                Some("tmpfs"),
                fsflags,
                Some("mode=0755,size=1m,nr_inodes=65536"),
            )
            .map_err(err("mounting its tmpfs"))?;
            mount(None, &w, None, libc::MS_SHARED, None).map_err(err("sharing w"))?;
            mount(Some(&w), &s, None, libc::MS_BIND, None).map_err(err("binding w on s"))?;
            mount(
                None,
                &s,
                None,
                libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY | fsflags,
                None,
            )
            .map_err(err("making s read-only"))?;
            open_path(&w).map_err(err("opening w"))
        })();
        match made {
            Ok(work) => Ok(Staging {
                dir: dir.to_path_buf(),
                work,
                owner: true,
            }),
            Err(e) => {
                teardown(dir);
                Err(e)
            }
        }
    }

    /// Opens an existing staging directory (a pod's, to add a member).
    pub fn open(dir: &Path) -> Result<Staging, StagingError> {
        let work = open_path(&dir.join("w")).map_err(|source| StagingError::Prepare {
            path: dir.to_path_buf(),
            what: "opening w",
            source,
        })?;
        Ok(Staging {
            dir: dir.to_path_buf(),
            work,
            owner: false,
        })
    }

    /// The directory to share with the VM.
    pub fn shared_dir(&self) -> PathBuf {
        self.dir.join("s")
    }

    /// Binds a container's root and volumes into the share, under its id.
    /// On error nothing of it is left.
    pub fn add(&self, c: &ContainerPaths) -> Result<(), StagingError> {
        let trees = Trees::clone_from(c)?;
        self.add_trees(c, trees)
    }

    /// Binds the trees [`Trees::clone_from`] took of `c`'s paths (perhaps
    /// in another mount namespace: a pod member's create clones them in
    /// the host's, and attaches them in the pod VM's monitor's) into the
    /// share, under `c`'s id. On error nothing of it is left.
    pub fn add_trees(&self, c: &ContainerPaths, trees: Trees) -> Result<(), StagingError> {
        let id = c.id.as_str();
        let prep = |what| {
            let path = self.dir.join("w").join(id);
            move |source| StagingError::Prepare { path, what, source }
        };
        match mkdirat(&self.work, OsStr::new(id), 0o755) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => {
                return Err(StagingError::Exists(id.to_string()))
            }
            r => r.map_err(prep("creating the container's directory"))?,
        }
        let result = (|| {
            let cdir = openat_path(&self.work, OsStr::new(id), libc::O_DIRECTORY)
                .map_err(prep("opening the container's directory"))?;
            for (b, tree) in c.binds.iter().zip(trees.0) {
                place(&cdir, b, &tree)?;
            }
            Ok(())
        })();
        if result.is_err() {
            self.remove(id);
        }
        result
    }

    /// Unbinds container `id`'s paths and removes its directory.
    pub fn remove(&self, id: &str) {
        let cdir = self.dir.join("w").join(id);
        unmount_all_below(&cdir);
        let _ = remove_tree(&cdir);
    }

    /// Unmounts the share and removes the staging directory (whether or
    /// not this value owns it).
    pub fn destroy(mut self) {
        self.owner = true;
    }
}

/// Detached clones of the mount trees of one container's paths, in the
/// order of its binds, each checked against the plan and with the
/// host-side flags already applied: what the mount points in a share get.
pub struct Trees(Vec<OwnedFd>);

impl Trees {
    /// Clones the mount tree at each of `c`'s paths (symlinks followed, as
    /// runc resolves a bind source), in the calling mount namespace.
    pub fn clone_from(c: &ContainerPaths) -> Result<Trees, StagingError> {
        c.binds
            .iter()
            .map(detach)
            .collect::<Result<_, _>>()
            .map(Trees)
    }
}

/// A clone of `b`'s source mount tree, checked to be what the plan saw
/// (a directory or a file), with `nosuid`, `nodev`, `nosymfollow` (and
/// `rdonly` for a read-only mount) set on every mount of it.
fn detach(b: &HostBind) -> Result<OwnedFd, StagingError> {
    let bind_err = |source| StagingError::Bind {
        field: b.field.clone(),
        source_path: b.source.clone(),
        source,
    };
    let tree = open_tree(&b.source).map_err(bind_err)?;
    let md = fstat(&tree).map_err(bind_err)?;
    let kind = md.st_mode & libc::S_IFMT;
    let now = match kind {
        libc::S_IFDIR => "a directory",
        libc::S_IFREG => "a file",
        _ => "neither a file nor a directory",
    };
    if (kind == libc::S_IFREG) != b.file || !matches!(kind, libc::S_IFDIR | libc::S_IFREG) {
        return Err(StagingError::Changed {
            field: b.field.clone(),
            source_path: b.source.clone(),
            now,
        });
    }
    let mut attrs = libc::MOUNT_ATTR_NOSUID | libc::MOUNT_ATTR_NODEV | libc::MOUNT_ATTR_NOSYMFOLLOW;
    if b.readonly {
        attrs |= libc::MOUNT_ATTR_RDONLY;
    }
    mount_setattr(&tree, attrs, libc::MS_PRIVATE, None).map_err(bind_err)?;
    if let Some(maps) = &b.idmap {
        let ns = crate::idmap::user_namespace(maps).map_err(bind_err)?;
        crate::idmap::idmap_tree(&tree, &ns).map_err(bind_err)?;
    }
    Ok(tree)
}

/// Makes the mount point `b.name` below `parent` and moves `tree` (the
/// [`detach`]ed clone of `b`'s source) onto it.
fn place(parent: &OwnedFd, b: &HostBind, tree: &OwnedFd) -> Result<(), StagingError> {
    let bind_err = |source| StagingError::Bind {
        field: b.field.clone(),
        source_path: b.source.clone(),
        source,
    };
    let name = OsStr::new(&b.name);
    if b.file {
        openat_create(parent, name).map_err(bind_err)?;
    } else {
        mkdirat(parent, name, 0o755).map_err(bind_err)?;
    }
    let target = openat_path(parent, name, 0).map_err(bind_err)?;
    move_mount(tree, &target).map_err(bind_err)
}

/// Unmounts and removes a staging directory, whatever state it is in
/// (`delete` after a crash, a stale pod directory). Never deletes through
/// a mount.
pub fn teardown(dir: &Path) {
    for view in ["s", "w"] {
        let p = dir.join(view);
        while umount(&p).is_ok() {}
    }
    let _ = remove_tree(dir);
}

/// Unmounts (lazily) everything mounted below `dir`, deepest first.
fn unmount_all_below(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let p = e.path();
        while umount(&p).is_ok() {}
    }
}

/// Removes `path` and what is below it, like `remove_dir_all`, but never
/// crosses into another mount: an entry on a different mount (a bind
/// mount that is still there) stops the removal with EBUSY, and nothing
/// below it is touched.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    let top = match mount_id(path) {
        Ok(id) => id,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    remove_below(path, top)
}

fn remove_below(path: &Path, top: u64) -> io::Result<()> {
    let md = std::fs::symlink_metadata(path)?;
    if !md.is_dir() {
        return std::fs::remove_file(path);
    }
    if mount_id(path)? != top {
        return Err(io::Error::new(
            io::ErrorKind::ResourceBusy,
            format!("{} is a mount point; not removing it", path.display()),
        ));
    }
    let mut first_err = None;
    for e in std::fs::read_dir(path)? {
        if let Err(err) = remove_below(&e?.path(), top) {
            first_err.get_or_insert(err);
        }
    }
    match first_err {
        Some(e) => Err(e),
        None => std::fs::remove_dir(path),
    }
}

/// The id of the mount `path` (not followed if a symlink) is on.
fn mount_id(path: &Path) -> io::Result<u64> {
    let c = cpath(path)?;
    // SAFETY: statx is a plain struct of integers, valid when zeroed.
    let mut stx: libc::statx = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a NUL-terminated path and `stx` a writable statx that
    // outlive the call.
    let r = unsafe {
        libc::statx(
            libc::AT_FDCWD,
            c.as_ptr(),
            libc::AT_SYMLINK_NOFOLLOW,
            libc::STATX_MNT_ID,
            &mut stx,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    if stx.stx_mask & libc::STATX_MNT_ID == 0 {
        return Err(io::Error::other("the kernel does not report mount ids"));
    }
    Ok(stx.stx_mnt_id)
}

/// MS_NOSYMFOLLOW (Linux 5.10), which libc does not name.
const MS_NOSYMFOLLOW: libc::c_ulong = 256;

fn cpath(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn cname(n: &OsStr) -> io::Result<CString> {
    if n.is_empty() || n.as_bytes().contains(&b'/') || n == "." || n == ".." {
        return Err(io::Error::from_raw_os_error(libc::EINVAL));
    }
    CString::new(n.as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

fn check(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

fn owned(fd: libc::c_long) -> io::Result<OwnedFd> {
    let fd = check(fd as libc::c_int)?;
    // SAFETY: the kernel just returned this new descriptor; nothing else
    // owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
}

fn mkdir(p: &Path, mode: libc::mode_t) -> io::Result<()> {
    let c = cpath(p)?;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    check(unsafe { libc::mkdir(c.as_ptr(), mode) }).map(drop)
}

fn mkdirat(dir: &OwnedFd, name: &OsStr, mode: libc::mode_t) -> io::Result<()> {
    let c = cname(name)?;
    // SAFETY: `dir` is an open descriptor and `c` a NUL-terminated name;
    // both outlive the call.
    check(unsafe { libc::mkdirat(dir.as_raw_fd(), c.as_ptr(), mode) }).map(drop)
}

/// An O_PATH descriptor of `p` (an absolute path of the host's).
fn open_path(p: &Path) -> io::Result<OwnedFd> {
    let c = cpath(p)?;
    let flags = libc::O_PATH | libc::O_DIRECTORY | libc::O_CLOEXEC;
    // SAFETY: `c` is a NUL-terminated path that outlives the call.
    owned(unsafe { libc::open(c.as_ptr(), flags) } as libc::c_long)
}

/// An O_PATH descriptor of `name` below `dir`, the name never followed.
fn openat_path(dir: &OwnedFd, name: &OsStr, extra: libc::c_int) -> io::Result<OwnedFd> {
    let c = cname(name)?;
    let flags = libc::O_PATH | libc::O_NOFOLLOW | libc::O_CLOEXEC | extra;
    // SAFETY: `dir` is open and `c` NUL-terminated; both outlive the call.
    owned(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags) } as libc::c_long)
}

/// Creates the empty file `name` below `dir` (a mount point for a file).
fn openat_create(dir: &OwnedFd, name: &OsStr) -> io::Result<()> {
    let c = cname(name)?;
    let flags = libc::O_CREAT | libc::O_EXCL | libc::O_NOFOLLOW | libc::O_WRONLY | libc::O_CLOEXEC;
    // SAFETY: `dir` is open and `c` NUL-terminated; both outlive the call.
    owned(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0o644) } as libc::c_long)
        .map(drop)
}

fn fstat(fd: &OwnedFd) -> io::Result<libc::stat> {
    // SAFETY: stat is a plain struct of integers, valid when zeroed.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    // SAFETY: `fd` is open and `st` writable; both outlive the call.
    check(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) })?;
    Ok(st)
}

/// A detached clone of the mount tree at `source` (symlinks followed).
fn open_tree(source: &Path) -> io::Result<OwnedFd> {
    let c = cpath(source)?;
    let flags = libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC | libc::AT_RECURSIVE as u32;
    // SAFETY: open_tree(2) reads the NUL-terminated path `c`, which
    // outlives the call, and returns a new descriptor or -1.
    owned(unsafe { libc::syscall(libc::SYS_open_tree, libc::AT_FDCWD, c.as_ptr(), flags) })
}

/// Sets `attrs` and the propagation on every mount of a detached tree;
/// with `userns`, idmaps them through it too (`MOUNT_ATTR_IDMAP`).
pub(crate) fn mount_setattr(
    tree: &OwnedFd,
    attrs: u64,
    propagation: libc::c_ulong,
    userns: Option<&OwnedFd>,
) -> io::Result<()> {
    let attr = libc::mount_attr {
        attr_set: attrs | userns.map_or(0, |_| libc::MOUNT_ATTR_IDMAP),
        attr_clr: 0,
        propagation,
        userns_fd: userns.map_or(0, |u| u.as_raw_fd() as u64),
    };
    let empty = c"";
    // SAFETY: `tree` (and `userns`) are open; `empty` and `attr` outlive
    // the call, and the size passed is the size of `attr`.
    let r = unsafe {
        libc::syscall(
            libc::SYS_mount_setattr,
            tree.as_raw_fd(),
            empty.as_ptr(),
            libc::AT_EMPTY_PATH | libc::AT_RECURSIVE,
            &attr as *const libc::mount_attr,
            std::mem::size_of::<libc::mount_attr>(),
        )
    };
    check(r as libc::c_int).map(drop)
}

/// Attaches the detached tree `tree` onto the mount point `target`.
fn move_mount(tree: &OwnedFd, target: &OwnedFd) -> io::Result<()> {
    let empty = c"";
    let flags = libc::MOVE_MOUNT_F_EMPTY_PATH | libc::MOVE_MOUNT_T_EMPTY_PATH;
    // SAFETY: both descriptors are open and `empty` outlives the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            empty.as_ptr(),
            target.as_raw_fd(),
            empty.as_ptr(),
            flags,
        )
    };
    check(r as libc::c_int).map(drop)
}

fn mount(
    source: Option<&Path>,
    target: &Path,
    fstype: Option<&str>,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    nix::mount::mount(
        source,
        target,
        fstype,
        nix::mount::MsFlags::from_bits_retain(flags),
        data,
    )
    .map_err(io::Error::from)
}

/// Unmounts `p` lazily, never following a symlink at it.
fn umount(p: &Path) -> io::Result<()> {
    nix::mount::umount2(
        p,
        nix::mount::MntFlags::MNT_DETACH | nix::mount::MntFlags::UMOUNT_NOFOLLOW,
    )
    .map_err(io::Error::from)
}

#[cfg(test)]
mod tests;
