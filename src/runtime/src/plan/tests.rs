//! The translation over fixture bundles (tests/fixtures/bundles).

use std::path::Path;

use krun_proto::{MountSource, SHARE_TAG};
use serde_json::{json, Value};

use super::*;
use crate::bundle::Bundle;

const HOST: HostInfo = HostInfo {
    cpus: 4,
    memory_mib: 8192,
    hostname: String::new(),
    capabilities: u64::MAX,
};

/// A bundle in a temporary directory from fixture `name`, edited by `edit`,
/// with the rootfs and the volumes the fixtures bind.
fn bundle(name: &str, edit: impl FnOnce(&mut Value)) -> (tempfile::TempDir, Bundle) {
    let text = match name {
        "full" => include_str!("../../../../tests/fixtures/bundles/full.json"),
        "runc-spec" => include_str!("../../../../tests/fixtures/bundles/runc-spec.json"),
        other => panic!("no fixture {other}"),
    };
    let mut config: Value = serde_json::from_str(text).unwrap();
    edit(&mut config);
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    for sub in ["rootfs", "volumes/data", "volumes/more"] {
        std::fs::create_dir_all(d.join(sub)).unwrap();
    }
    std::fs::write(d.join("volumes/app.conf"), "x=1\n").unwrap();
    std::fs::write(d.join("config.json"), serde_json::to_vec(&config).unwrap()).unwrap();
    let b = Bundle::load(d).unwrap();
    (dir, b)
}

fn plan_of(name: &str, edit: impl FnOnce(&mut Value)) -> Result<VmPlan, PlanError> {
    let (_dir, b) = bundle(name, edit);
    plan("c1", &b.dir, &b.spec, &HOST)
}

fn problem_fields(name: &str, edit: impl FnOnce(&mut Value)) -> Vec<String> {
    let err = plan_of(name, edit).expect_err("the plan should fail");
    let line = err.to_string();
    assert!(!line.contains('\n'), "errors are one line: {line}");
    err.0.into_iter().map(|p| p.field).collect()
}

#[test]
fn runc_default_spec_plans_with_defaults() {
    let (_dir, b) = bundle("runc-spec", |_| {});
    let p = plan("c1", &b.dir, &b.spec, &HOST).unwrap();
    assert_eq!(p.vcpus, 1);
    assert_eq!(p.memory_mib, DEFAULT_MEMORY_MIB);
    assert_eq!(p.paths.id, "c1");
    assert_eq!(p.paths.binds.len(), 1);
    assert_eq!(p.paths.binds[0].name, "rootfs");
    assert_eq!(p.paths.binds[0].source, b.dir.join("rootfs"));
    assert_eq!(p.setup.root.tag, SHARE_TAG);
    assert_eq!(p.setup.root.path, "c1/rootfs");
    assert!(p.setup.root.readonly, "runc spec's root is read-only");
    assert_eq!(p.setup.process.args, vec!["sh"]);
    assert_eq!(p.setup.process.cwd, "/");
    assert_eq!(p.setup.hostname.as_deref(), Some("runc"));
    let kinds: Vec<String> = p
        .setup
        .mounts
        .iter()
        .map(|m| match &m.source {
            MountSource::Fs { fstype, .. } => fstype.clone(),
            MountSource::Share { .. } => "share".into(),
        })
        .collect();
    assert_eq!(
        kinds,
        vec!["proc", "tmpfs", "devpts", "tmpfs", "mqueue", "sysfs", "cgroup2"]
    );
    assert!(p
        .setup
        .process
        .rlimits
        .iter()
        .any(|r| r.resource == libc::RLIMIT_NOFILE && r.soft == 1024));
    assert!(!p.setup.masked_paths.is_empty() && !p.setup.readonly_paths.is_empty());
}

