//! The test kit of every virtio device: a mock driver over
//! virtio-queue's mock split queues ([`Guest`]), guest memory, the
//! descriptor flags, the wiring of a worker thread, and the strategies of
//! a hostile driver's descriptor tables and rings (Firecracker's
//! `devices/virtio/test_utils.rs`).
//!
//! A device test makes memory ([`memory`]) and a [`Guest`] with as many
//! queues as the device has, hands [`Guest::device_queues`] to the device,
//! then plays the driver: [`Guest::post`] chains, let the device serve
//! them, read back [`Guest::used`] and [`Guest::received`].
//! A worker ([`Guest::serving`] hands it its queues) is driven step by
//! step; a worker thread, inside [`with_worker_thread`].

use std::collections::HashMap;
use std::io::{self, Read};
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use proptest::prelude::*;
use virtio_bindings::virtio_ring::{VRING_DESC_F_INDIRECT, VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;
use virtio_queue::mock::{MockSplitQueue, UsedRing};
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use super::{Activation, ActiveQueue, DeviceQueues, Interrupt, Mem, VirtioDevice};

/// Descriptor flags (virtio spec 2.7.5).
pub const F_NEXT: u16 = VRING_DESC_F_NEXT as u16;
pub const F_WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const F_INDIRECT: u16 = VRING_DESC_F_INDIRECT as u16;

/// The size of every queue the mock driver sets up.
pub const QSIZE: u16 = 16;

/// Where the queues go in guest memory, one page each from the base;
/// buffers from [`Guest::alloc`] start at [`BUFFERS`].
const QUEUE_STRIDE: u64 = 0x1000;
/// Where a queue's used ring sits in its page.
const USED_RING_OFFSET: u64 = 0x800;
/// The first buffer address [`Guest::alloc`] hands out.
pub const BUFFERS: u64 = 0x1_0000;

/// Where [`Guest::repost_out`] puts its data, in the buffers' area.
pub const SANE_OUT: u64 = 0x1_1000;

/// A descriptor as the tests write it: address, length, flags.
pub type Desc = (u64, u32, u16);

/// Guest memory of `size` bytes from address 0.
pub fn memory(size: usize) -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), size)]).unwrap()
}

pub fn eventfd() -> EventFd {
    EventFd::new(EFD_NONBLOCK).unwrap()
}

/// An interrupt line whose eventfd the test reads.
pub fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(eventfd()))
}

/// What the transport hands a device at DRIVER_OK: `queues`, each with a
/// copy of its eventfd in `notify`, and a copy of `stop`.
pub fn activation(
    mem: &Mem,
    interrupt: &Arc<Interrupt>,
    queues: Vec<Queue>,
    notify: &[EventFd],
    stop: &EventFd,
) -> Activation {
    let queues = queues
        .into_iter()
        .zip(notify)
        .map(|(queue, n)| ActiveQueue {
            queue,
            notify: n.try_clone().unwrap(),
        })
        .collect();
    Activation {
        mem: mem.clone(),
        interrupt: interrupt.clone(),
        queues,
        stop: stop.try_clone().unwrap(),
        pause: None,
    }
}

/// The transport's side of a device whose worker thread runs: the
/// interrupt line, each queue's notifier and the VM's stop eventfd.
pub struct Running {
    pub irq: Arc<Interrupt>,
    pub notify: Vec<EventFd>,
    pub stop: EventFd,
}

impl Running {
    /// Activates `dev` over every queue of `g`, as the transport does at
    /// DRIVER_OK.
    pub fn start(dev: &mut dyn VirtioDevice, mem: &Mem, g: &Guest) -> Running {
        let irq = interrupt();
        let notify: Vec<EventFd> = (0..g.queues.len()).map(|_| eventfd()).collect();
        let stop = eventfd();
        let queues = (0..g.queues.len()).map(|q| g.queue(q)).collect();
        dev.activate(activation(mem, &irq, queues, &notify, &stop))
            .unwrap();
        Running { irq, notify, stop }
    }

    /// The driver notifies queue `q`.
    pub fn kick(&self, q: usize) {
        self.notify[q].write(1).unwrap();
    }

    /// Stops the VM and waits for the device's `worker` thread to end.
    pub fn stop(&self, worker: Option<JoinHandle<()>>) {
        self.stop.write(1).unwrap();
        worker.expect("a worker thread").join().unwrap();
    }
}

