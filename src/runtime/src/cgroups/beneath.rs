//! File operations confined beneath a cgroup mount: every path is
//! resolved from a descriptor of the mount with `openat2(RESOLVE_BENEATH |
//! RESOLVE_NO_SYMLINKS | RESOLVE_NO_XDEV)`, so neither a `..` nor a symlink
//! (nor a mount placed on top of a cgroup) takes a read, write, mkdir or
//! rmdir outside the hierarchy, whatever the path says.

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::path::{Component, Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat2, OFlag, OpenHow, ResolveFlag};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::{unlinkat, UnlinkatFlags};

use super::CgroupError;

/// A cgroup mount, opened.
pub(super) struct Beneath {
    mount: PathBuf,
    fd: OwnedFd,
}

fn how(flags: OFlag) -> OpenHow {
    OpenHow::new().flags(flags | OFlag::O_CLOEXEC).resolve(
        ResolveFlag::RESOLVE_BENEATH
            | ResolveFlag::RESOLVE_NO_SYMLINKS
            | ResolveFlag::RESOLVE_NO_XDEV,
    )
}

impl Beneath {
    pub(super) fn open(mount: &Path) -> Result<Beneath, CgroupError> {
        let fd = nix::fcntl::open(
            mount,
            OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
            Mode::empty(),
        )
        .map_err(|e| io_err(mount, "opening", e))?;
        Ok(Beneath {
            mount: mount.to_path_buf(),
            fd,
        })
    }

    /// `rel` below the mount, for messages.
    pub(super) fn show(&self, rel: &Path) -> PathBuf {
        self.mount.join(rel)
    }

    fn open_at(&self, rel: &Path, flags: OFlag) -> nix::Result<OwnedFd> {
        let rel = if rel.as_os_str().is_empty() {
            Path::new(".")
        } else {
            rel
        };
        openat2(&self.fd, rel, how(flags))
    }

    /// Creates `rel` and its missing parents; calls `made` with each
    /// directory of the path, top down, existing or new.
    pub(super) fn mkdir_all(
        &self,
        rel: &Path,
        mut made: impl FnMut(&Path) -> Result<(), CgroupError>,
    ) -> Result<(), CgroupError> {
        let mut at = PathBuf::new();
        for c in rel.components() {
            let Component::Normal(name) = c else {
                return Err(CgroupError::BadPath(self.show(rel)));
            };
            let parent = self
                .open_at(&at, OFlag::O_PATH | OFlag::O_DIRECTORY)
                .map_err(|e| io_err(&self.show(&at), "opening", e))?;
            at.push(name);
            match mkdirat(&parent, name, Mode::from_bits_truncate(0o755)) {
                Ok(()) | Err(Errno::EEXIST) => {}
                Err(e) => return Err(io_err(&self.show(&at), "creating", e)),
            }
            made(&at)?;
        }
        Ok(())
    }

    /// Removes the empty directory `rel`.
    pub(super) fn rmdir(&self, rel: &Path) -> nix::Result<()> {
        let (Some(parent), Some(name)) = (rel.parent(), rel.file_name()) else {
            return Err(Errno::EINVAL);
        };
        let dir = self.open_at(parent, OFlag::O_PATH | OFlag::O_DIRECTORY)?;
        unlinkat(&dir, name, UnlinkatFlags::RemoveDir)
    }

    /// The sub-directories of `rel` (none when it is gone).
    pub(super) fn children(&self, rel: &Path) -> Vec<PathBuf> {
        let Ok(fd) = self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY) else {
            return Vec::new();
        };
        let Ok(dir) = nix::dir::Dir::from_fd(fd) else {
            return Vec::new();
        };
        dir.into_iter()
            .flatten()
            .filter(|e| e.file_type() == Some(nix::dir::Type::Directory))
            .filter_map(|e| {
                let name = e.file_name().to_str().ok()?.to_string();
                (name != "." && name != "..").then(|| rel.join(name))
            })
            .collect()
    }

    /// Whether `rel` exists.
    #[cfg(test)]
    pub(super) fn exists(&self, rel: &Path) -> bool {
        self.open_at(rel, OFlag::O_PATH).is_ok()
    }

    /// The contents of file `rel`, trimmed.
    pub(super) fn read(&self, rel: &Path) -> Result<String, CgroupError> {
        let fd = self
            .open_at(rel, OFlag::O_RDONLY)
            .map_err(|e| io_err(&self.show(rel), "reading", e))?;
        let mut s = String::new();
        std::fs::File::from(fd)
            .read_to_string(&mut s)
            .map_err(|source| CgroupError::Io {
                path: self.show(rel),
                action: "reading",
                source,
            })?;
        Ok(s.trim().to_string())
    }

    /// The directory `rel`, opened read-only (for `CLONE_INTO_CGROUP`).
    pub(super) fn dir(&self, rel: &Path) -> Result<OwnedFd, CgroupError> {
        self.open_at(rel, OFlag::O_RDONLY | OFlag::O_DIRECTORY)
            .map_err(|e| io_err(&self.show(rel), "opening", e))
    }

    /// Writes `value` into file `rel` (which must exist: cgroupfs makes
    /// its files itself), in one write as the kernel wants.
    pub(super) fn write(&self, rel: &Path, value: &str) -> Result<(), CgroupError> {
        let fail = |source| CgroupError::Write {
            path: self.show(rel),
            value: value.to_string(),
            source,
        };
        let fd = self
            .open_at(rel, OFlag::O_WRONLY | OFlag::O_TRUNC)
            .map_err(|e| fail(e.into()))?;
        std::fs::File::from(fd)
            .write_all(value.as_bytes())
            .map_err(fail)
    }
}

fn io_err(path: &Path, action: &'static str, e: Errno) -> CgroupError {
    CgroupError::Io {
        path: path.to_path_buf(),
        action,
        source: e.into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_is_reached_through_a_symlink_or_above_the_mount() {
        let t = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("f"), "secret").unwrap();
        std::os::unix::fs::symlink(outside.path(), t.path().join("link")).unwrap();
        let b = Beneath::open(t.path()).unwrap();
        assert!(b.mkdir_all(Path::new("link/x"), |_| Ok(())).is_err());
        assert!(!outside.path().join("x").exists());
        assert!(b.read(Path::new("link/f")).is_err());
        assert!(b.write(Path::new("link/f"), "1").is_err());
        assert!(matches!(
            b.mkdir_all(Path::new("../up"), |_| Ok(())),
            Err(CgroupError::BadPath(_))
        ));
        assert!(b.read(Path::new("../f")).is_err());
        assert!(b
            .rmdir(Path::new("link"))
            .is_err_and(|e| e == Errno::ENOTDIR));
        assert_eq!(
            std::fs::read_to_string(outside.path().join("f")).unwrap(),
            "secret"
        );
    }

    #[test]
    fn mkdir_all_visits_each_level_and_rmdir_removes_the_leaf() {
        let t = tempfile::tempdir().unwrap();
        let b = Beneath::open(t.path()).unwrap();
        let mut seen = Vec::new();
        b.mkdir_all(Path::new("a/b/c"), |p| {
            seen.push(p.to_path_buf());
            Ok(())
        })
        .unwrap();
        assert_eq!(seen, [Path::new("a"), Path::new("a/b"), Path::new("a/b/c")]);
        assert_eq!(b.children(Path::new("a/b")), [Path::new("a/b/c")]);
        b.rmdir(Path::new("a/b/c")).unwrap();
        assert!(!b.exists(Path::new("a/b/c")) && b.exists(Path::new("a/b")));
    }
}
