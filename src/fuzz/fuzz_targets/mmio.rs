//! `mmio`: the virtio-mmio transport's register window under a hostile
//! driver.
//!
//! Drives: `krun_vmm::virtio::mmio::MmioTransport::read`/`write` with any
//! sequence of accesses (any offset, widths 1/2/4/8 and odd ones, any
//! value), with helpers for what a driver does on purpose, so that the
//! fuzzer reaches activation often: the status dance (ACKNOWLEDGE, DRIVER,
//! FEATURES_OK, DRIVER_OK, resets), feature negotiation, and queue set-up
//! with sizes and ring addresses that are good, bad or garbage. The device
//! behind it is a simple one of this target's (two queues, a feature bit,
//! an 8-byte config space) that records its activation.
//!
//! Invariants: no panic; the identification registers read their fixed
//! values; a device is activated at most once, only after DRIVER_OK, and
//! only with ready queues that are valid in guest memory (the transport's
//! own check) and only with features it offered; a reset before any
//! DRIVER_OK clears the status; unknown registers and the config space
//! past its end read as zeros in every byte.
#![no_main]

use std::sync::{Arc, Mutex, OnceLock};

use krun_oci_fuzz::ring::Mem;
use krun_vmm::virtio::mmio::{
    MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
};
use krun_vmm::virtio::{
    read_config_bytes, Activation, DeviceError, Interrupt, VirtioDevice, VIRTIO_F_VERSION_1,
};
use libfuzzer_sys::arbitrary::{self, Arbitrary};
use libfuzzer_sys::fuzz_target;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

const MEM_SIZE: usize = 0x1_0000;
const CONFIG: [u8; 8] = [1, 2, 3, 4, 5, 6, 7, 8];

fn mem() -> &'static Mem {
    static MEM: OnceLock<Mem> = OnceLock::new();
    MEM.get_or_init(|| Mem::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).expect("guest memory"))
}

/// What the device saw.
#[derive(Default)]
struct Seen {
    activations: u32,
    acked: Option<u64>,
    config_writes: u32,
}

/// A device with two queues (16 and 256 entries), one feature bit and an
/// 8-byte config space; it fails activation when told to.
struct Simple {
    seen: Arc<Mutex<Seen>>,
    fail_activation: bool,
}

impl VirtioDevice for Simple {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 256]
    }
    fn features(&self) -> u64 {
        1 << 3
    }
    fn set_acked_features(&mut self, features: u64) {
        self.seen.lock().unwrap().acked = Some(features);
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&CONFIG, offset, data)
    }
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {
        self.seen.lock().unwrap().config_writes += 1;
    }
    fn activate(&mut self, a: Activation) -> Result<(), DeviceError> {
        assert_eq!(a.queues.len(), 2, "every queue is handed over");
        for (i, q) in a.queues.iter().enumerate() {
            if q.queue.ready() {
                assert!(
                    q.queue.is_valid(&a.mem),
                    "queue {i} handed over ready but invalid"
                );
            }
        }
        self.seen.lock().unwrap().activations += 1;
        if self.fail_activation {
            return Err(DeviceError::QueueCount { got: 2, want: 3 });
        }
        Ok(())
    }
}

/// Register offsets a driver uses, and a few it does not.
#[derive(Debug, Clone, Copy)]
struct Offset(u64);

impl<'a> Arbitrary<'a> for Offset {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        const REGS: [u64; 24] = [
            0x00, 0x04, 0x08, 0x0c, 0x10, 0x14, 0x20, 0x24, 0x30, 0x34, 0x38, 0x44, 0x50, 0x60,
            0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0xb0, 0xfc,
        ];
        let b = u8::arbitrary(u)?;
        Ok(Offset(match b {
            0..=191 => REGS[usize::from(b) % REGS.len()],
            192..=223 => 0x100 + u64::from(b - 192),
            224..=247 => u64::from(u16::arbitrary(u)?),
            _ => u64::arbitrary(u)?,
        }))
    }
}

/// An address for a ring: mostly inside guest memory.
#[derive(Debug, Clone, Copy)]
struct RingAddr(u64);

impl<'a> Arbitrary<'a> for RingAddr {
    fn arbitrary(u: &mut arbitrary::Unstructured<'a>) -> arbitrary::Result<Self> {
        Ok(RingAddr(if u.ratio(7, 8)? {
            u64::from(u16::arbitrary(u)?)
        } else {
            u64::arbitrary(u)?
        }))
    }
}

#[derive(Debug, Arbitrary)]
enum Access {
    /// A read of `width` bytes (1, 2, 4, 8, or any up to 16).
    Read(Offset, u8),
    /// A write of the value's low `width` bytes, or of raw bytes.
    Write(Offset, u8, u64),
    WriteBytes(Offset, Vec<u8>),
    /// The driver's side, on purpose.
    Status(u32),
    Dance,
    Reset,
    Features {
        sel: u32,
        value: u32,
    },
    SetupQueue {
        sel: u32,
        size: u32,
        desc: RingAddr,
        avail: RingAddr,
        used: RingAddr,
        ready: u32,
    },
}

#[derive(Debug, Arbitrary)]
struct Input {
    fail_activation: bool,
    accesses: Vec<Access>,
}

