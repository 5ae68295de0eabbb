//! A hostile guest: a container that is root in its VM with every
//! capability tries to reach what the host did not give it, and to make
//! the host write where it should not. Each test states the property it
//! proves; the suite runs on QEMU here and on the built-in VMM in the
//! nested test host (`hack/test`).

use krun_e2e::{self as harness, lifecycle};

use std::path::Path;
use std::process::Stdio;

use harness::{Sandbox, TestBundle};
use lifecycle::{krun, ok, wait_exit};
use serde_json::{json, Value};

/// Every capability there is: what a privileged container (or a guest
/// kernel's attacker) has.
fn all_caps() -> Value {
    let caps: Vec<String> = caps::all().iter().map(|c| c.to_string()).collect();
    json!({"bounding": caps, "effective": caps, "permitted": caps})
}

/// A bundle running `script` with every capability, no masked paths.
fn hostile_bundle(sb: &Sandbox, script: &str) -> TestBundle {
    let mut b = sb.bundle(&["sh", "-c", script]);
    b.process()["capabilities"] = all_caps();
    b.process()["noNewPrivileges"] = json!(false);
    b.config["linux"]["maskedPaths"] = json!([]);
    b.config["linux"]["readonlyPaths"] = json!([]);
    b
}

fn bind(src: &Path, dest: &str, ro: bool) -> Value {
    let mut opts = vec!["rbind", "nosuid", "nodev"];
    if ro {
        opts.push("ro");
    }
    json!({"destination": dest, "type": "bind", "source": src, "options": opts})
}

fn write(p: &Path, text: &str) {
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(p, text).unwrap();
}

fn read(p: &Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// Host files a container is given and what sits beside them: an engine's
/// run directory (a file of it is bound as /etc/hosts, the rest is not the
/// container's) and a file reached through a symlink, as podman's
/// catatonit is.
struct HostFiles {
    vol: std::path::PathBuf,
    ro: std::path::PathBuf,
    run: std::path::PathBuf,
    init_link: std::path::PathBuf,
}

fn host_files(sb: &Sandbox) -> HostFiles {
    let base = sb.path().join("host");
    write(&base.join("vol/data"), "volume\n");
    write(&base.join("ro/data"), "read-only\n");
    write(&base.join("run/hosts"), "10.0.0.1 host-given\n");
    write(&base.join("run/pidfile"), "4242");
    write(&base.join("run/conmon.pid"), "4241");
    write(&base.join("run/secret"), "not the container's\n");
    write(&base.join("bin/real-init"), "#!real init\n");
    let init_link = base.join("init-link");
    std::os::unix::fs::symlink(base.join("bin/real-init"), &init_link).unwrap();
    HostFiles {
        vol: base.join("vol"),
        ro: base.join("ro"),
        run: base.join("run"),
        init_link,
    }
}

/// Every tag a guest could guess: the share's, and those of earlier
/// layouts (one share per directory, a pod's).
const TAGS: &str = "krun rootfs pod share0 share1 share2 share3 share4 share5 share6 share7 share8";

/// What the guest sees when it mounts every virtio-fs tag it can name:
/// exactly its root and its volumes, each bind source alone (not its
/// directory), a symlinked source resolved on the host, nothing else.
#[test]
fn a_guest_that_mounts_every_tag_sees_only_its_root_and_volumes() {
    let sb = Sandbox::new("tags");
    let h = host_files(&sb);
    let script = format!(
        "cat /sbin/given-init; cat /etc/hosts; \
         for t in {TAGS}; do mkdir -p /mnt/$t; \
           if mount -t virtiofs $t /mnt/$t 2>/dev/null; then echo mounted $t; \
             (cd /mnt/$t && find . -maxdepth 2 | sort | sed \"s|^|$t:|\"); fi; done; \
         echo found: $(find /mnt -name secret -o -name conmon.pid -o -name pidfile | wc -l)"
    );
    let mut b = hostile_bundle(&sb, &script);
    b.add_mount(bind(&h.vol, "/vol", false));
    b.add_mount(bind(&h.run.join("hosts"), "/etc/hosts", false));
    b.add_mount(bind(&h.ro, "/ro", true));
    b.add_mount(bind(&h.init_link, "/sbin/given-init", true));
    let n = b.config["mounts"].as_array().unwrap().len();
    let out = sb.run(&b, "t1", None);
    out.expect_code(0);
    let stdout = out.stdout();
    let mut lines = stdout.lines();
    assert_eq!(lines.next(), Some("#!real init"), "{stdout}");
    assert_eq!(lines.next(), Some("10.0.0.1 host-given"), "{stdout}");
    let mounted: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("mounted "))
        .collect();
    assert_eq!(mounted, ["krun"], "only the one share has a tag: {stdout}");
    // Linux 6.1 gives a fresh mount of the tag the superblock of whichever
    // part of the share it mounted last (a root or a volume), so what the
    // guest sees is some subtree of the share: every path it lists must
    // exist in the share the runtime composed, which holds the root and
    // the volumes and nothing else.
    let share_path = |p: &str| -> Vec<std::path::PathBuf> {
        let p = p.trim_start_matches("./");
        let mut roots = vec![
            b.rootfs(),
            h.vol.clone(),
            h.ro.clone(),
            h.run.join("hosts"),
            h.init_link.clone(),
        ];
        roots.retain(|_| !p.is_empty());
        roots.iter().map(|r| r.join(p)).collect()
    };
    let staging: Vec<String> = [".", "./t1", "./t1/rootfs"]
        .into_iter()
        .map(String::from)
        .chain((n - 4..n).map(|i| format!("./t1/m{i}")))
        .collect();
    let seen: Vec<&str> = stdout
        .lines()
        .filter_map(|l| l.strip_prefix("krun:"))
        .collect();
    assert!(!seen.is_empty(), "{stdout}");
    for p in &seen {
        let given = staging.iter().any(|s| s == p)
            || share_path(p).iter().any(|q| q.symlink_metadata().is_ok());
        assert!(given, "{p} is not the container's: {stdout}");
    }
    assert!(stdout.contains("found: 0"), "{stdout}");
}

