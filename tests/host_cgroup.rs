//! The host cgroup of a container driven by hand: `linux.cgroupsPath`
//! placed as runc places it, never outside the cgroup mounts however it
//! climbs, holding every host process and thread of the container with the
//! documented limits, removed by `delete` (also after kill -9 of the
//! monitor) and by the end of `run`; `--systemd-cgroup` refused with
//! runc's message where systemd does not run, and where it does (a real
//! systemd booted for the test, [`harness::systemd`]) a transient scope
//! that systemd starts, knows the limits of, and stops on delete. Every
//! test checks that nothing is left behind, cgroups included.

use krun_e2e::{self as harness, cgroups, lifecycle};

use std::path::Path;
use std::time::Duration;

use harness::systemd::Systemd;
use harness::{Sandbox, TestBundle};
use lifecycle::{create, krun, ok, wait_exit};

/// VM memory for a 256 MiB limit (+64 MiB for the guest kernel) plus the
/// host overhead (README, "Host cgroups").
const HOST_LIMIT_256M: u64 = (256 + 64 + 256) << 20;

fn bundle(sb: &Sandbox, cgroups_path: &str, args: &[&str]) -> TestBundle {
    let mut b = sb.bundle(args);
    b.config["linux"]["cgroupsPath"] = cgroups_path.into();
    b.config["linux"]["resources"] = serde_json::json!({
        "memory": {"limit": 256 << 20},
        "cpu": {"quota": 50000, "period": 100000}
    });
    b.write();
    b
}

/// Every task of the monitor `pid` and its descendants is in a cgroup
/// named `name` in every hierarchy, each beneath /sys/fs/cgroup; returns
/// the directories.
#[track_caller]
fn all_tasks_in(pid: i32, name: &str) -> Vec<std::path::PathBuf> {
    let tasks = cgroups::task_files(pid);
    assert!(
        tasks.len() >= 3,
        "the monitor, its threads and helpers: {tasks:?}"
    );
    let mut dirs = Vec::new();
    for t in &tasks {
        let Some(lines) = cgroups::dirs_of(t) else {
            continue;
        };
        assert!(!lines.is_empty(), "{}", t.display());
        for (line, dir) in lines {
            assert!(
                line.ends_with(&format!("/{name}")),
                "{} is not in the container's cgroup: {line}",
                t.display()
            );
            assert!(
                dir.starts_with(cgroups::ROOT) && dir.is_dir(),
                "{}",
                dir.display()
            );
            if !dirs.contains(&dir) {
                dirs.push(dir);
            }
        }
    }
    dirs
}

#[test]
fn cgroups_path_stays_beneath_the_mounts_and_delete_removes_it() {
    let sb = Sandbox::new("cg-escape");
    let name = format!("krun-test-escape-{}", std::process::id());
    let _cleanup = cgroups::Cleanup(name.clone());
    for (i, at) in [format!("../../{name}"), format!("/../../{name}")]
        .iter()
        .enumerate()
    {
        let id = format!("e{i}");
        let b = bundle(&sb, at, &["sleep", "600"]);
        let pid = create(&sb, &b, &id);
        let dirs = all_tasks_in(pid, &name);
        // Above the mounts (on v1, /sys/fs/cgroup is a tmpfs holding them).
        let mut above = vec!["/sys/fs", "/sys", "/"];
        if !cgroups::is_v2() {
            above.push(cgroups::ROOT);
        }
        for escaped in above {
            assert!(!Path::new(escaped).join(&name).exists(), "{escaped}/{name}");
        }
        let memory = cgroups::path_of(pid, "memory");
        assert_eq!(cgroups::memory_limit(&memory), Some(HOST_LIMIT_256M));
        let cpu = cgroups::path_of(pid, "cpu");
        assert_eq!(cgroups::cpu_quota(&cpu), (Some(50000), 100000));
        ok(krun(&sb, &["delete", "--force", &id]));
        wait_exit(pid);
        for d in &dirs {
            assert!(!d.exists(), "{} left after delete", d.display());
        }
    }
    assert_eq!(cgroups::named(&name), Vec::<std::path::PathBuf>::new());
    sb.assert_clean();
}

