//! Capturing and restoring a share through its transport: unmounted (no
//! FUSE session) it is one byte, restored over another directory from the
//! captured queue indices; mounted, its file server's state comes along
//! (`checkpoint.rs` holds the tests of that state).

use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::virtio::mmio::{MmioTransport, RestoreError};
use crate::virtio::snapshot_tests::{assert_no_violation, copy, set_up, used, w32, PAUSE};
use crate::virtio::state::{StateError, TransportState};
use crate::virtio::VIRTIO_F_VERSION_1;

const HIPRIO: usize = 0;
const REQUESTS: usize = 1;

/// A FUSE request on queue `q` through the transport; its reply.
fn request(
    t: &mut MmioTransport,
    g: &mut Guest,
    q: usize,
    (opcode, nodeid, unique): (Opcode, u64, u64),
    args: &[u8],
) -> Reply {
    let descs = stage_request(g.mem, opcode as u32, nodeid, unique, args);
    let head = g.post(q, &descs);
    w32(t, 0x50, q as u32);
    let got = used(g, q, 1);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].0, head);
    Reply::read(g.mem, got[0].1)
}

fn init_in() -> InitIn {
    InitIn {
        major: KERNEL_VERSION,
        minor: KERNEL_MINOR_VERSION,
        max_readahead: 0,
        flags: 0,
    }
}

fn restore(
    dir: &Path,
    mem: &Mem,
    stop: &EventFd,
    state: &TransportState,
) -> Result<MmioTransport, RestoreError> {
    MmioTransport::restore(
        Box::new(Fs::new("cap", dir, false).unwrap()),
        mem.clone(),
        interrupt(),
        stop.try_clone().unwrap(),
        state,
    )
}

#[test]
fn a_share_is_captured_unmounted_and_mounted_and_restored_over_another_directory() {
    let mem = test_mem();
    let (dir, other) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    fs::write(other.path().join("hello.txt"), HELLO).unwrap();
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let dev = Fs::new("cap", dir.path(), false).unwrap();
    let mut t = MmioTransport::new(
        Box::new(dev),
        mem.clone(),
        interrupt(),
        stop.try_clone().unwrap(),
    )
    .unwrap();
    t.enable_pause().unwrap();
    set_up(&mut t, &g, VIRTIO_F_VERSION_1);
    // A FORGET before any INIT: served, no session.
    let forget = ForgetIn { nlookup: 1 };
    let mut descs = stage_request(&mem, Opcode::Forget as u32, 5, 1, forget.as_slice());
    descs.truncate(2);
    g.post(HIPRIO, &descs);
    w32(&mut t, 0x50, HIPRIO as u32);
    assert_eq!(used(&mut g, HIPRIO, 1), vec![(0, 0)]);

    let paused = t.pause(PAUSE).unwrap();
    let state = t.capture(&paused).unwrap();
    assert_no_violation(&stop);
    let json = serde_json::to_vec(&state).unwrap();
    let state: TransportState = serde_json::from_slice(&json).unwrap();
    assert_eq!(state.device, [0]);
    assert_eq!(state.queues[HIPRIO].next_avail, 1);
    assert_eq!(state.queues[REQUESTS].next_avail, 0);
    stop.write(1).unwrap();
    drop(paused);
    wait_for("the old worker to end", || {
        (!t.worker_running()).then_some(())
    });

    let mem2 = test_mem();
    let mut g2 = Guest::new(&mem2, NUM_QUEUES);
    g2.next_desc = g.next_desc.clone();
    g2.used_seen = g.used_seen.clone();
    copy(&mem, &mem2);
    // A damaged flag is refused naming the field.
    let mut bad = state.clone();
    bad.device = vec![1];
    let e = restore(other.path(), &mem2, &eventfd(), &bad)
        .map(|_| ())
        .unwrap_err();
    assert!(
        matches!(&e, RestoreError::State(StateError { field, .. }) if field == "device"),
        "{e}"
    );
    let stop2 = eventfd();
    let mut t2 = restore(other.path(), &mem2, &stop2, &state).unwrap();
    assert!(t2.worker_running());
    // The guest mounts the other directory, from the captured indices.
    let r = request(
        &mut t2,
        &mut g2,
        REQUESTS,
        (Opcode::Init, 0, 2),
        init_in().as_slice(),
    );
    assert!(r.result().is_ok());
    let r = request(
        &mut t2,
        &mut g2,
        REQUESTS,
        (Opcode::Lookup, ROOT_ID, 3),
        &cstr("hello.txt"),
    );
    let e: EntryOut = obj(r.result().unwrap());
    assert_eq!(e.attr.size, HELLO.len() as u64);

    // Mounted: the file server's state is captured (the node the guest
    // looked up, by path), and the worker goes on.
    let paused = t2.pause(PAUSE).unwrap();
    let mounted = t2.capture(&paused).unwrap();
    drop(paused);
    let fs_state: FsState = serde_json::from_slice(&mounted.device).unwrap();
    assert_eq!(fs_state.nodes.len(), 1);
    assert_eq!(fs_state.nodes[0].id, e.nodeid);
    assert_eq!(fs_state.nodes[0].path, "hello.txt");
    let r = request(
        &mut t2,
        &mut g2,
        REQUESTS,
        (Opcode::Getattr, ROOT_ID, 4),
        GetattrIn::default().as_slice(),
    );
    assert!(r.result().is_ok());
    // Unmounted (DESTROY): it can be captured again.
    request(&mut t2, &mut g2, REQUESTS, (Opcode::Destroy, 0, 5), &[]);
    let paused = t2.pause(PAUSE).unwrap();
    let again = t2.capture(&paused).unwrap();
    assert_eq!(again.queues[REQUESTS].next_avail, 4);
    drop(paused);
    std::thread::sleep(Duration::from_millis(10));
    assert_no_violation(&stop2);
    stop2.write(1).unwrap();
}
