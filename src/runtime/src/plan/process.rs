//! `process` -> [`ProcessSetup`].

use krun_proto::{Capabilities, ProcessSetup, Rlimit};
use oci_spec::runtime::{Capability, PosixRlimitType, Process, Spec};

use super::Problems;

pub(super) fn plan_process(spec: &Spec, problems: &mut Problems) -> ProcessSetup {
    let Some(p) = spec.process() else {
        problems.add("process", "missing: the bundle must say what to run");
        return ProcessSetup::default();
    };
    process_setup(p, problems)
}

/// Any `process` (the container's, or an exec's process.json) as guest-init
/// takes it. Problems are named `process.<field>`.
pub(crate) fn process_setup(p: &Process, problems: &mut Problems) -> ProcessSetup {
    let mut out = ProcessSetup::default();
    match p.args() {
        Some(args) if !args.is_empty() && !args[0].is_empty() => out.args = args.clone(),
        _ => problems.add("process.args", "must not be empty"),
    }
    out.env = p.env().clone().unwrap_or_default();
    let cwd = p.cwd();
    if !cwd.is_absolute() {
        problems.add(
            "process.cwd",
            format!("{:?} is not an absolute path", cwd.display().to_string()),
        );
    }
    out.cwd = cwd.to_string_lossy().into_owned();
    out.terminal = p.terminal().unwrap_or(false);
    out.console_size = p.console_size().map(|b| {
        (
            b.height().min(u16::MAX as u64) as u16,
            b.width().min(u16::MAX as u64) as u16,
        )
    });

    let user = p.user();
    out.uid = user.uid();
    out.gid = user.gid();
    out.additional_gids = user.additional_gids().clone().unwrap_or_default();
    out.umask = user.umask();

    let mut seen = Vec::new();
    for (i, r) in p.rlimits().iter().flatten().enumerate() {
        let field = format!("process.rlimits[{i}]");
        if seen.contains(&r.typ()) {
            problems.add(field, format!("{} is given twice", r.typ()));
            continue;
        }
        seen.push(r.typ());
        if r.soft() > r.hard() {
            problems.add(
                field,
                format!("soft limit {} exceeds hard limit {}", r.soft(), r.hard()),
            );
            continue;
        }
        out.rlimits.push(Rlimit {
            resource: rlimit_number(r.typ()),
            soft: r.soft(),
            hard: r.hard(),
        });
    }

    if let Some(c) = p.capabilities() {
        let names = |set: &Option<oci_spec::runtime::Capabilities>| -> Vec<String> {
            let mut v: Vec<String> = set.iter().flatten().map(cap_name).collect();
            v.sort();
            v
        };
        out.capabilities = Some(Capabilities {
            bounding: names(c.bounding()),
            effective: names(c.effective()),
            inheritable: names(c.inheritable()),
            permitted: names(c.permitted()),
            ambient: names(c.ambient()),
        });
    }
    out.no_new_privileges = p.no_new_privileges().unwrap_or(false);
    out.oom_score_adj = p.oom_score_adj();
    if p.scheduler().is_some() {
        problems.add("process.scheduler", "not supported yet");
    }
    if p.io_priority().is_some() {
        problems.add("process.ioPriority", "not supported yet");
    }
    if p.exec_cpu_affinity().is_some() {
        problems.add("process.execCPUAffinity", "not supported yet");
    }
    out
}

/// `CAP_CHOWN` and so on, as config.json spells them.
pub(super) fn cap_name(c: &Capability) -> String {
    serde_json::to_value(c)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_else(|| format!("CAP_{c}"))
}

fn rlimit_number(t: PosixRlimitType) -> u32 {
    use PosixRlimitType::*;
    match t {
        RlimitCpu => libc::RLIMIT_CPU,
        RlimitFsize => libc::RLIMIT_FSIZE,
        RlimitData => libc::RLIMIT_DATA,
        RlimitStack => libc::RLIMIT_STACK,
        RlimitCore => libc::RLIMIT_CORE,
        RlimitRss => libc::RLIMIT_RSS,
        RlimitNproc => libc::RLIMIT_NPROC,
        RlimitNofile => libc::RLIMIT_NOFILE,
        RlimitMemlock => libc::RLIMIT_MEMLOCK,
        RlimitAs => libc::RLIMIT_AS,
        RlimitLocks => libc::RLIMIT_LOCKS,
        RlimitSigpending => libc::RLIMIT_SIGPENDING,
        RlimitMsgqueue => libc::RLIMIT_MSGQUEUE,
        RlimitNice => libc::RLIMIT_NICE,
        RlimitRtprio => libc::RLIMIT_RTPRIO,
        RlimitRttime => libc::RLIMIT_RTTIME,
    }
}
