//! The shim's table of tasks, and what one task holds: the channel to the
//! monitor that runs its VM, its stream there, and its [`Inner`] state.
//! The Task API's calls are `impl Tasks` blocks in this folder's other
//! files, one per RPC family.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;

use containerd_shim::protos::events::task::TaskExit;
use containerd_shim::protos::protobuf::{MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::synchronous::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use krun_oci::api::{Incoming, Request, Response};
use krun_oci::cgroups::Cgroup;
use krun_oci::session::Event;

use super::state::{Inner, Stdio, KILLED};
use crate::pod::Role;
use crate::rpc::{rpc_error, timestamp};

/// One container (task) and its VM.
pub struct Container {
    pub id: String,
    pub bundle: PathBuf,
    pub stdio: Stdio,
    /// The monitor's event loop (a pod member shares its sandbox's).
    pub requests: SyncSender<Event>,
    /// The stream of its main process in the VM.
    pub stream: u32,
    /// What the CRI says it is.
    pub role: Role,
    inner: Mutex<Inner>,
    pub changed: Condvar,
    /// The monitor's thread, for a task with a VM of its own.
    pub thread: Mutex<Option<JoinHandle<()>>>,
    /// The VM's cgroup on the host, which this shim process joined, for a
    /// task with a VM of its own: left and removed when the task is
    /// deleted.
    pub cgroup: Option<Cgroup>,
}

impl Container {
    /// A task just created: its process waits for `start`.
    pub fn new(
        id: String,
        bundle: PathBuf,
        stdio: Stdio,
        role: Role,
        (requests, stream): (SyncSender<Event>, u32),
        (thread, cgroup): (Option<JoinHandle<()>>, Option<Cgroup>),
    ) -> Container {
        Container {
            id,
            bundle,
            stdio,
            requests,
            stream,
            role,
            inner: Mutex::new(Inner::default()),
            changed: Condvar::new(),
            thread: Mutex::new(thread),
            cgroup,
        }
    }

    pub fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until `done` holds of the task's state.
    pub fn wait_until(&self, done: impl Fn(&Inner) -> bool) -> MutexGuard<'_, Inner> {
        let mut inner = self.lock();
        while !done(&inner) {
            inner = self.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
        }
        inner
    }

    /// Changes the task's state and wakes whoever waits on it.
    pub fn update(&self, change: impl FnOnce(&mut Inner)) {
        change(&mut self.lock());
        self.changed.notify_all();
    }

    /// The container's VM is gone.
    pub fn gone(&self) -> containerd_shim::protos::ttrpc::Error {
        rpc_error(
            Code::NOT_FOUND,
            format!("container {}: its VM is gone", self.id),
        )
    }

    /// Sends a request to the monitor; the receiver yields its responses.
    pub fn send(&self, req: Request, fds: Vec<OwnedFd>) -> TtrpcResult<mpsc::Receiver<Response>> {
        let (reply, replies) = mpsc::channel();
        self.requests
            .send(Event::Request(Incoming { req, fds, reply }))
            .map_err(|_| self.gone())?;
        Ok(replies)
    }

    /// One request, one response; an error response becomes a ttrpc error.
    pub fn call(&self, req: Request) -> TtrpcResult<Response> {
        let replies = self.send(req, Vec::new())?;
        match replies.recv() {
            Ok(Response::Error { message, .. }) => {
                Err(rpc_error(Code::FAILED_PRECONDITION, message))
            }
            Ok(r) => Ok(r),
            Err(_) => Err(self.gone()),
        }
    }
}

/// The status a process ended with, from the last answer on its
/// request's channel (killed, if the channel closed without one).
pub fn exit_code(replies: &mpsc::Receiver<Response>) -> u32 {
    match replies.recv() {
        Ok(Response::Exited { code, .. }) => code as u32,
        _ => KILLED,
    }
}

pub struct Tasks {
    pub(super) root: PathBuf,
    namespace: String,
    /// [`krun_oci::monitor::Launch::console_copy`] for every container.
    pub(super) console_copy: Option<PathBuf>,
    publisher: Mutex<RemotePublisher>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

impl Tasks {
    pub fn new(
        root: PathBuf,
        namespace: String,
        publisher: RemotePublisher,
        console_copy: Option<PathBuf>,
    ) -> Tasks {
        Tasks {
            root,
            namespace,
            console_copy,
            publisher: Mutex::new(publisher),
            containers: Mutex::new(HashMap::new()),
        }
    }

    fn containers(&self) -> MutexGuard<'_, HashMap<String, Arc<Container>>> {
        self.containers.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn is_empty(&self) -> bool {
        self.containers().is_empty()
    }

    pub(super) fn contains(&self, id: &str) -> bool {
        self.containers().contains_key(id)
    }

    pub(super) fn insert(&self, c: Arc<Container>) {
        self.containers().insert(c.id.clone(), c);
    }

    pub(super) fn remove(&self, id: &str) {
        self.containers().remove(id);
    }

    pub(super) fn get(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers()
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("container {id} not found")))
    }

    pub fn pid_of(&self, id: &str) -> Option<u32> {
        self.get(id).ok().map(|_| std::process::id())
    }

    pub(super) fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        let _ = p.publish(Default::default(), topic, &self.namespace, event);
    }

    /// A process of a task ended: `exec_id` names an exec, or is empty
    /// for the main process; `pid` is the one its start reported.
    pub(super) fn publish_exit(&self, id: &str, exec_id: &str, pid: u32, code: u32) {
        let at = timestamp();
        if let Ok(c) = self.get(id) {
            c.update(|inner| match exec_id {
                "" => inner.exited(code, at.clone()),
                e => inner.exec_exited(e, code, at.clone()),
            });
        }
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_string(),
                id: if exec_id.is_empty() { id } else { exec_id }.to_string(),
                pid,
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    /// The monitor ended: the container's process exited (or its VM died).
    pub(super) fn on_exit(&self, id: &str, code: u32) {
        if self.get(id).is_err() {
            return;
        }
        self.publish_exit(id, "", std::process::id(), code);
    }
}
