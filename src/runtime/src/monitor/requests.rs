//! What a client's request does (`krun-oci start/kill/exec/ps/...`, or the
//! containerd shim): most become a message to guest-init whose answer the
//! client waits for on the stream's entry of the table; pause and resume
//! act on the VM; shutdown ends the container.

use std::os::fd::OwnedFd;
use std::sync::mpsc::Sender;
use std::time::{SystemTime, UNIX_EPOCH};

use krun_hypervisor::Vm;
use krun_proto::{ContainerSetup, ExitStatus, ProcessSetup, ToGuest, MAIN_STREAM};

use super::container::Container;
use super::report::Outcome;
use super::stdio::{exec_stdio, Stdio};
use super::streams::Process;
use crate::api::{Incoming, Request, Response};
use crate::relay::pump_stdin;
use crate::state::Status;

fn error(code: i32, message: &str) -> Response {
    Response::Error {
        code,
        message: message.to_string(),
    }
}

const VM_GONE: &str = "the VM is gone";

/// How long a guest may take to quiesce for a checkpoint (a sync of what
/// it holds for its files, then one answer).
const QUIESCE_DEADLINE: std::time::Duration = std::time::Duration::from_secs(30);

/// A checkpoint asked for, its guest asked to quiesce.
pub(crate) struct PendingCheckpoint {
    file: std::fs::File,
    then: krun_hypervisor::AfterCapture,
    reply: Sender<Response>,
    pub(super) deadline: std::time::Instant,
    pub quiesced: bool,
}

impl Container {
    /// Handles one client request; returns an outcome when the request
    /// ends the container (shutdown).
    pub(super) fn on_request(&mut self, inc: Incoming, vm: &mut dyn Vm) -> Option<Outcome> {
        let Incoming { req, fds, reply } = inc;
        match req {
            Request::Start => self.start(reply),
            Request::Kill {
                signal,
                all,
                stream,
            } => {
                let _ = self.control.send(stream, &ToGuest::Signal { signal, all });
                let _ = reply.send(Response::Ok);
            }
            Request::CreateContainer { setup } => self.create_member(setup, fds, reply),
            Request::StartContainer { stream } => self.start_member(stream, reply),
            Request::Exec { process, container } => self.exec(process, container, fds, reply),
            Request::CloseStdin { stream } => {
                let _ = self.control.stdin_eof(stream);
                let _ = reply.send(Response::Ok);
            }
            Request::SignalExec { stream, signal } => {
                if self.streams.has_process(stream) {
                    let _ = self
                        .control
                        .send(stream, &ToGuest::Signal { signal, all: false });
                }
                let _ = reply.send(Response::Ok);
            }
            Request::Resize { stream, rows, cols } => {
                let _ = self.control.send(stream, &ToGuest::Resize { rows, cols });
                let _ = reply.send(Response::Ok);
            }
            Request::Ps { stream } => self.ask_guest(stream, ToGuest::Ps, reply),
            Request::Stats { stream } => self.ask_guest(stream, ToGuest::Stats, reply),
            Request::Update { limits, stream } => self.update(limits, stream, reply),
            Request::Freeze { stream, frozen } => self.freeze(stream, frozen, reply),
            Request::Checkpoint { leave_running } => {
                return self.checkpoint(vm, fds, leave_running, reply)
            }
            Request::Pause => self.pause(vm, true, reply),
            Request::Resume => self.pause(vm, false, reply),
            Request::Shutdown => {
                let _ = reply.send(Response::Ok);
                // As if the kernel had killed the process.
                return Some(Outcome {
                    status: ExitStatus::Signal(libc::SIGKILL),
                    oom_killed: self.state.oom_killed,
                });
            }
        }
        None
    }

    /// Execs the container's process; the client hears when it runs.
    fn start(&mut self, reply: Sender<Response>) {
        if self.started || self.streams.start_pending(MAIN_STREAM) {
            let status = self.state.status;
            let _ = reply.send(error(
                1,
                &format!("cannot start a container that is {status}"),
            ));
        } else if self.control.send(MAIN_STREAM, &ToGuest::Start).is_err() {
            let _ = reply.send(error(1, VM_GONE));
        } else {
            self.streams.await_start(MAIN_STREAM, reply);
        }
    }

