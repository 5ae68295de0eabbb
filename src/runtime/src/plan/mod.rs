//! The pure translation of a bundle into a VM: `Spec -> VmPlan`.
//!
//! Nothing here starts anything. Every field of config.json is either
//! carried into the plan, deliberately ignored (it has no meaning inside a
//! VM, e.g. a mount's SELinux relabelling), or reported as unsupported — all
//! problems of a bundle at once, each naming its field.

mod device_rules;
mod devices;
mod host;
pub mod host_cgroup;
mod mounts;
mod process;
mod sizing;
mod userns;

pub(crate) use sizing::shares_to_weight;

use std::path::Path;

use krun_proto::{ContainerSetup, RootSetup, SHARE_TAG};
use oci_spec::runtime::Spec;

use crate::staging::{self, ContainerPaths, HostBind};

pub use host::{HOST_OVERHEAD_MIB, HOST_PIDS_MAX};
pub use sizing::{
    HostInfo, ANNOTATION_MEMORY_MIB, ANNOTATION_VCPUS, DEFAULT_MEMORY_MIB, GUEST_OVERHEAD_MIB,
};

/// Annotation that picks the hypervisor backend (`builtin` or `qemu`).
pub const ANNOTATION_HYPERVISOR: &str = "io.krun-oci.hypervisor";

/// Annotation that refuses to run the container without hardware
/// virtualization (`true`): no fallback to TCG emulation.
pub const ANNOTATION_REQUIRE_KVM: &str = "io.krun-oci.require_kvm";
/// `true`: start this container's VM from a template (on the built-in
/// VMM); `false`: boot it cold.
pub const ANNOTATION_TEMPLATE: &str = "io.krun-oci.template";

/// The hypervisor backends.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum HypervisorKind {
    /// krun-oci's own VMM on KVM.
    Builtin,
    /// QEMU `-M microvm`, with KVM or TCG.
    Qemu,
}

impl std::str::FromStr for HypervisorKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "builtin" => Ok(HypervisorKind::Builtin),
            "qemu" => Ok(HypervisorKind::Qemu),
            other => Err(format!(
                "unknown hypervisor {other:?} (want builtin or qemu)"
            )),
        }
    }
}

/// A VM to boot and the container guest-init sets up in it.
#[derive(Debug, Clone)]
pub struct VmPlan {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// What of the host the container is given (its root, then each bind
    /// mount's source), to be composed into the VM's one share.
    pub paths: ContainerPaths,
    pub setup: ContainerSetup,
    /// The backend the bundle asks for, if it does.
    pub hypervisor: Option<HypervisorKind>,
    /// The bundle refuses TCG emulation ([`ANNOTATION_REQUIRE_KVM`]).
    pub require_kvm: bool,
    /// Whether the VM starts from a template ([`ANNOTATION_TEMPLATE`];
    /// None: unless `KRUN_OCI_TEMPLATES=0`; see [`crate::template`]).
    pub template: Option<bool>,
    /// The network namespace (`linux.namespaces`, type network, with a
    /// path) whose network the VM carries in; see [`crate::net`].
    pub netns: Option<std::path::PathBuf>,
    /// Fields accepted but not applied inside the VM, for the log.
    pub warnings: Vec<String>,
    /// The limits of the container's host side (its host cgroup).
    pub host: crate::cgroups::HostResources,
    /// Where the host cgroup is, once the launcher has created it (the
    /// plan itself creates nothing): the monitor records it in the state.
    pub host_cgroup: Option<crate::cgroups::CgroupPaths>,
}

/// One thing wrong with a bundle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub field: String,
    pub problem: String,
}

/// Everything wrong with a bundle, each problem naming its field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", .0.iter().map(|p| format!("{}: {}", p.field, p.problem)).collect::<Vec<_>>().join("; "))]
pub struct PlanError(pub Vec<Problem>);

impl PlanError {
    /// Every problem's field, in the order found, for tests and
    /// structured logs.
    pub fn fields(&self) -> Vec<&str> {
        self.0.iter().map(|p| p.field.as_str()).collect()
    }
}

/// Collects problems while planning.
#[derive(Default)]
pub(crate) struct Problems(Vec<Problem>);

impl Problems {
    pub fn add(&mut self, field: impl Into<String>, problem: impl Into<String>) {
        self.0.push(Problem {
            field: field.into(),
            problem: problem.into(),
        });
    }
}

/// The process of an `exec` (a process.json, or the container's own process
/// adjusted by exec's flags) as guest-init takes it.
pub fn exec_process(p: &oci_spec::runtime::Process) -> Result<krun_proto::ProcessSetup, PlanError> {
    let mut problems = Problems::default();
    let setup = process::process_setup(p, &mut problems);
    if problems.0.is_empty() {
        Ok(setup)
    } else {
        Err(PlanError(problems.0))
    }
}

