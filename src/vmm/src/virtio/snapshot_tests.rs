//! Capturing and restoring virtio-mmio transports: a used device comes
//! back and serves the next request from the right index, a worker parks
//! and goes on, and a damaged state is refused naming its field.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use std::os::fd::AsRawFd;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress, GuestMemory};

use vmm_sys_util::eventfd::EventFd;

use super::mmio::{
    CaptureError, MmioTransport, RestoreError, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK,
    STATUS_FEATURES_OK,
};
use super::pause::Pause;
use super::state::{QueueSnapshot, StateError, TransportState};
use super::test_utils::{eventfd, interrupt, memory, wait_for, Guest, BUFFERS};
use super::worker::{spawn_pausable, QueueHandler};
use super::{Mem, VIRTIO_F_VERSION_1};
use crate::devices::balloon::{Balloon, NUM_QUEUES, VIRTIO_BALLOON_F_REPORTING};

/// The balloon's deflate queue: every chain comes back with length 0.
const DEFLATE: usize = 1;
pub(crate) const PAUSE: Duration = Duration::from_secs(10);

pub(crate) fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Plays a driver's set-up of every queue of `g` over the registers, up
/// to DRIVER_OK.
pub(crate) fn set_up(t: &mut MmioTransport, g: &Guest, features: u64) {
    let queues: Vec<Queue> = (0..g.queues.len()).map(|i| g.queue(i)).collect();
    set_up_queues(t, &queues, features);
}

