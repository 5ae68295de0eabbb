//! Carrying a container's network namespace into its VM.
//!
//! podman (netavark, CNI) and Kubernetes (CNI) hand the runtime a network
//! namespace already wired: a veth with addresses and routes. The VM gets a
//! tap device made inside that namespace, and tc redirects every frame
//! between the namespace's interface and the tap both ways (the "tcfilter"
//! model): the guest's virtio-net interface, with the same MAC, addresses,
//! routes and MTU, stands where the veth's end stood. The namespace's own
//! stack never sees the traffic.
//!
//! The tap lives as long as a file descriptor on it is open (the VMM holds
//! one), so it vanishes with the VM however the VM ends; the ingress qdiscs
//! on the namespace's interface are removed by [`release`], which `delete`
//! also runs after a monitor was killed.

use std::fs::File;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context};
use krun_proto::{InterfaceSetup, NetworkSetup, RouteSetup};
use krun_vmm::devices::net::tap;
use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The tap's name inside the container's network namespace.
pub const TAP_NAME: &str = "krun0";

/// What [`release`] needs to undo [`carry`]: kept in the state file.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRecord {
    pub netns: PathBuf,
    /// The namespace's interface whose traffic goes to the tap.
    pub interface: String,
}

/// A network carried in: the tap for the VMM, the guest's setup.
pub struct Carried {
    pub tap: OwnedFd,
    pub mac: String,
    pub setup: NetworkSetup,
    pub record: NetRecord,
}

