//! The event loop of PID 1: control messages in, stdio and exits out.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};

use anyhow::Context;
use krun_proto::{
    ContainerSetup, Decoder, ExitStatus, Frame, FrameKind, ProcessSetup, ToGuest, ToHost,
    MAIN_STREAM, PROTOCOL_VERSION,
};

use crate::container::{self, Container, Pending, Stdio};
use crate::failure::Failure;
use crate::{mounts, net, sys};

/// Output is read and sent in chunks of at most this many bytes.
const CHUNK: usize = 64 * 1024;

/// Stdin taken is reported once this much has gathered, or whenever the
/// process has taken all it was sent.
const STDIN_REPORT: u64 = 64 * 1024;

/// One process in the VM, by stream number.
struct Proc {
    /// The container it runs in.
    container: String,
    pid: i32,
    stdio: Stdio,
    /// Stdin the host sent that the process has not taken yet: at most
    /// [`krun_proto::STDIN_WINDOW`] bytes, as the host sends no more
    /// before it hears they were taken.
    stdin_buf: Vec<u8>,
    stdin_eof: bool,
    /// Stdin bytes taken (or dropped) and not yet reported to the host.
    stdin_taken: u64,
    /// Set until the process is started (the main process between create
    /// and start).
    pending: Option<Pending>,
    status: Option<ExitStatus>,
    /// False for a process whose failure was already reported.
    report_exit: bool,
}

#[derive(Clone, Copy)]
enum Source {
    Port,
    Child,
    Oom,
    Stdout(u32),
    Stderr(u32),
    Stdin(u32),
}

pub struct Agent {
    port: File,
    decoder: Decoder,
    sigchld: OwnedFd,
    procs: BTreeMap<u32, Proc>,
    containers: BTreeMap<String, Container>,
    started_ns: u64,
    shutdown: bool,
    /// Between Quiesce and Resume: nothing is written to the host; what
    /// would be, waits here (answers and exits: a few per process).
    quiesced: bool,
    deferred: Vec<Vec<u8>>,
}

/// Frames that may wait for a Resume; beyond, guest-init cannot go on.
const DEFERRED_MAX: usize = 4096;

impl Agent {
    pub fn new(port: File, started_ns: u64) -> anyhow::Result<Agent> {
        let sigchld = sys::sigchld_fd().context("creating the SIGCHLD signalfd")?;
        Ok(Agent {
            port,
            decoder: Decoder::new(),
            sigchld,
            procs: BTreeMap::new(),
            containers: BTreeMap::new(),
            started_ns,
            shutdown: false,
            quiesced: false,
            deferred: Vec::new(),
        })
    }

    fn send(&mut self, stream: u32, msg: &ToHost) -> anyhow::Result<()> {
        if self.quiesced {
            anyhow::ensure!(
                self.deferred.len() < DEFERRED_MAX,
                "more than {DEFERRED_MAX} messages waiting for the host's resume"
            );
            let frame = Frame::control(stream, msg)
                .encode()
                .context("encoding a message")?;
            self.deferred.push(frame);
            return Ok(());
        }
        Frame::control(stream, msg)
            .write_to(&mut self.port)
            .context("writing to the control port")
    }

    /// Quiesce: the guest's writes to its files reach the host, the host
    /// hears so, and nothing more is written until Resume.
    fn quiesce(&mut self) -> anyhow::Result<()> {
        sys::sync();
        self.send(MAIN_STREAM, &ToHost::Quiesced)?;
        self.quiesced = true;
        Ok(())
    }

    /// Resume: the clock and the RNG as the host says, then what waited.
    fn resume(&mut self, realtime_ns: u64, entropy: &[u8]) -> anyhow::Result<()> {
        if entropy.len() <= krun_proto::MAX_ENTROPY && !entropy.is_empty() {
            if let Err(e) = sys::credit_entropy(entropy) {
                sys::console(&format!("resume: reseeding the guest's RNG: {e}"));
            }
        }
        if realtime_ns != 0 {
            if let Err(e) = sys::set_realtime(realtime_ns) {
                sys::console(&format!("resume: cannot set the clock: {e}"));
            }
        }
        self.quiesced = false;
        for frame in std::mem::take(&mut self.deferred) {
            self.port
                .write_all(&frame)
                .context("writing to the control port")?;
        }
        Ok(())
    }

