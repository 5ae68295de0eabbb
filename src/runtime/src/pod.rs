//! Containers that join another container's namespaces: every container
//! of a podman pod but its infra container (`"path": "/proc/PID/ns/ipc"`,
//! PID the infra container's), and `podman run --ipc/--uts/--network
//! container:X`. A VM cannot enter a namespace of the host, so such a
//! container runs in the VM of the container it names (its *leader*), as
//! the shim runs a Kubernetes pod's containers in the pod's VM: its root
//! and volumes are bound into the leader's share and guest-init creates it
//! beside the leader, in the leader's IPC and UTS namespaces, on the VM's
//! one network. Any other namespace path is refused, naming its field.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use oci_spec::runtime::{LinuxNamespaceType, Spec};

use crate::container::Existing;
use crate::error::{Error, Result, ResultExt as _};
use crate::staging::{ContainerPaths, Staging, Trees};
use crate::state::Status;

/// The namespaces a container can share with another of its VM.
const SHARED: [LinuxNamespaceType; 4] = [
    LinuxNamespaceType::Network,
    LinuxNamespaceType::Ipc,
    LinuxNamespaceType::Uts,
    LinuxNamespaceType::User,
];

fn kind(t: LinuxNamespaceType) -> &'static str {
    match t {
        LinuxNamespaceType::Mount => "mount",
        LinuxNamespaceType::Cgroup => "cgroup",
        LinuxNamespaceType::Uts => "uts",
        LinuxNamespaceType::Ipc => "ipc",
        LinuxNamespaceType::User => "user",
        LinuxNamespaceType::Pid => "pid",
        LinuxNamespaceType::Network => "network",
        LinuxNamespaceType::Time => "time",
    }
}

/// The pid in a `/proc/PID/ns/NAME` path.
fn proc_pid(path: &Path) -> Option<i32> {
    let rest = path.to_str()?.strip_prefix("/proc/")?;
    let (pid, ns) = rest.split_once('/')?;
    let name = ns.strip_prefix("ns/")?;
    (!name.is_empty() && !name.contains('/')).then_some(())?;
    pid.parse().ok().filter(|p| *p > 0)
}

/// The id of the live container of `root` whose process is `pid`; for a
/// container that itself runs in another's VM, that other's (its VM is
/// the one to join).
fn container_with_pid(root: &Path, pid: i32) -> Option<String> {
    for e in std::fs::read_dir(root).ok()?.flatten() {
        let id = e.file_name().to_string_lossy().into_owned();
        let Ok(c) = Existing::open(root, &id) else {
            continue;
        };
        if c.state.pid == Some(pid) && c.status() != Status::Stopped {
            return Some(c.state.member.map(|m| m.leader).unwrap_or(id));
        }
    }
    None
}

/// What `spec`'s namespace paths ask for: None, a VM of its own; or the
/// container (created or running) in whose VM it runs. Errors name each
/// namespace that cannot be honoured.
pub fn leader_of(spec: &Spec, root: &Path) -> Result<Option<Existing>> {
    let Some(namespaces) = spec.linux().as_ref().and_then(|l| l.namespaces().as_ref()) else {
        return Ok(None);
    };
    let mut leader: Option<String> = None;
    let mut problems = Vec::new();
    let mut other_network = None;
    for (i, n) in namespaces.iter().enumerate() {
        let Some(path) = n.path() else {
            continue;
        };
        let t = n.typ();
        let field = format!("linux.namespaces[{i}] ({} {})", kind(t), path.display());
        let owner = proc_pid(path).and_then(|pid| container_with_pid(root, pid));
        // Joining another user namespace is refused with the user
        // mappings; a leader's is joined in its VM.
        if t == LinuxNamespaceType::User && owner.is_none() {
            continue;
        }
        match owner {
            Some(id) if SHARED.contains(&t) => match &leader {
                Some(l) if *l != id => problems.push(format!(
                    "{field}: names container {id:?}, but another namespace names {l:?}: a \
                     container can join one other container's VM only"
                )),
                _ => leader = Some(id),
            },
            Some(id) => problems.push(format!(
                "{field}: the containers of one VM share its network, IPC, UTS and user \
                 namespaces only; a {} namespace of container {id:?} cannot be joined",
                kind(t)
            )),
            // A network namespace of the host is the VM's to carry in.
            None if t == LinuxNamespaceType::Network => other_network = Some(field),
            None => problems.push(format!(
                "{field}: not a namespace of a krun-oci container; a container runs in a VM \
                 of its own and can join only another krun-oci container's network, IPC and \
                 UTS namespaces (a pod's)"
            )),
        }
    }
    if let (Some(l), Some(field)) = (&leader, other_network) {
        problems.push(format!(
            "{field}: the container runs in the VM of container {l:?} and so on its network; \
             it cannot have another network namespace"
        ));
    }
    if !problems.is_empty() {
        return Err(Error::Invalid(problems.join("; ")));
    }
    let Some(id) = leader else {
        return Ok(None);
    };
    let c = Existing::open(root, &id)?;
    match c.status() {
        Status::Created | Status::Running => Ok(Some(c)),
        status => Err(Error::Invalid(format!(
            "linux.namespaces: container {id:?}, whose namespaces this container joins, is {status}"
        ))),
    }
}

