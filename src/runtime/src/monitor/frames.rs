//! What a frame from guest-init does: output goes to whoever reads that
//! stream, a control message answers whoever waits on its stream and
//! moves the container along (started, out of memory, exited).

use krun_proto::{ExitStatus, Frame, FrameKind, ToHost, MAIN_STREAM};

use super::container::Container;
use super::report::{Notice, Outcome};
use super::stdio::write_output;
use crate::api::Response;
use crate::session::SessionError;
use crate::state;

impl Container {
    /// Handles one frame; returns the outcome when it ends the container.
    pub(super) fn on_frame(&mut self, f: Frame) -> Result<Option<Outcome>, SessionError> {
        match f.kind {
            FrameKind::Stdout | FrameKind::Stderr => {
                self.on_output(f.stream, f.kind == FrameKind::Stdout, &f.payload);
                Ok(None)
            }
            FrameKind::Control => self.on_message(f.stream, f.message()?),
            FrameKind::Stdin => Ok(None),
        }
    }

    fn on_output(&mut self, stream: u32, stdout: bool, bytes: &[u8]) {
        if stream == MAIN_STREAM && self.first_output {
            self.first_output = false;
            tracing::debug!(since_start_ms = crate::since_start_ms(), "first output");
        }
        let sink = if stream == MAIN_STREAM {
            match stdout {
                true => &mut self.main.out,
                false => &mut self.main.err,
            }
        } else {
            match self.streams.process_mut(stream) {
                Some(p) if stdout => &mut p.out,
                Some(p) => &mut p.err,
                None => return,
            }
        };
        write_output(sink, bytes);
    }

    fn on_message(&mut self, stream: u32, msg: ToHost) -> Result<Option<Outcome>, SessionError> {
        match msg {
            ToHost::Created { pid } => {
                if let Some(p) = self.streams.process(stream) {
                    let _ = p.reply.send(Response::Created { stream, pid });
                }
            }
            ToHost::Started { pid } => self.on_process_started(stream, pid),
            ToHost::Failed { code, message } => return Ok(self.on_failed(stream, code, message)),
            ToHost::Exited { status } => return Ok(self.on_exited(stream, status)),
            ToHost::Oom => self.on_oom(),
            ToHost::StdinTaken { bytes } => self.control.stdin_taken(stream, bytes),
            ToHost::Quiesced => {
                if let Some(c) = self.checkpoint.as_mut() {
                    c.quiesced = true;
                }
            }
            ToHost::Processes { processes } => {
                self.answer(stream, Response::Processes { processes })
            }
            ToHost::Stats(stats) => self.answer(stream, Response::Stats { stats }),
            ToHost::Updated => self.answer(stream, Response::Ok),
            ToHost::Fatal { message } => return Err(SessionError::GuestFatal(message)),
            ToHost::Hello { .. } => {}
        }
        Ok(None)
    }

    /// Guest-init's answer about `stream` goes to whoever asked first.
    fn answer(&mut self, stream: u32, r: Response) {
        if let Some(reply) = self.streams.take_answer(stream) {
            let _ = reply.send(r);
        }
    }

    fn on_process_started(&mut self, stream: u32, pid: i32) {
        if stream == MAIN_STREAM {
            self.on_started();
            if let Some(r) = self.streams.take_start(MAIN_STREAM) {
                let _ = r.send(Response::Ok);
            }
        } else if let Some(r) = self.streams.take_start(stream) {
            // A pod member's process.
            let _ = r.send(Response::Ok);
        } else if let Some(p) = self.streams.process(stream) {
            let _ = p.reply.send(Response::Started { stream, pid });
        }
    }

    /// A process could not be created or started, or guest-init could not
    /// do what it was asked about `stream`.
    fn on_failed(&mut self, stream: u32, code: i32, message: String) -> Option<Outcome> {
        let err = Response::Error {
            code,
            message: message.clone(),
        };
        if stream != MAIN_STREAM {
            if let Some(r) = self.streams.take_start(stream) {
                // A pod member's process could not start: it is done, with
                // the status a shell would give.
                let _ = r.send(err);
                if let Some(p) = self.streams.remove_process(stream) {
                    let _ = p.reply.send(Response::Exited { code, signal: None });
                }
                self.control.stdin_gone(stream);
                return None;
            }
        }
        if let Some(r) = self.streams.take_answer(stream) {
            let _ = r.send(err);
        } else if stream != MAIN_STREAM {
            if let Some(p) = self.streams.remove_process(stream) {
                let _ = p.reply.send(err);
                self.control.stdin_gone(stream);
            }
        } else if let Some(r) = self.streams.take_start(MAIN_STREAM) {
            self.control.stdin_gone(stream);
            // The process could not be started: the container is stopped,
            // with the status a shell would give.
            let _ = r.send(err);
            tracing::debug!(container = %self.id, %message, "start failed");
            return Some(Outcome {
                status: ExitStatus::Code(code),
                oom_killed: false,
            });
        }
        None
    }

