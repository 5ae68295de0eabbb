//! The balloon's tests: free page reports and inflation release exactly
//! the pages they name and nothing else, hostile ranges and chains are
//! skipped and returned, and the worker thread serves the queues.

use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::GuestAddress;

use super::worker::MAX_PFNS_PER_CHAIN;
use super::*;
use crate::virtio::test_utils::*;
use crate::virtio::{Mem, TYPE_BALLOON};

/// Guest RAM of the tests: two 1 MiB regions with a 1 MiB hole, as the
/// MMIO gap splits a VM's RAM.
const R1: u64 = 0x20_0000;
const REGION: usize = 0x10_0000;
/// The pages the tests report, in region 0 above the queues and buffers.
const AREA: u64 = 0x8_0000;
const PATTERN: u8 = 0xa5;

fn two_regions() -> Mem {
    Mem::from_ranges(&[(GuestAddress(0), REGION), (GuestAddress(R1), REGION)]).unwrap()
}

/// Fills `[addr, addr + len)` with the pattern.
fn fill(g: &Guest, addr: u64, len: usize) {
    g.write(addr, &vec![PATTERN; len]);
}

/// Whether every byte of `[addr, addr + len)` is `byte`.
fn all(g: &Guest, addr: u64, len: usize, byte: u8) -> bool {
    g.read(addr, len).iter().all(|&b| b == byte)
}

/// The balloon's queues in `mem`, driven by a guest, and a worker.
fn rig(mem: &Mem) -> (Guest<'_>, Worker) {
    let g = Guest::new(mem, NUM_QUEUES);
    let w = Worker::new(g.serving());
    (g, w)
}

#[test]
fn device_surface() {
    let mut b = Balloon::new();
    assert_eq!(b.device_type(), TYPE_BALLOON);
    assert_eq!(b.queue_max_sizes(), vec![QUEUE_MAX_SIZE; 3]);
    assert_eq!(b.features(), 1 << 5);
    let mut cfg = [0xffu8; 12];
    b.read_config(0, &mut cfg);
    assert_eq!(cfg, [0; 12]);
    // The driver writes actual; num_pages is not its to write.
    b.write_config(4, &7u32.to_le_bytes());
    b.write_config(0, &9u32.to_le_bytes());
    b.write_config(u64::MAX, &[1, 2, 3]);
    b.read_config(0, &mut cfg);
    assert_eq!(&cfg[..8], &[0, 0, 0, 0, 7, 0, 0, 0]);
    // A write straddling num_pages and actual changes only actual's bytes.
    b.write_config(2, &[0xee, 0xee, 1, 1]);
    let mut actual = [0u8; 4];
    b.read_config(4, &mut actual);
    assert_eq!(u32::from_le_bytes(actual), 0x0101);
}

#[test]
fn a_report_releases_its_pages() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    fill(&g, AREA - 0x1000, 0x4_0000);
    fill(&g, R1, 0x3000);
    let head = g.post(
        REPORTING,
        &[(AREA, 0x2_0000, F_WRITE), (R1 + 0x1000, 0x1000, F_WRITE)],
    );
    w.process_all();
    assert_eq!(g.used(REPORTING), vec![(head, 0)]);
    assert!(all(&g, AREA, 0x2_0000, 0), "reported pages read zeros");
    assert!(all(&g, R1 + 0x1000, 0x1000, 0));
    // Their neighbours keep their contents.
    assert!(all(&g, AREA - 0x1000, 0x1000, PATTERN));
    assert!(all(&g, AREA + 0x2_0000, 0x1000, PATTERN));
    assert!(all(&g, R1, 0x1000, PATTERN));
    assert!(all(&g, R1 + 0x2000, 0x1000, PATTERN));
    assert_eq!(w.released(), 0x2_1000);
}

