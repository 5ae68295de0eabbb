//! `virtio_chains`: each virtio device's queue handling against guest
//! memory and descriptor tables the guest wrote anyhow.
//!
//! Drives, picked by the input:
//! * the console: `krun_vmm::devices::console::Worker::process_all` (its
//!   four queues and the control handshake) over a socket pair whose host
//!   end the input writes to, drains or closes;
//! * the network card: `krun_vmm::devices::net::Worker::process_all`
//!   (receive and transmit, mergeable buffers or not, virtio-net headers
//!   passed through or not) over a datagram socket standing in for the
//!   tap, whose far end the input sends frames into or closes;
//! * the file system: `krun_vmm::devices::fs::process_queue` on both of its
//!   queues, serving a fresh read-only share (requests come from raw
//!   memory here, so a writable share would let the fuzzer plant symlinks
//!   to anywhere on the host; `fs_session` covers writes);
//! * the balloon: `krun_vmm::devices::balloon::Worker::process_all` (free
//!   page reports and inflation `madvise` the guest ranges they name, so
//!   a range check that let one out of guest memory would unmap the
//!   fuzzer's own memory and crash it);
//!
//! and each device's `read_config`/`write_config` with arbitrary offsets
//! and lengths.
//!
//! The queues are set up as the MMIO transport would hand them over (any
//! size, addresses and event-index setting the guest picked, but a ready
//! queue must pass `is_valid`, as the transport checks); guest memory is
//! two regions with a hole between them, filled from the input, and then
//! written step by step: raw pokes, descriptor chains (with NEXT loops,
//! INDIRECT tables, buffers across the hole or out of memory), available
//! ring entries and indices.
//!
//! Invariants: no panic, no hang (libFuzzer's `-timeout`), bounded
//! allocation (`-malloc_limit_mb`, as `hack/fuzz` runs it); the config
//! space reads as zeros past its end.
#![no_main]

use std::io::{Read, Write};
use std::os::fd::OwnedFd;
use std::os::unix::net::{UnixDatagram, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use fuse_backend_rs::api::server::Server;
use krun_oci_fuzz::ring::{Mem, Ring};
use krun_oci_fuzz::scratch;
use krun_vmm::devices::fs::{process_queue, Fs, ShareFs};
use krun_vmm::devices::{balloon, console, fs as vfs, net};
use krun_vmm::virtio::{DeviceQueues, Interrupt, VirtioDevice};
use libfuzzer_sys::arbitrary::{self, Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

/// Guest memory: two 64 KiB regions with a 64 KiB hole between them.
const R0: u64 = 0;
const R1: u64 = 0x2_0000;
const REGION: usize = 0x1_0000;

fn mem() -> &'static Mem {
    static MEM: OnceLock<Mem> = OnceLock::new();
    MEM.get_or_init(|| {
        Mem::from_ranges(&[(GuestAddress(R0), REGION), (GuestAddress(R1), REGION)])
            .expect("guest memory")
    })
}

/// A guest physical address: mostly inside one of the regions.
#[derive(Debug, Clone, Copy)]
struct Addr(u64);

impl<'a> Arbitrary<'a> for Addr {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        let sel = u8::arbitrary(u)?;
        let off = u64::from(u16::arbitrary(u)?);
        Ok(Addr(match sel {
            0..=119 => R0 + off,
            120..=239 => R1 + off,
            // Just past a region's end, in the hole, or anywhere.
            240..=247 => R0 + REGION as u64 - (off & 0xff),
            248..=251 => REGION as u64 + off,
            _ => u64::arbitrary(u)?,
        }))
    }
}

/// A buffer length: mostly small.
#[derive(Debug, Clone, Copy)]
struct Len(u32);

