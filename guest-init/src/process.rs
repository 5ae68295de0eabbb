//! The process config applied inside the container: rlimits, user and
//! groups, capabilities, umask, cwd, no_new_privs, and the exec itself.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use caps::{CapSet, Capability, CapsHashSet};
use krun_proto::ProcessSetup;

use crate::failure::{Failure, OrFail};
use crate::sys;

const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// process.rlimits. Before entering a user namespace: inside it, a hard
/// limit can no longer be raised (runc sets them from outside for this).
pub fn set_rlimits(p: &ProcessSetup) -> Result<(), Failure> {
    for r in &p.rlimits {
        sys::setrlimit(r.resource, r.soft, r.hard).or_fail(|| {
            format!(
                "process.rlimits: setting resource {} to {}/{}",
                r.resource, r.soft, r.hard
            )
        })?;
    }
    Ok(())
}

/// Applies everything but the rlimits ([`set_rlimits`]) and the exec;
/// returns the program to exec.
pub fn apply(p: &ProcessSetup) -> Result<PathBuf, Failure> {
    let cwd = Path::new(if p.cwd.is_empty() { "/" } else { &p.cwd });
    // As root, so that a cwd the image lacks can be created (runc does).
    if !cwd.exists() {
        fs::create_dir_all(cwd).or_fail(|| format!("process.cwd: creating {}", cwd.display()))?;
    }
    set_user(p)?;
    if let Some(mask) = p.umask {
        sys::umask(mask);
    }
    std::env::set_current_dir(cwd)
        .or_fail(|| format!("process.cwd: chdir to {}", cwd.display()))?;
    if p.no_new_privileges {
        sys::set_no_new_privs().or_fail(|| "process.noNewPrivileges".into())?;
    }
    resolve(p)
}

fn cap_set(names: &[String]) -> CapsHashSet {
    // Names were validated on the host; one this guest kernel lacks is skipped.
    names
        .iter()
        .filter_map(|n| Capability::from_str(n).ok())
        .collect()
}

fn set_user(p: &ProcessSetup) -> Result<(), Failure> {
    let caps = p.capabilities.as_ref();
    if let Some(c) = caps {
        let keep = cap_set(&c.bounding);
        for cap in caps::all() {
            if !keep.contains(&cap) && caps::has_cap(None, CapSet::Bounding, cap).unwrap_or(false) {
                caps::drop(None, CapSet::Bounding, cap)
                    .or_fail(|| format!("process.capabilities.bounding: dropping {cap}"))?;
            }
        }
        sys::set_keepcaps(true).or_fail(|| "keeping capabilities across setuid".into())?;
    }
    sys::setgroups(&p.additional_gids).or_fail(|| "process.user.additionalGids".into())?;
    sys::setresgid(p.gid).or_fail(|| format!("process.user.gid: {}", p.gid))?;
    sys::setresuid(p.uid).or_fail(|| format!("process.user.uid: {}", p.uid))?;
    if let Some(c) = caps {
        sys::set_keepcaps(false).or_fail(|| "resetting keepcaps".into())?;
        let mask = |names: &[String]| cap_set(names).iter().fold(0u64, |m, c| m | c.bitmask());
        sys::capset(mask(&c.effective), mask(&c.permitted), mask(&c.inheritable)).or_fail(
            || "process.capabilities: setting the effective, permitted and inheritable sets".into(),
        )?;
        // A capability can only be ambient if it is also permitted and
        // inheritable; like runc, skip the ones that are not rather than fail.
        for cap in cap_set(&c.ambient) {
            let _ = caps::raise(None, CapSet::Ambient, cap);
        }
    }
    Ok(())
}

/// Finds the program as execvp would, with the container's PATH; fails
/// with 127 (not found) or 126 (not executable) as runc and shells do.
fn resolve(p: &ProcessSetup) -> Result<PathBuf, Failure> {
    let Some(arg0) = p.args.first() else {
        return Err(Failure::new(1, "process.args must not be empty"));
    };
    if arg0.contains('/') {
        let path = PathBuf::from(arg0);
        return match fs::metadata(&path) {
            Err(e) => Err(Failure::new(
                127,
                format!("exec: {arg0:?}: stat {arg0}: {}", os_msg(&e)),
            )),
            Ok(md) if md.is_dir() => {
                Err(Failure::new(126, format!("exec: {arg0:?}: is a directory")))
            }
            Ok(_) if !sys::can_execute(&path) => Err(Failure::new(
                126,
                format!("exec: {arg0:?}: permission denied"),
            )),
            Ok(_) => Ok(path),
        };
    }
    let path_var = p
        .env
        .iter()
        .find_map(|e| e.strip_prefix("PATH="))
        .unwrap_or(DEFAULT_PATH);
    let mut denied = false;
    let mut seen = HashSet::new();
    for dir in path_var.split(':') {
        let dir = if dir.is_empty() { "." } else { dir };
        if !seen.insert(dir) {
            continue;
        }
        let cand = Path::new(dir).join(arg0);
        match fs::metadata(&cand) {
            Ok(md) if md.is_file() && sys::can_execute(&cand) => return Ok(cand),
            Ok(md) if md.is_file() || md.permissions().mode() & 0o111 == 0 => denied = true,
            _ => {}
        }
    }
    if denied {
        Err(Failure::new(
            126,
            format!("exec: {arg0:?}: permission denied"),
        ))
    } else {
        Err(Failure::new(
            127,
            format!("exec: {arg0:?}: executable file not found in $PATH"),
        ))
    }
}

fn os_msg(e: &std::io::Error) -> String {
    match e.raw_os_error() {
        Some(libc::ENOENT) => "no such file or directory".into(),
        Some(libc::EACCES) => "permission denied".into(),
        Some(libc::ENOTDIR) => "not a directory".into(),
        _ => e.to_string(),
    }
}

/// Execs the program; returns only if that failed, with the reason.
pub fn exec(exe: &Path, p: &ProcessSetup) -> Failure {
    let to_c = |v: &[String]| {
        v.iter()
            .map(|s| CString::new(s.as_bytes()))
            .collect::<Result<Vec<_>, _>>()
    };
    let (Ok(args), Ok(env), Ok(path)) = (to_c(&p.args), to_c(&p.env), sys::cstring(exe)) else {
        return Failure::new(1, "process.args or process.env contains a NUL byte");
    };
    let e = sys::execve(&path, &args, &env);
    let arg0 = p.args.first().map(String::as_str).unwrap_or("");
    let code = match e.raw_os_error() {
        Some(libc::ENOENT) => 127,
        _ => 126,
    };
    let why = match e.raw_os_error() {
        Some(libc::ENOEXEC) => "exec format error".to_string(),
        Some(libc::ENOENT) => "no such file or directory (is its interpreter missing?)".to_string(),
        _ => os_msg(&e),
    };
    Failure::new(code, format!("exec {arg0}: {why}"))
}
