//! The control messages. Each travels as JSON in a [`FrameKind::Control`]
//! frame; the frame's stream number says which process a message is about.
//!
//! [`FrameKind::Control`]: crate::FrameKind::Control

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Messages from the host runtime to guest-init. A VM holds one container,
/// or the containers of a pod; a container is named by its id at create and
/// exec, and otherwise by the stream of its main process.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToGuest {
    /// Prepare the container (stream 0) up to the exec of its process.
    /// Answered with [`ToHost::Created`] or [`ToHost::Failed`].
    Create(Box<ContainerSetup>),
    /// Exec the prepared process of `stream`. Answered with
    /// [`ToHost::Started`] or [`ToHost::Failed`].
    Start,
    /// Run one more process in `container`, numbered by the frame's
    /// stream. It starts at once; answered like `Start`.
    Exec {
        container: String,
        process: Box<ProcessSetup>,
    },
    /// Deliver `signal` to the stream's process, or with `all` to every
    /// process of the container.
    Signal { signal: i32, all: bool },
    /// The stream's terminal changed size.
    Resize { rows: u16, cols: u16 },
    /// List the container's processes; answered with [`ToHost::Processes`].
    Ps,
    /// Report the container's resource use; answered with [`ToHost::Stats`].
    Stats,
    /// Change the container's cgroup limits; answered with
    /// [`ToHost::Updated`] or [`ToHost::Failed`].
    Update(CgroupSetup),
    /// Freeze (or thaw) every process of the stream's container, with its
    /// cgroup's freezer: `pause` of one container of a pod's VM. Answered
    /// with [`ToHost::Updated`] once the cgroup says it is so, or
    /// [`ToHost::Failed`].
    Freeze { frozen: bool },
    /// The host is done: flush and power the VM off.
    Shutdown,
    /// Get ready for the VM's capture (a checkpoint): write what the
    /// guest holds to its files (sync), answer [`ToHost::Quiesced`] and
    /// write nothing more (no output, no exit, no answer: they wait)
    /// until [`ToGuest::Resume`]. The channel is then between two frames
    /// both ways, as a capture and a restore onto a new channel need it.
    Quiesce,
    /// Go on after a capture, or after a restore: the clock set from the
    /// host's (`realtime_ns`, 0: unchanged) and the RNG reseeded with
    /// `entropy` (as at create), then what waited is written.
    Resume {
        realtime_ns: u64,
        #[serde(default)]
        entropy: Vec<u8>,
    },
}

/// Messages from guest-init to the host runtime.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToHost {
    /// First message on the channel, sent as soon as guest-init runs.
    Hello {
        version: u32,
        /// CLOCK_BOOTTIME when guest-init started, i.e. the kernel's boot time.
        init_started_ns: u64,
        /// CLOCK_BOOTTIME when this message was sent.
        sent_ns: u64,
    },
    /// The stream's process is ready to exec; `pid` is its pid in the guest.
    Created { pid: i32 },
    /// The stream's process was exec'd.
    Started { pid: i32 },
    /// The stream's process could not be created or started. `code` is the
    /// exit status the runtime reports (126: not executable, 127: not found,
    /// 1 otherwise); `message` says what went wrong.
    Failed { code: i32, message: String },
    /// The stream's process exited and all its output has been sent.
    Exited { status: ExitStatus },
    /// The container's memory limit was hit and the kernel killed a process.
    Oom,
    /// The stream's process took `bytes` more bytes of its stdin (or they
    /// were dropped, its stdin being closed): the host may send as many
    /// more. See [`crate::STDIN_WINDOW`].
    StdinTaken { bytes: u64 },
    /// In answer to [`ToGuest::Quiesce`]: the last frame until the host
    /// says [`ToGuest::Resume`].
    Quiesced,
    /// The container's processes, in answer to [`ToGuest::Ps`].
    Processes { processes: Vec<ProcessInfo> },
    /// The cgroup limits were changed.
    Updated,
    /// The container's resource use, in answer to [`ToGuest::Stats`].
    Stats(CgroupStats),
    /// guest-init itself cannot go on; the VM powers off after this.
    Fatal { message: String },
}

/// One process of the container, as `ps` shows it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessInfo {
    /// Pid in the container's pid namespace.
    pub pid: i32,
    pub ppid: i32,
    pub uid: u32,
    /// One-letter state (R, S, D, Z, T...).
    pub state: String,
    /// Seconds since the guest booted when the process started.
    pub start_secs: u64,
    /// CPU time used, in seconds.
    pub cpu_secs: u64,
    /// The command line, arguments separated by spaces.
    pub cmd: String,
}

