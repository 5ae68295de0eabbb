//! Bad bundles and arguments: a one-line error naming what is wrong, a
//! non-zero exit, and nothing left behind. None of these boot a VM but
//! the privileged container that runs without a host device.

use krun_e2e as harness;

use harness::Sandbox;
use serde_json::json;

/// Runs `run` on a bundle prepared by `prepare` and checks the failure.
fn fails_naming(
    name: &str,
    prepare: impl FnOnce(&Sandbox, &mut harness::TestBundle),
    needle: &str,
) {
    let sb = Sandbox::new(name);
    let mut b = sb.written_bundle(&["true"]);
    prepare(&sb, &mut b);
    let out = sb.run_output(&[], &b, "bad");
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert_ne!(out.status.code(), Some(0), "{name}: should fail");
    assert!(
        stderr.contains(needle),
        "{name}: error should name {needle:?}: {stderr}"
    );
    assert_eq!(
        stderr.trim_end().lines().count(),
        1,
        "{name}: one line: {stderr}"
    );
    sb.assert_clean();
}

#[test]
fn no_config_json() {
    fails_naming(
        "noconfig",
        |_, b| std::fs::remove_file(b.dir.join("config.json")).unwrap(),
        "config.json",
    );
}

#[test]
fn invalid_json() {
    fails_naming(
        "badjson",
        |_, b| {
            std::fs::write(
                b.dir.join("config.json"),
                "{\"ociVersion\": \"1.0.2\", \"process\": ",
            )
            .unwrap()
        },
        "invalid JSON at line 1",
    );
}

#[test]
fn wrong_type_names_the_field() {
    fails_naming(
        "badtype",
        |_, b| {
            std::fs::write(b.dir.join("config.json"), r#"{"ociVersion":"1.0.2","process":{"args":"true","cwd":"/","user":{"uid":0,"gid":0}},"root":{"path":"rootfs"}}"#).unwrap()
        },
        "process.args",
    );
}

#[test]
fn missing_rootfs() {
    fails_naming(
        "norootfs",
        |_, b| std::fs::remove_dir_all(b.rootfs()).unwrap(),
        "root.path",
    );
}

#[test]
fn empty_args() {
    fails_naming(
        "noargs",
        |_, b| {
            b.process()["args"] = json!([]);
            b.write();
        },
        "process.args: must not be empty",
    );
}

#[test]
fn unknown_mount_type() {
    fails_naming(
        "mounttype",
        |_, b| {
            b.add_mount(json!({"destination": "/x", "type": "weirdfs", "source": "none"}));
            b.write();
        },
        "mounts[7].type: unknown mount type \"weirdfs\"",
    );
}

#[test]
fn bind_source_that_does_not_exist() {
    fails_naming(
        "bindsrc",
        |sb, b| {
            b.add_mount(json!({"destination": "/x", "type": "bind", "source": sb.path().join("nope"), "options": ["rbind"]}));
            b.write();
        },
        "mounts[7].source",
    );
}

#[test]
fn impossible_vm_size() {
    fails_naming(
        "size",
        |_, b| {
            b.config["annotations"] = json!({"io.krun-oci.vcpus": "0"});
            b.write();
        },
        "annotations[\"io.krun-oci.vcpus\"]",
    );
}

#[test]
fn invalid_container_id() {
    let sb = Sandbox::new("badid2");
    let b = sb.written_bundle(&["true"]);
    let out = sb.run_output(&[], &b, "bad/id");
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid container id"));
    sb.assert_clean();
}

#[test]
fn errors_in_json_log_format_have_runcs_shape() {
    let sb = Sandbox::new("jsonerr");
    let b = sb.written_bundle(&["true"]);
    std::fs::remove_dir_all(b.rootfs()).unwrap();
    let log = sb.path().join("log.json");
    let out = sb.run_output(
        &["--log-format", "json", "--log", log.to_str().unwrap()],
        &b,
        "j1",
    );
    assert_ne!(out.status.code(), Some(0));
    // With --log, the log gets the JSON line and stderr the plain message.
    let line = std::fs::read_to_string(&log).unwrap();
    let v: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(v["level"], "error");
    assert!(v["msg"].as_str().unwrap().contains("root.path"));
    assert!(v["time"].is_string());
    assert!(String::from_utf8_lossy(&out.stderr).contains("root.path"));
    // Without --log, the JSON line goes to stderr.
    let out = sb.run_output(&["--log-format", "json"], &b, "j2");
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert!(v["msg"].as_str().unwrap().contains("root.path"));
    sb.assert_clean();
}

#[test]
fn an_existing_container_id_is_refused_and_kept() {
    let sb = Sandbox::new("exists");
    let b = sb.written_bundle(&["true"]);
    std::fs::create_dir_all(sb.root().join("taken")).unwrap();
    let out = sb.run_output(&[], &b, "taken");
    assert_ne!(out.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&out.stderr).contains("already exists"));
    assert!(
        sb.root().join("taken").exists(),
        "someone else's state must not be removed"
    );
    std::fs::remove_dir(sb.root().join("taken")).unwrap();
    sb.assert_clean();
}

