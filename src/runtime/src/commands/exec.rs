//! `krun-oci exec`: run one more process inside the container's VM, in its
//! namespaces, with its own stdio or terminal, and report its exit status.
//! With --detach a small process stays behind for it whose pid goes into
//! the pid file and which exits with the exec'd process's status (conmon
//! waits on it, as it waits on the container's pid).

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

use krun_proto::{ExitStatus, ProcessSetup};

use super::Context;
use crate::api::{Client, Request, Response};
use crate::container::Existing;
use crate::error::{Error, Result, ResultExt as _};
use crate::monitor::exit_like;
use crate::state::Status;
use crate::tty;

pub fn exec(ctx: &Context, args: &liboci_cli::Exec) -> Result<i32> {
    super::create::refuse_preserved_fds(args.preserve_fds)?;
    let c = Existing::open(&ctx.root, &args.container_id)?;
    match c.status() {
        Status::Running => {}
        Status::Paused if args.ignore_paused => {}
        status => {
            return Err(Error::Status {
                action: "exec in",
                status,
            })
        }
    }
    let process = exec_process(&c, args)?;
    if !args.detach {
        let mut e = Exec::start(&c, process, args.console_socket.as_deref())?;
        e.forward_signals(&c)?;
        let status = e.wait()?;
        return Ok(status.shell_code());
    }
    let (mut ready_r, mut ready_w) = std::io::pipe().context("creating a pipe")?;
    // SAFETY: no thread runs yet in this process; the child only continues
    // this program.
    match unsafe { libc::fork() } {
        -1 => Err(std::io::Error::last_os_error()).context("cannot fork"),
        0 => {
            drop(ready_r);
            // SAFETY: setsid has no memory effects.
            unsafe { libc::setsid() };
            let mut e = match Exec::start(&c, process, args.console_socket.as_deref()) {
                Ok(e) => e,
                Err(err) => {
                    let (code, msg) = (err.exit_code(), err.message());
                    let _ = write!(ready_w, "{code} {msg}");
                    std::process::exit(code);
                }
            };
            let _ = ready_w.write_all(b"ok");
            drop(ready_w);
            let _ = e.forward_signals(&c);
            match e.wait() {
                Ok(status) => exit_like(status),
                Err(_) => exit_like(ExitStatus::Signal(libc::SIGKILL)),
            }
        }
        pid => {
            drop(ready_w);
            let mut report = String::new();
            let _ = ready_r.read_to_string(&mut report);
            if report.trim() == "ok" {
                if let Some(p) = &args.pid_file {
                    super::create::write_pid_file(p, pid)?;
                }
                return Ok(0);
            }
            Err(super::child_failed(pid, &report, "exec failed"))
        }
    }
}

/// The process to exec: a --process file as it is, or the container's own
/// process with exec's arguments and flags (as runc does).
fn exec_process(c: &Existing, args: &liboci_cli::Exec) -> Result<ProcessSetup> {
    let process: oci_spec::runtime::Process = match &args.process {
        Some(path) => {
            let bytes =
                std::fs::read(path).with_context(|| format!("--process {}", path.display()))?;
            let de = &mut serde_json::Deserializer::from_slice(&bytes);
            serde_path_to_error::deserialize(de).map_err(|e| {
                Error::Invalid(format!(
                    "--process {}: field {}: {}",
                    path.display(),
                    e.path(),
                    e.inner()
                ))
            })?
        }
        None => {
            if args.command.is_empty() {
                return Err(Error::Invalid("exec needs a command, or --process".into()));
            }
            let bundle = crate::bundle::Bundle::load(&c.state.bundle)?;
            let base = bundle.spec.process().clone().ok_or_else(|| {
                Error::Failed("the container's config.json has no process".into())
            })?;
            let mut v = serde_json::to_value(base)?;
            v["args"] = serde_json::json!(args.command);
            v["terminal"] = args.tty.into();
            if let Some(cwd) = &args.cwd {
                v["cwd"] = cwd.to_string_lossy().as_ref().into();
            }
            if !args.env.is_empty() {
                let mut env: Vec<String> = v["env"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .filter_map(|e| e.as_str().map(String::from))
                            .collect()
                    })
                    .unwrap_or_default();
                for (k, val) in &args.env {
                    env.retain(|e| !e.starts_with(&format!("{k}=")));
                    env.push(format!("{k}={val}"));
                }
                v["env"] = serde_json::json!(env);
            }
            if let Some((uid, gid)) = args.user {
                v["user"]["uid"] = uid.into();
                v["user"]["gid"] = gid.unwrap_or(0).into();
            }
            if !args.additional_gids.is_empty() {
                v["user"]["additionalGids"] = serde_json::json!(args.additional_gids);
            }
            if args.no_new_privs {
                v["noNewPrivileges"] = true.into();
            }
            serde_json::from_value(v)?
        }
    };
    Ok(crate::plan::exec_process(&process)?)
}

