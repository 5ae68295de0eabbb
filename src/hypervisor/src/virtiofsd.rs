//! One virtiofsd (vhost-user-fs backend) per share, for the QEMU backend.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use crate::child::{kill_and_reap, spawn, PassFd};
use crate::{CappedLog, Error, Share};

/// The fd number virtiofsd gets its listening socket on.
const LISTEN_FD: i32 = 3;

pub(crate) struct Virtiofsd {
    pub child: Child,
    pub socket: PathBuf,
    /// Its stderr: what the guest's requests make it report is capped.
    pub log: CappedLog,
    pub log_path: PathBuf,
}

impl Drop for Virtiofsd {
    fn drop(&mut self) {
        kill_and_reap(&mut self.child);
    }
}

/// Starts virtiofsd serving `share`. The socket is bound here, before
/// virtiofsd runs, so QEMU can connect at once without waiting for it.
/// Its stderr goes to `fsN.log` in `run_dir`, at most `log_limit` bytes:
/// a guest's malformed requests each make it log an error.
pub(crate) fn start(
    binary: &Path,
    share: &Share,
    run_dir: &Path,
    index: usize,
    log_limit: u64,
) -> Result<Virtiofsd, Error> {
    if !share.path.is_dir() {
        return Err(Error::ShareNotDirectory {
            tag: share.tag.clone(),
            path: share.path.clone(),
        });
    }
    let socket = run_dir.join(format!("fs{index}.sock"));
    let sock_err = |source| Error::ShareSocket {
        tag: share.tag.clone(),
        source,
    };
    let listener = UnixListener::bind(&socket).map_err(sock_err)?;
    let log_path = run_dir.join(format!("fs{index}.log"));
    let (log, stderr) =
        CappedLog::create(&log_path, log_limit, "virtiofsd log").map_err(|source| {
            Error::Spawn {
                program: log_path.display().to_string(),
                source,
            }
        })?;
    let mut cmd = Command::new(binary);
    cmd.arg(format!("--fd={LISTEN_FD}"))
        .arg("--shared-dir")
        .arg(&share.path)
        // O_PATH fds rather than file handles for inodes: a share on FUSE
        // (a bundle on sshfs or fuse-overlayfs, or on the virtio-fs of a
        // nested test host) gives handles that go stale once reopened.
        .args([
            "--cache=auto",
            "--xattr",
            "--sandbox=namespace",
            "--inode-file-handles=never",
            "--log-level=error",
        ])
        .stdout(Stdio::null())
        .stderr(stderr);
    if share.readonly {
        cmd.arg("--readonly");
    }
    let child = spawn(
        &mut cmd,
        vec![PassFd {
            fd: OwnedFd::from(listener),
            target: LISTEN_FD,
        }],
        crate::VIRTIOFSD_CAPS,
        None,
    )?;
    Ok(Virtiofsd {
        child,
        socket,
        log,
        log_path,
    })
}
