//! Host processes: the ones that mention a test's folder, and a command
//! run to its end under a deadline, with its input fed and its output
//! collected.

use std::io::{Read, Write};
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// The inode of the pipe `fd` is an end of, which [`pipe_holders`] looks for.
pub fn pipe_inode(fd: &impl std::os::fd::AsFd) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let f = std::fs::File::from(fd.as_fd().try_clone_to_owned().unwrap());
    f.metadata().unwrap().ino()
}

/// Every process holding one of the pipes `inodes` open, as "pid (comm)
/// state wchan": who keeps a stream from ending. Reads neither cmdline nor
/// environ, which wait on the process's memory map lock.
pub fn pipe_holders(inodes: &[u64]) -> Vec<String> {
    let wanted: Vec<String> = inodes.iter().map(|i| format!("pipe:[{i}]")).collect();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let pid = e.file_name().to_string_lossy().into_owned();
        if !pid.chars().all(|c| c.is_ascii_digit()) {
            continue;
        }
        let holds = std::fs::read_dir(e.path().join("fd"))
            .map(|d| {
                d.flatten().any(|f| {
                    std::fs::read_link(f.path())
                        .is_ok_and(|l| wanted.iter().any(|w| l.as_os_str() == w.as_str()))
                })
            })
            .unwrap_or(false);
        if holds {
            out.push(describe(&e.path()));
        }
    }
    out
}

/// `handle`'s result, waited for `timeout` at the most; then a panic
/// naming `what` and the processes holding the pipes `inodes` (a reader
/// thread that never ends is a stream some process kept open).
#[track_caller]
pub fn join_within<T>(handle: JoinHandle<T>, timeout: Duration, what: &str, inodes: &[u64]) -> T {
    let deadline = Instant::now() + timeout;
    while !handle.is_finished() {
        assert!(
            Instant::now() < deadline,
            "{what} did not end within {timeout:?}; its pipe is held by {:?}",
            pipe_holders(inodes)
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    handle.join().unwrap()
}

/// Processes whose command line mentions `needle`, as "pid: cmdline".
/// A scan that blocks (reading a command line waits on the process's
/// memory map lock, which a process stuck in the kernel can hold) is a
/// panic after [`SCAN_LIMIT`] naming the process, not a hang.
#[track_caller]
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    processes_mentioning_within(needle, SCAN_LIMIT).unwrap_or_else(|e| panic!("{e}"))
}

/// How long [`processes_mentioning`] may take.
pub const SCAN_LIMIT: Duration = Duration::from_secs(30);

/// [`processes_mentioning`], or, when the scan has not ended within
/// `limit`, what it was blocked on.
pub fn processes_mentioning_within(needle: &str, limit: Duration) -> Result<Vec<String>, String> {
    let reading = std::sync::Arc::new(std::sync::atomic::AtomicI32::new(0));
    let (tx, rx) = std::sync::mpsc::channel();
    let (needle, at) = (needle.to_string(), reading.clone());
    std::thread::spawn(move || {
        let me = std::process::id().to_string();
        let mut out = Vec::new();
        for e in std::fs::read_dir("/proc").unwrap().flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
                continue;
            }
            at.store(
                name.parse().unwrap_or(0),
                std::sync::atomic::Ordering::Relaxed,
            );
            if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
                let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
                if cmd.contains(&needle) {
                    out.push(format!("{name}: {cmd}"));
                }
            }
        }
        let _ = tx.send(out);
    });
    rx.recv_timeout(limit).map_err(|_| {
        let pid = reading.load(std::sync::atomic::Ordering::Relaxed);
        format!(
            "reading /proc/{pid}/cmdline blocked for {limit:?}: {}",
            describe(Path::new(&format!("/proc/{pid}")))
        )
    })
}

/// "pid (comm) state wchan" of the process at `dir` (/proc/PID), read
/// from files that take no lock of the process's memory.
fn describe(dir: &Path) -> String {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).unwrap_or_default();
    let stat = read("stat");
    let state = stat
        .rsplit(") ")
        .next()
        .unwrap_or("")
        .split(' ')
        .next()
        .unwrap_or("?");
    let pid = dir.file_name().unwrap_or_default().to_string_lossy();
    format!("{pid} ({}) {state} {}", read("comm").trim(), read("wchan"))
}

/// The QEMU processes among the processes that mention `needle` and
/// everything below them: QEMU's own command line names nothing of the
/// host (its kernel, sockets and console come in through its jail and
/// descriptors), so it is found below the runtime that started it.
pub fn qemus_below(needle: &str) -> Vec<i32> {
    let mut pids: Vec<i32> = processes_mentioning(needle)
        .iter()
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    let below: Vec<i32> = pids.iter().flat_map(|&p| descendants(p)).collect();
    pids.extend(below);
    pids.sort_unstable();
    pids.dedup();
    pids.retain(|p| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| {
            c.split(|b| *b == 0)
                .next()
                .is_some_and(|exe| exe.ends_with(b"qemu-system-x86_64"))
        })
    });
    pids
}

/// The built-in VMM's process below `pid` (the monitor or the shim that
/// started it), found by its name (krun_vmm's `process` module).
pub fn vmm_below(pid: i32) -> Option<i32> {
    descendants(pid).into_iter().find(|p| {
        std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "krun-vmm")
    })
}

/// Whether the process `pid` has a thread named `name` (the built-in
/// VMM's vCPUs run as threads of its process).
pub fn has_thread(pid: i32, name: &str) -> bool {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .any(|t| std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == name))
}

