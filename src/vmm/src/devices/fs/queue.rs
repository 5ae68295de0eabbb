//! From the queues to the FUSE server: each chain the driver makes
//! available is one request, checked for the bounds the share's module
//! doc lists (its length against the chain's and Linux's largest, a
//! BATCH_FORGET's count, FUSE_IOCTL refused) before the server reads it,
//! and always completed, with an error reply where the server gives none.
//! [`process_queue`] is a plain function the tests and the fuzz targets
//! drive; `Worker` is what the `virtio-fs-TAG` thread serves.

use std::mem::size_of;
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{BatchForgetIn, ForgetOne, InHeader, Opcode, OutHeader};
use fuse_backend_rs::api::filesystem::FileSystem;
use fuse_backend_rs::api::server::{Server, MAX_REQ_PAGES};
use fuse_backend_rs::transport::{Reader, VirtioFsWriter};
use virtio_queue::{DescriptorChain, Queue, QueueT};

use super::share::{private_fs_attrs, ShareFs};
use super::NUM_QUEUES;
use crate::virtio::pause::DeviceReport;
use crate::virtio::state::QueueSnapshot;
use crate::virtio::worker::QueueHandler;
use crate::virtio::{Interrupt, Mem};

/// The longest request Linux sends: a WRITE of `max_pages` pages (what
/// INIT offers), its headers in one more page.
pub(super) const MAX_REQUEST_LEN: usize = MAX_REQ_PAGES as usize * 4096 + 4096;

pub(super) const OUT_HEADER_LEN: usize = size_of::<OutHeader>();

/// The `virtio-fs-TAG` thread's side: the FUSE server and the queues.
pub(super) struct Worker {
    tag: String,
    server: Server<Arc<ShareFs>>,
    mem: Mem,
    interrupt: Arc<Interrupt>,
    queues: [Queue; NUM_QUEUES],
    /// The server's filesystem, captured while the worker is parked.
    share: Arc<ShareFs>,
}

impl Worker {
    pub(super) fn new(
        tag: String,
        server: Server<Arc<ShareFs>>,
        mem: Mem,
        interrupt: Arc<Interrupt>,
        queues: [Queue; NUM_QUEUES],
        share: Arc<ShareFs>,
    ) -> Worker {
        Worker {
            tag,
            server,
            mem,
            interrupt,
            queues,
            share,
        }
    }
}

impl QueueHandler for Worker {
    /// Serves the queues that were notified, each as far as it goes.
    fn serve(&mut self, notified: &[usize]) {
        for &q in notified {
            let Some(queue) = self.queues.get_mut(q) else {
                continue;
            };
            if process_queue(&self.server, queue, &self.mem) {
                self.interrupt.signal_used_queue();
            }
        }
    }

    /// Every chain is completed within the round that popped it.
    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        Some(self.queues.iter().map(|q| q.state().into()).collect())
    }

    /// The share's nodes and handles, by path (`checkpoint.rs`), read on
    /// this thread under its allowlist; a file that cannot be carried (an
    /// open file deleted) refuses the capture, naming it.
    fn capture_device(&self) -> DeviceReport {
        match self.share.capture() {
            Ok(state) => Ok(Some(state)),
            Err(e) => Err(krun_hypervisor::error_chain(&e)),
        }
    }

    fn on_start(&mut self) {
        if let Err(e) = private_fs_attrs() {
            // fuse-backend-rs clears the umask at FUSE_INIT; without a
            // private one that is the whole process's umask.
            let tag = &self.tag;
            tracing::warn!(tag, error = %e, "virtio-fs: cannot give the worker its own umask");
        }
    }
}

/// Serves every request the driver made available on `queue`: each chain
/// is handed to the FUSE server and completed, whatever it contains.
/// Returns whether the driver should be interrupted.
pub fn process_queue<F: FileSystem + Sync>(
    server: &Server<F>,
    queue: &mut Queue,
    mem: &Mem,
) -> bool {
    if !queue.ready() {
        return false;
    }
    let mut completed = false;
    while let Some(chain) = queue.pop_descriptor_chain(mem) {
        let head = chain.head_index();
        let len = serve_chain(server, mem, chain);
        match queue.add_used(mem, head, len) {
            Ok(()) => completed = true,
            Err(e) => tracing::debug!(head, error = %e, "virtio-fs: cannot complete a chain"),
        }
    }
    completed && queue.needs_notification(mem).unwrap_or(true)
}

