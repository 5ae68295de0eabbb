//! What the shim knows of a task and its exec processes, and what each
//! event does to it: plain data and the rules that change it, with no
//! VM, monitor or ttrpc connection behind them, so they are tested alone.

use std::collections::HashMap;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_proto::ProcessSetup;

use crate::rpc::{rpc_error, timestamp};

/// The status of a process that the guest's end took with it.
pub const KILLED: u32 = 128 + libc::SIGKILL as u32;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Phase {
    pub fn status(self) -> api::Status {
        match self {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
    }
}

/// How and when a process ended.
#[derive(Clone, Debug, PartialEq)]
pub struct Exited {
    pub code: u32,
    pub at: Timestamp,
}

/// The stdio paths containerd gave a process (FIFOs, or empty for none).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stdio {
    pub stdin: String,
    pub stdout: String,
    pub stderr: String,
    pub terminal: bool,
}

/// An exec process: added, then started in the VM, then ended.
#[derive(Debug)]
pub struct Exec {
    pub process: Box<ProcessSetup>,
    pub stdio: Stdio,
    /// Its stream in the VM, once started.
    pub stream: Option<u32>,
    pub pid: u32,
    pub phase: Phase,
    pub exited: Option<Exited>,
}

impl Exec {
    /// An exec as `exec` adds it: not started yet.
    pub fn new(process: ProcessSetup, stdio: Stdio) -> Exec {
        Exec {
            process: Box::new(process),
            stdio,
            stream: None,
            pid: 0,
            phase: Phase::Created,
            exited: None,
        }
    }

    fn end(&mut self, code: u32, at: Timestamp) {
        self.phase = Phase::Stopped;
        self.exited = Some(Exited { code, at });
    }
}

/// What `delete` of a task does, by where the task is.
#[derive(Debug, PartialEq, Eq)]
pub enum Teardown {
    /// It has ended: only what it leaves behind goes.
    Ended,
    /// Never started, with a VM of its own: the VM is shut down, as runc's
    /// shim takes down a task never started.
    ShutDownVm,
    /// Never started, in a pod's VM: its process is killed, and waited for.
    KillAndWait,
}

/// The changing part of a task: its main process's and its execs'.
pub struct Inner {
    pub phase: Phase,
    pub exited: Option<Exited>,
    pub execs: HashMap<String, Exec>,
}

impl Default for Inner {
    fn default() -> Inner {
        Inner {
            phase: Phase::Created,
            exited: None,
            execs: HashMap::new(),
        }
    }
}

fn exec_not_found(exec_id: &str) -> containerd_shim::protos::ttrpc::Error {
    rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found"))
}

impl Inner {
    pub fn exec(&self, exec_id: &str) -> TtrpcResult<&Exec> {
        self.execs
            .get(exec_id)
            .ok_or_else(|| exec_not_found(exec_id))
    }

