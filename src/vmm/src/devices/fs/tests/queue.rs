//! The device and its queue: configuration space, FUSE_INIT, hostile
//! chains and request lengths, the worker thread, and random requests.

use super::*;

#[test]
fn config_space_holds_the_tag_and_one_request_queue() {
    let dir = tempfile::tempdir().unwrap();
    let fs = Fs::new("myshare", dir.path(), false).unwrap();
    assert_eq!(fs.device_type(), TYPE_FS);
    assert_eq!(fs.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 2]);
    assert_eq!(fs.features(), 0);
    let mut cfg = [0xffu8; 48];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..7], b"myshare");
    assert!(cfg[7..36].iter().all(|&b| b == 0), "NUL padded");
    assert_eq!(&cfg[36..40], &1u32.to_le_bytes());
    assert!(cfg[40..].iter().all(|&b| b == 0), "zero past the end");
    let mut word = [0u8; 4];
    fs.read_config(36, &mut word);
    assert_eq!(u32::from_le_bytes(word), 1);

    let long = "x".repeat(TAG_MAX_LEN);
    let fs = Fs::new(&long, dir.path(), true).unwrap();
    let mut cfg = [0u8; 40];
    fs.read_config(0, &mut cfg);
    assert_eq!(&cfg[..36], long.as_bytes());
}

#[test]
fn bad_tags_and_directories_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    for tag in ["", &"x".repeat(TAG_MAX_LEN + 1), "a\0b"] {
        assert!(
            matches!(Fs::new(tag, dir.path(), false), Err(FsError::InvalidTag(_))),
            "{tag:?}"
        );
    }
    assert!(matches!(
        Fs::new("t", &dir.path().join("missing"), false),
        Err(FsError::SharedDir { .. })
    ));
    fs::write(dir.path().join("file"), b"").unwrap();
    assert!(matches!(
        Fs::new("t", &dir.path().join("file"), false),
        Err(FsError::NotADirectory(_))
    ));
    // A symlink to a directory is the directory (resolved once, here).
    symlink(dir.path(), dir.path().join("link")).unwrap();
    assert!(Fs::new("t", &dir.path().join("link"), false).is_ok());
}

#[test]
fn init_negotiates_large_requests_and_no_dax() {
    let mem = test_mem();
    let mut h = Harness::new(&mem, false);
    let out = h.init();
    assert_eq!(out.major, KERNEL_VERSION);
    assert_eq!(out.minor, KERNEL_MINOR_VERSION);
    let flags = FsOptions::from_bits_truncate(u64::from(out.flags));
    assert!(flags.contains(FsOptions::MAX_PAGES | FsOptions::DO_READDIRPLUS));
    assert!(flags.contains(FsOptions::SUBMOUNTS));
    assert!(!flags.contains(FsOptions::PERFILE_DAX));
    assert!(!flags.contains(FsOptions::WRITEBACK_CACHE));
    assert_eq!(out.max_pages, 256);
    assert_eq!(out.max_write, 1 << 20);
}

