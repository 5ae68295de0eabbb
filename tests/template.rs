//! VM templates (issue #15): on the built-in VMM a container's VM starts
//! from a snapshot of a VM booted once to guest-init, not from a boot
//! (on by default; these tests say so with KRUN_OCI_TEMPLATES=1 anyway).
//! These tests run where the built-in VMM boots Linux (the nested test
//! host, `KRUN_OCI_TEST_HYPERVISOR=builtin`); on QEMU they check that no
//! template is made (QEMU boots every VM cold) and say loudly where the
//! rest runs.

use krun_e2e as harness;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use harness::{make_busybox_rootfs, run_with_timeout, Output, Sandbox, TestBundle, RUN_TIMEOUT};

/// What each container prints: its hostname, its FOO, 16 bytes of its
/// /dev/urandom, a random UUID and its boot_id, one per line; then it
/// exits with CODE.
const SCRIPT: &str =
    "hostname; echo \"$FOO\"; head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \\n'; echo; \
     cat /proc/sys/kernel/random/uuid /proc/sys/kernel/random/boot_id; exit \"$CODE\"";

fn builtin() -> bool {
    harness::hypervisor().as_deref() == Some("builtin")
}

/// A bundle of its own (parallel runs) named `name`, its hostname `name`,
/// FOO set to `value`.
fn bundle(sb: &Sandbox, name: &str, value: &str, code: i32) -> TestBundle {
    let dir = sb.path().join(format!("bundle-{name}"));
    make_busybox_rootfs(&dir.join("rootfs"));
    let mut config = harness::base_config(&["sh", "-c", SCRIPT]);
    config["hostname"] = name.into();
    config["process"]["env"]
        .as_array_mut()
        .unwrap()
        .extend([format!("FOO={value}").into(), format!("CODE={code}").into()]);
    let b = TestBundle { dir, config };
    b.write();
    b
}

/// `krun-oci run` of `b` as `id` with templates in `templates` (and the
/// VM assets in `libdir`, if given).
fn run(sb: &Sandbox, b: &TestBundle, id: &str, templates: &Path, libdir: Option<&Path>) -> Output {
    let mut c: Command = sb.cmd();
    c.env("KRUN_OCI_TEMPLATE_DIR", templates)
        .env("KRUN_OCI_TEMPLATES", "1");
    if let Some(l) = libdir {
        c.env("KRUN_OCI_LIBDIR", l);
    }
    c.args(["run", "--bundle"]).arg(&b.dir).arg(id);
    run_with_timeout(c, None, RUN_TIMEOUT, &sb.path().join("console"))
}

/// What a container printed: hostname, FOO, random bytes, UUID, boot_id.
fn lines(out: &Output) -> [String; 5] {
    let text = out.stdout();
    let l: Vec<&str> = text.lines().collect();
    assert_eq!(
        l.len(),
        5,
        "five lines: {text:?} (stderr {:?})",
        out.stderr()
    );
    [l[0], l[1], l[2], l[3], l[4]].map(String::from)
}

/// The template files in `dir` (`.snap`), by name, with their inodes.
fn templates(dir: &Path) -> Vec<(String, u64)> {
    let mut out: Vec<(String, u64)> = std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".snap"))
                .map(|e| {
                    let ino = e.metadata().unwrap().ino();
                    (e.file_name().to_string_lossy().into_owned(), ino)
                })
                .collect()
        })
        .unwrap_or_default();
    out.sort();
    out
}

/// Nothing but templates, their stamps, records and locks: no build
/// directory or partial file left.
fn assert_only_templates(dir: &Path) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        assert!(
            [".snap", ".ok", ".json", ".lock"]
                .iter()
                .any(|s| name.ends_with(s)),
            "left in the template directory: {name}"
        );
    }
}

