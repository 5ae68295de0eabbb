//! The console's tests: the handshake, both directions of port 0, hostile
//! chains, and the worker thread, over the virtio test kit.

use std::io::{self, Read, Write};
use std::os::unix::net::UnixStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Address, GuestMemory};
use vmm_sys_util::epoll::EventSet;

use super::control::{
    ControlMsg, DEVICE_READY, PORT_ADD, PORT_ID, PORT_NAME, PORT_OPEN, PORT_READY,
};
use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::{Interrupt, Mem, TYPE_CONSOLE};

const PORT_REMOVE: u16 = 2;

/// The driver sends a control message.
fn send_control(g: &mut Guest, id: u32, event: u16, value: u16) {
    let msg = ControlMsg { id, event, value }.to_bytes();
    g.post_out(CTRL_TX, &msg);
}

/// A worker over the guest's queues; the other end of its socket.
fn worker(g: &Guest, name: &str, multiport: bool) -> (Worker, UnixStream, Arc<Interrupt>) {
    let (dev, host) = UnixStream::pair().unwrap();
    dev.set_nonblocking(true).unwrap();
    let queues = g.serving();
    let irq = queues.interrupt.clone();
    let w = Worker::new(queues, dev, name, multiport);
    (w, host, irq)
}

/// The console's queues in `mem`, driven by a guest; a multiport worker
/// over them with its port "krun.ctl"; the host's end of the socket; the
/// interrupt line.
fn rig(mem: &Mem) -> (Guest<'_>, Worker, UnixStream, Arc<Interrupt>) {
    let g = Guest::new(mem, NUM_QUEUES);
    let (w, host, irq) = worker(&g, "krun.ctl", true);
    (g, w, host, irq)
}

/// The driver posts `n` buffers of 4 KiB for control messages.
fn post_control_buffers(g: &mut Guest, n: usize) {
    for _ in 0..n {
        g.post_in(CTRL_RX, 4096);
    }
}

/// The driver opens (1) or closes (0) port 0; the worker serves that.
fn set_open(g: &mut Guest, w: &mut Worker, value: u16) {
    send_control(g, PORT_ID, PORT_OPEN, value);
    w.process_all();
}

/// The driver's DEVICE_READY, then its PORT_READY for port 0, each
/// served before the next.
fn announce(g: &mut Guest, w: &mut Worker) {
    send_control(g, u32::MAX, DEVICE_READY, 1);
    w.process_all();
    send_control(g, PORT_ID, PORT_READY, 1);
    w.process_all();
}

fn ctl(event: u16, value: u16) -> Vec<u8> {
    ControlMsg::new(event, value).to_bytes()
}

fn name_msg() -> Vec<u8> {
    let mut m = ctl(PORT_NAME, 1);
    m.extend_from_slice(b"krun.ctl\0");
    m
}

/// The whole handshake, then the guest opens the port.
fn open_port(g: &mut Guest, w: &mut Worker) {
    post_control_buffers(g, 3);
    announce(g, w);
    set_open(g, w, 1);
    assert_eq!(
        g.received(CTRL_RX),
        vec![ctl(PORT_ADD, 1), name_msg(), ctl(PORT_OPEN, 1)]
    );
    assert_eq!(g.used(CTRL_TX).len(), 3);
    assert!(w.guest_open);
}

/// Reads from `s` until `len` bytes came (or a second passed).
fn read_exact_timeout(s: &mut UnixStream, len: usize) -> Vec<u8> {
    s.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut v = vec![0; len];
    s.read_exact(&mut v).unwrap();
    v
}

