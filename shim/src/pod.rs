//! One VM per pod. The CRI's sandbox (pause) container boots the pod's VM,
//! whose one virtio-fs share is composed in the pod directory; every later
//! container of the pod gets its root and its bind mounts bound in there
//! under its id (mounts made after the VM booted reach the guest through
//! the share), and guest-init runs it in the same VM, in the pod's IPC and
//! UTS namespaces. The guest cannot write the pod directory itself, so it
//! cannot redirect where a later member's mounts go.

use std::path::{Path, PathBuf};

use krun_oci::staging::{self, ContainerPaths, Staging, StagingError};
use krun_proto::ContainerSetup;
use oci_spec::runtime::Spec;

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

/// The pod's VM composes its share in the pod directory (see
/// [`krun_oci::staging`]): the sandbox's root first, each later member's
/// root and volumes bound in beside it under the member's id.
pub fn share_dir(sandbox: &str) -> PathBuf {
    pod_dir(sandbox)
}

/// Unmounts and removes the pod directory (the sandbox's monitor does it
/// when the pod's VM ends; this is for `delete` after a crash).
pub fn remove(sandbox: &str) {
    staging::teardown(&pod_dir(sandbox));
}

/// Binds a member's root and volumes into the pod's share; its setup
/// already names them there (`ID/rootfs`, `ID/mN`). Returns the setup to
/// create, joined to the sandbox's namespaces.
pub fn place_member(
    sandbox: &str,
    paths: &ContainerPaths,
    mut setup: ContainerSetup,
) -> Result<ContainerSetup, StagingError> {
    Staging::open(&pod_dir(sandbox))?.add(paths)?;
    setup.share_with = Some(sandbox.to_string());
    Ok(setup)
}

/// Unbinds a member's paths from the pod's share.
pub fn remove_member(sandbox: &str, id: &str) {
    if let Ok(st) = Staging::open(&pod_dir(sandbox)) {
        st.remove(id);
    }
}