#[test]
fn hostile_chains_complete_and_the_device_keeps_working() {
    let mem = test_mem();
    let mut h = Harness::ready(&mem);
    let reply_descs = [
        (OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE),
        (OUT_BODY, OUT_BODY_LEN, F_WRITE),
    ];
    let lookup_args = cstr("hello.txt");
    let stage_lookup = |mem: &Mem, unique: u64| {
        stage_request(mem, Opcode::Lookup as u32, ROOT_ID, unique, &lookup_args)
    };
    let check_alive = |h: &mut Harness| {
        assert_eq!(
            h.lookup(ROOT_ID, "hello.txt").unwrap().attr.size,
            HELLO.len() as u64
        );
    };

    // Buffers outside guest memory, or straddling its end.
    let mut descs = vec![(0xffff_0000, 40, 0)];
    descs.extend_from_slice(&reply_descs);
    assert_eq!(h.submit(&descs), Some(0));
    check_alive(&mut h);
    let mut descs = stage_lookup(&mem, 1000);
    descs[3] = (MEM_SIZE as u64 - 8, 4096, F_WRITE);
    assert_eq!(h.submit(&descs), Some(0));
    let mut descs = stage_lookup(&mem, 1001);
    descs[0] = (u64::MAX - 16, 40, 0);
    assert_eq!(h.submit(&descs), Some(0));
    check_alive(&mut h);

    // A header claiming more than the chain holds, or less than itself.
    for len in [40 + 4096, u32::MAX, 10, 0] {
        let descs = stage_lookup(&mem, 2000);
        let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
        header.len = len;
        mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
        assert_eq!(h.submit(&descs), Some(16), "len {len}");
        let r = Reply::read(&mem, 16);
        assert_eq!(r.header.unique, 2000);
        assert!(r.header.error < 0, "len {len}: an error reply");
        check_alive(&mut h);
    }

    // An unknown opcode.
    let r = h.call_raw(9999, ROOT_ID, &[]);
    assert_eq!(r.result(), Err(libc::ENOSYS));
    check_alive(&mut h);

    // Zero-length chains, a chain with only a reply buffer, a request
    // shorter than a FUSE header.
    assert_eq!(h.submit(&[(IN_HDR, 0, 0)]), Some(0));
    assert_eq!(h.submit(&[(IN_HDR, 0, 0), (OUT_HDR, 0, F_WRITE)]), Some(0));
    assert_eq!(h.submit(&reply_descs), Some(0));
    assert_eq!(h.submit(&[(IN_HDR, 39, 0), reply_descs[0]]), Some(0));
    check_alive(&mut h);

    // No room for a reply, or no reply buffer at all.
    let descs = stage_lookup(&mem, 3000);
    assert_eq!(
        h.submit(&[descs[0], descs[1], (OUT_HDR, 8, F_WRITE)]),
        Some(0)
    );
    assert_eq!(h.submit(&descs[..2]), Some(0));
    // Room for the header only: an error rather than a cut reply.
    let descs = stage_lookup(&mem, 3001);
    assert_eq!(h.submit(&descs[..3]), Some(16));
    assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EIO));
    check_alive(&mut h);

    // A readable descriptor after the writable ones, and a descriptor
    // that loops onto itself (the chain ends at the queue size).
    let descs = stage_lookup(&mem, 4000);
    assert_eq!(
        h.submit(&[descs[0], descs[2], descs[1], descs[3]]),
        Some((OUT_HEADER_LEN + size_of::<EntryOut>()) as u32)
    );
    let looping = h.guest.next_desc[0];
    h.guest.set_desc(0, looping, (IN_HDR, 40, F_NEXT), looping);
    h.guest.make_avail(0, looping);
    assert_eq!(h.serve(), Some(0));
    check_alive(&mut h);

    // A head index past the queue: skipped, nothing to complete.
    h.guest.make_avail(0, QSIZE + 3);
    assert_eq!(h.serve(), None);
    check_alive(&mut h);

    // Guest-chosen sizes that would be host allocations.
    let ioctl = IoctlIn {
        in_size: u32::MAX,
        out_size: u32::MAX,
        ..Default::default()
    };
    let r = h.call(Opcode::Ioctl, ROOT_ID, ioctl.as_slice());
    assert_eq!(r.result(), Err(libc::ENOTTY));
    let hello = h.lookup(ROOT_ID, "hello.txt").unwrap();
    let fh = h.open(hello.nodeid, libc::O_RDONLY).unwrap();
    assert!(h.read(hello.nodeid, fh, 0, u32::MAX).is_err());
    assert!(h.read(hello.nodeid, fh + 1000, 0, 16).is_err());
    assert!(
        h.read(ROOT_ID, fh, 0, 16).is_err(),
        "a handle of another inode"
    );
    let batch = BatchForgetIn {
        count: u32::MAX,
        dummy: 0,
    };
    let descs = stage_request(&mem, Opcode::BatchForget as u32, 0, 5000, batch.as_slice());
    assert_eq!(h.submit(&descs), Some(0));
    // FORGET needs no reply, even malformed; the root is never forgotten.
    let descs = stage_request(&mem, Opcode::Forget as u32, ROOT_ID, 5001, &[1, 2]);
    assert_eq!(h.submit(&descs), Some(0));
    let forget = ForgetIn { nlookup: u64::MAX };
    let descs = stage_request(
        &mem,
        Opcode::Forget as u32,
        ROOT_ID,
        5002,
        forget.as_slice(),
    );
    assert_eq!(h.submit(&descs), Some(0));
    // SETUPMAPPING without a DAX window.
    let r = h.call(Opcode::SetupMapping, hello.nodeid, &[0; 40]);
    assert!(r.result().is_err());
    // DESTROY resets the backend, which keeps serving the root.
    let r = h.call(Opcode::Destroy, 0, &[]);
    assert_eq!(r.result(), Ok(&[][..]));
    check_alive(&mut h);
}

