//! The container's cgroup on the host, which holds every host process of
//! the container (the monitor, the VMM, QEMU, virtiofsd) so that the host
//! side is limited and accounted as runc's containers are: created where
//! [`crate::plan::host_cgroup`] says, in every mounted hierarchy (v1 and
//! hybrid: one per controller, plus `name=systemd` and `unified`; v2: the
//! one), given [`HostResources`] in runc's order, joined, read for stats
//! and removed leaf-first.
//!
//! Everything in the files happens through cgroupfs, beneath each mount
//! (see [`beneath`]): a path never climbs out of the hierarchy. A systemd
//! path (`--systemd-cgroup`) is first asked of systemd as a transient
//! unit over D-Bus ([`systemd`]), which makes the cgroup at the unit's
//! place; the same limits then go through cgroupfs as for any cgroup.

mod beneath;
pub mod dbus;
pub mod layout;
mod resources;
pub mod systemd;
#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::errno::Errno;
use serde::{Deserialize, Serialize};

use crate::plan::host_cgroup::{host_cgroup, HostCgroup};
use beneath::Beneath;
pub use layout::{Layout, Version};

/// Where systemd says it runs (runc's test for `--systemd-cgroup`).
const SYSTEMD_RUNNING: &str = "/run/systemd/system";

/// Limits for the host side of a container; `None` leaves a value alone.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostResources {
    /// Bytes of memory (v1 `memory.limit_in_bytes`, v2 `memory.max`).
    pub memory_limit: Option<u64>,
    /// v1 `cpu.shares` (v2 `cpu.weight`, converted as runc does).
    pub cpu_shares: Option<u64>,
    /// Microseconds per period; zero or negative is no limit.
    pub cpu_quota: Option<i64>,
    pub cpu_period: Option<u64>,
    pub cpuset_cpus: Option<String>,
    pub cpuset_mems: Option<String>,
    /// Tasks (processes and threads); zero or negative is no limit.
    pub pids_max: Option<i64>,
}

/// Where a container's cgroup is, in each hierarchy: what the state keeps
/// so that `delete` finds it after the monitor is gone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPaths {
    pub version: Version,
    pub hierarchies: Vec<CgroupPath>,
    /// The systemd unit that holds it (`--systemd-cgroup`), to stop on
    /// removal.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub systemd_unit: Option<String>,
}

/// The container's cgroup in one hierarchy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupPath {
    /// The hierarchy's controllers (`cpu`, `name=systemd`; none for v2).
    pub controllers: Vec<String>,
    /// Where the hierarchy is mounted.
    pub mount: PathBuf,
    /// The cgroup, relative to `mount`.
    pub path: PathBuf,
    #[serde(default)]
    pub unified: bool,
    /// The creating process's own cgroup, where [`Cgroup::leave`] goes
    /// back to (the hierarchy's root when unknown).
    #[serde(default)]
    pub origin: PathBuf,
}

impl CgroupPath {
    fn has(&self, controller: &str) -> bool {
        self.controllers.iter().any(|c| c == controller)
    }
}

/// What the host side of a container uses, read from its cgroup.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub memory_usage: Option<u64>,
    /// `None`: no limit.
    pub memory_limit: Option<u64>,
    pub memory_max_usage: Option<u64>,
    pub cpu_usage_ns: Option<u64>,
    pub pids: Option<u64>,
}

