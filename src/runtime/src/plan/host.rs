//! The limits of the container's host side (its cgroup on the host, see
//! [`crate::cgroups`]), planned beside the guest's:
//!
//! - memory: the VM's memory plus [`HOST_OVERHEAD_MIB`], what the host
//!   processes need beyond guest RAM (QEMU's TCG code buffers and its own
//!   heap, virtiofsd, the monitor), measured and given a margin. Always
//!   set, so the host side stays bounded even when the bundle sets no
//!   limit: the guest can never touch more than the VM's memory, so the
//!   host limit only catches the host processes themselves growing;
//! - CPU: `linux.resources.cpu` quota, period and shares as they are, so
//!   `--cpus 0.5` holds the VM's vCPU threads (and the helpers) to half a
//!   host CPU, as runc holds a container's processes;
//! - cpuset: `linux.resources.cpu.cpus`/`mems`, the host CPUs the VM runs
//!   on (its vCPU count is sized from them, see `sizing`);
//! - pids: [`HOST_PIDS_MAX`] tasks, sized for the host side's threads;
//!   the spec's `pids.limit` is the workload's, applied in the guest.

use oci_spec::runtime::Spec;

use crate::cgroups::HostResources;

/// Host memory for a container beyond its VM's memory, in MiB. Measured
/// (`memory.max_usage_in_bytes` of the host cgroup) for a busybox
/// container under QEMU/TCG, the heavier backend: see the README's
/// "Host cgroups" for the numbers; the rest is margin.
pub const HOST_OVERHEAD_MIB: u64 = 256;

/// Tasks (processes and threads) the host side of a container may have:
/// QEMU's (a thread per vCPU, its I/O and RCU threads and worker pool),
/// virtiofsd's three processes and thread pool, the monitor's threads, or
/// the built-in VMM's process (vCPU and per-device threads); a few dozen in
/// practice.
pub const HOST_PIDS_MAX: i64 = 512;

/// The host side's limits for a VM of `memory_mib` from `spec`.
pub(super) fn plan_host(spec: &Spec, memory_mib: u64) -> HostResources {
    let cpu = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.cpu().as_ref());
    let nonempty = |s: &Option<String>| s.clone().filter(|s| !s.trim().is_empty());
    HostResources {
        memory_limit: Some((memory_mib + HOST_OVERHEAD_MIB) << 20),
        cpu_shares: cpu.and_then(|c| c.shares()).filter(|s| *s > 0),
        cpu_quota: cpu.and_then(|c| c.quota()).filter(|q| *q > 0),
        cpu_period: cpu.and_then(|c| c.period()).filter(|p| *p > 0),
        cpuset_cpus: cpu.and_then(|c| nonempty(c.cpus())),
        cpuset_mems: cpu.and_then(|c| nonempty(c.mems())),
        pids_max: Some(HOST_PIDS_MAX),
    }
}