#[test]
fn the_worker_serves_notifications_until_stopped() {
    // This thread shares the process's umask (it does not unshare).
    let umask = || {
        fs::read_to_string("/proc/thread-self/status")
            .unwrap()
            .lines()
            .find_map(|l| l.strip_prefix("Umask:").map(|v| v.trim().to_owned()))
            .unwrap()
    };
    let process_umask = umask();
    let mem = test_mem();
    let dir = tempfile::tempdir().unwrap();
    fs::write(dir.path().join("hello.txt"), HELLO).unwrap();
    let mut dev = Fs::new("worker", dir.path(), false).unwrap();
    // Queue 0 is hiprio, queue 1 the request queue.
    let (hiprio, requests) = (0, 1);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let interrupt = interrupt();
    let notify = [eventfd(), eventfd()];
    let stop = eventfd();
    let activation = |queues| activation(&mem, &interrupt, queues, &notify, &stop);
    assert!(matches!(
        dev.activate(activation(vec![Queue::new(QSIZE).unwrap()])),
        Err(DeviceError::QueueCount { got: 1, want: 2 })
    ));
    dev.activate(activation(g.device_queues::<NUM_QUEUES>().into()))
        .unwrap();
    let worker = dev.take_worker().unwrap();
    assert_eq!(worker.thread().name(), Some("virtio-fs-worker"));
    let completed = |g: &mut Guest, q: usize| wait_for("virtio-fs", || g.used(q).pop());

    let init = InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 0,
        flags: 0,
    };
    let descs = stage_request(&mem, Opcode::Init as u32, 0, 6, init.as_slice());
    g.post(requests, &descs);
    notify[requests].write(1).unwrap();
    let (_, len) = completed(&mut g, requests);
    assert!(Reply::read(&mem, len).result().is_ok());
    // INIT made the backend clear the umask: the worker's own only.
    assert_eq!(umask(), process_umask);

    let descs = stage_request(&mem, Opcode::Lookup as u32, ROOT_ID, 7, &cstr("hello.txt"));
    let posted = g.post(requests, &descs);
    notify[requests].write(1).unwrap();
    let (head, len) = completed(&mut g, requests);
    assert_eq!(head, posted);
    let r = Reply::read(&mem, len);
    assert_eq!(r.header.unique, 7);
    let e: EntryOut = obj(r.result().unwrap());
    assert_eq!(e.attr.size, HELLO.len() as u64);
    assert_ne!(interrupt.status() & INT_VRING, 0);
    assert!(interrupt.eventfd().read().unwrap() >= 1);

    // FORGET on the hiprio queue: completed, nothing written.
    let forget = ForgetIn { nlookup: 1 };
    let mut descs = stage_request(&mem, Opcode::Forget as u32, e.nodeid, 8, forget.as_slice());
    descs.truncate(2);
    let posted = g.post(hiprio, &descs);
    notify[hiprio].write(1).unwrap();
    assert_eq!(completed(&mut g, hiprio), (posted, 0));

    // A malformed request does not stop the worker.
    let posted = g.post(requests, &[(0xffff_0000, 40, 0)]);
    notify[requests].write(1).unwrap();
    assert_eq!(completed(&mut g, requests), (posted, 0));
    let descs = stage_request(
        &mem,
        Opcode::Getattr as u32,
        ROOT_ID,
        9,
        GetattrIn::default().as_slice(),
    );
    g.post(requests, &descs);
    notify[requests].write(1).unwrap();
    let (_, len) = completed(&mut g, requests);
    assert!(Reply::read(&mem, len).result().is_ok());

    stop.write(1).unwrap();
    wait_for("stop", || worker.is_finished().then_some(()));
    worker.join().unwrap();
    // The stop event is the VM's: still readable for the other devices.
    assert_eq!(stop.read().unwrap(), 1);
    // A device activates once.
    let queues = vec![Queue::new(QSIZE).unwrap(), Queue::new(QSIZE).unwrap()];
    assert!(matches!(
        dev.activate(activation(queues)),
        Err(DeviceError::Backend(_))
    ));
}

