//! `linux.uidMappings`, `linux.gidMappings` and the `user` entry of
//! `linux.namespaces`: checked as runc checks them, and carried to the
//! guest, where the container's processes get a user namespace of their
//! own with these maps (the guest kernel's initial namespace plays the
//! host's part).

use krun_proto::{id_map_text, IdMap, UserNsSetup};
use oci_spec::runtime::{LinuxIdMapping, LinuxNamespaceType, Spec};

use super::Problems;

/// The most lines an id map may have (Linux's `UID_GID_MAP_MAX_EXTENTS`).
pub(super) const MAX_LINES: usize = 340;

/// The user namespace the container asks for, or None; every problem with
/// it goes to `problems`.
pub(super) fn plan_user_ns(
    spec: &Spec,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) -> Option<UserNsSetup> {
    let linux = spec.linux().as_ref()?;
    let user = linux
        .namespaces()
        .iter()
        .flatten()
        .find(|n| n.typ() == LinuxNamespaceType::User);
    let uids = linux.uid_mappings().clone().unwrap_or_default();
    let gids = linux.gid_mappings().clone().unwrap_or_default();
    let Some(user) = user else {
        if linux.uid_mappings().is_some() || linux.gid_mappings().is_some() {
            problems.add(
                "linux.uidMappings",
                "user namespace mappings specified, but user namespace isn't enabled in the \
                 config (linux.namespaces has no \"user\" entry)",
            );
        }
        return None;
    };
    // A namespace of the host with its mappings given too (containerd's
    // pinned namespace of a user-namespaced pod): the guest makes one with
    // those mappings in its place.
    let given = UserNsSetup {
        uid_map: uids.iter().map(to_map).collect(),
        gid_map: gids.iter().map(to_map).collect(),
    };
    let same_maps = |path: &std::path::Path| {
        maps_of(path).is_ok_and(|(u, g)| {
            same_text(&u, &id_map_text(&given.uid_map))
                && same_text(&g, &id_map_text(&given.gid_map))
        })
    };
    if let Some(path) = user
        .path()
        .as_ref()
        .filter(|p| !uids.is_empty() && !gids.is_empty() && same_maps(p))
    {
        warnings.push(format!(
            "linux.namespaces: user namespace path {}: the VM's guest makes a user namespace \
             with the same mappings in its place",
            path.display()
        ));
    } else if let Some(path) = user.path() {
        problems.add(
            "linux.namespaces",
            format!(
                "user namespace path {}: joining an existing user namespace is not possible; \
                 the container runs in a VM, with a kernel of its own",
                path.display()
            ),
        );
        return None;
    }
    if uids.is_empty() && gids.is_empty() {
        problems.add(
            "linux.namespaces",
            "user namespaces enabled, but no namespace path to join nor mappings to apply \
             specified (linux.uidMappings and linux.gidMappings are empty)",
        );
        return None;
    }
    let uid_map = check_map("linux.uidMappings", &uids, problems);
    let gid_map = check_map("linux.gidMappings", &gids, problems);
    let ns = UserNsSetup { uid_map, gid_map };
    // runc's init becomes root in the namespace before anything else.
    for (field, map, mapped) in [
        ("linux.uidMappings", &ns.uid_map, ns.host_uid(0)),
        ("linux.gidMappings", &ns.gid_map, ns.host_gid(0)),
    ] {
        if !map.is_empty() && mapped.is_none() {
            problems.add(
                field,
                "container id 0 is not mapped; the container's init becomes root in its user \
                 namespace first, as under runc",
            );
        }
    }
    Some(ns)
}

fn to_map(m: &LinuxIdMapping) -> IdMap {
    IdMap {
        container: m.container_id(),
        host: m.host_id(),
        size: m.size(),
    }
}

/// Two id map texts alike but for white space.
fn same_text(a: &str, b: &str) -> bool {
    a.split_whitespace().eq(b.split_whitespace())
}

