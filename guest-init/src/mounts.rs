//! The container's filesystem: its root over virtio-fs, the bundle's
//! mounts, /dev, masked and read-only paths, and the switch into it.

use std::collections::BTreeSet;
use std::fs;
use std::io;
use std::os::unix::fs::symlink;
use std::path::{Component, Path, PathBuf};

use krun_proto::{ContainerSetup, DeviceSetup, MountSetup, MountSource, UserNsSetup};

use crate::failure::{Failure, OrFail};
use crate::sys;

const MS_BIND: u64 = libc::MS_BIND;
const MS_REC: u64 = libc::MS_REC;
const MS_REMOUNT: u64 = libc::MS_REMOUNT;
const MS_RDONLY: u64 = libc::MS_RDONLY;
/// Flags that a bind mount only takes on a remount.
const BIND_REMOUNT_FLAGS: u64 =
    libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;

/// Where, inside guest-init's (private) mount namespace, the container's
/// root and shares are mounted before the switch.
fn staging(id: &str) -> PathBuf {
    let name: String = id.chars().map(|c| if c == '/' { '_' } else { c }).collect();
    Path::new("/krun/containers").join(name)
}

/// Builds the container's filesystem and makes it this process's root.
pub fn setup_root(setup: &ContainerSetup) -> Result<(), Failure> {
    sys::mount(None, Path::new("/"), None, MS_REC | libc::MS_PRIVATE, None)
        .or_fail(|| "making mounts private".into())?;
    let base = staging(&setup.id);
    let root = base.join("root");
    fs::create_dir_all(&root).or_fail(|| format!("creating {}", root.display()))?;
    let mut shares = Shares {
        dir: base.join("shares"),
        mounted: BTreeSet::new(),
    };
    mount_rootfs(setup, &root, &mut shares)?;
    let spec_dev = setup
        .mounts
        .iter()
        .find(|m| is_path(&m.destination, "/dev"));
    let ns = setup.user_ns.as_ref();
    if spec_dev.is_none() {
        private_dev(&root, ns)?;
    }
    for (i, m) in setup.mounts.iter().enumerate() {
        if ns.is_some() && is_devpts(m) {
            // Mounted from inside the user namespace: [`mount_in_user_ns`].
            resolve_in_root(&root, &m.destination)
                .and_then(fs::create_dir_all)
                .or_fail(|| format!("mounts[{i}] ({}): creating it", m.destination))?;
            continue;
        }
        mount_one(&root, m, &mut shares, ns).map_err(|f| in_mount(i, m, f))?;
    }
    let dev_is_tmpfs = match spec_dev {
        None => true,
        Some(m) => matches!(&m.source, MountSource::Fs { fstype, .. } if fstype == "tmpfs"),
    };
    // As runc: no nodes are made in a /dev bound from elsewhere; the
    // bundle's first, so that its entry for a default device (its mode,
    // its owner) is the node the container gets.
    if dev_is_tmpfs {
        spec_devices(&root, &setup.devices, ns)?;
        default_devices(&root)?;
    }
    restrict_paths(setup, &root)?;
    set_sysctls_and_names(setup)?;
    if setup.root.readonly {
        sys::mount(None, &root, None, MS_REMOUNT | MS_BIND | MS_RDONLY, None)
            .or_fail(|| "root.readonly: remounting /".into())?;
    }
    switch_root(&root)
}

fn in_mount(i: usize, m: &MountSetup, f: Failure) -> Failure {
    Failure::new(
        f.code,
        format!("mounts[{i}] ({}): {}", m.destination, f.message),
    )
}

fn is_devpts(m: &MountSetup) -> bool {
    matches!(&m.source, MountSource::Fs { fstype, .. } if fstype == "devpts")
}

