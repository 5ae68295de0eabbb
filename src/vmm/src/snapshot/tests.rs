//! The snapshot file without KVM: a round trip, and every way a damaged
//! or foreign file is refused.

use std::path::Path;

use kvm_bindings::{kvm_fpu, kvm_mp_state, kvm_regs, kvm_sregs};
use vm_memory::{Bytes, GuestAddress};

use super::pod::to_bytes;
use super::*;

fn vcpu(id: u32) -> VcpuState {
    VcpuState {
        id,
        tsc_khz: None,
        mp_state: to_bytes(&kvm_mp_state::default()),
        regs: to_bytes(&kvm_regs {
            rip: 0x1000,
            ..Default::default()
        }),
        sregs: to_bytes(&kvm_sregs::default()),
        fpu: to_bytes(&kvm_fpu::default()),
        xsave: None,
        xcrs: None,
        debugregs: None,
        lapic: None,
        cpuid: vec![],
        msrs: vec![(0x10, 42)],
        events: None,
    }
}

fn snapshot(mib: u64) -> Snapshot {
    Snapshot {
        header: Header {
            vcpus: 1,
            memory_size: mib << 20,
            kernel: "sha256:k".into(),
            initramfs: "sha256:i".into(),
            guest_init: "sha256:g".into(),
        },
        vcpus: vec![vcpu(0)],
        vm: VmState::default(),
        devices: vec![],
        serial: None,
    }
}

/// A valid snapshot file of 1 MiB of memory with a marker in it.
fn write_one(dir: &Path) -> std::path::PathBuf {
    let mem = crate::memory::create(1 << 20).unwrap();
    mem.write_obj(0xfeed_f00du32, GuestAddress(0x2000)).unwrap();
    let path = dir.join("snap");
    snapshot(1).write(&path, &mem).unwrap();
    path
}

fn err(path: &Path) -> String {
    Snapshot::read(path).unwrap_err().to_string()
}

#[test]
fn a_snapshot_round_trips_and_its_memory_maps_and_copies() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let loaded = Snapshot::read(&path).unwrap();
    assert_eq!(loaded.snapshot, snapshot(1));
    for mem in [loaded.map_memory().unwrap(), loaded.copy_memory().unwrap()] {
        assert_eq!(
            mem.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
            0xfeed_f00d
        );
        assert_eq!(mem.read_obj::<u32>(GuestAddress(0x3000)).unwrap(), 0);
    }
    // Zero pages are holes: 1 MiB of memory, one page of it written.
    let blocks = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap());
    assert!(blocks * 512 < 64 << 10, "{blocks} blocks");
}

#[test]
fn a_file_verified_before_is_opened_without_its_checksum() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    // A byte of guest memory changed: only the checksum can tell.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[4096 + 0x2000] ^= 1;
    std::fs::write(&path, &bytes).unwrap();
    assert_eq!(
        err(&path),
        "snapshot checksum mismatch: the file is corrupt"
    );
    let open = |verify| Snapshot::open(std::fs::File::open(&path).unwrap(), &path, verify);
    assert!(open(Verify::Whole).is_err());
    let loaded = open(Verify::ShapeOnly).unwrap();
    assert_eq!(loaded.snapshot, snapshot(1));
    // The shape is still checked: a file cut short is refused.
    std::fs::write(&path, &bytes[..bytes.len() - 4096]).unwrap();
    let e = open(Verify::ShapeOnly).unwrap_err().to_string();
    assert!(e.contains("truncated"), "{e}");
}

#[test]
fn a_private_mapping_never_writes_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let loaded = Snapshot::read(&path).unwrap();
    let mem = loaded.map_memory().unwrap();
    mem.write_obj(1u32, GuestAddress(0x2000)).unwrap();
    let again = Snapshot::read(&path).unwrap();
    let fresh = again.map_memory().unwrap();
    assert_eq!(
        fresh.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
        0xfeed_f00d
    );
}

