//! `linux.resources.devices`: which devices the container's processes may
//! open and mknod, decided as runc decides it, so that a bundle means the
//! same under both. guest-init enforces the result with a cgroup device
//! program on the container's cgroup in the guest.
//!
//! runc's way (its specconv and its cgroup v1 devices emulator, which it
//! also uses to build its cgroup v2 programs): the bundle's rules come
//! first, then an allow `rwm` for each device of `linux.devices`, then a
//! default list (the memory devices, tty, ptmx, the pseudo-terminals, and
//! mknod of any character or block device). They are applied in order as
//! cgroup v1's devices.allow and devices.deny take them, from a start that
//! allows everything:
//! - a rule of type `a` starts over: everything allowed (allow) or
//!   everything denied (deny), whatever its numbers and access say;
//! - a rule of the other kind than the current default adds its access to
//!   the exception of exactly its type and numbers;
//! - a rule of the same kind as the default takes its access out of the
//!   exception of exactly its type and numbers, and is refused if a
//!   wildcard exception shares access with it, because cgroup v1 would
//!   silently ignore it (runc: "cannot punch hole in existing wildcard
//!   rule").
//!
//! What remains is a default and exceptions all of the other kind, so the
//! order of the exceptions no longer matters. Without a deny-everything
//! rule the default stays allow: no exceptions means no restriction, and
//! no program at all.
//!
//! `krun-oci update` leaves the device rules as they are, as `runc update`
//! does (it takes no device rules from `--resources`).

use std::collections::BTreeMap;

use krun_proto::{DeviceRule, DeviceSetup, DeviceType};
use oci_spec::runtime::{LinuxDeviceType, Spec};

use super::Problems;

const READ: u8 = 1;
const WRITE: u8 = 2;
const MKNOD: u8 = 4;

/// The access bits of `text`, or None if it has a letter other than r, w
/// and m.
fn access_bits(text: &str) -> Option<u8> {
    text.chars().try_fold(0, |bits, c| match c {
        'r' => Some(bits | READ),
        'w' => Some(bits | WRITE),
        'm' => Some(bits | MKNOD),
        _ => None,
    })
}

fn access_text(bits: u8) -> String {
    [(READ, 'r'), (WRITE, 'w'), (MKNOD, 'm')]
        .into_iter()
        .filter(|(b, _)| bits & b != 0)
        .map(|(_, c)| c)
        .collect()
}

/// A rule as the emulator takes it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Rule {
    allow: bool,
    kind: DeviceType,
    major: Option<u32>,
    minor: Option<u32>,
    access: u8,
}

const fn allow(kind: DeviceType, major: Option<u32>, minor: Option<u32>, access: u8) -> Rule {
    Rule {
        allow: true,
        kind,
        major,
        minor,
        access,
    }
}

const RWM: u8 = READ | WRITE | MKNOD;

/// What runc allows every container after the bundle's rules (its
/// specconv's AllowedDevices).
const DEFAULT_ALLOWED: &[Rule] = &[
    allow(DeviceType::Char, None, None, MKNOD),
    allow(DeviceType::Block, None, None, MKNOD),
    allow(DeviceType::Char, Some(1), Some(3), RWM), // null
    allow(DeviceType::Char, Some(1), Some(8), RWM), // random
    allow(DeviceType::Char, Some(1), Some(7), RWM), // full
    allow(DeviceType::Char, Some(5), Some(0), RWM), // tty
    allow(DeviceType::Char, Some(1), Some(5), RWM), // zero
    allow(DeviceType::Char, Some(1), Some(9), RWM), // urandom
    allow(DeviceType::Char, Some(136), None, RWM),  // /dev/pts/N
    allow(DeviceType::Char, Some(5), Some(2), RWM), // ptmx
];

/// The exceptions' key: exactly a type and its numbers (None: any).
type Key = (DeviceType, Option<u32>, Option<u32>);

fn describe(kind: DeviceType, major: Option<u32>, minor: Option<u32>) -> String {
    let n = |v: Option<u32>| v.map_or("*".to_string(), |v| v.to_string());
    let t = match kind {
        DeviceType::All => 'a',
        DeviceType::Char => 'c',
        DeviceType::Block => 'b',
    };
    format!("{t} {}:{}", n(major), n(minor))
}

/// cgroup v1's device rules, as runc emulates them.
#[derive(Debug)]
struct Emulator {
    default_allow: bool,
    exceptions: BTreeMap<Key, u8>,
}

