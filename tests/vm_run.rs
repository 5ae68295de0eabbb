//! `krun-oci run` end to end: each test boots a real microVM (under TCG on
//! hosts whose KVM cannot boot our kernel) and checks from inside the guest
//! that the bundle's config was applied, and that nothing is left after.

use krun_e2e as harness;

use std::process::Stdio;
use std::time::Duration;

use harness::{wait_timeout, HostVolumes, Sandbox};
use serde_json::json;
use sha2::{Digest, Sha256};

fn sha256(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn exit_codes_are_the_workloads() {
    let sb = Sandbox::new("exit");
    for (args, code) in [
        (vec!["true"], 0),
        (vec!["false"], 1),
        (vec!["sh", "-c", "exit 42"], 42),
        // A CPU time limit that runs out ends in SIGKILL from the kernel:
        // the one signal death a container's PID 1 cannot refuse.
        (
            vec!["sh", "-c", "ulimit -t 1; while :; do :; done"],
            128 + 9,
        ),
    ] {
        let b = sb.bundle(&args);
        sb.run(&b, "exit", None).expect_code(code);
    }
}

#[test]
fn a_missing_program_is_127_and_a_non_executable_one_126() {
    let sb = Sandbox::new("notfound");
    let out = sb.run(&sb.bundle(&["no-such-program"]), "nf", None);
    out.expect_failure(
        127,
        "\"no-such-program\": executable file not found in $PATH",
    );
    assert_eq!(
        out.stderr().trim().lines().count(),
        1,
        "one line: {}",
        out.stderr()
    );

    let out = sb.run(&sb.bundle(&["/etc/passwd"]), "nx", None);
    out.expect_failure(126, "permission denied");

    let out = sb.run(&sb.bundle(&["/no/such/path"]), "np", None);
    out.expect_failure(127, "no such file or directory");
}

#[test]
fn stdout_and_stderr_stay_apart_and_stdin_is_piped_through() {
    let sb = Sandbox::new("stdio");
    let out = sb.run(
        &sb.bundle(&["sh", "-c", "echo to-out; echo to-err >&2; echo again-out"]),
        "s1",
        None,
    );
    out.expect_code(0);
    assert_eq!(out.stdout(), "to-out\nagain-out\n");
    assert_eq!(out.stderr(), "to-err\n");

    // Binary stdin, through cat and back, byte for byte.
    let input: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let out = sb.run(&sb.bundle(&["cat"]), "s2", Some(&input));
    out.expect_code(0);
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin came back changed");

    // No stdin at all is an immediate EOF for the workload.
    let out = sb.run(&sb.bundle(&["sh", "-c", "cat; echo done"]), "s3", None);
    out.expect_code(0);
    assert_eq!(out.stdout(), "done\n");
}

#[test]
fn a_hundred_mib_of_output_arrives_intact() {
    let sb = Sandbox::new("bulk");
    let b = sb.bundle(&["sh", "-c", "cat /blob; echo tail; exit 3"]);
    // Incompressible, deterministic data written into the rootfs.
    let mut blob = vec![0u8; 100 << 20];
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    for chunk in blob.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    std::fs::write(b.rootfs().join("blob"), &blob).unwrap();
    let out = sb.run(&b, "bulk", None);
    // Exiting right after writing loses nothing.
    out.expect_code(3);
    assert_eq!(out.stdout.len(), blob.len() + 5);
    assert_eq!(&out.stdout[blob.len()..], b"tail\n");
    assert_eq!(sha256(&out.stdout[..blob.len()]), sha256(&blob));
}

#[test]
fn process_env_cwd_user_groups_umask_apply() {
    let sb = Sandbox::new("proc");
    let mut b = sb.bundle(&[
        "sh",
        "-c",
        "echo \"$FOO|$(pwd)|$(id -u)|$(id -g)|$(id -G)|$(umask)\"",
    ]);
    b.process()["env"] = json!(["PATH=/bin", "FOO=bar baz"]);
    b.process()["cwd"] = json!("/home/user/work");
    b.process()["user"] =
        json!({"uid": 1000, "gid": 1000, "additionalGids": [10, 20], "umask": 23});
    let out = sb.run(&b, "p1", None);
    out.expect_code(0);
    assert_eq!(
        out.stdout(),
        "bar baz|/home/user/work|1000|1000|1000 10 20|0027\n"
    );
}

/// The hex capability mask of `name` ("CapEff", ...) in /proc/self/status output.
fn cap_field(status: &str, name: &str) -> u64 {
    let line = status
        .lines()
        .find(|l| l.starts_with(name))
        .unwrap_or_else(|| panic!("{name} missing: {status}"));
    u64::from_str_radix(line.split_whitespace().nth(1).unwrap(), 16).unwrap()
}

const CAP_CHOWN: u64 = 1 << 0;
const CAP_KILL: u64 = 1 << 5;

#[test]
fn rlimits_hostname_capabilities_apply() {
    let sb = Sandbox::new("limits");
    let script =
        "ulimit -n; ulimit -Hn; ulimit -c; hostname; grep -E '^(Cap|NoNewPrivs)' /proc/self/status";
    let mut b = sb.bundle(&["sh", "-c", script]);
    b.process()["rlimits"] = json!([{"type": "RLIMIT_NOFILE", "soft": 4242, "hard": 5000}, {"type": "RLIMIT_CORE", "soft": 0, "hard": 0}]);
    b.process()["capabilities"] = json!({"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL", "CAP_CHOWN"]});
    b.config["hostname"] = json!("vm-host-name");
    let out = sb.run(&b, "l1", None);
    out.expect_code(0);
    let stdout = out.stdout();
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(&lines[..4], &["4242", "5000", "0", "vm-host-name"]);
    assert_eq!(cap_field(&stdout, "CapBnd"), CAP_KILL | CAP_CHOWN);
    // As under runc, root's exec gains its whole bounding set.
    assert_eq!(cap_field(&stdout, "CapEff"), CAP_KILL | CAP_CHOWN);
    assert!(stdout.contains("NoNewPrivs:\t1"), "{stdout}");

    // A non-root user keeps exactly what the config grants, through ambient.
    let mut b = sb.bundle(&["grep", "^Cap", "/proc/self/status"]);
    b.process()["user"] = json!({"uid": 1000, "gid": 1000});
    b.process()["capabilities"] = json!({"bounding": ["CAP_KILL", "CAP_CHOWN"], "effective": ["CAP_KILL"], "permitted": ["CAP_KILL"], "inheritable": ["CAP_KILL"], "ambient": ["CAP_KILL"]});
    let out = sb.run(&b, "l2", None);
    out.expect_code(0);
    let stdout = out.stdout();
    assert_eq!(cap_field(&stdout, "CapEff"), CAP_KILL, "{stdout}");
    assert_eq!(cap_field(&stdout, "CapAmb"), CAP_KILL, "{stdout}");
    assert_eq!(
        cap_field(&stdout, "CapBnd"),
        CAP_KILL | CAP_CHOWN,
        "{stdout}"
    );
}