    /// Execs the process of a pod member made by `CreateContainer`.
    fn start_member(&mut self, stream: u32, reply: Sender<Response>) {
        if !self.streams.has_process(stream) || self.control.send(stream, &ToGuest::Start).is_err()
        {
            let _ = reply.send(error(1, "no such container to start"));
        } else {
            self.streams.await_start(stream, reply);
        }
    }

    /// Runs one more process in the container (or in a pod member); its
    /// replies are `Started`, then `Exited`.
    fn exec(
        &mut self,
        process: Box<ProcessSetup>,
        container: Option<String>,
        fds: Vec<OwnedFd>,
        reply: Sender<Response>,
    ) {
        if !self.started {
            let status = self.state.status;
            let _ = reply.send(error(
                1,
                &format!("cannot exec in a container that is {status}"),
            ));
            return;
        }
        let stream = self.streams.open();
        let stdio = match exec_stdio(fds) {
            Ok(s) => s,
            Err(n) => {
                let _ = reply.send(error(1, &format!("exec needs 1 or 3 descriptors, got {n}")));
                return;
            }
        };
        let msg = ToGuest::Exec {
            container: container.unwrap_or_else(|| self.guest_id().to_string()),
            process,
        };
        self.run_process(stream, msg, stdio, reply);
    }

    /// One more container in this VM (a pod member): its stdio is handled
    /// as an exec's, its replies are `Created`, then `Exited`.
    fn create_member(
        &mut self,
        mut setup: Box<ContainerSetup>,
        fds: Vec<OwnedFd>,
        reply: Sender<Response>,
    ) {
        let stdio = match exec_stdio(fds) {
            Ok(s) => s,
            Err(n) => {
                let _ = reply.send(error(
                    1,
                    &format!("create needs 1 (a terminal) or 3 descriptors, got {n}"),
                ));
                return;
            }
        };
        let stream = self.streams.open();
        stamp(&mut setup);
        self.run_process(stream, ToGuest::Create(setup), stdio, reply);
    }

    /// Sends `msg` for a new process on `stream`, whose stdio is `stdio`
    /// and whose client is `reply`.
    fn run_process(&mut self, stream: u32, msg: ToGuest, stdio: Stdio, reply: Sender<Response>) {
        if self.control.send(stream, &msg).is_err() {
            let _ = reply.send(error(1, VM_GONE));
            return;
        }
        let (input, out, err) = stdio;
        if let Some(input) = input {
            pump_stdin(self.control.clone(), stream, input);
        }
        self.streams
            .add_process(stream, Process { out, err, reply });
    }

    /// Sends `msg` about the container on `stream`; guest-init's answer
    /// goes to `reply`.
    fn ask_guest(&mut self, stream: u32, msg: ToGuest, reply: Sender<Response>) {
        if self.control.send(stream, &msg).is_ok() {
            self.streams.await_answer(stream, reply);
        } else {
            let _ = reply.send(error(1, VM_GONE));
        }
    }

    /// New cgroup limits, within the VM's memory.
    fn update(&mut self, limits: krun_proto::CgroupSetup, stream: u32, reply: Sender<Response>) {
        match limits.memory_max.filter(|m| *m > self.memory_limit) {
            Some(m) => {
                let _ = reply.send(error(
                    1,
                    &format!(
                        "memory limit {} MiB: the VM has {} MiB and krun-oci cannot add memory to a running VM",
                        m >> 20,
                        self.memory_limit >> 20
                    ),
                ));
            }
            None => self.ask_guest(stream, ToGuest::Update(limits), reply),
        }
    }

    /// Freezes (or thaws) one container of the VM (a pod member), once
    /// guest-init says it is done. While the VM itself is paused (`podman
    /// pod pause` pauses the infra container's VM as well as each member,
    /// in any order) the guest cannot answer: the change is queued for it,
    /// to take effect when the VM resumes, and the client is answered at
    /// once, as it is when the VM pauses while its answer is awaited.
    fn freeze(&mut self, stream: u32, frozen: bool, reply: Sender<Response>) {
        if !self.streams.has_process(stream) {
            let _ = reply.send(error(1, "no such container to pause or resume"));
        } else if self
            .control
            .send(stream, &ToGuest::Freeze { frozen })
            .is_err()
        {
            let _ = reply.send(error(1, VM_GONE));
        } else if self.state.status == Status::Paused {
            // The guest's answer, when it comes, goes to nobody.
            self.streams
                .await_answer(stream, std::sync::mpsc::channel().0);
            let _ = reply.send(Response::Ok);
        } else {
            self.streams.await_freeze(stream, reply);
        }
    }