#[test]
fn kill_dash_nine_of_the_monitor_then_delete_leaves_no_cgroup() {
    let sb = Sandbox::new("cg-kill9");
    let name = format!("krun-test-k9-{}", std::process::id());
    let _cleanup = cgroups::Cleanup(name.clone());
    let b = bundle(&sb, &format!("/{name}"), &["sleep", "600"]);
    let pid = create(&sb, &b, "k9");
    ok(krun(&sb, &["start", "k9"]));
    let dirs = all_tasks_in(pid, &name);
    // SAFETY: kill has no memory effects.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    wait_exit(pid);
    assert!(
        dirs.iter().all(|d| d.exists()),
        "the cgroup waits for delete"
    );
    ok(krun(&sb, &["delete", "k9"]));
    assert_eq!(cgroups::named(&name), Vec::<std::path::PathBuf>::new());
    sb.assert_clean();
}

#[test]
fn run_holds_its_own_process_in_the_cgroup_and_removes_it() {
    let sb = Sandbox::new("cg-run");
    let name = format!("krun-test-run-{}", std::process::id());
    let _cleanup = cgroups::Cleanup(name.clone());
    let b = bundle(&sb, &format!("/{name}"), &["sleep", "4"]);
    let mut child = sb.spawn_run(&b, "r1");
    let pid = child.id() as i32;
    krun_e2e::process::poll(
        Duration::from_secs(30),
        Duration::from_millis(50),
        // Joined (every thread after it starts inside), and the VM's
        // threads or helpers are up.
        || {
            let tasks = cgroups::task_files(pid);
            let own = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
            let joined = !own.is_empty() && own.lines().all(|l| l.ends_with(&format!("/{name}")));
            match joined && tasks.len() >= 3 {
                true => Ok(()),
                false => Err(tasks.len()),
            }
        },
        |n| format!("run has not joined or has no VM yet ({n} tasks)"),
    );
    let dirs = all_tasks_in(pid, &name);
    let st = harness::wait_timeout(&mut child, Duration::from_secs(60)).expect("run timed out");
    assert!(st.success(), "{st:?}: {}", sb.console());
    for d in &dirs {
        assert!(!d.exists(), "{} left after run", d.display());
    }
    sb.assert_clean();
}

#[test]
fn systemd_cgroups_without_systemd_are_refused_like_runc() {
    let sb = Sandbox::new("cg-systemd");
    let cases = [
        (
            "/libpod_parent/x",
            "expected cgroupsPath to be of format \"slice:prefix:name\" for systemd cgroups",
        ),
        (
            "system.slice:krun-test:x",
            "systemd not running on this host, cannot use systemd cgroups manager",
        ),
    ];
    let systemd = Path::new("/run/systemd/system").exists();
    for (at, why) in cases {
        if systemd && why.starts_with("systemd not running") {
            harness::podman::loud("systemd runs here: the refusal without systemd is not tested");
            continue;
        }
        let b = bundle(&sb, at, &["true"]);
        let o = krun(
            &sb,
            &[
                "--systemd-cgroup",
                "create",
                "--bundle",
                b.dir.to_str().unwrap(),
                "sd",
            ],
        );
        assert_ne!(o.code, 0, "{at}");
        assert!(o.stderr.contains(why), "{at}: {}", o.stderr);
        assert_eq!(
            cgroups::named("krun-test-x.scope"),
            Vec::<std::path::PathBuf>::new()
        );
        sb.assert_clean();
    }
}

#[test]
fn a_limit_the_host_refuses_fails_create_naming_the_file_and_leaves_nothing() {
    let sb = Sandbox::new("cg-refused");
    let name = format!("krun-test-refused-{}", std::process::id());
    let _cleanup = cgroups::Cleanup(name.clone());
    let mut b = bundle(&sb, &format!("/{name}"), &["true"]);
    // A CPU this host does not have.
    b.config["linux"]["resources"]["cpu"]["cpus"] = "4095".into();
    b.write();
    let o = krun(&sb, &["create", "--bundle", b.dir.to_str().unwrap(), "bad"]);
    assert_ne!(o.code, 0);
    assert!(
        o.stderr.contains(&format!("{name}/cpuset.cpus")) && o.stderr.contains("\"4095\""),
        "{}",
        o.stderr
    );
    assert_eq!(cgroups::named(&name), Vec::<std::path::PathBuf>::new());
    sb.assert_clean();
}