#[test]
fn readonly_root_tmpfs_and_bind_mounts() {
    let sb = Sandbox::new("mounts");
    let vols = HostVolumes::new(sb.path(), "rw", "ro");
    let (host_rw, host_ro, single) = (&vols.rw, &vols.ro, &vols.single);

    let script = "touch /rootfile 2>/dev/null && echo root-writable || echo root-readonly; \
                  echo tmp > /scratch/x && grep -c scratch /proc/mounts; \
                  cat /rw/from-host; echo guest wrote this > /rw/from-guest; \
                  cat /ro/file; touch /ro/new 2>/dev/null && echo ro-writable || echo ro-readonly; \
                  cat /etc/single.conf";
    let mut b = sb.bundle(&["sh", "-c", script]);
    b.config["root"]["readonly"] = json!(true);
    b.add_mount(json!({"destination": "/scratch", "type": "tmpfs", "source": "tmpfs", "options": ["size=1m"]}));
    b.add_mount(json!({"destination": "/rw", "type": "bind", "source": host_rw, "options": ["rbind", "rw"]}));
    b.add_mount(json!({"destination": "/ro", "type": "bind", "source": host_ro, "options": ["rbind", "ro"]}));
    b.add_mount(json!({"destination": "/etc/single.conf", "type": "bind", "source": single, "options": ["bind", "ro"]}));
    let out = sb.run(&b, "m1", None);
    out.expect_code(0);
    assert_eq!(
        out.stdout(),
        "root-readonly\n1\nhost wrote this\nread only\nro-readonly\none file\n"
    );
    vols.assert_written("from-guest", "guest wrote this\n");
    assert!(!b.rootfs().join("rootfile").exists());
}

