//! `checkpoint`: the whole VM of a running container captured into an
//! image directory, with runc's flags (the ones podman passes).
//!
//! What runc does with CRIU, the built-in VMM does by capturing its VM:
//! vCPUs, devices and guest memory, so every process in the container is
//! carried as it is. The image directory gets:
//!
//! - `krun-vm.snap`: the VM (the built-in VMM's snapshot file);
//! - `krun-checkpoint.json`: what `restore` needs besides (the container's
//!   id and state, the VM's boot inputs' hashes);
//! - `inventory.img`: the file podman looks for before a restore (CRIU's
//!   name; here a marker that names krun-oci's format);
//! - `dump.log`: what happened, for the user (CRIU's name, as runc's).
//!
//! Without `--leave-running` the container then ends (stopped, killed as
//! runc's checkpoint leaves it), its guest running no further instruction.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::fd::AsRawFd;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::Context;
use crate::api::Request;
use crate::container::Existing;
use crate::error::{Cause, Error, Result};
use crate::state::{State, Status};

/// The VM's capture in an image directory.
pub const SNAPSHOT: &str = "krun-vm.snap";
/// What `restore` needs besides the VM.
pub const RECORD: &str = "krun-checkpoint.json";
/// What podman looks for (CRIU's inventory).
pub const INVENTORY: &str = "inventory.img";
/// The log of the checkpoint.
pub const LOG: &str = "dump.log";

/// The image directory's format: a restore refuses any other.
pub const FORMAT: u32 = 1;

/// runc's `checkpoint` flags.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Where to write the checkpoint (created if need be; a checkpoint
    /// there before is replaced).
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Where to write the log (default: the image directory).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// Leave the container running after the checkpoint.
    #[arg(long, overrides_with = "leave_running")]
    pub leave_running: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Refused: no pre-dump (iterative) checkpoints.
    #[arg(long, overrides_with = "pre_dump")]
    pub pre_dump: bool,
    /// Refused: no parent checkpoint (pre-dump) to build on.
    #[arg(long)]
    pub parent_path: Option<PathBuf>,
    /// Refused: no page server.
    #[arg(long)]
    pub page_server: Option<String>,
    /// Refused: no status descriptor (lazy migration).
    #[arg(long)]
    pub status_fd: Option<i32>,
    pub container_id: String,
}

/// The flags `checkpoint` and `restore` share (CRIU's, through runc):
/// what a VM carries by itself is accepted, what it cannot do refused.
#[derive(clap::Args, Debug)]
pub struct CriuFlags {
    /// Refused: established TCP connections are not carried.
    #[arg(long, overrides_with = "tcp_established")]
    pub tcp_established: bool,
    /// Accepted: the VM carries its own sockets.
    #[arg(long, overrides_with = "ext_unix_sk")]
    pub ext_unix_sk: bool,
    /// Refused: a container with a terminal is never checkpointed.
    #[arg(long, overrides_with = "shell_job")]
    pub shell_job: bool,
    /// Accepted: file locks are the guest kernel's, in the VM.
    #[arg(long, overrides_with = "file_locks")]
    pub file_locks: bool,
    /// Refused: no lazy pages.
    #[arg(long, overrides_with = "lazy_pages")]
    pub lazy_pages: bool,
    /// Accepted, ignored: the host cgroup is made anew at restore.
    #[arg(long)]
    pub manage_cgroups_mode: Option<String>,
    /// Accepted, ignored: namespaces are the VM's.
    #[arg(long)]
    pub empty_ns: Vec<String>,
    /// Accepted, ignored.
    #[arg(long, overrides_with = "auto_dedup")]
    pub auto_dedup: bool,
}

impl CriuFlags {
    /// The first flag that asks for what a VM checkpoint does not do.
    fn refused(&self) -> Option<&'static str> {
        [
            (self.tcp_established, "--tcp-established: established TCP connections are not carried across a krun-oci checkpoint"),
            (self.shell_job, "--shell-job: a container with a terminal is never checkpointed"),
            (self.lazy_pages, "--lazy-pages: krun-oci has no lazy restore"),
        ]
        .into_iter()
        .find_map(|(set, why)| set.then_some(why))
    }
}

