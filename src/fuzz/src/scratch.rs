//! The scratch directory of a fuzz target process: where shares and
//! bundles are made. Fuzzers end by exit or crash, never by unwinding, so
//! nothing removes it then; each process instead removes those of
//! processes that are gone.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

const PREFIX: &str = "krun-oci-fuzz-";

/// `<tmp>/krun-oci-fuzz-<pid>`, made on first use, where `<tmp>` is
/// `$KRUN_FUZZ_TMPDIR`, else `/dev/shm` (shares churn: memory is faster
/// than a disk), else the temporary directory. Canonical.
pub fn dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let tmp = std::env::var_os("KRUN_FUZZ_TMPDIR")
            .map(PathBuf::from)
            .or_else(|| Some(PathBuf::from("/dev/shm")).filter(|p| p.is_dir()))
            .unwrap_or_else(std::env::temp_dir);
        remove_stale(&tmp);
        let dir = tmp.join(format!("{PREFIX}{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("the scratch directory");
        dir.canonicalize().expect("the scratch directory resolves")
    })
}

/// Removes the scratch directories of fuzzer processes that are gone.
fn remove_stale(tmp: &Path) {
    let Ok(entries) = std::fs::read_dir(tmp) else {
        return;
    };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name
            .to_str()
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|p| p.parse::<u32>().ok())
        else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Writes a sentinel file outside a share: `contents`, mode 0600, and an
/// atime older than its mtime, so that (with relatime) any read of it
/// moves the atime.
pub fn sentinel(path: &Path, contents: &[u8]) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, contents).expect("the sentinel file");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    let old = std::time::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000_000);
    f.set_times(
        std::fs::FileTimes::new()
            .set_accessed(old)
            .set_modified(old + std::time::Duration::from_secs(60)),
    )
    .unwrap();
}
