//! A small blocking D-Bus client: just what `--systemd-cgroup` needs to
//! ask systemd for a transient unit (call a method, read its reply, wait
//! for a signal), over systemd's private socket (root) or the system bus.
//!
//! Our own, not zbus: zbus's blocking API runs an executor thread, and the
//! runtime forks its monitor after talking to systemd; a thread alive
//! across that fork would be a hazard for nothing. This client has no
//! threads and no state beyond its socket.
//!
//! What it reads comes from systemd or the bus daemon, not from a guest,
//! but it is parsed as untrusted all the same ([`Message::parse`], fuzzed
//! by `src/fuzz/fuzz_targets/dbus_message.rs`): a message is at most
//! [`MAX_MESSAGE`] bytes, nesting is bounded, every length is checked
//! against what is left, and each read has a deadline.
//!
//! The wire format is the D-Bus specification's ("Message Protocol"),
//! little-endian only on the way out; both endiannesses are read.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The largest message read: systemd's replies and signals are far
/// smaller; a bigger one ends the connection.
pub const MAX_MESSAGE: usize = 1 << 20;
/// D-Bus's own limit on container nesting (arrays and structs each 32).
const MAX_DEPTH: usize = 64;

/// Message types (the header's second byte).
pub const METHOD_CALL: u8 = 1;
pub const METHOD_RETURN: u8 = 2;
pub const ERROR: u8 = 3;
pub const SIGNAL: u8 = 4;

/// A value of the D-Bus type system, as far as systemd's calls need.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Byte(u8),
    Bool(bool),
    I16(i16),
    U16(u16),
    I32(i32),
    U32(u32),
    I64(i64),
    U64(u64),
    Double(u64),
    Str(String),
    ObjectPath(String),
    Signature(String),
    /// A file descriptor's index (`h`): never passed here.
    Fd(u32),
    /// Elements, with the element type's signature.
    Array(String, Vec<Value>),
    Struct(Vec<Value>),
    /// `{kv}` inside an array.
    DictEntry(Box<Value>, Box<Value>),
    Variant(Box<Value>),
}

