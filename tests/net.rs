//! A container's network namespace carried into its VM: a plain OCI bundle
//! whose config names a namespace the test wires (a veth pair to a second
//! namespace with a server in it), checked from inside the guest: the
//! address, routes, TCP both ways, ICMP, UDP both ways (a DNS resolver the
//! test runs, and an echo in the guest). Afterwards the namespace is as it was: no tap, no tc qdisc.

use krun_e2e as harness;

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use harness::{lifecycle, Sandbox, TestBundle};
use serde_json::json;

/// Two named network namespaces joined by a veth pair, removed on drop.
struct Wiring {
    container: String,
    server: String,
    /// The third octet of 10.231.N.0/24 (and fd00:231:N::/64).
    n: u8,
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}`: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn sh_out(cmd: &str) -> String {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl Wiring {
    fn new(tag: &str) -> Wiring {
        let pid = std::process::id();
        let n = (pid % 200) as u8 + 20;
        let w = Wiring {
            container: format!("krun-{tag}-{pid}-c"),
            server: format!("krun-{tag}-{pid}-s"),
            n,
        };
        let (c, s) = (&w.container, &w.server);
        sh(&format!(
            "set -e
             ip netns add {c}; ip netns add {s}
             ip link add kt{pid}c type veth peer name kt{pid}s
             ip link set kt{pid}c netns {c}; ip link set kt{pid}s netns {s}
             ip -n {c} link set kt{pid}c name eth0; ip -n {s} link set kt{pid}s name eth0
             ip -n {s} addr add 10.231.{n}.1/24 dev eth0
             ip -n {s} addr add fd00:231:{n}::1/64 dev eth0 nodad
             ip -n {c} addr add 10.231.{n}.2/24 dev eth0
             ip -n {c} addr add fd00:231:{n}::2/64 dev eth0 nodad
             for ns in {c} {s}; do ip -n $ns link set lo up; ip -n $ns link set eth0 up; done
             ip -n {c} route add default via 10.231.{n}.1
             ip -n {c} route add 10.99.0.0/16 via 10.231.{n}.1"
        ));
        w
    }

    /// Sets the MTU of both ends of the veth pair.
    fn set_mtu(&self, mtu: u32) {
        sh(&format!(
            "ip -n {} link set eth0 mtu {mtu} && ip -n {} link set eth0 mtu {mtu}",
            self.container, self.server
        ));
    }

    /// `ip -o link show` in the container side: the tap is `krun0`.
    fn links(&self) -> String {
        sh_out(&format!("ip -n {} -o link show", self.container))
    }

    /// The qdiscs of the container side's eth0: the redirect to the tap is
    /// an `ingress` one.
    fn qdiscs(&self) -> String {
        sh_out(&format!(
            "ip netns exec {} tc qdisc show dev eth0",
            self.container
        ))
    }

    fn path(&self) -> String {
        format!("/run/netns/{}", self.container)
    }

    /// Makes bundle `b` join the container side.
    fn join(&self, b: &mut TestBundle) {
        b.config["linux"]["namespaces"]
            .as_array_mut()
            .unwrap()
            .push(json!({"type": "network", "path": self.path()}));
    }
}

impl Drop for Wiring {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.container])
            .status();
        let _ = Command::new("ip")
            .args(["netns", "del", &self.server])
            .status();
    }
}

/// Runs `f` on a thread inside the named network namespace.
fn in_netns<T: Send + 'static>(
    name: &str,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::thread::JoinHandle<T> {
    let ns = std::fs::File::open(format!("/run/netns/{name}")).unwrap();
    std::thread::spawn(move || {
        nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).unwrap();
        f()
    })
}

/// Gives the bundle's process CAP_NET_RAW, for ping.
fn with_cap_net_raw(b: &mut TestBundle) {
    for set in ["bounding", "effective", "permitted"] {
        b.process()["capabilities"][set]
            .as_array_mut()
            .unwrap()
            .push(json!("CAP_NET_RAW"));
    }
}

/// Accepts one connection on `addr` (in the calling thread's namespace),
/// giving up after 300 s so that a guest that never connects cannot hang
/// the suite; reads on it time out after 120 s.
fn accept_guest(addr: &str) -> TcpStream {
    let l = TcpListener::bind(addr).unwrap();
    l.set_nonblocking(true).unwrap();
    let deadline = Instant::now() + Duration::from_secs(300);
    let s = loop {
        match l.accept() {
            Ok((s, _)) => break s,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(100)),
            Err(e) => panic!("the guest never connected to {addr}: {e}"),
        }
    };
    s.set_nonblocking(false).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    s
}

/// A DNS answer to `query`: one A record, `addr`, for whatever was asked.
fn dns_answer(query: &[u8], addr: [u8; 4]) -> Option<Vec<u8>> {
    if query.len() < 12 {
        return None;
    }
    // The question: labels up to a zero byte, then type and class.
    let mut i = 12;
    while i < query.len() && query[i] != 0 {
        i += 1 + query[i] as usize;
    }
    let end = i + 5;
    if end > query.len() {
        return None;
    }
    let qtype = u16::from_be_bytes([query[i + 1], query[i + 2]]);
    let mut r = Vec::new();
    r.extend_from_slice(&query[..2]); // id
    r.extend_from_slice(&[0x81, 0x80]); // response, recursion available
    r.extend_from_slice(&[0, 1, 0, u8::from(qtype == 1), 0, 0, 0, 0]);
    r.extend_from_slice(&query[12..end]);
    if qtype == 1 {
        r.extend_from_slice(&[0xc0, 12, 0, 1, 0, 1, 0, 0, 0, 60, 0, 4]);
        r.extend_from_slice(&addr);
    }
    Some(r)
}

/// Asserts that the run succeeded and its output shows each of `wants`.
#[track_caller]
fn expect_shows<const N: usize>(out: &harness::Output, wants: [String; N]) {
    let text = out.stdout();
    out.expect_code(0);
    for want in wants {
        assert!(
            text.contains(&want),
            "{want:?} not in the guest's output:\n{text}\nstderr:\n{}",
            out.stderr()
        );
    }
}

#[test]
fn the_namespace_network_is_the_guests() {
    let sb = Sandbox::new("net");
    let w = Wiring::new("net");
    let n = w.n;

    // Servers in the other namespace: TCP (answers "pong <what it got>"),
    // DNS over UDP (every name is 10.99.0.77), and a TCP client that
    // connects to the guest once it listens.
    let tcp = in_netns(&w.server, move || {
        let l = TcpListener::bind(format!("10.231.{n}.1:7001")).unwrap();
        let (mut s, _) = l.accept().unwrap();
        let mut buf = [0u8; 64];
        let got = s.read(&mut buf).unwrap();
        let line = String::from_utf8_lossy(&buf[..got]).trim().to_string();
        s.write_all(format!("pong {line}\n").as_bytes()).unwrap();
        line
    });
    let dns = in_netns(&w.server, move || {
        let u = UdpSocket::bind(format!("10.231.{n}.1:53")).unwrap();
        u.set_read_timeout(Some(Duration::from_secs(300))).unwrap();
        let mut answered = 0;
        let mut buf = [0u8; 512];
        while let Ok((len, from)) = u.recv_from(&mut buf) {
            if let Some(a) = dns_answer(&buf[..len], [10, 99, 0, 77]) {
                u.send_to(&a, from).unwrap();
                answered += 1;
            }
            if answered >= 1 {
                // One A query is enough; keep answering a moment for retries.
                u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
            }
        }
        answered
    });
    // A datagram to the guest's UDP echo, resent until it comes back.
    let udp_inbound = in_netns(&w.server, move || {
        let u = UdpSocket::bind(format!("10.231.{n}.1:0")).unwrap();
        u.set_read_timeout(Some(Duration::from_millis(200)))
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(170);
        let mut buf = [0u8; 64];
        while Instant::now() < deadline {
            u.send_to(b"udp-from-the-host-side", format!("10.231.{n}.2:7004"))
                .unwrap();
            if let Ok((len, from)) = u.recv_from(&mut buf) {
                return Some((String::from_utf8_lossy(&buf[..len]).into_owned(), from));
            }
        }
        None
    });
    let inbound = in_netns(&w.server, move || {
        let deadline = Instant::now() + Duration::from_secs(170);
        loop {
            if let Ok(mut s) = TcpStream::connect(format!("10.231.{n}.2:7003")) {
                s.write_all(b"from-the-host-side\n").unwrap();
                return true;
            }
            if Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    });

    let script = format!(
        "ip addr show eth0; ip -6 addr show eth0; ip route; ip -6 route
         cat /sys/class/net/eth0/mtu
         nc -l -p 7003 > /tmp/inbound &
         netperf udp-echo 0.0.0.0:7004 &
         echo ping-over-tcp | nc -w 30 10.231.{n}.1 7001
         ping -c 1 -W 10 10.231.{n}.1 >/dev/null && echo icmp4-ok
         ping6 -c 1 -W 10 fd00:231:{n}::1 >/dev/null && echo icmp6-ok
         nslookup any.name.test 10.231.{n}.1
         wait; echo inbound: $(cat /tmp/inbound)"
    );
    let mut b = sb.bundle(&["sh", "-c", &script]);
    std::fs::copy(harness::netperf(), b.rootfs().join("bin/netperf")).unwrap();
    w.join(&mut b);
    with_cap_net_raw(&mut b);
    let mac = sh_out(&format!("ip -n {} -j link show eth0", w.container));
    let mac = serde_json::from_str::<serde_json::Value>(&mac).unwrap()[0]["address"]
        .as_str()
        .unwrap()
        .to_string();

    let out = sb.run(&b, "net", None);
    expect_shows(
        &out,
        [
            format!("inet 10.231.{n}.2/24"),
            format!("inet6 fd00:231:{n}::2/64"),
            format!("link/ether {mac}"),
            format!("default via 10.231.{n}.1 dev eth0"),
            format!("10.99.0.0/16 via 10.231.{n}.1 dev eth0"),
            "pong ping-over-tcp".to_string(),
            "icmp4-ok".into(),
            "icmp6-ok".into(),
            "Address: 10.99.0.77".into(),
            "inbound: from-the-host-side".into(),
            format!("udp echoed 22 bytes to 10.231.{n}.1:"),
        ],
    );
    assert_eq!(tcp.join().unwrap(), "ping-over-tcp");
    assert!(dns.join().unwrap() >= 1, "the resolver was never asked");
    assert!(
        inbound.join().unwrap(),
        "the host side never reached the guest's listener"
    );
    let (echo, from) = udp_inbound
        .join()
        .unwrap()
        .expect("the guest's UDP echo never answered");
    assert_eq!(echo, "udp-from-the-host-side");
    assert_eq!(from.to_string(), format!("10.231.{n}.2:7004"));

    // The namespace is as the test left it: no tap, no qdisc redirecting.
    let links = w.links();
    assert!(!links.contains("krun0"), "the tap is left: {links}");
    let qdiscs = w.qdiscs();
    assert!(
        !qdiscs.contains("ingress"),
        "the ingress qdisc is left: {qdiscs}"
    );
}

/// A jumbo MTU is the guest's too, and frames that big go both ways: a
/// ping of 8000 bytes (one frame each way) and a TCP stream of 1 MiB from
/// the other namespace (segments of nearly 9000 bytes into the guest).
#[test]
fn a_jumbo_mtu_carries_jumbo_frames() {
    let sb = Sandbox::new("netjumbo");
    let w = Wiring::new("netjumbo");
    w.set_mtu(9000);
    let n = w.n;
    const LEN: usize = 1 << 20;
    let tcp = in_netns(&w.server, move || {
        let mut s = accept_guest(&format!("10.231.{n}.1:7005"));
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        s.write_all(&data).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        // Wait for the guest's close, so every byte was taken.
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let script = format!(
        "echo mtu: $(cat /sys/class/net/eth0/mtu)
         ping -c 1 -W 10 -s 8000 10.231.{n}.1 >/dev/null && echo big-icmp-ok
         echo received: $(nc -w 30 10.231.{n}.1 7005 </dev/null | wc -c)"
    );
    let mut b = sb.bundle(&["sh", "-c", &script]);
    w.join(&mut b);
    with_cap_net_raw(&mut b);
    let out = sb.run(&b, "netjumbo", None);
    expect_shows(
        &out,
        [
            "mtu: 9000".to_string(),
            "big-icmp-ok".into(),
            format!("received: {LEN}"),
        ],
    );
    tcp.join().unwrap();
}

/// Checksum and segmentation offloads reach the guest: with TSO both ways
/// a TCP stream of 4 MiB crosses the guest's interface in segments bigger
/// than the MTU, so in well under one packet per 1500 bytes (without
/// offloads it takes at least one per MSS, 1448 bytes; with them a slow
/// stack still sends segments of at least two MSS, Linux's min_tso_segs).
/// Both streams come from 128 KiB writes (netperf send, and the test):
/// busybox nc's 1 KiB writes make small segments whatever the offloads.
/// The data arrives whole: the host kernel completed every checksum.
#[test]
fn offloads_carry_segments_bigger_than_the_mtu_both_ways() {
    let sb = Sandbox::new("netoffload");
    let w = Wiring::new("netoffload");
    let n = w.n;
    const LEN: usize = 4 << 20;
    let sink = in_netns(&w.server, move || {
        let mut s = accept_guest(&format!("10.231.{n}.1:7006"));
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        got.iter().filter(|&&b| b != 0).count() == 0 && got.len() == LEN
    });
    let source = in_netns(&w.server, move || {
        let mut s = accept_guest(&format!("10.231.{n}.1:7007"));
        let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
        for chunk in data.chunks(128 * 1024) {
            s.write_all(chunk).unwrap();
        }
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    });
    let script = format!(
        "stat() {{ cat /sys/class/net/eth0/statistics/$1; }}
         tx=$(stat tx_packets)
         netperf send 10.231.{n}.1:7006 {LEN}
         echo tx_packets: $(( $(stat tx_packets) - tx ))
         rx=$(stat rx_packets)
         echo received: $(nc 10.231.{n}.1 7007 </dev/null | md5sum)
         echo rx_packets: $(( $(stat rx_packets) - rx ))"
    );
    let mut b = sb.bundle(&["sh", "-c", &script]);
    std::fs::copy(harness::netperf(), b.rootfs().join("bin/netperf")).unwrap();
    w.join(&mut b);
    let out = sb.run(&b, "netoffload", None);
    let text = out.stdout();
    out.expect_code(0);
    assert!(
        sink.join().unwrap(),
        "the server did not get 4 MiB of zeros:\n{text}"
    );
    source.join().unwrap();
    // The same bytes' md5sum, by the host's md5sum.
    let data: Vec<u8> = (0..LEN).map(|i| (i % 251) as u8).collect();
    let mut md5sum = Command::new("md5sum")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    md5sum.stdin.take().unwrap().write_all(&data).unwrap();
    let want_md5 = String::from_utf8(md5sum.wait_with_output().unwrap().stdout).unwrap();
    let want_md5 = want_md5.split_whitespace().next().unwrap();
    assert!(
        text.contains(&format!("received: {want_md5}")),
        "the guest did not get the 4 MiB the server sent:\n{text}\nstderr:\n{}",
        out.stderr()
    );
    let most = LEN / 1500 * 3 / 4;
    for key in ["tx_packets", "rx_packets"] {
        let count: usize = text
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}: ")))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or_else(|| panic!("no {key} in the guest's output:\n{text}"));
        eprintln!("{key}: {count} packets for 4 MiB");
        assert!(
            count < most,
            "{key}: 4 MiB took {count} packets (at most {most} with TSO): no segmentation offload\n{text}"
        );
    }
}

#[test]
fn a_namespace_with_only_loopback_gives_loopback_only() {
    let sb = Sandbox::new("netlo");
    let name = format!("krun-netlo-{}", std::process::id());
    sh(&format!("ip netns add {name}"));
    let mut b = sb.bundle(&[
        "sh",
        "-c",
        "for d in /sys/class/net/*; do [ $(cat $d/type) = 1 ] && echo ether: ${d##*/}; done; ip addr show lo | grep -c 'inet 127.0.0.1'",
    ]);
    b.config["linux"]["namespaces"]
        .as_array_mut()
        .unwrap()
        .push(json!({"type": "network", "path": format!("/run/netns/{name}")}));
    let out = sb.run(&b, "netlo", None);
    let _ = Command::new("ip").args(["netns", "del", &name]).status();
    out.expect_code(0);
    // No Ethernet interface (ARPHRD_ETHER), and loopback up.
    assert_eq!(out.stdout(), "1\n");
}

#[test]
fn kill_dash_nine_leaves_the_namespace_clean_after_delete() {
    let sb = Sandbox::new("net9");
    let w = Wiring::new("net9");
    let mut b = sb.bundle(&["sleep", "1000"]);
    w.join(&mut b);
    b.write();
    let pid_file = sb.path().join("n9.pid");
    // The monitor keeps create's stdio: give it files, not pipes.
    let err_path = sb.path().join("n9.err");
    let mut c = lifecycle::create_cmd(&sb, &b, &pid_file, "n9");
    c.stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&err_path).unwrap());
    let mut child = c.spawn().unwrap();
    let st = harness::wait_timeout(&mut child, harness::RUN_TIMEOUT).expect("create timed out");
    assert!(
        st.success(),
        "create: {}",
        std::fs::read_to_string(&err_path).unwrap_or_default()
    );
    let pid = lifecycle::read_pid(&pid_file);
    // While it runs: the tap and the redirect are in place.
    let links = w.links();
    assert!(
        links.contains("krun0"),
        "no tap while the container runs: {links}"
    );
    let qdiscs = w.qdiscs();
    assert!(
        qdiscs.contains("ingress"),
        "no ingress qdisc while the container runs: {qdiscs}"
    );

    // SAFETY: kill has no memory effects.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    let deadline = Instant::now() + Duration::from_secs(60);
    while w.links().contains("krun0") {
        assert!(Instant::now() < deadline, "the tap outlived the VM");
        std::thread::sleep(Duration::from_millis(100));
    }
    let o = sb.cmd().args(["delete", "n9"]).output().unwrap();
    assert!(
        o.status.success(),
        "delete: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let qdiscs = w.qdiscs();
    assert!(
        !qdiscs.contains("ingress"),
        "delete left the ingress qdisc: {qdiscs}"
    );
    sb.assert_clean();
}
