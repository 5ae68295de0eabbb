//! A tiny TCP benchmark for hack/bench (scenario net), and a UDP echo for
//! tests/net.rs, with nothing but std so that it links statically and runs
//! in a busybox container, in the guest of a krun-oci container, or
//! straight in a network namespace. hack/build builds it (static, as
//! guest-init) into target/dist/tools/netperf.
//!
//! ```text
//! netperf server ADDR:PORT
//! netperf client ADDR:PORT throughput SECONDS
//! netperf client ADDR:PORT latency COUNT
//! netperf udp-echo ADDR:PORT
//! netperf send ADDR:PORT BYTES
//! ```
//!
//! The server accepts connections until it is killed, one thread each. The
//! first byte of a connection names its test:
//!
//! - `T`, throughput: the server reads until EOF, then answers with the
//!   number of bytes it read (after the `T`) and the nanoseconds from the
//!   `T` to the EOF. The client sends zeros for SECONDS, shuts its side down
//!   and waits for that answer; it prints `throughput_mbit=M bytes=N
//!   seconds=S client_seconds=C`: M and S by the server's clock, counting
//!   only what reached the server; C by the client's, to the answer.
//! - `L`, latency: the server echoes every byte back until EOF (both sides
//!   with TCP_NODELAY). The client sends one byte and waits for it, 1 +
//!   20 untimed + COUNT times, then shuts its side down. The server times
//!   each round trip from its echo to the next byte, skips the first 20,
//!   and answers `latency_us_median=A p99=B min=C max=D count=N`, which the
//!   client prints with ` client_mean_us=E client_median_us=F` (its own
//!   clock, all round trips). The server's clock is the one reported
//!   because a guest's may be coarse (steps of 4 ms are seen in a krun-oci
//!   guest under TCG).
//!
//! The server prints `listening on ADDR:PORT` once it accepts connections.
//!
//! `send` connects, writes BYTES zeros in 128 KiB writes (as an
//! application that streams would; busybox nc writes 1 KiB at a time),
//! shuts its side down, waits for the peer's close and prints `sent N
//! bytes`.
//!
//! `udp-echo` binds a UDP socket, waits for one datagram (busybox has no UDP
//! listener), sends it back to its sender, prints `udp echoed N bytes to
//! PEER: TEXT` and exits.
//! Errors go to stderr with a non-zero exit.

#![forbid(unsafe_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

const USAGE: &str = "usage: netperf server ADDR:PORT
       netperf client ADDR:PORT throughput SECONDS
       netperf client ADDR:PORT latency COUNT
       netperf udp-echo ADDR:PORT
       netperf send ADDR:PORT BYTES";

/// Round trips done before the timed ones (connection and cache warm-up).
const LATENCY_WARMUP: usize = 20;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let result = match args.as_slice() {
        ["server", addr] => resolve(addr).and_then(server),
        ["client", addr, "throughput", secs] => resolve(addr).and_then(|a| {
            let secs: f64 = secs
                .parse()
                .ok()
                .filter(|s: &f64| *s > 0.0 && s.is_finite())
                .ok_or_else(|| format!("SECONDS: not a positive number: {secs}"))?;
            throughput(a, Duration::from_secs_f64(secs))
        }),
        ["client", addr, "latency", count] => resolve(addr).and_then(|a| {
            let count: usize = count
                .parse()
                .ok()
                .filter(|c| *c > 0)
                .ok_or_else(|| format!("COUNT: not a positive integer: {count}"))?;
            latency(a, count)
        }),
        ["udp-echo", addr] => resolve(addr).and_then(udp_echo),
        ["send", addr, bytes] => resolve(addr).and_then(|a| {
            let bytes: u64 = bytes
                .parse()
                .map_err(|_| format!("BYTES: not a number: {bytes}"))?;
            send(a, bytes)
        }),
        ["-h" | "--help"] => {
            println!("{USAGE}");
            Ok(())
        }
        _ => Err(USAGE.to_string()),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("netperf: {e}");
            ExitCode::FAILURE
        }
    }
}

