//! The shim's two faces: the `start`/`delete` subcommands containerd runs,
//! and the Task service it talks to over ttrpc.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use containerd_shim::api;
use containerd_shim::protos::protobuf::well_known_types::empty::Empty;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::ttrpc::Code;
use containerd_shim::protos::types::introspection::RuntimeInfo;
use containerd_shim::synchronous::publisher::RemotePublisher;
use containerd_shim::{DeleteResponse, ExitSignal, Flags, TtrpcContext, TtrpcResult};

use crate::rpc::{rpc_error, timestamp};
use crate::task::Tasks;

pub const RUNTIME_ID: &str = "io.containerd.krun.v2";

/// The type containerd registers the runtime-spec features document under
/// (JSON in an `Any`).
const FEATURES_TYPE_URL: &str =
    "types.containerd.io/opencontainers/runtime-spec/1/features/Features";

/// Where the shim keeps its containers' state, per containerd namespace;
/// `krun-oci --root /run/krun-oci/containerd/NS state ID` reads it too.
pub fn state_root(namespace: &str) -> PathBuf {
    Path::new("/run/krun-oci/containerd").join(namespace)
}

#[derive(Clone)]
pub struct Service {
    namespace: String,
    id: String,
    /// containerd's socket (for the address of our own socket).
    address: String,
    /// Our ttrpc socket, `unix://PATH` (empty in the `start`/`delete` runs).
    socket: String,
    exit: Arc<ExitSignal>,
    tasks: Option<Arc<Tasks>>,
}

impl containerd_shim::Shim for Service {
    type T = Service;

    fn new(_runtime_id: &str, args: &Flags, _config: &mut containerd_shim::Config) -> Self {
        Service {
            namespace: args.namespace.clone(),
            id: args.id.clone(),
            address: args.address.clone(),
            socket: args.socket.clone(),
            exit: Arc::new(ExitSignal::default()),
            tasks: None,
        }
    }

    /// What containerd asks (`-info`) before it gives a task idmapped
    /// mounts (a user-namespaced pod's): the runtime's features, as the
    /// runc shim reports runc's.
    fn runtime_info(
        runtime_id: &str,
        _options: Option<&containerd_shim::protos::protobuf::well_known_types::any::Any>,
    ) -> Result<RuntimeInfo, containerd_shim::Error> {
        let mut features = containerd_shim::protos::protobuf::well_known_types::any::Any::new();
        features.type_url = FEATURES_TYPE_URL.into();
        features.value = serde_json::to_vec(&krun_oci::commands::info::features_json())
            .map_err(|e| containerd_shim::Error::Other(e.to_string()))?;
        Ok(RuntimeInfo {
            name: runtime_id.to_string(),
            features: MessageField::some(features),
            ..Default::default()
        })
    }

    /// Starts the shim daemon, or returns the address of the one already
    /// serving this container's pod (the CRI's sandbox id groups them).
    fn start_shim(
        &mut self,
        opts: containerd_shim::StartOpts,
    ) -> Result<String, containerd_shim::Error> {
        let grouping = sandbox_id(Path::new(".")).unwrap_or_else(|| opts.id.clone());
        let (_pid, address) = containerd_shim::spawn(opts, &grouping, Vec::new())?;
        Ok(address)
    }

    /// `delete` after a shim died: take down what it left (its VM died with
    /// it; the state and the rootfs mount remain) and report the task
    /// killed.
    fn delete_shim(&mut self) -> Result<DeleteResponse, containerd_shim::Error> {
        let bundle = std::env::current_dir().unwrap_or_default();
        Tasks::cleanup_after_crash(&state_root(&self.namespace), &self.id, &bundle);
        // The dead shim's socket, unless a live shim (of the pod) still serves it.
        let grouping = sandbox_id(&bundle).unwrap_or_else(|| self.id.clone());
        let socket = containerd_shim::socket_address(&self.address, &self.namespace, &grouping);
        let path = socket.trim_start_matches("unix://");
        if std::os::unix::net::UnixStream::connect(path).is_err() {
            let _ = std::fs::remove_file(path);
        }
        Ok(DeleteResponse {
            exit_status: 128 + libc::SIGKILL as u32,
            exited_at: MessageField::some(timestamp()),
            ..Default::default()
        })
    }

    fn wait(&mut self) {
        self.exit.wait();
        // containerd removes the bundle (and the crate's record of our
        // address in it) before we get here: remove the socket ourselves.
        // Connections already made are not affected.
        if let Some(path) = self.socket.strip_prefix("unix://") {
            let _ = std::fs::remove_file(path);
        }
    }

    fn create_task_service(&self, publisher: RemotePublisher) -> Self::T {
        let mut s = self.clone();
        s.tasks = Some(Arc::new(Tasks::new(
            state_root(&self.namespace),
            self.namespace.clone(),
            publisher,
            krun_oci::monitor::console_copy_from_env(),
        )));
        s
    }
}

