//! QEMU's jail: a private mount namespace whose root is an empty tmpfs
//! holding only what QEMU needs, and an unprivileged uid to run as. The
//! built-in VMM enters one of its own (only the shares, no uid change,
//! nothing to exec: krun_vmm's `process` module), after its exec.
//!
//! Like Firecracker's jailer, but built by the child between fork and exec:
//! a [`Jail`] is planned before the fork (every path a `CString`, every
//! step a [`Step`]), and [`Jail::enter`] only issues raw system calls:
//!
//! 1. `unshare(CLONE_NEWNS)`, `/` made a recursive slave (nothing mounted
//!    here reaches the host; the host's later mounts do not reach in);
//! 2. a small tmpfs (`nosuid`, 0755) mounted on the jail directory — an
//!    empty directory the caller made, which on the host stays empty;
//! 3. the steps: directories, empty files as mount points, read-only
//!    `nosuid,nodev` bind mounts (the QEMU binary, `/usr`, the libraries,
//!    the kernel and initramfs), symlinks (`/lib -> usr/lib` where the host
//!    has them), and device nodes made anew (`/dev/kvm` owned by the jail's
//!    uid, as the jailer does, and `null`, `zero`, `urandom`);
//! 4. `pivot_root` into the tmpfs, the old root detached, the tmpfs
//!    remounted read-only.
//!
//! The uid and gid are dedicated and unnamed (no /etc/passwd entry), one
//! per container: [`JAIL_ID_BASE`] plus the host pid of the process that
//! starts QEMU ([`jail_id`]): the monitor, or the containerd shim, each of
//! which runs one VM, so no two live QEMUs share an id. The monitor is
//! pid 1 of a PID namespace of its own with a `/proc` of its own, so it
//! notes its host pid ([`note_host_pid`]) while the host's `/proc` is
//! still its. The switch happens in [`crate::Confinement`], after the
//! bounding set is dropped and before the capabilities are cleared.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The first uid (and gid) of QEMU jails: "kr" in the high half, far above
/// any distribution's or user namespace's usual ranges; plus at most
/// `pid_max` (2^22).
pub const JAIL_ID_BASE: u32 = 0x6b72_0000;

/// How many ids the jails use from [`JAIL_ID_BASE`] on.
pub const JAIL_IDS: u32 = 1 << 22;

/// This process's pid on the host, as [`note_host_pid`] found it.
static HOST_PID: OnceLock<u32> = OnceLock::new();

/// Notes this process's pid as the host's `/proc` gives it (`/proc/self`),
/// for [`jail_id`]: the monitor calls it before it mounts the `/proc` of
/// its own PID namespace, where it is pid 1. Elsewhere (the shim, `run`)
/// the pid is the process's own.
pub fn note_host_pid() {
    let pid = std::fs::read_link("/proc/self")
        .ok()
        .and_then(|p| p.to_str()?.parse().ok())
        .unwrap_or_else(std::process::id);
    let _ = HOST_PID.set(pid);
}

/// The uid and gid of the QEMU this process starts: [`JAIL_ID_BASE`] plus
/// its host pid (below `pid_max`, at most 2^22).
pub fn jail_id() -> u32 {
    JAIL_ID_BASE + (*HOST_PID.get_or_init(std::process::id) & (JAIL_IDS - 1))
}

/// One step of building the jail, on paths inside the jail directory.
#[derive(Debug)]
enum Step {
    Dir(CString),
    /// An empty file, a mount point for a non-directory.
    File(CString),
    /// A read-only `nosuid,nodev` bind mount of the source on the target.
    Bind(CString, CString),
    Symlink(CString, CString),
    /// A character device: path, device number, mode, owned by the jail's
    /// ids when `own`.
    Dev(CString, libc::dev_t, libc::mode_t, bool),
}

/// A jail planned before the fork (see the module doc).
#[derive(Debug)]
pub struct Jail {
    root: CString,
    /// The uid and gid ([`jail_id`]).
    id: u32,
    steps: Vec<Step>,
}

fn cstr(p: &Path) -> io::Result<CString> {
    CString::new(p.as_os_str().as_bytes()).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))
}

impl Jail {
    /// A jail on the empty directory `root`.
    pub fn new(root: &Path) -> io::Result<Jail> {
        Ok(Jail {
            root: cstr(root)?,
            id: jail_id(),
            steps: Vec::new(),
        })
    }

    /// The uid and gid QEMU runs as.
    pub fn id(&self) -> u32 {
        self.id
    }

    fn inside(&self, path: &Path) -> io::Result<CString> {
        let rel = path.strip_prefix("/").unwrap_or(path);
        let root = Path::new(std::ffi::OsStr::from_bytes(self.root.as_bytes()));
        cstr(&root.join(rel))
    }

