//! Times what kubelet waits for when it starts a pod, through containerd's
//! CRI: RunPodSandbox, then CreateContainer + StartContainer of one
//! container (`sleep 1000`) until ContainerStatus says running. For
//! hack/bench (scenario containerd).
//!
//! ```text
//! cri-pod-start --socket PATH --handler NAME[,NAME...] --image IMG
//!               --rounds N --out FILE.tsv [--logs DIR]
//! ```
//!
//! Round 0 is a warm-up (it also waits for containerd to load its CNI
//! configuration); rounds 1..=N are timed. With several handlers, each round
//! runs every handler once, interleaved, the order rotating from round to
//! round. Appends one row per run to FILE.tsv (with a header if the file is
//! new or empty): round, handler, run_pod_ms, container_running_ms,
//! total_ms, status (ok or failed), error. A failed call is recorded in its
//! row, not fatal. After each run the container and the pod are stopped and
//! removed (not timed). The pods' log directories live under DIR (default:
//! a temporary folder of the process, removed at its end).
//!
//! `cri-pod-start --socket PATH --remove-pods` stops and removes every pod of
//! that containerd (with their network namespaces), for a cleanup after an
//! interrupted run.

use std::io::Write;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::process::exit;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use krun_e2e::cri::{self, ContainerState, Cri};

const USAGE: &str = "usage: cri-pod-start --socket PATH --handler NAME[,NAME...] --image IMG --rounds N --out FILE.tsv [--logs DIR]
       cri-pod-start --socket PATH --remove-pods";

struct Args {
    socket: PathBuf,
    handlers: Vec<String>,
    image: String,
    rounds: u32,
    out: PathBuf,
    logs: Option<PathBuf>,
}

fn usage(why: &str) -> ! {
    if !why.is_empty() {
        eprintln!("cri-pod-start: {why}");
    }
    eprintln!("{USAGE}");
    exit(2)
}

fn parse_args() -> Args {
    let (mut socket, mut handlers, mut image, mut rounds, mut out, mut logs) =
        (None, None, None, None, None, None);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "-h" || flag == "--help" {
            println!("{USAGE}");
            exit(0);
        }
        if flag == "--remove-pods" {
            let socket: PathBuf = socket.unwrap_or_else(|| usage("--socket must come first"));
            exit(remove_pods(&socket));
        }
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} wants a value")));
        match flag.as_str() {
            "--socket" => socket = Some(PathBuf::from(value)),
            "--handler" => {
                handlers = Some(
                    value
                        .split(',')
                        .filter(|h| !h.is_empty())
                        .map(str::to_string)
                        .collect::<Vec<_>>(),
                )
            }
            "--image" => image = Some(value),
            "--rounds" => {
                rounds =
                    Some(value.parse::<u32>().unwrap_or_else(|_| {
                        usage(&format!("--rounds wants a number, not '{value}'"))
                    }))
            }
            "--out" => out = Some(PathBuf::from(value)),
            "--logs" => logs = Some(PathBuf::from(value)),
            _ => usage(&format!("unknown option {flag}")),
        }
    }
    let handlers = handlers.unwrap_or_else(|| usage("--handler is missing"));
    if handlers.is_empty() {
        usage("--handler names no handler");
    }
    Args {
        socket: socket.unwrap_or_else(|| usage("--socket is missing")),
        handlers,
        image: image.unwrap_or_else(|| usage("--image is missing")),
        rounds: rounds.unwrap_or_else(|| usage("--rounds is missing")),
        out: out.unwrap_or_else(|| usage("--out is missing")),
        logs,
    }
}

/// The message of a caught panic (the CRI client panics on a failed call).
fn panic_message(e: &(dyn std::any::Any + Send)) -> String {
    e.downcast_ref::<String>()
        .cloned()
        .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "panic without a message".into())
}

/// Whether a panic now is one of the client's, caught by `attempt`.
static CAUGHT: AtomicBool = AtomicBool::new(false);

/// Runs `f`, turning the client's panics into errors.
fn attempt<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    let outer = CAUGHT.swap(true, Ordering::SeqCst);
    let r = catch_unwind(AssertUnwindSafe(f)).map_err(|e| panic_message(e.as_ref()));
    CAUGHT.store(outer, Ordering::SeqCst);
    r
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1000.0)
}