    /// A process ended: the container's ends the container, another's
    /// client hears how it ended.
    fn on_exited(&mut self, stream: u32, status: ExitStatus) -> Option<Outcome> {
        self.control.stdin_gone(stream);
        if stream == MAIN_STREAM {
            return Some(Outcome {
                status,
                oom_killed: self.state.oom_killed,
            });
        }
        if let Some(p) = self.streams.remove_process(stream) {
            let signal = match status {
                ExitStatus::Signal(s) => Some(s),
                ExitStatus::Code(_) => None,
            };
            let _ = p.reply.send(Response::Exited {
                code: status.shell_code(),
                signal,
            });
        }
        None
    }

    /// The guest kernel killed a process for memory: recorded in the state,
    /// in the bundle as conmon does, and told to whoever listens.
    fn on_oom(&mut self) {
        tracing::warn!(container = %self.id, "the container hit its memory limit and the guest kernel killed a process (OOM)");
        self.state.oom_killed = true;
        self.save();
        // conmon's record of an OOM kill, which podman and CRI-O read after
        // the exit: a file `oom` in the bundle.
        let oom = self.state.bundle.join("oom");
        if let Err(e) = state::replace_file(&oom, b"", 0o644) {
            tracing::warn!(container = %self.id, error = %e, "cannot write {}", oom.display());
        }
        if let Some(n) = &self.notices {
            let _ = n.send(Notice::Oom);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::sync::mpsc;

    use krun_proto::{CgroupStats, ToGuest};

    use super::super::kit::Kit;
    use super::super::streams::Process;
    use super::*;
    use crate::api::Request;
    use crate::state::Status;

    #[test]
    fn the_container_s_start_runs_it_and_answers_the_client() {
        let mut k = Kit::new();
        let (_, replies) = k.request(Request::Start);
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Start));
        assert_eq!(k.frame(MAIN_STREAM, ToHost::Started { pid: 7 }), None);
        assert_eq!(replies.try_recv().unwrap(), Response::Ok);
        assert!(k.c.started);
        assert_eq!(k.saved().status, Status::Running);
    }

    #[test]
    fn signals_before_the_start_are_held_for_it() {
        let mut k = Kit::new();
        k.c.on_signal(libc::SIGTERM);
        k.c.on_signal(libc::SIGWINCH);
        k.guest_gets_nothing();
        k.frame(MAIN_STREAM, ToHost::Started { pid: 7 });
        let signal = |signal| ToGuest::Signal { signal, all: false };
        assert_eq!(k.guest_got(), (MAIN_STREAM, signal(libc::SIGTERM)));
        k.c.on_signal(libc::SIGUSR1);
        assert_eq!(k.guest_got(), (MAIN_STREAM, signal(libc::SIGUSR1)));
        // No terminal, no resize.
        k.c.on_signal(libc::SIGWINCH);
        k.guest_gets_nothing();
    }

    #[test]
    fn a_failed_start_stops_the_container_with_the_shell_s_status() {
        let mut k = Kit::new();
        let (_, replies) = k.request(Request::Start);
        let failed = ToHost::Failed {
            code: 127,
            message: "not found".into(),
        };
        let outcome = k.frame(MAIN_STREAM, failed);
        assert_eq!(
            outcome,
            Some(Outcome {
                status: ExitStatus::Code(127),
                oom_killed: false
            })
        );
        assert_eq!(
            replies.try_recv().unwrap(),
            Response::Error {
                code: 127,
                message: "not found".into()
            }
        );
        assert!(!k.c.started);
    }

