//! The cgroup manager on fake cgroupfs roots (tempdirs laid out like this
//! host's v1 hybrid and a v2 host, with the files the kernel would make
//! created by hand), and once on the real one as root.

use std::fs;
use std::path::Path;

use super::layout::Layout;
use super::*;

const HYBRID_DIRS: [&str; 8] = [
    "cpu", "cpuacct", "cpuset", "memory", "devices", "pids", "systemd", "unified",
];

fn hybrid_mountinfo() -> String {
    let mut s = String::from("31 23 0:28 / /sys/fs/cgroup rw - tmpfs tmpfs rw\n");
    for (i, d) in HYBRID_DIRS.iter().enumerate() {
        let (fstype, opt) = match *d {
            "unified" => ("cgroup2", "rw".to_string()),
            "systemd" => ("cgroup", "rw,name=systemd".to_string()),
            c => ("cgroup", format!("rw,{c}")),
        };
        s += &format!(
            "{} 31 0:{i} / /sys/fs/cgroup/{d} rw - {fstype} {fstype} {opt}\n",
            40 + i
        );
    }
    s
}

const HYBRID_SELF: &str =
    "9:name=systemd:/\n8:pids:/\n5:devices:/\n4:memory:/own\n3:cpuset:/\n2:cpuacct:/\n1:cpu:/\n0::/\n";

/// Lays out `dir` (below `root`) with the files cgroupfs would make.
fn v1_dir(root: &Path, ctl: &str, dir: &str) {
    let d = root.join(ctl).join(dir);
    fs::create_dir_all(&d).unwrap();
    let files: &[(&str, &str)] = match ctl {
        "cpuset" => &[("cpuset.cpus", ""), ("cpuset.mems", "")],
        "memory" => &[
            ("memory.limit_in_bytes", "9223372036854771712"),
            ("memory.usage_in_bytes", "4096"),
            ("memory.max_usage_in_bytes", "8192"),
        ],
        "cpu" => &[
            ("cpu.shares", "1024"),
            ("cpu.cfs_period_us", "100000"),
            ("cpu.cfs_quota_us", "-1"),
        ],
        "cpuacct" => &[("cpuacct.usage", "123")],
        "pids" => &[("pids.max", "max"), ("pids.current", "3")],
        _ => &[],
    };
    for (f, v) in files.iter().chain(&[("cgroup.procs", ""), ("tasks", "")]) {
        fs::write(d.join(f), v).unwrap();
    }
}

fn hybrid(root: &Path, dir: &str) -> Layout {
    for ctl in HYBRID_DIRS {
        v1_dir(root, ctl, "");
        let mut at = std::path::PathBuf::new();
        for part in Path::new(dir) {
            at.push(part);
            v1_dir(root, ctl, at.to_str().unwrap());
        }
    }
    fs::write(root.join("cpuset/cpuset.cpus"), "0-1").unwrap();
    fs::write(root.join("cpuset/cpuset.mems"), "0").unwrap();
    Layout::parse(&hybrid_mountinfo(), HYBRID_SELF, false, root).unwrap()
}

fn read(p: impl AsRef<Path>) -> String {
    fs::read_to_string(p).unwrap()
}

fn limits() -> HostResources {
    HostResources {
        memory_limit: Some(512 << 20),
        cpu_shares: Some(512),
        cpu_quota: Some(50000),
        cpu_period: Some(100000),
        cpuset_cpus: None,
        cpuset_mems: None,
        pids_max: Some(64),
    }
}

fn abs(path: &str) -> HostCgroup {
    HostCgroup::Fs {
        path: path.into(),
        relative: false,
    }
}

