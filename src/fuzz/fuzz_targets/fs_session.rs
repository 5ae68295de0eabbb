//! `fs_session`: a hostile guest's FUSE session against the built-in
//! virtio-fs share server.
//!
//! Drives: `krun_vmm::devices::fs::ShareFs` (fuse-backend-rs's passthrough
//! backend behind krun-oci's read-only switch and size bounds) in a
//! fuse-backend-rs `Server`, fed through `krun_vmm::devices::fs::
//! process_queue` over a split queue in guest memory, exactly as the
//! device's worker feeds it. Each input is one session on a fresh share:
//! FUSE_INIT, then a sequence of requests (LOOKUP, GETATTR, SETATTR, OPEN,
//! CREATE, READ, WRITE, RELEASE, FORGET, BATCH_FORGET, MKDIR, MKNOD, UNLINK,
//! RMDIR, RENAME(2), SYMLINK, LINK, READDIR(PLUS), the xattr calls, OPENDIR,
//! RELEASEDIR, LSEEK, FALLOCATE, ACCESS, STATFS, FSYNC, FLUSH, DESTROY, and
//! raw opcodes with raw bodies) whose node ids and file handles are mostly
//! ones the server returned earlier in the session.
//!
//! The share (`share/`) holds files, a directory, and symlinks pointing
//! out of it, to `outside/secret.txt` beside it (absolute and relative)
//! and to `outside/` itself. Invariants, checked after every request:
//!
//! * confinement: every descriptor the process holds is one it held
//!   before the session, a harness canary, the server's `/proc/<pid>/fd`,
//!   or one whose target lies beneath the share; a descriptor on anything
//!   else (the sentinel outside the share above all) is a crash;
//! * the sentinel file and directory outside the share are untouched:
//!   same inode, mode, owner, size, link count, atime, mtime, ctime (their
//!   contents are compared at the end of the session);
//! * descriptor ownership: the server never closes a descriptor that is
//!   not its own (canaries are parked in the table's holes after every
//!   request, and must stay open on `/dev/null`);
//! * replies: a completed chain never reports more bytes than its
//!   writable buffers hold, a reply carries the request's `unique` and an
//!   errno in 0..4096, FORGET-like requests complete with nothing written;
//!
//! and at the end of the session, once the server is dropped: no
//! descriptor leaked, and a read-only share is as it was (every entry's
//! type, mode, owner, size, link count, mtime, ctime and symlink target;
//! only atimes may move).
//!
//! For the host's sake the guest's symlink targets come from a fixed list
//! (all of them inside this harness's directory), device nodes are
//! `/dev/null`'s only, and FALLOCATE lengths are capped: a confinement bug
//! found here must not let the fuzzer itself damage the machine.
//!
//! The share lives in the scratch directory (`$KRUN_FUZZ_TMPDIR`, else
//! `/dev/shm`, else the temporary directory).
#![no_main]

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use fuse_backend_rs::abi::fuse_abi::{
    AccessIn, BatchForgetIn, CreateIn, Direntplus, EntryOut, FallocateIn, FileLock, FlushIn,
    ForgetIn, ForgetOne, FsyncIn, GetattrIn, GetxattrIn, InHeader, InitIn, InitIn2, InterruptIn,
    LinkIn, LkIn, LseekIn, MkdirIn, MknodIn, Opcode, OpenIn, OpenOut, OutHeader, ReadIn, ReleaseIn,
    Rename2In, RenameIn, SetattrIn, SetxattrIn, WriteIn, KERNEL_MINOR_VERSION, KERNEL_VERSION,
};
use fuse_backend_rs::api::server::Server;
use krun_oci_fuzz::fds::{self, Canaries};
use krun_oci_fuzz::ring::{Mem, Ring};
use krun_oci_fuzz::scratch;
use krun_vmm::devices::fs::{process_queue, ShareFs};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use vm_memory::{ByteValued, Bytes, GuestAddress};

const QSIZE: u16 = 16;
const MEM_SIZE: usize = 0x8_0000;
const DESC: u64 = 0x0;
const AVAIL: u64 = 0x1000;
const USED: u64 = 0x2000;
/// The request, then the reply: header and body, contiguous.
const REQ: u64 = 0x1_0000;
const REQ_MAX: usize = 0x2_0000;
const REPLY: u64 = 0x4_0000;
const REPLY_BODY_MAX: u32 = 0x2_0000;
const OUT_HDR: u32 = 16;

/// The name of a sentinel outside the share, and what it holds.
const SECRET: &[u8] = b"host secret: the guest must never see or touch this\n";

/// What the harness keeps for the whole process.
struct World {
    /// `<tmp>/krun-oci-fuzz-<pid>/share`, made anew for every session;
    /// `outside/` is its sibling.
    share: PathBuf,
    outside_dir: PathBuf,
    outside_file: PathBuf,
    /// The share's symlink targets the guest may pick.
    targets: Vec<Vec<u8>>,
    mem: Mem,
}