/// `krun-checkpoint.json`.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Record {
    pub format: u32,
    /// The host <-> guest protocol of the guest-init in the VM: a restore
    /// by a runtime speaking another is refused.
    pub protocol: u32,
    /// The container as it was checkpointed.
    pub state: State,
    /// Whether it went on running.
    pub leave_running: bool,
    /// When, RFC 3339.
    pub created: String,
    /// How long the capture took, in milliseconds.
    pub capture_ms: u64,
}

/// The flags that ask for what a VM checkpoint does not do: the first one
/// set, as runc names it.
fn refused(a: &Args) -> Option<&'static str> {
    a.criu.refused().or_else(|| {
        [
            (
                a.pre_dump,
                "--pre-dump: krun-oci has no iterative checkpoints",
            ),
            (
                a.parent_path.is_some(),
                "--parent-path: krun-oci has no iterative checkpoints",
            ),
            (
                a.page_server.is_some(),
                "--page-server: krun-oci has no page server",
            ),
            (
                a.status_fd.is_some(),
                "--status-fd: krun-oci has no lazy restore",
            ),
        ]
        .into_iter()
        .find_map(|(set, why)| set.then_some(why))
    })
}

pub fn checkpoint(ctx: &Context, a: &Args) -> Result<i32> {
    if let Some(why) = refused(a) {
        return Err(Error::Unsupported(why.into()));
    }
    let c = Existing::open(&ctx.root, &a.container_id)?;
    let _lock = c.dir.lock()?;
    let status = c.status();
    if status != Status::Running {
        return Err(Error::Status {
            action: "checkpoint",
            status,
        });
    }
    if c.state.member.is_some() {
        return Err(Error::Unsupported(
            "a container in another container's VM (a pod's) cannot be checkpointed".into(),
        ));
    }
    let image = &a.image_path;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(image)
        .map_err(|e| e.doing(format!("creating the image directory {}", image.display())))?;
    // Written beside, then renamed over what a checkpoint before left
    // (podman keeps one image directory per container, as CRIU
    // overwrites its images): a failure leaves that one whole, and a
    // rename replaces a link planted there rather than following it.
    let snap_path = image.join(SNAPSHOT);
    let snap_tmp = beside(&snap_path);
    let snap = new_file(&snap_tmp)?;
    let log_dir = a.work_path.as_deref().unwrap_or(image);
    let started = Instant::now();
    let captured = c.call_with_fds(
        &Request::Checkpoint {
            leave_running: a.leave_running,
        },
        &[snap.as_raw_fd()],
    );
    let took = started.elapsed();
    if let Err(e) = captured {
        drop(snap);
        let _ = std::fs::remove_file(&snap_tmp);
        let _ = write_log(log_dir, &format!("checkpoint of {} failed: {e}\n", c.id));
        return Err(e);
    }
    let record = Record {
        format: FORMAT,
        protocol: krun_proto::PROTOCOL_VERSION,
        state: c.state.clone(),
        leave_running: a.leave_running,
        created: crate::logging::rfc3339_now(),
        capture_ms: took.as_millis() as u64,
    };
    let json = serde_json::to_vec_pretty(&record)?;
    std::fs::rename(&snap_tmp, &snap_path)
        .map_err(|e| e.doing(format!("renaming {} into place", snap_tmp.display())))?;
    write_new(&image.join(RECORD), &json)?;
    write_new(
        &image.join(INVENTORY),
        format!("krun-oci checkpoint, format {FORMAT}: see {RECORD}\n").as_bytes(),
    )?;
    write_log(
        log_dir,
        &format!(
            "checkpoint of {}: VM captured in {} ms into {}{}\n",
            c.id,
            took.as_millis(),
            snap_path.display(),
            if a.leave_running {
                "; left running"
            } else {
                "; the container is stopped"
            }
        ),
    )?;
    if !a.leave_running {
        // The monitor ends the container once the VM is captured.
        c.wait_monitor_gone(std::time::Duration::from_secs(10));
    }
    Ok(0)
}

