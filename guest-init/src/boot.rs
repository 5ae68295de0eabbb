//! The first steps of PID 1: the guest's own mounts and the control port.

use std::fs::{self, File};
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::sys;

/// Mounts /dev, /proc, /sys and the cgroup2 hierarchy in the initramfs.
pub fn mount_basics() -> anyhow::Result<()> {
    const NOSUID_NOEXEC: u64 = libc::MS_NOSUID | libc::MS_NOEXEC;
    for (fstype, target, flags) in [
        ("devtmpfs", "/dev", libc::MS_NOSUID),
        ("proc", "/proc", NOSUID_NOEXEC | libc::MS_NODEV),
        ("sysfs", "/sys", NOSUID_NOEXEC | libc::MS_NODEV),
    ] {
        let _ = fs::create_dir_all(target);
        sys::mount(Some(fstype), Path::new(target), Some(fstype), flags, None)
            .with_context(|| format!("mounting {fstype} on {target}"))?;
    }
    let cg = Path::new("/sys/fs/cgroup");
    sys::mount(
        Some("cgroup2"),
        cg,
        Some("cgroup2"),
        NOSUID_NOEXEC | libc::MS_NODEV,
        None,
    )
    .context("mounting cgroup2 on /sys/fs/cgroup")?;
    // Hand the controllers down to the containers' cgroups; one the kernel
    // lacks is simply not offered.
    for c in ["+memory", "+pids", "+cpu", "+cpuset"] {
        let _ = fs::write(cg.join("cgroup.subtree_control"), c);
    }
    Ok(())
}

/// Opens the virtio-console port named `name` (read and write).
pub fn open_control_port(name: &str) -> anyhow::Result<File> {
    // The port's device appears shortly after the driver probes it.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(dev) = find_port(name) {
            return File::options()
                .read(true)
                .write(true)
                .open(&dev)
                .with_context(|| format!("opening control port {}", dev.display()));
        }
        if Instant::now() > deadline {
            bail!("no virtio-console port named {name:?} appeared");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn find_port(name: &str) -> Option<std::path::PathBuf> {
    for entry in fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let port_name = fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if port_name.trim_end() == name {
            let dev = Path::new("/dev").join(entry.file_name());
            if dev.exists() {
                return Some(dev);
            }
        }
    }
    None
}
