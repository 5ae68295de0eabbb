//! krun-e2e: the harness for the end-to-end tests of krun-oci, which boot
//! real microVMs with the binaries `hack/build` puts in target/dist.
//!
//! Every test gets a sandbox: its own state root, bundle folder and guest
//! console copies, a hard timeout on each run, and a check afterwards that
//! nothing of the container is left (state, processes, mounts). When the
//! VM assets or the binaries are missing or stale the tests fail with a
//! message saying how to get them; they never skip.
//!
//! Beside the sandbox: [`lifecycle`] (the runtime-spec lifecycle by hand),
//! [`podman`] (a private podman store), [`containerd`] (a private
//! containerd and `ctr`) and [`cri`] (a CRI client). The suites are this
//! crate's test targets (tests/*.rs); `src/bin/cri-pod-start.rs` is a
//! benchmark tool over the CRI client.

pub mod containerd;
pub mod cri;
pub mod lifecycle;
pub mod podman;

use std::io::{Read, Write};
use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// A hard limit on one container run (boot under TCG takes ~2-3 s; a busy
/// 2-core CI machine running two VMs at once needs more).
pub const RUN_TIMEOUT: Duration = Duration::from_secs(180);

/// The workspace's top folder (this crate is its `tests` folder).
pub fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .canonicalize()
        .unwrap()
}

/// `$KRUN_OCI_DIST`, else the workspace's target/dist: where `hack/build`
/// puts the binaries and `hack/setup` adds the kernel and virtiofsd.
pub fn dist() -> PathBuf {
    std::env::var_os("KRUN_OCI_DIST")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace().join("target/dist"))
}

/// The directory with vmlinux, initramfs.cpio and virtiofsd that `hack/setup`
/// assembles. Panics with instructions when it is missing or stale.
pub fn libdir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let lib = dist().join("lib/krun-oci");
        for f in ["vmlinux", "initramfs.cpio", "virtiofsd"] {
            assert!(
                lib.join(f).is_file(),
                "VM TESTS CANNOT RUN: {} is missing. Run `hack/setup` (or `hack/test`) as root first; \
                 these tests boot real microVMs and fail rather than skip.",
                lib.join(f).display()
            );
        }
        // An initramfs older than guest-init's sources would test old code.
        let built = mtime(&lib.join("initramfs.cpio"));
        for dir in ["guest-init/src", "src/proto/src"] {
            let newest = newest_mtime(&workspace().join(dir));
            assert!(built >= newest, "{} is older than {dir}: run hack/build", lib.join("initramfs.cpio").display());
        }
        lib
    })
    .clone()
}

/// The source folders of the runtime binary.
const RUNTIME_SOURCES: [&str; 4] = [
    "src/runtime/src",
    "src/hypervisor/src",
    "src/vmm/src",
    "src/proto/src",
];

/// The krun-oci binary under test, `$KRUN_OCI_DIST/bin/krun-oci`, which
/// `hack/build` makes. Panics with instructions when it is missing or
/// older than its sources.
pub fn krun_oci_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| dist_bin("krun-oci", &RUNTIME_SOURCES))
        .clone()
}

/// The containerd shim under test, `$KRUN_OCI_DIST/bin/containerd-shim-krun-v2`
/// (containerd finds it there), which `hack/build` makes. Panics with
/// instructions when it is missing or older than its sources.
pub fn shim_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        let sources: Vec<&str> = ["shim/src"].into_iter().chain(RUNTIME_SOURCES).collect();
        dist_bin("containerd-shim-krun-v2", &sources)
    })
    .clone()
}

/// `name` in `$KRUN_OCI_DIST/bin`, checked to be newer than each folder of
/// `sources`.
fn dist_bin(name: &str, sources: &[&str]) -> PathBuf {
    let bin = dist().join("bin").join(name);
    let built = std::fs::metadata(&bin)
        .and_then(|m| m.modified())
        .unwrap_or_else(|_| {
            panic!(
                "END-TO-END TESTS CANNOT RUN: {} is missing. Run `hack/build` (or `hack/test`) first; \
                 these tests run the binaries it builds and fail rather than skip.",
                bin.display()
            )
        });
    for dir in sources {
        assert!(
            built >= newest_mtime(&workspace().join(dir)),
            "{} is older than {dir}: run hack/build",
            bin.display()
        );
    }
    bin
}