/// A volume bound read-only stays read-only on the host side: a guest
/// that remounts it read-write, or reaches it again through a fresh mount
/// of the share, still cannot change the host's file.
#[test]
fn a_read_only_volume_cannot_be_written_even_after_a_remount() {
    let sb = Sandbox::new("rovol");
    let h = host_files(&sb);
    // A fresh mount of the tag shows the share's root, or (Linux 6.1) the
    // part of it mounted last: the read-only volume, bound last here.
    let script = "mount -o remount,rw,bind /ro && echo remounted; \
         echo changed > /ro/data || echo write refused; \
         mkdir -p /mnt/s && mount -t virtiofs krun /mnt/s && \
         for f in $(find /mnt/s -name data); do echo tried; \
           echo changed > $f || echo share write refused; done; cat /ro/data";
    let mut b = hostile_bundle(&sb, script);
    b.add_mount(bind(&h.ro, "/ro", true));
    let out = sb.run(&b, "r1", None);
    out.expect_code(0);
    let stdout = out.stdout();
    assert!(stdout.contains("remounted"), "{stdout}");
    assert!(stdout.contains("write refused"), "{stdout}");
    let tried = stdout.matches("tried").count();
    assert!(tried > 0, "the volume was not found in the share: {stdout}");
    assert_eq!(
        stdout.matches("share write refused").count(),
        tried,
        "{stdout}"
    );
    assert!(stdout.ends_with("read-only\n"), "{stdout}");
    assert_eq!(read(&h.ro.join("data")), "read-only\n");
}

/// Links a guest plants at the names the host writes later — the pid
/// file beside a volume, the bundle's `oom` file — are replaced, never
/// followed: the host file they point at stays untouched.
#[test]
fn links_planted_where_the_host_writes_are_not_followed() {
    let sb = Sandbox::new("plant");
    let victim = sb.path().join("victim");
    write(&victim, "untouched\n");
    let shared = sb.path().join("shared");
    std::fs::create_dir_all(&shared).unwrap();
    // The hostile container: its bundle directory is one of its volumes
    // (the worst case), and so is the directory the next pid file goes in.
    let v = victim.display();
    let script = format!(
        "ln -s {v} /shared/pidfile; ln -s {v} /shared/pidfile.krun-tmp; \
         ln -s {v} /bundle/oom; \
         awk 'BEGIN {{ s = \"x\"; while (1) s = s s }}'"
    );
    let mut b = hostile_bundle(&sb, &script);
    b.add_mount(bind(&shared, "/shared", false));
    b.add_mount(bind(&sb.path().join("bundle"), "/bundle", false));
    b.config["linux"]["resources"] = json!({"memory": {"limit": 33554432}});
    let out = sb.run(&b, "p1", None);
    out.expect_code(137);
    assert_eq!(read(&victim), "untouched\n");
    let oom = sb.path().join("bundle/oom");
    let md = std::fs::symlink_metadata(&oom).unwrap();
    assert!(md.is_file(), "the oom file replaced the planted link");

    // The next container's pid file goes where the links are.
    let b2 = sb.written_bundle(&["true"]);
    lifecycle::become_subreaper();
    let pid_file = shared.join("pidfile");
    let mut c = lifecycle::create_cmd(&sb, &b2, &pid_file, "p2");
    c.stdout(Stdio::null());
    let st = c.status().unwrap();
    assert!(st.success());
    assert_eq!(read(&victim), "untouched\n");
    assert!(std::fs::symlink_metadata(&pid_file).unwrap().is_file());
    let pid: i32 = read(&pid_file).trim().parse().unwrap();
    lifecycle::delete_and_wait(&sb, "p2", pid);
    sb.assert_clean();
}