/// The life of a device's worker thread in a test: activates `dev` over
/// every queue of `g`, lets `drive` play the driver, checks that the
/// worker raised the interrupt, then stops the VM and waits for the
/// thread, which `take_worker` hands over.
pub fn with_worker_thread<D: VirtioDevice>(
    dev: &mut D,
    take_worker: impl FnOnce(&mut D) -> Option<JoinHandle<()>>,
    mem: &Mem,
    g: &mut Guest,
    drive: impl FnOnce(&mut Guest, &Running),
) {
    let running = Running::start(dev, mem, g);
    drive(g, &running);
    assert!(running.irq.eventfd().read().unwrap() > 0);
    running.stop(take_worker(dev));
}

/// The host's end of a device's backend: a stream (the console's
/// socket) or datagrams (the tap's stand-in).
pub trait HostEnd {
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
    /// One read, or one datagram, into `buf`.
    fn read_once(&self, buf: &mut [u8]) -> io::Result<usize>;
}

impl HostEnd for UnixStream {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixStream::set_nonblocking(self, on)
    }
    fn read_once(&self, buf: &mut [u8]) -> io::Result<usize> {
        (&*self).read(buf)
    }
}

impl HostEnd for UnixDatagram {
    fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        UnixDatagram::set_nonblocking(self, on)
    }
    fn read_once(&self, buf: &mut [u8]) -> io::Result<usize> {
        self.recv(buf)
    }
}

/// Asserts that the device sent nothing more to `host`: a read would
/// block.
pub fn assert_nothing_waits(host: &impl HostEnd) {
    host.set_nonblocking(true).unwrap();
    let mut b = [0u8; 16];
    let r = host.read_once(&mut b);
    assert!(
        matches!(&r, Err(e) if e.kind() == io::ErrorKind::WouldBlock),
        "{r:?}"
    );
    host.set_nonblocking(false).unwrap();
}

/// Polls `f` until it has something (a worker thread answered), for at
/// most ten seconds.
pub fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < deadline,
            "{what}: the worker did not answer"
        );
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// The driver's side of a device's queues, over virtio-queue's mock.
///
/// The mock (0.17) puts its used ring over the second half of its
/// available ring (it takes the ring's length in bytes for its entry
/// count): the used rings are elsewhere, ours.
pub struct Guest<'a> {
    pub mem: &'a Mem,
    pub queues: Vec<MockSplitQueue<'a, Mem>>,
    used_rings: Vec<UsedRing<'a, Mem>>,
    base: u64,
    /// The descriptor index each queue's next chain starts at.
    pub next_desc: Vec<u16>,
    /// How far [`Guest::used`] has read each used ring.
    pub used_seen: Vec<u16>,
    chains: HashMap<(usize, u16), Vec<Desc>>,
    /// Where [`Guest::alloc`] hands out the next buffer.
    pub next_buf: u64,
}

