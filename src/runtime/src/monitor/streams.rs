//! What waits on each stream of the VM, in one table keyed by stream: the
//! start of its process (the container's `start`, a pod member's), the
//! questions put to guest-init about it (ps, stats, update; answered in
//! order), and for an exec'd process or a pod member the files its output
//! goes to and the client that hears of its start and its end.

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::sync::mpsc::Sender;

use krun_proto::MAIN_STREAM;

use crate::api::Response;

/// A process the monitor started for a client (an exec, a pod member):
/// where its output goes, and who hears of its start and its end.
pub(super) struct Process {
    pub out: Option<File>,
    pub err: Option<File>,
    pub reply: Sender<Response>,
}

/// A client waiting for guest-init's answer; `freeze`: to a freeze, which
/// a VM pause answers early (see [`Streams::answer_freezes`]).
struct Answer {
    reply: Sender<Response>,
    freeze: bool,
}

/// What waits on one stream.
#[derive(Default)]
struct Waiting {
    start: Option<Sender<Response>>,
    answers: VecDeque<Answer>,
    process: Option<Process>,
}

impl Waiting {
    fn is_empty(&self) -> bool {
        self.start.is_none() && self.answers.is_empty() && self.process.is_none()
    }
}

/// The table, and the next stream number to give out (the container's own
/// process is [`MAIN_STREAM`]).
pub(super) struct Streams {
    table: HashMap<u32, Waiting>,
    next: u32,
}

impl Streams {
    pub fn new() -> Streams {
        Streams {
            table: HashMap::new(),
            next: MAIN_STREAM + 1,
        }
    }

    /// Whether a process other than the container's own runs in the VM
    /// (an exec'd process, a pod member's).
    pub fn has_processes(&self) -> bool {
        self.table.values().any(|w| w.process.is_some())
    }

    /// A stream number not given out before.
    pub fn open(&mut self) -> u32 {
        let stream = self.next;
        self.next += 1;
        stream
    }

    /// Applies `f` to what waits on `stream`, forgetting the stream once
    /// nothing does.
    fn with<T>(&mut self, stream: u32, f: impl FnOnce(&mut Waiting) -> T) -> T {
        let waiting = self.table.entry(stream).or_default();
        let out = f(waiting);
        if waiting.is_empty() {
            self.table.remove(&stream);
        }
        out
    }

    /// `reply` waits for the start of `stream`'s process (replacing, and
    /// so ending, any earlier waiter).
    pub fn await_start(&mut self, stream: u32, reply: Sender<Response>) {
        self.with(stream, |w| w.start = Some(reply));
    }

    pub fn start_pending(&self, stream: u32) -> bool {
        self.table.get(&stream).is_some_and(|w| w.start.is_some())
    }

    pub fn take_start(&mut self, stream: u32) -> Option<Sender<Response>> {
        self.with(stream, |w| w.start.take())
    }

    /// `reply` waits for guest-init's next answer about `stream`.
    pub fn await_answer(&mut self, stream: u32, reply: Sender<Response>) {
        self.with(stream, |w| {
            w.answers.push_back(Answer {
                reply,
                freeze: false,
            })
        });
    }

    /// `reply` waits for guest-init's answer to a freeze of `stream`'s
    /// container.
    pub fn await_freeze(&mut self, stream: u32, reply: Sender<Response>) {
        self.with(stream, |w| {
            w.answers.push_back(Answer {
                reply,
                freeze: true,
            })
        });
    }

    /// Who waits longest for an answer about `stream`.
    pub fn take_answer(&mut self, stream: u32) -> Option<Sender<Response>> {
        self.with(stream, |w| w.answers.pop_front().map(|a| a.reply))
    }

    /// Answers every client still waiting for a freeze with `resp` now:
    /// the VM is pausing, and its guest answers nothing until it resumes
    /// (a pod's pause pauses the VM and freezes each member, in any
    /// order). Guest-init's answers, when they come, keep their place in
    /// each stream's order and go to nobody.
    pub fn answer_freezes(&mut self, resp: &Response) {
        for w in self.table.values_mut() {
            for a in w.answers.iter_mut().filter(|a| a.freeze) {
                let reply = std::mem::replace(&mut a.reply, std::sync::mpsc::channel().0);
                let _ = reply.send(resp.clone());
                a.freeze = false;
            }
        }
    }

