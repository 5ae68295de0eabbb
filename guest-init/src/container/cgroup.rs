//! The container's cgroup in the guest: its limits, its device program
//! (see [`super::device_program`]), what it has used, its processes and
//! its OOM kills.

use std::fs::{self, File};
use std::io::{Read, Seek};
use std::os::fd::{AsRawFd, RawFd};
use std::path::{Path, PathBuf};

use krun_proto::{CgroupSetup, CgroupStats, DeviceRule};

use super::device_program;
use crate::failure::{Failure, OrFail};
use crate::sys;

/// Where the cgroup of container `id` is.
fn dir_for(id: &str) -> PathBuf {
    let name: String = id
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    Path::new("/sys/fs/cgroup").join(format!("krun-{name}"))
}

/// The container's cgroup in the guest, with the bundle's limits and, when
/// it has device rules, their program, before any process joins it.
pub fn create(
    id: &str,
    limits: &CgroupSetup,
    device_rules: Option<&[DeviceRule]>,
) -> Result<PathBuf, Failure> {
    let dir = dir_for(id);
    fs::create_dir_all(&dir).or_fail(|| format!("creating cgroup {}", dir.display()))?;
    apply_limits(&dir, limits)?;
    if let Some(rules) = device_rules {
        restrict_devices(&dir, rules)?;
    }
    Ok(dir)
}

/// Attaches the program of `rules` to the cgroup at `dir`. It stays while
/// the cgroup does: `update` leaves device rules as they are, as runc's
/// does.
fn restrict_devices(dir: &Path, rules: &[DeviceRule]) -> Result<(), Failure> {
    let rules = device_program::rules(rules).map_err(|e| Failure::new(1, e))?;
    let insns: Vec<[u8; 8]> = device_program::program(&rules)
        .iter()
        .map(|i| i.encode())
        .collect();
    let prog = sys::load_device_program(&insns)
        .or_fail(|| "loading the container's device cgroup program".into())?;
    let cgroup = File::open(dir).or_fail(|| format!("opening cgroup {}", dir.display()))?;
    sys::attach_device_program(&cgroup, &prog)
        .or_fail(|| "attaching the device program to the container's cgroup".into())
}

/// Moves this process into the cgroup at `dir`.
pub fn join(dir: &Path) -> Result<(), Failure> {
    fs::write(dir.join("cgroup.procs"), "0").or_fail(|| "joining the container's cgroup".into())
}

