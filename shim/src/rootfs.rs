//! Mounting the rootfs containerd hands a task (CreateTaskRequest.rootfs:
//! usually one overlay mount from the snapshotter) at bundle/rootfs.
//!
//! containerd-shim's own helper forks and waits for its child through the
//! crate's reaper, which this shim turns off (it reaps its VMM children
//! itself), so the mount is done here, in-process.

use std::path::Path;

use krun_proto::UserNsSetup;
use nix::mount::{mount, MsFlags};

/// One mount option that is a flag: its bits, and whether it clears them.
fn flag(opt: &str) -> Option<(MsFlags, bool)> {
    Some(match opt {
        "defaults" | "rw" => (MsFlags::MS_RDONLY, true),
        "ro" => (MsFlags::MS_RDONLY, false),
        "bind" => (MsFlags::MS_BIND, false),
        "rbind" => (MsFlags::MS_BIND | MsFlags::MS_REC, false),
        "nosuid" => (MsFlags::MS_NOSUID, false),
        "suid" => (MsFlags::MS_NOSUID, true),
        "nodev" => (MsFlags::MS_NODEV, false),
        "dev" => (MsFlags::MS_NODEV, true),
        "noexec" => (MsFlags::MS_NOEXEC, false),
        "exec" => (MsFlags::MS_NOEXEC, true),
        "sync" => (MsFlags::MS_SYNCHRONOUS, false),
        "async" => (MsFlags::MS_SYNCHRONOUS, true),
        "noatime" => (MsFlags::MS_NOATIME, false),
        "atime" => (MsFlags::MS_NOATIME, true),
        "nodiratime" => (MsFlags::MS_NODIRATIME, false),
        "diratime" => (MsFlags::MS_NODIRATIME, true),
        "relatime" => (MsFlags::MS_RELATIME, false),
        "norelatime" => (MsFlags::MS_RELATIME, true),
        "strictatime" => (MsFlags::MS_STRICTATIME, false),
        "nostrictatime" => (MsFlags::MS_STRICTATIME, true),
        "remount" => (MsFlags::MS_REMOUNT, false),
        "mand" => (MsFlags::MS_MANDLOCK, false),
        "nomand" => (MsFlags::MS_MANDLOCK, true),
        _ => return None,
    })
}

/// Splits options into mount flags and the data string.
fn parse(options: &[String]) -> (MsFlags, Vec<String>) {
    let mut flags = MsFlags::empty();
    let mut data = Vec::new();
    for o in options {
        match flag(o) {
            Some((f, true)) => flags.remove(f),
            Some((f, false)) => flags.insert(f),
            None => data.push(o.clone()),
        }
    }
    (flags, data)
}

/// The longest directory prefix (ending in '/') all `dirs` share.
fn common_dir(dirs: &[&str]) -> String {
    let Some(first) = dirs.first() else {
        return String::new();
    };
    let mut len = first.len();
    for d in &dirs[1..] {
        len = len.min(
            first
                .bytes()
                .zip(d.bytes())
                .take_while(|(a, b)| a == b)
                .count(),
        );
    }
    match first[..len].rfind('/') {
        Some(i) => first[..=i].to_string(),
        None => String::new(),
    }
}

/// Overlay data too long for one page: lowerdirs relative to their common
/// folder, which the mount then runs in. Returns (folder, shorter data).
fn compact(data: &[String]) -> Option<(String, Vec<String>)> {
    let lower = data.iter().find_map(|o| o.strip_prefix("lowerdir="))?;
    let dirs: Vec<&str> = lower.split(':').collect();
    let base = common_dir(&dirs);
    if base.len() <= 1 {
        return None;
    }
    let rel: Vec<&str> = dirs.iter().map(|d| &d[base.len()..]).collect();
    let data = data
        .iter()
        .map(|o| {
            if o.starts_with("lowerdir=") {
                format!("lowerdir={}", rel.join(":"))
            } else {
                o.clone()
            }
        })
        .collect();
    Some((base, data))
}

/// containerd's `uidmap=`/`gidmap=` overlay options (a user-namespaced
/// pod's image, on a kernel that idmaps overlay layers): the maps, and the
/// data without them. None: no such options.
fn id_maps(data: &[String]) -> anyhow::Result<Option<(UserNsSetup, Vec<String>)>> {
    let mut maps = UserNsSetup::default();
    let mut rest = Vec::new();
    for o in data {
        let (field, value) = match o.split_once('=') {
            Some((k @ ("uidmap" | "gidmap"), v)) => (k, v),
            _ => {
                rest.push(o.clone());
                continue;
            }
        };
        let Some(ranges) = krun_oci::idmap::parse_ranges(value) else {
            anyhow::bail!("overlay option {o:?}: not CONTAINER:HOST:SIZE ranges");
        };
        if field == "uidmap" {
            maps.uid_map = ranges;
        } else {
            maps.gid_map = ranges;
        }
    }
    if maps.uid_map.is_empty() && maps.gid_map.is_empty() {
        return Ok(None);
    }
    if maps.uid_map.is_empty() || maps.gid_map.is_empty() {
        anyhow::bail!("overlay options: uidmap and gidmap come together");
    }
    Ok(Some((maps, rest)))
}

