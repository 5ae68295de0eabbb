//! The mount points a restored VM expects in its container's root.
//!
//! guest-init makes each mount's destination in the root filesystem when it
//! is missing (an empty file for a file bind such as `/etc/hosts`, else a
//! directory), through the share, before it mounts there. The guest kernel
//! then holds those nodes, so a checkpoint's file-server state names them
//! and a restore finds them again by path. A root filesystem the engine
//! rebuilt (`podman container restore --import` applies the checkpoint's
//! root changes to a new layer and leaves out the mount points it knows
//! are its own, as runc leaves them to itself) does not have them: the
//! restore makes them first, as runc's restore makes CRIU's.
//!
//! The root is the guest's: this runs before the VM does, but the tree may
//! hold whatever the guest left. No link is followed: every component is
//! opened `O_NOFOLLOW` from the one before, made with `mkdirat`/`openat(
//! O_EXCL)`; a destination reached through a symlink is left to the restore
//! (which then fails by name if it needed it), never made elsewhere.

use std::ffi::OsStr;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use krun_proto::{MountSetup, MountSource};

use crate::plan::host_cgroup::clean;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{mkdirat, Mode};

/// Makes the missing mount points of `mounts` below `root` (the container's
/// root filesystem on the host). Only mounts on the root filesystem itself:
/// one below an earlier mount's destination is on that mount in the guest.
/// Returns the destinations it made.
pub fn make(root: &Path, mounts: &[MountSetup]) -> io::Result<Vec<String>> {
    let root_fd = nix::fcntl::open(
        root,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| io::Error::other(format!("opening {}: {e}", root.display())))?;
    let cleaned: Vec<_> = mounts.iter().map(|m| clean(&m.destination)).collect();
    let mut made = Vec::new();
    for (i, m) in mounts.iter().enumerate() {
        let dest = &cleaned[i];
        if dest.as_os_str().is_empty() {
            continue;
        }
        if cleaned[..i].iter().any(|e| dest.starts_with(e)) {
            continue;
        }
        let dest: Vec<&OsStr> = dest.iter().collect();
        let file = matches!(m.source, MountSource::Share { file: true, .. });
        let did = make_one(&root_fd, &dest, file).map_err(|e| {
            io::Error::new(
                e.kind(),
                format!(
                    "making mount point {} in {}: {e}",
                    m.destination,
                    root.display()
                ),
            )
        })?;
        if did {
            made.push(m.destination.clone());
        }
    }
    Ok(made)
}

/// Makes `dest` below `root` if it is missing; false if it was there, or
/// if it is reached through something other than a directory (a symlink).
fn make_one(root: &OwnedFd, dest: &[&OsStr], file: bool) -> io::Result<bool> {
    let (last, parents) = dest.split_last().expect("a destination");
    let mut dir = root.try_clone()?;
    for name in parents {
        match open_dir(&dir, name) {
            Ok(next) => dir = next,
            Err(Errno::ENOENT) => {
                match mkdirat(dir.as_fd(), *name, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(e.into()),
                }
                dir = match open_dir(&dir, name) {
                    Ok(d) => d,
                    Err(Errno::ELOOP | Errno::ENOTDIR) => return Ok(false),
                    Err(e) => return Err(e.into()),
                };
            }
            // A symlink or a file on the way: not followed.
            Err(Errno::ELOOP | Errno::ENOTDIR) => return Ok(false),
            Err(e) => return Err(e.into()),
        }
    }
    let made = if file {
        openat(
            dir.as_fd(),
            *last,
            OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
            Mode::from_bits_truncate(0o644),
        )
        .map(drop)
    } else {
        mkdirat(dir.as_fd(), *last, Mode::from_bits_truncate(0o755))
    };
    match made {
        Ok(()) => Ok(true),
        Err(Errno::EEXIST) => Ok(false),
        Err(e) => Err(e.into()),
    }
}

fn open_dir(dir: &OwnedFd, name: &OsStr) -> Result<OwnedFd, Errno> {
    openat(
        dir.as_fd(),
        name,
        OFlag::O_PATH | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mount(dest: &str, source: MountSource) -> MountSetup {
        MountSetup {
            destination: dest.into(),
            source,
            flags: 0,
            propagation: 0,
            data: String::new(),
        }
    }

    fn file_bind(dest: &str) -> MountSetup {
        mount(
            dest,
            MountSource::Share {
                tag: "krun".into(),
                path: "c/m1".into(),
                file: true,
            },
        )
    }

    fn fs(dest: &str) -> MountSetup {
        mount(
            dest,
            MountSource::Fs {
                fstype: "tmpfs".into(),
                source: "tmpfs".into(),
            },
        )
    }

    #[test]
    fn missing_mount_points_are_made_as_guest_init_makes_them() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path();
        std::fs::create_dir(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "kept").unwrap();
        let mounts = [
            fs("/dev"),
            fs("/dev/shm"),
            file_bind("/etc/hosts"),
            file_bind("/etc/hostname"),
            file_bind("/run/.containerenv"),
            fs("/a/../data"),
        ];
        let made = make(root, &mounts).unwrap();
        assert_eq!(
            made,
            ["/dev", "/etc/hosts", "/run/.containerenv", "/a/../data"]
        );
        assert!(root.join("dev").is_dir());
        // On the guest's /dev tmpfs, not the root's.
        assert!(!root.join("dev/shm").exists());
        assert!(root.join("etc/hosts").is_file());
        assert_eq!(
            std::fs::read_to_string(root.join("etc/hostname")).unwrap(),
            "kept"
        );
        assert!(root.join("run/.containerenv").is_file());
        assert!(root.join("data").is_dir());
        assert!(!root.join("a").exists());
        // A second time makes nothing.
        assert!(make(root, &mounts).unwrap().is_empty());
    }

    #[test]
    fn no_link_in_the_root_is_followed() {
        let t = tempfile::tempdir().unwrap();
        let root = t.path().join("root");
        let outside = t.path().join("outside");
        std::fs::create_dir_all(&root).unwrap();
        std::fs::create_dir_all(&outside).unwrap();
        // A guest's links: a directory, and a file's name, out of the root.
        std::os::unix::fs::symlink(&outside, root.join("etc")).unwrap();
        std::os::unix::fs::symlink(outside.join("made"), root.join("hosts")).unwrap();
        std::os::unix::fs::symlink("/", root.join("run")).unwrap();
        let made = make(
            &root,
            &[
                file_bind("/etc/hosts"),
                file_bind("/hosts"),
                fs("/run/x"),
                fs("/../../etc/y"),
            ],
        )
        .unwrap();
        assert!(made.is_empty(), "{made:?}");
        assert_eq!(std::fs::read_dir(&outside).unwrap().count(), 0);
        assert!(!Path::new("/x").exists());
    }
}
