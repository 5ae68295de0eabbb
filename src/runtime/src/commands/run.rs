//! `krun-oci run`: create, start and wait for a container in the foreground.

use std::fs::File;
use std::os::fd::AsFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context as _};

use super::{Context, ExitCode};
use crate::assets::Assets;
use crate::bundle::Bundle;
use crate::plan::{self, HostInfo};
use crate::relay::{pump_stdin, relay_output, SignalForwarder};
use crate::session::{Session, SessionError, Timings};
use crate::state::{State, StateDir, Status};

pub fn run(ctx: &Context, args: &liboci_cli::Run) -> anyhow::Result<i32> {
    let id = &args.container_id;
    if args.detach {
        bail!("run --detach is not supported yet");
    }
    let signals = SignalForwarder::install().context("installing signal handlers")?;
    let bundle = Bundle::load(&args.bundle)?;
    let plan = plan::plan(id, &bundle.dir, &bundle.spec, &HostInfo::detect())?;
    for w in &plan.warnings {
        tracing::warn!(container = %id, "{w}");
    }
    let assets = Assets::find()?;
    let state_dir = StateDir::create(&ctx.root, id)?;
    let annotations = bundle.spec.annotations().clone().unwrap_or_default();
    let mut state = State {
        oci_version: bundle.spec.version().clone(),
        id: id.clone(),
        status: Status::Creating,
        pid: None,
        bundle: bundle.dir.clone(),
        annotations,
    };
    state_dir.write(&state)?;
    if let Some(p) = &args.pid_file {
        std::fs::write(p, std::process::id().to_string())
            .with_context(|| format!("--pid-file {}", p.display()))?;
    }
    let run_dir = RunDir::new(&state_dir.dir)?;
    let console_copy = ConsoleCopy(id.clone(), state_dir.console_log());

    tracing::debug!(container = %id, vcpus = plan.vcpus, memory_mib = plan.memory_mib, "planned VM");
    let hv = crate::backend::choose(ctx.hypervisor.or(plan.hypervisor), &assets)?;
    let host_setup_ms = crate::since_start_ms();
    let mut session = Session::boot(hv.as_ref(), &plan, &assets, &state_dir.dir, &run_dir.0)?;

    let mut setup = plan.setup.clone();
    setup.realtime_ns = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos() as u64;
    let stdin = std::io::stdin();
    let terminal = setup
        .process
        .terminal
        .then(|| crate::tty::RawMode::enter(stdin.as_fd()))
        .flatten();
    if setup.process.terminal {
        setup.process.console_size = setup
            .process
            .console_size
            .or_else(|| crate::tty::size(stdin.as_fd()));
    }
    let result = (|| -> Result<_, SessionError> {
        session.create(setup)?;
        state.status = Status::Created;
        state.pid = Some(std::process::id() as i32);
        let _ = state_dir.write(&state);
        session.start()?;
        state.status = Status::Running;
        let _ = state_dir.write(&state);
        let tty = terminal
            .as_ref()
            .and_then(|_| stdin.as_fd().try_clone_to_owned().ok());
        signals.attach(session.control(), tty);
        if let Ok(fd) = stdin.as_fd().try_clone_to_owned() {
            pump_stdin(session.control(), File::from(fd));
        }
        let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned().ok().map(File::from);
        relay_output(
            &mut session,
            dup(std::io::stdout().as_fd()),
            dup(std::io::stderr().as_fd()),
        )
    })();
    drop(terminal);
    let exited_ms = crate::since_start_ms();
    let timings = session.timings.clone();
    let vm_exit = session.shutdown(Duration::from_secs(3));
    log_timings(id, host_setup_ms, &timings, exited_ms);
    tracing::debug!(container = %id, ?vm_exit, vm_stopped_ms = crate::since_start_ms(), teardown_ms = crate::since_start_ms() - exited_ms, "VM stopped");
    drop(console_copy);
    drop(run_dir);
    drop(state_dir);
    match result {
        Ok(outcome) => Ok(outcome.status.shell_code()),
        Err(SessionError::Process { code, message }) => Err(ExitCode { code, message }.into()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("container {id}"))),
    }
}

fn log_timings(id: &str, host_setup_ms: f64, t: &Timings, exited_ms: f64) {
    let start = crate::started_at();
    let ms = |i: Option<std::time::Instant>| {
        i.map(|i| (i - start).as_secs_f64() * 1000.0)
            .unwrap_or(f64::NAN)
    };
    let hello = ms(t.hello);
    // Guest boot time runs from the kernel's start: the host saw the hello
    // `guest_hello_ns` after the guest kernel started.
    let kernel_start = hello - t.guest_hello_ns as f64 / 1e6;
    tracing::debug!(
        container = %id,
        host_setup_ms,
        vmm_spawned_ms = ms(t.vmm_spawned),
        vmm_start_ms = kernel_start - host_setup_ms,
        kernel_boot_ms = t.guest_init_ns as f64 / 1e6,
        guest_init_ms = ms(t.started) - kernel_start - t.guest_init_ns as f64 / 1e6,
        started_ms = ms(t.started),
        exited_ms,
        "timings"
    );
}

/// Debug aid: with KRUN_OCI_CONSOLE_COPY=DIR, the guest console log of
/// every run is kept as DIR/ID.log when the run ends, however it ends (the
/// state directory, where it lives, is removed). The tests use it to show
/// a failing guest's console.
struct ConsoleCopy(String, std::path::PathBuf);

impl Drop for ConsoleCopy {
    fn drop(&mut self) {
        if let Some(dir) = std::env::var_os("KRUN_OCI_CONSOLE_COPY") {
            let _ = std::fs::copy(&self.1, Path::new(&dir).join(format!("{}.log", self.0)));
        }
    }
}

/// The directory for the VM's sockets: the state directory when its path is
/// short enough for a unix socket address (108 bytes), else a private
/// directory under /tmp, removed when dropped.
struct RunDir(PathBuf, bool);

impl RunDir {
    fn new(state_dir: &Path) -> anyhow::Result<RunDir> {
        if state_dir.join("fs00.sock").as_os_str().len() < 100 {
            return Ok(RunDir(state_dir.to_path_buf(), false));
        }
        let dir = tempfile::Builder::new()
            .prefix("krun-oci-")
            .tempdir()
            .context("creating a socket directory")?;
        Ok(RunDir(dir.keep(), true))
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if self.1 {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
