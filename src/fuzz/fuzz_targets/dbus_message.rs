//! `dbus_message`: the D-Bus message parser of `--systemd-cgroup`
//! (`krun_oci::cgroups::dbus`), on whatever bytes systemd or a bus daemon
//! might send.
//!
//! Drives: `message_len` on the first 16 bytes, then `Message::parse` on
//! the input cut to that length (or whole, when the header is refused).
//!
//! Invariants:
//! * no panic, whatever the signatures, lengths, padding or nesting;
//! * a message parsed is exactly as long as its header says;
//! * its body re-encodes (little-endian) and parses back to the same
//!   values and signature;
//! * bounded memory: parsing allocates at most 128 bytes per input byte
//!   (a value per byte at most) plus a small constant.
#![no_main]

use krun_oci::cgroups::dbus::{encode, message_len, Message};
use libfuzzer_sys::fuzz_target;

#[path = "common/heap.rs"]
mod heap;
use heap::{mark, peak_since};

fuzz_target!(|data: &[u8]| {
    let Some(head) = data.first_chunk::<16>() else {
        assert!(Message::parse(data).is_err());
        return;
    };
    let input = match message_len(head) {
        Ok(n) if n <= data.len() => &data[..n],
        _ => data,
    };
    let before = mark();
    let parsed = Message::parse(input);
    let peak = peak_since(before);
    assert!(
        peak <= 128 * input.len() as isize + 4096,
        "{peak} bytes of heap for {} bytes of message",
        input.len()
    );
    let Ok(m) = parsed else { return };
    assert_eq!(message_len(head).unwrap(), input.len());
    let again = encode(m.kind, m.serial, vec![], &m.body);
    let back = Message::parse(&again).expect("our own encoding parses");
    assert_eq!(back.body, m.body);
    assert_eq!(back.signature, m.signature);
});
