//! `start`: the task's main process, which its VM holds at the exec until
//! now (or, in a pod's VM, the member container's); or one of its execs.

use std::sync::Arc;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskExecStarted, TaskStart};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_oci::api::{Request, Response};

use super::state::Phase;
use super::stdio::fds;
use super::tasks::{exit_code, Container, Tasks};
use crate::pod::Role;
use crate::rpc::{rpc_error, timestamp};

fn started(pid: u32) -> api::StartResponse {
    api::StartResponse {
        pid,
        ..Default::default()
    }
}

impl Tasks {
    pub fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> TtrpcResult<api::StartResponse> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            self.start_main(&c)
        } else {
            self.start_exec(&c, exec_id)
        }
    }

    fn start_main(&self, c: &Container) -> TtrpcResult<api::StartResponse> {
        c.lock().check_startable(&c.id)?;
        if c.stream == krun_proto::MAIN_STREAM {
            c.call(Request::Start)?;
        } else {
            c.call(Request::StartContainer { stream: c.stream })?;
        }
        c.lock().phase = Phase::Running;
        let pid = std::process::id();
        self.publish(
            topics::TASK_START_EVENT_TOPIC,
            Box::new(TaskStart {
                container_id: c.id.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(started(pid))
    }

    fn start_exec(
        self: &Arc<Self>,
        c: &Container,
        exec_id: &str,
    ) -> TtrpcResult<api::StartResponse> {
        let (process, stdio) = c.lock().exec_to_start(exec_id)?;
        let fds = fds(&stdio)?;
        let container = matches!(c.role, Role::Member(_)).then(|| c.id.clone());
        let replies = c.send(Request::Exec { process, container }, fds)?;
        let (stream, pid) = match replies.recv() {
            Ok(Response::Started { stream, pid }) => (stream, pid as u32),
            Ok(Response::Error { code, message }) => {
                // As runc does: the exec "ran" and exited with the status a
                // shell would give (127 for a missing program).
                c.update(|inner| inner.exec_exited(exec_id, code as u32, timestamp()));
                return Err(rpc_error(Code::FAILED_PRECONDITION, message));
            }
            _ => return Err(c.gone()),
        };
        c.lock().exec_started(exec_id, stream, pid);
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: c.id.clone(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            }),
        );
        // Wait for its end on a thread of its own.
        let tasks = self.clone();
        let (cid, eid) = (c.id.clone(), exec_id.to_string());
        let _ = std::thread::Builder::new()
            .name(format!("exec-{exec_id}"))
            .spawn(move || tasks.publish_exit(&cid, &eid, pid, exit_code(&replies)));
        Ok(started(pid))
    }
}
