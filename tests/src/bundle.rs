//! Bundles for tests: a busybox-static rootfs and the config.json that
//! `hack/mkbundle` writes, for the test to edit before it runs.

use std::os::unix::fs::symlink;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};

/// A bundle whose config the test edits before running.
pub struct TestBundle {
    pub dir: PathBuf,
    pub config: Value,
}

impl TestBundle {
    pub fn rootfs(&self) -> PathBuf {
        self.dir.join("rootfs")
    }

    pub fn process(&mut self) -> &mut Value {
        &mut self.config["process"]
    }

    pub fn add_mount(&mut self, m: Value) {
        self.config["mounts"].as_array_mut().unwrap().push(m);
    }

    pub fn write(&self) {
        std::fs::write(
            self.dir.join("config.json"),
            serde_json::to_vec_pretty(&self.config).unwrap(),
        )
        .unwrap();
    }
}

/// A rootfs of busybox-static with its applets, /etc/passwd and /etc/group.
pub fn make_busybox_rootfs(root: &Path) {
    if root.join("bin/busybox").exists() {
        return;
    }
    for d in [
        "bin",
        "dev",
        "etc",
        "proc",
        "sys",
        "tmp",
        "root",
        "home/user",
    ] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    std::fs::copy("/bin/busybox", root.join("bin/busybox"))
        .expect("busybox-static (hack/setup installs it)");
    let list = Command::new("/bin/busybox").arg("--list").output().unwrap();
    for applet in String::from_utf8_lossy(&list.stdout).lines() {
        if applet != "busybox" {
            let _ = symlink("busybox", root.join("bin").join(applet));
        }
    }
    std::fs::write(
        root.join("etc/passwd"),
        "root:x:0:0:root:/root:/bin/sh\nuser:x:1000:1000:user:/home/user:/bin/sh\n",
    )
    .unwrap();
    std::fs::write(root.join("etc/group"), "root:x:0:\nuser:x:1000:\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(root.join("tmp"), std::fs::Permissions::from_mode(0o1777)).unwrap();
}

/// The mounts `runc spec` writes (and `hack/mkbundle`), from the fixture
/// that keeps its output.
fn runc_spec_mounts() -> Value {
    let spec: Value =
        serde_json::from_str(include_str!("../fixtures/bundles/runc-spec.json")).unwrap();
    spec["mounts"].clone()
}

/// The config `hack/mkbundle` writes, running `args`.
pub fn base_config(args: &[&str]) -> Value {
    let caps = json!([
        "CAP_CHOWN",
        "CAP_DAC_OVERRIDE",
        "CAP_FOWNER",
        "CAP_FSETID",
        "CAP_KILL",
        "CAP_NET_BIND_SERVICE",
        "CAP_SETFCAP",
        "CAP_SETGID",
        "CAP_SETPCAP",
        "CAP_SETUID",
        "CAP_SYS_CHROOT"
    ]);
    json!({
        "ociVersion": "1.0.2",
        "process": {
            "terminal": false,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME=/root"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": false},
        "hostname": "krun-test",
        "mounts": runc_spec_mounts(),
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/kcore", "/proc/keys", "/proc/timer_list", "/sys/firmware"],
            "readonlyPaths": ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    })
}

/// Host files a test binds into a container: the folder `rw` holding
/// `from-host`, the folder `ro` holding `file`, and the file `single.conf`.
pub struct HostVolumes {
    pub rw: PathBuf,
    pub ro: PathBuf,
    pub single: PathBuf,
}

impl HostVolumes {
    /// Writes them under `dir`, the folders named `rw` and `ro`.
    pub fn new(dir: &Path, rw: &str, ro: &str) -> HostVolumes {
        let v = HostVolumes {
            rw: dir.join(rw),
            ro: dir.join(ro),
            single: dir.join("single.conf"),
        };
        std::fs::create_dir_all(&v.rw).unwrap();
        std::fs::create_dir_all(&v.ro).unwrap();
        std::fs::write(v.rw.join("from-host"), "host wrote this\n").unwrap();
        std::fs::write(v.ro.join("file"), "read only\n").unwrap();
        std::fs::write(&v.single, "one file\n").unwrap();
        v
    }

    /// Asserts that the container wrote `text` to `rw`'s `file` and
    /// could not create `new` in `ro`.
    #[track_caller]
    pub fn assert_written(&self, file: &str, text: &str) {
        assert_eq!(std::fs::read_to_string(self.rw.join(file)).unwrap(), text);
        assert!(!self.ro.join("new").exists());
    }
}
