//! A real systemd (the host's `/lib/systemd/systemd`) for the tests of
//! `krun-oci --systemd-cgroup`: PID 1 of its own PID, mount, UTS and
//! cgroup namespaces, so that it owns a cgroup2 tree of its own without
//! being the host's init. [`Systemd::command`] runs a program in there,
//! where it sees systemd's `/run` (its private socket
//! `/run/systemd/private`, enough for `systemctl` and `systemd-run` as
//! root; no D-Bus daemon runs) and its cgroup tree at `/sys/fs/cgroup`.
//!
//! It needs a cgroup2 `/sys/fs/cgroup` with controllers, as the nested
//! test host has (`hack/nested`); elsewhere [`Systemd::boot`] says so.
//!
//! Nothing systemd writes may reach the host: the nested test host shares
//! this machine's root over virtio-fs, and a systemd that ran
//! systemd-tmpfiles once emptied this machine's /tmp (Debian's tmp.conf
//! has `D /tmp`). So systemd gets fresh tmpfs on `/run`, `/tmp`,
//! `/var/tmp`, `/var/lib/systemd` and `/var/log/journal`, a folder of ours
//! as `/etc/systemd`, a copy of `/etc/machine-id` (it opens that file for
//! writing), and its own units only: `SYSTEMD_UNIT_PATH` names that
//! `/etc/systemd/system`, which holds the target it boots
//! (`krun-test.target`, pulling in nothing) and empty `sysinit.target`,
//! `basic.target` and `shutdown.target` for the default dependencies of
//! transient services. No unit of the host's is found, so tmpfiles,
//! journald, getty, remount-fs and the like cannot start (the tmpfiles
//! units are masked too, should the unit path ever grow the defaults),
//! and no generator runs (`SYSTEMD_GENERATOR_PATH` names an empty
//! folder). It is never shut down, only killed, so it unmounts nothing
//! and swaps nothing off. Its log (what it writes on `/dev/console`, a
//! pseudo-terminal of ours) goes to a file, not to the test's output.
//!
//! Folders a test shares with it (a sandbox under /tmp) are bound back in
//! at their own paths. Mounts made later below them outside systemd's
//! mount namespace do not show inside (its mounts are private).

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::cgroups;
use crate::process::{finish, wait_timeout};

/// How long systemd gets to answer on its private socket (a boot takes
/// seconds under TCG; a busy 2-core machine needs more).
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(90);

/// The host folders systemd gets a tmpfs on besides `/run`: its temporary
/// folders (tmpfiles would empty the host's) and its state.
const COVERED: [&str; 4] = ["/tmp", "/var/tmp", "/var/lib/systemd", "/var/log/journal"];

