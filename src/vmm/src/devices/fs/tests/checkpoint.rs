//! A mounted share captured and rebuilt over a copy of its directory
//! (`checkpoint.rs`): the guest's old node ids and handles work on the
//! new server; what cannot be carried fails the capture; a tampered state
//! is refused without opening anything outside the share.

use std::os::unix::fs::symlink as make_symlink;

use super::*;

/// `dir`'s tree copied to `to` (files, directories, symlinks as links).
fn copy_tree(dir: &Path, to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let (from, dest) = (entry.path(), to.join(entry.file_name()));
        let ty = entry.file_type().unwrap();
        if ty.is_symlink() {
            make_symlink(fs::read_link(&from).unwrap(), &dest).unwrap();
        } else if ty.is_dir() {
            copy_tree(&from, &dest);
        } else {
            fs::copy(&from, &dest).unwrap();
        }
    }
}

/// A directory beside which a copy of a share is served: `share/` and
/// `outside_dir/secret`, which must stay out of reach.
struct Copy {
    dir: tempfile::TempDir,
}

impl Copy {
    fn of(root: &Path) -> Copy {
        let dir = tempfile::tempdir().unwrap();
        copy_tree(root, &dir.path().join("share"));
        fs::create_dir(dir.path().join("outside_dir")).unwrap();
        fs::write(dir.path().join("outside_dir/secret"), b"secret").unwrap();
        Copy { dir }
    }

    fn root(&self) -> PathBuf {
        self.dir.path().join("share").canonicalize().unwrap()
    }

    fn outside(&self) -> PathBuf {
        self.dir.path().join("outside_dir").canonicalize().unwrap()
    }
}

/// A share with `a/b/c`, `w.txt` and `r.txt` beside the harness's files.
fn populated(mem: &Mem) -> Harness<'_> {
    let h = Harness::ready(mem);
    fs::create_dir_all(h.root.join("a/b")).unwrap();
    fs::write(h.root.join("a/b/c"), b"abc").unwrap();
    fs::write(h.root.join("w.txt"), b"write me").unwrap();
    fs::write(h.root.join("r.txt"), b"renamed").unwrap();
    h
}

fn decode(state: &[u8]) -> FsState {
    serde_json::from_slice(state).unwrap()
}

fn encode(state: &FsState) -> Vec<u8> {
    serde_json::to_vec(state).unwrap()
}

