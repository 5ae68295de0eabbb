//! `linux.devices`: the device nodes a container is given. The container
//! runs in a VM, so a host device cannot be handed through; what can be
//! given is a device the guest kernel itself provides, made in the
//! container's /dev by guest-init with the bundle's numbers, mode and owner.

use krun_proto::DeviceSetup;
use oci_spec::runtime::{LinuxDeviceType, Spec};

use super::Problems;

/// Whether a device is a character or a block device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Char,
    Block,
}

/// A device the guest kernel provides, by its numbers.
struct GuestDevice {
    kind: Kind,
    major: u32,
    /// None: any minor (every loop device).
    minor: Option<u32>,
    name: &'static str,
}

const fn dev(kind: Kind, major: u32, minor: Option<u32>, name: &'static str) -> GuestDevice {
    GuestDevice {
        kind,
        major,
        minor,
        name,
    }
}

/// The devices a container can be given: those whose numbers are the same
/// in every Linux kernel (the kernel's `Documentation/admin-guide/devices.txt`)
/// and that the guest kernel has (`hack/kernel/guest.config`: TUN,
/// BLK_DEV_LOOP, FUSE_FS; the memory devices, tty and ptmx are always
/// there). A device of the bundle is matched by type and numbers, whatever
/// its path. The guest has no hardware random number generator (10:183):
/// that one is not here.
const GUEST_DEVICES: &[GuestDevice] = &[
    dev(Kind::Char, 1, Some(3), "null"),
    dev(Kind::Char, 1, Some(5), "zero"),
    dev(Kind::Char, 1, Some(7), "full"),
    dev(Kind::Char, 1, Some(8), "random"),
    dev(Kind::Char, 1, Some(9), "urandom"),
    dev(Kind::Char, 5, Some(0), "tty"),
    dev(Kind::Char, 5, Some(2), "ptmx"),
    dev(Kind::Char, 10, Some(229), "fuse"),
    dev(Kind::Char, 10, Some(200), "net/tun"),
    dev(Kind::Char, 10, Some(237), "loop-control"),
    dev(Kind::Block, 7, None, "loopN"),
];

/// Every capability the `caps` crate knows, CAP_CHOWN (0) to
/// CAP_CHECKPOINT_RESTORE (40): those of Linux 6.1, the guest kernel, as
/// config.json names them, in the order of their numbers.
pub(crate) fn all_capabilities() -> Vec<caps::Capability> {
    let mut all: Vec<_> = caps::all().into_iter().collect();
    all.sort_by_key(|c| c.index());
    all
}

/// A privileged container: its bounding capability set holds every
/// capability (or the bundle sets no capabilities, which keeps root's full
/// set). "Every" is every capability of the guest kernel that the
/// runtime's own bounding set (`host_capabilities`, `CapBnd`) holds: an
/// engine cannot give more than it has, and `podman run --privileged` on a
/// host without, say, CAP_SYS_RESOURCE gives all the others.
///
/// This is what `podman run --privileged` asks for, and what containerd's
/// `privileged_without_host_devices` relies on: an engine that asks for
/// every capability also lists every host device, and a privileged
/// container is expected to run without the ones a VM cannot have, which
/// are then skipped with a warning instead of refused. It gives the
/// container nothing more.
pub(crate) fn is_privileged(spec: &Spec, host_capabilities: u64) -> bool {
    let Some(caps) = spec
        .process()
        .as_ref()
        .and_then(|p| p.capabilities().as_ref())
    else {
        return true;
    };
    let Some(bounding) = caps.bounding() else {
        return false;
    };
    let names: std::collections::BTreeSet<String> =
        bounding.iter().map(super::process::cap_name).collect();
    all_capabilities()
        .into_iter()
        .filter(|c| host_capabilities & (1 << c.index()) != 0)
        .all(|c| names.contains(&c.to_string()))
}

fn list_of_guest_devices() -> String {
    GUEST_DEVICES
        .iter()
        .map(|d| {
            let t = if d.kind == Kind::Block { 'b' } else { 'c' };
            match d.minor {
                Some(m) => format!("{} ({t} {}:{m})", d.name, d.major),
                None => format!("{} ({t} {}:N)", d.name, d.major),
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// `linux.devices` as guest-init makes them. A device the guest kernel
/// does not provide is a problem naming it, or, in a privileged container,
/// skipped with a warning.
pub(crate) fn plan_devices(
    spec: &Spec,
    host_capabilities: u64,
    problems: &mut Problems,
    warnings: &mut Vec<String>,
) -> Vec<DeviceSetup> {
    let Some(devices) = spec.linux().as_ref().and_then(|l| l.devices().as_ref()) else {
        return Vec::new();
    };
    let privileged = is_privileged(spec, host_capabilities);
    // The list of what can be given, once: an engine may list a hundred.
    let mut listed = false;
    let mut out = Vec::new();
    for (i, d) in devices.iter().enumerate() {
        let field = format!("linux.devices[{i}]");
        let path = d.path().to_string_lossy().into_owned();
        if !d.path().is_absolute() {
            problems.add(
                field,
                format!("path {path:?} must be absolute, as the runtime-spec requires"),
            );
            continue;
        }
        let (kind, letter) = match d.typ() {
            LinuxDeviceType::C | LinuxDeviceType::U => (Some(Kind::Char), 'c'),
            LinuxDeviceType::B => (Some(Kind::Block), 'b'),
            LinuxDeviceType::P => (None, 'p'),
            LinuxDeviceType::A => (None, 'a'),
        };
        let (major, minor) = (d.major(), d.minor());
        let known = kind.filter(|_| {
            GUEST_DEVICES.iter().any(|g| {
                Some(g.kind) == kind
                    && i64::from(g.major) == major
                    && g.minor.is_none_or(|m| i64::from(m) == minor)
            })
        });
        let numbers = (u32::try_from(major).ok()).zip(u32::try_from(minor).ok());
        let (Some(kind), Some((major, minor))) = (known, numbers) else {
            let what = format!("{field} ({path}, {letter} {major}:{minor})");
            if privileged {
                warnings.push(format!(
                    "{what}: skipped: not a device the VM's kernel provides (the container is \
                     privileged, so it runs without it)"
                ));
            } else {
                let mut problem = "not a device the VM's kernel provides".to_string();
                if !std::mem::replace(&mut listed, true) {
                    problem += &format!(
                        "; only {} can be given to a container",
                        list_of_guest_devices()
                    );
                }
                problems.add(what, problem);
            }
            continue;
        };
        out.push(DeviceSetup {
            path,
            block: kind == Kind::Block,
            major,
            minor,
            // As runc: 0666 unless the bundle says, without the type bits.
            mode: d.file_mode().map_or(0o666, |m| m & 0o7777),
            uid: d.uid().unwrap_or(0),
            gid: d.gid().unwrap_or(0),
        });
    }
    out
}
