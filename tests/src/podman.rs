//! The harness for the podman end-to-end suite (tests/podman.rs).
//!
//! Every test gets a `Podman`: a private podman store (its own `--root`,
//! `--runroot`, `--tmpdir` in a temporary folder, the read-only test image
//! store that `hack/podman-env` prepares, `CONTAINERS_CONF` and
//! `CONTAINERS_STORAGE_CONF` from it), a hard timeout on every podman call,
//! and `finish()`, which checks that nothing is left: no container in
//! `podman ps -a`, no process mentioning the store or a container id, no
//! mount, no runtime state directory, no cgroup.
//!
//! The runtime is `KRUN_OCI_PODMAN_RUNTIME`: `krun-oci` (default; the
//! binary cargo built) or `runc` (to validate the tests themselves).
//! Podman is given a small wrapper as `--runtime`, named like the runtime
//! (conmon passes `--log-format=json` only to runtimes whose basename is in
//! containers.conf's `runtime_supports_json`), which logs every runtime
//! command line to `runtime.log` in the store (shown when a test fails) and
//! execs the runtime. It exists because podman and conmon hand the runtime
//! a scrubbed environment (only PATH, XDG_RUNTIME_DIR and a few of their
//! own variables), so `KRUN_OCI_LIBDIR` must be set there.
//! `KRUN_OCI_PODMAN_NO_WRAPPER=1` passes the binary itself instead;
//! `KRUN_OCI_PODMAN_KEEP=1` keeps each test's folder (store, runtime.log).

use std::collections::HashMap;
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::dist::{krun_oci_bin, libdir, workspace};
use crate::process::{finish, none_left, poll, processes_mentioning, spawn_fed, wait_timeout, Out};
use crate::sandbox::hypervisor;

/// A hard limit on any one podman command.
pub const PODMAN_TIMEOUT: Duration = Duration::from_secs(120);

/// How long processes, mounts and cgroups may take to go away after the
/// last podman command (conmon runs `podman container cleanup` after exit).
const SETTLE: Duration = Duration::from_secs(15);

/// A line on the test's real stderr, past libtest's output capture, so
/// that it shows even for tests that pass.
pub fn loud(msg: &str) {
    let _ = writeln!(std::io::stderr(), "\n!!! {msg}");
}

/// The runtime podman drives in this run of the suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Runtime {
    KrunOci,
    Runc,
}

impl Runtime {
    pub fn from_env() -> Runtime {
        match std::env::var("KRUN_OCI_PODMAN_RUNTIME").as_deref() {
            Err(_) | Ok("") | Ok("krun-oci") => Runtime::KrunOci,
            Ok("runc") => Runtime::Runc,
            Ok(other) => panic!("KRUN_OCI_PODMAN_RUNTIME={other}: expected krun-oci or runc"),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Runtime::KrunOci => "krun-oci",
            Runtime::Runc => "runc",
        }
    }

    /// Where the runtime keeps container state by default (podman passes
    /// no `--root` to it).
    pub fn state_root(self) -> &'static str {
        match self {
            Runtime::KrunOci => "/run/krun-oci",
            Runtime::Runc => "/run/runc",
        }
    }
}

/// What `hack/podman-env --check` prints.
struct Env {
    podman: PathBuf,
    conf: PathBuf,
    storage_conf: PathBuf,
    storage_opts: Vec<String>,
    busybox: String,
    debian: String,
    runc: PathBuf,
}

fn env() -> &'static Env {
    static ENV: OnceLock<Env> = OnceLock::new();
    ENV.get_or_init(|| {
        let script = workspace().join("hack/podman-env");
        let out = Command::new(&script)
            .arg("--check")
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|e| panic!("PODMAN TESTS CANNOT RUN: {}: {e}", script.display()));
        assert!(
            out.status.success(),
            "PODMAN TESTS CANNOT RUN: `hack/podman-env --check` failed: {}\n\
             Run `hack/podman-env` (or `hack/test`) as root first; these tests fail rather than skip.",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        let text = String::from_utf8(out.stdout).unwrap();
        let vars: HashMap<&str, &str> = text.lines().filter_map(|l| l.split_once('=')).collect();
        let get = |k: &str| -> String {
            vars.get(k)
                .unwrap_or_else(|| panic!("hack/podman-env --check printed no {k}: {text}"))
                .to_string()
        };
        Env {
            podman: get("KRUN_OCI_PODMAN").into(),
            conf: get("CONTAINERS_CONF").into(),
            storage_conf: get("CONTAINERS_STORAGE_CONF").into(),
            storage_opts: get("KRUN_OCI_PODMAN_STORAGE_OPTS")
                .split_whitespace()
                .map(|o| o.trim_start_matches("--storage-opt=").to_string())
                .collect(),
            busybox: get("KRUN_OCI_PODMAN_BUSYBOX"),
            debian: get("KRUN_OCI_PODMAN_DEBIAN"),
            runc: get("KRUN_OCI_RUNC").into(),
        }
    })
}

