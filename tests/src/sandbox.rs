//! A private folder for one test and the krun-oci binary run in it: its
//! own state root, bundle folder and guest console copies, a hard timeout
//! on each run, and a check afterwards that nothing of the container is
//! left (state, processes, mounts).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::bundle::{base_config, make_busybox_rootfs, TestBundle};
use crate::dist::{krun_oci_bin, libdir};
use crate::process::{finish, none_left, poll, processes_mentioning, spawn_fed};

/// A hard limit on one container run (boot under TCG takes ~2-3 s; a busy
/// 2-core CI machine running two VMs at once needs more).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The backend the suite runs on: `KRUN_OCI_TEST_HYPERVISOR` (builtin or
/// qemu) when set — hack/test runs the suite a second time inside a nested
/// test host with the built-in VMM — else the runtime's own choice.
pub fn hypervisor() -> Option<String> {
    std::env::var("KRUN_OCI_TEST_HYPERVISOR")
        .ok()
        .filter(|h| !h.is_empty())
}

/// The krun-oci binary under test with the VM assets and the suite's
/// backend.
pub fn krun_oci() -> Command {
    let mut c = Command::new(krun_oci_bin());
    c.env("KRUN_OCI_LIBDIR", libdir());
    if let Some(h) = hypervisor() {
        c.arg("--hypervisor").arg(h);
    }
    c
}

/// A private folder for one test.
pub struct Sandbox {
    pub dir: tempfile::TempDir,
    name: String,
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("guest consoles of {}:\n{}", self.name, self.console());
        }
        self.kill_leftovers();
    }
}