/// runc's `restore` flags.
#[derive(clap::Args, Debug)]
pub struct RestoreArgs {
    /// The checkpoint to restore (`checkpoint`'s image directory).
    #[arg(long, default_value = "checkpoint")]
    pub image_path: PathBuf,
    /// Where to write the log (default: the image directory).
    #[arg(long)]
    pub work_path: Option<PathBuf>,
    /// The bundle: its config.json and rootfs, as at the checkpoint.
    #[arg(short, long, default_value = ".")]
    pub bundle: PathBuf,
    /// Leave the container running and return (as conmon asks); without
    /// it, as `run`: wait for the container's end. Only detached is done.
    #[arg(short, long, overrides_with = "detach")]
    pub detach: bool,
    #[arg(long)]
    pub pid_file: Option<PathBuf>,
    /// Refused: a container with a terminal is never checkpointed.
    #[arg(long)]
    pub console_socket: Option<PathBuf>,
    /// Accepted: the monitor is the container's pid either way.
    #[arg(long, overrides_with = "no_subreaper")]
    pub no_subreaper: bool,
    /// Accepted: no pivot_root on the host either way.
    #[arg(long, overrides_with = "no_pivot")]
    pub no_pivot: bool,
    #[command(flatten)]
    pub criu: CriuFlags,
    /// Accepted, ignored: the VM is the boundary.
    #[arg(long)]
    pub lsm_profile: Option<String>,
    /// Accepted, ignored.
    #[arg(long)]
    pub lsm_mount_context: Option<String>,
    pub container_id: String,
}

/// The largest `krun-checkpoint.json` read: a container's state is a few
/// KiB (its annotations at most a few hundred).
const RECORD_MAX: u64 = 1 << 20;

/// Reads and checks an image directory's record (untrusted: the image
/// directory may have been exported and imported).
fn read_record(image: &Path) -> Result<Record> {
    let path = image.join(RECORD);
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .map_err(|e| {
            e.doing(format!(
                "{}: not a krun-oci checkpoint (reading its {RECORD})",
                image.display()
            ))
        })?;
    let mut bytes = Vec::new();
    std::io::Read::read_to_end(&mut std::io::Read::take(file, RECORD_MAX + 1), &mut bytes)
        .map_err(|e| e.doing(format!("reading {}", path.display())))?;
    if bytes.len() as u64 > RECORD_MAX {
        return Err(Error::Invalid(format!(
            "{}: larger than {RECORD_MAX} bytes",
            path.display()
        )));
    }
    let record: Record = serde_json::from_slice(&bytes)
        .map_err(|e| Error::Invalid(format!("{}: {e}", path.display())))?;
    if record.format != FORMAT {
        return Err(Error::Invalid(format!(
            "{}: checkpoint format {}; this krun-oci restores format {FORMAT}",
            path.display(),
            record.format
        )));
    }
    if record.protocol != krun_proto::PROTOCOL_VERSION {
        return Err(Error::Unsupported(format!(
            "{}: its guest-init speaks protocol {}, this krun-oci {}: restore it with the \
             krun-oci that checkpointed it",
            path.display(),
            record.protocol,
            krun_proto::PROTOCOL_VERSION
        )));
    }
    Ok(record)
}

pub fn restore(ctx: &Context, a: &RestoreArgs) -> Result<i32> {
    let why = a.criu.refused().or_else(|| {
        [
            (
                a.console_socket.is_some(),
                "--console-socket: a container with a terminal is never checkpointed",
            ),
            (
                !a.detach,
                "restore without --detach: krun-oci restores detached only (as conmon asks)",
            ),
        ]
        .into_iter()
        .find_map(|(set, why)| set.then_some(why))
    });
    if let Some(why) = why {
        return Err(Error::Unsupported(why.into()));
    }
    let image = &a.image_path;
    let record = read_record(image)?;
    // The VM knows the container by the checkpointed one's name (its
    // share's directory, guest-init's container), whatever this one's is.
    let guest_id = record
        .state
        .guest_id
        .clone()
        .unwrap_or_else(|| record.state.id.clone());
    // A name in the share: the record may come from anywhere.
    crate::state::validate_id(&guest_id).map_err(|e| {
        Error::Invalid(format!(
            "{}: the checkpointed container's name: {e}",
            image.join(RECORD).display()
        ))
    })?;
    let snap_path = image.join(SNAPSHOT);
    let snap = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&snap_path)
        .map_err(|e| e.doing(format!("opening {}", snap_path.display())))?;
    let log_dir = a.work_path.as_deref().unwrap_or(image);
    let create = liboci_cli::Create {
        bundle: a.bundle.clone(),
        console_socket: None,
        pid_file: a.pid_file.clone(),
        no_pivot: a.no_pivot,
        no_new_keyring: false,
        preserve_fds: 0,
        container_id: a.container_id.clone(),
    };
    let started = Instant::now();
    let restored = super::create::create_with(
        ctx,
        &create,
        Some(super::create::RestoreFrom {
            snapshot: snap,
            guest_id,
        }),
    );
    let line = match &restored {
        Ok(_) => format!(
            "restore of {}: VM restored from {} in {} ms\n",
            a.container_id,
            snap_path.display(),
            started.elapsed().as_millis()
        ),
        Err(e) => format!("restore of {} failed: {e}\n", a.container_id),
    };
    let _ = write_log_named(log_dir, RESTORE_LOG, &line);
    restored
}

