//! Framing: turning a byte stream into [`Frame`]s and back.

use std::io::{self, Read, Write};

use serde::de::DeserializeOwned;
use serde::Serialize;

/// Bytes in a frame header: length (4), kind (1), stream (4).
pub const HEADER_LEN: usize = 9;

/// The largest payload a frame may carry. A larger length in a header means
/// the stream is corrupt (or hostile) and is rejected before any allocation.
pub const MAX_PAYLOAD: usize = 1 << 20;

/// What a frame's payload is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum FrameKind {
    /// A JSON-encoded control message.
    Control = 1,
    /// Bytes for a process's stdin (host to guest).
    Stdin = 2,
    /// Bytes a process wrote to stdout, or its terminal (guest to host).
    Stdout = 3,
    /// Bytes a process wrote to stderr (guest to host).
    Stderr = 4,
}

impl TryFrom<u8> for FrameKind {
    type Error = ProtoError;

    fn try_from(value: u8) -> Result<Self, ProtoError> {
        Ok(match value {
            1 => FrameKind::Control,
            2 => FrameKind::Stdin,
            3 => FrameKind::Stdout,
            4 => FrameKind::Stderr,
            other => return Err(ProtoError::UnknownKind(other)),
        })
    }
}

/// Errors reading or decoding frames.
#[derive(Debug, thiserror::Error)]
pub enum ProtoError {
    /// The underlying channel failed.
    #[error("control channel I/O failed")]
    Io(#[from] io::Error),
    /// A header named a kind this version does not know.
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    /// A header announced a payload larger than [`MAX_PAYLOAD`].
    #[error("frame payload of {0} bytes exceeds the {MAX_PAYLOAD}-byte limit")]
    TooLarge(usize),
    /// The channel ended in the middle of a frame.
    #[error("channel closed in the middle of a frame")]
    Truncated,
    /// A control payload was not a valid message.
    #[error("malformed control message")]
    Json(#[from] serde_json::Error),
}

/// One frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub kind: FrameKind,
    pub stream: u32,
    pub payload: Vec<u8>,
}

impl Frame {
    /// Decodes a control frame's payload as message type `M`.
    pub fn message<M: DeserializeOwned>(&self) -> Result<M, ProtoError> {
        Ok(serde_json::from_slice(&self.payload)?)
    }

    /// A control frame carrying `msg`.
    pub fn control<M: Serialize>(stream: u32, msg: &M) -> Frame {
        let payload = serde_json::to_vec(msg).expect("protocol messages always serialize");
        Frame {
            kind: FrameKind::Control,
            stream,
            payload,
        }
    }

    /// Header and payload as one buffer, so that one `write_all` sends the
    /// whole frame (writers sharing a channel hold a lock around it).
    /// [`ProtoError::TooLarge`] if the payload exceeds [`MAX_PAYLOAD`].
    pub fn encode(&self) -> Result<Vec<u8>, ProtoError> {
        encode_frame(self.kind, self.stream, &self.payload)
    }

    /// Writes the frame to `w` in one call; a payload over [`MAX_PAYLOAD`]
    /// is an `InvalidInput` error and nothing is written.
    pub fn write_to<W: Write + ?Sized>(&self, w: &mut W) -> io::Result<()> {
        let bytes = self
            .encode()
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        w.write_all(&bytes)
    }
}

/// Encodes one frame; [`ProtoError::TooLarge`] if `payload` exceeds
/// [`MAX_PAYLOAD`], which the reading side would refuse. Data streams are
/// split by their senders; a control message that large (a config.json
/// with 10,000 mounts) is an error for the sender to report, never a panic.
pub fn encode_frame(kind: FrameKind, stream: u32, payload: &[u8]) -> Result<Vec<u8>, ProtoError> {
    if payload.len() > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(payload.len()));
    }
    let mut buf = Vec::with_capacity(HEADER_LEN + payload.len());
    buf.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    buf.push(kind as u8);
    buf.extend_from_slice(&stream.to_le_bytes());
    buf.extend_from_slice(payload);
    Ok(buf)
}

fn parse_header(h: &[u8]) -> Result<(usize, FrameKind, u32), ProtoError> {
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let kind = FrameKind::try_from(h[4])?;
    let stream = u32::from_le_bytes([h[5], h[6], h[7], h[8]]);
    if len > MAX_PAYLOAD {
        return Err(ProtoError::TooLarge(len));
    }
    Ok((len, kind, stream))
}

/// Incremental decoder for event loops: feed whatever bytes arrived, take
/// out whole frames.
#[derive(Default)]
pub struct Decoder {
    buf: Vec<u8>,
    start: usize,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Appends bytes read from the channel.
    pub fn feed(&mut self, data: &[u8]) {
        if self.start > 0 && self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
        self.buf.extend_from_slice(data);
    }

    /// The next whole frame, if one has arrived. After an error the stream
    /// is out of sync and the decoder must not be used again.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let avail = &self.buf[self.start..];
        if avail.len() < HEADER_LEN {
            return Ok(None);
        }
        let (len, kind, stream) = parse_header(&avail[..HEADER_LEN])?;
        if avail.len() < HEADER_LEN + len {
            return Ok(None);
        }
        let payload = avail[HEADER_LEN..HEADER_LEN + len].to_vec();
        self.start += HEADER_LEN + len;
        if self.start > 1 << 16 && self.start * 2 > self.buf.len() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }

    /// Bytes received but not yet part of a whole frame.
    pub fn pending(&self) -> usize {
        self.buf.len() - self.start
    }
}

/// Blocking frame reader over any `Read`.
pub struct FrameReader<R> {
    inner: R,
}

