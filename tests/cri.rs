//! The Kubernetes path: what kubelet does for a pod whose RuntimeClass has
//! the handler `krun`, through containerd's CRI plugin to our shim — a CRI
//! client (tests/src/cri.rs) against a private containerd 2.x.
//!
//! `KRUN_OCI_CRI_HANDLER=runc cargo test --test cri` runs the same test with
//! containerd's runc shim, to validate it (the VM-only checks say so).

use krun_e2e::{self as harness, cgroups, containerd, cri};

use std::time::Instant;

use containerd::{Containerd, BUSYBOX};
use cri::{container_config, pod_config, ContainerState, Cri, LinuxContainerResources};

/// Removes the pod cgroups kubelet would have made (the runtime removes
/// only the sandbox's and the containers' below them).
struct KubeletCgroup(String);

impl Drop for KubeletCgroup {
    fn drop(&mut self) {
        cgroups::remove_with_ancestors(&self.0);
    }
}

fn handler() -> String {
    std::env::var("KRUN_OCI_CRI_HANDLER")
        .ok()
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "krun".into())
}

/// A container that ends with 0 on SIGTERM, after saying so.
const SERVE: &[&str] = &[
    "sh",
    "-c",
    "trap 'echo got TERM; exit 0' TERM; echo ready; while :; do sleep 0.1; done",
];

/// The QEMU processes of this containerd's pods (below their shims).
fn vms_of(c: &Containerd) -> Vec<i32> {
    harness::process::qemus_below(&c.path().to_string_lossy())
}