#[test]
fn v1_hybrid_sets_each_controller_in_its_own_hierarchy() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let layout = hybrid(r, "p/c1");
    let cg = Cgroup::create_in(&layout, &abs("p/c1"), &limits()).unwrap();
    assert_eq!(
        read(r.join("memory/p/c1/memory.limit_in_bytes")),
        "536870912"
    );
    assert_eq!(read(r.join("cpu/p/c1/cpu.cfs_quota_us")), "50000");
    assert_eq!(read(r.join("cpu/p/c1/cpu.cfs_period_us")), "100000");
    assert_eq!(read(r.join("cpu/p/c1/cpu.shares")), "512");
    assert_eq!(read(r.join("pids/p/c1/pids.max")), "64");
    // cpuset copied down level by level from the root.
    assert_eq!(read(r.join("cpuset/p/cpuset.cpus")), "0-1");
    assert_eq!(read(r.join("cpuset/p/c1/cpuset.mems")), "0");
    assert_eq!(cg.dir("memory").unwrap(), r.join("memory/p/c1"));
    assert_eq!(cg.dir("").unwrap(), r.join("unified/p/c1"));

    cg.join(4242).unwrap();
    for ctl in HYBRID_DIRS {
        assert_eq!(read(r.join(ctl).join("p/c1/cgroup.procs")), "4242", "{ctl}");
    }
    // The calling thread, alone in its process (this test's thread is
    // not), moves through `tasks` in v1 hierarchies; the unified one is
    // left alone when the process started there.
    for ctl in HYBRID_DIRS {
        fs::write(r.join(ctl).join("p/c1/cgroup.procs"), "").unwrap();
    }
    cg.join_self(true).unwrap();
    let alone = only_thread();
    for ctl in HYBRID_DIRS {
        let (procs, tasks) = match (ctl, alone) {
            ("unified", _) => ("", ""),
            (_, true) => ("", "0"),
            (_, false) => ("0", ""),
        };
        assert_eq!(read(r.join(ctl).join("p/c1/cgroup.procs")), procs, "{ctl}");
        assert_eq!(read(r.join(ctl).join("p/c1/tasks")), tasks, "{ctl}");
    }
    cg.join_self(false).unwrap();
    assert_eq!(read(r.join("unified/p/c1/cgroup.procs")), "0");

    let s = cg.stats();
    assert_eq!(s.memory_limit, Some(536870912));
    assert_eq!(
        (s.memory_usage, s.memory_max_usage),
        (Some(4096), Some(8192))
    );
    assert_eq!((s.cpu_usage_ns, s.pids), (Some(123), Some(3)));

    // The recorded paths find the same cgroup; update changes only what
    // it names; unlimited is spelled as the kernel wants.
    let again = Cgroup::from_paths(
        serde_json::from_str(&serde_json::to_string(cg.paths()).unwrap()).unwrap(),
    );
    assert_eq!(again, cg);
    let update = HostResources {
        cpu_quota: Some(-1),
        cpuset_cpus: Some("1".into()),
        pids_max: Some(0),
        ..Default::default()
    };
    again.update(&update).unwrap();
    assert_eq!(read(r.join("cpu/p/c1/cpu.cfs_quota_us")), "-1");
    assert_eq!(read(r.join("cpuset/p/c1/cpuset.cpus")), "1");
    assert_eq!(read(r.join("pids/p/c1/pids.max")), "max");
    assert_eq!(
        read(r.join("memory/p/c1/memory.limit_in_bytes")),
        "536870912"
    );

    // leave goes back to our own cgroup in each hierarchy.
    v1_dir(r, "memory", "own");
    again.leave().unwrap();
    assert_eq!(read(r.join("memory/own/cgroup.procs")), "0");
    assert_eq!(read(r.join("cpu/cgroup.procs")), "0");
}