    /// `start` of the main process: only a created task starts.
    pub fn check_startable(&self, id: &str) -> TtrpcResult<()> {
        if self.phase != Phase::Created {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {id} is not created"),
            ));
        }
        Ok(())
    }

    /// `exec`: a new exec id in a task that has not stopped.
    pub fn add_exec(&mut self, id: &str, exec_id: &str, exec: Exec) -> TtrpcResult<()> {
        if self.phase == Phase::Stopped {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {id} is stopped"),
            ));
        }
        if self.execs.contains_key(exec_id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("exec {exec_id} already exists"),
            ));
        }
        self.execs.insert(exec_id.to_string(), exec);
        Ok(())
    }

    /// `start` of an exec: what to run and its stdio, if it was not
    /// started before.
    pub fn exec_to_start(&self, exec_id: &str) -> TtrpcResult<(Box<ProcessSetup>, Stdio)> {
        let e = self.exec(exec_id)?;
        if e.phase != Phase::Created {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("exec {exec_id} was already started"),
            ));
        }
        Ok((e.process.clone(), e.stdio.clone()))
    }

    /// The exec runs in the VM as `stream`.
    pub fn exec_started(&mut self, exec_id: &str, stream: u32, pid: u32) {
        if let Some(e) = self.execs.get_mut(exec_id) {
            e.stream = Some(stream);
            e.pid = pid;
            e.phase = Phase::Running;
        }
    }

    /// The exec ended (or, as runc has it, "ran" and failed to start).
    pub fn exec_exited(&mut self, exec_id: &str, code: u32, at: Timestamp) {
        if let Some(e) = self.execs.get_mut(exec_id) {
            e.end(code, at);
        }
    }

    /// The task's main process ended (or its VM died): the execs still
    /// running in it went with it; those never started stay as they are.
    pub fn exited(&mut self, code: u32, at: Timestamp) {
        self.phase = Phase::Stopped;
        self.exited = Some(Exited {
            code,
            at: at.clone(),
        });
        for e in self.execs.values_mut() {
            if e.exited.is_none() && e.stream.is_some() {
                e.end(KILLED, at.clone());
            }
        }
    }

    /// The stream a signal for an exec goes to, while it runs.
    pub fn running_exec_stream(&self, exec_id: &str) -> TtrpcResult<u32> {
        let e = self.exec(exec_id)?;
        match (e.stream, e.phase) {
            (Some(s), Phase::Running) => Ok(s),
            _ => Err(rpc_error(
                Code::NOT_FOUND,
                format!("exec {exec_id}: process already finished"),
            )),
        }
    }

    /// The stream of a started exec (for its terminal and stdin).
    pub fn exec_stream(&self, exec_id: &str) -> TtrpcResult<u32> {
        self.execs
            .get(exec_id)
            .and_then(|e| e.stream)
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} is not running")))
    }

    /// `delete` of an exec that is not running: it is forgotten, and its
    /// pid and end are reported (a never-started exec "exited" 0 now).
    pub fn remove_exec(&mut self, exec_id: &str) -> TtrpcResult<(u32, Exited)> {
        if self.exec(exec_id)?.phase == Phase::Running {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("exec {exec_id} is still running"),
            ));
        }
        let e = self.execs.remove(exec_id).expect("looked up above");
        let x = e.exited.unwrap_or(Exited {
            code: 0,
            at: timestamp(),
        });
        Ok((e.pid, x))
    }

    /// What `delete` of the task does; a running or paused task is not
    /// deleted.
    pub fn teardown(&self, id: &str, own_vm: bool) -> TtrpcResult<Teardown> {
        match self.phase {
            Phase::Stopped => Ok(Teardown::Ended),
            Phase::Created if own_vm => Ok(Teardown::ShutDownVm),
            Phase::Created => Ok(Teardown::KillAndWait),
            _ => Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {id} is still running"),
            )),
        }
    }

    /// How the task ended, for `delete`: killed now, if nothing said so.
    pub fn end(&self) -> Exited {
        self.exited.clone().unwrap_or(Exited {
            code: KILLED,
            at: timestamp(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rpc::status_of;

    fn at(seconds: i64) -> Timestamp {
        let mut t = Timestamp::new();
        t.seconds = seconds;
        t
    }

    fn exec() -> Exec {
        Exec::new(ProcessSetup::default(), Stdio::default())
    }

    /// A task with execs "new" (added), "run" (started as stream 3) and
    /// "done" (started as stream 4, exited 2).
    fn task() -> Inner {
        let mut t = Inner::default();
        for id in ["new", "run", "done"] {
            t.add_exec("c1", id, exec()).unwrap();
        }
        t.exec_started("run", 3, 30);
        t.exec_started("done", 4, 40);
        t.exec_exited("done", 2, at(5));
        t
    }

    fn code(r: TtrpcResult<impl std::fmt::Debug>) -> Code {
        status_of(&r.unwrap_err()).0
    }

    #[test]
    fn phases_are_containerds_statuses() {
        assert_eq!(Phase::Created.status(), api::Status::CREATED);
        assert_eq!(Phase::Running.status(), api::Status::RUNNING);
        assert_eq!(Phase::Paused.status(), api::Status::PAUSED);
        assert_eq!(Phase::Stopped.status(), api::Status::STOPPED);
    }

    #[test]
    fn only_a_created_task_starts() {
        let mut t = Inner::default();
        t.check_startable("c1").unwrap();
        for phase in [Phase::Running, Phase::Paused, Phase::Stopped] {
            t.phase = phase;
            assert_eq!(code(t.check_startable("c1")), Code::FAILED_PRECONDITION);
        }
    }

    #[test]
    fn exec_ids_are_unique_and_a_stopped_task_takes_none() {
        let mut t = task();
        assert_eq!(code(t.add_exec("c1", "run", exec())), Code::ALREADY_EXISTS);
        assert_eq!(code(t.exec("nope")), Code::NOT_FOUND);
        t.exited(0, at(9));
        let e = t.add_exec("c1", "late", exec()).unwrap_err();
        assert_eq!(
            status_of(&e),
            (
                Code::FAILED_PRECONDITION,
                "container c1 is stopped".to_string()
            )
        );
        assert!(!t.execs.contains_key("late"));
    }

    #[test]
    fn an_exec_starts_once() {
        let mut t = task();
        let (_, stdio) = t.exec_to_start("new").unwrap();
        assert_eq!(stdio, Stdio::default());
        assert_eq!(code(t.exec_to_start("run")), Code::FAILED_PRECONDITION);
        assert_eq!(code(t.exec_to_start("nope")), Code::NOT_FOUND);
        t.exec_started("new", 7, 70);
        let e = t.exec("new").unwrap();
        assert_eq!((e.stream, e.pid, e.phase), (Some(7), 70, Phase::Running));
    }

    #[test]
    fn the_tasks_end_ends_its_running_execs_only() {
        let mut t = task();
        t.exited(1, at(9));
        assert_eq!(t.phase, Phase::Stopped);
        assert_eq!(t.exited, Some(Exited { code: 1, at: at(9) }));
        let run = t.exec("run").unwrap();
        assert_eq!(run.phase, Phase::Stopped);
        assert_eq!(
            run.exited,
            Some(Exited {
                code: KILLED,
                at: at(9)
            })
        );
        let done = t.exec("done").unwrap();
        assert_eq!(done.exited, Some(Exited { code: 2, at: at(5) }));
        let new = t.exec("new").unwrap();
        assert_eq!((new.phase, new.exited.clone()), (Phase::Created, None));
    }

    #[test]
    fn signals_go_to_running_execs_only() {
        let t = task();
        assert_eq!(t.running_exec_stream("run").unwrap(), 3);
        assert_eq!(code(t.running_exec_stream("new")), Code::NOT_FOUND);
        assert_eq!(code(t.running_exec_stream("done")), Code::NOT_FOUND);
        assert_eq!(code(t.running_exec_stream("nope")), Code::NOT_FOUND);
        // Its terminal and stdin stay addressable once it has a stream.
        assert_eq!(t.exec_stream("done").unwrap(), 4);
        assert_eq!(code(t.exec_stream("new")), Code::NOT_FOUND);
    }

    #[test]
    fn deleting_an_exec_forgets_it_unless_it_runs() {
        let mut t = task();
        assert_eq!(code(t.remove_exec("run")), Code::FAILED_PRECONDITION);
        assert!(t.execs.contains_key("run"));
        let (pid, x) = t.remove_exec("done").unwrap();
        assert_eq!((pid, x), (40, Exited { code: 2, at: at(5) }));
        let (pid, x) = t.remove_exec("new").unwrap();
        assert_eq!((pid, x.code), (0, 0));
        assert_eq!(code(t.remove_exec("done")), Code::NOT_FOUND);
        assert_eq!(t.execs.keys().collect::<Vec<_>>(), ["run"]);
    }

    #[test]
    fn delete_takes_down_what_never_started_and_refuses_what_runs() {
        let mut t = Inner::default();
        assert_eq!(t.teardown("c1", true).unwrap(), Teardown::ShutDownVm);
        assert_eq!(t.teardown("c1", false).unwrap(), Teardown::KillAndWait);
        for phase in [Phase::Running, Phase::Paused] {
            t.phase = phase;
            assert_eq!(code(t.teardown("c1", true)), Code::FAILED_PRECONDITION);
        }
        t.exited(3, at(9));
        assert_eq!(t.teardown("c1", false).unwrap(), Teardown::Ended);
        assert_eq!(t.end(), Exited { code: 3, at: at(9) });
        assert_eq!(Inner::default().end().code, KILLED);
    }
}