/// `ip`/`tc` ARGS inside the network namespace at `netns`.
fn in_netns(netns: &Path, args: &[&str]) -> anyhow::Result<String> {
    let out = Command::new("nsenter")
        .arg(format!("--net={}", netns.display()))
        .args(args)
        .output()
        .with_context(|| format!("running nsenter {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "`{}` in network namespace {}: {}",
            args.join(" "),
            netns.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn ip_json(netns: &Path, args: &[&str]) -> anyhow::Result<Vec<Value>> {
    let mut a = vec!["ip", "-j"];
    a.extend_from_slice(args);
    let text = in_netns(netns, &a)?;
    if text.trim().is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing `ip -j {}`", args.join(" ")))?;
    Ok(v.as_array().cloned().unwrap_or_default())
}

/// The network of the namespace at `netns`, as the guest should have it:
/// its first Ethernet interface (not loopback) with its MAC, MTU and global
/// addresses, and the routes through it that the kernel does not add by
/// itself. None when the namespace has no such interface.
pub fn read(netns: &Path) -> anyhow::Result<Option<(InterfaceSetup, Vec<RouteSetup>)>> {
    let links = ip_json(netns, &["addr", "show"])?;
    let Some(link) = links
        .iter()
        .find(|l| l["link_type"] == "ether" && l["ifname"].as_str().is_some_and(|n| n != TAP_NAME))
    else {
        return Ok(None);
    };
    let name = link["ifname"].as_str().unwrap_or_default().to_string();
    let mut iface = InterfaceSetup {
        name: name.clone(),
        mac: link["address"].as_str().unwrap_or_default().to_string(),
        mtu: link["mtu"].as_u64().unwrap_or(1500) as u32,
        addresses: Vec::new(),
        template_mac: None,
    };
    for a in link["addr_info"].as_array().into_iter().flatten() {
        // The guest makes its own link-local address (from the same MAC).
        if a["scope"] != "global" {
            continue;
        }
        if let (Some(local), Some(len)) = (a["local"].as_str(), a["prefixlen"].as_u64()) {
            iface.addresses.push(format!("{local}/{len}"));
        }
    }
    let mut routes = Vec::new();
    for (ipv6, family) in [(false, "-4"), (true, "-6")] {
        for r in ip_json(netns, &[family, "route", "show", "dev", &name])? {
            // Routes the kernel makes for an address (proto kernel), and
            // IPv6 multicast and link-local ones, come by themselves.
            if r["protocol"] == "kernel" || r["type"] == "multicast" {
                continue;
            }
            let dst = r["dst"].as_str().unwrap_or_default();
            if dst.starts_with("fe80:") || dst.starts_with("ff00:") {
                continue;
            }
            routes.push(RouteSetup {
                destination: dst.to_string(),
                gateway: r["gateway"].as_str().map(str::to_string),
                interface: name.clone(),
                ipv6,
            });
        }
    }
    Ok(Some((iface, routes)))
}

/// Opens a tap named [`TAP_NAME`] inside the network namespace at `netns`
/// (a tap belongs to the namespace of the thread that makes it).
fn open_tap(netns: &Path) -> anyhow::Result<OwnedFd> {
    let ns = File::open(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<OwnedFd> {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering network namespace {}", netns.display()))?;
            // With virtio-net headers: both backends pass them through,
            // so the guest's checksum and segmentation offloads reach the
            // host kernel (QEMU finds the flag on the descriptor by itself).
            Ok(tap::create(TAP_NAME, true)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the tap thread panicked"))?
    })
}

/// A tap in a network namespace of its own that nothing else uses (it
/// lives as long as the tap): for a VM template's card, which must be
/// there at the build but carries nothing.
pub fn private_tap() -> anyhow::Result<OwnedFd> {
    std::thread::scope(|s| {
        s.spawn(|| -> anyhow::Result<OwnedFd> {
            nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
                .context("creating a network namespace for a template's tap")?;
            Ok(tap::create(TAP_NAME, true)?)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the tap thread panicked"))?
    })
}

/// Carries the network namespace at `netns` into the VM: None when it has
/// no interface beyond loopback (the guest keeps loopback only).
pub fn carry(netns: &Path) -> anyhow::Result<Option<Carried>> {
    refuse_our_own(netns)?;
    let Some((iface, routes)) = read(netns)? else {
        return Ok(None);
    };
    let record = NetRecord {
        netns: netns.to_path_buf(),
        interface: iface.name.clone(),
    };
    let tap = open_tap(netns)?;
    let wire = || -> anyhow::Result<()> {
        let mtu = iface.mtu.to_string();
        // The namespace's stack has nothing to say on the tap.
        let _ = in_netns(
            netns,
            &[
                "sysctl",
                "-q",
                "-w",
                &format!("net.ipv6.conf.{TAP_NAME}.disable_ipv6=1"),
            ],
        );
        in_netns(netns, &["ip", "link", "set", TAP_NAME, "mtu", &mtu, "up"])?;
        for (from, to) in [
            (iface.name.as_str(), TAP_NAME),
            (TAP_NAME, iface.name.as_str()),
        ] {
            in_netns(netns, &["tc", "qdisc", "add", "dev", from, "ingress"])?;
            in_netns(
                netns,
                &[
                    "tc", "filter", "add", "dev", from, "parent", "ffff:", "protocol", "all",
                    "u32", "match", "u8", "0", "0", "action", "mirred", "egress", "redirect",
                    "dev", to,
                ],
            )?;
        }
        Ok(())
    };
    if let Err(e) = wire() {
        release(&record);
        return Err(e);
    }
    Ok(Some(Carried {
        tap,
        mac: iface.mac.clone(),
        setup: NetworkSetup {
            interfaces: vec![iface],
            routes,
        },
        record,
    }))
}

/// Refuses the network namespace this process runs in (the host's): its
/// first interface would be redirected into the VM, taking the host off
/// its network. A path such as `/proc/PID/ns/net` names the host's when
/// PID is a process of the host (a pod's infra container's monitor).
pub fn refuse_our_own(netns: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let ns = std::fs::metadata(netns)
        .with_context(|| format!("opening network namespace {}", netns.display()))?;
    let ours = std::fs::metadata("/proc/self/ns/net").context("reading our network namespace")?;
    if (ns.dev(), ns.ino()) == (ours.dev(), ours.ino()) {
        bail!(
            "{} is the host's own network namespace (the runtime's): a VM cannot share the \
             host's network, and carrying it in would take the host's interface away",
            netns.display()
        );
    }
    Ok(())
}

/// Undoes [`carry`] on the namespace's side (the tap goes with its last
/// file descriptor). Quiet: the namespace may be gone already.
pub fn release(r: &NetRecord) {
    if !r.netns.exists() {
        return;
    }
    let _ = in_netns(
        &r.netns,
        &["tc", "qdisc", "del", "dev", &r.interface, "ingress"],
    );
    let _ = in_netns(&r.netns, &["ip", "link", "del", TAP_NAME]);
}

/// Releases a carried network when dropped (after the VM, which holds the
/// tap, is gone).
pub struct Guard(pub NetRecord);

impl Drop for Guard {
    fn drop(&mut self) {
        release(&self.0);
    }
}
