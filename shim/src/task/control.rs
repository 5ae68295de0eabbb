//! The calls that act on a running task: `kill`, `pause`/`resume`,
//! `resize_pty`, `close_io` and `update`.

use containerd_shim::protos::events::task::{TaskPaused, TaskResumed};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_oci::api::Request;
use krun_proto::CgroupSetup;

use super::state::Phase;
use super::tasks::{Container, Tasks};
use crate::pod::Role;
use crate::rpc::rpc_error;

/// The guest cgroup limits in `update`'s resources (OCI LinuxResources as
/// JSON): memory, CPU quota and pids.
fn limits(bytes: &[u8]) -> TtrpcResult<CgroupSetup> {
    let r: oci_spec::runtime::LinuxResources = serde_json::from_slice(bytes)
        .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("update: resources: {e}")))?;
    let mut limits = CgroupSetup::default();
    if let Some(m) = r.memory() {
        limits.memory_max = m.limit().filter(|l| *l > 0).map(|l| l as u64);
    }
    if let Some(cpu) = r.cpu() {
        if let Some(q) = cpu.quota() {
            limits.cpu_max = Some((q, cpu.period().unwrap_or(100_000)));
        }
    }
    if let Some(p) = r.pids() {
        limits.pids_max = Some(p.limit());
    }
    Ok(limits)
}

/// A terminal size as the guest takes it (rows, columns).
fn clamp(n: u32) -> u16 {
    n.min(u16::MAX as u32) as u16
}

impl Tasks {
    pub fn kill(&self, id: &str, exec_id: &str, signal: i32, all: bool) -> TtrpcResult<()> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            if c.lock().phase == Phase::Stopped {
                return Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("container {id}: process already finished"),
                ));
            }
            c.call(Request::Kill {
                signal,
                all,
                stream: c.stream,
            })?;
            return Ok(());
        }
        let stream = c.lock().running_exec_stream(exec_id)?;
        c.call(Request::SignalExec { stream, signal })?;
        Ok(())
    }

    pub fn pause(&self, id: &str, pause: bool) -> TtrpcResult<()> {
        let c = self.get(id)?;
        c.call(match (&c.role, pause) {
            // One container of a pod's VM: its processes freeze in the
            // guest, the VM runs on.
            (Role::Member(_), frozen) => Request::Freeze {
                stream: c.stream,
                frozen,
            },
            (_, true) => Request::Pause,
            (_, false) => Request::Resume,
        })?;
        c.lock().phase = if pause { Phase::Paused } else { Phase::Running };
        if pause {
            self.publish(
                topics::TASK_PAUSED_EVENT_TOPIC,
                Box::new(TaskPaused {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        } else {
            self.publish(
                topics::TASK_RESUMED_EVENT_TOPIC,
                Box::new(TaskResumed {
                    container_id: id.to_string(),
                    ..Default::default()
                }),
            );
        }
        Ok(())
    }

    /// The stream of the task's main process, or of one of its execs.
    fn stream_of(c: &Container, exec_id: &str) -> TtrpcResult<u32> {
        if exec_id.is_empty() {
            return Ok(c.stream);
        }
        c.lock().exec_stream(exec_id)
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let stream = Self::stream_of(&c, exec_id)?;
        c.call(Request::Resize {
            stream,
            rows: clamp(rows),
            cols: clamp(cols),
        })?;
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let stream = Self::stream_of(&c, exec_id)?;
        c.call(Request::CloseStdin { stream })?;
        Ok(())
    }

    pub fn update(&self, id: &str, resources: Option<&[u8]>) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let Some(bytes) = resources else {
            return Ok(());
        };
        c.call(Request::Update {
            limits: limits(bytes)?,
            stream: c.stream,
        })?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status_of;

    #[test]
    fn update_takes_memory_cpu_and_pids() {
        let l = limits(
            br#"{"memory": {"limit": 268435456}, "cpu": {"quota": 50000}, "pids": {"limit": 64}}"#,
        )
        .unwrap();
        assert_eq!(l.memory_max, Some(256 << 20));
        assert_eq!(l.cpu_max, Some((50_000, 100_000)));
        assert_eq!(l.pids_max, Some(64));
        let l = limits(br#"{"memory": {"limit": -1}, "cpu": {"quota": 1, "period": 10}}"#).unwrap();
        assert_eq!(
            (l.memory_max, l.cpu_max, l.pids_max),
            (None, Some((1, 10)), None)
        );
        assert_eq!(limits(b"{}").unwrap(), CgroupSetup::default());
    }

    #[test]
    fn update_refuses_what_is_not_resources() {
        let e = limits(b"[1]").unwrap_err();
        let (code, message) = status_of(&e);
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert!(message.starts_with("update: resources: "));
    }

    #[test]
    fn a_terminal_size_is_clamped() {
        assert_eq!(clamp(24), 24);
        assert_eq!(clamp(70_000), u16::MAX);
    }
}