    /// Pauses (or resumes) the VM, and with it the container.
    /// Captures the VM into the request's file; unless `leave_running`,
    /// the container then ends (killed, as runc's checkpoint leaves it).
    /// Refused, before anything stops, where a checkpoint could not bring
    /// the container back whole: not running, paused, a terminal, or
    /// other processes in the VM with clients of their own on the host.
    fn checkpoint(
        &mut self,
        vm: &mut dyn Vm,
        fds: Vec<OwnedFd>,
        leave_running: bool,
        reply: Sender<Response>,
    ) -> Option<Outcome> {
        let refusal = match self.state.status {
            _ if fds.len() != 1 => Some("the request carries no file to capture into".to_string()),
            Status::Running if self.main.tty.is_some() => Some(
                "a container with a terminal cannot be checkpointed (its terminal could not be \
                 given back at restore)"
                    .to_string(),
            ),
            Status::Running if self.streams.has_processes() => Some(
                "processes started by exec, or other containers of its pod, run in its VM: \
                 their clients could not be given back at restore"
                    .to_string(),
            ),
            Status::Running => None,
            status => Some(format!("cannot checkpoint a container that is {status}")),
        };
        if let Some(why) = refusal {
            let _ = reply.send(error(1, &why));
            return None;
        }
        if self.checkpoint.is_some() {
            let _ = reply.send(error(1, "a checkpoint of this container is under way"));
            return None;
        }
        if let Err(e) = vm.can_capture() {
            let _ = reply.send(error(1, &e.to_string()));
            return None;
        }
        let file = std::fs::File::from(fds.into_iter().next().expect("checked above"));
        let then = if leave_running {
            krun_hypervisor::AfterCapture::GoOn
        } else {
            krun_hypervisor::AfterCapture::End
        };
        // The guest first gets between two frames both ways (Quiesce); the
        // capture comes when it says so (frames.rs, then
        // `checkpoint_due`), or the checkpoint fails at the deadline.
        if self
            .control
            .send_and_hold(MAIN_STREAM, &ToGuest::Quiesce)
            .is_err()
        {
            let _ = reply.send(error(1, VM_GONE));
            return None;
        }
        self.checkpoint = Some(PendingCheckpoint {
            file,
            then,
            reply,
            deadline: std::time::Instant::now() + QUIESCE_DEADLINE,
            quiesced: false,
        });
        None
    }

    /// When the event loop must look at a pending checkpoint again.
    pub(super) fn checkpoint_deadline(&self) -> Option<std::time::Instant> {
        self.checkpoint.as_ref().map(|c| c.deadline)
    }

    /// Captures the VM once its guest is quiesced, or fails the
    /// checkpoint at its deadline; either way the guest resumes, unless
    /// the capture ended the container (returned).
    pub(super) fn checkpoint_due(&mut self, vm: &mut dyn Vm) -> Option<Outcome> {
        let c = self.checkpoint.as_ref()?;
        if !c.quiesced && std::time::Instant::now() < c.deadline {
            return None;
        }
        let c = self.checkpoint.take().expect("checked above");
        let started = std::time::Instant::now();
        let captured = if c.quiesced {
            vm.capture(&c.file, c.then)
                .map_err(|e| krun_hypervisor::error_chain(&e))
        } else {
            Err(format!(
                "the guest did not get ready for the checkpoint within {} s",
                QUIESCE_DEADLINE.as_secs()
            ))
        };
        tracing::debug!(container = %self.id, took = ?started.elapsed(), ok = captured.is_ok(), then = ?c.then, "checkpoint");
        let ended = captured.is_ok() && c.then == krun_hypervisor::AfterCapture::End;
        if !ended {
            resume_guest(&self.control);
        }
        match captured {
            Err(why) => {
                let _ = c.reply.send(error(1, &why));
                None
            }
            Ok(()) => {
                let _ = c.reply.send(Response::Ok);
                ended.then_some(Outcome {
                    status: ExitStatus::Signal(libc::SIGKILL),
                    oom_killed: self.state.oom_killed,
                })
            }
        }
    }

