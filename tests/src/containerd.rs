//! A private containerd 2.x per test (`hack/containerd-env start DIR`), and
//! `ctr` against it.
//!
//! containerd runs the shim from `$KRUN_OCI_DIST/bin` (hack/build puts the
//! freshly built `containerd-shim-krun-v2` there). Every test ends with
//! `finish()`, which fails on anything left behind: a task containerd still
//! knows, a shim or VM process, the shim's state, a mount, the shim's
//! socket. Drop stops containerd and removes the folder whatever happened.
//!
//! `KRUN_OCI_TEST_HOLD=SECS` keeps a failed test's containerd (and its VMs)
//! that long for a look before it is stopped.
//!
//! `KRUN_OCI_CONTAINERD_RUNTIME=io.containerd.runc.v2` runs the same tests
//! on containerd's runc shim, which validates the tests themselves.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::dist::{dist, libdir, shim_bin, workspace};
use crate::process::{finish, none_left, poll, processes_mentioning, spawn_fed, Out};

/// A hard limit on one ctr call (a VM boot under TCG takes seconds; a busy
/// 2-core CI machine needs more).
pub const CTR_TIMEOUT: Duration = Duration::from_secs(180);

pub const KRUN: &str = "io.containerd.krun.v2";

/// The runtime type under test.
pub fn runtime() -> &'static str {
    static RUNTIME: OnceLock<String> = OnceLock::new();
    RUNTIME.get_or_init(|| {
        std::env::var("KRUN_OCI_CONTAINERD_RUNTIME")
            .ok()
            .filter(|r| !r.is_empty())
            .unwrap_or_else(|| KRUN.to_string())
    })
}

pub fn is_krun() -> bool {
    runtime() == KRUN
}

/// The image every test runs.
pub const BUSYBOX: &str = "localhost/krun-busybox:latest";

/// Fails (never skips) when the VM assets or the shim under test are
/// missing or older than their sources.
fn check_shim() {
    libdir();
    shim_bin();
}

/// One private containerd.
pub struct Containerd {
    dir: Option<tempfile::TempDir>,
    /// (namespace, container id) of every container a test made.
    ids: std::cell::RefCell<Vec<(String, String)>>,
    finished: bool,
}

impl Containerd {
    pub fn start(test: &str) -> Containerd {
        check_shim();
        let dir = tempfile::Builder::new()
            .prefix(&format!("krun-ctrd-{}-", &test[..test.len().min(20)]))
            .tempdir_in("/tmp")
            .unwrap();
        let c = Containerd {
            dir: Some(dir),
            ids: Default::default(),
            finished: false,
        };
        let out = c.hack(&["start", c.path().to_str().unwrap()]);
        assert_eq!(
            out.code, 0,
            "CONTAINERD TESTS CANNOT RUN: hack/containerd-env start failed:\n{}\n{}",
            out.stdout, out.stderr
        );
        c
    }

    pub fn path(&self) -> &Path {
        self.dir.as_ref().unwrap().path()
    }

    pub fn address(&self) -> PathBuf {
        self.path().join("containerd.sock")
    }

    fn hack(&self, args: &[&str]) -> Out {
        let mut c = Command::new(workspace().join("hack/containerd-env"));
        c.args(args).env("KRUN_OCI_DIST", dist());
        run(c, &format!("hack/containerd-env {}", args.join(" ")), None)
    }

    /// `ctr --address ... -n NS ARGS` (not yet run).
    pub fn ctr_cmd(&self, ns: &str, args: &[&str]) -> Command {
        let bin = std::env::var_os("KRUN_OCI_CONTAINERD_BIN")
            .map(PathBuf::from)
            .unwrap_or_else(|| {
                let cache = std::env::var("KRUN_OCI_CACHE")
                    .unwrap_or_else(|_| "/var/cache/krun-oci".into());
                Path::new(&cache).join("containerd/bin")
            });
        let mut c = Command::new(bin.join("ctr"));
        c.arg("--address")
            .arg(self.address())
            .args(["-n", ns])
            .args(args);
        c
    }

