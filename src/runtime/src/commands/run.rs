//! `krun-oci run`: create, start and wait for a container in the
//! foreground. This process is the container's monitor; it exits with the
//! workload's status (128+n for a signal, as `runc run` does) and removes
//! the container's state when done.

use anyhow::{bail, Context as _};

use super::{Context, ExitCode};
use crate::monitor::{MainStdio, Monitor};
use crate::relay::SignalForwarder;
use crate::session::SessionError;

pub fn run(ctx: &Context, args: &liboci_cli::Run) -> anyhow::Result<i32> {
    let id = &args.container_id;
    if args.detach {
        bail!("run --detach is not supported yet; use create and start");
    }
    let signals = SignalForwarder::install().context("installing signal handlers")?;
    let stdio = match &args.console_socket {
        Some(p) => MainStdio::ConsoleSocket(p.clone()),
        None => MainStdio::Inherit,
    };
    let launch = super::create::launch(ctx, id, &args.bundle, stdio)?;
    let mut monitor = Monitor::prepare(launch)?;
    if let Some(p) = &args.pid_file {
        super::create::write_pid_file(p, std::process::id() as i32)?;
    }
    signals.attach(monitor.sender());
    if let Err(e) = monitor.start_now() {
        let _ = monitor.serve(false);
        return Err(match e {
            SessionError::Process { code, message } => ExitCode { code, message }.into(),
            e => anyhow::Error::new(e).context(format!("container {id}")),
        });
    }
    match monitor.serve(false) {
        Ok(outcome) => Ok(outcome.status.shell_code()),
        Err(e) => Err(anyhow::Error::new(e).context(format!("container {id}"))),
    }
}