    fn pause(&mut self, vm: &mut dyn Vm, pause: bool, reply: Sender<Response>) {
        let r = if pause { vm.pause() } else { vm.resume() };
        if let Err(e) = r {
            let _ = reply.send(error(1, &format!("{e}")));
            return;
        }
        if pause {
            self.streams.answer_freezes(&Response::Ok);
        }
        self.state.status = match (pause, self.started) {
            (true, _) => Status::Paused,
            (false, true) => Status::Running,
            (false, false) => Status::Created,
        };
        self.save();
        let _ = reply.send(Response::Ok);
    }
}

/// Lets a quiesced guest go on (after a capture, or restored from one):
/// with the host's clock (a capture paused it) and fresh entropy (a
/// restored VM must not draw what its checkpoint's original drew).
pub(super) fn resume_guest(control: &crate::session::Control) {
    let resume = ToGuest::Resume {
        realtime_ns: realtime_ns(),
        entropy: host_entropy(),
    };
    let _ = control.send(MAIN_STREAM, &resume);
    control.release();
}

/// Stamps a container's set-up as it leaves for the guest: the host's
/// wall clock now, and fresh entropy for the guest's RNG.
pub(super) fn stamp(setup: &mut krun_proto::ContainerSetup) {
    setup.realtime_ns = realtime_ns();
    setup.entropy = host_entropy();
}

/// Bytes of the host's entropy handed to a guest with each container.
const ENTROPY_BYTES: usize = 64;

/// [`ENTROPY_BYTES`] from the host's getrandom (empty, and said, if it
/// fails: the guest then keeps what it has).
fn host_entropy() -> Vec<u8> {
    let mut buf = vec![0u8; ENTROPY_BYTES];
    let mut got = 0;
    while got < buf.len() {
        // SAFETY: getrandom writes at most the given length into `buf`,
        // which outlives the call.
        let n = unsafe { libc::getrandom(buf[got..].as_mut_ptr().cast(), buf.len() - got, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            tracing::warn!(error = %e, "no entropy for the guest");
            return Vec::new();
        }
        got += n as usize;
    }
    buf
}

/// The host's wall clock, for a guest that has none of its own.
pub(super) fn realtime_ns() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64
}

#[cfg(test)]
mod tests {
    use krun_proto::{CgroupSetup, ToHost};
    use std::sync::mpsc::Receiver;

    use super::super::kit::Kit;
    use super::*;

    fn fds(n: usize) -> Vec<OwnedFd> {
        (0..n)
            .map(|_| std::fs::File::open("/dev/null").unwrap().into())
            .collect()
    }

    fn error_of(r: Response) -> (i32, String) {
        match r {
            Response::Error { code, message } => (code, message),
            other => panic!("not an error: {other:?}"),
        }
    }