/// The busybox image (busybox-static, root and user 1000).
pub fn busybox() -> &'static str {
    &env().busybox
}

/// The Debian bookworm (minbase) image.
pub fn debian() -> &'static str {
    &env().debian
}

/// A private podman store for one test.
pub struct Podman {
    dir: Option<tempfile::TempDir>,
    path: PathBuf,
    pub runtime: Runtime,
    runtime_path: PathBuf,
    test: String,
    /// Container ids this test created (from the runtime log, cidfiles,
    /// `create`/`run -d` output).
    ids: Mutex<Vec<String>>,
    seq: AtomicU32,
    finished: bool,
}

impl Podman {
    /// A private podman store for `test`.
    pub fn new(test: &str) -> Podman {
        let runtime = Runtime::from_env();
        let env = env();
        // Short: podman refuses a runroot longer than 50 characters.
        let dir = tempfile::Builder::new()
            .prefix("krun-podman-")
            .tempdir()
            .unwrap();
        let path = dir.path().to_path_buf();
        for d in ["root", "run", "tmp", "vartmp", "rt"] {
            std::fs::create_dir_all(path.join(d)).unwrap();
        }
        let real: PathBuf = match runtime {
            Runtime::Runc => env.runc.clone(),
            Runtime::KrunOci => krun_oci_bin(),
        };
        let runtime_path = if std::env::var("KRUN_OCI_PODMAN_NO_WRAPPER").as_deref() == Ok("1") {
            real
        } else {
            let wrapper = path.join("rt").join(runtime.name());
            let mut script = format!(
                "#!/bin/sh\n# Logs the runtime's command line, then runs it.\n\
                 printf '%s\\n' \"$*\" >> '{}'\n",
                path.join("runtime.log").display()
            );
            let mut extra = String::new();
            if runtime == Runtime::KrunOci {
                script.push_str(&format!(
                    "export KRUN_OCI_LIBDIR='{}'\n",
                    libdir().display()
                ));
                if let Some(h) = hypervisor() {
                    extra = format!(" --hypervisor '{h}'");
                }
            }
            script.push_str(&format!("exec '{}'{extra} \"$@\"\n", real.display()));
            std::fs::write(&wrapper, script).unwrap();
            std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
            wrapper
        };
        Podman {
            dir: Some(dir),
            path,
            runtime,
            runtime_path,
            test: test.to_string(),
            ids: Default::default(),
            seq: Default::default(),
            finished: false,
        }
    }

    pub fn is_runc(&self) -> bool {
        self.runtime == Runtime::Runc
    }

    /// The test's folder (store, runtime log, the test's own files).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// A loud notice that one check does not apply to this runtime.
    pub fn not_applicable(&self, what: &str) {
        loud(&format!(
            "NOT APPLICABLE to {} ({}): {what}",
            self.runtime.name(),
            self.test
        ));
    }

    /// `podman` with this test's store, runtime and configuration.
    pub fn cmd(&self) -> Command {
        let mut c = Command::new(self.cmd_program());
        c.args(self.cmd_args());
        for (k, v) in self.cmd_env() {
            c.env(k, v);
        }
        // conmon drops files (an "oom" marker) in its working directory.
        c.current_dir(&self.path);
        c
    }

    fn cmd_program(&self) -> PathBuf {
        env().podman.clone()
    }

