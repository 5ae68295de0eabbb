//! The container's processes as `ps` shows them, read from /proc.

use std::fs;

use krun_proto::ProcessInfo;

/// A guest pid's pid as its own (innermost) pid namespace sees it.
fn ns_pid(status: &str) -> Option<i32> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("NSpid:"))
        .and_then(|v| v.split_whitespace().last())
        .and_then(|p| p.parse().ok())
}

pub fn process_info(pid: i32) -> Option<ProcessInfo> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|v| v.trim().to_string())
    };
    let ppid_global: i32 = field("PPid:")?.parse().ok()?;
    // A parent outside the container (guest-init) shows as 0, as for a
    // container's init under runc.
    let ppid = fs::read_to_string(format!("/proc/{ppid_global}/status"))
        .ok()
        .filter(|st| ns_pid(st).is_some_and(|p| p != ppid_global) || ppid_global == 0)
        .and_then(|st| ns_pid(&st))
        .unwrap_or(0);
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which may contain spaces, in parentheses.
    let rest: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = 100u64; // USER_HZ
    let num = |i: usize| rest.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
    let mut cmd = String::from_utf8_lossy(&cmdline)
        .replace('\0', " ")
        .trim_end()
        .to_string();
    if cmd.is_empty() {
        cmd = format!("[{}]", field("Name:").unwrap_or_default());
    }
    Some(ProcessInfo {
        pid: ns_pid(&status).unwrap_or(pid),
        ppid,
        uid: field("Uid:")
            .and_then(|v| v.split_whitespace().next().and_then(|u| u.parse().ok()))
            .unwrap_or(0),
        state: rest.first().map(|s| s.to_string()).unwrap_or_default(),
        start_secs: num(19) / ticks,
        cpu_secs: (num(11) + num(12)) / ticks,
        cmd,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_innermost_pid_is_the_last() {
        assert_eq!(ns_pid("Name:\tsh\nNSpid:\t4242\t7\t1\n"), Some(1));
        assert_eq!(ns_pid("NSpid:\t4242\n"), Some(4242));
        assert_eq!(ns_pid("Name:\tsh\n"), None);
    }

    #[test]
    fn this_thread_is_described() {
        // The thread, not the process: its state is the one that runs.
        let me = nix::unistd::gettid().as_raw();
        let info = process_info(me).unwrap();
        assert_eq!(info.pid, me);
        assert_eq!(info.uid, nix::unistd::getuid().as_raw());
        assert_eq!(info.state, "R");
        assert!(!info.cmd.is_empty());
        assert!(process_info(-1).is_none());
    }
}
