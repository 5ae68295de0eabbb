//! Every host process of a container runs confined: `no_new_privs`, a
//! seccomp filter and only the capabilities documented in
//! src/hypervisor/src/confine.rs — the monitor (`krun-oci create`'s pid
//! file process) and its helpers (QEMU, virtiofsd and its sandbox's
//! parents), under podman, by hand, and under containerd (the shim too).
//!
//! QEMU also runs jailed (src/hypervisor/src/jail.rs): a uid of its own,
//! not root, and a root of its own, an empty tmpfs with only `/usr`, the
//! libraries, the kernel and initramfs and a few devices. So does the
//! built-in VMM, a process of its own (src/vmm/src/process.rs): root, but
//! with only the file server's eight capabilities, in a root holding only
//! the composed share, at its host path.
//!
//! krun-oci only: runc's processes are confined differently (runc's own
//! init exec's the workload), so these tests do not run against runc.

use krun_e2e::{self as harness, containerd, lifecycle, podman};

use std::collections::BTreeMap;

use caps::Capability::{self, *};
use containerd::{is_krun, Containerd};
use harness::Sandbox;
use krun_hypervisor::JAIL_ID_BASE;
use podman::{busybox, Podman};

/// What the monitor (and the shim) keep beyond virtiofsd's set
/// (confine.rs MONITOR_EXTRA_CAPS).
const MONITOR_EXTRA: &[Capability] = &[CAP_DAC_READ_SEARCH, CAP_KILL, CAP_NET_ADMIN];

/// What the built-in VMM keeps once jailed (confine.rs VMM_CAPS): the
/// file server's, virtiofsd's without SYS_ADMIN and SETPCAP.
const VMM: &[Capability] = &[
    CAP_CHOWN,
    CAP_DAC_OVERRIDE,
    CAP_FOWNER,
    CAP_FSETID,
    CAP_SETGID,
    CAP_SETUID,
    CAP_MKNOD,
    CAP_SETFCAP,
];

/// What virtiofsd starts with (confine.rs VIRTIOFSD_CAPS), and the VMM
/// until it is jailed: the file server's, SYS_ADMIN for the sandbox and
/// SETPCAP to drop more itself.
fn virtiofsd() -> u64 {
    mask(VMM) | mask(&[CAP_SYS_ADMIN, CAP_SETPCAP])
}

/// The monitor's (and the shim's) capabilities, as a mask.
fn monitor() -> u64 {
    virtiofsd() | mask(MONITOR_EXTRA)
}

/// Every capability this machine's root has: what an unconfined process
/// shows (all but CAP_SYS_RESOURCE here; all 41 elsewhere).
const FULL_SETS: &[u64] = &[0x1ff_ffff_ffff, 0x1ff_feff_ffff];

fn mask(set: &[Capability]) -> u64 {
    set.iter().fold(0, |m, c| m | 1 << c.index())
}

/// `/proc/PID/status` as name → value.
fn status(pid: i32) -> BTreeMap<String, String> {
    let path = format!("/proc/{pid}/status");
    read_status(&path).unwrap_or_else(|| panic!("cannot read {path}"))
}

/// A status file (a process's, or one of its threads') as name → value;
/// None when it is gone.
fn read_status(path: &str) -> Option<BTreeMap<String, String>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.to_string(), v.trim().to_string()))
            .collect(),
    )
}

fn hex(s: &BTreeMap<String, String>, key: &str) -> u64 {
    u64::from_str_radix(&s[key], 16).unwrap_or_else(|e| panic!("{key} {:?}: {e}", s[key]))
}

