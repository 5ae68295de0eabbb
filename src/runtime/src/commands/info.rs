//! `ps`, `list`, `features`, `spec` and `update`.

use std::io::Write;

use krun_proto::CgroupSetup;
use serde_json::json;

use super::Context;
use crate::api::{Request, Response};
use crate::cgroups::{Cgroup, HostResources};
use crate::container::Existing;
use crate::error::{Error, Result, ResultExt as _};
use crate::plan::shares_to_weight;
use crate::state::{StateDir, Status};

pub fn ps(ctx: &Context, args: &liboci_cli::Ps) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    if c.status() == Status::Stopped {
        return Err(Error::NotRunning(c.id));
    }
    let Response::Processes { processes } = c.call(&Request::Ps { stream: 0 })? else {
        return Err(Error::Unexpected { answer: None });
    };
    let mut out = std::io::stdout().lock();
    match args.format.as_str() {
        "json" => writeln!(
            out,
            "{}",
            serde_json::to_string(&processes.iter().map(|p| p.pid).collect::<Vec<_>>())?
        )?,
        "table" => {
            // As `ps -ef` prints, with the pids the container sees.
            writeln!(
                out,
                "{:<8} {:>7} {:>7} {:<5} {:>8} CMD",
                "UID", "PID", "PPID", "STAT", "TIME"
            )?;
            for p in &processes {
                let t = p.cpu_secs;
                writeln!(
                    out,
                    "{:<8} {:>7} {:>7} {:<5} {:>02}:{:02}:{:02} {}",
                    p.uid,
                    p.pid,
                    p.ppid,
                    p.state,
                    t / 3600,
                    t / 60 % 60,
                    t % 60,
                    p.cmd
                )?;
            }
        }
        other => {
            return Err(Error::Invalid(format!(
                "--format: unknown format {other:?} (want table or json)"
            )))
        }
    }
    Ok(0)
}

pub fn list(ctx: &Context, args: &liboci_cli::List) -> Result<i32> {
    let mut states = Vec::new();
    if let Ok(dir) = std::fs::read_dir(&ctx.root) {
        for e in dir.flatten() {
            let id = e.file_name().to_string_lossy().into_owned();
            if let Ok(state) = StateDir::open(&ctx.root, &id).and_then(|d| d.read()) {
                states.push(state);
            }
        }
    }
    states.sort_by(|a, b| a.id.cmp(&b.id));
    let mut out = std::io::stdout().lock();
    if args.quiet {
        for s in &states {
            writeln!(out, "{}", s.id)?;
        }
    } else if args.format == "json" {
        let v: Vec<_> = states.iter().map(|s| s.to_oci()).collect();
        writeln!(out, "{}", serde_json::to_string(&v)?)?;
    } else {
        writeln!(
            out,
            "{:<20} {:<8} {:<10} {:<40} CREATED",
            "ID", "PID", "STATUS", "BUNDLE"
        )?;
        for s in &states {
            let oci = s.to_oci();
            writeln!(
                out,
                "{:<20} {:<8} {:<10} {:<40} {}",
                s.id,
                oci["pid"],
                s.effective_status(),
                s.bundle.display(),
                s.created
            )?;
        }
    }
    Ok(0)
}

/// `krun-oci features`.
pub fn features() -> Result<i32> {
    println!("{}", serde_json::to_string_pretty(&features_json())?);
    Ok(0)
}

