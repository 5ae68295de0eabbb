//! VM templates (issue #15): a VM of the built-in VMM booted once to the
//! point where guest-init waits for its container, captured to a file,
//! and restored for each container of the same shape instead of a boot.
//!
//! # Where, and what a template is keyed by
//! Templates live in [`DEFAULT_DIR`] (or `$KRUN_OCI_TEMPLATE_DIR`), a
//! directory only root reaches (0700): `<key>.snap` the snapshot,
//! `<key>.ok` the stamp of its verification, `<key>.json` what it was
//! built from (shape and input paths), `<key>.lock` the lock its
//! builders take. The key is a hash of everything a restored VM must
//! share with its template: the snapshot format, the vCPUs and memory,
//! the device set (one share, no network), the kernel command line and
//! the identity of the kernel, the initramfs (which is guest-init) and
//! the runtime's own binary (its device model): device, inode, size,
//! modification and change times, so that any rewrite (or a `touch`) of
//! any of them makes a new key and so a new template, without reading
//! them through on every start.
//!
//! # Build once, verify once
//! The first `create` or `run` of a shape builds it in its own process,
//! before the container's cgroup is made ([`prepare`]: the build is the
//! runtime's work, not the container's). It takes the lock (an exclusive
//! `flock`; a concurrent start of the same shape waits for it, then finds
//! the template), boots a VM with an empty share, waits for guest-init's
//! hello, asks the VMM to capture (see `krun_vmm::process`), verifies the
//! file whole (its SHA-256) and renames it into place: a template file is
//! never written again. A file found without a stamp, or whose stamp
//! names another inode, size or times, is verified whole before use;
//! one that fails is removed and built again, never booted. Once
//! verified, a start checks the stamp and the file's shape, not its
//! checksum (a pass over the pages the guest wrote).
//!
//! # What a start does not take from its template
//! Each start reseeds the guest's RNG, sets its clock, hostname and
//! container (the container's set-up, as after a boot). Clones of one
//! template share the guest kernel's KASLR layout; `boot_id` is made at
//! its first read, after the reseed, so each has its own;
//! see the README.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use krun_hypervisor::{CappedLog, Hypervisor, NetDevice, Share, SnapshotIo, VmConfig, VmExit};
use krun_proto::{FrameKind, FrameReader, ToHost, CONTROL_PORT_NAME, PROTOCOL_VERSION};
use krun_vmm::snapshot::{Snapshot, FORMAT_VERSION};
use sha2::{Digest, Sha256};

use crate::assets::Assets;
use crate::plan::VmPlan;

/// Where templates are kept.
pub const DEFAULT_DIR: &str = "/var/lib/krun-oci/templates";
/// Operator knob: another directory for templates.
pub const DIR_VAR: &str = "KRUN_OCI_TEMPLATE_DIR";
/// Operator knob: `0` (or `false`, `off`, `no`) boots every VM cold
/// unless its bundle asks for a template (`io.krun-oci.template=true`).
pub const ENABLE_VAR: &str = "KRUN_OCI_TEMPLATES";
/// How long a template's boot may take to reach guest-init's hello.
const BOOT_TIMEOUT: Duration = crate::session::BOOT_TIMEOUT;
/// How long a start waits for another's build of the same template.
const LOCK_TIMEOUT: Duration = Duration::from_secs(180);