/// What the container's cgroup in the guest has used.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupStats {
    pub cpu_usage_usec: u64,
    pub cpu_user_usec: u64,
    pub cpu_system_usec: u64,
    pub memory_usage: u64,
    /// u64::MAX when unlimited.
    pub memory_limit: u64,
    pub memory_anon: u64,
    pub memory_file: u64,
    pub pids_current: u64,
    /// 0 when unlimited.
    pub pids_limit: u64,
}

/// How a process ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ExitStatus {
    /// It called exit with this status.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl ExitStatus {
    /// The status as a shell (and `runc run`) reports it: the code, or 128+n.
    pub fn shell_code(self) -> i32 {
        match self {
            ExitStatus::Code(c) => c & 0xff,
            ExitStatus::Signal(s) => 128 + s,
        }
    }
}

/// The most random bytes a [`ContainerSetup`] carries.
pub const MAX_ENTROPY: usize = 512;

/// Everything guest-init needs to set up the container.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSetup {
    pub id: String,
    /// The host's wall clock when the message was built (ns since the epoch);
    /// the guest has no RTC and sets its clock from this.
    pub realtime_ns: u64,
    /// Random bytes from the host (its getrandom), credited to the guest
    /// kernel's RNG and reseeding it before anything of the container
    /// runs: a guest restored from a template shares its RNG state with
    /// every clone of that template until then, and a fresh one gets its
    /// RNG ready without waiting on its own entropy. At most
    /// [`MAX_ENTROPY`] bytes.
    #[serde(default)]
    pub entropy: Vec<u8>,
    pub hostname: Option<String>,
    pub domainname: Option<String>,
    /// Join the IPC and UTS namespaces of this (running) container instead of
    /// making new ones: the containers of a pod share them.
    #[serde(default)]
    pub share_with: Option<String>,
    /// The root filesystem: a virtio-fs tag.
    pub root: RootSetup,
    /// Mounts in the order the bundle lists them.
    pub mounts: Vec<MountSetup>,
    pub process: ProcessSetup,
    pub cgroup: CgroupSetup,
    pub sysctl: BTreeMap<String, String>,
    /// Paths hidden from the container (runtime-spec `linux.maskedPaths`).
    pub masked_paths: Vec<String>,
    /// Paths made read-only (runtime-spec `linux.readonlyPaths`).
    pub readonly_paths: Vec<String>,
    /// Device nodes made in the container (runtime-spec `linux.devices`),
    /// each one the guest kernel provides.
    #[serde(default)]
    pub devices: Vec<DeviceSetup>,
    /// The VM's network, carried in from the container's network namespace
    /// on the host; set by the container that boots the VM. None: the guest
    /// keeps loopback only.
    #[serde(default)]
    pub network: Option<NetworkSetup>,
    /// Run the container's processes in a user namespace of their own with
    /// these id maps (runtime-spec `linux.uidMappings`/`gidMappings`); the
    /// guest's initial namespace plays the host's part. None: no user
    /// namespace.
    #[serde(default)]
    pub user_ns: Option<UserNsSetup>,
    /// Which devices the container's processes may open and mknod (the
    /// runtime-spec `linux.resources.devices`, with the devices the
    /// container is given and runc's default ones): enforced by a cgroup
    /// device program on the container's cgroup from before its process
    /// runs. None: no restriction.
    #[serde(default)]
    pub device_rules: Option<Vec<DeviceRule>>,
}

/// One device cgroup rule. The rules of a container are read in order over
/// a start that allows everything, and the last one that matches a request
/// decides it: a rule of type [`DeviceType::All`] matches every request
/// (whatever its numbers and access), an allow rule one whose access it
/// covers entirely, a deny rule one whose access it shares a letter with.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRule {
    pub allow: bool,
    #[serde(rename = "type")]
    pub kind: DeviceType,
    /// None: any major.
    #[serde(default)]
    pub major: Option<u32>,
    /// None: any minor.
    #[serde(default)]
    pub minor: Option<u32>,
    /// A subset of "rwm": read, write, mknod.
    pub access: String,
}

/// The devices a [`DeviceRule`] is about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DeviceType {
    /// Every device: the rule says what is done with any request.
    #[serde(rename = "a")]
    All,
    #[serde(rename = "c")]
    Char,
    #[serde(rename = "b")]
    Block,
}

