//! The runtime-spec lifecycle driven by hand: create, state, start, kill,
//! delete, pause and resume, the invalid transitions, kill -9 of the VM's
//! process in each phase, and many containers at once. Every test checks
//! that nothing is left behind.

use krun_e2e::{self as harness, lifecycle};

use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use harness::{Sandbox, TestBundle};
use lifecycle::{
    create, create_new, delete_and_wait, delete_force, delete_once_stopped, krun, ok, out_of,
    refused, start_new, status, wait_exit, wait_for_output,
};

const TRAP_TERM: &str =
    "trap 'echo got TERM; exit 3' TERM; echo started; while :; do sleep 0.1; done";

#[test]
fn the_lifecycle_by_hand_with_invalid_transitions() {
    let sb = Sandbox::new("lifecycle");
    let (b, pid) = create_new(&sb, &["sh", "-c", TRAP_TERM], "c1");
    assert_eq!(status(&sb, "c1"), "created");
    let o = krun(&sb, &["state", "c1"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["pid"], pid, "the state's pid is the pid file's");
    assert_eq!(v["bundle"], b.dir.to_str().unwrap());
    assert!(out_of(&sb, "c1").is_empty(), "nothing runs before start");

    ok(krun(&sb, &["start", "c1"]));
    assert_eq!(status(&sb, "c1"), "running");
    wait_for_output(&sb, "c1", "started\n");

    refused(
        &sb,
        &["start", "c1"],
        "cannot start a container that is running",
    );
    refused(&sb, &["delete", "c1"], "not stopped: running");
    assert_eq!(
        status(&sb, "c1"),
        "running",
        "a refused delete changes nothing"
    );

    // SIGTERM reaches the workload's handler; the pid exits with its status.
    ok(krun(&sb, &["kill", "c1", "TERM"]));
    assert_eq!(wait_exit(pid), (Some(3), None));
    assert_eq!(out_of(&sb, "c1"), "started\ngot TERM\n");
    assert_eq!(status(&sb, "c1"), "stopped");
    assert_ne!(
        krun(&sb, &["kill", "c1", "KILL"]).code,
        0,
        "kill of a stopped container fails"
    );
    assert_ne!(
        krun(&sb, &["start", "c1"]).code,
        0,
        "start of a stopped container fails"
    );
    ok(krun(&sb, &["delete", "c1"]));
    refused(&sb, &["state", "c1"], "does not exist");
    sb.assert_clean();
}

#[test]
/// The pid file's process (the monitor, init of its own PID namespace,
/// which cannot die of a signal it sends itself) exits with 128+n, which
/// is what conmon reports for a signal death either way.
fn death_by_signal_is_128_plus_the_signal() {
    let sb = Sandbox::new("sigdeath");
    let pid = start_new(&sb, &["sleep", "1000"], "s1");
    ok(krun(&sb, &["kill", "s1", "9"]));
    assert_eq!(
        delete_once_stopped(&sb, "s1", pid),
        (Some(128 + libc::SIGKILL), None)
    );
}

#[test]
fn pause_and_resume_freeze_the_vm() {
    let sb = Sandbox::new("pause");
    let pid = start_new(
        &sb,
        &[
            "sh",
            "-c",
            "i=0; while :; do i=$((i+1)); echo $i; sleep 0.2; done",
        ],
        "p1",
    );
    wait_for_output(&sb, "p1", "3\n");
    ok(krun(&sb, &["pause", "p1"]));
    assert_eq!(status(&sb, "p1"), "paused");
    // Let anything already in flight arrive, then nothing more may.
    std::thread::sleep(Duration::from_millis(500));
    let frozen = out_of(&sb, "p1");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        out_of(&sb, "p1"),
        frozen,
        "a paused container made progress"
    );
    assert_ne!(krun(&sb, &["pause", "p1"]).code, 0, "pausing twice fails");
    ok(krun(&sb, &["resume", "p1"]));
    assert_eq!(status(&sb, "p1"), "running");
    let n = frozen.lines().count();
    wait_for_output(&sb, "p1", &format!("\n{}\n", n + 2));
    assert_eq!(
        delete_force(&sb, "p1", pid),
        (Some(128 + libc::SIGKILL), None)
    );
    sb.assert_clean();
}

