//! One VM per pod. The CRI's sandbox (pause) container boots the pod's VM
//! with one extra virtio-fs share, the pod directory; every later container
//! of the pod gets its root and its bind mounts bound into a directory of
//! its own in there (mounts made after the VM booted reach the guest
//! through the share), and guest-init runs it in the same VM, in the pod's
//! IPC and UTS namespaces.

use std::path::{Path, PathBuf};

use containerd_shim::mount::umount_recursive;
use krun_hypervisor::Share;
use krun_proto::{ContainerSetup, MountSource};
use oci_spec::runtime::Spec;

/// The virtio-fs tag of the pod directory.
pub const POD_TAG: &str = "pod";

/// What the CRI says a container is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Role {
    /// Not from the CRI: a task with a VM of its own.
    Standalone,
    /// A pod's sandbox: it boots the pod's VM.
    Sandbox,
    /// A container of the pod with this sandbox id.
    Member(String),
}

pub fn role(spec: &Spec) -> Role {
    let a = spec.annotations().clone().unwrap_or_default();
    match (
        a.get("io.kubernetes.cri.container-type")
            .map(String::as_str),
        a.get("io.kubernetes.cri.sandbox-id"),
    ) {
        (Some("sandbox"), _) => Role::Sandbox,
        (Some("container"), Some(sandbox)) => Role::Member(sandbox.clone()),
        _ => Role::Standalone,
    }
}

pub fn pod_dir(sandbox: &str) -> PathBuf {
    Path::new("/run/krun-oci/pods").join(sandbox)
}

fn mount(src: &Path, target: &Path, flags: libc::c_ulong) -> std::io::Result<()> {
    let c = |p: &Path| {
        std::ffi::CString::new(p.as_os_str().as_encoded_bytes()).map_err(std::io::Error::other)
    };
    let (s, t) = (c(src)?, c(target)?);
    // SAFETY: both strings are NUL-terminated and outlive the call; no
    // filesystem type or data is passed.
    let r = unsafe {
        libc::mount(
            s.as_ptr(),
            t.as_ptr(),
            std::ptr::null(),
            flags,
            std::ptr::null(),
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Makes the pod directory: a shared mount of its own, so that what is
/// mounted in it later also shows in the namespaces of the VM's virtio-fs
/// servers. Returns the share to give the pod's VM.
pub fn prepare(sandbox: &str) -> std::io::Result<Share> {
    let dir = pod_dir(sandbox);
    std::fs::create_dir_all(&dir)?;
    mount(&dir, &dir, libc::MS_BIND)?;
    mount(Path::new("none"), &dir, libc::MS_SHARED)?;
    Ok(Share {
        tag: POD_TAG.to_string(),
        path: dir,
        readonly: false,
    })
}

/// Removes the pod directory and whatever is still mounted in it.
pub fn remove(sandbox: &str) {
    let dir = pod_dir(sandbox);
    let _ = umount_recursive(dir.to_str(), libc::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&dir);
}

/// Moves a member's plan into the pod directory: each of its shares (its
/// root, its bind mount sources) is bound into `POD/ID/sN`, and the setup
/// is rewritten to find them there. Returns the setup to create.
pub fn place_member(
    sandbox: &str,
    shares: &[Share],
    mut setup: ContainerSetup,
) -> std::io::Result<ContainerSetup> {
    let id = setup.id.clone();
    let base = pod_dir(sandbox).join(&id);
    let mut placed = Vec::new();
    let result = (|| {
        for (i, share) in shares.iter().enumerate() {
            let target = base.join(format!("s{i}"));
            std::fs::create_dir_all(&target)?;
            mount(&share.path, &target, libc::MS_BIND | libc::MS_REC)?;
            placed.push(target.clone());
            if share.readonly {
                mount(
                    Path::new("none"),
                    &target,
                    libc::MS_BIND | libc::MS_REMOUNT | libc::MS_RDONLY,
                )?;
            }
        }
        Ok::<(), std::io::Error>(())
    })();
    if let Err(e) = result {
        remove_member(sandbox, &id);
        return Err(e);
    }
    let index = |tag: &str| shares.iter().position(|s| s.tag == tag).unwrap_or(0);
    setup.root.path = format!("{id}/s{}", index(&setup.root.tag));
    setup.root.tag = POD_TAG.to_string();
    for m in &mut setup.mounts {
        if let MountSource::Share { tag, path, .. } = &mut m.source {
            let sub = format!("{id}/s{}", index(tag));
            *path = if path.is_empty() {
                sub
            } else {
                format!("{sub}/{path}")
            };
            *tag = POD_TAG.to_string();
        }
    }
    setup.share_with = Some(sandbox.to_string());
    Ok(setup)
}

/// Unbinds and removes a member's directory in the pod directory.
pub fn remove_member(sandbox: &str, id: &str) {
    let dir = pod_dir(sandbox).join(id);
    let _ = umount_recursive(dir.to_str(), libc::MNT_DETACH);
    let _ = std::fs::remove_dir_all(&dir);
}