/// What this runtime supports, in the runtime-spec `features` shape (the
/// shim reports the same to containerd's `-info`).
pub fn features_json() -> serde_json::Value {
    let accel = krun_hypervisor::detect_accel();
    let isolation = match accel.accel {
        krun_hypervisor::Accel::Kvm => format!(
            "every container runs in its own virtual machine on KVM (hardware virtualization; {})",
            accel.reason
        ),
        krun_hypervisor::Accel::Tcg => format!(
            "every container runs in its own virtual machine, on this host under TCG emulation ({}): \
             TCG is not a security boundary; --require-kvm or io.krun-oci.require_kvm=true refuses it",
            accel.reason
        ),
    };
    json!({
        "ociVersionMin": "1.0.0",
        "ociVersionMax": "1.2.0",
        // Every kind runs (on the host, in the runtime's namespaces), as
        // runc lists them: its configs.KnownHookNames().
        "hooks": crate::hooks::Kind::ALL.map(crate::hooks::Kind::name),
        "mountOptions": ["ro", "rw", "nosuid", "suid", "nodev", "dev", "noexec", "exec", "sync", "async", "dirsync",
            "mand", "nomand", "atime", "noatime", "diratime", "nodiratime", "relatime", "norelatime", "strictatime",
            "nostrictatime", "bind", "rbind", "private", "rprivate", "shared", "rshared", "slave", "rslave",
            "unbindable", "runbindable", "tmpcopyup"],
        "linux": {
            "namespaces": ["pid", "mount", "uts", "ipc", "network", "cgroup", "user"],
            "capabilities": caps::all().iter().map(|c| c.to_string()).collect::<Vec<_>>(),
            "cgroup": { "v1": true, "v2": true, "systemd": true, "systemdUser": false, "rdma": false },
            "seccomp": { "enabled": false },
            "apparmor": { "enabled": false },
            "selinux": { "enabled": false },
            "intelRdt": { "enabled": false },
            // Made on the host, into the VM's share (crate::idmap).
            "mountExtensions": { "idmap": { "enabled": true } }
        },
        "annotations": {
            "io.krun-oci.hypervisor": "builtin (krun-oci's own VMM on KVM) or qemu; default: builtin where KVM can boot the guest, else qemu",
            "io.krun-oci.vcpus": "the VM's vCPUs (default: from the CPU quota or cpuset, else 1)",
            "io.krun-oci.memory_mib": "the VM's memory in MiB (default: the memory limit plus 64, else 512)",
            "io.krun-oci.host-cgroup": "the host processes of a container (monitor, VMM, QEMU, virtiofsd) run in the cgroup linux.cgroupsPath names, on cgroup v1 (hybrid too) and v2, limited to the VM's memory plus a fixed overhead, the CPU quota, shares and cpuset, and a pids limit of their own; the container's own limits apply in the guest",
            "io.krun-oci.systemd-cgroup": "--systemd-cgroup: linux.cgroupsPath is slice:prefix:name; the container's host processes run in the transient unit prefix-name.scope that systemd starts in the slice when asked over D-Bus (delegated, with the limits as unit properties), stopped by delete; refused where systemd is not running",
            "io.krun-oci.require_kvm": "true: refuse to run without hardware virtualization (no TCG fallback)",
            "io.krun-oci.template": "false: boot this container's VM cold; true (the default unless KRUN_OCI_TEMPLATES=0 or --no-template): on the built-in VMM, a container starts from a VM template built once per VM shape (vCPUs, memory, a network card or none)",
            "io.krun-oci.accelerator": match accel.accel {
                krun_hypervisor::Accel::Kvm => "kvm",
                krun_hypervisor::Accel::Tcg => "tcg",
            },
            "io.krun-oci.isolation": isolation
        }
    })
}