fn resolve(addr: &str) -> Result<SocketAddr, String> {
    addr.to_socket_addrs()
        .map_err(|e| format!("{addr}: {e}"))?
        .next()
        .ok_or_else(|| format!("{addr}: no address"))
}

fn server(addr: SocketAddr) -> Result<(), String> {
    let listener = TcpListener::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    println!("listening on {addr}");
    std::io::stdout().flush().ok();
    for conn in listener.incoming() {
        match conn {
            Ok(stream) => {
                std::thread::spawn(move || {
                    let peer = stream
                        .peer_addr()
                        .map_or_else(|_| "?".to_string(), |a| a.to_string());
                    if let Err(e) = serve(stream) {
                        eprintln!("netperf server: {peer}: {e}");
                    }
                });
            }
            Err(e) => eprintln!("netperf server: accept: {e}"),
        }
    }
    Ok(())
}

fn serve(mut s: TcpStream) -> std::io::Result<()> {
    let mut kind = [0u8; 1];
    s.read_exact(&mut kind)?;
    match kind[0] {
        b'T' => {
            let start = Instant::now();
            let mut buf = vec![0u8; 256 * 1024];
            let mut total: u64 = 0;
            loop {
                match s.read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => total += n as u64,
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let nanos = start.elapsed().as_nanos();
            s.write_all(format!("{total} {nanos}\n").as_bytes())?;
            s.shutdown(Shutdown::Write)
        }
        b'L' => {
            s.set_nodelay(true)?;
            let mut b = [0u8; 1];
            let mut rtts = Vec::new();
            let mut echoed: Option<Instant> = None;
            loop {
                match s.read(&mut b) {
                    Ok(0) => break,
                    Ok(_) => {
                        if let Some(t) = echoed {
                            rtts.push(t.elapsed().as_secs_f64() * 1e6);
                        }
                        // Before the write: the client may answer before
                        // this thread runs again.
                        echoed = Some(Instant::now());
                        s.write_all(&b)?;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(e) => return Err(e),
                }
            }
            let line = summary(rtts.get(LATENCY_WARMUP..).unwrap_or(&[]));
            s.write_all(format!("{line}\n").as_bytes())?;
            s.shutdown(Shutdown::Write)
        }
        other => Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            format!("unknown test byte {other:#04x}"),
        )),
    }
}

fn send(addr: SocketAddr, bytes: u64) -> Result<(), String> {
    let mut s = connect(addr)?;
    let buf = vec![0u8; 128 * 1024];
    let mut left = bytes;
    while left > 0 {
        let n = left.min(buf.len() as u64) as usize;
        s.write_all(&buf[..n]).map_err(|e| format!("send: {e}"))?;
        left -= n as u64;
    }
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut rest = Vec::new();
    s.read_to_end(&mut rest)
        .map_err(|e| format!("waiting for the peer's close: {e}"))?;
    println!("sent {bytes} bytes");
    Ok(())
}

fn udp_echo(addr: SocketAddr) -> Result<(), String> {
    let socket = UdpSocket::bind(addr).map_err(|e| format!("bind {addr}: {e}"))?;
    let mut buf = [0u8; 65536];
    let (len, peer) = socket
        .recv_from(&mut buf)
        .map_err(|e| format!("receive on {addr}: {e}"))?;
    socket
        .send_to(&buf[..len], peer)
        .map_err(|e| format!("send to {peer}: {e}"))?;
    let text = String::from_utf8_lossy(&buf[..len]);
    println!("udp echoed {len} bytes to {peer}: {}", text.trim());
    Ok(())
}

/// Connects, retrying for a few seconds while the server is not up yet.
fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match TcpStream::connect_timeout(&addr, Duration::from_secs(10)) {
            Ok(s) => {
                // A stuck peer ends the run instead of hanging it.
                s.set_read_timeout(Some(Duration::from_secs(60)))
                    .map_err(|e| e.to_string())?;
                s.set_write_timeout(Some(Duration::from_secs(60)))
                    .map_err(|e| e.to_string())?;
                return Ok(s);
            }
            Err(e)
                if e.kind() == std::io::ErrorKind::ConnectionRefused
                    && Instant::now() < deadline =>
            {
                std::thread::sleep(Duration::from_millis(100));
            }
            Err(e) => return Err(format!("connect {addr}: {e}")),
        }
    }
}

