//! One module per subcommand; each is a short function over the library.

use std::path::PathBuf;

pub mod create;
pub mod exec;
pub mod info;
pub mod lifecycle;
pub mod run;

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
    /// Where the guest console log is kept when a monitor ends
    /// ([`crate::monitor::Launch::console_copy`]).
    pub console_copy: Option<PathBuf>,
}