#[test]
fn containers_start_from_one_template_each_its_own() {
    let sb = Sandbox::new("template");
    let dir = sb.path().join("templates");
    let first = run(&sb, &bundle(&sb, "first", "one", 3), "t1", &dir, None);
    first.expect_code(3);
    let [host, foo, bytes, uuid, boot] = lines(&first);
    assert_eq!((host.as_str(), foo.as_str()), ("first", "one"));
    if !builtin() {
        assert!(
            templates(&dir).is_empty(),
            "QEMU boots cold, yet a template was made: {:?}",
            templates(&dir)
        );
        eprintln!(
            "NOTE: VM templates are the built-in VMM's; this suite runs them in the nested \
             test host (KRUN_OCI_TEST_HYPERVISOR=builtin). Here (QEMU) it checked only that \
             none is made."
        );
        sb.assert_clean();
        return;
    }
    let made = templates(&dir);
    assert_eq!(made.len(), 1, "one template: {made:?}");
    assert_only_templates(&dir);

    // Three at once from that template: each its own hostname, env, exit
    // code, and its own randomness.
    let outs: Vec<(String, Output)> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..3)
            .map(|i| {
                let (sb, dir) = (&sb, &dir);
                s.spawn(move || {
                    let name = format!("clone{i}");
                    let b = bundle(sb, &name, &format!("foo{i}"), 10 + i);
                    (name.clone(), run(sb, &b, &name, dir, None))
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut randoms = BTreeSet::from([bytes]);
    let mut uuids = BTreeSet::from([uuid]);
    let mut boots = BTreeSet::from([boot]);
    for (i, (name, out)) in outs.iter().enumerate() {
        out.expect_code(10 + i as i32);
        let [host, foo, bytes, uuid, boot] = lines(out);
        assert_eq!(host, *name);
        assert_eq!(foo, format!("foo{i}"));
        assert_eq!(bytes.len(), 32, "{bytes}");
        assert!(
            randoms.insert(bytes.clone()),
            "two clones read the same /dev/urandom bytes {bytes}"
        );
        assert!(
            uuids.insert(uuid.clone()),
            "two clones made the same UUID {uuid}"
        );
        assert!(
            boots.insert(boot.clone()),
            "two clones have the same boot_id {boot}"
        );
    }
    assert_eq!(templates(&dir), made, "the clones used the one template");

    // A corrupt template is verified, removed and built again, never
    // booted: the container runs right, from a new file.
    let path = dir.join(&made[0].0);
    let mut bytes = std::fs::read(&path).unwrap();
    let middle = bytes.len() / 2;
    bytes[middle] ^= 0x5a;
    // In place (same inode): only its times and contents change.
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|f| {
            std::os::unix::fs::FileExt::write_all_at(&f, &bytes[middle..=middle], middle as u64)
        })
        .unwrap();
    drop(bytes);
    let out = run(&sb, &bundle(&sb, "again", "x", 4), "t2", &dir, None);
    out.expect_code(4);
    assert_eq!(lines(&out)[0], "again");
    let rebuilt = templates(&dir);
    assert_eq!(rebuilt.len(), 1, "{rebuilt:?}");
    assert_eq!(rebuilt[0].0, made[0].0, "the same shape, the same key");
    assert_ne!(rebuilt[0].1, made[0].1, "the corrupt file was replaced");

    // A changed guest-init (the initramfs, with padding after its archive)
    // makes a template of its own.
    let lib = changed_libdir(&sb);
    let out = run(&sb, &bundle(&sb, "newinit", "y", 5), "t3", &dir, Some(&lib));
    out.expect_code(5);
    assert_eq!(lines(&out)[0], "newinit");
    let now = templates(&dir);
    assert_eq!(
        now.len(),
        2,
        "a second template for the new initramfs: {now:?}"
    );
    assert!(now.contains(&rebuilt[0]), "the first is left as it was");
    assert_only_templates(&dir);

    // That guest-init changed again (an upgrade in place): the next start
    // builds a third template and removes the second, stale now; the
    // first, whose inputs are as they were, stays.
    let second: Vec<_> = now.iter().filter(|t| **t != rebuilt[0]).cloned().collect();
    pad(&lib.join("initramfs.cpio"));
    let out = run(&sb, &bundle(&sb, "newer", "z", 9), "t4", &dir, Some(&lib));
    out.expect_code(9);
    assert_eq!(lines(&out)[0], "newer");
    let after = templates(&dir);
    assert_eq!(after.len(), 2, "{after:?}");
    assert!(after.contains(&rebuilt[0]), "{after:?}");
    assert!(
        !after.contains(&second[0]),
        "the stale one is gone: {after:?}"
    );
    assert_only_templates(&dir);

    // `template list` says what each is; `template prune` removes what a
    // change left stale without a start to notice it.
    let listed = template_cmd(&dir, &["list", "--format", "json"]);
    let listed: Vec<serde_json::Value> = serde_json::from_str(&listed).unwrap();
    assert_eq!(listed.len(), 2, "{listed:?}");
    assert!(
        listed.iter().all(|t| t["standing"] == "current"),
        "{listed:?}"
    );
    assert!(listed.iter().all(|t| t["inputs"]["shape"]["vcpus"] == 1));
    pad(&lib.join("initramfs.cpio"));
    let table = template_cmd(&dir, &["list"]);
    assert_eq!(table.matches("stale").count(), 1, "{table}");
    assert_eq!(table.matches("current").count(), 1, "{table}");
    let pruned = template_cmd(&dir, &["prune"]);
    let third = after.iter().find(|t| **t != rebuilt[0]).unwrap();
    assert_eq!(format!("{}.snap", pruned.trim()), third.0, "{pruned}");
    assert_eq!(templates(&dir), [rebuilt[0].clone()]);
    assert_only_templates(&dir);
    sb.assert_clean();
}

/// Appends 512 zero bytes to an initramfs (the kernel skips them after
/// the archive): another guest-init to a template's key.
fn pad(initrd: &Path) {
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(initrd)
        .unwrap();
    std::io::Write::write_all(&mut f, &[0u8; 512]).unwrap();
}

/// `krun-oci template ARGS` with templates in `dir`: its stdout, after
/// checking it succeeded.
fn template_cmd(dir: &Path, args: &[&str]) -> String {
    let mut c = harness::krun_oci();
    c.env("KRUN_OCI_TEMPLATE_DIR", dir)
        .arg("template")
        .args(args);
    let out = c.output().unwrap();
    assert!(out.status.success(), "template {args:?}: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn a_container_that_says_no_template_boots_cold() {
    let sb = Sandbox::new("template-off");
    let dir = sb.path().join("templates");
    let mut b = bundle(&sb, "cold", "c", 6);
    b.config["annotations"] = serde_json::json!({"io.krun-oci.template": "false"});
    b.write();
    let out = run(&sb, &b, "cold1", &dir, None);
    out.expect_code(6);
    assert_eq!(lines(&out)[0], "cold");
    // And the flag, for every container of the command.
    let b = bundle(&sb, "flag", "f", 7);
    let mut c = sb.cmd();
    c.env("KRUN_OCI_TEMPLATE_DIR", &dir)
        .env("KRUN_OCI_TEMPLATES", "1")
        .args(["--no-template", "run", "--bundle"])
        .arg(&b.dir)
        .arg("cold2");
    let out = run_with_timeout(c, None, RUN_TIMEOUT, &sb.path().join("console"));
    out.expect_code(7);
    assert_eq!(lines(&out)[0], "flag");
    assert!(templates(&dir).is_empty(), "{:?}", templates(&dir));
    // A bad value is refused, naming the annotation.
    let mut b = bundle(&sb, "bad", "b", 0);
    b.config["annotations"] = serde_json::json!({"io.krun-oci.template": "maybe"});
    b.write();
    let out = run(&sb, &b, "bad1", &dir, None);
    assert_ne!(out.code, 0);
    assert!(
        out.stderr().contains("io.krun-oci.template"),
        "{}",
        out.stderr()
    );
    sb.assert_clean();
}

/// A copy of the VM assets whose initramfs has 512 bytes of zeros after
/// its archive (the kernel skips them): another guest-init to the key.
fn changed_libdir(sb: &Sandbox) -> PathBuf {
    let src = harness::libdir();
    let dst = sb.path().join("lib");
    std::fs::create_dir_all(&dst).unwrap();
    for f in ["vmlinux", "initramfs.cpio", "virtiofsd"] {
        std::fs::copy(src.join(f), dst.join(f)).unwrap();
    }
    pad(&dst.join("initramfs.cpio"));
    dst
}

#[test]
fn a_template_is_built_ahead_of_its_first_container() {
    let sb = Sandbox::new("template-ahead");
    let dir = sb.path().join("templates");
    let build = |args: &[&str]| {
        let mut c = harness::krun_oci();
        c.env("KRUN_OCI_TEMPLATE_DIR", &dir)
            .args(["template", "build"])
            .args(args);
        c.output().unwrap()
    };
    // A bad shape is refused, naming the flag.
    let out = build(&["--vcpus", "0"]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--vcpus 0"),
        "{out:?}"
    );
    let out = build(&["--memory-mib", "256"]);
    if !builtin() {
        // QEMU boots cold: there is no template to build here.
        assert!(!out.status.success(), "{out:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("KVM"), "{err}");
        assert!(templates(&dir).is_empty());
        eprintln!("NOTE: `template build` runs in the nested test host (built-in VMM).");
        return;
    }
    assert!(out.status.success(), "{out:?}");
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(said.trim().ends_with("(built)"), "{said}");
    let made = templates(&dir);
    assert_eq!(made.len(), 1, "{made:?}");
    assert!(said.contains(&made[0].0), "{said}");
    // Again: found and verified, not built.
    let again = build(&["--memory-mib", "256"]);
    assert!(String::from_utf8_lossy(&again.stdout)
        .trim()
        .ends_with("(already there)"));
    // A container of that shape starts from it.
    let mut b = bundle(&sb, "ahead", "a", 8);
    b.config["annotations"] = serde_json::json!({"io.krun-oci.memory_mib": "256"});
    b.write();
    let out = run(&sb, &b, "ahead1", &dir, None);
    out.expect_code(8);
    assert_eq!(lines(&out)[0], "ahead");
    assert_eq!(templates(&dir), made, "no second template");
    assert_only_templates(&dir);
    sb.assert_clean();
}
