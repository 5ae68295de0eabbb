//! The host's side of writing to guest-init: frames go into queues that a
//! single writer thread drains into the control channel's socket.
//!
//! The guest decides when it reads, so no caller may wait on it: control
//! messages are queued and never block (the queue is bounded; a guest that
//! lets it overflow is unresponsive); stdin data waits for room in a small
//! queue of its own, which only slows the thread pumping that stdin. The
//! writer writes whole frames, control messages before stdin, and gives up
//! on a guest that takes no byte for the deadline — counting only the time
//! the guest could have read: not while its VM is paused, and not while
//! the host itself is not taking the guest's output (guest-init then sits
//! blocked writing to the port, and reads nothing until the host drains it).
//!
//! A process's stdin is also held to a window: a pump sends at most
//! [`STDIN_WINDOW`] bytes (by default) that guest-init has not reported taken
//! ([`ToHost::StdinTaken`](krun_proto::ToHost::StdinTaken)), so a process
//! that reads slowly slows its writer on the host, as a pipe would, and
//! guest-init never holds more than that for it.

use std::collections::{HashMap, VecDeque};
use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use krun_proto::{encode_frame, Frame, FrameKind, ToGuest, STDIN_WINDOW};
use nix::sys::socket::{send, MsgFlags};

/// The bounds and the deadline of a control channel.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// How long the guest may take no byte before it is given up on.
    pub deadline: Duration,
    /// How often the writer looks at the clock while the guest takes
    /// nothing.
    pub tick: Duration,
    /// Control messages that may wait, and their bytes.
    pub control_frames: usize,
    pub control_bytes: usize,
    /// Stdin bytes that may wait before a pump has to.
    pub stdin_bytes: usize,
    /// Stdin bytes of one pumped process that may be sent ahead of what
    /// guest-init reported taken.
    pub stdin_window: usize,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            deadline: Duration::from_secs(60),
            tick: Duration::from_millis(100),
            control_frames: 4096,
            control_bytes: 8 << 20,
            stdin_bytes: 256 << 10,
            stdin_window: STDIN_WINDOW,
        }
    }
}

/// Why a guest was given up on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unresponsive {
    /// It took no byte for this long while it could have.
    Stalled(Duration),
    /// It let this many control messages pile up.
    Overflow(usize),
}

impl std::fmt::Display for Unresponsive {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unresponsive::Stalled(d) if d.subsec_millis() == 0 => write!(
                f,
                "the guest stopped reading its control channel for {} s",
                d.as_secs()
            ),
            Unresponsive::Stalled(d) => write!(
                f,
                "the guest stopped reading its control channel for {} ms",
                d.as_millis()
            ),
            Unresponsive::Overflow(n) => write!(
                f,
                "the guest stopped reading its control channel ({n} messages waiting)"
            ),
        }
    }
}

/// Why the channel takes no more frames.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum End {
    /// The host closed it (the session ended).
    Closed,
    /// Writing failed (the VM is gone).
    Failed(ErrorKind),
    Unresponsive(Unresponsive),
}

impl End {
    fn error(self) -> io::Error {
        match self {
            End::Closed => io::Error::new(ErrorKind::BrokenPipe, "the control channel is closed"),
            End::Failed(kind) => io::Error::new(kind, "the control channel failed"),
            End::Unresponsive(u) => io::Error::new(ErrorKind::TimedOut, u.to_string()),
        }
    }
}

#[derive(Default)]
struct Queues {
    control: VecDeque<Vec<u8>>,
    control_bytes: usize,
    stdin: VecDeque<Vec<u8>>,
    stdin_bytes: usize,
    /// The window of each stream a pump writes to (see [`Control::open_stdin`]).
    windows: HashMap<u32, Window>,
    /// While held: how many more control frames may still be written.
    hold_after: Option<usize>,
    end: Option<End>,
}

/// What the host sent of one process's stdin that guest-init has not
/// reported taken, and whether the process is gone.
#[derive(Default)]
struct Window {
    in_flight: usize,
    gone: bool,
}