#[test]
fn delete_force_takes_down_a_running_container() {
    let sb = Sandbox::new("force");
    let pid = start_new(&sb, &["sleep", "1000"], "f1");
    delete_force(&sb, "f1", pid);
    ok(krun(&sb, &["delete", "--force", "f1"]));
    assert_ne!(krun(&sb, &["delete", "f1"]).code, 0);
    sb.assert_clean();
}

/// kill -9 of the VM's process (the pid file's) in each phase: state says
/// stopped, delete cleans up, nothing is left.
#[test]
fn kill_dash_nine_of_the_vm_process_in_each_phase() {
    let sb = Sandbox::new("kill9");
    for (phase, id) in [("created", "k1"), ("running", "k2"), ("paused", "k3")] {
        let (_, pid) = create_new(&sb, &["sleep", "1000"], id);
        if phase != "created" {
            ok(krun(&sb, &["start", id]));
        }
        if phase == "paused" {
            ok(krun(&sb, &["pause", id]));
        }
        assert_eq!(status(&sb, id), phase);
        // SAFETY: kill has no memory effects; pid is our (orphaned) child.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        assert_eq!(wait_exit(pid), (None, Some(libc::SIGKILL)));
        assert_eq!(status(&sb, id), "stopped", "{phase}");
        let o = krun(&sb, &["delete", id]);
        assert_eq!(o.code, 0, "{phase}: {}", o.stderr);
        sb.assert_clean();
    }
}

#[test]
fn delete_of_a_created_container_takes_it_down() {
    let sb = Sandbox::new("delcreated");
    let (_, pid) = create_new(&sb, &["true"], "d1");
    delete_and_wait(&sb, "d1", pid);
    sb.assert_clean();
}

#[test]
fn twenty_containers_created_and_deleted_at_once() {
    let sb = Sandbox::new("twenty");
    let b = sb.written_bundle(&["sleep", "1000"]);
    let ids: Vec<String> = (0..20).map(|i| format!("m{i}")).collect();
    let (sb, b) = (&sb, &b);
    let pids: Vec<i32> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .map(|id| s.spawn(move || create(sb, b, id)))
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    std::thread::scope(|s| {
        for id in &ids {
            s.spawn(move || {
                ok(krun(sb, &["start", id]));
                assert_eq!(status(sb, id), "running");
            });
        }
    });
    std::thread::scope(|s| {
        for id in &ids {
            s.spawn(move || {
                let o = krun(sb, &["delete", "--force", id]);
                assert_eq!(o.code, 0, "{id}: {}", o.stderr);
            });
        }
    });
    for pid in pids {
        wait_exit(pid);
    }
    sb.assert_clean();
}

#[test]
fn unknown_containers_are_errors() {
    let sb = Sandbox::new("unknown");
    for args in [
        &["state", "nope"][..],
        &["start", "nope"],
        &["kill", "nope", "TERM"],
        &["delete", "nope"],
        &["pause", "nope"],
    ] {
        let o = krun(&sb, args);
        assert_ne!(o.code, 0, "{args:?}");
        assert!(
            o.stderr.contains("does not exist"),
            "{args:?}: {}",
            o.stderr
        );
    }
    sb.assert_clean();
}