/// Mount options as runc takes them: on a bind mount, what is neither a
/// flag nor a propagation is mount data, which bind ignores (podman's
/// `mode=755`, `size=1k` on a volume), while its flags (nosuid) apply;
/// and `linux.rootfsPropagation` is applied to the container's `/`.
#[test]
fn bind_mount_data_is_ignored_and_rootfs_propagation_applies() {
    let sb = Sandbox::new("mountopts");
    let vols = HostVolumes::new(sb.path(), "rw", "ro");
    // The optional fields of mountinfo (field 7 on, up to "-") of `/` and
    // /vol, and /vol's per-mount options (field 6).
    let script = "awk '$5 == \"/\" || $5 == \"/vol\" { o = \"\"; \
                  for (i = 7; $i != \"-\"; i++) o = o \" \" $i; print $5, $6, \"[\" o \" ]\" }' \
                  /proc/self/mountinfo; cat /vol/from-host";
    let mut b = sb.bundle(&["sh", "-c", script]);
    b.add_mount(
        json!({"destination": "/vol", "type": "bind", "source": &vols.rw,
        "options": ["bind", "nosuid", "mode=755", "size=1k"]}),
    );
    b.config["linux"]["rootfsPropagation"] = json!("unbindable");
    let out = sb.run(&b, "o1", None);
    out.expect_code(0);
    let text = out.stdout();
    let line = |dest: &str| {
        text.lines()
            .find(|l| l.starts_with(&format!("{dest} ")))
            .unwrap_or_else(|| panic!("no mountinfo line for {dest}: {text}"))
            .to_string()
    };
    assert!(line("/").contains("[ unbindable ]"), "{text}");
    let vol = line("/vol");
    assert!(
        vol.split(' ')
            .nth(1)
            .unwrap()
            .split(',')
            .any(|o| o == "nosuid"),
        "{text}"
    );
    assert!(text.ends_with("host wrote this\n"), "{text}");
}

#[test]
fn the_guest_kernel_is_not_the_hosts() {
    let sb = Sandbox::new("kernel");
    let out = sb.run(
        &sb.bundle(&[
            "sh",
            "-c",
            "uname -r; cat /proc/cpuinfo | grep -c ^processor",
        ]),
        "k1",
        None,
    );
    out.expect_code(0);
    let host = String::from_utf8(
        std::process::Command::new("uname")
            .arg("-r")
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let stdout = out.stdout();
    let guest = stdout.lines().next().unwrap();
    assert_ne!(guest, host.trim());
    assert!(guest.starts_with("6.1."), "guest kernel {guest}");
}

#[test]
fn sigterm_and_sigint_to_the_runtime_reach_the_workload() {
    let sb = Sandbox::new("signals");
    for (sig, name, code) in [(libc::SIGTERM, "TERM", 7), (libc::SIGINT, "INT", 8)] {
        let script = format!(
            "trap 'echo got {name}; exit {code}' {name}; echo ready; while :; do sleep 0.1; done"
        );
        let b = sb.written_bundle(&["sh", "-c", &script]);
        let mut child = harness::spawn_run(sb.cmd(), &b, "sig", Stdio::null());
        // Wait for the workload to be up before signalling.
        let mut stdout = child.stdout.take().unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 256];
        use std::io::Read;
        while !String::from_utf8_lossy(&seen).contains("ready") {
            let n = stdout.read(&mut buf).unwrap();
            assert!(
                n > 0,
                "workload ended before it was ready; console: {}",
                sb.console()
            );
            seen.extend_from_slice(&buf[..n]);
        }
        // SAFETY: kill has no memory effects.
        unsafe { libc::kill(child.id() as i32, sig) };
        let status = wait_timeout(&mut child, Duration::from_secs(60))
            .expect("runtime did not exit after the signal");
        let mut rest = String::new();
        stdout.read_to_string(&mut rest).unwrap();
        assert_eq!(rest, format!("got {name}\n"));
        assert_eq!(status.code(), Some(code));
        sb.assert_clean();
    }
}

