//! The monitor's socket: a thread accepts connections, each served on a
//! thread of its own that hands its requests to the event loop and writes
//! back the replies. Accepting backs off after an error (EMFILE would
//! otherwise make it spin) and ends with the monitor.

use std::io::{self, ErrorKind};
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::api::{Conn, Incoming, Request, Response};
use crate::session::Event;

/// The pause after a failed accept.
const BACKOFF: Duration = Duration::from_millis(100);
/// How often a pod member's connection is looked at for its client gone.
const HANGUP_CHECK: Duration = Duration::from_millis(250);

/// The accepting thread; it ends when this is dropped.
pub(super) struct Acceptor {
    done: Arc<AtomicBool>,
    /// The listening socket, to wake a blocked accept with a shutdown.
    listener: OwnedFd,
    /// Never joined (the loop ends by itself); the tests watch it end.
    #[cfg_attr(not(test), allow(dead_code))]
    thread: JoinHandle<()>,
}

impl Acceptor {
    pub(super) fn spawn(listener: UnixListener, events: SyncSender<Event>) -> io::Result<Acceptor> {
        let done = Arc::new(AtomicBool::new(false));
        let wake = OwnedFd::from(listener.try_clone()?);
        let flag = done.clone();
        let thread = std::thread::Builder::new()
            .name("monitor-accept".into())
            .spawn(move || {
                let accept = || listener.accept().map(|(s, _)| s);
                accept_loop(accept, &flag, BACKOFF, |stream| {
                    let events = events.clone();
                    let _ = std::thread::Builder::new()
                        .name("monitor-client".into())
                        .spawn(move || serve_client(stream, events));
                });
            })?;
        Ok(Acceptor {
            done,
            listener: wake,
            thread,
        })
    }

    fn stop(&self) {
        self.done.store(true, Ordering::SeqCst);
        // A blocked accept returns (EINVAL) once its socket is shut down.
        let _ =
            nix::sys::socket::shutdown(self.listener.as_raw_fd(), nix::sys::socket::Shutdown::Both);
    }
}

impl Drop for Acceptor {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Serves what `accept` yields until `done`; after an error, waits
/// `backoff` before trying again.
fn accept_loop<T>(
    mut accept: impl FnMut() -> io::Result<T>,
    done: &AtomicBool,
    backoff: Duration,
    mut serve: impl FnMut(T),
) {
    while !done.load(Ordering::SeqCst) {
        match accept() {
            Ok(conn) => serve(conn),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) if done.load(Ordering::SeqCst) => return,
            Err(e) => {
                tracing::debug!(error = %e, "accepting on the monitor socket");
                std::thread::sleep(backoff);
            }
        }
    }
}

fn serve_client(stream: UnixStream, events: SyncSender<Event>) {
    let mut conn = Conn::new(stream);
    while let Ok((req, fds)) = conn.recv() {
        let member = matches!(req, Request::CreateContainer { .. });
        let (reply, replies) = mpsc::channel();
        if events
            .send(Event::Request(Incoming { req, fds, reply }))
            .is_err()
        {
            let _ = conn.send(&Response::Error {
                code: 1,
                message: "the container's monitor is stopping".into(),
            });
            return;
        }
        if member {
            return serve_member(&mut conn, &replies, &events);
        }
        // Every response until the loop drops the sender.
        for r in replies {
            if conn.send(&r).is_err() {
                return;
            }
        }
    }
}