/// What backs the host page of `addr` in `mem`: the path in
/// /proc/self/maps, empty for an anonymous mapping.
fn backing(mem: &vm_memory::GuestMemoryMmap<()>, addr: u64) -> String {
    use vm_memory::GuestMemory;
    let host = mem.get_host_address(GuestAddress(addr)).unwrap() as u64;
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    for line in maps.lines() {
        let mut f = line.split_whitespace();
        let (start, end) = f.next().unwrap().split_once('-').unwrap();
        let start = u64::from_str_radix(start, 16).unwrap();
        let end = u64::from_str_radix(end, 16).unwrap();
        if (start..end).contains(&host) {
            return f.nth(4).unwrap_or("").to_string();
        }
    }
    panic!("{host:#x} is not mapped");
}

#[test]
fn a_large_hole_is_mapped_anonymous_never_from_the_file() {
    // 8 MiB of memory, one page of it written: the rest is a hole.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let mem = crate::memory::create(8 << 20).unwrap();
    mem.write_obj(0xfeed_f00du32, GuestAddress(0x2000)).unwrap();
    let mut snap = snapshot(1);
    snap.header.memory_size = 8 << 20;
    snap.write(&path, &mem).unwrap();
    let mapped = Snapshot::read(&path).unwrap().map_memory().unwrap();
    // A fault there never puts a page into the file (on a tmpfs, one of
    // the file's own, charged to whoever faulted).
    assert_eq!(backing(&mapped, 0x2000), path.to_str().unwrap());
    assert_eq!(backing(&mapped, 4 << 20), "");
    assert_eq!(backing(&mapped, (8 << 20) - PAGE), "");
    mapped.write_obj(7u32, GuestAddress(4 << 20)).unwrap();
    assert_eq!(mapped.read_obj::<u32>(GuestAddress(4 << 20)).unwrap(), 7);
    assert_eq!(mapped.read_obj::<u32>(GuestAddress(6 << 20)).unwrap(), 0);
    assert_eq!(
        mapped.read_obj::<u32>(GuestAddress(0x2000)).unwrap(),
        0xfeed_f00d
    );
}

#[test]
fn an_existing_file_or_a_symlink_is_never_overwritten() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let mem = crate::memory::create(1 << 20).unwrap();
    let e = snapshot(1).write(&path, &mem).unwrap_err().to_string();
    assert!(e.contains("creating the snapshot"), "{e}");
    let link = dir.path().join("link");
    std::os::unix::fs::symlink(dir.path().join("elsewhere"), &link).unwrap();
    assert!(snapshot(1).write(&link, &mem).is_err());
    assert!(!dir.path().join("elsewhere").exists());
}

#[test]
fn a_snapshot_whose_shape_does_not_match_its_memory_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let mem = crate::memory::create(2 << 20).unwrap();
    let e = snapshot(1)
        .write(&dir.path().join("s"), &mem)
        .unwrap_err()
        .to_string();
    assert!(e.contains("the header says 0x100000"), "{e}");
}

#[test]
fn a_corrupt_byte_anywhere_is_a_checksum_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let good = std::fs::read(&path).unwrap();
    // In the hash, the state, the padding, and the memory.
    for at in [30, 70, 4000, good.len() - 1, 0x2000 + 4096] {
        let mut bad = good.clone();
        bad[at] ^= 0x40;
        std::fs::write(&path, &bad).unwrap();
        assert_eq!(
            err(&path),
            "snapshot checksum mismatch: the file is corrupt",
            "at {at}"
        );
    }
}

#[test]
fn a_truncated_file_is_refused_saying_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let good = std::fs::read(&path).unwrap();
    for len in [0, 5, 30, 100, good.len() - 4096] {
        std::fs::write(&path, &good[..len]).unwrap();
        let e = err(&path);
        assert!(e.starts_with("snapshot truncated"), "{len}: {e}");
    }
    // Bytes appended: the checksum no longer holds.
    let mut long = good.clone();
    long.extend_from_slice(&[0; 4096]);
    std::fs::write(&path, &long).unwrap();
    assert!(Snapshot::read(&path).is_err());
}

