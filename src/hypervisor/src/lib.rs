//! Hypervisor backends for krun-oci.
//!
//! A backend takes a [`VmConfig`] — a kernel, an initramfs, memory, vCPUs,
//! host directories to share over virtio-fs, and one end of the control
//! channel — and runs a VM from it. It knows nothing of OCI: the runtime
//! turns a bundle into a `VmConfig` and talks to guest-init over the
//! control channel itself.

use std::os::fd::OwnedFd;
use std::path::PathBuf;

mod accel;
mod capped;
pub mod capture;
mod child;
mod confine;
mod jail;
mod process;
mod qemu;
mod virtiofsd;

pub use accel::{detect_accel, Accel, AccelChoice};
pub use capped::{copy_capped, truncation_note, CappedLog, DEFAULT_LOG_LIMIT};
pub use capture::AfterCapture;
pub use child::{
    spawn, PassFd, CAPTURE_FD, CONSOLE_FD, CONTROL_FD, NET_FD, REQUEST_FD, SNAPSHOT_FD,
};
pub use confine::{
    cap_mask, confine_self, reduce_caps, ConfineError, Confinement, DENIED, MONITOR_EXTRA_CAPS,
    QEMU_CAPS, VIRTIOFSD_CAPS, VMM_CAPS, VMM_READONLY_CAPS,
};
pub use jail::{jail_id, note_host_pid, Jail, JAIL_IDS, JAIL_ID_BASE};
pub use process::{last_lines, Companions, EmptyDir, VmProcess};
pub use qemu::Qemu;

/// An error and every cause under it, in one line joined by `": "`.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut line = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        line.push_str(": ");
        line.push_str(&s.to_string());
        source = s.source();
    }
    line
}

/// A host directory shared into the guest over virtio-fs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Share {
    /// The virtio-fs tag the guest mounts it by.
    pub tag: String,
    /// The host directory. The guest can reach nothing outside it.
    pub path: PathBuf,
    pub readonly: bool,
}

/// What a VM is made of.
#[derive(Debug)]
pub struct VmConfig {
    /// An ELF vmlinux with a PVH entry point.
    pub kernel: PathBuf,
    /// The initramfs (an uncompressed cpio) holding guest-init.
    pub initrd: PathBuf,
    /// Kernel command line arguments beyond those the backend adds itself.
    pub cmdline: String,
    pub vcpus: u32,
    pub memory_mib: u64,
    pub shares: Vec<Share>,
    /// The VM's end of a connected stream socket; it appears in the guest
    /// as the virtio-console port named `control_port_name`.
    pub control: OwnedFd,
    pub control_port_name: String,
    /// The write end of a pipe (or any writable descriptor) for the
    /// guest's serial console, the kernel log. The backend only writes to
    /// it; whoever holds the other end must keep reading, or the guest
    /// stalls on its console (see [`CappedLog`]).
    pub console: OwnedFd,
    /// The most bytes a backend keeps of a log of its own that the guest
    /// can make it write (QEMU's stderr).
    pub log_limit: u64,
    /// A private directory for the backend's sockets and logs; it exists
    /// and is removed by the caller.
    pub run_dir: PathBuf,
    /// virtio-net interfaces, each over a tap.
    pub nets: Vec<NetDevice>,
    /// Boot as usual (None), or capture the VM as a template, or start
    /// from one: the built-in VMM only; other backends refuse it.
    pub snapshot: Option<SnapshotIo>,
}

/// A VM saved as, or started from, a snapshot (a template).
#[derive(Debug)]
pub enum SnapshotIo {
    /// Boot; once a byte can be read on `request` (the caller knows the
    /// guest is where it should be captured), capture the VM into `file`
    /// (new and empty, open for writing) and end it: the VM's exit is
    /// [`VmExit::GuestStopped`] once the capture is written, else
    /// [`VmExit::VmmFailed`] saying why. `kernel` and `initramfs` are the
    /// caller's hashes of its boot inputs, written into the snapshot.
    Capture {
        file: OwnedFd,
        request: OwnedFd,
        kernel: String,
        initramfs: String,
    },
    /// Start from the snapshot in `file` (open for reading, verified by
    /// the caller, never written again) instead of booting: its guest
    /// memory is mapped copy-on-write, its devices get this
    /// configuration's descriptors (control socket, console, shares).
    Restore { file: OwnedFd },
}

/// A virtio-net interface backed by a tap device (opened without packet
/// information, IFF_TAP | IFF_NO_PI, and with IFF_VNET_HDR for offloads;
/// backends work with and without it).
#[derive(Debug)]
pub struct NetDevice {
    pub tap: OwnedFd,
    /// The guest interface's MAC address, "aa:bb:cc:dd:ee:ff".
    pub mac: String,
}

/// How a VM ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum VmExit {
    /// The guest powered off or reset (guest-init's normal way out, and also
    /// what a guest kernel panic leads to).
    GuestStopped,
    /// The VMM was killed by a signal (from us, or from someone else).
    Killed { signal: i32 },
    /// The VMM failed on its own; `detail` is what it said about why.
    VmmFailed { code: i32, detail: String },
}

/// Errors starting or controlling a VM.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot start {program}")]
    Spawn {
        program: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the virtio-fs socket for share {tag:?}")]
    ShareSocket {
        tag: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot prepare the confinement of {program}")]
    Confine {
        program: String,
        #[source]
        source: ConfineError,
    },
    #[error("share {tag:?}: {path} is not a directory")]
    ShareNotDirectory { tag: String, path: PathBuf },
    #[error("waiting for the VMM failed")]
    Wait(#[source] std::io::Error),
    #[error("VM configuration is invalid: {0}")]
    InvalidConfig(String),
    #[error("cannot {what} the VM")]
    Control {
        what: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("the VMM failed to start")]
    Backend(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("cannot capture the VM: {0}")]
    Capture(String),
}

/// A hypervisor backend.
pub trait Hypervisor: Send + Sync {
    /// A short name for logs and `features` ("qemu", "builtin").
    fn name(&self) -> &'static str;
    /// Boots a VM. Returns once the VMM process runs; boot progress is seen
    /// on the control channel.
    fn start(&self, config: VmConfig) -> Result<Box<dyn Vm>, Error>;
}

/// A running VM. Dropping it kills whatever of it still runs.
pub trait Vm: Send {
    /// The pid of the VMM process.
    fn pid(&self) -> u32;
    /// Waits for the VM to end and reaps every host process it used.
    fn wait(&mut self) -> Result<VmExit, Error>;
    /// Like `wait`, but returns `None` at once if the VM still runs.
    fn try_wait(&mut self) -> Result<Option<VmExit>, Error>;
    /// Kills the VM at once (SIGKILL to every host process it used).
    fn kill(&mut self);
    /// Freezes the VM: its vCPUs stop until [`Vm::resume`].
    fn pause(&mut self) -> Result<(), Error>;
    /// Thaws a paused VM.
    fn resume(&mut self) -> Result<(), Error>;
    /// Captures the running VM (its vCPUs, devices and memory) into
    /// `file`, new and open for writing, then lets it go on or ends it.
    /// On an error the VM goes on as it was.
    fn capture(&mut self, _file: &std::fs::File, _then: AfterCapture) -> Result<(), Error> {
        self.can_capture()
    }
    /// Whether [`Vm::capture`] can be asked of this VM (an error saying
    /// why not), before anything of a checkpoint is done.
    fn can_capture(&self) -> Result<(), Error> {
        Err(Error::Unsupported(
            "this backend cannot capture a running VM",
        ))
    }
}
