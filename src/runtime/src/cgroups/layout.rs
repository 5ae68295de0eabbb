//! Which cgroup hierarchies this host mounts and where the calling process
//! sits in each, read from `statfs(/sys/fs/cgroup)`, `/proc/self/mountinfo`
//! and `/proc/self/cgroup`:
//!
//! - v2 (unified): `/sys/fs/cgroup` is itself a cgroup2 mount, one
//!   hierarchy with every controller;
//! - v1 or hybrid: one mount per hierarchy below `/sys/fs/cgroup`
//!   (`cpu`, `cpuacct` and `cpuset` may be separate or combined, plus
//!   `name=systemd` and, on a hybrid host, the cgroup2 `unified` mount,
//!   which is joined but given no resources, as runc does).
//!
//! The parsing takes the text and the mount root as arguments so that it
//! is tested against this host's files and a fake root in a tempdir.

use std::path::{Path, PathBuf};

use crate::plan::host_cgroup::{clean, HostCgroup};

use super::CgroupError;

/// Where the cgroup file systems are mounted.
pub const CGROUP_ROOT: &str = "/sys/fs/cgroup";

/// The host's cgroup version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Version {
    V1,
    V2,
}

/// One mounted hierarchy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hierarchy {
    /// Its controllers as `/proc/self/cgroup` names them (`cpu`,
    /// `name=systemd`; empty for cgroup2).
    pub controllers: Vec<String>,
    /// Where it is mounted.
    pub mount: PathBuf,
    /// The calling process's cgroup in it, relative to `mount`.
    pub own: PathBuf,
    /// A cgroup2 hierarchy.
    pub unified: bool,
}

/// The hierarchies of this host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub version: Version,
    pub hierarchies: Vec<Hierarchy>,
}

impl Hierarchy {
    /// Whether controller `name` is in this hierarchy (every one is in a
    /// pure v2 host's single hierarchy).
    pub fn has(&self, name: &str) -> bool {
        self.controllers.iter().any(|c| c == name)
    }
}

impl Layout {
    /// This host's layout.
    pub fn detect() -> Result<Layout, CgroupError> {
        let read = |p: &str| {
            std::fs::read_to_string(p).map_err(|source| CgroupError::Io {
                path: p.into(),
                action: "reading",
                source,
            })
        };
        let v2 = nix::sys::statfs::statfs(CGROUP_ROOT)
            .map(|s| s.filesystem_type() == nix::sys::statfs::CGROUP2_SUPER_MAGIC)
            .map_err(|e| CgroupError::Io {
                path: CGROUP_ROOT.into(),
                action: "statfs of",
                source: e.into(),
            })?;
        let mountinfo = read("/proc/self/mountinfo")?;
        let own = read("/proc/self/cgroup")?;
        Layout::parse(&mountinfo, &own, v2, Path::new(CGROUP_ROOT))
    }

    /// The layout described by `mountinfo` and `self_cgroup` (the texts of
    /// `/proc/self/...`), with `/sys/fs/cgroup` found at `root`; `v2` when
    /// `/sys/fs/cgroup` is a cgroup2 mount.
    pub fn parse(
        mountinfo: &str,
        self_cgroup: &str,
        v2: bool,
        root: &Path,
    ) -> Result<Layout, CgroupError> {
        let own = parse_self_cgroup(self_cgroup);
        let mut hierarchies = Vec::new();
        for m in mountinfo.lines().filter_map(Mount::parse) {
            let Ok(below) = Path::new(m.point).strip_prefix(CGROUP_ROOT) else {
                continue;
            };
            if v2 != below.as_os_str().is_empty() {
                continue;
            }
            let unified = m.fstype == "cgroup2";
            let Some((controllers, path)) = own.iter().find(|(c, _)| {
                if unified {
                    c.is_empty()
                } else {
                    !c.is_empty() && c.iter().all(|c| m.options.contains(&c.as_str()))
                }
            }) else {
                continue;
            };
            // A mount of a subtree (in a cgroup namespace, a container's
            // view) shows our cgroup below its own root.
            let own = Path::new(path)
                .strip_prefix(m.root)
                .map(|p| clean(&p.to_string_lossy()))
                .unwrap_or_default();
            let h = Hierarchy {
                controllers: controllers.clone(),
                mount: root.join(below),
                own,
                unified,
            };
            // A later mount on the same point covers the earlier one
            // (mountinfo lists them in the order they were made).
            hierarchies.retain(|o: &Hierarchy| o.mount != h.mount);
            hierarchies.push(h);
        }
        if hierarchies.is_empty() {
            return Err(CgroupError::NoHierarchy);
        }
        let version = if v2 { Version::V2 } else { Version::V1 };
        Ok(Layout {
            version,
            hierarchies,
        })
    }

