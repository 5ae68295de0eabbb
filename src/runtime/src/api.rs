//! The monitor's socket: how `krun-oci start/kill/exec/ps/...` talk to the
//! process that runs a container's VM. One JSON line per message; file
//! descriptors (an exec's stdio) travel with the request as SCM_RIGHTS.

use std::io::{BufRead, BufReader, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use krun_proto::{CgroupSetup, ProcessInfo, ProcessSetup};
use nix::sys::socket::{recvmsg, sendmsg, ControlMessage, ControlMessageOwned, MsgFlags};
use serde::{Deserialize, Serialize};

/// Most descriptors one request carries (stdin, stdout, stderr).
const MAX_FDS: usize = 3;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Request {
    /// Exec the container's process.
    Start,
    /// Signal the container's process, or with `all` every process of it.
    /// `stream` names another container of the VM by its main process's
    /// stream (a pod's); 0 is the VM's first.
    Kill {
        signal: i32,
        all: bool,
        #[serde(default)]
        stream: u32,
    },
    /// Run another process; its stdin, stdout and stderr come with the
    /// request (or one terminal for all three). Answered with `Started`,
    /// then `Exited` when it ends. `container`: which container of the VM
    /// (default: the first).
    Exec {
        process: Box<ProcessSetup>,
        #[serde(default)]
        container: Option<String>,
    },
    /// Prepare one more container in this VM (a pod's), its stdio with the
    /// request (3 descriptors). Answered with `Created` (its stream), then
    /// `Exited` when its process ends.
    CreateContainer {
        setup: Box<krun_proto::ContainerSetup>,
    },
    /// Exec the process of a container made by `CreateContainer`.
    StartContainer {
        stream: u32,
    },
    /// End of input for a process's stdin (`stream` 0 is the container's).
    CloseStdin {
        stream: u32,
    },
    /// Signal an exec'd process.
    SignalExec {
        stream: u32,
        signal: i32,
    },
    /// A terminal changed size (`stream` 0 is the container's process).
    Resize {
        stream: u32,
        rows: u16,
        cols: u16,
    },
    Ps {
        #[serde(default)]
        stream: u32,
    },
    /// The container's resource use, from inside its VM.
    Stats {
        #[serde(default)]
        stream: u32,
    },
    /// Pause or resume the whole VM.
    Pause,
    Resume,
    /// Freeze (or thaw) the processes of one container of the VM (a pod
    /// member's pause and resume), by its main process's stream.
    Freeze {
        stream: u32,
        frozen: bool,
    },
    Update {
        limits: CgroupSetup,
        #[serde(default)]
        stream: u32,
    },
    /// Stop the VM now (delete --force, delete of a created container).
    Shutdown,
    /// Capture the whole VM into the file that comes with the request (one
    /// descriptor, new and open for writing): a checkpoint. Unless
    /// `leave_running`, the container then ends, stopped, without its
    /// guest running another instruction.
    Checkpoint {
        leave_running: bool,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "result", rename_all = "snake_case")]
pub enum Response {
    Ok,
    Started {
        stream: u32,
        pid: i32,
    },
    /// A container made by `CreateContainer`, ready to start.
    Created {
        stream: u32,
        pid: i32,
    },
    /// An exec'd process ended; `code` as a shell reports it.
    Exited {
        code: i32,
        signal: Option<i32>,
    },
    Processes {
        processes: Vec<ProcessInfo>,
    },
    Stats {
        stats: krun_proto::CgroupStats,
    },
    /// The request failed; `code` is the exit status to report (126/127
    /// for a program that cannot run).
    Error {
        code: i32,
        message: String,
    },
}

/// A request as the monitor's loop receives it: with its descriptors and
/// where the responses go (dropping `reply` ends the client's call).
pub struct Incoming {
    pub req: Request,
    pub fds: Vec<OwnedFd>,
    pub reply: std::sync::mpsc::Sender<Response>,
}

/// A connection to a monitor.
pub struct Client {
    stream: UnixStream,
    reader: BufReader<UnixStream>,
}

impl Client {
    pub fn connect(path: &Path) -> std::io::Result<Client> {
        let stream = UnixStream::connect(path)?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Client { stream, reader })
    }

    /// Bounds how long [`Client::recv`] waits (None: for ever).
    pub fn set_timeout(&mut self, timeout: Option<std::time::Duration>) -> std::io::Result<()> {
        self.stream.set_read_timeout(timeout)
    }

    /// Sends `req` with `fds`.
    pub fn send(&mut self, req: &Request, fds: &[RawFd]) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(req).expect("requests serialize");
        line.push(b'\n');
        send_with_fds(&self.stream, &line, fds)
    }

    /// The next response; EOF means the monitor is gone.
    pub fn recv(&mut self) -> std::io::Result<Response> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the container's monitor went away",
            ));
        }
        serde_json::from_str(&line).map_err(std::io::Error::other)
    }

    /// One request, one response.
    pub fn call(&mut self, req: &Request) -> std::io::Result<Response> {
        self.send(req, &[])?;
        self.recv()
    }
}

