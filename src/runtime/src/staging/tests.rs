//! Composing shares for real: each test runs on a thread of its own in a
//! private mount namespace (the tests run as root, as the runtime does).

use super::*;

use std::fs;
use std::os::unix::fs::symlink;

/// Runs `f` on a thread in a mount namespace of its own whose mounts are
/// private, so nothing a test mounts is seen outside it.
fn in_private_mounts<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    std::thread::scope(|s| {
        s.spawn(|| {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNS)
                .expect("unshare (run as root)");
            mount(
                None,
                Path::new("/"),
                None,
                libc::MS_REC | libc::MS_PRIVATE,
                None,
            )
            .unwrap();
            f()
        })
        .join()
        .unwrap()
    })
}

struct Fixture {
    _tmp: tempfile::TempDir,
    base: PathBuf,
    stage: PathBuf,
}

/// A root filesystem, a volume directory, a run directory holding a file
/// to bind and secrets beside it, and a symlink to a file elsewhere.
fn fixture() -> Fixture {
    let tmp = tempfile::tempdir().unwrap();
    let base = tmp.path().to_path_buf();
    fs::create_dir_all(base.join("rootfs/etc")).unwrap();
    fs::write(base.join("rootfs/etc/os-release"), "test\n").unwrap();
    fs::create_dir_all(base.join("vol")).unwrap();
    fs::write(base.join("vol/data"), "volume\n").unwrap();
    fs::create_dir_all(base.join("run")).unwrap();
    fs::write(base.join("run/hosts"), "127.0.0.1 localhost\n").unwrap();
    fs::write(base.join("run/pidfile"), "1234").unwrap();
    fs::create_dir_all(base.join("bin")).unwrap();
    fs::write(base.join("bin/real-init"), "#!init\n").unwrap();
    symlink(base.join("bin/real-init"), base.join("init-link")).unwrap();
    let stage = base.join("stage");
    Fixture {
        _tmp: tmp,
        base,
        stage,
    }
}

/// Composes a share for the [`fixture`] in a private mount namespace, with
/// container `id` added when given, runs `test` on it, and destroys it:
/// nothing of the staging directory may be left. Gives the fixture back
/// for checks of the sources.
fn staged(id: Option<&str>, test: impl FnOnce(&Fixture, &Staging) + Send) -> Fixture {
    let f = fixture();
    in_private_mounts(|| {
        let st = Staging::create(&f.stage).unwrap();
        if let Some(id) = id {
            st.add(&paths(&f, id)).unwrap();
        }
        test(&f, &st);
        st.destroy();
        assert!(!f.stage.exists(), "destroy left {}", f.stage.display());
    });
    f
}

fn paths(f: &Fixture, id: &str) -> ContainerPaths {
    let bind = |name: &str, field: &str, source: PathBuf, readonly, file| HostBind {
        name: name.into(),
        field: field.into(),
        source,
        readonly,
        file,
        idmap: None,
    };
    ContainerPaths {
        id: id.into(),
        binds: vec![
            bind("rootfs", "root.path", f.base.join("rootfs"), false, false),
            bind("m0", "mounts[0].source", f.base.join("vol"), true, false),
            bind(
                "m1",
                "mounts[1].source",
                f.base.join("run/hosts"),
                false,
                true,
            ),
            bind(
                "m2",
                "mounts[2].source",
                f.base.join("init-link"),
                true,
                true,
            ),
        ],
    }
}

fn names(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    v.sort();
    v
}

fn errno(r: io::Result<impl Sized>) -> Option<i32> {
    r.err().and_then(|e| e.raw_os_error())
}

#[test]
fn the_share_holds_exactly_the_roots_and_volumes() {
    staged(Some("c1"), |_, st| {
        let s = st.shared_dir();
        assert_eq!(names(&s), ["c1"]);
        assert_eq!(names(&s.join("c1")), ["m0", "m1", "m2", "rootfs"]);
        // A bound file comes alone: nothing else of its directory.
        assert_eq!(
            fs::read_to_string(s.join("c1/m1")).unwrap(),
            "127.0.0.1 localhost\n"
        );
        // A symlinked source is resolved on the host.
        assert_eq!(fs::read_to_string(s.join("c1/m2")).unwrap(), "#!init\n");
        assert_eq!(
            fs::read_to_string(s.join("c1/rootfs/etc/os-release")).unwrap(),
            "test\n"
        );
    });
}

