//! Where on the host a container's cgroup goes, read from
//! `linux.cgroupsPath` as runc reads it (its `specconv.CreateCgroupConfig`
//! and cgroups' path rules), so that engines which place runc's containers
//! place ours the same way:
//!
//! - cgroupfs (the default): the path is cleaned lexically, so it never
//!   climbs out of the hierarchy (`/../../etc` is `/etc`, `../x` is `x`);
//!   an absolute path is below each hierarchy's root, a relative one below
//!   the runtime's own cgroup; none at all is the container's id, relative.
//! - systemd (`--systemd-cgroup`): exactly `slice:prefix:name`; the unit is
//!   the scope `prefix-name.scope` (or `name` when that is a slice) in the
//!   slice, whose path nests its dash-separated parents
//!   (`a-b.slice` is `/a.slice/a-b.slice`).
//!
//! Pure: which hierarchies exist and where the runtime's own cgroup is are
//! the cgroup manager's business ([`crate::cgroups`]), and so is asking
//! systemd for the unit.

use std::path::{Component, Path, PathBuf};

/// The systemd slice of a container that names none.
pub const DEFAULT_SLICE: &str = "system.slice";
/// The scope prefix of a container that names no cgroup under systemd.
pub const DEFAULT_SCOPE_PREFIX: &str = "krun-oci";

/// The host cgroup a container asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostCgroup {
    /// A cgroupfs path, already cleaned: below each hierarchy's root when
    /// `relative` is false, else below the runtime's own cgroup.
    Fs { path: PathBuf, relative: bool },
    /// A systemd unit (a scope, or a slice) in a slice; `slice_path` is
    /// where the slice's cgroup is below each hierarchy's root.
    Systemd {
        slice: String,
        slice_path: PathBuf,
        unit: String,
    },
}

/// Why a `linux.cgroupsPath` cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostCgroupError {
    #[error(
        "expected cgroupsPath to be of format \"slice:prefix:name\" for systemd cgroups, got {0:?} instead"
    )]
    SystemdFormat(String),
    #[error("invalid systemd slice name {0:?}")]
    Slice(String),
    #[error("invalid systemd unit name {0:?}: at most 255 of A-Z a-z 0-9 : - _ . \\ @")]
    Unit(String),
}

/// Reads `cgroups_path` (absent or empty: none given) for container `id`,
/// with the systemd cgroup driver when `systemd` is set.
pub fn host_cgroup(
    cgroups_path: Option<&str>,
    id: &str,
    systemd: bool,
) -> Result<HostCgroup, HostCgroupError> {
    let given = cgroups_path.filter(|p| !p.is_empty());
    if !systemd {
        return Ok(match given {
            None => HostCgroup::Fs {
                path: clean(id),
                relative: true,
            },
            Some(p) => HostCgroup::Fs {
                path: clean(p),
                relative: !p.starts_with('/'),
            },
        });
    }
    let (slice, prefix, name) = match given {
        None => ("", DEFAULT_SCOPE_PREFIX, id),
        Some(p) => {
            let parts: Vec<&str> = p.split(':').collect();
            match parts[..] {
                [slice, prefix, name] => (slice, prefix, name),
                _ => return Err(HostCgroupError::SystemdFormat(p.into())),
            }
        }
    };
    let slice = if slice.is_empty() {
        DEFAULT_SLICE
    } else {
        slice
    };
    let unit = if name.ends_with(".slice") {
        name.to_string()
    } else {
        format!("{prefix}-{name}.scope")
    };
    // systemd's own rule (unit_name_is_valid): also what keeps the unit,
    // a path component below the slice, a single plain name.
    let valid = |c: char| c.is_ascii_alphanumeric() || ":-_.\\@".contains(c);
    if unit.len() > 255 || !unit.chars().all(valid) || unit.starts_with('.') {
        return Err(HostCgroupError::Unit(unit));
    }
    Ok(HostCgroup::Systemd {
        slice_path: expand_slice(slice)?,
        slice: slice.to_string(),
        unit,
    })
}

/// `path` cleaned lexically as if it were absolute: no `.`, no `..` that
/// climbs above the start, no empty components; returned without its
/// leading `/`, to be joined below a root of the caller's choosing.
pub fn clean(path: &str) -> PathBuf {
    let mut out = PathBuf::new();
    for c in Path::new(path).components() {
        match c {
            Component::Normal(n) => out.push(n),
            Component::ParentDir => {
                out.pop();
            }
            Component::RootDir | Component::CurDir | Component::Prefix(_) => {}
        }
    }
    out
}