    /// Makes the directories of `path` (absolute, in the jail), parents
    /// first.
    pub fn dir(&mut self, path: &Path) -> io::Result<()> {
        let mut at = PathBuf::from("/");
        for c in path.components().skip(1) {
            at.push(c);
            let p = self.inside(&at)?;
            if !self
                .steps
                .iter()
                .any(|s| matches!(s, Step::Dir(d) if *d == p))
            {
                self.steps.push(Step::Dir(p));
            }
        }
        Ok(())
    }

    /// Binds the host's `source` read-only at `target` in the jail.
    pub fn bind(&mut self, source: &Path, target: &Path) -> io::Result<()> {
        if let Some(parent) = target.parent() {
            self.dir(parent)?;
        }
        let t = self.inside(target)?;
        if source.is_dir() {
            self.dir(target)?;
        } else {
            self.steps.push(Step::File(t.clone()));
        }
        self.steps.push(Step::Bind(cstr(source)?, t));
        Ok(())
    }

    /// The host's `path` at the same place in the jail: a symlink if it is
    /// one on the host, else a read-only bind. Nothing if it is missing.
    pub fn mirror(&mut self, path: &Path) -> io::Result<()> {
        match std::fs::read_link(path) {
            Ok(target) => {
                let link = self.inside(path)?;
                self.steps.push(Step::Symlink(cstr(&target)?, link));
                Ok(())
            }
            Err(_) if path.exists() => self.bind(path, path),
            Err(_) => Ok(()),
        }
    }

    /// A new node for the host's character device `host` at `/dev/NAME`;
    /// `own`: owned by the jail's ids, mode 0600 (else root's, 0666).
    pub fn device(&mut self, host: &Path, own: bool) -> io::Result<()> {
        use std::os::unix::fs::MetadataExt;
        let rdev = std::fs::metadata(host)?.rdev();
        let name = host
            .file_name()
            .ok_or_else(|| io::Error::from_raw_os_error(libc::EINVAL))?;
        self.dir(Path::new("/dev"))?;
        let p = self.inside(&Path::new("/dev").join(name))?;
        let mode = if own { 0o600 } else { 0o666 };
        self.steps
            .push(Step::Dev(p, rdev as libc::dev_t, mode, own));
        Ok(())
    }

    /// Builds the jail and moves the calling process into it. Between fork
    /// and exec: raw system calls on data prepared before the fork only.
    pub fn enter(&self) -> io::Result<()> {
        let fail = |rc: libc::c_int| {
            if rc != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: unshare and mount take flags and NUL-terminated strings
        // prepared before the fork, alive for the calls.
        unsafe {
            fail(libc::unshare(libc::CLONE_NEWNS))?;
            fail(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_SLAVE | libc::MS_REC,
                std::ptr::null(),
            ))?;
            fail(libc::mount(
                c"tmpfs".as_ptr(),
                self.root.as_ptr(),
                c"tmpfs".as_ptr(),
                libc::MS_NOSUID,
                c"mode=0755,size=64k,nr_inodes=256".as_ptr().cast(),
            ))?;
        }
        for step in &self.steps {
            self.step(step)?;
        }
        self.pivot()
    }