    pub fn add_process(&mut self, stream: u32, p: Process) {
        self.with(stream, |w| w.process = Some(p));
    }

    pub fn has_process(&self, stream: u32) -> bool {
        self.process(stream).is_some()
    }

    pub fn process(&self, stream: u32) -> Option<&Process> {
        self.table.get(&stream).and_then(|w| w.process.as_ref())
    }

    pub fn process_mut(&mut self, stream: u32) -> Option<&mut Process> {
        self.table.get_mut(&stream).and_then(|w| w.process.as_mut())
    }

    pub fn remove_process(&mut self, stream: u32) -> Option<Process> {
        self.with(stream, |w| w.process.take())
    }

    /// The container stopped: every process's client and the container's
    /// pending start hear so. Whoever else waits hears nothing more, and
    /// its call ends when the table goes.
    pub fn container_stopped(&mut self) {
        let stopped = |code| Response::Error {
            code,
            message: "the container stopped".into(),
        };
        for w in self.table.values_mut() {
            if let Some(p) = w.process.take() {
                let _ = p.reply.send(stopped(255));
            }
        }
        if let Some(r) = self.take_start(MAIN_STREAM) {
            let _ = r.send(stopped(1));
        }
        self.table.retain(|_, w| !w.is_empty());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{self, Receiver};

    fn waiter() -> (Sender<Response>, Receiver<Response>) {
        mpsc::channel()
    }

    fn process() -> (Process, Receiver<Response>) {
        let (reply, rx) = waiter();
        let p = Process {
            out: None,
            err: None,
            reply,
        };
        (p, rx)
    }

    #[test]
    fn streams_are_given_out_once_after_the_container_s() {
        let mut s = Streams::new();
        assert_eq!(s.open(), 1);
        assert_eq!(s.open(), 2);
    }

    #[test]
    fn answers_go_in_order_and_per_stream() {
        let mut s = Streams::new();
        let [(a, a_rx), (b, b_rx), (c, c_rx)] = [waiter(), waiter(), waiter()];
        for (stream, w) in [(0, a), (0, b), (3, c)] {
            s.await_answer(stream, w);
        }
        s.take_answer(0).unwrap().send(Response::Ok).unwrap();
        assert_eq!(a_rx.try_recv().unwrap(), Response::Ok);
        assert!(b_rx.try_recv().is_err());
        s.take_answer(3).unwrap().send(Response::Ok).unwrap();
        assert_eq!(c_rx.try_recv().unwrap(), Response::Ok);
        assert!(s.take_answer(3).is_none());
        assert!(s.take_answer(0).is_some());
        assert!(s.table.is_empty(), "a stream nothing waits on is forgotten");
    }

    #[test]
    fn a_start_a_process_and_answers_share_a_stream_apart() {
        let mut s = Streams::new();
        let (p, _p_rx) = process();
        let [(start, _start_rx), (answer, _answer_rx)] = [waiter(), waiter()];
        s.add_process(1, p);
        s.await_start(1, start);
        s.await_answer(1, answer);
        assert!(s.start_pending(1) && !s.start_pending(0));
        assert!(s.take_start(1).is_some());
        assert!(!s.start_pending(1) && s.has_process(1));
        assert!(s.remove_process(1).is_some());
        assert!(!s.has_process(1));
        assert!(s.take_answer(1).is_some());
        assert!(s.table.is_empty());
    }

    #[test]
    fn a_stopped_container_ends_processes_and_its_start() {
        let mut s = Streams::new();
        let (p, p_rx) = process();
        let [(start, start_rx), (member_start, member_rx), (answer, answer_rx)] =
            [waiter(), waiter(), waiter()];
        s.add_process(1, p);
        s.await_start(MAIN_STREAM, start);
        s.await_start(2, member_start);
        s.await_answer(MAIN_STREAM, answer);
        s.container_stopped();
        let stopped = |code| Response::Error {
            code,
            message: "the container stopped".into(),
        };
        assert_eq!(p_rx.try_recv().unwrap(), stopped(255));
        assert_eq!(start_rx.try_recv().unwrap(), stopped(1));
        // The rest wait on, unanswered, until the table goes.
        assert!(member_rx.try_recv().is_err() && answer_rx.try_recv().is_err());
        assert!(!s.has_process(1) && s.start_pending(2));
        drop(s);
        assert!(member_rx.recv().is_err() && answer_rx.recv().is_err());
    }
}