#[test]
fn device_surface() {
    let (a, _b) = UnixStream::pair().unwrap();
    let c = Console::new("krun.ctl", a);
    assert_eq!(c.device_type(), TYPE_CONSOLE);
    assert_eq!(c.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 4]);
    assert_eq!(c.features(), VIRTIO_CONSOLE_F_MULTIPORT);
    let mut cfg = [0xffu8; 16];
    c.read_config(0, &mut cfg);
    assert_eq!(cfg, [0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
    let mut max = [0u8; 4];
    c.read_config(4, &mut max);
    assert_eq!(u32::from_le_bytes(max), 1);
}

#[test]
fn control_handshake() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, _host, irq) = rig(&mem);
    post_control_buffers(&mut g, 4);
    w.process_all();
    assert!(
        g.used(CTRL_RX).is_empty(),
        "nothing to say before DEVICE_READY"
    );

    send_control(&mut g, u32::MAX, DEVICE_READY, 1);
    w.process_all();
    assert_eq!(g.used(CTRL_TX).len(), 1);
    assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_ADD, 1)]);
    assert!(irq.eventfd().read().unwrap() > 0, "interrupt raised");
    assert_ne!(irq.status() & crate::virtio::INT_VRING, 0);

    send_control(&mut g, PORT_ID, PORT_READY, 1);
    w.process_all();
    let msgs = g.received(CTRL_RX);
    assert_eq!(msgs, vec![name_msg(), ctl(PORT_OPEN, 1)]);
    // The name bytes exactly, as the driver's strscpy will see them.
    assert_eq!(&msgs[0][8..], b"krun.ctl\0");
    assert!(!w.guest_open);

    set_open(&mut g, &mut w, 1);
    assert!(w.guest_open);
    set_open(&mut g, &mut w, 0);
    assert!(!w.guest_open);
    assert!(g.used(CTRL_RX).is_empty());
}

#[test]
fn control_messages_wait_for_buffers() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, _host, _irq) = rig(&mem);
    announce(&mut g, &mut w);
    assert_eq!(g.used(CTRL_TX).len(), 2, "driver's messages completed");
    assert!(g.used(CTRL_RX).is_empty());
    // Buffers appear one at a time (notification on queue 2).
    g.post_in(CTRL_RX, 4096);
    w.process_all();
    assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_ADD, 1)]);
    post_control_buffers(&mut g, 3);
    w.process_all();
    assert_eq!(
        g.received(CTRL_RX),
        vec![name_msg(), ctl(PORT_OPEN, 1)],
        "in order, one per buffer"
    );
}

#[test]
fn failures_and_unknown_messages_are_ignored() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, _host, _irq) = rig(&mem);
    post_control_buffers(&mut g, 4);
    send_control(&mut g, u32::MAX, DEVICE_READY, 0);
    send_control(&mut g, PORT_ID, PORT_READY, 0);
    // Opening a port the driver never added.
    set_open(&mut g, &mut w, 1);
    assert!(!w.guest_open && !w.port_ready);
    send_control(&mut g, 7, PORT_READY, 1);
    send_control(&mut g, PORT_ID, 0x1234, 1);
    send_control(&mut g, PORT_ID, PORT_REMOVE, 1);
    w.process_all();
    assert_eq!(g.used(CTRL_TX).len(), 6);
    assert!(g.used(CTRL_RX).is_empty());
    assert!(!w.port_ready);
}

#[test]
fn guest_to_host_multi_descriptor_chains() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, irq) = rig(&mem);
    open_port(&mut g, &mut w);
    let _ = irq.eventfd().read();

    let parts: [&[u8]; 3] = [b"hello ", b"virtio ", b"world"];
    let mut descs = Vec::new();
    for p in parts {
        let a = g.alloc(p.len() as u64);
        g.write(a, p);
        descs.push((a, p.len() as u32, 0));
    }
    let h1 = g.post(TX, &descs);
    let h2 = g.post_out(TX, b"|second chain");
    w.process_all();
    assert_eq!(g.used(TX), vec![(h1, 0), (h2, 0)]);
    assert!(irq.eventfd().read().unwrap() > 0);
    let want = b"hello virtio world|second chain";
    assert_eq!(read_exact_timeout(&mut host, want.len()), want);
    assert_nothing_waits(&host);
}

#[test]
fn host_to_guest_fills_posted_buffers() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    open_port(&mut g, &mut w);

    host.write_all(b"ping").unwrap();
    w.process_all();
    assert!(g.used(RX).is_empty(), "no buffer, nothing read");
    assert!(!w.socket_interest().contains(EventSet::IN));

    g.post_in(RX, 4096);
    assert!(w.socket_interest().contains(EventSet::IN));
    w.process_all();
    assert_eq!(g.received(RX), vec![b"ping".to_vec()]);
    assert!(!w.socket_interest().contains(EventSet::IN));

    // 40 bytes over buffers of 16: split in order, exact used lengths.
    let data: Vec<u8> = (0u8..40).collect();
    host.write_all(&data).unwrap();
    for _ in 0..3 {
        g.post_in(RX, 16);
    }
    w.process_all();
    let got = g.received(RX);
    assert_eq!(
        got.iter().map(Vec::len).collect::<Vec<_>>(),
        vec![16, 16, 8]
    );
    assert_eq!(got.concat(), data);

    // One chain of two writable descriptors.
    let (a, b) = (g.alloc(3), g.alloc(100));
    g.post(RX, &[(a, 3, F_WRITE), (b, 100, F_WRITE)]);
    host.write_all(b"abcdefg").unwrap();
    w.process_all();
    assert_eq!(g.received(RX), vec![b"abcdefg".to_vec()]);
    assert_eq!(g.read(a, 3), b"abc");
    assert_eq!(g.read(b, 4), b"defg");
}