#[test]
fn every_field_reaches_the_guest() {
    let p = plan_of("full", |_| {}).unwrap();
    let s = &p.setup;
    // Sizing: 1.5 CPUs of quota need 2 vCPUs; a 256 MiB limit gets a VM of
    // 256 MiB plus the guest's overhead, and the limit itself in the guest.
    assert_eq!(p.vcpus, 2);
    assert_eq!(p.memory_mib, 256 + GUEST_OVERHEAD_MIB);
    assert_eq!(s.cgroup.memory_max, Some(256 << 20));
    assert_eq!(s.cgroup.cpu_max, Some((150_000, 100_000)));
    assert_eq!(s.cgroup.cpu_weight, Some(39));
    assert_eq!(s.cgroup.pids_max, Some(100));
    // Process.
    let pr = &s.process;
    assert_eq!(pr.args, vec!["/bin/app", "--flag"]);
    assert_eq!(pr.env, vec!["PATH=/usr/bin:/bin", "FOO=bar baz"]);
    assert_eq!(pr.cwd, "/work");
    assert_eq!((pr.uid, pr.gid), (1000, 1001));
    assert_eq!(pr.additional_gids, vec![10, 20]);
    assert_eq!(pr.umask, Some(0o22));
    assert_eq!(pr.rlimits.len(), 2);
    assert_eq!(
        (
            pr.rlimits[0].resource,
            pr.rlimits[0].soft,
            pr.rlimits[0].hard
        ),
        (libc::RLIMIT_NOFILE, 1024, 4096)
    );
    assert_eq!(pr.rlimits[1].resource, libc::RLIMIT_NPROC);
    let caps = pr.capabilities.as_ref().unwrap();
    assert_eq!(caps.bounding, vec!["CAP_CHOWN", "CAP_KILL"]);
    assert_eq!(caps.effective, vec!["CAP_KILL"]);
    assert_eq!(caps.ambient, vec!["CAP_KILL"]);
    assert!(pr.no_new_privileges);
    assert_eq!(pr.oom_score_adj, Some(100));
    // Root, names, sysctls, masked and read-only paths.
    assert!(
        s.root.readonly && !p.paths.binds[0].readonly,
        "read-only in the guest, writable for mount points"
    );
    assert_eq!(s.hostname.as_deref(), Some("fixture-host"));
    assert_eq!(s.domainname.as_deref(), Some("example.org"));
    assert_eq!(
        s.sysctl.get("net.ipv4.ip_forward").map(String::as_str),
        Some("1")
    );
    assert_eq!(s.masked_paths, vec!["/proc/kcore"]);
    assert_eq!(s.readonly_paths, vec!["/proc/sys"]);
}

#[test]
fn mounts_become_guest_filesystems_and_shares() {
    let p = plan_of("full", |_| {}).unwrap();
    let m = |dest: &str| {
        p.setup
            .mounts
            .iter()
            .find(|m| m.destination == dest)
            .unwrap_or_else(|| panic!("no mount {dest}"))
    };
    let ms = |f: libc::c_ulong| f;
    assert_eq!(
        m("/sys").flags,
        ms(libc::MS_NOSUID | libc::MS_NOEXEC | libc::MS_NODEV | libc::MS_RDONLY)
    );
    assert_eq!(m("/dev").data, "mode=755,size=65536k");
    assert_eq!(m("/dev").flags, ms(libc::MS_NOSUID | libc::MS_STRICTATIME));
    assert_eq!(
        m("/dev/pts").data,
        "newinstance,ptmxmode=0666,mode=0620,gid=5"
    );
    assert_eq!(m("/scratch").data, "size=1m,mode=1777");
    assert!(
        matches!(&m("/dev/mqueue").source, MountSource::Fs { fstype, .. } if fstype == "mqueue")
    );
    let cg = m("/sys/fs/cgroup");
    assert!(matches!(&cg.source, MountSource::Fs { fstype, .. } if fstype == "cgroup2"));
    assert!(cg.data.is_empty());

    // Every bind mount's source is bound into the VM's one share on its
    // own, as ID/mN for mounts[N] (a file as a file: nothing else of its
    // directory), read-only on the host where the mount is.
    let index = |dest: &str| {
        p.setup
            .mounts
            .iter()
            .position(|m| m.destination == dest)
            .unwrap()
    };
    let share = |dest: &str| match &m(dest).source {
        MountSource::Share { tag, path, file } => {
            assert_eq!(tag, SHARE_TAG);
            assert_eq!(
                *path,
                format!("c1/{}", staging::bind_name(Path::new(dest), 0))
            );
            *file
        }
        other => panic!("{dest} is not a share: {other:?}"),
    };
    let bind = |dest: &str| {
        let name = staging::bind_name(Path::new(dest), 0);
        p.paths
            .binds
            .iter()
            .find(|b| b.name == name)
            .unwrap_or_else(|| panic!("no host bind for {dest}"))
            .clone()
    };
    assert!(!share("/data"));
    let data = bind("/data");
    assert!(data.source.ends_with("volumes/data") && !data.readonly && !data.file);
    assert!(!share("/config"));
    let config = bind("/config");
    assert!(config.source.ends_with("volumes/data") && config.readonly);
    assert_eq!(
        m("/config").flags & ms(libc::MS_RDONLY),
        ms(libc::MS_RDONLY)
    );
    assert!(share("/etc/app.conf"));
    let conf = bind("/etc/app.conf");
    assert!(conf.source.ends_with("volumes/app.conf") && conf.file);
    assert_eq!(
        conf.field,
        format!("mounts[{}].source", index("/etc/app.conf"))
    );
    assert_eq!(
        m("/etc/app.conf").propagation,
        ms(libc::MS_PRIVATE | libc::MS_REC)
    );
    assert!(bind("/more").source.ends_with("volumes/more"));
    assert_eq!(m("/more").flags, ms(libc::MS_NOSUID));
    assert_eq!(p.paths.binds.len(), 5, "rootfs + four bind mounts");
}

