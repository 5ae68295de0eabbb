//! `proto_frames`: the host <-> guest frame decoders and message parsers
//! on a byte stream the guest wrote.
//!
//! Drives: `krun_proto::Decoder` fed the stream in pieces cut at the
//! input's chosen points, `krun_proto::FrameReader` over a reader that
//! hands out the same pieces, and `Frame::message::<ToHost>()` /
//! `::<ToGuest>()` on every frame decoded.
//!
//! Invariants:
//! * no panic;
//! * both decoders agree: the same frames, then the same verdict (the
//!   blocking reader's clean end, truncation or error where the
//!   incremental one holds an incomplete frame or fails);
//! * every frame decoded re-encodes to exactly the bytes it came from,
//!   and holds at most `MAX_PAYLOAD` bytes;
//! * every message parsed serializes and parses back to itself;
//! * bounded memory, whatever lengths the headers announce (a counting
//!   allocator tracks the peak of live heap bytes): the incremental
//!   decoder holds exactly the bytes fed minus the frames taken out, and
//!   allocates at most 4x the bytes fed (its buffer and the frames);
//!   the blocking reader allocates at most one frame of at most
//!   `MAX_PAYLOAD` bytes at a time, and nothing for a header announcing
//!   more.
#![no_main]

use std::io::Read;

use krun_proto::{
    Decoder, Frame, FrameReader, ProtoError, ToGuest, ToHost, HEADER_LEN, MAX_PAYLOAD,
};
use libfuzzer_sys::fuzz_target;

#[path = "common/heap.rs"]
mod heap;
use heap::{mark, peak_since};

/// The input, a plain byte format so that seeds are easy to write by
/// hand (`src/fuzz/seeds`):
///
/// ```text
/// byte 0      low 4 bits: number of cut lengths N; bit 4: a huge header
///             follows the cuts
/// N x u16 LE  the lengths the stream is cut into (cycled; 0 counts as 1;
///             none: one piece)
/// [5 bytes]   kind (u8) and stream (u32 LE) of a header announcing
///             MAX_PAYLOAD + 1 bytes, appended to the stream
/// rest        the stream
/// ```
struct Input<'a> {
    cuts: Vec<u16>,
    huge: Option<(u8, u32)>,
    raw: &'a [u8],
}

impl<'a> Input<'a> {
    fn parse(data: &'a [u8]) -> Option<Input<'a>> {
        let (&b0, mut rest) = data.split_first()?;
        let n = usize::from(b0 & 0xf);
        let mut cuts = Vec::with_capacity(n);
        for _ in 0..n {
            let (c, r) = rest.split_first_chunk::<2>()?;
            cuts.push(u16::from_le_bytes(*c));
            rest = r;
        }
        let mut huge = None;
        if b0 & 0x10 != 0 {
            let (h, r) = rest.split_first_chunk::<5>()?;
            huge = Some((h[0], u32::from_le_bytes([h[1], h[2], h[3], h[4]])));
            rest = r;
        }
        Some(Input {
            cuts,
            huge,
            raw: rest,
        })
    }
}

/// Hands out the stream in the input's pieces.
struct Pieces<'a> {
    data: &'a [u8],
    cuts: &'a [u16],
    i: usize,
}

impl Pieces<'_> {
    fn next_len(&mut self) -> usize {
        let n = match self.cuts.get(self.i % self.cuts.len().max(1)) {
            Some(&c) => usize::from(c).max(1),
            None => self.data.len(),
        };
        self.i += 1;
        n.min(self.data.len())
    }
}

impl Read for Pieces<'_> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.next_len().min(buf.len());
        buf[..n].copy_from_slice(&self.data[..n]);
        self.data = &self.data[n..];
        Ok(n)
    }
}

/// Checks a decoded frame: size, re-encoding, and its message if any.
fn check_frame(f: &Frame, bytes: &[u8]) {
    assert!(f.payload.len() <= MAX_PAYLOAD);
    let enc = f.encode().expect("a decoded frame fits in one");
    assert_eq!(enc, bytes, "a frame re-encodes to the bytes it came from");
    if let Ok(m) = f.message::<ToHost>() {
        let again = Frame::control(f.stream, &m);
        assert_eq!(again.message::<ToHost>().unwrap(), m, "ToHost round trip");
    }
    if let Ok(m) = f.message::<ToGuest>() {
        let again = Frame::control(f.stream, &m);
        assert_eq!(again.message::<ToGuest>().unwrap(), m, "ToGuest round trip");
    }
}