fn throughput(addr: SocketAddr, duration: Duration) -> Result<(), String> {
    let mut s = connect(addr)?;
    let buf = vec![0u8; 128 * 1024];
    let start = Instant::now();
    s.write_all(b"T").map_err(|e| format!("send: {e}"))?;
    let mut sent: u64 = 0;
    while start.elapsed() < duration {
        s.write_all(&buf).map_err(|e| format!("send: {e}"))?;
        sent += buf.len() as u64;
    }
    let answer = server_answer(&s, "count")?;
    let client_secs = start.elapsed().as_secs_f64();
    let (got, nanos) = answer
        .split_once(' ')
        .and_then(|(b, n)| Some((b.parse::<u64>().ok()?, n.trim().parse::<u64>().ok()?)))
        .filter(|&(_, n)| n > 0)
        .ok_or_else(|| format!("the server answered {answer:?}, not BYTES NANOS"))?;
    let secs = nanos as f64 / 1e9;
    if got != sent {
        return Err(format!("sent {sent} bytes, the server counted {got}"));
    }
    println!(
        "throughput_mbit={:.1} bytes={got} seconds={secs:.3} client_seconds={client_secs:.3}",
        got as f64 * 8.0 / secs / 1e6
    );
    Ok(())
}

/// Ends the client's side of a test and reads the server's one-line
/// answer (`what` names it in an error).
fn server_answer(s: &TcpStream, what: &str) -> Result<String, String> {
    s.shutdown(Shutdown::Write)
        .map_err(|e| format!("shutdown: {e}"))?;
    let mut answer = String::new();
    BufReader::new(s)
        .read_line(&mut answer)
        .map_err(|e| format!("reading the server's {what}: {e}"))?;
    Ok(answer)
}

fn latency(addr: SocketAddr, count: usize) -> Result<(), String> {
    let mut s = connect(addr)?;
    s.set_nodelay(true).map_err(|e| e.to_string())?;
    s.write_all(b"L").map_err(|e| format!("send: {e}"))?;
    // The server times from each echo to the next byte: one more round
    // trip than it reports, and the warm-up ones it skips.
    let total = 1 + LATENCY_WARMUP + count;
    let mut b = [0u8; 1];
    let start = Instant::now();
    let mut own = Vec::with_capacity(total);
    for i in 0..total {
        let t = Instant::now();
        s.write_all(b"x").map_err(|e| format!("send: {e}"))?;
        s.read_exact(&mut b)
            .map_err(|e| format!("round trip {i}: {e}"))?;
        own.push(t.elapsed().as_secs_f64() * 1e6);
    }
    let mean = start.elapsed().as_secs_f64() * 1e6 / total as f64;
    own.sort_by(f64::total_cmp);
    let own_median = own[total / 2];
    let answer = server_answer(&s, "times")?;
    let answer = answer.trim();
    if !answer.starts_with("latency_us_median=") || !answer.ends_with(&format!(" count={count}")) {
        return Err(format!("the server answered {answer:?}"));
    }
    println!("{answer} client_mean_us={mean:.1} client_median_us={own_median:.1}");
    Ok(())
}

/// `latency_us_median=A p99=B min=C max=D count=N` of round trips in µs.
fn summary(rtts: &[f64]) -> String {
    let mut v = rtts.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n == 0 {
        return "latency_us_median=NA p99=NA min=NA max=NA count=0".to_string();
    }
    let median = if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    };
    // Nearest rank.
    let p99 = v[(n * 99).div_ceil(100) - 1];
    format!(
        "latency_us_median={median:.1} p99={p99:.1} min={:.1} max={:.1} count={n}",
        v[0],
        v[n - 1]
    )
}
