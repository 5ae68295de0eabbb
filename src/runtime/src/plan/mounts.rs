//! `mounts` -> [`MountSetup`]s and the host paths bind mounts need.

use std::os::unix::fs::FileTypeExt;
use std::path::Path;

use krun_proto::{MountSetup, MountSource, UserNsSetup, SHARE_TAG};
use oci_spec::runtime::Spec;

use super::Problems;
use crate::staging::{self, HostBind};

/// Filesystems the guest kernel makes itself. `cgroup` (v1) is given the
/// guest's cgroup2 hierarchy.
const GUEST_FILESYSTEMS: &[&str] = &[
    "proc", "sysfs", "tmpfs", "devpts", "mqueue", "cgroup", "cgroup2", "ramfs",
];

/// Options that are flags of mount(2), and what they set or clear.
const FLAGS: &[(&str, bool, libc::c_ulong)] = &[
    ("ro", false, libc::MS_RDONLY),
    ("rw", true, libc::MS_RDONLY),
    ("nosuid", false, libc::MS_NOSUID),
    ("suid", true, libc::MS_NOSUID),
    ("nodev", false, libc::MS_NODEV),
    ("dev", true, libc::MS_NODEV),
    ("noexec", false, libc::MS_NOEXEC),
    ("exec", true, libc::MS_NOEXEC),
    ("sync", false, libc::MS_SYNCHRONOUS),
    ("async", true, libc::MS_SYNCHRONOUS),
    ("dirsync", false, libc::MS_DIRSYNC),
    ("mand", false, libc::MS_MANDLOCK),
    ("nomand", true, libc::MS_MANDLOCK),
    ("noatime", false, libc::MS_NOATIME),
    ("atime", true, libc::MS_NOATIME),
    ("nodiratime", false, libc::MS_NODIRATIME),
    ("diratime", true, libc::MS_NODIRATIME),
    ("relatime", false, libc::MS_RELATIME),
    ("norelatime", true, libc::MS_RELATIME),
    ("strictatime", false, libc::MS_STRICTATIME),
    ("nostrictatime", true, libc::MS_STRICTATIME),
];

const PROPAGATION: &[(&str, libc::c_ulong)] = &[
    ("private", libc::MS_PRIVATE),
    ("rprivate", libc::MS_PRIVATE | libc::MS_REC),
    ("shared", libc::MS_SHARED),
    ("rshared", libc::MS_SHARED | libc::MS_REC),
    ("slave", libc::MS_SLAVE),
    ("rslave", libc::MS_SLAVE | libc::MS_REC),
    ("unbindable", libc::MS_UNBINDABLE),
    ("runbindable", libc::MS_UNBINDABLE | libc::MS_REC),
];

/// Options runtimes accept that change nothing here: SELinux relabelling
/// (podman strips it, others may not), crun's copy-up hints.
const IGNORED: &[&str] = &[
    "z",
    "Z",
    "tmpcopyup",
    "notmpcopyup",
    "copy-symlink",
    "nocopyup",
    "remount",
];

