//! What the share holds against a hostile guest: names, symlinks, open
//! flags, special files, read-only shares, and the flags Linux really
//! sends.

use super::*;

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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
    let file = h.root.join("log.txt");
    fs::write(&file, b"share data\n").unwrap();
    let outside = h.base().join("outside.txt");
    let trap = FlagTrap::new(&file);
    let e = h.lookup(ROOT_ID, "log.txt").unwrap();
    assert_eq!(io_fds_at(&file), [0i32; 0]);
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
fn lookup_getattr_and_read_a_file() {
    let mem = test_mem();
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    let mut h = Harness::ready(&mem);
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
    assert!(
        !FsOptions::from_bits_truncate(u64::from(out.flags)).contains(FsOptions::WRITEBACK_CACHE)
    );
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
fn the_flags_linux_sends_still_open_files() {
    let mem = test_mem();
    let mut h = Harness::ready(&mem);
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