    fn step(&self, step: &Step) -> io::Result<()> {
        let fail = |rc: libc::c_int| {
            if rc < 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: every call takes NUL-terminated strings prepared before
        // the fork and plain integers; close takes the fd open just made.
        unsafe {
            match step {
                Step::Dir(p) => fail(libc::mkdir(p.as_ptr(), 0o755)),
                Step::File(p) => {
                    let fd = libc::open(p.as_ptr(), libc::O_CREAT | libc::O_WRONLY, 0o644);
                    fail(fd)?;
                    libc::close(fd);
                    Ok(())
                }
                Step::Symlink(target, link) => fail(libc::symlink(target.as_ptr(), link.as_ptr())),
                Step::Bind(source, target) => {
                    let flags = libc::MS_BIND | libc::MS_REC;
                    fail(libc::mount(
                        source.as_ptr(),
                        target.as_ptr(),
                        std::ptr::null(),
                        flags,
                        std::ptr::null(),
                    ))?;
                    let ro = libc::MS_BIND
                        | libc::MS_REMOUNT
                        | libc::MS_RDONLY
                        | libc::MS_NOSUID
                        | libc::MS_NODEV;
                    fail(libc::mount(
                        std::ptr::null(),
                        target.as_ptr(),
                        std::ptr::null(),
                        ro,
                        std::ptr::null(),
                    ))
                }
                Step::Dev(p, rdev, mode, own) => {
                    fail(libc::mknod(p.as_ptr(), libc::S_IFCHR | mode, *rdev))?;
                    // mknod's mode is masked by the umask: set it exactly.
                    fail(libc::chmod(p.as_ptr(), *mode))?;
                    if *own {
                        fail(libc::chown(p.as_ptr(), self.id, self.id))?;
                    }
                    Ok(())
                }
            }
        }
    }

    /// `pivot_root` into the jail directory, the old root detached, the
    /// new one read-only.
    fn pivot(&self) -> io::Result<()> {
        let fail = |rc: libc::c_long| {
            if rc != 0 {
                Err(io::Error::last_os_error())
            } else {
                Ok(())
            }
        };
        // SAFETY: as in `enter`: raw calls on prepared strings. pivot_root
        // with new and old root both "." stacks the old root under the new
        // one, and the detach removes it (runc does the same).
        unsafe {
            fail(libc::chdir(self.root.as_ptr()) as libc::c_long)?;
            fail(libc::syscall(
                libc::SYS_pivot_root,
                c".".as_ptr(),
                c".".as_ptr(),
            ))?;
            fail(libc::umount2(c".".as_ptr(), libc::MNT_DETACH) as libc::c_long)?;
            fail(libc::chdir(c"/".as_ptr()) as libc::c_long)?;
            fail(libc::mount(
                std::ptr::null(),
                c"/".as_ptr(),
                std::ptr::null(),
                libc::MS_REMOUNT | libc::MS_RDONLY | libc::MS_NOSUID,
                std::ptr::null(),
            ) as libc::c_long)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::process::CommandExt;
    use std::process::Command;

    fn names(jail: &Jail) -> Vec<String> {
        jail.steps
            .iter()
            .map(|s| match s {
                Step::Dir(p) => format!("dir {}", p.to_string_lossy()),
                Step::File(p) => format!("file {}", p.to_string_lossy()),
                Step::Bind(s, t) => format!("bind {} {}", s.to_string_lossy(), t.to_string_lossy()),
                Step::Symlink(s, t) => {
                    format!("link {} {}", s.to_string_lossy(), t.to_string_lossy())
                }
                Step::Dev(p, _, mode, own) => format!("dev {} {mode:o} {own}", p.to_string_lossy()),
            })
            .collect()
    }

    #[test]
    fn a_plan_makes_each_directory_once_parents_first() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("k");
        std::fs::write(&file, "k").unwrap();
        let mut jail = Jail::new(Path::new("/j")).unwrap();
        jail.bind(tmp.path(), Path::new("/a/b")).unwrap();
        jail.bind(&file, Path::new("/a/k")).unwrap();
        jail.device(Path::new("/dev/null"), false).unwrap();
        jail.device(Path::new("/dev/zero"), true).unwrap();
        let src = tmp.path().to_string_lossy();
        let f = file.to_string_lossy();
        assert_eq!(
            names(&jail),
            [
                "dir /j/a".to_string(),
                "dir /j/a/b".into(),
                format!("bind {src} /j/a/b"),
                "file /j/a/k".into(),
                format!("bind {f} /j/a/k"),
                "dir /j/dev".into(),
                "dev /j/dev/null 666 false".into(),
                "dev /j/dev/zero 600 true".into(),
            ]
        );
        assert_eq!(jail.id(), JAIL_ID_BASE + std::process::id());
    }

    #[test]
    fn a_mirrored_symlink_stays_a_symlink_and_a_missing_path_is_skipped() {
        let tmp = tempfile::tempdir().unwrap();
        let link = tmp.path().join("lib");
        std::os::unix::fs::symlink("usr/lib", &link).unwrap();
        let mut jail = Jail::new(Path::new("/j")).unwrap();
        jail.mirror(&link).unwrap();
        jail.mirror(&tmp.path().join("missing")).unwrap();
        assert_eq!(
            names(&jail),
            [format!("link usr/lib /j{}", link.to_string_lossy())]
        );
    }

    /// A child entered into a jail sees only what the jail holds, and
    /// `/` of the host is left alone. Needs root (CAP_SYS_ADMIN).
    #[test]
    fn a_jailed_child_sees_only_its_jail() {
        // SAFETY: geteuid takes nothing and cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("NOT RUN: needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("root");
        std::fs::create_dir(&root).unwrap();
        let mut jail = Jail::new(&root).unwrap();
        jail.bind(Path::new("/usr"), Path::new("/usr")).unwrap();
        for lib in ["/lib", "/lib64", "/etc/ld.so.cache"] {
            jail.mirror(Path::new(lib)).unwrap();
        }
        jail.device(Path::new("/dev/null"), false).unwrap();
        let ls = Path::new("/usr/bin/ls").canonicalize().unwrap();
        let mut cmd = Command::new(&ls);
        cmd.args(["-A", "/", "/dev"]);
        // SAFETY: `enter` makes raw system calls only, on data prepared
        // before the fork.
        unsafe { cmd.pre_exec(move || jail.enter()) };
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{out:?}");
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("/dev:\nnull\n"), "{text}");
        let top: Vec<&str> = text.split("\n\n").next().unwrap().lines().skip(1).collect();
        assert!(top.contains(&"usr") && top.contains(&"dev"), "{top:?}");
        assert!(!top.contains(&"proc") && !top.contains(&"tmp"), "{top:?}");
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            0,
            "the host sees nothing"
        );
    }
}