/// Serves one request; returns the number of bytes written to the chain.
fn serve_chain<F: FileSystem + Sync>(
    server: &Server<F>,
    mem: &Mem,
    chain: DescriptorChain<&Mem>,
) -> u32 {
    let reader = match Reader::from_descriptor_chain(mem, chain.clone()) {
        Ok(r) => r,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-fs: unusable request buffers");
            return 0;
        }
    };
    let writer = match VirtioFsWriter::new(mem, chain.clone()) {
        Ok(w) => w,
        Err(e) => {
            tracing::debug!(error = %e, "virtio-fs: unusable reply buffers");
            return 0;
        }
    };
    let capacity = writer.available_bytes();
    let Ok(header) = reader.clone().read_obj::<InHeader>() else {
        tracing::debug!("virtio-fs: request shorter than a FUSE header");
        return 0;
    };
    let opcode = header.opcode;
    let no_reply = [Opcode::Forget, Opcode::BatchForget, Opcode::Interrupt]
        .iter()
        .any(|&o| o as u32 == opcode);
    if let Err(errno) = check_request(&header, &reader) {
        tracing::debug!(
            opcode,
            len = header.len,
            "virtio-fs: request length refused"
        );
        return if no_reply {
            0
        } else {
            reply_error(mem, &chain, header.unique, errno)
        };
    }
    if no_reply {
        if let Err(e) = server.handle_message(reader, writer.into(), None, None) {
            tracing::debug!(opcode, error = %e, "virtio-fs: bad request");
        }
        return 0;
    }
    if opcode == Opcode::Ioctl as u32 {
        // The backend has no ioctls, and the server would first copy the
        // input into a host buffer as large as the guest makes the chain
        // (up to 4 GiB, with descriptors that repeat the same memory).
        return reply_error(mem, &chain, header.unique, libc::ENOTTY);
    }
    // Every reply starts with its header at the start of the writable
    // buffers, so a real reply overwrites this one; it stands when the
    // server fails without replying.
    let fallback = reply_error(mem, &chain, header.unique, libc::EIO);
    match server.handle_message(reader, writer.into(), None, None) {
        Ok(n) if n > 0 => u32::try_from(n.min(capacity)).unwrap_or(u32::MAX),
        // DESTROY replies (16 bytes) yet returns 0.
        Ok(_) => fallback,
        Err(e) => {
            tracing::debug!(opcode, error = %e, "virtio-fs: bad request");
            fallback
        }
    }
}

/// Refuses (EINVAL) a request whose header claims fewer bytes than itself,
/// more than the chain holds, or more than Linux ever sends, before the
/// server allocates `len` bytes for its body; and a BATCH_FORGET whose
/// count runs past that length (the server reserves room for `count`).
fn check_request(header: &InHeader, reader: &Reader<'_>) -> Result<(), i32> {
    let len = header.len as usize;
    if len < size_of::<InHeader>() || len > reader.available_bytes() || len > MAX_REQUEST_LEN {
        return Err(libc::EINVAL);
    }
    if header.opcode == Opcode::BatchForget as u32 {
        let mut r = reader.clone();
        let count = r
            .read_obj::<InHeader>()
            .and_then(|_| r.read_obj::<BatchForgetIn>())
            .map_err(|_| libc::EINVAL)?
            .count;
        let need = (count as usize)
            .checked_mul(size_of::<ForgetOne>())
            .and_then(|n| n.checked_add(size_of::<InHeader>() + size_of::<BatchForgetIn>()));
        if need.is_none_or(|n| n > len) {
            return Err(libc::EINVAL);
        }
    }
    Ok(())
}

/// Writes an error reply at the start of the chain's writable buffers;
/// returns its length, or 0 if it does not fit.
fn reply_error(mem: &Mem, chain: &DescriptorChain<&Mem>, unique: u64, errno: i32) -> u32 {
    let out = OutHeader {
        len: OUT_HEADER_LEN as u32,
        error: -errno,
        unique,
    };
    match VirtioFsWriter::new(mem, chain.clone()).map(|mut w| w.write_obj(out)) {
        Ok(Ok(())) => OUT_HEADER_LEN as u32,
        _ => 0,
    }
}
