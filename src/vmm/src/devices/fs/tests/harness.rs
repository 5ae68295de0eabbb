//! A share served over one mock request queue, and requests staged as
//! Linux's FUSE client lays them out: header and arguments, then the
//! reply's buffers.

use super::*;

/// Writes a request into guest memory, as Linux lays it out (header,
/// arguments, then the reply header and the reply body), and returns
/// its descriptors.
pub(super) fn stage_request(
    mem: &Mem,
    opcode: u32,
    nodeid: u64,
    unique: u64,
    args: &[u8],
) -> Vec<Desc> {
    let header = InHeader {
        len: (size_of::<InHeader>() + args.len()) as u32,
        opcode,
        unique,
        nodeid,
        uid: 0,
        gid: 0,
        pid: 1,
        padding: 0,
    };
    mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
    mem.write_slice(args, GuestAddress(IN_BODY)).unwrap();
    // A stale reply must not pass for a new one.
    mem.write_slice(&[0xa5; OUT_HEADER_LEN], GuestAddress(OUT_HDR))
        .unwrap();
    mem.write_slice(&vec![0; OUT_BODY_LEN as usize], GuestAddress(OUT_BODY))
        .unwrap();
    let mut descs = vec![(IN_HDR, size_of::<InHeader>() as u32, 0)];
    if !args.is_empty() {
        descs.push((IN_BODY, args.len() as u32, 0));
    }
    descs.push((OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE));
    descs.push((OUT_BODY, OUT_BODY_LEN, F_WRITE));
    descs
}

pub(super) struct Reply {
    pub(super) header: OutHeader,
    pub(super) body: Vec<u8>,
}

impl Reply {
    pub(super) fn read(mem: &Mem, used: u32) -> Reply {
        let header: OutHeader = mem.read_obj(GuestAddress(OUT_HDR)).unwrap();
        let n = (header.len as usize)
            .saturating_sub(OUT_HEADER_LEN)
            .min(OUT_BODY_LEN as usize)
            .min((used as usize).saturating_sub(OUT_HEADER_LEN));
        let mut body = vec![0; n];
        mem.read_slice(&mut body, GuestAddress(OUT_BODY)).unwrap();
        Reply { header, body }
    }

    /// The reply body, or the errno.
    pub(super) fn result(&self) -> Result<&[u8], i32> {
        if self.header.error == 0 {
            Ok(&self.body)
        } else {
            Err(-self.header.error)
        }
    }
}

/// A share served over a mock request queue.
pub(super) struct Harness<'m> {
    /// The share is `base/share`; `base` holds what must stay out of
    /// reach.
    pub(super) _dir: Option<tempfile::TempDir>,
    pub(super) root: PathBuf,
    /// The request queue, the driver's side and the device's.
    pub(super) guest: Guest<'m>,
    pub(super) queue: Queue,
    pub(super) server: Server<Arc<ShareFs>>,
    /// The server's filesystem, to read its ledger.
    pub(super) fs: Arc<ShareFs>,
    pub(super) unique: u64,
}

