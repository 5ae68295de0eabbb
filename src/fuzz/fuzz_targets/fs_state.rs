//! `fs_state`: a tampered virtio-fs checkpoint state (a checkpoint
//! directory edited, or carried through podman export/import) rebuilt
//! over a share with symlinks pointing out of it.
//!
//! Drives: `krun_vmm::devices::fs::ShareFs::rebuild` on a fresh share,
//! with either the input's raw bytes, or (to get past the JSON and the
//! checks that need no file) an `FsState` built from the input: up to 8
//! nodes whose paths are 1 to 4 components from a small vocabulary (the
//! share's real names, `..`, `.`, empty ones, names with `/`, and the
//! symlinks), up to 4 handles with flags both valid and arbitrary, ids
//! and types from small ranges.
//!
//! The share (`share/`) holds `a/b/c`, `w.txt`, and the symlinks `esc` ->
//! `../outside` and `a/link` -> `outside/secret.txt` by absolute path;
//! `outside/secret.txt` lies beside it with an atime older than its mtime
//! (so, with relatime, any read of it moves the atime). Invariants:
//!
//! * no panic;
//! * nothing outside the share is opened: after the rebuild, no
//!   descriptor of the process leads outside the share (besides the ones
//!   held before it), and the secret's atime has not moved;
//! * a rebuild that succeeds captures again without error (every node's
//!   path is beneath the share's root) and to the same bytes when the
//!   input was a captured state's encoding; one that fails leaves the
//!   share with no node, handle or session;
//! * once the share is dropped, no descriptor is left.
//!
//! The share lives in the scratch directory (`$KRUN_FUZZ_TMPDIR`, else
//! `/dev/shm`, else the temporary directory).
#![no_main]

use std::fs;
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::OnceLock;

use fuse_backend_rs::api::filesystem::FsOptions;
use krun_oci_fuzz::{fds, scratch};
use krun_vmm::devices::fs::{FsState, HandleState, NodeState, ShareFs, STATE_VERSION};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;

struct World {
    share: PathBuf,
    outside: PathBuf,
    secret: PathBuf,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let base = scratch::dir();
        let outside = base.join("outside");
        fs::create_dir(&outside).unwrap();
        let secret = outside.join("secret.txt");
        scratch::sentinel(&secret, b"secret");
        let share = base.join("share");
        fs::create_dir_all(share.join("a/b")).unwrap();
        fs::write(share.join("a/b/c"), b"abc").unwrap();
        fs::write(share.join("w.txt"), b"w").unwrap();
        symlink("../outside", share.join("esc")).unwrap();
        symlink(&secret, share.join("a/link")).unwrap();
        World {
            share,
            outside,
            secret,
        }
    })
}

const NAMES: [&str; 12] = [
    "a", "b", "c", "w.txt", "esc", "link", "secret.txt", "..", ".", "", "a/b", "outside",
];
const KINDS: [u32; 4] = [libc::S_IFREG, libc::S_IFDIR, libc::S_IFLNK, 0o170000];
const FLAGS: [u32; 5] = [
    (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u32,
    (libc::O_RDWR | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u32,
    (libc::O_RDONLY | libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_DIRECTORY) as u32,
    (libc::O_WRONLY | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_CLOEXEC) as u32,
    libc::O_PATH as u32,
];

#[derive(Arbitrary, Debug)]
struct Node {
    id: u8,
    nlookup: u8,
    kind: u8,
    path: Vec<u8>,
}

#[derive(Arbitrary, Debug)]
struct Handle {
    fh: u8,
    node: u8,
    flags: u8,
    raw_flags: Option<u32>,
    dir: bool,
}

#[derive(Arbitrary, Debug)]
struct Shaped {
    readonly: bool,
    offered: u64,
    nodes: Vec<Node>,
    handles: Vec<Handle>,
}

fn pick<T: Copy>(list: &[T], i: u8) -> T {
    list[i as usize % list.len()]
}

impl Shaped {
    fn state(&self) -> FsState {
        let nodes = self.nodes.iter().take(8).map(|n| NodeState {
            id: u64::from(n.id % 16),
            nlookup: u64::from(n.nlookup % 4),
            kind: pick(&KINDS, n.kind),
            path: n
                .path
                .iter()
                .take(4)
                .map(|&i| pick(&NAMES, i))
                .collect::<Vec<_>>()
                .join("/"),
        });
        let handles = self.handles.iter().take(4).map(|h| HandleState {
            fh: u64::from(h.fh % 8),
            node: u64::from(h.node % 16),
            flags: h.raw_flags.unwrap_or(pick(&FLAGS, h.flags)),
            dir: h.dir,
        });
        FsState {
            version: STATE_VERSION,
            offered: self.offered,
            nodes: nodes.collect(),
            handles: handles.collect(),
        }
    }
}

fn atime(path: &Path) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    let m = fs::metadata(path).unwrap();
    (m.atime(), m.atime_nsec())
}

fn run(bytes: &[u8], readonly: bool, shaped: bool) {
    let w = world();
    let before = fds::table();
    let secret_atime = atime(&w.secret);
    {
        let share = ShareFs::new(&w.share, readonly).unwrap().with_fd_budget(64);
        let rebuilt = share.rebuild(bytes);
        for (fd, target) in fds::table() {
            if let Some(t) = target {
                assert!(
                    before.contains_key(&fd) || !t.starts_with(&w.outside),
                    "descriptor {fd} leads outside the share: {}",
                    t.display()
                );
            }
        }
        assert_eq!(atime(&w.secret), secret_atime, "the secret was read");
        match rebuilt {
            Ok(()) => {
                let again = share.capture().expect("a rebuilt share captures again");
                if shaped && bytes != [0] {
                    // The shaped state, once accepted, is in capture order.
                    let mut want: FsState = serde_json::from_slice(bytes).unwrap();
                    want.offered = FsOptions::from_bits_truncate(want.offered).bits();
                    want.nodes.sort_by_key(|n| n.id);
                    want.handles.sort_by_key(|h| h.fh);
                    let got: FsState = serde_json::from_slice(&again).unwrap();
                    assert_eq!(got, want);
                }
            }
            Err(_) => {
                assert!(!share.session().load(Ordering::SeqCst));
                assert_eq!((share.live_inodes(), share.open_handles()), (0, 0));
            }
        }
    }
    let after = fds::table();
    let leaked: Vec<_> = after.keys().filter(|fd| !before.contains_key(fd)).collect();
    // The descriptor that read the table is the only newcomer allowed.
    assert!(leaked.len() <= 1, "descriptors left: {leaked:?} {after:?}");
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    if mode & 1 == 0 {
        run(rest, mode & 2 != 0, false);
        return;
    }
    let mut u = Unstructured::new(rest);
    let Ok(shaped) = Shaped::arbitrary(&mut u) else {
        return;
    };
    let bytes = serde_json::to_vec(&shaped.state()).unwrap();
    run(&bytes, shaped.readonly, true);
});