#[test]
fn exec_runs_inside_the_vm_with_its_own_stdio_and_status() {
    let sb = Sandbox::new("exec");
    let pid = start_new(&sb, &["sleep", "1000"], "x1");
    // In the container: its pid namespace (PID 1 is the workload), its root.
    let o = krun(
        &sb,
        &[
            "exec",
            "x1",
            "sh",
            "-c",
            "echo out; echo err >&2; cat /proc/1/cmdline | tr '\\0' ' '; exit 7",
        ],
    );
    assert_eq!(o.code, 7);
    assert_eq!(o.stdout, "out\nsleep 1000 ");
    assert_eq!(o.stderr, "err\n");
    // A missing program fails at once with 127, never hangs.
    let t = Instant::now();
    let o = krun(&sb, &["exec", "x1", "no-such-binary"]);
    assert_eq!(o.code, 127, "{}", o.stderr);
    assert!(
        o.stderr.contains("executable file not found"),
        "{}",
        o.stderr
    );
    assert!(
        t.elapsed() < Duration::from_secs(30),
        "exec of a missing binary took {:?}",
        t.elapsed()
    );
    // stdin is piped through.
    let mut c = sb.cmd();
    c.args(["exec", "x1", "sh", "-c", "cat; echo done"]);
    let o = harness::run_with_timeout(
        c,
        Some(b"piped in\n"),
        harness::RUN_TIMEOUT,
        &sb.path().join("console"),
    );
    assert_eq!(o.stdout(), "piped in\ndone\n");
    // Env, cwd and user flags.
    let o = krun(
        &sb,
        &[
            "exec",
            "--env",
            "FOO=bar",
            "--cwd",
            "/tmp",
            "--user",
            "1000:1000",
            "x1",
            "sh",
            "-c",
            "echo $FOO $(pwd) $(id -u):$(id -g)",
        ],
    );
    assert_eq!(o.stdout, "bar /tmp 1000:1000\n", "{}", o.stderr);
    // A --process file, as conmon passes one.
    let process = serde_json::json!({"args": ["sh", "-c", "echo from process.json; exit 3"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}, "terminal": false});
    let pf = sb.path().join("process.json");
    std::fs::write(&pf, process.to_string()).unwrap();
    let o = krun(&sb, &["exec", "--process", pf.to_str().unwrap(), "x1"]);
    assert_eq!((o.code, o.stdout.as_str()), (3, "from process.json\n"));
    // --detach: the pid file's process exits with the exec'd status.
    let ep = sb.path().join("exec.pid");
    ok(krun(
        &sb,
        &[
            "exec",
            "--detach",
            "--pid-file",
            ep.to_str().unwrap(),
            "x1",
            "sh",
            "-c",
            "sleep 1; exit 5",
        ],
    ));
    let exec_pid = lifecycle::read_pid(&ep);
    assert_eq!(wait_exit(exec_pid), (Some(5), None));
    // ps shows the workload and a running exec, with the container's pids.
    let mut bg = sb.cmd();
    bg.args(["exec", "x1", "sleep", "30"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut bg = bg.spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let o = krun(&sb, &["ps", "x1"]);
        assert_eq!(o.code, 0, "{}", o.stderr);
        if o.stdout.contains("sleep 30") {
            assert!(
                o.stdout
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("1") && l.contains("sleep 1000")),
                "{}",
                o.stdout
            );
            break;
        }
        assert!(
            Instant::now() < deadline,
            "ps never showed the exec: {}",
            o.stdout
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let o = krun(&sb, &["ps", "--format", "json", "x1"]);
    let pids: Vec<i32> = serde_json::from_str(&o.stdout).unwrap();
    assert!(pids.contains(&1) && pids.len() >= 2, "{pids:?}");
    // update changes the limit the container sees; more than the VM has is refused.
    ok(krun(&sb, &["update", "--memory", "134217728", "x1"]));
    let o = krun(&sb, &["exec", "x1", "cat", "/sys/fs/cgroup/memory.max"]);
    assert_eq!(o.stdout.trim(), "134217728");
    refused(
        &sb,
        &["update", "--memory", "100000000000", "x1"],
        "cannot add memory to a running VM",
    );
    delete_force(&sb, "x1", pid);
    let _ = bg.wait();
    // exec into a stopped container fails.
    let o = krun(&sb, &["exec", "x1", "true"]);
    assert_ne!(o.code, 0);
    sb.assert_clean();
}

#[test]
fn exec_with_a_terminal_is_interactive() {
    let sb = Sandbox::new("exectty");
    let pid = start_new(&sb, &["sleep", "1000"], "t1");
    let o = sb.on_a_terminal(
        "rows 40 cols 120",
        "exec --tty t1 sh",
        b"tty; stty size; echo typed-$((6*7))\nexit 4\n",
    );
    o.expect_on_a_terminal(
        4,
        ["/dev/pts/", "40 120", "typed-42"],
        "the terminal's size reaches the exec",
    );
    delete_force(&sb, "t1", pid);
    sb.assert_clean();
}

#[test]
fn features_spec_list_and_version() {
    let sb = Sandbox::new("info");
    let o = krun(&sb, &["features"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["ociVersionMin"], "1.0.0");
    // Every kind of hook runs, as runc lists them.
    assert_eq!(
        v["hooks"],
        serde_json::json!([
            "prestart",
            "createRuntime",
            "createContainer",
            "startContainer",
            "poststart",
            "poststop"
        ])
    );
    assert!(v["annotations"]["io.krun-oci.systemd-cgroup"].is_string());
    // User namespaces run, and idmapped mounts (made on the host).
    assert!(
        v["linux"]["namespaces"]
            .as_array()
            .unwrap()
            .contains(&serde_json::json!("user")),
        "{}",
        o.stdout
    );
    assert_eq!(v["linux"]["mountExtensions"]["idmap"]["enabled"], true);
    let dir = sb.path().join("specdir");
    std::fs::create_dir_all(&dir).unwrap();
    ok(krun(&sb, &["spec", "--bundle", dir.to_str().unwrap()]));
    let spec: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("config.json")).unwrap()).unwrap();
    assert_eq!(spec["process"]["args"][0], "sh");
    assert_ne!(
        krun(&sb, &["spec", "--bundle", dir.to_str().unwrap()]).code,
        0,
        "spec does not overwrite"
    );
    let o = krun(&sb, &["--version"]);
    assert!(o.stdout.starts_with("krun-oci version "), "{}", o.stdout);
    let (_, pid) = create_new(&sb, &["sleep", "1000"], "l1");
    let o = krun(&sb, &["list"]);
    assert!(
        o.stdout
            .lines()
            .any(|l| l.starts_with("l1 ") && l.contains("created")),
        "{}",
        o.stdout
    );
    let o = krun(&sb, &["list", "--format", "json"]);
    let l: Vec<serde_json::Value> = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(l[0]["id"], "l1");
    assert_eq!(krun(&sb, &["list", "-q"]).stdout, "l1\n");
    delete_and_wait(&sb, "l1", pid);
    sb.assert_clean();
}

/// A hook that appends its name and the state's status to `log`.
fn hook(name: &str, log: &Path) -> serde_json::Value {
    let script = format!(
        "s=$(cat); st=${{s#*\\\"status\\\":\\\"}}; echo \"{name} ${{st%%\\\"*}}\" >> {}",
        log.display()
    );
    serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", script]})
}

#[test]
fn hooks_run_in_the_runtime_specs_order_with_the_state() {
    let sb = Sandbox::new("hooks");
    let log = sb.path().join("hooks.log");
    let mut b = sb.bundle(&["sleep", "1000"]);
    let mut hooks = serde_json::Map::new();
    for name in [
        "prestart",
        "createRuntime",
        "createContainer",
        "startContainer",
        "poststart",
        "poststop",
    ] {
        hooks.insert(name.to_string(), serde_json::json!([hook(name, &log)]));
    }
    b.config["hooks"] = serde_json::Value::Object(hooks);
    b.write();
    let pid = create(&sb, &b, "h1");
    ok(krun(&sb, &["start", "h1"]));
    delete_force(&sb, "h1", pid);
    let text = std::fs::read_to_string(&log).unwrap();
    assert_eq!(
        text,
        "prestart creating\ncreateRuntime creating\ncreateContainer creating\nstartContainer created\npoststart running\npoststop stopped\n"
    );
    sb.assert_clean();

    // A failing createRuntime hook fails create and leaves nothing.
    b.config["hooks"] =
        serde_json::json!({"createRuntime": [{"path": "/bin/sh", "args": ["sh", "-c", "exit 4"]}]});
    b.write();
    let mut c = sb.cmd();
    c.args(["create", "--bundle"])
        .arg(&b.dir)
        .arg("h2")
        .stdin(Stdio::null());
    let o = harness::run_with_timeout(c, None, harness::RUN_TIMEOUT, &sb.path().join("console"));
    assert_ne!(o.code, 0);
    assert!(
        o.stderr().contains("hooks.createRuntime[0]"),
        "{}",
        o.stderr()
    );
    sb.assert_clean();

    // A failing startContainer hook fails start and stops the container.
    b.config["hooks"] = serde_json::json!({"startContainer": [{"path": "/bin/false"}]});
    b.write();
    let pid = create(&sb, &b, "h3");
    refused(&sb, &["start", "h3"], "hooks.startContainer[0]");
    delete_once_stopped(&sb, "h3", pid);
}

#[test]
fn an_oom_kill_in_the_guest_is_recorded() {
    let sb = Sandbox::new("oom");
    let mut b = sb.bundle(&["awk", "BEGIN { s = \"x\"; while (1) s = s s }"]);
    b.config["linux"]["resources"] = serde_json::json!({"memory": {"limit": 33554432}});
    b.write();
    let pid = create(&sb, &b, "o1");
    ok(krun(&sb, &["start", "o1"]));
    let (code, signal) = wait_exit(pid);
    // The workload was killed by the kernel: 137.
    assert_eq!((code, signal), (Some(137), None));
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(sb.root().join("o1/state.json")).unwrap()).unwrap();
    assert_eq!(state["oomKilled"], true, "{state}");
    ok(krun(&sb, &["delete", "o1"]));
    sb.assert_clean();
}