fn world() -> &'static World {
    static WORLD: OnceLock<World> = OnceLock::new();
    WORLD.get_or_init(|| {
        let base = scratch::dir();
        let outside_dir = base.join("outside");
        fs::create_dir(&outside_dir).expect("outside/");
        let outside_file = outside_dir.join("secret.txt");
        scratch::sentinel(&outside_file, SECRET);
        let abs = |p: &Path| p.as_os_str().as_encoded_bytes().to_vec();
        let targets = vec![
            b"hello.txt".to_vec(),
            b"sub".to_vec(),
            b"sub/nested.txt".to_vec(),
            b"../outside/secret.txt".to_vec(),
            b"../outside".to_vec(),
            abs(&outside_file),
            abs(&outside_dir),
            b"dangling".to_vec(),
            b"link_out".to_vec(),
            b"..".to_vec(),
            b".".to_vec(),
        ];
        World {
            share: base.join("share"),
            outside_dir,
            outside_file,
            targets,
            mem: Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"),
        }
    })
}

/// A fresh share: `hello.txt`, `empty`, `sub/nested.txt`, and symlinks
/// `link_out` (absolute) and `link_out_rel` to the sentinel file,
/// `link_dir` to the directory beside the share, `link_in` to hello.txt.
fn make_share(w: &World) {
    let s = &w.share;
    let _ = fs::remove_dir_all(s);
    fs::create_dir(s).expect("share/");
    fs::set_permissions(s, fs::Permissions::from_mode(0o755)).unwrap();
    fs::write(s.join("hello.txt"), b"hello from the share\n").unwrap();
    fs::write(s.join("empty"), b"").unwrap();
    fs::create_dir(s.join("sub")).unwrap();
    fs::write(s.join("sub/nested.txt"), b"nested\n").unwrap();
    std::os::unix::fs::symlink(&w.outside_file, s.join("link_out")).unwrap();
    std::os::unix::fs::symlink("../outside/secret.txt", s.join("link_out_rel")).unwrap();
    std::os::unix::fs::symlink(&w.outside_dir, s.join("link_dir")).unwrap();
    std::os::unix::fs::symlink("hello.txt", s.join("link_in")).unwrap();
}

/// What must not change outside the share.
#[derive(Debug, PartialEq, Eq)]
struct Stamp {
    ino: u64,
    mode: u32,
    uid: u32,
    gid: u32,
    size: u64,
    nlink: u64,
    atime: (i64, i64),
    mtime: (i64, i64),
    ctime: (i64, i64),
}

fn stamp(p: &Path) -> Stamp {
    let m = fs::symlink_metadata(p).unwrap_or_else(|e| panic!("{} is gone: {e}", p.display()));
    Stamp {
        ino: m.ino(),
        mode: m.mode(),
        uid: m.uid(),
        gid: m.gid(),
        size: m.size(),
        nlink: m.nlink(),
        atime: (m.atime(), m.atime_nsec()),
        mtime: (m.mtime(), m.mtime_nsec()),
        ctime: (m.ctime(), m.ctime_nsec()),
    }
}

fn sentinel_stamps(w: &World) -> [Stamp; 2] {
    [stamp(&w.outside_file), stamp(&w.outside_dir)]
}

/// Every entry beneath `root` with its metadata (all but atime, which
/// reads move) and, for symlinks, its target.
fn tree(root: &Path) -> BTreeMap<PathBuf, (Stamp, Option<PathBuf>)> {
    let mut out = BTreeMap::new();
    let mut todo = vec![root.to_path_buf()];
    while let Some(dir) = todo.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for e in entries.flatten() {
            let p = e.path();
            let mut st = stamp(&p);
            st.atime = (0, 0);
            let link = fs::read_link(&p).ok();
            if e.file_type().is_ok_and(|t| t.is_dir()) {
                todo.push(p.clone());
            }
            out.insert(p, (st, link));
        }
    }
    out
}

/// The sentinel's contents, read without moving its atime.
fn sentinel_contents(w: &World) -> Vec<u8> {
    use std::io::Read;
    let mut f = fs::File::options()
        .read(true)
        .custom_flags(libc::O_NOATIME)
        .open(&w.outside_file)
        .expect("the sentinel opens");
    let mut v = Vec::new();
    f.read_to_end(&mut v).unwrap();
    v
}

// ---- The fuzz input ----

/// An id the server hands out: mostly one it did (an index into those
/// [`Known`] so far), else a small or any raw number.
#[derive(Debug, Clone, Copy)]
enum Handed {
    Known(u8),
    Raw(u64),
}

impl<'a> Arbitrary<'a> for Handed {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let b = u8::arbitrary(u)?;
        Ok(match b {
            0..=239 => Handed::Known(b),
            240..=247 => Handed::Raw(u64::from(b - 240)),
            _ => Handed::Raw(u64::arbitrary(u)?),
        })
    }
}

/// A node id (the root the first known).
type Node = Handed;
/// A file handle.
type Fh = Handed;

