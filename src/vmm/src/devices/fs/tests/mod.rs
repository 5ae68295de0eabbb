//! The tests of virtio-fs: a share served over the test kit's mock
//! queue, the harness that plays Linux's FUSE client (`harness.rs`), and
//! the tests by what they hold: the share's confinement (`share.rs`), the
//! queue and the worker thread (`queue.rs`), the descriptor ledger and
//! submounts (`ledger.rs`), a mounted share's checkpoint and rebuild
//! (`checkpoint.rs`).

mod capture;
mod checkpoint;
mod harness;
mod ledger;
mod queue;
mod share;

use std::fs;
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, AttrOut, BatchForgetIn, CreateIn, EntryOut, FallocateIn, ForgetIn, ForgetOne,
    GetattrIn, GetxattrIn, InHeader, InitIn, InitOut, IoctlIn, LinkIn, MkdirIn, MknodIn, Opcode,
    OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn, RenameIn, SetattrIn, SetxattrIn, WriteIn,
    WriteOut, ATTR_SUBMOUNT, GETATTR_FH, KERNEL_MINOR_VERSION, KERNEL_VERSION, ROOT_ID,
};
use fuse_backend_rs::api::filesystem::{Context, FileSystem, FsOptions};
use fuse_backend_rs::api::server::Server;
use proptest::prelude::*;
use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress};

use super::ledger::{default_fd_budget, nofile_limit, raise_nofile_limit, FD_BUDGET_MAX};
use super::queue::{MAX_REQUEST_LEN, OUT_HEADER_LEN};
use super::share::{private_fs_attrs, KERNEL_O_LARGEFILE};
use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::{DeviceError, Mem, VirtioDevice, INT_VRING, TYPE_FS};
use harness::{stage_request, Harness, Reply};

const MEM_SIZE: usize = 0x10_0000;
/// Where requests and replies go in guest memory (the queues sit below
/// 0x2000, and a second share's at 0x8000).
const IN_HDR: u64 = 0x1_0000;
const IN_BODY: u64 = 0x1_1000;
const OUT_HDR: u64 = 0x4_0000;
const OUT_BODY: u64 = 0x4_1000;
const OUT_BODY_LEN: u32 = 0x1_0000;
/// Where the queue of a second share goes.
const SECOND_QUEUE: u64 = 0x8000;

const FATTR_MODE: u32 = 0x1;
const FATTR_SIZE: u32 = 0x8;
const FATTR_MTIME: u32 = 0x20;

const HELLO: &[u8] = b"hello from the host\n";

fn test_mem() -> Mem {
    memory(MEM_SIZE)
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

/// A FUSE structure from the start of `bytes`.
fn obj<T: ByteValued + Default>(bytes: &[u8]) -> T {
    let mut t = T::default();
    let n = size_of::<T>();
    assert!(bytes.len() >= n, "reply too short: {} < {n}", bytes.len());
    t.as_mut_slice().copy_from_slice(&bytes[..n]);
    t
}

/// A FUSE reply structure, compared by its bytes.
#[derive(Clone, Copy, Debug)]
struct P<T>(T);

impl<T: ByteValued> PartialEq for P<T> {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_slice() == other.0.as_slice()
    }
}

impl<T> std::ops::Deref for P<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}

fn is_symlink(mode: u32) -> bool {
    mode & libc::S_IFMT == libc::S_IFLNK
}

/// This process's descriptors that lead to `path`, with their open(2)
/// flags (from /proc/self/fdinfo).
fn fds_at(path: &Path) -> Vec<(i32, i32)> {
    fds_where(|target| target == path)
}

/// How many of this process's descriptors lead into `dir`.
fn fds_under(dir: &Path) -> usize {
    fds_where(|target| target.starts_with(dir)).len()
}

fn fds_where(keep: impl Fn(&Path) -> bool) -> Vec<(i32, i32)> {
    let mut fds = Vec::new();
    for entry in fs::read_dir("/proc/self/fd").unwrap() {
        let Some(fd) = entry
            .ok()
            .and_then(|e| e.file_name().to_str()?.parse::<i32>().ok())
        else {
            continue;
        };
        // Other tests open and close descriptors meanwhile.
        let Ok(target) = fs::read_link(format!("/proc/self/fd/{fd}")) else {
            continue;
        };
        if !keep(&target) {
            continue;
        }
        let Ok(info) = fs::read_to_string(format!("/proc/self/fdinfo/{fd}")) else {
            continue;
        };
        let flags = info
            .lines()
            .find_map(|l| l.strip_prefix("flags:"))
            .and_then(|v| i32::from_str_radix(v.trim(), 8).ok())
            .unwrap();
        fds.push((fd, flags));
    }
    fds
}

/// The descriptors at `path` that can read or write (not `O_PATH`).
fn io_fds_at(path: &Path) -> Vec<i32> {
    fds_at(path)
        .into_iter()
        .filter(|&(_, flags)| flags & libc::O_PATH == 0)
        .map(|(fd, _)| fd)
        .collect()
}