#[test]
fn relative_paths_land_below_our_own_cgroup_and_remove_takes_the_leaf_only() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let layout = hybrid(r, "own/c1");
    for ctl in HYBRID_DIRS {
        v1_dir(r, ctl, "c1");
    }
    let rel = HostCgroup::Fs {
        path: "c1".into(),
        relative: true,
    };
    let cg = Cgroup::create_in(&layout, &rel, &HostResources::default()).unwrap();
    assert_eq!(cg.dir("memory").unwrap(), r.join("memory/own/c1"));
    assert_eq!(cg.dir("cpu").unwrap(), r.join("cpu/c1"));
    // A fake cgroup's files make rmdir fail with ENOTEMPTY: empty them
    // as the kernel would.
    for ctl in HYBRID_DIRS {
        let d = cg
            .dir(if ctl == "systemd" {
                "name=systemd"
            } else if ctl == "unified" {
                ""
            } else {
                ctl
            })
            .unwrap();
        for f in fs::read_dir(&d).unwrap() {
            fs::remove_file(f.unwrap().path()).unwrap();
        }
    }
    fs::create_dir(r.join("cpu/c1/child")).unwrap();
    cg.remove().unwrap();
    assert!(!r.join("memory/own/c1").exists() && !r.join("cpu/c1").exists());
    assert!(r.join("memory/own").exists());
    cg.remove().unwrap();
}

#[test]
fn a_failure_names_the_file_and_leaves_nothing() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let layout = hybrid(r, "x");
    fs::remove_file(r.join("pids/x/pids.max")).unwrap();
    // Empty the new dirs so that rmdir works on the fake root.
    for ctl in HYBRID_DIRS {
        for f in fs::read_dir(r.join(ctl).join("x")).unwrap() {
            let f = f.unwrap().path();
            if !f.ends_with("memory.limit_in_bytes")
                && !f.ends_with("cpu.cfs_quota_us")
                && !f.ends_with("cpu.cfs_period_us")
                && !f.ends_with("cpu.shares")
                && !f.ends_with("cpuset.cpus")
                && !f.ends_with("cpuset.mems")
            {
                fs::remove_file(f).unwrap();
            }
        }
    }
    let e = Cgroup::create_in(&layout, &abs("x"), &limits()).unwrap_err();
    let shown = e.to_string();
    assert!(
        shown.contains("pids/x/pids.max") && shown.contains("\"64\""),
        "{shown}"
    );
    for ctl in ["devices", "systemd", "unified", "pids"] {
        assert!(!r.join(ctl).join("x").exists(), "{ctl}");
    }
}

#[test]
fn v2_enables_controllers_down_the_path_and_writes_unified_files() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    for d in ["", "k", "k/c1"] {
        fs::create_dir_all(r.join(d)).unwrap();
        let files = [
            ("cgroup.controllers", "cpuset cpu io memory pids"),
            ("cgroup.subtree_control", ""),
            ("cgroup.procs", ""),
            ("cpu.max", "max 100000"),
            ("cpu.weight", "100"),
            ("memory.max", "max"),
            ("pids.max", "max"),
            ("cpuset.cpus", ""),
            ("cpuset.mems", ""),
            ("memory.current", "100"),
            ("cpu.stat", "usage_usec 7\nuser_usec 5\n"),
        ];
        for (f, v) in files {
            fs::write(r.join(d).join(f), v).unwrap();
        }
    }
    let mi = "26 22 0:24 / /sys/fs/cgroup rw - cgroup2 cgroup2 rw\n";
    let layout = Layout::parse(mi, "0::/init.scope\n", true, r).unwrap();
    let res = HostResources {
        cpuset_cpus: Some("0".into()),
        ..limits()
    };
    let cg = Cgroup::create_in(&layout, &abs("k/c1"), &res).unwrap();
    // Each write of "+c" replaced the fake file: the last one is there.
    assert_eq!(read(r.join("cgroup.subtree_control")), "+cpuset");
    assert_eq!(read(r.join("k/cgroup.subtree_control")), "+cpuset");
    assert_eq!(read(r.join("k/c1/cpu.max")), "50000 100000");
    assert_eq!(read(r.join("k/c1/cpu.weight")), "20");
    assert_eq!(read(r.join("k/c1/memory.max")), "536870912");
    assert_eq!(read(r.join("k/c1/pids.max")), "64");
    assert_eq!(read(r.join("k/c1/cpuset.cpus")), "0");
    cg.update(&HostResources {
        cpu_period: Some(200000),
        ..Default::default()
    })
    .unwrap();
    assert_eq!(read(r.join("k/c1/cpu.max")), "50000 200000");
    let s = cg.stats();
    assert_eq!((s.cpu_usage_ns, s.memory_usage), (Some(7000), Some(100)));
    assert_eq!(s.memory_limit, Some(536870912));
}