#[test]
fn cpuset_sizes_the_vm_when_there_is_no_quota() {
    let p = plan_of("full", |c| {
        c["linux"]["resources"]["cpu"] = json!({"cpus": "0-2"})
    })
    .unwrap();
    assert_eq!(p.vcpus, 3);
    let p = plan_of("full", |c| {
        c["linux"]["resources"]["cpu"] = json!({"cpus": "0-7"})
    })
    .unwrap();
    assert_eq!(p.vcpus, HOST.cpus, "never more vCPUs than host CPUs");
    let p = plan_of("full", |c| {
        c["linux"]["resources"]["cpu"] = json!({"quota": 800000, "period": 100000})
    })
    .unwrap();
    assert_eq!(p.vcpus, HOST.cpus);
    let p = plan_of("full", |c| c["linux"]["resources"] = json!({})).unwrap();
    assert_eq!((p.vcpus, p.memory_mib), (1, DEFAULT_MEMORY_MIB));
}

#[test]
fn a_pod_sandbox_is_sized_for_the_whole_pod() {
    let p = plan_of("full", |c| {
        c["linux"]["resources"] = json!({});
        c["annotations"] = json!({
            "io.kubernetes.cri.sandbox-memory": "268435456",
            "io.kubernetes.cri.sandbox-cpu-quota": "250000",
            "io.kubernetes.cri.sandbox-cpu-period": "100000"
        });
    })
    .unwrap();
    assert_eq!((p.vcpus, p.memory_mib), (3, 256 + GUEST_OVERHEAD_MIB));
}

#[test]
fn annotations_override_sizing() {
    let p = plan_of("full", |c| {
        c["annotations"] = json!({ANNOTATION_VCPUS: "3", ANNOTATION_MEMORY_MIB: "1024"})
    })
    .unwrap();
    assert_eq!((p.vcpus, p.memory_mib), (3, 1024));
}

#[test]
fn the_hypervisor_annotation_picks_the_backend() {
    let p = plan_of("full", |c| {
        c["annotations"] = json!({ANNOTATION_HYPERVISOR: "qemu"})
    })
    .unwrap();
    assert_eq!(p.hypervisor, Some(HypervisorKind::Qemu));
    let p = plan_of("full", |c| {
        c["annotations"] = json!({ANNOTATION_HYPERVISOR: "builtin"})
    })
    .unwrap();
    assert_eq!(p.hypervisor, Some(HypervisorKind::Builtin));
    assert_eq!(plan_of("full", |_| {}).unwrap().hypervisor, None);
    let fields = problem_fields("full", |c| {
        c["annotations"] = json!({ANNOTATION_HYPERVISOR: "xen"})
    });
    assert_eq!(
        fields,
        vec![format!("annotations[{ANNOTATION_HYPERVISOR:?}]")]
    );
}

#[test]
fn impossible_sizes_are_errors_naming_the_field() {
    let vcpus = format!("annotations[{ANNOTATION_VCPUS:?}]");
    let mem = format!("annotations[{ANNOTATION_MEMORY_MIB:?}]");
    for (value, field) in [("0", &vcpus), ("99", &vcpus), ("two", &vcpus)] {
        assert_eq!(
            problem_fields("full", |c| c["annotations"] =
                json!({ANNOTATION_VCPUS: value})),
            vec![field.clone()],
            "{value}"
        );
    }
    for value in ["10", "99999999", "-5"] {
        assert_eq!(
            problem_fields("full", |c| c["annotations"] =
                json!({ANNOTATION_MEMORY_MIB: value})),
            vec![mem.clone()],
            "{value}"
        );
    }
    for limit in [json!(1), json!(1u64 << 50)] {
        let fields = problem_fields("full", |c| {
            c["linux"]["resources"]["memory"]["limit"] = limit.clone()
        });
        assert_eq!(fields, vec!["linux.resources.memory.limit"], "{limit}");
    }
    assert_eq!(
        problem_fields("full", |c| c["linux"]["resources"]["cpu"] =
            json!({"cpus": "3-1"})),
        vec!["linux.resources.cpu.cpus"]
    );
}

