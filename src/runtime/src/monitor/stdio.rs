//! The host end of the processes' stdio: where the container's own process
//! reads and writes ([`MainStdio`], set up once as [`MainIo`]), the
//! descriptors a client sends with an exec or a pod member, and writing
//! the guest's output to whoever reads it.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;

use crate::error::Result;
use crate::tty;

/// Where the container's own stdio goes.
pub enum MainStdio {
    /// This process's stdin, stdout and stderr (conmon's pipes, or the
    /// user's terminal for `run`).
    Inherit,
    /// A terminal made here whose master is sent to a `--console-socket`.
    ConsoleSocket(PathBuf),
    /// Open files or fifos (a containerd task's stdio). With a terminal,
    /// `stdin` and `stdout` carry it and `stderr` is unused.
    Files {
        stdin: Option<File>,
        stdout: Option<File>,
        stderr: Option<File>,
    },
}

/// The host end of the container's process's stdio.
#[derive(Default)]
pub(super) struct MainIo {
    pub input: Option<File>,
    pub out: Option<File>,
    pub err: Option<File>,
    /// The terminal whose size changes become resizes.
    pub tty: Option<OwnedFd>,
    /// Restores the user's terminal (foreground `run`).
    _raw: Option<tty::RawMode>,
}

/// Sets up the host end of the container's process's stdio; with a
/// terminal, `console_size` gets the terminal's size if it has none.
pub(super) fn main_io(
    stdio: MainStdio,
    terminal: bool,
    console_size: &mut Option<(u16, u16)>,
) -> Result<MainIo> {
    match stdio {
        MainStdio::Files {
            stdin,
            stdout,
            stderr,
        } => Ok(MainIo {
            input: stdin,
            out: stdout,
            err: if terminal { None } else { stderr },
            tty: None,
            _raw: None,
        }),
        MainStdio::ConsoleSocket(path) if terminal => console_socket(&path, *console_size),
        MainStdio::ConsoleSocket(_) | MainStdio::Inherit => Ok(inherit(terminal, console_size)),
    }
}

/// A terminal made here, its master sent to the socket at `path`.
fn console_socket(path: &std::path::Path, size: Option<(u16, u16)>) -> Result<MainIo> {
    let pty = tty::Pty::open(size)?;
    pty.send_master(path)?;
    // The monitor is a session leader (create made it one): the terminal
    // becomes its controlling one, so a resize by whoever holds the
    // master reaches it as SIGWINCH.
    pty.make_controlling();
    let slave = pty.slave;
    let input = slave.try_clone().ok().map(File::from);
    let out = slave.try_clone().ok().map(File::from);
    Ok(MainIo {
        input,
        out,
        err: None,
        tty: Some(slave),
        _raw: None,
    })
}

/// This process's own stdio; a terminal on stdin goes raw.
fn inherit(terminal: bool, console_size: &mut Option<(u16, u16)>) -> MainIo {
    let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok().map(File::from);
    let stdin = std::io::stdin();
    let (raw, tty_fd) = if terminal {
        *console_size = console_size.or_else(|| tty::size(stdin.as_fd()));
        let raw = tty::RawMode::enter(stdin.as_fd());
        let fd = raw
            .as_ref()
            .and_then(|_| stdin.as_fd().try_clone_to_owned().ok());
        (raw, fd)
    } else {
        (None, None)
    };
    MainIo {
        input: dup(stdin.as_fd()),
        out: dup(std::io::stdout().as_fd()),
        err: if terminal {
            None
        } else {
            dup(std::io::stderr().as_fd())
        },
        tty: tty_fd,
        _raw: raw,
    }
}

/// A process's stdin, stdout and stderr on the host.
pub(super) type Stdio = (Option<File>, Option<File>, Option<File>);

/// The descriptors of an exec: one terminal for all three, or stdin,
/// stdout and stderr. Err: how many came instead.
pub(super) fn exec_stdio(mut fds: Vec<OwnedFd>) -> std::result::Result<Stdio, usize> {
    if fds.len() != 1 {
        return member_stdio(fds);
    }
    let t = File::from(fds.remove(0));
    Ok((t.try_clone().ok(), Some(t), None))
}

/// The descriptors of a pod member: stdin, stdout and stderr. Err: how
/// many came instead.
pub(super) fn member_stdio(fds: Vec<OwnedFd>) -> std::result::Result<Stdio, usize> {
    let [input, out, err]: [OwnedFd; 3] = fds.try_into().map_err(|f: Vec<OwnedFd>| f.len())?;
    Ok((Some(input.into()), Some(out.into()), Some(err.into())))
}

/// Writes guest output to `sink`; a reader that went away does not stop
/// the container, it only gets no more.
pub(super) fn write_output(sink: &mut Option<File>, bytes: &[u8]) {
    if let Some(w) = sink {
        if w.write_all(bytes).is_err() {
            *sink = None;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| File::open("/dev/null").unwrap().into())
            .collect()
    }

    #[test]
    fn an_exec_takes_one_terminal_or_three_descriptors() {
        let (i, o, e) = exec_stdio(fds(1)).unwrap();
        assert!(i.is_some() && o.is_some() && e.is_none());
        let (i, o, e) = exec_stdio(fds(3)).unwrap();
        assert!(i.is_some() && o.is_some() && e.is_some());
        assert_eq!(exec_stdio(fds(2)).err(), Some(2));
        assert_eq!(exec_stdio(fds(0)).err(), Some(0));
        assert_eq!(member_stdio(fds(1)).err(), Some(1));
    }

    #[test]
    fn a_reader_that_went_away_gets_no_more() {
        let (r, w) = std::io::pipe().unwrap();
        let mut sink = Some(File::from(OwnedFd::from(w)));
        write_output(&mut sink, b"x");
        assert!(sink.is_some());
        drop(r);
        write_output(&mut sink, b"y");
        assert!(sink.is_none());
    }
}