/// Why a template could not be had (the start then boots cold, saying so).
#[derive(Debug, thiserror::Error)]
pub enum TemplateError {
    #[error("{what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{} is not a directory only root can reach", .0.display())]
    Unsafe(PathBuf),
    #[error("another start has been building this template for {0:?}")]
    Busy(Duration),
    #[error("starting the template's VM")]
    Start(#[source] krun_hypervisor::Error),
    #[error("the template's guest: {0}")]
    Guest(String),
    #[error("the captured template")]
    Snapshot(#[source] krun_vmm::snapshot::SnapshotError),
}

fn io(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> TemplateError {
    let path = path.to_path_buf();
    move |source| TemplateError::Io { what, path, source }
}

/// Whether templates are on for this process (`KRUN_OCI_TEMPLATES`).
pub fn enabled_by_env() -> bool {
    !std::env::var(ENABLE_VAR).is_ok_and(|v| matches!(v.trim(), "0" | "false" | "off" | "no"))
}

/// The templates' directory.
pub fn dir() -> PathBuf {
    std::env::var_os(DIR_VAR)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The shape of a VM, as a template is keyed by it.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Shape {
    pub vcpus: u32,
    pub memory_mib: u64,
    pub cmdline: String,
    /// Network cards (each restored onto the container's tap).
    pub nets: usize,
}

/// The MAC of network card `i` of a template: what the guest's driver
/// read at the build, by which guest-init finds the card in a clone
/// (before giving it the container's). Locally administered, unicast.
pub fn builder_mac(i: usize) -> String {
    format!("02:6b:72:00:00:{:02x}", (i + 1) % 256)
}

/// A file's identity: any rewrite or touch changes it.
fn identity(path: &Path) -> Result<String, TemplateError> {
    let m = std::fs::metadata(path).map_err(io("reading the metadata of", path))?;
    Ok(format!(
        "{}:{}:{}:{}.{}:{}.{}",
        m.dev(),
        m.ino(),
        m.size(),
        m.mtime(),
        m.mtime_nsec(),
        m.ctime(),
        m.ctime_nsec()
    ))
}

/// The key of the template for `shape` with these boot inputs (and this
/// runtime binary).
pub fn key(shape: &Shape, kernel: &Path, initrd: &Path) -> Result<String, TemplateError> {
    key_of(&Inputs::now(shape, kernel, initrd)?)
}

/// What a template was built from: its shape and the paths of its boot
/// inputs, kept beside it (`<key>.json`) so that a template whose inputs
/// have since changed can be told and removed.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Inputs {
    pub shape: Shape,
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
    /// The runtime binary (its device model and guest protocol).
    pub runtime: PathBuf,
}

impl Inputs {
    /// `shape` with these boot inputs and this runtime binary.
    fn now(shape: &Shape, kernel: &Path, initrd: &Path) -> Result<Inputs, TemplateError> {
        let exe = std::fs::read_link("/proc/self/exe")
            .map_err(io("resolving", Path::new("/proc/self/exe")))?;
        Ok(Inputs {
            shape: shape.clone(),
            kernel: kernel.to_path_buf(),
            initramfs: initrd.to_path_buf(),
            runtime: exe,
        })
    }
}

/// The key of a template built from `inputs` as they are now (an input
/// gone is an error).
fn key_of(inputs: &Inputs) -> Result<String, TemplateError> {
    let (shape, kernel, initrd, exe) = (
        &inputs.shape,
        &inputs.kernel,
        &inputs.initramfs,
        &inputs.runtime,
    );
    let inputs = serde_json::json!({
        "format": FORMAT_VERSION,
        "protocol": PROTOCOL_VERSION,
        "shape": shape,
        "devices": "console,virtio-fs rootfs,virtio-net per net,balloon",
        "port": CONTROL_PORT_NAME,
        "kernel": identity(kernel)?,
        "initramfs": identity(initrd)?,
        "runtime": identity(exe)?,
    });
    let digest = Sha256::digest(inputs.to_string().as_bytes());
    Ok(digest[..16].iter().map(|b| format!("{b:02x}")).collect())
}

/// Whether `plan`'s VM starts from a template on `hv`: the built-in VMM,
/// and templates not turned off (`io.krun-oci.template=false`,
/// `--no-template`, or `KRUN_OCI_TEMPLATES=0` without
/// `io.krun-oci.template=true`).
fn wanted(hv: &dyn Hypervisor, plan: &VmPlan) -> bool {
    plan.template.unwrap_or_else(enabled_by_env) && hv.name() == "builtin"
}

fn shape(plan: &VmPlan, nets: usize) -> Shape {
    Shape {
        vcpus: plan.vcpus,
        memory_mib: plan.memory_mib,
        cmdline: crate::session::CMDLINE.into(),
        nets,
    }
}

/// The template `plan`'s VM starts from, if it does (see [`wanted`]),
/// found or built. One that cannot be had is a warning and a cold boot,
/// never a failed start.
pub fn for_vm(
    hv: &dyn Hypervisor,
    plan: &VmPlan,
    assets: &Assets,
    nets: usize,
) -> Option<Template> {
    if !wanted(hv, plan) {
        return None;
    }
    let started = Instant::now();
    match obtain(hv, &shape(plan, nets), assets) {
        Ok(t) => {
            tracing::debug!(template = %t.key, built = t.built, took = ?started.elapsed(), "starting from a VM template");
            Some(t)
        }
        Err(e) => {
            tracing::warn!("no VM template, booting cold: {}", chain(&e));
            None
        }
    }
}

/// Builds the template `plan`'s VM will start from if there is none yet,
/// here, in the process of `create` or `run` before it joins the
/// container's cgroup: the build is the runtime's work, not to be charged
/// to the first container of a shape (its CPU and memory). Quick when the
/// template is there (a stat and the stamp); whether the VM carries a
/// network is asked of its namespace only when it is not.
pub fn prepare(hv: &dyn Hypervisor, plan: &VmPlan, assets: &Assets) {
    if !wanted(hv, plan) {
        return;
    }
    // Whether the template of that many network cards is there, verified.
    let there = |nets| {
        let Ok(key) = key(&shape(plan, nets), &assets.kernel, &assets.initrd) else {
            return false;
        };
        let dir = dir();
        let (snap, stamp) = (
            dir.join(format!("{key}.snap")),
            dir.join(format!("{key}.ok")),
        );
        matches!(verified(&snap, &stamp), Ok(Some(_)))
    };
    if plan.netns.is_none() && there(0) {
        return;
    }
    // The VM carries the namespace's first Ethernet interface, if any.
    let nets = match &plan.netns {
        None => 0,
        Some(netns) => match crate::net::read(netns) {
            Ok(None) => 0,
            Ok(Some(_)) => 1,
            // The monitor says why when it carries it.
            Err(_) => return,
        },
    };
    if plan.netns.is_some() && there(nets) {
        return;
    }
    let shape = shape(plan, nets);
    if let Err(e) = obtain(hv, &shape, assets) {
        tracing::warn!("no VM template: {}", chain(&e));
    }
}

pub(crate) use krun_hypervisor::error_chain as chain;

/// A template ready to restore from: its file open for reading.
pub struct Template {
    pub file: File,
    pub key: String,
    /// Whether this start built it.
    pub built: bool,
}

/// The template for `shape`: found, verified and returned; or built
/// first (booting a VM of `hv`, the built-in VMM) when there is none or
/// the one there fails its verification. `run_dir` is the caller's
/// private directory, for the build's VMM.
pub fn obtain(
    hv: &dyn Hypervisor,
    shape: &Shape,
    assets: &Assets,
) -> Result<Template, TemplateError> {
    let dir = dir();
    ensure_dir(&dir)?;
    let inputs = Inputs::now(shape, &assets.kernel, &assets.initrd)?;
    let key = key_of(&inputs)?;
    let snap = dir.join(format!("{key}.snap"));
    let stamp = dir.join(format!("{key}.ok"));
    // Fast path, no lock: a verified template whose stamp still holds.
    if let Some(file) = verified(&snap, &stamp)? {
        return Ok(Template {
            file,
            key,
            built: false,
        });
    }
    let _lock = lock(&dir.join(format!("{key}.lock")))?;
    // Another start may have built or verified it while we waited.
    if let Some(file) = verified(&snap, &stamp)? {
        return Ok(Template {
            file,
            key,
            built: false,
        });
    }
    if snap.exists() {
        match Snapshot::read(&snap) {
            Ok(_) => {
                write_record(&dir, &key, &inputs)?;
                write_stamp(&snap, &stamp)?;
                if let Some(file) = verified(&snap, &stamp)? {
                    return Ok(Template {
                        file,
                        key,
                        built: false,
                    });
                }
            }
            Err(e) => {
                tracing::warn!(template = %snap.display(), error = %e, "a template failed its verification: removed, building it again");
            }
        }
        let _ = std::fs::remove_file(&stamp);
        std::fs::remove_file(&snap).map_err(io("removing", &snap))?;
    }
    let started = Instant::now();
    let (boot, capture) = build(hv, shape, assets, &dir, &key, &snap)?;
    let verifying = Instant::now();
    Snapshot::read(&snap).map_err(TemplateError::Snapshot)?;
    let verify = verifying.elapsed();
    write_record(&dir, &key, &inputs)?;
    write_stamp(&snap, &stamp)?;
    tracing::info!(
        template = %snap.display(),
        took = ?started.elapsed(),
        ?boot,
        ?capture,
        ?verify,
        "built a VM template"
    );
    let file = verified(&snap, &stamp)?
        .ok_or_else(|| TemplateError::Guest("the template vanished after its build".into()))?;
    // A new template is when an old one may have been replaced: a new
    // runtime, kernel or guest-init leaves the old templates stale.
    for gone in prune(&dir, false, Some(&key)) {
        tracing::info!(template = %gone.key, "removed a stale VM template");
    }
    Ok(Template {
        file,
        key,
        built: true,
    })
}

/// Creates `dir` (0700) if needed and checks it is root's and no one
/// else's: a template is guest memory the runtime maps into every clone.
fn ensure_dir(dir: &Path) -> Result<(), TemplateError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(io("creating", dir))?;
    check_dir(dir)
}

/// Checks that `dir` is a directory of this user's that no one else can
/// reach (not a symlink to one).
pub fn check_dir(dir: &Path) -> Result<(), TemplateError> {
    let m = std::fs::symlink_metadata(dir).map_err(io("reading the metadata of", dir))?;
    // SAFETY: geteuid has no preconditions.
    let me = unsafe { libc::geteuid() };
    if !m.is_dir() || m.uid() != me || m.permissions().mode() & 0o077 != 0 {
        return Err(TemplateError::Unsafe(dir.to_path_buf()));
    }
    Ok(())
}

/// The template at `snap`, open, if `stamp` says it was verified as the
/// file it is now (same inode, size and times).
fn verified(snap: &Path, stamp: &Path) -> Result<Option<File>, TemplateError> {
    let file = match OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(snap)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(io("opening", snap)(e)),
    };
    let Ok(said) = std::fs::read_to_string(stamp) else {
        return Ok(None);
    };
    // The identity of the open file, not of the path.
    let now = identity(Path::new(&format!("/proc/self/fd/{}", file.as_raw_fd())))?;
    Ok((said.trim() == now).then_some(file))
}

fn write_stamp(snap: &Path, stamp: &Path) -> Result<(), TemplateError> {
    write_file(stamp, identity(snap)?.as_bytes())
}

/// Writes what template `key` was built from beside it (`<key>.json`).
fn write_record(dir: &Path, key: &str, inputs: &Inputs) -> Result<(), TemplateError> {
    let json = serde_json::to_vec(inputs).expect("a template's inputs serialize");
    write_file(&dir.join(format!("{key}.json")), &json)
}

/// Writes `bytes` to `path` whole or not at all: into a fresh file (0600)
/// renamed into place.
fn write_file(path: &Path, bytes: &[u8]) -> Result<(), TemplateError> {
    let mut name = path.file_name().unwrap_or_default().to_os_string();
    name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(name);
    let mut f = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&tmp)
        .map_err(io("creating", &tmp))?;
    if let Err(e) = f.write_all(bytes) {
        let _ = std::fs::remove_file(&tmp);
        return Err(io("writing", &tmp)(e));
    }
    std::fs::rename(&tmp, path).map_err(io("renaming into place", path))
}