#[test]
fn a_mounted_share_is_rebuilt_under_the_same_ids_over_a_copy() {
    let mem = test_mem();
    let mut h = populated(&mem);
    let a = h.lookup(ROOT_ID, "a").unwrap().nodeid;
    let b = h.lookup(a, "b").unwrap().nodeid;
    let c = h.lookup(b, "c").unwrap().nodeid;
    let w = h.lookup(ROOT_ID, "w.txt").unwrap().nodeid;
    let hello = h.lookup(ROOT_ID, "hello.txt").unwrap().nodeid;
    assert_eq!(h.lookup(ROOT_ID, "hello.txt").unwrap().nodeid, hello);
    let r = h.lookup(ROOT_ID, "r.txt").unwrap().nodeid;
    // Renamed after its lookup: found at its new path.
    h.rename(ROOT_ID, "r.txt", a, "moved.txt").unwrap();
    let fh_c = h.open(c, libc::O_RDONLY).unwrap();
    let fh_w = h.open(w, libc::O_RDWR).unwrap();
    let fh_a = h.opendir(a).unwrap();
    let fh_root = h.opendir(ROOT_ID).unwrap();

    let state = h.fs.capture().unwrap();
    let parsed = decode(&state);
    let path_of = |id| {
        let n = parsed.nodes.iter().find(|n| n.id == id).unwrap();
        (n.path.as_str(), n.nlookup)
    };
    assert_eq!(path_of(c), ("a/b/c", 1));
    assert_eq!(path_of(r), ("a/moved.txt", 1));
    assert_eq!(path_of(hello), ("hello.txt", 2));
    assert_eq!(parsed.handles.len(), 4);

    let copy = Copy::of(&h.root);
    let mem2 = test_mem();
    let mut n = Harness::serving(&mem2, 0, &copy.root(), false);
    n.fs.rebuild(&state).unwrap();
    assert!(n.fs.session().load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!(n.fs.live_inodes(), h.fs.live_inodes());
    assert_eq!(n.fs.open_handles(), 4);
    assert_eq!(n.fs.capture().unwrap(), state, "captured again, the same");

    // No INIT: the guest goes on with its old ids.
    assert_eq!(n.read(c, fh_c, 0, 64), Ok(b"abc".to_vec()));
    assert_eq!(n.write(w, fh_w, 0, b"WRITE"), Ok(5));
    assert_eq!(fs::read(copy.root().join("w.txt")).unwrap(), b"WRITE me");
    assert_eq!(fs::read(h.root.join("w.txt")).unwrap(), b"write me");
    assert_eq!(
        n.getattr(b).unwrap().attr.mode & libc::S_IFMT,
        libc::S_IFDIR
    );
    assert_eq!(n.getattr(r).unwrap().attr.size, 7);
    let names: Vec<_> = n.readdirplus(a, fh_a, 64 * 1024).unwrap();
    let mut names: Vec<_> = names.into_iter().map(|(name, _)| name).collect();
    names.sort();
    assert_eq!(names, ["b", "moved.txt"]);
    // A handle of another node, or one never given, is refused.
    assert_eq!(n.read(w, fh_c, 0, 64), Err(libc::EBADF));
    assert_eq!(n.read(c, fh_root + 100, 0, 64), Err(libc::EBADF));
    // The same file looked up again keeps its id; lookups still add up.
    assert_eq!(n.lookup(ROOT_ID, "hello.txt").unwrap().nodeid, hello);
    n.forget(hello, 2);
    assert!(n.getattr(hello).is_ok(), "one lookup is left");
    n.forget(hello, 1);
    assert_eq!(n.getattr(hello), Err(libc::EBADF));
    assert!(n.readdirplus(ROOT_ID, fh_root, 64 * 1024).is_ok());
    // New ids never collide with the rebuilt ones.
    fs::write(copy.root().join("new.txt"), b"").unwrap();
    let fresh = n.lookup(ROOT_ID, "new.txt").unwrap().nodeid;
    assert!(parsed.nodes.iter().all(|x| x.id != fresh) && fresh != ROOT_ID);
    let fresh_fh = n.open(fresh, libc::O_RDONLY).unwrap();
    assert!(parsed.handles.iter().all(|x| x.fh != fresh_fh));

    for (node, fh) in [(c, fh_c), (w, fh_w)] {
        let release = ReleaseIn {
            fh,
            ..Default::default()
        };
        let r = n.call(Opcode::Release, node, release.as_slice());
        assert_eq!(r.result(), Ok(&[][..]));
    }
    assert_eq!(n.read(c, fh_c, 0, 64), Err(libc::EBADF));
    assert!(io_fds_at(&copy.root().join("a/b/c")).is_empty());
}

#[test]
fn a_deleted_open_file_fails_the_capture_naming_it() {
    let mem = test_mem();
    let mut h = populated(&mem);
    let w = h.lookup(ROOT_ID, "w.txt").unwrap().nodeid;
    h.open(w, libc::O_RDONLY).unwrap();
    fs::remove_file(h.root.join("w.txt")).unwrap();
    let e = h.fs.capture().unwrap_err();
    assert!(
        matches!(e, CheckpointError::Deleted { id, .. } if id == w),
        "{e}"
    );
    assert!(
        e.to_string()
            .ends_with("w.txt (deleted)): an open file was deleted: a checkpoint cannot carry it"),
        "{e}"
    );
    // Moved out of the share by the host: not beneath its root.
    let a = h.lookup(ROOT_ID, "a").unwrap().nodeid;
    h.forget(w, 1);
    fs::rename(h.root.join("a"), h.base().join("a_out")).unwrap();
    let e = h.fs.capture().unwrap_err();
    assert!(
        matches!(e, CheckpointError::OutsideShare { id, .. } if id == a),
        "{e}"
    );
}

#[test]
fn an_unmounted_share_is_one_byte_and_rebuilds_to_nothing() {
    let mem = test_mem();
    let h = Harness::new(&mem, false);
    assert_eq!(h.fs.capture().unwrap(), [NO_SESSION]);
    let copy = Copy::of(&h.root);
    let n = Harness::serving(&mem, SECOND_QUEUE, &copy.root(), false);
    n.fs.rebuild(&[NO_SESSION]).unwrap();
    assert!(!n.fs.session().load(std::sync::atomic::Ordering::SeqCst));
}

/// A captured session with `a/b/c` and `w.txt` looked up and opened.
fn captured() -> (FsState, PathBuf, tempfile::TempDir) {
    let mem = test_mem();
    let mut h = populated(&mem);
    let a = h.lookup(ROOT_ID, "a").unwrap().nodeid;
    let b = h.lookup(a, "b").unwrap().nodeid;
    let c = h.lookup(b, "c").unwrap().nodeid;
    h.open(c, libc::O_RDONLY).unwrap();
    let w = h.lookup(ROOT_ID, "w.txt").unwrap().nodeid;
    h.open(w, libc::O_WRONLY | libc::O_APPEND).unwrap();
    let state = decode(&h.fs.capture().unwrap());
    let dir = tempfile::tempdir().unwrap();
    copy_tree(&h.root, &dir.path().join("tree"));
    (state, dir.path().join("tree"), dir)
}

/// Rebuilds `state` over a fresh copy of `tree` (changed by `edit`); the
/// error, with the share left with nothing held and nothing outside the
/// share opened.
fn refused(state: &FsState, tree: &Path, edit: impl FnOnce(&Copy)) -> String {
    refused_bytes(&encode(state), tree, edit)
}

fn refused_bytes(state: &[u8], tree: &Path, edit: impl FnOnce(&Copy)) -> String {
    let copy = Copy::of(tree);
    edit(&copy);
    let mem = test_mem();
    let n = Harness::serving(&mem, 0, &copy.root(), false);
    let e = n.fs.rebuild(state).unwrap_err();
    assert_eq!(fds_under(&copy.outside()), 0, "nothing outside is opened");
    assert!(!n.fs.session().load(std::sync::atomic::Ordering::SeqCst));
    assert_eq!((n.fs.live_inodes(), n.fs.open_handles()), (0, 0));
    krun_hypervisor::error_chain(&e)
}

#[test]
fn a_tampered_state_is_refused_naming_the_entry() {
    let (state, tree, _dir) = captured();
    let c = state.nodes.iter().find(|n| n.path == "a/b/c").unwrap().id;
    let with = |f: &dyn Fn(&mut FsState)| {
        let mut s = state.clone();
        f(&mut s);
        s
    };
    let set_path = |p: &'static str| {
        with(&move |s: &mut FsState| {
            s.nodes.iter_mut().find(|n| n.id == c).unwrap().path = p.into()
        })
    };
    let none = |_: &Copy| {};
    for (path, why) in [
        ("a/../../outside_dir/secret", "component \"..\""),
        ("../outside_dir/secret", "component \"..\""),
        ("/etc/passwd", "component \"\""),
        ("a//c", "component \"\""),
        ("a/./b/c", "component \".\""),
        ("", "a path of 0 bytes"),
    ] {
        let e = refused(&set_path(path), &tree, none);
        assert!(
            e.contains(&format!("node {c}")) && e.contains(why),
            "{path}: {e}"
        );
    }
    let name_max = format!("a/{}", "x".repeat(256));
    let long = with(&|s: &mut FsState| s.nodes[0].path = name_max.clone());
    assert!(refused(&long, &tree, none).contains("component"));

    let cases: [(&str, FsState); 9] = [
        ("id is 0", with(&|s: &mut FsState| s.nodes[0].id = 0)),
        (
            "the root's",
            with(&|s: &mut FsState| s.nodes[0].id = ROOT_ID),
        ),
        (
            "given twice",
            with(&|s: &mut FsState| s.nodes[1].id = s.nodes[0].id),
        ),
        ("no lookup", with(&|s: &mut FsState| s.nodes[0].nlookup = 0)),
        (
            "file type",
            with(&|s: &mut FsState| s.nodes[0].kind = 0o170000),
        ),
        (
            "is not recorded",
            with(&|s: &mut FsState| s.handles[0].node = 999),
        ),
        (
            "has file type",
            with(&|s: &mut FsState| s.handles[0].dir = true),
        ),
        (
            "open flags",
            with(&|s: &mut FsState| s.handles[0].flags |= libc::O_PATH as u32),
        ),
        ("version 2", with(&|s: &mut FsState| s.version = 2)),
    ];
    for (why, s) in cases {
        let e = refused(&s, &tree, none);
        assert!(e.contains(why), "{why}: {e}");
    }
    // A handle that would truncate, or create, on the rebuild.
    let trunc = with(&|s: &mut FsState| s.handles[1].flags |= libc::O_TRUNC as u32);
    assert!(refused(&trunc, &tree, none).contains("open flags"));
    // An absurd count, beyond the share's descriptor budget.
    let many = with(&|s: &mut FsState| {
        let n = s.nodes[0].clone();
        s.nodes = (0..10_000)
            .map(|i| NodeState {
                id: 2 + i,
                ..n.clone()
            })
            .collect();
    });
    let bytes = encode(&many);
    let copy = Copy::of(&tree);
    let mem = test_mem();
    let share = ShareFs::new(&copy.root(), false)
        .unwrap()
        .with_fd_budget(1000);
    let n = Harness::sharing(&mem, 0, &copy.root(), share);
    let e = krun_hypervisor::error_chain(&n.fs.rebuild(&bytes).unwrap_err());
    assert!(e.contains("more than the 1000 host descriptors"), "{e}");
    // Not a state at all.
    for bytes in [&b"\x01"[..], b"{}", b"[0]", &[0u8, 0]] {
        assert!(refused_bytes(bytes, &tree, none).contains("not a virtio-fs state"));
    }
    assert!(refused_bytes(&vec![b' '; 2 << 20], &tree, none).contains("more than"));
}