/// Why the host cgroup could not be made, changed, joined or removed.
#[derive(Debug, thiserror::Error)]
pub enum CgroupError {
    #[error("linux.cgroupsPath")]
    Path(#[from] crate::plan::host_cgroup::HostCgroupError),
    #[error("systemd not running on this host, cannot use systemd cgroups manager")]
    SystemdNotRunning,
    #[error("systemd: {action} unit {unit}")]
    Systemd {
        action: &'static str,
        unit: String,
        #[source]
        source: systemd::SystemdError,
    },
    #[error("no cgroup hierarchy is mounted under /sys/fs/cgroup")]
    NoHierarchy,
    #[error("linux.cgroupsPath names the root cgroup, where no limit can be set: give the container a cgroup of its own")]
    Root,
    #[error("cgroup path {} is not a plain path below its hierarchy", .0.display())]
    BadPath(PathBuf),
    #[error("{action} {}", path.display())]
    Io {
        path: PathBuf,
        action: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("writing {value:?} to {}", path.display())]
    Write {
        path: PathBuf,
        value: String,
        #[source]
        source: std::io::Error,
    },
    #[error("unable to set memory limit to {limit} (current usage: {usage}, peak usage: {peak})")]
    MemoryBusy {
        limit: u64,
        usage: String,
        peak: String,
    },
    #[error("removing cgroup {}", path.display())]
    Remove {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// A container's cgroup on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cgroup {
    paths: CgroupPaths,
}

impl Cgroup {
    /// Creates the cgroup `at` on this host with `resources`; on failure
    /// nothing is left behind.
    ///
    /// A systemd cgroup is first started as a transient unit holding the
    /// calling process (see [`systemd`]); the caller, once its children
    /// are in, may leave ([`Cgroup::leave`]) before it removes the cgroup,
    /// or it would be stopped with the unit.
    pub fn create(at: &HostCgroup, resources: &HostResources) -> Result<Cgroup, CgroupError> {
        let HostCgroup::Systemd { slice, unit, .. } = at else {
            return Cgroup::create_in(&Layout::detect()?, at, resources);
        };
        if !Path::new(SYSTEMD_RUNNING).exists() {
            return Err(CgroupError::SystemdNotRunning);
        }
        let layout = Layout::detect()?;
        let mut cgroup = Cgroup::placed(&layout, at)?;
        cgroup.paths.systemd_unit = Some(unit.clone());
        let failed = |action, source| CgroupError::Systemd {
            action,
            unit: unit.clone(),
            source,
        };
        let t0 = std::time::Instant::now();
        let mut sd = systemd::Systemd::connect().map_err(|e| failed("connecting to ask for", e))?;
        let connected = t0.elapsed();
        let v2 = layout.version == Version::V2;
        let started = sd.start(unit, slice, std::process::id(), resources, v2);
        tracing::debug!(
            unit,
            connect_ms = connected.as_secs_f64() * 1000.0,
            start_ms = (t0.elapsed() - connected).as_secs_f64() * 1000.0,
            "systemd unit asked for"
        );
        if let Err(e) = started {
            // Whatever the unit got to: we step out of it before it is stopped.
            let _ = cgroup.leave();
            let _ = sd.stop(unit);
            return Err(failed("starting", e));
        }
        let made = cgroup.make().and_then(|()| cgroup.update(resources));
        if let Err(e) = made {
            // Out of the unit before it is stopped, or stopping kills us.
            if let Err(left) = cgroup.leave() {
                tracing::warn!(error = %left, "leaving the cgroup");
            }
            if let Err(removed) = cgroup.remove() {
                tracing::warn!(error = %removed, "removing the cgroup");
            }
            return Err(e);
        }
        Ok(cgroup)
    }

    /// [`Cgroup::create`] on the hierarchies of `layout`, through cgroupfs
    /// alone (a systemd path too: no unit is asked for).
    pub fn create_in(
        layout: &Layout,
        at: &HostCgroup,
        resources: &HostResources,
    ) -> Result<Cgroup, CgroupError> {
        let cgroup = Cgroup::placed(layout, at)?;
        let made = cgroup.make().and_then(|()| cgroup.update(resources));
        if let Err(e) = made {
            let _ = cgroup.remove();
            return Err(e);
        }
        Ok(cgroup)
    }

    /// Where `at` is in each hierarchy of `layout`; nothing made yet.
    fn placed(layout: &Layout, at: &HostCgroup) -> Result<Cgroup, CgroupError> {
        let resolved = layout.resolve(at);
        if resolved.iter().any(|(_, rel)| rel.as_os_str().is_empty()) {
            return Err(CgroupError::Root);
        }
        let hierarchies = resolved
            .into_iter()
            .map(|(h, path)| CgroupPath {
                controllers: h.controllers,
                mount: h.mount,
                path,
                unified: h.unified,
                origin: h.own,
            })
            .collect();
        Ok(Cgroup {
            paths: CgroupPaths {
                version: layout.version,
                hierarchies,
                systemd_unit: None,
            },
        })
    }

    /// The cgroup recorded at `paths` (by [`Cgroup::paths`]).
    pub fn from_paths(paths: CgroupPaths) -> Cgroup {
        Cgroup { paths }
    }

    /// Where it is, to keep in the container's state.
    pub fn paths(&self) -> &CgroupPaths {
        &self.paths
    }

    /// The cgroup's directory in hierarchy `controller` (`""`: cgroup2).
    pub fn dir(&self, controller: &str) -> Option<PathBuf> {
        self.paths
            .hierarchies
            .iter()
            .find(|h| h.has(controller) || (controller.is_empty() && h.unified))
            .map(|h| h.mount.join(&h.path))
    }

    fn each(
        &self,
        mut f: impl FnMut(&CgroupPath, &Beneath) -> Result<(), CgroupError>,
    ) -> Result<(), CgroupError> {
        for h in &self.paths.hierarchies {
            f(h, &Beneath::open(&h.mount)?)?;
        }
        Ok(())
    }

    fn make(&self) -> Result<(), CgroupError> {
        let v2 = self.paths.version == Version::V2;
        self.each(|h, b| {
            b.mkdir_all(&h.path, |dir| {
                if h.has("cpuset") {
                    resources::cpuset_copy_down(b, dir)?;
                }
                if v2 && h.unified {
                    resources::enable_controllers(b, dir.parent().unwrap_or(Path::new("")))?;
                }
                Ok(())
            })
        })
    }

    /// Sets `resources` (the ones given) in runc's order: on the systemd
    /// unit first, if there is one, then in the files.
    pub fn update(&self, resources: &HostResources) -> Result<(), CgroupError> {
        let v2 = self.paths.version == Version::V2;
        if let Some(unit) = &self.paths.systemd_unit {
            systemd::Systemd::connect()
                .and_then(|mut sd| sd.set(unit, resources, v2))
                .map_err(|source| CgroupError::Systemd {
                    action: "setting the limits of",
                    unit: unit.clone(),
                    source,
                })?;
        }
        self.each(|h, b| match (v2, h.unified) {
            (true, _) => resources::set_v2(b, &h.path, resources),
            (false, false) => resources::set_v1(b, h, resources),
            (false, true) => Ok(()),
        })
    }

    /// Moves process `pid` (0: the caller) into the cgroup, in every
    /// hierarchy, through `cgroup.procs`: the whole process, whatever its
    /// threads (the shim's join). Each such write waits for an RCU grace
    /// period (the kernel takes `cgroup_threadgroup_rwsem` for writing):
    /// 7.5-16 ms measured on this machine's v1 hierarchies.
    pub fn join(&self, pid: i32) -> Result<(), CgroupError> {
        self.each(|h, b| b.write(&h.path.join("cgroup.procs"), &pid.to_string()))
    }

    /// Moves the calling process into the cgroup, in every hierarchy but
    /// the unified one when `in_unified` (it started there, by
    /// `clone3(CLONE_INTO_CGROUP)` from [`Cgroup::unified_dir`]).
    ///
    /// On v1 hierarchies a process that has one thread moves by writing
    /// `0` to `tasks`: a thread moving itself is the one migration the
    /// kernel makes without taking `cgroup_threadgroup_rwsem` for writing,
    /// so it waits for no RCU grace period (0.1 ms a hierarchy measured
    /// here, against 7.5-16 ms through `cgroup.procs`). A process with more
    /// threads (checked in `/proc/self/task`) moves whole, through
    /// `cgroup.procs`. The unified hierarchy has no such way: there a
    /// process moves through `cgroup.procs`, or starts inside.
    pub fn join_self(&self, in_unified: bool) -> Result<(), CgroupError> {
        let alone = only_thread();
        self.each(|h, b| match (h.unified, in_unified, alone) {
            (true, true, _) => Ok(()),
            (false, _, true) => b.write(&h.path.join("tasks"), "0"),
            _ => b.write(&h.path.join("cgroup.procs"), "0"),
        })
    }

    /// The cgroup's directory in the unified hierarchy (cgroup v2's one, or
    /// a hybrid host's `unified`), opened beneath its mount: what
    /// `clone3(CLONE_INTO_CGROUP)` starts a child in, which spares it the
    /// migration there. None where no unified hierarchy is mounted.
    pub fn unified_dir(&self) -> Result<Option<std::os::fd::OwnedFd>, CgroupError> {
        match self.paths.hierarchies.iter().find(|h| h.unified) {
            Some(h) => Ok(Some(Beneath::open(&h.mount)?.dir(&h.path)?)),
            None => Ok(None),
        }
    }

    /// Moves the calling process back where it was before it joined, so
    /// that the cgroup can be removed.
    pub fn leave(&self) -> Result<(), CgroupError> {
        self.each(|h, b| b.write(&h.origin.join("cgroup.procs"), "0"))
    }

    /// What the host side uses.
    pub fn stats(&self) -> CgroupStats {
        let v2 = self.paths.version == Version::V2;
        let mut stats = CgroupStats::default();
        for h in &self.paths.hierarchies {
            if let Ok(b) = Beneath::open(&h.mount) {
                resources::read_stats(&b, h, v2, &mut stats);
            }
        }
        stats
    }

    /// Removes the cgroup (and any cgroup below it) in every hierarchy,
    /// waiting up to about a second for exiting processes to leave it; a
    /// cgroup already gone is fine. A systemd unit is stopped first (which
    /// kills what is left in it). Removes what it can and reports the
    /// first failure.
    pub fn remove(&self) -> Result<(), CgroupError> {
        let mut first = None;
        if let Some(unit) = &self.paths.systemd_unit {
            let stopped = systemd::Systemd::connect().and_then(|mut sd| sd.stop(unit));
            if let Err(source) = stopped {
                first = Some(CgroupError::Systemd {
                    action: "stopping",
                    unit: unit.clone(),
                    source,
                });
            }
        }
        for h in &self.paths.hierarchies {
            let result = Beneath::open(&h.mount).and_then(|b| remove_tree(&b, &h.path));
            if let Err(e) = result {
                first.get_or_insert(e);
            }
        }
        first.map_or(Ok(()), Err)
    }
}

/// Whether the calling process runs one thread (the caller), as
/// `/proc/self/task` lists; false when it cannot be read.
fn only_thread() -> bool {
    std::fs::read_dir("/proc/self/task").is_ok_and(|d| d.take(2).count() == 1)
}

/// Removes `rel` after everything below it; never the hierarchy's root.
fn remove_tree(b: &Beneath, rel: &Path) -> Result<(), CgroupError> {
    if rel.as_os_str().is_empty() {
        return Ok(());
    }
    for child in b.children(rel) {
        remove_tree(b, &child)?;
    }
    let mut delay = Duration::from_millis(10);
    loop {
        match b.rmdir(rel) {
            Ok(()) | Err(Errno::ENOENT) => return Ok(()),
            Err(Errno::EBUSY) if delay < Duration::from_millis(700) => {
                std::thread::sleep(delay);
                delay *= 2;
            }
            Err(e) => {
                return Err(CgroupError::Remove {
                    path: b.show(rel),
                    source: e.into(),
                })
            }
        }
    }
}

/// The cgroup container `id` asks for with `linux.cgroupsPath` (read as
/// runc reads it, `systemd`: `--systemd-cgroup`), created with `resources`.
pub fn for_container(
    spec: &oci_spec::runtime::Spec,
    id: &str,
    systemd: bool,
    resources: &HostResources,
) -> Result<Cgroup, CgroupError> {
    let path = spec
        .linux()
        .as_ref()
        .and_then(|l| l.cgroups_path().as_ref())
        .map(|p| p.to_string_lossy().into_owned());
    Cgroup::create(&host_cgroup(path.as_deref(), id, systemd)?, resources)
}

/// A cgroup removed when this value is dropped (the caller first moved
/// back out of it), unless [`Owned::keep`] is called: an error on the way
/// leaves no cgroup behind.
pub struct Owned(Option<Cgroup>);

impl Owned {
    pub fn new(cgroup: Cgroup) -> Owned {
        Owned(Some(cgroup))
    }

    pub fn cgroup(&self) -> Option<&Cgroup> {
        self.0.as_ref()
    }

    /// Leaves the cgroup in place (for `delete` to remove); it is returned
    /// for whoever removes it later.
    pub fn keep(mut self) -> Option<Cgroup> {
        self.0.take()
    }
}

impl Drop for Owned {
    fn drop(&mut self) {
        if let Some(cg) = self.0.take() {
            let _ = cg.leave();
            if let Err(e) = cg.remove() {
                tracing::warn!(error = %e, "the host cgroup could not be removed");
            }
        }
    }
}