/// The static netperf tool (guest-init/examples/netperf.rs) that
/// `hack/build` puts in target/dist/tools, for tests to copy into a busybox
/// rootfs. Panics with instructions when it is missing or stale.
pub fn netperf() -> PathBuf {
    let bin = dist().join("tools/netperf");
    assert!(
        bin.is_file(),
        "{} is missing: run hack/build",
        bin.display()
    );
    let src = workspace().join("guest-init/examples/netperf.rs");
    assert!(
        mtime(&bin) >= mtime(&src),
        "{} is older than {}: run hack/build",
        bin.display(),
        src.display()
    );
    bin
}

fn mtime(p: &Path) -> std::time::SystemTime {
    std::fs::metadata(p).and_then(|m| m.modified()).unwrap()
}

fn newest_mtime(dir: &Path) -> std::time::SystemTime {
    let mut newest = std::time::UNIX_EPOCH;
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let t = if e.path().is_dir() {
            newest_mtime(&e.path())
        } else {
            mtime(&e.path())
        };
        newest = newest.max(t);
    }
    newest
}

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

    /// `krun-oci --root ROOT <args>` with the guest console copied for
    /// failure reports.
    pub fn cmd(&self) -> Command {
        let mut c = krun_oci();
        c.arg("--root").arg(self.root());
        c.env("KRUN_OCI_CONSOLE_COPY", self.path().join("console"));
        c
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
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let procs = processes_mentioning(&needle);
            if procs.is_empty() {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "processes left behind: {procs:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
        let leaked: Vec<&str> = mounts.lines().filter(|l| l.contains(&needle)).collect();
        assert!(leaked.is_empty(), "mounts left behind: {leaked:?}");
    }

    /// Kills whatever of this sandbox still runs (a failed test must not
    /// leave VMs behind for the next one).
    fn kill_leftovers(&self) {
        let needle = self.path().to_string_lossy().into_owned();
        for p in processes_mentioning(&needle) {
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

/// Processes whose command line mentions `needle`, as "pid: cmdline".
pub fn processes_mentioning(needle: &str) -> Vec<String> {
    let me = std::process::id().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.chars().all(|c| c.is_ascii_digit()) || name == me {
            continue;
        }
        if let Ok(cmd) = std::fs::read(e.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
            if cmd.contains(needle) {
                out.push(format!("{name}: {cmd}"));
            }
        }
    }
    out
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

/// Runs `cmd` feeding `stdin`, killing it after `timeout`.
pub fn run_with_timeout(
    mut cmd: Command,
    stdin: Option<&[u8]>,
    timeout: Duration,
    console_dir: &Path,
) -> Output {
    cmd.stdin(if stdin.is_some() {
        Stdio::piped()
    } else {
        Stdio::null()
    })
    .stdout(Stdio::piped())
    .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawning krun-oci");
    let input = stdin.map(|s| s.to_vec());
    let mut sin = child.stdin.take();
    let feeder = std::thread::spawn(move || {
        if let (Some(mut w), Some(data)) = (sin.take(), input) {
            let _ = w.write_all(&data);
        }
    });
    let mut so = child.stdout.take().unwrap();
    let mut se = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = so.read_to_end(&mut v);
        v
    });
    let err_t = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = se.read_to_end(&mut v);
        v
    });
    let status = wait_timeout(&mut child, timeout).unwrap_or_else(|| {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "krun-oci did not finish within {timeout:?}; guest console:\n{}",
            read_consoles(console_dir)
        );
    });
    let _ = feeder.join();
    let stdout = out_t.join().unwrap();
    let stderr = err_t.join().unwrap();
    use std::os::unix::process::ExitStatusExt;
    let code = status
        .code()
        .unwrap_or_else(|| 128 + status.signal().unwrap_or(0));
    Output {
        code,
        stdout,
        stderr,
    }
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

/// A bundle whose config the test edits before running.
pub struct TestBundle {
    pub dir: PathBuf,
    pub config: Value,
}

impl TestBundle {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn process(&mut self) -> &mut Value {
        &mut self.config["process"]
    }

    pub fn add_mount(&mut self, m: Value) {
        self.config["mounts"].as_array_mut().unwrap().push(m);
    }

    pub fn write(&self) {
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }
}

/// A rootfs of busybox-static with its applets, /etc/passwd and /etc/group.
pub fn make_busybox_rootfs(root: &Path) {
    if root.join("bin/busybox").exists() {
        return;
    }
    for d in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "tmp",
        "root",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static (hack/setup installs it)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// The config `hack/mkbundle` writes, running `args`.
pub fn base_config(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "krun-test",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}