/// The replies about a pod member, whose client is its waiter: the
/// container's pid on the host, what conmon waits on. Its processes in the
/// VM live no longer than that client: once it is gone (killed with -9)
/// they are killed, as a runc container's are when its init dies.
fn serve_member(conn: &mut Conn, replies: &mpsc::Receiver<Response>, events: &SyncSender<Event>) {
    let (mut stream, mut gone, mut killed) = (None, false, false);
    loop {
        match replies.recv_timeout(HANGUP_CHECK) {
            Ok(r) => {
                match r {
                    Response::Created { stream: s, .. } => stream = Some(s),
                    // Nothing of it runs any more.
                    Response::Exited { .. } => killed = true,
                    _ => {}
                }
                gone |= conn.send(&r).is_err();
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            // The loop is done with it: its process has exited.
            Err(mpsc::RecvTimeoutError::Disconnected) => return,
        }
        gone = gone || conn.peer_gone();
        if let (Some(stream), true, false) = (stream, gone, killed) {
            tracing::warn!(
                stream,
                "a pod member's process on the host is gone; killing its processes in the VM"
            );
            let kill = Request::Kill {
                signal: libc::SIGKILL,
                all: true,
                stream,
            };
            let (reply, _) = mpsc::channel();
            killed = events
                .send(Event::Request(Incoming {
                    req: kill,
                    fds: Vec::new(),
                    reply,
                }))
                .is_ok();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Instant;

    /// EMFILE (and any other accept error) is followed by a pause, not by
    /// the next accept at once.
    #[test]
    fn accept_errors_back_off() {
        let done = AtomicBool::new(false);
        let mut calls = 0;
        let start = Instant::now();
        let backoff = Duration::from_millis(50);
        accept_loop(
            || {
                calls += 1;
                if calls == 5 {
                    done.store(true, Ordering::SeqCst);
                }
                Err::<(), _>(io::Error::from_raw_os_error(libc::EMFILE))
            },
            &done,
            backoff,
            |()| panic!("nothing to serve"),
        );
        assert_eq!(calls, 5);
        assert!(
            start.elapsed() >= backoff * 4,
            "5 failed accepts in {:?}",
            start.elapsed()
        );
    }

    /// A pod member's client (its waiter) gone: its processes are killed;
    /// gone after its process exited: nothing is.
    #[test]
    fn a_members_processes_are_killed_when_its_client_goes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (events, requests) = mpsc::sync_channel(4);
        let _acceptor = Acceptor::spawn(listener, events).unwrap();
        let next = || match requests.recv_timeout(Duration::from_secs(10)) {
            Ok(Event::Request(inc)) => inc,
            _ => panic!("no request"),
        };
        let create = crate::api::Request::CreateContainer {
            setup: Box::default(),
        };
        for exits_first in [false, true] {
            let mut client = crate::api::Client::connect(&path).unwrap();
            client.send(&create, &[]).unwrap();
            let inc = next();
            assert!(matches!(inc.req, Request::CreateContainer { .. }));
            inc.reply
                .send(Response::Created { stream: 5, pid: 9 })
                .unwrap();
            assert!(matches!(
                client.recv().unwrap(),
                Response::Created { stream: 5, .. }
            ));
            if exits_first {
                inc.reply
                    .send(Response::Exited {
                        code: 0,
                        signal: None,
                    })
                    .unwrap();
                client.recv().unwrap();
            }
            drop(client);
            if exits_first {
                let r = requests.recv_timeout(HANGUP_CHECK * 4);
                assert!(r.is_err(), "a kill after the exit");
            } else {
                let kill = next();
                assert_eq!(
                    kill.req,
                    Request::Kill {
                        signal: libc::SIGKILL,
                        all: true,
                        stream: 5
                    }
                );
            }
        }
    }

    #[test]
    fn connections_are_served_and_the_loop_ends_with_the_acceptor() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sock");
        let listener = UnixListener::bind(&path).unwrap();
        let (events, requests) = mpsc::sync_channel(4);
        let acceptor = Acceptor::spawn(listener, events).unwrap();
        let mut client = crate::api::Client::connect(&path).unwrap();
        let server = std::thread::spawn(move || {
            let Ok(Event::Request(inc)) = requests.recv() else {
                panic!("no request");
            };
            let _ = inc.reply.send(Response::Ok);
        });
        assert!(matches!(
            client.call(&crate::api::Request::Start).unwrap(),
            Response::Ok
        ));
        server.join().unwrap();
        acceptor.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        while !acceptor.thread.is_finished() {
            assert!(Instant::now() < deadline, "the accept loop did not end");
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}