/// The devpts mounts of a container with a user namespace, made by its
/// root once inside (devpts may be mounted there), as runc makes them:
/// their `gid=` is a container id, which Linux 6.1's devpts cannot take as
/// an outside id above 2^31 (podman's `--userns=auto` ranges start there).
pub fn mount_in_user_ns(setup: &ContainerSetup) -> Result<(), Failure> {
    let mut no_shares = Shares {
        dir: PathBuf::new(),
        mounted: BTreeSet::new(),
    };
    for (i, m) in setup.mounts.iter().enumerate() {
        if is_devpts(m) {
            mount_one(Path::new("/"), m, &mut no_shares, None).map_err(|f| in_mount(i, m, f))?;
        }
    }
    Ok(())
}

/// Mounts the container's root filesystem on `root`: a share of its own,
/// or its directory in a pod's share.
fn mount_rootfs(setup: &ContainerSetup, root: &Path, shares: &mut Shares) -> Result<(), Failure> {
    if setup.root.path.is_empty() {
        return sys::mount(Some(&setup.root.tag), root, Some("virtiofs"), 0, None).or_fail(|| {
            format!(
                "mounting the root filesystem (virtio-fs tag {:?})",
                setup.root.tag
            )
        });
    }
    // A pod's containers have their roots in one share: bind this one's.
    let share = shares.path(&setup.root.tag, false)?;
    let src = resolve_in_root(&share, &setup.root.path).or_fail(|| "resolving root.path".into())?;
    sys::mount(
        Some(&src.to_string_lossy()),
        root,
        None,
        MS_BIND | MS_REC,
        None,
    )
    .or_fail(|| {
        format!(
            "mounting the root filesystem ({} in share {:?})",
            setup.root.path, setup.root.tag
        )
    })
}

/// Without a /dev from the bundle, the container still gets a private one,
/// rather than device nodes written into the host's rootfs.
fn private_dev(root: &Path, ns: Option<&UserNsSetup>) -> Result<(), Failure> {
    let dev = resolve_in_root(root, "/dev").or_fail(|| "resolving /dev".into())?;
    fs::create_dir_all(&dev).or_fail(|| "creating /dev".into())?;
    let flags = libc::MS_NOSUID | libc::MS_STRICTATIME;
    sys::mount(
        Some("tmpfs"),
        &dev,
        Some("tmpfs"),
        flags,
        Some(&owned_data("tmpfs", "mode=755,size=65536k", ns)?),
    )
    .or_fail(|| "mounting a tmpfs on /dev".into())
}

/// linux.maskedPaths and linux.readonlyPaths.
fn restrict_paths(setup: &ContainerSetup, root: &Path) -> Result<(), Failure> {
    for p in &setup.masked_paths {
        mask(root, p).or_fail(|| format!("linux.maskedPaths: {p}"))?;
    }
    for p in &setup.readonly_paths {
        make_readonly(root, p).or_fail(|| format!("linux.readonlyPaths: {p}"))?;
    }
    Ok(())
}

/// linux.sysctl, hostname and domainname: the settings of the container's
/// own namespaces.
fn set_sysctls_and_names(setup: &ContainerSetup) -> Result<(), Failure> {
    for (key, value) in &setup.sysctl {
        let path = Path::new("/proc/sys").join(key.replace('.', "/"));
        fs::write(&path, value).or_fail(|| format!("linux.sysctl: setting {key} to {value}"))?;
    }
    if let Some(h) = &setup.hostname {
        sys::sethostname(h).or_fail(|| format!("hostname: setting {h:?}"))?;
    }
    if let Some(d) = &setup.domainname {
        sys::setdomainname(d).or_fail(|| format!("domainname: setting {d:?}"))?;
    }
    Ok(())
}

/// `linux.rootfsPropagation` on the container's `/`, once it is the root
/// (and after the console is bound in, which an `runbindable` tree would
/// refuse), as runc applies it after its pivot_root. The tree is private
/// until then.
pub fn set_root_propagation(setup: &ContainerSetup) -> Result<(), Failure> {
    if setup.root.propagation == 0 {
        return Ok(());
    }
    sys::mount(None, Path::new("/"), None, setup.root.propagation, None)
        .or_fail(|| "linux.rootfsPropagation: setting the propagation of /".into())
}