/// Asserts that every thread of `pid` runs with NNP and a seccomp filter,
/// that its capabilities (effective and bounding) are within `keep`, and
/// that they are not the full set (capabilities are per thread: the
/// built-in VMM's vCPU and device threads run in the monitor). `exact`:
/// the main thread's effective set is `keep` itself (the built-in
/// virtio-fs threads drop some of theirs while serving a guest user).
#[track_caller]
fn assert_confined(pid: i32, keep: u64, exact: bool) {
    let tasks: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
        .map(|t| t.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(!tasks.is_empty(), "{pid} has no threads");
    for tid in tasks {
        // A thread that ended meanwhile has nothing to check.
        if let Some(s) = read_status(&format!("/proc/{pid}/task/{tid}/status")) {
            let main = tid == pid.to_string();
            assert_thread_confined(&format!("{pid} thread {tid}"), &s, keep, exact && main);
        }
    }
}

#[track_caller]
fn assert_thread_confined(who: &str, s: &BTreeMap<String, String>, keep: u64, exact: bool) {
    let who = format!("{who} ({})", s["Name"]);
    assert_eq!(s["NoNewPrivs"], "1", "{who}: no_new_privs");
    assert_eq!(s["Seccomp"], "2", "{who}: seccomp filter mode");
    let (eff, bnd) = (hex(s, "CapEff"), hex(s, "CapBnd"));
    assert!(
        !FULL_SETS.contains(&eff),
        "{who}: CapEff {eff:016x} is the full set"
    );
    assert!(
        !FULL_SETS.contains(&bnd),
        "{who}: CapBnd {bnd:016x} is the full set"
    );
    assert_eq!(
        eff & !keep,
        0,
        "{who}: CapEff {eff:016x} beyond {keep:016x}"
    );
    assert_eq!(
        bnd & !keep,
        0,
        "{who}: CapBnd {bnd:016x} beyond {keep:016x}"
    );
    if exact {
        assert_eq!(eff, keep, "{who}: CapEff");
    }
}

/// What QEMU's root may hold: `/usr`, the libraries (or the symlinks to
/// them a merged-/usr host has), the loader's cache, the kernel and
/// initramfs, and its `/dev`.
const JAIL_ENTRIES: &[&str] = &[
    "usr", "lib", "lib64", "lib32", "libx32", "etc", "kernel", "initrd", "dev",
];
/// QEMU's `/dev`: `kvm` only with KVM.
const JAIL_DEVICES: &[&str] = &["kvm", "null", "zero", "urandom"];

fn entries(dir: &str) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{dir}: {e}"))
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// Asserts that QEMU `pid`, started by `starter` (the monitor or the
/// shim), runs as neither root user nor root group but as its jail's own
/// ids (the jails' base plus the starter's pid, which no other live QEMU
/// shares), and in a root of its own holding only [`JAIL_ENTRIES`].
#[track_caller]
fn assert_jailed(pid: i32, starter: i32) {
    let s = status(pid);
    // Real, effective, saved and file system ids: all the same, its
    // jail's.
    let own = (JAIL_ID_BASE + starter as u32).to_string();
    for key in ["Uid", "Gid"] {
        let ids: Vec<&str> = s[key].split_whitespace().collect();
        assert_eq!(ids, [own.as_str(); 4], "QEMU {pid}: {key}");
    }
    assert_eq!(s["Groups"], "", "QEMU {pid}: supplementary groups");
    // Its root reads as "/" (it is the root of its own mount namespace):
    // compare the inodes, and the namespaces.
    use std::os::unix::fs::MetadataExt;
    let id = |p: &str| {
        let m = std::fs::metadata(p).unwrap_or_else(|e| panic!("{p}: {e}"));
        (m.dev(), m.ino())
    };
    let root = format!("/proc/{pid}/root/");
    assert_ne!(id(&root), id("/"), "QEMU {pid}: its root is the host's");
    let ns = |p: String| std::fs::read_link(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_ne!(
        ns(format!("/proc/{pid}/ns/mnt")),
        ns("/proc/self/ns/mnt".into()),
        "QEMU {pid}: its mount namespace"
    );
    let top = entries(&format!("/proc/{pid}/root"));
    assert!(
        top.iter().all(|e| JAIL_ENTRIES.contains(&e.as_str())),
        "QEMU {pid}: its root holds {top:?}"
    );
    for needed in ["usr", "kernel", "initrd", "dev"] {
        assert!(
            top.iter().any(|e| e == needed),
            "QEMU {pid}: no /{needed}: {top:?}"
        );
    }
    let dev = entries(&format!("/proc/{pid}/root/dev"));
    assert!(
        dev.iter().all(|e| JAIL_DEVICES.contains(&e.as_str())),
        "QEMU {pid}: its /dev holds {dev:?}"
    );
}

/// Asserts that the built-in VMM's process `pid`, started by `starter`
/// (the monitor or the shim), is its child, in its cgroup, and jailed: a
/// mount namespace of its own whose root holds nothing of the host's but
/// the path down to the share and its own `/proc/self/fd` (no `/usr`,
/// `/etc`, `/dev`, nor the rest of `/proc`).
#[track_caller]
fn assert_vmm_jailed(pid: i32, starter: i32) {
    let s = status(pid);
    assert_eq!(s["PPid"], starter.to_string(), "VMM {pid}: its parent");
    let cgroup = |p: i32| std::fs::read_to_string(format!("/proc/{p}/cgroup")).unwrap();
    assert_eq!(cgroup(pid), cgroup(starter), "VMM {pid}: its cgroup");
    assert!(
        harness::process::has_thread(pid, "vcpu0"),
        "VMM {pid}: no vCPU thread"
    );
    let ns = |p: String| std::fs::read_link(&p).unwrap_or_else(|e| panic!("{p}: {e}"));
    assert_ne!(
        ns(format!("/proc/{pid}/ns/mnt")),
        ns("/proc/self/ns/mnt".into()),
        "VMM {pid}: its mount namespace"
    );
    // Its root: `/proc` with only its own descriptor table
    // (`/proc/self/fd`, for the file server's xattr calls), and the path
    // down to the share, one entry per level: the first level with more
    // than one entry (or none) is the share's.
    let root = format!("/proc/{pid}/root");
    let mut top = entries(&root);
    eprintln!("ls /proc/{pid}/root: {top:?}");
    assert_eq!(
        entries(&format!("{root}/proc")),
        ["self"],
        "VMM {pid}: /proc"
    );
    assert_eq!(
        entries(&format!("{root}/proc/self")),
        ["fd"],
        "VMM {pid}: /proc/self"
    );
    top.retain(|e| e != "proc");
    assert_eq!(top.len(), 1, "VMM {pid}: its root holds {top:?}");
    for host in ["usr", "etc", "dev"] {
        assert_ne!(top[0], host, "VMM {pid}: its root holds {top:?}");
    }
    let mut path = Vec::new();
    let mut here = top;
    while let [one] = here.as_slice() {
        path.push(one.clone());
        here = entries(&format!("{root}/{}", path.join("/")));
    }
    let share = path.join("/");
    eprintln!("VMM {pid}: its root holds only /{share}: {here:?}");
    // The share as its starter sees it (the staging mounts are in the
    // starter's mount namespace).
    assert_eq!(
        here,
        entries(&format!("/proc/{starter}/root/{share}")),
        "VMM {pid}: /{share} in its root is not its starter's"
    );
}

/// Asserts that the helpers below `parent` (QEMU, virtiofsd, or the
/// built-in VMM's process) are confined, and that there are some. The
/// number of helper processes checked.
#[track_caller]
fn assert_helpers_confined(parent: i32) -> usize {
    let helpers = harness::process::descendants(parent);
    let names: Vec<String> = helpers.iter().map(|&p| status(p)["Name"].clone()).collect();
    for (&p, name) in helpers.iter().zip(&names) {
        match name.as_str() {
            "qemu-system-x86" => {
                assert_confined(p, 0, true);
                assert_jailed(p, parent);
            }
            "virtiofsd" => assert_confined(p, virtiofsd(), false),
            "krun-vmm" => {
                // Exactly the eight on its main thread (its virtio-fs
                // threads drop some while serving a guest user).
                assert_confined(p, mask(VMM), true);
                assert_eq!(hex(&status(p), "CapEff"), 0x8800_00db, "VMM {p}");
                assert_vmm_jailed(p, parent);
            }
            other => panic!("an unexpected host process {p} ({other}) below {parent}"),
        }
    }
    if names.iter().any(|n| n == "qemu-system-x86") {
        assert!(
            names.iter().filter(|n| *n == "virtiofsd").count() >= 2,
            "virtiofsd and its sandbox's parent: {names:?}"
        );
    } else {
        assert_eq!(
            names,
            ["krun-vmm"],
            "neither QEMU nor the built-in VMM below {parent}"
        );
    }
    helpers.len()
}

#[test]
fn a_podman_containers_host_processes_are_confined() {
    let pm = Podman::new("confined");
    if pm.is_runc() {
        pm.not_applicable("krun-oci's confinement of its host processes");
        pm.finish();
        return;
    }
    pm.run_d(
        "c",
        &[],
        busybox(),
        &["sh", "-c", "echo ready; exec sleep 1000"],
    );
    pm.wait_for_log("c", "ready", std::time::Duration::from_secs(60));
    let pid: i32 = pm
        .ok(&["inspect", "--format", "{{.State.Pid}}", "c"])
        .parse()
        .unwrap();
    assert_confined(pid, monitor(), true);
    assert_helpers_confined(pid);
    pm.ok(&["rm", "-f", "-t", "0", "c"]);
    pm.finish();
}

#[test]
fn a_containers_host_processes_are_confined_by_hand() {
    lifecycle::become_subreaper();
    let sb = Sandbox::new("confined");
    let pid = lifecycle::start_new(&sb, &["sleep", "1000"], "c1");
    assert_confined(pid, monitor(), true);
    assert_helpers_confined(pid);
    // QEMU's jail is an empty directory on the host (its mounts are
    // QEMU's), gone with the container (`assert_clean` below).
    // So is the built-in VMM's.
    let qemu = harness::process::descendants(pid)
        .into_iter()
        .any(|p| status(p)["Name"] == "qemu-system-x86");
    let (used, unused) = if qemu {
        ("qemu-root", "vmm-root")
    } else {
        ("vmm-root", "qemu-root")
    };
    let jail = sb.root().join("c1").join(used);
    let left: Vec<_> = std::fs::read_dir(&jail).unwrap().flatten().collect();
    assert!(left.is_empty(), "{}: {left:?}", jail.display());
    let other = sb.root().join("c1").join(unused);
    assert!(!other.exists(), "an unused jail: {}", other.display());
    // Still serves its commands confined: an exec whose guest root writes,
    // chowns and makes a FIFO in the shared root (what the file server,
    // virtiofsd or the built-in VMM's, keeps its capabilities for), and a
    // forced delete.
    let probe = "echo hi > /probe && chown 1000:1000 /probe && mknod /fifo p \
                 && test -p /fifo && stat -c %u /probe";
    let o = lifecycle::krun(&sb, &["exec", "c1", "sh", "-c", probe]);
    assert_eq!((o.code, o.stdout.as_str()), (0, "1000\n"), "{}", o.stderr);
    lifecycle::delete_force(&sb, "c1", pid);
    sb.assert_clean();
}

#[test]
fn a_ctr_tasks_shim_and_helpers_are_confined() {
    let c = Containerd::start("confined");
    if !is_krun() {
        eprintln!("NOT APPLICABLE to containerd's runc shim: krun's confinement");
        c.finish();
        return;
    }
    let cid = format!("confined-{}", std::process::id());
    c.ctr(&c.run_words(&["-d"], &[], &cid, &["sleep", "1000"]))
        .ok();
    c.wait_status(&cid, "RUNNING");
    let pid = c.shim_pid(&cid);
    // The shim, whose threads run the monitor.
    assert_confined(pid, monitor(), true);
    assert_helpers_confined(pid);
    c.ctr(&["task", "kill", "-s", "KILL", &cid]).ok();
    c.wait_status(&cid, "STOPPED");
    c.ctr(&["task", "delete", &cid]).ok();
    c.ctr(&["containers", "rm", &cid]).ok();
    c.finish();
}

/// `krun-oci run` is its container's monitor for as long as the container
/// lives: confined as `create`'s monitor is, every thread of it (the
/// signal forwarder's too), and the hooks it runs (poststop included)
/// inherit that confinement.
#[test]
fn run_in_the_foreground_is_confined_and_runs_its_hooks() {
    let sb = Sandbox::new("confined-run");
    let log = sb.path().join("hooks.log");
    let mut b = sb.bundle(&["sleep", "6"]);
    let hook = |name: &str| {
        let script = format!(
            "echo {name} $(grep NoNewPrivs /proc/self/status | tr -d '\\t ') >> {}",
            log.display()
        );
        serde_json::json!([{"path": "/bin/sh", "args": ["sh", "-c", script]}])
    };
    b.config["hooks"] =
        serde_json::json!({"poststart": hook("poststart"), "poststop": hook("poststop")});
    b.write();
    let mut child = sb.spawn_run(&b, "r1");
    let pid = child.id() as i32;
    krun_e2e::process::poll(
        std::time::Duration::from_secs(60),
        std::time::Duration::from_millis(50),
        || match std::fs::read_to_string(&log) {
            Ok(t) if t.contains("poststart") => Ok(()),
            other => Err(other.ok()),
        },
        |t| format!("the container has not started: {t:?}; {}", sb.console()),
    );
    // The poststart hook has written its line; its shell may not have
    // exited yet (once seen listed among the helpers): wait for it.
    krun_e2e::process::poll(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(50),
        || {
            let hooks: Vec<i32> = harness::process::descendants(pid)
                .into_iter()
                .filter(|p| {
                    std::fs::read_to_string(format!("/proc/{p}/comm"))
                        .is_ok_and(|c| c.trim() == "sh")
                })
                .collect();
            if hooks.is_empty() {
                Ok(())
            } else {
                Err(hooks)
            }
        },
        |hooks| format!("the poststart hook is still running: {hooks:?}"),
    );
    assert_confined(pid, monitor(), true);
    // Where the host has a unified cgroup hierarchy, `run` forks its
    // monitor into the container's cgroup and waits for it: the helpers
    // are the monitor's, and it is confined as `run` is.
    let forked: Vec<i32> = harness::process::descendants(pid)
        .into_iter()
        .filter(|&p| {
            let st = status(p);
            st["Name"] == "krun-oci" && st["PPid"] == pid.to_string()
        })
        .collect();
    let monitor_pid = match forked[..] {
        [] => pid,
        [m] => {
            assert_confined(m, monitor(), true);
            m
        }
        _ => panic!("more than one monitor below run {pid}: {forked:?}"),
    };
    assert_helpers_confined(monitor_pid);
    let st = harness::wait_timeout(&mut child, std::time::Duration::from_secs(60))
        .expect("run timed out");
    assert!(st.success(), "{st:?}: {}", sb.console());
    assert_eq!(
        std::fs::read_to_string(&log).unwrap(),
        "poststart NoNewPrivs:1\npoststop NoNewPrivs:1\n"
    );
    sb.assert_clean();
}