/// [`set_up`] with the driver's `queues`.
fn set_up_queues(t: &mut MmioTransport, queues: &[Queue], features: u64) {
    w32(t, 0x70, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w32(t, 0x24, 0);
    w32(t, 0x20, features as u32);
    w32(t, 0x24, 1);
    w32(t, 0x20, (features >> 32) as u32);
    let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
    w32(t, 0x70, ok);
    for (i, q) in queues.iter().enumerate() {
        w32(t, 0x30, i as u32);
        w32(t, 0x38, u32::from(q.size()));
        for (lo, addr) in [
            (0x80, q.desc_table()),
            (0x90, q.avail_ring()),
            (0xa0, q.used_ring()),
        ] {
            w32(t, lo, addr as u32);
            w32(t, lo + 4, (addr >> 32) as u32);
        }
        w32(t, 0x44, 1);
    }
    w32(t, 0x70, ok | STATUS_DRIVER_OK);
    assert_eq!(t.status() & STATUS_DRIVER_OK, STATUS_DRIVER_OK);
}

/// Waits until `count` more chains of queue `q` are used; returns them.
pub(crate) fn used(g: &mut Guest, q: usize, count: usize) -> Vec<(u16, u32)> {
    let mut got = Vec::new();
    wait_for("used chains", || {
        got.extend(g.used(q));
        (got.len() >= count).then_some(())
    });
    got
}

/// Copies all of `from` into `to`, as a restore maps memory.
pub(crate) fn copy(from: &Mem, to: &Mem) {
    let size = from.last_addr().0 as usize + 1;
    let mut bytes = vec![0u8; size];
    from.read_slice(&mut bytes, GuestAddress(0)).unwrap();
    to.write_slice(&bytes, GuestAddress(0)).unwrap();
}

fn balloon_transport(mem: &Mem, stop: &EventFd) -> MmioTransport {
    let mut t = MmioTransport::new(
        Box::new(Balloon::new()),
        mem.clone(),
        interrupt(),
        stop.try_clone().unwrap(),
    )
    .unwrap();
    t.enable_pause().unwrap();
    t
}

/// A balloon whose deflate queue served two chains, captured while
/// paused; its state through JSON and back.
fn used_balloon(mem: &Mem, g: &mut Guest, stop: &EventFd) -> (MmioTransport, TransportState) {
    let mut t = balloon_transport(mem, stop);
    // The driver's `actual`, in the configuration space.
    t.write(0x104, &7u32.to_le_bytes());
    set_up(&mut t, g, VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING);
    g.post(DEFLATE, &[(BUFFERS, 4, 0)]);
    g.post(DEFLATE, &[(BUFFERS + 0x100, 4, 0)]);
    w32(&mut t, 0x50, DEFLATE as u32);
    assert_eq!(used(g, DEFLATE, 2), [(0, 0), (1, 0)]);
    let paused = t.pause(PAUSE).unwrap();
    let state = t.capture(&paused).unwrap();
    drop(paused);
    // The worker ran confined (its seccomp allowlist, as in a VM): a
    // forbidden call while it parked would have written the stop event.
    assert_no_violation(stop);
    let json = serde_json::to_vec(&state).unwrap();
    let back: TransportState = serde_json::from_slice(&json).unwrap();
    assert_eq!(back, state);
    (t, back)
}

#[test]
fn a_restored_balloon_serves_the_next_chain_from_the_captured_index() {
    let mem = memory(1 << 20);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let (old, state) = used_balloon(&mem, &mut g, &stop);
    let q = state.queues[DEFLATE];
    assert_eq!((q.next_avail, q.next_used, q.ready), (2, 2, true));
    assert_eq!(state.device, 7u32.to_le_bytes());
    assert!(state.activated);
    let features = VIRTIO_F_VERSION_1 | VIRTIO_BALLOON_F_REPORTING;
    assert_eq!(
        (state.driver_features, state.acked_features),
        (features, features)
    );
    // The captured VM stops.
    stop.write(1).unwrap();
    wait_for("the old worker to end", || {
        (!old.worker_running()).then_some(())
    });

    // The mock driver's rings over the new memory first (making them
    // writes their indices), then the captured memory over them.
    let mem2 = memory(1 << 20);
    let mut g2 = Guest::new(&mem2, NUM_QUEUES);
    g2.next_desc = g.next_desc.clone();
    g2.used_seen = g.used_seen.clone();
    copy(&mem, &mem2);
    let irq = interrupt();
    let stop2 = eventfd();
    let mut t = MmioTransport::restore(
        Box::new(Balloon::new()),
        mem2.clone(),
        irq.clone(),
        stop2.try_clone().unwrap(),
        &state,
    )
    .unwrap();
    assert_eq!(t.status(), state.status);
    assert!(t.worker_running());
    let mut cfg = [0u8; 4];
    t.read(0x104, &mut cfg);
    assert_eq!(u32::from_le_bytes(cfg), 7, "actual");
    // The driver goes on where it was: the third chain, in slot 2.
    let head = g2.post(DEFLATE, &[(BUFFERS + 0x200, 4, 0)]);
    assert_eq!(head, 2);
    w32(&mut t, 0x50, DEFLATE as u32);
    let got = used(&mut g2, DEFLATE, 1);
    assert_eq!(got.first(), Some(&(2, 0)));
    assert_eq!(got.len(), 1, "more chains used than were made available");
    // ... and nothing went to the old memory.
    let mut old_idx = [0u8; 2];
    let used_ring = g.queue(DEFLATE).used_ring();
    mem.read_slice(&mut old_idx, GuestAddress(used_ring + 2))
        .unwrap();
    assert_eq!(u16::from_le_bytes(old_idx), 2);
    // A second capture sees the third chain.
    let paused = t.pause(PAUSE).unwrap();
    let again = t.capture(&paused).unwrap();
    assert_eq!(again.queues[DEFLATE].next_avail, 3);
    assert_eq!(again.queues[DEFLATE].next_used, 3);
    drop(paused);
    assert_no_violation(&stop2);
    stop2.write(1).unwrap();
}

/// No forbidden system call wrote the VM's stop event `stop`.
pub(crate) fn assert_no_violation(stop: &EventFd) {
    let read = stop.read().map_err(|e| e.kind());
    assert_eq!(
        read,
        Err(std::io::ErrorKind::WouldBlock),
        "the VM's stop event was written: {:?}",
        crate::seccomp::violation()
    );
}

/// A worker that counts its rounds of serving with a notification.
struct Counter {
    served: Arc<AtomicUsize>,
}

impl QueueHandler for Counter {
    fn serve(&mut self, notified: &[usize]) {
        if !notified.is_empty() {
            self.served.fetch_add(1, Ordering::SeqCst);
        }
    }

    fn capture_queues(&self) -> Option<Vec<QueueSnapshot>> {
        Some(vec![])
    }
}

#[test]
fn a_paused_worker_serves_nothing_until_resumed() {
    let pause = Arc::new(Pause::new().unwrap());
    let served = Arc::new(AtomicUsize::new(0));
    let (notify, stop) = (eventfd(), eventfd());
    let handle = spawn_pausable(
        "pause-test".into(),
        Counter {
            served: served.clone(),
        },
        vec![notify.try_clone().unwrap()],
        stop.try_clone().unwrap(),
        Some(pause.clone()),
    )
    .unwrap();
    // The first round serves every queue.
    wait_for("the first round", || {
        (served.load(Ordering::SeqCst) == 1).then_some(())
    });
    let paused = pause.request(PAUSE).unwrap();
    assert_eq!(paused.queues, Some(vec![]));
    assert!(matches!(
        pause.request(PAUSE),
        Err(super::pause::PauseError::AlreadyPaused)
    ));
    notify.write(1).unwrap();
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(served.load(Ordering::SeqCst), 1, "served while paused");
    drop(paused);
    wait_for("the notification after resuming", || {
        (served.load(Ordering::SeqCst) == 2).then_some(())
    });
    // Paused twice: the line is reusable.
    drop(pause.request(PAUSE).unwrap());
    stop.write(1).unwrap();
    handle.join().unwrap();
    assert!(!pause.attached());
    // With the worker gone a pause has nothing to wait for.
    assert_eq!(pause.request(PAUSE).unwrap().queues, None);
}

#[test]
fn a_transport_without_a_pause_line_cannot_be_captured_once_running() {
    let mem = memory(1 << 20);
    let g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let mut t = MmioTransport::new(
        Box::new(Balloon::new()),
        mem.clone(),
        interrupt(),
        stop.try_clone().unwrap(),
    )
    .unwrap();
    // Before DRIVER_OK there is nothing to park: the registers are all.
    let paused = t.pause(PAUSE).unwrap();
    let state = t.capture(&paused).unwrap();
    assert!(!state.activated);
    drop(paused);
    set_up(&mut t, &g, VIRTIO_F_VERSION_1);
    assert!(matches!(t.pause(PAUSE), Err(CaptureError::NotPausable(_))));
    stop.write(1).unwrap();
}

#[test]
fn a_capture_needs_its_own_transports_pause() {
    let mem = memory(1 << 20);
    let g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let mut t = balloon_transport(&mem, &stop);
    set_up(&mut t, &g, VIRTIO_F_VERSION_1);
    let other = balloon_transport(&mem, &stop);
    let theirs = other.pause(PAUSE).unwrap();
    assert!(matches!(
        t.capture(&theirs),
        Err(CaptureError::NotPaused(_))
    ));
    stop.write(1).unwrap();
}

fn field(e: RestoreError) -> String {
    match e {
        RestoreError::State(StateError { field, .. }) => field,
        e => panic!("{e}"),
    }
}

fn restore(mem: &Mem, state: &TransportState) -> Result<MmioTransport, RestoreError> {
    MmioTransport::restore(
        Box::new(Balloon::new()),
        mem.clone(),
        interrupt(),
        eventfd(),
        state,
    )
}

#[test]
fn a_damaged_state_is_refused_naming_the_field() {
    let mem = memory(1 << 20);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let (_t, state) = used_balloon(&mem, &mut g, &stop);
    stop.write(1).unwrap();
    type Damage = fn(&mut TransportState);
    let cases: &[(&str, Damage)] = &[
        ("queues[1].size", |s| s.queues[1].size = 24),
        ("queues[2].max_size", |s| s.queues[2].max_size = 0),
        ("queues[0].desc_table", |s| s.queues[0].desc_table = 0x1001),
        ("queues[0].used_ring", |s| s.queues[0].used_ring = 0x802),
        ("queues", |s| s.queues.truncate(2)),
        ("queues", |s| s.queues = vec![s.queues[0]; 65]),
        ("device_type", |s| s.device_type = 1),
        ("device", |s| s.device = vec![0; 3]),
        ("device", |s| s.device = vec![0; 80 * 1024]),
        ("interrupt_status", |s| s.interrupt_status = 4),
        ("acked_features", |s| s.acked_features |= 1 << 40),
        ("queues[0].max_size", |s| {
            s.queues[0].max_size = 64;
            s.queues[0].size = 64;
        }),
    ];
    for (name, damage) in cases {
        let mut bad = state.clone();
        damage(&mut bad);
        let e = restore(&mem, &bad).map(|_| ()).unwrap_err();
        assert_eq!(field(e), *name);
    }
    // A ready queue outside the restored memory fails the activation.
    let mut bad = state.clone();
    bad.queues[1].desc_table = 0x7fff_fff0;
    assert!(matches!(
        restore(&mem, &bad).map(|_| ()),
        Err(RestoreError::Activation(_))
    ));
    // What the guest may write at will is taken as it is: a guest cannot
    // make its own capture unrestorable.
    let mut odd = state.clone();
    odd.status |= 1 << 20;
    odd.driver_features |= 1 << 40;
    odd.queue_sel = u32::MAX;
    restore(&mem, &odd).unwrap();
    // The message says which field.
    let mut bad = state.clone();
    bad.queues[1].size = 24;
    assert_eq!(
        bad.validate().unwrap_err().to_string(),
        "device state field queues[1].size: 24 (a power of two up to max_size 128)"
    );
}

#[test]
fn a_device_whose_activation_failed_is_captured_and_stays_failed() {
    let mem = memory(1 << 20);
    let g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let mut t = balloon_transport(&mem, &stop);
    // Queue 0 outside guest memory: DRIVER_OK fails the device.
    set_up_queue_outside(&mut t, &g);
    assert_ne!(t.status() & super::mmio::STATUS_NEEDS_RESET, 0);
    assert!(!t.worker_running());
    let paused = t.pause(PAUSE).unwrap();
    let state = t.capture(&paused).unwrap();
    assert!(state.activated && state.failed);
    let back = restore(&mem, &state).unwrap();
    assert_eq!(back.status(), state.status);
    assert!(!back.worker_running());
}

fn set_up_queue_outside(t: &mut MmioTransport, g: &Guest) {
    w32(t, 0x24, 1);
    w32(t, 0x20, 1);
    w32(t, 0x70, STATUS_FEATURES_OK);
    for i in 0..g.queues.len() {
        let q = g.queue(i);
        w32(t, 0x30, i as u32);
        w32(t, 0x38, u32::from(q.size()));
        let desc = if i == 0 { 0xffff_0000 } else { q.desc_table() };
        w32(t, 0x80, desc as u32);
        w32(t, 0x90, q.avail_ring() as u32);
        w32(t, 0xa0, q.used_ring() as u32);
        w32(t, 0x44, 1);
    }
    w32(t, 0x70, STATUS_FEATURES_OK | STATUS_DRIVER_OK);
}

/// The registers a driver writes.
const REGISTERS: &[u64] = &[
    0x14, 0x20, 0x24, 0x30, 0x38, 0x44, 0x50, 0x64, 0x70, 0x80, 0x84, 0x90, 0x94, 0xa0, 0xa4, 0x100,
];

/// What a driver writes there: small numbers (sizes, indices, status
/// bits), addresses in or out of guest memory, anything.
fn register_value() -> impl proptest::strategy::Strategy<Value = u32> {
    use proptest::prelude::*;
    prop_oneof![0u32..20, (0u32..0x1000).prop_map(|a| a * 16), any::<u32>()]
}

/// A device with two queues, no worker, and a byte of state of its own.
struct Plain;

impl super::VirtioDevice for Plain {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> Vec<u16> {
        vec![16, 8]
    }
    fn features(&self) -> u64 {
        1 << 3
    }
    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn activate(&mut self, _: super::Activation) -> Result<(), super::DeviceError> {
        Ok(())
    }
    fn save_state(&self) -> Option<Vec<u8>> {
        Some(vec![1])
    }
    fn restore_state(&mut self, state: &[u8]) -> Result<(), StateError> {
        match state {
            [1] => Ok(()),
            _ => super::state::bad("device", "not [1]"),
        }
    }
}

fn plain(mem: &Mem) -> MmioTransport {
    let mut t = MmioTransport::new(Box::new(Plain), mem.clone(), interrupt(), eventfd()).unwrap();
    t.enable_pause().unwrap();
    t
}

proptest::proptest! {
    /// Whatever a driver writes to the registers, a state captured from
    /// them restores (a guest cannot make its own capture unrestorable),
    /// and a device not yet running comes back with the same registers.
    #[test]
    fn any_register_traffic_captures_and_restores(ops in proptest::collection::vec(
        (proptest::sample::select(REGISTERS), register_value()), 0..120)) {
        let mem = memory(0x10000);
        let mut t = plain(&mem);
        for (off, v) in ops {
            t.write(off, &v.to_le_bytes());
        }
        let paused = t.pause(PAUSE).unwrap();
        let state = match t.capture(&paused) {
            Ok(state) => state,
            // A device that runs needs its worker's queues: ours has none.
            Err(CaptureError::NotRunning(_)) => return Ok(()),
            Err(e) => panic!("{e}"),
        };
        let back = MmioTransport::restore(Box::new(Plain), mem.clone(), interrupt(), eventfd(), &state)
            .unwrap();
        let again = back.capture(&back.pause(PAUSE).unwrap()).unwrap();
        proptest::prop_assert_eq!(again, state);
    }
}

/// The lesson of an earlier attempt: activating a device with a pause line
/// happens on a vCPU thread (the driver's DRIVER_OK write), whose
/// allowlist has no eventfd2. Here the activation runs on a thread
/// confined as a vCPU, with the VM's spawner, as in a VM: no forbidden
/// call, and the worker parks under its own allowlist.
#[test]
fn a_pausable_device_activates_on_a_confined_vcpu_thread() {
    let mem = memory(1 << 20);
    let mut g = Guest::new(&mem, NUM_QUEUES);
    let stop = eventfd();
    let spawner = crate::spawner::Spawner::start(&stop).unwrap();
    // Built on the set-up thread: the pause line's eventfd is made here.
    let mut t = balloon_transport(&mem, &stop);
    let vcpu_stop = stop.try_clone().unwrap();
    let queues: Vec<Queue> = (0..NUM_QUEUES).map(|i| g.queue(i)).collect();
    let mut t = std::thread::spawn(move || {
        spawner.enter();
        crate::seccomp::confine(crate::seccomp::Kind::Vcpu, vcpu_stop.as_raw_fd()).unwrap();
        set_up_queues(&mut t, &queues, VIRTIO_F_VERSION_1);
        t
    })
    .join()
    .unwrap();
    assert_no_violation(&stop);
    assert!(t.worker_running());
    g.post(DEFLATE, &[(BUFFERS, 4, 0)]);
    w32(&mut t, 0x50, DEFLATE as u32);
    assert_eq!(used(&mut g, DEFLATE, 1), [(0, 0)]);
    let paused = t.pause(PAUSE).unwrap();
    assert_eq!(t.capture(&paused).unwrap().queues[DEFLATE].next_used, 1);
    drop(paused);
    assert_no_violation(&stop);
    stop.write(1).unwrap();
}
