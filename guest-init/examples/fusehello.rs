//! A tiny FUSE file system for tests/vm_run.rs: it shows that a container
//! given /dev/fuse (`linux.devices`) can serve and mount a FUSE file
//! system in the guest. Nothing but std and nix, so that it links
//! statically and runs in a busybox container; hack/build builds it (static,
//! as guest-init) into target/dist/tools/fusehello.
//!
//! ```text
//! fusehello MOUNTPOINT
//! ```
//!
//! Mounts a read-only file system on MOUNTPOINT holding one file, `hello`,
//! whose content is `hello from fuse\n`, and serves it until it is
//! unmounted. It speaks just enough of the FUSE protocol (7.31) for
//! `ls` and `cat`; anything else is answered ENOSYS.
#![forbid(unsafe_code)]

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::fd::AsRawFd;

const CONTENT: &[u8] = b"hello from fuse\n";
const NAME: &[u8] = b"hello";
const ROOT: u64 = 1;
const FILE: u64 = 2;

// Opcodes (linux/fuse.h).
const LOOKUP: u32 = 1;
const GETATTR: u32 = 3;
const OPEN: u32 = 14;
const READ: u32 = 15;
const RELEASE: u32 = 18;
const INIT: u32 = 26;
const OPENDIR: u32 = 27;
const READDIR: u32 = 28;
const RELEASEDIR: u32 = 29;
const DESTROY: u32 = 38;

fn main() {
    let target = std::env::args()
        .nth(1)
        .expect("usage: fusehello MOUNTPOINT");
    let mut dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/fuse")
        .expect("opening /dev/fuse");
    let opts = format!(
        "fd={},rootmode=40000,user_id=0,group_id=0,allow_other",
        dev.as_raw_fd()
    );
    nix::mount::mount(
        Some("fusehello"),
        target.as_str(),
        Some("fuse.fusehello"),
        nix::mount::MsFlags::MS_RDONLY | nix::mount::MsFlags::MS_NODEV,
        Some(opts.as_str()),
    )
    .expect("mounting");
    let mut buf = vec![0u8; 1 << 17];
    loop {
        let n = match dev.read(&mut buf) {
            Ok(n) => n,
            // ENODEV: unmounted.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => return,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => panic!("reading /dev/fuse: {e}"),
        };
        let req = &buf[..n];
        let opcode = u32_at(req, 4);
        let unique = u64_at(req, 8);
        let node = u64_at(req, 16);
        let body = &req[40..];
        let reply: Result<Vec<u8>, i32> = match opcode {
            INIT => Ok(init_out()),
            LOOKUP if node == ROOT && body.split(|b| *b == 0).next() == Some(NAME) => {
                Ok(entry_out())
            }
            LOOKUP => Err(libc::ENOENT),
            GETATTR => Ok(attr_out(node)),
            OPEN | OPENDIR => Ok(vec![0; 16]),
            READ => {
                let offset = (u64_at(body, 8) as usize).min(CONTENT.len());
                let size = u32_at(body, 16) as usize;
                Ok(CONTENT[offset..(offset + size).min(CONTENT.len())].to_vec())
            }
            READDIR => Ok(if u64_at(body, 8) == 0 {
                dirent(FILE, 1, NAME, libc::DT_REG)
            } else {
                Vec::new()
            }),
            RELEASE | RELEASEDIR => Ok(Vec::new()),
            DESTROY => return,
            _ => Err(libc::ENOSYS),
        };
        let (error, data) = match reply {
            Ok(d) => (0, d),
            Err(e) => (-e, Vec::new()),
        };
        let mut out = Vec::with_capacity(16 + data.len());
        out.extend_from_slice(&(16 + data.len() as u32).to_le_bytes());
        out.extend_from_slice(&error.to_le_bytes());
        out.extend_from_slice(&unique.to_le_bytes());
        out.extend_from_slice(&data);
        // ENOENT: the request was interrupted; nothing to answer.
        let _ = dev.write(&out);
    }
}

fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().unwrap())
}

/// fuse_init_out of protocol 7.31 (64 bytes).
fn init_out() -> Vec<u8> {
    let mut o = Vec::new();
    o.extend_from_slice(&7u32.to_le_bytes()); // major
    o.extend_from_slice(&31u32.to_le_bytes()); // minor
    o.extend_from_slice(&0u32.to_le_bytes()); // max_readahead
    o.extend_from_slice(&0u32.to_le_bytes()); // flags
    o.extend_from_slice(&1u16.to_le_bytes()); // max_background
    o.extend_from_slice(&1u16.to_le_bytes()); // congestion_threshold
    o.extend_from_slice(&65536u32.to_le_bytes()); // max_write
    o.extend_from_slice(&1u32.to_le_bytes()); // time_gran
    o.resize(64, 0);
    o
}

/// fuse_attr (88 bytes) of the root directory or the file.
fn attr(node: u64) -> Vec<u8> {
    let (size, mode, nlink) = if node == FILE {
        (CONTENT.len() as u64, libc::S_IFREG | 0o444, 1u32)
    } else {
        (0, libc::S_IFDIR | 0o555, 2)
    };
    let mut a = Vec::new();
    a.extend_from_slice(&node.to_le_bytes()); // ino
    a.extend_from_slice(&size.to_le_bytes());
    a.extend_from_slice(&size.div_ceil(512).to_le_bytes()); // blocks
    a.extend_from_slice(&[0; 3 * 8 + 3 * 4]); // times
    a.extend_from_slice(&mode.to_le_bytes());
    a.extend_from_slice(&nlink.to_le_bytes());
    a.extend_from_slice(&[0; 4 * 4]); // uid, gid, rdev, blksize
    a.extend_from_slice(&[0; 4]); // flags
    a
}

/// fuse_entry_out of the file (128 bytes).
fn entry_out() -> Vec<u8> {
    let mut o = Vec::new();
    o.extend_from_slice(&FILE.to_le_bytes());
    o.extend_from_slice(&[0; 8 + 8 + 8 + 4 + 4]); // generation, validity
    o.extend_from_slice(&attr(FILE));
    o
}

/// fuse_attr_out (104 bytes).
fn attr_out(node: u64) -> Vec<u8> {
    let mut o = vec![0; 16];
    o.extend_from_slice(&attr(node));
    o
}

/// One fuse_dirent, padded to 8 bytes.
fn dirent(ino: u64, off: u64, name: &[u8], typ: u8) -> Vec<u8> {
    let mut d = Vec::new();
    d.extend_from_slice(&ino.to_le_bytes());
    d.extend_from_slice(&off.to_le_bytes());
    d.extend_from_slice(&(name.len() as u32).to_le_bytes());
    d.extend_from_slice(&u32::from(typ).to_le_bytes());
    d.extend_from_slice(name);
    d.resize(d.len().div_ceil(8) * 8, 0);
    d
}
