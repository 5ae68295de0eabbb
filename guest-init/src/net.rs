//! The VM's network, as the host's network namespace had it: loopback up,
//! and each carried interface (found by its MAC) with its name, MTU,
//! addresses and routes. Done once per VM, before its first container.

use std::fs;
use std::net::IpAddr;

use krun_proto::{InterfaceSetup, NetworkSetup, RouteSetup};

use crate::sys;

/// "10.88.0.5/16" -> (address, prefix length).
fn cidr(s: &str) -> Result<(IpAddr, u8), String> {
    let (a, p) = s.split_once('/').unwrap_or((s, ""));
    let addr: IpAddr = a.parse().map_err(|e| format!("{s:?}: {e}"))?;
    let max = if addr.is_ipv4() { 32 } else { 128 };
    let prefix = if p.is_empty() {
        max
    } else {
        p.parse::<u8>()
            .ok()
            .filter(|p| *p <= max)
            .ok_or_else(|| format!("{s:?}: bad prefix length"))?
    };
    Ok((addr, prefix))
}

/// The guest's interface with this MAC address.
fn by_mac(mac: &str) -> Result<String, String> {
    let entries =
        fs::read_dir("/sys/class/net").map_err(|e| format!("reading /sys/class/net: {e}"))?;
    for e in entries.flatten() {
        let addr = fs::read_to_string(e.path().join("address")).unwrap_or_default();
        if addr.trim().eq_ignore_ascii_case(mac) {
            return Ok(e.file_name().to_string_lossy().into_owned());
        }
    }
    Err(format!("no network interface with MAC address {mac}"))
}

fn write_sysctl(path: &str, value: &str) {
    let _ = fs::write(format!("/proc/sys/{path}"), value);
}

/// Brings loopback up and applies `net`; a failure names what failed.
pub fn configure(net: Option<&NetworkSetup>) -> Result<(), String> {
    sys::if_up("lo").map_err(|e| format!("bringing lo up: {e}"))?;
    let Some(net) = net else { return Ok(()) };
    // Addresses are usable at once (the host's were): no duplicate
    // address detection on the guest's side of a point-to-point link.
    write_sysctl("net/ipv6/conf/all/accept_dad", "0");
    write_sysctl("net/ipv6/conf/default/accept_dad", "0");
    for i in &net.interfaces {
        configure_interface(i)?;
    }
    for r in &net.routes {
        add_route(r)?;
    }
    Ok(())
}

/// "aa:bb:cc:dd:ee:ff" -> bytes.
fn parse_mac(s: &str) -> Result<[u8; 6], String> {
    let mut out = [0u8; 6];
    let mut parts = s.split(':');
    for b in &mut out {
        *b = parts
            .next()
            .and_then(|p| u8::from_str_radix(p, 16).ok())
            .ok_or_else(|| format!("{s:?} is not a MAC address"))?;
    }
    if parts.next().is_some() {
        return Err(format!("{s:?} is not a MAC address"));
    }
    Ok(out)
}

/// Gives the interface with `i`'s MAC address (or, in a VM started from a
/// template, the template's) its MAC, name, MTU and addresses, and brings
/// it up.
fn configure_interface(i: &InterfaceSetup) -> Result<(), String> {
    let mut name = by_mac(i.template_mac.as_deref().unwrap_or(&i.mac))?;
    if i.template_mac.is_some() {
        let mac = parse_mac(&i.mac)?;
        sys::if_set_mac(&name, mac).map_err(|e| format!("{name}: MAC {}: {e}", i.mac))?;
    }
    if !i.name.is_empty() && i.name != name {
        sys::if_rename(&name, &i.name)
            .map_err(|e| format!("renaming {name} to {}: {e}", i.name))?;
        name = i.name.clone();
    }
    write_sysctl(&format!("net/ipv6/conf/{name}/accept_dad"), "0");
    if i.mtu > 0 {
        sys::if_set_mtu(&name, i.mtu).map_err(|e| format!("{name}: MTU {}: {e}", i.mtu))?;
    }
    sys::if_up(&name).map_err(|e| format!("bringing {name} up: {e}"))?;
    let index = sys::if_index(&name).map_err(|e| format!("{name}: {e}"))?;
    let mut v4 = 0;
    for a in &i.addresses {
        let (addr, prefix) = cidr(a)?;
        match addr {
            IpAddr::V4(a4) => {
                let label = if v4 == 0 {
                    name.clone()
                } else {
                    format!("{name}:{v4}")
                };
                sys::if_set_ipv4(&label, a4, prefix)
                    .map_err(|e| format!("{name}: address {a}: {e}"))?;
                v4 += 1;
            }
            IpAddr::V6(a6) => sys::if_add_ipv6(index, a6, prefix)
                .map_err(|e| format!("{name}: address {a}: {e}"))?,
        }
    }
    Ok(())
}

