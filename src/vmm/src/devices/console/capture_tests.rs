//! Capturing and restoring the console: bytes on their way in both
//! directions and a pending control message survive a capture, through
//! JSON, into a console over a new socket, none lost or sent twice; a
//! damaged state is refused naming its field.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

use super::control::{
    ControlMsg, DEVICE_READY, PORT_ADD, PORT_ID, PORT_NAME, PORT_OPEN, PORT_READY,
};
use super::state::Saved;
use super::*;
use crate::virtio::mmio::{MmioTransport, RestoreError};
use crate::virtio::snapshot_tests::{assert_no_violation, copy, set_up, used, w32, PAUSE};
use crate::virtio::state::{StateError, TransportState};
use crate::virtio::test_utils::*;
use crate::virtio::{Mem, VIRTIO_F_VERSION_1};

const MEM_SIZE: usize = 4 << 20;
/// A transmit chain bigger than what a socket buffers: the worker holds
/// it partly written.
const BIG: usize = 1 << 20;
const FEATURES: u64 = VIRTIO_F_VERSION_1 | VIRTIO_CONSOLE_F_MULTIPORT;

fn transport(mem: &Mem, stop: &EventFd, socket: UnixStream) -> MmioTransport {
    let mut t = MmioTransport::new(
        Box::new(Console::new("krun.ctl", socket)),
        mem.clone(),
        interrupt(),
        stop.try_clone().unwrap(),
    )
    .unwrap();
    t.enable_pause().unwrap();
    t
}

/// The driver sends a control message and the device takes it.
fn control(t: &mut MmioTransport, g: &mut Guest, id: u32, event: u16, value: u16) {
    g.post_out(CTRL_TX, &ControlMsg { id, event, value }.to_bytes());
    w32(t, 0x50, CTRL_TX as u32);
    used(g, CTRL_TX, 1);
}

fn ctl(event: u16, value: u16) -> Vec<u8> {
    ControlMsg::new(event, value).to_bytes()
}

/// Everything the socket holds now.
fn drain(s: &mut UnixStream) -> Vec<u8> {
    s.set_nonblocking(true).unwrap();
    let mut out = Vec::new();
    let mut buf = vec![0; 64 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
            Err(e) => panic!("{e}"),
        }
    }
    out
}

fn read_exactly(s: &mut UnixStream, len: usize) -> Vec<u8> {
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut v = vec![0; len];
    s.read_exact(&mut v).unwrap();
    v
}

/// `got` is `want`; else where they part (not a megabyte of numbers).
fn same(got: &[u8], want: &[u8], what: &str) {
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(
        got.len() == want.len() && at.is_none(),
        "{what}: {} bytes, {} wanted, first difference at {at:?}",
        got.len(),
        want.len()
    );
}

