//! A VM whose VMM is a child process: QEMU, or the built-in VMM run as
//! `krun-oci __krun-vmm`. One type for both, so that waiting, the exit
//! report, pausing and killing are the same code whichever VMM runs.
//!
//! - Its exit: status 0 is the guest stopping, a signal is a kill, any
//!   other status is the VMM failing, with the last lines of its log (its
//!   capped stderr) as the detail.
//! - Pause and resume: SIGSTOP and SIGCONT to the process, which freeze
//!   every vCPU and device thread at once.
//! - Kill: SIGKILL. Dropping it kills and reaps whatever still runs, the
//!   process first, then its [`Companions`] (QEMU's virtiofsd daemons).

use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus};
use std::time::Duration;

use std::os::fd::{AsFd, OwnedFd};

use crate::child::kill_and_reap;
use crate::{AfterCapture, CappedLog, Error, Vm, VmExit};

/// How long a VMM's log may take to reach its file once it has exited.
const LOG_FLUSH: Duration = Duration::from_secs(1);
/// How long a capture may take: the VMM parks its vCPUs and devices
/// within seconds or fails; writing guest memory takes the rest.
const CAPTURE_TIMEOUT: Duration = Duration::from_secs(600);
/// How long a VMM whose capture channel failed is given to end, so that
/// its exit can be told rather than the channel's error.
const VMM_EXIT_WAIT: Duration = Duration::from_secs(1);

/// What runs beside a VMM process and ends with it.
pub trait Companions: Send {
    /// Sends SIGKILL to every companion process.
    fn kill(&mut self) {}
    /// Kills (if need be) and reaps every companion process.
    fn reap(&mut self) {}
    /// Appends what the companions said about a failure to `detail`.
    fn detail(&mut self, _detail: &mut String) {}
}

impl Companions for () {}

/// An empty directory on the host (a jail's root: its mounts are the
/// child's own), removed when dropped.
#[derive(Debug)]
pub struct EmptyDir(pub PathBuf);

impl EmptyDir {
    /// Makes `path`, empty; an empty directory left by a monitor killed
    /// with -9 is reused.
    pub fn create(path: PathBuf) -> std::io::Result<EmptyDir> {
        let _ = std::fs::remove_dir(&path);
        std::fs::create_dir(&path)?;
        Ok(EmptyDir(path))
    }
}

impl Drop for EmptyDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}

impl Companions for EmptyDir {}

/// A running VMM process (see the module doc).
pub struct VmProcess {
    child: Option<Child>,
    log_path: PathBuf,
    log: CappedLog,
    /// How many of the log's last lines make a failure's detail.
    detail_lines: usize,
    exit: Option<VmExit>,
    /// The built-in VMM's capture channel (crate::capture), if it has one.
    capture: Option<OwnedFd>,
    /// Dropped after `child` (declaration order): a jail directory is
    /// removed once the process is reaped.
    companions: Box<dyn Companions>,
}

impl VmProcess {
    /// Takes over `child`, whose stderr is `log` at `log_path`.
    pub fn new(
        child: Child,
        log_path: PathBuf,
        log: CappedLog,
        detail_lines: usize,
        companions: Box<dyn Companions>,
    ) -> VmProcess {
        VmProcess {
            child: Some(child),
            log_path,
            log,
            detail_lines,
            exit: None,
            capture: None,
            companions,
        }
    }

    /// The VMM answers capture requests on `channel` (its end at
    /// [`crate::CAPTURE_FD`]).
    pub fn with_capture_channel(mut self, channel: OwnedFd) -> VmProcess {
        self.capture = Some(channel);
        self
    }

