//! `plan`: a bundle's config.json, as whoever wrote the bundle wrote it,
//! through the runtime's bundle loading and planning.
//!
//! Drives: `krun_oci::bundle::parse_spec` on the input bytes, then, for a
//! spec that parses, `krun_oci::plan::plan` for a bundle directory holding
//! a `rootfs/` and a few bind-mount sources, with a fixed fake `HostInfo`
//! (4 CPUs, 8 GiB), and `krun_oci::plan::exec_process` on its process.
//!
//! Invariants:
//! * no panic (arithmetic overflow included: fuzz builds check it);
//! * a spec that does not parse is an error that names config.json;
//! * a plan that fails is a `PlanError` with at least one problem, each
//!   naming a field of the runtime spec (its first component is one of
//!   the spec's top-level keys) and saying something;
//! * a plan that succeeds sizes the VM within the host (1 to 4 vCPUs,
//!   64 MiB to 8 GiB), gives the container its root filesystem first and
//!   each host path under a name of its own, and its container setup
//!   survives the JSON trip to the guest unchanged and fits in the one
//!   control frame that carries it, and its host memory limit is the VM's
//!   plus the host overhead;
//! * every device a plan gives the container (`linux.devices`) has an
//!   absolute path, permission bits only, and the type and numbers of a
//!   device the guest kernel provides (memory devices, tty, ptmx, fuse,
//!   tun, loop-control, loop): nothing else of the host reaches the guest;
//! * the device rules a plan sends (`linux.resources.devices`) are settled
//!   as runc's emulator leaves them: none, or only deny exceptions, or one
//!   deny-everything rule first and only allow exceptions after it, each
//!   with access a non-empty subset of "rwm";
//! * `linux.cgroupsPath`, read as runc reads it with and without
//!   `--systemd-cgroup`, never names a path that climbs (`..`), is rooted
//!   or is empty below a hierarchy's root.
#![no_main]

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use krun_oci::bundle::parse_spec;
use krun_oci::plan::host_cgroup::{host_cgroup, HostCgroup};
use krun_oci::plan::{exec_process, plan, HostInfo, PlanError, HOST_OVERHEAD_MIB};
use krun_proto::{DeviceType, ToGuest};
use libfuzzer_sys::fuzz_target;

/// The runtime spec's top-level keys: every problem's field starts with
/// one of them.
const TOP_LEVEL: &[&str] = &[
    "ociVersion",
    "process",
    "root",
    "hostname",
    "domainname",
    "mounts",
    "hooks",
    "annotations",
    "linux",
    "solaris",
    "windows",
    "vm",
    "zos",
];

fn host() -> HostInfo {
    HostInfo {
        cpus: 4,
        memory_mib: 8192,
        hostname: "fuzz-host".into(),
        capabilities: 0x1ff_feff_ffff,
    }
}

/// A bundle directory: `rootfs/`, `volumes/{data,more}/`, `volumes/app.conf`
/// (what the test fixtures bind).
fn bundle_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = krun_oci_fuzz::scratch::dir().join("bundle");
        let _ = std::fs::remove_dir_all(&dir);
        for sub in ["rootfs", "volumes/data", "volumes/more"] {
            std::fs::create_dir_all(dir.join(sub)).expect("the bundle");
        }
        std::fs::write(dir.join("volumes/app.conf"), "x=1\n").expect("the bundle");
        dir
    })
}

fn check_error(e: &PlanError) {
    assert!(!e.0.is_empty(), "a PlanError without problems");
    for p in &e.0 {
        let top = p
            .field
            .split(['.', '['])
            .next()
            .expect("split yields at least one piece");
        assert!(
            TOP_LEVEL.contains(&top),
            "problem field {:?} names no field of the spec",
            p.field
        );
        assert!(!p.problem.is_empty(), "problem {:?} says nothing", p.field);
    }
}

