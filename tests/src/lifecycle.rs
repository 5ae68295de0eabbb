//! The runtime-spec lifecycle by hand, for suites that drive
//! `create`/`start`/`delete` themselves: the runtime's commands with their
//! output, `create` with a pid file, and the monitor's exit status (the
//! test process is the subreaper that inherits it, as conmon is).

use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Once;
use std::time::Duration;

use crate::bundle::TestBundle;
use crate::process::{poll, wait_timeout};
use crate::sandbox::{run_with_timeout, Sandbox, RUN_TIMEOUT};

/// The monitor `create` leaves behind is orphaned when `create` exits; as
/// conmon does, this test process becomes the subreaper that inherits and
/// reaps it, so it can check the monitor's exit status.
pub fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0);
    });
}

pub struct Out {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn krun(sb: &Sandbox, args: &[&str]) -> Out {
    let mut c = sb.cmd();
    c.args(args).stdin(Stdio::null());
    let o = run_with_timeout(c, None, RUN_TIMEOUT, &sb.path().join("console"));
    Out {
        code: o.code,
        stdout: o.stdout(),
        stderr: o.stderr(),
    }
}

#[track_caller]
pub fn ok(o: Out) {
    assert_eq!(o.code, 0, "stdout: {}; stderr: {}", o.stdout, o.stderr);
}

pub fn status(sb: &Sandbox, id: &str) -> String {
    let o = krun(sb, &["state", id]);
    assert_eq!(o.code, 0, "state {id}: {}", o.stderr);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    v["status"].as_str().unwrap().to_string()
}

/// `create` with the container's stdio in files of the sandbox; returns
/// the pid from the pid file.
pub fn create(sb: &Sandbox, b: &TestBundle, id: &str) -> i32 {
    become_subreaper();
    let pid_file = sb.path().join(format!("{id}.pid"));
    let out = std::fs::File::create(sb.path().join(format!("{id}.out"))).unwrap();
    let err = std::fs::File::create(sb.path().join(format!("{id}.err"))).unwrap();
    let mut c = create_cmd(sb, b, &pid_file, id);
    c.stdout(out).stderr(err);
    let mut child = c.spawn().unwrap();
    let st = wait_timeout(&mut child, RUN_TIMEOUT).expect("create timed out");
    let stderr = std::fs::read_to_string(sb.path().join(format!("{id}.err"))).unwrap();
    assert_eq!(
        st.code(),
        Some(0),
        "create {id}: {stderr}; console: {}",
        sb.console()
    );
    read_pid(&pid_file)
}

/// `krun-oci create --bundle DIR --pid-file PID_FILE ID`, reading nothing.
pub fn create_cmd(sb: &Sandbox, b: &TestBundle, pid_file: &Path, id: &str) -> Command {
    let mut c = sb.cmd();
    c.args(["create", "--bundle"])
        .arg(&b.dir)
        .arg("--pid-file")
        .arg(pid_file)
        .arg(id)
        .stdin(Stdio::null());
    c
}

/// The pid in a pid file.
pub fn read_pid(pid_file: &Path) -> i32 {
    std::fs::read_to_string(pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// A busybox bundle running `args`, written and `create`d as `id`: the
/// bundle and the pid from the pid file.
pub fn create_new(sb: &Sandbox, args: &[&str], id: &str) -> (TestBundle, i32) {
    let b = sb.written_bundle(args);
    let pid = create(sb, &b, id);
    (b, pid)
}

/// [`create_new`], then `start`: the pid from the pid file.
pub fn start_new(sb: &Sandbox, args: &[&str], id: &str) -> i32 {
    let (_, pid) = create_new(sb, args, id);
    ok(krun(sb, &["start", id]));
    pid
}

/// `delete --force ID`, which must succeed, then the exit of the monitor
/// `pid` (see [`wait_exit`]).
#[track_caller]
pub fn delete_force(sb: &Sandbox, id: &str, pid: i32) -> (Option<i32>, Option<i32>) {
    ok(krun(sb, &["delete", "--force", id]));
    wait_exit(pid)
}

/// `delete ID`, which must succeed, then the exit of the monitor `pid`.
#[track_caller]
pub fn delete_and_wait(sb: &Sandbox, id: &str, pid: i32) -> (Option<i32>, Option<i32>) {
    ok(krun(sb, &["delete", id]));
    wait_exit(pid)
}

/// Waits for the monitor `pid` to exit, asserts that `id` is stopped,
/// deletes it and asserts that nothing is left: the monitor's exit.
#[track_caller]
pub fn delete_once_stopped(sb: &Sandbox, id: &str, pid: i32) -> (Option<i32>, Option<i32>) {
    let exit = wait_exit(pid);
    assert_eq!(status(sb, id), "stopped");
    ok(krun(sb, &["delete", id]));
    sb.assert_clean();
    exit
}

/// `krun-oci ARGS`, which must fail with `why` in its stderr.
#[track_caller]
pub fn refused(sb: &Sandbox, args: &[&str], why: &str) {
    let o = krun(sb, args);
    assert_ne!(o.code, 0);
    assert!(o.stderr.contains(why), "{}", o.stderr);
}

/// Waits for the monitor (our orphan, thanks to the subreaper) to exit.
pub fn wait_exit(pid: i32) -> (Option<i32>, Option<i32>) {
    poll(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            let mut st = 0;
            // SAFETY: waitpid on a pid that is (or will be) our child.
            let r = unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) };
            if r != pid {
                Err(())
            } else if libc::WIFSIGNALED(st) {
                Ok((None, Some(libc::WTERMSIG(st))))
            } else {
                Ok((Some(libc::WEXITSTATUS(st)), None))
            }
        },
        |()| format!("the monitor {pid} did not exit"),
    )
}

pub fn out_of(sb: &Sandbox, id: &str) -> String {
    std::fs::read_to_string(sb.path().join(format!("{id}.out"))).unwrap()
}

pub fn wait_for_output(sb: &Sandbox, id: &str, want: &str) {
    poll(
        Duration::from_secs(60),
        Duration::from_millis(20),
        || {
            let out = out_of(sb, id);
            if out.contains(want) {
                Ok(())
            } else {
                Err(out)
            }
        },
        |out| format!("no {want:?} in the output of {id}: {out:?}"),
    )
}