    fn cmd_args(&self) -> Vec<String> {
        let mut a = vec![
            "--root".to_string(),
            self.path.join("root").display().to_string(),
            "--runroot".into(),
            self.path.join("run").display().to_string(),
            "--tmpdir".into(),
            self.path.join("tmp").display().to_string(),
            "--runtime".into(),
            self.runtime_path.display().to_string(),
        ];
        for o in &env().storage_opts {
            a.push(format!("--storage-opt={o}"));
        }
        a
    }

    fn cmd_env(&self) -> Vec<(&'static str, PathBuf)> {
        vec![
            ("CONTAINERS_CONF", env().conf.clone()),
            ("CONTAINERS_STORAGE_CONF", env().storage_conf.clone()),
            // podman's own scratch files (`update --resources`, image copies).
            ("TMPDIR", self.path.join("vartmp")),
        ]
    }

    /// Runs `podman ARGS` with no stdin, under the hard timeout.
    #[track_caller]
    pub fn podman(&self, args: &[&str]) -> Out {
        self.podman_in(args, None)
    }

    /// Runs `podman ARGS` feeding `stdin`, under the hard timeout.
    #[track_caller]
    pub fn podman_in(&self, args: &[&str], stdin: Option<&[u8]>) -> Out {
        let mut c = self.cmd();
        c.args(args);
        self.run(c, &format!("podman {}", args.join(" ")), stdin)
    }

    /// `podman ARGS`, which must succeed; its trimmed stdout.
    #[track_caller]
    pub fn ok(&self, args: &[&str]) -> String {
        self.podman(args).ok()
    }

    #[track_caller]
    fn run(&self, mut c: Command, what: &str, stdin: Option<&[u8]>) -> Out {
        let start = Instant::now();
        let (child, feeder) =
            spawn_fed(&mut c, stdin).unwrap_or_else(|e| panic!("spawning {what}: {e}"));
        // conmon may hold podman's stdout open a moment longer; the pipes
        // end when everything that has them exits.
        let Some(f) = finish(child, PODMAN_TIMEOUT) else {
            panic!(
                "`{what}` did not finish within {PODMAN_TIMEOUT:?}\n{}",
                self.runtime_log()
            );
        };
        let _ = feeder.join();
        let out = Out::new(what, f, start);
        // Shown with the output of a failed test.
        eprintln!(
            "[{:6.2}s] {what} -> {}",
            out.elapsed.as_secs_f64(),
            out.code
        );
        out
    }

    fn next_file(&self, stem: &str) -> PathBuf {
        let n = self.seq.fetch_add(1, Ordering::Relaxed) + 1;
        self.path.join(format!("{stem}-{n}"))
    }

    fn remember_cidfile(&self, cidfile: &Path) {
        if let Ok(id) = std::fs::read_to_string(cidfile) {
            self.remember(id.trim());
        }
    }

    fn remember(&self, id: &str) {
        let id = id.trim();
        let mut ids = self.ids.lock().unwrap();
        if !id.is_empty() && !ids.iter().any(|i| i == id) {
            ids.push(id.to_string());
        }
    }

    /// `podman run --rm --network none OPTS IMAGE ARGS` in the foreground.
    #[track_caller]
    pub fn run_rm(&self, opts: &[&str], image: &str, args: &[&str]) -> Out {
        self.run_rm_in(opts, image, args, None)
    }

    /// `run_rm` with `-i` and `stdin` fed to it.
    #[track_caller]
    pub fn run_rm_in(
        &self,
        opts: &[&str],
        image: &str,
        args: &[&str],
        stdin: Option<&[u8]>,
    ) -> Out {
        let cidfile = self.next_file("cid");
        let cid = cidfile.display().to_string();
        let mut a = vec!["run", "--rm", "--cidfile", &cid];
        a.extend(default_network(opts));
        if stdin.is_some() {
            a.push("-i");
        }
        a.extend_from_slice(opts);
        a.push(image);
        a.extend_from_slice(args);
        let out = self.podman_in(&a, stdin);
        self.remember_cidfile(&cidfile);
        out
    }

    /// `podman run -d --network none --name NAME OPTS IMAGE ARGS`: the id.
    #[track_caller]
    pub fn run_d(&self, name: &str, opts: &[&str], image: &str, args: &[&str]) -> String {
        self.named(&["run", "-d"], name, opts, image, args)
    }