/// Whether a template is still the one its shape would get.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Standing {
    /// Its inputs are as they were at its build.
    Current,
    /// An input changed or is gone (the reason): no start will use it.
    Stale(String),
}

/// A template in the directory, as `template list` shows it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Listed {
    pub key: String,
    /// What it was built from; None for a file with no record of it.
    pub inputs: Option<Inputs>,
    /// Bytes it takes on disk (guest memory's zero pages are holes).
    pub disk_bytes: u64,
    pub standing: Standing,
}

/// The templates in `dir`, by key.
pub fn list(dir: &Path) -> Vec<Listed> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<Listed> = entries
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let key = name.strip_suffix(".snap")?.to_string();
            // Only names a template can have: a key of hex digits.
            if key.is_empty() || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                return None;
            }
            let disk_bytes = e.metadata().map(|m| m.blocks() * 512).unwrap_or(0);
            let inputs: Option<Inputs> = std::fs::read(dir.join(format!("{key}.json")))
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            let standing = match &inputs {
                None => Standing::Stale("no record of what it was built from".into()),
                Some(i) => match key_of(i) {
                    Ok(k) if k == key => Standing::Current,
                    Ok(_) => Standing::Stale("an input changed since its build".into()),
                    Err(e) => Standing::Stale(chain(&e)),
                },
            };
            Some(Listed {
                key,
                inputs,
                disk_bytes,
                standing,
            })
        })
        .collect();
    out.sort_by(|a, b| a.key.cmp(&b.key));
    out
}