#[test]
fn the_root_cgroup_is_refused_and_untouched() {
    let t = tempfile::tempdir().unwrap();
    let r = t.path();
    let layout = hybrid(r, "x");
    let root = crate::plan::host_cgroup::host_cgroup(Some("/.."), "c1", false).unwrap();
    let e = Cgroup::create_in(&layout, &root, &limits()).unwrap_err();
    assert!(matches!(e, CgroupError::Root), "{e}");
    assert_eq!(
        read(r.join("memory/memory.limit_in_bytes")),
        "9223372036854771712"
    );
}

#[test]
fn systemd_without_systemd_is_refused_with_runcs_message() {
    if Path::new(SYSTEMD_RUNNING).exists() {
        return;
    }
    let sd = HostCgroup::Systemd {
        slice: "system.slice".into(),
        slice_path: "system.slice".into(),
        unit: "krun-oci-x.scope".into(),
    };
    let e = Cgroup::create(&sd, &HostResources::default()).unwrap_err();
    assert_eq!(
        e.to_string(),
        "systemd not running on this host, cannot use systemd cgroups manager"
    );
}

/// On the real cgroupfs: needs root (CI and `hack/test` run as root; the
/// lead also runs it under v2 in the nested host).
#[test]
fn real_cgroupfs_holds_a_process_with_its_limits() {
    assert!(
        nix::unistd::geteuid().is_root(),
        "this test needs root and a writable /sys/fs/cgroup: run it as root"
    );
    let top = format!("krun-oci-test-{}", std::process::id());
    let res = HostResources {
        cpuset_cpus: Some("0".into()),
        ..limits()
    };
    let started = std::time::Instant::now();
    let cg = Cgroup::create(&abs(&format!("{top}/x")), &res).unwrap();
    eprintln!("created and limited in {:?}", started.elapsed());
    let mut child = std::process::Command::new("sleep")
        .arg("30")
        .spawn()
        .unwrap();
    let joined = cg.join(child.id() as i32);
    let own = fs::read_to_string(format!("/proc/{}/cgroup", child.id())).unwrap();
    let stats = cg.stats();
    let value = |ctl: &str, f: &str| fs::read_to_string(cg.dir(ctl).unwrap().join(f));
    let (cpu, pids) = match cg.paths().version {
        Version::V1 => (
            value("cpu", "cpu.cfs_quota_us")
                .and_then(|q| Ok(q + &value("cpu", "cpu.cfs_period_us")?)),
            value("pids", "pids.max"),
        ),
        Version::V2 => (value("", "cpu.max"), value("", "pids.max")),
    };
    let _ = child.kill();
    let _ = child.wait();
    let dirs: Vec<_> = cg.paths().hierarchies.clone();
    let removed = cg.remove();
    let removed_top = Cgroup::create_in(
        &Layout::detect().unwrap(),
        &abs(&top),
        &HostResources::default(),
    )
    .and_then(|c| c.remove());
    joined.unwrap();
    removed.unwrap();
    removed_top.unwrap();
    let want = format!(":/{top}/x");
    assert_eq!(
        own.lines().filter(|l| l.ends_with(&want)).count(),
        dirs.len(),
        "{own}"
    );
    assert_eq!(stats.memory_limit, Some(512 << 20));
    let cpu = cpu
        .unwrap()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    assert_eq!(cpu, "50000 100000");
    assert_eq!(pids.unwrap().trim(), "64");
    assert!(
        stats.pids.is_some() && stats.cpu_usage_ns.is_some(),
        "{stats:?}"
    );
    for h in &dirs {
        assert!(!h.mount.join(&top).exists(), "{}", h.mount.display());
    }
}