const NAMES: &[&[u8]] = &[
    b"hello.txt",
    b"sub",
    b"nested.txt",
    b"empty",
    b"link_out",
    b"link_out_rel",
    b"link_dir",
    b"link_in",
    b"new",
    b"new2",
    b"dir",
    b".",
    b"..",
    b"",
    b"a/b",
    b"secret.txt",
];

const XATTRS: &[&[u8]] = &[
    b"user.x",
    b"user.y",
    b"trusted.t",
    b"security.capability",
    b"security.selinux",
    b"system.posix_acl_access",
    b"system.posix_acl_default",
    b"user.",
    b"",
];

/// The dictionaries a [`Word`] draws from.
const DICTIONARIES: [&[&[u8]]; 2] = [NAMES, XATTRS];

/// A string for the wire: mostly an entry of dictionary
/// `DICTIONARIES[D]`, else up to `RAW_MAX` raw bytes.
#[derive(Debug, Clone)]
enum Word<const D: usize, const RAW_MAX: usize> {
    Dict(u8),
    Raw(Vec<u8>),
}

impl<'a, const D: usize, const RAW_MAX: usize> Arbitrary<'a> for Word<D, RAW_MAX> {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let b = u8::arbitrary(u)?;
        if b < 240 {
            return Ok(Word::Dict(b));
        }
        let len = u.int_in_range(0..=RAW_MAX)?;
        Ok(Word::Raw(u.bytes(len)?.to_vec()))
    }
}

impl<const D: usize, const RAW_MAX: usize> Word<D, RAW_MAX> {
    /// The word as it goes on the wire, NUL-terminated (a raw one may
    /// hold NULs of its own).
    fn wire(&self) -> Vec<u8> {
        let dict = DICTIONARIES[D];
        let mut v = match self {
            Word::Dict(i) => dict[usize::from(*i) % dict.len()].to_vec(),
            Word::Raw(v) => v.clone(),
        };
        v.push(0);
        v
    }
}

/// A name: mostly one of the share's, or one to create.
type Name = Word<0, 24>;
/// An extended attribute's name.
type Xattr = Word<1, 40>;

/// open(2) flags: a combination of the interesting ones, or raw bits.
#[derive(Debug, Clone, Copy)]
struct OFlags(u32);

const OFLAG_BITS: [i32; 16] = [
    libc::O_WRONLY,
    libc::O_RDWR,
    libc::O_CREAT,
    libc::O_EXCL,
    libc::O_TRUNC,
    libc::O_APPEND,
    libc::O_NONBLOCK,
    libc::O_DIRECT,
    libc::O_DIRECTORY,
    libc::O_NOFOLLOW,
    libc::O_NOATIME,
    libc::O_PATH,
    libc::O_SYNC,
    libc::O_TMPFILE,
    libc::O_LARGEFILE,
    libc::O_NOCTTY,
];

impl<'a> Arbitrary<'a> for OFlags {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        if u.ratio(1, 16)? {
            return Ok(OFlags(u32::arbitrary(u)?));
        }
        let mask = u16::arbitrary(u)?;
        let mut f = 0i32;
        for (i, bit) in OFLAG_BITS.iter().enumerate() {
            if mask & (1 << i) != 0 {
                f |= bit;
            }
        }
        Ok(OFlags(f as u32))
    }
}

/// A request's credentials.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Cred {
    Root,
    User,
    Nobody,
    Raw(u32, u32),
}

impl Cred {
    fn ids(self) -> (u32, u32) {
        match self {
            Cred::Root => (0, 0),
            Cred::User => (1000, 1000),
            Cred::Nobody => (65534, 65534),
            Cred::Raw(u, g) => (u, g),
        }
    }
}

/// The kinds of node MKNOD may make (no block devices, no character
/// device but /dev/null's numbers: the host's safety).
#[derive(Debug, Clone, Copy, Arbitrary)]
enum NodeKind {
    Regular,
    Fifo,
    Socket,
    NullDevice,
    Directory,
}

impl NodeKind {
    fn mode_rdev(self) -> (u32, u32) {
        match self {
            NodeKind::Regular => (libc::S_IFREG, 0),
            NodeKind::Fifo => (libc::S_IFIFO, 0),
            NodeKind::Socket => (libc::S_IFSOCK, 0),
            NodeKind::NullDevice => (libc::S_IFCHR, (1 << 8) | 3),
            NodeKind::Directory => (libc::S_IFDIR, 0),
        }
    }
}

/// Opcodes a raw request may carry: anything but those that could make
/// the host create what the typed requests keep away from (symlinks to
/// anywhere, device nodes, huge allocations).
fn raw_opcode_allowed(op: u32) -> bool {
    ![
        Opcode::Symlink as u32,
        Opcode::Mknod as u32,
        Opcode::Fallocate as u32,
    ]
    .contains(&op)
}