/// Makes `root` this process's root. The initramfs cannot be pivoted away
/// from; move the root over / and chroot into it (in this private mount
/// namespace, nothing else sees it).
fn switch_root(root: &Path) -> Result<(), Failure> {
    std::env::set_current_dir(root).or_fail(|| "entering the root filesystem".into())?;
    sys::mount(Some("."), Path::new("/"), None, libc::MS_MOVE, None)
        .or_fail(|| "moving the root filesystem".into())?;
    sys::chroot(Path::new(".")).or_fail(|| "chroot into the root filesystem".into())?;
    std::env::set_current_dir("/").or_fail(|| "entering /".into())?;
    Ok(())
}

fn is_path(p: &str, want: &str) -> bool {
    Path::new(p).components().eq(Path::new(want).components())
}

/// Where guest-init keeps, in its own mount namespace, the shares that
/// containers take sub-directories of (a pod's share).
const KEPT: &str = "/krun/shares";

static KEPT_TAGS: std::sync::Mutex<BTreeSet<String>> = std::sync::Mutex::new(BTreeSet::new());

/// Mounts, in guest-init's own namespace and once per VM, every share whose
/// sub-directories `setup` uses; containers forked later inherit the mount
/// and bind from it. Mounting such a share anew for each container goes
/// wrong: Linux may give the new virtio-fs mount the superblock of one of
/// the share's submounts (the bind mounts in the share that virtiofsd
/// announces), so the mount's root would be another directory.
pub fn keep_shares(setup: &ContainerSetup) -> Result<(), Failure> {
    let mut tags = Vec::new();
    if !setup.root.path.is_empty() {
        tags.push(setup.root.tag.as_str());
    }
    for m in &setup.mounts {
        if let MountSource::Share { tag, path, .. } = &m.source {
            if !path.is_empty() {
                tags.push(tag);
            }
        }
    }
    let mut kept = KEPT_TAGS.lock().unwrap_or_else(|e| e.into_inner());
    for tag in tags {
        if kept.contains(tag) {
            continue;
        }
        let dir = Path::new(KEPT).join(tag);
        fs::create_dir_all(&dir).or_fail(|| format!("creating {}", dir.display()))?;
        sys::mount(Some(tag), &dir, Some("virtiofs"), 0, None)
            .or_fail(|| format!("mounting virtio-fs share {tag:?}"))?;
        kept.insert(tag.to_string());
    }
    Ok(())
}

/// Shares are mounted once each, on first use (or kept by guest-init).
struct Shares {
    dir: PathBuf,
    mounted: BTreeSet<String>,
}

impl Shares {
    fn path(&mut self, tag: &str, readonly: bool) -> Result<PathBuf, Failure> {
        if KEPT_TAGS
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains(tag)
        {
            return Ok(Path::new(KEPT).join(tag));
        }
        let dir = self.dir.join(tag);
        if !self.mounted.contains(tag) {
            fs::create_dir_all(&dir).or_fail(|| format!("creating {}", dir.display()))?;
            let flags = if readonly { MS_RDONLY } else { 0 };
            sys::mount(Some(tag), &dir, Some("virtiofs"), flags, None)
                .or_fail(|| format!("mounting virtio-fs share {tag:?}"))?;
            self.mounted.insert(tag.to_string());
        }
        Ok(dir)
    }
}

