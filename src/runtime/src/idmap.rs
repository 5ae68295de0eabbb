//! Idmapped mounts, made on the host. The guest kernel (Linux 6.1) cannot
//! idmap a virtio-fs mount, but the host's can idmap what goes into the
//! share: a mount asking for `idmap` (or with `uidMappings`) is bound into
//! the share through a clone whose ids the host kernel shifts by the
//! mappings, so a file the host knows as uid 0 reaches the guest as the
//! mapped id, which the container's user namespace shows as 0 again; and
//! a file the container's root creates there lands as uid 0 on the host.
//! The same shifts a Kubernetes user-namespaced pod's image layers
//! (containerd's `uidmap=`/`gidmap=` overlay options).

use std::ffi::CString;
use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use krun_proto::{id_map_text, IdMap, UserNsSetup};

/// A user namespace with `maps` (made by a short-lived child), as a
/// descriptor for `mount_setattr(MOUNT_ATTR_IDMAP)`. Safe to call from a
/// process with threads: the child only makes raw system calls.
pub fn user_namespace(maps: &UserNsSetup) -> io::Result<OwnedFd> {
    if maps.uid_map.is_empty() || maps.gid_map.is_empty() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "an idmapped mount needs both uid and gid mappings",
        ));
    }
    let (mut ready_r, ready_w) = std::io::pipe()?;
    let (done_r, mut done_w) = std::io::pipe()?;
    // SAFETY: the child makes raw system calls only (unshare, write, read,
    // _exit), which are safe after a fork of a threaded process.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: as above; the descriptors are the pipes' ends, open here.
        unsafe {
            let ok = libc::unshare(libc::CLONE_NEWUSER) == 0;
            let b = [u8::from(ok)];
            libc::write(ready_w.as_raw_fd(), b.as_ptr().cast(), 1);
            let mut x = [0u8; 1];
            libc::read(done_r.as_raw_fd(), x.as_mut_ptr().cast(), 1);
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(io::Error::last_os_error());
    }
    drop((ready_w, done_r));
    let result = (|| {
        let mut b = [0u8; 1];
        ready_r.read_exact(&mut b)?;
        if b[0] != 1 {
            return Err(io::Error::other("cannot create a user namespace"));
        }
        std::fs::write(format!("/proc/{pid}/uid_map"), id_map_text(&maps.uid_map))?;
        std::fs::write(format!("/proc/{pid}/gid_map"), id_map_text(&maps.gid_map))?;
        Ok(OwnedFd::from(File::open(format!("/proc/{pid}/ns/user"))?))
    })();
    let _ = done_w.write_all(b"x");
    drop(done_w);
    let mut st = 0;
    // SAFETY: waitpid on our own child, into a local.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    result
}

/// Idmaps every mount of the detached tree `tree` through `userns`.
pub fn idmap_tree(tree: &OwnedFd, userns: &OwnedFd) -> io::Result<()> {
    crate::staging::mount_setattr(tree, 0, 0, Some(userns))
}

/// Mounts an idmapped clone of the mount at `source` (not its submounts)
/// on the directory `target`.
pub fn bind_idmapped(source: &Path, userns: &OwnedFd, target: &Path) -> io::Result<()> {
    let cpath = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a path with a NUL byte"))
    };
    let (src, dst) = (cpath(source)?, cpath(target)?);
    // SAFETY: open_tree reads the NUL-terminated path `src`.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_open_tree,
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::OPEN_TREE_CLONE | libc::OPEN_TREE_CLOEXEC,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: open_tree returned a new descriptor, ours alone.
    let tree = unsafe { OwnedFd::from_raw_fd(fd as i32) };
    idmap_tree(&tree, userns)?;
    // SAFETY: move_mount of our detached tree onto the path `dst`; both
    // strings outlive the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_move_mount,
            tree.as_raw_fd(),
            c"".as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::MOVE_MOUNT_F_EMPTY_PATH,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Parses containerd's `uidmap=`/`gidmap=` option value: `C:H:S` ranges,
/// separated by commas or spaces.
pub fn parse_ranges(text: &str) -> Option<Vec<IdMap>> {
    let maps: Option<Vec<IdMap>> = text
        .split([',', ' '])
        .filter(|r| !r.is_empty())
        .map(|r| {
            let mut p = r.split(':').map(|n| n.parse::<u32>().ok());
            let (c, h, s) = (p.next()??, p.next()??, p.next()??);
            (p.next().is_none() && s > 0).then_some(IdMap {
                container: c,
                host: h,
                size: s,
            })
        })
        .collect();
    maps.filter(|m| !m.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_ranges_parse() {
        let m = |c, h, s| IdMap {
            container: c,
            host: h,
            size: s,
        };
        assert_eq!(
            parse_ranges("0:200000:65536"),
            Some(vec![m(0, 200000, 65536)])
        );
        assert_eq!(
            parse_ranges("0:1000:1,1:100000:65535"),
            Some(vec![m(0, 1000, 1), m(1, 100000, 65535)])
        );
        for bad in ["", "0:1", "0:1:0", "a:b:c", "0:1:2:3", "-1:0:1"] {
            assert_eq!(parse_ranges(bad), None, "{bad}");
        }
    }

    /// A clone of a tmpfs idmapped 0 -> 4242: a file of uid 0 shows as 4242.
    #[test]
    fn an_idmapped_clone_shifts_owners() {
        assert!(
            nix::unistd::geteuid().is_root(),
            "this test needs root (a tmpfs, an idmapped mount): run it as root"
        );
        let maps = UserNsSetup {
            uid_map: vec![IdMap {
                container: 0,
                host: 4242,
                size: 1,
            }],
            gid_map: vec![IdMap {
                container: 0,
                host: 4343,
                size: 1,
            }],
        };
        let ns = user_namespace(&maps).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let dst = dir.path().join("dst");
        std::fs::create_dir_all(&src).unwrap();
        std::fs::create_dir_all(&dst).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        match bind_idmapped(&src, &ns, &dst) {
            Ok(()) => {}
            // The test's directory may be on a filesystem that cannot be
            // idmapped: say so loudly.
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                panic!("{}: cannot be idmapped here ({e})", dir.path().display())
            }
            Err(e) => panic!("idmapping: {e}"),
        }
        use std::os::unix::fs::MetadataExt;
        let md = std::fs::metadata(dst.join("f"));
        nix::mount::umount2(&dst, nix::mount::MntFlags::MNT_DETACH).unwrap();
        let md = md.unwrap();
        assert_eq!((md.uid(), md.gid()), (4242, 4343));
    }
}
