//! The host's cgroups as tests look at them: where a task is in each
//! mounted hierarchy (from `/proc/PID/cgroup` and our mountinfo), every
//! task (process and thread) of a process tree, and the cgroup
//! directories with a given name, however deep.

use std::path::{Path, PathBuf};

/// The cgroup file system's root.
pub const ROOT: &str = "/sys/fs/cgroup";

/// Whether `/sys/fs/cgroup` is a cgroup2 mount (else v1 or hybrid).
pub fn is_v2() -> bool {
    mounts()
        .iter()
        .any(|(point, fstype, _)| point == ROOT && fstype == "cgroup2")
}

/// The cgroup mounts below (or at) `/sys/fs/cgroup`: (mount point, fstype,
/// super options).
fn mounts() -> Vec<(String, String, Vec<String>)> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    text.lines()
        .filter_map(|l| {
            let (before, after) = l.split_once(" - ")?;
            let point = before.split(' ').nth(4)?.to_string();
            let mut rest = after.split(' ');
            let fstype = rest.next()?.to_string();
            let opts = rest.nth(1)?.split(',').map(String::from).collect();
            (point.starts_with(ROOT) && fstype.starts_with("cgroup"))
                .then_some((point, fstype, opts))
        })
        .collect()
}

/// The cgroup directory of each hierarchy line of `cgroup_file` (a
/// `/proc/PID/cgroup` or `/proc/PID/task/TID/cgroup`): (the line, the
/// directory). None when the task is gone.
pub fn dirs_of(cgroup_file: &Path) -> Option<Vec<(String, PathBuf)>> {
    let text = std::fs::read_to_string(cgroup_file).ok()?;
    let mounts = mounts();
    let mut out = Vec::new();
    for line in text.lines() {
        let mut parts = line.splitn(3, ':');
        let (_, ctls, path) = (parts.next()?, parts.next()?, parts.next()?);
        let mount = mounts.iter().find(|(_, fstype, opts)| {
            if ctls.is_empty() {
                fstype == "cgroup2"
            } else {
                fstype == "cgroup" && ctls.split(',').all(|c| opts.iter().any(|o| o == c))
            }
        });
        if let Some((point, _, _)) = mount {
            out.push((
                line.to_string(),
                Path::new(point).join(path.trim_start_matches('/')),
            ));
        }
    }
    Some(out)
}

/// Process `pid`'s cgroup in hierarchy `controller` (v2: the one), as
/// `/proc/PID/cgroup` writes it.
pub fn path_of(pid: i32, controller: &str) -> String {
    let text = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap();
    let v2 = is_v2();
    text.lines()
        .find_map(|l| {
            let mut parts = l.splitn(3, ':');
            let (_, ctls, path) = (parts.next()?, parts.next()?, parts.next()?);
            let hit = if v2 {
                ctls.is_empty()
            } else {
                ctls.split(',').any(|c| c == controller)
            };
            hit.then(|| path.to_string())
        })
        .unwrap_or_else(|| panic!("{pid} has no {controller} cgroup: {text}"))
}

/// The `/proc/PID/task/TID/cgroup` file of every thread of `pid` and of
/// every process below it.
pub fn task_files(pid: i32) -> Vec<PathBuf> {
    let mut pids = vec![pid];
    pids.extend(crate::process::descendants(pid));
    let mut out = Vec::new();
    for p in pids {
        let Ok(rd) = std::fs::read_dir(format!("/proc/{p}/task")) else {
            continue;
        };
        for t in rd.flatten() {
            out.push(t.path().join("cgroup"));
        }
    }
    out
}

