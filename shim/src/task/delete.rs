//! `delete`: an exec that is done, or a task with everything it leaves on
//! the host (its state directory, its place in a pod's share, its rootfs
//! mount); and the same clean-up after a shim that died.

use std::path::Path;

use containerd_shim::api;
use containerd_shim::protos::events::task::TaskDelete;
use containerd_shim::protos::protobuf::MessageField;
use containerd_shim::protos::topics;
use containerd_shim::TtrpcResult;
use krun_oci::api::Request;
use krun_oci::cgroups::Cgroup;
use krun_oci::state::StateDir;

use super::state::Teardown;
use super::tasks::{Container, Tasks};
use crate::pod::{self, Role};

/// Takes a task out of its pod's share (before its rootfs is unmounted),
/// or the pod's share with its sandbox.
fn leave_pod(role: &Role, id: &str) {
    match role {
        Role::Member(sandbox) => pod::remove_member(sandbox, id),
        Role::Sandbox => pod::remove(id),
        Role::Standalone => {}
    }
}

/// Moves this shim back where it came from and removes the VM's cgroup
/// (its VM is gone: the monitor thread has ended).
fn leave_cgroup(cg: &Cgroup) {
    let _ = cg.leave();
    if let Err(e) = cg.remove() {
        containerd_shim::warn!("removing the VM's host cgroup: {e}");
    }
}

fn unmount_rootfs(bundle: &Path) {
    let _ =
        containerd_shim::mount::umount_recursive(bundle.join("rootfs").to_str(), libc::MNT_DETACH);
}

impl Tasks {
    pub fn delete(&self, id: &str, exec_id: &str) -> TtrpcResult<api::DeleteResponse> {
        let c = self.get(id)?;
        if !exec_id.is_empty() {
            let (pid, x) = c.lock().remove_exec(exec_id)?;
            return Ok(api::DeleteResponse {
                pid,
                exit_status: x.code,
                exited_at: MessageField::some(x.at),
                ..Default::default()
            });
        }
        let teardown = c.lock().teardown(id, c.stream == krun_proto::MAIN_STREAM)?;
        take_down(&c, teardown);
        if let Some(t) = c.thread.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = t.join();
        }
        let x = c.lock().end();
        if let Some(cg) = &c.cgroup {
            leave_cgroup(cg);
        }
        if let Ok(dir) = StateDir::open(&self.root, id) {
            let _ = dir.remove();
        }
        leave_pod(&c.role, id);
        unmount_rootfs(&c.bundle);
        self.remove(id);
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

    /// Cleans up after a shim that died: its VM went with it; what is left
    /// is the container's state directory and its rootfs mount.
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
                // Its processes died with the shim (their parent-death
                // signal); this process never joined the cgroup.
                if let Some(paths) = state.cgroup {
                    if let Err(e) = Cgroup::from_paths(paths).remove() {
                        containerd_shim::warn!("removing the VM's host cgroup: {e}");
                    }
                }
            }
            let _ = dir.remove();
        }
        // Its paths leave the pod's share before its rootfs is unmounted.
        if let Ok(b) = krun_oci::bundle::Bundle::load(bundle) {
            leave_pod(&pod::role(&b.spec), id);
        }
        unmount_rootfs(bundle);
    }
}

/// Ends a task that has not ended yet, as `teardown` says.
fn take_down(c: &Container, teardown: Teardown) {
    match teardown {
        Teardown::Ended => {}
        Teardown::ShutDownVm => {
            let _ = c.call(Request::Shutdown);
        }
        Teardown::KillAndWait => {
            let _ = c.call(Request::Kill {
                signal: libc::SIGKILL,
                all: false,
                stream: c.stream,
            });
            drop(c.wait_until(|inner| inner.exited.is_some()));
        }
    }
}