#[test]
fn a_pod_of_two_containers_runs_in_one_vm() {
    let krun = handler() == "krun";
    let c = Containerd::start("cri-pod");
    let _net = cri::CniNetwork::install(c.path(), 0);
    let mut cri = Cri::connect(&c.address());
    let logs = c.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();

    // The pod, sized as kubelet sizes it: the sum of its containers' limits
    // (containerd forwards them as io.kubernetes.cri.sandbox-* annotations).
    let mut pod = pod_config("krun-pod", &logs);
    pod.linux.as_mut().unwrap().resources = Some(LinuxContainerResources {
        memory_limit_in_bytes: 384 << 20,
        cpu_period: 100_000,
        cpu_quota: 200_000,
        ..Default::default()
    });
    // kubelet's cgroupfs driver names the pod's cgroup; containerd puts
    // the sandbox below it (`<parent>/<sandbox id>`).
    let uid = pod.metadata.as_ref().unwrap().uid.clone();
    let parent = format!("/kubepods/burstable/pod{uid}");
    pod.linux.as_mut().unwrap().cgroup_parent = parent.clone();
    let _kubelet = KubeletCgroup(parent.clone());
    let t0 = Instant::now();
    let pod_id = cri.run_pod_when_ready(&pod, &handler());
    eprintln!("RunPodSandbox took {:?}", t0.elapsed());
    let sandbox_cg = format!("{parent}/{pod_id}");
    let procs = cgroups::dir("memory", &sandbox_cg).join("cgroup.procs");
    let members = std::fs::read_to_string(&procs)
        .unwrap_or_else(|e| panic!("the sandbox's cgroup {}: {e}", procs.display()));
    assert!(!members.trim().is_empty(), "nothing in {}", procs.display());

    // Two long-running containers and one that exits with 3.
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let id = cri.create_container(&pod_id, container_config(name, BUSYBOX, SERVE), &pod);
        cri.start_container(&id);
        ids.push(id);
    }
    let quitter = cri.create_container(
        &pod_id,
        container_config("quitter", BUSYBOX, &["sh", "-c", "echo bye; exit 3"]),
        &pod,
    );
    cri.start_container(&quitter);
    for id in &ids {
        cri.wait_state(id, ContainerState::ContainerRunning);
    }

    // ExecSync in each; both see the same kernel boot: one VM.
    let mut boots = Vec::new();
    let mut namespaces = Vec::new();
    for id in &ids {
        let r = cri.exec_sync(
            id,
            &[
                "sh",
                "-c",
                "cat /proc/sys/kernel/random/boot_id; hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/net; echo err >&2; exit 4",
            ],
        );
        assert_eq!(r.exit_code, 4, "{r:?}");
        assert_eq!(String::from_utf8_lossy(&r.stderr), "err\n");
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        let mut lines = out.lines();
        boots.push(lines.next().unwrap_or_default().to_string());
        assert_eq!(lines.next(), Some("krun-pod"), "hostname of the pod: {out}");
        namespaces.push(lines.map(str::to_string).collect::<Vec<_>>());
    }
    assert_eq!(
        boots[0], boots[1],
        "the pod's containers ran in different kernels"
    );
    // The pod's containers share its IPC and network namespaces.
    assert_eq!(namespaces[0].len(), 2, "{namespaces:?}");
    assert_eq!(
        namespaces[0], namespaces[1],
        "IPC and network namespaces of the pod's containers"
    );
    // Each member's device rules hold (containerd's: deny everything but
    // its default devices and mknod of any): a loop device's node can be
    // made, not opened.
    for id in &ids {
        let r = cri.exec_sync(
            id,
            &[
                "sh",
                "-c",
                "mknod /dev/x b 7 0 && echo made; \
                 if dd if=/dev/x of=/dev/null count=0 2>/dev/err; then echo opens; \
                 else cat /dev/err; fi; rm -f /dev/x /dev/err",
            ],
        );
        assert_eq!(
            String::from_utf8_lossy(&r.stdout),
            "made\ndd: can't open '/dev/x': Operation not permitted\n",
            "{r:?}"
        );
    }
    let host_boot = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").unwrap();
    if krun {
        assert_ne!(
            boots[0],
            host_boot.trim(),
            "the pod runs on the host's kernel"
        );
        // With QEMU, one QEMU process; the built-in VMM is a process of
        // its own below the shim.
        let vms = vms_of(&c);
        let builtin = harness::process::vmm_below(c.shim_pid(&pod_id))
            .is_some_and(|vmm| harness::process::has_thread(vmm, "vcpu0"));
        assert_eq!(
            vms.len(),
            usize::from(!builtin),
            "one VM for the pod: {vms:?}"
        );
        // The VM's whole host side (the shim, QEMU, virtiofsd, every
        // thread) is in the pod's cgroup, below the parent kubelet asked
        // for, in every hierarchy.
        let shim = c.shim_pid(&pod_id);
        // The sandbox's stats are the VM's cost on the host: its host
        // cgroup's, limited to the VM's memory plus the host overhead.
        let metrics = c.ctr_in("k8s.io", &["task", "metrics", &pod_id], None).ok();
        let limit = cgroups::memory_limit(&sandbox_cg).expect("a host memory limit");
        assert_eq!(limit, (384 + 64 + 256) << 20, "{sandbox_cg}");
        assert!(
            metrics.contains(&limit.to_string()),
            "the sandbox's metrics are its host cgroup's (limit {limit}): {metrics}"
        );
        for t in cgroups::task_files(shim) {
            for (line, _) in cgroups::dirs_of(&t).unwrap_or_default() {
                assert!(
                    line.ends_with(&sandbox_cg),
                    "{} is outside {sandbox_cg}: {line}",
                    t.display()
                );
            }
        }
        // The VM is sized from the pod's resources: 384 MiB of limits plus
        // the stated guest overhead (64 MiB), and 2 vCPUs from the quota.
        let r = cri.exec_sync(&ids[0], &["sh", "-c", "grep MemTotal /proc/meminfo; nproc"]);
        let out = String::from_utf8_lossy(&r.stdout).into_owned();
        let kib: u64 = out
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("no MemTotal in {out}"));
        assert!(
            (384 << 10) < kib && kib <= (448 << 10),
            "MemTotal {kib} kB for a 384 MiB pod: {out}"
        );
        assert_eq!(out.lines().nth(1), Some("2"), "vCPUs of a 2-CPU pod: {out}");
        // What the pod's guest sees of the host is the pod directory's
        // share: exactly the pod's running containers, each under its id, in a
        // directory the guest cannot write (so it cannot redirect where a
        // later member's mounts go).
        let share = std::path::Path::new("/run/krun-oci/pods")
            .join(&pod_id)
            .join("s");
        let mut seen: Vec<String> = std::fs::read_dir(&share)
            .unwrap_or_else(|e| panic!("{}: {e}", share.display()))
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        seen.sort();
        // (The quitter's task was deleted when it exited: its paths left.)
        let mut want: Vec<String> = ids.iter().chain([&pod_id]).cloned().collect();
        want.sort();
        assert_eq!(seen, want, "the pod's share holds its containers");
        assert_eq!(
            std::fs::write(share.join("planted"), "x")
                .unwrap_err()
                .raw_os_error(),
            Some(libc::EROFS),
            "the pod's share is read-only where the guest could plant names"
        );
    } else {
        eprintln!(
            "NOTE: handler {} runs no VM: the one-VM, kernel and sizing checks are krun's",
            handler()
        );
    }

    // The exited container's status carries its exit code; its log the output.
    let s = cri.wait_state(&quitter, ContainerState::ContainerExited);
    assert_eq!(s.exit_code, 3, "{s:?}");
    let log = std::fs::read_to_string(logs.join("quitter.log")).unwrap_or_default();
    assert!(log.contains(" stdout F bye"), "quitter.log: {log:?}");

    // StopContainer: SIGTERM reaches the workload, which exits 0 at once
    // (a SIGKILL after the 30 s grace period would give 137).
    let t0 = Instant::now();
    cri.stop_container(&ids[0], 30);
    let s = cri.wait_state(&ids[0], ContainerState::ContainerExited);
    assert_eq!(s.exit_code, 0, "not a graceful stop: {s:?}");
    assert!(
        t0.elapsed().as_secs() < 20,
        "StopContainer waited for the grace period: {:?}",
        t0.elapsed()
    );
    let log = std::fs::read_to_string(logs.join("first.log")).unwrap_or_default();
    assert!(log.contains(" stdout F got TERM"), "first.log: {log:?}");
    // The other container still runs in the pod's VM.
    let r = cri.exec_sync(&ids[1], &["echo", "still here"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "still here\n");
    // One container of the pod paused and resumed through containerd's
    // task API (under krun: its processes frozen in the guest, the VM
    // running on).
    c.ctr_in("k8s.io", &["task", "pause", &ids[1]], None).ok();
    assert_eq!(c.status_in("k8s.io", &ids[1]), "PAUSED");
    c.ctr_in("k8s.io", &["task", "resume", &ids[1]], None).ok();
    assert_eq!(c.status_in("k8s.io", &ids[1]), "RUNNING");
    let r = cri.exec_sync(&ids[1], &["echo", "resumed"]);
    assert_eq!(String::from_utf8_lossy(&r.stdout), "resumed\n");

    for id in ids.iter().chain([&quitter]) {
        cri.stop_container(id, 10);
        cri.remove_container(id);
    }
    cri.stop_pod(&pod_id);
    cri.remove_pod(&pod_id);
    assert!(
        cri.list_pods().is_empty(),
        "pods left: {:?}",
        cri.list_pods()
    );
    if krun {
        let pod_dir = std::path::Path::new("/run/krun-oci/pods").join(&pod_id);
        assert!(
            !pod_dir.exists(),
            "pod directory left behind: {}",
            pod_dir.display()
        );
    }
    for id in ids.iter().chain([&quitter, &pod_id]) {
        c.remember("k8s.io", id);
    }
    c.finish();
}