impl Value {
    /// The value's signature.
    pub fn signature(&self) -> String {
        match self {
            Value::Byte(_) => "y".into(),
            Value::Bool(_) => "b".into(),
            Value::I16(_) => "n".into(),
            Value::U16(_) => "q".into(),
            Value::I32(_) => "i".into(),
            Value::U32(_) => "u".into(),
            Value::I64(_) => "x".into(),
            Value::U64(_) => "t".into(),
            Value::Double(_) => "d".into(),
            Value::Str(_) => "s".into(),
            Value::ObjectPath(_) => "o".into(),
            Value::Signature(_) => "g".into(),
            Value::Fd(_) => "h".into(),
            Value::Array(elem, _) => format!("a{elem}"),
            Value::Struct(fields) => {
                let inner: String = fields.iter().map(Value::signature).collect();
                format!("({inner})")
            }
            Value::DictEntry(k, v) => format!("{{{}{}}}", k.signature(), v.signature()),
            Value::Variant(_) => "v".into(),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::Str(s) | Value::ObjectPath(s) | Value::Signature(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_u32(&self) -> Option<u32> {
        match self {
            Value::U32(v) => Some(*v),
            _ => None,
        }
    }
}

/// Why a D-Bus exchange failed.
#[derive(Debug, thiserror::Error)]
pub enum DbusError {
    #[error("connecting to {path}")]
    Connect {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("talking to the bus")]
    Io(#[from] std::io::Error),
    #[error("the bus refused our authentication: {0:?}")]
    Auth(String),
    #[error("no answer from the bus in time")]
    Timeout,
    #[error("a malformed message from the bus: {0}")]
    Malformed(&'static str),
    /// The error a method call was answered with (its name and message).
    #[error("{name}: {message}")]
    Remote { name: String, message: String },
}

impl DbusError {
    /// The D-Bus error name of an error reply.
    pub fn remote_name(&self) -> Option<&str> {
        match self {
            DbusError::Remote { name, .. } => Some(name),
            _ => None,
        }
    }
}

type Parsed<T> = Result<T, DbusError>;

fn malformed<T>(why: &'static str) -> Parsed<T> {
    Err(DbusError::Malformed(why))
}

/// One message, parsed: its header fields and body.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Message {
    pub kind: u8,
    pub flags: u8,
    pub serial: u32,
    pub path: Option<String>,
    pub interface: Option<String>,
    pub member: Option<String>,
    pub error_name: Option<String>,
    pub reply_serial: Option<u32>,
    pub destination: Option<String>,
    pub sender: Option<String>,
    pub signature: String,
    pub body: Vec<Value>,
}

/// Writes values aligned as D-Bus aligns them: relative to the message's
/// start, which is where this buffer starts.
#[derive(Default)]
struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    fn pad(&mut self, align: usize) {
        while !self.buf.len().is_multiple_of(align) {
            self.buf.push(0);
        }
    }

    fn u32(&mut self, v: u32) {
        self.pad(4);
        self.buf.extend_from_slice(&v.to_le_bytes());
    }

    fn string(&mut self, s: &str) {
        self.u32(s.len() as u32);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn signature(&mut self, s: &str) {
        self.buf.push(s.len() as u8);
        self.buf.extend_from_slice(s.as_bytes());
        self.buf.push(0);
    }

    fn value(&mut self, v: &Value) {
        match v {
            Value::Byte(b) => self.buf.push(*b),
            Value::Bool(b) => self.u32(u32::from(*b)),
            Value::I16(x) => self.fixed(&x.to_le_bytes()),
            Value::U16(x) => self.fixed(&x.to_le_bytes()),
            Value::I32(x) => self.fixed(&x.to_le_bytes()),
            Value::U32(x) | Value::Fd(x) => self.u32(*x),
            Value::I64(x) => self.fixed(&x.to_le_bytes()),
            Value::U64(x) | Value::Double(x) => self.fixed(&x.to_le_bytes()),
            Value::Str(s) | Value::ObjectPath(s) => self.string(s),
            Value::Signature(s) => self.signature(s),
            Value::Array(elem, items) => {
                self.pad(4);
                let at = self.buf.len();
                self.buf.extend_from_slice(&[0; 4]);
                self.pad(alignment(elem.as_bytes().first().copied().unwrap_or(b'y')));
                let start = self.buf.len();
                for item in items {
                    self.value(item);
                }
                let len = (self.buf.len() - start) as u32;
                self.buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
            }
            Value::Struct(fields) => {
                self.pad(8);
                for f in fields {
                    self.value(f);
                }
            }
            Value::DictEntry(k, v) => {
                self.pad(8);
                self.value(k);
                self.value(v);
            }
            Value::Variant(inner) => {
                self.signature(&inner.signature());
                self.value(inner);
            }
        }
    }

    fn fixed(&mut self, bytes: &[u8]) {
        self.pad(bytes.len());
        self.buf.extend_from_slice(bytes);
    }
}

/// The alignment of a type by its signature's first character.
fn alignment(code: u8) -> usize {
    match code {
        b'n' | b'q' => 2,
        b'b' | b'i' | b'u' | b's' | b'o' | b'a' | b'h' => 4,
        b'x' | b't' | b'd' | b'(' | b'{' => 8,
        _ => 1,
    }
}

/// A method call, ready to send.
pub struct Call<'a> {
    pub destination: Option<&'a str>,
    pub path: &'a str,
    pub interface: &'a str,
    pub member: &'a str,
    pub args: Vec<Value>,
}

impl Call<'_> {
    /// The call's bytes, with `serial`.
    pub fn encode(&self, serial: u32) -> Vec<u8> {
        let mut fields = vec![
            (1, Value::ObjectPath(self.path.into())),
            (2, Value::Str(self.interface.into())),
            (3, Value::Str(self.member.into())),
        ];
        if let Some(d) = self.destination {
            fields.push((6, Value::Str(d.into())));
        }
        encode(METHOD_CALL, serial, fields, &self.args)
    }
}

/// A little-endian message of `kind` with header `fields` (code, value;
/// the body's signature is added) and `body`.
pub fn encode(kind: u8, serial: u32, mut fields: Vec<(u8, Value)>, body: &[Value]) -> Vec<u8> {
    let signature: String = body.iter().map(Value::signature).collect();
    if !signature.is_empty() {
        fields.push((8, Value::Signature(signature)));
    }
    let mut b = Writer::default();
    for v in body {
        b.value(v);
    }
    let fields = fields
        .into_iter()
        .map(|(code, v)| Value::Struct(vec![Value::Byte(code), Value::Variant(v.into())]))
        .collect();
    let mut w = Writer::default();
    w.buf.extend_from_slice(&[b'l', kind, 0, 1]);
    w.u32(b.buf.len() as u32);
    w.u32(serial);
    w.value(&Value::Array("(yv)".into(), fields));
    w.pad(8);
    w.buf.extend_from_slice(&b.buf);
    w.buf
}

/// Reads values from one message (`big`: big-endian), every length
/// checked against what is left.
struct Reader<'a> {
    buf: &'a [u8],
    at: usize,
    big: bool,
}

impl<'a> Reader<'a> {
    fn align(&mut self, align: usize) -> Parsed<()> {
        let to = self.at.next_multiple_of(align);
        if to > self.buf.len() {
            return malformed("padding past the end");
        }
        if self.buf[self.at..to].iter().any(|b| *b != 0) {
            return malformed("padding that is not zero");
        }
        self.at = to;
        Ok(())
    }