/// Every process below `pid` (children, their children, ...), found from
/// the parent pid in each `/proc/PID/stat`.
pub fn descendants(pid: i32) -> Vec<i32> {
    let mut parents: std::collections::HashMap<i32, Vec<i32>> = Default::default();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(p) = e.file_name().to_str().and_then(|n| n.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // "pid (comm) state ppid ...": the comm may hold anything.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok());
        if let Some(ppid) = ppid {
            parents.entry(ppid).or_default().push(p);
        }
    }
    let mut out = Vec::new();
    let mut todo = vec![pid];
    while let Some(p) = todo.pop() {
        for &c in parents.get(&p).into_iter().flatten() {
            out.push(c);
            todo.push(c);
        }
    }
    out
}

/// Waits for `child` up to `timeout`.
pub fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return Some(s);
        }
        if Instant::now() > deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Calls `check` every `every` until it gives `Ok`, for `timeout` at the
/// most; then panics with `why` of its last `Err`.
#[track_caller]
pub fn poll<T, E>(
    timeout: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, E>,
    why: impl FnOnce(E) -> String,
) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        match check() {
            Ok(v) => return v,
            Err(e) => assert!(Instant::now() < deadline, "{}", why(e)),
        }
        std::thread::sleep(every);
    }
}

/// `Ok` when `v` is empty, else `Err(v)`: for [`poll`]ing until nothing
/// is left.
pub fn none_left<T>(v: Vec<T>) -> Result<(), Vec<T>> {
    if v.is_empty() {
        Ok(())
    } else {
        Err(v)
    }
}

/// Starts `cmd` with its stdout and stderr piped and `stdin` written to it
/// by a thread (the returned handle), which ends when all is written or
/// the child has closed its end. Without `stdin` the child reads /dev/null.
pub fn spawn_fed(
    cmd: &mut Command,
    stdin: Option<&[u8]>,
) -> std::io::Result<(Child, JoinHandle<()>)> {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn()?;
    let input = stdin.map(<[u8]>::to_vec);
    let sin = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        if let (Some(mut w), Some(data)) = (sin, input) {
            let _ = w.write_all(&data);
        }
    });
    Ok((child, feeder))
}

/// How a child ended and what it wrote.
pub struct Finished {
    /// Its exit code, or 128 + the signal that killed it.
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
    /// When it was seen to exit (its pipes may close later, when whatever
    /// inherited them exits too).
    pub exited: Instant,
}

/// Waits up to `timeout` for `child`, whose stdout and stderr are piped,
/// reading both to their end. `None` when it did not exit in time: then it
/// is killed and reaped.
///
/// Once it has exited, its pipes get [`DRAIN`] to end (whatever inherited
/// them must have exited or closed them by then); a pipe held open longer
/// is a panic naming who holds it, not a hang.
#[track_caller]
pub fn finish(mut child: Child, timeout: Duration) -> Option<Finished> {
    let (stdout, stderr) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let inodes = [pipe_inode(&stdout), pipe_inode(&stderr)];
    let out = read_to_end(stdout);
    let err = read_to_end(stderr);
    let Some(status) = wait_timeout(&mut child, timeout) else {
        let _ = child.kill();
        let _ = child.wait();
        return None;
    };
    let exited = Instant::now();
    let what = format!("the output of a process that exited ({status})");
    Some(Finished {
        code: status
            .code()
            .unwrap_or_else(|| 128 + status.signal().unwrap_or(0)),
        stdout: join_within(out, DRAIN, &what, &inodes),
        stderr: join_within(err, DRAIN, &what, &inodes),
        exited,
    })
}

/// How long a finished child's pipes may stay open (see [`finish`]).
pub const DRAIN: Duration = Duration::from_secs(120);

/// A thread that reads `r` to its end.
fn read_to_end(mut r: impl Read + Send + 'static) -> JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        v
    })
}

/// What a command did, its output as text.
#[derive(Debug)]
pub struct Out {
    /// The command, for messages.
    pub what: String,
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    /// From `start` (see [`Out::new`]) to its exit.
    pub elapsed: Duration,
}

impl Out {
    /// The text of `f`, for the command `what` started at `start`.
    pub fn new(what: &str, f: Finished, start: Instant) -> Out {
        Out {
            what: what.to_string(),
            code: f.code,
            stdout: String::from_utf8_lossy(&f.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&f.stderr).into_owned(),
            elapsed: f.exited - start,
        }
    }

    /// Panics with everything known unless the exit code is `code`.
    #[track_caller]
    pub fn expect(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "`{}` exit code\n--- stdout ---\n{}\n--- stderr ---\n{}",
            self.what, self.stdout, self.stderr
        );
        self
    }

    /// Panics unless the exit code is `code` and the command took less
    /// than `limit`: "`what` took ...".
    #[track_caller]
    pub fn expect_within(&self, code: i32, limit: Duration, what: &str) {
        self.expect(code);
        assert!(self.elapsed < limit, "{what} took {:?}", self.elapsed);
    }

    /// Panics unless the command succeeded and wrote exactly `stdout` and
    /// `stderr`.
    #[track_caller]
    pub fn expect_output(&self, stdout: &str, stderr: &str) {
        self.expect(0);
        assert_eq!(self.stdout, stdout);
        assert_eq!(self.stderr, stderr);
    }

    /// The trimmed stdout of a command that must succeed.
    #[track_caller]
    pub fn ok(&self) -> String {
        self.expect(0);
        self.stdout.trim().to_string()
    }
}