/// `krun-oci ARGS` of sandbox `sb`, run inside `sd`'s namespaces (where
/// systemd is PID 1 and the cgroup tree is its own); create's stdio goes
/// to files, as the monitor keeps them.
fn krun_in(sd: &Systemd, sb: &Sandbox, args: &[&str]) -> lifecycle::Out {
    let mut c = sd.command(harness::krun_oci_bin());
    c.env("KRUN_OCI_LIBDIR", harness::libdir());
    if let Some(h) = harness::hypervisor() {
        c.arg("--hypervisor").arg(h);
    }
    c.arg("--root").arg(sb.root());
    c.env("KRUN_OCI_CONSOLE_COPY", sb.path().join("console"));
    c.args(args).stdin(std::process::Stdio::null());
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let (out, err) = (
        sb.path().join(format!("sd{n}.out")),
        sb.path().join(format!("sd{n}.err")),
    );
    c.stdout(std::fs::File::create(&out).unwrap());
    c.stderr(std::fs::File::create(&err).unwrap());
    let mut child = c.spawn().unwrap();
    let status = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT)
        .unwrap_or_else(|| panic!("krun-oci {args:?} timed out; console: {}", sb.console()));
    lifecycle::Out {
        code: status.code().unwrap_or(-1),
        stdout: std::fs::read_to_string(&out).unwrap(),
        stderr: std::fs::read_to_string(&err).unwrap(),
    }
}