    fn take(&mut self, n: usize) -> Parsed<&'a [u8]> {
        match self.at.checked_add(n) {
            Some(end) if end <= self.buf.len() => {
                let s = &self.buf[self.at..end];
                self.at = end;
                Ok(s)
            }
            _ => malformed("a value past the end"),
        }
    }

    fn fixed<const N: usize>(&mut self) -> Parsed<[u8; N]> {
        self.align(N)?;
        let mut b: [u8; N] = self.take(N)?.try_into().expect("N bytes");
        if self.big {
            b.reverse();
        }
        Ok(b)
    }

    fn u32(&mut self) -> Parsed<u32> {
        Ok(u32::from_le_bytes(self.fixed()?))
    }

    fn text(&mut self, len: usize) -> Parsed<String> {
        let bytes = self.take(len)?;
        if self.take(1)? != [0] {
            return malformed("a string without its nul");
        }
        match std::str::from_utf8(bytes) {
            Ok(s) if !s.contains('\0') => Ok(s.to_string()),
            _ => malformed("a string that is not UTF-8"),
        }
    }

    fn string(&mut self) -> Parsed<String> {
        let len = self.u32()? as usize;
        self.text(len)
    }

    fn signature(&mut self) -> Parsed<String> {
        let len = self.take(1)?[0] as usize;
        let s = self.text(len)?;
        let mut rest = s.as_bytes();
        while !rest.is_empty() {
            rest = &rest[single_type(rest, 0)?..];
        }
        Ok(s)
    }

