//! `start`, `state`, `kill`, `delete`, `pause`, `resume`: the commands that
//! act on an existing container through its state and its monitor.

use super::Context;
use crate::api::Request;
use crate::cgroups::CgroupError;
use crate::container::{parse_signal, Existing};
use crate::error::{Error, Result};
use crate::hooks;
use crate::state::{StateError, Status};

pub fn start(ctx: &Context, args: &liboci_cli::Start) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    let _lock = c.dir.lock()?;
    let status = c.status();
    if status != Status::Created {
        return Err(Error::Status {
            action: "start",
            status,
        });
    }
    let spec = c.spec();
    if let Some(spec) = &spec {
        if let Err(e) = hooks::run(hooks::Kind::StartContainer, spec, &c.state.to_oci()) {
            // A failed startContainer hook stops the container.
            let _ = stop_now(&c);
            return Err(e.into());
        }
    }
    c.call(&Request::Start)?;
    note_member_status(&c, Status::Running)?;
    if let Some(spec) = &spec {
        let mut state = c.state.to_oci();
        state["status"] = "running".into();
        hooks::run_warn(hooks::Kind::Poststart, spec, &state);
    }
    Ok(0)
}

pub fn state(ctx: &Context, args: &liboci_cli::State) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    println!("{}", serde_json::to_string_pretty(&c.state.to_oci())?);
    Ok(0)
}

pub fn kill(ctx: &Context, args: &liboci_cli::Kill) -> Result<i32> {
    let signal = parse_signal(&args.signal)?;
    let c = Existing::open(&ctx.root, &args.container_id)?;
    let status = c.status();
    if status == Status::Stopped {
        return Err(Error::NotRunning(c.id));
    }
    c.call(&Request::Kill {
        signal,
        all: args.all,
        stream: 0,
    })?;
    Ok(0)
}

pub fn delete(ctx: &Context, args: &liboci_cli::Delete) -> Result<i32> {
    let c = match Existing::open(&ctx.root, &args.container_id) {
        Ok(c) => c,
        // runc: deleting what is not there with --force is not an error.
        Err(Error::State(StateError::NotFound(_))) if args.force => return Ok(0),
        Err(e) => return Err(e),
    };
    let lock = c.dir.lock()?;
    match c.status() {
        Status::Stopped => {}
        // A created container was never started: delete takes it down, as
        // runc does.
        Status::Created | Status::Creating => stop_now(&c)?,
        status if args.force => {
            tracing::debug!(container = %c.id, %status, "delete --force");
            stop_now(&c)?;
        }
        status => return Err(Error::NotStopped { id: c.id, status }),
    }
    drop(lock);
    let spec = c.spec();
    let mut state = c.state.to_oci();
    state["status"] = "stopped".into();
    // A monitor killed with -9 could not release the network it carried.
    if let Some(n) = &c.state.network {
        crate::net::release(n);
    }
    // The host cgroup, once the monitor (and with it every helper) is gone.
    // One still busy holds someone else's processes (a container of the
    // same id under another --root shares it, as under runc): theirs to
    // remove.
    if let Some(paths) = &c.state.cgroup {
        c.wait_monitor_gone(std::time::Duration::from_secs(5));
        match crate::cgroups::Cgroup::from_paths(paths.clone()).remove() {
            Err(CgroupError::Remove { path, source })
                if source.raw_os_error() == Some(libc::EBUSY) =>
            {
                tracing::warn!(container = %c.id, cgroup = %path.display(), "host cgroup still in use; left");
            }
            other => other?,
        }
    }
    // A container in another's VM leaves its share.
    if let Some(m) = &c.state.member {
        crate::pod::leave(&ctx.root, &m.leader, &c.id);
    }
    let Existing { dir, .. } = c;
    dir.remove()?;
    if let Some(spec) = spec {
        hooks::run_warn(hooks::Kind::Poststop, &spec, &state);
    }
    Ok(0)
}

/// Stops the container's VM: ask the monitor, and kill it if it does not go.
pub(crate) fn stop_now(c: &Existing) -> Result<()> {
    if c.client()
        .and_then(|mut cl| Ok(cl.call(&Request::Shutdown)?))
        .is_ok()
        && c.wait_monitor_gone(std::time::Duration::from_secs(10))
    {
        return Ok(());
    }
    c.kill_monitor()
}

pub fn pause(ctx: &Context, args: &liboci_cli::Pause) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    let _lock = c.dir.lock()?;
    match c.status() {
        Status::Running | Status::Created => {}
        status => {
            return Err(Error::Status {
                action: "pause",
                status,
            })
        }
    }
    if c.state.member.is_some() && c.status() != Status::Running {
        // Its processes are frozen in the guest, which only a started
        // container has.
        return Err(Error::Status {
            action: "pause",
            status: c.status(),
        });
    }
    c.call(&Request::Pause)?;
    note_member_status(&c, Status::Paused)?;
    Ok(0)
}

/// A container in another's VM has no monitor of its own to note its
/// status: the command that changed it does.
fn note_member_status(c: &Existing, status: Status) -> Result<()> {
    if c.state.member.is_some() {
        let mut state = c.dir.read()?;
        if state.status != Status::Stopped {
            state.status = status;
            c.dir.write(&state)?;
        }
    }
    Ok(())
}

pub fn resume(ctx: &Context, args: &liboci_cli::Resume) -> Result<i32> {
    let c = Existing::open(&ctx.root, &args.container_id)?;
    let _lock = c.dir.lock()?;
    if c.status() != Status::Paused {
        return Err(Error::Status {
            action: "resume",
            status: c.status(),
        });
    }
    c.call(&Request::Resume)?;
    note_member_status(&c, Status::Running)?;
    Ok(0)
}