#[test]
fn bad_bundles_name_every_bad_field() {
    type Edit = Box<dyn FnOnce(&mut Value)>;
    let cases: Vec<(&str, Edit)> = vec![
        (
            "process.args",
            Box::new(|c| c["process"]["args"] = json!([])),
        ),
        (
            "process",
            Box::new(|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("process")
                    .map(drop)
                    .unwrap_or(())
            }),
        ),
        (
            "process.cwd",
            Box::new(|c| c["process"]["cwd"] = json!("relative")),
        ),
        (
            "root.path",
            Box::new(|c| c["root"]["path"] = json!("missing-rootfs")),
        ),
        (
            "root",
            Box::new(|c| {
                c.as_object_mut()
                    .unwrap()
                    .remove("root")
                    .map(drop)
                    .unwrap_or(())
            }),
        ),
        (
            "mounts[0].type",
            Box::new(|c| c["mounts"][0]["type"] = json!("weirdfs")),
        ),
        (
            "mounts[7].source",
            Box::new(|c| c["mounts"][7]["source"] = json!("/no/such/dir")),
        ),
        (
            "mounts[7].source",
            Box::new(|c| c["mounts"][7]["source"] = json!("/dev/null")),
        ),
        (
            "mounts[0].destination",
            Box::new(|c| c["mounts"][0]["destination"] = json!("proc")),
        ),
        (
            "process.rlimits[1]",
            Box::new(|c| {
                c["process"]["rlimits"][1] = json!({"type": "RLIMIT_NOFILE", "hard": 1, "soft": 1})
            }),
        ),
        (
            "process.rlimits[0]",
            Box::new(|c| {
                c["process"]["rlimits"][0] = json!({"type": "RLIMIT_CORE", "hard": 1, "soft": 2})
            }),
        ),
        (
            "linux.devices[1] (/dev/sda, b 8:0)",
            Box::new(|c| {
                c["linux"]["devices"] = json!([
                    {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                    {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
                ])
            }),
        ),
    ];
    for (field, edit) in cases {
        assert_eq!(
            problem_fields("full", edit),
            vec![field.to_string()],
            "{field}"
        );
    }
    // Several problems at once are all reported.
    let fields = problem_fields("full", |c| {
        c["process"]["args"] = json!([]);
        c["mounts"][0]["type"] = json!("weirdfs");
    });
    assert_eq!(fields, vec!["process.args", "mounts[0].type"]);
}

#[test]
fn plan_does_not_touch_the_bundle() {
    let (dir, b) = bundle("full", |_| {});
    let before = walk(dir.path());
    plan("c1", &b.dir, &b.spec, &HOST).unwrap();
    assert_eq!(walk(dir.path()), before);
}

fn walk(p: &Path) -> Vec<String> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(p).unwrap().flatten() {
        out.push(e.path().display().to_string());
        if e.path().is_dir() {
            out.extend(walk(&e.path()));
        }
    }
    out.sort();
    out
}

#[test]
fn without_a_hostname_the_guest_takes_the_hosts() {
    let (_dir, b) = bundle("full", |c| {
        c.as_object_mut().unwrap().remove("hostname");
    });
    let host = HostInfo {
        hostname: "node-1".into(),
        ..HOST
    };
    let p = plan("c1", &b.dir, &b.spec, &host).unwrap();
    assert_eq!(p.setup.hostname.as_deref(), Some("node-1"));
    // A container joining another's UTS namespace (a pod's) keeps its name.
    let (_dir, b) = bundle("full", |c| {
        c.as_object_mut().unwrap().remove("hostname");
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "uts");
        ns.push(serde_json::json!({"type": "uts", "path": "/proc/1/ns/uts"}));
    });
    let p = plan("c1", &b.dir, &b.spec, &host).unwrap();
    assert_eq!(p.setup.hostname, None);
    // The spec's own hostname wins.
    let (_dir, b) = bundle("full", |_| {});
    let p = plan("c1", &b.dir, &b.spec, &host).unwrap();
    assert_eq!(p.setup.hostname.as_deref(), Some("fixture-host"));
}