fn run(input: Input) {
    let mut stream = input.raw.to_vec();
    if let Some((k, s)) = input.huge {
        stream.extend_from_slice(&((MAX_PAYLOAD + 1) as u32).to_le_bytes());
        stream.push(k);
        stream.extend_from_slice(&s.to_le_bytes());
    }

    // The incremental decoder, fed piece by piece.
    let base = mark();
    let mut dec = Decoder::new();
    let mut pieces = Pieces {
        data: &stream,
        cuts: &input.cuts,
        i: 0,
    };
    let mut fed = 0usize;
    let mut taken = 0usize;
    let mut frames = Vec::new();
    let mut dec_err = None;
    'feed: while !pieces.data.is_empty() {
        let n = pieces.next_len();
        dec.feed(&pieces.data[..n]);
        pieces.data = &pieces.data[n..];
        fed += n;
        loop {
            match dec.next_frame() {
                Ok(Some(f)) => {
                    taken += HEADER_LEN + f.payload.len();
                    frames.push(f);
                }
                Ok(None) => break,
                Err(e) => {
                    dec_err = Some(e);
                    break 'feed;
                }
            }
        }
        assert_eq!(dec.pending(), fed - taken, "the decoder holds what is left");
        assert!(dec.pending() < HEADER_LEN + MAX_PAYLOAD);
        // The decoder's buffer (at most twice what was fed: it compacts
        // once half of it is consumed, and grows by doubling), the frames
        // taken out and their payloads (at most what was fed).
        let peak = peak_since(base);
        let bound = 4 * fed as isize + 4096 + (frames.len() * 128) as isize;
        assert!(
            peak <= bound,
            "decoder memory: peak {peak} bytes after {fed} fed"
        );
    }
    let dec_pending = dec.pending();
    drop(dec);
    let mut at = 0;
    for f in &frames {
        let len = HEADER_LEN + f.payload.len();
        check_frame(f, &stream[at..at + len]);
        at += len;
    }

    // The blocking reader over the same pieces.
    let mut reader = FrameReader::new(Pieces {
        data: &stream,
        cuts: &input.cuts,
        i: 0,
    });
    let mut i = 0;
    let mut at = 0usize;
    loop {
        let base = mark();
        match reader.read_frame() {
            Ok(Some(f)) => {
                at += HEADER_LEN + f.payload.len();
                assert_eq!(frames.get(i), Some(&f), "both decoders agree on frame {i}");
                i += 1;
            }
            Ok(None) => {
                assert_eq!(i, frames.len(), "the reader ended early");
                assert!(
                    dec_err.is_none(),
                    "the reader ended where the decoder failed"
                );
                assert_eq!(at, stream.len(), "a clean end is at a frame boundary");
                break;
            }
            Err(e) => {
                assert_eq!(i, frames.len(), "the reader failed early: {e}");
                match (&e, &dec_err) {
                    (ProtoError::Truncated, None) => {
                        assert!(dec_pending > 0, "truncated where the decoder holds nothing")
                    }
                    (ProtoError::UnknownKind(a), Some(ProtoError::UnknownKind(b))) => {
                        assert_eq!(a, b)
                    }
                    (ProtoError::TooLarge(a), Some(ProtoError::TooLarge(b))) => assert_eq!(a, b),
                    (e, d) => panic!("the reader says {e:?}, the decoder {d:?}"),
                }
                break;
            }
        }
        // The frame being read (its payload is allocated by its header's
        // length, so at most one MAX_PAYLOAD beyond what arrived).
        let peak = peak_since(base);
        let bound = (HEADER_LEN + MAX_PAYLOAD) as isize + 4096;
        assert!(peak <= bound, "reader memory: peak {peak} bytes");
    }
}

fuzz_target!(|data: &[u8]| {
    if let Some(input) = Input::parse(data) {
        run(input);
    }
});