/// The uid and gid maps of the user namespace at `path`, as a process in
/// it reads them (a short-lived child that enters it; safe in a process
/// with threads: the child makes raw system calls only).
fn maps_of(path: &std::path::Path) -> std::io::Result<(String, String)> {
    use std::io::Read;
    use std::os::fd::AsRawFd;
    let ns = std::fs::File::open(path)?;
    let (mut r, w) = std::io::pipe()?;
    // SAFETY: the child only makes raw system calls and exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: raw calls on descriptors open here and NUL-terminated
        // literals; _exit ends the child.
        unsafe {
            if libc::setns(ns.as_raw_fd(), libc::CLONE_NEWUSER) != 0 {
                libc::_exit(1);
            }
            for (i, file) in [c"/proc/self/uid_map", c"/proc/self/gid_map"]
                .iter()
                .enumerate()
            {
                let fd = libc::open(file.as_ptr(), libc::O_RDONLY);
                let mut buf = [0u8; 8192];
                let n = if fd < 0 {
                    0
                } else {
                    libc::read(fd, buf.as_mut_ptr().cast(), buf.len())
                };
                if n > 0 {
                    libc::write(w.as_raw_fd(), buf.as_ptr().cast(), n as usize);
                }
                if i == 0 {
                    libc::write(w.as_raw_fd(), c"|".as_ptr().cast(), 1);
                }
            }
            libc::_exit(0);
        }
    }
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    drop(w);
    let mut text = String::new();
    let read = r.read_to_string(&mut text);
    let mut st = 0;
    // SAFETY: waitpid on our own child, into a local.
    unsafe { libc::waitpid(pid, &mut st, 0) };
    read?;
    if !libc::WIFEXITED(st) || libc::WEXITSTATUS(st) != 0 {
        return Err(std::io::Error::other("cannot enter the user namespace"));
    }
    let (u, g) = text.split_once('|').unwrap_or((&text, ""));
    Ok((u.to_string(), g.to_string()))
}