#[test]
fn the_hosts_network_is_refused_clearly() {
    let fields = problem_fields("full", |c| {
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
    });
    assert_eq!(fields, vec!["linux.namespaces"]);
    // A new namespace (loopback only) and a given one are fine.
    let p = plan_of("full", |_| {}).unwrap();
    assert_eq!(p.netns, None);
    let p = plan_of("full", |c| {
        let ns = c["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != "network");
        ns.push(serde_json::json!({"type": "network", "path": "/run/netns/x"}));
    })
    .unwrap();
    assert_eq!(
        p.netns.as_deref(),
        Some(std::path::Path::new("/run/netns/x"))
    );
}

#[test]
fn the_require_kvm_annotation_is_true_or_false() {
    assert!(!plan_of("full", |_| {}).unwrap().require_kvm);
    let p = plan_of("full", |c| {
        c["annotations"] = json!({ANNOTATION_REQUIRE_KVM: "true"})
    });
    assert!(p.unwrap().require_kvm);
    assert_eq!(
        problem_fields("full", |c| {
            c["annotations"] = json!({ANNOTATION_REQUIRE_KVM: "yes"})
        }),
        vec![format!("annotations[{ANNOTATION_REQUIRE_KVM:?}]")]
    );
}

#[test]
fn the_template_annotation_is_true_false_or_absent() {
    assert_eq!(plan_of("full", |_| {}).unwrap().template, None);
    for (v, want) in [("true", Some(true)), ("false", Some(false))] {
        let p = plan_of("full", |c| {
            c["annotations"] = json!({ANNOTATION_TEMPLATE: v})
        });
        assert_eq!(p.unwrap().template, want);
    }
    assert_eq!(
        problem_fields("full", |c| {
            c["annotations"] = json!({ANNOTATION_TEMPLATE: "no"})
        }),
        vec![format!("annotations[{ANNOTATION_TEMPLATE:?}]")]
    );
}

#[test]
fn the_host_side_gets_the_vm_plus_overhead_and_the_specs_cpu_limits() {
    let p = plan_of("full", |c| {
        c["linux"]["resources"] = json!({
            "memory": {"limit": 536870912},
            "cpu": {"quota": 50000, "period": 100000, "shares": 512, "cpus": "1", "mems": "0"},
            "pids": {"limit": 10}
        })
    })
    .unwrap();
    let h = &p.host;
    assert_eq!(
        h.memory_limit,
        Some((512 + GUEST_OVERHEAD_MIB + HOST_OVERHEAD_MIB) << 20)
    );
    assert_eq!(
        (h.cpu_quota, h.cpu_period, h.cpu_shares),
        (Some(50000), Some(100000), Some(512))
    );
    assert_eq!(
        (h.cpuset_cpus.as_deref(), h.cpuset_mems.as_deref()),
        (Some("1"), Some("0"))
    );
    // The spec's pids limit is the workload's, in the guest.
    assert_eq!(h.pids_max, Some(HOST_PIDS_MAX));
    assert_eq!(p.setup.cgroup.pids_max, Some(10));
    assert!(p.host_cgroup.is_none(), "the plan creates nothing");

    // No limits in the spec: the host side is still bounded by the VM.
    let p = plan_of("runc-spec", |_| {}).unwrap();
    assert_eq!(
        p.host.memory_limit,
        Some((DEFAULT_MEMORY_MIB + HOST_OVERHEAD_MIB) << 20)
    );
    assert_eq!((p.host.cpu_quota, p.host.cpuset_cpus.clone()), (None, None));
    let p = plan_of("full", |c| {
        c["linux"]["resources"]["cpu"] = json!({"quota": -1, "cpus": " "})
    })
    .unwrap();
    assert_eq!((p.host.cpu_quota, p.host.cpuset_cpus), (None, None));
}

#[test]
fn hook_paths_must_be_absolute() {
    let fields = problem_fields("runc-spec", |c| {
        c["hooks"] = json!({
            "prestart": [{"path": "/bin/true"}, {"path": "hooks/prestart"}],
            "createRuntime": [{"path": "false"}],
            "poststop": [{"path": "/bin/true"}]
        });
    });
    assert_eq!(
        fields,
        ["hooks.prestart[1].path", "hooks.createRuntime[0].path"]
    );
}

#[test]
fn a_setup_too_large_for_one_message_names_the_mounts() {
    let err = plan_of("runc-spec", |c| {
        let tmpfs: Vec<Value> = (0..10_000)
            .map(|i| json!({"destination": format!("/t/{i}"), "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1k"]}))
            .collect();
        c["mounts"] = Value::Array(tmpfs);
    })
    .unwrap_err();
    assert_eq!(err.fields(), ["mounts"]);
    let msg = err.to_string();
    assert!(
        msg.starts_with("mounts: too large for the VM: 10000 mounts take "),
        "{msg}"
    );
    assert!(
        msg.contains(&format!(
            "{}-byte message",
            krun_proto::MAX_PAYLOAD - SETUP_SLACK
        )),
        "{msg}"
    );
    // A thousand fit.
    plan_of("runc-spec", |c| {
        let tmpfs: Vec<Value> = (0..1_000)
            .map(|i| json!({"destination": format!("/t/{i}"), "type": "tmpfs", "source": "tmpfs"}))
            .collect();
        c["mounts"] = Value::Array(tmpfs);
    })
    .unwrap();
}