/// `linux.rootfsPropagation` as MS_* flags (0 when absent); an unknown
/// value is a problem, as it is to runc.
pub(super) fn root_propagation(spec: &Spec, problems: &mut Problems) -> u64 {
    let Some(value) = spec
        .linux()
        .as_ref()
        .and_then(|l| l.rootfs_propagation().clone())
        .filter(|v| !v.is_empty())
    else {
        return 0;
    };
    match PROPAGATION.iter().find(|(name, _)| *name == value) {
        Some((_, flags)) => *flags,
        None => {
            problems.add(
                "linux.rootfsPropagation",
                format!(
                    "unknown propagation {value:?} (want one of {})",
                    PROPAGATION
                        .iter()
                        .map(|(n, _)| *n)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            0
        }
    }
}

/// Parsed `options` of one mount.
#[derive(Debug, Default, PartialEq, Eq)]
struct Options {
    flags: u64,
    propagation: u64,
    data: Vec<String>,
    bind: bool,
}

fn parse_options(options: &[String]) -> Options {
    let mut o = Options::default();
    for opt in options {
        let opt = opt.as_str();
        if opt == "bind" || opt == "rbind" {
            o.bind = true;
        } else if let Some(&(_, clear, flag)) = FLAGS.iter().find(|(n, _, _)| *n == opt) {
            if clear {
                o.flags &= !flag;
            } else {
                o.flags |= flag;
            }
        } else if let Some(&(_, flag)) = PROPAGATION.iter().find(|(n, _)| *n == opt) {
            o.propagation = flag;
        } else if !IGNORED.contains(&opt) {
            o.data.push(opt.to_string());
        }
    }
    o
}

/// The field that asks for an idmapped mount (`idmap`/`ridmap` among the
/// options, or the mount's own uid/gid mappings), if any.
fn idmapped(m: &oci_spec::runtime::Mount) -> Option<&'static str> {
    let opts = m.options().as_deref().unwrap_or(&[]);
    if opts.iter().any(|o| o == "idmap" || o == "ridmap") {
        Some("options")
    } else if m.uid_mappings().as_ref().is_some_and(|v| !v.is_empty()) {
        Some("uidMappings")
    } else if m.gid_mappings().as_ref().is_some_and(|v| !v.is_empty()) {
        Some("gidMappings")
    } else {
        None
    }
}

/// The mappings of an idmapped bind mount, made on the host (see
/// [`crate::idmap`]): the mount's own `uidMappings` and `gidMappings`
/// (both, as runc requires), or with the `idmap`/`ridmap` option alone the
/// container's user namespace's.
fn id_maps(
    spec: &Spec,
    m: &oci_spec::runtime::Mount,
    field: &dyn Fn(&str) -> String,
    problems: &mut Problems,
) -> Option<UserNsSetup> {
    let own = (
        m.uid_mappings().clone().unwrap_or_default(),
        m.gid_mappings().clone().unwrap_or_default(),
    );
    let (uids, gids, uf, gf) = match own {
        (u, g) if !u.is_empty() && !g.is_empty() => {
            (u, g, field("uidMappings"), field("gidMappings"))
        }
        (u, g) if !u.is_empty() || !g.is_empty() => {
            let (missing, given) = if u.is_empty() {
                ("uidMappings", "gidMappings")
            } else {
                ("gidMappings", "uidMappings")
            };
            problems.add(
                field(missing),
                format!("{given} is given, so {missing} must be too (an idmapped mount maps both)"),
            );
            return None;
        }
        _ => {
            let linux = spec.linux().as_ref();
            let u = linux
                .and_then(|l| l.uid_mappings().clone())
                .unwrap_or_default();
            let g = linux
                .and_then(|l| l.gid_mappings().clone())
                .unwrap_or_default();
            if u.is_empty() || g.is_empty() {
                problems.add(
                    field("options"),
                    "idmap without mappings of its own needs the container's \
                     (linux.uidMappings and linux.gidMappings)",
                );
                return None;
            }
            (u, g, "linux.uidMappings".into(), "linux.gidMappings".into())
        }
    };
    let before = problems.0.len();
    let uid_map = super::userns::check_map(&uf, &uids, problems);
    let gid_map = super::userns::check_map(&gf, &gids, problems);
    (problems.0.len() == before).then_some(UserNsSetup { uid_map, gid_map })
}

/// The bundle's mounts as guest-init makes them; each bind mount's source
/// goes into `binds`, to be bound into the VM's share as `ID/`
/// [`staging::bind_name`].
pub(super) fn plan_mounts(
    spec: &Spec,
    id: &str,
    bundle: &Path,
    binds: &mut Vec<HostBind>,
    problems: &mut Problems,
) -> Vec<MountSetup> {
    let mut out = Vec::new();
    // Destinations bound so far: a second bind on one destination is named
    // apart.
    let mut seen_binds: std::collections::HashMap<&Path, usize> = Default::default();
    for (i, m) in spec.mounts().iter().flatten().enumerate() {
        let field = |f: &str| format!("mounts[{i}].{f}");
        let dest = m.destination();
        if !dest.is_absolute() {
            problems.add(
                field("destination"),
                format!("{:?} is not an absolute path", dest.display().to_string()),
            );
            continue;
        }
        let opts = parse_options(m.options().as_deref().unwrap_or(&[]));
        let typ = m.typ().as_deref().unwrap_or("");
        let is_bind = opts.bind || typ == "bind" || typ == "rbind";
        let idmap = match idmapped(m) {
            None => None,
            Some(why) if !is_bind => {
                problems.add(
                    field(why),
                    format!(
                        "only a bind mount can be idmapped ({} is a {typ:?} mount)",
                        dest.display()
                    ),
                );
                continue;
            }
            Some(_) => match id_maps(spec, m, &field, problems) {
                Some(maps) => Some(maps),
                None => continue,
            },
        };
        let source = if is_bind {
            let Some(src) = m.source() else {
                problems.add(field("source"), "a bind mount needs a source");
                continue;
            };
            let src = if src.is_absolute() {
                src.clone()
            } else {
                bundle.join(src)
            };
            let md = match std::fs::metadata(&src) {
                Ok(md) => md,
                Err(_) => {
                    problems.add(field("source"), format!("{} does not exist", src.display()));
                    continue;
                }
            };
            if !md.is_dir() && !md.is_file() {
                let kind = if md.file_type().is_char_device() || md.file_type().is_block_device() {
                    "a device; host devices cannot be bound into a VM"
                } else {
                    "neither a file nor a directory; it cannot be shared with a VM"
                };
                problems.add(field("source"), format!("{} is {kind}", src.display()));
                continue;
            }
            // Bound into the share on its own (symlinks resolved on the
            // host, as runc does): nothing else of its directory comes along.
            let seen = seen_binds.entry(dest).or_default();
            let name = staging::bind_name(dest, *seen);
            *seen += 1;
            binds.push(HostBind {
                name: name.clone(),
                field: field("source"),
                source: src,
                readonly: opts.flags & libc::MS_RDONLY != 0,
                file: md.is_file(),
                idmap: idmap.clone(),
            });
            MountSource::Share {
                tag: SHARE_TAG.to_string(),
                path: staging::bind_path(id, &name),
                file: md.is_file(),
            }
        } else if GUEST_FILESYSTEMS.contains(&typ) {
            let fstype = if typ == "cgroup" { "cgroup2" } else { typ };
            let source = m
                .source()
                .as_ref()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_else(|| fstype.to_string());
            MountSource::Fs {
                fstype: fstype.to_string(),
                source,
            }
        } else if typ.is_empty() {
            problems.add(field("type"), "missing (and the options do not say bind)");
            continue;
        } else {
            problems.add(field("type"), format!("unknown mount type {typ:?}"));
            continue;
        };
        // A cgroup mount never takes data; its v1 controller names do not
        // apply to cgroup2.
        let data = match &source {
            MountSource::Fs { fstype, .. } if fstype == "cgroup2" => String::new(),
            _ => opts.data.join(","),
        };
        // What is neither a flag nor a propagation is mount data, which a
        // bind mount does not take: runc passes it to mount(2), whose bind
        // ignores it (podman's `mode=755`, `size=1k` on a volume); so is it
        // dropped here.
        let data = match source {
            MountSource::Share { .. } => String::new(),
            MountSource::Fs { .. } => data,
        };
        out.push(MountSetup {
            destination: dest.to_string_lossy().into_owned(),
            source,
            flags: opts.flags,
            propagation: opts.propagation,
            data,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_split_into_flags_propagation_and_data() {
        let o = parse_options(&[
            "nosuid".into(),
            "noexec".into(),
            "rprivate".into(),
            "mode=755".into(),
            "size=65536k".into(),
            "ro".into(),
            "rw".into(),
        ]);
        assert_eq!(o.flags, (libc::MS_NOSUID | libc::MS_NOEXEC));
        assert_eq!(o.propagation, (libc::MS_PRIVATE | libc::MS_REC));
        assert_eq!(o.data, vec!["mode=755", "size=65536k"]);
        assert!(!o.bind);
        assert!(parse_options(&["rbind".into(), "z".into()]).bind);
    }

    #[test]
    fn idmapped_mounts_are_named() {
        let m = |json: &str| serde_json::from_str::<oci_spec::runtime::Mount>(json).unwrap();
        let bind = r#""destination":"/d","source":"/tmp","type":"bind""#;
        let opts = m(&format!(r#"{{{bind},"options":["rbind","idmap"]}}"#));
        assert_eq!(idmapped(&opts), Some("options"));
        let opts = m(&format!(r#"{{{bind},"options":["ridmap"]}}"#));
        assert_eq!(idmapped(&opts), Some("options"));
        let map = r#"[{"containerID":0,"hostID":1,"size":1}]"#;
        let maps = m(&format!(
            r#"{{{bind},"uidMappings":{map},"gidMappings":{map}}}"#
        ));
        assert_eq!(idmapped(&maps), Some("uidMappings"));
        assert_eq!(idmapped(&m(&format!("{{{bind}}}"))), None);
    }
}