impl<'a> Guest<'a> {
    /// `count` queues, from address 0.
    pub fn new(mem: &'a Mem, count: usize) -> Guest<'a> {
        Guest::at(mem, 0, count)
    }

    /// `count` queues, from address `base` (below [`BUFFERS`]).
    pub fn at(mem: &'a Mem, base: u64, count: usize) -> Guest<'a> {
        let queue_addr = |i: usize| base + QUEUE_STRIDE * i as u64;
        let queues = (0..count)
            .map(|i| MockSplitQueue::create(mem, GuestAddress(queue_addr(i)), QSIZE))
            .collect();
        let used_rings = (0..count)
            .map(|i| UsedRing::new(mem, GuestAddress(queue_addr(i) + USED_RING_OFFSET), QSIZE))
            .collect();
        Guest {
            mem,
            queues,
            used_rings,
            base,
            next_desc: vec![0; count],
            used_seen: vec![0; count],
            chains: HashMap::new(),
            next_buf: BUFFERS,
        }
    }

    /// Queue `q` as the device gets it from the transport.
    pub fn queue(&self, q: usize) -> Queue {
        let mut queue = self.queues[q].create_queue::<Queue>().unwrap();
        let used = self.base + QUEUE_STRIDE * q as u64 + USED_RING_OFFSET;
        queue.set_used_ring_address(Some(used as u32), Some((used >> 32) as u32));
        assert!(queue.is_valid(self.mem));
        queue
    }

    /// Every queue, as a device's worker takes them.
    pub fn device_queues<const N: usize>(&self) -> [Queue; N] {
        assert_eq!(N, self.queues.len());
        std::array::from_fn(|q| self.queue(q))
    }

    /// Every queue, ready-made for a device's worker as activation hands
    /// them over, with a fresh interrupt line.
    pub fn serving<const N: usize>(&self) -> DeviceQueues<N> {
        DeviceQueues::new("test", self.mem.clone(), interrupt(), self.device_queues())
    }

    /// Guest memory for a buffer of `len` bytes.
    pub fn alloc(&mut self, len: u64) -> u64 {
        let a = self.next_buf;
        self.next_buf += len.next_multiple_of(0x100);
        a
    }

    /// Writes descriptor `index` of queue `q` as it is (no NEXT added).
    pub fn set_desc(&self, q: usize, index: u16, (addr, len, flags): Desc, next: u16) {
        let d = SplitDescriptor::new(addr, len, flags, next);
        self.queues[q]
            .desc_table()
            .store(index, RawDescriptor::from(d))
            .unwrap();
    }

    /// Makes a chain of (addr, len, flags) available on queue `q`, from
    /// the next free descriptors on (NEXT is added); returns its head.
    pub fn post(&mut self, q: usize, descs: &[Desc]) -> u16 {
        let n = descs.len() as u16;
        let idx: Vec<u16> = (0..n).map(|k| (self.next_desc[q] + k) % QSIZE).collect();
        self.next_desc[q] = (self.next_desc[q] + n) % QSIZE;
        for (k, &(addr, len, flags)) in descs.iter().enumerate() {
            let (flags, next) = match idx.get(k + 1) {
                Some(&next) => (flags | F_NEXT, next),
                None => (flags, 0),
            };
            self.set_desc(q, idx[k], (addr, len, flags), next);
        }
        self.chains.insert((q, idx[0]), descs.to_vec());
        self.make_avail(q, idx[0]);
        idx[0]
    }

    /// Makes available a chain of two descriptors `(addr, len)` that lead
    /// to each other, 0 -> 1 -> 0 ...: a loop only the chain iterator's
    /// bound (the queue's size) ends. Returns its head.
    pub fn post_loop(&mut self, q: usize, addr: u64, len: u32) -> u16 {
        let base = self.next_desc[q];
        let (d0, d1) = (base, (base + 1) % QSIZE);
        for (i, next) in [(d0, d1), (d1, d0)] {
            self.set_desc(q, i, (addr, len, F_NEXT), next);
        }
        self.next_desc[q] = (base + 2) % QSIZE;
        self.make_avail(q, d0);
        d0
    }

    /// Puts `head` on the available ring of queue `q`.
    pub fn make_avail(&self, q: usize, head: u16) {
        let slot = self.queues[q].avail().idx().load();
        self.set_avail(q, slot, head);
    }

    /// Puts `head` in slot `slot` of queue `q`'s available ring, the last
    /// one available.
    fn set_avail(&self, q: usize, slot: u16, head: u16) {
        let avail = self.queues[q].avail();
        avail
            .ring()
            .ref_at((slot % QSIZE) as usize)
            .unwrap()
            .store(head);
        avail.idx().store(slot.wrapping_add(1));
    }

    /// New used elements of queue `q`: (head, len).
    pub fn used(&mut self, q: usize) -> Vec<(u16, u32)> {
        let used = &self.used_rings[q];
        let idx = used.idx().load();
        let mut out = Vec::new();
        while self.used_seen[q] != idx {
            let e = used
                .ring()
                .ref_at((self.used_seen[q] % QSIZE) as usize)
                .unwrap()
                .load();
            out.push((e.id() as u16, e.len()));
            self.used_seen[q] = self.used_seen[q].wrapping_add(1);
        }
        out
    }

    /// The bytes the device returned in each new used buffer of `q`.
    pub fn received(&mut self, q: usize) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        for (head, len) in self.used(q) {
            let mut left = len as usize;
            let mut data = Vec::new();
            for &(addr, dlen, flags) in &self.chains[&(q, head)] {
                if flags & F_WRITE == 0 || left == 0 {
                    continue;
                }
                let n = left.min(dlen as usize);
                data.extend(self.read(addr, n));
                left -= n;
            }
            assert_eq!(left, 0, "used length beyond the buffers");
            out.push(data);
        }
        out
    }

    pub fn write(&self, addr: u64, data: &[u8]) {
        self.mem.write_slice(data, GuestAddress(addr)).unwrap();
    }

    pub fn read(&self, addr: u64, len: usize) -> Vec<u8> {
        let mut v = vec![0; len];
        self.mem.read_slice(&mut v, GuestAddress(addr)).unwrap();
        v
    }

    /// Posts a writable buffer of `len` bytes on queue `q`.
    pub fn post_in(&mut self, q: usize, len: u32) -> u16 {
        let a = self.alloc(len as u64);
        self.post(q, &[(a, len, F_WRITE)])
    }

    /// Posts `data` on queue `q` as one readable buffer.
    pub fn post_out(&mut self, q: usize, data: &[u8]) -> u16 {
        let a = self.alloc(data.len() as u64);
        self.write(a, data);
        self.post(q, &[(a, data.len() as u32, 0)])
    }

    /// Waits until a worker thread has returned at least `count` buffers
    /// on queue `q`; the bytes of each, as [`Guest::received`] reads them.
    pub fn wait_received(&mut self, q: usize, count: usize) -> Vec<Vec<u8>> {
        let mut got = Vec::new();
        wait_for(&format!("queue {q}"), || {
            got.extend(self.received(q));
            (got.len() >= count).then_some(())
        });
        got
    }

    /// Writes a hostile driver's descriptor tables and available rings
    /// over the queues, `rings[q]` over queue `q`.
    pub fn load(&self, rings: &[RandomRing]) {
        for (q, ring) in rings.iter().enumerate() {
            for (i, &(addr, len, flags, next)) in ring.table.iter().enumerate() {
                let flags = flags & (F_NEXT | F_WRITE | F_INDIRECT);
                self.set_desc(q, i as u16, (addr, len, flags), next);
            }
            let avail = self.queues[q].avail();
            for (i, &h) in ring.heads.iter().enumerate() {
                avail.ring().ref_at(i).unwrap().store(h);
            }
            avail.idx().store(ring.idx);
        }
    }

    /// Makes the ring of queue `q` sane again after [`Guest::load`] with
    /// one readable chain of `data` (descriptor 0, at [`SANE_OUT`]), in
    /// slot `next`: the device, still alive, sends `data` on.
    pub fn repost_out(&self, q: usize, next: u16, data: &[u8]) {
        self.write(SANE_OUT, data);
        self.repost(q, next, 0, (SANE_OUT, data.len() as u32, 0));
    }

    /// Makes the ring of queue `q` sane again after [`Guest::load`]: the
    /// chain of the one descriptor `index`, `desc`, is the only one
    /// available, in slot `next` (where the device will look next).
    pub fn repost(&self, q: usize, next: u16, index: u16, desc: Desc) {
        self.set_desc(q, index, desc, 0);
        self.set_avail(q, next, index);
    }
}

/// A descriptor table and an available ring as a hostile driver may
/// write them: any address (mostly in `mem_size`), length, flags and
/// next index; heads and an index past the queue's end.
#[derive(Clone, Debug)]
pub struct RandomRing {
    /// (addr, len, flags, next) of each descriptor.
    pub table: Vec<(u64, u32, u16, u16)>,
    pub heads: Vec<u16>,
    pub idx: u16,
}

/// A descriptor whose fields a hostile driver chose.
pub fn arb_desc(mem_size: u64) -> impl Strategy<Value = (u64, u32, u16, u16)> {
    (
        prop_oneof![0..mem_size, any::<u64>()],
        prop_oneof![0u32..0x3000, any::<u32>()],
        0u16..8,
        0u16..QSIZE + 4,
    )
}

pub fn arb_ring(mem_size: u64) -> impl Strategy<Value = RandomRing> {
    (
        proptest::collection::vec(arb_desc(mem_size), QSIZE as usize),
        proptest::collection::vec(0u16..QSIZE + 4, QSIZE as usize),
        0u16..QSIZE + 3,
    )
        .prop_map(|(table, heads, idx)| RandomRing { table, heads, idx })
}

/// A random ring for each of `count` queues.
pub fn arb_rings(count: usize, mem_size: u64) -> impl Strategy<Value = Vec<RandomRing>> {
    proptest::collection::vec(arb_ring(mem_size), count)
}