/// The create-side hooks that can fail a container: the three `create`
/// runs, and startContainer, which `start` runs.
const CREATE_SIDE: [&str; 4] = [
    "prestart",
    "createRuntime",
    "createContainer",
    "startContainer",
];

/// A hook of kind `kind` that records the state it got, then one that
/// fails (exits 1, or does not exist), and a poststop hook that records
/// the state it got.
fn failing_hooks(kind: &str, failing: &serde_json::Value, log: &Path) -> serde_json::Value {
    let mut hooks = serde_json::Map::new();
    hooks.insert(kind.into(), serde_json::json!([hook(kind, log), failing]));
    hooks.insert(
        "poststop".into(),
        serde_json::json!([hook("poststop", log)]),
    );
    serde_json::Value::Object(hooks)
}

/// The status runc gives the state a hook of `kind` reads.
fn status_for(kind: &str) -> &'static str {
    if kind == "startContainer" {
        "created"
    } else {
        "creating"
    }
}

/// A create-side hook that fails, under `run` and under `create` (and
/// `start` for startContainer): the command fails naming the hook, the
/// hooks before it saw the state runc gives them, the VM is gone, the
/// poststop hooks ran (as runc's destroy runs them), nothing is left.
/// `run` used to hang with the VM up.
#[test]
fn a_failing_create_side_hook_fails_run_and_create_and_leaves_nothing() {
    let sb = Sandbox::new("hookfail");
    let log = sb.path().join("hooks.log");
    let mut b = sb.bundle(&["sleep", "1000"]);
    let exit_1 =
        serde_json::json!({"path": "/bin/sh", "args": ["sh", "-c", "echo nope >&2; exit 1"]});
    let missing = serde_json::json!({"path": "/no/such/hook"});
    for (how, failing, says) in [
        ("exit 1", &exit_1, "failed with exit status: 1: nope"),
        ("missing", &missing, "(/no/such/hook): cannot run it"),
    ] {
        for kind in CREATE_SIDE {
            let case = format!("{kind}, {how}");
            let want = format!("hooks.{kind}[1] ");
            b.config["hooks"] = failing_hooks(kind, failing, &log);
            b.write();
            let _ = std::fs::remove_file(&log);
            let ran = || std::fs::read_to_string(&log).unwrap_or_default();
            let expected = format!("{kind} {}\npoststop stopped\n", status_for(kind));

            // run: an error naming the hook, at once, and nothing left.
            let t = Instant::now();
            let mut c = sb.cmd();
            c.args(["run", "--bundle"]).arg(&b.dir).arg("r1");
            let o = harness::run_with_timeout(
                c,
                None,
                Duration::from_secs(90),
                &sb.path().join("console"),
            );
            assert_ne!(o.code, 0, "run, {case}");
            assert!(o.stderr().contains(&want), "run, {case}: {}", o.stderr());
            assert!(o.stderr().contains(says), "run, {case}: {}", o.stderr());
            assert!(
                t.elapsed() < Duration::from_secs(60),
                "run, {case}: {:?}",
                t.elapsed()
            );
            assert_eq!(ran(), expected, "run, {case}");
            sb.assert_clean();
            let _ = std::fs::remove_file(&log);

            if kind == "startContainer" {
                // create succeeds; start fails and stops the container;
                // delete runs the poststop hooks.
                let pid = create(&sb, &b, "c1");
                refused(&sb, &["start", "c1"], &want);
                delete_once_stopped(&sb, "c1", pid);
            } else {
                let mut c = sb.cmd();
                c.args(["create", "--bundle"])
                    .arg(&b.dir)
                    .arg("c1")
                    .stdin(Stdio::null());
                let o = harness::run_with_timeout(
                    c,
                    None,
                    harness::RUN_TIMEOUT,
                    &sb.path().join("console"),
                );
                assert_ne!(o.code, 0, "create, {case}");
                assert!(o.stderr().contains(&want), "create, {case}: {}", o.stderr());
                assert!(o.stderr().contains(says), "create, {case}: {}", o.stderr());
            }
            assert_eq!(ran(), expected, "create, {case}");
            sb.assert_clean();
        }
    }
}