/// systemd's environment: a container (which makes it log to
/// /dev/console, mount only what is missing, leave the root's mount
/// propagation and the core pattern alone; it still raises fs.file-max,
/// fs.nr_open and net.unix.max_dgram_qlen and tries to load autofs4, in
/// the kernel it shares: the nested test host's), its own units only, no
/// generators.
const ENV: [(&str, &str); 7] = [
    ("container", "other"),
    ("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
    ("TERM", "dumb"),
    ("SYSTEMD_COLORS", "0"),
    ("SYSTEMD_UNIT_PATH", "/etc/systemd/system"),
    ("SYSTEMD_GENERATOR_PATH", "/etc/systemd/no-generators"),
    (
        "SYSTEMD_ENVIRONMENT_GENERATOR_PATH",
        "/etc/systemd/no-generators",
    ),
];

/// systemd's units, the only ones it finds: the target it boots, pulling
/// in nothing, and, empty, the targets a transient service depends on by
/// default (`Requires=sysinit.target`, `After=basic.target`,
/// `Conflicts=shutdown.target`).
const UNITS: [(&str, &str); 4] = [
    (
        "krun-test.target",
        "krun-e2e: systemd for the end-to-end tests",
    ),
    ("sysinit.target", "System Initialization (empty, krun-e2e)"),
    ("basic.target", "Basic System (empty, krun-e2e)"),
    ("shutdown.target", "System Shutdown (empty, krun-e2e)"),
];

/// Units masked as well (links to /dev/null), should the unit path ever
/// take in the host's: what would write to the host or take a terminal.
const MASKED: [&str; 11] = [
    "systemd-tmpfiles-setup.service",
    "systemd-tmpfiles-setup-dev.service",
    "systemd-tmpfiles-clean.service",
    "systemd-tmpfiles-clean.timer",
    "systemd-journal-flush.service",
    "systemd-remount-fs.service",
    "systemd-sysusers.service",
    "systemd-random-seed.service",
    "systemd-update-utmp.service",
    "ldconfig.service",
    "getty.target",
];

/// Run by `sh` as PID 1 of the new PID, mount and UTS namespaces
/// (`unshare --fork --pid --mount --uts --mount-proc`, whose mounts are
/// private), with `$1` systemd's cgroup (a host path) and `$2` the
/// [`fstab`] of its mounts: moves into that cgroup, enters a new cgroup
/// namespace rooted there, mounts and becomes systemd (which so keeps
/// this PID). Few commands: each costs ~0.3 s under TCG.
const SETUP: &str = r#"
set -eu
echo "krun-e2e: setting up systemd's namespaces"
echo 0 > "$1/cgroup.procs"
exec unshare --cgroup sh -c '
  mount --all --fstab "$1" --verbose &&
  exec /lib/systemd/systemd --system --unit=krun-test.target --log-target=console
' krun-systemd "$2"
"#;

/// The leaf cgroup (below systemd's) that [`Systemd::command`]'s processes
/// run in: systemd moves a process into a unit (`systemd-run --scope`, a
/// runtime's transient scope) only from inside its cgroup namespace.
const COMMANDS: &str = "krun-test-commands";

/// A systemd booted for a test. Drop kills it (SIGKILL to the namespace's
/// init ends every process in it: nothing is unmounted, swapped off or
/// shut down on the way) and removes its cgroups.
pub struct Systemd {
    /// `unshare`, the parent of systemd.
    child: Child,
    /// systemd, in our PID namespace (0 until found).
    pid: i32,
    /// Its cgroup, the root of its cgroup namespace.
    cgroup: PathBuf,
    /// Its fstab, `/etc/systemd` and machine ID, and its log (see
    /// [`stage`]).
    stage: tempfile::TempDir,
    /// Copies its console into `log`; ends when the last process holding
    /// the console has.
    reader: Option<JoinHandle<()>>,
    stopped: bool,
}

impl Systemd {
    /// Boots systemd and waits until it answers on its private socket
    /// (`systemctl is-system-running`: running or degraded; 2.4 s in the
    /// nested test host). `shared`: host folders it must see at their own
    /// paths though its /tmp and /var/tmp are its own (a test's sandbox);
    /// folders elsewhere show anyway. An error carries the end of
    /// systemd's log.
    pub fn boot(shared: &[&Path]) -> Result<Systemd, String> {
        check_host()?;
        let mut folders = Vec::new();
        for p in shared {
            folders.push(check_shared(p)?);
        }
        static N: AtomicU32 = AtomicU32::new(0);
        let name = format!(
            "krun-test-systemd-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        );
        let cgroup = Path::new(cgroups::ROOT).join(name);
        enable_controllers()?;
        let (master, console, slave) =
            console().map_err(|e| format!("creating systemd's console: {e}"))?;
        let stage = stage(&console, &folders)?;
        let log = File::create(stage.path().join("log")).map_err(|e| e.to_string())?;
        let reader = copy_console(master, log);
        std::fs::create_dir(&cgroup)
            .map_err(|e| format!("creating systemd's cgroup {}: {e}", cgroup.display()))?;
        let spawned = slave.try_clone().and_then(|err| {
            Command::new("unshare")
                // --kill-child: killing unshare kills systemd, and with
                // it its PID namespace (for a systemd not yet found).
                .args(["--fork", "--kill-child", "--pid", "--mount", "--uts"])
                .arg("--mount-proc")
                .args(["sh", "-c", SETUP, "krun-systemd-setup"])
                .arg(&cgroup)
                .arg(stage.path().join("fstab"))
                .env_clear()
                .envs(ENV)
                .stdin(Stdio::null())
                .stdout(slave)
                .stderr(err)
                // Out of the terminal's process group: a ^C is ours, not
                // systemd's (which would start ctrl-alt-del.target).
                .process_group(0)
                .spawn()
        });
        // (The Command, with our end of the console, is gone: the reader
        // sees the end once systemd's side has closed it.)
        let child = match spawned {
            Ok(c) => c,
            Err(e) => {
                let _ = std::fs::remove_dir(&cgroup);
                return Err(format!("starting unshare: {e}"));
            }
        };
        let mut sd = Systemd {
            child,
            pid: 0,
            cgroup,
            stage,
            reader: Some(reader),
            stopped: false,
        };
        if let Err(e) = sd.wait_ready() {
            sd.stop();
            return Err(format!(
                "systemd did not boot: {e}\n--- end of its log ---\n{}",
                tail(&sd.log(), 40)
            ));
        }
        Ok(sd)
    }

    /// Finds systemd (the only child of `unshare`) and polls
    /// `systemctl is-system-running` until it answers running or
    /// degraded.
    fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        let children = format!("/proc/{0}/task/{0}/children", self.child.id());
        let mut last = String::from("no answer yet");
        loop {
            if let Some(status) = self.child.try_wait().map_err(|e| e.to_string())? {
                return Err(format!("it exited ({status})"));
            }
            if Instant::now() > deadline {
                return Err(format!(
                    "no answer within {BOOT_TIMEOUT:?}; systemctl is-system-running: {last}"
                ));
            }
            if self.pid == 0 {
                self.pid = std::fs::read_to_string(&children)
                    .ok()
                    .and_then(|c| c.split_whitespace().next()?.parse().ok())
                    .unwrap_or(0);
            }
            // Its namespaces are complete once the setup has exec'd it;
            // it answers once it has made its socket (each systemctl
            // costs ~1 s under TCG).
            let booted = self.pid != 0
                && std::fs::read_link(format!("/proc/{}/exe", self.pid))
                    .is_ok_and(|e| e.ends_with("systemd/systemd"))
                && Path::new(&format!("/proc/{}/root/run/systemd/private", self.pid)).exists();
            if booted {
                let mut c = self.command("systemctl");
                c.arg("is-system-running")
                    .stdin(Stdio::null())
                    .stdout(Stdio::piped())
                    .stderr(Stdio::piped());
                let left = deadline.saturating_duration_since(Instant::now());
                let limit = left.min(Duration::from_secs(15));
                if let Some(f) = c.spawn().ok().and_then(|c| finish(c, limit)) {
                    let state = String::from_utf8_lossy(&f.stdout).trim().to_string();
                    if state == "running" || state == "degraded" {
                        return Ok(());
                    }
                    last = format!("{state} {}", String::from_utf8_lossy(&f.stderr).trim());
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A command that runs `program` in systemd's namespaces (`nsenter
    /// --mount --pid --cgroup --uts`), so that it sees systemd's `/run`,
    /// tmpfs and cgroup tree, in a cgroup of its own below systemd's root
    /// (`/krun-test-commands` in there), from which systemd can move it
    /// into a unit. It starts in systemd's `/` whatever `current_dir`
    /// says (entering a mount namespace resets the working directory).
    pub fn command(&self, program: impl AsRef<OsStr>) -> Command {
        let dir = self.cgroup.join(COMMANDS);
        let procs = CString::new(dir.join("cgroup.procs").as_os_str().as_bytes()).unwrap();
        let dir = CString::new(dir.as_os_str().as_bytes()).unwrap();
        let mut c = Command::new("nsenter");
        c.arg(format!("--target={}", self.pid))
            .args(["--mount", "--pid", "--cgroup", "--uts", "--"])
            .arg(program);
        let hook = move || -> std::io::Result<()> {
            // SAFETY: mkdir, open, write and close are async-signal-safe;
            // the paths were allocated before the fork. The cgroup exists
            // once made (EEXIST), unless systemd removed it.
            unsafe { libc::mkdir(dir.as_ptr(), 0o755) };
            // SAFETY: as above.
            let fd = unsafe { libc::open(procs.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            // SAFETY: as above; writes 1 byte of a static ("0": the writer).
            let n = unsafe { libc::write(fd, b"0".as_ptr().cast(), 1) };
            let err = std::io::Error::last_os_error();
            // SAFETY: as above; `fd` is ours.
            unsafe { libc::close(fd) };
            if n == 1 {
                Ok(())
            } else {
                Err(err)
            }
        };
        // SAFETY: the hook only makes system calls that are safe between
        // fork and exec (see inside) and allocates nothing.
        unsafe { c.pre_exec(hook) };
        c
    }

    /// systemd's PID, in our PID namespace.
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// systemd's cgroup as the host sees it (its `/sys/fs/cgroup`): a unit
    /// `/machine.slice/x.scope` in there is this folder's
    /// `machine.slice/x.scope`.
    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    /// Everything systemd has logged so far (and the setup before it).
    pub fn log(&self) -> String {
        let log = std::fs::read(self.stage.path().join("log")).unwrap_or_default();
        String::from_utf8_lossy(&log).into_owned()
    }
}

impl Drop for Systemd {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Systemd {
    /// Kills systemd and everything in its namespaces, waits for the end of
    /// its log and removes its cgroups; once.
    fn stop(&mut self) {
        if std::mem::replace(&mut self.stopped, true) {
            return;
        }
        if self.pid != 0 {
            // SAFETY: kill has no memory effects.
            unsafe { libc::kill(self.pid, libc::SIGKILL) };
        } else {
            // Not found yet: unshare's --kill-child ends it.
            let _ = self.child.kill();
        }
        // unshare ends once every process of the namespace has.
        if wait_timeout(&mut self.child, Duration::from_secs(20)).is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if let Some(r) = self.reader.take() {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !r.is_finished() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            if r.is_finished() {
                let _ = r.join();
            }
        }
        if let Err(left) = remove_tree(&self.cgroup, Duration::from_secs(10)) {
            eprintln!(
                "krun-e2e: systemd's cgroups are left: {left:?}\n--- end of its log ---\n{}",
                tail(&self.log(), 20)
            );
        }
    }
}

/// A pseudo-terminal for systemd's console (systemd logs only to a
/// terminal): our end, the path of the other and the other opened.
fn console() -> std::io::Result<(File, PathBuf, OwnedFd)> {
    // SAFETY: posix_openpt has no memory effects; the descriptor it
    // returns is ours.
    let fd = unsafe { libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: `fd` is open and nothing else owns it.
    let master = unsafe { File::from_raw_fd(fd) };
    // SAFETY: grantpt and unlockpt only act on the descriptor.
    if unsafe { libc::grantpt(fd) } != 0 || unsafe { libc::unlockpt(fd) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut name = [0 as libc::c_char; 128];
    // SAFETY: ptsname_r writes at most `name.len()` bytes into `name`.
    let r = unsafe { libc::ptsname_r(fd, name.as_mut_ptr(), name.len()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    // SAFETY: ptsname_r succeeded, so `name` holds a NUL-terminated string.
    let path = PathBuf::from(OsStr::from_bytes(
        unsafe { CStr::from_ptr(name.as_ptr()) }.to_bytes(),
    ));
    let slave = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_NOCTTY)
        .open(&path)?;
    Ok((master, path, slave.into()))
}

/// A thread that copies what the console's other end gets written into
/// `log`, without the terminal's carriage returns, until no process has
/// that end open any more.
fn copy_console(mut master: File, mut log: File) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 8192];
        loop {
            match master.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    let text: Vec<u8> = buf[..n].iter().copied().filter(|b| *b != b'\r').collect();
                    let _ = log.write_all(&text);
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // EIO: the other end is closed everywhere.
                Err(_) => break,
            }
        }
    })
}

/// A temporary folder of ours for systemd: `fstab` (see [`fstab`]),
/// `etc-systemd`, its `/etc/systemd` (`system/`: its [`UNITS`] and the
/// [`MASKED`] ones, its whole unit path; an empty `no-generators/`, its
/// generator paths; a `system.conf` that sends services' output nowhere,
/// since no journald runs), `machine-id`, a copy of the host's bound over
/// `/etc/machine-id`, and `log`, what it writes on its console.
fn stage(console: &Path, shared: &[PathBuf]) -> Result<tempfile::TempDir, String> {
    let made = (|| -> std::io::Result<tempfile::TempDir> {
        let dir = tempfile::Builder::new()
            .prefix("krun-test-systemd-")
            .tempdir()?;
        let etc = dir.path().join("etc-systemd");
        let system = etc.join("system");
        std::fs::create_dir_all(&system)?;
        for (name, description) in UNITS {
            std::fs::write(
                system.join(name),
                format!("[Unit]\nDescription={description}\nDefaultDependencies=no\n"),
            )?;
        }
        for name in MASKED {
            std::os::unix::fs::symlink("/dev/null", system.join(name))?;
        }
        std::fs::create_dir(etc.join("no-generators"))?;
        std::fs::write(
            etc.join("system.conf"),
            "[Manager]\nDefaultStandardOutput=null\n",
        )?;
        std::fs::write(dir.path().join("fstab"), fstab(console, dir.path(), shared))?;
        Ok(dir)
    })();
    let dir = made.map_err(|e| format!("writing systemd's configuration: {e}"))?;
    let id = std::fs::read("/etc/machine-id")
        .map_err(|e| format!("systemd needs the host's /etc/machine-id: {e}"))?;
    std::fs::write(dir.path().join("machine-id"), id)
        .map_err(|e| format!("writing systemd's configuration: {e}"))?;
    Ok(dir)
}

/// The mounts of systemd's mount namespace, in order, for one `mount
/// --all` in its cgroup namespace (mount skips an entry whose source is
/// already mounted at its target, hence names of our own as the sources).
/// A covered folder that the host lacks is left alone, never created;
/// `X-mount.mkdir` only creates folders on a tmpfs of ours.
fn fstab(console: &Path, stage: &Path, shared: &[PathBuf]) -> String {
    let mut t = String::new();
    let mut add = |source: &Path, target: &Path, fstype: &str, options: &str| {
        t.push_str(&format!(
            "{} {} {fstype} {options} 0 0\n",
            fstab_field(source),
            fstab_field(target)
        ));
    };
    let p = Path::new;
    // What it logs, and its configuration.
    add(console, p("/dev/console"), "none", "bind");
    add(
        &stage.join("etc-systemd"),
        p("/etc/systemd"),
        "none",
        "bind",
    );
    add(
        &stage.join("machine-id"),
        p("/etc/machine-id"),
        "none",
        "bind",
    );
    // Its /run, where the shared folders below a covered one wait while
    // that is covered.
    let tmpfs = "mode=0755,nosuid,nodev";
    add(p("krun-systemd-run"), p("/run"), "tmpfs", tmpfs);
    let hidden: Vec<(PathBuf, PathBuf)> = shared
        .iter()
        .filter(|s| COVERED.iter().any(|c| s.starts_with(c)))
        .enumerate()
        .map(|(i, s)| (s.clone(), Path::new("/run/krun-shared").join(i.to_string())))
        .collect();
    for (folder, waiting) in &hidden {
        add(folder, waiting, "none", "rbind,X-mount.mkdir");
    }
    for c in COVERED.iter().filter(|c| Path::new(c).is_dir()) {
        let (name, mode) = match *c {
            "/tmp" | "/var/tmp" => ("krun-systemd-tmp", "mode=1777,nosuid,nodev"),
            _ => ("krun-systemd-state", tmpfs),
        };
        add(p(name), p(c), "tmpfs", mode);
    }
    for (folder, waiting) in &hidden {
        add(waiting, folder, "none", "rbind,X-mount.mkdir");
    }
    // Its cgroup2, rooted at its cgroup (the root of the cgroup namespace
    // mount runs in), over the host's: on a tmpfs between them, since the
    // kernel refuses a file system mounted again right on its own root.
    add(
        p("krun-systemd-cgroup-cover"),
        p(cgroups::ROOT),
        "tmpfs",
        tmpfs,
    );
    add(
        p("krun-systemd-cgroup"),
        p(cgroups::ROOT),
        "cgroup2",
        "nosuid,nodev,noexec",
    );
    t
}

/// `p` as an fstab field: space, tab, newline and backslash in octal.
fn fstab_field(p: &Path) -> String {
    let mut out = String::new();
    for &b in p.as_os_str().as_bytes() {
        match b {
            b' ' | b'\t' | b'\n' | b'\\' => out.push_str(&format!("\\{b:03o}")),
            _ => out.push(b as char),
        }
    }
    out
}

/// Whether this host can run a systemd of its own: root, cgroup2 with
/// controllers.
fn check_host() -> Result<(), String> {
    // SAFETY: geteuid has no memory effects.
    if unsafe { libc::geteuid() } != 0 {
        return Err("booting a systemd for a test needs root".into());
    }
    let controllers = std::fs::read_to_string(Path::new(cgroups::ROOT).join("cgroup.controllers"))
        .unwrap_or_default();
    if !cgroups::is_v2() || controllers.trim().is_empty() {
        return Err(format!(
            "booting a systemd for a test needs a cgroup2 {} with controllers (the nested test \
             host has one: run the test there with hack/nested); this host's is {}",
            cgroups::ROOT,
            if cgroups::is_v2() {
                "cgroup2 without controllers"
            } else {
                "cgroup v1 or hybrid"
            }
        ));
    }
    Ok(())
}

/// `p` made absolute, when systemd can be given it: an existing folder,
/// neither /tmp nor /var/tmp themselves (that would hand it the host's)
/// nor in its own state (`/run`, `/var/lib/systemd`, ...). Only one below
/// /tmp or /var/tmp needs sharing; any other shows anyway.
fn check_shared(p: &Path) -> Result<PathBuf, String> {
    let abs = p
        .canonicalize()
        .map_err(|e| format!("shared folder {}: {e}", p.display()))?;
    if !abs.is_dir() {
        return Err(format!("shared folder {}: not a folder", p.display()));
    }
    let own = [
        "/run",
        "/etc/systemd",
        "/var/lib/systemd",
        "/var/log/journal",
    ];
    if abs == Path::new("/tmp")
        || abs == Path::new("/var/tmp")
        || own.iter().any(|o| abs.starts_with(o))
    {
        return Err(format!(
            "shared folder {}: systemd has its own /tmp, /var/tmp, {}",
            abs.display(),
            own.join(", ")
        ));
    }
    Ok(abs)
}

/// Every controller of the root cgroup enabled for its children, so that
/// systemd's cgroup has them to hand down to its units.
fn enable_controllers() -> Result<(), String> {
    let root = Path::new(cgroups::ROOT);
    let all = std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
    let on = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    for c in all.split_whitespace() {
        if !on.split_whitespace().any(|o| o == c) {
            // One at a time: one the kernel refuses (cpu, with a realtime
            // task in a child cgroup) must not keep the others off.
            let _ = std::fs::write(root.join("cgroup.subtree_control"), format!("+{c}"));
        }
    }
    let on = std::fs::read_to_string(root.join("cgroup.subtree_control")).unwrap_or_default();
    for needed in ["memory", "pids"] {
        if !on.split_whitespace().any(|o| o == needed) {
            return Err(format!(
                "cannot enable the {needed} controller for the root cgroup's children ({} \
                 has {on:?})",
                root.join("cgroup.subtree_control").display()
            ));
        }
    }
    Ok(())
}

/// Removes cgroup `dir` and every cgroup below it, deepest first, retrying
/// for `timeout` (a cgroup whose last task has just exited may still be
/// busy); the folders left, if any.
fn remove_tree(dir: &Path, timeout: Duration) -> Result<(), Vec<PathBuf>> {
    fn below(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                below(&e.path(), out);
            }
        }
        out.push(dir.to_path_buf());
    }
    let deadline = Instant::now() + timeout;
    loop {
        let mut dirs = Vec::new();
        if dir.exists() {
            below(dir, &mut dirs);
        }
        dirs.retain(|d| std::fs::remove_dir(d).is_err());
        if dirs.is_empty() {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(dirs);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
