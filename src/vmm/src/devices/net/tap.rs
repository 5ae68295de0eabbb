//! Every ioctl made on a tap (`/dev/net/tun`), the runtime's and the
//! VMM's: [`create`] makes one (`TUNSETIFF`) in the calling thread's
//! network namespace; the network card then asks whether it carries
//! virtio-net headers ([`flags`], `TUNGETIFF`), sets their size
//! ([`set_vnet_hdr_len`], `TUNSETVNETHDRSZ`) and the offloads the guest
//! takes ([`set_offloads`], `TUNSETOFFLOAD`).

use std::fs::OpenOptions;
use std::io;
use std::os::fd::{AsRawFd, OwnedFd};

use super::{VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6};

/// Errors making a tap.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?}: at most 15 bytes, no NUL")]
    Name(String),
    #[error("opening /dev/net/tun")]
    Open(#[source] io::Error),
    #[error("creating the tap (TUNSETIFF)")]
    Create(#[source] io::Error),
}

/// Makes the tap `name` ("": the kernel names it) in the calling thread's
/// network namespace, without packet information, with virtio-net headers
/// in front of every frame when `vnet_hdr`. It goes when its last
/// descriptor is closed. Needs CAP_NET_ADMIN.
pub fn create(name: &str, vnet_hdr: bool) -> Result<OwnedFd, TapError> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // The name and its NUL must fit ifr_name.
    if name.len() >= req.ifr_name.len() || name.contains('\0') {
        return Err(TapError::Name(name.to_owned()));
    }
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    let mut flags = libc::IFF_TAP | libc::IFF_NO_PI;
    if vnet_hdr {
        flags |= libc::IFF_VNET_HDR;
    }
    req.ifr_ifru.ifru_flags = flags as libc::c_short;
    let tun = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(TapError::Open)?;
    // SAFETY: TUNSETIFF reads and writes one ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF as _, &mut req) };
    if r != 0 {
        return Err(TapError::Create(io::Error::last_os_error()));
    }
    Ok(OwnedFd::from(tun))
}

/// The tap's flags (`TUNGETIFF`), None when `fd` is not a tap.
pub fn flags(fd: &OwnedFd) -> Option<libc::c_int> {
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one ifreq, which outlives the call.
    let r = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNGETIFF as _, &mut req) };
    // SAFETY: TUNGETIFF filled in the flags member of the union.
    (r == 0).then(|| libc::c_int::from(unsafe { req.ifr_ifru.ifru_flags }) & 0xffff)
}

/// Whether the tap reads and writes a virtio-net header with each frame.
pub fn has_vnet_hdr(fd: &OwnedFd) -> bool {
    flags(fd).is_some_and(|f| f & libc::IFF_VNET_HDR != 0)
}

/// Sets the size of the virtio-net header in front of every frame
/// (`TUNSETVNETHDRSZ`).
pub fn set_vnet_hdr_len(fd: &OwnedFd, len: usize) -> io::Result<()> {
    let size = libc::c_int::try_from(len).map_err(|_| io::ErrorKind::InvalidInput)?;
    // SAFETY: TUNSETVNETHDRSZ reads one int, which outlives the call.
    if unsafe { libc::ioctl(fd.as_raw_fd(), libc::TUNSETVNETHDRSZ as _, &size) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The `TUNSETOFFLOAD` flags the tap is probed with: checksum offload and
/// TSO for IPv4 and IPv6.
pub const PROBE_OFFLOADS: libc::c_uint = libc::TUN_F_CSUM | libc::TUN_F_TSO4 | libc::TUN_F_TSO6;

/// Tells the tap which offloads the reader takes (`TUNSETOFFLOAD`): the
/// kernel finishes the rest before handing a frame over.
pub fn set_offloads(fd: &OwnedFd, flags: libc::c_uint) -> io::Result<()> {
    // SAFETY: TUNSETOFFLOAD takes its argument by value; no memory.
    if unsafe {
        libc::ioctl(
            fd.as_raw_fd(),
            libc::TUNSETOFFLOAD as _,
            flags as libc::c_ulong,
        )
    } != 0
    {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// What the tap may hand the guest, from the features the driver took:
/// partial checksums with GUEST_CSUM, segments bigger than the MTU with
/// GUEST_TSO4/6 (which need GUEST_CSUM).
pub fn offloads_for(acked: u64) -> libc::c_uint {
    if acked & VIRTIO_NET_F_GUEST_CSUM == 0 {
        return 0;
    }
    let mut f = libc::TUN_F_CSUM;
    if acked & VIRTIO_NET_F_GUEST_TSO4 != 0 {
        f |= libc::TUN_F_TSO4;
    }
    if acked & VIRTIO_NET_F_GUEST_TSO6 != 0 {
        f |= libc::TUN_F_TSO6;
    }
    f
}

/// Makes reads and writes on the tap return at once (EAGAIN) rather than
/// wait.
pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: F_GETFL/F_SETFL on a file descriptor we own; no memory.
    unsafe {
        let flags = libc::fcntl(fd.as_raw_fd(), libc::F_GETFL);
        if flags < 0 || libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::super::{Net, OFFLOAD_FEATURES, VIRTIO_NET_F_MAC, VIRTIO_NET_F_MRG_RXBUF};
    use super::*;
    use crate::virtio::VirtioDevice;

    #[test]
    fn the_tap_gets_the_offloads_the_driver_took() {
        assert_eq!(offloads_for(0), 0);
        assert_eq!(offloads_for(OFFLOAD_FEATURES & !VIRTIO_NET_F_GUEST_CSUM), 0);
        assert_eq!(offloads_for(VIRTIO_NET_F_GUEST_CSUM), libc::TUN_F_CSUM);
        assert_eq!(offloads_for(OFFLOAD_FEATURES), PROBE_OFFLOADS);
        assert_eq!(
            offloads_for(VIRTIO_NET_F_GUEST_CSUM | VIRTIO_NET_F_GUEST_TSO6),
            libc::TUN_F_CSUM | libc::TUN_F_TSO6
        );
    }

    /// A real tap (the kernel names it; it goes when closed): with
    /// `IFF_VNET_HDR` the offloads are offered, without it not. Needs
    /// /dev/net/tun and CAP_NET_ADMIN, as the runtime does.
    #[test]
    fn offloads_are_offered_over_a_tap_with_headers() {
        for vnet_hdr in [true, false] {
            let tap = create("", vnet_hdr).expect("a tap (needs CAP_NET_ADMIN)");
            let n = Net::new(tap, "02:00:00:00:00:02").unwrap();
            assert_eq!(n.vnet_hdr, vnet_hdr);
            let offered = n.features() & OFFLOAD_FEATURES == OFFLOAD_FEATURES;
            assert_eq!(offered, vnet_hdr);
            assert_eq!(
                n.features() & !OFFLOAD_FEATURES,
                VIRTIO_NET_F_MAC | VIRTIO_NET_F_MRG_RXBUF
            );
        }
    }

    #[test]
    fn tap_names_must_fit_ifr_name() {
        for bad in ["a".repeat(16).as_str(), "tap\0x"] {
            assert!(
                matches!(create(bad, false), Err(TapError::Name(_))),
                "{bad:?}"
            );
        }
    }
}