impl Window {
    /// Whether `len` more bytes may go now within `window`: one chunk
    /// always may when nothing is in flight.
    fn fits(&self, len: usize, window: usize) -> bool {
        self.in_flight == 0 || self.in_flight.saturating_add(len) <= window
    }
}

impl Queues {
    fn finish(&mut self, end: End) {
        if self.end.is_none() {
            self.end = Some(end);
        }
        *self = Queues {
            end: self.end,
            ..Queues::default()
        };
    }
}

struct Shared {
    queues: Mutex<Queues>,
    /// Wakes the writer: a frame was queued, or the channel ended.
    work: Condvar,
    /// Wakes stdin pumps: room was made, or the channel ended.
    room: Condvar,
    paused: AtomicBool,
    inbound_blocked: AtomicBool,
    /// Set while the guest is quiesced for a capture: frames queue and
    /// are not written (the channel must stay between two frames).
    held: AtomicBool,
    limits: Limits,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Queues> {
        self.queues.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn end(&self) -> Option<End> {
        self.lock().end
    }

    fn finish(&self, end: End) {
        self.lock().finish(end);
        self.work.notify_all();
        self.room.notify_all();
    }

    /// Whether the guest is excused from reading now.
    fn excused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
            || self.inbound_blocked.load(Ordering::SeqCst)
            || self.held.load(Ordering::SeqCst)
    }
}

/// A shareable, never-blocking (but for stdin) writer of frames to the
/// guest.
#[derive(Clone)]
pub struct Control(Arc<Shared>);

impl Control {
    /// Starts the writer thread on `socket`; `report` is called once, on
    /// that thread, if the guest is given up on.
    pub fn start(
        socket: UnixStream,
        limits: Limits,
        report: impl FnOnce(Unresponsive) + Send + 'static,
    ) -> io::Result<Control> {
        let shared = Arc::new(Shared {
            queues: Mutex::new(Queues::default()),
            work: Condvar::new(),
            room: Condvar::new(),
            paused: AtomicBool::new(false),
            inbound_blocked: AtomicBool::new(false),
            held: AtomicBool::new(false),
            limits,
        });
        let writer = shared.clone();
        std::thread::Builder::new()
            .name("ctl-writer".into())
            .spawn(move || {
                if let Some(End::Unresponsive(u)) = write_frames(&writer, &socket) {
                    report(u);
                }
            })?;
        Ok(Control(shared))
    }

    /// Queues a control message; fails only if the channel has ended or
    /// its queue is full.
    /// A message too large for one frame is an `InvalidInput` error.
    pub fn send(&self, stream: u32, msg: &ToGuest) -> io::Result<()> {
        self.queue_control(encoded(Frame::control(stream, msg).encode())?)
    }

    /// Holds the stdin of process `stream` to its window from now on,
    /// until [`Control::close_stdin`]: called by its pump before it starts,
    /// so that [`Control::stdin_gone`] cannot come first.
    pub fn open_stdin(&self, stream: u32) {
        self.0.lock().windows.insert(stream, Window::default());
    }

    /// The pump of `stream` is done: its window is forgotten.
    pub fn close_stdin(&self, stream: u32) {
        self.0.lock().windows.remove(&stream);
    }

    /// guest-init took `bytes` more of the stdin of `stream` (a guest's
    /// count, so never trusted to be within what was sent).
    pub fn stdin_taken(&self, stream: u32, bytes: u64) {
        let mut q = self.0.lock();
        if let Some(w) = q.windows.get_mut(&stream) {
            let bytes = usize::try_from(bytes).unwrap_or(usize::MAX);
            w.in_flight = w.in_flight.saturating_sub(bytes);
            self.0.room.notify_all();
        }
    }

    /// The process of `stream` exited: its pump's writes fail from now on
    /// (as writing to a pipe whose reader is gone does).
    pub fn stdin_gone(&self, stream: u32) {
        let mut q = self.0.lock();
        if let Some(w) = q.windows.get_mut(&stream) {
            w.gone = true;
            self.0.room.notify_all();
        }
    }