/// A hook path that is not absolute (the runtime-spec says it MUST be) is
/// refused by `run` and by `create` before anything starts, naming the
/// hook, for every kind that can fail a container.
#[test]
fn relative_hook_paths_are_refused_before_anything_starts() {
    let sb = Sandbox::new("hookrel");
    let mut b = sb.bundle(&["true"]);
    for kind in [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
    ] {
        b.config["hooks"] = json!({ kind: [{"path": "hooks/setup.sh"}] });
        b.write();
        let want = format!("hooks.{kind}[0].path: must be absolute");
        for command in ["run", "create"] {
            let out = sb
                .cmd()
                .args([command, "--bundle"])
                .arg(&b.dir)
                .arg("h1")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_ne!(out.status.code(), Some(0), "{command}, {kind}");
            assert!(stderr.contains(&want), "{command}, {kind}: {stderr}");
            assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
            sb.assert_clean();
        }
    }
}

/// A setup too large for the one control message that carries it to the
/// guest (10,000 tmpfs mounts) is a one-line error naming `mounts` and
/// the limit, in plain and in JSON logs, never a panic.
#[test]
fn ten_thousand_mounts_are_one_clear_error() {
    let prepare = |_: &Sandbox, b: &mut harness::TestBundle| {
        for i in 0..10_000 {
            b.add_mount(json!({"destination": format!("/t/{i}"), "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "size=1k"]}));
        }
        b.write();
    };
    fails_naming(
        "tenk",
        prepare,
        "mounts: too large for the VM: 10007 mounts take",
    );
    let sb = Sandbox::new("tenkjson");
    let mut b = sb.bundle(&["true"]);
    prepare(&sb, &mut b);
    let out = sb.run_output(&["--log-format", "json"], &b, "j1");
    assert_ne!(out.status.code(), Some(0), "{out:?}");
    let v: serde_json::Value = serde_json::from_slice(&out.stderr).unwrap();
    assert_eq!(v["level"], "error");
    let msg = v["msg"].as_str().unwrap();
    assert!(msg.starts_with("mounts: too large for the VM"), "{msg}");
    assert!(msg.contains("-byte message to the guest"), "{msg}");
    sb.assert_clean();
}

/// A root.path that is a symlink, relative to the bundle or absolute, is
/// refused as runc refuses it, naming root.path.
#[test]
fn a_symlinked_rootfs_is_refused() {
    fails_naming(
        "rootlink",
        |_, b| {
            std::os::unix::fs::symlink("rootfs", b.dir.join("rootlink")).unwrap();
            b.config["root"]["path"] = json!("rootlink");
            b.write();
        },
        "/rootlink is a symlink or goes through one",
    );
    fails_naming(
        "rootlinkabs",
        |sb, b| {
            let link = sb.path().join("abs-rootlink");
            std::os::unix::fs::symlink(b.rootfs(), &link).unwrap();
            b.config["root"]["path"] = json!(link);
            b.write();
        },
        "root.path: ",
    );
}

/// A host device the VM's kernel does not provide (a disk) is refused,
/// naming `linux.devices[i]`, in a container that is not privileged.
#[test]
fn a_host_device_is_refused_naming_it() {
    fails_naming(
        "hostdev",
        |_, b| {
            b.config["linux"]["devices"] = json!([
                {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229},
                {"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}
            ]);
            b.write();
        },
        "linux.devices[1] (/dev/sda, b 8:0): not a device the VM's kernel provides; only null",
    );
}

/// In a privileged container (every capability in its bounding set, as
/// `podman run --privileged` gives), such a device is skipped with a
/// warning in the log naming it, and the container runs (this boots a VM).
#[test]
fn a_privileged_container_runs_without_a_host_device_and_says_so() {
    let sb = Sandbox::new("hostdevpriv");
    let mut b = sb.bundle(&["sh", "-c", "test -e /dev/sda || echo no-sda"]);
    b.config["linux"]["devices"] =
        json!([{"path": "/dev/sda", "type": "b", "major": 8, "minor": 0}]);
    // Every capability of the guest kernel (Linux 6.1), 0 to 40.
    let caps: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    let caps = json!(caps);
    b.process()["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    b.write();
    let log = sb.path().join("log");
    let out = sb.run_output(&["--log", log.to_str().unwrap()], &b, "p1");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "no-sda\n");
    let log = std::fs::read_to_string(&log).unwrap();
    assert!(
        log.lines()
            .any(|l| l.contains("linux.devices[0] (/dev/sda, b 8:0): skipped")),
        "{log}"
    );
    sb.assert_clean();
}

/// User namespaces: runc's checks (mappings need a user namespace and the
/// reverse, with runc's words), and what a VM cannot do (join one by
/// path; an idmapped mount that is no bind mount, or without both maps), each named.
#[test]
fn bad_user_namespace_configs_are_refused_naming_the_field() {
    let map = json!([{"containerID": 0, "hostID": 100000, "size": 65536}]);
    let with_userns = |b: &mut harness::TestBundle, path: Option<&str>| {
        let ns = b.config["linux"]["namespaces"].as_array_mut().unwrap();
        ns.push(match path {
            Some(p) => json!({"type": "user", "path": p}),
            None => json!({"type": "user"}),
        });
    };
    fails_naming(
        "mapsnouserns",
        |_, b| {
            b.config["linux"]["uidMappings"] = map.clone();
            b.config["linux"]["gidMappings"] = map.clone();
            b.write();
        },
        "linux.uidMappings: user namespace mappings specified, but user namespace isn't enabled",
    );
    fails_naming(
        "usernsnomaps",
        |_, b| {
            with_userns(b, None);
            b.write();
        },
        "linux.namespaces: user namespaces enabled, but no namespace path to join nor mappings",
    );
    fails_naming(
        "usernspath",
        |_, b| {
            with_userns(b, Some("/proc/1/ns/user"));
            b.config["linux"]["uidMappings"] = map.clone();
            b.config["linux"]["gidMappings"] = map.clone();
            b.write();
        },
        "joining an existing user namespace is not possible",
    );
    fails_naming(
        "idmaptmpfs",
        |_, b| {
            with_userns(b, None);
            b.config["linux"]["uidMappings"] = map.clone();
            b.config["linux"]["gidMappings"] = map.clone();
            b.add_mount(
                json!({"destination": "/x", "type": "tmpfs", "source": "tmpfs",
                "options": ["idmap"]}),
            );
            b.write();
        },
        "mounts[7].options: only a bind mount can be idmapped (/x is a \"tmpfs\" mount)",
    );
    fails_naming(
        "idmaphalf",
        |sb, b| {
            b.add_mount(
                json!({"destination": "/x", "type": "bind", "source": sb.path(),
                "options": ["rbind"], "uidMappings": map.clone()}),
            );
            b.write();
        },
        "mounts[7].gidMappings: uidMappings is given, so gidMappings must be too",
    );
    fails_naming(
        "idmapnomaps",
        |sb, b| {
            b.add_mount(
                json!({"destination": "/x", "type": "bind", "source": sb.path(),
                "options": ["rbind", "idmap"]}),
            );
            b.write();
        },
        "mounts[7].options: idmap without mappings of its own needs the container's",
    );
}

/// A namespace path the VM cannot join is refused naming it, before
/// anything starts; the host's own network namespace above all, whose
/// interface would otherwise be redirected into the VM.
#[test]
fn namespace_paths_a_vm_cannot_join_are_refused_naming_them() {
    let with_path = |b: &mut harness::TestBundle, typ: &str, path: &str| {
        let ns = b.config["linux"]["namespaces"].as_array_mut().unwrap();
        ns.retain(|n| n["type"] != typ);
        ns.push(json!({"type": typ, "path": path}));
        b.write();
    };
    // Ours, as a pod member's path to another container's pid would be.
    let ours = format!("/proc/{}/ns/net", std::process::id());
    for (name, path) in [("hostnet", "/proc/self/ns/net"), ("ournet", ours.as_str())] {
        fails_naming(
            name,
            |_, b| with_path(b, "network", path),
            &format!(
                "linux.namespaces: carrying network namespace {path} into the VM: {path} is the \
                 host's own network namespace"
            ),
        );
    }
    fails_naming(
        "hostipc",
        |_, b| with_path(b, "ipc", "/proc/1/ns/ipc"),
        "(ipc /proc/1/ns/ipc): not a namespace of a krun-oci container",
    );
    fails_naming(
        "hostpid",
        |_, b| with_path(b, "pid", "/proc/1/ns/pid"),
        "(pid /proc/1/ns/pid): not a namespace of a krun-oci container",
    );
}
