//! What a hostile guest cannot make the host do: grow its console log
//! without bound, or hang the host by no longer reading what the host
//! writes to it — and what a guest is not blamed for (a pause, a host that
//! stops taking its output). Each test boots a real microVM and checks
//! that nothing is left behind.
//!
//! The tests that freeze the VM with SIGSTOP run on QEMU whatever backend
//! the suite is on: the built-in VMM runs inside the monitor process and
//! cannot be stopped apart from it (CI runs them once, on this machine's
//! QEMU; `hack/test` says why not again in the nested test host). The
//! control writer's deadline, pause and back-pressure rules are the same
//! code on both backends and are covered for both by the unit tests in
//! `src/runtime/src/session`.

use krun_e2e as harness;

use std::io::Write;
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Once};
use std::time::{Duration, Instant};

use harness::{Sandbox, TestBundle};
use serde_json::json;

/// The monitor `create` leaves behind is orphaned when `create` exits; as
/// conmon does, this test process becomes the subreaper that reaps it.
fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only.
        let r = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(r, 0);
    });
}

/// `krun-oci --root ROOT` on QEMU, whatever the suite's backend.
fn krun_qemu(sb: &Sandbox) -> Command {
    let mut c = Command::new(harness::krun_oci_bin());
    c.env("KRUN_OCI_LIBDIR", harness::libdir())
        .env("KRUN_OCI_CONSOLE_COPY", sb.path().join("console"))
        .args(["--hypervisor", "qemu", "--root"])
        .arg(sb.root());
    c
}

/// Runs a short krun-oci command, failing the test if it takes longer
/// than `limit`; returns how long it took.
#[track_caller]
fn timed(mut c: Command, limit: Duration, sb: &Sandbox) -> Duration {
    c.stdin(Stdio::null());
    let start = Instant::now();
    let out = harness::run_with_timeout(c, None, limit, &sb.path().join("console"));
    let took = start.elapsed();
    assert_eq!(out.code, 0, "{}", out.stderr());
    took
}

/// `create` with stdin from `stdin` and stdout, stderr into files of the
/// sandbox; returns the monitor's pid.
fn create(sb: &Sandbox, mut c: Command, b: &TestBundle, id: &str, stdin: Stdio) -> i32 {
    become_subreaper();
    b.write();
    let pid_file = sb.path().join(format!("{id}.pid"));
    let out = std::fs::File::create(sb.path().join(format!("{id}.out"))).unwrap();
    let err = std::fs::File::create(sb.path().join(format!("{id}.err"))).unwrap();
    c.args(["create", "--bundle"])
        .arg(&b.dir)
        .arg("--pid-file")
        .arg(&pid_file)
        .arg(id)
        .stdin(stdin)
        .stdout(out)
        .stderr(err);
    let mut child = c.spawn().unwrap();
    let st = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT).expect("create timed out");
    let stderr = std::fs::read_to_string(sb.path().join(format!("{id}.err"))).unwrap();
    assert_eq!(st.code(), Some(0), "create {id}: {stderr}");
    std::fs::read_to_string(&pid_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap()
}