/// The log of a restore (CRIU's name, as runc's).
pub const RESTORE_LOG: &str = "restore.log";

/// A file that did not exist, for writing, following no link.
fn new_file(path: &Path) -> Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
        .map_err(|e| e.doing(format!("creating {}", path.display())))
}

/// Where `path` is written before it is renamed into place: beside it,
/// hidden, this process's.
fn beside(path: &Path) -> PathBuf {
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    path.with_file_name(format!(".{name}.{}", std::process::id()))
}

/// `path` holds `bytes`, whatever it held (a file, a link: replaced, never
/// followed).
fn write_new(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = beside(path);
    let written = new_file(&tmp)?
        .write_all(bytes)
        .map_err(|e| e.doing(format!("writing {}", tmp.display())))
        .and_then(|()| {
            std::fs::rename(&tmp, path)
                .map_err(|e| e.doing(format!("renaming {} into place", tmp.display())))
        });
    if written.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    written
}

/// Appends `line` to `dump.log` in `dir`.
fn write_log(dir: &Path, line: &str) -> Result<()> {
    write_log_named(dir, LOG, line)
}

/// Appends `line` to `name` in `dir`.
fn write_log_named(dir: &Path, name: &str, line: &str) -> Result<()> {
    let path = dir.join(name);
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(&path)
        .and_then(|mut f| f.write_all(line.as_bytes()))
        .map_err(|e| e.doing(format!("writing {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        args: Args,
    }

    fn parse(argv: &[&str]) -> Args {
        Cli::try_parse_from(std::iter::once("checkpoint").chain(argv.iter().copied()))
            .unwrap()
            .args
    }

    #[test]
    fn podmans_flags_parse_and_what_cannot_be_done_is_refused_by_name() {
        // podman 4.3 says --leave-running twice.
        let a = parse(&["--leave-running", "--leave-running", "c1"]);
        assert!(a.leave_running);
        let a = parse(&[
            "--image-path",
            "/b/checkpoint",
            "--work-path",
            "/b",
            "--leave-running",
            "--file-locks",
            "c1",
        ]);
        assert_eq!(a.image_path, PathBuf::from("/b/checkpoint"));
        assert!(a.leave_running && a.criu.file_locks);
        assert_eq!(a.container_id, "c1");
        assert_eq!(refused(&a), None);
        let a = parse(&["--tcp-established", "c1"]);
        assert!(refused(&a).unwrap().starts_with("--tcp-established"));
        let a = parse(&["--pre-dump", "c1"]);
        assert!(refused(&a).unwrap().starts_with("--pre-dump"));
        assert_eq!(parse(&["c1"]).image_path, PathBuf::from("checkpoint"));
    }

    #[test]
    fn an_image_directory_is_never_written_through_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::os::unix::fs::symlink(&target, dir.path().join(RECORD)).unwrap();
        assert!(new_file(&dir.path().join(RECORD)).is_err());
        // Replaced, the link itself, never followed.
        write_new(&dir.path().join(RECORD), b"one").unwrap();
        assert!(!target.exists());
        write_new(&dir.path().join(RECORD), b"two").unwrap();
        assert_eq!(std::fs::read(dir.path().join(RECORD)).unwrap(), b"two");
        let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
        assert_eq!(left.len(), 1, "nothing but the record: {left:?}");
    }
}