/// The pod a task belongs to, from the CRI's annotation in its config.
fn sandbox_id(bundle: &Path) -> Option<String> {
    let text = std::fs::read_to_string(bundle.join("config.json")).ok()?;
    let v: serde_json::Value = serde_json::from_str(&text).ok()?;
    v["annotations"]["io.kubernetes.cri.sandbox-id"]
        .as_str()
        .map(str::to_string)
}

impl Service {
    fn tasks(&self) -> TtrpcResult<&Arc<Tasks>> {
        self.tasks
            .as_ref()
            .ok_or_else(|| rpc_error(Code::INTERNAL, "the task service is not set up"))
    }
}

impl containerd_shim::Task for Service {
    fn state(
        &self,
        _ctx: &TtrpcContext,
        req: api::StateRequest,
    ) -> TtrpcResult<api::StateResponse> {
        self.tasks()?.state(&req.id, &req.exec_id)
    }

    fn create(
        &self,
        _ctx: &TtrpcContext,
        req: api::CreateTaskRequest,
    ) -> TtrpcResult<api::CreateTaskResponse> {
        self.tasks()?.create(req)
    }

    fn start(
        &self,
        _ctx: &TtrpcContext,
        req: api::StartRequest,
    ) -> TtrpcResult<api::StartResponse> {
        self.tasks()?.start(&req.id, &req.exec_id)
    }

    fn delete(
        &self,
        _ctx: &TtrpcContext,
        req: api::DeleteRequest,
    ) -> TtrpcResult<api::DeleteResponse> {
        self.tasks()?.delete(&req.id, &req.exec_id)
    }

    fn pids(&self, _ctx: &TtrpcContext, req: api::PidsRequest) -> TtrpcResult<api::PidsResponse> {
        self.tasks()?.pids(&req.id)
    }

    fn pause(&self, _ctx: &TtrpcContext, req: api::PauseRequest) -> TtrpcResult<Empty> {
        self.tasks()?.pause(&req.id, true)?;
        Ok(Empty::new())
    }

    fn resume(&self, _ctx: &TtrpcContext, req: api::ResumeRequest) -> TtrpcResult<Empty> {
        self.tasks()?.pause(&req.id, false)?;
        Ok(Empty::new())
    }

    fn kill(&self, _ctx: &TtrpcContext, req: api::KillRequest) -> TtrpcResult<Empty> {
        self.tasks()?
            .kill(&req.id, &req.exec_id, req.signal as i32, req.all)?;
        Ok(Empty::new())
    }

    fn exec(&self, _ctx: &TtrpcContext, req: api::ExecProcessRequest) -> TtrpcResult<Empty> {
        self.tasks()?.exec(req)?;
        Ok(Empty::new())
    }

    fn resize_pty(&self, _ctx: &TtrpcContext, req: api::ResizePtyRequest) -> TtrpcResult<Empty> {
        self.tasks()?
            .resize(&req.id, &req.exec_id, req.height, req.width)?;
        Ok(Empty::new())
    }

    fn close_io(&self, _ctx: &TtrpcContext, req: api::CloseIORequest) -> TtrpcResult<Empty> {
        if req.stdin {
            self.tasks()?.close_stdin(&req.id, &req.exec_id)?;
        }
        Ok(Empty::new())
    }

    fn update(&self, _ctx: &TtrpcContext, req: api::UpdateTaskRequest) -> TtrpcResult<Empty> {
        self.tasks()?
            .update(&req.id, req.resources.as_ref().map(|r| r.value.as_slice()))?;
        Ok(Empty::new())
    }

    fn wait(&self, _ctx: &TtrpcContext, req: api::WaitRequest) -> TtrpcResult<api::WaitResponse> {
        self.tasks()?.wait(&req.id, &req.exec_id)
    }

    fn stats(
        &self,
        _ctx: &TtrpcContext,
        req: api::StatsRequest,
    ) -> TtrpcResult<api::StatsResponse> {
        self.tasks()?.stats(&req.id)
    }

    fn connect(
        &self,
        _ctx: &TtrpcContext,
        req: api::ConnectRequest,
    ) -> TtrpcResult<api::ConnectResponse> {
        let task_pid = self.tasks()?.pid_of(&req.id).unwrap_or(0);
        Ok(api::ConnectResponse {
            shim_pid: std::process::id(),
            task_pid,
            version: env!("CARGO_PKG_VERSION").to_string(),
            ..Default::default()
        })
    }

    fn shutdown(&self, _ctx: &TtrpcContext, req: api::ShutdownRequest) -> TtrpcResult<Empty> {
        // The shim goes when its last task is gone (or when told to now).
        if req.now || self.tasks()?.is_empty() {
            self.exit.signal();
        }
        Ok(Empty::new())
    }

    fn checkpoint(
        &self,
        _ctx: &TtrpcContext,
        _req: api::CheckpointTaskRequest,
    ) -> TtrpcResult<Empty> {
        Err(rpc_error(
            Code::UNIMPLEMENTED,
            "checkpoint is not supported by krun-oci",
        ))
    }
}