/// Cgroup directories named `name`, in any hierarchy, up to six levels
/// below `/sys/fs/cgroup`.
pub fn named(name: &str) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, name: &str, out: &mut Vec<PathBuf>) {
        let Ok(rd) = std::fs::read_dir(dir) else {
            return;
        };
        for e in rd.flatten() {
            if !e.file_type().map(|t| t.is_dir()).unwrap_or(false) {
                continue;
            }
            if e.file_name().to_str() == Some(name) {
                out.push(e.path());
            } else if depth > 0 {
                walk(&e.path(), depth - 1, name, out);
            }
        }
    }
    let mut out = Vec::new();
    walk(Path::new(ROOT), 6, name, &mut out);
    out
}

/// A cgroup file's number (`max` and v1's huge "unlimited" are None).
pub fn number(file: &Path) -> Option<u64> {
    let text =
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("reading {}: {e}", file.display()));
    text.trim().parse().ok().filter(|n| *n < 1 << 62)
}

/// The directory of hierarchy `controller` (`memory`, `cpu`, ...) for
/// cgroup `path` (as `/proc/PID/cgroup` writes it).
pub fn dir(controller: &str, path: &str) -> PathBuf {
    let rel = path.trim_start_matches('/');
    if is_v2() {
        return Path::new(ROOT).join(rel);
    }
    let (point, _, _) = mounts()
        .into_iter()
        .find(|(_, fstype, opts)| fstype == "cgroup" && opts.iter().any(|o| o == controller))
        .unwrap_or_else(|| panic!("no {controller} hierarchy is mounted"));
    Path::new(&point).join(rel)
}

/// The memory limit of cgroup `path` in bytes (None: unlimited).
pub fn memory_limit(path: &str) -> Option<u64> {
    if is_v2() {
        number(&dir("memory", path).join("memory.max"))
    } else {
        number(&dir("memory", path).join("memory.limit_in_bytes"))
    }
}

/// The CPU quota and period of cgroup `path` in microseconds (quota None:
/// unlimited).
pub fn cpu_quota(path: &str) -> (Option<u64>, u64) {
    if is_v2() {
        let text = std::fs::read_to_string(dir("cpu", path).join("cpu.max")).unwrap();
        let mut parts = text.split_whitespace();
        let quota = parts.next().and_then(|q| q.parse().ok());
        (quota, parts.next().unwrap().parse().unwrap())
    } else {
        let d = dir("cpu", path);
        let quota = std::fs::read_to_string(d.join("cpu.cfs_quota_us")).unwrap();
        let quota = quota.trim().parse::<i64>().unwrap();
        let period = number(&d.join("cpu.cfs_period_us")).unwrap();
        ((quota > 0).then_some(quota as u64), period)
    }
}

/// The CPU time used by cgroup `path`, in nanoseconds.
pub fn cpu_usage_ns(path: &str) -> u64 {
    if is_v2() {
        let stat = std::fs::read_to_string(dir("cpu", path).join("cpu.stat")).unwrap();
        let usec: u64 = stat
            .lines()
            .find_map(|l| l.strip_prefix("usage_usec "))
            .unwrap()
            .parse()
            .unwrap();
        usec * 1000
    } else {
        number(&dir("cpuacct", path).join("cpuacct.usage")).unwrap()
    }
}

/// Removes the cgroups named `.0` when dropped, so that a failed test
/// leaves none for the next (a passing one has checked there are none).
pub struct Cleanup(pub String);

impl Drop for Cleanup {
    fn drop(&mut self) {
        for _ in 0..20 {
            let left = named(&self.0);
            if left.is_empty() {
                return;
            }
            for d in left {
                let _ = std::fs::remove_dir(d);
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Removes the empty cgroup `path` and each of its empty ancestors, in
/// every hierarchy: what kubelet removes after a pod (the pod's cgroup
/// and the `kubepods` ones it made for it); what is not empty stays.
pub fn remove_with_ancestors(path: &str) {
    for (point, _, _) in mounts() {
        let mut rel = Path::new(path.trim_start_matches('/'));
        while !rel.as_os_str().is_empty() {
            if std::fs::remove_dir(Path::new(&point).join(rel)).is_err() {
                break;
            }
            rel = rel.parent().unwrap_or(Path::new(""));
        }
    }
}
