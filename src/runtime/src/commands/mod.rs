//! One module per subcommand; each is a short function over the library.

use std::path::PathBuf;

use crate::error::Error;

pub mod checkpoint;
pub mod create;
pub mod exec;
pub mod info;
pub mod lifecycle;
pub mod member;
pub mod run;
pub mod template;

/// What every command gets from the global flags.
#[derive(Debug, Clone)]
pub struct Context {
    /// The state root (`--root`).
    pub root: PathBuf,
    /// The backend asked for with `--hypervisor`.
    pub hypervisor: Option<crate::plan::HypervisorKind>,
    /// The container will run on after this command returns (create).
    pub detached: bool,
    /// `--require-kvm`: never fall back to TCG emulation.
    pub require_kvm: bool,
    /// `--no-template`: boot every VM cold, never from a template.
    pub no_template: bool,
    /// Where the guest console log is kept when a monitor ends
    /// ([`crate::monitor::Launch::console_copy`]).
    pub console_copy: Option<PathBuf>,
    /// `--systemd-cgroup`: `linux.cgroupsPath` is `slice:prefix:name`.
    pub systemd_cgroup: bool,
}

/// Waits for a child of ours to end, whatever its status.
fn reap(pid: libc::pid_t) {
    let mut status = 0;
    // SAFETY: waitpid on our own child, into a local.
    unsafe { libc::waitpid(pid, &mut status, 0) };
}

/// A forked child that did not report "ok" on its ready pipe: reaps it and
/// gives the error it reported ("CODE MESSAGE"), or `otherwise` with exit
/// code 1 when it died without a word.
fn child_failed(pid: libc::pid_t, report: &str, otherwise: &str) -> Error {
    reap(pid);
    let (code, message) = report
        .split_once(' ')
        .map(|(c, m)| (c.parse().unwrap_or(1), m.to_string()))
        .unwrap_or((1, otherwise.into()));
    Error::Exit { code, message }
}