/// A poststart or poststop hook that fails is a warning, as under runc:
/// the container runs and its status is the workload's.
#[test]
fn failing_poststart_and_poststop_hooks_only_warn() {
    let sb = Sandbox::new("hookwarn");
    let mut b = sb.bundle(&["sh", "-c", "exit 3"]);
    b.config["hooks"] = serde_json::json!({
        "poststart": [{"path": "/bin/false"}],
        "poststop": [{"path": "/no/such/hook"}]
    });
    let out = sb.run(&b, "w1", None);
    out.expect_code(3);
    let err = out.stderr();
    assert!(
        err.contains("hooks.poststart[0] (/bin/false) failed"),
        "{err}"
    );
    assert!(
        err.contains("hooks.poststop[0] (/no/such/hook): cannot run it"),
        "{err}"
    );

    b.config["process"]["args"] = serde_json::json!(["sleep", "1000"]);
    b.write();
    let pid = create(&sb, &b, "w2");
    ok(krun(&sb, &["start", "w2"]));
    assert_eq!(status(&sb, "w2"), "running");
    delete_force(&sb, "w2", pid);
    sb.assert_clean();
}

/// A process exec'd into a container with a user namespace joins it: the
/// same ids inside, the same mapped owner on the host.
#[test]
fn exec_joins_the_containers_user_namespace() {
    let sb = Sandbox::new("execuserns");
    let b = sb.userns_bundle(&["sleep", "1000"]);
    b.write();
    let pid = create(&sb, &b, "u1");
    ok(krun(&sb, &["start", "u1"]));
    let o = krun(
        &sb,
        &[
            "exec",
            "u1",
            "sh",
            "-c",
            "id -u; cat /proc/self/uid_map; touch /from-exec",
        ],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    assert_eq!(o.stdout, "0\n         0     100000      65536\n");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(b.rootfs().join("from-exec")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100000, 100000));
    delete_force(&sb, "u1", pid);
    sb.assert_clean();
}