    /// Serves the host until it says shutdown or goes away.
    pub fn run(mut self) -> anyhow::Result<()> {
        let hello = ToHost::Hello {
            version: PROTOCOL_VERSION,
            init_started_ns: self.started_ns,
            sent_ns: sys::boottime_ns(),
        };
        self.send(MAIN_STREAM, &hello)?;
        let mut buf = vec![0u8; CHUNK];
        while !self.shutdown {
            let (mut pfds, sources) = self.poll_set();
            sys::poll(&mut pfds, -1).context("poll")?;
            for (pfd, source) in pfds.iter().zip(sources) {
                if pfd.revents != 0 {
                    self.handle(source, &mut buf)?;
                }
            }
            self.send_exits()?;
        }
        self.kill_all();
        Ok(())
    }

    fn poll_set(&self) -> (Vec<libc::pollfd>, Vec<Source>) {
        let mut pfds = Vec::new();
        let mut sources = Vec::new();
        let mut add = |fd: RawFd, events: libc::c_short, s: Source| {
            pfds.push(libc::pollfd {
                fd,
                events,
                revents: 0,
            });
            sources.push(s);
        };
        add(self.port.as_raw_fd(), libc::POLLIN, Source::Port);
        add(self.sigchld.as_raw_fd(), libc::POLLIN, Source::Child);
        if self.quiesced {
            // Output and OOM events wait where they are (in their pipes,
            // their cgroup), stdin goes on being passed in.
            for (&id, p) in &self.procs {
                if let (Some(fd), false) = (&p.stdio.stdin, p.stdin_buf.is_empty()) {
                    add(fd.as_raw_fd(), libc::POLLOUT, Source::Stdin(id));
                }
            }
            return (pfds, sources);
        }
        for c in self.containers.values() {
            if let Some(fd) = c.oom_fd() {
                add(fd, libc::POLLPRI, Source::Oom);
            }
        }
        for (&id, p) in &self.procs {
            if let Some(fd) = &p.stdio.stdout {
                add(fd.as_raw_fd(), libc::POLLIN, Source::Stdout(id));
            }
            if let Some(fd) = &p.stdio.stderr {
                add(fd.as_raw_fd(), libc::POLLIN, Source::Stderr(id));
            }
            if let Some(fd) = &p.stdio.stdin {
                if !p.stdin_buf.is_empty() {
                    add(fd.as_raw_fd(), libc::POLLOUT, Source::Stdin(id));
                }
            }
        }
        (pfds, sources)
    }

    /// Serves one source that poll found ready.
    fn handle(&mut self, source: Source, buf: &mut [u8]) -> anyhow::Result<()> {
        match source {
            Source::Port => self.read_port(buf)?,
            Source::Child => self.reap(),
            Source::Oom => self.check_oom()?,
            Source::Stdout(id) => self.relay(id, FrameKind::Stdout, buf)?,
            Source::Stderr(id) => self.relay(id, FrameKind::Stderr, buf)?,
            Source::Stdin(id) => self.flush_stdin(id)?,
        }
        Ok(())
    }