/// `start`, `delete` and their hooks use the config `create` read: a
/// guest that rewrites the bundle's config.json (here it can, the bundle
/// is its volume) cannot get its own hook run as root on the host.
#[test]
fn the_config_create_saw_is_what_start_and_delete_use() {
    let sb = Sandbox::new("config");
    let given = sb.path().join("given-hook-ran");
    let injected = sb.path().join("injected-hook-ran");
    let script = format!(
        "sed -i 's|{}|{}|' /bundle/config.json && echo rewritten",
        given.display(),
        injected.display()
    );
    let mut b = hostile_bundle(&sb, &script);
    b.add_mount(bind(&sb.path().join("bundle"), "/bundle", false));
    let hook = |marker: &Path| json!([{"path": "/bin/sh", "args": ["sh", "-c", format!("echo ran > {}", marker.display())]}]);
    b.config["hooks"] = json!({"poststart": hook(&given), "poststop": hook(&given)});
    b.write();
    let pid = lifecycle::create(&sb, &b, "k1");
    ok(krun(&sb, &["start", "k1"]));
    assert_eq!(wait_exit(pid), (Some(0), None));
    assert!(lifecycle::out_of(&sb, "k1").contains("rewritten"));
    assert!(read(&b.dir.join("config.json")).contains("injected-hook-ran"));
    std::fs::remove_file(&given).unwrap();
    ok(krun(&sb, &["delete", "k1"]));
    assert_eq!(read(&given), "ran\n", "the poststop hook create saw ran");
    assert!(!injected.exists(), "the guest's hook must not run");
    sb.assert_clean();
}

/// Whether the suite runs on the built-in VMM, whose device workers carry
/// seccomp allowlists of their own (src/vmm/src/seccomp.rs); says so
/// loudly when it does not.
fn on_builtin(test: &str) -> bool {
    // The runtime's own choice, unless the suite names one: the built-in
    // VMM wherever KVM boots the guest (src/runtime/src/backend.rs).
    let on = match harness::hypervisor() {
        Some(h) => h == "builtin",
        None => krun_hypervisor::detect_accel().accel == krun_hypervisor::Accel::Kvm,
    };
    if !on {
        eprintln!(
            "NOT APPLICABLE on {:?}: {test} needs the built-in VMM (KRUN_OCI_TEST_HYPERVISOR=builtin)",
            harness::hypervisor()
        );
    }
    on
}

/// `Seccomp_filters` of one thread's status: how many filters it runs
/// under.
fn filters(status: &str) -> u32 {
    status
        .lines()
        .find_map(|l| l.strip_prefix("Seccomp_filters:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no Seccomp_filters in {status}"))
}