/// A host cgroup path stays below the hierarchy it is joined to.
fn check_cgroup<E>(at: Result<HostCgroup, E>) {
    let path = match at {
        Ok(HostCgroup::Fs { path, .. }) => path,
        Ok(HostCgroup::Systemd {
            slice_path, unit, ..
        }) => {
            assert!(!unit.is_empty() && !unit.contains('/'), "unit {unit:?}");
            slice_path.join(unit)
        }
        Err(_) => return,
    };
    for c in path.components() {
        assert!(
            matches!(c, std::path::Component::Normal(_)),
            "cgroup path {path:?} has {c:?}"
        );
    }
}

fn run(data: &[u8]) {
    let dir = bundle_dir();
    let config = dir.join("config.json");
    let spec = match parse_spec(&config, data) {
        Ok(spec) => spec,
        Err(e) => {
            assert!(
                e.to_string().contains("config.json"),
                "a bundle error names the file: {e}"
            );
            return;
        }
    };
    let cgroups_path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned());
    for systemd in [false, true] {
        check_cgroup(host_cgroup(cgroups_path.as_deref(), "fuzz", systemd));
    }
    if let Some(p) = spec.process() {
        if let Err(e) = exec_process(p) {
            check_error(&e);
        }
    }
    match plan("fuzz", dir, &spec, &host()) {
        Err(e) => check_error(&e),
        Ok(p) => {
            assert!((1..=4).contains(&p.vcpus), "{} vCPUs", p.vcpus);
            assert!(
                (64..=8192).contains(&p.memory_mib),
                "{} MiB of memory",
                p.memory_mib
            );
            assert_eq!(
                p.host.memory_limit,
                Some((p.memory_mib + HOST_OVERHEAD_MIB) << 20)
            );
            assert_eq!(p.paths.id, "fuzz");
            assert_eq!(
                p.paths
                    .binds
                    .first()
                    .map(|b| (b.name.as_str(), b.field.as_str())),
                Some(("rootfs", "root.path")),
                "the root filesystem comes first"
            );
            let mut names: Vec<_> = p.paths.binds.iter().map(|b| b.name.as_str()).collect();
            names.sort_unstable();
            names.dedup();
            assert_eq!(
                names.len(),
                p.paths.binds.len(),
                "two host paths share a name"
            );
            for d in &p.setup.devices {
                let n = (d.major, d.minor);
                let provided = if d.block {
                    d.major == 7
                } else {
                    matches!(
                        n,
                        (1, 3 | 5 | 7 | 8 | 9) | (5, 0 | 2) | (10, 200 | 229 | 237)
                    )
                };
                assert!(provided, "device {d:?} is not one the guest provides");
                assert!(d.path.starts_with('/'), "device path {:?}", d.path);
                assert!(d.mode <= 0o7777, "device mode {:o}", d.mode);
            }
            if let Some(rules) = &p.setup.device_rules {
                let deny_all = rules
                    .first()
                    .is_some_and(|r| r.kind == DeviceType::All && !r.allow);
                assert!(deny_all || !rules.is_empty(), "empty device rules sent");
                for r in &rules[usize::from(deny_all)..] {
                    assert_ne!(r.kind, DeviceType::All, "a second type-a rule: {rules:?}");
                    assert_eq!(r.allow, deny_all, "a rule that changes nothing: {rules:?}");
                    assert!(
                        !r.access.is_empty() && r.access.chars().all(|c| "rwm".contains(c)),
                        "device rule access {:?}",
                        r.access
                    );
                }
            }
            let msg = ToGuest::Create(Box::new(p.setup));
            let json = serde_json::to_vec(&msg).expect("a setup serializes");
            assert!(
                json.len() <= krun_proto::MAX_PAYLOAD,
                "a planned setup of {} bytes does not fit in a control frame",
                json.len()
            );
            let back: ToGuest = serde_json::from_slice(&json).expect("a setup parses back");
            assert_eq!(back, msg, "the setup changed on its way to the guest");
        }
    }
}

fuzz_target!(|data: &[u8]| run(data));