#[test]
fn a_pod_on_a_cni_network_serves_the_host() {
    let c = Containerd::start("cri-cni");
    let net = cri::CniNetwork::install(c.path(), 1);
    let n = net.n;

    let mut cri = Cri::connect(&c.address());
    let logs = c.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    let pod = pod_config("web-pod", &logs);
    let pod_id = cri.run_pod_when_ready(&pod, &handler());
    let ip = cri.pod_ip(&pod_id);
    assert!(
        ip.starts_with(&format!("10.232.{n}.")),
        "the pod's IP: {ip:?}"
    );
    let web = cri.create_container(
        &pod_id,
        container_config(
            "web",
            BUSYBOX,
            &["sh", "-c", "mkdir -p /www && echo served-from-the-pod > /www/index.html && exec httpd -f -p 80 -h /www"],
        ),
        &pod,
    );
    cri.start_container(&web);
    cri.wait_state(&web, ContainerState::ContainerRunning);
    // The pod answers the host on its IP, through the bridge.
    let deadline = Instant::now() + std::time::Duration::from_secs(60);
    let page = loop {
        let got = (|| -> std::io::Result<String> {
            use std::io::{Read, Write};
            let mut s = std::net::TcpStream::connect((ip.as_str(), 80))?;
            s.set_read_timeout(Some(std::time::Duration::from_secs(10)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut body = String::new();
            s.read_to_string(&mut body)?;
            Ok(body)
        })();
        match got {
            Ok(b) if b.starts_with("HTTP/1") => break b,
            _ if Instant::now() > deadline => panic!("the pod at {ip} never answered: {got:?}"),
            _ => std::thread::sleep(std::time::Duration::from_millis(250)),
        }
    };
    assert!(page.contains("served-from-the-pod"), "{page}");
    let r = cri.exec_sync(&web, &["sh", "-c", "ip -4 addr show eth0"]);
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert!(
        out.contains(&format!("inet {ip}/24")),
        "the guest's eth0: {out}"
    );

    cri.stop_container(&web, 10);
    cri.remove_container(&web);
    cri.stop_pod(&pod_id);
    cri.remove_pod(&pod_id);
    c.remember("k8s.io", &web);
    c.remember("k8s.io", &pod_id);
    c.finish();
}

/// Kubernetes `hostUsers: false`: the pod's containers run in one user
/// namespace with the pod's mappings (container root is a high id
/// outside), the image and containerd's /etc files show their owners as
/// they are inside (idmapped on the host: containerd's `uidmap=` overlay
/// layers and idmapped bind mounts), and a file the container's root
/// creates belongs to the mapped id on the host.
#[test]
fn a_user_namespaced_pod_runs_and_its_files_belong_to_the_mapped_ids() {
    if handler() != "krun" {
        // Debian 12's runc 1.1 has no idmapped mounts, which containerd
        // asks of the runtime for such a pod.
        harness::podman::loud(&format!(
            "NOT RUN under handler {}: its runc cannot idmap mounts (needs runc 1.2)",
            handler()
        ));
        return;
    }
    let c = Containerd::start("cri-userns");
    let _net = cri::CniNetwork::install(c.path(), 3);
    let mut cri = Cri::connect(&c.address());
    let logs = c.path().join("pod-logs");
    std::fs::create_dir_all(&logs).unwrap();
    // As kubelet allocates them: 65536 ids, at a multiple of 65536.
    let host_id = 65536 * 7;
    let map = vec![cri::IdMapping {
        host_id,
        container_id: 0,
        length: 65536,
    }];
    let userns = cri::UserNamespace {
        mode: cri::NamespaceMode::Pod as i32,
        uids: map.clone(),
        gids: map,
    };
    let mut pod = pod_config("krun-userns", &logs);
    let sc = pod
        .linux
        .as_mut()
        .unwrap()
        .security_context
        .as_mut()
        .unwrap();
    sc.namespace_options.as_mut().unwrap().userns_options = Some(userns);
    let pod_id = cri.run_pod_when_ready(&pod, &handler());
    let mut ids = Vec::new();
    for name in ["first", "second"] {
        let mut cc = container_config(name, BUSYBOX, SERVE);
        cc.linux.as_mut().unwrap().security_context = Some(cri::LinuxContainerSecurityContext {
            namespace_options: sc_namespaces(&pod),
            ..Default::default()
        });
        let id = cri.create_container(&pod_id, cc, &pod);
        cri.start_container(&id);
        cri.wait_state(&id, ContainerState::ContainerRunning);
        ids.push(id);
    }
    let script = "id -u; id -g; cat /proc/self/uid_map; stat -c '%u:%g' /bin/busybox /etc/hosts; \
                  touch /made-by-root; readlink /proc/self/ns/user";
    let r = cri.exec_sync(&ids[0], &["sh", "-c", script]);
    let out = String::from_utf8_lossy(&r.stdout).into_owned();
    assert_eq!(
        r.exit_code,
        0,
        "{out} {}",
        String::from_utf8_lossy(&r.stderr)
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["0", "0"], "root inside: {out}");
    let map_line: Vec<&str> = lines[2].split_whitespace().collect();
    assert_eq!(map_line, ["0", &host_id.to_string(), "65536"], "{out}");
    assert_eq!(lines[3..5], ["0:0", "0:0"], "owners as inside: {out}");
    let r = cri.exec_sync(&ids[1], &["readlink", "/proc/self/ns/user"]);
    assert_eq!(
        String::from_utf8_lossy(&r.stdout).trim(),
        lines[5],
        "the pod's containers share its user namespace"
    );
    // On the host the new file belongs to the mapped root.
    use std::os::unix::fs::MetadataExt;
    let made = c
        .path()
        .join("state/io.containerd.runtime.v2.task/k8s.io")
        .join(&ids[0])
        .join("rootfs/made-by-root");
    let md = std::fs::metadata(&made).unwrap_or_else(|e| panic!("{}: {e}", made.display()));
    assert_eq!(
        (md.uid(), md.gid()),
        (host_id, host_id),
        "{}",
        made.display()
    );
    for id in &ids {
        cri.stop_container(id, 10);
        cri.remove_container(id);
    }
    cri.stop_pod(&pod_id);
    cri.remove_pod(&pod_id);
    for id in ids.iter().chain([&pod_id]) {
        c.remember("k8s.io", id);
    }
    c.finish();
}

/// The namespace options of a pod's security context, for its containers.
fn sc_namespaces(pod: &cri::PodSandboxConfig) -> Option<cri::NamespaceOption> {
    pod.linux
        .as_ref()
        .and_then(|l| l.security_context.as_ref())
        .and_then(|s| s.namespace_options.clone())
}