/// Polls ContainerStatus (every 5 ms, not to blur the timing) until the
/// container runs; an error if it exits first or takes over 180 s.
fn wait_running(cri: &mut Cri, id: &str) -> Result<(), String> {
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let s = cri.status(id);
        if s.state == ContainerState::ContainerRunning as i32 {
            return Ok(());
        }
        if s.state == ContainerState::ContainerExited as i32 {
            return Err(format!(
                "container exited (code {}, reason '{}': {}) before it was seen running",
                s.exit_code, s.reason, s.message
            ));
        }
        if Instant::now() > deadline {
            return Err(format!("container not running after 180 s: {s:?}"));
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

struct Run {
    run_pod: Duration,
    running: Duration,
}

/// One timed pod start; the ids of what it made go to `pod` and `ctr` so
/// that they can be removed whatever happened.
fn run_once(
    cri: &mut Cri,
    args: &Args,
    handler: &str,
    config: &cri::PodSandboxConfig,
    warm_up: bool,
    pod: &mut Option<String>,
    ctr: &mut Option<String>,
) -> Result<Run, String> {
    let t0 = Instant::now();
    let pod_id = attempt(|| {
        if warm_up {
            cri.run_pod_when_ready(config, handler)
        } else {
            cri.run_pod(config, handler)
        }
    })?;
    let t1 = Instant::now();
    *pod = Some(pod_id.clone());
    let container = cri::container_config("sleeper", &args.image, &["sleep", "1000"]);
    let id = attempt(|| cri.create_container(&pod_id, container, config))?;
    *ctr = Some(id.clone());
    attempt(|| cri.start_container(&id))?;
    attempt(|| wait_running(cri, &id))??;
    let t2 = Instant::now();
    Ok(Run {
        run_pod: t1 - t0,
        running: t2 - t1,
    })
}

/// Stops and removes the container and the pod (a pod whose id is unknown,
/// because RunPodSandbox failed, is looked up by its name); what fails is
/// returned, for the row's error column.
fn teardown(cri: &mut Cri, name: &str, pod: Option<String>, ctr: Option<String>) -> Vec<String> {
    let mut errors = Vec::new();
    if let Some(id) = ctr {
        if let Err(e) = attempt(|| cri.stop_container(&id, 0)) {
            errors.push(e);
        }
        if let Err(e) = attempt(|| cri.remove_container(&id)) {
            errors.push(e);
        }
    }
    let pods = match pod {
        Some(id) => vec![id],
        None => attempt(|| cri.list_pods())
            .map(|pods| {
                pods.into_iter()
                    .filter(|p| p.metadata.as_ref().is_some_and(|m| m.name == name))
                    .map(|p| p.id)
                    .collect()
            })
            .unwrap_or_else(|e| {
                errors.push(e);
                Vec::new()
            }),
    };
    for id in pods {
        if let Err(e) = attempt(|| cri.stop_pod(&id)) {
            errors.push(e);
        }
        if let Err(e) = attempt(|| cri.remove_pod(&id)) {
            errors.push(e);
        }
    }
    errors
}

/// `--remove-pods`: stops and removes every pod; 0 if none is left.
fn remove_pods(socket: &std::path::Path) -> i32 {
    let mut cri = match attempt(|| Cri::connect(socket)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cri-pod-start: {e}");
            return 1;
        }
    };
    let pods = match attempt(|| cri.list_pods()) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("cri-pod-start: {e}");
            return 1;
        }
    };
    let mut rc = 0;
    for p in pods {
        for e in teardown(&mut cri, "", Some(p.id), None) {
            eprintln!("cri-pod-start: {e}");
            rc = 1;
        }
    }
    rc
}

fn one_line(s: &str) -> String {
    let s = s.replace(['\t', '\n', '\r'], " ");
    if s.chars().count() > 400 {
        s.chars().take(400).collect::<String>() + "..."
    } else {
        s
    }
}

fn main() {
    // The client panics on failed calls; those are caught and recorded in
    // the table, quietly. Any other panic is reported as usual.
    let default_hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        if !CAUGHT.load(Ordering::SeqCst) {
            default_hook(info)
        }
    }));
    let args = parse_args();
    let mut out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&args.out)
        .unwrap_or_else(|e| usage(&format!("cannot open {}: {e}", args.out.display())));
    if out.metadata().map(|m| m.len() == 0).unwrap_or(false) {
        writeln!(
            out,
            "round\thandler\trun_pod_ms\tcontainer_running_ms\ttotal_ms\tstatus\terror"
        )
        .unwrap();
    }
    let (logs, own_logs) = match &args.logs {
        Some(d) => (d.clone(), false),
        None => (
            std::env::temp_dir().join(format!("cri-pod-start-{}", std::process::id())),
            true,
        ),
    };
    std::fs::create_dir_all(&logs)
        .unwrap_or_else(|e| usage(&format!("cannot create {}: {e}", logs.display())));
    let mut cri = match attempt(|| Cri::connect(&args.socket)) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cri-pod-start: {e}");
            exit(1);
        }
    };
    let k = args.handlers.len();
    for round in 0..=args.rounds {
        for i in 0..k {
            let handler = &args.handlers[(round as usize + i) % k];
            let name = format!("bench-{handler}-{round}");
            let config = cri::pod_config(&name, &logs.join(&name));
            let _ = std::fs::create_dir_all(logs.join(&name));
            let (mut pod, mut ctr) = (None, None);
            let result = run_once(
                &mut cri,
                &args,
                handler,
                &config,
                round == 0,
                &mut pod,
                &mut ctr,
            );
            let down = teardown(&mut cri, &name, pod, ctr);
            let row = match &result {
                Ok(r) => format!(
                    "{}\t{}\t{}\tok\t{}",
                    ms(r.run_pod),
                    ms(r.running),
                    ms(r.run_pod + r.running),
                    if down.is_empty() {
                        String::new()
                    } else {
                        one_line(&format!("teardown: {}", down.join("; ")))
                    }
                ),
                Err(e) => {
                    eprintln!("cri-pod-start: round {round}, handler {handler}: {e}");
                    format!("NA\tNA\tNA\tfailed\t{}", one_line(e))
                }
            };
            writeln!(out, "{round}\t{handler}\t{row}").unwrap();
            let _ = std::fs::remove_dir_all(logs.join(&name));
        }
        eprintln!("  cri-pod-start: round {round}/{} done", args.rounds);
    }
    if own_logs {
        let _ = std::fs::remove_dir_all(&logs);
    }
}
