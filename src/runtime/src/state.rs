//! The state directory of a container under `--root`: who it is, where its
//! bundle is, and what phase it is in. Removing it is the last step of
//! every teardown.

use std::collections::HashMap;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
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
    #[error("container {0:?} does not exist")]
    NotFound(String),
    #[error("container {id:?}: state.json is corrupt")]
    Corrupt {
        id: String,
        #[source]
        source: serde_json::Error,
    },
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
    Paused,
    Stopped,
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.pad(match self {
            Status::Creating => "creating",
            Status::Created => "created",
            Status::Running => "running",
            Status::Paused => "paused",
            Status::Stopped => "stopped",
        })
    }
}

/// The process that runs a container's VM (its pid is the container's pid).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Monitor {
    pub pid: i32,
    /// Its start time in clock ticks since boot (/proc/PID/stat field 22),
    /// so that a recycled pid is not mistaken for it.
    pub start_time: u64,
    /// The socket it serves requests on.
    pub socket: PathBuf,
}

impl Monitor {
    /// This process, serving on `socket`.
    pub fn this(socket: PathBuf) -> Monitor {
        let (pid, start_time) = identity();
        Monitor {
            pid,
            start_time,
            socket,
        }
    }

    /// Whether the monitor still runs (a zombie waiting for its parent to
    /// reap it has finished).
    pub fn alive(&self) -> bool {
        process_stat(self.pid)
            .is_some_and(|(state, start)| start == self.start_time && state != 'Z' && state != 'X')
    }
}

static IDENTITY: std::sync::OnceLock<(i32, u64)> = std::sync::OnceLock::new();

/// This process's pid and start time as the host sees them. A monitor that
/// is the init of its own PID namespace is pid 1 to itself; it captures
/// this (with [`capture_identity`]) while /proc is still the host's.
pub fn identity() -> (i32, u64) {
    *IDENTITY.get_or_init(|| {
        let pid = std::fs::read_link("/proc/self")
            .ok()
            .and_then(|p| p.to_str().and_then(|s| s.parse().ok()))
            .unwrap_or(std::process::id() as i32);
        (pid, process_start_time(pid).unwrap_or(0))
    })
}

/// Records [`identity`] now.
pub fn capture_identity() {
    identity();
}

/// A process's state letter and start time from /proc/PID/stat.
fn process_stat(pid: i32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    let mut fields = rest.split_whitespace();
    let state = fields.next()?.chars().next()?;
    // Field 22 overall is the 19th after the state.
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// A process's start time in clock ticks since boot (None if it is gone).
pub fn process_start_time(pid: i32) -> Option<u64> {
    process_stat(pid).map(|(_, start)| start)
}

/// How the container's process ended.
#[derive(Clone, Copy, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Exit {
    pub code: i32,
    pub signal: Option<i32>,
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
    /// When the container was created (RFC 3339).
    #[serde(default)]
    pub created: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monitor: Option<Monitor>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit: Option<Exit>,
    /// The guest kernel OOM-killed a process of the container.
    #[serde(default)]
    pub oom_killed: bool,
    /// The network namespace carried into the VM, for `delete` to release
    /// after a monitor that could not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::net::NetRecord>,
    /// The container's cgroup on the host, for `delete` to remove (as
    /// runc's `cgroup_paths`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cgroup: Option<crate::cgroups::CgroupPaths>,
    /// A container that runs in another container's VM (a podman pod's):
    /// its requests go to that VM's monitor, about its own stream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub member: Option<Member>,
    /// The name its VM knows it by (its directory in the share, guest-init's
    /// container), when that is not its id: it was restored from a
    /// checkpoint of another container.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest_id: Option<String>,
}

/// Where a container in another container's VM is: the container whose
/// VM it runs in, and the stream of its main process there.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Member {
    pub leader: String,
    pub stream: u32,
}

impl State {
    /// The status, corrected for a monitor that died without saying so
    /// (killed with -9): then the container is stopped.
    pub fn effective_status(&self) -> Status {
        match (&self.status, &self.monitor) {
            (Status::Stopped, _) => Status::Stopped,
            (_, Some(m)) if !m.alive() => Status::Stopped,
            (Status::Creating, None) => Status::Stopped,
            (s, _) => *s,
        }
    }

