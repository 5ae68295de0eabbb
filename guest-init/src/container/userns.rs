//! The container's user namespace (runtime-spec `linux.uidMappings` and
//! `gidMappings`), with the guest kernel's initial namespace in the host's
//! place.
//!
//! The design, and why: guest-init makes the container's filesystem (the
//! virtio-fs root and shares, which only the initial namespace may mount,
//! /proc, tmpfs, /dev) in the initial user namespace, as for any container,
//! giving the container's root what runc's container root would own:
//! tmpfs roots, `uid=`/`gid=` mount options and the owners of
//! `linux.devices` nodes go through the maps (`mounts::owned_data`).
//! Only then the container process leaves for its own user namespace:
//! `unshare(CLONE_NEWUSER)`, guest-init (its parent, outside) writes the
//! maps, the process becomes the namespace's root (as runc's init does
//! before anything else; so container id 0 must be mapped, which the plan
//! checks), and a new mount namespace owned by the user namespace takes a
//! copy of the finished tree, so that the container's root may mount in it
//! as under runc. devpts is mounted then, from inside, as runc mounts it:
//! its `gid=5` is a container id (Linux 6.1's devpts could not take the
//! outside id of podman's `--userns=auto` ranges, above 2^31). Process
//! rlimits are set before, from outside, as runc sets them; setgroups stays
//! allowed, as runc leaves it when run by root.
//!
//! Creating the user namespace first (runc's order) would leave guest-init
//! unable to mount virtio-fs and split the mount code over two processes;
//! the result inside is the same: `id` says 0, /proc/self/uid_map is the
//! spec's, files the container's root creates belong to the mapped ids on
//! the host (the guest kernel sends the outside ids in its FUSE requests).
//! What differs: the PID, UTS, IPC and cgroup namespaces stay owned by the
//! initial user namespace, so the container's root cannot set its hostname
//! or namespaced sysctls itself (runc's can); the bundle's are applied.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use krun_proto::{id_map_text, UserNsSetup};

use crate::failure::{Failure, OrFail};
use crate::sys;

/// guest-init's ends of the two pipes of the hand-over.
pub struct Outside {
    unshared: OwnedFd,
    mapped: OwnedFd,
}

/// The container process's ends.
pub struct Inside {
    unshared: OwnedFd,
    mapped: OwnedFd,
}

/// The pipes for one container process.
pub fn pipes() -> Result<(Outside, Inside), Failure> {
    let (unshared_r, unshared_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    let (mapped_r, mapped_w) = sys::pipe().or_fail(|| "creating a pipe".into())?;
    Ok((
        Outside {
            unshared: unshared_r,
            mapped: mapped_w,
        },
        Inside {
            unshared: unshared_w,
            mapped: mapped_r,
        },
    ))
}

impl Inside {
    /// In the container process: into a new user namespace, wait for
    /// guest-init to write its maps, then into a new mount namespace owned
    /// by it, with a copy of the container's tree.
    pub fn enter(self) -> Result<(), Failure> {
        sys::unshare(libc::CLONE_NEWUSER)
            .or_fail(|| "creating the container's user namespace".into())?;
        File::from(self.unshared)
            .write_all(b"u")
            .or_fail(|| "asking for the user namespace's id maps".into())?;
        let mut b = [0u8; 1];
        if File::from(self.mapped).read(&mut b).unwrap_or(0) != 1 {
            return Err(Failure::new(
                1,
                "linux.uidMappings: the user namespace's id maps were not written",
            ));
        }
        become_root()?;
        sys::unshare(libc::CLONE_NEWNS)
            .or_fail(|| "creating a mount namespace in the user namespace".into())
    }
}

/// The user namespace a container process goes into.
pub enum UserNs {
    /// A new one, whose maps guest-init writes.
    New(Inside),
    /// The one of the pod's container it shares the VM with (the same
    /// maps, checked), as a pod's containers share the sandbox's.
    Join(File),
}

impl UserNs {
    /// In the container process: into the user namespace, as its root,
    /// then into a new mount namespace owned by it, with a copy of the
    /// container's tree.
    pub fn enter(self) -> Result<(), Failure> {
        match self {
            UserNs::New(inside) => inside.enter(),
            UserNs::Join(ns) => {
                sys::setns(&ns, libc::CLONE_NEWUSER)
                    .or_fail(|| "joining the pod's user namespace".into())?;
                become_root()?;
                sys::unshare(libc::CLONE_NEWNS)
                    .or_fail(|| "creating a mount namespace in the user namespace".into())
            }
        }
    }
}

/// Makes the caller, just arrived in a user namespace, its root, as runc's
/// init does before anything else: what it creates from here (a cwd, the
/// terminal) is the container root's, never the unmapped outside root's.
pub fn become_root() -> Result<(), Failure> {
    sys::setresgid(0)
        .or_fail(|| "linux.gidMappings: becoming root (gid 0) in the user namespace".into())?;
    sys::setresuid(0)
        .or_fail(|| "linux.uidMappings: becoming root (uid 0) in the user namespace".into())
}

impl Outside {
    /// In guest-init: once the process `pid` is in its new user namespace,
    /// writes the maps and lets it go on. A process that failed before
    /// (closed its end) is left to report why.
    pub fn map(self, pid: i32, ns: &UserNsSetup) -> Result<(), Failure> {
        let mut b = [0u8; 1];
        if File::from(self.unshared).read(&mut b).unwrap_or(0) != 1 {
            return Ok(());
        }
        let write = |file: &str, text: String, field: &str| {
            std::fs::write(format!("/proc/{pid}/{file}"), text)
                .or_fail(|| format!("{field}: writing the container's {file}"))
        };
        write("uid_map", id_map_text(&ns.uid_map), "linux.uidMappings")?;
        write("gid_map", id_map_text(&ns.gid_map), "linux.gidMappings")?;
        File::from(self.mapped)
            .write_all(b"m")
            .or_fail(|| "handing the user namespace over".into())
    }
}
