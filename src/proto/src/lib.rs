//! The host <-> guest protocol of krun-oci.
//!
//! One byte stream (a virtio-console port in the guest, a socket on the
//! host) carries everything between the runtime and guest-init: control
//! messages and the stdio of every process in the VM. It is cut into
//! frames:
//!
//! ```text
//! +----------------+--------+----------------+-------------------+
//! | payload length | kind   | stream         | payload           |
//! | u32 LE         | u8     | u32 LE         | `length` bytes    |
//! +----------------+--------+----------------+-------------------+
//! ```
//!
//! `kind` says what the payload is: a JSON [`ToGuest`]/[`ToHost`] message,
//! or raw stdin/stdout/stderr bytes of the process numbered `stream`
//! (stream 0 is the container's main process, later streams are exec'd
//! processes). An empty stdio payload means end of file. The guest speaks
//! first ([`ToHost::Hello`] carries [`PROTOCOL_VERSION`]); the host never
//! writes before it has read the hello, because bytes sent to a port the
//! guest has not opened yet are lost.
//!
//! Stdin is flow-controlled, as a pipe is: the host keeps at most
//! [`STDIN_WINDOW`] bytes of a process's stdin that guest-init has not
//! yet passed on (or dropped), and guest-init says what it passed on with
//! [`ToHost::StdinTaken`]. So guest-init holds a bounded amount for a
//! process that reads slowly, and the writer on the host blocks, as it
//! would writing to that process under runc.
#![forbid(unsafe_code)]

mod frame;
mod message;

pub use frame::{
    encode_frame, Decoder, Frame, FrameKind, FrameReader, ProtoError, HEADER_LEN, MAX_PAYLOAD,
};
pub use message::*;

/// Bumped whenever a message changes incompatibly. Host and guest must agree.
pub const PROTOCOL_VERSION: u32 = 6;

/// The most stdin bytes of one process the host sends ahead of what
/// guest-init reports taken ([`ToHost::StdinTaken`]).
pub const STDIN_WINDOW: usize = 1 << 20;

/// The name of the virtio-console port that carries the protocol.
pub const CONTROL_PORT_NAME: &str = "krun.ctl";

/// The virtio-fs tag of a VM's one share: the directory the runtime
/// composes of its containers' roots and volumes, each container's under
/// its id (`ID/rootfs`, `ID/mN` for the source of mounts[N]).
pub const SHARE_TAG: &str = "krun";

/// Stream number of the container's main process.
pub const MAIN_STREAM: u32 = 0;
