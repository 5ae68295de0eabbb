//! Starting helper processes (the VMM, virtio-fs daemons) so that they can
//! never outlive the runtime process that started them.

use std::io;
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};

use caps::Capability;

use crate::jail::Jail;
use crate::{Confinement, Error, NetDevice};

/// A file descriptor to hand to a child at a fixed number.
pub struct PassFd {
    pub fd: OwnedFd,
    pub target: RawFd,
}

/// The fd number a VMM process (QEMU, the built-in VMM's) gets the
/// control socket at.
pub const CONTROL_FD: RawFd = 3;
/// The fd number of the serial console's pipe in a VMM process.
pub const CONSOLE_FD: RawFd = 4;
/// The fd numbers of the taps in a VMM process: NET_FD, NET_FD + 1, ...
pub const NET_FD: RawFd = 5;

/// The fd numbers of a snapshot's file and of its capture request in a
/// VMM process (far above the taps': a VM has fewer than 30 devices).
pub const SNAPSHOT_FD: RawFd = 40;
pub const REQUEST_FD: RawFd = 41;
/// The fd number of a built-in VMM's capture channel (crate::capture).
pub const CAPTURE_FD: RawFd = 42;

/// Keeps the fd numbers honest: none collides with stdio or another.
const _: () = assert!(
    CONTROL_FD > 2
        && CONSOLE_FD > CONTROL_FD
        && NET_FD > CONSOLE_FD
        && SNAPSHOT_FD > NET_FD + 30
        && REQUEST_FD > SNAPSHOT_FD
        && CAPTURE_FD > REQUEST_FD
);

impl PassFd {
    /// A VM's descriptors at their fixed numbers in its VMM process: the
    /// control socket, the console pipe, then each tap.
    pub fn vm_fds(control: OwnedFd, console: OwnedFd, nets: Vec<NetDevice>) -> Vec<PassFd> {
        let mut fds = vec![
            PassFd {
                fd: control,
                target: CONTROL_FD,
            },
            PassFd {
                fd: console,
                target: CONSOLE_FD,
            },
        ];
        for (i, n) in nets.into_iter().enumerate() {
            fds.push(PassFd {
                fd: n.tap,
                target: NET_FD + i as RawFd,
            });
        }
        fds
    }
}

/// Spawns `cmd` in its own process group (a Ctrl-C at the terminal is the
/// runtime's to forward, not the VMM's to die of) with SIGKILL as its
/// parent-death signal (a runtime killed with -9 leaves no VM behind).
/// `pass` fds appear in the child at their target numbers. The child
/// execs confined to the capabilities `keep` (see [`crate::confine`]; the
/// confinement is applied last), in `jail` and as its ids if given (see
/// [`crate::jail`]; entered just before the confinement).
pub fn spawn(
    cmd: &mut Command,
    pass: Vec<PassFd>,
    keep: &[Capability],
    jail: Option<Jail>,
) -> Result<Child, Error> {
    let program = cmd.get_program().to_string_lossy().into_owned();
    let mut confine = Confinement::new(keep).map_err(|source| Error::Confine {
        program: program.clone(),
        source,
    })?;
    if let Some(j) = &jail {
        confine = confine.with_ids(j.id(), j.id());
    }
    let spawn_err = |source| Error::Spawn {
        program: program.clone(),
        source,
    };
    // Move every fd to be passed above the highest target first, so that no
    // dup2 below overwrites a source that is still to be copied.
    let high: RawFd = pass.iter().map(|p| p.target).max().unwrap_or(2) + 1;
    let mut moved = Vec::with_capacity(pass.len());
    for p in &pass {
        let fd = nix::fcntl::fcntl(&p.fd, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(high))
            .map_err(|e| spawn_err(io::Error::from(e)))?;
        // SAFETY: fcntl(F_DUPFD_CLOEXEC) returned a new descriptor that
        // nothing else owns.
        moved.push((
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            p.target,
        ));
    }
    let pairs: Vec<(RawFd, RawFd)> = moved.iter().map(|(fd, t)| (fd.as_raw_fd(), *t)).collect();
    let parent = std::process::id();
    cmd.stdin(Stdio::null()).process_group(0);
    // SAFETY: the closure runs between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, dup2, kill, the jail's
    // mounts, setres*id, capset, seccomp) on values computed before the
    // fork.
    unsafe {
        cmd.pre_exec(move || {
            die_with_parent(parent)?;
            for &(src, target) in &pairs {
                if libc::dup2(src, target) < 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            if let Some(j) = &jail {
                j.enter()?;
            }
            confine.apply(false).map_err(|e| e.into_io())?;
            // A change of uid clears the parent-death signal: set it again.
            if jail.is_some() {
                die_with_parent(parent)?;
            }
            Ok(())
        });
    }
    let child = cmd.spawn().map_err(spawn_err)?;
    drop(moved);
    Ok(child)
}

/// Makes SIGKILL the calling process's parent-death signal, and kills it
/// if its parent `parent` has already gone. Async-signal-safe.
fn die_with_parent(parent: u32) -> io::Result<()> {
    // SAFETY: prctl(PR_SET_PDEATHSIG), getppid, getpid and kill take
    // integers only.
    unsafe {
        if libc::prctl(
            libc::PR_SET_PDEATHSIG,
            libc::SIGKILL as libc::c_ulong,
            0,
            0,
            0,
        ) != 0
        {
            return Err(io::Error::last_os_error());
        }
        // The parent may have died before prctl took effect.
        if libc::getppid() as u32 != parent {
            libc::kill(libc::getpid(), libc::SIGKILL);
        }
    }
    Ok(())
}

/// Sends SIGKILL to a child that may already have exited, then reaps it.
pub(crate) fn kill_and_reap(child: &mut Child) {
    if let Ok(None) = child.try_wait() {
        let _ = child.kill();
    }
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::fd::OwnedFd;

    use super::*;

    #[test]
    fn a_helper_gets_its_fds_and_runs_confined() {
        let (r, w) = std::io::pipe().unwrap();
        let mut cmd = Command::new("sh");
        // The pipe's write end at fd 5: the status goes through it.
        cmd.args(["-c", "cat /proc/self/status >&5"]);
        let pass = vec![PassFd {
            fd: OwnedFd::from(w),
            target: 5,
        }];
        let mut child = spawn(&mut cmd, pass, &[Capability::CAP_CHOWN], None).unwrap();
        let mut status = String::new();
        let mut r = r;
        r.read_to_string(&mut status).unwrap();
        assert!(child.wait().unwrap().success());
        let has = |line: &str| {
            status
                .lines()
                .any(|l| l.split_whitespace().eq(line.split(' ')))
        };
        assert!(has("NoNewPrivs: 1"), "{status}");
        assert!(has("Seccomp: 2"), "{status}");
        assert!(has("CapEff: 0000000000000001"), "{status}");
        assert!(has("CapBnd: 0000000000000001"), "{status}");
    }
}