#[test]
fn an_unaligned_range_is_rounded_inward() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    fill(&g, AREA, 0x4000);
    // 0x800 into page 0 to 0x800 into page 2: only page 1 is whole.
    g.post(REPORTING, &[(AREA + 0x800, 0x2000, F_WRITE)]);
    // Less than a page, inside one: nothing.
    g.post(REPORTING, &[(AREA + 0x3100, 0xe00, F_WRITE)]);
    w.process_all();
    assert_eq!(g.used(REPORTING).len(), 2);
    assert!(all(&g, AREA, 0x1000, PATTERN));
    assert!(all(&g, AREA + 0x1000, 0x1000, 0));
    assert!(all(&g, AREA + 0x2000, 0x2000, PATTERN));
    assert_eq!(w.released(), 0x1000);
}

#[test]
fn hostile_ranges_release_nothing() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    let end0 = REGION as u64;
    fill(&g, end0 - 0x2000, 0x2000);
    fill(&g, R1, 0x1000);
    fill(&g, R1 + REGION as u64 - 0x1000, 0x1000);
    let hostile: [(u64, u32); 8] = [
        // Across the end of region 0 into the hole.
        (end0 - 0x1000, 0x2000),
        // In the hole, and from the hole into region 1.
        (end0 + 0x1000, 0x1000),
        (R1 - 0x1000, 0x2000),
        // Across the end of region 1, and beyond all RAM.
        (R1 + REGION as u64 - 0x1000, 0x2000),
        (1 << 40, 0x10_0000),
        // Wrapping around the address space.
        (u64::MAX - 0xfff, 0x2000),
        // Empty, and a huge length from inside RAM.
        (end0 - 0x2000, 0),
        (end0 - 0x2000, u32::MAX),
    ];
    for (addr, len) in hostile {
        g.post(REPORTING, &[(addr, len, F_WRITE)]);
        w.process_all();
    }
    assert_eq!(g.used(REPORTING).len(), hostile.len(), "all returned");
    assert!(g.used(REPORTING).iter().all(|&(_, len)| len == 0));
    assert!(all(&g, end0 - 0x2000, 0x2000, PATTERN));
    assert!(all(&g, R1, 0x1000, PATTERN));
    assert!(all(&g, R1 + REGION as u64 - 0x1000, 0x1000, PATTERN));
    assert_eq!(w.released(), 0);
    assert_eq!(
        release_range(&mem, u64::MAX - 0xfff, 0x2000),
        Err(BadRange::Overflow {
            addr: u64::MAX - 0xfff,
            len: 0x2000
        })
    );
    assert!(matches!(
        release_range(&mem, end0 - 0x1000, 0x2000),
        Err(BadRange::OutsideRam { .. })
    ));
}

#[test]
fn read_only_and_malformed_chains_are_returned() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    fill(&g, AREA, 0x2000);
    // Reports are device-writable buffers: a readable one is skipped.
    let ro = g.post(REPORTING, &[(AREA, 0x1000, 0)]);
    // A descriptor loop: the chain iterator's bound ends it.
    let looped = g.post_loop(REPORTING, AREA + 0x1000, 0x1000);
    w.process_all();
    let used: Vec<u16> = g.used(REPORTING).iter().map(|&(h, _)| h).collect();
    assert_eq!(used, vec![ro, looped]);
    assert!(all(&g, AREA, 0x2000, PATTERN));
    // The queue still works.
    g.post(REPORTING, &[(AREA, 0x1000, F_WRITE)]);
    w.process_all();
    assert_eq!(g.used(REPORTING).len(), 1);
    assert!(all(&g, AREA, 0x1000, 0));
}

#[test]
fn inflation_releases_the_frames_listed() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    let base = AREA / BALLOON_PAGE;
    fill(&g, AREA, 0x6000);
    fill(&g, R1, 0x1000);
    // Two consecutive frames, one apart, one in region 1, then hostile
    // ones: in the hole, past all RAM.
    let pfns: Vec<u32> = vec![
        base as u32,
        base as u32 + 1,
        base as u32 + 4,
        (R1 / BALLOON_PAGE) as u32,
        (REGION as u64 / BALLOON_PAGE) as u32 + 3,
        u32::MAX,
    ];
    let bytes: Vec<u8> = pfns.iter().flat_map(|p| p.to_le_bytes()).collect();
    let head = g.post_out(INFLATE, &bytes);
    // A list outside guest memory, and a write-only one.
    let outside = g.post(INFLATE, &[(1 << 40, 16, 0)]);
    let wo = g.post(INFLATE, &[(AREA, 8, F_WRITE)]);
    w.process_all();
    assert_eq!(g.used(INFLATE), vec![(head, 0), (outside, 0), (wo, 0)]);
    assert!(all(&g, AREA, 0x2000, 0));
    assert!(all(&g, AREA + 0x2000, 0x2000, PATTERN));
    assert!(all(&g, AREA + 0x4000, 0x1000, 0));
    assert!(all(&g, AREA + 0x5000, 0x1000, PATTERN));
    assert!(all(&g, R1, 0x1000, 0));
    assert_eq!(w.released(), 0x4000);
}