#[test]
fn what_is_read_only_stays_read_only_and_links_are_not_followed() {
    staged(Some("c1"), |f, st| {
        let s = st.shared_dir();
        // The staging directory itself: nothing can be planted in it.
        assert_eq!(errno(fs::write(s.join("planted"), "x")), Some(libc::EROFS));
        assert_eq!(errno(symlink("/etc", s.join("c2"))), Some(libc::EROFS));
        assert_eq!(errno(fs::create_dir(s.join("c1/new"))), Some(libc::EROFS));
        // A read-only volume, even to root.
        assert_eq!(
            errno(fs::write(s.join("c1/m0/data"), "changed")),
            Some(libc::EROFS)
        );
        // The root filesystem is writable, and writes land in the source.
        fs::write(s.join("c1/rootfs/new"), "from the guest").unwrap();
        assert_eq!(
            fs::read_to_string(f.base.join("rootfs/new")).unwrap(),
            "from the guest"
        );
        // A symlink made in the share is never followed on the host side.
        symlink("/etc/hostname", s.join("c1/rootfs/link")).unwrap();
        assert_eq!(errno(fs::read(s.join("c1/rootfs/link"))), Some(libc::ELOOP));
        assert_eq!(
            fs::read_link(s.join("c1/rootfs/link")).unwrap(),
            Path::new("/etc/hostname")
        );
    });
}

#[test]
fn a_later_container_appears_in_the_share_and_leaves_it_cleanly() {
    let f = staged(Some("sandbox"), |f, st| {
        // A second view of the share, as a virtiofsd started earlier has.
        let view = f.base.join("view");
        fs::create_dir(&view).unwrap();
        mount(
            Some(&st.shared_dir()),
            &view,
            None,
            libc::MS_BIND | libc::MS_REC,
            None,
        )
        .unwrap();
        mount(None, &view, None, libc::MS_REC | libc::MS_SLAVE, None).unwrap();
        let member = Staging::open(&f.stage).unwrap();
        member.add(&paths(f, "member")).unwrap();
        assert_eq!(names(&view), ["member", "sandbox"]);
        assert_eq!(
            fs::read_to_string(view.join("member/m0/data")).unwrap(),
            "volume\n"
        );
        assert_eq!(
            errno(fs::write(view.join("member/m0/data"), "x")),
            Some(libc::EROFS)
        );
        assert!(matches!(
            member.add(&paths(f, "member")),
            Err(StagingError::Exists(_))
        ));
        member.remove("member");
        assert_eq!(names(&view), ["sandbox"]);
        assert_eq!(names(&st.shared_dir()), ["sandbox"]);
    });
    // The sources are untouched by all of it.
    assert_eq!(
        fs::read_to_string(f.base.join("vol/data")).unwrap(),
        "volume\n"
    );
    assert!(f.base.join("rootfs/etc/os-release").is_file());
    assert!(f.base.join("run/pidfile").is_file());
}

#[test]
fn a_failed_add_leaves_nothing() {
    let f = staged(None, |f, st| {
        let mut p = paths(f, "c1");
        // Planned as a file, but it is a directory now.
        p.binds[1].file = true;
        let e = st.add(&p).unwrap_err();
        assert!(matches!(e, StagingError::Changed { .. }), "{e}");
        assert!(e.to_string().contains("mounts[0].source"), "{e}");
        let mut p = paths(f, "c1");
        p.binds[3].source = f.base.join("missing");
        let e = st.add(&p).unwrap_err();
        assert!(e.to_string().contains("mounts[2].source"), "{e}");
        assert!(names(&st.shared_dir()).is_empty());
    });
    assert!(f.base.join("rootfs/etc/os-release").is_file());
}

#[test]
fn removal_never_deletes_through_a_mount() {
    let f = fixture();
    in_private_mounts(|| {
        let tree = f.base.join("tree");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/file"), "x").unwrap();
        mount(
            Some(&f.base.join("vol")),
            &tree.join("a/b"),
            None,
            libc::MS_BIND,
            None,
        )
        .unwrap();
        let e = remove_tree(&tree).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::ResourceBusy, "{e}");
        assert_eq!(
            fs::read_to_string(f.base.join("vol/data")).unwrap(),
            "volume\n"
        );
        umount(&tree.join("a/b")).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(f.base.join("vol/data").is_file());
        // A staging directory left behind by a crash, still mounted.
        let st = Staging::create(&f.stage).unwrap();
        st.add(&paths(&f, "c1")).unwrap();
        std::mem::forget(st);
        teardown(&f.stage);
        assert!(!f.stage.exists());
        assert!(f.base.join("rootfs/etc/os-release").is_file());
    });
}