    /// Reads what the host sent and handles every whole frame in it.
    fn read_port(&mut self, buf: &mut [u8]) -> anyhow::Result<()> {
        let n = match self.port.read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted || e.kind() == ErrorKind::WouldBlock => {
                return Ok(())
            }
            Err(e) => return Err(e).context("reading the control port"),
        };
        if n == 0 {
            // The host closed the channel: nobody is left to serve.
            self.shutdown = true;
            return Ok(());
        }
        self.decoder.feed(&buf[..n]);
        while let Some(frame) = self
            .decoder
            .next_frame()
            .context("decoding a frame from the host")?
        {
            self.dispatch(frame)?;
        }
        Ok(())
    }

    /// Reaps every exited child and records the status of ours.
    fn reap(&mut self) {
        sys::drain_signalfd(&self.sigchld);
        while let Some((pid, status)) = sys::reap_any() {
            if let Some(p) = self
                .procs
                .values_mut()
                .find(|p| p.pid == pid && p.status.is_none())
            {
                p.status = Some(status);
            }
        }
    }

    /// Sends what process `id` wrote on its stdout or stderr (`kind`) to
    /// the host; at end of file, closes that side.
    fn relay(&mut self, id: u32, kind: FrameKind, buf: &mut [u8]) -> anyhow::Result<()> {
        let Some(p) = self.procs.get_mut(&id) else {
            return Ok(());
        };
        let fd = if kind == FrameKind::Stdout {
            &mut p.stdio.stdout
        } else {
            &mut p.stdio.stderr
        };
        let Some(f) = fd.as_ref() else { return Ok(()) };
        let n = match (&*f).read(buf) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted => {
                return Ok(())
            }
            // EIO is how a pty master says the other side is gone.
            Err(_) => 0,
        };
        if n == 0 {
            *fd = None;
        } else {
            let frame =
                krun_proto::encode_frame(kind, id, &buf[..n]).context("encoding process output")?;
            self.port
                .write_all(&frame)
                .context("writing to the control port")?;
        }
        Ok(())
    }

    /// Passes what process `id` was sent for its stdin on, as far as it
    /// takes it, and tells the host what was taken so that it sends more.
    fn flush_stdin(&mut self, id: u32) -> anyhow::Result<()> {
        let Some(p) = self.procs.get_mut(&id) else {
            return Ok(());
        };
        p.stdin_taken += p.flush_stdin() as u64;
        if p.stdin_taken >= STDIN_REPORT || (p.stdin_taken > 0 && p.stdin_buf.is_empty()) {
            let bytes = std::mem::take(&mut p.stdin_taken);
            self.send(id, &ToHost::StdinTaken { bytes })?;
        }
        Ok(())
    }

    fn dispatch(&mut self, frame: Frame) -> anyhow::Result<()> {
        let stream = frame.stream;
        match frame.kind {
            FrameKind::Stdin => {
                if let Some(p) = self.procs.get_mut(&stream) {
                    if frame.payload.is_empty() {
                        p.stdin_eof = true;
                    } else {
                        p.stdin_buf.extend_from_slice(&frame.payload);
                    }
                    self.flush_stdin(stream)?;
                }
            }
            FrameKind::Control => match frame.message::<ToGuest>() {
                Ok(msg) => self.control(stream, msg)?,
                Err(e) => sys::console(&format!("ignoring a malformed message from the host: {e}")),
            },
            FrameKind::Stdout | FrameKind::Stderr => {}
        }
        Ok(())
    }

    /// The container whose process is on `stream`.
    fn container_of(&self, stream: u32) -> Option<&Container> {
        self.procs
            .get(&stream)
            .and_then(|p| self.containers.get(&p.container))
    }

    /// Serves one request of the host, on `stream`.
    fn control(&mut self, stream: u32, msg: ToGuest) -> anyhow::Result<()> {
        match msg {
            ToGuest::Create(setup) => self.create(stream, &setup),
            ToGuest::Start => self.start(stream),
            ToGuest::Exec {
                container: id,
                process,
            } => self.exec(stream, &id, &process),
            ToGuest::Stats => {
                let stats = self
                    .container_of(stream)
                    .map(|c| c.stats())
                    .unwrap_or_default();
                self.send(stream, &ToHost::Stats(stats))
            }
            ToGuest::Ps => {
                let processes = self
                    .container_of(stream)
                    .map(|c| c.processes())
                    .unwrap_or_default();
                self.send(stream, &ToHost::Processes { processes })
            }
            ToGuest::Update(limits) => match self.container_of(stream).map(|c| c.update(&limits)) {
                Some(Ok(())) => self.send(stream, &ToHost::Updated),
                Some(Err(f)) => self.fail(stream, f),
                None => self.fail(stream, Failure::new(1, "update: no such container")),
            },
            ToGuest::Freeze { frozen } => {
                match self.container_of(stream).map(|c| c.freeze(frozen)) {
                    Some(Ok(())) => self.send(stream, &ToHost::Updated),
                    Some(Err(f)) => self.fail(stream, f),
                    None => self.fail(stream, Failure::new(1, "freeze: no such container")),
                }
            }
            ToGuest::Signal { signal, all } => {
                self.signal(stream, signal, all);
                Ok(())
            }
            ToGuest::Resize { rows, cols } => {
                if let Some(tty) = self.procs.get(&stream).and_then(|p| p.stdio.tty.as_ref()) {
                    let _ = sys::set_winsize(tty.as_raw_fd(), rows, cols);
                }
                Ok(())
            }
            ToGuest::Shutdown => {
                self.shutdown = true;
                Ok(())
            }
            ToGuest::Quiesce => self.quiesce(),
            ToGuest::Resume {
                realtime_ns,
                entropy,
            } => self.resume(realtime_ns, &entropy),
        }
    }

    /// Creates a container whose main process is on `stream`.
    fn create(&mut self, stream: u32, setup: &ContainerSetup) -> anyhow::Result<()> {
        if self.containers.contains_key(&setup.id) || self.procs.contains_key(&stream) {
            let f = Failure::new(1, format!("container {} already exists", setup.id));
            return self.fail(stream, f);
        }
        // Before anything of the container runs: a template's clones must
        // not share what their RNG draws.
        if setup.entropy.len() > krun_proto::MAX_ENTROPY {
            let f = Failure::new(
                1,
                format!(
                    "{} bytes of entropy: at most {}",
                    setup.entropy.len(),
                    krun_proto::MAX_ENTROPY
                ),
            );
            return self.fail(stream, f);
        }
        if let Err(e) = sys::credit_entropy(&setup.entropy) {
            return self.fail(
                stream,
                Failure::new(1, format!("reseeding the guest's RNG: {e}")),
            );
        }
        if self.containers.is_empty() {
            if let Err(e) = sys::set_realtime(setup.realtime_ns) {
                sys::console(&format!("cannot set the clock: {e}"));
            }
            // The VM's network, once, before its first container.
            if let Err(e) = net::configure(setup.network.as_ref()) {
                return self.fail(stream, Failure::new(1, format!("network: {e}")));
            }
        }
        let share = match &setup.share_with {
            Some(other) => match self.containers.get(other) {
                Some(c) => Some(c),
                None => {
                    let f = Failure::new(
                        1,
                        format!("cannot share namespaces with {other}: no such container"),
                    );
                    return self.fail(stream, f);
                }
            },
            None => None,
        };
        if let Err(f) = mounts::keep_shares(setup) {
            return self.fail(stream, f);
        }
        match container::create(setup, share, stream) {
            Ok((c, stdio, pending)) => {
                let pid = c.init_pid;
                self.containers.insert(setup.id.clone(), c);
                self.procs
                    .insert(stream, Proc::new(&setup.id, pid, stdio, Some(pending)));
                self.send(stream, &ToHost::Created { pid })
            }
            Err(f) => self.fail(stream, f),
        }
    }

    /// Lets the created process on `stream` exec its program.
    fn start(&mut self, stream: u32) -> anyhow::Result<()> {
        let Some(p) = self.procs.get_mut(&stream) else {
            return self.fail(stream, Failure::new(1, "no such process to start"));
        };
        let Some(pending) = p.pending.take() else {
            return self.fail(stream, Failure::new(1, "the process was already started"));
        };
        let pid = p.pid;
        match container::start(pending) {
            Ok(()) => self.send(stream, &ToHost::Started { pid }),
            Err(f) => {
                p.report_exit = false;
                self.fail(stream, f)
            }
        }
    }

    /// Runs one more process, on `stream`, in the running container `id`.
    fn exec(&mut self, stream: u32, id: &str, process: &ProcessSetup) -> anyhow::Result<()> {
        let Some(c) = self.containers.get(id) else {
            return self.fail(
                stream,
                Failure::new(1, format!("exec: container {id} does not exist")),
            );
        };
        if self.procs.contains_key(&stream) {
            return self.fail(
                stream,
                Failure::new(1, "exec: the stream is already in use"),
            );
        }
        if self
            .procs
            .get(&c.main_stream)
            .is_none_or(|p| p.pending.is_some() || p.status.is_some())
        {
            return self.fail(
                stream,
                Failure::new(1, format!("exec: container {id} is not running")),
            );
        }
        match container::exec(c, process) {
            Ok((pid, stdio)) => {
                self.procs.insert(stream, Proc::new(id, pid, stdio, None));
                self.send(stream, &ToHost::Started { pid })
            }
            Err(f) => self.fail(stream, f),
        }
    }

    /// Sends `signal` to the process on `stream`, or with `all` to every
    /// process of its container.
    fn signal(&self, stream: u32, signal: i32, all: bool) {
        if all {
            if let Some(c) = self.container_of(stream) {
                c.signal_all(signal);
            }
        } else if let Some(p) = self.procs.get(&stream) {
            if p.status.is_none() {
                let _ = sys::kill(p.pid, signal);
            }
        }
    }

    fn fail(&mut self, stream: u32, f: Failure) -> anyhow::Result<()> {
        self.send(
            stream,
            &ToHost::Failed {
                code: f.code,
                message: f.message,
            },
        )
    }

    /// Reports new OOM kills in any container, on its main stream.
    fn check_oom(&mut self) -> anyhow::Result<()> {
        let hit: Vec<u32> = self
            .containers
            .values_mut()
            .filter_map(|c| c.new_oom_kills().then_some(c.main_stream))
            .collect();
        for stream in hit {
            self.send(stream, &ToHost::Oom)?;
        }
        Ok(())
    }

    /// Reports every process that has exited and whose output is drained;
    /// a container whose main process exited is gone.
    fn send_exits(&mut self) -> anyhow::Result<()> {
        if self.quiesced {
            return Ok(());
        }
        let done: Vec<u32> = self
            .procs
            .iter()
            .filter(|(_, p)| {
                p.status.is_some() && p.stdio.stdout.is_none() && p.stdio.stderr.is_none()
            })
            .map(|(&id, _)| id)
            .collect();
        for id in done {
            let p = self.procs.remove(&id).expect("listed above");
            let is_main = self
                .containers
                .get(&p.container)
                .is_some_and(|c| c.main_stream == id);
            if is_main {
                self.check_oom()?;
                // What the workload wrote must be on the host's disk before
                // anyone learns it has exited.
                sys::sync();
            }
            if p.report_exit {
                let status = p.status.expect("filtered on status");
                self.send(id, &ToHost::Exited { status })?;
            }
            if is_main {
                if let Some(c) = self.containers.remove(&p.container) {
                    c.remove();
                }
            }
        }
        Ok(())
    }

    fn kill_all(&mut self) {
        for p in self.procs.values() {
            if p.status.is_none() {
                let _ = sys::kill(p.pid, libc::SIGKILL);
            }
        }
    }
}