impl<R: Read> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        FrameReader { inner }
    }

    /// The next frame; `Ok(None)` when the channel ends cleanly between frames.
    pub fn read_frame(&mut self) -> Result<Option<Frame>, ProtoError> {
        let mut header = [0u8; HEADER_LEN];
        let mut got = 0;
        while got < HEADER_LEN {
            match self.inner.read(&mut header[got..]) {
                Ok(0) if got == 0 => return Ok(None),
                Ok(0) => return Err(ProtoError::Truncated),
                Ok(n) => got += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e.into()),
            }
        }
        let (len, kind, stream) = parse_header(&header)?;
        let mut payload = vec![0u8; len];
        self.inner.read_exact(&mut payload).map_err(|e| {
            if e.kind() == io::ErrorKind::UnexpectedEof {
                ProtoError::Truncated
            } else {
                ProtoError::Io(e)
            }
        })?;
        Ok(Some(Frame {
            kind,
            stream,
            payload,
        }))
    }

    pub fn get_ref(&self) -> &R {
        &self.inner
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn kind_strategy() -> impl Strategy<Value = FrameKind> {
        prop_oneof![
            Just(FrameKind::Control),
            Just(FrameKind::Stdin),
            Just(FrameKind::Stdout),
            Just(FrameKind::Stderr)
        ]
    }

    fn frame_strategy() -> impl Strategy<Value = Frame> {
        (
            kind_strategy(),
            any::<u32>(),
            proptest::collection::vec(any::<u8>(), 0..2048),
        )
            .prop_map(|(kind, stream, payload)| Frame {
                kind,
                stream,
                payload,
            })
    }

    proptest! {
        /// Frames survive encoding and any split of the byte stream.
        #[test]
        fn roundtrip_any_chunking(frames in proptest::collection::vec(frame_strategy(), 0..8),
                                  cuts in proptest::collection::vec(1usize..700, 0..64)) {
            let bytes: Vec<u8> = frames.iter().flat_map(|f| f.encode().unwrap()).collect();
            let mut dec = Decoder::new();
            let mut out = Vec::new();
            let mut pos = 0;
            let mut cuts = cuts.into_iter().cycle();
            while pos < bytes.len() {
                let n = cuts.next().unwrap_or(bytes.len()).min(bytes.len() - pos);
                dec.feed(&bytes[pos..pos + n]);
                pos += n;
                while let Some(f) = dec.next_frame().unwrap() {
                    out.push(f);
                }
            }
            prop_assert_eq!(&out, &frames);
            prop_assert_eq!(dec.pending(), 0);

            let mut reader = FrameReader::new(&bytes[..]);
            let mut out2 = Vec::new();
            while let Some(f) = reader.read_frame().unwrap() {
                out2.push(f);
            }
            prop_assert_eq!(out2, frames);
        }

        /// Arbitrary (hostile) bytes never panic the decoders and never make
        /// them allocate more than MAX_PAYLOAD for a frame.
        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
            let mut dec = Decoder::new();
            dec.feed(&bytes);
            while let Ok(Some(f)) = dec.next_frame() {
                prop_assert!(f.payload.len() <= MAX_PAYLOAD);
            }
            let mut reader = FrameReader::new(&bytes[..]);
            while let Ok(Some(f)) = reader.read_frame() {
                prop_assert!(f.payload.len() <= MAX_PAYLOAD);
                let _ = f.message::<crate::ToHost>();
                let _ = f.message::<crate::ToGuest>();
            }
        }
    }

    #[test]
    fn oversized_header_is_rejected_before_allocation() {
        let mut h = ((MAX_PAYLOAD + 1) as u32).to_le_bytes().to_vec();
        h.push(FrameKind::Stdout as u8);
        h.extend_from_slice(&0u32.to_le_bytes());
        let mut dec = Decoder::new();
        dec.feed(&h);
        assert!(matches!(dec.next_frame(), Err(ProtoError::TooLarge(_))));
        assert!(matches!(
            FrameReader::new(&h[..]).read_frame(),
            Err(ProtoError::TooLarge(_))
        ));
    }

    #[test]
    fn an_oversized_payload_is_an_error_to_encode_not_a_panic() {
        let big = vec![b'x'; MAX_PAYLOAD + 1];
        assert!(matches!(
            encode_frame(FrameKind::Control, 0, &big),
            Err(ProtoError::TooLarge(n)) if n == MAX_PAYLOAD + 1
        ));
        let f = Frame {
            kind: FrameKind::Control,
            stream: 0,
            payload: big,
        };
        let mut out = Vec::new();
        let e = f.write_to(&mut out).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput);
        assert!(out.is_empty(), "nothing of the frame was written");
        let exact = encode_frame(FrameKind::Stdout, 1, &vec![0; MAX_PAYLOAD]).unwrap();
        assert_eq!(exact.len(), HEADER_LEN + MAX_PAYLOAD);
    }

    #[test]
    fn unknown_kind_and_truncation_are_errors() {
        let mut bytes = encode_frame(FrameKind::Stdout, 7, b"hello").unwrap();
        bytes[4] = 99;
        assert!(matches!(
            FrameReader::new(&bytes[..]).read_frame(),
            Err(ProtoError::UnknownKind(99))
        ));
        let bytes = encode_frame(FrameKind::Stdout, 7, b"hello").unwrap();
        assert!(matches!(
            FrameReader::new(&bytes[..7]).read_frame(),
            Err(ProtoError::Truncated)
        ));
        assert!(matches!(
            FrameReader::new(&bytes[..12]).read_frame(),
            Err(ProtoError::Truncated)
        ));
        assert!(FrameReader::new(&[][..]).read_frame().unwrap().is_none());
    }
}
