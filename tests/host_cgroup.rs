//! The host cgroup of a container driven by hand: `linux.cgroupsPath`
//! placed as runc places it, never outside the cgroup mounts however it
//! climbs, holding every host process and thread of the container with the
//! documented limits, removed by `delete` (also after kill -9 of the
//! monitor) and by the end of `run`; `--systemd-cgroup` refused with
//! runc's message where systemd does not run. Every test checks that
//! nothing is left behind, cgroups included.

use krun_e2e::{self as harness, cgroups, lifecycle};

use std::path::Path;
use std::time::Duration;

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
