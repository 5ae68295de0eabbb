//! The host terminal: raw mode while a container owns it, and its size.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use nix::sys::termios::{cfmakeraw, tcgetattr, tcsetattr, SetArg, Termios};

/// The terminal's size as (rows, cols), if `fd` is a terminal.
pub fn size(fd: BorrowedFd<'_>) -> Option<(u16, u16)> {
    use std::os::fd::AsRawFd;
    let mut ws = libc::winsize {
        ws_row: 0,
        ws_col: 0,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCGWINSZ writes one winsize into `ws`, which outlives the call.
    let ret = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut ws) };
    (ret == 0).then_some((ws.ws_row, ws.ws_col))
}

/// Puts a terminal in raw mode and restores it when dropped.
pub struct RawMode {
    fd: OwnedFd,
    saved: Termios,
}

impl RawMode {
    /// Raw mode on `fd` if it is a terminal; None otherwise.
    pub fn enter(fd: BorrowedFd<'_>) -> Option<RawMode> {
        let saved = tcgetattr(fd).ok()?;
        let mut raw = saved.clone();
        cfmakeraw(&mut raw);
        tcsetattr(fd, SetArg::TCSANOW, &raw).ok()?;
        Some(RawMode {
            fd: fd.try_clone_to_owned().ok()?,
            saved,
        })
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let _ = tcsetattr(self.fd.as_fd(), SetArg::TCSANOW, &self.saved);
    }
}

/// A host pseudo-terminal for a container whose terminal is handed to
/// someone else (conmon) through a `--console-socket`.
pub struct Pty {
    pub master: OwnedFd,
    pub slave: OwnedFd,
}

impl Pty {
    /// A new pair, its slave raw (the guest's pty does the line
    /// discipline; this one only carries bytes), sized `size` (rows, cols).
    pub fn open(size: Option<(u16, u16)>) -> std::io::Result<Pty> {
        let ws = size.map(|(rows, cols)| nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        });
        let p = nix::pty::openpty(ws.as_ref(), None).map_err(std::io::Error::from)?;
        let mut raw = tcgetattr(p.slave.as_fd()).map_err(std::io::Error::from)?;
        cfmakeraw(&mut raw);
        tcsetattr(p.slave.as_fd(), SetArg::TCSANOW, &raw).map_err(std::io::Error::from)?;
        for fd in [&p.master, &p.slave] {
            nix::fcntl::fcntl(
                fd,
                nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::FD_CLOEXEC),
            )
            .map_err(std::io::Error::from)?;
        }
        Ok(Pty {
            master: p.master,
            slave: p.slave,
        })
    }

    /// Sends the master over the unix socket at `path`, as runc does: the
    /// descriptor with the terminal's name as the message.
    pub fn send_master(&self, path: &std::path::Path) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let sock = std::os::unix::net::UnixStream::connect(path).map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("--console-socket {}: {e}", path.display()),
            )
        })?;
        let name = nix::unistd::ttyname(self.slave.as_fd())
            .map(|p| p.to_string_lossy().into_owned())
            .unwrap_or_default();
        let iov = [std::io::IoSlice::new(name.as_bytes())];
        let fds = [self.master.as_raw_fd()];
        let cmsg = [nix::sys::socket::ControlMessage::ScmRights(&fds)];
        nix::sys::socket::sendmsg::<()>(
            sock.as_raw_fd(),
            &iov,
            &cmsg,
            nix::sys::socket::MsgFlags::empty(),
            None,
        )
        .map_err(std::io::Error::from)?;
        Ok(())
    }

    /// Makes the slave this session's controlling terminal (best effort).
    pub fn make_controlling(&self) {
        use std::os::fd::AsRawFd;
        // SAFETY: TIOCSCTTY takes an integer argument.
        unsafe { libc::ioctl(self.slave.as_raw_fd(), libc::TIOCSCTTY, 0) };
    }
}
