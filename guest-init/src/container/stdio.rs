//! A container process's stdio: pipes that guest-init relays, or a
//! terminal the process allocates in the container's own devpts and hands
//! back to guest-init.

use std::fs::{self, File};
use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;

use krun_proto::ProcessSetup;

use crate::failure::{Failure, OrFail};
use crate::sys;

/// guest-init's ends of a process's stdio.
#[derive(Default)]
pub struct Stdio {
    pub stdin: Option<File>,
    pub stdout: Option<File>,
    pub stderr: Option<File>,
    /// The pty master when the process has a terminal (also in stdin/stdout).
    pub tty: Option<File>,
}

/// The child's side of its stdio.
pub enum ChildStdio {
    /// Pipe ends, dup'ed onto 0, 1 and 2.
    Pipes([OwnedFd; 3]),
    /// The child allocates a pty in the container's own devpts (so that
    /// `tty` and job control work inside) and sends the master back.
    Tty {
        sock: OwnedFd,
        size: Option<(u16, u16)>,
        uid: u32,
    },
}

/// guest-init's side until the child is ready.
pub enum ParentStdio {
    Ready(Stdio),
    /// The pty master arrives over this socket.
    Tty(OwnedFd),
}

/// Both sides of the stdio of a process about to be forked.
pub fn make(p: &ProcessSetup) -> Result<(ParentStdio, ChildStdio), Failure> {
    if p.terminal {
        let (parent, child) = sys::socketpair().or_fail(|| "allocating a terminal".into())?;
        return Ok((
            ParentStdio::Tty(parent),
            ChildStdio::Tty {
                sock: child,
                size: p.console_size,
                uid: p.uid,
            },
        ));
    }
    let pipe = || sys::pipe().or_fail(|| "creating stdio pipes".into());
    let (in_r, in_w) = pipe()?;
    let (out_r, out_w) = pipe()?;
    let (err_r, err_w) = pipe()?;
    sys::set_nonblocking(&in_w).or_fail(|| "creating stdio pipes".into())?;
    let stdio = Stdio {
        stdin: Some(in_w.into()),
        stdout: Some(out_r.into()),
        stderr: Some(err_r.into()),
        tty: None,
    };
    Ok((
        ParentStdio::Ready(stdio),
        ChildStdio::Pipes([in_r, out_w, err_w]),
    ))
}

impl ParentStdio {
    /// The stdio of a child that reported ready.
    pub fn finish(self) -> Result<Stdio, Failure> {
        match self {
            ParentStdio::Ready(s) => Ok(s),
            ParentStdio::Tty(sock) => {
                let master = sys::recv_fd(&sock).or_fail(|| "receiving the terminal".into())?;
                sys::set_nonblocking(&master).or_fail(|| "receiving the terminal".into())?;
                let m = File::from(master);
                let dup = |f: &File| f.try_clone().or_fail(|| "receiving the terminal".into());
                Ok(Stdio {
                    stdin: Some(dup(&m)?),
                    stdout: Some(dup(&m)?),
                    stderr: None,
                    tty: Some(m),
                })
            }
        }
    }
}

impl ChildStdio {
    /// Makes the pipe ends this process's 0, 1 and 2 (a terminal is
    /// attached later, from inside the container: [`attach_terminal`]).
    pub fn dup_pipes(&self) -> Result<(), Failure> {
        if let ChildStdio::Pipes([stdin, stdout, stderr]) = self {
            sys::set_stdio(stdin, stdout, stderr).or_fail(|| "setting up stdio".into())?;
        }
        Ok(())
    }
}

/// Allocates the container's terminal from its own /dev/ptmx, hands the
/// master to guest-init and makes the slave this process's controlling
/// terminal, stdio and /dev/console (as runc does).
pub fn attach_terminal(sock: &OwnedFd, size: Option<(u16, u16)>, uid: u32) -> Result<(), Failure> {
    let (master, slave) = sys::open_pty(Path::new("/dev/ptmx")).or_fail(|| {
        "process.terminal: opening /dev/ptmx (the bundle needs a devpts mount on /dev/pts)".into()
    })?;
    if let Some((rows, cols)) = size {
        sys::set_winsize(master.as_raw_fd(), rows, cols)
            .or_fail(|| "process.consoleSize".into())?;
    }
    sys::fchown(&slave, uid)
        .or_fail(|| "process.terminal: handing the terminal to the user".into())?;
    if let Ok(n) = sys::pty_number(&master) {
        let console = Path::new("/dev/console");
        if fs::symlink_metadata(console).is_err() {
            let _ = fs::File::create(console);
        }
        let _ = sys::mount(
            Some(&format!("/dev/pts/{n}")),
            console,
            None,
            libc::MS_BIND,
            None,
        );
    }
    sys::send_fd(sock, &master)
        .or_fail(|| "process.terminal: sending the terminal to guest-init".into())?;
    drop(master);
    sys::set_controlling_tty(slave.as_raw_fd())
        .or_fail(|| "process.terminal: setting the controlling terminal".into())?;
    sys::set_stdio(&slave, &slave, &slave)
        .or_fail(|| "process.terminal: setting up stdio".into())?;
    Ok(())
}