/// A container in another's VM joins that VM's container's user
/// namespace, which its spec names by a path of the host (CRI: the
/// sandbox's `/proc/PID/ns/user`; podman: the infra container's): the
/// path goes, the mappings stay, and guest-init, seeing the leader has a
/// user namespace, joins it instead of making one.
pub fn forget_user_ns_path(spec: &mut Spec) {
    let Some(linux) = spec.linux().clone() else {
        return;
    };
    let Some(mut namespaces) = linux.namespaces().clone() else {
        return;
    };
    for n in namespaces.iter_mut() {
        if n.typ() == LinuxNamespaceType::User {
            n.set_path(None);
        }
    }
    let mut linux = linux;
    linux.set_namespaces(Some(namespaces));
    spec.set_linux(Some(linux));
}

/// Where the leader's monitor composed its VM's share.
fn share_dir(leader: &Existing) -> PathBuf {
    leader.dir.dir.join("share")
}

/// Binds a member's root and volumes into its leader's share, under the
/// member's id. The leader's monitor has a mount namespace of its own: the
/// trees are cloned here, in ours (where the engine mounted them), and
/// attached there by a child that enters it.
pub fn place(leader: &Existing, paths: &ContainerPaths) -> Result<()> {
    let trees = Trees::clone_from(paths)?;
    let dir = share_dir(leader);
    in_mount_ns_of(leader, move || {
        Staging::open(&dir)
            .and_then(|s| s.add_trees(paths, trees))
            .map_err(|e| e.to_string())
    })
}

/// Unbinds member `id` from the share of its leader `leader`, if the
/// leader still runs (its share goes with its VM otherwise).
pub fn leave(root: &Path, leader: &str, id: &str) {
    let Ok(l) = Existing::open(root, leader) else {
        return;
    };
    if l.status() == Status::Stopped {
        return;
    }
    let dir = share_dir(&l);
    let r = in_mount_ns_of(&l, || {
        Staging::open(&dir)
            .map(|s| s.remove(id))
            .map_err(|e| e.to_string())
    });
    if let Err(e) = r {
        tracing::warn!(container = %id, leader = %leader, "leaving the VM's share: {}", e.message());
    }
}

/// Runs `f` in a child that entered the mount namespace of `leader`'s
/// monitor; its error comes back as this one's. Only while no other
/// thread runs.
fn in_mount_ns_of(
    leader: &Existing,
    f: impl FnOnce() -> std::result::Result<(), String>,
) -> Result<()> {
    let pid = leader
        .state
        .monitor
        .as_ref()
        .filter(|m| m.alive())
        .map(|m| m.pid)
        .ok_or_else(|| Error::Failed(format!("container {:?}: its VM is gone", leader.id)))?;
    let ns = File::open(format!("/proc/{pid}/ns/mnt"))
        .with_context(|| format!("container {:?}: opening its mount namespace", leader.id))?;
    let (mut report_r, mut report_w) = std::io::pipe().context("creating a pipe")?;
    // SAFETY: no other thread runs in this process; the child only runs
    // `f` and exits.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("cannot fork"),
        0 => {
            drop(report_r);
            let r = nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNS)
                .map_err(|e| format!("entering the mount namespace of the VM's monitor: {e}"))
                .and_then(|()| f());
            let code = match r {
                Ok(()) => 0,
                Err(m) => {
                    let _ = report_w.write_all(m.as_bytes());
                    1
                }
            };
            // SAFETY: _exit ends the child without running the parent's
            // destructors a second time.
            unsafe { libc::_exit(code) }
        }
        child => {
            drop(report_w);
            let mut report = String::new();
            let _ = report_r.read_to_string(&mut report);
            let mut status = 0;
            // SAFETY: waitpid on our own child, into a local.
            unsafe { libc::waitpid(child, &mut status, 0) };
            if libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0 {
                Ok(())
            } else if report.is_empty() {
                Err(Error::Failed(format!(
                    "container {:?}: the helper that enters its VM's share died",
                    leader.id
                )))
            } else {
                Err(Error::Failed(report))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_proc_namespace_paths_name_a_pid() {
        assert_eq!(proc_pid(Path::new("/proc/8447/ns/ipc")), Some(8447));
        assert_eq!(proc_pid(Path::new("/proc/1/ns/net")), Some(1));
        for p in [
            "/run/netns/netns-1",
            "/proc/self/ns/net",
            "/proc/0/ns/net",
            "/proc/12/ns/",
            "/proc/12/ns/net/x",
            "/proc/12/task/12/ns/net",
            "/proc/-3/ns/net",
        ] {
            assert_eq!(proc_pid(Path::new(p)), None, "{p}");
        }
    }
}