#[test]
fn a_symlinked_root_is_refused_as_runc_refuses_it() {
    let (dir, b) = bundle("runc-spec", |_| {});
    let d = dir.path();
    std::os::unix::fs::symlink("rootfs", d.join("rel-link")).unwrap();
    std::os::unix::fs::symlink(d.join("rootfs"), d.join("abs-link")).unwrap();
    std::fs::create_dir_all(d.join("real/inner")).unwrap();
    std::os::unix::fs::symlink(d.join("real"), d.join("via")).unwrap();
    let with_root = |root: &Path| {
        let mut spec = b.spec.clone();
        spec.set_root(Some(
            oci_spec::runtime::RootBuilder::default()
                .path(root)
                .build()
                .unwrap(),
        ));
        plan("c1", &b.dir, &spec, &HOST)
    };
    for root in [
        Path::new("rel-link"),
        &d.join("abs-link"),
        &d.join("via/inner"),
    ] {
        let err = with_root(root).unwrap_err();
        assert_eq!(err.fields(), ["root.path"], "{root:?}");
        assert!(err.to_string().contains("symlink"), "{err}");
    }
    // The real path, relative or absolute, `..` and `.` included, is fine.
    for root in [
        Path::new("rootfs"),
        Path::new("./real/../rootfs"),
        &d.join("real/inner"),
    ] {
        with_root(root).unwrap_or_else(|e| panic!("{root:?}: {e}"));
    }
    // A relative root.path is taken from the bundle's real path, as runc's
    // working directory is: a bundle reached through a link is fine.
    let link = tempfile::tempdir().unwrap();
    let bundle_link = link.path().join("bundle");
    std::os::unix::fs::symlink(d, &bundle_link).unwrap();
    let p = plan("c1", &bundle_link, &b.spec, &HOST).unwrap();
    assert_eq!(
        p.paths.binds[0].source,
        d.canonicalize().unwrap().join("rootfs")
    );
}

#[test]
fn bind_mount_data_is_dropped_and_root_propagation_is_carried() {
    let (_dir, b) = bundle("runc-spec", |c| {
        c["mounts"].as_array_mut().unwrap().push(json!({
            "destination": "/vol", "type": "bind", "source": "rootfs",
            "options": ["bind", "nosuid", "mode=755", "size=1k"]
        }));
        c["linux"]["rootfsPropagation"] = json!("unbindable");
    });
    let p = plan("c1", &b.dir, &b.spec, &HOST).unwrap();
    let vol = p
        .setup
        .mounts
        .iter()
        .find(|m| m.destination == "/vol")
        .unwrap();
    assert!(matches!(vol.source, MountSource::Share { .. }));
    assert_eq!(vol.flags, libc::MS_NOSUID);
    assert_eq!(vol.data, "", "a bind mount takes no data");
    assert_eq!(p.setup.root.propagation, libc::MS_UNBINDABLE);
    for (value, flags) in [
        ("rshared", libc::MS_SHARED | libc::MS_REC),
        ("slave", libc::MS_SLAVE),
        ("rprivate", libc::MS_PRIVATE | libc::MS_REC),
        ("", 0),
    ] {
        let p = plan_of("runc-spec", |c| {
            c["linux"]["rootfsPropagation"] = json!(value)
        })
        .unwrap();
        assert_eq!(p.setup.root.propagation, flags, "{value}");
    }
    assert_eq!(
        problem_fields("runc-spec", |c| c["linux"]["rootfsPropagation"] =
            json!("sideways")),
        ["linux.rootfsPropagation"]
    );
}