fn mount_one(
    root: &Path,
    m: &MountSetup,
    shares: &mut Shares,
    ns: Option<&UserNsSetup>,
) -> Result<(), Failure> {
    let dest =
        resolve_in_root(root, &m.destination).or_fail(|| "resolving the destination".into())?;
    match &m.source {
        MountSource::Fs { fstype, source } => {
            fs::create_dir_all(&dest).or_fail(|| format!("creating {}", m.destination))?;
            let data = owned_data(fstype, &m.data, ns)?;
            sys::mount(Some(source), &dest, Some(fstype), m.flags, Some(&data))
                .or_fail(|| format!("mounting {fstype}"))?;
            if fstype == "devpts" {
                // /dev/ptmx must lead to this devpts instance.
                let ptmx = dest.parent().map(|d| d.join("ptmx"));
                if let Some(ptmx) = ptmx.filter(|p| p.parent().is_some_and(|d| d.ends_with("dev")))
                {
                    let _ = fs::remove_file(&ptmx);
                    symlink("pts/ptmx", &ptmx).or_fail(|| "linking /dev/ptmx".into())?;
                }
            }
        }
        MountSource::Share { tag, path, file } => {
            let share = shares.path(tag, m.flags & MS_RDONLY != 0)?;
            let src = if path.is_empty() {
                share
            } else {
                share.join(path)
            };
            if *file {
                if let Some(parent) = dest.parent() {
                    fs::create_dir_all(parent)
                        .or_fail(|| format!("creating the parent of {}", m.destination))?;
                }
                if !dest.exists() {
                    fs::File::create(&dest).or_fail(|| format!("creating {}", m.destination))?;
                }
            } else {
                fs::create_dir_all(&dest).or_fail(|| format!("creating {}", m.destination))?;
            }
            sys::mount(
                Some(&src.to_string_lossy()),
                &dest,
                None,
                MS_BIND | MS_REC,
                None,
            )
            .or_fail(|| "bind mount".into())?;
            let extra = m.flags & BIND_REMOUNT_FLAGS;
            if extra != 0 {
                sys::mount(None, &dest, None, MS_BIND | MS_REMOUNT | extra, None)
                    .or_fail(|| "remounting the bind mount".into())?;
            }
        }
    }
    if m.propagation != 0 {
        sys::mount(None, &dest, None, m.propagation, None)
            .or_fail(|| "setting mount propagation".into())?;
    }
    Ok(())
}

/// `linux.devices`: each node made at its path as if `root` were `/`
/// (symlinks on the way resolved inside the root, never out of it), with
/// its parent directories, as runc makes them; a file already there (the
/// /dev/ptmx link of a devpts mount) is left as it is, as runc leaves it.
fn spec_devices(
    root: &Path,
    devices: &[DeviceSetup],
    ns: Option<&UserNsSetup>,
) -> Result<(), Failure> {
    for (i, d) in devices.iter().enumerate() {
        let field = || format!("linux.devices[{i}] ({})", d.path);
        // The owner is given as the container sees it.
        let mut d = d.clone();
        if let Some(ns) = ns {
            d.uid = ns.host_uid(d.uid).ok_or_else(|| {
                Failure::new(1, format!("{}: uid {} is not mapped", field(), d.uid))
            })?;
            d.gid = ns.host_gid(d.gid).ok_or_else(|| {
                Failure::new(1, format!("{}: gid {} is not mapped", field(), d.gid))
            })?;
        }
        make_device(root, &d).or_fail(field)?;
    }
    Ok(())
}

/// The mount data of a guest filesystem, made as if the container's root
/// mounted it from inside its user namespace (as runc's does): `uid=` and
/// `gid=` are container ids, and a tmpfs belongs to the container's root.
/// Without a user namespace, `data` unchanged.
fn owned_data(fstype: &str, data: &str, ns: Option<&UserNsSetup>) -> Result<String, Failure> {
    let Some(ns) = ns else {
        return Ok(data.to_string());
    };
    let mut out = Vec::new();
    let (mut uid, mut gid) = (false, false);
    for opt in data.split(',').filter(|o| !o.is_empty()) {
        let mapped = if let Some(v) = opt.strip_prefix("uid=") {
            uid = true;
            map_option("uid", v, |id| ns.host_uid(id))?
        } else if let Some(v) = opt.strip_prefix("gid=") {
            gid = true;
            map_option("gid", v, |id| ns.host_gid(id))?
        } else {
            opt.to_string()
        };
        out.push(mapped);
    }
    if fstype == "tmpfs" {
        if !uid {
            out.push(map_option("uid", "0", |id| ns.host_uid(id))?);
        }
        if !gid {
            out.push(map_option("gid", "0", |id| ns.host_gid(id))?);
        }
    }
    Ok(out.join(","))
}