    /// `podman create --network none --name NAME OPTS IMAGE ARGS`: the id.
    #[track_caller]
    pub fn create(&self, name: &str, opts: &[&str], image: &str, args: &[&str]) -> String {
        self.named(&["create"], name, opts, image, args)
    }

    /// `podman VERB --name NAME --network none OPTS IMAGE ARGS`, which
    /// prints the new container's id: the id, remembered.
    #[track_caller]
    fn named(
        &self,
        verb: &[&str],
        name: &str,
        opts: &[&str],
        image: &str,
        args: &[&str],
    ) -> String {
        let mut a = verb.to_vec();
        a.extend(["--name", name]);
        a.extend(default_network(opts));
        a.extend_from_slice(opts);
        a.push(image);
        a.extend_from_slice(args);
        let id = self.ok(&a);
        self.remember(&id);
        id
    }

    /// `podman inspect --format '{{.State.Status}}' CTR`.
    #[track_caller]
    pub fn status(&self, ctr: &str) -> String {
        self.ok(&["inspect", "--format", "{{.State.Status}}", ctr])
    }

    /// Waits until `podman logs CTR` contains `needle`; the logs.
    #[track_caller]
    pub fn wait_for_log(&self, ctr: &str, needle: &str, timeout: Duration) -> String {
        poll(
            timeout,
            Duration::from_millis(100),
            || {
                let out = self.podman(&["logs", ctr]);
                let both = format!("{}{}", out.stdout, out.stderr);
                if out.code == 0 && both.contains(needle) {
                    Ok(both)
                } else {
                    Err(out)
                }
            },
            |out| {
                format!(
                    "`podman logs {ctr}` did not show {needle:?} within {timeout:?}: {out:?}\n{}",
                    self.runtime_log()
                )
            },
        )
    }

    /// Whether a container named `ctr` exists (by its whole name, never
    /// an ID prefix).
    pub fn exists(&self, ctr: &str) -> bool {
        self.ok(&["ps", "-a", "--format", "{{.Names}}"])
            .lines()
            .any(|n| n.trim() == ctr)
    }

    /// Waits until CTR exists and its status is `want`.
    #[track_caller]
    pub fn wait_for_status(&self, ctr: &str, want: &str, timeout: Duration) {
        poll(
            timeout,
            Duration::from_millis(50),
            || {
                let out = self.podman(&["inspect", "--format", "{{.State.Status}}", ctr]);
                let s = out.stdout.trim();
                if out.code == 0 && s == want {
                    Ok(())
                } else {
                    Err(s.to_string())
                }
            },
            |s| {
                format!(
                    "{ctr} is {s:?}, not {want:?}, after {timeout:?}\n{}",
                    self.runtime_log()
                )
            },
        )
    }

    /// Runs `podman ARGS` on a terminal of its own (`script`, as a user's
    /// shell would give it), typing `input`. Output has its `\r`s removed.
    #[track_caller]
    pub fn in_pty(&self, args: &[&str], input: &[u8]) -> Out {
        let mut words = vec![shell_quote(&self.cmd_program().display().to_string())];
        words.extend(self.cmd_args().iter().map(|a| shell_quote(a)));
        words.extend(args.iter().map(|a| shell_quote(a)));
        let inner = format!("stty rows 33 cols 101; exec {}", words.join(" "));
        let mut c = Command::new("script");
        c.args(["-qec", &inner, "/dev/null"])
            .current_dir(&self.path);
        for (k, v) in self.cmd_env() {
            c.env(k, v);
        }
        let mut out = self.run(
            c,
            &format!("script: podman {}", args.join(" ")),
            Some(input),
        );
        out.stdout = out.stdout.replace('\r', "");
        out
    }

    /// The runtime command lines podman and conmon ran so far.
    pub fn runtime_log(&self) -> String {
        format!(
            "--- {} command lines ({}) ---\n{}",
            self.runtime.name(),
            self.path.join("runtime.log").display(),
            std::fs::read_to_string(self.path.join("runtime.log")).unwrap_or_default()
        )
    }