#[test]
fn log_format_json_times_are_reported_with_debug() {
    let sb = Sandbox::new("debuglog");
    let b = sb.written_bundle(&["true"]);
    let log = sb.path().join("log.json");
    let out = sb.run_output(
        &[
            "--debug",
            "--log-format",
            "json",
            "--log",
            log.to_str().unwrap(),
        ],
        &b,
        "d1",
    );
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let timings = text
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .unwrap_or_else(|e| panic!("not JSON: {l}: {e}"))
        })
        .find(|v| v["msg"] == "timings")
        .unwrap_or_else(|| panic!("no timings line in {text}"));
    for f in [
        "host_setup_ms",
        "vmm_start_ms",
        "kernel_boot_ms",
        "guest_init_ms",
        "started_ms",
        "exited_ms",
    ] {
        let v: f64 = timings[f].as_str().unwrap().parse().unwrap();
        assert!(v.is_finite() && v >= 0.0, "{f} = {v}");
    }
    sb.assert_clean();
}

#[test]
fn a_terminal_is_the_containers_own_pty() {
    let sb = Sandbox::new("tty");
    let mut b = sb.bundle(&[
        "sh",
        "-c",
        "tty; stty size; read line; echo \"got:$line\"; exit 5",
    ]);
    b.process()["terminal"] = json!(true);
    b.write();
    // `script` gives the runtime a terminal of its own, as a user's shell would.
    let out = sb.on_a_terminal(
        "rows 33 cols 101",
        &format!("run --bundle {} tty1", b.dir.display()),
        b"hello\n",
    );
    out.expect_on_a_terminal(
        5,
        ["/dev/pts/0\n", "33 101\n", "got:hello\n"],
        "the host terminal's size reaches the guest",
    );
    sb.assert_clean();
}

/// More files than the usual open-file limit (1024): virtio-fs servers keep
/// a descriptor per inode the guest holds.
#[test]
fn a_thousand_files_and_more_in_the_root_filesystem() {
    let sb = Sandbox::new("files");
    let b = sb.bundle(&[
        "sh",
        "-c",
        "mkdir /many && cd /many && i=0; while [ $i -lt 1300 ]; do : > f$i || exit 1; i=$((i+1)); done; ls | wc -l; stat -c %s f1299",
    ]);
    let out = sb.run(&b, "files", None);
    out.expect_code(0);
    assert_eq!(out.stdout(), "1300\n0\n");
    assert_eq!(
        std::fs::read_dir(b.rootfs().join("many")).unwrap().count(),
        1300
    );
}