fn map_option(
    name: &str,
    value: &str,
    map: impl Fn(u32) -> Option<u32>,
) -> Result<String, Failure> {
    let id: u32 = value
        .parse()
        .map_err(|_| Failure::new(1, format!("{name}={value}: not a number")))?;
    let host = map(id).ok_or_else(|| {
        Failure::new(
            1,
            format!("{name}={value}: not mapped in the container's user namespace"),
        )
    })?;
    Ok(format!("{name}={host}"))
}

fn make_device(root: &Path, d: &DeviceSetup) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let p = resolve_in_root(root, &d.path)?;
    if let Some(parent) = p.parent() {
        fs::create_dir_all(parent)?;
    }
    match sys::mknod(&p, d.block, d.mode, d.major, d.minor) {
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => return Ok(()),
        r => r?,
    }
    std::os::unix::fs::lchown(&p, Some(d.uid), Some(d.gid))?;
    // mknod honours the umask; the mode must be exact. The node was just
    // made here, so this follows no link.
    fs::set_permissions(&p, fs::Permissions::from_mode(d.mode))
}

/// The device nodes every container gets (runc's default set).
fn default_devices(root: &Path) -> Result<(), Failure> {
    let dev = resolve_in_root(root, "/dev").or_fail(|| "resolving /dev".into())?;
    for (name, major, minor) in [
        ("null", 1, 3),
        ("zero", 1, 5),
        ("full", 1, 7),
        ("random", 1, 8),
        ("urandom", 1, 9),
        ("tty", 5, 0),
    ] {
        let p = dev.join(name);
        if fs::symlink_metadata(&p).is_err() {
            sys::mknod(&p, false, 0o666, major, minor)
                .or_fail(|| format!("creating /dev/{name}"))?;
            // mknod honours the umask; the mode must be exact.
            use std::os::unix::fs::PermissionsExt;
            fs::set_permissions(&p, fs::Permissions::from_mode(0o666))
                .or_fail(|| format!("chmod /dev/{name}"))?;
        }
    }
    for (name, target) in [
        ("fd", "/proc/self/fd"),
        ("stdin", "/proc/self/fd/0"),
        ("stdout", "/proc/self/fd/1"),
        ("stderr", "/proc/self/fd/2"),
    ] {
        let p = dev.join(name);
        if fs::symlink_metadata(&p).is_err() {
            symlink(target, &p).or_fail(|| format!("linking /dev/{name}"))?;
        }
    }
    let ptmx = dev.join("ptmx");
    if fs::symlink_metadata(&ptmx).is_err() {
        symlink("pts/ptmx", &ptmx).or_fail(|| "linking /dev/ptmx".into())?;
    }
    Ok(())
}

fn mask(root: &Path, path: &str) -> io::Result<()> {
    let p = resolve_in_root(root, path)?;
    match fs::metadata(&p) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
        Ok(md) if md.is_dir() => sys::mount(Some("tmpfs"), &p, Some("tmpfs"), MS_RDONLY, None),
        Ok(_) => sys::mount(Some("/dev/null"), &p, None, MS_BIND, None),
    }
}

fn make_readonly(root: &Path, path: &str) -> io::Result<()> {
    let p = resolve_in_root(root, path)?;
    if !p.exists() {
        return Ok(());
    }
    sys::mount(Some(&p.to_string_lossy()), &p, None, MS_BIND | MS_REC, None)?;
    sys::mount(
        None,
        &p,
        None,
        MS_BIND | MS_REMOUNT | MS_RDONLY | MS_REC,
        None,
    )
}