/// Every thread of a running container's VMM runs in seccomp filter
/// mode. The VMM process starts under the filters it inherits (the
/// deny-lists); each vCPU runs under one of its own on top of those, so
/// does the spawner that starts the device workers, and so does the main
/// thread, which confines itself once they run (it would give them its
/// own otherwise); each worker runs under its own on top of the
/// spawner's (one more): so no worker carries a vCPU's filter, and no
/// vCPU the main thread's.
#[test]
fn every_vmm_thread_runs_under_the_allowlist_of_its_kind() {
    if !on_builtin("every_vmm_thread_runs_under_the_allowlist_of_its_kind") {
        return;
    }
    let sb = Sandbox::new("seccomp");
    let mut b = sb.bundle(&["sh", "-c", "echo up; sleep 300"]);
    // Two vCPUs where the host has two CPUs (more than it has is refused).
    let want_vcpus = std::thread::available_parallelism().map_or(1, |n| n.get().min(2));
    b.config["annotations"] = json!({"io.krun-oci.vcpus": want_vcpus.to_string()});
    b.write();
    let pid = lifecycle::create(&sb, &b, "s1");
    ok(krun(&sb, &["start", "s1"]));
    lifecycle::wait_for_output(&sb, "s1", "up");
    // The VMM is a process of its own below the monitor.
    let vmm = harness::process::vmm_below(pid).expect("the VMM's process below the monitor");
    let main = read(Path::new(&format!("/proc/{vmm}/status")));
    // The main thread's own filter is the last of its list.
    let base = filters(&main) - 1;
    let (mut workers, mut vcpus, mut spawners) = (Vec::new(), 0, 0);
    for t in std::fs::read_dir(format!("/proc/{vmm}/task"))
        .unwrap()
        .flatten()
    {
        let comm = read(&t.path().join("comm")).trim().to_string();
        let status = read(&t.path().join("status"));
        assert!(status.contains("Seccomp:\t2"), "{comm}: {status}");
        let want = if comm.starts_with("virtio-") {
            workers.push(comm.clone());
            base + 2
        } else if comm.starts_with("vcpu") {
            vcpus += 1;
            base + 1
        } else if comm == "vmm-spawner" {
            spawners += 1;
            base + 1
        } else {
            continue;
        };
        assert_eq!(filters(&status), want, "{comm}: {status}");
    }
    workers.sort();
    for want in ["virtio-console", "virtio-fs-"] {
        assert!(
            workers.iter().any(|w| w.starts_with(want)),
            "no {want} thread among {workers:?}"
        );
    }
    assert_eq!(vcpus, want_vcpus, "vCPU threads");
    assert_eq!(spawners, 1, "spawner threads");
    eprintln!("confined: {vcpus} vCPUs, the spawner, device workers {workers:?}");
    ok(krun(&sb, &["kill", "s1", "KILL"]));
    lifecycle::delete_once_stopped(&sb, "s1", pid);
    sb.assert_clean();
}

/// A device worker that makes a system call outside its allowlist ends
/// the container, stopped, with an error naming the call, within seconds:
/// never a hang. The test-only knob takes mkdirat from the virtio-fs
/// worker's list, and the guest's `mkdir` needs it.
#[test]
fn a_forbidden_system_call_stops_the_container_with_its_name() {
    forbidden_call_stops_the_container(
        "a_forbidden_system_call_stops_the_container_with_its_name",
        "fs:mkdirat",
        "mkdir /made-here",
        "the VMM's virtio-fs worker made a forbidden system call: mkdirat",
    );
}

/// A vCPU that makes a system call outside its allowlist ends the
/// container the same way. The knob takes fcntl from the vCPU's list; a
/// vCPU makes it when the guest's driver activates a device (DRIVER_OK, an
/// MMIO write it serves: the device's eventfds are copied), so the guest
/// never gets its root file system. That happens at boot: the VM boots
/// cold (a VM from a template has its devices active already, restored
/// before its vCPUs run).
#[test]
fn a_forbidden_system_call_on_a_vcpu_stops_the_container_with_its_name() {
    forbidden_call_stops_the_container(
        "a_forbidden_system_call_on_a_vcpu_stops_the_container_with_its_name",
        "vcpu:fcntl",
        "touch /made-here",
        "the VMM's vCPU made a forbidden system call: fcntl (72)",
    );
}

/// Runs a container whose guest does `action` (which makes `/made-here`)
/// with the test knob set to `knob` (`kind:syscall`): it must end at once,
/// not zero, with `want` in its error, the file never made, nothing left.
fn forbidden_call_stops_the_container(test: &str, knob: &str, action: &str, want: &str) {
    if !on_builtin(test) {
        return;
    }
    let sb = Sandbox::new("sigsys");
    let script = format!("echo booted; {action}; sleep 300");
    let b = sb.written_bundle(&["sh", "-c", &script]);
    let mut c = sb.cmd();
    c.env("KRUN_OCI_SECCOMP_DROP", knob);
    if knob.starts_with("vcpu:") {
        c.arg("--no-template");
    }
    c.args(["run", "--bundle"]).arg(&b.dir).arg("f1");
    let started = std::time::Instant::now();
    let out = harness::run_with_timeout(c, None, harness::RUN_TIMEOUT, &sb.path().join("console"));
    let took = started.elapsed();
    let stderr = out.stderr();
    assert!(stderr.contains(want), "code {}; stderr: {stderr}", out.code);
    assert_ne!(out.code, 0, "{stderr}");
    assert!(
        took < std::time::Duration::from_secs(120),
        "the container ended after {took:?}, not at once"
    );
    assert!(!b.rootfs().join("made-here").exists());
    sb.assert_clean();
}
