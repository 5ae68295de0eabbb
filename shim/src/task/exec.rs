//! `exec`: a further process for a running task, recorded here until its
//! `start` runs it in the VM.

use containerd_shim::api;
use containerd_shim::protos::events::task::TaskExecAdded;
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_proto::ProcessSetup;

use super::state::{Exec, Stdio};
use super::tasks::Tasks;
use crate::rpc::rpc_error;

/// The process an exec request describes, as the guest runs it.
fn process_of(req: &api::ExecProcessRequest) -> TtrpcResult<ProcessSetup> {
    let spec = req
        .spec
        .as_ref()
        .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
    let process: oci_spec::runtime::Process = serde_json::from_slice(&spec.value).map_err(|e| {
        rpc_error(
            Code::INVALID_ARGUMENT,
            format!("exec {}: the process spec is not valid: {e}", req.exec_id),
        )
    })?;
    let mut process = krun_oci::plan::exec_process(&process)
        .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
    process.terminal = req.terminal;
    Ok(process)
}

impl Tasks {
    pub fn exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<()> {
        let c = self.get(&req.id)?;
        let process = process_of(&req)?;
        let stdio = Stdio {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
        };
        c.lock()
            .add_exec(&req.id, &req.exec_id, Exec::new(process, stdio))?;
        self.publish(
            topics::TASK_EXEC_ADDED_EVENT_TOPIC,
            Box::new(TaskExecAdded {
                container_id: req.id.clone(),
                exec_id: req.exec_id.clone(),
                ..Default::default()
            }),
        );
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status_of;
    use containerd_shim::protos::protobuf::well_known_types::any::Any;
    use containerd_shim::protos::protobuf::MessageField;

    fn request(spec: Option<&str>, terminal: bool) -> api::ExecProcessRequest {
        api::ExecProcessRequest {
            id: "c1".into(),
            exec_id: "e1".into(),
            terminal,
            spec: MessageField::from(spec.map(|s| Any {
                value: s.as_bytes().to_vec(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    #[test]
    fn an_exec_needs_a_valid_process_spec() {
        let e = process_of(&request(None, false)).unwrap_err();
        assert_eq!(
            status_of(&e),
            (
                Code::INVALID_ARGUMENT,
                "exec without a process spec".to_string()
            )
        );
        let e = process_of(&request(Some("{"), false)).unwrap_err();
        let (code, message) = status_of(&e);
        assert_eq!(code, Code::INVALID_ARGUMENT);
        assert!(message.starts_with("exec e1: the process spec is not valid: "));
    }

    #[test]
    fn the_requests_terminal_flag_wins() {
        let spec = r#"{"cwd": "/", "args": ["sh"], "user": {"uid": 0, "gid": 0}}"#;
        let p = process_of(&request(Some(spec), true)).unwrap();
        assert_eq!(p.args, ["sh"]);
        assert!(p.terminal);
        let p = process_of(&request(Some(spec), false)).unwrap();
        assert!(!p.terminal);
    }
}