/// Honest about the backend: under TCG emulation (this CI host, whose KVM
/// is kvm-pvm) the runtime says so in its log and in `features`, and
/// `--require-kvm` refuses to start with one line naming why, leaving
/// nothing; on a KVM that boots the guest (the nested test host) the same
/// container runs and nothing is said.
#[test]
fn emulation_is_said_and_can_be_refused() {
    let tcg = krun_hypervisor::detect_accel().accel == krun_hypervisor::Accel::Tcg;
    let features = harness::krun_oci().arg("features").output().unwrap();
    let features: serde_json::Value = serde_json::from_slice(&features.stdout).unwrap();
    let accel = &features["annotations"]["io.krun-oci.accelerator"];
    assert_eq!(accel, if tcg { "tcg" } else { "kvm" }, "{features}");
    let isolation = features["annotations"]["io.krun-oci.isolation"]
        .as_str()
        .unwrap();
    assert_eq!(
        isolation.contains("not a security boundary"),
        tcg,
        "{isolation}"
    );

    let sb = Sandbox::new("requirekvm");
    let b = sb.written_bundle(&["echo", "ran"]);
    let log = sb.path().join("krun.log");
    let run = |extra: &[&str], id: &str| {
        let opts = [&["--log", log.to_str().unwrap()], extra].concat();
        sb.run_output(&opts, &b, id)
    };
    let out = run(&[], "plain");
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert_eq!(
        text.contains("TCG emulation, which is not a security boundary"),
        tcg,
        "log: {text}"
    );
    sb.assert_clean();

    let out = run(&["--require-kvm"], "strict");
    let stderr = String::from_utf8_lossy(&out.stderr);
    if tcg {
        assert_ne!(out.status.code(), Some(0), "{out:?}");
        assert!(
            stderr.contains("hardware isolation is required"),
            "{stderr}"
        );
        assert_eq!(stderr.trim_end().lines().count(), 1, "{stderr}");
        assert!(out.stdout.is_empty(), "the workload must not run: {out:?}");
    } else {
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), "ran\n");
    }
    sb.assert_clean();
}

/// The pids of `root` and of all its descendants, from /proc.
fn process_tree(root: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        // "pid (comm) state ppid ...": comm may hold spaces and parens.
        let Ok(stat) = std::fs::read_to_string(e.path().join("stat")) else {
            continue;
        };
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if let Some(ppid) = ppid {
            parent_of.push((pid, ppid));
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(
            parent_of
                .iter()
                .filter(|&&(_, pp)| pp == p)
                .map(|&(c, _)| c),
        );
        i += 1;
    }
    tree
}

