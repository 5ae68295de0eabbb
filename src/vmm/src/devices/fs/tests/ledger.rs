//! The descriptors the guest pins (FORGET, the budget) and bind mounts
//! announced as submounts.

use super::*;

#[test]
fn forgotten_inodes_give_their_descriptors_back() {
    let mem = test_mem();
    let mut h = Harness::ready(&mem);
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
    // Node ids are the share's own, not the host's inode numbers (which
    // the backend's are derived from): a checkpoint rebuilds them over
    // another directory.
    let ino = fs::metadata(h.root.join("f0")).unwrap().ino();
    assert_ne!(nodes[0] & ((1 << 47) - 1), ino);

    // The file held keeps its one id; two lookups need two forgets.
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
    // Forgotten, it comes back under a new id: ids are never reused, so a
    // stale one never names another file.
    let again = h.lookup(ROOT_ID, "f0").unwrap().nodeid;
    assert_ne!(again, nodes[0]);
    h.forget(nodes[0], 1);
    assert_eq!(h.fs.live_inodes(), 1, "a stale id forgets nothing");
    h.forget(again, u64::MAX);

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