    /// Queues `data` for the stdin of process `stream`, waiting for room
    /// (and, for a stream opened with [`Control::open_stdin`], for its
    /// window).
    pub fn stdin(&self, stream: u32, data: &[u8]) -> io::Result<()> {
        for chunk in data.chunks(krun_proto::MAX_PAYLOAD) {
            let frame = encoded(encode_frame(FrameKind::Stdin, stream, chunk))?;
            self.queue_stdin(stream, chunk.len(), frame)?;
        }
        Ok(())
    }

    /// Queues the end of the stdin of process `stream` behind the data
    /// queued for it; never waits.
    pub fn stdin_eof(&self, stream: u32) -> io::Result<()> {
        let frame = encoded(encode_frame(FrameKind::Stdin, stream, &[]))?;
        let mut q = self.0.lock();
        if let Some(end) = q.end {
            return Err(end.error());
        }
        if q.stdin.len() >= self.0.limits.control_frames {
            return Err(io::Error::new(ErrorKind::WouldBlock, "stdin queue full"));
        }
        q.stdin_bytes += frame.len();
        q.stdin.push_back(frame);
        self.0.work.notify_one();
        Ok(())
    }

    /// The VM is paused (or resumed): its guest reads nothing meanwhile,
    /// and the deadline does not run.
    pub fn set_paused(&self, paused: bool) {
        self.0.paused.store(paused, Ordering::SeqCst);
    }

    /// Queues `msg` and holds every frame queued after it until
    /// [`Control::release`]: the control messages queued before it and it
    /// are written, then nothing (stdin included), and the guest is not
    /// blamed for reading nothing. For a capture: `msg` (Quiesce) is the
    /// last frame the guest gets.
    pub fn send_and_hold(&self, stream: u32, msg: &ToGuest) -> io::Result<()> {
        let frame = encoded(Frame::control(stream, msg).encode())?;
        let mut q = self.0.lock();
        if let Some(end) = q.end {
            return Err(end.error());
        }
        q.control_bytes += frame.len();
        q.control.push_back(frame);
        q.hold_after = Some(q.control.len());
        self.0.held.store(true, Ordering::SeqCst);
        self.0.work.notify_all();
        Ok(())
    }

    /// Lets the held frames go (see [`Control::send_and_hold`]).
    pub fn release(&self) {
        let mut q = self.0.lock();
        q.hold_after = None;
        self.0.held.store(false, Ordering::SeqCst);
        self.0.work.notify_all();
    }

    /// The host is (or stops) holding back the guest's output: guest-init
    /// blocks writing it and reads nothing meanwhile, and the deadline
    /// does not run.
    pub fn set_inbound_blocked(&self, blocked: bool) {
        self.0.inbound_blocked.store(blocked, Ordering::SeqCst);
    }

    #[cfg(test)]
    pub(crate) fn inbound_blocked(&self) -> bool {
        self.0.inbound_blocked.load(Ordering::SeqCst)
    }

    /// Why the guest was given up on, if it was.
    pub fn unresponsive(&self) -> Option<Unresponsive> {
        match self.0.end() {
            Some(End::Unresponsive(u)) => Some(u),
            _ => None,
        }
    }

    /// Ends the channel: queued frames are dropped, the writer stops, and
    /// every send from now on fails.
    pub fn close(&self) {
        self.0.finish(End::Closed);
    }

    fn queue_control(&self, frame: Vec<u8>) -> io::Result<()> {
        let limits = &self.0.limits;
        let mut q = self.0.lock();
        if let Some(end) = q.end {
            return Err(end.error());
        }
        if q.control.len() >= limits.control_frames
            || q.control_bytes + frame.len() > limits.control_bytes
        {
            if self.0.excused() {
                return Err(io::Error::new(
                    ErrorKind::WouldBlock,
                    "the guest's control queue is full",
                ));
            }
            let end = End::Unresponsive(Unresponsive::Overflow(q.control.len()));
            drop(q);
            self.0.finish(end);
            return Err(end.error());
        }
        q.control_bytes += frame.len();
        q.control.push_back(frame);
        self.0.work.notify_one();
        Ok(())
    }

