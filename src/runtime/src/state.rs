//! The state directory of a container under `--root`: who it is, where its
//! bundle is, and what phase it is in. Removing it is the last step of
//! every teardown.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// runc's default is /run/runc; ours sits beside it.
pub const DEFAULT_ROOT: &str = "/run/krun-oci";

#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("invalid container id {0:?}: use letters, digits, '_', '+', '-' and '.'")]
    InvalidId(String),
    #[error("container {0:?} already exists")]
    Exists(String),
    #[error("state directory {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Container phases, as the runtime-spec names them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    Creating,
    Created,
    Running,
    Stopped,
}

/// The runtime-spec state, plus what we need to find the VM again.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct State {
    pub oci_version: String,
    pub id: String,
    pub status: Status,
    pub pid: Option<i32>,
    pub bundle: PathBuf,
    #[serde(default, skip_serializing_if = "HashMap::is_empty")]
    pub annotations: HashMap<String, String>,
}

/// runc's rule for container ids.
pub fn validate_id(id: &str) -> Result<(), StateError> {
    let ok = !id.is_empty()
        && id != "."
        && id != ".."
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "_+-.".contains(c));
    if ok {
        Ok(())
    } else {
        Err(StateError::InvalidId(id.to_string()))
    }
}

/// A container's state directory. Dropping it without [`StateDir::keep`]
/// removes it, so an error on the way leaves nothing behind.
pub struct StateDir {
    pub dir: PathBuf,
    keep: bool,
}

impl StateDir {
    /// Creates `root/id`, failing if the container exists.
    pub fn create(root: &Path, id: &str) -> Result<StateDir, StateError> {
        validate_id(id)?;
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| StateError::Io { path, source }
        };
        std::fs::create_dir_all(root).map_err(io(root))?;
        let dir = root.join(id);
        match std::fs::create_dir(&dir) {
            Ok(()) => Ok(StateDir { dir, keep: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(id.to_string()))
            }
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// Writes state.json atomically.
    pub fn write(&self, state: &State) -> Result<(), StateError> {
        let path = self.dir.join("state.json");
        let tmp = self.dir.join(".state.json.tmp");
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        std::fs::write(&tmp, json)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(|source| StateError::Io { path, source })
    }

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Keeps the directory when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_follow_runc() {
        assert!(validate_id("abc-1.2_x+y").is_ok());
        for bad in ["", ".", "..", "a/b", "a b", "x\n"] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn dropping_removes_and_exists_is_reported() {
        let root = tempfile::tempdir().unwrap();
        let s = StateDir::create(root.path(), "c1").unwrap();
        assert!(matches!(
            StateDir::create(root.path(), "c1"),
            Err(StateError::Exists(_))
        ));
        drop(s);
        assert!(!root.path().join("c1").exists());
    }
}