/// The path of systemd slice `slice` below a hierarchy's root: each
/// dash-separated prefix is a parent slice (`a-b-c.slice` is
/// `a.slice/a-b.slice/a-b-c.slice`); `-.slice` is the root itself.
pub fn expand_slice(slice: &str) -> Result<PathBuf, HostCgroupError> {
    let bad = || HostCgroupError::Slice(slice.into());
    let name = slice.strip_suffix(".slice").ok_or_else(bad)?;
    if name == "-" {
        return Ok(PathBuf::new());
    }
    if name.is_empty() || slice.contains('/') || name.split('-').any(str::is_empty) {
        return Err(bad());
    }
    let mut path = PathBuf::new();
    let mut prefix = String::new();
    for part in name.split('-') {
        if !prefix.is_empty() {
            prefix.push('-');
        }
        prefix.push_str(part);
        path.push(format!("{prefix}.slice"));
    }
    Ok(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fs(path: &str, relative: bool) -> HostCgroup {
        HostCgroup::Fs {
            path: path.into(),
            relative,
        }
    }

    #[test]
    fn cgroupfs_paths_are_what_the_engines_send_and_never_climb_out() {
        let at = |p: Option<&str>| host_cgroup(p, "c1", false).unwrap();
        // podman, ctr, the CRI plugin without a parent.
        assert_eq!(
            at(Some("/libpod_parent/libpod-c1")),
            fs("libpod_parent/libpod-c1", false)
        );
        assert_eq!(at(Some("/default/c1")), fs("default/c1", false));
        assert_eq!(at(Some("/k8s.io/c1")), fs("k8s.io/c1", false));
        // None given: the id, below the runtime's own cgroup, as runc.
        assert_eq!(at(None), fs("c1", true));
        assert_eq!(at(Some("")), fs("c1", true));
        assert_eq!(at(Some("a/b")), fs("a/b", true));
        // Climbing is cleaned away, as runc's LexicallyCleanPath does.
        assert_eq!(at(Some("/../../etc")), fs("etc", false));
        assert_eq!(at(Some("../../etc")), fs("etc", true));
        assert_eq!(at(Some("/a/./b/../../../c//d/")), fs("c/d", false));
        assert_eq!(at(Some("/..")), fs("", false));
        // A systemd-shaped path without --systemd-cgroup is a directory
        // name, as it is to runc.
        assert_eq!(at(Some("system.slice:x:y")), fs("system.slice:x:y", true));
    }

    #[test]
    fn systemd_paths_name_a_scope_in_a_nested_slice() {
        let at = |p: Option<&str>| host_cgroup(p, "c1", true);
        assert_eq!(
            at(Some("kubepods-burstable-pod12.slice:cri-containerd:c1")).unwrap(),
            HostCgroup::Systemd {
                slice: "kubepods-burstable-pod12.slice".into(),
                slice_path:
                    "kubepods.slice/kubepods-burstable.slice/kubepods-burstable-pod12.slice".into(),
                unit: "cri-containerd-c1.scope".into(),
            }
        );
        assert_eq!(
            at(None).unwrap(),
            HostCgroup::Systemd {
                slice: "system.slice".into(),
                slice_path: "system.slice".into(),
                unit: "krun-oci-c1.scope".into(),
            }
        );
        assert_eq!(
            at(Some(":libpod:c1")).unwrap(),
            HostCgroup::Systemd {
                slice: "system.slice".into(),
                slice_path: "system.slice".into(),
                unit: "libpod-c1.scope".into(),
            }
        );
        // A name that is a slice is the unit itself.
        assert!(matches!(
            at(Some("machine.slice:x:pod.slice")).unwrap(),
            HostCgroup::Systemd { unit, .. } if unit == "pod.slice"
        ));
        for bad in ["/libpod_parent/c1", "a:b", "a:b:c:d"] {
            let e = at(Some(bad)).unwrap_err();
            assert_eq!(e, HostCgroupError::SystemdFormat(bad.into()));
            assert!(e.to_string().contains("slice:prefix:name"), "{e}");
        }
        // A unit systemd would refuse, or that would be more than one
        // name below the slice, is refused before systemd is asked.
        for (bad, unit) in [
            ("machine.slice:p:../../etc", "p-../../etc.scope"),
            ("machine.slice:p:../x.slice", "../x.slice"),
            ("machine.slice:p:a b", "p-a b.scope"),
            ("machine.slice:p:a\0b", "p-a\0b.scope"),
            ("machine.slice::.slice", ".slice"),
        ] {
            let e = at(Some(bad)).unwrap_err();
            assert_eq!(e, HostCgroupError::Unit(unit.into()), "{bad}");
        }
        let long = format!("machine.slice:p:{}", "x".repeat(250));
        assert!(matches!(at(Some(&long)), Err(HostCgroupError::Unit(_))));
    }

    #[test]
    fn slices_expand_to_their_parents_and_bad_names_are_refused() {
        assert_eq!(expand_slice("-.slice").unwrap(), PathBuf::new());
        assert_eq!(
            expand_slice("a-b-c.slice").unwrap(),
            PathBuf::from("a.slice/a-b.slice/a-b-c.slice")
        );
        assert_eq!(
            expand_slice("machine.slice").unwrap(),
            PathBuf::from("machine.slice")
        );
        for bad in [
            "machine",
            ".slice",
            "a--b.slice",
            "-a.slice",
            "a-.slice",
            "a/b.slice",
            "../x.slice",
        ] {
            assert_eq!(
                expand_slice(bad),
                Err(HostCgroupError::Slice(bad.into())),
                "{bad}"
            );
        }
    }
}