#[test]
fn host_data_before_the_guest_opens_is_kept() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    host.write_all(b"early bytes").unwrap();
    post_control_buffers(&mut g, 4);
    // As Linux does in add_port: receive buffers before PORT_READY.
    g.post_in(RX, 4096);
    g.post_in(RX, 4096);
    announce(&mut g, &mut w);
    assert!(g.used(RX).is_empty(), "the port is not open yet");
    assert!(
        w.socket_interest().is_empty(),
        "the socket is not even watched"
    );
    host.write_all(b", more").unwrap();
    w.process_all();
    assert!(g.used(RX).is_empty());

    set_open(&mut g, &mut w, 1);
    assert_eq!(g.received(RX).concat(), b"early bytes, more");

    // Closed again: bytes wait for the next open.
    set_open(&mut g, &mut w, 0);
    host.write_all(b"later").unwrap();
    w.process_all();
    assert!(g.used(RX).is_empty());
    set_open(&mut g, &mut w, 1);
    assert_eq!(g.received(RX).concat(), b"later");
}

#[test]
fn bytes_read_beyond_the_buffers_wait_for_more_buffers() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    open_port(&mut g, &mut w);
    let data: Vec<u8> = (0..100u8).collect();
    host.write_all(&data).unwrap();
    g.post_in(RX, 30);
    w.process_all();
    assert_eq!(g.received(RX), vec![data[..30].to_vec()]);
    // The rest sits in the device, the socket is not watched meanwhile.
    assert!(w.socket_interest().is_empty());
    g.post_in(RX, 4096);
    g.post_in(RX, 4096);
    w.process_all();
    assert_eq!(g.received(RX), vec![data[30..].to_vec()]);
    // A buffer left, the socket drained: now it is watched.
    assert_eq!(w.socket_interest(), EventSet::IN);
}

#[test]
fn blocked_socket_keeps_every_byte() {
    // 1 MiB in one chain is far more than a socket buffer takes.
    let mem = memory(0x40_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    open_port(&mut g, &mut w);
    let data: Vec<u8> = (0..0x10_0000u32).map(|i| (i * 7 % 251) as u8).collect();
    let base = g.alloc(data.len() as u64);
    g.write(base, &data);
    let quarter = data.len() as u64 / 4;
    let descs: Vec<_> = (0..4)
        .map(|i| (base + i * quarter, quarter as u32, 0))
        .collect();
    let h = g.post(TX, &descs);
    let h2 = g.post_out(TX, b"tail");
    w.process_all();
    assert!(
        g.used(TX).is_empty(),
        "not completed while the socket is full"
    );
    assert!(w.socket_interest().contains(EventSet::OUT));

    let mut got = Vec::new();
    host.set_nonblocking(true).unwrap();
    let mut buf = vec![0; 0x10000];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.len() < data.len() + 4 {
        assert!(Instant::now() < deadline, "stuck at {} bytes", got.len());
        match host.read(&mut buf) {
            Ok(n) => got.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => w.process_all(),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(&got[..data.len()], &data[..]);
    assert_eq!(&got[data.len()..], b"tail");
    assert_eq!(g.used(TX), vec![(h, 0), (h2, 0)]);
    assert!(w.socket_interest().is_empty() || w.socket_interest() == EventSet::IN);
}

#[test]
fn host_eof_tells_the_guest_and_output_is_dropped() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    open_port(&mut g, &mut w);
    post_control_buffers(&mut g, 4);
    host.write_all(b"last words").unwrap();
    drop(host);
    g.post_in(RX, 4096);
    g.post_in(RX, 4096);
    w.process_all();
    assert_eq!(g.received(RX), vec![b"last words".to_vec()]);
    assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_OPEN, 0)]);
    assert!(!w.host_connected);
    assert!(
        w.socket_interest().is_empty(),
        "EOF: the socket is not watched"
    );

    // The guest still writes: completed, dropped, no SIGPIPE.
    let h = g.post_out(TX, b"anyone there?");
    w.process_all();
    assert_eq!(g.used(TX), vec![(h, 0)]);
    let h = g.post_out(TX, b"still writing");
    w.process_all();
    assert_eq!(g.used(TX), vec![(h, 0)]);
    assert!(w.host_write_closed);
    assert!(w.socket_interest().is_empty());
    // The second receive buffer stays with the device, unused.
    assert!(g.used(RX).is_empty());
}