/// The id maps of the container's user namespace, as written to
/// `/proc/PID/uid_map` and `gid_map`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserNsSetup {
    pub uid_map: Vec<IdMap>,
    pub gid_map: Vec<IdMap>,
}

/// One line of an id map: `size` ids from `container` inside map to ids
/// from `host` outside.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct IdMap {
    pub container: u32,
    pub host: u32,
    pub size: u32,
}

impl UserNsSetup {
    /// The outside uid of `uid`, if the map covers it.
    pub fn host_uid(&self, uid: u32) -> Option<u32> {
        map_id(&self.uid_map, uid)
    }

    /// The outside gid of `gid`, if the map covers it.
    pub fn host_gid(&self, gid: u32) -> Option<u32> {
        map_id(&self.gid_map, gid)
    }
}

fn map_id(map: &[IdMap], id: u32) -> Option<u32> {
    map.iter().find_map(|m| {
        let off = id.checked_sub(m.container)?;
        (off < m.size).then(|| m.host.checked_add(off)).flatten()
    })
}

/// The text of a `/proc/PID/uid_map` (or `gid_map`) for `map`.
pub fn id_map_text(map: &[IdMap]) -> String {
    map.iter()
        .map(|m| format!("{} {} {}\n", m.container, m.host, m.size))
        .collect()
}

/// The guest's network: its interfaces and routes, as the host's network
/// namespace had them.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetworkSetup {
    pub interfaces: Vec<InterfaceSetup>,
    pub routes: Vec<RouteSetup>,
}

/// One virtio-net interface, found in the guest by its MAC address.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct InterfaceSetup {
    /// The name it had on the host (eth0, ...), which it gets in the guest.
    pub name: String,
    /// "aa:bb:cc:dd:ee:ff".
    pub mac: String,
    pub mtu: u32,
    /// Addresses with their prefix length: "10.88.0.5/16", "fd00::5/64".
    pub addresses: Vec<String>,
    /// In a VM started from a template: the MAC its card has in the
    /// guest (the template's), by which guest-init finds it and which it
    /// replaces with `mac`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub template_mac: Option<String>,
}

/// One route: `destination` is "default" or an address with its prefix.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RouteSetup {
    pub destination: String,
    pub gateway: Option<String>,
    /// The interface's name (of `interfaces`).
    pub interface: String,
    pub ipv6: bool,
}

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootSetup {
    pub tag: String,
    /// The root's path inside the share ("" for the share itself): the
    /// containers of a pod have their roots in one share.
    #[serde(default)]
    pub path: String,
    pub readonly: bool,
    /// `linux.rootfsPropagation` as MS_* flags (MS_UNBINDABLE, MS_SHARED,
    /// with MS_REC for the r- variants), applied to the container's `/`
    /// once it is its root; 0: left private.
    #[serde(default)]
    pub propagation: u64,
}

/// One mount inside the container, destination relative to its root.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MountSetup {
    pub destination: String,
    pub source: MountSource,
    /// MS_* flags (MS_RDONLY, MS_NOSUID, ...), as Linux numbers them.
    pub flags: u64,
    /// MS_* propagation flags applied after mounting (MS_PRIVATE, MS_REC, ...).
    pub propagation: u64,
    /// Filesystem-specific options (`mode=755,size=65536k`).
    pub data: String,
}

/// One device node of the container (runtime-spec `linux.devices`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSetup {
    /// Absolute path inside the container (`/dev/net/tun`).
    pub path: String,
    /// A block device; otherwise a character device.
    pub block: bool,
    pub major: u32,
    pub minor: u32,
    /// Permission bits (0o666 when the bundle gives none).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

/// Where a mount comes from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum MountSource {
    /// A filesystem the guest kernel makes (proc, sysfs, tmpfs, devpts,
    /// mqueue, cgroup2).
    Fs { fstype: String, source: String },
    /// A host path, reached through the virtio-fs share `tag`; `path` is the
    /// path inside the share ("" for its top). `file` says whether it is a
    /// regular file rather than a directory.
    Share {
        tag: String,
        path: String,
        file: bool,
    },
}

/// The process to run, already resolved to numbers where Linux uses numbers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProcessSetup {
    pub args: Vec<String>,
    pub env: Vec<String>,
    pub cwd: String,
    pub terminal: bool,
    /// Initial terminal size (rows, cols).
    pub console_size: Option<(u16, u16)>,
    pub uid: u32,
    pub gid: u32,
    pub additional_gids: Vec<u32>,
    pub umask: Option<u32>,
    pub rlimits: Vec<Rlimit>,
    /// None: keep every capability (root's full set).
    pub capabilities: Option<Capabilities>,
    pub no_new_privileges: bool,
    pub oom_score_adj: Option<i32>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Rlimit {
    /// RLIMIT_* number.
    pub resource: u32,
    pub soft: u64,
    pub hard: u64,
}