fn send_with_fds(s: &UnixStream, data: &[u8], fds: &[RawFd]) -> std::io::Result<()> {
    let iov = [IoSlice::new(data)];
    let cmsg = [ControlMessage::ScmRights(fds)];
    let cmsgs: &[ControlMessage] = if fds.is_empty() { &[] } else { &cmsg };
    let mut sent = sendmsg::<()>(s.as_raw_fd(), &iov, cmsgs, MsgFlags::MSG_NOSIGNAL, None)
        .map_err(std::io::Error::from)?;
    // The descriptors went with the first bytes; the rest of a long line
    // follows as plain data.
    while sent < data.len() {
        sent += (&*s).write(&data[sent..])?;
    }
    Ok(())
}

/// The server side of one connection.
pub struct Conn {
    stream: UnixStream,
    buf: Vec<u8>,
}

impl Conn {
    pub fn new(stream: UnixStream) -> Conn {
        Conn {
            stream,
            buf: Vec::new(),
        }
    }

    /// Whether the client hung up (or its end failed), looked at without
    /// waiting and without reading.
    pub fn peer_gone(&self) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.stream.as_raw_fd(),
            events: libc::POLLRDHUP,
            revents: 0,
        };
        // SAFETY: poll reads and writes one pollfd that outlives the call;
        // the fd is this connection's, open for as long as `self`.
        unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
    }

    /// Reads one request and the descriptors that came with it.
    pub fn recv(&mut self) -> std::io::Result<(Request, Vec<OwnedFd>)> {
        let mut fds = Vec::new();
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                let req = serde_json::from_slice(&line).map_err(std::io::Error::other)?;
                return Ok((req, fds));
            }
            let mut chunk = [0u8; 4096];
            let mut space = nix::cmsg_space!([RawFd; MAX_FDS]);
            let n = {
                let mut iov = [IoSliceMut::new(&mut chunk)];
                let msg = recvmsg::<()>(
                    self.stream.as_raw_fd(),
                    &mut iov,
                    Some(&mut space),
                    MsgFlags::MSG_CMSG_CLOEXEC,
                )
                .map_err(std::io::Error::from)?;
                for c in msg.cmsgs().map_err(std::io::Error::from)? {
                    if let ControlMessageOwned::ScmRights(received) = c {
                        // SAFETY: the kernel just installed these descriptors
                        // in this process for us; nothing else owns them.
                        fds.extend(
                            received
                                .into_iter()
                                .map(|fd| unsafe { OwnedFd::from_raw_fd(fd) }),
                        );
                    }
                }
                msg.bytes
            };
            if n == 0 {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::UnexpectedEof,
                    "client went away",
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }

    pub fn send(&mut self, resp: &Response) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(resp).expect("responses serialize");
        line.push(b'\n');
        self.stream.write_all(&line)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_descriptors_cross_the_socket() {
        let (a, b) = UnixStream::pair().unwrap();
        let mut client = Client {
            reader: BufReader::new(a.try_clone().unwrap()),
            stream: a,
        };
        let mut conn = Conn::new(b);
        let (r, w) = std::io::pipe().unwrap();
        let req = Request::Kill {
            signal: 15,
            all: true,
            stream: 0,
        };
        client.send(&req, &[r.as_raw_fd(), w.as_raw_fd()]).unwrap();
        let (got, fds) = conn.recv().unwrap();
        assert_eq!(got, req);
        assert_eq!(fds.len(), 2);
        conn.send(&Response::Exited {
            code: 137,
            signal: Some(9),
        })
        .unwrap();
        assert_eq!(
            client.recv().unwrap(),
            Response::Exited {
                code: 137,
                signal: Some(9)
            }
        );
        // Two requests in one read are both delivered.
        client.send(&Request::Ps { stream: 0 }, &[]).unwrap();
        client.send(&Request::Pause, &[]).unwrap();
        assert_eq!(conn.recv().unwrap().0, Request::Ps { stream: 0 });
        assert_eq!(conn.recv().unwrap().0, Request::Pause);
    }
}