fn width(w: u8) -> usize {
    match w % 8 {
        0 => 1,
        1 => 2,
        2 | 3 => 4,
        4 => 8,
        _ => usize::from(w % 17),
    }
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

fn run(input: Input) {
    let seen = Arc::new(Mutex::new(Seen::default()));
    let dev = Box::new(Simple {
        seen: seen.clone(),
        fail_activation: input.fail_activation,
    });
    let irq = Arc::new(Interrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ));
    let stop = EventFd::new(EFD_NONBLOCK).expect("an eventfd");
    let mut t = MmioTransport::new(dev, mem().clone(), irq, stop).expect("the transport");
    let mut driver_ok_written = false;

    for a in input.accesses.iter().take(256) {
        let activations_before = seen.lock().unwrap().activations;
        let mut status_write = None;
        match a {
            Access::Read(off, w) => {
                let mut data = vec![0xa5u8; width(*w)];
                t.read(off.0, &mut data);
                check_read(off.0, &data);
            }
            Access::Write(off, w, v) => {
                let n = width(*w);
                let bytes: Vec<u8> = v.to_le_bytes().iter().copied().cycle().take(n).collect();
                if off.0 == 0x70 && n == 4 {
                    status_write = Some(*v as u32);
                }
                t.write(off.0, &bytes);
            }
            Access::WriteBytes(off, bytes) => {
                if off.0 == 0x70 && bytes.len() == 4 {
                    status_write = Some(u32::from_le_bytes(bytes[..4].try_into().unwrap()));
                }
                t.write(off.0, bytes);
            }
            Access::Status(v) => {
                status_write = Some(*v);
                w32(&mut t, 0x70, *v);
            }
            Access::Dance => {
                w32(&mut t, 0x70, STATUS_ACKNOWLEDGE);
                w32(&mut t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                w32(&mut t, 0x24, 0);
                w32(&mut t, 0x20, 1 << 3);
                w32(&mut t, 0x24, 1);
                w32(&mut t, 0x20, (VIRTIO_F_VERSION_1 >> 32) as u32);
                let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
                w32(&mut t, 0x70, ok);
                status_write = Some(ok | STATUS_DRIVER_OK);
                w32(&mut t, 0x70, ok | STATUS_DRIVER_OK);
            }
            Access::Reset => {
                status_write = Some(0);
                w32(&mut t, 0x70, 0);
            }
            Access::Features { sel, value } => {
                w32(&mut t, 0x24, *sel);
                w32(&mut t, 0x20, *value);
            }
            Access::SetupQueue {
                sel,
                size,
                desc,
                avail,
                used,
                ready,
            } => {
                w32(&mut t, 0x30, *sel);
                w32(&mut t, 0x38, *size);
                for (lo, addr) in [(0x80, desc), (0x90, avail), (0xa0, used)] {
                    w32(&mut t, lo, addr.0 as u32);
                    w32(&mut t, lo + 4, (addr.0 >> 32) as u32);
                }
                w32(&mut t, 0x44, *ready);
            }
        }
        let s = seen.lock().unwrap();
        if let Some(v) = status_write {
            if v & STATUS_DRIVER_OK != 0 {
                driver_ok_written = true;
            }
            // (Once the driver asked for DRIVER_OK the transport may have
            // tried to activate, and then a reset leaves the status be.)
            if v == 0 && !driver_ok_written {
                drop(s);
                assert_eq!(r32(&mut t, 0x70), 0, "a reset clears the status");
                continue;
            }
        }
        assert!(s.activations <= 1, "the device was activated twice");
        if s.activations > activations_before {
            assert!(
                driver_ok_written,
                "the device was activated without DRIVER_OK"
            );
            assert!(
                s.acked
                    .is_none_or(|f| f & !((1 << 3) | VIRTIO_F_VERSION_1) == 0),
                "features never offered were acked: {:?}",
                s.acked
            );
        }
    }
    assert_eq!(r32(&mut t, 0x00), 0x7472_6976, "MagicValue");
    assert_eq!(r32(&mut t, 0x04), 2, "Version");
    assert_eq!(r32(&mut t, 0x08), 42, "DeviceID");
}

/// What a read must return, whatever happened before.
fn check_read(off: u64, data: &[u8]) {
    let fixed: Option<u32> = match off {
        0x00 => Some(0x7472_6976),
        0x04 => Some(2),
        0x08 => Some(42),
        0x0c => Some(0x4e55_524b),
        _ => None,
    };
    if let Some(v) = fixed {
        let b = v.to_le_bytes();
        for (i, &x) in data.iter().enumerate() {
            assert_eq!(
                x,
                b.get(i).copied().unwrap_or(0),
                "register {off:#x} byte {i}"
            );
        }
    }
    if (off >= 0x100 + CONFIG.len() as u64) && off < u64::MAX - 64 {
        assert!(
            data.iter().all(|&x| x == 0),
            "config past its end at {off:#x}"
        );
    }
    let known = [
        0x00, 0x04, 0x08, 0x0c, 0x10, 0x34, 0x44, 0x60, 0x70, 0xb0, 0xb4, 0xfc,
    ];
    if off < 0x100 && !known.contains(&off) {
        assert!(
            data.iter().all(|&x| x == 0),
            "unknown register {off:#x} reads non-zero"
        );
    }
}

fuzz_target!(|input: Input| run(input));