/// Plans the VM for container `id` from the bundle at `bundle` (absolute).
pub fn plan(id: &str, bundle: &Path, spec: &Spec, host: &HostInfo) -> Result<VmPlan, PlanError> {
    let mut problems = Problems::default();
    let mut warnings = Vec::new();

    // The root filesystem first, then the bind sources.
    let mut binds = Vec::new();
    let mut root_setup = RootSetup {
        tag: SHARE_TAG.to_string(),
        path: staging::root_path(id),
        readonly: false,
        propagation: mounts::root_propagation(spec, &mut problems),
    };
    match spec.root() {
        None => problems.add("root", "missing: the bundle must name its root filesystem"),
        Some(root) => {
            let path = root_path(bundle, root.path());
            if !path.is_dir() {
                problems.add(
                    "root.path",
                    format!("{} does not exist or is not a directory", path.display()),
                );
            } else if let Some(real) = through_a_symlink(&path) {
                problems.add(
                    "root.path",
                    format!(
                        "{} is a symlink or goes through one (it resolves to {}): as runc \
                         requires, name the root filesystem by its real path",
                        path.display(),
                        real.display()
                    ),
                );
            }
            root_setup.readonly = root.readonly().unwrap_or(false);
            // Bound writable even when root.readonly: as under runc, mount
            // points for the bundle's mounts are created in the rootfs first,
            // then the guest makes its view of / read-only.
            binds.push(HostBind {
                name: "rootfs".into(),
                field: "root.path".into(),
                source: path,
                readonly: false,
                file: false,
                idmap: None,
            });
        }
    }

    for (field, path) in crate::hooks::relative_paths(spec) {
        problems.add(
            field,
            format!("must be absolute, as the runtime-spec requires (got {path:?})"),
        );
    }

    let process = process::plan_process(spec, &mut problems);
    let mounts = mounts::plan_mounts(spec, id, bundle, &mut binds, &mut problems);
    let (vcpus, memory_mib, cgroup) = sizing::plan_sizing(spec, host, &mut problems);
    let linux = linux_extras(spec, &mut problems, &mut warnings);
    let devices = devices::plan_devices(spec, host.capabilities, &mut problems, &mut warnings);
    let device_rules = device_rules::plan_device_rules(spec, &devices, &mut problems);
    let user_ns = userns::plan_user_ns(spec, &mut problems, &mut warnings);
    let has_netns = spec
        .linux()
        .as_ref()
        .and_then(|l| l.namespaces().as_ref())
        .is_some_and(|ns| {
            ns.iter()
                .any(|n| n.typ() == oci_spec::runtime::LinuxNamespaceType::Network)
        });
    if !has_netns {
        problems.add(
            "linux.namespaces",
            "no network namespace: the container would share the host's network, which a VM \
             cannot; give it one (podman: not --network host; Kubernetes: not hostNetwork)",
        );
    }
    let hypervisor = spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_HYPERVISOR))
        .and_then(|v| {
            v.parse::<HypervisorKind>()
                .map_err(|e| problems.add(format!("annotations[{ANNOTATION_HYPERVISOR:?}]"), e))
                .ok()
        });
    let require_kvm = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_REQUIRE_KVM))
        .map(String::as_str)
    {
        None | Some("false") => false,
        Some("true") => true,
        Some(other) => {
            problems.add(
                format!("annotations[{ANNOTATION_REQUIRE_KVM:?}]"),
                format!("{other:?} is neither true nor false"),
            );
            false
        }
    };
    let template = match spec
        .annotations()
        .as_ref()
        .and_then(|a| a.get(ANNOTATION_TEMPLATE))
        .map(String::as_str)
    {
        None => None,
        Some("true") => Some(true),
        Some("false") => Some(false),
        Some(other) => {
            problems.add(
                format!("annotations[{ANNOTATION_TEMPLATE:?}]"),
                format!("{other:?} is neither true nor false"),
            );
            None
        }
    };

    if !problems.0.is_empty() {
        return Err(PlanError(problems.0));
    }
    let setup = ContainerSetup {
        id: id.to_string(),
        realtime_ns: 0,
        entropy: Vec::new(),
        // Without a name of its own, a container sees the host's, as under
        // runc; one that joins another's UTS namespace (a pod's) keeps that.
        hostname: spec.hostname().clone().or_else(|| {
            let joins_uts = spec
                .linux()
                .as_ref()
                .and_then(|l| l.namespaces().as_ref())
                .is_some_and(|ns| {
                    ns.iter().any(|n| {
                        n.typ() == oci_spec::runtime::LinuxNamespaceType::Uts && n.path().is_some()
                    })
                });
            Some(host.hostname.clone()).filter(|h| !h.is_empty() && !joins_uts)
        }),
        domainname: spec.domainname().clone(),
        share_with: None,
        root: root_setup,
        mounts,
        process,
        cgroup,
        sysctl: linux.sysctl,
        masked_paths: linux.masked_paths,
        readonly_paths: linux.readonly_paths,
        devices,
        network: None,
        user_ns,
        device_rules,
    };
    if let Some(p) = setup_too_large(&setup) {
        return Err(PlanError(vec![p]));
    }
    Ok(VmPlan {
        host: host::plan_host(spec, memory_mib),
        host_cgroup: None,
        vcpus,
        memory_mib,
        paths: ContainerPaths {
            id: id.to_string(),
            binds,
        },
        setup,
        hypervisor,
        require_kvm,
        template,
        netns: linux.netns,
        warnings,
    })
}