/// Resolves `path` as if `root` were `/`: symlinks are followed but can
/// never lead outside `root`, and `..` stops at it. Components that do not
/// exist are taken as they are.
pub fn resolve_in_root(root: &Path, path: &str) -> io::Result<PathBuf> {
    let mut todo: Vec<std::ffi::OsString> = Path::new(path)
        .components()
        .rev()
        .filter_map(|c| match c {
            Component::Normal(n) => Some(n.to_owned()),
            Component::ParentDir => Some("..".into()),
            _ => None,
        })
        .collect();
    let mut resolved: Vec<std::ffi::OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = todo.pop() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let mut candidate = root.to_path_buf();
        candidate.extend(&resolved);
        candidate.push(&part);
        match fs::symlink_metadata(&candidate) {
            Ok(md) if md.file_type().is_symlink() => {
                links += 1;
                if links > 40 {
                    return Err(io::Error::from_raw_os_error(libc::ELOOP));
                }
                let target = fs::read_link(&candidate)?;
                if target.is_absolute() {
                    resolved.clear();
                }
                for c in target.components().rev() {
                    match c {
                        Component::Normal(n) => todo.push(n.to_owned()),
                        Component::ParentDir => todo.push("..".into()),
                        _ => {}
                    }
                }
            }
            _ => resolved.push(part),
        }
    }
    let mut out = root.to_path_buf();
    out.extend(&resolved);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_cannot_leave_the_root() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("etc")).unwrap();
        symlink("/etc", root.join("abs")).unwrap();
        symlink("../../../../etc", root.join("rel")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        assert_eq!(
            resolve_in_root(root, "/abs/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(
            resolve_in_root(root, "/rel/passwd").unwrap(),
            root.join("etc/passwd")
        );
        assert_eq!(resolve_in_root(root, "/../../x").unwrap(), root.join("x"));
        assert_eq!(
            resolve_in_root(root, "/new/dir").unwrap(),
            root.join("new/dir")
        );
        assert_eq!(
            resolve_in_root(root, "/loop").unwrap_err().raw_os_error(),
            Some(libc::ELOOP)
        );
    }

    #[test]
    fn devices_are_made_as_given_and_inside_the_root() {
        use std::os::unix::fs::{FileTypeExt, MetadataExt};
        if !nix::unistd::geteuid().is_root() {
            eprintln!("not root: mknod cannot be tested");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("dev")).unwrap();
        symlink("/dev", root.join("devlink")).unwrap();
        let null = DeviceSetup {
            path: "/devlink/net/mynull".into(),
            block: false,
            major: 1,
            minor: 3,
            mode: 0o600,
            uid: 1000,
            gid: 1001,
        };
        let lo = DeviceSetup {
            path: "/dev/loop3".into(),
            block: true,
            major: 7,
            minor: 3,
            mode: 0o660,
            ..Default::default()
        };
        spec_devices(root, &[null.clone(), lo], None).unwrap();
        let md = fs::symlink_metadata(root.join("dev/net/mynull")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), nix::sys::stat::makedev(1, 3));
        assert_eq!(
            (md.mode() & 0o7777, md.uid(), md.gid()),
            (0o600, 1000, 1001)
        );
        let md = fs::symlink_metadata(root.join("dev/loop3")).unwrap();
        assert!(md.file_type().is_block_device());
        assert_eq!(md.rdev(), nix::sys::stat::makedev(7, 3));
        // Made again (or where something is): left as it is.
        spec_devices(root, &[null], None).unwrap();
    }

    #[test]
    fn mount_data_is_owned_by_the_containers_root() {
        use krun_proto::IdMap;
        let map = vec![IdMap {
            container: 0,
            host: 100000,
            size: 65536,
        }];
        let ns = UserNsSetup {
            uid_map: map.clone(),
            gid_map: map,
        };
        let ns = Some(&ns);
        assert_eq!(owned_data("tmpfs", "mode=755", None).unwrap(), "mode=755");
        assert_eq!(
            owned_data("tmpfs", "mode=755", ns).unwrap(),
            "mode=755,uid=100000,gid=100000"
        );
        assert_eq!(
            owned_data("tmpfs", "uid=1000", ns).unwrap(),
            "uid=101000,gid=100000"
        );
        assert_eq!(
            owned_data("mqueue", "gid=5,mode=0620", ns).unwrap(),
            "gid=100005,mode=0620"
        );
        assert_eq!(owned_data("proc", "", ns).unwrap(), "");
        assert!(owned_data("tmpfs", "gid=70000", ns).is_err());
    }

    #[test]
    fn paths_compare_by_components() {
        assert!(is_path("/dev/", "/dev"));
        assert!(is_path("//dev", "/dev"));
        assert!(!is_path("/dev/pts", "/dev"));
    }
}