#[derive(Debug, Clone, Arbitrary)]
enum Op {
    Lookup(Node, Name),
    Forget(Node, u8),
    BatchForget(Vec<(Node, u8)>, Option<u32>),
    Getattr(Node, Option<Fh>),
    Setattr {
        node: Node,
        fh: Option<Fh>,
        valid: u16,
        mode: u16,
        size: u32,
        atime: u32,
        mtime: u32,
        owner: Cred,
    },
    Readlink(Node),
    Symlink(Node, Name, u8),
    Mknod(Node, Name, NodeKind, u16, u16),
    Mkdir(Node, Name, u16, u16),
    Unlink(Node, Name),
    Rmdir(Node, Name),
    Rename(Node, Name, Node, Name),
    Rename2(Node, Name, Node, Name, u8),
    Link(Node, Node, Name),
    Open(Node, OFlags),
    Create(Node, Name, OFlags, u16, u16),
    Read {
        node: Node,
        fh: Fh,
        offset: u32,
        size: u16,
        flags: OFlags,
    },
    Write {
        node: Node,
        fh: Fh,
        offset: u32,
        data: Vec<u8>,
        size_delta: i8,
        flags: OFlags,
    },
    Statfs(Node),
    Release(Node, Fh, OFlags),
    Flush(Node, Fh),
    Fsync(Node, Fh, bool),
    Setxattr(Node, Xattr, Vec<u8>, u8),
    Getxattr(Node, Xattr, u16),
    Listxattr(Node, u16),
    Removexattr(Node, Xattr),
    Opendir(Node, OFlags),
    Readdir(Node, Fh, u8, u16),
    Readdirplus(Node, Fh, u8, u16),
    Releasedir(Node, Fh),
    Fsyncdir(Node, Fh, bool),
    Access(Node, u8),
    Fallocate {
        node: Node,
        fh: Fh,
        mode: u8,
        offset: u32,
        length: u16,
    },
    Lseek(Node, Fh, u32, u8),
    Lock(Node, Fh, u8, u8),
    Interrupt,
    Destroy,
    Raw(u8, Node, Vec<u8>),
}

/// How much room the driver gives the reply.
#[derive(Debug, Clone, Copy, Arbitrary)]
enum Room {
    Full,
    Page,
    Small,
    HeaderOnly,
    TooSmall,
}

impl Room {
    fn body(self) -> Option<u32> {
        match self {
            Room::Full => Some(REPLY_BODY_MAX),
            Room::Page => Some(4096),
            Room::Small => Some(64),
            Room::HeaderOnly => Some(0),
            Room::TooSmall => None,
        }
    }
}

#[derive(Debug, Arbitrary)]
struct Request {
    op: Op,
    cred: Cred,
    room: Room,
    /// Split the request over two descriptors, this far in.
    split: Option<u8>,
}

#[derive(Debug, Arbitrary)]
struct Input {
    readonly: bool,
    init_flags: u32,
    init_flags2: u32,
    requests: Vec<Request>,
}

// ---- Driving the server ----

/// The node ids and handles the server gave out so far.
struct Known {
    nodes: Vec<u64>,
    handles: Vec<u64>,
}

impl Known {
    fn node(&self, n: Node) -> u64 {
        match n {
            Handed::Known(i) => self.nodes[usize::from(i) % self.nodes.len()],
            Handed::Raw(v) => v,
        }
    }

    fn fh(&self, f: Fh) -> u64 {
        match f {
            Handed::Known(i) if !self.handles.is_empty() => {
                self.handles[usize::from(i) % self.handles.len()]
            }
            Handed::Known(i) => u64::from(i),
            Handed::Raw(v) => v,
        }
    }

    fn add_node(&mut self, id: u64) {
        if id != 0 && !self.nodes.contains(&id) && self.nodes.len() < 256 {
            self.nodes.push(id);
        }
    }

    fn add_handle(&mut self, fh: u64) {
        if !self.handles.contains(&fh) && self.handles.len() < 256 {
            self.handles.push(fh);
        }
    }
}

fn cat(parts: &[&[u8]]) -> Vec<u8> {
    parts.concat()
}

fn read_in(fh: u64, offset: u64, size: u32, flags: u32) -> ReadIn {
    ReadIn {
        fh,
        offset,
        size,
        flags,
        ..Default::default()
    }
}

