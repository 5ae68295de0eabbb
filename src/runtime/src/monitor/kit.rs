//! A container with no VM, for the tests of what frames and requests do
//! to it: the guest is the other end of a socket, the VM a fake whose
//! pause can fail, the state directory and bundle a temporary directory.

use std::os::unix::net::UnixStream;
use std::sync::mpsc::{self, Receiver};
use std::time::Duration;

use krun_hypervisor::{Vm, VmExit};
use krun_proto::{Frame, FrameKind, FrameReader, ToGuest, ToHost};

use super::container::Container;
use super::report::Outcome;
use super::stdio::MainIo;
use crate::api::{Incoming, Request, Response};
use crate::session::{Control, Limits};
use crate::state::{State, StateDir, Status};

pub struct Kit {
    pub c: Container,
    pub vm: FakeVm,
    guest: FrameReader<UnixStream>,
    pub dir: tempfile::TempDir,
}

/// A VM whose pause, resume and capture succeed unless `fail`.
#[derive(Default)]
pub struct FakeVm {
    pub fail: bool,
    /// Captures made.
    pub captured: usize,
}

impl Vm for FakeVm {
    fn pid(&self) -> u32 {
        0
    }
    fn wait(&mut self) -> Result<VmExit, krun_hypervisor::Error> {
        Ok(VmExit::GuestStopped)
    }
    fn try_wait(&mut self) -> Result<Option<VmExit>, krun_hypervisor::Error> {
        Ok(None)
    }
    fn kill(&mut self) {}
    fn pause(&mut self) -> Result<(), krun_hypervisor::Error> {
        self.result()
    }
    fn resume(&mut self) -> Result<(), krun_hypervisor::Error> {
        self.result()
    }
    fn can_capture(&self) -> Result<(), krun_hypervisor::Error> {
        Ok(())
    }
    fn capture(
        &mut self,
        _file: &std::fs::File,
        _then: krun_hypervisor::AfterCapture,
    ) -> Result<(), krun_hypervisor::Error> {
        self.result()?;
        self.captured += 1;
        Ok(())
    }
}

impl FakeVm {
    fn result(&self) -> Result<(), krun_hypervisor::Error> {
        match self.fail {
            true => Err(krun_hypervisor::Error::InvalidConfig("no".into())),
            false => Ok(()),
        }
    }
}

impl Kit {
    /// A container `c1`, created; its bundle is the temporary directory.
    pub fn new() -> Kit {
        let dir = tempfile::tempdir().unwrap();
        let state_dir = StateDir::create(dir.path(), "c1").unwrap();
        let state = State {
            oci_version: "1.2.0".into(),
            id: "c1".into(),
            status: Status::Created,
            pid: None,
            bundle: dir.path().to_path_buf(),
            annotations: Default::default(),
            created: String::new(),
            monitor: None,
            exit: None,
            oom_killed: false,
            network: None,
            cgroup: None,
            member: None,
            guest_id: None,
        };
        let (host, guest) = UnixStream::pair().unwrap();
        guest
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        let control = Control::start(host, Limits::default(), |_| {}).unwrap();
        let c = Container::new(
            state_dir,
            state,
            control,
            MainIo::default(),
            None,
            512 << 20,
        );
        Kit {
            c,
            vm: FakeVm::default(),
            guest: FrameReader::new(guest),
            dir,
        }
    }

    /// The next message that reached the guest, and its stream (stdin
    /// pumped to it is passed over).
    pub fn guest_got(&mut self) -> (u32, ToGuest) {
        loop {
            let f = self.guest.read_frame().unwrap().expect("a frame");
            if f.kind == FrameKind::Control {
                return (f.stream, f.message().unwrap());
            }
        }
    }

    /// Nothing (more) reaches the guest.
    pub fn guest_gets_nothing(&mut self) {
        let sock = self.guest.get_ref();
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        assert!(self.guest.read_frame().is_err(), "the guest got a frame");
    }

    /// The guest sends `msg` on `stream`.
    pub fn frame(&mut self, stream: u32, msg: ToHost) -> Option<Outcome> {
        self.c.on_frame(Frame::control(stream, &msg)).unwrap()
    }

    /// A client sends `req` (with no descriptors); the receiver gets
    /// the replies.
    pub fn request(&mut self, req: Request) -> (Option<Outcome>, Receiver<Response>) {
        self.request_with(req, Vec::new())
    }

    pub fn request_with(
        &mut self,
        req: Request,
        fds: Vec<std::os::fd::OwnedFd>,
    ) -> (Option<Outcome>, Receiver<Response>) {
        let (reply, replies) = mpsc::channel();
        let outcome = self
            .c
            .on_request(Incoming { req, fds, reply }, &mut self.vm);
        (outcome, replies)
    }

    /// The state as the state directory has it.
    pub fn saved(&self) -> State {
        self.c.state_dir.read().unwrap()
    }
}

impl Drop for Kit {
    fn drop(&mut self) {
        self.c.control.close();
    }
}
