//! A CRI client, as kubelet is one: the k8s-cri crate's generated gRPC
//! client over containerd's socket, with blocking calls for the tests.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use hyper_util::rt::TokioIo;
use k8s_cri::v1 as cri;
use k8s_cri::v1::runtime_service_client::RuntimeServiceClient;
use tonic::transport::{Channel, Endpoint};

use crate::process::poll;

pub use cri::*;

/// A CRI client on one containerd socket.
pub struct Cri {
    rt: tokio::runtime::Runtime,
    client: RuntimeServiceClient<Channel>,
}

impl Cri {
    pub fn connect(socket: &Path) -> Cri {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let path: PathBuf = socket.to_path_buf();
        let channel = rt
            .block_on(async {
                // The URI is a placeholder: the connector dials the socket.
                Endpoint::try_from("http://[::]:50051")
                    .unwrap()
                    .connect_with_connector(tower::service_fn(move |_| {
                        let path = path.clone();
                        async move {
                            Ok::<_, std::io::Error>(TokioIo::new(
                                tokio::net::UnixStream::connect(path).await?,
                            ))
                        }
                    }))
                    .await
            })
            .unwrap_or_else(|e| panic!("cannot connect to CRI at {}: {e}", socket.display()));
        Cri {
            rt,
            client: RuntimeServiceClient::new(channel),
        }
    }

    /// Runs one call; panics with the gRPC status on failure.
    fn call<T, F, Fut>(&mut self, what: &str, f: F) -> T
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        match self.try_call(f) {
            Ok(r) => r,
            Err(s) => panic!("CRI {what}: {:?}: {}", s.code(), s.message()),
        }
    }

    fn try_call<T, F, Fut>(&mut self, f: F) -> Result<T, tonic::Status>
    where
        F: FnOnce(RuntimeServiceClient<Channel>) -> Fut,
        Fut: std::future::Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        let client = self.client.clone();
        self.rt
            .block_on(async {
                tokio::time::timeout(Duration::from_secs(180), f(client))
                    .await
                    .unwrap_or_else(|_| Err(tonic::Status::deadline_exceeded("no answer in 180 s")))
            })
            .map(|r| r.into_inner())
    }

    pub fn run_pod(&mut self, config: &PodSandboxConfig, handler: &str) -> String {
        let req = RunPodSandboxRequest {
            config: Some(config.clone()),
            runtime_handler: handler.to_string(),
        };
        self.call("RunPodSandbox", |mut c| async move {
            c.run_pod_sandbox(req).await
        })
        .pod_sandbox_id
    }

    pub fn create_container(
        &mut self,
        pod: &str,
        config: ContainerConfig,
        pod_config: &PodSandboxConfig,
    ) -> String {
        let req = CreateContainerRequest {
            pod_sandbox_id: pod.to_string(),
            config: Some(config),
            sandbox_config: Some(pod_config.clone()),
        };
        self.call("CreateContainer", |mut c| async move {
            c.create_container(req).await
        })
        .container_id
    }

    pub fn exec_sync(&mut self, id: &str, cmd: &[&str]) -> ExecSyncResponse {
        let req = ExecSyncRequest {
            container_id: id.to_string(),
            cmd: cmd.iter().map(|s| s.to_string()).collect(),
            timeout: 60,
        };
        self.call("ExecSync", |mut c| async move { c.exec_sync(req).await })
    }

    pub fn status(&mut self, id: &str) -> ContainerStatus {
        self.container_status(id)
            .status
            .expect("ContainerStatus without a status")
    }

    /// Waits until the container is in `state`; returns its status.
    pub fn wait_state(&mut self, id: &str, state: ContainerState) -> ContainerStatus {
        poll(
            Duration::from_secs(180),
            Duration::from_millis(100),
            || {
                let s = self.status(id);
                if s.state == state as i32 {
                    Ok(s)
                } else {
                    Err(Box::new(s))
                }
            },
            |s| format!("container {id} never reached {state:?}: {s:?}"),
        )
    }

    /// The pod's IP address, as the CNI plugins gave it.
    pub fn pod_ip(&mut self, id: &str) -> String {
        self.pod_status(id)
            .status
            .and_then(|s| s.network)
            .map(|n| n.ip)
            .unwrap_or_default()
    }

    pub fn list_pods(&mut self) -> Vec<PodSandbox> {
        let req = ListPodSandboxRequest { filter: None };
        self.call("ListPodSandbox", |mut c| async move {
            c.list_pod_sandbox(req).await
        })
        .items
    }
}

/// Methods of [`Cri`] that make one call about one container or pod:
/// `fn NAME(ID_FIELD, ARG: T, ...; FIELD: VALUE, ...) -> Response => "Rpc"
/// Request.method` sends `Request { ID_FIELD: id, ARG, FIELD: VALUE }` and
/// returns the answer.
macro_rules! id_calls {
    ($(
        fn $name:ident($field:ident $(, $arg:ident: $ty:ty)* $(; $fixed:ident: $val:expr)?)
            -> $resp:ty => $rpc:literal $req:ident.$method:ident;
    )*) => {
        impl Cri {
            $(
                pub fn $name(&mut self, id: &str $(, $arg: $ty)*) -> $resp {
                    let req = $req {
                        $field: id.to_string(),
                        $($arg,)*
                        $($fixed: $val,)?
                    };
                    self.call($rpc, |mut c| async move { c.$method(req).await })
                }
            )*
        }
    };
}