/// Capability sets by name (`CAP_CHOWN`, ...).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Capabilities {
    pub bounding: Vec<String>,
    pub effective: Vec<String>,
    pub inheritable: Vec<String>,
    pub permitted: Vec<String>,
    pub ambient: Vec<String>,
}

/// Limits applied to the container's cgroup inside the guest.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CgroupSetup {
    pub memory_max: Option<u64>,
    pub pids_max: Option<i64>,
    /// cpu.max as (quota, period) in microseconds.
    pub cpu_max: Option<(i64, u64)>,
    pub cpu_weight: Option<u64>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_have_a_stable_json_shape() {
        let m = ToHost::Exited {
            status: ExitStatus::Signal(9),
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"exited","status":{"signal":9}}"#
        );
        let m = ToGuest::Signal {
            signal: 15,
            all: false,
        };
        assert_eq!(
            serde_json::to_string(&m).unwrap(),
            r#"{"type":"signal","signal":15,"all":false}"#
        );
        let back: ToGuest = serde_json::from_str(r#"{"type":"start"}"#).unwrap();
        assert_eq!(back, ToGuest::Start);
        let rules = [
            DeviceRule {
                allow: false,
                kind: DeviceType::All,
                major: None,
                minor: None,
                access: "rwm".into(),
            },
            DeviceRule {
                allow: true,
                kind: DeviceType::Block,
                major: Some(7),
                minor: None,
                access: "m".into(),
            },
        ];
        assert_eq!(
            serde_json::to_string(&rules).unwrap(),
            r#"[{"allow":false,"type":"a","major":null,"minor":null,"access":"rwm"},"#.to_owned()
                + r#"{"allow":true,"type":"b","major":7,"minor":null,"access":"m"}]"#
        );
        let back: DeviceRule =
            serde_json::from_str(r#"{"allow":true,"type":"c","access":"r"}"#).unwrap();
        assert_eq!(
            (back.kind, back.major, back.minor),
            (DeviceType::Char, None, None)
        );
    }

    #[test]
    fn a_setup_without_device_rules_still_parses() {
        let mut json = serde_json::to_value(ContainerSetup::default()).unwrap();
        json.as_object_mut().unwrap().remove("device_rules");
        let back: ContainerSetup = serde_json::from_value(json).unwrap();
        assert_eq!(back.device_rules, None);
    }

    #[test]
    fn shell_codes_follow_runc() {
        assert_eq!(ExitStatus::Code(42).shell_code(), 42);
        assert_eq!(ExitStatus::Code(256 + 3).shell_code(), 3);
        assert_eq!(ExitStatus::Signal(9).shell_code(), 137);
    }

    #[test]
    fn setup_roundtrips() {
        let setup = ContainerSetup {
            id: "c1".into(),
            mounts: vec![MountSetup {
                destination: "/data".into(),
                source: MountSource::Share {
                    tag: "s1".into(),
                    path: "".into(),
                    file: false,
                },
                flags: 1,
                propagation: 0,
                data: String::new(),
            }],
            ..Default::default()
        };
        let msg = ToGuest::Create(Box::new(setup));
        let json = serde_json::to_vec(&msg).unwrap();
        assert_eq!(serde_json::from_slice::<ToGuest>(&json).unwrap(), msg);
    }

    #[test]
    fn ids_map_through_the_lines_that_cover_them() {
        let ns = UserNsSetup {
            uid_map: vec![
                IdMap {
                    container: 0,
                    host: 100000,
                    size: 1000,
                },
                IdMap {
                    container: 5000,
                    host: 7,
                    size: 1,
                },
            ],
            gid_map: vec![IdMap {
                container: 0,
                host: u32::MAX - 1,
                size: 10,
            }],
        };
        assert_eq!(ns.host_uid(0), Some(100000));
        assert_eq!(ns.host_uid(999), Some(100999));
        assert_eq!(ns.host_uid(1000), None);
        assert_eq!(ns.host_uid(5000), Some(7));
        assert_eq!(ns.host_gid(1), Some(u32::MAX));
        assert_eq!(ns.host_gid(2), None);
        assert_eq!(id_map_text(&ns.uid_map), "0 100000 1000\n5000 7 1\n");
    }
}
