//! Asking a running VMM process to capture its VM into a file: the
//! channel between a VM's parent (the monitor, or the shim) and the
//! built-in VMM's main thread.
//!
//! One `SOCK_SEQPACKET` socket pair per VM, the VMM's end at
//! [`CAPTURE_FD`](crate::CAPTURE_FD). The parent sends one message: an
//! op byte ([`AfterCapture`]) with the snapshot file, open for writing, as
//! its one `SCM_RIGHTS` descriptor; the VMM answers with one message: a
//! status byte, 0 for done, then on failure the reason in UTF-8. The
//! parent opens the file (the VMM is jailed and opens nothing); the VMM
//! only writes into it. Each side reads a bounded message, and anything
//! else than the above is an error, never a panic.

use std::io;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags,
    SockFlag, SockType,
};

/// What the VM does once it is captured.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AfterCapture {
    /// It goes on where it was (a checkpoint with `--leave-running`).
    GoOn,
    /// It ends, as stopped, without running another guest instruction.
    End,
}

impl AfterCapture {
    fn op(self) -> u8 {
        match self {
            AfterCapture::GoOn => b'c',
            AfterCapture::End => b'e',
        }
    }

    fn of(op: u8) -> Option<AfterCapture> {
        match op {
            b'c' => Some(AfterCapture::GoOn),
            b'e' => Some(AfterCapture::End),
            _ => None,
        }
    }
}

/// The longest answer read: a status byte and a reason.
const ANSWER_MAX: usize = 4096;

/// A new channel: (the parent's end, the VMM's end), both close-on-exec
/// (the VMM's is dup'ed to its fixed number at spawn).
pub fn channel() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socketpair(
        AddressFamily::Unix,
        SockType::SeqPacket,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Asks for a capture into `file`, then `then` (the parent's side).
pub fn ask(sock: BorrowedFd<'_>, file: BorrowedFd<'_>, then: AfterCapture) -> io::Result<()> {
    let op = [then.op()];
    let fds = [file.as_raw_fd()];
    let cmsg = [ControlMessage::ScmRights(&fds)];
    sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&op)],
        &cmsg,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// Reads one request (the VMM's side): `None` when the parent closed its
/// end; an `InvalidData` error for a message that is not one request
/// (descriptors it carried are closed).
pub fn read_ask(sock: BorrowedFd<'_>) -> io::Result<Option<(AfterCapture, OwnedFd)>> {
    let mut op = [0u8; 2];
    let mut space = nix::cmsg_space!([RawFd; 2]);
    let mut iov = [IoSliceMut::new(&mut op)];
    let msg = recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut space),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let mut fds: Vec<OwnedFd> = Vec::new();
    for c in msg.cmsgs()? {
        if let ControlMessageOwned::ScmRights(rights) = c {
            // SAFETY: the kernel installed each descriptor in this process
            // for this message; nothing else owns them.
            fds.extend(
                rights
                    .into_iter()
                    .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
            );
        }
    }
    let bytes = msg.bytes;
    let truncated = msg
        .flags
        .intersects(MsgFlags::MSG_TRUNC | MsgFlags::MSG_CTRUNC);
    if bytes == 0 && fds.is_empty() && !truncated {
        return Ok(None);
    }
    let then = (bytes == 1 && !truncated)
        .then(|| AfterCapture::of(op[0]))
        .flatten();
    match (then, fds.len()) {
        (Some(then), 1) => Ok(Some((then, fds.remove(0)))),
        _ => Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "a capture request of {bytes} bytes with {} descriptors",
                fds.len()
            ),
        )),
    }
}

/// Answers a request (the VMM's side): done, or why not.
pub fn answer(sock: BorrowedFd<'_>, result: Result<(), String>) -> io::Result<()> {
    let mut msg = vec![0u8];
    if let Err(why) = result {
        msg[0] = 1;
        let mut end = why.len().min(ANSWER_MAX - 1);
        while !why.is_char_boundary(end) {
            end -= 1;
        }
        msg.extend_from_slice(&why.as_bytes()[..end]);
    }
    nix::sys::socket::send(sock.as_raw_fd(), &msg, MsgFlags::MSG_NOSIGNAL)?;
    Ok(())
}