id_calls! {
    fn start_container(container_id) -> StartContainerResponse
        => "StartContainer" StartContainerRequest.start_container;
    fn stop_container(container_id, timeout: i64) -> StopContainerResponse
        => "StopContainer" StopContainerRequest.stop_container;
    fn remove_container(container_id) -> RemoveContainerResponse
        => "RemoveContainer" RemoveContainerRequest.remove_container;
    fn container_status(container_id; verbose: false) -> ContainerStatusResponse
        => "ContainerStatus" ContainerStatusRequest.container_status;
    fn stop_pod(pod_sandbox_id) -> StopPodSandboxResponse
        => "StopPodSandbox" StopPodSandboxRequest.stop_pod_sandbox;
    fn remove_pod(pod_sandbox_id) -> RemovePodSandboxResponse
        => "RemovePodSandbox" RemovePodSandboxRequest.remove_pod_sandbox;
    fn pod_status(pod_sandbox_id; verbose: false) -> PodSandboxStatusResponse
        => "PodSandboxStatus" PodSandboxStatusRequest.pod_sandbox_status;
}

/// A pod as kubelet describes one: its own network namespace (wired by the
/// CNI configuration in containerd's conf_dir), its name as hostname.
pub fn pod_config(name: &str, logs: &Path) -> PodSandboxConfig {
    PodSandboxConfig {
        metadata: Some(PodSandboxMetadata {
            name: name.to_string(),
            uid: format!("uid-{name}-{}", std::process::id()),
            namespace: "default".into(),
            attempt: 0,
        }),
        hostname: name.to_string(),
        log_directory: logs.to_string_lossy().into_owned(),
        linux: Some(LinuxPodSandboxConfig {
            security_context: Some(LinuxSandboxSecurityContext {
                namespace_options: Some(NamespaceOption {
                    network: NamespaceMode::Pod as i32,
                    pid: NamespaceMode::Container as i32,
                    ipc: NamespaceMode::Pod as i32,
                    ..Default::default()
                }),
                ..Default::default()
            }),
            ..Default::default()
        }),
        labels: HashMap::from([("app".to_string(), name.to_string())]),
        ..Default::default()
    }
}

/// A CNI bridge network of one test's own, written into the conf_dir of
/// the containerd in `dir` (10.232.N.0/24 on bridge kcniN); dropping it
/// removes what CNI leaves on the host (the bridge, the IPAM records).
pub struct CniNetwork {
    pub bridge: String,
    pub name: String,
    pub n: u8,
}

impl CniNetwork {
    pub fn install(dir: &Path, test: u8) -> CniNetwork {
        let n = ((std::process::id() % 100) as u8) * 2 + 20 + test;
        let net = CniNetwork {
            bridge: format!("kcni{n}"),
            name: format!("krun-test-{n}"),
            n,
        };
        let conf = serde_json::json!({
            "cniVersion": "1.0.0",
            "name": net.name,
            "plugins": [{
                "type": "bridge",
                "bridge": net.bridge,
                "isGateway": true,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": [[{"subnet": format!("10.232.{n}.0/24")}]],
                    "routes": [{"dst": "0.0.0.0/0"}]
                }
            }]
        });
        std::fs::write(dir.join("cni/10-krun-test.conflist"), conf.to_string()).unwrap();
        net
    }
}

impl Drop for CniNetwork {
    fn drop(&mut self) {
        let _ = std::process::Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
        let _ = std::fs::remove_dir_all(format!("/var/lib/cni/networks/{}", self.name));
    }
}

impl Cri {
    /// RunPodSandbox, retried for a while: containerd loads a CNI
    /// configuration written after its start on its own, a moment later.
    pub fn run_pod_when_ready(&mut self, config: &PodSandboxConfig, handler: &str) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let req = RunPodSandboxRequest {
                config: Some(config.clone()),
                runtime_handler: handler.to_string(),
            };
            match self.try_call(|mut c| async move { c.run_pod_sandbox(req).await }) {
                Ok(r) => return r.pod_sandbox_id,
                Err(s) if Instant::now() > deadline || !s.message().contains("cni") => {
                    panic!("CRI RunPodSandbox: {:?}: {}", s.code(), s.message())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(500)),
            }
        }
    }
}

/// A container of `image` running `args`, logging to NAME.log.
pub fn container_config(name: &str, image: &str, args: &[&str]) -> ContainerConfig {
    ContainerConfig {
        metadata: Some(ContainerMetadata {
            name: name.to_string(),
            attempt: 0,
        }),
        image: Some(ImageSpec {
            image: image.to_string(),
            ..Default::default()
        }),
        command: args.iter().map(|s| s.to_string()).collect(),
        log_path: format!("{name}.log"),
        linux: Some(LinuxContainerConfig::default()),
        ..Default::default()
    }
}
