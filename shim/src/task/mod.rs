//! The tasks of one shim: each container's VM runs in a monitor (the same
//! one `krun-oci create` forks) on a thread of this process; the Task API
//! calls become monitor requests, and what happens becomes containerd
//! events.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Condvar, Mutex};

use containerd_shim::api;
use containerd_shim::protos::events::task::{
    TaskCreate, TaskDelete, TaskExecAdded, TaskExecStarted, TaskExit, TaskOOM, TaskPaused,
    TaskResumed, TaskStart,
};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::well_known_types::timestamp::Timestamp;
use containerd_shim::protos::protobuf::{Message, MessageDyn, MessageField};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::synchronous::publisher::RemotePublisher;
use containerd_shim::TtrpcResult;
use krun_oci::api::{Incoming, Request, Response};
use krun_oci::monitor::{Launch, MainStdio, Monitor, Notice};
use krun_oci::session::Event;
use krun_oci::state::StateDir;
use krun_proto::{CgroupSetup, ExitStatus, ProcessSetup};

use crate::pod::{self, Role};
use crate::rpc::{code_of, library_error, process_error, rpc_error, timestamp};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    Created,
    Running,
    Paused,
    Stopped,
}

impl Phase {
    fn status(self) -> api::Status {
        match self {
            Phase::Created => api::Status::CREATED,
            Phase::Running => api::Status::RUNNING,
            Phase::Paused => api::Status::PAUSED,
            Phase::Stopped => api::Status::STOPPED,
        }
    }
}

#[derive(Clone)]
struct Exited {
    code: u32,
    at: Timestamp,
}

struct Stdio {
    stdin: String,
    stdout: String,
    stderr: String,
    terminal: bool,
}

struct Exec {
    process: Box<ProcessSetup>,
    stdio: Stdio,
    stream: Option<u32>,
    pid: u32,
    phase: Phase,
    exited: Option<Exited>,
}

struct Inner {
    phase: Phase,
    exited: Option<Exited>,
    execs: HashMap<String, Exec>,
}

/// One container (task) and its VM.
struct Container {
    id: String,
    bundle: PathBuf,
    stdio: Stdio,
    /// The monitor's event loop (a pod member shares its sandbox's).
    requests: SyncSender<Event>,
    /// The stream of its main process in the VM.
    stream: u32,
    /// What the CRI says it is.
    role: Role,
    inner: Mutex<Inner>,
    changed: Condvar,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
}

impl Container {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Sends a request to the monitor; the receiver yields its responses.
    fn send(
        &self,
        req: Request,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> TtrpcResult<mpsc::Receiver<Response>> {
        let (reply, replies) = mpsc::channel();
        self.requests
            .send(Event::Request(Incoming { req, fds, reply }))
            .map_err(|_| {
                rpc_error(
                    Code::NOT_FOUND,
                    format!("container {}: its VM is gone", self.id),
                )
            })?;
        Ok(replies)
    }

    /// One request, one response; an error response becomes a ttrpc error.
    fn call(&self, req: Request) -> TtrpcResult<Response> {
        let replies = self.send(req, Vec::new())?;
        match replies.recv() {
            Ok(Response::Error { message, .. }) => {
                Err(rpc_error(Code::FAILED_PRECONDITION, message))
            }
            Ok(r) => Ok(r),
            Err(_) => Err(rpc_error(
                Code::NOT_FOUND,
                format!("container {}: its VM is gone", self.id),
            )),
        }
    }
}

pub struct Tasks {
    root: PathBuf,
    namespace: String,
    /// [`Launch::console_copy`] for every container.
    console_copy: Option<PathBuf>,
    publisher: Mutex<RemotePublisher>,
    containers: Mutex<HashMap<String, Arc<Container>>>,
}

fn open_fifo(path: &str, write: bool) -> TtrpcResult<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    // Non-blocking to open (containerd holds the other end already), then
    // blocking for use.
    let f = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)
        .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("stdio {path}: {e}")))?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(Some(f))
}

fn dev_null() -> TtrpcResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| rpc_error(Code::INTERNAL, e.to_string()))
}

