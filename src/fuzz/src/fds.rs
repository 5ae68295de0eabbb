//! The process's descriptor table as `/proc/self/fd` shows it, and
//! canaries: descriptors of the harness's own parked in the table's holes,
//! so that code closing a descriptor it does not own is caught.

use std::collections::BTreeMap;
use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

/// Every open descriptor and what it points to (readlink of
/// `/proc/self/fd/N`; `None` if it closed while being read). The
/// directory descriptor used to read the table is among them, pointing to
/// `/proc/<pid>/fd`.
pub fn table() -> BTreeMap<i32, Option<PathBuf>> {
    let mut out = BTreeMap::new();
    let dir = std::fs::read_dir("/proc/self/fd").expect("/proc/self/fd is readable");
    for entry in dir.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        out.insert(fd, std::fs::read_link(entry.path()).ok());
    }
    out
}

/// This process's `/proc/<pid>/fd`, the target of the descriptor that
/// reads it (and of fuse-backend-rs's own `/proc/self/fd` descriptor).
pub fn proc_fd_dir() -> PathBuf {
    PathBuf::from(format!("/proc/{}/fd", std::process::id()))
}

/// Descriptors of the harness's own (`/dev/null`), parked in whatever
/// numbers below a bound are free.
#[derive(Default)]
pub struct Canaries {
    held: Vec<(File, u64, u64)>,
}

impl Canaries {
    /// Fills every free descriptor number below `below` with a canary: the
    /// next descriptor the code under test closes by mistake is likely
    /// one of these.
    pub fn fill_below(&mut self, below: i32) {
        loop {
            let f = File::open("/dev/null").expect("/dev/null opens");
            if f.as_raw_fd() >= below {
                return;
            }
            let md = f.metadata().expect("a fresh descriptor has metadata");
            self.held.push((f, md.dev(), md.ino()));
        }
    }

    /// Whether `fd` is one of the canaries.
    pub fn contains(&self, fd: i32) -> bool {
        self.held.iter().any(|(f, _, _)| f.as_raw_fd() == fd)
    }

    /// Whether every canary is still open on `/dev/null`: a canary that is
    /// gone, or now something else, was closed by the code under test.
    pub fn check(&self) -> Result<(), String> {
        for (f, dev, ino) in &self.held {
            let fd = f.as_raw_fd();
            match f.metadata() {
                Ok(md) if md.dev() == *dev && md.ino() == *ino => {}
                Ok(_) => return Err(format!(
                    "descriptor {fd} (the harness's own, /dev/null) was closed by the code under test and reused"
                )),
                Err(e) => return Err(format!(
                    "descriptor {fd} (the harness's own, /dev/null) was closed by the code under test: {e}"
                )),
            }
        }
        Ok(())
    }

    /// Closes every canary (after a successful `check`).
    pub fn clear(&mut self) {
        self.held.clear();
    }
}