/// An overlay whose lower layers are seen through `maps` (as containerd
/// mounts one): each lowerdir is bound idmapped below `scratch`, the
/// overlay mounted on those, and the binds dropped again (the overlay
/// keeps its own references to its layers). The upper layer is the
/// snapshotter's, already owned by the mapped ids.
fn mount_idmapped_overlay(
    maps: &UserNsSetup,
    data: Vec<String>,
    flags: MsFlags,
    source: &str,
    target: &Path,
) -> anyhow::Result<()> {
    let scratch = target.with_extension("idmap");
    std::fs::create_dir_all(&scratch)?;
    let result = (|| {
        let ns = krun_oci::idmap::user_namespace(maps)?;
        let mut layers = Vec::new();
        let mut data = data;
        for o in data.iter_mut() {
            let Some(lower) = o.strip_prefix("lowerdir=") else {
                continue;
            };
            let mut mapped = Vec::new();
            for (i, dir) in lower.split(':').enumerate() {
                let at = scratch.join(i.to_string());
                std::fs::create_dir_all(&at)?;
                krun_oci::idmap::bind_idmapped(Path::new(dir), &ns, &at)
                    .map_err(|e| anyhow::anyhow!("idmapping the layer {dir}: {e}"))?;
                layers.push(at.clone());
                mapped.push(at.display().to_string());
            }
            *o = format!("lowerdir={}", mapped.join(":"));
        }
        let r = mount_one_plain("overlay", source, flags, &data, target);
        for l in &layers {
            let _ = nix::mount::umount2(l, nix::mount::MntFlags::MNT_DETACH);
        }
        r
    })();
    let _ = krun_oci::staging::remove_tree(&scratch);
    result
}

/// Mounts one rootfs mount at `target`.
pub fn mount_one(
    fs_type: &str,
    source: &str,
    options: &[String],
    target: &Path,
) -> anyhow::Result<()> {
    let (flags, data) = parse(options);
    if fs_type == "overlay" {
        if let Some((maps, data)) = id_maps(&data)? {
            return mount_idmapped_overlay(&maps, data, flags, source, target);
        }
    }
    mount_one_plain(fs_type, source, flags, &data, target)
}

/// [`mount_one`] once the options are split.
fn mount_one_plain(
    fs_type: &str,
    source: &str,
    flags: MsFlags,
    data: &[String],
    target: &Path,
) -> anyhow::Result<()> {
    let page = 4096;
    let joined = data.join(",");
    if fs_type == "overlay" && joined.len() >= page - 512 {
        let Some((dir, data)) = compact(data) else {
            anyhow::bail!(
                "overlay options are {} bytes, too long for one mount",
                joined.len()
            );
        };
        let joined = data.join(",");
        if joined.len() >= page {
            anyhow::bail!(
                "overlay options are {} bytes even relative to {dir}",
                joined.len()
            );
        }
        // The relative lowerdirs are resolved against the working directory
        // of the mounting thread: a thread of its own, with its own cwd.
        let (source, fs_type, target) = (
            source.to_string(),
            fs_type.to_string(),
            target.to_path_buf(),
        );
        return std::thread::spawn(move || -> anyhow::Result<()> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_FS)?;
            std::env::set_current_dir(&dir)?;
            do_mount(&fs_type, &source, flags, &joined, &target)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the mount thread panicked"))?;
    }
    do_mount(fs_type, source, flags, &joined, target)
}

fn do_mount(
    fs_type: &str,
    source: &str,
    flags: MsFlags,
    data: &str,
    target: &Path,
) -> anyhow::Result<()> {
    let data = (!data.is_empty()).then_some(data);
    let fs = (!fs_type.is_empty()).then_some(fs_type);
    mount(Some(source), target, fs, flags & !MsFlags::MS_REMOUNT, data)
        .map_err(|e| anyhow::anyhow!("mount {source} ({fs_type}) at {}: {e}", target.display()))?;
    // A read-only bind needs a remount to become read-only.
    if flags.contains(MsFlags::MS_BIND | MsFlags::MS_RDONLY) {
        mount(
            None::<&str>,
            target,
            None::<&str>,
            flags | MsFlags::MS_REMOUNT,
            None::<&str>,
        )
        .map_err(|e| anyhow::anyhow!("remount {} read-only: {e}", target.display()))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn flags_and_data_are_split() {
        let (f, d) = parse(&s(&["ro", "nosuid", "index=off", "lowerdir=/a:/b", "rw"]));
        assert_eq!(f, MsFlags::MS_NOSUID);
        assert_eq!(d, s(&["index=off", "lowerdir=/a:/b"]));
        let (f, _) = parse(&s(&["rbind", "ro"]));
        assert_eq!(f, MsFlags::MS_BIND | MsFlags::MS_REC | MsFlags::MS_RDONLY);
    }

    #[test]
    fn containerds_id_map_options_are_taken_out() {
        let (maps, rest) = id_maps(&s(&[
            "uidmap=0:200000:65536",
            "gidmap=0:300000:65536",
            "workdir=/w",
            "lowerdir=/a:/b",
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(maps.uid_map[0].host, 200000);
        assert_eq!(maps.gid_map[0].host, 300000);
        assert_eq!(rest, s(&["workdir=/w", "lowerdir=/a:/b"]));
        assert!(id_maps(&s(&["lowerdir=/a"])).unwrap().is_none());
        assert!(id_maps(&s(&["uidmap=0:1:1"])).is_err());
        assert!(id_maps(&s(&["uidmap=x", "gidmap=0:1:1"])).is_err());
    }

    #[test]
    fn lowerdirs_compact_to_their_common_folder() {
        let data = s(&[
            "workdir=/var/lib/s/9/work",
            "lowerdir=/var/lib/s/12/fs:/var/lib/s/11/fs:/var/lib/s/1/fs",
        ]);
        let (dir, d) = compact(&data).unwrap();
        assert_eq!(dir, "/var/lib/s/");
        assert_eq!(
            d,
            s(&["workdir=/var/lib/s/9/work", "lowerdir=12/fs:11/fs:1/fs"])
        );
        assert_eq!(common_dir(&["/a/b", "/c"]), "/");
        assert!(compact(&s(&["lowerdir=/x:/y"])).is_none());
    }
}
