//! `krun-oci run`: create, start and wait for a container in the
//! foreground. This process is the container's monitor; it exits with the
//! workload's status (128+n for a signal, as `runc run` does) and removes
//! the container's state when done.

use super::Context;
use crate::error::{Error, Result, ResultExt as _};
use crate::hooks;
use crate::monitor::{MainStdio, Monitor};
use crate::relay::SignalForwarder;
use crate::session::SessionError;

pub fn run(ctx: &Context, args: &liboci_cli::Run) -> Result<i32> {
    let id = &args.container_id;
    if args.detach {
        return Err(Error::Unsupported(
            "run --detach is not supported yet; use create and start".into(),
        ));
    }
    super::create::refuse_preserved_fds(args.preserve_fds)?;
    let signals = SignalForwarder::install().context("installing signal handlers")?;
    let stdio = match &args.console_socket {
        Some(p) => MainStdio::ConsoleSocket(p.clone()),
        None => MainStdio::Inherit,
    };
    let mut launch = super::create::launch(ctx, id, &args.bundle, stdio)?;
    // This process is the monitor: it joins the host cgroup, and leaves and
    // removes it when `_cgroup` goes, on every way out.
    let _cgroup = super::create::host_cgroup(ctx, &mut launch)?;
    if let Some(cg) = _cgroup.cgroup() {
        cg.join(0)?;
    }
    let spec = launch.bundle.spec.clone();
    let mut monitor = Monitor::prepare(launch)?;
    let hooked = super::create::create_hooks(ctx, id, &spec).and_then(|()| {
        Ok(hooks::run(
            hooks::Kind::StartContainer,
            &spec,
            &monitor.oci_state(),
        )?)
    });
    if let Err(e) = hooked {
        let _ = monitor.serve(false);
        return Err(e);
    }
    if let Some(p) = &args.pid_file {
        super::create::write_pid_file(p, std::process::id() as i32)?;
    }
    signals.attach(monitor.sender());
    let started = monitor.start_now();
    if started.is_ok() {
        hooks::run_warn(hooks::Kind::Poststart, &spec, &monitor.oci_state());
    }
    if let Err(e) = started {
        let _ = monitor.serve(false);
        return Err(match e {
            SessionError::Process { code, message } => Error::Exit { code, message },
            source => Error::Vm {
                id: id.clone(),
                source,
            },
        });
    }
    let mut stopped = monitor.oci_state();
    stopped["status"] = "stopped".into();
    let result = monitor.serve(false);
    hooks::run_warn(hooks::Kind::Poststop, &spec, &stopped);
    match result {
        Ok(outcome) => Ok(outcome.status.shell_code()),
        Err(source) => Err(Error::Vm {
            id: id.clone(),
            source,
        }),
    }
}