impl Proc {
    fn new(container: &str, pid: i32, stdio: Stdio, pending: Option<Pending>) -> Proc {
        Proc {
            container: container.to_string(),
            pid,
            stdio,
            stdin_buf: Vec::new(),
            stdin_eof: false,
            stdin_taken: 0,
            pending,
            status: None,
            report_exit: true,
        }
    }

    /// Writes what the host sent for stdin without blocking; closes stdin
    /// once the host said EOF and everything is written. Returns how many
    /// bytes left the buffer: written, or dropped for a closed stdin.
    fn flush_stdin(&mut self) -> usize {
        let before = self.stdin_buf.len();
        let Some(fd) = &self.stdio.stdin else {
            self.stdin_buf.clear();
            return before;
        };
        let mut written = 0;
        while written < before {
            match (&*fd).write(&self.stdin_buf[written..]) {
                Ok(n) => written += n,
                Err(e)
                    if e.kind() == ErrorKind::WouldBlock || e.kind() == ErrorKind::Interrupted =>
                {
                    break
                }
                Err(_) => {
                    // The reader is gone (EPIPE): drop what it will never read.
                    self.stdin_buf.clear();
                    self.stdio.stdin = None;
                    return before;
                }
            }
        }
        self.stdin_buf.drain(..written);
        if self.stdin_buf.is_empty() && self.stdin_eof && self.stdio.tty.is_none() {
            self.stdio.stdin = None;
        }
        written
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A process whose stdin is the write end of a non-blocking pipe; the
    /// read end is returned.
    fn piped() -> (Proc, File) {
        let (r, w) = sys::pipe().unwrap();
        sys::set_nonblocking(&w).unwrap();
        let stdio = Stdio {
            stdin: Some(File::from(w)),
            stdout: None,
            stderr: None,
            tty: None,
        };
        (Proc::new("c", 1, stdio, None), File::from(r))
    }

    #[test]
    fn stdin_taken_is_what_the_process_took_or_what_was_dropped() {
        let (mut p, r) = piped();
        p.stdin_buf = vec![7; 1 << 20];
        // The pipe takes what fits in it, no more.
        let took = p.flush_stdin();
        assert!(took > 0 && took < 1 << 20, "{took}");
        assert_eq!(p.stdin_buf.len(), (1 << 20) - took);
        assert_eq!(p.flush_stdin(), 0);
        // The reader goes: the rest is dropped, and counts as taken.
        drop(r);
        assert_eq!(p.flush_stdin(), (1 << 20) - took);
        assert!(p.stdin_buf.is_empty() && p.stdio.stdin.is_none());
        p.stdin_buf = vec![1; 10];
        assert_eq!(p.flush_stdin(), 10);
    }

    #[test]
    fn stdin_closes_once_the_host_said_eof_and_all_is_taken() {
        let (mut p, r) = piped();
        p.stdin_buf = b"abc".to_vec();
        p.stdin_eof = true;
        assert_eq!(p.flush_stdin(), 3);
        assert!(p.stdio.stdin.is_none());
        assert_eq!(std::io::read_to_string(r).unwrap(), "abc");
    }
}
