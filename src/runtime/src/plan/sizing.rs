//! How big the VM is: vCPUs and memory from the bundle's resources, or from
//! annotations that override them.

use std::collections::HashMap;

use krun_proto::CgroupSetup;
use oci_spec::runtime::Spec;

use super::Problems;

/// Annotation that sets the VM's vCPU count.
pub const ANNOTATION_VCPUS: &str = "io.krun-oci.vcpus";
/// Annotation that sets the VM's memory in MiB (the whole VM, kernel included).
pub const ANNOTATION_MEMORY_MIB: &str = "io.krun-oci.memory_mib";
/// What containerd's CRI tells a pod's sandbox about the whole pod.
pub const CRI_SANDBOX_MEMORY: &str = "io.kubernetes.cri.sandbox-memory";
pub const CRI_SANDBOX_CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CRI_SANDBOX_CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
/// VM memory when the bundle sets no memory limit. Guest RAM is only backed
/// by host memory as the guest touches it.
pub const DEFAULT_MEMORY_MIB: u64 = 512;
/// Memory the VM gets beyond the container's limit, for the guest kernel and
/// guest-init, so that the workload can use all of its limit.
pub const GUEST_OVERHEAD_MIB: u64 = 64;
/// The smallest VM the guest kernel boots in.
const MIN_VM_MIB: u64 = 64;
/// The smallest memory limit accepted (as runc and crun do).
const MIN_LIMIT_BYTES: i64 = 6 << 20;

/// What the host offers, for bounds checks.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostInfo {
    pub cpus: u32,
    pub memory_mib: u64,
    /// This machine's hostname: a container whose spec names none sees it,
    /// as it would under runc (a new UTS namespace starts with the host's).
    pub hostname: String,
    /// The runtime's own bounding capability set (`CapBnd`, bit N for
    /// capability N): the most an engine running beside it can give a
    /// container, which is what `--privileged` gives.
    pub capabilities: u64,
}

impl HostInfo {
    /// This machine's CPUs, memory and hostname, and this process's
    /// bounding capability set.
    pub fn detect() -> HostInfo {
        let cpus = std::thread::available_parallelism()
            .map(|n| n.get() as u32)
            .unwrap_or(1);
        let memory_mib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|m| {
                m.lines().find_map(|l| {
                    l.strip_prefix("MemTotal:")
                        .map(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
                })
            })
            .flatten()
            .map(|kb| kb / 1024)
            .unwrap_or(1024);
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .unwrap_or_default();
        let capabilities = std::fs::read_to_string("/proc/self/status")
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("CapBnd:")
                        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
                })
            })
            .unwrap_or(u64::MAX);
        HostInfo {
            cpus,
            memory_mib,
            hostname,
            capabilities,
        }
    }
}

fn annotation<'a>(spec: &'a Spec, key: &str) -> Option<&'a String> {
    spec.annotations()
        .as_ref()
        .and_then(|a: &HashMap<String, String>| a.get(key))
}

fn parse_annotation(spec: &Spec, key: &str, problems: &mut Problems) -> Option<u64> {
    let v = annotation(spec, key)?;
    match v.trim().parse::<u64>() {
        Ok(n) => Some(n),
        Err(_) => {
            problems.add(
                format!("annotations[{key:?}]"),
                format!("{v:?} is not a whole number"),
            );
            None
        }
    }
}

/// Counts the CPUs in a cpuset list such as "0-3,8".
fn cpuset_count(list: &str) -> Option<u32> {
    let mut n = 0u32;
    for part in list.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (u32, u32) = (a.trim().parse().ok()?, b.trim().parse().ok()?);
                if b < a {
                    return None;
                }
                // A list that counts past u32 is no cpuset (found by the
                // plan fuzz target: "0-4294967295" overflowed).
                n = n.checked_add((b - a).checked_add(1)?)?;
            }
            None => {
                part.parse::<u32>().ok()?;
                n = n.checked_add(1)?;
            }
        }
    }
    (n > 0).then_some(n)
}

/// runc's conversion of cgroup v1 cpu.shares to v2 cpu.weight.
pub(crate) fn shares_to_weight(shares: u64) -> u64 {
    if shares == 0 {
        return 100;
    }
    1 + ((shares.clamp(2, 262144) - 2) * 9999) / 262142
}

