//! An existing container, as the commands after `create` see it: its state
//! directory, its state, and a line to its monitor.

use std::path::Path;

use crate::api::{Client, Request, Response};
use crate::error::{Error, Result, ResultExt as _};
use crate::state::{State, StateDir, Status};

pub struct Existing {
    pub id: String,
    pub dir: StateDir,
    pub state: State,
}

impl Existing {
    pub fn open(root: &Path, id: &str) -> Result<Existing> {
        let dir = StateDir::open(root, id)?;
        let state = dir.read()?;
        Ok(Existing {
            id: id.to_string(),
            dir,
            state,
        })
    }

    /// The config `create` read, for the hooks (None, with a warning, if
    /// it cannot be read). Never the bundle's config.json again: a hook
    /// runs as root, and the bundle may have changed since.
    pub fn spec(&self) -> Option<oci_spec::runtime::Spec> {
        let path = self.dir.config_path();
        let spec = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| crate::bundle::parse_spec(&path, &b).map_err(|e| e.to_string()));
        match spec {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(container = %self.id, "cannot read the config create saw, for its hooks: {e}");
                None
            }
        }
    }

    pub fn status(&self) -> Status {
        self.state.effective_status()
    }

    /// A connection to the container's monitor; fails if it is not running.
    pub fn client(&self) -> Result<Client> {
        let status = self.status();
        let monitor = self
            .state
            .monitor
            .as_ref()
            .filter(|_| status != Status::Stopped);
        let Some(m) = monitor else {
            return Err(Error::NoMonitor {
                id: self.id.clone(),
                status,
            });
        };
        Client::connect(&m.socket)
            .with_context(|| format!("container {:?}: cannot reach its monitor", self.id))
    }

    /// `req` as this container's monitor must get it. A container in
    /// another's VM (a pod's) has that VM's monitor: the request names its
    /// stream (or, for an exec, its id), and pause and resume freeze its
    /// own processes in the guest rather than the VM.
    pub fn routed(&self, req: Request) -> Result<Request> {
        let Some(m) = &self.state.member else {
            return Ok(req);
        };
        let stream = m.stream;
        Ok(match req {
            Request::Start => Request::StartContainer { stream },
            Request::Kill { signal, all, .. } => Request::Kill {
                signal,
                all,
                stream,
            },
            Request::Ps { .. } => Request::Ps { stream },
            Request::Stats { .. } => Request::Stats { stream },
            Request::Update { limits, .. } => Request::Update { limits, stream },
            Request::Exec { process, .. } => Request::Exec {
                process,
                container: Some(self.id.clone()),
            },
            // Its processes go; the VM stays for the others.
            Request::Shutdown => Request::Kill {
                signal: libc::SIGKILL,
                all: true,
                stream,
            },
            // Its own processes are frozen in the guest; the VM runs on.
            Request::Pause => Request::Freeze {
                stream,
                frozen: true,
            },
            Request::Resume => Request::Freeze {
                stream,
                frozen: false,
            },
            other => other,
        })
    }

    /// Sends one request and turns an error response into an error. A
    /// monitor whose guest never answers (a request the guest must reply
    /// to: start, ps, stats, update) does not hang the command.
    pub fn call(&self, req: &Request) -> Result<Response> {
        let req = &self.routed(req.clone())?;
        let mut client = self.client()?;
        client.set_timeout(Some(crate::session::BOOT_TIMEOUT))?;
        let resp = client
            .call(req)
            .map_err(|e| {
                if e.kind() == std::io::ErrorKind::WouldBlock {
                    std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "no answer within {:?} (the guest may have stopped answering)",
                            crate::session::BOOT_TIMEOUT
                        ),
                    )
                } else {
                    e
                }
            })
            .with_context(|| format!("container {:?}", self.id))?;
        match resp {
            Response::Error { code, message } => Err(Error::Exit { code, message }),
            other => Ok(other),
        }
    }

    /// Sends one request with `fds` (SCM_RIGHTS) and waits for the
    /// answer, however long it takes (a checkpoint writes the VM's memory);
    /// an error response is an error.
    pub fn call_with_fds(&self, req: &Request, fds: &[std::os::fd::RawFd]) -> Result<Response> {
        let mut client = self.client()?;
        client
            .send(req, fds)
            .and_then(|()| client.recv())
            .with_context(|| format!("container {:?}", self.id))
            .and_then(|resp| match resp {
                Response::Error { code, message } => Err(Error::Exit { code, message }),
                other => Ok(other),
            })
    }

    /// Waits up to `timeout` for the monitor to be gone.
    pub fn wait_monitor_gone(&self, timeout: std::time::Duration) -> bool {
        let Some(m) = &self.state.monitor else {
            return true;
        };
        let deadline = std::time::Instant::now() + timeout;
        while m.alive() {
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        true
    }

    /// Kills the monitor with SIGKILL (its VM goes with it) and waits.
    pub fn kill_monitor(&self) -> Result<()> {
        if let Some(m) = self.state.monitor.as_ref().filter(|m| m.alive()) {
            // SAFETY: kill has no memory effects; the pid was checked to be
            // the monitor (same start time) just above.
            unsafe { libc::kill(m.pid, libc::SIGKILL) };
            if !self.wait_monitor_gone(std::time::Duration::from_secs(10)) {
                return Err(Error::MonitorStuck {
                    id: self.id.clone(),
                    pid: m.pid,
                });
            }
        }
        Ok(())
    }
}

/// Parses a signal as runc does: a number, or a name with or without SIG.
pub fn parse_signal(s: &str) -> Result<i32> {
    if let Ok(n) = s.parse::<i32>() {
        if (1..=64).contains(&n) {
            return Ok(n);
        }
        return Err(Error::Invalid(format!("invalid signal number {n}")));
    }
    let name = s.to_ascii_uppercase();
    let name = name.strip_prefix("SIG").unwrap_or(&name).to_string();
    let full = format!("SIG{name}");
    nix::sys::signal::Signal::iterator()
        .find(|sig| sig.as_str() == full)
        .map(|sig| sig as i32)
        .or_else(|| match name.as_str() {
            "RTMIN" => Some(libc::SIGRTMIN()),
            "RTMAX" => Some(libc::SIGRTMAX()),
            _ => None,
        })
        .ok_or_else(|| Error::Invalid(format!("unknown signal {s:?}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signals_parse_like_runc() {
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert_eq!(parse_signal("TERM").unwrap(), 15);
        assert_eq!(parse_signal("SIGKILL").unwrap(), 9);
        assert_eq!(parse_signal("sigusr1").unwrap(), libc::SIGUSR1);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
    }
}