    fn queue_stdin(&self, stream: u32, len: usize, frame: Vec<u8>) -> io::Result<()> {
        let mut q = self.0.lock();
        loop {
            if let Some(end) = q.end {
                return Err(end.error());
            }
            let window = q.windows.get(&stream);
            if window.is_some_and(|w| w.gone) {
                return Err(io::Error::new(
                    ErrorKind::BrokenPipe,
                    "the process has exited",
                ));
            }
            if q.stdin_bytes < self.0.limits.stdin_bytes
                && window.is_none_or(|w| w.fits(len, self.0.limits.stdin_window))
            {
                break;
            }
            q = self.0.room.wait(q).unwrap_or_else(|e| e.into_inner());
        }
        if let Some(w) = q.windows.get_mut(&stream) {
            w.in_flight += len;
        }
        q.stdin_bytes += frame.len();
        q.stdin.push_back(frame);
        self.0.work.notify_one();
        Ok(())
    }
}

/// The writer thread: frame after frame until the channel ends; returns
/// how it ended.
/// An encoded frame, or the encoding error as `InvalidInput`: a message
/// larger than a frame may carry is the caller's to report.
fn encoded(frame: Result<Vec<u8>, krun_proto::ProtoError>) -> io::Result<Vec<u8>> {
    frame.map_err(|e| io::Error::new(ErrorKind::InvalidInput, e))
}

fn write_frames(shared: &Shared, socket: &UnixStream) -> Option<End> {
    loop {
        let frame = match next_frame(shared) {
            Ok(f) => f,
            Err(end) => return Some(end),
        };
        if let Err(end) = write_frame(shared, socket, &frame) {
            shared.finish(end);
            return shared.end();
        }
    }
}

/// Waits for the next frame to write: control messages first.
fn next_frame(shared: &Shared) -> Result<Vec<u8>, End> {
    let mut q = shared.lock();
    loop {
        if let Some(end) = q.end {
            return Err(end);
        }
        if let Some(n) = q.hold_after {
            if n > 0 {
                if let Some(f) = q.control.pop_front() {
                    q.control_bytes -= f.len();
                    q.hold_after = Some(n - 1);
                    return Ok(f);
                }
            }
            q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
            continue;
        }
        if let Some(f) = q.control.pop_front() {
            q.control_bytes -= f.len();
            return Ok(f);
        }
        if let Some(f) = q.stdin.pop_front() {
            q.stdin_bytes -= f.len();
            shared.room.notify_all();
            return Ok(f);
        }
        q = shared.work.wait(q).unwrap_or_else(|e| e.into_inner());
    }
}