impl Sandbox {
    pub fn new(name: &str) -> Sandbox {
        let dir = tempfile::Builder::new()
            .prefix(&format!("krun-test-{name}-"))
            .tempdir()
            .unwrap();
        std::fs::create_dir_all(dir.path().join("root")).unwrap();
        std::fs::create_dir_all(dir.path().join("console")).unwrap();
        Sandbox {
            dir,
            name: name.to_string(),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// The state root passed as --root.
    pub fn root(&self) -> PathBuf {
        self.path().join("root")
    }

    /// A busybox bundle running `args`.
    pub fn bundle(&self, args: &[&str]) -> TestBundle {
        let dir = self.path().join("bundle");
        make_busybox_rootfs(&dir.join("rootfs"));
        TestBundle {
            dir,
            config: base_config(args),
        }
    }

    /// A busybox bundle running `args` in a user namespace mapping 0 to
    /// 100000 (65536 ids) for users and groups, its rootfs owned by 100000
    /// as podman makes it for `--uidmap 0:100000:65536`.
    pub fn userns_bundle(&self, args: &[&str]) -> TestBundle {
        let mut b = self.bundle(args);
        let chown = Command::new("chown")
            .args(["-hR", "100000:100000"])
            .arg(b.rootfs())
            .status()
            .unwrap();
        assert!(chown.success(), "chown of the rootfs: {chown}");
        let map = serde_json::json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
        b.config["linux"]["uidMappings"] = map.clone();
        b.config["linux"]["gidMappings"] = map;
        b.config["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(serde_json::json!({"type": "user"}));
        b
    }

    /// [`Sandbox::bundle`], its config written as it is.
    pub fn written_bundle(&self, args: &[&str]) -> TestBundle {
        let b = self.bundle(args);
        b.write();
        b
    }

    /// `krun-oci --root ROOT <args>` with the guest console copied for
    /// failure reports.
    pub fn cmd(&self) -> Command {
        let mut c = krun_oci();
        c.arg("--root").arg(self.root());
        c.env("KRUN_OCI_CONSOLE_COPY", self.path().join("console"));
        c
    }

    /// Starts `krun-oci run` of the (written) bundle `b` as `id`, its
    /// stdin and stdout /dev/null, and returns it running.
    pub fn spawn_run(&self, b: &TestBundle, id: &str) -> Child {
        let mut c = self.cmd();
        c.args(["run", "--bundle"]).arg(&b.dir).arg(id);
        c.stdin(Stdio::null())
            .stdout(Stdio::null())
            .spawn()
            .expect("starting krun-oci run")
    }

    /// Runs the bundle in the foreground and checks nothing is left.
    pub fn run(&self, b: &TestBundle, id: &str, stdin: Option<&[u8]>) -> Output {
        b.write();
        let mut c = self.cmd();
        c.args(["run", "--bundle"]).arg(&b.dir).arg(id);
        let out = run_with_timeout(c, stdin, RUN_TIMEOUT, &self.path().join("console"));
        self.assert_clean();
        out
    }

    /// `krun-oci --root ROOT OPTS run --bundle DIR ID` of the bundle as it
    /// is on disk, run to its end (no timeout: for runs that fail before a
    /// VM boots, or are short), its output collected.
    pub fn run_output(&self, opts: &[&str], b: &TestBundle, id: &str) -> std::process::Output {
        self.cmd()
            .args(opts)
            .args(["run", "--bundle"])
            .arg(&b.dir)
            .arg(id)
            .output()
            .unwrap()
    }

    /// Runs `krun-oci --root ROOT ARGS` (`args` a shell word list) on a
    /// terminal of its own, `size` ("rows R cols C"), as a user's shell
    /// would give it (`script`), typing `input`.
    pub fn on_a_terminal(&self, size: &str, args: &str, input: &[u8]) -> Output {
        let inner = format!(
            "stty {size}; {} {} --root {} {args}",
            krun_oci_bin().display(),
            hypervisor()
                .map(|h| format!("--hypervisor {h}"))
                .unwrap_or_default(),
            self.root().display()
        );
        let mut c = Command::new("script");
        c.args(["-qec", &inner, "/dev/null"])
            .env("KRUN_OCI_LIBDIR", libdir());
        run_with_timeout(c, Some(input), RUN_TIMEOUT, &self.path().join("console"))
    }

    /// Asserts that no trace of any container of this sandbox is left: no
    /// state directory, no process, no mount.
    pub fn assert_clean(&self) {
        let root = self.root();
        let left: Vec<_> = std::fs::read_dir(&root)
            .map(|d| d.flatten().map(|e| e.path()).collect())
            .unwrap_or_default();
        assert!(
            left.is_empty(),
            "state left behind under {}: {left:?}",
            root.display()
        );
        let needle = self.path().to_string_lossy().into_owned();
        // Processes exit as the runtime reaps them; allow a moment.
        poll(
            Duration::from_secs(5),
            Duration::from_millis(50),
            || none_left(processes_mentioning(&needle)),
            |procs| format!("processes left behind: {procs:?}"),
        );
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
        assert!(leaked.is_empty(), "mounts left behind: {leaked:?}");
    }

    /// Kills whatever of this sandbox still runs (a failed test must not
    /// leave VMs behind for the next one).
    fn kill_leftovers(&self) {
        let needle = self.path().to_string_lossy().into_owned();
        // (In a drop, maybe while a panic unwinds: a blocked scan is
        // reported, not a second panic.)
        let found =
            crate::process::processes_mentioning_within(&needle, crate::process::SCAN_LIMIT)
                .unwrap_or_else(|e| {
                    eprintln!("krun-e2e: leftovers of {} not killed: {e}", self.name);
                    Vec::new()
                });
        for p in found {
            if let Some(pid) = p.split(':').next().and_then(|p| p.parse::<i32>().ok()) {
                // SAFETY: kill has no memory effects.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }

    /// The guest console logs of this sandbox's runs.
    pub fn console(&self) -> String {
        read_consoles(&self.path().join("console"))
    }
}

fn read_consoles(dir: &Path) -> String {
    let mut s = String::new();
    for e in std::fs::read_dir(dir)
        .map(|d| d.flatten().collect::<Vec<_>>())
        .unwrap_or_default()
    {
        s.push_str(&format!(
            "--- {} ---\n{}\n",
            e.path().display(),
            std::fs::read_to_string(e.path()).unwrap_or_default()
        ));
    }
    s
}

/// What a run produced.
#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn stdout(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }

    /// Panics unless the output of [`Sandbox::on_a_terminal`], its `\r`s
    /// removed, shows the `pty`, the terminal's `size` (else "`size_reaches`:
    /// ...") and `typed`, in this order of checks, and the exit code is
    /// `code`.
    #[track_caller]
    pub fn expect_on_a_terminal(
        &self,
        code: i32,
        [pty, size, typed]: [&str; 3],
        size_reaches: &str,
    ) {
        let text = self.stdout().replace('\r', "");
        assert!(text.contains(pty), "{text}");
        assert!(text.contains(size), "{size_reaches}: {text}");
        assert!(text.contains(typed), "{text}");
        self.expect_code(code);
    }

    /// Panics unless the exit code is `code` and stderr says `why`.
    #[track_caller]
    pub fn expect_failure(&self, code: i32, why: &str) -> &Self {
        self.expect_code(code);
        assert!(self.stderr().contains(why), "{}", self.stderr());
        self
    }

    /// Panics with everything known unless the exit code is `code`.
    #[track_caller]
    pub fn expect_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code,
            code,
            "exit code; stdout: {:?}; stderr: {:?}",
            self.stdout(),
            self.stderr()
        );
        self
    }
}

/// Starts `cmd` (a krun-oci command) with `run --bundle DIR ID`, its
/// stdin `stdin`, its stdout and stderr piped.
pub fn spawn_run(mut cmd: Command, b: &TestBundle, id: &str, stdin: Stdio) -> Child {
    cmd.args(["run", "--bundle"])
        .arg(&b.dir)
        .arg(id)
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd.spawn().unwrap()
}

/// Runs `cmd` feeding `stdin`, killing it after `timeout`.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    console_dir: &Path,
) -> Output {
    let (child, feeder) = spawn_fed(&mut cmd, stdin).expect("spawning krun-oci");
    let f = finish(child, timeout).unwrap_or_else(|| {
        panic!(
            "krun-oci did not finish within {timeout:?}; guest console:\n{}",
            read_consoles(console_dir)
        );
    });
    let _ = feeder.join();
    Output {
        code: f.code,
        stdout: f.stdout,
        stderr: f.stderr,
    }
}
