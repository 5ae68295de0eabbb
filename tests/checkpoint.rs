//! `krun-oci checkpoint`: a running container's whole VM captured into an
//! image directory, by the built-in VMM. On QEMU it is refused, saying
//! why, and the container runs on. Whatever cannot be done is refused
//! before anything stops. Each test checks that nothing is left behind.
//!
//! The built-in VMM's tests run in the nested test host (`hack/test`);
//! here, on QEMU, the refusal is what is tested.

use krun_e2e::{self as harness, lifecycle};

use std::path::Path;
use std::time::{Duration, Instant};

use harness::{Sandbox, TestBundle};
use lifecycle::{create, krun, ok, refused, status, wait_exit};

fn builtin() -> bool {
    harness::hypervisor().as_deref() == Some("builtin")
}

/// A container that counts in its rootfs, a step every 50 ms, writing
/// each number whole (a rename), so the host reads it at any time, and
/// appending it to `/held`, a file it holds open from the start.
fn counter(sb: &Sandbox) -> TestBundle {
    sb.written_bundle(&[
        "sh",
        "-c",
        "exec 3>>/held; i=0; while :; do i=$((i+1)); echo $i > /count.new && mv /count.new /count; echo $i >&3; sleep 0.05; done",
    ])
}

/// `/held` counts 1, 2, 3, ... with no gap and no new start, to at least
/// `past`: the file the counter holds open was carried.
#[track_caller]
fn held_in_order(b: &TestBundle, past: u64) {
    let text = std::fs::read_to_string(b.rootfs().join("held")).unwrap();
    let mut want = 1;
    for line in text.lines() {
        assert_eq!(line, want.to_string(), "/held: {want} expected; {text}");
        want += 1;
    }
    assert!(want > past, "/held stops at {}, not past {past}", want - 1);
}