/// Writes one whole frame, or fails: the channel ended meanwhile, the
/// socket failed, or the guest took nothing for the deadline.
fn write_frame(shared: &Shared, socket: &UnixStream, frame: &[u8]) -> Result<(), End> {
    let mut stall = Stall::new();
    let mut done = 0;
    while done < frame.len() {
        if let Some(end) = shared.end() {
            return Err(end);
        }
        // Never block in the kernel: the socket is shared with the reader,
        // so it stays blocking and each send says not to wait.
        let flags = MsgFlags::MSG_DONTWAIT | MsgFlags::MSG_NOSIGNAL;
        match send(socket.as_raw_fd(), &frame[done..], flags) {
            Ok(n) => {
                done += n;
                stall.progress();
            }
            Err(nix::errno::Errno::EAGAIN) => {
                wait_writable(socket.as_raw_fd(), shared.limits.tick);
                let stalled = stall.count(shared.excused());
                if stalled >= shared.limits.deadline {
                    let deadline = shared.limits.deadline;
                    return Err(End::Unresponsive(Unresponsive::Stalled(deadline)));
                }
            }
            Err(nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(End::Failed(io::Error::from(e).kind())),
        }
    }
    Ok(())
}

/// Time without progress that counts against the guest: the time between
/// looks at the clock when the guest was not excused at either look.
struct Stall {
    stalled: Duration,
    last: Instant,
    excused: bool,
}

impl Stall {
    fn new() -> Stall {
        Stall {
            stalled: Duration::ZERO,
            last: Instant::now(),
            excused: false,
        }
    }

    fn progress(&mut self) {
        *self = Stall::new();
    }

    /// Looks at the clock, the guest `excused` or not now; the total.
    fn count(&mut self, excused: bool) -> Duration {
        let now = Instant::now();
        if !excused && !self.excused {
            self.stalled += now - self.last;
        }
        self.excused = excused;
        self.last = now;
        self.stalled
    }
}

/// Waits up to `timeout` for `fd` to take more bytes.
fn wait_writable(fd: RawFd, timeout: Duration) {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLOUT,
        revents: 0,
    };
    // SAFETY: poll reads and writes one pollfd that outlives the call; the
    // fd is the writer's socket, open for as long as this call.
    unsafe { libc::poll(&mut pfd, 1, timeout.as_millis() as libc::c_int) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use krun_proto::{FrameReader, MAIN_STREAM};
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError};

    const DEADLINE: Duration = Duration::from_millis(300);

    fn limits() -> Limits {
        Limits {
            deadline: DEADLINE,
            tick: Duration::from_millis(10),
            ..Limits::default()
        }
    }

    /// A control writer to a peer that reads nothing, and its reports.
    fn silent() -> (Control, UnixStream, Receiver<Unresponsive>) {
        let (host, guest) = UnixStream::pair().unwrap();
        let (tx, reports) = mpsc::channel();
        let control = Control::start(host, limits(), move |u| tx.send(u).unwrap()).unwrap();
        (control, guest, reports)
    }

    /// Pumps stdin until the channel fails, as relay's pump does.
    fn pump(control: &Control) -> std::thread::JoinHandle<io::Error> {
        let control = control.clone();
        std::thread::spawn(move || loop {
            if let Err(e) = control.stdin(MAIN_STREAM, &[7u8; 64 * 1024]) {
                return e;
            }
        })
    }

    /// Waits until the bytes queued on `guest`'s side of the socket stop
    /// growing: the writer can move nothing more into it.
    fn wait_until_full(guest: &UnixStream) {
        let queued = || {
            let mut n: libc::c_int = 0;
            // SAFETY: FIONREAD writes one int through the pointer, which
            // is valid for the call; the descriptor is open.
            unsafe { libc::ioctl(guest.as_raw_fd(), libc::FIONREAD, &mut n) };
            n
        };
        let (mut last, mut since) = (queued(), Instant::now());
        while since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
            let now = queued();
            if now != last {
                (last, since) = (now, Instant::now());
            }
        }
        assert!(last > 0, "nothing reached the socket");
    }

    fn signal() -> ToGuest {
        ToGuest::Signal {
            signal: libc::SIGTERM,
            all: false,
        }
    }

    #[test]
    fn callers_never_block_and_a_silent_guest_is_reported_once() {
        let (control, _guest, reports) = silent();
        let start = Instant::now();
        let pump = pump(&control);
        for _ in 0..200 {
            let t = Instant::now();
            control.send(MAIN_STREAM, &signal()).unwrap();
            control.stdin_eof(5).unwrap();
            assert!(t.elapsed() < Duration::from_millis(100), "a send blocked");
        }
        let u = reports.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(u, Unresponsive::Stalled(DEADLINE));
        assert!(start.elapsed() >= DEADLINE);
        // Once: the writer is gone, with its report.
        assert_eq!(
            reports.recv_timeout(Duration::from_secs(20)),
            Err(RecvTimeoutError::Disconnected)
        );
        assert_eq!(pump.join().unwrap().kind(), ErrorKind::TimedOut);
        assert!(control.send(MAIN_STREAM, &signal()).is_err());
        assert_eq!(
            control.unresponsive(),
            Some(Unresponsive::Stalled(DEADLINE))
        );
    }

    /// Waits out three deadlines; then lets the clock run again.
    fn excused_until_released(excuse: impl Fn(&Control, bool)) {
        let (control, _guest, reports) = silent();
        excuse(&control, true);
        let _pump = pump(&control);
        assert_eq!(
            reports.recv_timeout(DEADLINE * 3),
            Err(RecvTimeoutError::Timeout),
            "reported while excused"
        );
        assert_eq!(control.unresponsive(), None);
        control.send(MAIN_STREAM, &signal()).unwrap();
        let released = Instant::now();
        excuse(&control, false);
        let u = reports.recv_timeout(Duration::from_secs(20)).unwrap();
        assert_eq!(u, Unresponsive::Stalled(DEADLINE));
        assert!(released.elapsed() >= DEADLINE);
    }

    #[test]
    fn a_paused_guest_is_not_blamed() {
        excused_until_released(|c, on| c.set_paused(on));
    }

    #[test]
    fn a_guest_the_host_holds_back_is_not_blamed() {
        excused_until_released(|c, on| c.set_inbound_blocked(on));
    }

    #[test]
    fn a_full_control_queue_is_an_unresponsive_guest_unless_excused() {
        let (host, guest) = UnixStream::pair().unwrap();
        let (tx, reports) = mpsc::channel();
        let small = Limits {
            control_frames: 10,
            deadline: Duration::from_secs(3600),
            ..limits()
        };
        let control = Control::start(host, small, move |u| tx.send(u).unwrap()).unwrap();
        let _pump = pump(&control);
        control.set_paused(true);
        // Until the socket is full, the writer still moves frames out of
        // the queue; the count below is only exact once it cannot.
        wait_until_full(&guest);
        let mut sent = 0;
        while control.send(MAIN_STREAM, &signal()).is_ok() {
            sent += 1;
            assert!(sent <= 11, "the queue is unbounded");
        }
        assert_eq!(control.unresponsive(), None, "a paused guest was blamed");
        control.set_paused(false);
        assert!(control.send(MAIN_STREAM, &signal()).is_err());
        let u = reports.recv_timeout(Duration::from_secs(20)).unwrap();
        assert!(matches!(u, Unresponsive::Overflow(n) if n >= 10), "{u:?}");
    }

    /// Many senders and two stdin pumps at once: every frame arrives
    /// whole, each stdin stream in order, and control messages overtake
    /// the stdin that was queued before them.
    #[test]
    fn frames_are_whole_and_control_goes_first() {
        const CHUNK: usize = 40_000;
        let (host, guest) = UnixStream::pair().unwrap();
        let big = Limits {
            stdin_bytes: 1 << 20,
            ..limits()
        };
        let control = Control::start(host, big, |u| panic!("{u}")).unwrap();
        let data = |i: u32| (0..CHUNK as u32).map(move |j| (i ^ j) as u8);
        let pumps: Vec<_> = [1u32, 2]
            .into_iter()
            .map(|stream| {
                let c = control.clone();
                std::thread::spawn(move || {
                    for i in 0..64u32 {
                        c.stdin(stream, &data(i).collect::<Vec<_>>()).unwrap();
                    }
                    c.stdin_eof(stream).unwrap();
                })
            })
            .collect();
        // Nobody reads yet: the socket fills, then the stdin queue.
        let deadline = Instant::now() + Duration::from_secs(20);
        while control.0.lock().stdin_bytes < big.stdin_bytes {
            assert!(Instant::now() < deadline, "the stdin queue did not fill");
            std::thread::sleep(Duration::from_millis(1));
        }
        let senders: Vec<_> = (0..4)
            .map(|_| {
                let c = control.clone();
                std::thread::spawn(move || {
                    for _ in 0..100 {
                        c.send(MAIN_STREAM, &signal()).unwrap();
                    }
                })
            })
            .collect();
        for t in senders {
            t.join().unwrap();
        }
        let mut reader = FrameReader::new(guest);
        let (mut stdin, mut controls, mut eofs) = ([Vec::new(), Vec::new()], 0, 0);
        let mut stdin_before_controls = 0;
        while eofs < 2 || controls < 400 {
            let f = reader.read_frame().unwrap().unwrap();
            match f.kind {
                FrameKind::Control => {
                    assert!(f.message::<ToGuest>().is_ok());
                    controls += 1;
                }
                FrameKind::Stdin if f.payload.is_empty() => eofs += 1,
                FrameKind::Stdin => {
                    stdin[f.stream as usize - 1].extend_from_slice(&f.payload);
                    if controls < 400 {
                        stdin_before_controls += 1;
                    }
                }
                _ => panic!("unexpected frame"),
            }
        }
        for p in pumps {
            p.join().unwrap();
        }
        let want: Vec<u8> = (0..64).flat_map(data).collect();
        assert!(stdin.iter().all(|s| *s == want), "stdin arrived changed");
        // Only what was already in the socket (or being written) went
        // ahead; in order of queueing, the whole queue would have.
        assert!(
            stdin_before_controls * CHUNK < big.stdin_bytes,
            "{stdin_before_controls} stdin frames went ahead of control messages"
        );
    }

    /// A guest that reads the channel and counts the stdin bytes of
    /// each stream it receives; it reports nothing taken by itself.
    fn counting_guest(guest: UnixStream) -> Arc<Mutex<HashMap<u32, usize>>> {
        let counts = Arc::new(Mutex::new(HashMap::new()));
        let c = counts.clone();
        std::thread::spawn(move || {
            let mut r = FrameReader::new(guest);
            while let Ok(Some(f)) = r.read_frame() {
                if f.kind == FrameKind::Stdin {
                    *c.lock().unwrap().entry(f.stream).or_insert(0) += f.payload.len();
                }
            }
        });
        counts
    }

    /// Waits until `counts[stream]` stops growing, and returns it.
    fn settled(counts: &Mutex<HashMap<u32, usize>>, stream: u32) -> usize {
        let get = || counts.lock().unwrap().get(&stream).copied().unwrap_or(0);
        let (mut last, mut since) = (get(), Instant::now());
        while since.elapsed() < Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
            if get() != last {
                (last, since) = (get(), Instant::now());
            }
        }
        last
    }

    /// A pump to an opened stream sends no more than the window ahead of
    /// what the guest reported taken, whatever the guest reports.
    #[test]
    fn a_pump_waits_for_the_guest_to_take_its_stdin() {
        let (host, guest) = UnixStream::pair().unwrap();
        let control = Control::start(host, Limits::default(), |_| {}).unwrap();
        let counts = counting_guest(guest);
        control.open_stdin(3);
        let pumper = control.clone();
        let pump = std::thread::spawn(move || loop {
            if let Err(e) = pumper.stdin(3, &[1u8; 64 * 1024]) {
                return e;
            }
        });
        assert_eq!(settled(&counts, 3), STDIN_WINDOW);
        control.stdin_taken(3, 100 * 1024);
        // Whole chunks only: one more fits in 100 KiB.
        assert_eq!(settled(&counts, 3), STDIN_WINDOW + 64 * 1024);
        // A count beyond what was sent frees the window, no more.
        control.stdin_taken(3, u64::MAX);
        assert_eq!(settled(&counts, 3), 2 * STDIN_WINDOW + 64 * 1024);
        // Another stream, not opened, is not held to the window.
        control.stdin(4, &vec![2u8; 3 * STDIN_WINDOW]).unwrap();
        assert_eq!(settled(&counts, 4), 3 * STDIN_WINDOW);
        // The process exits: the waiting pump fails as a pipe write would.
        control.stdin_gone(3);
        let e = pump.join().unwrap();
        assert_eq!(e.kind(), ErrorKind::BrokenPipe, "{e}");
        control.close_stdin(3);
        assert!(control.0.lock().windows.is_empty());
    }
}