#[test]
fn hostile_chains_are_survived() {
    let mem = memory(0x10_0000);
    let (mut g, mut w, mut host, _irq) = rig(&mem);
    open_port(&mut g, &mut w);
    let outside = mem.last_addr().raw_value() + 1;

    // Transmitq: a write-only descriptor between readable ones is
    // skipped; out of memory, zero length, huge length, overflow.
    let a = g.alloc(4);
    g.write(a, b"good");
    let w_only = g.alloc(4);
    g.write(w_only, b"EVIL");
    g.post(
        TX,
        &[
            (a, 2, 0),
            (w_only, 4, F_WRITE),
            (outside, 100, 0),
            (a, 0, 0),
            (u64::MAX - 2, 16, 0),
            (a + 2, 2, 0),
        ],
    );
    g.post(TX, &[(a, u32::MAX, 0)]);
    g.post(TX, &[(outside - 2, 4, 0)]);
    // A looping chain: 0 -> 1 -> 0 ... within the table.
    g.post_loop(TX, a, 1);
    // A head index beyond the table (its used entry cannot be written).
    g.make_avail(TX, QSIZE + 3);
    w.process_all();
    let used = g.used(TX);
    assert_eq!(used.len(), 4, "{used:?}");
    // The loop is cut after as many descriptors as the queue has.
    let mut want = b"good".to_vec();
    want.extend([b'g'; QSIZE as usize]);
    assert_eq!(read_exact_timeout(&mut host, want.len()), want);
    assert_nothing_waits(&host);

    // Then a good chain works.
    let h = g.post_out(TX, b"next");
    w.process_all();
    assert_eq!(g.used(TX), vec![(h, 0)]);
    assert_eq!(read_exact_timeout(&mut host, 4), b"next");

    // Receiveq: read-only, outside memory, zero length: nothing is
    // lost, the bytes land in the next good buffer.
    host.write_all(b"for the guest").unwrap();
    let r = g.alloc(64);
    g.post(RX, &[(r, 64, 0)]);
    g.post(RX, &[(outside, 64, F_WRITE)]);
    g.post(RX, &[(r, 0, F_WRITE)]);
    g.post(
        RX,
        &[
            (r, 2, F_WRITE),
            (outside, 64, F_WRITE),
            (r + 8, 64, F_WRITE),
        ],
    );
    w.process_all();
    assert_eq!(
        g.used(RX).iter().map(|u| u.1).collect::<Vec<_>>(),
        vec![0, 0, 0, 2]
    );
    g.post_in(RX, 4096);
    w.process_all();
    assert_eq!(g.received(RX), vec![b"r the guest".to_vec()]);
    assert_eq!(g.read(r, 2), b"fo");

    // Control: 3 bytes, a control message split over 8 descriptors of
    // one byte (fine), write-only, outside memory; then a good one.
    let c = g.alloc(8);
    g.write(c, &ctl(PORT_OPEN, 0));
    g.post(CTRL_TX, &[(c, 3, 0)]);
    g.post(CTRL_TX, &[(c, 8, F_WRITE)]);
    g.post(CTRL_TX, &[(outside, 8, 0)]);
    w.process_all();
    assert_eq!(g.used(CTRL_TX).len(), 3);
    assert!(w.guest_open, "none of them was a PORT_OPEN(0)");
    let split: Vec<_> = (0..8).map(|i| (c + i, 1, 0)).collect();
    g.post(CTRL_TX, &split);
    w.process_all();
    assert!(!w.guest_open, "a message over many descriptors counts");
    set_open(&mut g, &mut w, 1);
    assert!(w.guest_open);

    // Control receiveq with no room: the message waits.
    g.post(CTRL_RX, &[(c, 8, 0)]);
    g.post(CTRL_RX, &[(outside, 64, F_WRITE)]);
    drop(host);
    g.post_in(RX, 64);
    w.process_all();
    assert!(g.received(CTRL_RX).iter().all(Vec::is_empty));
    g.post_in(CTRL_RX, 4096);
    w.process_all();
    assert_eq!(g.received(CTRL_RX), vec![ctl(PORT_OPEN, 0)]);
}

