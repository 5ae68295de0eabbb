//! virtio-console (virtio spec 5.3) with `VIRTIO_CONSOLE_F_MULTIPORT` and
//! exactly one port: port 0, a generic (non-console) port with a name, whose
//! host side is a connected unix stream socket.
//!
//! The guest finds the port by that name (`/sys/class/virtio-ports/*/name`)
//! and opens `/dev/vportNp0`; what flows over it is an opaque byte stream.
//!
//! Queues: 0 = port 0 receiveq (host -> guest), 1 = port 0 transmitq
//! (guest -> host), 2 = control receiveq (device -> driver), 3 = control
//! transmitq (driver -> device).
//!
//! The control handshake, as Linux's `drivers/char/virtio_console.c` drives
//! it (QEMU's `hw/char/virtio-serial-bus.c` answers the same way):
//!
//! ```text
//! driver                                   device
//! DEVICE_READY(id -1, 1)          ->
//!                                 <-       PORT_ADD(0)
//! PORT_READY(0, 1)                ->       (0 = the guest failed to add it)
//!                                 <-       PORT_NAME(0) + name + NUL
//!                                 <-       PORT_OPEN(0, 1)   host connected
//! PORT_OPEN(0, 1|0)               ->       the guest opened/closed the port
//!                                 <-       PORT_OPEN(0, 0)   host went away
//! ```
//!
//! Unlike QEMU, nothing the host sends is lost before the guest opens the
//! port: the Linux driver discards data arriving on a closed generic port,
//! so the device does not even read the socket until the guest opened it.
//!
//! All the device logic lives in [`Worker`], plain methods over the queues,
//! guest memory and the socket that tests drive directly; the
//! `virtio-console` thread is the one loop of [`crate::virtio::worker`].
//! Here is the device the transport sees; `worker.rs` the state the thread
//! serves, `control.rs` the handshake above, `port.rs` port 0's bytes
//! between its queues and the socket, `state.rs` what a snapshot keeps of
//! the worker (a restored console is built over a new socket).
//!
//! Every descriptor chain comes from the guest and is treated as hostile:
//! direction flags are checked, memory errors are handled (a chain is
//! truncated at the first bad descriptor), chain length is bounded by
//! virtio-queue's iterator, nothing panics on guest data.

#[cfg(test)]
mod capture_tests;
mod chain;
mod control;
mod port;
mod state;
#[cfg(test)]
mod tests;
mod worker;

pub use worker::Worker;

use std::io;
use std::os::unix::net::UnixStream;
use std::thread::JoinHandle;

use crate::virtio::state::StateError;
use crate::virtio::worker::spawn_pausable;
use crate::virtio::{
    read_config_bytes, Activation, DeviceError, DeviceQueues, VirtioDevice, TYPE_CONSOLE,
};

/// Feature bit: the device has a control queue and possibly several ports.
pub const VIRTIO_CONSOLE_F_MULTIPORT: u64 = 1 << 1;

/// Maximum size of each of the device's queues.
pub const QUEUE_MAX_SIZE: u16 = 256;

/// Number of queues: port 0 rx/tx, control rx/tx.
pub const NUM_QUEUES: usize = 4;

/// Queue indices.
const RX: usize = 0;
const TX: usize = 1;
const CTRL_RX: usize = 2;
const CTRL_TX: usize = 3;

/// `max_nr_ports` in the configuration space.
const MAX_NR_PORTS: u32 = 1;

/// The virtio-console device.
pub struct Console {
    port_name: String,
    backend: Option<UnixStream>,
    acked_features: u64,
    /// A restored console's state, for its worker at activation.
    restored: Option<state::Saved>,
    worker: Option<JoinHandle<()>>,
}

impl Console {
    /// A console whose port 0 is named `port_name` and carries the bytes of
    /// `backend`, a connected stream socket (its peer is the host side).
    ///
    /// The name must fit a driver's control buffer (Linux posts a page):
    /// a few dozen bytes, no NUL.
    pub fn new(port_name: &str, backend: UnixStream) -> Console {
        Console {
            port_name: port_name.to_owned(),
            backend: Some(backend),
            acked_features: 0,
            restored: None,
            worker: None,
        }
    }

    /// The worker thread, once activated (it exits when the VM's stop
    /// event becomes readable).
    pub fn take_worker(&mut self) -> Option<JoinHandle<()>> {
        self.worker.take()
    }
}

/// The configuration space: cols, rows, max_nr_ports, emerg_wr.
fn config_space() -> [u8; 12] {
    let mut c = [0u8; 12];
    c[4..8].copy_from_slice(&MAX_NR_PORTS.to_le_bytes());
    c
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        TYPE_CONSOLE
    }

    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![QUEUE_MAX_SIZE; NUM_QUEUES]
    }

    fn features(&self) -> u64 {
        VIRTIO_CONSOLE_F_MULTIPORT
    }

    fn set_acked_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&config_space(), offset, data)
    }

    /// A console not activated: its handshake has not begun (a running
    /// one's state is its worker's, `state.rs`).
    fn save_state(&self) -> Option<Vec<u8>> {
        let fresh = state::Saved::fresh();
        Some(self.restored.as_ref().unwrap_or(&fresh).to_bytes())
    }

    fn restore_state(&mut self, bytes: &[u8]) -> Result<(), StateError> {
        self.restored = Some(state::Saved::from_bytes(bytes)?);
        Ok(())
    }

    fn activate(&mut self, activation: Activation) -> Result<(), DeviceError> {
        // The queue count first: a wrong one leaves the backend in place.
        let (queues, notify) = DeviceQueues::<NUM_QUEUES>::split(activation.queues)?;
        let socket = self.backend.take().ok_or_else(|| {
            DeviceError::Backend(io::Error::other("the console was already activated"))
        })?;
        // Reads must never block the worker; writes wait on EPOLLOUT.
        socket.set_nonblocking(true).map_err(DeviceError::Backend)?;
        let multiport = self.acked_features & VIRTIO_CONSOLE_F_MULTIPORT != 0;
        if !multiport {
            tracing::warn!(
                "the guest's virtio-console driver refused MULTIPORT: the port has no name"
            );
        }
        let queues = DeviceQueues::new(
            "virtio-console",
            activation.mem,
            activation.interrupt,
            queues,
        );
        let mut worker = Worker::new(queues, socket, &self.port_name, multiport);
        if let Some(saved) = self.restored.take() {
            worker.restore(saved);
        }
        let handle = spawn_pausable(
            "virtio-console".into(),
            worker,
            notify,
            activation.stop,
            activation.pause,
        )?;
        self.worker = Some(handle);
        Ok(())
    }
}