/// One exec'd process, seen from the host.
struct Exec {
    client: Client,
    stream: u32,
    /// The terminal whose size changes are forwarded.
    tty: Option<OwnedFd>,
    _raw: Option<tty::RawMode>,
}

impl Exec {
    fn start(
        c: &Existing,
        mut process: ProcessSetup,
        console_socket: Option<&std::path::Path>,
    ) -> Result<Exec> {
        let mut client = c.client()?;
        let stdin = std::io::stdin();
        let (fds, tty_fd, raw): (Vec<OwnedFd>, Option<OwnedFd>, Option<tty::RawMode>) = if process
            .terminal
        {
            if let Some(sock) = console_socket {
                let pty = tty::Pty::open(process.console_size)?;
                pty.send_master(sock)?;
                pty.make_controlling();
                let slave = pty.slave;
                (vec![slave.try_clone()?], Some(slave), None)
            } else {
                let Some(raw) = tty::RawMode::enter(stdin.as_fd()) else {
                    return Err(Error::Invalid(
                        "process.terminal is set but stdin is not a terminal (use --console-socket)"
                            .into(),
                    ));
                };
                process.console_size = process.console_size.or_else(|| tty::size(stdin.as_fd()));
                let fd = stdin.as_fd().try_clone_to_owned()?;
                (vec![fd.try_clone()?], Some(fd), Some(raw))
            }
        } else {
            let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
            (
                vec![
                    dup(stdin.as_fd())?,
                    dup(std::io::stdout().as_fd())?,
                    dup(std::io::stderr().as_fd())?,
                ],
                None,
                None,
            )
        };
        let raw_fds: Vec<i32> = fds.iter().map(|f| f.as_raw_fd()).collect();
        let req = c.routed(Request::Exec {
            process: Box::new(process),
            container: None,
        })?;
        client
            .send(&req, &raw_fds)
            .context("sending the exec request")?;
        drop(fds);
        match client.recv().context("waiting for the exec to start")? {
            Response::Started { stream, .. } => Ok(Exec {
                client,
                stream,
                tty: tty_fd,
                _raw: raw,
            }),
            Response::Error { code, message } => Err(Error::Exit { code, message }),
            other => Err(Error::Unexpected {
                answer: Some(Box::new(other)),
            }),
        }
    }

    /// Passes the signals this process gets on to the exec'd process, and
    /// terminal size changes to its terminal.
    fn forward_signals(&mut self, c: &Existing) -> Result<()> {
        let socket = c
            .state
            .monitor
            .as_ref()
            .map(|m| m.socket.clone())
            .ok_or_else(|| Error::Failed("no monitor".into()))?;
        let stream = self.stream;
        let tty = self.tty.as_ref().map(|t| t.try_clone()).transpose()?;
        let mut signals = signal_hook::iterator::Signals::new(crate::relay::FORWARDED)?;
        std::thread::Builder::new()
            .name("exec-signals".into())
            .spawn(move || {
                let send = |req: Request| {
                    if let Ok(mut cl) = Client::connect(&socket) {
                        let _ = cl.call(&req);
                    }
                };
                if let Some((rows, cols)) = tty.as_ref().and_then(|t| tty::size(t.as_fd())) {
                    send(Request::Resize { stream, rows, cols });
                }
                for sig in signals.forever() {
                    if sig == libc::SIGWINCH {
                        if let Some((rows, cols)) = tty.as_ref().and_then(|t| tty::size(t.as_fd()))
                        {
                            send(Request::Resize { stream, rows, cols });
                        }
                    } else {
                        send(Request::SignalExec {
                            stream,
                            signal: sig,
                        });
                    }
                }
            })?;
        Ok(())
    }

    /// Waits for the process to end.
    fn wait(&mut self) -> Result<ExitStatus> {
        match self
            .client
            .recv()
            .context("waiting for the exec'd process")?
        {
            Response::Exited {
                signal: Some(s), ..
            } => Ok(ExitStatus::Signal(s)),
            Response::Exited { code, .. } => Ok(ExitStatus::Code(code)),
            Response::Error { code, message } => Err(Error::Exit { code, message }),
            other => Err(Error::Unexpected {
                answer: Some(Box::new(other)),
            }),
        }
    }
}