impl Emulator {
    fn new() -> Emulator {
        Emulator {
            default_allow: true,
            exceptions: BTreeMap::new(),
        }
    }

    fn apply(&mut self, r: Rule) -> Result<(), String> {
        if r.kind == DeviceType::All {
            self.default_allow = r.allow;
            self.exceptions.clear();
            return Ok(());
        }
        let key = (r.kind, r.major, r.minor);
        if r.allow != self.default_allow {
            *self.exceptions.entry(key).or_default() |= r.access;
            return Ok(());
        }
        for wider in [
            (r.kind, None, r.minor),
            (r.kind, r.major, None),
            (r.kind, None, None),
        ] {
            let shared = self.exceptions.get(&wider).copied().unwrap_or(0) & r.access;
            if wider != key && shared != 0 {
                let verb = if r.allow { "allowed" } else { "denied" };
                return Err(format!(
                    "{} {} cannot be {verb} inside the wider rule {} {} (cgroup v1 cannot punch \
                     a hole in a wildcard rule, and runc refuses it)",
                    describe(r.kind, r.major, r.minor),
                    access_text(r.access),
                    describe(wider.0, wider.1, wider.2),
                    access_text(shared),
                ));
            }
        }
        if let Some(bits) = self.exceptions.get_mut(&key) {
            *bits &= !r.access;
            if *bits == 0 {
                self.exceptions.remove(&key);
            }
        }
        Ok(())
    }

    /// The result as rules for the guest: None when everything is allowed.
    fn rules(&self) -> Option<Vec<DeviceRule>> {
        if self.default_allow && self.exceptions.is_empty() {
            return None;
        }
        let start = (!self.default_allow).then(|| DeviceRule {
            allow: false,
            kind: DeviceType::All,
            major: None,
            minor: None,
            access: "rwm".into(),
        });
        let exceptions = self
            .exceptions
            .iter()
            .map(|(&(kind, major, minor), &bits)| DeviceRule {
                allow: !self.default_allow,
                kind,
                major,
                minor,
                access: access_text(bits),
            });
        Some(start.into_iter().chain(exceptions).collect())
    }
}

/// A number of a rule: absent or -1 is any.
fn number(n: Option<i64>) -> Result<Option<u32>, ()> {
    match n {
        None | Some(-1) => Ok(None),
        Some(n) => u32::try_from(n).map(Some).map_err(|_| ()),
    }
}

/// The bundle's rule `i`, or what is wrong with it.
fn bundle_rule(d: &oci_spec::runtime::LinuxDeviceCgroup) -> Result<Rule, String> {
    let kind = match d.typ() {
        None | Some(LinuxDeviceType::A) => DeviceType::All,
        Some(LinuxDeviceType::C) => DeviceType::Char,
        Some(LinuxDeviceType::B) => DeviceType::Block,
        Some(other) => {
            return Err(format!(
                "type {:?} is not one of a, c and b",
                other.as_str()
            ))
        }
    };
    let access = d.access().as_deref().unwrap_or("");
    if access.is_empty() {
        return Err("access is empty; give a subset of \"rwm\" (runc refuses it too)".into());
    }
    let Some(access) = access_bits(access) else {
        return Err(format!("access {access:?} is not a subset of \"rwm\""));
    };
    let (Ok(major), Ok(minor)) = (number(d.major()), number(d.minor())) else {
        return Err(format!(
            "major {:?} or minor {:?} is neither a device number nor -1 (any)",
            d.major(),
            d.minor()
        ));
    };
    Ok(Rule {
        allow: d.allow(),
        kind,
        major,
        minor,
        access,
    })
}

