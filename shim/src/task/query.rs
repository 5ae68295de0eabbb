//! The calls that read a task: `state`, `wait`, `pids` and `stats`.

use containerd_shim::api;
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_oci::api::{Request, Response};

use super::tasks::Tasks;
use crate::pod::Role;
use crate::rpc::rpc_error;

/// Resource use as the guest reports it, as cgroup v2 metrics.
fn metrics(stats: &krun_proto::CgroupStats) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids_current,
            limit: stats.pids_limit,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: stats.cpu_usage_usec,
            user_usec: stats.cpu_user_usec,
            system_usec: stats.cpu_system_usec,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: stats.memory_usage,
            usage_limit: stats.memory_limit,
            anon: stats.memory_anon,
            file: stats.memory_file,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What a pod's VM costs the host (its host cgroup: the monitor, the VMM,
/// QEMU, virtiofsd, guest RAM as the guest touched it), as cgroup v2
/// metrics: the sandbox task's, which the CRI reads for the pod as a whole.
fn host_metrics(stats: &krun_oci::cgroups::CgroupStats) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat {
            current: stats.pids.unwrap_or(0),
            limit: krun_oci::plan::HOST_PIDS_MAX as u64,
            ..Default::default()
        }),
        cpu: MessageField::some(CPUStat {
            usage_usec: stats.cpu_usage_ns.unwrap_or(0) / 1000,
            ..Default::default()
        }),
        memory: MessageField::some(MemoryStat {
            usage: stats.memory_usage.unwrap_or(0),
            usage_limit: stats.memory_limit.unwrap_or(u64::MAX),
            max_usage: stats.memory_max_usage.unwrap_or(0),
            ..Default::default()
        }),
        ..Default::default()
    }
}

impl Tasks {
    pub fn state(&self, id: &str, exec_id: &str) -> TtrpcResult<api::StateResponse> {
        let c = self.get(id)?;
        let inner = c.lock();
        let mut r = api::StateResponse {
            id: id.to_string(),
            bundle: c.bundle.display().to_string(),
            ..Default::default()
        };
        let (phase, exited, stdio, pid) = if exec_id.is_empty() {
            (
                inner.phase,
                inner.exited.clone(),
                &c.stdio,
                std::process::id(),
            )
        } else {
            let e = inner.exec(exec_id)?;
            r.exec_id = exec_id.to_string();
            (e.phase, e.exited.clone(), &e.stdio, e.pid)
        };
        r.pid = pid;
        r.status = phase.status().into();
        r.stdin = stdio.stdin.clone();
        r.stdout = stdio.stdout.clone();
        r.stderr = stdio.stderr.clone();
        r.terminal = stdio.terminal;
        if let Some(x) = exited {
            r.exit_status = x.code;
            r.exited_at = MessageField::some(x.at);
        }
        Ok(r)
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> TtrpcResult<api::WaitResponse> {
        let c = self.get(id)?;
        let mut inner = c.lock();
        loop {
            let exited = if exec_id.is_empty() {
                inner.exited.clone()
            } else {
                inner.exec(exec_id)?.exited.clone()
            };
            if let Some(x) = exited {
                return Ok(api::WaitResponse {
                    exit_status: x.code,
                    exited_at: MessageField::some(x.at),
                    ..Default::default()
                });
            }
            inner = c.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
    }

    pub fn pids(&self, id: &str) -> TtrpcResult<api::PidsResponse> {
        let c = self.get(id)?;
        let processes = match c.call(Request::Ps { stream: c.stream })? {
            Response::Processes { processes } => processes,
            _ => Vec::new(),
        };
        let processes = processes
            .into_iter()
            .map(|p| containerd_shim::protos::types::task::ProcessInfo {
                pid: p.pid as u32,
                ..Default::default()
            })
            .collect();
        Ok(api::PidsResponse {
            processes,
            ..Default::default()
        })
    }

    /// Resource use from the container's cgroup inside the VM, as cgroup v2
    /// metrics (what `ctr task metrics` and the CRI's stats read).
    /// A container's resource use in its VM (the guest's cgroup of it);
    /// for a pod's sandbox, what the pod's VM costs the host (its host
    /// cgroup). So the containers' stats are their own and the pod's are
    /// the VM's: both sides.
    pub fn stats(&self, id: &str) -> TtrpcResult<api::StatsResponse> {
        let c = self.get(id)?;
        let m = match (&c.role, &c.cgroup) {
            (Role::Sandbox, Some(cg)) => host_metrics(&cg.stats()),
            _ => {
                let Response::Stats { stats } = c.call(Request::Stats { stream: c.stream })? else {
                    return Err(rpc_error(Code::INTERNAL, "no stats from the guest"));
                };
                metrics(&stats)
            }
        };
        let value = m
            .write_to_bytes()
            .map_err(|e| rpc_error(Code::INTERNAL, e.to_string()))?;
        let any = Any {
            type_url: "io.containerd.cgroups.v2.Metrics".to_string(),
            value,
            ..Default::default()
        };
        Ok(api::StatsResponse {
            stats: MessageField::some(any),
            ..Default::default()
        })
    }
}