/// How long a freeze may take to reach every process (one in the middle
/// of a system call stops at its end).
const FREEZE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// Freezes (or thaws) the cgroup at `dir` and everything below it, and
/// waits until `cgroup.events` says it is so; a freeze that does not take
/// within [`FREEZE_WAIT`] is undone and fails.
pub fn freeze(dir: &Path, frozen: bool) -> Result<(), Failure> {
    let set = |on: bool| {
        fs::write(dir.join("cgroup.freeze"), if on { "1" } else { "0" })
            .or_fail(|| "writing the container's cgroup.freeze".into())
    };
    set(frozen)?;
    let want = if frozen { "frozen 1" } else { "frozen 0" };
    let deadline = std::time::Instant::now() + FREEZE_WAIT;
    loop {
        let events = fs::read_to_string(dir.join("cgroup.events"))
            .or_fail(|| "reading the container's cgroup.events".into())?;
        if events.lines().any(|l| l == want) {
            return Ok(());
        }
        if std::time::Instant::now() >= deadline {
            if frozen {
                let _ = set(false);
            }
            return Err(Failure::new(
                1,
                format!(
                    "the container's processes did not {} within {FREEZE_WAIT:?}",
                    if frozen { "freeze" } else { "thaw" }
                ),
            ));
        }
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

/// Removes the cgroup once its processes are gone.
pub fn remove(dir: &Path) {
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
}

/// Writes `limits` into the cgroup at `dir`; limits left unset are kept.
pub fn apply_limits(dir: &Path, limits: &CgroupSetup) -> Result<(), Failure> {
    let set = |file: &str, value: String| {
        fs::write(dir.join(file), &value)
            .or_fail(|| format!("setting {file} to {value} in the guest's cgroup"))
    };
    if let Some(m) = limits.memory_max {
        set("memory.max", m.to_string())?;
        // No swap in the guest; say so explicitly for kernels that have it.
        let _ = fs::write(dir.join("memory.swap.max"), "0");
    }
    if let Some(p) = limits.pids_max {
        set(
            "pids.max",
            if p < 0 {
                "max".to_string()
            } else {
                p.to_string()
            },
        )?;
    }
    if let Some((quota, period)) = limits.cpu_max {
        let q = if quota < 0 {
            "max".to_string()
        } else {
            quota.to_string()
        };
        set("cpu.max", format!("{q} {period}"))?;
    }
    if let Some(w) = limits.cpu_weight {
        set("cpu.weight", w.to_string())?;
    }
    Ok(())
}

/// What the processes in the cgroup at `dir` have used.
pub fn stats(dir: &Path) -> CgroupStats {
    let read = |f: &str| fs::read_to_string(dir.join(f)).unwrap_or_default();
    let keyed = |text: &str, key: &str| -> u64 {
        text.lines()
            .find_map(|l| l.strip_prefix(key).and_then(|v| v.strip_prefix(' ')))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let num = |f: &str, unlimited: u64| -> u64 {
        let t = read(f);
        let t = t.trim();
        if t == "max" {
            unlimited
        } else {
            t.parse().unwrap_or(0)
        }
    };
    let cpu = read("cpu.stat");
    let mem = read("memory.stat");
    CgroupStats {
        cpu_usage_usec: keyed(&cpu, "usage_usec"),
        cpu_user_usec: keyed(&cpu, "user_usec"),
        cpu_system_usec: keyed(&cpu, "system_usec"),
        memory_usage: num("memory.current", 0),
        memory_limit: num("memory.max", u64::MAX),
        memory_anon: keyed(&mem, "anon"),
        memory_file: keyed(&mem, "file"),
        pids_current: num("pids.current", 0),
        pids_limit: num("pids.max", 0),
    }
}

/// The pids of the processes in the cgroup at `dir` (none if it cannot be
/// read).
pub fn pids(dir: &Path) -> Vec<i32> {
    let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
    procs
        .lines()
        .filter_map(|l| l.trim().parse::<i32>().ok())
        .collect()
}

/// The cgroup's memory.events, which the kernel marks (POLLPRI) when they
/// change, and the OOM kills counted so far.
pub struct OomEvents {
    events: Option<File>,
    kills: u64,
}

impl OomEvents {
    /// Watches the cgroup at `dir` (which may lack a memory controller:
    /// then there is nothing to watch).
    pub fn open(dir: &Path) -> OomEvents {
        OomEvents {
            events: File::open(dir.join("memory.events")).ok(),
            kills: 0,
        }
    }

    pub fn fd(&self) -> Option<RawFd> {
        self.events.as_ref().map(|f| f.as_raw_fd())
    }

    /// True when the kernel OOM-killed something in the cgroup since the
    /// last call.
    pub fn new_kills(&mut self) -> bool {
        let Some(f) = self.events.as_mut() else {
            return false;
        };
        let mut text = String::new();
        if f.rewind().is_err() || f.read_to_string(&mut text).is_err() {
            return false;
        }
        let kills = text
            .lines()
            .find_map(|l| l.strip_prefix("oom_kill "))
            .and_then(|n| n.trim().parse().ok())
            .unwrap_or(0);
        let new = kills > self.kills;
        self.kills = kills;
        new
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(dir: &Path, file: &str) -> String {
        fs::read_to_string(dir.join(file)).unwrap()
    }

    #[test]
    fn a_cgroup_is_named_after_its_container() {
        assert_eq!(
            dir_for("pod/a b.1-x_y"),
            Path::new("/sys/fs/cgroup/krun-pod_a_b.1-x_y")
        );
    }

    #[test]
    fn limits_are_written_and_unset_ones_kept() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        fs::write(d.join("cpu.weight"), "100").unwrap();
        let limits = CgroupSetup {
            memory_max: Some(64 << 20),
            pids_max: Some(-1),
            cpu_max: Some((-1, 100_000)),
            cpu_weight: None,
        };
        apply_limits(d, &limits).unwrap();
        assert_eq!(read(d, "memory.max"), "67108864");
        assert_eq!(read(d, "memory.swap.max"), "0");
        assert_eq!(read(d, "pids.max"), "max");
        assert_eq!(read(d, "cpu.max"), "max 100000");
        assert_eq!(read(d, "cpu.weight"), "100");
        let limits = CgroupSetup {
            pids_max: Some(32),
            cpu_max: Some((50_000, 100_000)),
            ..limits
        };
        apply_limits(d, &limits).unwrap();
        assert_eq!(read(d, "pids.max"), "32");
        assert_eq!(read(d, "cpu.max"), "50000 100000");
        let gone = CgroupSetup {
            cpu_weight: Some(5),
            ..Default::default()
        };
        let f = apply_limits(&d.join("missing"), &gone).unwrap_err();
        assert!(f
            .message
            .starts_with("setting cpu.weight to 5 in the guest's cgroup: "));
    }

    #[test]
    fn stats_read_keys_and_max() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        for (file, text) in [
            ("cpu.stat", "usage_usec 30\nuser_usec 20\nsystem_usec 10\n"),
            ("memory.stat", "anon_thp 9\nanon 4096\nfile 8192\n"),
            ("memory.current", "12288\n"),
            ("memory.max", "max\n"),
            ("pids.current", "3\n"),
            ("pids.max", "max\n"),
        ] {
            fs::write(d.join(file), text).unwrap();
        }
        let s = stats(d);
        assert_eq!(
            (s.cpu_usage_usec, s.cpu_user_usec, s.cpu_system_usec),
            (30, 20, 10)
        );
        assert_eq!((s.memory_anon, s.memory_file), (4096, 8192));
        assert_eq!((s.memory_usage, s.memory_limit), (12288, u64::MAX));
        assert_eq!((s.pids_current, s.pids_limit), (3, 0));
        fs::write(d.join("memory.max"), "1048576\n").unwrap();
        assert_eq!(stats(d).memory_limit, 1 << 20);
        assert_eq!(stats(&d.join("missing")), CgroupStats::default());
    }

    #[test]
    fn pids_are_listed() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("cgroup.procs"), "12\n7\n").unwrap();
        assert_eq!(pids(dir.path()), [12, 7]);
        assert!(pids(&dir.path().join("missing")).is_empty());
    }

    #[test]
    fn only_new_oom_kills_count() {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("memory.events");
        fs::write(&events, "low 0\nhigh 0\nmax 0\noom 0\noom_kill 0\n").unwrap();
        let mut oom = OomEvents::open(dir.path());
        assert!(oom.fd().is_some());
        assert!(!oom.new_kills());
        fs::write(&events, "oom 2\noom_kill 2\n").unwrap();
        assert!(oom.new_kills());
        assert!(!oom.new_kills());
        let mut none = OomEvents::open(&dir.path().join("missing"));
        assert!(none.fd().is_none() && !none.new_kills());
    }
}