    fn finish(&mut self, status: ExitStatus) -> VmExit {
        use std::os::unix::process::ExitStatusExt;
        self.companions.reap();
        self.child = None;
        let exit = match (status.code(), status.signal()) {
            (Some(0), _) => VmExit::GuestStopped,
            (_, Some(signal)) => VmExit::Killed { signal },
            (Some(code), _) => {
                self.log.finish(LOG_FLUSH);
                let mut detail = last_lines(&self.log_path, self.detail_lines);
                self.companions.detail(&mut detail);
                VmExit::VmmFailed {
                    code,
                    detail: detail.trim_end().to_string(),
                }
            }
            (None, None) => VmExit::VmmFailed {
                code: -1,
                detail: "unknown exit status".into(),
            },
        };
        self.exit = Some(exit.clone());
        exit
    }

    /// Why a capture's channel failed: the VMM's end, when it ended (it
    /// closes the channel as it goes, so it is given a moment), or `e`.
    fn channel_failed(&mut self, e: std::io::Error) -> String {
        let deadline = std::time::Instant::now() + VMM_EXIT_WAIT;
        let exit = loop {
            match self.try_wait() {
                Ok(Some(exit)) => break Some(exit),
                Ok(None) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(Duration::from_millis(10))
                }
                _ => break None,
            }
        };
        match exit {
            Some(VmExit::Killed { signal }) => format!(
                "the VMM was killed by signal {signal} during the capture{}",
                if signal == libc::SIGKILL {
                    " (by the out-of-memory killer, if the container's memory limit was reached: \
                     a capture's writes are charged to the container's cgroup, and pages \
                     written into a tmpfs stay charged)"
                } else {
                    ""
                }
            ),
            Some(VmExit::VmmFailed { code, detail }) => {
                format!("the VMM exited with status {code} during the capture: {detail}")
            }
            Some(VmExit::GuestStopped) => "the VM stopped during the capture".into(),
            None => format!("the VMM's capture channel: {e}"),
        }
    }

    fn signal(&self, sig: i32, what: &'static str) -> Result<(), Error> {
        let Some(child) = self.child.as_ref() else {
            return Err(Error::Control {
                what,
                source: std::io::Error::other("the VM is not running"),
            });
        };
        // SAFETY: kill has no memory effects; the pid is our unreaped child.
        if unsafe { libc::kill(child.id() as i32, sig) } != 0 {
            return Err(Error::Control {
                what,
                source: std::io::Error::last_os_error(),
            });
        }
        Ok(())
    }
}

/// The last `n` lines of the log at `path`, each ending in a newline.
pub fn last_lines(path: &Path, n: usize) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    let mut out = String::new();
    for line in &lines[lines.len().saturating_sub(n)..] {
        let _ = writeln!(out, "{line}");
    }
    out
}

impl Vm for VmProcess {
    fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    fn wait(&mut self) -> Result<VmExit, Error> {
        if let Some(exit) = &self.exit {
            return Ok(exit.clone());
        }
        let child = self
            .child
            .as_mut()
            .expect("a VM without exit status has a child");
        let status = child.wait().map_err(Error::Wait)?;
        Ok(self.finish(status))
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, Error> {
        if let Some(exit) = &self.exit {
            return Ok(Some(exit.clone()));
        }
        let child = self
            .child
            .as_mut()
            .expect("a VM without exit status has a child");
        match child.try_wait().map_err(Error::Wait)? {
            Some(status) => Ok(Some(self.finish(status))),
            None => Ok(None),
        }
    }

    // Stopping the process freezes every vCPU and device of the VM at
    // once; QEMU's virtiofsd keeps serving, with nothing asking.
    fn pause(&mut self) -> Result<(), Error> {
        self.signal(libc::SIGSTOP, "pause")
    }

    fn resume(&mut self) -> Result<(), Error> {
        self.signal(libc::SIGCONT, "resume")
    }

    fn can_capture(&self) -> Result<(), Error> {
        match self.capture {
            Some(_) => Ok(()),
            None => Err(Error::Unsupported(
                "QEMU cannot capture a running VM (QEMU 7.2 cannot migrate a vhost-user-fs \
                 device): checkpoint needs the built-in VMM (--hypervisor builtin)",
            )),
        }
    }

    fn capture(&mut self, file: &std::fs::File, then: AfterCapture) -> Result<(), Error> {
        self.can_capture()?;
        let channel = self.capture.as_ref().expect("can_capture looked");
        if self.exit.is_some() {
            return Err(Error::Capture("the VM is not running".into()));
        }
        let asked = crate::capture::ask(channel.as_fd(), file.as_fd(), then);
        let answer = asked.and_then(|()| {
            let child = self.child.as_mut();
            let mut alive = child.map(|c| move || matches!(c.try_wait(), Ok(None)));
            crate::capture::read_answer(channel.as_fd(), CAPTURE_TIMEOUT, || {
                alive.as_mut().is_some_and(|f| f())
            })
        });
        match answer {
            Ok(answer) => answer.map_err(Error::Capture),
            Err(e) => Err(Error::Capture(self.channel_failed(e))),
        }
    }

    fn kill(&mut self) {
        if let Some(child) = self.child.as_mut() {
            let _ = child.kill();
        }
        self.companions.kill();
    }
}

impl Drop for VmProcess {
    fn drop(&mut self) {
        if let Some(child) = self.child.as_mut() {
            kill_and_reap(child);
        }
        self.companions.reap();
    }
}

#[cfg(test)]
mod tests {
    use std::process::Command;

