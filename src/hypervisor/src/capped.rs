//! Logs the guest can fill, kept to a size.
//!
//! The guest's serial console (the kernel log, which guest root writes at
//! will) and anything a VMM prints because of what the guest did would grow
//! a host file without bound. Such output goes into a pipe instead; a
//! thread copies the pipe into the log file up to a cap, then notes once
//! that output was dropped, and keeps draining the pipe so that the writer
//! (a vCPU, or QEMU) never blocks on it.

use std::fs::{File, OpenOptions};
use std::io::{self, ErrorKind, Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

/// The cap on a log the guest can fill, unless the runtime says otherwise.
pub const DEFAULT_LOG_LIMIT: u64 = 1 << 20;

/// A log file fed from a pipe by a copier thread. Dropping it leaves the
/// thread to finish on its own: it ends when every write end is closed.
#[derive(Debug)]
pub struct CappedLog {
    done: Receiver<()>,
    finished: bool,
}

impl CappedLog {
    /// Creates (or truncates) the file at `path` and a pipe into it;
    /// returns the log and the pipe's write end (close-on-exec) for the
    /// writer. At most `limit` bytes of output reach the file; `what` names
    /// the log in the note about the rest ("console log").
    pub fn create(path: &Path, limit: u64, what: &str) -> io::Result<(CappedLog, OwnedFd)> {
        let file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(path)?;
        let (reader, writer) = io::pipe()?;
        let (tx, done) = mpsc::channel();
        let what = what.to_string();
        std::thread::Builder::new()
            .name("log-copy".into())
            .spawn(move || {
                copy_capped(reader, file, limit, &what);
                let _ = tx.send(());
            })?;
        Ok((
            CappedLog {
                done,
                finished: false,
            },
            writer.into(),
        ))
    }

    /// Waits up to `timeout` for the copier to reach the end of the pipe
    /// (every write end closed), so that the file holds all there was.
    /// True once it has.
    pub fn finish(&mut self, timeout: Duration) -> bool {
        if !self.finished {
            self.finished = match self.done.recv_timeout(timeout) {
                Ok(()) | Err(mpsc::RecvTimeoutError::Disconnected) => true,
                Err(mpsc::RecvTimeoutError::Timeout) => false,
            };
        }
        self.finished
    }
}

/// The line that ends a log that hit its cap.
pub fn truncation_note(what: &str, limit: u64) -> String {
    format!("\n[krun-oci: {what} truncated at {limit} bytes; further guest output dropped]\n")
}

/// Copies `input` to `out` until the end of `input`: the first `limit`
/// bytes, then the truncation note once, then nothing (but `input` is
/// still read to its end). A failing `out` is given up on, never `input`.
/// Returns the number of bytes read from `input`.
pub fn copy_capped(mut input: impl Read, mut out: File, limit: u64, what: &str) -> u64 {
    let mut buf = vec![0u8; 64 * 1024];
    let (mut read, mut kept) = (0u64, 0u64);
    let mut writable = true;
    let mut noted = false;
    loop {
        let n = match input.read(&mut buf) {
            Ok(0) => return read,
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => return read,
        };
        read += n as u64;
        let keep = (limit - kept).min(n as u64) as usize;
        if writable && keep > 0 {
            writable = out.write_all(&buf[..keep]).is_ok();
            kept += keep as u64;
        }
        if keep < n && !noted {
            noted = true;
            if writable {
                writable = out
                    .write_all(truncation_note(what, limit).as_bytes())
                    .is_ok();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(path: &Path) -> Vec<u8> {
        std::fs::read(path).unwrap()
    }

    #[test]
    fn output_beyond_the_cap_is_dropped_with_one_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("console.log");
        let (mut log, w) = CappedLog::create(&path, 1000, "console log").unwrap();
        let mut w = File::from(w);
        // Ten times the cap, in writes of many sizes.
        let mut sent = 0;
        for i in 0..400usize {
            let chunk = vec![b'a' + (i % 26) as u8; i % 97 + 1];
            w.write_all(&chunk).unwrap();
            sent += chunk.len();
        }
        assert!(sent > 10_000);
        drop(w);
        assert!(log.finish(Duration::from_secs(10)));
        let got = read(&path);
        let note = truncation_note("console log", 1000);
        assert_eq!(got.len(), 1000 + note.len());
        assert!(got.ends_with(note.as_bytes()));
        assert_eq!(
            String::from_utf8_lossy(&got).matches("truncated").count(),
            1
        );
    }

    #[test]
    fn output_within_the_cap_is_kept_whole_without_a_note() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        let (mut log, w) = CappedLog::create(&path, 10, "log").unwrap();
        File::from(w).write_all(b"0123456789").unwrap();
        assert!(log.finish(Duration::from_secs(10)));
        assert_eq!(read(&path), b"0123456789");
    }

    /// The writer never blocks: far more than a pipe holds goes through
    /// while nobody but the copier reads, and the copier reads it all.
    #[test]
    fn the_pipe_is_always_drained() {
        let dir = tempfile::tempdir().unwrap();
        let (r, w) = io::pipe().unwrap();
        let out = File::create(dir.path().join("log")).unwrap();
        let copier = std::thread::spawn(move || copy_capped(r, out, 100, "log"));
        let mut w = File::from(OwnedFd::from(w));
        let chunk = vec![0u8; 1 << 20];
        for _ in 0..32 {
            w.write_all(&chunk).unwrap();
        }
        drop(w);
        assert_eq!(copier.join().unwrap(), 32 << 20);
    }

    #[test]
    fn a_failing_file_does_not_stop_the_draining() {
        // /dev/full fails every write with ENOSPC.
        let full = OpenOptions::new().write(true).open("/dev/full").unwrap();
        let data = vec![1u8; 300_000];
        assert_eq!(copy_capped(&data[..], full, 1 << 20, "log"), 300_000);
    }

    #[test]
    fn the_log_does_not_follow_a_link() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep").unwrap();
        let link = dir.path().join("console.log");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(CappedLog::create(&link, 10, "log").is_err());
        assert_eq!(read(&target), b"keep");
    }
}