#[test]
fn devices_the_guest_kernel_provides_are_made_as_given() {
    let p = plan_of("full", |c| {
        c["linux"]["devices"] = json!([
            {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
            {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o20600},
            {"path": "/dev/loop7", "type": "b", "major": 7, "minor": 7},
            {"path": "/dev/mynull", "type": "u", "major": 1, "minor": 3, "fileMode": 0o600, "uid": 1000, "gid": 1001}
        ])
    })
    .unwrap();
    let d = &p.setup.devices;
    assert_eq!(d.len(), 4);
    assert_eq!(
        (d[0].path.as_str(), d[0].block, d[0].mode),
        ("/dev/fuse", false, 0o666)
    );
    assert_eq!((d[1].major, d[1].minor, d[1].mode), (10, 200, 0o600));
    assert_eq!((d[2].block, d[2].major, d[2].minor), (true, 7, 7));
    assert_eq!((d[3].mode, d[3].uid, d[3].gid), (0o600, 1000, 1001));
    assert!(p.warnings.is_empty(), "{:?}", p.warnings);
}

#[test]
fn a_device_the_guest_lacks_is_refused_unless_privileged() {
    let sda = json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0},
                     {"path": "/dev/null2", "type": "b", "major": 1, "minor": 3},
                     {"path": "/dev/fifo", "type": "p"},
                     {"path": "dev/fuse", "type": "c", "major": 10, "minor": 229}]);
    let err = plan_of("full", |c| c["linux"]["devices"] = sda.clone()).unwrap_err();
    assert_eq!(
        err.fields(),
        vec![
            "linux.devices[0] (/dev/sda, b 8:0)",
            "linux.devices[1] (/dev/null2, b 1:3)",
            "linux.devices[2] (/dev/fifo, p 0:0)",
            "linux.devices[3]"
        ]
    );
    assert!(
        err.to_string()
            .contains("not a device the VM's kernel provides; only null (c 1:3)"),
        "{err}"
    );
    // Privileged (every capability in the bounding set): skipped, with a
    // warning naming each.
    let p = plan_of("full", |c| {
        c["linux"]["devices"] = sda.clone();
        c["linux"]["devices"].as_array_mut().unwrap().pop();
        c["process"]["capabilities"]["bounding"] = json!(all_capability_names());
    })
    .unwrap();
    assert!(p.setup.devices.is_empty());
    assert_eq!(p.warnings.len(), 3, "{:?}", p.warnings);
    assert!(
        p.warnings[0].starts_with("linux.devices[0] (/dev/sda, b 8:0): skipped"),
        "{:?}",
        p.warnings
    );
}

#[test]
fn privileged_means_every_capability_in_the_bounding_set() {
    let spec = |edit: &dyn Fn(&mut Value)| bundle("full", edit).1.spec;
    let all = u64::MAX;
    assert!(!devices::is_privileged(&spec(&|_| {}), all));
    assert!(devices::is_privileged(
        &spec(&|c| c["process"]["capabilities"]["bounding"] = json!(all_capability_names())),
        all
    ));
    let no_chown =
        spec(&|c| c["process"]["capabilities"]["bounding"] = json!(all_capability_names()[1..]));
    assert!(!devices::is_privileged(&no_chown, all));
    // Every capability the runtime itself has: what podman --privileged
    // gives on a host whose engine lacks CAP_CHOWN.
    assert!(devices::is_privileged(&no_chown, all & !1));
    // No capabilities at all: root keeps its full set.
    assert!(devices::is_privileged(
        &spec(&|c| {
            c["process"].as_object_mut().unwrap().remove("capabilities");
        }),
        all
    ));
}

/// Every capability's name, CAP_CHOWN first.
fn all_capability_names() -> Vec<String> {
    devices::all_capabilities()
        .iter()
        .map(|c| c.to_string())
        .collect()
}