/// The destination of a route and its gateway, if any.
fn route_ends(r: &RouteSetup) -> Result<((IpAddr, u8), Option<IpAddr>), String> {
    let gw = r
        .gateway
        .as_deref()
        .map(str::parse::<IpAddr>)
        .transpose()
        .map_err(|e| format!("route {}: gateway: {e}", r.destination))?;
    let dst = if r.destination == "default" {
        (
            if r.ipv6 {
                IpAddr::from([0u16; 8])
            } else {
                IpAddr::from([0u8; 4])
            },
            0,
        )
    } else {
        cidr(&r.destination)?
    };
    Ok((dst, gw))
}

fn add_route(r: &RouteSetup) -> Result<(), String> {
    let ((dst, prefix), gw) = route_ends(r)?;
    let err = |e: std::io::Error| {
        format!(
            "route {} via {:?} dev {}: {e}",
            r.destination, r.gateway, r.interface
        )
    };
    match (dst, gw) {
        (IpAddr::V4(d), None) => sys::route_add_v4(&r.interface, d, prefix, None).map_err(err),
        (IpAddr::V4(d), Some(IpAddr::V4(g))) => {
            sys::route_add_v4(&r.interface, d, prefix, Some(g)).map_err(err)
        }
        (IpAddr::V6(d), None) => {
            let index = sys::if_index(&r.interface).map_err(err)?;
            sys::route_add_v6(index, d, prefix, None).map_err(err)
        }
        (IpAddr::V6(d), Some(IpAddr::V6(g))) => {
            let index = sys::if_index(&r.interface).map_err(err)?;
            sys::route_add_v6(index, d, prefix, Some(g)).map_err(err)
        }
        _ => Err(format!(
            "route {}: gateway {:?} of another family",
            r.destination, r.gateway
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_parse() {
        assert_eq!(
            parse_mac("02:6b:72:00:00:01").unwrap(),
            [2, 0x6b, 0x72, 0, 0, 1]
        );
        assert_eq!(parse_mac("AA:bb:CC:dd:EE:ff").unwrap()[0], 0xaa);
        for bad in [
            "",
            "02:6b:72:00:00",
            "02:6b:72:00:00:01:02",
            "zz:6b:72:00:00:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn cidrs_parse() {
        assert_eq!(
            cidr("10.88.0.5/16").unwrap(),
            ("10.88.0.5".parse().unwrap(), 16)
        );
        assert_eq!(
            cidr("fd00::5/64").unwrap(),
            ("fd00::5".parse().unwrap(), 64)
        );
        assert_eq!(cidr("10.0.0.1").unwrap().1, 32);
        assert!(cidr("10.0.0.1/33").is_err());
        assert!(cidr("nonsense/8").is_err());
    }

    #[test]
    fn routes_name_their_ends() {
        let route = |destination: &str, gateway: Option<&str>, ipv6| RouteSetup {
            destination: destination.into(),
            gateway: gateway.map(Into::into),
            interface: "eth0".into(),
            ipv6,
        };
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            route_ends(&route("default", Some("10.88.0.1"), false)).unwrap(),
            ((ip("0.0.0.0"), 0), Some(ip("10.88.0.1")))
        );
        assert_eq!(
            route_ends(&route("default", None, true)).unwrap(),
            ((ip("::"), 0), None)
        );
        assert_eq!(
            route_ends(&route("fd00::/64", Some("fd00::1"), true)).unwrap(),
            ((ip("fd00::"), 64), Some(ip("fd00::1")))
        );
        let e = route_ends(&route("default", Some("nonsense"), false)).unwrap_err();
        assert!(e.starts_with("route default: gateway: "), "{e}");
        assert!(route_ends(&route("10.0.0.0/40", None, false)).is_err());
    }
}