    #[test]
    fn a_second_start_is_refused() {
        let mut k = Kit::new();
        let (_, first) = k.request(Request::Start);
        let (_, second) = k.request(Request::Start);
        assert_eq!(
            error_of(second.try_recv().unwrap()),
            (1, "cannot start a container that is created".into())
        );
        assert!(first.try_recv().is_err(), "the first start still waits");
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Start));
        k.guest_gets_nothing();
    }

    #[test]
    fn a_vm_that_is_gone_fails_what_needs_the_guest() {
        let mut k = Kit::new();
        k.c.control.close();
        for req in [Request::Start, Request::Ps { stream: 0 }] {
            let (_, r) = k.request(req);
            assert_eq!(error_of(r.try_recv().unwrap()), (1, VM_GONE.into()));
        }
        assert!(!k.c.streams.start_pending(MAIN_STREAM));
    }

    #[test]
    fn an_exec_needs_a_running_container_and_its_descriptors() {
        let mut k = Kit::new();
        let exec = || Request::Exec {
            process: Box::default(),
            container: None,
        };
        let (_, r) = k.request_with(exec(), fds(3));
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "cannot exec in a container that is created"
        );
        k.c.on_started();
        let (_, r) = k.request_with(exec(), fds(2));
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "exec needs 1 or 3 descriptors, got 2"
        );
        let (_, r) = k.request_with(exec(), fds(3));
        let (stream, msg) = k.guest_got();
        assert!(stream > MAIN_STREAM);
        assert!(matches!(msg, ToGuest::Exec { container, .. } if container == "c1"));
        assert!(k.c.streams.has_process(stream));
        assert!(r.try_recv().is_err(), "the client waits for the start");
    }

    #[test]
    fn an_exec_in_a_container_restored_under_another_name_names_the_vms() {
        let mut k = Kit::new();
        k.c.state.guest_id = Some("checkpointed".into());
        k.c.on_started();
        let exec = Request::Exec {
            process: Box::default(),
            container: None,
        };
        let _reply = k.request_with(exec, fds(3));
        let (_, msg) = k.guest_got();
        assert!(
            matches!(&msg, ToGuest::Exec { container, .. } if container == "checkpointed"),
            "{msg:?}"
        );
    }

    #[test]
    fn a_member_gets_a_stream_and_its_start_waits_for_the_guest() {
        let mut k = Kit::new();
        let (_, r) = k.request_with(
            Request::CreateContainer {
                setup: Box::default(),
            },
            fds(2),
        );
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "create needs 1 (a terminal) or 3 descriptors, got 2"
        );
        let (_, _life) = k.request_with(
            Request::CreateContainer {
                setup: Box::default(),
            },
            fds(3),
        );
        let (stream, msg) = k.guest_got();
        let ToGuest::Create(s) = msg else {
            panic!("not a create: {msg:?}");
        };
        assert!(s.realtime_ns > 0);
        assert_eq!(s.entropy.len(), ENTROPY_BYTES);
        assert_ne!(s.entropy, host_entropy(), "fresh bytes each time");
        let (_, r) = k.request(Request::StartContainer { stream: stream + 1 });
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "no such container to start"
        );
        k.request(Request::StartContainer { stream });
        assert_eq!(k.guest_got(), (stream, ToGuest::Start));
        assert!(k.c.streams.start_pending(stream));
    }

    #[test]
    fn a_member_freezes_in_the_guest_and_unanswered_while_the_vm_is_paused() {
        let mut k = Kit::new();
        k.c.on_started();
        let (_, _life) = k.request_with(
            Request::CreateContainer {
                setup: Box::default(),
            },
            fds(3),
        );
        let (stream, _) = k.guest_got();
        let (_, r) = k.request(Request::Freeze {
            stream: stream + 1,
            frozen: true,
        });
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "no such container to pause or resume"
        );
        let (_, r) = k.request(Request::Freeze {
            stream,
            frozen: true,
        });
        assert_eq!(k.guest_got(), (stream, ToGuest::Freeze { frozen: true }));
        assert!(r.try_recv().is_err(), "the guest's answer is awaited");
        k.frame(stream, ToHost::Updated);
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        // The VM paused (podman's pod pause, in any order): queued for the
        // guest, answered at once, the guest's late answer to nobody.
        k.request(Request::Pause);
        let (_, r) = k.request(Request::Freeze {
            stream,
            frozen: false,
        });
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        assert_eq!(k.guest_got(), (stream, ToGuest::Freeze { frozen: false }));
        k.request(Request::Resume);
        assert_eq!(k.frame(stream, ToHost::Updated), None);
        assert_eq!(k.saved().status, Status::Running, "the VM's own status");
        // The VM paused while a freeze's answer is awaited: answered then;
        // the guest's answer, later, goes to nobody and keeps the order.
        let (_, r) = k.request(Request::Freeze {
            stream,
            frozen: true,
        });
        let (_, stats) = k.request(Request::Stats { stream });
        assert!(r.try_recv().is_err());
        k.request(Request::Pause);
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        k.request(Request::Resume);
        k.frame(stream, ToHost::Updated);
        assert!(
            stats.try_recv().is_err(),
            "the freeze's answer was not the stats'"
        );
    }

    #[test]
    fn update_cannot_give_more_memory_than_the_vm_has() {
        let mut k = Kit::new();
        let limits = |mib: u64| CgroupSetup {
            memory_max: Some(mib << 20),
            ..Default::default()
        };
        let (_, r) = k.request(Request::Update {
            limits: limits(1024),
            stream: 0,
        });
        assert_eq!(
            error_of(r.try_recv().unwrap()).1,
            "memory limit 1024 MiB: the VM has 512 MiB and krun-oci cannot add memory to a running VM"
        );
        k.request(Request::Update {
            limits: limits(256),
            stream: 0,
        });
        assert_eq!(k.guest_got(), (0, ToGuest::Update(limits(256))));
    }

    fn checkpoint(k: &mut Kit, leave_running: bool) -> (Option<Outcome>, Receiver<Response>) {
        let file = tempfile::tempfile().unwrap();
        k.request_with(Request::Checkpoint { leave_running }, vec![file.into()])
    }

    #[test]
    fn a_checkpoint_quiesces_the_guest_captures_and_resumes_it() {
        let mut k = Kit::new();
        let (_, r) = checkpoint(&mut k, true);
        assert!(
            matches!(r.try_recv().unwrap(), Response::Error { message, .. } if message.contains("that is created")),
            "only a running container"
        );
        k.c.on_started();
        let (outcome, r) = checkpoint(&mut k, true);
        assert!(outcome.is_none());
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Quiesce));
        // Nothing reaches the guest until it resumes: the channel stays
        // between two frames.
        k.request(Request::Kill {
            signal: libc::SIGTERM,
            all: false,
            stream: MAIN_STREAM,
        });
        k.guest_gets_nothing();
        assert_eq!(k.c.checkpoint_due(&mut k.vm), None);
        assert_eq!(k.vm.captured, 0, "captured before the guest quiesced");
        assert!(r.try_recv().is_err());
        // A second checkpoint meanwhile is refused.
        let (_, r2) = checkpoint(&mut k, true);
        assert!(matches!(r2.try_recv().unwrap(), Response::Error { .. }));
        k.frame(MAIN_STREAM, ToHost::Quiesced);
        assert_eq!(k.c.checkpoint_due(&mut k.vm), None);
        assert_eq!(k.vm.captured, 1);
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        // What was held goes, then the resume.
        assert!(matches!(k.guest_got(), (_, ToGuest::Signal { .. })));
        assert!(
            matches!(k.guest_got(), (_, ToGuest::Resume { realtime_ns, entropy }) if realtime_ns > 0 && entropy.len() == 64)
        );

        // Without --leave-running: captured, the container ends killed, no
        // resume.
        let (_, r) = checkpoint(&mut k, false);
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Quiesce));
        k.frame(MAIN_STREAM, ToHost::Quiesced);
        let outcome = k.c.checkpoint_due(&mut k.vm).expect("the container ends");
        assert_eq!(outcome.status, ExitStatus::Signal(libc::SIGKILL));
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        k.guest_gets_nothing();
    }

    #[test]
    fn a_guest_that_does_not_quiesce_fails_the_checkpoint_and_goes_on() {
        let mut k = Kit::new();
        k.c.on_started();
        let (_, r) = checkpoint(&mut k, false);
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Quiesce));
        k.c.checkpoint.as_mut().unwrap().deadline = std::time::Instant::now();
        assert_eq!(k.c.checkpoint_due(&mut k.vm), None, "the container goes on");
        assert_eq!(k.vm.captured, 0);
        assert!(
            matches!(r.try_recv().unwrap(), Response::Error { message, .. } if message.contains("did not get ready"))
        );
        assert!(matches!(k.guest_got(), (_, ToGuest::Resume { .. })));
        // A capture that fails: the guest resumes too.
        k.vm.fail = true;
        let (_, r) = checkpoint(&mut k, false);
        assert_eq!(k.guest_got(), (MAIN_STREAM, ToGuest::Quiesce));
        k.frame(MAIN_STREAM, ToHost::Quiesced);
        assert_eq!(k.c.checkpoint_due(&mut k.vm), None);
        assert!(matches!(r.try_recv().unwrap(), Response::Error { .. }));
        assert!(matches!(k.guest_got(), (_, ToGuest::Resume { .. })));
    }

    #[test]
    fn pause_and_resume_follow_the_vm() {
        let mut k = Kit::new();
        let (_, r) = k.request(Request::Pause);
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        assert_eq!(k.saved().status, Status::Paused);
        k.request(Request::Resume);
        assert_eq!(k.saved().status, Status::Created, "never started");
        k.c.on_started();
        k.request(Request::Pause);
        k.request(Request::Resume);
        assert_eq!(k.saved().status, Status::Running);
        k.vm.fail = true;
        let (_, r) = k.request(Request::Pause);
        assert_eq!(error_of(r.try_recv().unwrap()).0, 1);
        assert_eq!(k.saved().status, Status::Running);
    }

    #[test]
    fn shutdown_ends_the_container_as_if_killed() {
        let mut k = Kit::new();
        k.c.state.oom_killed = true;
        let (outcome, r) = k.request(Request::Shutdown);
        assert_eq!(r.try_recv().unwrap(), Response::Ok);
        assert_eq!(
            outcome,
            Some(Outcome {
                status: ExitStatus::Signal(libc::SIGKILL),
                oom_killed: true
            })
        );
    }
}