impl<'m> Harness<'m> {
    /// A fresh share: `hello.txt`, `sub/`, and `../outside.txt`,
    /// `../outside_dir/secret` next to it.
    pub(super) fn new(mem: &'m Mem, readonly: bool) -> Harness<'m> {
        Harness::with_budget(mem, readonly, None)
    }

    /// A fresh writable share, FUSE_INIT done: where most tests start.
    pub(super) fn ready(mem: &'m Mem) -> Harness<'m> {
        let mut h = Harness::new(mem, false);
        h.init();
        h
    }

    /// A fresh share whose guest may pin `budget` host descriptors.
    pub(super) fn with_budget(mem: &'m Mem, readonly: bool, budget: Option<usize>) -> Harness<'m> {
        // INIT clears the umask: keep that to this test's thread.
        private_fs_attrs().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path();
        fs::write(base.join("outside.txt"), b"outside secret").unwrap();
        fs::set_permissions(base.join("outside.txt"), fs::Permissions::from_mode(0o644)).unwrap();
        fs::create_dir(base.join("outside_dir")).unwrap();
        fs::write(base.join("outside_dir/secret"), b"secret").unwrap();
        let root = base.join("share");
        fs::create_dir(&root).unwrap();
        fs::write(root.join("hello.txt"), HELLO).unwrap();
        fs::create_dir(root.join("sub")).unwrap();
        let mut share = ShareFs::new(&root, readonly).unwrap();
        if let Some(budget) = budget {
            share = share.with_fd_budget(budget);
        }
        let mut h = Harness::sharing(mem, 0, &root, share);
        h._dir = Some(dir);
        h
    }

    /// Serves an existing directory over a queue at `queue_base`.
    pub(super) fn serving(
        mem: &'m Mem,
        queue_base: u64,
        root: &Path,
        readonly: bool,
    ) -> Harness<'m> {
        Harness::sharing(mem, queue_base, root, ShareFs::new(root, readonly).unwrap())
    }

    pub(super) fn sharing(
        mem: &'m Mem,
        queue_base: u64,
        root: &Path,
        share: ShareFs,
    ) -> Harness<'m> {
        let fs = Arc::new(share);
        let guest = Guest::at(mem, queue_base, 1);
        Harness {
            _dir: None,
            root: root.canonicalize().unwrap(),
            queue: guest.queue(0),
            guest,
            server: Server::new(fs.clone()),
            fs,
            unique: 0,
        }
    }

    pub(super) fn base(&self) -> &Path {
        self.root.parent().unwrap()
    }

    /// Serves whatever chain is posted: its head and the bytes it
    /// got, if completed.
    pub(super) fn complete(&mut self) -> Option<(u16, u32)> {
        process_queue(&self.server, &mut self.queue, self.guest.mem);
        let used = self.guest.used(0);
        assert!(used.len() <= 1, "one chain, one completion: {used:?}");
        used.first().copied()
    }

    /// Serves whatever chain is posted; the bytes it got, if completed.
    pub(super) fn serve(&mut self) -> Option<u32> {
        self.complete().map(|(_, len)| len)
    }

    pub(super) fn submit(&mut self, descs: &[Desc]) -> Option<u32> {
        let head = self.guest.post(0, descs);
        self.complete().map(|(used, len)| {
            assert_eq!(used, head);
            len
        })
    }

    pub(super) fn call_raw(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
        self.unique += 1;
        let descs = stage_request(self.guest.mem, opcode, nodeid, self.unique, args);
        let used = self.submit(&descs).expect("the request was completed");
        let reply = Reply::read(self.guest.mem, used);
        assert!(
            used as usize >= OUT_HEADER_LEN,
            "no reply to opcode {opcode}"
        );
        assert_eq!(reply.header.unique, self.unique);
        assert_eq!(reply.header.len, used, "the used length is the reply's");
        reply
    }

    pub(super) fn call(&mut self, opcode: Opcode, nodeid: u64, args: &[u8]) -> Reply {
        self.call_raw(opcode as u32, nodeid, args)
    }

    pub(super) fn init(&mut self) -> InitOut {
        let flags = FsOptions::ASYNC_READ
            | FsOptions::BIG_WRITES
            | FsOptions::MAX_PAGES
            | FsOptions::DO_READDIRPLUS
            | FsOptions::READDIRPLUS_AUTO
            | FsOptions::PARALLEL_DIROPS
            | FsOptions::AUTO_INVAL_DATA
            | FsOptions::WRITEBACK_CACHE
            | FsOptions::PERFILE_DAX
            | FsOptions::SUBMOUNTS;
        let args = InitIn {
            major: KERNEL_VERSION,
            minor: KERNEL_MINOR_VERSION,
            max_readahead: 0x20000,
            flags: flags.bits() as u32,
        };
        obj(self
            .call(Opcode::Init, 0, args.as_slice())
            .result()
            .unwrap())
    }

    pub(super) fn lookup(&mut self, parent: u64, name: &str) -> Result<P<EntryOut>, i32> {
        self.lookup_bytes(parent, &cstr(name))
    }

    pub(super) fn lookup_bytes(&mut self, parent: u64, name: &[u8]) -> Result<P<EntryOut>, i32> {
        self.answer(Opcode::Lookup, parent, name)
    }

    /// Sends `op` on `node` with `body`; its reply, one `T`, or the errno.
    fn answer<T: ByteValued + Default>(
        &mut self,
        op: Opcode,
        node: u64,
        body: &[u8],
    ) -> Result<P<T>, i32> {
        self.call(op, node, body).result().map(|b| P(obj(b)))
    }

    /// Sends `op` on `parent` with its fixed `args` and then `name`, as
    /// the requests that make an entry have it; the new entry.
    fn make_entry(
        &mut self,
        op: Opcode,
        parent: u64,
        args: &[u8],
        name: &str,
    ) -> Result<P<EntryOut>, i32> {
        self.answer(op, parent, &cat(&[args, &cstr(name)]))
    }

    pub(super) fn getattr(&mut self, node: u64) -> Result<P<AttrOut>, i32> {
        self.answer(Opcode::Getattr, node, GetattrIn::default().as_slice())
    }

    pub(super) fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        self.open_as(Opcode::Open, node, flags)
    }