    /// One value of the single complete type `sig`.
    fn value(&mut self, sig: &[u8], depth: usize) -> Parsed<Value> {
        if depth > MAX_DEPTH {
            return malformed("nested too deep");
        }
        let Some(&code) = sig.first() else {
            return malformed("an empty signature");
        };
        Ok(match code {
            b'y' => Value::Byte(self.take(1)?[0]),
            b'b' => match self.u32()? {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                _ => return malformed("a boolean that is neither 0 nor 1"),
            },
            b'n' => Value::I16(i16::from_le_bytes(self.fixed()?)),
            b'q' => Value::U16(u16::from_le_bytes(self.fixed()?)),
            b'i' => Value::I32(i32::from_le_bytes(self.fixed()?)),
            b'u' => Value::U32(self.u32()?),
            b'h' => Value::Fd(self.u32()?),
            b'x' => Value::I64(i64::from_le_bytes(self.fixed()?)),
            b't' => Value::U64(u64::from_le_bytes(self.fixed()?)),
            b'd' => Value::Double(u64::from_le_bytes(self.fixed()?)),
            b's' => Value::Str(self.string()?),
            b'o' => Value::ObjectPath(self.string()?),
            b'g' => Value::Signature(self.signature()?),
            b'v' => {
                let inner = self.signature()?;
                if single_type(inner.as_bytes(), 0)? != inner.len() {
                    return malformed("a variant of more than one type");
                }
                Value::Variant(Box::new(self.value(inner.as_bytes(), depth + 1)?))
            }
            b'a' => {
                let len = self.u32()? as usize;
                let elem_len = single_type(&sig[1..], depth + 1)?;
                let elem = &sig[1..1 + elem_len];
                self.align(alignment(elem[0]))?;
                let end = match self.at.checked_add(len) {
                    Some(end) if end <= self.buf.len() => end,
                    _ => return malformed("an array past the end"),
                };
                let mut items = Vec::new();
                while self.at < end {
                    items.push(self.value(elem, depth + 1)?);
                }
                if self.at != end {
                    return malformed("an array's length splits an element");
                }
                let elem = std::str::from_utf8(elem).expect("checked signature");
                Value::Array(elem.to_string(), items)
            }
            b'(' => {
                self.align(8)?;
                let len = single_type(sig, depth)?;
                let mut inner = &sig[1..len - 1];
                let mut fields = Vec::new();
                while !inner.is_empty() {
                    let n = single_type(inner, depth + 1)?;
                    fields.push(self.value(&inner[..n], depth + 1)?);
                    inner = &inner[n..];
                }
                Value::Struct(fields)
            }
            b'{' => {
                self.align(8)?;
                let k = single_type(&sig[1..], depth + 1)?;
                let key = self.value(&sig[1..1 + k], depth + 1)?;
                let v = single_type(&sig[1 + k..], depth + 1)?;
                let value = self.value(&sig[1 + k..1 + k + v], depth + 1)?;
                Value::DictEntry(Box::new(key), Box::new(value))
            }
            _ => return malformed("an unknown type in a signature"),
        })
    }
}

/// The length of the single complete type at the start of `sig`.
fn single_type(sig: &[u8], depth: usize) -> Parsed<usize> {
    if depth > MAX_DEPTH {
        return malformed("a signature nested too deep");
    }
    match sig.first() {
        Some(b'y' | b'b' | b'n' | b'q' | b'i' | b'u' | b'x' | b't' | b'd' | b's' | b'o' | b'g')
        | Some(b'h' | b'v') => Ok(1),
        Some(b'a') => Ok(1 + single_type(&sig[1..], depth + 1)?),
        Some(b'(') => {
            let mut at = 1;
            loop {
                match sig.get(at) {
                    None => return malformed("a struct without its end"),
                    Some(b')') if at > 1 => return Ok(at + 1),
                    Some(b')') => return malformed("an empty struct"),
                    Some(_) => at += single_type(&sig[at..], depth + 1)?,
                }
            }
        }
        Some(b'{') => {
            let key = sig.get(1).copied();
            if !matches!(
                key,
                Some(b'y' | b'b' | b'n' | b'q' | b'i' | b'u' | b'x' | b't' | b'd' | b's' | b'o')
                    | Some(b'g' | b'h')
            ) {
                return malformed("a dict entry whose key is not a basic type");
            }
            let v = single_type(&sig[2..], depth + 1)?;
            if sig.get(2 + v) != Some(&b'}') {
                return malformed("a dict entry of other than two types");
            }
            Ok(3 + v)
        }
        _ => malformed("an unknown type in a signature"),
    }
}

