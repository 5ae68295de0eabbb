//! The library's one error: what an entry point of krun-oci (a command,
//! [`crate::monitor::Monitor::prepare`], a call to a running container's
//! monitor) fails with. Each module's own error is a variant, kept whole,
//! so a caller can match on it (`delete --force` of a container that is
//! not there); the process-exit case carries the status to end with.
//!
//! A binary prints [`Error::message`] and exits with [`Error::exit_code`];
//! the message is the error and its causes joined by `": "`, each cause a
//! `#[source]` and never repeated in the text above it.

use std::path::PathBuf;

use crate::api::Response;
use crate::assets::AssetError;
use crate::backend::BackendError;
use crate::bundle::BundleError;
use crate::cgroups::CgroupError;
use crate::hooks::HookError;
use crate::plan::PlanError;
use crate::session::SessionError;
use crate::staging::StagingError;
use crate::state::{StateError, Status};

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// End the runtime with `code`: the workload's 126/127 when its
    /// program cannot be run, or what a monitor reported for a request.
    #[error("{message}")]
    Exit { code: i32, message: String },
    #[error(transparent)]
    Bundle(#[from] BundleError),
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Backend(#[from] BackendError),
    #[error(transparent)]
    Hook(#[from] HookError),
    /// The container's cgroup on the host.
    #[error("host cgroup")]
    Cgroup(#[from] CgroupError),
    /// The VM or its guest failed while a container was being made.
    #[error(transparent)]
    Session(SessionError),
    /// The VM or its guest failed under a running container.
    #[error("container {id}")]
    Vm {
        id: String,
        #[source]
        source: SessionError,
    },
    /// The container's network namespace could not be carried into its VM.
    #[error("linux.namespaces: carrying network namespace {} into the VM", netns.display())]
    Network {
        netns: PathBuf,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A flag, or a file a flag names, that the command cannot use.
    #[error("{0}")]
    Invalid(String),
    /// Something krun-oci does not do (or cannot do with a VM).
    #[error("{0}")]
    Unsupported(String),
    /// The container is not in a state the command acts on.
    #[error("cannot {action} a container that is {status}")]
    Status {
        action: &'static str,
        status: Status,
    },
    #[error("container {0:?} is not running")]
    NotRunning(String),
    /// There is no monitor to talk to.
    #[error("container {id:?} is not running (status {status})")]
    NoMonitor { id: String, status: Status },
    #[error("cannot delete container {id:?} that is not stopped: {status}")]
    NotStopped { id: String, status: Status },
    #[error("container {id:?}: its monitor (pid {pid}) does not die")]
    MonitorStuck { id: String, pid: i32 },
    /// A monitor answered what the request does not expect.
    #[error("unexpected answer from the monitor{}", answer.as_ref().map(|a| format!(": {a:?}")).unwrap_or_default())]
    Unexpected { answer: Option<Box<Response>> },
    /// Something else that went wrong, said in one sentence.
    #[error("{0}")]
    Failed(String),
    #[error(transparent)]
    Io(#[from] std::io::Error),
    /// A failed system call or file operation, and what it was doing.
    #[error("{context}")]
    IoDoing {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{context}")]
    SysDoing {
        context: String,
        #[source]
        source: nix::Error,
    },
    #[error(transparent)]
    Json(#[from] serde_json::Error),
    #[error("{context}")]
    JsonDoing {
        context: String,
        #[source]
        source: serde_json::Error,
    },
}

impl Error {
    /// The status a process that fails with this error exits with.
    pub fn exit_code(&self) -> i32 {
        match self {
            Error::Exit { code, .. } => *code,
            _ => 1,
        }
    }

    /// The error as a user reads it: its message and every cause's,
    /// joined by `": "`.
    pub fn message(&self) -> String {
        krun_hypervisor::error_chain(self)
    }
}

/// A process that could not be created or started ends the command with
/// its status; any other session error is the VM's.
impl From<SessionError> for Error {
    fn from(e: SessionError) -> Error {
        match e {
            SessionError::Process { code, message } => Error::Exit { code, message },
            other => Error::Session(other),
        }
    }
}

/// Says what was being done when an operation failed.
pub trait ResultExt<T> {
    fn context(self, doing: &str) -> Result<T>;
    fn with_context(self, doing: impl FnOnce() -> String) -> Result<T>;
}

/// An error that can be told what was being done.
pub trait Cause {
    fn doing(self, context: String) -> Error;
}

impl Cause for std::io::Error {
    fn doing(self, context: String) -> Error {
        Error::IoDoing {
            context,
            source: self,
        }
    }
}

impl Cause for nix::Error {
    fn doing(self, context: String) -> Error {
        Error::SysDoing {
            context,
            source: self,
        }
    }
}

impl Cause for serde_json::Error {
    fn doing(self, context: String) -> Error {
        Error::JsonDoing {
            context,
            source: self,
        }
    }
}

impl<T, E: Cause> ResultExt<T> for Result<T, E> {
    fn context(self, doing: &str) -> Result<T> {
        self.map_err(|e| e.doing(doing.to_string()))
    }

    fn with_context(self, doing: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| e.doing(doing()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_exit_case_carries_its_status_and_only_its_message() {
        let e = Error::from(SessionError::Process {
            code: 127,
            message: "executable file not found in $PATH".into(),
        });
        assert_eq!(e.exit_code(), 127);
        assert_eq!(e.message(), "executable file not found in $PATH");
    }

    #[test]
    fn other_errors_exit_1_with_their_causes_once() {
        let e = std::io::Error::from_raw_os_error(libc::ENOENT);
        let e: Error = Err::<(), _>(e).context("creating a pipe").unwrap_err();
        assert_eq!(e.exit_code(), 1);
        assert_eq!(
            e.message(),
            "creating a pipe: No such file or directory (os error 2)"
        );
        let e = Error::Vm {
            id: "c1".into(),
            source: SessionError::GuestFatal("boom".into()),
        };
        assert_eq!(e.message(), "container c1: guest-init failed: boom");
        let e: Error = StateError::NotFound("c1".into()).into();
        assert!(matches!(e, Error::State(StateError::NotFound(_))));
        assert_eq!(e.message(), "container \"c1\" does not exist");
    }

    #[test]
    fn an_unexpected_answer_names_it_when_known() {
        let e = Error::Unexpected { answer: None };
        assert_eq!(e.message(), "unexpected answer from the monitor");
        let e = Error::Unexpected {
            answer: Some(Box::new(Response::Ok)),
        };
        assert_eq!(e.message(), "unexpected answer from the monitor: Ok");
    }
}