/// One map as the kernel would take it: not empty, at most [`MAX_LINES`],
/// no empty or overflowing line, no two lines overlapping inside or
/// outside.
pub(super) fn check_map(
    field: &str,
    map: &[LinuxIdMapping],
    problems: &mut Problems,
) -> Vec<IdMap> {
    if map.is_empty() {
        problems.add(
            field,
            "empty: a user namespace needs both uid and gid mappings",
        );
        return Vec::new();
    }
    if map.len() > MAX_LINES {
        problems.add(
            field,
            format!("{} mappings; Linux takes at most {MAX_LINES}", map.len()),
        );
        return Vec::new();
    }
    let out: Vec<IdMap> = map
        .iter()
        .map(|m| IdMap {
            container: m.container_id(),
            host: m.host_id(),
            size: m.size(),
        })
        .collect();
    let end = |start: u32, size: u32| u64::from(start) + u64::from(size);
    for (i, m) in out.iter().enumerate() {
        let f = format!("{field}[{i}]");
        if m.size == 0 {
            problems.add(f, "size is 0");
            continue;
        }
        if end(m.container, m.size) > 1 << 32 || end(m.host, m.size) > 1 << 32 {
            problems.add(f, "the range goes past the largest id (4294967295)");
            continue;
        }
        for (j, o) in out.iter().enumerate().take(i) {
            if o.size == 0 {
                continue;
            }
            let range_overlap =
                |a: u32, b: u32| u64::from(a) < end(b, o.size) && u64::from(b) < end(a, m.size);
            if range_overlap(m.container, o.container) {
                problems.add(
                    f.clone(),
                    format!("its container ids overlap those of {field}[{j}]"),
                );
            } else if range_overlap(m.host, o.host) {
                problems.add(
                    f.clone(),
                    format!("its host ids overlap those of {field}[{j}]"),
                );
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(json: &str) -> Spec {
        serde_json::from_str(json).unwrap()
    }

    fn plan(linux: &str) -> (Option<UserNsSetup>, Vec<String>) {
        let s = spec(&format!(
            r#"{{"ociVersion":"1.0.2","root":{{"path":"rootfs"}},"linux":{linux}}}"#
        ));
        let mut p = Problems::default();
        let out = plan_user_ns(&s, &mut p, &mut Vec::new());
        let msgs =
            p.0.iter()
                .map(|p| format!("{}: {}", p.field, p.problem))
                .collect();
        (out, msgs)
    }

    const USER: &str = r#""namespaces":[{"type":"user"},{"type":"mount"}]"#;
    const MAP: &str = r#"[{"containerID":0,"hostID":100000,"size":65536}]"#;

    #[test]
    fn a_user_namespace_with_maps_is_carried() {
        let (ns, p) = plan(&format!(
            r#"{{{USER},"uidMappings":{MAP},"gidMappings":{MAP}}}"#
        ));
        assert!(p.is_empty(), "{p:?}");
        let ns = ns.unwrap();
        assert_eq!(
            ns.uid_map,
            vec![IdMap {
                container: 0,
                host: 100000,
                size: 65536
            }]
        );
        assert_eq!(ns.gid_map, ns.uid_map);
    }

    #[test]
    fn no_user_namespace_no_maps_nothing() {
        let (ns, p) = plan(r#"{"namespaces":[{"type":"mount"}]}"#);
        assert!(ns.is_none() && p.is_empty());
    }

    #[test]
    fn maps_without_a_namespace_and_the_reverse_are_refused_as_runc_does() {
        let (_, p) = plan(&format!(r#"{{"uidMappings":{MAP}}}"#));
        assert!(p[0].starts_with("linux.uidMappings: user namespace mappings specified, but"));
        let (_, p) = plan(&format!("{{{USER}}}"));
        assert!(
            p[0].contains("user namespaces enabled, but no namespace path"),
            "{p:?}"
        );
        let (_, p) = plan(&format!(r#"{{{USER},"uidMappings":{MAP}}}"#));
        assert_eq!(
            p,
            ["linux.gidMappings: empty: a user namespace needs both uid and gid mappings"]
        );
    }

    #[test]
    fn joining_a_user_namespace_is_refused() {
        let (ns, p) = plan(&format!(
            r#"{{"namespaces":[{{"type":"user","path":"/proc/1/ns/user"}}],"uidMappings":{MAP},"gidMappings":{MAP}}}"#
        ));
        assert!(ns.is_none());
        assert!(p[0].starts_with("linux.namespaces: user namespace path /proc/1/ns/user"));
    }

    #[test]
    fn bad_maps_are_refused_line_by_line() {
        let bad = r#"[{"containerID":0,"hostID":100000,"size":10},
                      {"containerID":5,"hostID":200000,"size":10},
                      {"containerID":100,"hostID":100005,"size":10},
                      {"containerID":200,"hostID":1,"size":0},
                      {"containerID":300,"hostID":4294967290,"size":10}]"#;
        let (_, p) = plan(&format!(
            r#"{{{USER},"uidMappings":{bad},"gidMappings":{MAP}}}"#
        ));
        assert_eq!(
            p,
            [
                "linux.uidMappings[1]: its container ids overlap those of linux.uidMappings[0]",
                "linux.uidMappings[2]: its host ids overlap those of linux.uidMappings[0]",
                "linux.uidMappings[3]: size is 0",
                "linux.uidMappings[4]: the range goes past the largest id (4294967295)",
            ]
        );
    }

    #[test]
    fn container_root_must_be_mapped() {
        let m1000 = r#"[{"containerID":1000,"hostID":101000,"size":10}]"#;
        let (_, p) = plan(&format!(
            r#"{{{USER},"uidMappings":{m1000},"gidMappings":{MAP}}}"#
        ));
        assert_eq!(p.len(), 1, "{p:?}");
        assert!(p[0].starts_with("linux.uidMappings: container id 0 is not mapped"));
    }

    #[test]
    fn more_lines_than_linux_takes_are_refused() {
        let lines: Vec<String> = (0..=MAX_LINES)
            .map(|i| format!(r#"{{"containerID":{i},"hostID":{},"size":1}}"#, 100000 + i))
            .collect();
        let (_, p) = plan(&format!(
            r#"{{{USER},"uidMappings":[{}],"gidMappings":{MAP}}}"#,
            lines.join(",")
        ));
        assert_eq!(
            p,
            ["linux.uidMappings: 341 mappings; Linux takes at most 340"]
        );
    }
}
