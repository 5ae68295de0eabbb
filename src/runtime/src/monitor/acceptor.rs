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

use crate::api::{Conn, Incoming, Response};
use crate::session::Event;

/// The pause after a failed accept.
const BACKOFF: Duration = Duration::from_millis(100);

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
        // Every response until the loop drops the sender.
        for r in replies {
            if conn.send(&r).is_err() {
                return;
            }
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