/// Removes the stale templates in `dir` (every one with `all`), but not
/// `keep` and not one whose lock another process holds (a build, or a
/// start verifying it); returns those removed. A clone running from a
/// removed template keeps its mapping of the file.
pub fn prune(dir: &Path, all: bool, keep: Option<&str>) -> Vec<Listed> {
    let mut removed = Vec::new();
    for t in list(dir) {
        if keep == Some(t.key.as_str()) || (!all && t.standing == Standing::Current) {
            continue;
        }
        let lock_path = dir.join(format!("{}.lock", t.key));
        let Ok(Some(_held)) = try_lock(&lock_path) else {
            continue;
        };
        let mut gone = true;
        for ext in ["ok", "snap", "json"] {
            match std::fs::remove_file(dir.join(format!("{}.{ext}", t.key))) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(_) => gone = false,
            }
        }
        if gone {
            // Under the lock: no one else holds it, and no one will look
            // for a stale key again (its inputs' times have moved on).
            let _ = std::fs::remove_file(&lock_path);
            removed.push(t);
        }
    }
    // A builder killed mid-build leaves its directory; one whose key's
    // lock is free is dead (a live builder holds it).
    if let Ok(entries) = std::fs::read_dir(dir) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let Some(key) = name
                .strip_prefix("build-")
                .and_then(|r| r.rsplit_once('-'))
                .map(|(k, _)| k.to_string())
            else {
                continue;
            };
            if keep == Some(key.as_str()) || !key.bytes().all(|b| b.is_ascii_hexdigit()) {
                continue;
            }
            let lock_path = dir.join(format!("{key}.lock"));
            if let Ok(Some(_held)) = try_lock(&lock_path) {
                let _ = std::fs::remove_dir_all(e.path());
                if !dir.join(format!("{key}.snap")).exists() {
                    let _ = std::fs::remove_file(&lock_path);
                }
            }
        }
    }
    removed
}