#[test]
fn a_rebuild_never_follows_a_symlink_out_of_the_share() {
    let (state, tree, _dir) = captured();
    // `a` replaced with a symlink to a directory outside holding `b/c`:
    // the node `a` has changed type, and the walk to `a/b/c` stops there.
    let plant = |copy: &Copy| {
        let outside = copy.outside();
        fs::create_dir_all(outside.join("b")).unwrap();
        fs::write(outside.join("b/c"), b"outside").unwrap();
        fs::remove_dir_all(copy.root().join("a")).unwrap();
        make_symlink(&outside, copy.root().join("a")).unwrap();
    };
    let e = refused(&state, &tree, plant);
    assert!(e.contains("(a): the file type is 0o120000"), "{e}");
    let mut only_c = state.clone();
    only_c
        .nodes
        .retain(|n| n.path == "a/b/c" || n.path == "w.txt");
    let e = refused(&only_c, &tree, plant);
    assert!(e.contains("(a/b/c): \"a\" is not a directory"), "{e}");
    // A file that became a directory, or went missing.
    let e = refused(&state, &tree, |copy| {
        fs::remove_file(copy.root().join("w.txt")).unwrap();
        fs::create_dir(copy.root().join("w.txt")).unwrap();
    });
    assert!(e.contains("(w.txt): the file type is"), "{e}");
    let e = refused(&state, &tree, |copy| {
        fs::remove_file(copy.root().join("a/b/c")).unwrap();
    });
    assert!(e.contains("(a/b/c): looking up \"c\""), "{e}");
    // Two entries naming one file.
    let mut twice = state.clone();
    let w = twice.nodes.iter().position(|n| n.path == "w.txt").unwrap();
    twice.nodes[w].path = "a/b/c".into();
    twice.handles.retain(|h| h.node != twice.nodes[w].id);
    assert!(refused(&twice, &tree, |_| {}).contains("are one file"));
    // A writable handle on a read-only share.
    let copy = Copy::of(&tree);
    let mem = test_mem();
    let n = Harness::serving(&mem, 0, &copy.root(), true);
    let e = krun_hypervisor::error_chain(&n.fs.rebuild(&encode(&state)).unwrap_err());
    assert!(
        e.contains("opening it") && e.ends_with("Read-only file system (os error 30)"),
        "{e}"
    );
}