    use super::*;

    fn vm_of(script: &str) -> (VmProcess, tempfile::TempDir) {
        let tmp = tempfile::tempdir().unwrap();
        let log_path = tmp.path().join("vmm.log");
        let (log, stderr) = CappedLog::create(&log_path, 1 << 16, "VMM log").unwrap();
        let child = Command::new("sh")
            .args(["-c", script])
            .stderr(stderr)
            .spawn()
            .unwrap();
        (VmProcess::new(child, log_path, log, 2, Box::new(())), tmp)
    }

    #[test]
    fn a_failing_vmm_reports_its_last_log_lines() {
        let (mut vm, _tmp) = vm_of("echo one >&2; echo two >&2; echo three >&2; exit 3");
        let exit = vm.wait().unwrap();
        assert_eq!(
            exit,
            VmExit::VmmFailed {
                code: 3,
                detail: "two\nthree".into()
            }
        );
        assert_eq!(vm.try_wait().unwrap(), Some(exit));
    }

    #[test]
    fn a_vmm_that_dies_during_a_capture_is_reported_by_its_end() {
        let (vm, _tmp) = vm_of("sleep 0.2; kill -9 $$");
        let (ours, theirs) = crate::capture::channel().unwrap();
        let mut vm = vm.with_capture_channel(ours);
        // The VMM's end goes with it: here, at once.
        drop(theirs);
        let file = tempfile::tempfile().unwrap();
        let err = vm.capture(&file, AfterCapture::GoOn).unwrap_err();
        assert!(
            err.to_string()
                .contains("the VMM was killed by signal 9 during the capture"),
            "{err}"
        );
        assert_eq!(
            vm.try_wait().unwrap(),
            Some(VmExit::Killed {
                signal: libc::SIGKILL
            })
        );
        let (vm, _tmp) = vm_of("echo broken >&2; exit 4");
        let (ours, theirs) = crate::capture::channel().unwrap();
        let mut vm = vm.with_capture_channel(ours);
        drop(theirs);
        let err = vm.capture(&file, AfterCapture::End).unwrap_err();
        assert!(
            err.to_string()
                .contains("the VMM exited with status 4 during the capture: broken"),
            "{err}"
        );
    }

    #[test]
    fn status_zero_is_the_guest_stopping_and_a_kill_is_a_signal() {
        let (mut vm, _tmp) = vm_of("exit 0");
        assert_eq!(vm.wait().unwrap(), VmExit::GuestStopped);
        let (mut vm, _tmp) = vm_of("sleep 100");
        assert_eq!(vm.try_wait().unwrap(), None);
        vm.pause().unwrap();
        vm.resume().unwrap();
        vm.kill();
        assert_eq!(
            vm.wait().unwrap(),
            VmExit::Killed {
                signal: libc::SIGKILL
            }
        );
        assert!(vm.pause().is_err(), "a VM that ended cannot be paused");
    }
}
