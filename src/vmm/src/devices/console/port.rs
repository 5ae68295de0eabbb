//! Port 0's bytes: guest buffers of the transmitq written to the socket
//! (and held while it is full), the socket's bytes written into the
//! receiveq's buffers while the guest has the port open.

use std::io::{self, Read};

use vm_memory::{Address, Bytes};
use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use super::chain::{write_chain, TxChain, IO_CHUNK};
use super::control::{ControlMsg, PORT_OPEN};
use super::worker::Worker;
use super::{RX, TX};

/// Whether a transmit chain was fully consumed.
#[derive(Debug, PartialEq, Eq)]
enum TxProgress {
    Done,
    Blocked,
}

impl Worker {
    /// Guest -> host: every readable byte of every chain, in order.
    pub(super) fn process_tx(&mut self) {
        loop {
            let mut chain = match self.tx_pending.take() {
                Some(c) => c,
                None => match self.q.pop(TX) {
                    Some((head, descs)) => TxChain::new(&self.q.mem, head, &descs),
                    None => break,
                },
            };
            if self.write_tx(&mut chain) == TxProgress::Blocked {
                self.tx_pending = Some(chain);
                break;
            }
            self.q.add_used(TX, chain.head, 0);
        }
    }

    /// Writes what remains of `chain` to the socket.
    fn write_tx(&mut self, chain: &mut TxChain) -> TxProgress {
        while let Some(&(addr, len)) = chain.segments.get(chain.segment) {
            if self.host_write_closed {
                // Nobody reads: the bytes are dropped, the buffer completed.
                return TxProgress::Done;
            }
            if chain.offset >= len {
                chain.segment += 1;
                chain.offset = 0;
                continue;
            }
            let n = IO_CHUNK.min(len - chain.offset);
            let buf = &mut self.tx_scratch[..n];
            let read = addr
                .checked_add(chain.offset as u64)
                .is_some_and(|a| self.q.mem.read_slice(buf, a).is_ok());
            if !read {
                tracing::debug!("virtio-console: transmit buffer outside guest memory, skipped");
                chain.segment += 1;
                chain.offset = 0;
                continue;
            }
            let mut sent = 0;
            while sent < n {
                // sendmsg with MSG_NOSIGNAL: a closed peer is EPIPE, not SIGPIPE.
                match self.socket.send_with_fds(&[&buf[sent..]], &[]) {
                    Ok(0) => {
                        self.host_write_closed = true;
                        return TxProgress::Done;
                    }
                    Ok(k) => sent += k,
                    Err(e) if e.errno() == libc::EINTR => {}
                    Err(e) if e.errno() == libc::EAGAIN => {
                        chain.offset += sent;
                        return TxProgress::Blocked;
                    }
                    Err(e) => {
                        tracing::info!(error = %e, "virtio-console: the host stopped reading; guest output dropped");
                        self.host_write_closed = true;
                        return TxProgress::Done;
                    }
                }
            }
            chain.offset += n;
        }
        TxProgress::Done
    }

    /// Host -> guest: socket bytes into the receiveq's buffers, only while
    /// the guest has the port open (the driver drops data otherwise).
    pub(super) fn process_rx(&mut self) {
        if !self.guest_open {
            return;
        }
        loop {
            let empty = self.rx_start == self.rx_end;
            if empty && !(self.host_connected && self.q.has_avail(RX) && self.fill_rx()) {
                break;
            }
            let Some((head, descs)) = self.q.pop(RX) else {
                break;
            };
            let n = write_chain(
                &self.q.mem,
                &descs,
                &self.rx_buf[self.rx_start..self.rx_end],
            );
            self.rx_start += n;
            self.q.add_used(RX, head, n);
        }
    }

    /// Reads the socket into the empty `rx_buf`; false if nothing came.
    fn fill_rx(&mut self) -> bool {
        loop {
            match self.socket.read(&mut self.rx_buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.rx_start = 0;
                    self.rx_end = n;
                    return true;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    tracing::info!(error = %e, "virtio-console: reading the host socket failed");
                    break;
                }
            }
        }
        // End of file: the guest reads EOF once it has read what came before.
        self.host_connected = false;
        if self.multiport && self.port_ready {
            self.queue_control(ControlMsg::new(PORT_OPEN, 0).to_bytes());
        }
        false
    }
}