/// The summed proportional set size of `root` and its descendants, MiB.
fn tree_pss_mib(root: u32) -> f64 {
    let kib: u64 = process_tree(root)
        .into_iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok())
        .filter_map(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("Pss:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .sum();
    kib as f64 / 1024.0
}

/// Memory the guest frees goes back to the host (free page reporting):
/// the guest fills 350 MB of a tmpfs, which lives in guest RAM, then
/// removes it; meanwhile the host sums the Pss of every host process of
/// the container (the monitor, the VMM, QEMU and virtiofsd). It grows with
/// the fill and, within 30 s of the free, drops by 200 MiB or more. The
/// curve goes to stderr.
#[test]
fn memory_the_guest_frees_goes_back_to_the_host() {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::mpsc;
    use std::time::Instant;

    let sb = Sandbox::new("balloon");
    let script = "echo ready; read go; \
        dd if=/dev/zero of=/fill/blob bs=1M count=350 2>/dev/null; echo filled; read go; \
        rm /fill/blob; echo freed; read go; echo bye";
    let mut b = sb.bundle(&["sh", "-c", script]);
    b.add_mount(
        json!({"destination": "/fill", "type": "tmpfs", "source": "tmpfs",
        "options": ["size=400m"]}),
    );
    // A VM of about 1 GiB (the limit plus the guest kernel's share).
    b.config["linux"]["resources"] = json!({"memory": {"limit": 1u64 << 30}});
    b.write();
    let mut child = harness::spawn_run(sb.cmd(), &b, "balloon", Stdio::piped());
    let monitor = child.id();
    let mut stdin = child.stdin.take().unwrap();
    let (tx, lines) = mpsc::channel();
    let stdout = BufReader::new(child.stdout.take().unwrap());
    let reader = std::thread::spawn(move || {
        for line in stdout.lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    let expect = |want: &str| {
        let got = lines.recv_timeout(Duration::from_secs(180));
        assert_eq!(got.as_deref(), Ok(want), "guest console: {}", sb.console());
    };
    let start = Instant::now();
    let mut curve = Vec::new();
    let mut sample = |phase: &str| {
        let pss = tree_pss_mib(monitor);
        let t = start.elapsed().as_secs_f64();
        eprintln!("balloon pss: t={t:5.1}s {phase:7} {pss:7.1} MiB");
        curve.push(format!("{t:.1}s {phase} {pss:.1}"));
        pss
    };

    expect("ready");
    let booted = sample("booted");
    writeln!(stdin, "go").unwrap();
    expect("filled");
    let filled = sample("filled");
    assert!(
        filled - booted >= 250.0,
        "350 MB written in the guest, host Pss {booted:.1} -> {filled:.1} MiB"
    );
    writeln!(stdin, "go").unwrap();
    expect("freed");
    let freed = Instant::now();
    let mut dropped_at = None;
    while dropped_at.is_none() {
        std::thread::sleep(Duration::from_secs(1));
        let pss = sample("freed");
        if filled - pss >= 200.0 {
            dropped_at = Some(freed.elapsed());
        } else {
            assert!(
                freed.elapsed() < Duration::from_secs(30),
                "host Pss did not drop by 200 MiB within 30 s: {curve:?}"
            );
        }
    }
    eprintln!("balloon pss: dropped by 200 MiB {dropped_at:?} after the free");
    // Where it settles, for the record.
    for _ in 0..3 {
        std::thread::sleep(Duration::from_secs(1));
        sample("after");
    }
    writeln!(stdin, "go").unwrap();
    drop(stdin);
    expect("bye");
    let status = wait_timeout(&mut child, Duration::from_secs(60)).expect("run did not exit");
    assert_eq!(status.code(), Some(0));
    reader.join().unwrap();
    sb.assert_clean();
}

/// `linux.devices` the guest kernel provides are made in the container as
/// the bundle gives them (type, numbers, mode, owner, path, also a default
/// device's), and work: tun makes an interface, a loop device attaches a
/// file, and a FUSE file system (guest-init/examples/fusehello.rs) is
/// served and mounted.
#[test]
fn devices_the_guest_kernel_provides_are_made_and_work() {
    let sb = Sandbox::new("devices");
    let script = "stat -c '%n %F %t:%T %a %u:%g' /dev/fuse /dev/net/tun /dev/loop-control \
                  /dev/loop0 /dev/mynull /dev/zero; \
                  (exec 3<>/dev/fuse) && echo fuse-opens; \
                  (exec 3<>/dev/net/tun) && echo tun-opens; \
                  tunctl -t t0 >/dev/null && ip link show t0 >/dev/null && echo tun-made; \
                  losetup -f; \
                  dd if=/dev/zero of=/dev/img bs=1k count=64 2>/dev/null; \
                  losetup /dev/loop0 /dev/img && losetup /dev/loop0 && losetup -d /dev/loop0; \
                  mkdir -p /mnt/f; fusehello /mnt/f & \
                  for i in $(seq 100); do grep -q ' /mnt/f fuse' /proc/mounts && break; sleep 0.1; done; \
                  ls /mnt/f; cat /mnt/f/hello; umount /mnt/f; wait";
    let mut b = sb.bundle(&["sh", "-c", script]);
    std::fs::copy(harness::fusehello(), b.rootfs().join("bin/fusehello")).unwrap();
    b.config["linux"]["devices"] = json!([
        {"path": "/dev/fuse", "type": "c", "major": 10, "minor": 229, "fileMode": 0o666},
        {"path": "/dev/net/tun", "type": "c", "major": 10, "minor": 200, "fileMode": 0o666},
        {"path": "/dev/loop-control", "type": "c", "major": 10, "minor": 237, "fileMode": 0o660},
        {"path": "/dev/loop0", "type": "b", "major": 7, "minor": 0, "fileMode": 0o660},
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o600, "uid": 1000, "gid": 1000},
        {"path": "/dev/zero", "type": "c", "major": 1, "minor": 5, "fileMode": 0o640, "uid": 0, "gid": 1000}
    ]);
    // As runc runs it: only what is given (and the defaults) may be opened.
    b.config["linux"]["resources"] = json!({"devices": [{"allow": false, "access": "rwm"}]});
    // tun and loop want CAP_NET_ADMIN and CAP_SYS_ADMIN; not privileged.
    let caps = json!(["CAP_NET_ADMIN", "CAP_SYS_ADMIN", "CAP_KILL"]);
    b.process()["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    let out = sb.run(&b, "d1", None);
    out.expect_code(0);
    assert_eq!(
        out.stdout(),
        "/dev/fuse character special file a:e5 666 0:0\n\
         /dev/net/tun character special file a:c8 666 0:0\n\
         /dev/loop-control character special file a:ed 660 0:0\n\
         /dev/loop0 block special file 7:0 660 0:0\n\
         /dev/mynull character special file 1:3 600 1000:1000\n\
         /dev/zero character special file 1:5 640 0:1000\n\
         fuse-opens\ntun-opens\ntun-made\n/dev/loop0\n\
         /dev/loop0: 0 /dev/img\n\
         hello\nhello from fuse\n"
    );
}

/// `linux.resources.devices` as podman writes them (deny everything, allow
/// the usual devices and mknod of any): a container with CAP_MKNOD makes a
/// loop device (b 7:0) and /dev/net/tun (c 10:200) it was not given, and
/// cannot open them (EPERM), while /dev/null works; a rule that allows the
/// loop device lets it open that one.
#[test]
fn device_rules_keep_a_container_from_devices_it_was_not_given() {
    let sb = Sandbox::new("devrules");
    let script = "mknod /dev/l0 b 7 0 && mknod /dev/t0 c 10 200 && echo made; \
                  echo x >/dev/null && echo null-works; \
                  for d in l0 t0; do \
                    if (exec 3<>/dev/$d) 2>/dev/err; then echo $d-opens; \
                    else echo $d-refused; grep -o 'Operation not permitted' /dev/err; fi; \
                  done";
    let mut b = sb.bundle(&["sh", "-c", script]);
    let caps = json!(["CAP_MKNOD", "CAP_KILL"]);
    b.process()["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    let podman = |extra: &[serde_json::Value]| {
        let mut rules = vec![json!({"allow": false, "access": "rwm"})];
        for (major, minor) in [(1, 3), (1, 5), (1, 7), (1, 8), (1, 9), (5, 0), (5, 2)] {
            rules.push(json!({"allow": true, "type": "c", "major": major, "minor": minor, "access": "rwm"}));
        }
        rules.push(json!({"allow": true, "type": "c", "major": 136, "access": "rwm"}));
        rules.push(json!({"allow": true, "type": "c", "access": "m"}));
        rules.push(json!({"allow": true, "type": "b", "access": "m"}));
        rules.extend(extra.iter().cloned());
        json!({"devices": rules})
    };
    b.config["linux"]["resources"] = podman(&[]);
    let out = sb.run(&b, "r1", None);
    out.expect_code(0);
    assert_eq!(
        out.stdout(),
        "made\nnull-works\n\
         l0-refused\nOperation not permitted\n\
         t0-refused\nOperation not permitted\n"
    );
    b.config["linux"]["resources"] =
        podman(&[json!({"allow": true, "type": "b", "major": 7, "minor": 0, "access": "rw"})]);
    let out = sb.run(&b, "r2", None);
    out.expect_code(0);
    assert_eq!(
        out.stdout(),
        "made\nnull-works\nl0-opens\nt0-refused\nOperation not permitted\n"
    );
}

/// `linux.uidMappings`/`gidMappings` with a user namespace, as runc runs
/// them: inside, the container's root is 0 with the spec's maps; on the
/// rootfs (owned by the mapped root on the host, as podman makes it) it
/// creates files that belong on the host to the mapped ids; what runc's
/// container root would own (a tmpfs /dev, `linux.devices` nodes by their
/// container ids) it owns.
#[test]
fn a_user_namespace_maps_the_containers_ids_onto_the_hosts() {
    let sb = Sandbox::new("userns");
    let script = "id -u; id -g; cat /proc/self/uid_map /proc/self/gid_map; \
                  touch /newfile && stat -c 'newfile %u:%g' /newfile; \
                  mkdir /tmp/x && echo tmp-ok; \
                  stat -c '%n %u:%g' /dev /dev/shm /dev/mynull /proc/1; \
                  head -1 /proc/self/status; \
                  touch /dev/null2 && echo dev-writable";
    let mut b = sb.userns_bundle(&["sh", "-c", script]);
    b.config["linux"]["devices"] = json!([
        {"path": "/dev/mynull", "type": "c", "major": 1, "minor": 3, "fileMode": 0o600, "uid": 1000, "gid": 1000}
    ]);
    let out = sb.run(&b, "u1", None);
    out.expect_code(0);
    let map_line = "         0     100000      65536\n";
    assert_eq!(
        out.stdout(),
        format!(
            "0\n0\n{map_line}{map_line}newfile 0:0\ntmp-ok\n\
             /dev 0:0\n/dev/shm 0:0\n/dev/mynull 1000:1000\n/proc/1 0:0\n\
             Name:\thead\ndev-writable\n"
        )
    );
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(b.rootfs().join("newfile")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100000, 100000));
    let md = std::fs::metadata(b.rootfs().join("tmp/x")).unwrap();
    assert_eq!((md.uid(), md.gid()), (100000, 100000));
}

/// The terminal of a container with a user namespace belongs to its user
/// as the container sees it, with devpts' `gid=5` its tty group inside.
#[test]
fn a_terminal_in_a_user_namespace_is_the_containers_users() {
    let sb = Sandbox::new("ttyuserns");
    let mut b = sb.userns_bundle(&[
        "sh",
        "-c",
        "tty; stat -c 'owner %u:%g' $(tty); read line; echo \"got:$line\"; exit 5",
    ]);
    b.process()["terminal"] = json!(true);
    b.write();
    let out = sb.on_a_terminal(
        "rows 33 cols 101",
        &format!("run --bundle {} tu1", b.dir.display()),
        b"hello\n",
    );
    out.expect_on_a_terminal(
        5,
        ["/dev/pts/0\n", "owner 0:5\n", "got:hello\n"],
        "the terminal's owner",
    );
    sb.assert_clean();
}

/// The container's root owns its mount namespace, as under runc: with
/// CAP_SYS_ADMIN it mounts a tmpfs; a non-root user maps like root does.
/// Its UTS namespace stays the VM's (the README says so): no hostname.
#[test]
fn the_root_of_a_user_namespace_mounts_in_its_own_mount_namespace() {
    let sb = Sandbox::new("usernsmount");
    let script = "mkdir -p /mnt/t && mount -t tmpfs t /mnt/t && stat -c 'tmpfs %u:%g' /mnt/t; \
                  hostname other 2>/dev/null && echo hostname-set || echo hostname-kept; \
                  su -s /bin/sh user -c 'id -u; touch /tmp/by-user'";
    let mut b = sb.userns_bundle(&["sh", "-c", script]);
    let caps = json!(["CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_KILL"]);
    b.process()["capabilities"] = json!({"bounding": caps, "effective": caps, "permitted": caps});
    b.process()["noNewPrivileges"] = json!(false);
    let out = sb.run(&b, "um1", None);
    out.expect_code(0);
    assert_eq!(out.stdout(), "tmpfs 0:0\nhostname-kept\n1000\n");
    use std::os::unix::fs::MetadataExt;
    let md = std::fs::metadata(b.rootfs().join("tmp/by-user")).unwrap();
    assert_eq!((md.uid(), md.gid()), (101000, 101000));
}