/// The length of the whole message whose first 16 bytes are `head`
/// (fixed header and the fields array's length).
pub fn message_len(head: &[u8; 16]) -> Parsed<usize> {
    let big = match head[0] {
        b'l' => false,
        b'B' => true,
        _ => return malformed("an unknown endianness"),
    };
    let word = |at: usize| {
        let b: [u8; 4] = head[at..at + 4].try_into().expect("4 bytes");
        if big {
            u32::from_be_bytes(b)
        } else {
            u32::from_le_bytes(b)
        }
    };
    let (body, fields) = (word(4) as usize, word(12) as usize);
    let len = 16usize
        .checked_add(fields)
        .map(|n| n.next_multiple_of(8))
        .and_then(|n| n.checked_add(body));
    match len {
        Some(n) if n <= MAX_MESSAGE => Ok(n),
        _ => malformed("a message larger than we read"),
    }
}

impl Message {
    /// Parses one whole message.
    pub fn parse(buf: &[u8]) -> Parsed<Message> {
        let Some(head) = buf.first_chunk::<16>() else {
            return malformed("a message shorter than its header");
        };
        if message_len(head)? != buf.len() {
            return malformed("a message whose lengths do not add up");
        }
        let mut r = Reader {
            buf,
            at: 0,
            big: buf[0] == b'B',
        };
        let mut m = Message {
            kind: buf[1],
            flags: buf[2],
            ..Message::default()
        };
        if buf[3] != 1 {
            return malformed("a protocol version other than 1");
        }
        r.at = 4;
        let body_len = r.u32()? as usize;
        m.serial = r.u32()?;
        let Value::Array(_, fields) = r.value(b"a(yv)", 0)? else {
            unreachable!("an array's signature reads as an array");
        };
        for f in fields {
            let Value::Struct(f) = f else { continue };
            let (Some(Value::Byte(code)), Some(Value::Variant(v))) = (f.first(), f.get(1)) else {
                continue;
            };
            let text = || v.as_str().map(str::to_string);
            match code {
                1 => m.path = text(),
                2 => m.interface = text(),
                3 => m.member = text(),
                4 => m.error_name = text(),
                5 => m.reply_serial = v.as_u32(),
                6 => m.destination = text(),
                7 => m.sender = text(),
                8 => m.signature = text().unwrap_or_default(),
                _ => {}
            }
        }
        r.align(8)?;
        if r.buf.len() - r.at != body_len {
            return malformed("a body whose length is not the header's");
        }
        let sig = m.signature.clone();
        let mut rest = sig.as_bytes();
        while !rest.is_empty() {
            let n = single_type(rest, 0)?;
            m.body.push(r.value(&rest[..n], 0)?);
            rest = &rest[n..];
        }
        if r.at != r.buf.len() {
            return malformed("bytes after the body's values");
        }
        Ok(m)
    }

    /// The error this message is, if it is an error reply.
    pub fn into_error(self) -> DbusError {
        DbusError::Remote {
            name: self.error_name.unwrap_or_else(|| "(no error name)".into()),
            message: self
                .body
                .first()
                .and_then(Value::as_str)
                .unwrap_or("")
                .to_string(),
        }
    }
}

/// A connection to a bus, or to a peer such as systemd's private socket.
pub struct Connection {
    stream: UnixStream,
    serial: u32,
    /// Signals read while waiting for a reply, for [`Connection::wait_signal`].
    signals: Vec<Message>,
}

impl Connection {
    /// Connects to `path` and authenticates as our uid (EXTERNAL). On a
    /// bus (`bus`: not a peer socket) also says Hello, as a bus wants.
    pub fn open(path: &Path, bus: bool, deadline: Instant) -> Parsed<Connection> {
        let stream = UnixStream::connect(path).map_err(|source| DbusError::Connect {
            path: path.display().to_string(),
            source,
        })?;
        let mut c = Connection {
            stream,
            serial: 0,
            signals: Vec::new(),
        };
        c.authenticate(deadline)?;
        if bus {
            c.call(
                &Call {
                    destination: Some("org.freedesktop.DBus"),
                    path: "/org/freedesktop/DBus",
                    interface: "org.freedesktop.DBus",
                    member: "Hello",
                    args: vec![],
                },
                deadline,
            )?;
        } else {
            c.ping(deadline)?;
        }
        Ok(c)
    }