/// Waits for the monitor of container `id` (our orphan, thanks to the
/// subreaper) to exit; its exit code. One that does not exit in time
/// fails the test with what the container and its guest console said.
#[track_caller]
fn wait_exit(sb: &Sandbox, id: &str, pid: i32, timeout: Duration) -> i32 {
    let deadline = Instant::now() + timeout;
    loop {
        let mut st = 0;
        // SAFETY: waitpid on a pid that is (or will be) our child.
        if unsafe { libc::waitpid(pid, &mut st, libc::WNOHANG) } == pid {
            assert!(libc::WIFEXITED(st), "the monitor died of a signal");
            return libc::WEXITSTATUS(st);
        }
        if Instant::now() >= deadline {
            let tail = |p: std::path::PathBuf| {
                let b = std::fs::read(&p).unwrap_or_default();
                String::from_utf8_lossy(&b[b.len().saturating_sub(2000)..]).into_owned()
            };
            panic!(
                "the monitor {pid} of {id} did not exit in {timeout:?}\n\
                 stdout: {}\nstderr: {}\nconsole.log ends: {}",
                tail(sb.path().join(format!("{id}.out"))),
                tail(sb.path().join(format!("{id}.err"))),
                tail(sb.root().join(id).join("console.log")),
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_for_file(path: &std::path::Path, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !std::fs::read_to_string(path)
        .unwrap_or_default()
        .contains(want)
    {
        assert!(
            Instant::now() < deadline,
            "no {want:?} in {}",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The pid of the sandbox's QEMU.
fn qemu_pid(sb: &Sandbox) -> i32 {
    let qemu = harness::process::qemus_below(&sb.path().to_string_lossy());
    assert_eq!(
        qemu.len(),
        1,
        "one QEMU below the sandbox's runtime: {qemu:?}"
    );
    qemu[0]
}

fn signal(pid: i32, sig: i32) {
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

/// Writes `chunks` chunks of 64 KiB into a pipe (or until it fails), then
/// closes it, counting what went through and whether a write is under way.
struct Feeder {
    written: Arc<AtomicU64>,
    writing: Arc<AtomicBool>,
}

const CHUNK: usize = 64 * 1024;

impl Feeder {
    fn start(mut w: impl Write + Send + 'static, chunks: usize) -> Feeder {
        let written = Arc::new(AtomicU64::new(0));
        let writing = Arc::new(AtomicBool::new(false));
        let (n, busy) = (written.clone(), writing.clone());
        std::thread::spawn(move || {
            let chunk: Vec<u8> = (0..CHUNK).map(|i| (i % 251) as u8).collect();
            for _ in 0..chunks {
                busy.store(true, Ordering::SeqCst);
                let r = w.write_all(&chunk);
                busy.store(false, Ordering::SeqCst);
                if r.is_err() {
                    return;
                }
                n.fetch_add(chunk.len() as u64, Ordering::SeqCst);
            }
        });
        Feeder { written, writing }
    }

    /// Waits until the stream is stuck: one write blocked, with nothing
    /// going through, for `window`.
    fn wait_stuck(&self, window: Duration) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut since = (Instant::now(), self.written.load(Ordering::SeqCst));
        loop {
            let now = self.written.load(Ordering::SeqCst);
            if now != since.1 || !self.writing.load(Ordering::SeqCst) {
                since = (Instant::now(), now);
            } else if since.0.elapsed() >= window {
                return;
            }
            assert!(Instant::now() < deadline, "stdin did not stay stuck");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// Takes `run`'s stdout and stderr and waits for the container's first
/// line, "ready" (killing `run` and saying what it said if it never
/// comes); returns the rest of stdout and a thread reading stderr.
fn await_ready(
    child: &mut std::process::Child,
) -> (std::process::ChildStdout, std::thread::JoinHandle<String>) {
    let mut stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let mut ready = [0u8; 6];
    if let Err(e) = std::io::Read::read_exact(&mut stdout, &mut ready) {
        let _ = child.kill();
        panic!(
            "no \"ready\" from the container ({e}); run's stderr: {}",
            stderr.join().unwrap()
        );
    }
    assert_eq!(&ready, b"ready\n");
    (stdout, stderr)
}

/// A guest that floods its serial console (root with CAP_MKNOD can open
/// the UART as a tty) leaves a console log no bigger than the cap plus
/// one note, and its container still ends normally.
#[test]
fn a_console_flood_is_capped() {
    const CAP: usize = 16 * 1024;
    let sb = Sandbox::new("consoleflood");
    let mut b = sb.bundle(&[
        "sh",
        "-c",
        "mknod /dev/ttyS0 c 4 64 && head -c 100000 /dev/zero | tr '\\000' x > /dev/ttyS0; echo done",
    ]);
    for set in ["bounding", "effective", "permitted"] {
        b.process()["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_MKNOD"));
    }
    let mut c = sb.cmd();
    c.env("KRUN_OCI_CONSOLE_LOG_LIMIT", CAP.to_string());
    let pid = create(&sb, c, &b, "flood", Stdio::null());
    let mut c = sb.cmd();
    c.args(["start", "flood"]);
    timed(c, Duration::from_secs(60), &sb);
    assert_eq!(wait_exit(&sb, "flood", pid, Duration::from_secs(300)), 0);
    assert_eq!(
        std::fs::read_to_string(sb.path().join("flood.out")).unwrap(),
        "done\n"
    );
    let log = std::fs::read(sb.root().join("flood/console.log")).unwrap();
    let note = format!(
        "\n[krun-oci: console log truncated at {CAP} bytes; further guest output dropped]\n"
    );
    assert_eq!(
        log.len(),
        CAP + note.len(),
        "console.log is {} bytes",
        log.len()
    );
    assert!(log.ends_with(note.as_bytes()));
    // The flood itself reached the log before the cap did.
    assert!(log.windows(1000).any(|w| w.iter().all(|&c| c == b'x')));
    let mut c = sb.cmd();
    c.args(["delete", "flood"]);
    timed(c, Duration::from_secs(60), &sb);
    sb.assert_clean();
}

/// A VM that stops taking stdin (its QEMU frozen with SIGSTOP, as a guest
/// that stops reading its control port looks to the host) while a stream
/// is pumped in: at the deadline the VM is killed, `run` ends with a clear
/// error, and nothing is left behind. The host would hold a stream back
/// at its window (1 MiB) of what guest-init has not reported taken, most
/// of which the guest's buffers have already taken; a hostile guest can
/// report bytes taken that it never took, and the host then has more to
/// write than the frozen guest takes: the huge window stands for that.
#[test]
fn a_guest_that_stops_reading_is_killed_at_the_deadline() {
    let sb = Sandbox::new("stopreading");
    let b = sb.written_bundle(&["sh", "-c", "echo ready; exec cat > /dev/null"]);
    let mut c = krun_qemu(&sb);
    c.env("KRUN_OCI_CONTROL_DEADLINE_MS", "3000");
    c.env("KRUN_OCI_STDIN_WINDOW", (1u64 << 40).to_string());
    let mut child = harness::spawn_run(c, &b, "sr", Stdio::piped());
    let _feeder = Feeder::start(child.stdin.take().unwrap(), usize::MAX);
    let (_stdout, stderr) = await_ready(&mut child);
    signal(qemu_pid(&sb), libc::SIGSTOP);
    let stopped = Instant::now();
    let status = harness::wait_timeout(&mut child, Duration::from_secs(60)).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("run did not end after its VM stopped reading")
    });
    let took = stopped.elapsed();
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(
            "container sr: the guest stopped reading its control channel for 3 s; its VM was killed"
        ),
        "{stderr}"
    );
    assert!(took >= Duration::from_secs(3), "{took:?}");
    assert!(took < Duration::from_secs(3 + 10), "{took:?}");
    eprintln!("killed {took:?} after the VM stopped");
    sb.assert_clean();
}

/// `kill` and `delete --force` of a container whose QEMU is frozen while
/// its stdin is being pumped: `kill` returns at once (the signal waits in
/// a queue), `delete --force` within the shutdown grace (3 s), and the
/// monitor ends as killed — long before the control deadline would.
#[test]
fn kill_and_delete_of_a_frozen_vm_do_not_hang() {
    let sb = Sandbox::new("frozen");
    let b = sb.bundle(&["sh", "-c", "echo ready; exec cat > /dev/null"]);
    let (r, w) = std::io::pipe().unwrap();
    let mut c = krun_qemu(&sb);
    c.env("KRUN_OCI_CONTROL_DEADLINE_MS", "600000");
    let pid = create(&sb, c, &b, "fz", Stdio::from(r));
    let mut c = krun_qemu(&sb);
    c.args(["start", "fz"]);
    timed(c, Duration::from_secs(60), &sb);
    wait_for_file(&sb.path().join("fz.out"), "ready\n");
    let feeder = Feeder::start(w, usize::MAX);
    signal(qemu_pid(&sb), libc::SIGSTOP);
    feeder.wait_stuck(Duration::from_millis(500));

    let mut c = krun_qemu(&sb);
    c.args(["kill", "fz", "KILL"]);
    let kill = timed(c, Duration::from_secs(20), &sb);
    let mut c = krun_qemu(&sb);
    c.args(["delete", "--force", "fz"]);
    let delete = timed(c, Duration::from_secs(30), &sb);
    eprintln!("kill took {kill:?}, delete --force {delete:?}");
    // Generous bounds (a nested test host runs a command in seconds): what
    // they rule out is waiting for the 600 s control deadline.
    assert!(kill < Duration::from_secs(20), "kill took {kill:?}");
    assert!(
        delete < Duration::from_secs(3 + 20),
        "delete took {delete:?}"
    );
    assert_eq!(
        wait_exit(&sb, "fz", pid, Duration::from_secs(10)),
        128 + libc::SIGKILL
    );
    sb.assert_clean();
}

/// The deadline's exceptions, end to end. A host that stops reading the
/// container's stdout (conmon or a pipeline reader falling behind) stalls
/// guest-init on its own writes, so it stops reading stdin: that is the
/// host's doing, and the guest is not killed for it, however long it lasts.
#[test]
fn a_host_that_stops_taking_output_does_not_get_its_guest_killed() {
    const CHUNKS: usize = 1024; // 64 MiB through `cat` and back
    let sb = Sandbox::new("hostbackpressure");
    let b = sb.written_bundle(&["cat"]);
    let mut c = sb.cmd();
    c.env("KRUN_OCI_CONTROL_DEADLINE_MS", "2000");
    let mut child = harness::spawn_run(c, &b, "bp", Stdio::piped());
    let feeder = Feeder::start(child.stdin.take().unwrap(), CHUNKS);
    // Nobody reads stdout: everything backs up to the feeder, and stays
    // so for three deadlines.
    feeder.wait_stuck(Duration::from_secs(6));
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let pipes = [harness::pipe_inode(&stdout), harness::pipe_inode(&stderr)];
    let stdout = std::thread::spawn(move || {
        let mut n = 0u64;
        let mut r = std::io::BufReader::new(stdout);
        loop {
            let got = std::io::BufRead::fill_buf(&mut r).unwrap().len();
            if got == 0 {
                return n;
            }
            std::io::BufRead::consume(&mut r, got);
            n += got as u64;
        }
    });
    let stderr = std::thread::spawn(move || std::io::read_to_string(stderr).unwrap());
    let Some(status) = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT) else {
        let log = std::fs::read(sb.root().join("bp/console.log")).unwrap_or_default();
        panic!(
            "run hung; its output is held by {:?}; console.log ends: {}",
            harness::pipe_holders(&pipes),
            String::from_utf8_lossy(&log[log.len().saturating_sub(2000)..])
        );
    };
    // Once run has gone, its output ends at once unless some process kept
    // it open: that fails here, naming the process, rather than hanging.
    let ended = Duration::from_secs(10);
    let stderr = harness::join_within(stderr, ended, "run's stderr", &pipes);
    assert_eq!(status.code(), Some(0), "{stderr}");
    let n = harness::join_within(stdout, ended, "run's stdout", &pipes);
    assert_eq!(n, (CHUNKS * CHUNK) as u64);
    sb.assert_clean();
}

/// A process that does not read its stdin holds back the writer on the
/// host, as a pipe would under runc: guest-init keeps a bounded amount
/// for it (before, it kept everything, and a big enough stream crashed
/// the guest for want of memory). Once the process reads, every byte
/// arrives.
#[test]
fn a_process_that_reads_no_stdin_holds_back_its_writer() {
    const CHUNKS: usize = 512; // 32 MiB
    let sb = Sandbox::new("stdinheld");
    let b = sb.written_bundle(&[
        "sh",
        "-c",
        "trap 'wc -c; exit 0' USR1; echo ready; while :; do sleep 0.2; done",
    ]);
    let mut child = harness::spawn_run(sb.cmd(), &b, "sh1", Stdio::piped());
    let feeder = Feeder::start(child.stdin.take().unwrap(), CHUNKS);
    let (stdout, stderr) = await_ready(&mut child);
    // The process reads nothing: the writer blocks, well short of the end.
    feeder.wait_stuck(Duration::from_secs(3));
    let held = feeder.written.load(Ordering::SeqCst);
    assert!(held < (CHUNKS * CHUNK / 4) as u64, "{held} bytes went in");
    let mut c = sb.cmd();
    c.args(["kill", "sh1", "USR1"]);
    timed(c, Duration::from_secs(60), &sb);
    let status = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT).unwrap_or_else(|| {
        let _ = child.kill();
        panic!("run did not end after the process read its stdin")
    });
    let stderr = stderr.join().unwrap();
    assert_eq!(status.code(), Some(0), "{stderr}");
    let out = std::io::read_to_string(stdout).unwrap();
    assert_eq!(out.trim(), (CHUNKS * CHUNK).to_string(), "{stderr}");
    eprintln!("the writer was held at {held} bytes while the process read nothing");
    sb.assert_clean();
}

/// A paused container's guest reads nothing, for as long as it is paused:
/// that is not held against it, and it carries on when resumed.
#[test]
fn a_paused_guest_is_not_killed_for_not_reading() {
    const CHUNKS: usize = 256; // 16 MiB into `cat`
    let sb = Sandbox::new("pausedreading");
    let b = sb.bundle(&["sh", "-c", "echo ready; cat > /dev/null; echo done"]);
    let (r, w) = std::io::pipe().unwrap();
    let mut c = sb.cmd();
    c.env("KRUN_OCI_CONTROL_DEADLINE_MS", "2000");
    let pid = create(&sb, c, &b, "pr", Stdio::from(r));
    let mut c = sb.cmd();
    c.args(["start", "pr"]);
    timed(c, Duration::from_secs(60), &sb);
    wait_for_file(&sb.path().join("pr.out"), "ready\n");
    let feeder = Feeder::start(w, CHUNKS);
    let mut c = sb.cmd();
    c.args(["pause", "pr"]);
    timed(c, Duration::from_secs(60), &sb);
    feeder.wait_stuck(Duration::from_secs(6));
    let mut c = sb.cmd();
    c.args(["resume", "pr"]);
    timed(c, Duration::from_secs(60), &sb);
    assert_eq!(wait_exit(&sb, "pr", pid, harness::RUN_TIMEOUT), 0);
    assert_eq!(
        feeder.written.load(Ordering::SeqCst),
        (CHUNKS * CHUNK) as u64
    );
    wait_for_file(&sb.path().join("pr.out"), "ready\ndone\n");
    let mut c = sb.cmd();
    c.args(["delete", "pr"]);
    timed(c, Duration::from_secs(60), &sb);
    sb.assert_clean();
}