#[test]
fn an_inflate_chain_costs_a_bounded_amount_of_work() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    // 64 Ki frames (one page repeated): only the first 4096 are read.
    let list = g.alloc(0x4_0000);
    let frame = ((AREA / BALLOON_PAGE) as u32).to_le_bytes();
    g.write(list, &frame.repeat(0x1_0000));
    g.post(INFLATE, &[(list, 0x4_0000, 0)]);
    w.process_all();
    assert_eq!(g.used(INFLATE).len(), 1);
    assert_eq!(w.released(), MAX_PFNS_PER_CHAIN * BALLOON_PAGE);
}

#[test]
fn deflation_returns_the_chains() {
    let mem = two_regions();
    let (mut g, mut w) = rig(&mem);
    fill(&g, AREA, 0x1000);
    let head = g.post_out(DEFLATE, &(AREA / BALLOON_PAGE).to_le_bytes()[..4]);
    w.process_all();
    assert_eq!(g.used(DEFLATE), vec![(head, 0)]);
    assert!(all(&g, AREA, 0x1000, PATTERN));
}

#[test]
fn a_driver_without_reporting_leaves_queue_2_alone() {
    let mem = two_regions();
    let g = Guest::new(&mem, NUM_QUEUES);
    let mut queues = g.serving::<NUM_QUEUES>();
    queues.queues[REPORTING].set_ready(false);
    let mut w = Worker::new(queues);
    let mut g = g;
    fill(&g, AREA, 0x1000);
    g.post(REPORTING, &[(AREA, 0x1000, F_WRITE)]);
    w.process_all();
    assert!(g.used(REPORTING).is_empty());
    assert!(all(&g, AREA, 0x1000, PATTERN));
}

#[test]
fn the_worker_thread_serves_reports() {
    let mem = two_regions();
    let mut g = Guest::new(&mem, NUM_QUEUES);
    fill(&g, AREA, 0x1_0000);
    let mut dev = Balloon::new();
    dev.set_acked_features(VIRTIO_BALLOON_F_REPORTING);
    with_worker_thread(
        &mut dev,
        Balloon::take_worker,
        &mem,
        &mut g,
        |g, running| {
            g.post(REPORTING, &[(AREA, 0x1_0000, F_WRITE)]);
            running.kick(REPORTING);
            wait_for("the report", || {
                (!g.used(REPORTING).is_empty()).then_some(())
            });
            assert!(all(g, AREA, 0x1_0000, 0));
            g.post_out(DEFLATE, &[0; 4]);
            running.kick(DEFLATE);
            wait_for("the deflate chain", || {
                (!g.used(DEFLATE).is_empty()).then_some(())
            });
        },
    );
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(128))]
    /// Random descriptor tables and available rings on the three queues
    /// (they may well report the rings themselves free): no panic, and
    /// afterwards the device still serves a good report.
    #[test]
    fn random_rings_never_panic(
        rings in arb_rings(NUM_QUEUES, 0x4_0000),
        rounds in 1usize..4,
    ) {
        let mem = two_regions();
        let (g, mut w) = rig(&mem);
        g.load(&rings);
        for _ in 0..rounds {
            w.process_all();
        }
        fill(&g, AREA, 0x1000);
        g.repost(REPORTING, w.q.queues[REPORTING].next_avail(), 0, (AREA, 0x1000, F_WRITE));
        let before = w.released();
        w.process_all();
        prop_assert!(all(&g, AREA, 0x1000, 0));
        prop_assert_eq!(w.released() - before, 0x1000);
    }
}