#[test]
fn a_foreign_or_other_version_file_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let path = write_one(dir.path());
    let good = std::fs::read(&path).unwrap();
    let mut next = good.clone();
    next[8] = FORMAT_VERSION as u8 + 1;
    std::fs::write(&path, &next).unwrap();
    assert_eq!(
        err(&path),
        format!(
            "snapshot format version {}; this runtime reads version {FORMAT_VERSION}",
            FORMAT_VERSION + 1
        )
    );
    let mut elf = good.clone();
    elf[..4].copy_from_slice(b"\x7fELF");
    std::fs::write(&path, &elf).unwrap();
    assert_eq!(err(&path), "not a krun-oci snapshot (bad magic)");
    let mut huge = good;
    huge[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
    std::fs::write(&path, &huge).unwrap();
    assert!(err(&path).starts_with("snapshot invalid"), "{}", err(&path));
}

/// Reads bytes as a file would be read.
fn read_bytes(b: &[u8]) -> Result<(Snapshot, Vec<Region>, u64), SnapshotError> {
    Snapshot::read_from(&mut &b[..], b.len() as u64)
}

#[test]
fn a_checksummed_file_with_bad_content_is_still_refused() {
    // Not JSON.
    let e = read_bytes(&frame(FORMAT_VERSION, b"{not json", &[])).unwrap_err();
    assert!(matches!(e, SnapshotError::State(_)), "{e}");
    let state = |snap: &Snapshot, regions: &str| {
        let s = serde_json::to_string(snap).unwrap();
        format!(r#"{{"snapshot":{s},"regions":{regions}}}"#).into_bytes()
    };
    let one = r#"[{"guest_addr":0,"len":1048576}]"#;
    let mib = vec![0u8; 1 << 20];
    // Memory missing from the file.
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&snapshot(1), one), &[])).unwrap_err();
    assert!(e.to_string().starts_with("snapshot truncated"), "{e}");
    // Two vCPUs in the header, one in the state.
    let mut two = snapshot(1);
    two.header.vcpus = 2;
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&two, one), &mib)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "snapshot invalid: the header says 2 vCPUs, the state has 1"
    );
    // A register struct of the wrong size.
    let mut short = snapshot(1);
    short.vcpus[0].regs.pop();
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&short, one), &mib)).unwrap_err();
    assert!(e.to_string().contains("regs: 143 bytes"), "{e}");
    // Regions that overlap, or do not add up to the memory size.
    for regions in [
        r#"[{"guest_addr":0,"len":524288},{"guest_addr":4096,"len":524288}]"#,
        r#"[{"guest_addr":0,"len":4096}]"#,
        r#"[]"#,
        r#"[{"guest_addr":18446744073709547520,"len":1048576}]"#,
    ] {
        let e =
            read_bytes(&frame(FORMAT_VERSION, &state(&snapshot(1), regions), &mib)).unwrap_err();
        assert!(
            e.to_string().starts_with("snapshot invalid"),
            "{regions}: {e}"
        );
    }
    // A memory size past the limit is refused before anything is mapped.
    let mut big = snapshot(1);
    big.header.memory_size = MAX_MEMORY * 2;
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&big, one), &mib)).unwrap_err();
    assert!(e.to_string().contains("memory size"), "{e}");
}

#[test]
fn the_fuzzers_hand_made_seeds_are_snapshots_this_reader_accepts() {
    // src/fuzz/make-seeds writes them in this format by hand: a change of
    // the format must change them too, or the fuzzer starts from nothing.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus/snapshot_file");
    let file = std::fs::read(dir.join("seed-file")).unwrap();
    let (snap, regions, offset) = read_bytes(&file[1..]).unwrap();
    assert_eq!(
        (snap.header.memory_size, regions.len(), offset),
        (4096, 1, 4096)
    );
    let state = std::fs::read(dir.join("seed-state")).unwrap();
    let framed = frame(FORMAT_VERSION, &state[1..], &[0; PAGE as usize]);
    assert_eq!(read_bytes(&framed).unwrap().0, snap);
    let short = std::fs::read(dir.join("seed-state-short-pit")).unwrap();
    let framed = frame(FORMAT_VERSION, &short[1..], &[0; PAGE as usize]);
    let e = read_bytes(&framed).unwrap_err().to_string();
    assert!(e.contains("the PIT: 111 bytes"), "{e}");
}