/// `root.path` on the host: as under runc, a relative one is taken from
/// the bundle directory's real path (runc resolves it from its working
/// directory, which is the bundle's).
fn root_path(bundle: &Path, root: &Path) -> std::path::PathBuf {
    if root.is_absolute() {
        return root.to_path_buf();
    }
    bundle
        .canonicalize()
        .unwrap_or_else(|_| bundle.to_path_buf())
        .join(root)
}

/// Where `path` really is, if that is not `path` itself (lexically
/// cleaned): a symlink on the way. runc refuses such a root ("invalid
/// rootfs: not an absolute path, or a symlink"): the VM's share is made of
/// the path as given, and virtiofsd's sandbox would refuse it later with a
/// far less clear error.
fn through_a_symlink(path: &Path) -> Option<std::path::PathBuf> {
    use std::path::Component;
    let mut clean = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                clean.pop();
            }
            other => clean.push(other),
        }
    }
    let real = path.canonicalize().ok()?;
    (real != clean).then_some(real)
}

/// Room kept in the guest's first control message for what the monitor
/// adds to the setup at launch (the network's addresses and routes).
const SETUP_SLACK: usize = 16 << 10;

/// The container's setup goes to the guest in one control message, which
/// may carry [`krun_proto::MAX_PAYLOAD`] bytes: a larger one is a problem
/// of the field that takes the most room (10,000 mounts), found here,
/// before anything is started.
fn setup_too_large(setup: &ContainerSetup) -> Option<Problem> {
    fn size<T: serde::Serialize + ?Sized>(v: &T) -> usize {
        serde_json::to_vec(v).map_or(usize::MAX, |b| b.len())
    }
    let limit = krun_proto::MAX_PAYLOAD - SETUP_SLACK;
    let total = size(&krun_proto::ToGuest::Create(Box::new(setup.clone())));
    if total <= limit {
        return None;
    }
    let n = |what: &str, len: usize| format!("{len} {what}");
    let parts = [
        (
            "mounts",
            size(&setup.mounts),
            n("mounts", setup.mounts.len()),
        ),
        (
            "process.env",
            size(&setup.process.env),
            n("variables", setup.process.env.len()),
        ),
        (
            "process.args",
            size(&setup.process.args),
            n("arguments", setup.process.args.len()),
        ),
        (
            "linux.maskedPaths",
            size(&setup.masked_paths),
            n("paths", setup.masked_paths.len()),
        ),
        (
            "linux.readonlyPaths",
            size(&setup.readonly_paths),
            n("paths", setup.readonly_paths.len()),
        ),
        (
            "linux.devices",
            size(&setup.devices),
            n("devices", setup.devices.len()),
        ),
        (
            "linux.sysctl",
            size(&setup.sysctl),
            n("settings", setup.sysctl.len()),
        ),
    ];
    let (field, bytes, what) = parts.into_iter().max_by_key(|p| p.1)?;
    Some(Problem {
        field: field.to_string(),
        problem: format!(
            "too large for the VM: {what} take {bytes} of the {total} bytes of the container's \
             setup, which must fit in one {limit}-byte message to the guest"
        ),
    })
}

#[derive(Default)]
struct LinuxExtras {
    sysctl: std::collections::BTreeMap<String, String>,
    masked_paths: Vec<String>,
    readonly_paths: Vec<String>,
    netns: Option<std::path::PathBuf>,
}

/// The parts of `linux` that are not sizing: sysctls, masked and read-only
/// paths, and the ones a VM cannot honour.
fn linux_extras(spec: &Spec, problems: &mut Problems, warnings: &mut Vec<String>) -> LinuxExtras {
    let mut out = LinuxExtras::default();
    let Some(linux) = spec.linux() else {
        return out;
    };
    if let Some(s) = linux.sysctl() {
        out.sysctl = s.iter().map(|(k, v)| (k.clone(), v.clone())).collect();
    }
    out.masked_paths = linux.masked_paths().clone().unwrap_or_default();
    out.readonly_paths = linux.readonly_paths().clone().unwrap_or_default();
    if linux.intel_rdt().is_some() {
        problems.add("linux.intelRdt", "not supported inside a VM");
    }
    if linux.personality().is_some() {
        problems.add("linux.personality", "not supported");
    }
    if linux.seccomp().is_some() {
        warnings.push(
            "linux.seccomp: not applied inside the VM yet; the VM is the isolation boundary".into(),
        );
    }
    if let Some(ns) = linux.namespaces() {
        use oci_spec::runtime::LinuxNamespaceType;
        for n in ns {
            if n.typ() == LinuxNamespaceType::Network {
                out.netns = n.path().clone();
            }
        }
    }
    out
}

#[cfg(test)]
mod tests;
