//! The host end of a process's stdio: the FIFOs containerd made for it,
//! opened here and handed to the monitor.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::OpenOptionsExt;
use std::time::{Duration, Instant};

use containerd_shim::protos::ttrpc::Code;
use containerd_shim::TtrpcResult;

use super::state::Stdio;
use crate::rpc::rpc_error;

/// How long a FIFO's writer waits for containerd's reader to open its end.
const READER_WAIT: Duration = Duration::from_secs(10);

/// Opens one of containerd's FIFOs; an empty path is no stream.
pub fn open_fifo(path: &str, write: bool) -> TtrpcResult<Option<File>> {
    if path.is_empty() {
        return Ok(None);
    }
    // Non-blocking to open, then blocking for use. containerd's client
    // opens its reading end in a goroutine of its own, which may not have
    // got there yet: a writer's open fails with ENXIO until it has, so it
    // is tried again for a while (as runc's shim waits in a blocking open).
    let deadline = Instant::now() + READER_WAIT;
    let f = loop {
        match OpenOptions::new()
            .read(!write)
            .write(write)
            .custom_flags(libc::O_NONBLOCK)
            .open(path)
        {
            Err(e) if e.raw_os_error() == Some(libc::ENXIO) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            r => break r,
        }
    }
    .map_err(|e| rpc_error(Code::INVALID_ARGUMENT, format!("stdio {path}: {e}")))?;
    // SAFETY: fcntl on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(f.as_raw_fd(), libc::F_GETFL);
        libc::fcntl(f.as_raw_fd(), libc::F_SETFL, flags & !libc::O_NONBLOCK);
    }
    Ok(Some(f))
}

fn dev_null() -> TtrpcResult<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
        .map_err(|e| rpc_error(Code::INTERNAL, e.to_string()))
}

/// stdin, stdout and stderr for a process the monitor starts in a running
/// VM: each FIFO, or /dev/null where there is none.
pub fn fds(stdio: &Stdio) -> TtrpcResult<Vec<OwnedFd>> {
    Ok(vec![
        open_fifo(&stdio.stdin, false)?
            .unwrap_or(dev_null()?)
            .into(),
        open_fifo(&stdio.stdout, true)?
            .unwrap_or(dev_null()?)
            .into(),
        open_fifo(&stdio.stderr, true)?
            .unwrap_or(dev_null()?)
            .into(),
    ])
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};

    #[test]
    fn no_path_is_no_stream_and_dev_null_stands_in() {
        assert!(open_fifo("", true).unwrap().is_none());
        let fds = fds(&Stdio::default()).unwrap();
        assert_eq!(fds.len(), 3);
        let mut stdin = File::from(fds.into_iter().next().unwrap());
        let mut buf = Vec::new();
        assert_eq!(stdin.read_to_end(&mut buf).unwrap(), 0);
    }

    #[test]
    fn a_fifo_opens_blocking_once_its_reader_is_there() {
        let dir = std::env::temp_dir().join(format!("krun-shim-stdio-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("out");
        let p = path.to_str().unwrap();
        let c = std::ffi::CString::new(p).unwrap();
        // SAFETY: mkfifo reads a NUL-terminated path that outlives the call.
        assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
        let mut reader = open_fifo(p, false).unwrap().unwrap();
        let mut writer = open_fifo(p, true).unwrap().unwrap();
        // SAFETY: fcntl on a descriptor the test owns.
        let flags = unsafe { libc::fcntl(writer.as_raw_fd(), libc::F_GETFL) };
        assert_eq!(flags & libc::O_NONBLOCK, 0);
        writer.write_all(b"hi").unwrap();
        drop(writer);
        let mut got = String::new();
        reader.read_to_string(&mut got).unwrap();
        assert_eq!(got, "hi");
        // A writer that comes first waits for its reader.
        let late = std::thread::spawn({
            let p = p.to_string();
            move || {
                std::thread::sleep(std::time::Duration::from_millis(200));
                open_fifo(&p, false).unwrap().unwrap()
            }
        });
        let mut writer = open_fifo(p, true).unwrap().unwrap();
        writer.write_all(b"late").unwrap();
        drop(writer);
        let mut got = String::new();
        late.join().unwrap().read_to_string(&mut got).unwrap();
        assert_eq!(got, "late");
        let missing = dir.join("missing");
        let e = open_fifo(missing.to_str().unwrap(), true).unwrap_err();
        assert_eq!(crate::rpc::status_of(&e).0, Code::INVALID_ARGUMENT);
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