/// A default config.json, as `runc spec` writes one.
pub fn spec(args: &liboci_cli::Spec) -> Result<i32> {
    let dir = args.bundle.clone().unwrap_or_else(|| ".".into());
    let path = dir.join("config.json");
    if path.exists() {
        return Err(Error::Invalid(format!(
            "{} already exists; remove it first",
            path.display()
        )));
    }
    let caps = json!(["CAP_AUDIT_WRITE", "CAP_KILL", "CAP_NET_BIND_SERVICE"]);
    let v = json!({
        "ociVersion": "1.2.0",
        "process": {
            "terminal": true,
            "user": {"uid": 0, "gid": 0},
            "args": ["sh"],
            "env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "TERM=xterm"],
            "cwd": "/",
            "capabilities": {"bounding": caps, "effective": caps, "permitted": caps},
            "rlimits": [{"type": "RLIMIT_NOFILE", "hard": 1024, "soft": 1024}],
            "noNewPrivileges": true
        },
        "root": {"path": "rootfs", "readonly": true},
        "hostname": "krun",
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts", "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm", "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]},
            {"destination": "/sys/fs/cgroup", "type": "cgroup", "source": "cgroup", "options": ["nosuid", "noexec", "nodev", "relatime", "ro"]}
        ],
        "linux": {
            "namespaces": [{"type": "pid"}, {"type": "network"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"}],
            "maskedPaths": ["/proc/acpi", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list", "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi"],
            "readonlyPaths": ["/proc/asound", "/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]
        }
    });
    std::fs::write(&path, serde_json::to_string_pretty(&v)? + "\n")
        .with_context(|| format!("writing {}", path.display()))?;
    Ok(0)
}

pub fn update(ctx: &Context, args: &liboci_cli::Update) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    if c.status() == Status::Stopped {
        return Err(Error::NotRunning(c.id));
    }
    let mut limits = CgroupSetup::default();
    // The host side's: CPU time and placement (the VM's memory is fixed,
    // so its host memory limit stays the VM's plus the overhead).
    let mut host = HostResources::default();
    let mut cannot = Vec::new();
    if let Some(path) = &args.resources {
        let text = if path.as_os_str() == "-" {
            std::io::read_to_string(std::io::stdin())?
        } else {
            std::fs::read_to_string(path)
                .with_context(|| format!("--resources {}", path.display()))?
        };
        let r: oci_spec::runtime::LinuxResources =
            serde_json::from_str(&text).with_context(|| {
                format!(
                    "--resources {}: not a linux.resources object",
                    path.display()
                )
            })?;
        if let Some(m) = r.memory() {
            limits.memory_max = m.limit().filter(|l| *l > 0).map(|l| l as u64);
        }
        if let Some(cpu) = r.cpu() {
            if let Some(q) = cpu.quota() {
                limits.cpu_max = Some((q, cpu.period().unwrap_or(100_000)));
            }
            limits.cpu_weight = cpu.shares().map(shares_to_weight);
            host.cpu_quota = cpu.quota();
            host.cpu_period = cpu.period();
            host.cpu_shares = cpu.shares();
            host.cpuset_cpus = cpu.cpus().clone().filter(|s| !s.is_empty());
            host.cpuset_mems = cpu.mems().clone().filter(|s| !s.is_empty());
        }
        if let Some(p) = r.pids() {
            limits.pids_max = Some(p.limit());
        }
    }
    if let Some(m) = args.memory {
        limits.memory_max = Some(m);
    }
    if let Some(q) = args.cpu_quota {
        limits.cpu_max = Some((q as i64, args.cpu_period.unwrap_or(100_000)));
        host.cpu_quota = Some(q as i64);
    }
    host.cpu_period = args.cpu_period.or(host.cpu_period);
    if let Some(s) = args.cpu_share {
        limits.cpu_weight = Some(shares_to_weight(s));
        host.cpu_shares = Some(s);
    }
    if let Some(p) = args.pids_limit {
        limits.pids_max = Some(p);
    }
    host.cpuset_cpus = args.cpuset_cpus.clone().or(host.cpuset_cpus);
    host.cpuset_mems = args.cpuset_mems.clone().or(host.cpuset_mems);
    if c.state.cgroup.is_none() && (host.cpuset_cpus.is_some() || host.cpuset_mems.is_some()) {
        cannot.push("the cpuset (the vCPUs of a running VM are fixed, and this container has no host cgroup)");
    }
    if args.blkio_weight.is_some() || args.cpu_rt_period.is_some() || args.cpu_rt_runtime.is_some()
    {
        cannot.push("block I/O and real-time CPU limits (not supported inside the VM)");
    }
    if !cannot.is_empty() {
        return Err(Error::Unsupported(format!(
            "update: cannot change {}",
            cannot.join("; ")
        )));
    }
    c.call(&Request::Update { limits, stream: 0 })?;
    if let Some(paths) = &c.state.cgroup {
        Cgroup::from_paths(paths.clone()).update(&host)?;
    }
    Ok(0)
}