/// `systemctl show -p PROPERTY --value UNIT` in `sd`.
fn unit_property(sd: &Systemd, unit: &str, property: &str) -> String {
    let o = sd
        .command("systemctl")
        .args(["show", "--value", "-p", property, unit])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// The pids (ours) in cgroup `dir`.
fn procs(dir: &Path) -> Vec<i32> {
    std::fs::read_to_string(dir.join("cgroup.procs"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.parse().ok())
        .collect()
}

/// The last lines of a log.
fn tail(log: &str) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Whether `pid` is one of `tops` or below one of them, or a kernel
/// thread KVM made for a VM (`kvm-nx-lpage-recovery`, which the kernel
/// puts in the cgroup of the VMM that made the VM).
fn below(mut pid: i32, tops: &[i32]) -> bool {
    for _ in 0..16 {
        if tops.contains(&pid) {
            return true;
        }
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let field = |name: &str| {
            status
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| v.trim().to_string())
                .unwrap_or_default()
        };
        let (name, parent) = (field("Name:"), field("PPid:"));
        if parent == "2" && name.starts_with("kvm") {
            return true;
        }
        match parent.parse() {
            Ok(p) if p > 1 => pid = p,
            _ => return false,
        }
    }
    false
}

/// Boots systemd for a test, or says loudly why this host cannot.
fn systemd_for(sb: &Sandbox) -> Option<Systemd> {
    if !cgroups::is_v2() {
        harness::podman::loud(
            "--systemd-cgroup with a real systemd needs a cgroup v2 host to boot it on: \
             not tested here (cgroup v1 hybrid); hack/test runs it in the nested test host",
        );
        return None;
    }
    Some(Systemd::boot(&[sb.path()]).unwrap_or_else(|e| panic!("{e}")))
}

#[test]
fn systemd_cgroup_is_a_delegated_scope_that_systemd_starts_and_stops() {
    let sb = Sandbox::new("cg-sd");
    let Some(sd) = systemd_for(&sb) else { return };
    let unit = "krun-test-c1.scope";
    let scope = sd.cgroup().join("machine.slice").join(unit);
    let b = bundle(&sb, "machine.slice:krun-test:c1", &["sleep", "600"]);
    let bundle_dir = b.dir.to_str().unwrap();
    let o = krun_in(
        &sd,
        &sb,
        &["--systemd-cgroup", "create", "--bundle", bundle_dir, "c1"],
    );
    assert_eq!(
        o.code,
        0,
        "create: {}; systemd: {}",
        o.stderr,
        tail(&sd.log())
    );
    // systemd knows the unit: active, delegated, in its slice, with our
    // limits as its properties, and its cgroup is where runc's would be.
    assert_eq!(unit_property(&sd, unit, "ActiveState"), "active");
    assert_eq!(unit_property(&sd, unit, "Delegate"), "yes");
    assert_eq!(unit_property(&sd, unit, "Slice"), "machine.slice");
    assert_eq!(
        unit_property(&sd, unit, "ControlGroup"),
        format!("/machine.slice/{unit}")
    );
    assert_eq!(
        unit_property(&sd, unit, "MemoryMax"),
        HOST_LIMIT_256M.to_string()
    );
    assert_eq!(unit_property(&sd, unit, "CPUQuotaPerSecUSec"), "500ms");
    let read = |f: &str| std::fs::read_to_string(scope.join(f)).unwrap();
    assert_eq!(read("memory.max").trim(), HOST_LIMIT_256M.to_string());
    assert_eq!(read("cpu.max").trim(), "50000 100000");
    // It holds the container's host side, whole: the monitor and what it
    // started (the VMM), and nothing of anyone else.
    ok(krun_in(&sd, &sb, &["start", "c1"]));
    let held = procs(&scope);
    // (Bar systemd's own setup, which was given the sandbox to share.)
    let ours: Vec<i32> = harness::processes_mentioning(sb.path().to_str().unwrap())
        .iter()
        .filter(|p| !p.contains("krun-systemd-setup"))
        .filter_map(|p| p.split(':').next()?.parse().ok())
        .collect();
    assert!(!held.is_empty());
    for p in &ours {
        assert!(
            held.contains(p),
            "{p} of {ours:?} not in the scope: {held:?}"
        );
    }
    for p in &held {
        assert!(
            below(*p, &ours),
            "{p} in the scope is not the container's: {}",
            harness::processes_mentioning("").join("; ")
        );
    }
    // update sets the unit's properties as well as the files.
    let resources = sb.path().join("resources.json");
    std::fs::write(
        &resources,
        r#"{"cpu": {"quota": 25000, "period": 100000, "cpus": "0"}}"#,
    )
    .unwrap();
    ok(krun_in(
        &sd,
        &sb,
        &["update", "--resources", resources.to_str().unwrap(), "c1"],
    ));
    assert_eq!(unit_property(&sd, unit, "CPUQuotaPerSecUSec"), "250ms");
    assert_eq!(unit_property(&sd, unit, "AllowedCPUs"), "0");
    assert_eq!(read("cpu.max").trim(), "25000 100000");
    assert_eq!(read("cpuset.cpus").trim(), "0");
    // delete stops the unit: systemd forgets it and its cgroup goes.
    ok(krun_in(&sd, &sb, &["delete", "--force", "c1"]));
    assert_eq!(unit_property(&sd, unit, "LoadState"), "not-found");
    assert!(!scope.exists(), "{} left after delete", scope.display());
    // A limit this host refuses fails create naming the file, and the unit
    // it had started is stopped.
    let mut b = bundle(&sb, "machine.slice:krun-test:c2", &["true"]);
    b.config["linux"]["resources"]["cpu"]["cpus"] = "4095".into();
    b.write();
    let bundle_dir = b.dir.to_str().unwrap();
    let o = krun_in(
        &sd,
        &sb,
        &["--systemd-cgroup", "create", "--bundle", bundle_dir, "c2"],
    );

    assert!(
        o.code != 0 && o.stderr.contains("cpuset.cpus"),
        "exit {}: {}{}; systemd: {}",
        o.code,
        o.stdout,
        o.stderr,
        tail(&sd.log())
    );
    assert_eq!(
        unit_property(&sd, "krun-test-c2.scope", "LoadState"),
        "not-found"
    );
    assert!(!sd
        .cgroup()
        .join("machine.slice/krun-test-c2.scope")
        .exists());
    // A path not shaped slice:prefix:name is refused with runc's words.
    let b = bundle(&sb, "/not/systemd", &["true"]);
    let bundle_dir = b.dir.to_str().unwrap();
    let o = krun_in(
        &sd,
        &sb,
        &["--systemd-cgroup", "create", "--bundle", bundle_dir, "c3"],
    );
    assert_ne!(o.code, 0);
    assert!(
        o.stderr
            .contains("expected cgroupsPath to be of format \"slice:prefix:name\""),
        "{}",
        o.stderr
    );
    // Nothing left in systemd's mount namespace either.
    let mounts = std::fs::read_to_string(format!("/proc/{}/mountinfo", sd.pid())).unwrap();
    let needle = sb.path().to_str().unwrap();
    let leaked: Vec<&str> = mounts
        .lines()
        .filter(|l| l.contains(needle) && l.split(' ').nth(4).is_none_or(|m| m != needle))
        .collect();
    assert!(
        leaked.is_empty(),
        "mounts left in systemd's namespace: {leaked:?}"
    );
    drop(sd);
    sb.assert_clean();
}
