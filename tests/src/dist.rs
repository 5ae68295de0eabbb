//! What `hack/build` and `hack/setup` made, under target/dist (or
//! `$KRUN_OCI_DIST`): the binaries under test, the VM assets and the test
//! tools, each checked to be newer than its sources. A missing or stale one
//! fails the test with a message saying how to get it; nothing skips.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// The workspace's top folder (this crate is its `tests` folder).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// `$KRUN_OCI_DIST`, else the workspace's target/dist: where `hack/build`
/// puts the binaries and `hack/setup` adds the kernel and virtiofsd.
pub fn dist() -> PathBuf {
    std::env::var_os("KRUN_OCI_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/dist"))
}

/// The directory with vmlinux, initramfs.cpio and virtiofsd that `hack/setup`
/// assembles. Panics with instructions when it is missing or stale.
pub fn libdir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let lib = dist().join("lib/krun-oci");
        for f in ["vmlinux", "initramfs.cpio", "virtiofsd"] {
            assert!(
                lib.join(f).is_file(),
                "VM TESTS CANNOT RUN: {} is missing. Run `hack/setup` (or `hack/test`) as root first; \
                 these tests boot real microVMs and fail rather than skip.",
                lib.join(f).display()
            );
        }
        // An initramfs older than guest-init's sources would test old code.
        let built = mtime(&lib.join("initramfs.cpio"));
        for dir in ["guest-init/src", "src/proto/src"] {
            let newest = newest_mtime(&workspace().join(dir));
            assert!(built >= newest, "{} is older than {dir}: run hack/build", lib.join("initramfs.cpio").display());
        }
        lib
    })
    .clone()
}

/// The source folders of the runtime binary.
const RUNTIME_SOURCES: [&str; 4] = [
    "src/runtime/src",
    "src/hypervisor/src",
    "src/vmm/src",
    "src/proto/src",
];

/// The krun-oci binary under test, `$KRUN_OCI_DIST/bin/krun-oci`, which
/// `hack/build` makes. Panics with instructions when it is missing or
/// older than its sources.
pub fn krun_oci_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| dist_bin("krun-oci", &RUNTIME_SOURCES))
        .clone()
}

/// The containerd shim under test, `$KRUN_OCI_DIST/bin/containerd-shim-krun-v2`
/// (containerd finds it there), which `hack/build` makes. Panics with
/// instructions when it is missing or older than its sources.
pub fn shim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let sources: Vec<&str> = ["shim/src"].into_iter().chain(RUNTIME_SOURCES).collect();
        dist_bin("containerd-shim-krun-v2", &sources)
    })
    .clone()
}

/// `name` in `$KRUN_OCI_DIST/bin`, checked to be newer than each folder of
/// `sources`.
fn dist_bin(name: &str, sources: &[&str]) -> PathBuf {
    let bin = dist().join("bin").join(name);
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "END-TO-END TESTS CANNOT RUN: {} is missing. Run `hack/build` (or `hack/test`) first; \
                 these tests run the binaries it builds and fail rather than skip.",
                bin.display()
            )
        });
    for dir in sources {
        assert!(
            built >= newest_mtime(&workspace().join(dir)),
            "{} is older than {dir}: run hack/build",
            bin.display()
        );
    }
    bin
}

/// The static netperf tool (guest-init/examples/netperf.rs) that
/// `hack/build` puts in target/dist/tools, for tests to copy into a busybox
/// rootfs. Panics with instructions when it is missing or stale.
pub fn netperf() -> PathBuf {
    tool("netperf")
}

/// The static FUSE file system (guest-init/examples/fusehello.rs), as
/// [`netperf`].
pub fn fusehello() -> PathBuf {
    tool("fusehello")
}

fn tool(name: &str) -> PathBuf {
    let bin = dist().join("tools").join(name);
    assert!(
        bin.is_file(),
        "{} is missing: run hack/build",
        bin.display()
    );
    let src = workspace().join(format!("guest-init/examples/{name}.rs"));
    assert!(
        mtime(&bin) >= mtime(&src),
        "{} is older than {}: run hack/build",
        bin.display(),
        src.display()
    );
    bin
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).and_then(|m| m.modified()).unwrap()
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = if e.path().is_dir() {
            newest_mtime(&e.path())
        } else {
            mtime(&e.path())
        };
        newest = newest.max(t);
    }
    newest
}
