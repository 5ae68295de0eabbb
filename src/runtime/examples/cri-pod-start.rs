//! Times what kubelet waits for when it starts a pod, through containerd's
//! CRI: RunPodSandbox, then CreateContainer + StartContainer of one
//! container until ContainerStatus says running. For hack/bench.
//!
//! cri-pod-start SOCKET HANDLER IMAGE ROUNDS OUT.tsv
//!
//! Appends one row per round to OUT.tsv: round, handler, run_pod_ms,
//! container_running_ms, total_ms, status, error. The pod is stopped and
//! removed after each round (not timed). Round 0 is a warm-up.

#[path = "../../../tests/harness/cri.rs"]
mod cri;

use std::io::Write;
use std::path::Path;
use std::time::Instant;

fn main() {
    let a: Vec<String> = std::env::args().collect();
    if a.len() != 6 {
        eprintln!("usage: cri-pod-start SOCKET HANDLER IMAGE ROUNDS OUT.tsv");
        std::process::exit(2);
    }
    let (socket, handler, image, out) = (&a[1], &a[2], &a[3], &a[5]);
    let rounds: u32 = a[4].parse().expect("ROUNDS");
    let mut cri = cri::Cri::connect(Path::new(socket));
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(out)
        .expect("OUT.tsv");
    let logs = std::env::temp_dir().join(format!("cri-pod-start-{}", std::process::id()));
    std::fs::create_dir_all(&logs).unwrap();
    for round in 0..=rounds {
        let name = format!("bench-{handler}-{round}");
        let pod = cri::pod_config(&name, &logs);
        let t0 = Instant::now();
        // A failed call panics in the client: catch it, record it, go on.
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let pod_id = cri.run_pod_when_ready(&pod, handler);
            let t1 = Instant::now();
            let id = cri.create_container(
                &pod_id,
                cri::container_config("sleeper", image, &["sleep", "100000"]),
                &pod,
            );
            cri.start_container(&id);
            cri.wait_state(&id, cri::ContainerState::ContainerRunning);
            let t2 = Instant::now();
            (pod_id, t1 - t0, t2 - t1)
        }));
        match result {
            Ok((pod_id, run_pod, running)) => {
                let ms = |d: std::time::Duration| d.as_secs_f64() * 1000.0;
                writeln!(
                    f,
                    "{round}\t{handler}\t{:.1}\t{:.1}\t{:.1}\tok\t",
                    ms(run_pod),
                    ms(running),
                    ms(run_pod + running)
                )
                .unwrap();
                cri.stop_pod(&pod_id);
                cri.remove_pod(&pod_id);
            }
            Err(e) => {
                let msg = e
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default()
                    .replace(['\t', '\n'], " ");
                writeln!(f, "{round}\t{handler}\tNA\tNA\tNA\tfailed\t{msg}").unwrap();
                for p in cri.list_pods() {
                    cri.stop_pod(&p.id);
                    cri.remove_pod(&p.id);
                }
            }
        }
    }
    let _ = std::fs::remove_dir_all(&logs);
}