/// Cleans up after a shim that died: its VM went with it; what is left is
/// the container's state directory and its rootfs mount.
pub fn cleanup_after_crash(root: &Path, id: &str, bundle: &Path) {
    if let Ok(dir) = StateDir::open(root, id) {
        if let Ok(state) = dir.read() {
            if let Some(m) = state
                .monitor
                .filter(|m| m.alive() && m.pid != std::process::id() as i32)
            {
                // SAFETY: kill has no memory effects; pid and start time match.
                unsafe { libc::kill(m.pid, libc::SIGKILL) };
            }
            if let Some(n) = &state.network {
                krun_oci::net::release(n);
            }
        }
        let _ = dir.remove();
    }
    // Its paths leave the pod's share before its rootfs is unmounted.
    if let Ok(b) = krun_oci::bundle::Bundle::load(bundle) {
        match pod::role(&b.spec) {
            Role::Sandbox => pod::remove(id),
            Role::Member(sandbox) => pod::remove_member(&sandbox, id),
            Role::Standalone => {}
        }
    }
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
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

    pub fn is_empty(&self) -> bool {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .is_empty()
    }

    fn get(&self, id: &str) -> TtrpcResult<Arc<Container>> {
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(id)
            .cloned()
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("container {id} not found")))
    }

    pub fn pid_of(&self, id: &str) -> Option<u32> {
        self.get(id).ok().map(|_| std::process::id())
    }

    fn publish(&self, topic: &str, event: Box<dyn MessageDyn>) {
        let p = self.publisher.lock().unwrap_or_else(|e| e.into_inner());
        let _ = p.publish(Default::default(), topic, &self.namespace, event);
    }

    pub fn create(
        self: &Arc<Self>,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        if self
            .containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .contains_key(&id)
        {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("container {id} already exists"),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        let rootfs = bundle.join("rootfs");
        for m in &req.rootfs {
            let _ = std::fs::create_dir_all(&rootfs);
            crate::rootfs::mount_one(&m.type_, &m.source, &m.options, &rootfs).map_err(|e| {
                rpc_error(
                    Code::INTERNAL,
                    format!("mounting the rootfs of {id}: {e:#}"),
                )
            })?;
        }
        let undo_mount = || {
            let _ = containerd_shim::mount::umount_recursive(rootfs.to_str(), libc::MNT_DETACH);
        };
        let spec = match krun_oci::bundle::Bundle::load(&bundle) {
            Ok(b) => b.spec,
            Err(e) => {
                undo_mount();
                return Err(rpc_error(Code::INVALID_ARGUMENT, e.to_string()));
            }
        };
        let role = pod::role(&spec);
        if let Role::Member(sandbox) = &role {
            let owner = self.get(sandbox).ok().filter(|c| c.role == Role::Sandbox);
            if let Some(owner) = owner {
                let r = self.create_member(&req, &spec, &owner, sandbox);
                if r.is_err() {
                    undo_mount();
                }
                return r;
            }
        }
        let stdio = MainStdio::Files {
            stdin: open_fifo(&req.stdin, false)?,
            stdout: open_fifo(&req.stdout, true)?,
            stderr: open_fifo(&req.stderr, true)?,
        };
        let (notices, notice_rx) = mpsc::channel();
        let launch = match self.launch(&id, &bundle, stdio, notices, &role) {
            Ok(l) => l,
            Err(e) => {
                undo_mount();
                return Err(e);
            }
        };
        // The monitor lives on a thread of its own for the container's whole
        // life (its VMM's helper processes die with the thread that made
        // them), and tells us when it has the container created.
        let (ready, ready_rx) = mpsc::channel::<Result<SyncSender<Event>, (i32, String)>>();
        let tasks = self.clone();
        let tid = id.clone();
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{id}"))
            .spawn(move || {
                let monitor = match Monitor::prepare(launch) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready.send(Err((e.exit_code(), e.message())));
                        return;
                    }
                };
                let _ = ready.send(Ok(monitor.sender()));
                let outcome = monitor.serve(true);
                let status = match outcome {
                    Ok(o) => o.status,
                    Err(_) => ExitStatus::Signal(libc::SIGKILL),
                };
                tasks.on_exit(&tid, status.shell_code() as u32);
            })
            .map_err(|e| rpc_error(Code::INTERNAL, e.to_string()))?;
        let requests = match ready_rx.recv() {
            Ok(Ok(r)) => r,
            Ok(Err((code, msg))) => {
                let _ = thread.join();
                undo_mount();
                return Err(process_error(code, msg));
            }
            Err(_) => {
                undo_mount();
                return Err(rpc_error(Code::INTERNAL, "the monitor thread died"));
            }
        };
        let c = Arc::new(Container {
            stream: krun_proto::MAIN_STREAM,
            role: role.clone(),
            id: id.clone(),
            bundle: bundle.clone(),
            stdio: Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            requests,
            inner: Mutex::new(Inner {
                phase: Phase::Created,
                exited: None,
                execs: HashMap::new(),
            }),
            changed: Condvar::new(),
            thread: Mutex::new(Some(thread)),
        });
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), c);
        // OOM kills in the guest become TaskOOM events.
        let tasks = self.clone();
        let oid = id.clone();
        let _ = std::thread::Builder::new()
            .name(format!("oom-{id}"))
            .spawn(move || {
                for n in notice_rx {
                    if n == Notice::Oom {
                        tasks.publish(
                            topics::TASK_OOM_EVENT_TOPIC,
                            Box::new(TaskOOM {
                                container_id: oid.clone(),
                                ..Default::default()
                            }),
                        );
                    }
                }
            });
        let pid = std::process::id();
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: MessageField::some(containerd_shim::protos::events::task::TaskIO {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                    ..Default::default()
                }),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    /// A container of a pod whose VM runs: its root and mounts go into the
    /// pod directory, and the sandbox's monitor creates it in the VM.
    fn create_member(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        spec: &oci_spec::runtime::Spec,
        owner: &Arc<Container>,
        sandbox: &str,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let host = krun_oci::plan::HostInfo::detect();
        let plan = krun_oci::plan::plan(&id, &bundle, spec, &host)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let setup = pod::place_member(sandbox, &plan.paths, plan.setup)
            .map_err(|e| rpc_error(Code::INTERNAL, format!("placing {id} in its pod: {e}")))?;
        let undo = || pod::remove_member(sandbox, &id);
        let fds = (|| -> TtrpcResult<Vec<std::os::fd::OwnedFd>> {
            Ok(vec![
                open_fifo(&req.stdin, false)?.unwrap_or(dev_null()?).into(),
                open_fifo(&req.stdout, true)?.unwrap_or(dev_null()?).into(),
                open_fifo(&req.stderr, true)?.unwrap_or(dev_null()?).into(),
            ])
        })();
        let fds = match fds {
            Ok(f) => f,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        let replies = match owner.send(
            Request::CreateContainer {
                setup: Box::new(setup),
            },
            fds,
        ) {
            Ok(r) => r,
            Err(e) => {
                undo();
                return Err(e);
            }
        };
        let stream = match replies.recv() {
            Ok(Response::Created { stream, .. }) => stream,
            Ok(Response::Error { code, message }) => {
                undo();
                return Err(process_error(code, message));
            }
            _ => {
                undo();
                return Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("pod {sandbox}: its VM is gone"),
                ));
            }
        };
        let c = Arc::new(Container {
            stream,
            role: Role::Member(sandbox.to_string()),
            id: id.clone(),
            bundle: bundle.clone(),
            stdio: Stdio {
                stdin: req.stdin.clone(),
                stdout: req.stdout.clone(),
                stderr: req.stderr.clone(),
                terminal: req.terminal,
            },
            requests: owner.requests.clone(),
            inner: Mutex::new(Inner {
                phase: Phase::Created,
                exited: None,
                execs: HashMap::new(),
            }),
            changed: Condvar::new(),
            thread: Mutex::new(None),
        });
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id.clone(), c);
        // Its end comes on the create request's channel.
        let tasks = self.clone();
        let tid = id.clone();
        let _ = std::thread::Builder::new()
            .name(format!("member-{id}"))
            .spawn(move || {
                let code = match replies.recv() {
                    Ok(Response::Exited { code, .. }) => code as u32,
                    _ => 128 + libc::SIGKILL as u32,
                };
                tasks.on_exit(&tid, code);
            });
        let pid = std::process::id();
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: id,
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                pid,
                ..Default::default()
            }),
        );
        Ok(api::CreateTaskResponse {
            pid,
            ..Default::default()
        })
    }

    fn launch(
        &self,
        id: &str,
        bundle: &Path,
        stdio: MainStdio,
        notices: mpsc::Sender<Notice>,
        role: &Role,
    ) -> TtrpcResult<Launch> {
        let b = krun_oci::bundle::Bundle::load(bundle).map_err(|e| library_error(e.into()))?;
        let host = krun_oci::plan::HostInfo::detect();
        let plan = krun_oci::plan::plan(id, &b.dir, &b.spec, &host)
            .map_err(|e| library_error(e.into()))?;
        // The pod's VM composes its share in the pod directory, where the
        // pod's later containers are bound in too.
        let share_dir = (*role == Role::Sandbox).then(|| pod::share_dir(id));
        let assets = krun_oci::assets::Assets::find().map_err(|e| library_error(e.into()))?;
        let hypervisor = krun_oci::backend::choose(plan.hypervisor, plan.require_kvm, &assets)
            .map_err(|e| library_error(e.into()))?;
        let state_dir = StateDir::create(&self.root, id).map_err(|e| {
            // The state error alone, without its cause, as before.
            let message = e.to_string();
            rpc_error(code_of(&e.into()), message)
        })?;
        Ok(Launch {
            id: id.to_string(),
            bundle: b,
            plan,
            assets,
            hypervisor,
            state_dir,
            stdio,
            notices: Some(notices),
            share_dir,
            console_copy: self.console_copy.clone(),
        })
    }

    /// The monitor ended: the container's process exited (or its VM died).
    fn on_exit(&self, id: &str, code: u32) {
        let Ok(c) = self.get(id) else { return };
        let at = timestamp();
        {
            let mut inner = c.lock();
            inner.phase = Phase::Stopped;
            inner.exited = Some(Exited {
                code,
                at: at.clone(),
            });
            for e in inner.execs.values_mut() {
                if e.exited.is_none() && e.stream.is_some() {
                    e.phase = Phase::Stopped;
                    e.exited = Some(Exited {
                        code: 128 + libc::SIGKILL as u32,
                        at: at.clone(),
                    });
                }
            }
        }
        c.changed.notify_all();
        self.publish(
            topics::TASK_EXIT_EVENT_TOPIC,
            Box::new(TaskExit {
                container_id: id.to_string(),
                id: id.to_string(),
                pid: std::process::id(),
                exit_status: code,
                exited_at: MessageField::some(at),
                ..Default::default()
            }),
        );
    }

    pub fn start(self: &Arc<Self>, id: &str, exec_id: &str) -> TtrpcResult<api::StartResponse> {
        let c = self.get(id)?;
        if exec_id.is_empty() {
            if c.lock().phase != Phase::Created {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} is not created"),
                ));
            }
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
                    container_id: id.to_string(),
                    pid,
                    ..Default::default()
                }),
            );
            return Ok(api::StartResponse {
                pid,
                ..Default::default()
            });
        }
        let (process, stdio) = {
            let inner = c.lock();
            let e = inner
                .execs
                .get(exec_id)
                .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found")))?;
            if e.phase != Phase::Created {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} was already started"),
                ));
            }
            (
                e.process.clone(),
                Stdio {
                    stdin: e.stdio.stdin.clone(),
                    stdout: e.stdio.stdout.clone(),
                    stderr: e.stdio.stderr.clone(),
                    terminal: e.stdio.terminal,
                },
            )
        };
        let fds: Vec<std::os::fd::OwnedFd> = vec![
            open_fifo(&stdio.stdin, false)?
                .unwrap_or(dev_null()?)
                .into(),
            open_fifo(&stdio.stdout, true)?
                .unwrap_or(dev_null()?)
                .into(),
            open_fifo(&stdio.stderr, true)?
                .unwrap_or(dev_null()?)
                .into(),
        ];
        let container = matches!(c.role, Role::Member(_)).then(|| c.id.clone());
        let replies = c.send(Request::Exec { process, container }, fds)?;
        let (stream, pid) = match replies.recv() {
            Ok(Response::Started { stream, pid }) => (stream, pid as u32),
            Ok(Response::Error { code, message }) => {
                // As runc does: the exec "ran" and exited with the status a
                // shell would give (127 for a missing program).
                let mut inner = c.lock();
                if let Some(e) = inner.execs.get_mut(exec_id) {
                    e.phase = Phase::Stopped;
                    e.exited = Some(Exited {
                        code: code as u32,
                        at: timestamp(),
                    });
                }
                drop(inner);
                c.changed.notify_all();
                return Err(rpc_error(Code::FAILED_PRECONDITION, message));
            }
            _ => {
                return Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("container {id}: its VM is gone"),
                ))
            }
        };
        {
            let mut inner = c.lock();
            if let Some(e) = inner.execs.get_mut(exec_id) {
                e.stream = Some(stream);
                e.pid = pid;
                e.phase = Phase::Running;
            }
        }
        self.publish(
            topics::TASK_EXEC_STARTED_EVENT_TOPIC,
            Box::new(TaskExecStarted {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                pid,
                ..Default::default()
            }),
        );
        // Wait for its end on a thread of its own.
        let tasks = self.clone();
        let (cid, eid) = (id.to_string(), exec_id.to_string());
        let _ = std::thread::Builder::new()
            .name(format!("exec-{exec_id}"))
            .spawn(move || {
                let code = match replies.recv() {
                    Ok(Response::Exited { code, .. }) => code as u32,
                    _ => 128 + libc::SIGKILL as u32,
                };
                let at = timestamp();
                if let Ok(c) = tasks.get(&cid) {
                    let mut inner = c.lock();
                    if let Some(e) = inner.execs.get_mut(&eid) {
                        e.phase = Phase::Stopped;
                        e.exited = Some(Exited {
                            code,
                            at: at.clone(),
                        });
                    }
                    drop(inner);
                    c.changed.notify_all();
                }
                tasks.publish(
                    topics::TASK_EXIT_EVENT_TOPIC,
                    Box::new(TaskExit {
                        container_id: cid,
                        id: eid,
                        pid,
                        exit_status: code,
                        exited_at: MessageField::some(at),
                        ..Default::default()
                    }),
                );
            });
        Ok(api::StartResponse {
            pid,
            ..Default::default()
        })
    }

    pub fn exec(&self, req: api::ExecProcessRequest) -> TtrpcResult<()> {
        let c = self.get(&req.id)?;
        let spec = req
            .spec
            .as_ref()
            .ok_or_else(|| rpc_error(Code::INVALID_ARGUMENT, "exec without a process spec"))?;
        let process: oci_spec::runtime::Process =
            serde_json::from_slice(&spec.value).map_err(|e| {
                rpc_error(
                    Code::INVALID_ARGUMENT,
                    format!("exec {}: the process spec is not valid: {e}", req.exec_id),
                )
            })?;
        let mut process = krun_oci::plan::exec_process(&process)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        process.terminal = req.terminal;
        let mut inner = c.lock();
        if inner.phase == Phase::Stopped {
            return Err(rpc_error(
                Code::FAILED_PRECONDITION,
                format!("container {} is stopped", req.id),
            ));
        }
        if inner.execs.contains_key(&req.exec_id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("exec {} already exists", req.exec_id),
            ));
        }
        inner.execs.insert(
            req.exec_id.clone(),
            Exec {
                process: Box::new(process),
                stdio: Stdio {
                    stdin: req.stdin.clone(),
                    stdout: req.stdout.clone(),
                    stderr: req.stderr.clone(),
                    terminal: req.terminal,
                },
                stream: None,
                pid: 0,
                phase: Phase::Created,
                exited: None,
            },
        );
        drop(inner);
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
            let e = inner
                .execs
                .get(exec_id)
                .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found")))?;
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
        let stream = {
            let inner = c.lock();
            let e = inner
                .execs
                .get(exec_id)
                .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found")))?;
            match (e.stream, e.phase) {
                (Some(s), Phase::Running) => s,
                _ => {
                    return Err(rpc_error(
                        Code::NOT_FOUND,
                        format!("exec {exec_id}: process already finished"),
                    ))
                }
            }
        };
        c.call(Request::SignalExec { stream, signal })?;
        Ok(())
    }

    pub fn wait(&self, id: &str, exec_id: &str) -> TtrpcResult<api::WaitResponse> {
        let c = self.get(id)?;
        let mut inner = c.lock();
        loop {
            let exited = if exec_id.is_empty() {
                inner.exited.clone()
            } else {
                inner
                    .execs
                    .get(exec_id)
                    .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found")))?
                    .exited
                    .clone()
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

    pub fn delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let mut inner = c.lock();
            let e = inner
                .execs
                .get(exec_id)
                .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} not found")))?;
            if e.phase == Phase::Running {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("exec {exec_id} is still running"),
                ));
            }
            let e = inner.execs.remove(exec_id).expect("looked up above");
            let x = e.exited.unwrap_or(Exited {
                code: 0,
                at: timestamp(),
            });
            return Ok(api::DeleteResponse {
                pid: e.pid,
                exit_status: x.code,
                exited_at: MessageField::some(x.at),
                ..Default::default()
            });
        }
        let phase = c.lock().phase;
        match phase {
            Phase::Stopped => {}
            // A task never started is taken down, as runc's shim does.
            Phase::Created if c.stream == krun_proto::MAIN_STREAM => {
                let _ = c.call(Request::Shutdown);
            }
            Phase::Created => {
                let _ = c.call(Request::Kill {
                    signal: libc::SIGKILL,
                    all: false,
                    stream: c.stream,
                });
                let mut inner = c.lock();
                while inner.exited.is_none() {
                    inner = c.changed.wait(inner).unwrap_or_else(|e| e.into_inner());
                }
            }
            _ => {
                return Err(rpc_error(
                    Code::FAILED_PRECONDITION,
                    format!("container {id} is still running"),
                ))
            }
        }
        if let Some(t) = c.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        let x = c.lock().exited.clone().unwrap_or(Exited {
            code: 128 + libc::SIGKILL as u32,
            at: timestamp(),
        });
        if let Ok(dir) = StateDir::open(&self.root, id) {
            let _ = dir.remove();
        }
        match &c.role {
            Role::Member(sandbox) => pod::remove_member(sandbox, id),
            Role::Sandbox => pod::remove(id),
            Role::Standalone => {}
        }
        let _ = containerd_shim::mount::umount_recursive(
            c.bundle.join("rootfs").to_str(),
            libc::MNT_DETACH,
        );
        self.containers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(id);
        let pid = std::process::id();
        self.publish(
            topics::TASK_DELETE_EVENT_TOPIC,
            Box::new(TaskDelete {
                container_id: id.to_string(),
                id: id.to_string(),
                pid,
                exit_status: x.code,
                exited_at: MessageField::some(x.at.clone()),
                ..Default::default()
            }),
        );
        Ok(api::DeleteResponse {
            pid,
            exit_status: x.code,
            exited_at: MessageField::some(x.at),
            ..Default::default()
        })
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

    pub fn pause(&self, id: &str, pause: bool) -> TtrpcResult<()> {
        let c = self.get(id)?;
        if matches!(c.role, Role::Member(_)) {
            return Err(rpc_error(
                Code::UNIMPLEMENTED,
                "pausing one container of a pod VM is not supported; pause the pod",
            ));
        }
        c.call(if pause {
            Request::Pause
        } else {
            Request::Resume
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

    fn stream_of(&self, c: &Container, exec_id: &str) -> TtrpcResult<u32> {
        if exec_id.is_empty() {
            return Ok(c.stream);
        }
        c.lock()
            .execs
            .get(exec_id)
            .and_then(|e| e.stream)
            .ok_or_else(|| rpc_error(Code::NOT_FOUND, format!("exec {exec_id} is not running")))
    }

    pub fn resize(&self, id: &str, exec_id: &str, rows: u32, cols: u32) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let stream = self.stream_of(&c, exec_id)?;
        c.call(Request::Resize {
            stream,
            rows: rows.min(u16::MAX as u32) as u16,
            cols: cols.min(u16::MAX as u32) as u16,
        })?;
        Ok(())
    }

    pub fn close_stdin(&self, id: &str, exec_id: &str) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let stream = self.stream_of(&c, exec_id)?;
        c.call(Request::CloseStdin { stream })?;
        Ok(())
    }

    pub fn update(&self, id: &str, resources: Option<&[u8]>) -> TtrpcResult<()> {
        let c = self.get(id)?;
        let Some(bytes) = resources else {
            return Ok(());
        };
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
        c.call(Request::Update {
            limits,
            stream: c.stream,
        })?;
        Ok(())
    }

    /// Resource use from the container's cgroup inside the VM, as cgroup v2
    /// metrics (what `ctr task metrics` and the CRI's stats read).
    pub fn stats(&self, id: &str) -> TtrpcResult<api::StatsResponse> {
        use containerd_shim::protos::cgroups_v2::metrics::{
            CPUStat, MemoryStat, Metrics, PidsStat,
        };
        let c = self.get(id)?;
        let Response::Stats { stats } = c.call(Request::Stats { stream: c.stream })? else {
            return Err(rpc_error(Code::INTERNAL, "no stats from the guest"));
        };
        let m = Metrics {
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