    /// The runtime-spec `state` document.
    pub fn to_oci(&self) -> serde_json::Value {
        let status = self.effective_status();
        let mut v = serde_json::json!({
            "ociVersion": self.oci_version,
            "id": self.id,
            "status": status.to_string(),
            "bundle": self.bundle,
            "rootfs": self.bundle.join("rootfs"),
            "created": self.created,
            "owner": "",
        });
        if status != Status::Stopped {
            if let Some(m) = &self.monitor {
                v["pid"] = m.pid.into();
            }
        } else {
            v["pid"] = 0.into();
        }
        if !self.annotations.is_empty() {
            v["annotations"] =
                serde_json::to_value(&self.annotations).expect("annotations serialize");
        }
        v
    }
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
        private_dir_builder()
            .recursive(true)
            .create(root)
            .map_err(io(root))?;
        let dir = root.join(id);
        match private_dir_builder().create(&dir) {
            Ok(()) => Ok(StateDir { dir, keep: false }),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                Err(StateError::Exists(id.to_string()))
            }
            Err(e) => Err(io(&dir)(e)),
        }
    }

    /// Opens the state directory of an existing container; dropping it
    /// keeps it.
    pub fn open(root: &Path, id: &str) -> Result<StateDir, StateError> {
        validate_id(id)?;
        let dir = root.join(id);
        if !dir.is_dir() {
            return Err(StateError::NotFound(id.to_string()));
        }
        Ok(StateDir { dir, keep: true })
    }

    /// Reads state.json.
    pub fn read(&self) -> Result<State, StateError> {
        let path = self.dir.join("state.json");
        let id = self
            .dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let bytes = match std::fs::read(&path) {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(StateError::NotFound(id))
            }
            Err(source) => return Err(StateError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| StateError::Corrupt { id, source })
    }

    /// Removes the directory now.
    pub fn remove(mut self) -> Result<(), StateError> {
        self.keep = true;
        remove_state_dir(&self.dir).map_err(|source| StateError::Io {
            path: self.dir.clone(),
            source,
        })
    }

    /// Writes state.json atomically.
    pub fn write(&self, state: &State) -> Result<(), StateError> {
        let json = serde_json::to_vec_pretty(state).expect("state serializes");
        self.write_file("state.json", &json)
    }

    /// Writes `name` in the state directory atomically, readable by root
    /// only, never following a link.
    pub fn write_file(&self, name: &str, bytes: &[u8]) -> Result<(), StateError> {
        let path = self.dir.join(name);
        replace_file(&path, bytes, 0o600).map_err(|source| StateError::Io { path, source })
    }

    /// The bundle's config.json as `create` read it: what `start`,
    /// `delete` and the hooks use, whatever happens to the bundle after.
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("config.json")
    }

    /// The guest's serial console log.
    pub fn console_log(&self) -> PathBuf {
        self.dir.join("console.log")
    }

    /// Keeps the directory when this value is dropped.
    pub fn keep(&mut self) {
        self.keep = true;
    }

    /// Removes the directory when this value is dropped (after an error).
    pub fn discard_on_drop(&mut self) {
        self.keep = false;
    }

    /// Takes an exclusive lock on the container, held until the returned
    /// guard is dropped, so that two commands never change it at once.
    pub fn lock(&self) -> Result<nix::fcntl::Flock<std::fs::File>, StateError> {
        let path = self.dir.join("lock");
        let io = |source| StateError::Io {
            path: path.clone(),
            source,
        };
        let f = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .custom_flags(libc::O_NOFOLLOW)
            .open(&path)
            .map_err(io)?;
        nix::fcntl::Flock::lock(f, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| io(e.into()))
    }
}

impl Drop for StateDir {
    fn drop(&mut self) {
        if !self.keep {
            let _ = remove_state_dir(&self.dir);
        }
    }
}

/// Directories only root can enter, as runc makes its state directories.
fn private_dir_builder() -> std::fs::DirBuilder {
    let mut b = std::fs::DirBuilder::new();
    b.mode(0o700);
    b
}

/// Writes `bytes` to `path` atomically, for a directory someone else may
/// also write (a pid file beside conmon's files, the `oom` file in the
/// bundle): a temporary file made beside it with O_CREAT|O_EXCL (a name
/// planted there is never opened, let alone followed), then renamed over
/// `path` (a link at `path` is replaced, never followed).
pub fn replace_file(path: &Path, bytes: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let mut tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".krun-tmp")
        .permissions(std::fs::Permissions::from_mode(mode))
        .tempfile_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.persist(path).map(drop).map_err(|e| e.error)
}

/// Removes a state directory: its VM share unmounted first, and nothing
/// deleted through a mount that is still there.
fn remove_state_dir(dir: &Path) -> std::io::Result<()> {
    crate::staging::teardown(&dir.join("share"));
    crate::staging::remove_tree(dir)
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
