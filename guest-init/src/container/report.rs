//! The setup report: how a container process, between its fork and its
//! exec, tells guest-init over a pipe that it is ready, or why it cannot
//! be. The exec closes the pipe (it is close-on-exec), so end of file after
//! `start` means the program runs.

use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::OwnedFd;

use crate::failure::Failure;
use crate::sys;

/// Records the child writes on the report pipe: a tag byte (`R`eady or
/// `E`rror), the exit code (i32 LE), then the message up to end of file.
fn write(fd: &OwnedFd, tag: u8, code: i32, message: &str) {
    let mut rec = vec![tag];
    rec.extend_from_slice(&code.to_le_bytes());
    rec.extend_from_slice(message.as_bytes());
    let mut f = File::from(fd.try_clone().expect("dup of the report pipe"));
    let _ = f.write_all(&rec);
}

/// Reports that the process is ready to exec.
pub fn ready(fd: &OwnedFd) {
    write(fd, b'R', 0, "");
}

/// Reports `f` as the child's error record and exits with its code.
pub fn fail_and_exit(report: &OwnedFd, f: Failure) -> ! {
    write(report, b'E', f.code, &f.message);
    sys::exit_now(f.code);
}

/// Reads one record. `eof_ok`: end of file before any record is success
/// (the exec closed the pipe).
pub fn read(report: &mut File, eof_ok: bool) -> Result<(), Failure> {
    let mut head = [0u8; 5];
    let mut got = 0;
    while got < head.len() {
        match report.read(&mut head[got..]) {
            Ok(0) if got == 0 && eof_ok => return Ok(()),
            Ok(0) => {
                return Err(Failure::new(
                    1,
                    "the container process died while being set up",
                ))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Failure::new(
                    1,
                    format!("reading the container's setup report: {e}"),
                ))
            }
        }
    }
    let code = i32::from_le_bytes([head[1], head[2], head[3], head[4]]);
    match head[0] {
        b'R' => Ok(()),
        _ => {
            let mut message = String::new();
            let _ = report.read_to_string(&mut message);
            Err(Failure::new(code, message))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What `read` makes of what the child wrote before closing the pipe.
    fn after(child: impl FnOnce(&OwnedFd), eof_ok: bool) -> Result<(), Failure> {
        let (r, w) = sys::pipe().unwrap();
        child(&w);
        drop(w);
        read(&mut File::from(r), eof_ok)
    }

    #[test]
    fn ready_is_success() {
        assert!(after(ready, false).is_ok());
    }

    #[test]
    fn an_error_record_carries_code_and_message() {
        let f = after(|w| write(w, b'E', 127, "exec: \"nope\": not found"), true).unwrap_err();
        assert_eq!(f.code, 127);
        assert_eq!(f.message, "exec: \"nope\": not found");
    }

    #[test]
    fn end_of_file_is_success_only_after_start() {
        assert!(after(|_| {}, true).is_ok());
        let f = after(|_| {}, false).unwrap_err();
        assert_eq!(
            (f.code, f.message.as_str()),
            (1, "the container process died while being set up")
        );
    }

    #[test]
    fn a_cut_record_means_the_process_died() {
        let cut = |w: &OwnedFd| {
            File::from(w.try_clone().unwrap())
                .write_all(b"E\x01")
                .unwrap()
        };
        let f = after(cut, true).unwrap_err();
        assert_eq!(f.message, "the container process died while being set up");
    }
}