pub(super) fn plan_sizing(
    spec: &Spec,
    host: &HostInfo,
    problems: &mut Problems,
) -> (u32, u64, CgroupSetup) {
    let mut cgroup = CgroupSetup::default();
    let resources = spec.linux().as_ref().and_then(|l| l.resources().as_ref());

    // Memory: the container's limit is enforced by a cgroup inside the
    // guest; the VM gets that much plus room for the guest kernel.
    let mut memory_mib = DEFAULT_MEMORY_MIB;
    if let Some(limit) = resources
        .and_then(|r| r.memory().as_ref())
        .and_then(|m| m.limit())
    {
        if limit > 0 {
            if limit < MIN_LIMIT_BYTES {
                problems.add(
                    "linux.resources.memory.limit",
                    format!("{limit} bytes is below the minimum of 6 MiB"),
                );
            } else {
                let limit_mib = (limit as u64).div_ceil(1 << 20);
                memory_mib = (limit_mib + GUEST_OVERHEAD_MIB).max(MIN_VM_MIB);
                if memory_mib > host.memory_mib {
                    problems.add(
                        "linux.resources.memory.limit",
                        format!("{limit_mib} MiB plus {GUEST_OVERHEAD_MIB} MiB for the guest kernel exceeds the host's {} MiB", host.memory_mib),
                    );
                }
                cgroup.memory_max = Some(limit as u64);
            }
        }
    }
    // A Kubernetes pod's sandbox: the CRI passes the sum of the pod's
    // containers' limits; the pod's VM gets that plus the guest's room.
    if let Some(m) = parse_annotation(spec, CRI_SANDBOX_MEMORY, problems).filter(|m| *m > 0) {
        memory_mib = (m.div_ceil(1 << 20) + GUEST_OVERHEAD_MIB)
            .max(MIN_VM_MIB)
            .min(host.memory_mib);
    }
    if let Some(m) = parse_annotation(spec, ANNOTATION_MEMORY_MIB, problems) {
        if m < MIN_VM_MIB {
            problems.add(
                format!("annotations[{ANNOTATION_MEMORY_MIB:?}]"),
                format!("{m} MiB is below the minimum of {MIN_VM_MIB} MiB"),
            );
        } else if m > host.memory_mib {
            problems.add(
                format!("annotations[{ANNOTATION_MEMORY_MIB:?}]"),
                format!("{m} MiB exceeds the host's {} MiB", host.memory_mib),
            );
        } else {
            memory_mib = m;
        }
    }

    // vCPUs: enough to carry the CPU quota, or the cpuset's size.
    let mut vcpus = 1;
    if let Some(cpu) = resources.and_then(|r| r.cpu().as_ref()) {
        let quota = cpu.quota().filter(|q| *q > 0);
        let period = cpu.period().filter(|p| *p > 0).unwrap_or(100_000);
        if let Some(q) = quota {
            vcpus = (q as u64).div_ceil(period).clamp(1, host.cpus as u64) as u32;
            cgroup.cpu_max = Some((q, period));
        } else if let Some(set) = cpu.cpus().as_ref().filter(|s| !s.trim().is_empty()) {
            match cpuset_count(set) {
                Some(n) => vcpus = n.min(host.cpus),
                None => problems.add(
                    "linux.resources.cpu.cpus",
                    format!("{set:?} is not a CPU list"),
                ),
            }
        }
        if let Some(shares) = cpu.shares() {
            cgroup.cpu_weight = Some(shares_to_weight(shares));
        }
    }
    if let Some(q) = parse_annotation(spec, CRI_SANDBOX_CPU_QUOTA, problems).filter(|q| *q > 0) {
        let period = parse_annotation(spec, CRI_SANDBOX_CPU_PERIOD, problems)
            .filter(|p| *p > 0)
            .unwrap_or(100_000);
        vcpus = q.div_ceil(period).clamp(1, host.cpus as u64) as u32;
    }
    if let Some(v) = parse_annotation(spec, ANNOTATION_VCPUS, problems) {
        if v == 0 {
            problems.add(
                format!("annotations[{ANNOTATION_VCPUS:?}]"),
                "a VM needs at least one vCPU",
            );
        } else if v > host.cpus as u64 {
            problems.add(
                format!("annotations[{ANNOTATION_VCPUS:?}]"),
                format!("{v} vCPUs exceed the host's {} CPUs", host.cpus),
            );
        } else {
            vcpus = v as u32;
        }
    }

    if let Some(pids) = resources.and_then(|r| r.pids().as_ref()) {
        if pids.limit() > 0 {
            cgroup.pids_max = Some(pids.limit());
        }
    }
    (vcpus, memory_mib, cgroup)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpusets_are_counted() {
        assert_eq!(cpuset_count("0-3,8"), Some(5));
        assert_eq!(cpuset_count("2"), Some(1));
        assert_eq!(cpuset_count("3-1"), None);
        assert_eq!(cpuset_count("x"), None);
        assert_eq!(cpuset_count("0-4294967295"), None);
        assert_eq!(cpuset_count("0-4294967294,7"), None);
        assert_eq!(cpuset_count("0-4294967294"), Some(u32::MAX));
    }

    #[test]
    fn shares_map_like_runc() {
        assert_eq!(shares_to_weight(1024), 39);
        assert_eq!(shares_to_weight(2), 1);
        assert_eq!(shares_to_weight(262144), 10000);
    }
}
