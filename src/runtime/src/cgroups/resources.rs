//! The files that carry [`HostResources`] and usage, per cgroup version,
//! written in runc's order (cpuset, memory, cpu, pids) and named in every
//! error.

use std::path::Path;

use nix::errno::Errno;

use super::beneath::Beneath;
use super::{CgroupError, CgroupPath, CgroupStats, HostResources};
use crate::plan::shares_to_weight;

/// v1: a new cpuset cgroup has empty `cpuset.cpus`/`mems` and refuses
/// tasks until they are set; copy them down from the parent (runc's
/// `cpusetEnsureParent`).
pub(super) fn cpuset_copy_down(b: &Beneath, dir: &Path) -> Result<(), CgroupError> {
    let parent = dir.parent().unwrap_or(Path::new(""));
    for file in ["cpuset.cpus", "cpuset.mems"] {
        if b.read(&dir.join(file))?.is_empty() {
            let value = b.read(&parent.join(file))?;
            b.write(&dir.join(file), &value)?;
        }
    }
    Ok(())
}

/// v2: the controllers we set made available to `parent`'s children.
pub(super) fn enable_controllers(b: &Beneath, parent: &Path) -> Result<(), CgroupError> {
    let available = b.read(&parent.join("cgroup.controllers"))?;
    let file = parent.join("cgroup.subtree_control");
    let enabled = b.read(&file)?;
    for c in ["cpu", "memory", "pids", "cpuset"] {
        let has = |list: &str| list.split_whitespace().any(|x| x == c);
        if has(&available) && !has(&enabled) {
            b.write(&file, &format!("+{c}"))?;
        }
    }
    Ok(())
}

fn limit(v: i64) -> String {
    if v > 0 {
        v.to_string()
    } else {
        "max".into()
    }
}

pub(super) fn set_v1(b: &Beneath, h: &CgroupPath, r: &HostResources) -> Result<(), CgroupError> {
    let f = |name: &str| h.path.join(name);
    if h.has("cpuset") {
        if let Some(cpus) = &r.cpuset_cpus {
            b.write(&f("cpuset.cpus"), cpus)?;
        }
        if let Some(mems) = &r.cpuset_mems {
            b.write(&f("cpuset.mems"), mems)?;
        }
    }
    if let (true, Some(bytes)) = (h.has("memory"), r.memory_limit) {
        set_memory_v1(b, h, bytes)?;
    }
    if h.has("cpu") {
        set_cpu_v1(b, h, r)?;
    }
    if let (true, Some(max)) = (h.has("pids"), r.pids_max) {
        b.write(&f("pids.max"), &limit(max))?;
    }
    Ok(())
}

fn set_memory_v1(b: &Beneath, h: &CgroupPath, bytes: u64) -> Result<(), CgroupError> {
    let file = h.path.join("memory.limit_in_bytes");
    match b.write(&file, &bytes.to_string()) {
        Err(CgroupError::Write { source, .. })
            if source.raw_os_error() == Some(Errno::EBUSY as i32) =>
        {
            let read = |n: &str| b.read(&h.path.join(n)).unwrap_or_default();
            Err(CgroupError::MemoryBusy {
                limit: bytes,
                usage: read("memory.usage_in_bytes"),
                peak: read("memory.max_usage_in_bytes"),
            })
        }
        other => other,
    }
}

fn set_cpu_v1(b: &Beneath, h: &CgroupPath, r: &HostResources) -> Result<(), CgroupError> {
    let f = |name: &str| h.path.join(name);
    if let Some(shares) = r.cpu_shares {
        b.write(&f("cpu.shares"), &shares.to_string())?;
    }
    let quota = r.cpu_quota.map(|q| if q > 0 { q } else { -1 }.to_string());
    let Some(period) = r.cpu_period.filter(|p| *p > 0) else {
        return quota.map_or(Ok(()), |q| b.write(&f("cpu.cfs_quota_us"), &q));
    };
    // A shorter period than the current quota allows is refused until the
    // quota is written (runc's cpu.go).
    match (
        b.write(&f("cpu.cfs_period_us"), &period.to_string()),
        &quota,
    ) {
        (Ok(()), Some(q)) => b.write(&f("cpu.cfs_quota_us"), q),
        (Ok(()), None) => Ok(()),
        (Err(_), Some(q)) => {
            b.write(&f("cpu.cfs_quota_us"), q)?;
            b.write(&f("cpu.cfs_period_us"), &period.to_string())
        }
        (Err(e), None) => Err(e),
    }
}

pub(super) fn set_v2(b: &Beneath, dir: &Path, r: &HostResources) -> Result<(), CgroupError> {
    let f = |name: &str| dir.join(name);
    if let Some(cpus) = &r.cpuset_cpus {
        b.write(&f("cpuset.cpus"), cpus)?;
    }
    if let Some(mems) = &r.cpuset_mems {
        b.write(&f("cpuset.mems"), mems)?;
    }
    if let Some(bytes) = r.memory_limit {
        b.write(&f("memory.max"), &bytes.to_string())?;
    }
    if let Some(shares) = r.cpu_shares {
        b.write(&f("cpu.weight"), &shares_to_weight(shares).to_string())?;
    }
    if r.cpu_quota.is_some() || r.cpu_period.is_some() {
        // Keep the half of cpu.max not being changed.
        let now = b.read(&f("cpu.max"))?;
        let mut parts = now.split_whitespace();
        let (old_quota, old_period) = (parts.next().unwrap_or("max"), parts.next());
        let quota = r.cpu_quota.map_or(old_quota.to_string(), limit);
        let period = r
            .cpu_period
            .filter(|p| *p > 0)
            .map(|p| p.to_string())
            .or(old_period.map(String::from))
            .unwrap_or_else(|| "100000".into());
        b.write(&f("cpu.max"), &format!("{quota} {period}"))?;
    }
    if let Some(max) = r.pids_max {
        b.write(&f("pids.max"), &limit(max))?;
    }
    Ok(())
}

fn number(b: &Beneath, file: &Path) -> Option<u64> {
    b.read(file).ok()?.parse().ok()
}

pub(super) fn read_stats(b: &Beneath, h: &CgroupPath, v2: bool, s: &mut CgroupStats) {
    let f = |name: &str| h.path.join(name);
    if v2 {
        s.memory_usage = number(b, &f("memory.current"));
        s.memory_limit = number(b, &f("memory.max"));
        s.memory_max_usage = number(b, &f("memory.peak"));
        s.cpu_usage_ns = b.read(&f("cpu.stat")).ok().and_then(|stat| {
            let line = stat.lines().find(|l| l.starts_with("usage_usec "))?;
            line["usage_usec ".len()..]
                .parse::<u64>()
                .ok()?
                .checked_mul(1000)
        });
        s.pids = number(b, &f("pids.current"));
        return;
    }
    if h.has("memory") {
        s.memory_usage = number(b, &f("memory.usage_in_bytes"));
        // v1 spells "no limit" as a huge page-rounded number.
        s.memory_limit = number(b, &f("memory.limit_in_bytes")).filter(|l| *l < 1 << 62);
        s.memory_max_usage = number(b, &f("memory.max_usage_in_bytes"));
    }
    if h.has("cpuacct") {
        s.cpu_usage_ns = number(b, &f("cpuacct.usage"));
    }
    if h.has("pids") {
        s.pids = number(b, &f("pids.current"));
    }
}
