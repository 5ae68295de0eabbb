//! `snapshot_file`: the VM snapshot reader on a file that is not what
//! the runtime wrote (a template or checkpoint file corrupted on disk,
//! truncated, or of another format version).
//!
//! Drives: `krun_vmm::snapshot::Snapshot::read_from` on the input's bytes,
//! either as the whole file, or (to get past the checksum) as the state
//! part of a file that `snapshot::frame` builds around them with a correct
//! checksum and one page of guest memory, or framed with another format
//! version (format 1, before device state, among them). The state carries
//! the virtio devices' state (format 2): transports, queues, device bytes.
//!
//! Invariants:
//! * no panic;
//! * another format version (1 included) is always refused as such,
//!   whatever follows;
//! * a snapshot accepted is consistent: it validates, its memory regions
//!   add up to the header's memory size, its memory starts page-aligned
//!   and the file ends exactly where its memory does; every device state
//!   in it is within the limits (queues, device bytes); written back to
//!   JSON and framed again it reads back equal;
//! * bounded memory: the reader's live heap peaks at most at its 1 MiB
//!   hashing buffer plus 32 bytes per input byte, whatever lengths and
//!   sizes the file announces (a counting allocator tracks the peak).
#![no_main]

use krun_vmm::snapshot::{frame, Snapshot, SnapshotError, FORMAT_VERSION, MAX_DEVICES, PAGE};
use krun_vmm::virtio::state::{MAX_DEVICE_STATE, MAX_QUEUES};
use libfuzzer_sys::fuzz_target;

#[path = "common/heap.rs"]
mod heap;
use heap::{mark, peak_since};

fn read(file: &[u8]) -> Result<(Snapshot, Vec<krun_vmm::snapshot::Region>, u64), SnapshotError> {
    let before = mark();
    let out = Snapshot::read_from(&mut &file[..], file.len() as u64);
    let peak = peak_since(before);
    let bound = (1 << 20) + 32 * file.len() as isize + 65536;
    assert!(
        peak <= bound,
        "{peak} bytes of heap for a {}-byte file",
        file.len()
    );
    out
}

/// The JSON the file holds, as the reader expects it.
fn state_json(snapshot: &Snapshot, regions: &[krun_vmm::snapshot::Region]) -> Vec<u8> {
    let s = serde_json::to_string(snapshot).unwrap();
    let regions: Vec<String> = regions
        .iter()
        .map(|r| format!(r#"{{"guest_addr":{},"len":{}}}"#, r.guest_addr, r.len))
        .collect();
    format!(r#"{{"snapshot":{s},"regions":[{}]}}"#, regions.join(",")).into_bytes()
}

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let page = vec![0u8; PAGE as usize];
    let file = match mode % 3 {
        0 => rest.to_vec(),
        1 => frame(FORMAT_VERSION, rest, &page),
        _ => {
            for other in [1, FORMAT_VERSION + 1 + u32::from(mode)] {
                let e = read(&frame(other, rest, &page)).unwrap_err();
                assert!(
                    matches!(e, SnapshotError::Version { found, .. } if found == other),
                    "{e}"
                );
            }
            return;
        }
    };
    let Ok((snapshot, regions, offset)) = read(&file) else {
        return;
    };
    snapshot.validate().unwrap();
    let total: u64 = regions.iter().map(|r| r.len).sum();
    assert_eq!(total, snapshot.header.memory_size);
    assert_eq!(offset % PAGE, 0);
    assert_eq!(offset + total, file.len() as u64);
    assert!(snapshot.devices.len() <= MAX_DEVICES);
    for d in &snapshot.devices {
        assert!(d.queues.len() <= MAX_QUEUES && d.device.len() <= MAX_DEVICE_STATE);
        d.validate().unwrap();
    }
    if mode % 3 == 1 {
        let again = frame(FORMAT_VERSION, &state_json(&snapshot, &regions), &page);
        let (back, back_regions, _) = read(&again).expect("a re-encoded snapshot reads back");
        assert_eq!(back, snapshot);
        assert_eq!(back_regions, regions);
    }
});