/// A measurement, not a check: writing, verifying, mapping and copying a
/// 256 MiB snapshot with a quarter of its pages written (run it with
/// `cargo test --release -p krun-vmm snapshot_costs -- --ignored
/// --nocapture`).
#[test]
#[ignore = "a measurement; run by hand"]
fn snapshot_costs() {
    use std::time::Instant;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("snap");
    let mib = 256;
    let mem = crate::memory::create(mib << 20).unwrap();
    for page in (0..(mib << 20)).step_by(4 * PAGE as usize) {
        mem.write_obj(page | 1, GuestAddress(page)).unwrap();
    }
    let mut snap = snapshot(1);
    snap.header.memory_size = mib << 20;
    let t = Instant::now();
    snap.write(&path, &mem).unwrap();
    let write = t.elapsed();
    let t = Instant::now();
    let loaded = Snapshot::read(&path).unwrap();
    let read = t.elapsed();
    let t = Instant::now();
    let mapped = loaded.map_memory().unwrap();
    let map = t.elapsed();
    let t = Instant::now();
    let mut sum = 0u64;
    for page in (0..(mib << 20)).step_by(PAGE as usize) {
        sum = sum.wrapping_add(mapped.read_obj::<u64>(GuestAddress(page)).unwrap());
    }
    let touch = t.elapsed();
    let t = Instant::now();
    let copied = loaded.copy_memory().unwrap();
    let copy = t.elapsed();
    assert_eq!(copied.read_obj::<u64>(GuestAddress(0)).unwrap(), 1);
    let on_disk = std::os::unix::fs::MetadataExt::blocks(&std::fs::metadata(&path).unwrap()) * 512;
    println!(
        "{mib} MiB, 1/4 pages written: write {write:?}, read+verify {read:?}, map {map:?}, \
         first read of every page {touch:?} ({sum:x}), copy {copy:?}, {} MiB on disk",
        on_disk >> 20
    );
}

/// A device state as a capture writes it: an activated balloon.
fn balloon_state() -> TransportState {
    let queue = |base: u64, next: u16| crate::virtio::state::QueueSnapshot {
        max_size: 128,
        size: 128,
        ready: true,
        desc_table: base,
        avail_ring: base + 0x800,
        used_ring: base + 0xa00,
        next_avail: next,
        next_used: next,
        event_idx: false,
    };
    TransportState {
        device_type: crate::virtio::TYPE_BALLOON,
        status: 15,
        driver_features: crate::virtio::VIRTIO_F_VERSION_1,
        acked_features: crate::virtio::VIRTIO_F_VERSION_1,
        device_features_sel: 0,
        driver_features_sel: 1,
        queue_sel: 2,
        interrupt_status: 1,
        config_generation: 0,
        activated: true,
        failed: false,
        queues: vec![queue(0, 3), queue(0x1000, 0), queue(0x2000, u16::MAX)],
        device: vec![7, 0, 0, 0],
    }
}

#[test]
fn device_state_round_trips_through_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mem = crate::memory::create(1 << 20).unwrap();
    let mut snap = snapshot(1);
    snap.devices = vec![balloon_state(), balloon_state()];
    snap.devices[1].queues[0].next_avail = 9;
    let path = dir.path().join("snap");
    snap.write(&path, &mem).unwrap();
    let loaded = Snapshot::read(&path).unwrap();
    assert_eq!(loaded.snapshot, snap);
}