/// The opcode, node id and body of a request.
fn encode(op: &Op, k: &Known, w: &World) -> (u32, u64, Vec<u8>) {
    use Opcode as O;
    let n = |x: Node| k.node(x);
    let f = |x: Fh| k.fh(x);
    match op {
        Op::Lookup(p, name) => (O::Lookup as u32, n(*p), name.wire()),
        Op::Forget(node, c) => (
            O::Forget as u32,
            n(*node),
            ForgetIn {
                nlookup: u64::from(*c),
            }
            .as_slice()
            .to_vec(),
        ),
        Op::BatchForget(list, count) => {
            let mut body = BatchForgetIn {
                count: count.unwrap_or(list.len() as u32),
                dummy: 0,
            }
            .as_slice()
            .to_vec();
            for (node, c) in list {
                let one = ForgetOne {
                    nodeid: n(*node),
                    nlookup: u64::from(*c),
                };
                body.extend_from_slice(one.as_slice());
            }
            (O::BatchForget as u32, 0, body)
        }
        Op::Getattr(node, fh) => {
            let args = GetattrIn {
                flags: u32::from(fh.is_some()),
                dummy: 0,
                fh: fh.map_or(0, f),
            };
            (O::Getattr as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Setattr {
            node,
            fh,
            valid,
            mode,
            size,
            atime,
            mtime,
            owner,
        } => {
            let (uid, gid) = owner.ids();
            // FATTR_FH only with a handle.
            let mut valid = u32::from(*valid) & 0xfff & !0x40;
            if fh.is_some() {
                valid |= 0x40;
            }
            let args = SetattrIn {
                valid,
                fh: fh.map_or(0, f),
                size: u64::from(*size),
                atime: u64::from(*atime),
                mtime: u64::from(*mtime),
                mode: u32::from(*mode),
                uid,
                gid,
                ..Default::default()
            };
            (O::Setattr as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Readlink(node) => (O::Readlink as u32, n(*node), Vec::new()),
        Op::Symlink(p, name, t) => {
            let mut target = w.targets[usize::from(*t) % w.targets.len()].clone();
            target.push(0);
            (O::Symlink as u32, n(*p), cat(&[&name.wire(), &target]))
        }
        Op::Mknod(p, name, kind, perm, umask) => {
            let (ty, rdev) = kind.mode_rdev();
            let args = MknodIn {
                mode: ty | (u32::from(*perm) & 0o7777),
                rdev,
                umask: u32::from(*umask) & 0o777,
                padding: 0,
            };
            (
                O::Mknod as u32,
                n(*p),
                cat(&[args.as_slice(), &name.wire()]),
            )
        }
        Op::Mkdir(p, name, perm, umask) => {
            let args = MkdirIn {
                mode: libc::S_IFDIR | (u32::from(*perm) & 0o7777),
                umask: u32::from(*umask) & 0o777,
            };
            (
                O::Mkdir as u32,
                n(*p),
                cat(&[args.as_slice(), &name.wire()]),
            )
        }
        Op::Unlink(p, name) => (O::Unlink as u32, n(*p), name.wire()),
        Op::Rmdir(p, name) => (O::Rmdir as u32, n(*p), name.wire()),
        Op::Rename(p, old, np, new) => {
            let args = RenameIn { newdir: n(*np) };
            let body = cat(&[args.as_slice(), &old.wire(), &new.wire()]);
            (O::Rename as u32, n(*p), body)
        }
        Op::Rename2(p, old, np, new, flags) => {
            let args = Rename2In {
                newdir: n(*np),
                flags: u32::from(*flags & 7),
                padding: 0,
            };
            let body = cat(&[args.as_slice(), &old.wire(), &new.wire()]);
            (O::Rename2 as u32, n(*p), body)
        }
        Op::Link(node, np, name) => {
            let args = LinkIn {
                oldnodeid: n(*node),
            };
            (
                O::Link as u32,
                n(*np),
                cat(&[args.as_slice(), &name.wire()]),
            )
        }
        Op::Open(node, flags) => {
            let args = OpenIn {
                flags: flags.0,
                fuse_flags: 0,
            };
            (O::Open as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Create(p, name, flags, perm, umask) => {
            let args = CreateIn {
                flags: flags.0,
                mode: libc::S_IFREG | (u32::from(*perm) & 0o7777),
                umask: u32::from(*umask) & 0o777,
                fuse_flags: 0,
            };
            (
                O::Create as u32,
                n(*p),
                cat(&[args.as_slice(), &name.wire()]),
            )
        }
        Op::Read {
            node,
            fh,
            offset,
            size,
            flags,
        } => {
            // A few reads ask for everything.
            let size = if *size == u16::MAX {
                u32::MAX
            } else {
                u32::from(*size)
            };
            let args = read_in(f(*fh), u64::from(*offset), size, flags.0);
            (O::Read as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Write {
            node,
            fh,
            offset,
            data,
            size_delta,
            flags,
        } => {
            let data = &data[..data.len().min(0x4000)];
            let size = (data.len() as i64 + i64::from(*size_delta)).max(0) as u32;
            let args = WriteIn {
                fh: f(*fh),
                offset: u64::from(*offset),
                size,
                flags: flags.0,
                ..Default::default()
            };
            (O::Write as u32, n(*node), cat(&[args.as_slice(), data]))
        }
        Op::Statfs(node) => (O::Statfs as u32, n(*node), Vec::new()),
        Op::Release(node, fh, _) | Op::Releasedir(node, fh) => {
            let (opcode, flags) = match op {
                Op::Release(_, _, flags) => (O::Release, flags.0),
                _ => (O::Releasedir, 0),
            };
            let args = ReleaseIn {
                fh: f(*fh),
                flags,
                ..Default::default()
            };
            (opcode as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Flush(node, fh) => {
            let args = FlushIn {
                fh: f(*fh),
                ..Default::default()
            };
            (O::Flush as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Fsync(node, fh, data) | Op::Fsyncdir(node, fh, data) => {
            let opcode = if matches!(op, Op::Fsync(..)) {
                O::Fsync
            } else {
                O::Fsyncdir
            };
            let args = FsyncIn {
                fh: f(*fh),
                fsync_flags: u32::from(*data),
                padding: 0,
            };
            (opcode as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Setxattr(node, name, value, flags) => {
            let value = &value[..value.len().min(512)];
            let args = SetxattrIn {
                size: value.len() as u32,
                flags: u32::from(*flags & 3),
            };
            let body = cat(&[args.as_slice(), &name.wire(), value]);
            (O::Setxattr as u32, n(*node), body)
        }
        Op::Getxattr(node, name, size) => {
            let args = GetxattrIn {
                size: u32::from(*size),
                padding: 0,
            };
            let body = cat(&[args.as_slice(), &name.wire()]);
            (O::Getxattr as u32, n(*node), body)
        }
        Op::Listxattr(node, size) => {
            let args = GetxattrIn {
                size: u32::from(*size),
                padding: 0,
            };
            (O::Listxattr as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Removexattr(node, name) => (O::Removexattr as u32, n(*node), name.wire()),
        Op::Opendir(node, flags) => {
            let args = OpenIn {
                flags: flags.0,
                fuse_flags: 0,
            };
            (O::Opendir as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Readdir(node, fh, offset, size) | Op::Readdirplus(node, fh, offset, size) => {
            let opcode = if matches!(op, Op::Readdir(..)) {
                O::Readdir
            } else {
                O::Readdirplus
            };
            let args = read_in(f(*fh), u64::from(*offset), u32::from(*size), 0);
            (opcode as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Access(node, mask) => {
            let args = AccessIn {
                mask: u32::from(*mask & 7),
                padding: 0,
            };
            (O::Access as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Fallocate {
            node,
            fh,
            mode,
            offset,
            length,
        } => {
            // At most 1 MiB: the share's backing store is the host's.
            let args = FallocateIn {
                fh: f(*fh),
                offset: u64::from(*offset),
                length: u64::from(*length) * 16,
                mode: u32::from(*mode & 0x7f),
                padding: 0,
            };
            (O::Fallocate as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Lseek(node, fh, offset, whence) => {
            let args = LseekIn {
                fh: f(*fh),
                offset: u64::from(*offset),
                whence: u32::from(*whence % 6),
                padding: 0,
            };
            (O::Lseek as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Lock(node, fh, which, ty) => {
            let opcode = [O::Getlk, O::Setlk, O::Setlkw][usize::from(*which % 3)];
            let args = LkIn {
                fh: f(*fh),
                owner: 1,
                lk: FileLock {
                    start: 0,
                    end: u64::MAX,
                    type_: u32::from(*ty % 3),
                    pid: 1,
                },
                lk_flags: 0,
                padding: 0,
            };
            (opcode as u32, n(*node), args.as_slice().to_vec())
        }
        Op::Interrupt => (
            O::Interrupt as u32,
            0,
            InterruptIn { unique: 1 }.as_slice().to_vec(),
        ),
        Op::Destroy => (O::Destroy as u32, 0, Vec::new()),
        Op::Raw(opcode, node, body) => {
            let opcode = u32::from(*opcode);
            let opcode = if raw_opcode_allowed(opcode) {
                opcode
            } else {
                Opcode::Getattr as u32
            };
            (opcode, n(*node), body.clone())
        }
    }
}

/// One session: the server, the queue, and what the guest learnt.
struct Session<'w> {
    w: &'w World,
    server: Server<ShareFs>,
    queue: virtio_queue::Queue,
    ring: Ring,
    known: Known,
    unique: u64,
    /// Descriptors open before the session, and where they point.
    baseline: BTreeMap<i32, Option<PathBuf>>,
    canaries: Canaries,
    /// The highest descriptor number the server held so far.
    high_water: i32,
    stamps: [Stamp; 2],
    /// (opcode, node id, errno of the reply) of every request so far.
    history: Vec<(u32, u64, Option<i32>)>,
}

impl Session<'_> {
    /// Sends one request; returns the reply header and body when the
    /// server replied.
    fn call(
        &mut self,
        opcode: u32,
        nodeid: u64,
        body: &[u8],
        cred: Cred,
        room: Room,
        split: Option<u8>,
    ) -> Option<(OutHeader, Vec<u8>)> {
        let mem = &self.w.mem;
        self.unique += 1;
        let (uid, gid) = cred.ids();
        let header = InHeader {
            len: (size_of::<InHeader>() + body.len()) as u32,
            opcode,
            unique: self.unique,
            nodeid,
            uid,
            gid,
            pid: 1,
            padding: 0,
        };
        let req = cat(&[header.as_slice(), body]);
        let req = &req[..req.len().min(REQ_MAX)];
        mem.write_slice(req, GuestAddress(REQ)).unwrap();
        // A stale reply must not pass for a new one.
        mem.write_slice(&[0xa5; OUT_HDR as usize], GuestAddress(REPLY))
            .unwrap();
        let mut bufs = Vec::new();
        match split.map(|s| req.len() * usize::from(s) / 256) {
            Some(at) if at > 0 && at < req.len() => {
                bufs.push((REQ, at as u32, false));
                bufs.push((REQ + at as u64, (req.len() - at) as u32, false));
            }
            _ => bufs.push((REQ, req.len() as u32, false)),
        }
        let capacity = match room.body() {
            Some(body) => {
                bufs.push((REPLY, OUT_HDR, true));
                if body > 0 {
                    bufs.push((REPLY + u64::from(OUT_HDR), body, true));
                }
                OUT_HDR + body
            }
            None => {
                bufs.push((REPLY, 8, true));
                8
            }
        };
        self.ring.post(mem, 0, &bufs);
        process_queue(&self.server, &mut self.queue, mem);
        let (head, used) = self
            .ring
            .next_used(mem)
            .unwrap_or_else(|| panic!("opcode {opcode}: the chain was not completed"));
        assert_eq!(head, 0, "opcode {opcode}: another chain completed");
        assert!(
            self.ring.next_used(mem).is_none(),
            "opcode {opcode}: one chain, one completion"
        );
        assert!(
            used <= capacity,
            "opcode {opcode}: {used} bytes used of a {capacity}-byte reply buffer"
        );
        let no_reply = [Opcode::Forget, Opcode::BatchForget, Opcode::Interrupt]
            .iter()
            .any(|&o| o as u32 == opcode);
        if no_reply {
            assert_eq!(used, 0, "opcode {opcode} has no reply, yet {used} bytes");
            return None;
        }
        if used < OUT_HDR {
            return None;
        }
        let out: OutHeader = mem.read_obj(GuestAddress(REPLY)).unwrap();
        assert_eq!(
            out.unique, self.unique,
            "opcode {opcode}: the reply is another request's"
        );
        assert!(
            out.error <= 0 && out.error > -4096,
            "opcode {opcode}: reply error {} is no errno",
            out.error
        );
        let mut reply = vec![0; (used - OUT_HDR) as usize];
        mem.read_slice(&mut reply, GuestAddress(REPLY + u64::from(OUT_HDR)))
            .unwrap();
        Some((out, reply))
    }

    /// Remembers the node ids and handles a successful reply carries.
    fn learn(&mut self, opcode: u32, reply: &[u8]) {
        let entry = |b: &[u8]| obj::<EntryOut>(b).map(|e| e.nodeid);
        use Opcode as O;
        match opcode {
            x if [O::Lookup, O::Mkdir, O::Mknod, O::Symlink, O::Link]
                .iter()
                .any(|&o| o as u32 == x) =>
            {
                if let Some(id) = entry(reply) {
                    self.known.add_node(id);
                }
            }
            x if x == O::Create as u32 => {
                if let Some(id) = entry(reply) {
                    self.known.add_node(id);
                }
                if let Some(o) = reply.get(size_of::<EntryOut>()..).and_then(obj::<OpenOut>) {
                    self.known.add_handle(o.fh);
                }
            }
            x if x == O::Open as u32 || x == O::Opendir as u32 => {
                if let Some(o) = obj::<OpenOut>(reply) {
                    self.known.add_handle(o.fh);
                }
            }
            x if x == O::Readdirplus as u32 => {
                let mut rest = reply;
                while let Some(d) = obj::<Direntplus>(rest) {
                    self.known.add_node(d.entry_out.nodeid);
                    let len = (size_of::<Direntplus>() + d.dirent.namelen as usize + 7) & !7;
                    if len > rest.len() {
                        break;
                    }
                    rest = &rest[len..];
                }
            }
            _ => {}
        }
    }

    /// The requests so far and their errnos, for a crash report.
    fn history(&self) -> String {
        self.history
            .iter()
            .map(|(op, node, errno)| format!("  opcode {op} node {node}: errno {errno:?}"))
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// The invariants that hold after every request.
    fn check(&mut self, what: &str) {
        if let Err(e) = self.canaries.check() {
            panic!("{what}: {e}\nrequests so far:\n{}", self.history());
        }
        let proc_fd = fds::proc_fd_dir();
        let table = fds::table();
        for (fd, target) in &table {
            if self.baseline.get(fd) == Some(target) || self.canaries.contains(*fd) {
                continue;
            }
            let Some(target) = target else { continue };
            if server_own(target) || target.starts_with(&self.w.share) {
                continue;
            }
            panic!(
                "{what}: descriptor {fd} points outside the share: {}\nrequests so far:\n{}",
                target.display(),
                self.history()
            );
        }
        for (fd, target) in &self.baseline {
            // (The descriptor that read the baseline is closed since.)
            if target.as_deref() != Some(proc_fd.as_path()) && table.get(fd) != Some(target) {
                panic!(
                    "{what}: descriptor {fd} ({target:?}), open before the session, was closed or replaced"
                );
            }
        }
        let now = sentinel_stamps(self.w);
        assert!(
            now == self.stamps,
            "{what}: the sentinel outside the share changed:\nbefore {:?}\nafter  {now:?}\nrequests so far:\n{}",
            self.stamps,
            self.history()
        );
        // Park canaries in every hole up to the highest descriptor the
        // server ever held (the baseline may hold far higher ones).
        let server_max = table
            .iter()
            .filter(|(fd, t)| self.baseline.get(fd) != Some(t) && !self.canaries.contains(**fd))
            .map(|(fd, _)| *fd)
            .max();
        self.high_water = self.high_water.max(server_max.unwrap_or(0));
        self.canaries.fill_below(self.high_water + 1);
    }
}

/// What the passthrough backend opens for itself: `/proc/self/fd` (to
/// reopen inodes) and `/proc/self/mountinfo` (mount ids).
fn server_own(target: &Path) -> bool {
    let proc = PathBuf::from(format!("/proc/{}", std::process::id()));
    target == proc.join("fd") || target == proc.join("mountinfo")
}

fn obj<T: ByteValued + Default>(b: &[u8]) -> Option<T> {
    let mut t = T::default();
    let n = size_of::<T>();
    t.as_mut_slice().copy_from_slice(b.get(..n)?);
    Some(t)
}

fn run(s: Input) {
    let w = world();
    make_share(w);
    let baseline = fds::table();
    let stamps = sentinel_stamps(w);
    let before = s.readonly.then(|| tree(&w.share));
    let server = Server::new(ShareFs::new(&w.share, s.readonly).expect("the share serves"));
    let ring = Ring::new(&w.mem, QSIZE, DESC, AVAIL, USED);
    let queue = ring.device_queue(QSIZE);
    let mut sess = Session {
        w,
        server,
        queue,
        ring,
        known: Known {
            nodes: vec![fuse_backend_rs::abi::fuse_abi::ROOT_ID],
            handles: Vec::new(),
        },
        unique: 0,
        baseline,
        canaries: Canaries::default(),
        high_water: 0,
        stamps,
        history: Vec::new(),
    };

    let init = InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 0x2_0000,
        flags: s.init_flags,
    };
    let mut body = init.as_slice().to_vec();
    if s.init_flags & (1 << 30) != 0 {
        let init2 = InitIn2 {
            flags2: s.init_flags2,
            unused: [0; 11],
        };
        body.extend_from_slice(init2.as_slice());
    }
    sess.call(Opcode::Init as u32, 0, &body, Cred::Root, Room::Full, None);
    sess.check("INIT");

    for r in s.requests.iter().take(64) {
        let (opcode, nodeid, body) = encode(&r.op, &sess.known, w);
        let reply = sess.call(opcode, nodeid, &body, r.cred, r.room, r.split);
        let errno = reply.as_ref().map(|(out, _)| -out.error);
        if let Some((out, reply)) = reply {
            if out.error == 0 {
                sess.learn(opcode, &reply);
            }
        }
        sess.history.push((opcode, nodeid, errno));
        sess.check(&format!("opcode {opcode} on node {nodeid}"));
    }

    // The end of the session: nothing of the server's may stay open, and
    // nothing of anyone else's may have been closed.
    let history = sess.history();
    let Session {
        server,
        baseline,
        mut canaries,
        stamps,
        ..
    } = sess;
    drop(server);
    if let Err(e) = canaries.check() {
        panic!("dropping the server: {e}\nrequests:\n{history}");
    }
    let proc_fd = fds::proc_fd_dir();
    for (fd, target) in fds::table() {
        // (The descriptor reading the table is the one on `/proc/<pid>/fd`.)
        if canaries.contains(fd) || target.as_deref() == Some(proc_fd.as_path()) {
            continue;
        }
        assert!(
            baseline.get(&fd) == Some(&target),
            "descriptor {fd} ({target:?}) outlived the server\nrequests:\n{history}"
        );
    }
    canaries.clear();
    assert!(sentinel_stamps(w) == stamps, "the sentinel changed");
    assert_eq!(
        sentinel_contents(w),
        SECRET,
        "the sentinel's contents changed"
    );
    if let Some(before) = before {
        let after = tree(&w.share);
        if after != before {
            let changed: Vec<_> = before
                .keys()
                .chain(after.keys())
                .filter(|p| before.get(*p) != after.get(*p))
                .collect();
            panic!("the read-only share changed: {changed:?}\nrequests:\n{history}");
        }
    }
    let _ = fs::remove_dir_all(&w.share);
}

fuzz_target!(|s: Input| run(s));