impl<'a> Arbitrary<'a> for Len {
    fn arbitrary(u: &mut Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(Len(if u.ratio(1, 16)? {
            u32::arbitrary(u)?
        } else {
            u32::from(u16::arbitrary(u)?)
        }))
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct QueueCfg {
    /// log2 of the size, or a raw (maybe invalid) size.
    size: Result<u8, u16>,
    desc: Addr,
    avail: Addr,
    used: Addr,
    ready: bool,
    event_idx: bool,
}

impl QueueCfg {
    fn size(&self) -> u16 {
        match self.size {
            Ok(log2) => 1u16 << (log2 % 11),
            Err(raw) => raw,
        }
    }
}

#[derive(Debug, Clone, Copy, Arbitrary)]
enum DeviceKind {
    Console {
        multiport: bool,
    },
    Net {
        mergeable: bool,
        vnet_hdr: bool,
    },
    /// Always read-only: requests come from raw memory here, so the
    /// guest could name any symlink target (fs_session covers writes, with
    /// targets it controls).
    Fs,
    Balloon,
}

#[derive(Debug, Clone, Copy, Arbitrary)]
struct RawDesc {
    addr: Addr,
    len: Len,
    flags: u8,
    /// The next descriptor; `None`: the one after.
    next: Option<u16>,
}

#[derive(Debug, Arbitrary)]
enum Step {
    /// The device serves its queues (a notification, or the socket woke).
    Process,
    /// The guest writes memory.
    Poke(Addr, Vec<u8>),
    /// The guest lays out descriptors from `first` on and publishes `first`.
    Chain {
        queue: u8,
        first: u16,
        descs: Vec<RawDesc>,
    },
    /// The guest writes an indirect descriptor table.
    Table(Addr, Vec<RawDesc>),
    /// The guest publishes a head without writing descriptors.
    Publish {
        queue: u8,
        head: u16,
    },
    /// The guest moves the available index anywhere.
    AvailIdx {
        queue: u8,
        idx: u16,
    },
    /// The host sends bytes (console) or a frame (network).
    HostSend(Vec<u8>),
    /// ... a big one, `len * 64` bytes of `byte`.
    HostSendBig {
        byte: u8,
        len: u16,
    },
    /// The host reads what the device sent it.
    HostDrain,
    /// The host goes away.
    HostClose,
    ReadConfig {
        offset: u64,
        len: u8,
    },
    WriteConfig {
        offset: u64,
        data: Vec<u8>,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    device: DeviceKind,
    queues: [QueueCfg; 4],
    /// The initial contents of the first region.
    image: Vec<u8>,
    steps: Vec<Step>,
}

/// The device under test and the host's end of its backend.
enum Dut {
    Console(console::Worker, Option<UnixStream>),
    Net(net::Worker, Option<UnixDatagram>),
    Fs(Server<ShareFs>, Vec<Queue>),
    Balloon(balloon::Worker),
}

/// A fresh share for the fs device: one file, one directory.
fn share_dir() -> PathBuf {
    let dir = scratch::dir().join("chains");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("sub")).expect("the share");
    std::fs::write(dir.join("file"), b"contents\n").expect("the share's file");
    dir
}

fn nonblocking_pair() -> (UnixStream, UnixStream) {
    let (a, b) = UnixStream::pair().expect("a socket pair");
    a.set_nonblocking(true).unwrap();
    b.set_nonblocking(true).unwrap();
    (a, b)
}

/// The device's config space, through the `VirtioDevice` trait.
fn config_device(kind: DeviceKind, share: &Path) -> Box<dyn VirtioDevice> {
    match kind {
        DeviceKind::Console { .. } => {
            let (a, _b) = nonblocking_pair();
            Box::new(console::Console::new("krun.ctl", a))
        }
        DeviceKind::Net { .. } => {
            let (a, _b) = UnixDatagram::pair().expect("a datagram pair");
            Box::new(net::Net::new(OwnedFd::from(a), "02:00:00:00:00:01").expect("a card"))
        }
        DeviceKind::Fs => Box::new(Fs::new("rootfs", share, true).expect("the share device")),
        DeviceKind::Balloon => Box::new(balloon::Balloon::new()),
    }
}

fn run(input: Input) {
    let mem = mem();
    let _ = mem.write_slice(&vec![0u8; REGION], GuestAddress(R0));
    let _ = mem.write_slice(&vec![0u8; REGION], GuestAddress(R1));
    let image = &input.image[..input.image.len().min(REGION)];
    mem.write_slice(image, GuestAddress(R0)).unwrap();

    let (nq, max) = match input.device {
        DeviceKind::Console { .. } => (console::NUM_QUEUES, console::QUEUE_MAX_SIZE),
        DeviceKind::Net { .. } => (net::NUM_QUEUES, net::QUEUE_MAX_SIZE),
        DeviceKind::Fs => (vfs::NUM_QUEUES, vfs::QUEUE_MAX_SIZE),
        DeviceKind::Balloon => (balloon::NUM_QUEUES, balloon::QUEUE_MAX_SIZE),
    };
    let mut rings = Vec::new();
    let mut queues = Vec::new();
    for cfg in &input.queues[..nq] {
        let ring = Ring::at(cfg.size(), cfg.desc.0, cfg.avail.0, cfg.used.0);
        let mut q = ring.device_queue(max);
        q.set_ready(cfg.ready);
        q.set_event_idx(cfg.event_idx);
        // The transport fails the device rather than hand it this queue.
        if q.ready() && !q.is_valid(mem) {
            return;
        }
        rings.push(Ring::at(q.size(), cfg.desc.0, cfg.avail.0, cfg.used.0));
        queues.push(q);
    }

    let share = matches!(input.device, DeviceKind::Fs).then(share_dir);
    let interrupt = Arc::new(Interrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ));
    let mut dut = match input.device {
        DeviceKind::Console { multiport } => {
            let (dev, host) = nonblocking_pair();
            let queues: [Queue; console::NUM_QUEUES] = queues.try_into().unwrap();
            let queues =
                DeviceQueues::new("virtio-console", mem.clone(), interrupt.clone(), queues);
            let w = console::Worker::new(queues, dev, "krun.ctl", multiport);
            Dut::Console(w, Some(host))
        }
        DeviceKind::Net {
            mergeable,
            vnet_hdr,
        } => {
            let (dev, host) = UnixDatagram::pair().expect("a datagram pair");
            dev.set_nonblocking(true).unwrap();
            host.set_nonblocking(true).unwrap();
            let queues: [Queue; net::NUM_QUEUES] = queues.try_into().unwrap();
            let tap = std::fs::File::from(OwnedFd::from(dev));
            let queues = DeviceQueues::new("virtio-net", mem.clone(), interrupt.clone(), queues);
            let w = net::Worker::new(queues, tap, mergeable, vnet_hdr);
            Dut::Net(w, Some(host))
        }
        DeviceKind::Fs => {
            let dir = share.as_deref().unwrap();
            let server = Server::new(ShareFs::new(dir, true).expect("the share"));
            Dut::Fs(server, queues)
        }
        DeviceKind::Balloon => {
            let queues: [Queue; balloon::NUM_QUEUES] = queues.try_into().unwrap();
            let queues =
                DeviceQueues::new("virtio-balloon", mem.clone(), interrupt.clone(), queues);
            Dut::Balloon(balloon::Worker::new(queues))
        }
    };
    let mut config: Option<Box<dyn VirtioDevice>> = None;

    for step in input.steps.iter().take(64) {
        match step {
            Step::Process => match &mut dut {
                Dut::Console(w, _) => w.process_all(),
                Dut::Net(w, _) => w.process_all(),
                Dut::Fs(server, queues) => {
                    for q in queues.iter_mut() {
                        process_queue(server, q, mem);
                    }
                }
                Dut::Balloon(w) => w.process_all(),
            },
            Step::Poke(addr, bytes) => {
                let _ = mem.write_slice(&bytes[..bytes.len().min(256)], GuestAddress(addr.0));
            }
            Step::Chain {
                queue,
                first,
                descs,
            } => {
                let Some(ring) = rings.get_mut(usize::from(*queue) % nq) else {
                    continue;
                };
                let size = ring.size.max(1);
                for (i, d) in descs.iter().take(usize::from(size)).enumerate() {
                    let index = first.wrapping_add(i as u16);
                    let next = d.next.unwrap_or(index.wrapping_add(1) % size);
                    ring.set_desc(mem, index, d.addr.0, d.len.0, u16::from(d.flags & 7), next);
                }
                ring.make_avail(mem, *first % size);
            }
            Step::Table(addr, descs) => {
                for (i, d) in descs.iter().take(64).enumerate() {
                    let next = d.next.unwrap_or(i as u16 + 1);
                    let table = Ring::at(u16::MAX, addr.0, 0, 0);
                    table.set_desc(
                        mem,
                        i as u16,
                        d.addr.0,
                        d.len.0,
                        u16::from(d.flags & 7),
                        next,
                    );
                }
            }
            Step::Publish { queue, head } => {
                if let Some(ring) = rings.get_mut(usize::from(*queue) % nq) {
                    ring.make_avail(mem, *head);
                }
            }
            Step::AvailIdx { queue, idx } => {
                if let Some(ring) = rings.get(usize::from(*queue) % nq) {
                    let at = GuestAddress(ring.avail.wrapping_add(2));
                    let _ = mem.write_obj(idx.to_le(), at);
                }
            }
            Step::HostSend(bytes) => host_send(&mut dut, bytes),
            Step::HostSendBig { byte, len } => {
                let bytes = vec![*byte; usize::from(*len) * 64];
                host_send(&mut dut, &bytes);
            }
            Step::HostDrain => host_drain(&mut dut),
            Step::HostClose => match &mut dut {
                Dut::Console(_, host) => drop(host.take()),
                Dut::Net(_, host) => drop(host.take()),
                Dut::Fs(..) | Dut::Balloon(_) => {}
            },
            Step::ReadConfig { offset, len } => {
                let dev = config.get_or_insert_with(|| {
                    config_device(input.device, share.as_deref().unwrap_or(Path::new("/")))
                });
                let mut data = vec![0xa5; usize::from(*len)];
                dev.read_config(*offset, &mut data);
                // No config space is 4 KiB long: past that, zeros.
                if *offset >= 0x1000 {
                    assert!(
                        data.iter().all(|&b| b == 0),
                        "config bytes past the space's end at {offset:#x}"
                    );
                }
            }
            Step::WriteConfig { offset, data } => {
                let dev = config.get_or_insert_with(|| {
                    config_device(input.device, share.as_deref().unwrap_or(Path::new("/")))
                });
                dev.write_config(*offset, data);
            }
        }
    }
    drop(dut);
    drop(config);
    if let Some(dir) = share {
        let _ = std::fs::remove_dir_all(dir);
    }
}

fn host_send(dut: &mut Dut, bytes: &[u8]) {
    match dut {
        Dut::Console(_, Some(host)) => {
            let _ = host.write(bytes);
        }
        Dut::Net(_, Some(host)) => {
            let _ = host.send(bytes);
        }
        _ => {}
    }
}

fn host_drain(dut: &mut Dut) {
    let mut buf = vec![0u8; 0x2_0000];
    match dut {
        Dut::Console(_, Some(host)) => while matches!(host.read(&mut buf), Ok(n) if n > 0) {},
        Dut::Net(_, Some(host)) => while host.recv(&mut buf).is_ok() {},
        _ => {}
    }
}

fuzz_target!(|input: Input| run(input));
