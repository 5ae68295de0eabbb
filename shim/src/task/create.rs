//! `create`: a task with a VM of its own (a standalone container, or a
//! pod's sandbox), whose monitor runs on a thread of this process; or a
//! member of a pod, created in its sandbox's VM.

use std::path::{Path, PathBuf};
use std::sync::mpsc::{self, Receiver, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;

use containerd_shim::api;
use containerd_shim::protos::events::task::{TaskCreate, TaskIO, TaskOOM};
use containerd_shim::protos::topics;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;
use krun_oci::api::{Request, Response};
use krun_oci::monitor::{Launch, MainStdio, Monitor, Notice};
use krun_oci::session::Event;
use krun_oci::state::StateDir;
use krun_proto::ExitStatus;
use oci_spec::runtime::Spec;

use super::state::Stdio;
use super::stdio::{fds, open_fifo};
use super::tasks::{exit_code, Container, Tasks};
use crate::pod::{self, Role};
use crate::rpc::{code_of, library_error, process_error, rpc_error};

/// What the monitor thread says once the container is created (or not).
type Ready = Result<SyncSender<Event>, containerd_shim::protos::ttrpc::Error>;

fn stdio_of(req: &api::CreateTaskRequest) -> Stdio {
    Stdio {
        stdin: req.stdin.clone(),
        stdout: req.stdout.clone(),
        stderr: req.stderr.clone(),
        terminal: req.terminal,
    }
}

fn unmount_rootfs(bundle: &Path) {
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}

/// Whether a `linux.cgroupsPath` is systemd's `slice:prefix:name`: a shim
/// is given no `--systemd-cgroup`, so it reads the path's shape, as
/// Kata's does (kubelet's systemd driver sends
/// `kubepods-burstable-pod<uid>.slice:cri-containerd:<id>`).
fn systemd_path(spec: &Spec) -> bool {
    let path = spec.linux().as_ref().and_then(|l| l.cgroups_path().clone());
    let path = path
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let parts: Vec<&str> = path.split(':').collect();
    parts.len() == 3 && parts[0].ends_with(".slice")
}

/// Creates the VM's cgroup on the host where `linux.cgroupsPath` says
/// (containerd: `/<namespace>/<id>`; the CRI: the pod's parent from
/// kubelet, then the sandbox's id) and moves this shim process into it:
/// the monitor runs on a thread here, and the built-in VMM's process or
/// QEMU and virtiofsd are spawned from here, so the VM's whole host side
/// is in it (Kata's `sandbox_cgroup_only`). One shim serves one VM, so it
/// joins one cgroup. Dropped unkept, the cgroup is left and removed.
fn join_host_cgroup(launch: &mut Launch) -> TtrpcResult<krun_oci::cgroups::Owned> {
    let spec = &launch.bundle.spec;
    let cg =
        krun_oci::cgroups::for_container(spec, &launch.id, systemd_path(spec), &launch.plan.host)
            .map_err(|e| library_error(e.into()))?;
    launch.plan.host_cgroup = Some(cg.paths().clone());
    let owned = krun_oci::cgroups::Owned::new(cg);
    if let Some(cg) = owned.cgroup() {
        cg.join(0).map_err(|e| library_error(e.into()))?;
    }
    Ok(owned)
}

/// Mounts the rootfs containerd hands the task at `bundle/rootfs`.
fn mount_rootfs(req: &api::CreateTaskRequest, bundle: &Path) -> TtrpcResult<()> {
    let rootfs = bundle.join("rootfs");
    for m in &req.rootfs {
        let _ = std::fs::create_dir_all(&rootfs);
        crate::rootfs::mount_one(&m.type_, &m.source, &m.options, &rootfs).map_err(|e| {
            rpc_error(
                Code::INTERNAL,
                format!("mounting the rootfs of {}: {e:#}", req.id),
            )
        })?;
    }
    Ok(())
}

impl Tasks {
    pub fn create(
        self: &Arc<Self>,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        if self.contains(&req.id) {
            return Err(rpc_error(
                Code::ALREADY_EXISTS,
                format!("container {} already exists", req.id),
            ));
        }
        let bundle = PathBuf::from(&req.bundle);
        mount_rootfs(&req, &bundle)?;
        let r = self.create_mounted(&req, &bundle);
        if r.is_err() {
            unmount_rootfs(&bundle);
        }
        r
    }

    /// `create` once the rootfs is mounted (and unmounted again if this
    /// fails).
    fn create_mounted(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        bundle: &Path,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let spec = krun_oci::bundle::Bundle::load(bundle)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?
            .spec;
        let role = pod::role(&spec);
        if let Role::Member(sandbox) = &role {
            let owner = self.get(sandbox).ok().filter(|c| c.role == Role::Sandbox);
            if let Some(owner) = owner {
                return self.create_member(req, &spec, &owner, sandbox);
            }
        }
        let stdio = MainStdio::Files {
            stdin: open_fifo(&req.stdin, false)?,
            stdout: open_fifo(&req.stdout, true)?,
            stderr: open_fifo(&req.stderr, true)?,
        };
        let (notices, notice_rx) = mpsc::channel();
        let mut launch = self.launch(&req.id, bundle, stdio, notices, &role)?;
        let cgroup = join_host_cgroup(&mut launch)?;
        let (requests, thread) = self.spawn_monitor(&req.id, launch)?;
        let cgroup = cgroup.keep();
        self.insert(Arc::new(Container::new(
            req.id.clone(),
            bundle.to_path_buf(),
            stdio_of(req),
            role,
            (requests, krun_proto::MAIN_STREAM),
            (Some(thread), cgroup),
        )));
        self.forward_ooms(&req.id, notice_rx);
        let io = TaskIO {
            stdin: req.stdin.clone(),
            stdout: req.stdout.clone(),
            stderr: req.stderr.clone(),
            terminal: req.terminal,
            ..Default::default()
        };
        Ok(self.created(req, Some(io)))
    }

    /// Runs the container's monitor on a thread of its own for the
    /// container's whole life (its VMM's helper processes die with the
    /// thread that made them); returns once the monitor has the container
    /// created.
    fn spawn_monitor(
        self: &Arc<Self>,
        id: &str,
        launch: Launch,
    ) -> TtrpcResult<(SyncSender<Event>, JoinHandle<()>)> {
        let (ready, ready_rx) = mpsc::channel::<Ready>();
        let tasks = self.clone();
        let tid = id.to_string();
        let thread = std::thread::Builder::new()
            .name(format!("monitor-{id}"))
            .spawn(move || {
                let monitor = match Monitor::prepare(launch) {
                    Ok(m) => m,
                    Err(e) => {
                        let _ = ready.send(Err(library_error(e)));
                        return;
                    }
                };
                let _ = ready.send(Ok(monitor.sender()));
                let status = match monitor.serve(true) {
                    Ok(o) => o.status,
                    Err(_) => ExitStatus::Signal(libc::SIGKILL),
                };
                tasks.on_exit(&tid, status.shell_code() as u32);
            })
            .map_err(|e| rpc_error(Code::INTERNAL, e.to_string()))?;
        match ready_rx.recv() {
            Ok(Ok(requests)) => Ok((requests, thread)),
            Ok(Err(e)) => {
                let _ = thread.join();
                Err(e)
            }
            Err(_) => Err(rpc_error(Code::INTERNAL, "the monitor thread died")),
        }
    }

    /// OOM kills in the guest become TaskOOM events.
    fn forward_ooms(self: &Arc<Self>, id: &str, notices: Receiver<Notice>) {
        let tasks = self.clone();
        let oid = id.to_string();
        let _ = std::thread::Builder::new()
            .name(format!("oom-{id}"))
            .spawn(move || {
                for n in notices {
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
    }

    /// Publishes TaskCreate and answers `create`.
    fn created(&self, req: &api::CreateTaskRequest, io: Option<TaskIO>) -> api::CreateTaskResponse {
        let pid = std::process::id();
        self.publish(
            topics::TASK_CREATE_EVENT_TOPIC,
            Box::new(TaskCreate {
                container_id: req.id.clone(),
                bundle: req.bundle.clone(),
                rootfs: req.rootfs.clone(),
                io: io.into(),
                pid,
                ..Default::default()
            }),
        );
        api::CreateTaskResponse {
            pid,
            ..Default::default()
        }
    }

    /// A container of a pod whose VM runs: its root and mounts go into the
    /// pod directory, and the sandbox's monitor creates it in the VM.
    fn create_member(
        self: &Arc<Self>,
        req: &api::CreateTaskRequest,
        spec: &Spec,
        owner: &Arc<Container>,
        sandbox: &str,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        let id = req.id.clone();
        let bundle = PathBuf::from(&req.bundle);
        let host = krun_oci::plan::HostInfo::detect();
        let mut spec = spec.clone();
        krun_oci::pod::forget_user_ns_path(&mut spec);
        let plan = krun_oci::plan::plan(&id, &bundle, &spec, &host)
            .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, e.to_string()))?;
        let setup = pod::place_member(sandbox, &plan.paths, plan.setup)
            .map_err(|e| rpc_error(Code::INTERNAL, format!("placing {id} in its pod: {e}")))?;
        let stdio = stdio_of(req);
        let request = |fds| {
            let setup = Box::new(setup);
            owner.send(Request::CreateContainer { setup }, fds)
        };
        let created = fds(&stdio)
            .and_then(request)
            .and_then(|replies| match replies.recv() {
                Ok(Response::Created { stream, .. }) => Ok((stream, replies)),
                Ok(Response::Error { code, message }) => Err(process_error(code, message)),
                _ => Err(rpc_error(
                    Code::NOT_FOUND,
                    format!("pod {sandbox}: its VM is gone"),
                )),
            });
        let (stream, replies) = created.inspect_err(|_| pod::remove_member(sandbox, &id))?;
        let role = Role::Member(sandbox.to_string());
        let requests = (owner.requests.clone(), stream);
        self.insert(Arc::new(Container::new(
            id.clone(),
            bundle,
            stdio,
            role,
            requests,
            (None, None),
        )));
        // Its end comes on the create request's channel.
        let tasks = self.clone();
        let _ = std::thread::Builder::new()
            .name(format!("member-{id}"))
            .spawn(move || tasks.on_exit(&id, exit_code(&replies)));
        Ok(self.created(req, None))
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
            restore: None,
        })
    }
}