/// A bundle running `args` in the network, IPC and UTS namespaces of the
/// container whose pid is `leader`, as podman writes a pod member's.
fn member_bundle(sb: &Sandbox, leader: i32, args: &[&str]) -> TestBundle {
    let mut b = sb.written_bundle(args);
    let ns = b.config["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| !matches!(n["type"].as_str(), Some("network" | "ipc" | "uts")));
    for t in ["net", "ipc", "uts"] {
        let typ = if t == "net" { "network" } else { t };
        ns.push(serde_json::json!({"type": typ, "path": format!("/proc/{leader}/ns/{t}")}));
    }
    b.config["hostname"] = serde_json::Value::Null;
    b.write();
    b
}

/// A pod member whose pid on the host (its waiter, what conmon waits on)
/// is killed with -9 takes its processes in the VM with it, as a runc
/// container's go with its init: nothing of it runs on, it is stopped and
/// deleted, and the leader runs on.
#[test]
fn a_member_whose_pid_is_killed_leaves_nothing_running_in_its_vm() {
    let sb = Sandbox::new("memberkill");
    let leader = start_new(&sb, &["sleep", "1000"], "lead");
    let script =
        "i=0; while :; do i=$((i+1)); echo $i > /count.new; mv /count.new /count; sleep 0.1; done";
    let b = member_bundle(&sb, leader, &["sh", "-c", script]);
    let pid = create(&sb, &b, "memb");
    ok(krun(&sb, &["start", "memb"]));
    let count = || {
        std::fs::read_to_string(b.rootfs().join("count"))
            .ok()
            .and_then(|s| s.trim().parse::<u64>().ok())
    };
    harness::process::poll(
        Duration::from_secs(60),
        Duration::from_millis(50),
        || count().filter(|&n| n > 2).ok_or(()),
        |()| format!("the member never counted\n{}", sb.console()),
    );
    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    assert_eq!(wait_exit(pid), (None, Some(libc::SIGKILL)));
    std::thread::sleep(Duration::from_secs(1));
    let at = count();
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(count(), at, "the member's process runs on in the VM");
    assert_eq!(status(&sb, "memb"), "stopped");
    ok(krun(&sb, &["delete", "memb"]));
    assert_eq!(status(&sb, "lead"), "running", "the leader runs on");
    delete_force(&sb, "lead", leader);
    sb.assert_clean();
}

/// A container whose namespaces are another's (`/proc/PID/ns/...`, PID the
/// other's pid: what podman writes for a pod's containers) runs in that
/// container's VM, by hand: its own state, pid, stdio, start, kill, exec
/// and exit status; the leader runs on without it; nothing is left.
#[test]
fn a_container_joining_anothers_namespaces_runs_in_its_vm() {
    let sb = Sandbox::new("member");
    let leader = start_new(&sb, &["sh", "-c", "hostname; exec sleep 1000"], "lead");
    wait_for_output(&sb, "lead", "\n");
    let b = member_bundle(&sb, leader, &["sh", "-c", TRAP_TERM]);
    let pid = create(&sb, &b, "memb");
    assert_ne!(pid, leader);
    assert_eq!(status(&sb, "memb"), "created");
    let o = krun(&sb, &["state", "memb"]);
    let v: serde_json::Value = serde_json::from_str(&o.stdout).unwrap();
    assert_eq!(v["pid"], pid, "the state's pid is the pid file's");
    ok(krun(&sb, &["start", "memb"]));
    assert_eq!(status(&sb, "memb"), "running");
    wait_for_output(&sb, "memb", "started\n");
    // In the leader's UTS and IPC namespaces, in its own PID namespace.
    let ns_of = |id: &str| {
        let o = krun(
            &sb,
            &[
                "exec",
                id,
                "sh",
                "-c",
                "hostname; readlink /proc/self/ns/ipc; readlink /proc/self/ns/pid",
            ],
        );
        assert_eq!(o.code, 0, "{}", o.stderr);
        o.stdout
    };
    let (mine, theirs) = (ns_of("memb"), ns_of("lead"));
    let (mine, theirs): (Vec<&str>, Vec<&str>) = (mine.lines().collect(), theirs.lines().collect());
    assert_eq!(mine[..2], theirs[..2], "hostname and IPC are the leader's");
    assert_ne!(mine[2], theirs[2], "PIDs are its own");
    // Pause freezes its own processes in the guest; the leader runs on. A
    // signal sent meanwhile waits for the thaw; then it reaches its
    // process, and its pid exits with its status.
    ok(krun(&sb, &["pause", "memb"]));
    assert_eq!(status(&sb, "memb"), "paused");
    assert_eq!(status(&sb, "lead"), "running");
    ok(krun(&sb, &["exec", "lead", "true"]));
    refused(&sb, &["exec", "memb", "true"], "paused");
    ok(krun(&sb, &["kill", "memb", "TERM"]));
    std::thread::sleep(std::time::Duration::from_millis(700));
    assert_eq!(out_of(&sb, "memb"), "started\n", "frozen, its trap waits");
    ok(krun(&sb, &["resume", "memb"]));
    assert_eq!(wait_exit(pid), (Some(3), None));
    assert_eq!(out_of(&sb, "memb"), "started\ngot TERM\n");
    assert_eq!(status(&sb, "memb"), "stopped");
    ok(krun(&sb, &["delete", "memb"]));
    assert_eq!(status(&sb, "lead"), "running", "the leader runs on");
    // A PID namespace of another container cannot be joined.
    let mut b2 = sb.written_bundle(&["true"]);
    let ns = b2.config["linux"]["namespaces"].as_array_mut().unwrap();
    ns.retain(|n| n["type"] != "ipc");
    ns.push(serde_json::json!({"type": "pid", "path": format!("/proc/{leader}/ns/pid")}));
    b2.write();
    let o = sb.run_output(&[], &b2, "nopid");
    assert_ne!(o.status.code(), Some(0));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("a pid namespace of container \"lead\" cannot be joined"),
        "{err}"
    );
    delete_force(&sb, "lead", leader);
    sb.assert_clean();
}