#[test]
fn without_multiport_the_port_is_simply_open() {
    let mem = memory(0x10_0000);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let (mut w, mut host, _irq) = worker(&g, "x", false);
    host.write_all(b"hi").unwrap();
    g.post_in(RX, 64);
    g.post_out(TX, b"yo");
    w.process_all();
    assert_eq!(g.received(RX), vec![b"hi".to_vec()]);
    assert_eq!(read_exact_timeout(&mut host, 2), b"yo");
}

/// The real thing: activation, the worker thread and its eventfds.
#[test]
fn worker_thread_serves_notifications_and_stops() {
    let mem = memory(0x10_0000);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let (dev, mut host) = UnixStream::pair().unwrap();
    let mut console = Console::new("krun.ctl", dev);
    console.set_acked_features(VIRTIO_CONSOLE_F_MULTIPORT | crate::virtio::VIRTIO_F_VERSION_1);
    with_worker_thread(
        &mut console,
        Console::take_worker,
        &mem,
        &mut g,
        |g, running| {
            post_control_buffers(g, 4);
            running.kick(CTRL_RX);
            send_control(g, u32::MAX, DEVICE_READY, 1);
            running.kick(CTRL_TX);
            assert_eq!(g.wait_received(CTRL_RX, 1), vec![ctl(PORT_ADD, 1)]);
            g.post_in(RX, 4096);
            running.kick(RX);
            send_control(g, PORT_ID, PORT_READY, 1);
            running.kick(CTRL_TX);
            assert_eq!(
                g.wait_received(CTRL_RX, 2),
                vec![name_msg(), ctl(PORT_OPEN, 1)]
            );
            // The host speaks before the guest opened the port.
            host.write_all(b"hello guest").unwrap();
            std::thread::sleep(Duration::from_millis(20));
            assert!(g.used(RX).is_empty());
            send_control(g, PORT_ID, PORT_OPEN, 1);
            running.kick(CTRL_TX);
            assert_eq!(g.wait_received(RX, 1), vec![b"hello guest".to_vec()]);
            // Waiting for the socket: more bytes, delivered on EPOLLIN.
            g.post_in(RX, 4096);
            running.kick(RX);
            host.write_all(b"again").unwrap();
            assert_eq!(g.wait_received(RX, 1), vec![b"again".to_vec()]);

            g.post_out(TX, b"hello host");
            running.kick(TX);
            assert_eq!(read_exact_timeout(&mut host, 10), b"hello host");
        },
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Random descriptor tables, available rings and memory contents on
    /// all four queues, in every port state: no panic, and afterwards the
    /// device still serves a good chain.
    #[test]
    fn random_rings_never_panic(
        rings in arb_rings(NUM_QUEUES, 0x2_0000),
        noise in proptest::collection::vec(any::<u8>(), 0x800),
        host_bytes in proptest::collection::vec(any::<u8>(), 0..300),
        open in any::<bool>(),
        rounds in 1usize..4,
    ) {
        let mem = memory(0x2_0000);
        let (g, mut w, mut host, _irq) = rig(&mem);
        if open {
            w.port_ready = true;
            w.guest_open = true;
        }
        // Plausible control messages and junk in the data area.
        g.write(0x1_0000, &noise);
        g.write(0x1_0000, &ctl(PORT_OPEN, 1));
        g.write(0x1_0008, &ControlMsg { id: u32::MAX, event: DEVICE_READY, value: 1 }.to_bytes());
        g.load(&rings);
        host.write_all(&host_bytes).unwrap();
        host.set_nonblocking(true).unwrap();
        let mut sink = vec![0; 0x10000];
        for _ in 0..rounds {
            w.process_all();
            let _ = w.socket_interest();
            while matches!(host.read(&mut sink), Ok(n) if n > 0) {}
        }
        // Still alive: a valid transmit chain goes through, provided the
        // ring itself is sane again (the driver owns it).
        g.repost_out(TX, w.q.queues[TX].next_avail(), b"end");
        w.host_write_closed = false;
        w.tx_pending = None;
        w.process_all();
        host.set_nonblocking(false).unwrap();
        host.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
        let mut end = [0u8; 3];
        host.read_exact(&mut end).unwrap();
        prop_assert_eq!(&end, b"end");
    }
}
