//! What a monitor tells whoever embeds it (the containerd shim, the
//! commands): notices as things happen, and how the container ended.

use krun_proto::ExitStatus;

/// Something that happened to a running container.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Notice {
    /// The guest kernel OOM-killed a process of the container.
    Oom,
}

/// How the container's process ended, as the monitor reports it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub status: ExitStatus,
    pub oom_killed: bool,
}