fn count(b: &TestBundle) -> u64 {
    let path = b.rootfs().join("count");
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(n) = std::fs::read_to_string(&path)
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            return n;
        }
        assert!(
            Instant::now() < deadline,
            "{} never held a count",
            path.display()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Waits until the count passes `past`.
#[track_caller]
fn counting_past(b: &TestBundle, past: u64, what: &str) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let n = count(b);
        if n > past {
            return n;
        }
        assert!(Instant::now() < deadline, "{what}: the count stayed at {n}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// `restore --detach` of `id` from `image`, its stdio (the monitor's,
/// which it keeps, as create's) in files of the sandbox, as `create`
/// does; the pid from its pid file.
fn restore(sb: &Sandbox, image: &str, bundle: &str, id: &str) -> i32 {
    lifecycle::become_subreaper();
    let pid_file = sb.path().join(format!("{id}.restored.pid"));
    let file =
        |ext: &str| std::fs::File::create(sb.path().join(format!("{id}.restore.{ext}"))).unwrap();
    let mut c = sb.cmd();
    c.args([
        "restore",
        "--detach",
        "--image-path",
        image,
        "--bundle",
        bundle,
        "--pid-file",
    ])
    .arg(&pid_file)
    .arg(id)
    .stdin(std::process::Stdio::null())
    .stdout(file("out"))
    .stderr(file("err"));
    let mut child = c.spawn().unwrap();
    let st = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT).expect("restore timed out");
    let err = std::fs::read_to_string(sb.path().join(format!("{id}.restore.err"))).unwrap();
    assert_eq!(st.code(), Some(0), "restore {id}: {err}");
    lifecycle::read_pid(&pid_file)
}

fn image(sb: &Sandbox, name: &str) -> String {
    sb.path().join(name).to_str().unwrap().to_string()
}

#[test]
fn what_a_vm_checkpoint_cannot_do_is_refused_before_anything_stops() {
    let sb = Sandbox::new("ckrefuse");
    let b = counter(&sb);
    let pid = create(&sb, &b, "c1");
    // Not started yet: as runc, only a running container.
    let img = image(&sb, "img");
    refused(
        &sb,
        &["checkpoint", "--image-path", &img, "c1"],
        "cannot checkpoint a container that is created",
    );
    ok(krun(&sb, &["start", "c1"]));
    let n = counting_past(&b, 0, "started");
    for (flag, why) in [
        (
            "--tcp-established",
            "established TCP connections are not carried",
        ),
        ("--pre-dump", "no iterative checkpoints"),
        ("--shell-job", "a container with a terminal"),
    ] {
        refused(&sb, &["checkpoint", flag, "--image-path", &img, "c1"], why);
    }
    assert!(
        !Path::new(&img).exists(),
        "a refused checkpoint made its image directory"
    );
    counting_past(&b, n, "after the refusals");
    assert_eq!(status(&sb, "c1"), "running");
    ok(krun(&sb, &["delete", "--force", "c1"]));
    wait_exit(pid);
    sb.assert_clean();
}

/// On the built-in VMM: `--leave-running` writes the image and the
/// container counts on; a checkpoint without it stops the container, as
/// killed, its count standing still. On QEMU: refused, saying why, and
/// the container counts on.
#[test]
fn a_checkpoint_leaves_the_container_running_or_stops_it() {
    let sb = Sandbox::new("ckrun");
    let b = counter(&sb);
    let pid = create(&sb, &b, "c2");
    ok(krun(&sb, &["start", "c2"]));
    let n = counting_past(&b, 5, "started");
    let img = image(&sb, "img");
    if !builtin() {
        refused(
            &sb,
            &["checkpoint", "--image-path", &img, "c2"],
            "QEMU cannot capture a running VM",
        );
        assert!(!Path::new(&img).join("krun-vm.snap").exists());
        counting_past(&b, n, "after the refusal");
        ok(krun(&sb, &["delete", "--force", "c2"]));
        wait_exit(pid);
        sb.assert_clean();
        return;
    }
    let o = krun(
        &sb,
        &["checkpoint", "--leave-running", "--image-path", &img, "c2"],
    );
    assert_eq!(o.code, 0, "{}", o.stderr);
    for f in [
        "krun-vm.snap",
        "krun-checkpoint.json",
        "inventory.img",
        "dump.log",
    ] {
        assert!(Path::new(&img).join(f).is_file(), "{f} missing");
    }
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(&img).join("krun-checkpoint.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["state"]["id"], "c2");
    assert_eq!(record["leave_running"], true);
    let after = counting_past(&b, n, "after a checkpoint that leaves it running");
    assert_eq!(status(&sb, "c2"), "running");
    // The same image directory again (podman keeps one per container):
    // the checkpoint before is replaced.
    let before = std::fs::metadata(Path::new(&img).join("krun-vm.snap")).unwrap();
    ok(krun(
        &sb,
        &["checkpoint", "--leave-running", "--image-path", &img, "c2"],
    ));
    let again = std::fs::metadata(Path::new(&img).join("krun-vm.snap")).unwrap();
    assert_ne!(
        std::os::unix::fs::MetadataExt::ino(&before),
        std::os::unix::fs::MetadataExt::ino(&again)
    );

    let last = image(&sb, "last");
    ok(krun(&sb, &["checkpoint", "--image-path", &last, "c2"]));
    assert!(Path::new(&last).join("krun-vm.snap").is_file());
    assert_eq!(status(&sb, "c2"), "stopped");
    let stopped = count(&b);
    assert!(stopped > after);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        count(&b),
        stopped,
        "the container counted on after its checkpoint"
    );
    assert_eq!(
        wait_exit(pid),
        (Some(128 + libc::SIGKILL), None),
        "killed, as runc leaves it"
    );
    ok(krun(&sb, &["delete", "c2"]));
    // A second root filesystem as the first stands now, for a second
    // restore below (podman's `restore --import` gives a new one too).
    let b2 = TestBundle {
        dir: sb.path().join("bundle2"),
        config: b.config.clone(),
    };
    let cp = std::process::Command::new("cp")
        .arg("-a")
        .arg(&b.dir)
        .arg(&b2.dir)
        .status()
        .unwrap();
    assert!(cp.success());

    // Restored from it, after the original is gone: the same process
    // counts on from where it stood, never from the start.
    let bundle = b.dir.to_str().unwrap().to_string();
    let pid = restore(&sb, &last, &bundle, "c2");
    assert_eq!(status(&sb, "c2"), "running");
    let mut seen = stopped;
    let deadline = Instant::now() + Duration::from_secs(60);
    while seen < stopped + 10 {
        let n = count(&b);
        assert!(
            n >= stopped,
            "the restored container counted from the start: {n} after {stopped}"
        );
        seen = n;
        if Instant::now() >= deadline {
            let ps = krun(&sb, &["ps", "c2"]);
            let vmm = std::fs::read_to_string(sb.root().join("c2/vmm.log")).unwrap_or_default();
            panic!(
                "the restored container does not count: {n} after {stopped}; ps: {} {}; \
                 vmm.log: {vmm}; console: {}",
                ps.stdout,
                ps.stderr,
                sb.console()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    held_in_order(&b, seen - 1);
    let log = std::fs::read_to_string(Path::new(&last).join("restore.log")).unwrap();
    assert!(log.contains("restored"), "{log}");
    // Restoring it again while it runs: refused, it exists.
    refused(
        &sb,
        &[
            "restore",
            "--detach",
            "--image-path",
            &last,
            "--bundle",
            &bundle,
            "c2",
        ],
        "exists",
    );
    // Under another name, onto the other root, while the first runs: a
    // second container that counts on from the same point, in its own
    // root, and that exec reaches.
    let bundle2 = b2.dir.to_str().unwrap().to_string();
    let pid2 = restore(&sb, &last, &bundle2, "c2b");
    assert_eq!(status(&sb, "c2b"), "running");
    let n2 = count(&b2);
    assert!(n2 >= stopped, "the clone counted from the start: {n2}");
    let n2 = counting_past(&b2, n2 + 5, "the restore under another name");
    let o = krun(&sb, &["exec", "c2b", "cat", "/count"]);
    assert_eq!(o.code, 0, "exec into the restored clone: {}", o.stderr);
    let seen: u64 = o.stdout.trim().parse().unwrap();
    assert!(seen >= n2, "exec saw {seen}, the host {n2}");
    let first = counting_past(&b, seen.max(count(&b)), "the first, beside its clone");
    held_in_order(&b, first - 1);
    held_in_order(&b2, n2 - 1);
    // The clone checkpoints and restores again, still by the VM's name.
    let again = image(&sb, "again");
    ok(krun(&sb, &["checkpoint", "--image-path", &again, "c2b"]));
    wait_exit(pid2);
    ok(krun(&sb, &["delete", "c2b"]));
    let record: serde_json::Value = serde_json::from_slice(
        &std::fs::read(Path::new(&again).join("krun-checkpoint.json")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["state"]["id"], "c2b");
    assert_eq!(record["state"]["guestId"], "c2");
    let stood = count(&b2);
    let pid2 = restore(&sb, &again, &bundle2, "c2c");
    counting_past(&b2, stood + 5, "the clone's clone");
    ok(krun(&sb, &["delete", "--force", "c2c"]));
    wait_exit(pid2);
    ok(krun(&sb, &["delete", "--force", "c2"]));
    wait_exit(pid);
    sb.assert_clean();
}

#[test]
fn a_restore_refuses_what_it_cannot_do_and_leaves_nothing() {
    let sb = Sandbox::new("ckrestore");
    let b = counter(&sb);
    b.write();
    let bundle = b.dir.to_str().unwrap().to_string();
    let img = sb.path().join("img");
    std::fs::create_dir(&img).unwrap();
    let img_s = img.to_str().unwrap();
    let restore = |extra: &[&str], why: &str| {
        let mut args = vec!["restore"];
        args.extend_from_slice(extra);
        args.extend_from_slice(&["--image-path", img_s, "--bundle", &bundle, "c3"]);
        refused(&sb, &args, why);
    };
    restore(&["--detach"], "not a krun-oci checkpoint");
    std::fs::write(img.join("krun-checkpoint.json"), b"{\"format\": 99}").unwrap();
    restore(&["--detach"], "krun-checkpoint.json");
    restore(&["--detach", "--tcp-established"], "--tcp-established");
    restore(&[], "--detach");
    sb.assert_clean();
}