#[test]
fn request_lengths_past_the_chain_or_the_largest_request_are_refused() {
    let mem = test_mem();
    let mut h = Harness::ready(&mem);
    let name = cstr("hello.txt");
    let stage = |mem: &Mem, unique: u64, len: u32| {
        let descs = stage_request(mem, Opcode::Lookup as u32, ROOT_ID, unique, &name);
        let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
        header.len = len;
        mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
        descs
    };
    let exact = (size_of::<InHeader>() + name.len()) as u32;
    // One byte more than the chain: the server would first allocate
    // it (EIO once the read fell short).
    let descs = stage(&mem, 10, exact + 1);
    assert_eq!(h.submit(&descs), Some(16));
    assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EINVAL));

    // A chain that really holds more than Linux ever sends (the same
    // guest memory twice): the largest request passes, one byte more
    // does not (the server would say ENOMEM).
    let big = |descs: &[Desc]| {
        let mut v = descs[..2].to_vec();
        v.push((0, MEM_SIZE as u32, 0));
        v.push((0, MEM_SIZE as u32, 0));
        v.extend_from_slice(&descs[2..]);
        v
    };
    let descs = big(&stage(&mem, 11, MAX_REQUEST_LEN as u32));
    let used = h.submit(&descs).unwrap();
    let e: EntryOut = obj(Reply::read(&mem, used).result().unwrap());
    assert_eq!(e.attr.size, HELLO.len() as u64);
    let descs = big(&stage(&mem, 12, MAX_REQUEST_LEN as u32 + 1));
    assert_eq!(h.submit(&descs), Some(16));
    assert_eq!(Reply::read(&mem, 16).result(), Err(libc::EINVAL));

    // FORGETs get no reply, even refused.
    let batch = BatchForgetIn {
        count: 1000,
        dummy: 0,
    };
    let body = cat(&[batch.as_slice(), ForgetOne::default().as_slice()]);
    let descs = stage_request(&mem, Opcode::BatchForget as u32, 0, 13, &body);
    assert_eq!(h.submit(&descs), Some(0));
    let descs = stage_request(&mem, Opcode::Forget as u32, 2, 14, &[0; 8]);
    let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
    header.len = u32::MAX;
    mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
    assert_eq!(h.submit(&descs), Some(0));
    assert!(h.lookup(ROOT_ID, "hello.txt").is_ok());
}

/// Opcodes the server knows, and a few it does not.
fn any_opcode() -> impl Strategy<Value = u32> {
    prop_oneof![8 => 1u32..=52, 1 => any::<u32>()]
}

fn any_nodeid() -> impl Strategy<Value = u64> {
    prop_oneof![Just(0u64), Just(ROOT_ID), 2u64..6, any::<u64>()]
}

fn any_reply_room() -> impl Strategy<Value = u32> {
    prop_oneof![Just(0u32), Just(8), Just(16), Just(200), Just(OUT_BODY_LEN)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Well-framed requests with random opcodes, targets and
    /// arguments (a few in a row, so later ones see what earlier ones
    /// made) are all completed, and the device then still works.
    #[test]
    fn random_requests_never_panic(
        reqs in proptest::collection::vec(
            (any_opcode(), any_nodeid(), proptest::collection::vec(any::<u8>(), 0..160), -48i64..48, any_reply_room()),
            1..5,
        ),
    ) {
        let mem = test_mem();
        let mut h = Harness::ready(&mem);
        for (i, (opcode, nodeid, args, len_delta, room)) in reqs.into_iter().enumerate() {
            let unique = 100 + i as u64;
            let mut descs = stage_request(&mem, opcode, nodeid, unique, &args);
            let mut header: InHeader = mem.read_obj(GuestAddress(IN_HDR)).unwrap();
            header.len = (i64::from(header.len) + len_delta).clamp(0, u32::MAX.into()) as u32;
            header.uid = (nodeid % 3) as u32 * 1000;
            mem.write_obj(header, GuestAddress(IN_HDR)).unwrap();
            let last = descs.len() - 1;
            descs[last].1 = room;
            let used = h.submit(&descs);
            prop_assert!(used.is_some());
            prop_assert!(used.unwrap() as usize <= OUT_HEADER_LEN + room as usize);
        }
        prop_assert!(h.getattr(ROOT_ID).is_ok());
    }

    /// Arbitrary bytes as a request, split across descriptors anyhow.
    #[test]
    fn random_bytes_as_a_request_never_panic(
        bytes in proptest::collection::vec(any::<u8>(), 0..400),
        split in 0usize..400,
        room in any_reply_room(),
    ) {
        let mem = test_mem();
        let mut h = Harness::ready(&mem);
        mem.write_slice(&bytes, GuestAddress(IN_HDR)).unwrap();
        let split = split.min(bytes.len());
        let descs = [
            (IN_HDR, split as u32, 0),
            (IN_HDR + split as u64, (bytes.len() - split) as u32, 0),
            (OUT_HDR, OUT_HEADER_LEN as u32, F_WRITE),
            (OUT_BODY, room, F_WRITE),
        ];
        prop_assert!(h.submit(&descs).is_some());
        prop_assert!(h.getattr(ROOT_ID).is_ok());
    }
}