    pub(super) fn opendir(&mut self, node: u64) -> Result<u64, i32> {
        self.opendir_flags(node, libc::O_RDONLY | libc::O_DIRECTORY)
    }

    /// OPEN or OPENDIR (`op`) of `node` with `flags`; the handle.
    fn open_as(&mut self, op: Opcode, node: u64, flags: i32) -> Result<u64, i32> {
        let args = OpenIn {
            flags: flags as u32,
            fuse_flags: 0,
        };
        let r = self.call(op, node, args.as_slice());
        r.result().map(|b| obj::<OpenOut>(b).fh)
    }

    /// FORGET, which gets no reply.
    pub(super) fn forget(&mut self, node: u64, nlookup: u64) {
        self.unique += 1;
        let args = ForgetIn { nlookup };
        let descs = stage_request(
            self.guest.mem,
            Opcode::Forget as u32,
            node,
            self.unique,
            args.as_slice(),
        );
        assert_eq!(self.submit(&descs[..2]), Some(0));
    }

    pub(super) fn batch_forget(&mut self, forgets: &[(u64, u64)]) {
        self.unique += 1;
        let head = BatchForgetIn {
            count: forgets.len() as u32,
            dummy: 0,
        };
        let mut body = head.as_slice().to_vec();
        for &(nodeid, nlookup) in forgets {
            body.extend_from_slice(ForgetOne { nodeid, nlookup }.as_slice());
        }
        let descs = stage_request(
            self.guest.mem,
            Opcode::BatchForget as u32,
            0,
            self.unique,
            &body,
        );
        assert_eq!(self.submit(&descs[..2]), Some(0));
    }

    /// One READDIRPLUS: (name, entry) for each directory entry.
    pub(super) fn readdirplus(
        &mut self,
        node: u64,
        fh: u64,
        size: u32,
    ) -> Result<Vec<(String, P<EntryOut>)>, i32> {
        let args = read_in(fh, 0, size, 0);
        let r = self.call(Opcode::Readdirplus, node, args.as_slice());
        let mut rest = r.result()?;
        let mut entries = Vec::new();
        while !rest.is_empty() {
            let entry: EntryOut = obj(rest);
            let dirent = &rest[size_of::<EntryOut>()..];
            let namelen = u32::from_ne_bytes(dirent[16..20].try_into().unwrap()) as usize;
            let name = String::from_utf8(dirent[24..24 + namelen].to_vec()).unwrap();
            entries.push((name, P(entry)));
            rest = &rest[size_of::<EntryOut>() + (24 + namelen).next_multiple_of(8)..];
        }
        Ok(entries)
    }

    pub(super) fn opendir_flags(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        self.open_as(Opcode::Opendir, node, flags)
    }

    pub(super) fn getattr_fh(&mut self, node: u64, fh: u64) -> Result<P<AttrOut>, i32> {
        let args = GetattrIn {
            flags: GETATTR_FH,
            dummy: 0,
            fh,
        };
        self.answer(Opcode::Getattr, node, args.as_slice())
    }

    pub(super) fn read(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
    ) -> Result<Vec<u8>, i32> {
        self.read_flags(node, fh, offset, size, 0)
    }

    /// READ as Linux sends it: `flags` are the guest file's f_flags.
    pub(super) fn read_flags(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        size: u32,
        flags: i32,
    ) -> Result<Vec<u8>, i32> {
        let args = read_in(fh, offset, size, flags);
        let r = self.call(Opcode::Read, node, args.as_slice());
        r.result().map(<[u8]>::to_vec)
    }

    pub(super) fn write(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
    ) -> Result<u32, i32> {
        self.write_flags(node, fh, offset, data, 0)
    }

    pub(super) fn write_flags(
        &mut self,
        node: u64,
        fh: u64,
        offset: u64,
        data: &[u8],
        flags: i32,
    ) -> Result<u32, i32> {
        let args = WriteIn {
            fh,
            offset,
            size: data.len() as u32,
            flags: flags as u32,
            ..Default::default()
        };
        let r = self.call(Opcode::Write, node, &cat(&[args.as_slice(), data]));
        r.result().map(|b| obj::<WriteOut>(b).size)
    }