    fn authenticate(&mut self, deadline: Instant) -> Parsed<()> {
        // SAFETY: getuid has no failure modes and no memory effects.
        let uid = unsafe { libc::getuid() }.to_string();
        let hex: String = uid.bytes().map(|b| format!("{b:02x}")).collect();
        self.stream
            .write_all(format!("\0AUTH EXTERNAL {hex}\r\n").as_bytes())?;
        let mut line = Vec::new();
        while !line.ends_with(b"\r\n") {
            if line.len() > 512 {
                return Err(DbusError::Auth(String::from_utf8_lossy(&line).into()));
            }
            let mut b = [0u8; 1];
            self.read_exact(&mut b, deadline)?;
            line.push(b[0]);
        }
        if !line.starts_with(b"OK ") {
            return Err(DbusError::Auth(
                String::from_utf8_lossy(&line).trim().into(),
            ));
        }
        // BEGIN goes alone: systemd 252's private socket left a call that
        // came in the same read as BEGIN unanswered.
        self.stream.write_all(b"BEGIN\r\n")?;
        Ok(())
    }

    /// Pings the peer until it answers: the first call after BEGIN may
    /// sit unread (above) until more bytes arrive.
    fn ping(&mut self, deadline: Instant) -> Parsed<()> {
        let ping = Call {
            destination: None,
            path: "/org/freedesktop/systemd1",
            interface: "org.freedesktop.DBus.Peer",
            member: "Ping",
            args: vec![],
        };
        let mut pending = Vec::new();
        // Pinged again after 2 ms, then ever less often: the unanswered
        // first costs about as long as the peer takes to read a second.
        let mut every = Duration::from_millis(2);
        loop {
            let serial = self.send(&ping)?;
            pending.push(serial);
            let wait = (Instant::now() + every).min(deadline);
            match self.reply_to(&pending, wait) {
                Ok(_) => return Ok(()),
                Err(DbusError::Timeout) if Instant::now() < deadline => {
                    every = (every * 2).min(Duration::from_millis(200));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends `call`; returns its serial.
    pub fn send(&mut self, call: &Call) -> Parsed<u32> {
        self.serial += 1;
        self.stream.write_all(&call.encode(self.serial))?;
        Ok(self.serial)
    }

    /// Calls a method and returns its reply's body; an error reply is
    /// [`DbusError::Remote`].
    pub fn call(&mut self, call: &Call, deadline: Instant) -> Parsed<Vec<Value>> {
        let serial = self.send(call)?;
        self.reply_to(&[serial], deadline).map(|m| m.body)
    }

    fn reply_to(&mut self, serials: &[u32], deadline: Instant) -> Parsed<Message> {
        loop {
            let m = self.read_message(deadline)?;
            match m.kind {
                METHOD_RETURN | ERROR if m.reply_serial.is_some_and(|s| serials.contains(&s)) => {
                    return match m.kind {
                        ERROR => Err(m.into_error()),
                        _ => Ok(m),
                    };
                }
                SIGNAL if self.signals.len() < 1024 => self.signals.push(m),
                _ => {}
            }
        }
    }

    /// Waits for a signal that `wanted` accepts (those already read
    /// first); others are dropped.
    pub fn wait_signal(
        &mut self,
        mut wanted: impl FnMut(&Message) -> bool,
        deadline: Instant,
    ) -> Parsed<Message> {
        if let Some(i) = self.signals.iter().position(&mut wanted) {
            return Ok(self.signals.remove(i));
        }
        self.signals.clear();
        loop {
            let m = self.read_message(deadline)?;
            if m.kind == SIGNAL && wanted(&m) {
                return Ok(m);
            }
        }
    }

    /// Reads the next message; `deadline` is for its first byte: once a
    /// message has begun, the rest gets at least 5 s more, so that a wait
    /// that ends never leaves half a message unread.
    fn read_message(&mut self, deadline: Instant) -> Parsed<Message> {
        let mut head = [0u8; 16];
        self.read_exact(&mut head[..1], deadline)?;
        let deadline = deadline.max(Instant::now() + Duration::from_secs(5));
        self.read_exact(&mut head[1..], deadline)?;
        let mut buf = vec![0u8; message_len(&head)?];
        buf[..16].copy_from_slice(&head);
        self.read_exact(&mut buf[16..], deadline)?;
        Message::parse(&buf)
    }

    fn read_exact(&mut self, mut buf: &mut [u8], deadline: Instant) -> Parsed<()> {
        while !buf.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(DbusError::Timeout);
            }
            self.stream.set_read_timeout(Some(left))?;
            match self.stream.read(buf) {
                Ok(0) => {
                    return Err(DbusError::Io(std::io::ErrorKind::UnexpectedEof.into()));
                }
                Ok(n) => buf = &mut buf[n..],
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock
                            | std::io::ErrorKind::TimedOut
                            | std::io::ErrorKind::Interrupted
                    ) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn deadline() -> Instant {
        Instant::now() + Duration::from_secs(10)
    }

    /// A dbus-daemon of its own on a socket in a temporary folder, killed
    /// when dropped.
    struct Daemon {
        child: std::process::Child,
        socket: std::path::PathBuf,
        _dir: tempfile::TempDir,
    }

    impl Daemon {
        fn start() -> Daemon {
            let dir = tempfile::tempdir().unwrap();
            let socket = dir.path().join("bus");
            let child = std::process::Command::new("dbus-daemon")
                .args(["--session", "--nofork", "--nopidfile"])
                .arg(format!("--address=unix:path={}", socket.display()))
                .spawn()
                .expect("dbus-daemon (package dbus-daemon, installed by hack/setup) must run here");
            let until = deadline();
            while !socket.exists() {
                assert!(Instant::now() < until, "dbus-daemon made no socket");
                std::thread::sleep(Duration::from_millis(10));
            }
            Daemon {
                child,
                socket,
                _dir: dir,
            }
        }
    }

    impl Drop for Daemon {
        fn drop(&mut self) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }

    fn bus_call<'a>(member: &'a str, args: Vec<Value>) -> Call<'a> {
        Call {
            destination: Some("org.freedesktop.DBus"),
            path: "/org/freedesktop/DBus",
            interface: "org.freedesktop.DBus",
            member,
            args,
        }
    }

    #[test]
    fn a_real_bus_answers_our_calls_and_errors_and_sends_us_its_signals() {
        let d = Daemon::start();
        let mut a = Connection::open(&d.socket, true, deadline()).unwrap();
        // Our unique name is in the bus's list.
        let names = a.call(&bus_call("ListNames", vec![]), deadline()).unwrap();
        let [Value::Array(elem, names)] = &names[..] else {
            panic!("{names:?}")
        };
        assert_eq!(elem, "s");
        assert!(names
            .iter()
            .any(|n| n.as_str().is_some_and(|n| n.starts_with(':'))));
        // A method with arguments of several types (a(sv)-like nesting is
        // systemd's; here a string in, a u32 out).
        let owner = a
            .call(
                &bus_call(
                    "RequestName",
                    vec![Value::Str("org.krunoci.Test".into()), Value::U32(4)],
                ),
                deadline(),
            )
            .unwrap();
        assert_eq!(owner, vec![Value::U32(1)], "primary owner");
        // An error reply is the caller's error, named.
        let e = a
            .call(
                &bus_call(
                    "GetNameOwner",
                    vec![Value::Str("org.krunoci.Nobody".into())],
                ),
                deadline(),
            )
            .unwrap_err();
        assert_eq!(
            e.remote_name(),
            Some("org.freedesktop.DBus.Error.NameHasNoOwner"),
            "{e}"
        );
        // A signal we match reaches us: a second connection's name.
        a.call(
            &bus_call(
                "AddMatch",
                vec![Value::Str(
                    "type='signal',member='NameOwnerChanged',arg0='org.krunoci.Second'".into(),
                )],
            ),
            deadline(),
        )
        .unwrap();
        let mut b = Connection::open(&d.socket, true, deadline()).unwrap();
        b.call(
            &bus_call(
                "RequestName",
                vec![Value::Str("org.krunoci.Second".into()), Value::U32(4)],
            ),
            deadline(),
        )
        .unwrap();
        let s = a
            .wait_signal(
                |m| m.member.as_deref() == Some("NameOwnerChanged"),
                deadline(),
            )
            .unwrap();
        assert_eq!(s.body[0], Value::Str("org.krunoci.Second".into()));
        // Nothing more comes: the wait ends at its deadline.
        let soon = Instant::now() + Duration::from_millis(200);
        assert!(matches!(
            a.wait_signal(|_| true, soon),
            Err(DbusError::Timeout)
        ));
    }

    #[test]
    fn a_bus_that_is_not_there_is_named() {
        let e = Connection::open(Path::new("/nonexistent/bus"), true, deadline())
            .err()
            .unwrap();
        assert!(e.to_string().contains("/nonexistent/bus"), "{e}");
    }

    fn sample() -> Vec<u8> {
        let body = vec![
            Value::Str("krun-oci-c1.scope".into()),
            Value::Array(
                "(sv)".into(),
                vec![
                    Value::Struct(vec![
                        Value::Str("PIDs".into()),
                        Value::Variant(Box::new(Value::Array("u".into(), vec![Value::U32(7)]))),
                    ]),
                    Value::Struct(vec![
                        Value::Str("MemoryMax".into()),
                        Value::Variant(Box::new(Value::U64(1 << 30))),
                    ]),
                ],
            ),
            Value::Array(
                "{sv}".into(),
                vec![Value::DictEntry(
                    Box::new(Value::Str("k".into())),
                    Box::new(Value::Variant(Box::new(Value::Bool(true)))),
                )],
            ),
            Value::Signature("a(sv)".into()),
            Value::I16(-2),
            Value::Byte(9),
            Value::I64(-5),
        ];
        encode(SIGNAL, 3, vec![(3, Value::Str("Sample".into()))], &body)
    }

    #[test]
    fn what_we_encode_parses_back_whole() {
        let bytes = sample();
        let m = Message::parse(&bytes).unwrap();
        assert_eq!(m.kind, SIGNAL);
        assert_eq!(m.serial, 3);
        assert_eq!(m.member.as_deref(), Some("Sample"));
        assert_eq!(m.signature, "sa(sv)a{sv}gnyx");
        let again = encode(SIGNAL, 3, vec![(3, Value::Str("Sample".into()))], &m.body);
        assert_eq!(again, bytes);
        // Big-endian messages read too (systemd may send either).
        let big = encode(SIGNAL, 1, vec![], &[Value::U32(0x01020304)]);
        let mut b = big.clone();
        b[0] = b'B';
        b[4..8].reverse();
        b[8..12].reverse();
        b[12..16].reverse();
        let body_at = b.len() - 4;
        b[body_at..].reverse();
        // The signature field's content is bytes, not reversed.
        assert_eq!(
            Message::parse(&b).unwrap().body,
            vec![Value::U32(0x01020304)]
        );
    }

    #[test]
    fn malformed_messages_are_refused_not_trusted() {
        let good = sample();
        // Every truncation.
        for n in 0..good.len() {
            assert!(Message::parse(&good[..n]).is_err(), "{n} bytes");
        }
        // A length that claims more than the message has.
        let mut long = good.clone();
        long[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(message_len(long[..16].try_into().unwrap()).is_err());
        // Nesting past D-Bus's limit.
        let deep = format!("{}y{}", "(".repeat(70), ")".repeat(70));
        assert!(single_type(deep.as_bytes(), 0).is_err());
        let arrays = format!("{}y", "a".repeat(100));
        assert!(single_type(arrays.as_bytes(), 0).is_err());
        // Signatures that are not one complete type.
        for bad in ["", "a", "()", "(y", "{yy", "{ayy}", "z", "{yyy}"] {
            assert!(single_type(bad.as_bytes(), 0).is_err(), "{bad:?}");
        }
        // A flipped byte anywhere: an error or a message, never a panic.
        for i in 0..good.len() {
            let mut m = good.clone();
            m[i] ^= 0xff;
            let _ = Message::parse(&m);
        }
    }
}
