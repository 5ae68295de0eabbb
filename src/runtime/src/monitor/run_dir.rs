//! The monitor's files beside the state directory: the directory its
//! sockets live in, and the copy of the guest console log kept when the
//! state directory goes.

use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

/// The variable that names the directory a launch's `console_copy` keeps
/// guest console logs in (the tests set it to show a failing guest's
/// console).
pub const CONSOLE_COPY_VAR: &str = "KRUN_OCI_CONSOLE_COPY";

/// A launch's `console_copy` as this process's environment gives it.
pub fn console_copy_from_env() -> Option<PathBuf> {
    std::env::var_os(CONSOLE_COPY_VAR).map(PathBuf::from)
}

/// The directory for the VM's sockets: the state directory when its path is
/// short enough for a unix socket address (108 bytes), else a private
/// directory under /tmp, removed when dropped.
pub(super) struct RunDir(pub PathBuf, bool);

impl RunDir {
    pub fn new(state_dir: &Path) -> Result<RunDir> {
        if state_dir.join("monitor.sock").as_os_str().len() < 100 {
            return Ok(RunDir(state_dir.to_path_buf(), false));
        }
        let dir = tempfile::Builder::new()
            .prefix("krun-oci-")
            .tempdir()
            .map_err(|e| Error::Failed(format!("creating a socket directory: {e}")))?;
        Ok(RunDir(dir.keep(), true))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Keeps the guest console log `log` of container `id` as `dir/ID.log`
/// when dropped (a launch's `console_copy`): the state directory, where
/// the log lives, may be removed next.
pub(super) struct ConsoleCopy {
    pub id: String,
    pub log: PathBuf,
    pub dir: Option<PathBuf>,
}

impl Drop for ConsoleCopy {
    fn drop(&mut self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::copy(&self.log, dir.join(format!("{}.log", self.id)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_long_state_path_gets_a_socket_directory_of_its_own() {
        let short = tempfile::tempdir().unwrap();
        let dir = RunDir::new(short.path()).unwrap();
        assert_eq!(dir.0, short.path());
        drop(dir);
        assert!(short.path().exists(), "the state directory stays");
        let long = short.path().join("x".repeat(120));
        let dir = RunDir::new(&long).unwrap();
        let path = dir.0.clone();
        assert!(path.is_dir() && path.join("monitor.sock").as_os_str().len() < 100);
        drop(dir);
        assert!(!path.exists());
    }

    #[test]
    fn the_console_log_is_kept_only_when_asked() {
        let tmp = tempfile::tempdir().unwrap();
        let log = tmp.path().join("console.log");
        std::fs::write(&log, "booted\n").unwrap();
        let keep = tmp.path().join("keep");
        std::fs::create_dir(&keep).unwrap();
        for dir in [None, Some(keep.clone())] {
            drop(ConsoleCopy {
                id: "c1".into(),
                log: log.clone(),
                dir,
            });
        }
        assert_eq!(std::fs::read_dir(&keep).unwrap().count(), 1);
        assert_eq!(
            std::fs::read_to_string(keep.join("c1.log")).unwrap(),
            "booted\n"
        );
    }
}