#[test]
fn an_older_version_is_refused_as_such() {
    let s = serde_json::to_string(&snapshot(1)).unwrap();
    let state = format!(r#"{{"snapshot":{s},"regions":[{{"guest_addr":0,"len":1048576}}]}}"#);
    let e = read_bytes(&frame(1, state.as_bytes(), &vec![0u8; 1 << 20])).unwrap_err();
    assert!(
        matches!(
            e,
            SnapshotError::Version {
                found: 1,
                expected: FORMAT_VERSION
            }
        ),
        "{e}"
    );
    assert_eq!(
        e.to_string(),
        format!("snapshot format version 1; this runtime reads version {FORMAT_VERSION}")
    );
}

#[test]
fn a_damaged_device_state_is_refused_naming_the_device_and_field() {
    let state = |snap: &Snapshot| {
        let s = serde_json::to_string(snap).unwrap();
        format!(r#"{{"snapshot":{s},"regions":[{{"guest_addr":0,"len":1048576}}]}}"#).into_bytes()
    };
    let mib = vec![0u8; 1 << 20];
    let mut snap = snapshot(1);
    snap.devices = vec![balloon_state(), balloon_state()];
    snap.devices[1].queues[2].size = 100;
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&snap), &mib)).unwrap_err();
    assert_eq!(
        e.to_string(),
        "snapshot invalid: devices[1]: device state field queues[2].size: \
         100 (a power of two up to max_size 128)"
    );
    // Counts and lengths past the limits, before anything is restored.
    let mut many = snapshot(1);
    many.devices = vec![balloon_state(); MAX_DEVICES + 1];
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&many), &mib)).unwrap_err();
    assert!(e.to_string().contains("65 devices"), "{e}");
    let mut big = snapshot(1);
    big.devices = vec![balloon_state()];
    big.devices[0].device = vec![0; crate::virtio::state::MAX_DEVICE_STATE + 1];
    let e = read_bytes(&frame(FORMAT_VERSION, &state(&big), &mib)).unwrap_err();
    assert!(
        e.to_string()
            .contains("devices[0]: device state field device: 1048577 bytes"),
        "{e}"
    );
    // A file without the devices (a version 1 state framed as the current version).
    let s = serde_json::to_string(&snapshot(1)).unwrap();
    let old = s.replace(r#","devices":[]"#, "");
    let old = format!(r#"{{"snapshot":{old},"regions":[{{"guest_addr":0,"len":1048576}}]}}"#);
    let e = read_bytes(&frame(FORMAT_VERSION, old.as_bytes(), &mib)).unwrap_err();
    assert!(matches!(e, SnapshotError::State(_)), "{e}");
    assert!(
        std::error::Error::source(&e)
            .unwrap()
            .to_string()
            .contains("devices"),
        "{e}"
    );
}

/// The checksum skips zero pages: a file whose zero pages are holes and
/// the same bytes written densely, read through its holes or byte by
/// byte, verify alike; a page of guest memory changed to zeros, or a
/// zero page given a byte, is still a mismatch.
#[test]
fn the_checksum_is_the_same_through_holes_and_without() {
    let dir = tempfile::tempdir().unwrap();
    let mem = crate::memory::create(4 << 20).unwrap();
    for (i, at) in [0x1000u64, 0x2ff8, 0x10_0000, 0x3f_f000].iter().enumerate() {
        mem.write_obj(0x1111_1111u64 * (i as u64 + 1), GuestAddress(*at))
            .unwrap();
    }
    let path = dir.path().join("sparse");
    snapshot(4).write(&path, &mem).unwrap();
    let meta = std::fs::metadata(&path).unwrap();
    assert!(
        std::os::unix::fs::MetadataExt::blocks(&meta) * 512 < meta.len() / 2,
        "zero pages are holes"
    );
    Snapshot::read(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    read_bytes(&bytes).unwrap();
    // One byte at a time: blocks split across reads.
    struct Trickle<'a>(&'a [u8]);
    impl std::io::Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = buf.len().min(self.0.len()).min(777);
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }
    Snapshot::read_from(&mut Trickle(&bytes), bytes.len() as u64).unwrap();
    let dense = dir.path().join("dense");
    std::fs::write(&dense, &bytes).unwrap();
    Snapshot::read(&dense).unwrap();
    // Memory starts at the first page after the state.
    let (_, _, memory) = read_bytes(&bytes).unwrap();
    let page = (memory + 0x1000) as usize;
    for (what, change) in [
        ("a written page zeroed", 0u8),
        ("a zero page given a byte", 1u8),
    ] {
        let mut bad = bytes.clone();
        match change {
            0 => bad[page..page + 4096].fill(0),
            _ => bad[page + 0x2000] = 7,
        }
        std::fs::write(&dense, &bad).unwrap();
        assert_eq!(
            err(&dense),
            "snapshot checksum mismatch: the file is corrupt",
            "{what}"
        );
        assert!(read_bytes(&bad).is_err(), "{what}");
    }
}