    pub(super) fn create(
        &mut self,
        parent: u64,
        name: &str,
        flags: i32,
    ) -> Result<(P<EntryOut>, u64), i32> {
        let args = CreateIn {
            flags: flags as u32,
            mode: libc::S_IFREG | 0o644,
            umask: 0o022,
            fuse_flags: 0,
        };
        let r = self.call(
            Opcode::Create,
            parent,
            &cat(&[args.as_slice(), &cstr(name)]),
        );
        r.result().map(|b| {
            let entry: EntryOut = obj(b);
            let open: OpenOut = obj(&b[size_of::<EntryOut>()..]);
            (P(entry), open.fh)
        })
    }

    pub(super) fn mkdir(&mut self, parent: u64, name: &str) -> Result<P<EntryOut>, i32> {
        let args = MkdirIn {
            mode: 0o755,
            umask: 0o022,
        };
        self.make_entry(Opcode::Mkdir, parent, args.as_slice(), name)
    }

    pub(super) fn mknod(
        &mut self,
        parent: u64,
        name: &str,
        mode: u32,
        rdev: u32,
    ) -> Result<P<EntryOut>, i32> {
        let args = MknodIn {
            mode,
            rdev,
            umask: 0,
            padding: 0,
        };
        self.make_entry(Opcode::Mknod, parent, args.as_slice(), name)
    }

    pub(super) fn symlink(
        &mut self,
        parent: u64,
        name: &str,
        target: &str,
    ) -> Result<P<EntryOut>, i32> {
        self.answer(Opcode::Symlink, parent, &cat(&[&cstr(name), &cstr(target)]))
    }

    pub(super) fn readlink(&mut self, node: u64) -> Result<Vec<u8>, i32> {
        let r = self.call(Opcode::Readlink, node, &[]);
        r.result().map(<[u8]>::to_vec)
    }

    pub(super) fn unlink(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Unlink, parent, &cstr(name))
            .result()
            .map(drop)
    }

    pub(super) fn rmdir(&mut self, parent: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Rmdir, parent, &cstr(name))
            .result()
            .map(drop)
    }

    pub(super) fn rename(
        &mut self,
        parent: u64,
        old: &str,
        newdir: u64,
        new: &str,
    ) -> Result<(), i32> {
        let args = RenameIn { newdir };
        let body = cat(&[args.as_slice(), &cstr(old), &cstr(new)]);
        self.call(Opcode::Rename, parent, &body).result().map(drop)
    }

    pub(super) fn link(
        &mut self,
        node: u64,
        newparent: u64,
        name: &str,
    ) -> Result<P<EntryOut>, i32> {
        let args = LinkIn { oldnodeid: node };
        self.make_entry(Opcode::Link, newparent, args.as_slice(), name)
    }

    pub(super) fn setattr(&mut self, node: u64, args: SetattrIn) -> Result<P<AttrOut>, i32> {
        self.answer(Opcode::Setattr, node, args.as_slice())
    }

    pub(super) fn setxattr(&mut self, node: u64, name: &str, value: &[u8]) -> Result<(), i32> {
        let args = SetxattrIn {
            size: value.len() as u32,
            flags: 0,
        };
        let body = cat(&[args.as_slice(), &cstr(name), value]);
        self.call(Opcode::Setxattr, node, &body).result().map(drop)
    }

    pub(super) fn getxattr(&mut self, node: u64, name: &str, size: u32) -> Result<Vec<u8>, i32> {
        let args = GetxattrIn { size, padding: 0 };
        let r = self.call(
            Opcode::Getxattr,
            node,
            &cat(&[args.as_slice(), &cstr(name)]),
        );
        r.result().map(<[u8]>::to_vec)
    }

    pub(super) fn removexattr(&mut self, node: u64, name: &str) -> Result<(), i32> {
        self.call(Opcode::Removexattr, node, &cstr(name))
            .result()
            .map(drop)
    }

    pub(super) fn access(&mut self, node: u64, mask: i32) -> Result<(), i32> {
        let args = AccessIn {
            mask: mask as u32,
            padding: 0,
        };
        self.call(Opcode::Access, node, args.as_slice())
            .result()
            .map(drop)
    }

    pub(super) fn fallocate(&mut self, node: u64, fh: u64, length: u64) -> Result<(), i32> {
        let args = FallocateIn {
            fh,
            offset: 0,
            length,
            mode: 0,
            padding: 0,
        };
        self.call(Opcode::Fallocate, node, args.as_slice())
            .result()
            .map(drop)
    }
}

/// The arguments of READ and READDIRPLUS.
fn read_in(fh: u64, offset: u64, size: u32, flags: i32) -> ReadIn {
    ReadIn {
        fh,
        offset,
        size,
        flags: flags as u32,
        ..Default::default()
    }
}