#[test]
fn a_restored_console_loses_and_repeats_no_byte() {
    let mem = memory(MEM_SIZE);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let (dev, mut host) = UnixStream::pair().unwrap();
    let mut t = transport(&mem, &stop, dev);
    set_up(&mut t, &g, FEATURES);
    // Two control buffers: the host's PORT_OPEN waits for a third.
    g.post_in(CTRL_RX, 4096);
    g.post_in(CTRL_RX, 4096);
    control(&mut t, &mut g, u32::MAX, DEVICE_READY, 1);
    control(&mut t, &mut g, PORT_ID, PORT_READY, 1);
    control(&mut t, &mut g, PORT_ID, PORT_OPEN, 1);
    let mut name = ctl(PORT_NAME, 1);
    name.extend_from_slice(b"krun.ctl\0");
    assert_eq!(g.wait_received(CTRL_RX, 2), vec![ctl(PORT_ADD, 1), name]);
    // Host -> guest: 11 bytes read at once, 3 fit the guest's buffer.
    host.write_all(b"hello world").unwrap();
    g.post_in(RX, 3);
    w32(&mut t, 0x50, RX as u32);
    assert_eq!(g.wait_received(RX, 1), vec![b"hel".to_vec()]);
    // Guest -> host: more than the socket takes while the host does not
    // read.
    let data: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    let tx_head = g.post_out(TX, &data);
    w32(&mut t, 0x50, TX as u32);
    let (paused, state) = loop {
        let paused = t.pause(PAUSE).unwrap();
        let state = t.capture(&paused).unwrap();
        if Saved::from_bytes(&state.device).unwrap().tx_sent.is_some() {
            break (paused, state);
        }
        drop(paused);
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_no_violation(&stop);
    let json = serde_json::to_vec(&state).unwrap();
    let state: TransportState = serde_json::from_slice(&json).unwrap();
    let saved = Saved::from_bytes(&state.device).unwrap();
    let sent = saved.tx_sent.unwrap() as usize;
    assert!(sent > 0 && sent < BIG, "{sent} bytes sent");
    assert_eq!(saved.rx, b"lo world");
    assert_eq!(saved.control, vec![ControlMsg::new(PORT_OPEN, 1)]);
    assert!(saved.port_ready && saved.guest_open && saved.host_connected);
    // The held chain is given back: it comes again.
    let tx = state.queues[TX];
    assert_eq!((tx.next_avail, tx.next_used), (0, 0));
    assert_eq!(state.queues[RX].next_avail, 1);
    // The captured VM stops; its socket got exactly what was counted sent.
    stop.write(1).unwrap();
    drop(paused);
    wait_for("the old worker to end", || {
        (!t.worker_running()).then_some(())
    });
    same(&drain(&mut host), &data[..sent], "the old socket");

    let mem2 = memory(MEM_SIZE);
    let mut g2 = Guest::new(&mem2, NUM_QUEUES);
    g2.next_desc = g.next_desc.clone();
    g2.used_seen = g.used_seen.clone();
    g2.next_buf = g.next_buf;
    copy(&mem, &mem2);
    let stop2 = eventfd();
    let (dev2, mut host2) = UnixStream::pair().unwrap();
    let restored = Box::new(Console::new("krun.ctl", dev2));
    let mut t2 = MmioTransport::restore(
        restored,
        mem2.clone(),
        interrupt(),
        stop2.try_clone().unwrap(),
        &state,
    )
    .unwrap();
    assert!(t2.worker_running());
    // The rest of the chain, then the chain is used once.
    same(
        &read_exactly(&mut host2, BIG - sent),
        &data[sent..],
        "the new socket",
    );
    assert_eq!(used(&mut g2, TX, 1), vec![(tx_head, 0)]);
    // The host bytes held, then new ones.
    g2.post_in(RX, 64);
    w32(&mut t2, 0x50, RX as u32);
    assert_eq!(g2.wait_received(RX, 1), vec![b"lo world".to_vec()]);
    host2.write_all(b"again").unwrap();
    g2.post_in(RX, 64);
    w32(&mut t2, 0x50, RX as u32);
    assert_eq!(g2.wait_received(RX, 1), vec![b"again".to_vec()]);
    // The pending control message, once.
    g2.post_in(CTRL_RX, 4096);
    g2.post_in(CTRL_RX, 4096);
    w32(&mut t2, 0x50, CTRL_RX as u32);
    assert_eq!(g2.wait_received(CTRL_RX, 1), vec![ctl(PORT_OPEN, 1)]);
    // The guest writes on, with no handshake again.
    g2.post_out(TX, b"bye");
    w32(&mut t2, 0x50, TX as u32);
    assert_eq!(read_exactly(&mut host2, 3), b"bye");
    let paused = t2.pause(PAUSE).unwrap();
    let again = t2.capture(&paused).unwrap();
    assert_eq!(
        (again.queues[TX].next_avail, again.queues[TX].next_used),
        (2, 2)
    );
    assert_eq!(again.queues[RX].next_avail, 3);
    drop(paused);
    std::thread::sleep(Duration::from_millis(20));
    assert!(g2.used(CTRL_RX).is_empty(), "a control message came twice");
    assert_no_violation(&stop2);
    stop2.write(1).unwrap();
}

/// The state of a console the driver has only set up.
fn set_up_console_state() -> TransportState {
    let mem = memory(1 << 20);
    let (dev, _host) = UnixStream::pair().unwrap();
    let stop = eventfd();
    let t = transport(&mem, &stop, dev);
    let paused = t.pause(PAUSE).unwrap();
    t.capture(&paused).unwrap()
}

fn field(e: RestoreError) -> String {
    match e {
        RestoreError::State(StateError { field, .. }) => field,
        e => panic!("{e}"),
    }
}

#[test]
fn a_damaged_console_state_is_refused_naming_the_field() {
    let state = set_up_console_state();
    assert_eq!(
        Saved::from_bytes(&state.device).unwrap(),
        Saved::fresh(),
        "a console never activated"
    );
    let held = Saved {
        tx_sent: Some(5),
        control: vec![ControlMsg::new(PORT_OPEN, 1)],
        rx: b"abc".to_vec(),
        ..Saved::fresh()
    }
    .to_bytes();
    let with = |f: fn(&mut Vec<u8>)| {
        let mut b = held.clone();
        f(&mut b);
        b
    };
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("device.version", with(|b| b[0] = 2)),
        ("device.flags", with(|b| b[1] |= 0x80)),
        ("device.tx_sent", held[..5].to_vec()),
        ("device.control", with(|b| b[10] = 33)),
        ("device.control[0]", with(|b| b[15] = 99)),
        (
            "device.rx",
            with(|b| b[19..23].copy_from_slice(&70_000u32.to_le_bytes())),
        ),
        ("device.rx", held[..held.len() - 1].to_vec()),
        ("device", with(|b| b.push(0))),
        ("device.version", Vec::new()),
    ];
    let mem = memory(1 << 20);
    for (want, bytes) in cases {
        let mut s = state.clone();
        s.device = bytes;
        let (dev, _host) = UnixStream::pair().unwrap();
        let e = MmioTransport::restore(
            Box::new(Console::new("krun.ctl", dev)),
            mem.clone(),
            interrupt(),
            eventfd(),
            &s,
        )
        .map(|_| ())
        .unwrap_err();
        assert_eq!(field(e), want);
    }
    // The state itself restores.
    let mut s = state;
    s.device = held;
    let (dev, _host) = UnixStream::pair().unwrap();
    MmioTransport::restore(
        Box::new(Console::new("krun.ctl", dev)),
        mem,
        interrupt(),
        eventfd(),
        &s,
    )
    .unwrap();
}

proptest! {
    /// Any bytes are refused or read back as they were written.
    #[test]
    fn any_bytes_are_refused_or_round_trip(tail in proptest::collection::vec(any::<u8>(), 0..64)) {
        let mut bytes = vec![1];
        bytes.extend(tail);
        if let Ok(saved) = Saved::from_bytes(&bytes) {
            let again = saved.to_bytes();
            // A chain not held writes its count as 0.
            if saved.tx_sent.is_some() {
                prop_assert_eq!(again, bytes);
            } else {
                prop_assert_eq!(Saved::from_bytes(&again).unwrap(), saved);
            }
        }
    }
}