    /// Runs ctr in namespace `default`.
    pub fn ctr(&self, args: &[&str]) -> Out {
        self.ctr_in("default", args, None)
    }

    pub fn ctr_in(&self, ns: &str, args: &[&str], stdin: Option<&[u8]>) -> Out {
        run(
            self.ctr_cmd(ns, args),
            &format!("ctr {}", args.join(" ")),
            stdin,
        )
    }

    /// Records a container id for the final checks.
    pub fn remember(&self, ns: &str, id: &str) {
        self.ids.borrow_mut().push((ns.to_string(), id.to_string()));
    }

    /// The ctr words `run PRE --runtime RT POST IMAGE ID ARGS...` of a
    /// container `id` of the test image, which is remembered.
    pub fn run_words<'a>(
        &self,
        pre: &[&'a str],
        post: &[&'a str],
        id: &'a str,
        args: &[&'a str],
    ) -> Vec<&'a str> {
        self.remember("default", id);
        let mut a = vec!["run"];
        a.extend_from_slice(pre);
        a.extend(["--runtime", runtime()]);
        a.extend_from_slice(post);
        a.extend([BUSYBOX, id]);
        a.extend_from_slice(args);
        a
    }

    /// `ctr run --rm --runtime RT IMAGE ID ARGS...` with optional ctr flags.
    pub fn run_rm(&self, flags: &[&str], id: &str, args: &[&str]) -> Out {
        self.ctr(&self.run_words(&["--rm"], flags, id, args))
    }

    /// Starts `ctr run --runtime RT IMAGE ID ARGS...` in the foreground as a
    /// child (stdout/stderr piped), and waits until the task runs.
    pub fn spawn_run(&self, id: &str, args: &[&str]) -> Child {
        let a = self.run_words(&["--rm"], &[], id, args);
        let spawn = || {
            self.ctr_cmd("default", &a)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .unwrap()
        };
        let mut child = spawn();
        let mut retried = false;
        let deadline = Instant::now() + CTR_TIMEOUT;
        loop {
            if self.status(id) == "RUNNING" {
                return child;
            }
            // ctr gave up before the task ran: say why; once, on a busy
            // machine, try again.
            if let Ok(Some(_)) = child.try_wait() {
                let out = collect(child, &format!("ctr {}", a.join(" ")), CTR_TIMEOUT);
                assert!(!retried, "ctr run ended before its task ran: {out:?}");
                eprintln!("NOTE: ctr run ended before its task ran, once more: {out:?}");
                let _ = self.ctr(&["containers", "rm", id]);
                retried = true;
                child = spawn();
                continue;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let out = collect(child, "ctr run", Duration::from_secs(10));
                panic!("task {id} never became RUNNING: {out:?}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The pid of the shim containerd started for `id` (a task, or a pod's
    /// sandbox: the shim's `-id`).
    pub fn shim_pid(&self, id: &str) -> i32 {
        let shim = crate::processes_mentioning(&format!("-id {id} "));
        shim.iter()
            .find(|p| p.contains("containerd-shim"))
            .and_then(|p| p.split(':').next())
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no shim process for {id}: {shim:?}"))
    }

    /// The task's status as `ctr task ls` prints it (empty: no task).
    pub fn status(&self, id: &str) -> String {
        self.status_in("default", id)
    }

    /// The status of task `id` in namespace `ns`, as `ctr task ls` gives it.
    pub fn status_in(&self, ns: &str, id: &str) -> String {
        let out = self.ctr_in(ns, &["task", "ls"], None);
        out.stdout
            .lines()
            .skip(1)
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.first() == Some(&id)).then(|| f.get(2).unwrap_or(&"").to_string())
            })
            .unwrap_or_default()
    }

    #[track_caller]
    pub fn wait_status(&self, id: &str, want: &str) {
        poll(
            CTR_TIMEOUT,
            Duration::from_millis(100),
            || {
                let s = self.status(id);
                if s == want {
                    Ok(())
                } else {
                    Err(s)
                }
            },
            |s| format!("task {id} never became {want} (last: {s:?})"),
        )
    }

    /// Fails on anything of this containerd's containers left behind.
    pub fn finish(mut self) {
        self.finished = true;
        for ns in ["default", "k8s.io"] {
            let tasks = self.ctr_in(ns, &["task", "ls", "-q"], None);
            assert!(
                tasks.stdout.trim().is_empty(),
                "tasks left in {ns}: {}",
                tasks.stdout
            );
        }
        let needle = self.path().to_string_lossy().into_owned();
        poll(
            Duration::from_secs(10),
            Duration::from_millis(100),
            || {
                // containerd itself names the folder: only its children count.
                none_left(
                    processes_mentioning(&needle)
                        .into_iter()
                        .filter(|p| !p.contains("bin/containerd --config"))
                        .collect(),
                )
            },
            |procs| format!("processes left behind: {procs:?}"),
        );
        let address = self.address().to_string_lossy().into_owned();
        for (ns, id) in self.ids.borrow().iter() {
            if is_krun() {
                let state = Path::new("/run/krun-oci/containerd").join(ns).join(id);
                assert!(
                    !state.exists(),
                    "shim state left behind: {}",
                    state.display()
                );
            }
            let cgroups = crate::cgroups::named(id);
            assert!(cgroups.is_empty(), "cgroups left behind: {cgroups:?}");
            // containerd's runc shim leaves its socket when killed with -9;
            // ours must not.
            let socket = socket_path(&address, ns, id);
            if is_krun() {
                assert!(
                    !socket.exists(),
                    "shim socket left behind: {}",
                    socket.display()
                );
            } else if socket.exists() {
                eprintln!("NOTE: the runc shim left its socket {}", socket.display());
                let _ = std::fs::remove_file(&socket);
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked: Vec<&str> = mounts
            .lines()
            .filter(|l| l.split(' ').nth(4).is_some_and(|m| m.starts_with(&needle)))
            .collect();
        assert!(leaked.is_empty(), "mounts left behind: {leaked:?}");
    }
}

/// Where a shim for (namespace, id) listens, as the shim crate derives it.
pub fn socket_path(address: &str, ns: &str, id: &str) -> PathBuf {
    let key = Path::new(address).join(ns).join(id);
    let hash = Sha256::digest(key.to_string_lossy().as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    Path::new("/run/containerd/s").join(hex)
}

impl Drop for Containerd {
    fn drop(&mut self) {
        if std::thread::panicking() || !self.finished {
            let log =
                std::fs::read_to_string(self.path().join("containerd.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(40).collect();
            eprintln!(
                "containerd log (last lines):\n{}",
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if std::thread::panicking() {
            if let Ok(secs) = std::env::var("KRUN_OCI_TEST_HOLD").map(|s| s.parse().unwrap_or(600))
            {
                eprintln!(
                    "KRUN_OCI_TEST_HOLD: containerd in {} kept for {secs} s",
                    self.path().display()
                );
                std::thread::sleep(Duration::from_secs(secs));
            }
        }
        let p = self.path().to_str().unwrap().to_string();
        let out = self.hack(&["stop", &p]);
        if out.code != 0 {
            eprintln!("hack/containerd-env stop: {}", out.stderr);
        }
        // stop removed the folder; keep TempDir from complaining.
        if let Some(d) = self.dir.take() {
            let _ = d.keep();
        }
    }
}

/// Runs a command with a hard timeout, feeding `stdin`.
pub fn run(mut c: Command, what: &str, stdin: Option<&[u8]>) -> Out {
    let (child, _feeder) =
        spawn_fed(&mut c, stdin).unwrap_or_else(|e| panic!("cannot run {what}: {e}"));
    collect(child, what, CTR_TIMEOUT)
}

/// Waits for a child (killing it after `timeout`) and collects its output.
pub fn collect(child: Child, what: &str, timeout: Duration) -> Out {
    let start = Instant::now();
    let f = finish(child, timeout)
        .unwrap_or_else(|| panic!("{what} did not finish within {timeout:?}"));
    Out::new(what, f, start)
}