    #[test]
    fn a_failure_answers_a_question_before_the_start() {
        let mut k = Kit::new();
        let (_, start) = k.request(Request::Start);
        let (_, update) = k.request(Request::Update {
            limits: Default::default(),
            stream: MAIN_STREAM,
        });
        let failed = ToHost::Failed {
            code: 1,
            message: "bad limit".into(),
        };
        assert_eq!(k.frame(MAIN_STREAM, failed), None);
        assert!(matches!(
            update.try_recv(),
            Ok(Response::Error { code: 1, .. })
        ));
        assert!(start.try_recv().is_err(), "the start still waits");
    }

    #[test]
    fn answers_go_to_the_askers_in_order() {
        let mut k = Kit::new();
        k.c.on_started();
        let (_, ps) = k.request(Request::Ps { stream: 0 });
        let (_, stats) = k.request(Request::Stats { stream: 0 });
        k.frame(0, ToHost::Processes { processes: vec![] });
        k.frame(0, ToHost::Stats(CgroupStats::default()));
        // An answer nobody waits for goes nowhere.
        k.frame(0, ToHost::Updated);
        assert_eq!(
            ps.try_recv().unwrap(),
            Response::Processes { processes: vec![] }
        );
        assert!(matches!(stats.try_recv(), Ok(Response::Stats { .. })));
    }

    #[test]
    fn an_exec_hears_its_start_its_output_and_its_end() {
        let mut k = Kit::new();
        let (reply, replies) = mpsc::channel();
        let (mut out_r, out_w) = std::io::pipe().unwrap();
        let out = Some(std::fs::File::from(std::os::fd::OwnedFd::from(out_w)));
        k.c.streams.add_process(
            1,
            Process {
                out,
                err: None,
                reply,
            },
        );
        k.frame(1, ToHost::Started { pid: 9 });
        assert_eq!(
            replies.try_recv().unwrap(),
            Response::Started { stream: 1, pid: 9 }
        );
        let f = Frame {
            kind: FrameKind::Stdout,
            stream: 1,
            payload: b"hi".to_vec(),
        };
        assert_eq!(k.c.on_frame(f).unwrap(), None);
        let mut got = [0; 2];
        out_r.read_exact(&mut got).unwrap();
        assert_eq!(&got, b"hi");
        let killed = ExitStatus::Signal(libc::SIGKILL);
        assert_eq!(k.frame(1, ToHost::Exited { status: killed }), None);
        assert_eq!(
            replies.try_recv().unwrap(),
            Response::Exited {
                code: 137,
                signal: Some(9)
            }
        );
        assert!(!k.c.streams.has_process(1));
    }

    #[test]
    fn a_member_that_cannot_start_is_done() {
        let mut k = Kit::new();
        let (reply, life) = mpsc::channel();
        k.c.streams.add_process(
            2,
            Process {
                out: None,
                err: None,
                reply,
            },
        );
        let (_, start) = k.request(Request::StartContainer { stream: 2 });
        assert_eq!(k.guest_got(), (2, ToGuest::Start));
        let failed = ToHost::Failed {
            code: 126,
            message: "permission denied".into(),
        };
        assert_eq!(k.frame(2, failed), None);
        assert!(matches!(
            start.try_recv(),
            Ok(Response::Error { code: 126, .. })
        ));
        assert_eq!(
            life.try_recv().unwrap(),
            Response::Exited {
                code: 126,
                signal: None
            }
        );
        assert!(!k.c.streams.has_process(2));
    }

    #[test]
    fn the_container_s_exit_ends_it_and_an_oom_is_kept() {
        let mut k = Kit::new();
        let (notices, heard) = mpsc::channel();
        k.c.notices = Some(notices);
        assert_eq!(k.frame(0, ToHost::Oom), None);
        assert!(k.saved().oom_killed);
        assert!(k.dir.path().join("oom").is_file());
        assert_eq!(heard.try_recv().unwrap(), Notice::Oom);
        let status = ExitStatus::Signal(libc::SIGKILL);
        assert_eq!(
            k.frame(0, ToHost::Exited { status }),
            Some(Outcome {
                status,
                oom_killed: true
            })
        );
    }

    #[test]
    fn a_fatal_guest_is_an_error() {
        let mut k = Kit::new();
        let fatal = ToHost::Fatal {
            message: "no root".into(),
        };
        let e = k.c.on_frame(Frame::control(0, &fatal)).unwrap_err();
        assert_eq!(e.to_string(), "guest-init failed: no root");
    }
}