    /// The container's cgroup in each hierarchy, relative to its mount:
    /// an absolute cgroupfs path below the root; a relative one below our
    /// own cgroup (v1, and the unified mount of a hybrid host) or its
    /// parent (v2), as runc places them; a systemd unit in its slice.
    pub fn resolve(&self, cgroup: &HostCgroup) -> Vec<(Hierarchy, PathBuf)> {
        self.hierarchies
            .iter()
            .map(|h| {
                let rel = match cgroup {
                    HostCgroup::Fs {
                        path,
                        relative: false,
                    } => path.clone(),
                    HostCgroup::Fs {
                        path,
                        relative: true,
                    } => {
                        let base = match self.version {
                            Version::V2 => h.own.parent().unwrap_or(Path::new("")),
                            Version::V1 => &h.own,
                        };
                        base.join(path)
                    }
                    HostCgroup::Systemd {
                        slice_path, unit, ..
                    } => slice_path.join(unit),
                };
                (h.clone(), rel)
            })
            .collect()
    }
}

/// One line of `/proc/self/mountinfo` that mounts a cgroup file system.
struct Mount<'a> {
    root: &'a str,
    point: &'a str,
    fstype: &'a str,
    options: Vec<&'a str>,
}

impl<'a> Mount<'a> {
    fn parse(line: &'a str) -> Option<Mount<'a>> {
        let (before, after) = line.split_once(" - ")?;
        let mut fields = before.split(' ');
        let root = fields.nth(3)?;
        let point = fields.next()?;
        let mut rest = after.split(' ');
        let fstype = rest.next()?;
        if fstype != "cgroup" && fstype != "cgroup2" {
            return None;
        }
        let options = rest.nth(1).unwrap_or("").split(',').collect();
        Some(Mount {
            root,
            point,
            fstype,
            options,
        })
    }
}

/// `/proc/self/cgroup` as (controllers, path) pairs.
fn parse_self_cgroup(text: &str) -> Vec<(Vec<String>, String)> {
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            let controllers = parts.next()?;
            let path = parts.next()?;
            let controllers = controllers
                .split(',')
                .filter(|c| !c.is_empty())
                .map(String::from)
                .collect();
            Some((controllers, path.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// This machine's (a v1 hybrid host with separate cpu and cpuacct).
    pub(crate) const HYBRID_MOUNTINFO: &str = "\
23 1 0:21 / /sys rw,nosuid - sysfs sysfs rw
31 23 0:28 / /sys/fs/cgroup rw,relatime - tmpfs tmpfs rw,mode=755
32 31 0:29 / /sys/fs/cgroup/cpu rw,relatime - cgroup cgroup rw,cpu
33 31 0:30 / /sys/fs/cgroup/cpuacct rw,relatime - cgroup cgroup rw,cpuacct
34 31 0:31 / /sys/fs/cgroup/cpuset rw,relatime - cgroup cgroup rw,cpuset
35 31 0:32 / /sys/fs/cgroup/memory rw,relatime - cgroup cgroup rw,memory
36 31 0:33 / /sys/fs/cgroup/devices rw,relatime - cgroup cgroup rw,devices
39 31 0:36 / /sys/fs/cgroup/pids rw,relatime - cgroup cgroup rw,pids
40 31 0:37 / /sys/fs/cgroup/systemd rw,relatime - cgroup cgroup rw,name=systemd
41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw
";
    pub(crate) const HYBRID_SELF: &str = "\
9:name=systemd:/
8:pids:/
5:devices:/
4:memory:/process_api/0f60
3:cpuset:/
2:cpuacct:/
1:cpu:/
0::/
";
    const V2_MOUNTINFO: &str = "\
22 1 0:20 / /sys rw - sysfs sysfs rw
26 22 0:24 / /sys/fs/cgroup rw,nosuid - cgroup2 cgroup2 rw,nsdelegate
";

    #[test]
    fn a_hybrid_host_has_a_hierarchy_per_mount_and_our_place_in_each() {
        let l = Layout::parse(HYBRID_MOUNTINFO, HYBRID_SELF, false, Path::new("/r")).unwrap();
        assert_eq!(l.version, Version::V1);
        let names: Vec<String> = l
            .hierarchies
            .iter()
            .map(|h| h.controllers.join(","))
            .collect();
        assert_eq!(
            names,
            [
                "cpu",
                "cpuacct",
                "cpuset",
                "memory",
                "devices",
                "pids",
                "name=systemd",
                ""
            ]
        );
        let memory = &l.hierarchies[3];
        assert_eq!(memory.mount, Path::new("/r/memory"));
        assert_eq!(memory.own, Path::new("process_api/0f60"));
        assert!(l.hierarchies[7].unified && l.hierarchies[7].own == Path::new(""));
    }

    #[test]
    fn combined_controllers_are_one_hierarchy() {
        let mi = "32 31 0:29 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        let l = Layout::parse(mi, "1:cpu,cpuacct:/a\n", false, Path::new("/r")).unwrap();
        assert_eq!(l.hierarchies.len(), 1);
        assert!(l.hierarchies[0].has("cpu") && l.hierarchies[0].has("cpuacct"));
        assert_eq!(l.hierarchies[0].mount, Path::new("/r/cpu,cpuacct"));
    }

    #[test]
    fn relative_paths_go_below_our_cgroup_on_v1_and_its_parent_on_v2() {
        let rel = HostCgroup::Fs {
            path: "c1".into(),
            relative: true,
        };
        let abs = HostCgroup::Fs {
            path: "libpod_parent/libpod-c1".into(),
            relative: false,
        };
        let l = Layout::parse(HYBRID_MOUNTINFO, HYBRID_SELF, false, Path::new("/r")).unwrap();
        let at = |c: &HostCgroup, i: usize| l.resolve(c)[i].1.clone();
        assert_eq!(at(&rel, 3), Path::new("process_api/0f60/c1"));
        assert_eq!(at(&rel, 0), Path::new("c1"));
        assert_eq!(at(&abs, 3), Path::new("libpod_parent/libpod-c1"));

        let v2 = Layout::parse(
            V2_MOUNTINFO,
            "0::/user.slice/me.scope\n",
            true,
            Path::new("/r"),
        )
        .unwrap();
        assert_eq!(v2.version, Version::V2);
        assert_eq!(v2.hierarchies.len(), 1);
        assert_eq!(v2.hierarchies[0].mount, Path::new("/r"));
        assert_eq!(v2.resolve(&rel)[0].1, Path::new("user.slice/c1"));
        let sd = HostCgroup::Systemd {
            slice: "a-b.slice".into(),
            slice_path: "a.slice/a-b.slice".into(),
            unit: "p-c1.scope".into(),
        };
        assert_eq!(
            v2.resolve(&sd)[0].1,
            Path::new("a.slice/a-b.slice/p-c1.scope")
        );
    }

    #[test]
    fn a_mount_covered_by_a_later_one_on_the_same_point_is_not_used() {
        // A cgroup namespace's view: the host's cgroup2 (its root above
        // ours), a tmpfs over it, then a fresh cgroup2 of the namespace.
        let mountinfo = "\
107 106 0:27 /.. /sys/fs/cgroup rw,relatime - cgroup2 cgroup2 rw
123 107 0:36 / /sys/fs/cgroup rw,nosuid - tmpfs cover rw,mode=755
124 123 0:27 / /sys/fs/cgroup rw,nosuid,nodev,noexec - cgroup2 cgroup2 rw
";
        let l = Layout::parse(mountinfo, "0::/commands\n", true, Path::new("/r")).unwrap();
        assert_eq!(l.hierarchies.len(), 1);
        assert_eq!(l.hierarchies[0].own, Path::new("commands"));
    }

    #[test]
    fn hostile_or_odd_proc_text_never_climbs_or_panics() {
        let l = Layout::parse(
            HYBRID_MOUNTINFO,
            "4:memory:/../../etc\n1:cpu\ngarbage\n\n",
            false,
            Path::new("/r"),
        )
        .unwrap();
        assert_eq!(l.hierarchies.len(), 1);
        assert_eq!(l.hierarchies[0].own, Path::new("etc"));
        assert!(matches!(
            Layout::parse("x - y\n - \n", "", false, Path::new("/r")),
            Err(CgroupError::NoHierarchy)
        ));
    }
}