/// The device rules of the container, given the devices it is made:
/// None when it may use every device.
pub(crate) fn plan_device_rules(
    spec: &Spec,
    devices: &[DeviceSetup],
    problems: &mut Problems,
) -> Option<Vec<DeviceRule>> {
    let given = spec
        .linux()
        .as_ref()
        .and_then(|l| l.resources().as_ref())
        .and_then(|r| r.devices().as_ref());
    let mut emu = Emulator::new();
    let mut bad = false;
    for (i, d) in given.into_iter().flatten().enumerate() {
        let field = format!("linux.resources.devices[{i}]");
        match bundle_rule(d).and_then(|r| emu.apply(r)) {
            Ok(()) => {}
            Err(e) => {
                problems.add(field, e);
                bad = true;
            }
        }
    }
    let made = devices.iter().map(|d| {
        let kind = if d.block {
            DeviceType::Block
        } else {
            DeviceType::Char
        };
        (
            format!("linux.devices ({})", d.path),
            allow(kind, Some(d.major), Some(d.minor), RWM),
        )
    });
    let defaults = DEFAULT_ALLOWED
        .iter()
        .map(|r| ("linux.resources.devices".to_string(), *r));
    for (field, r) in made.chain(defaults) {
        if bad {
            break;
        }
        if let Err(e) = emu.apply(r) {
            problems.add(field, e);
            bad = true;
        }
    }
    emu.rules().filter(|_| !bad)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rule(allow: bool, kind: DeviceType, major: i64, minor: i64, access: &str) -> Rule {
        let n = |v: i64| u32::try_from(v).ok();
        Rule {
            allow,
            kind,
            major: n(major),
            minor: n(minor),
            access: access_bits(access).unwrap(),
        }
    }

    fn run(rules: &[Rule]) -> Result<Vec<String>, String> {
        let mut emu = Emulator::new();
        for r in rules {
            emu.apply(*r)?;
        }
        Ok(emu
            .rules()
            .unwrap_or_default()
            .iter()
            .map(|r| {
                let verb = if r.allow { "allow" } else { "deny" };
                format!("{verb} {} {}", describe(r.kind, r.major, r.minor), r.access)
            })
            .collect())
    }

    use DeviceType::{All, Block, Char};

    #[test]
    fn access_is_a_subset_of_rwm() {
        assert_eq!(access_bits("rwm"), Some(RWM));
        assert_eq!(access_bits("mr"), Some(READ | MKNOD));
        assert_eq!(access_bits(""), Some(0));
        assert_eq!(access_bits("rx"), None);
        assert_eq!(access_text(MKNOD | READ), "rm");
    }

    #[test]
    fn without_a_deny_everything_rule_nothing_is_restricted() {
        assert_eq!(run(&[]).unwrap(), Vec::<String>::new());
        assert_eq!(run(DEFAULT_ALLOWED).unwrap(), Vec::<String>::new());
        assert_eq!(
            run(&[rule(true, All, -1, -1, "rwm")]).unwrap(),
            Vec::<String>::new()
        );
    }

    #[test]
    fn deny_everything_then_allow_keeps_the_allowed_merged() {
        let rules = [
            rule(false, All, -1, -1, "rwm"),
            rule(true, Char, 1, 3, "r"),
            rule(true, Char, 1, 3, "w"),
            rule(true, Block, -1, -1, "m"),
            rule(false, Char, 1, 3, "w"),
        ];
        assert_eq!(
            run(&rules).unwrap(),
            ["deny a *:* rwm", "allow c 1:3 r", "allow b *:* m"]
        );
        // An `a` rule starts over, whatever its numbers and access.
        let again = [rules[1], rule(true, All, 5, 5, "r")];
        assert_eq!(run(&again).unwrap(), Vec::<String>::new());
    }

    #[test]
    fn deny_rules_over_the_allowing_start_are_exceptions() {
        let rules = [
            rule(false, Char, 10, 200, "rwm"),
            rule(true, Char, 10, 200, "m"),
            rule(false, Block, 7, -1, "rw"),
        ];
        assert_eq!(run(&rules).unwrap(), ["deny c 10:200 rw", "deny b 7:* rw"]);
    }

    #[test]
    fn a_hole_in_a_wildcard_rule_is_refused() {
        let e = run(&[
            rule(false, Char, -1, -1, "rwm"),
            rule(true, Char, 1, 3, "rw"),
        ])
        .unwrap_err();
        assert!(
            e.contains("c 1:3 rw cannot be allowed inside the wider rule c *:* rw"),
            "{e}"
        );
        let e = run(&[
            rule(false, All, -1, -1, "rwm"),
            rule(true, Char, 4, -1, "r"),
            rule(false, Char, 4, 1, "rw"),
        ])
        .unwrap_err();
        assert!(
            e.contains("c 4:1 rw cannot be denied inside the wider rule c 4:* r"),
            "{e}"
        );
        // Access the wildcard does not have is fine.
        run(&[
            rule(false, All, -1, -1, "rwm"),
            rule(true, Char, -1, -1, "m"),
            rule(false, Char, 4, 1, "rw"),
        ])
        .unwrap();
    }
}