    /// Container ids the runtime was asked to create.
    fn ids_from_runtime_log(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.path.join("runtime.log")).unwrap_or_default();
        log.lines()
            .filter(|l| l.split_whitespace().any(|w| w == "create"))
            .filter_map(|l| l.split_whitespace().last().map(str::to_string))
            .filter(|id| id.len() == 64 && id.chars().all(|c| c.is_ascii_hexdigit()))
            .collect()
    }

    /// Asserts that nothing of this test's containers is left, then
    /// removes the store. Every test ends with it.
    #[track_caller]
    pub fn finish(mut self) {
        for id in self.ids_from_runtime_log() {
            self.remember(&id);
        }
        let ps = self.ok(&["ps", "-a", "--format", "{{.ID}} {{.Names}} {{.Status}}"]);
        assert!(ps.is_empty(), "containers left in `podman ps -a`:\n{ps}");
        let ids = self.ids.lock().unwrap().clone();
        let needle = self.path.display().to_string();
        let start = Instant::now();
        poll(
            SETTLE,
            Duration::from_millis(100),
            || none_left(self.leftovers(&needle, &ids)),
            |left| {
                format!(
                    "left behind after {SETTLE:?}:\n{}\n{}",
                    left.join("\n"),
                    self.runtime_log()
                )
            },
        );
        eprintln!(
            "[{:6.2}s] nothing left behind",
            start.elapsed().as_secs_f64()
        );
        self.finished = true;
    }

    fn leftovers(&self, needle: &str, ids: &[String]) -> Vec<String> {
        let mut left = Vec::new();
        for p in processes_mentioning(needle) {
            left.push(format!("process: {p}"));
        }
        for id in ids {
            for p in processes_mentioning(id) {
                left.push(format!("process: {p}"));
            }
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        for l in mounts.lines() {
            if l.contains(needle) || ids.iter().any(|id| l.contains(id.as_str())) {
                left.push(format!("mount: {l}"));
            }
        }
        for id in ids {
            let state = Path::new(self.runtime.state_root()).join(id);
            if state.exists() {
                left.push(format!("runtime state: {}", state.display()));
            }
        }
        for cg in cgroups_named(ids) {
            left.push(format!("cgroup: {}", cg.display()));
        }
        left
    }
}

impl Drop for Podman {
    fn drop(&mut self) {
        if !self.finished {
            // A failed test: stop whatever it left running, best effort, so
            // that it does not disturb the tests after it.
            // Pods first: their infra containers go only with them.
            for args in [
                &["pod", "rm", "-af", "-t", "0"][..],
                &["rm", "-af", "-t", "0"],
            ] {
                let mut c = self.cmd();
                c.args(args)
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null());
                if let Ok(mut child) = c.spawn() {
                    if wait_timeout(&mut child, Duration::from_secs(60)).is_none() {
                        let _ = child.kill();
                        let _ = child.wait();
                    }
                }
            }
        }
        // Never delete through a mount that is still there.
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
        let needle = self.path.display().to_string();
        let why = if mounts.lines().any(|l| l.contains(&needle)) {
            Some("mounts still under it")
        } else if std::env::var("KRUN_OCI_PODMAN_KEEP").as_deref() == Ok("1") {
            Some("KRUN_OCI_PODMAN_KEEP=1")
        } else {
            None
        };
        if let (Some(why), Some(d)) = (why, self.dir.take()) {
            let kept = d.keep();
            loud(&format!("kept {} ({why})", kept.display()));
        }
    }
}

/// Cgroup directories (any hierarchy, up to three levels down) whose name
/// contains one of `ids`.
fn cgroups_named(ids: &[String]) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, ids: &[String], out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            let name = e.file_name().to_string_lossy().into_owned();
            if ids.iter().any(|id| name.contains(id.as_str())) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), depth - 1, ids, out);
            }
        }
    }
    let mut out = Vec::new();
    if !ids.is_empty() {
        walk(Path::new("/sys/fs/cgroup"), 3, ids, &mut out);
    }
    out
}

/// `s` quoted for sh.
pub fn shell_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// `--network none` unless the test's own options name a network (or a
/// pod, whose network is the pod's): tests do not touch the host's
/// firewall unless they are about networking.
fn default_network(opts: &[&str]) -> Vec<&'static str> {
    if opts.iter().any(|o| {
        ["--network", "--pod"]
            .iter()
            .any(|f| o == f || o.starts_with(&format!("{f}=")))
    }) {
        Vec::new()
    } else {
        vec!["--network", "none"]
    }
}