/// An exclusive lock on `path`, held while the returned file is open.
fn lock(path: &Path) -> Result<File, TemplateError> {
    let started = Instant::now();
    loop {
        if let Some(f) = try_lock(path)? {
            return Ok(f);
        }
        if started.elapsed() > LOCK_TIMEOUT {
            return Err(TemplateError::Busy(LOCK_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The exclusive lock on `path` if no one else holds it.
fn try_lock(path: &Path) -> Result<Option<File>, TemplateError> {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(io("opening the lock", path))?;
    // SAFETY: flock on a descriptor this function owns.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(f));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
        return Ok(None);
    }
    Err(io("locking", path)(e))
}

/// Removes a directory tree when dropped.
struct BuildDir(PathBuf);

impl Drop for BuildDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Boots the template's VM and has it captured into `snap`; returns how
/// long the boot to guest-init's hello and the capture took.
fn build(
    hv: &dyn Hypervisor,
    shape: &Shape,
    assets: &Assets,
    dir: &Path,
    key: &str,
    snap: &Path,
) -> Result<(Duration, Duration), TemplateError> {
    // Under the lock: any build directory of this key is a dead
    // builder's (killed mid-build), to be removed.
    if let Ok(entries) = std::fs::read_dir(dir) {
        let prefix = format!("build-{key}-");
        for e in entries.flatten() {
            if e.file_name().to_string_lossy().starts_with(&prefix) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    let work = BuildDir(dir.join(format!("build-{key}-{}", std::process::id())));
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&work.0)
        .map_err(io("creating", &work.0))?;
    let share = work.0.join("share");
    std::fs::DirBuilder::new()
        .mode(0o755)
        .create(&share)
        .map_err(io("creating", &share))?;
    // Under a fresh name; renamed into place once whole.
    let partial = work.0.join("template.snap");
    let file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&partial)
        .map_err(io("creating", &partial))?;
    let (host_end, vm_end) =
        UnixStream::pair().map_err(io("creating the control channel of", &work.0))?;
    let console_log = work.0.join("console.log");
    let (mut console, console_pipe) =
        CappedLog::create(&console_log, 1 << 20, "template console log")
            .map_err(io("creating", &console_log))?;
    let mut nets = Vec::with_capacity(shape.nets);
    for i in 0..shape.nets {
        let tap = crate::net::private_tap().map_err(|e| {
            TemplateError::Guest(format!("a tap for the template's network card: {e:#}"))
        })?;
        nets.push(NetDevice {
            tap,
            mac: builder_mac(i),
        });
    }
    let (request_r, mut request_w) =
        std::io::pipe().map_err(io("creating the capture request of", &work.0))?;
    let config = VmConfig {
        kernel: assets.kernel.clone(),
        initrd: assets.initrd.clone(),
        cmdline: shape.cmdline.clone(),
        vcpus: shape.vcpus,
        memory_mib: shape.memory_mib,
        shares: vec![Share {
            tag: krun_proto::SHARE_TAG.to_string(),
            path: share,
            readonly: false,
        }],
        control: vm_end.into(),
        control_port_name: CONTROL_PORT_NAME.into(),
        console: console_pipe,
        log_limit: 1 << 20,
        run_dir: work.0.clone(),
        nets,
        snapshot: Some(SnapshotIo::Capture {
            file: OwnedFd::from(file),
            request: OwnedFd::from(request_r),
            kernel: identity(&assets.kernel)?,
            initramfs: identity(&assets.initrd)?,
        }),
    };
    let mut vm = hv.start(config).map_err(TemplateError::Start)?;
    let tail = |console: &mut CappedLog| {
        console.finish(Duration::from_secs(1));
        crate::session::console_tail(&console_log).to_string()
    };
    let booting = Instant::now();
    if let Err(e) = await_hello(&host_end) {
        vm.kill();
        return Err(TemplateError::Guest(format!(
            "{e}; console: {}",
            tail(&mut console)
        )));
    }
    let boot = booting.elapsed();
    let capturing = Instant::now();
    request_w
        .write_all(&[1])
        .map_err(io("asking for the capture of", &work.0))?;
    match vm.wait().map_err(TemplateError::Start)? {
        VmExit::GuestStopped => {}
        other => {
            return Err(TemplateError::Guest(format!(
                "the capture failed: {other:?}; VMM log: {}",
                std::fs::read_to_string(work.0.join("vmm.log"))
                    .unwrap_or_default()
                    .trim()
            )))
        }
    }
    let capture = capturing.elapsed();
    drop(host_end);
    std::fs::rename(&partial, snap).map_err(io("renaming into place", snap))?;
    Ok((boot, capture))
}

/// Reads guest-init's hello from `host_end`, within [`BOOT_TIMEOUT`].
fn await_hello(host_end: &UnixStream) -> Result<(), String> {
    let deadline = Instant::now() + BOOT_TIMEOUT;
    let mut reader = FrameReader::new(host_end.try_clone().map_err(|e| e.to_string())?);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(format!("no hello from guest-init within {BOOT_TIMEOUT:?}"));
        }
        host_end
            .set_read_timeout(Some(left))
            .map_err(|e| e.to_string())?;
        let frame = match reader.read_frame() {
            Ok(Some(f)) => f,
            Ok(None) => return Err("the guest closed its control port".into()),
            Err(e) => return Err(format!("reading the control port: {e}")),
        };
        if frame.kind != FrameKind::Control {
            continue;
        }
        if let Ok(ToHost::Hello { version, .. }) = frame.message::<ToHost>() {
            if version != PROTOCOL_VERSION {
                return Err(format!(
                    "guest-init speaks protocol {version}, the runtime {PROTOCOL_VERSION}"
                ));
            }
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shape() -> Shape {
        Shape {
            vcpus: 1,
            memory_mib: 512,
            cmdline: "quiet".into(),
            nets: 0,
        }
    }

    #[test]
    fn the_key_changes_with_the_shape_and_with_any_rewrite_of_an_input() {
        let dir = tempfile::tempdir().unwrap();
        let (k, i) = (dir.path().join("vmlinux"), dir.path().join("initramfs"));
        std::fs::write(&k, b"kernel").unwrap();
        std::fs::write(&i, b"init").unwrap();
        let first = key(&shape(), &k, &i).unwrap();
        assert_eq!(first, key(&shape(), &k, &i).unwrap(), "stable");
        assert_eq!(first.len(), 32);
        let bigger = Shape {
            memory_mib: 1024,
            ..shape()
        };
        assert_ne!(first, key(&bigger, &k, &i).unwrap());
        let two = Shape {
            vcpus: 2,
            ..shape()
        };
        assert_ne!(first, key(&two, &k, &i).unwrap());
        let networked = Shape { nets: 1, ..shape() };
        assert_ne!(first, key(&networked, &k, &i).unwrap());
        // The same bytes written again: another change time, another key.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&i, b"init").unwrap();
        let rewritten = key(&shape(), &k, &i).unwrap();
        assert_ne!(first, rewritten);
        std::fs::write(&k, b"kernel2").unwrap();
        assert_ne!(rewritten, key(&shape(), &k, &i).unwrap());
        // A missing input is an error naming it.
        let e = key(&shape(), &dir.path().join("nope"), &i).unwrap_err();
        assert!(e.to_string().contains("nope"), "{e}");
    }

    #[test]
    fn a_stamp_holds_only_for_the_file_it_was_written_for() {
        let dir = tempfile::tempdir().unwrap();
        let (snap, stamp) = (dir.path().join("k.snap"), dir.path().join("k.ok"));
        assert!(verified(&snap, &stamp).unwrap().is_none(), "no file");
        std::fs::write(&snap, b"template").unwrap();
        assert!(verified(&snap, &stamp).unwrap().is_none(), "no stamp");
        write_stamp(&snap, &stamp).unwrap();
        assert!(verified(&snap, &stamp).unwrap().is_some());
        // Written in place: its times change, the stamp no longer holds.
        std::thread::sleep(Duration::from_millis(20));
        let f = OpenOptions::new().write(true).open(&snap).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"X", 3).unwrap();
        drop(f);
        assert!(verified(&snap, &stamp).unwrap().is_none());
        // Replaced by another file: another inode.
        write_stamp(&snap, &stamp).unwrap();
        std::fs::write(dir.path().join("new"), b"template").unwrap();
        std::fs::rename(dir.path().join("new"), &snap).unwrap();
        assert!(verified(&snap, &stamp).unwrap().is_none());
        // A symlink in its place is not followed.
        std::fs::remove_file(&snap).unwrap();
        std::os::unix::fs::symlink(&stamp, &snap).unwrap();
        assert!(verified(&snap, &stamp).is_err());
        // Nothing but the stamp and the template: no temporary left.
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["k.ok", "k.snap"]);
    }

    #[test]
    fn the_directory_must_be_this_users_alone() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("a/templates");
        ensure_dir(&t).unwrap();
        let m = std::fs::metadata(&t).unwrap();
        assert_eq!(m.permissions().mode() & 0o777, 0o700);
        ensure_dir(&t).unwrap();
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o755)).unwrap();
        let e = ensure_dir(&t).unwrap_err();
        assert!(matches!(e, TemplateError::Unsafe(_)), "{e}");
        let link = dir.path().join("link");
        std::os::unix::fs::symlink(&t, &link).unwrap();
        std::fs::set_permissions(&t, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(matches!(ensure_dir(&link), Err(TemplateError::Unsafe(_))));
    }

    #[test]
    fn one_builder_at_a_time_holds_the_lock() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.lock");
        let held = lock(&path).unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        let waiter = std::thread::spawn(move || {
            let l = lock(&p).unwrap();
            tx.send(()).unwrap();
            drop(l);
        });
        assert!(
            rx.recv_timeout(Duration::from_millis(200)).is_err(),
            "the second took the lock while the first held it"
        );
        drop(held);
        rx.recv_timeout(Duration::from_secs(5))
            .expect("the second gets it once the first lets go");
        waiter.join().unwrap();
    }

    /// A template file and its record for `inputs`, as a build leaves them.
    fn fake_template(dir: &Path, inputs: &Inputs) -> String {
        let key = key_of(inputs).unwrap();
        let snap = dir.join(format!("{key}.snap"));
        std::fs::write(&snap, b"template").unwrap();
        write_record(dir, &key, inputs).unwrap();
        write_stamp(&snap, &dir.join(format!("{key}.ok"))).unwrap();
        key
    }

    #[test]
    fn stale_templates_are_pruned_and_current_or_busy_ones_kept() {
        let inputs_dir = tempfile::tempdir().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path();
        let file = |name: &str| {
            let p = inputs_dir.path().join(name);
            std::fs::write(&p, name).unwrap();
            p
        };
        let (kernel, runtime) = (file("vmlinux"), file("krun-oci"));
        let inputs = |init: &Path| Inputs {
            shape: shape(),
            kernel: kernel.clone(),
            initramfs: init.to_path_buf(),
            runtime: runtime.clone(),
        };
        let (a, b, c) = (file("init-a"), file("init-b"), file("init-c"));
        let current = fake_template(dir, &inputs(&a));
        let stale = fake_template(dir, &inputs(&b));
        let busy = fake_template(dir, &inputs(&c));
        // A template with no record, a dead builder's directory, and
        // something that is no template.
        std::fs::write(dir.join("0123abcd.snap"), b"old").unwrap();
        std::fs::create_dir(dir.join(format!("build-{stale}-999"))).unwrap();
        std::fs::write(dir.join("notes.txt"), b"x").unwrap();
        // Two guest-inits rewritten since their templates were built.
        std::thread::sleep(Duration::from_millis(20));
        std::fs::write(&b, "init-b2").unwrap();
        std::fs::write(&c, "init-c2").unwrap();

        let listed = list(dir);
        let find = |k: &str| listed.iter().find(|t| t.key == k).unwrap();
        assert_eq!(listed.len(), 4, "{listed:?}");
        assert_eq!(find(&current).standing, Standing::Current);
        assert_eq!(find(&current).inputs.as_ref().unwrap().initramfs, a);
        assert!(matches!(find(&stale).standing, Standing::Stale(_)));
        assert!(matches!(find("0123abcd").standing, Standing::Stale(_)));
        assert!(find("0123abcd").inputs.is_none());

        // Another process (here: another open file) holds busy's lock.
        let held = lock(&dir.join(format!("{busy}.lock"))).unwrap();
        let removed: Vec<String> = prune(dir, false, None).into_iter().map(|t| t.key).collect();
        assert_eq!(removed.len(), 2, "{removed:?}");
        assert!(removed.contains(&stale) && removed.contains(&"0123abcd".to_string()));
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        let mut want = vec![
            format!("{busy}.json"),
            format!("{busy}.lock"),
            format!("{busy}.ok"),
            format!("{busy}.snap"),
            format!("{current}.json"),
            format!("{current}.ok"),
            format!("{current}.snap"),
            "notes.txt".to_string(),
        ];
        want.sort();
        assert_eq!(names, want);
        drop(held);
        // --all: the current one too, and busy now that it is free.
        let removed = prune(dir, true, None);
        assert_eq!(removed.len(), 2, "{removed:?}");
        let names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["notes.txt"]);
    }
}