/// The device rules of a plan, one line each.
fn device_rules(p: &VmPlan) -> Option<Vec<String>> {
    let rules = p.setup.device_rules.as_ref()?;
    Some(
        rules
            .iter()
            .map(|r| {
                let n = |v: Option<u32>| v.map_or("*".to_string(), |v| v.to_string());
                let t = serde_json::to_value(r.kind).unwrap();
                let verb = if r.allow { "allow" } else { "deny" };
                format!(
                    "{verb} {} {}:{} {}",
                    t.as_str().unwrap(),
                    n(r.major),
                    n(r.minor),
                    r.access
                )
            })
            .collect(),
    )
}

#[test]
fn device_rules_are_runcs_with_the_given_devices_and_the_defaults() {
    let p = plan_of("runc-spec", |c| {
        c["linux"]["devices"] = json!([
            {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200}
        ])
    })
    .unwrap();
    assert_eq!(
        device_rules(&p).unwrap(),
        [
            "deny a *:* rwm",
            "allow c *:* m",
            "allow c 1:3 rwm",
            "allow c 1:5 rwm",
            "allow c 1:7 rwm",
            "allow c 1:8 rwm",
            "allow c 1:9 rwm",
            "allow c 5:0 rwm",
            "allow c 5:2 rwm",
            "allow c 10:200 rwm",
            "allow c 136:* rwm",
            "allow b *:* m",
        ]
    );
    // No deny-everything rule (or none at all): no restriction.
    assert_eq!(device_rules(&plan_of("full", |_| {}).unwrap()), None);
    let p = plan_of("runc-spec", |c| {
        c["linux"]["resources"]["devices"] = json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "access": "rwm"},
            {"allow": false, "type": "b", "major": 7, "access": "rw"}
        ])
    })
    .unwrap();
    assert_eq!(device_rules(&p).unwrap(), ["deny b 7:* rw"]);
}

#[test]
fn bad_device_rules_name_their_index() {
    let err = plan_of("runc-spec", |c| {
        c["linux"]["resources"]["devices"] = json!([
            {"allow": false, "access": "rwm"},
            {"allow": true, "type": "p", "access": "r"},
            {"allow": true, "type": "c", "access": "rwx"},
            {"allow": true, "type": "c", "major": 1},
            {"allow": true, "type": "c", "major": -2, "access": "r"},
            {"allow": true, "type": "c", "major": 1, "minor": 3, "access": "rw"}
        ])
    })
    .unwrap_err();
    assert_eq!(
        err.fields(),
        [
            "linux.resources.devices[1]",
            "linux.resources.devices[2]",
            "linux.resources.devices[3]",
            "linux.resources.devices[4]",
        ]
    );
    let text = err.to_string();
    for part in [
        "type \"p\" is not one of a, c and b",
        "access \"rwx\" is not a subset of \"rwm\"",
        "access is empty",
        "major Some(-2)",
    ] {
        assert!(text.contains(part), "{part}: {text}");
    }
    // A rule the defaults cannot be applied over, as under runc.
    let err = plan_of("runc-spec", |c| {
        c["linux"]["resources"]["devices"] = json!([
            {"allow": false, "type": "c", "access": "rw"}
        ])
    })
    .unwrap_err();
    assert_eq!(err.fields(), ["linux.resources.devices"]);
    assert!(
        err.to_string()
            .contains("c 1:3 rwm cannot be allowed inside the wider rule c *:* rw"),
        "{err}"
    );
}

/// A bind's name in the share follows its destination, not its place in
/// the list: a restore's bundle may list the same mounts in another order.
#[test]
fn a_binds_name_in_the_share_follows_its_destination() {
    let bind = |dest: &str| json!({"destination": dest, "type": "bind", "source": "volumes/data", "options": ["rbind"]});
    let names = |mounts: Value| -> Vec<(String, String)> {
        let p = plan_of("runc-spec", |c| c["mounts"] = mounts).unwrap();
        p.setup
            .mounts
            .iter()
            .filter_map(|m| match &m.source {
                MountSource::Share { path, .. } => Some((m.destination.clone(), path.clone())),
                _ => None,
            })
            .collect()
    };
    let mut one = names(json!([bind("/a"), bind("/b"), bind("/a")]));
    let mut other = names(json!([bind("/b"), bind("/a"), bind("/a")]));
    assert_eq!(one.len(), 3);
    // The two on /a are named apart, and each list names the same.
    assert_ne!(one[0].1, one[2].1);
    one.sort();
    other.sort();
    assert_eq!(one, other);
}