/// Waits for the answer (the parent's side), up to `timeout`, looking
/// every second whether the VMM still runs (`alive`): `Ok(Err(why))` when
/// it said it could not; an error when the channel failed, closed, or
/// the answer did not come.
pub fn read_answer(
    sock: BorrowedFd<'_>,
    timeout: Duration,
    mut alive: impl FnMut() -> bool,
) -> io::Result<Result<(), String>> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("no answer within {} s", timeout.as_secs()),
            ));
        }
        let slice = left.min(Duration::from_secs(1));
        let mut pfd = libc::pollfd {
            fd: sock.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd that outlives the call.
        let n = unsafe { libc::poll(&mut pfd, 1, slice.as_millis() as libc::c_int) };
        if n < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            if !alive() {
                return Err(io::Error::new(
                    io::ErrorKind::BrokenPipe,
                    "the VMM ended without answering",
                ));
            }
            continue;
        }
        let mut buf = vec![0u8; ANSWER_MAX];
        let got = nix::sys::socket::recv(sock.as_raw_fd(), &mut buf, MsgFlags::empty())?;
        return match buf[..got].split_first() {
            None => Err(io::Error::new(
                io::ErrorKind::BrokenPipe,
                "the VMM closed the capture channel without answering",
            )),
            Some((0, _)) => Ok(Ok(())),
            Some((_, why)) => Ok(Err(String::from_utf8_lossy(why).into_owned())),
        };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Seek, Write};
    use std::os::fd::AsFd;

    #[test]
    fn a_request_carries_its_file_and_the_answer_its_reason() {
        let (parent, vmm) = channel().unwrap();
        let mut file = tempfile::tempfile().unwrap();
        ask(parent.as_fd(), file.as_fd(), AfterCapture::End).unwrap();
        let (then, got) = read_ask(vmm.as_fd()).unwrap().unwrap();
        assert_eq!(then, AfterCapture::End);
        // The same open file: what the VMM writes, the parent reads.
        std::fs::File::from(got).write_all(b"state").unwrap();
        let mut s = String::new();
        file.rewind().unwrap();
        file.read_to_string(&mut s).unwrap();
        assert_eq!(s, "state");

        answer(vmm.as_fd(), Err("the file system is mounted".into())).unwrap();
        let a = read_answer(parent.as_fd(), Duration::from_secs(5), || true).unwrap();
        assert_eq!(a, Err("the file system is mounted".into()));
        answer(vmm.as_fd(), Ok(())).unwrap();
        let a = read_answer(parent.as_fd(), Duration::from_secs(5), || true).unwrap();
        assert_eq!(a, Ok(()));
        // A long reason is cut, on a character boundary.
        answer(vmm.as_fd(), Err("é".repeat(5000))).unwrap();
        let a = read_answer(parent.as_fd(), Duration::from_secs(5), || true).unwrap();
        assert!(matches!(a, Err(w) if w.len() < ANSWER_MAX && w.starts_with('é')));
    }

    #[test]
    fn anything_but_one_request_is_refused_and_its_descriptors_closed() {
        let (parent, vmm) = channel().unwrap();
        let file = tempfile::tempfile().unwrap();
        // No descriptor.
        nix::sys::socket::send(parent.as_raw_fd(), b"c", MsgFlags::empty()).unwrap();
        let e = read_ask(vmm.as_fd()).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{e}");
        // An unknown op, with a descriptor.
        let fds = [file.as_raw_fd()];
        let cmsg = [ControlMessage::ScmRights(&fds)];
        sendmsg::<()>(
            parent.as_raw_fd(),
            &[IoSlice::new(b"x")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(read_ask(vmm.as_fd()).is_err());
        // Too long.
        sendmsg::<()>(
            parent.as_raw_fd(),
            &[IoSlice::new(b"ccc")],
            &cmsg,
            MsgFlags::empty(),
            None,
        )
        .unwrap();
        assert!(read_ask(vmm.as_fd()).is_err());
        // The parent goes: the end, not an error.
        drop(parent);
        assert!(read_ask(vmm.as_fd()).unwrap().is_none());
    }

    #[test]
    fn no_answer_is_an_error_not_a_hang() {
        let (parent, vmm) = channel().unwrap();
        let e = read_answer(parent.as_fd(), Duration::from_millis(300), || true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        let e = read_answer(parent.as_fd(), Duration::from_secs(30), || false).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
        drop(vmm);
        let e = read_answer(parent.as_fd(), Duration::from_secs(30), || true).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::BrokenPipe);
    }
}
