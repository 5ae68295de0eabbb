//! Thin, safe wrappers over the Linux calls guest-init makes. Every unsafe
//! block in guest-init lives here: the crate root denies unsafe code and
//! allows it in this module alone.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, IoSlice, IoSliceMut, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use krun_proto::ExitStatus;
use nix::fcntl::{self, fcntl, FcntlArg, OFlag};
use nix::mount::MsFlags;
use nix::sched::{self, CloneFlags};
use nix::sys::prctl;
use nix::sys::reboot::{reboot, RebootMode};
use nix::sys::signal::{sigprocmask, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
};
use nix::sys::stat::{self, Mode, SFlag};
use nix::sys::time::TimeSpec;
use nix::time::{clock_gettime, clock_settime, ClockId};
use nix::unistd::{self, AccessFlags, Gid, Uid};

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

pub fn cstring(s: impl AsRef<OsStr>) -> io::Result<CString> {
    CString::new(s.as_ref().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "NUL byte in string"))
}

/// mount(2).
pub fn mount(
    source: Option<&str>,
    target: &Path,
    fstype: Option<&str>,
    flags: u64,
    data: Option<&str>,
) -> io::Result<()> {
    let source = source.map(cstring).transpose()?;
    let target = cstring(target)?;
    let fstype = fstype.map(cstring).transpose()?;
    let data = data.filter(|d| !d.is_empty()).map(cstring).transpose()?;
    nix::mount::mount(
        source.as_deref(),
        target.as_c_str(),
        fstype.as_deref(),
        MsFlags::from_bits_retain(flags as libc::c_ulong),
        data.as_deref(),
    )?;
    Ok(())
}

/// mknod(2) for a character device, or a block device with `block`.
pub fn mknod(path: &Path, block: bool, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cstring(path)?;
    let dev = stat::makedev(major.into(), minor.into());
    let kind = if block {
        SFlag::S_IFBLK
    } else {
        SFlag::S_IFCHR
    };
    stat::mknod(p.as_c_str(), kind, Mode::from_bits_retain(mode), dev)?;
    Ok(())
}

/// setns(2) into the namespace open at `ns`.
pub fn setns(ns: impl AsFd, kind: libc::c_int) -> io::Result<()> {
    Ok(sched::setns(ns, CloneFlags::from_bits_retain(kind))?)
}

/// unshare(2).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    Ok(sched::unshare(CloneFlags::from_bits_retain(flags))?)
}

/// fchdir(2).
pub fn fchdir(dir: impl AsFd) -> io::Result<()> {
    Ok(unistd::fchdir(dir)?)
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    Ok(unistd::chroot(cstring(path)?.as_c_str())?)
}

/// Nanoseconds since the guest kernel booted.
pub fn boottime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME).map_or(0, |ts| {
        ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64
    })
}

/// Sets the wall clock.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = TimeSpec::new(
        (ns / 1_000_000_000) as libc::time_t,
        (ns % 1_000_000_000) as libc::c_long,
    );
    Ok(clock_settime(ClockId::CLOCK_REALTIME, ts)?)
}

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`) and `RNDRESEEDCRNG`
/// (`_IO('R', 0x07)`), from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Mixes `bytes` into the kernel's input pool, credited as entropy (8 bits
/// a byte: the host's getrandom), then reseeds the CRNG from it at once:
/// what a VM restored from a template needs so that it does not draw the
/// numbers its sibling clones draw. Needs CAP_SYS_ADMIN.
pub fn credit_entropy(bytes: &[u8]) -> io::Result<()> {
    if bytes.is_empty() {
        return Ok(());
    }
    let urandom = std::fs::OpenOptions::new()
        .write(true)
        .open("/dev/urandom")?;
    // struct rand_pool_info { int entropy_count; int buf_size; __u32 buf[]; }
    let mut info = Vec::with_capacity(8 + bytes.len());
    info.extend_from_slice(&((bytes.len() * 8) as i32).to_ne_bytes());
    info.extend_from_slice(&(bytes.len() as i32).to_ne_bytes());
    info.extend_from_slice(bytes);
    // SAFETY: RNDADDENTROPY reads a rand_pool_info of 8 + buf_size bytes,
    // which `info` holds for the call.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    check(unsafe { libc::ioctl(urandom.as_raw_fd(), RNDRESEEDCRNG) })?;
    Ok(())
}

/// A pipe with both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(unistd::pipe2(OFlag::O_CLOEXEC)?)
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    let flags = OFlag::from_bits_retain(fcntl(fd, FcntlArg::F_GETFL)?);
    fcntl(fd, FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// Makes the three descriptors this process's 0, 1 and 2 (dup2(2); the
/// copies are not close-on-exec).
pub fn set_stdio(stdin: impl AsFd, stdout: impl AsFd, stderr: impl AsFd) -> io::Result<()> {
    unistd::dup2_stdin(stdin)?;
    unistd::dup2_stdout(stdout)?;
    unistd::dup2_stderr(stderr)?;
    Ok(())
}

/// fork(2) into new namespaces (`flags` are CLONE_NEW*). Returns 0 in the
/// child and the child's pid in the parent. guest-init is single-threaded,
/// so the child's copy of the heap and locks is consistent.
pub fn fork_into(flags: libc::c_int) -> io::Result<i32> {
    // SAFETY: a clone without CLONE_VM and with a null stack behaves like
    // fork(2): the child gets a copy of the address space.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (flags | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret as i32)
    }
}

/// Reaps one exited child without blocking. (Not nix's waitpid: its
/// WaitStatus cannot hold a real-time signal that killed the child.)
pub fn reap_any() -> Option<(i32, ExitStatus)> {
    let mut status = 0;
    // SAFETY: `status` is a valid int to write to.
    let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
    if pid <= 0 {
        return None;
    }
    let st = if libc::WIFSIGNALED(status) {
        ExitStatus::Signal(libc::WTERMSIG(status))
    } else {
        ExitStatus::Code(libc::WEXITSTATUS(status))
    };
    Some((pid, st))
}

/// kill(2), with any signal number (nix's Signal has no real-time ones).
pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Blocks SIGCHLD and returns a signalfd that becomes readable on it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    let mut set = SigSet::empty();
    set.add(Signal::SIGCHLD);
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None)?;
    let fd = SignalFd::with_flags(&set, SfdFlags::SFD_CLOEXEC | SfdFlags::SFD_NONBLOCK)?;
    Ok(fd.into())
}

/// Empties a signalfd.
pub fn drain_signalfd(fd: &OwnedFd) {
    let mut buf = [0u8; 128 * 8];
    // The fd is non-blocking: EAGAIN ends the loop.
    while unistd::read(fd, &mut buf).is_ok_and(|n| n > 0) {}
}

/// Unblocks every signal and resets the handlers a child inherited, so an
/// exec'd workload starts with a clean signal state.
pub fn reset_signals() {
    let _ = sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
    // SAFETY: signal(2) with SIG_DFL installs no handler of ours and takes
    // no pointer. (By number, not through nix, whose Signal cannot name 32
    // and 33 and whose signal() is unsafe as well; glibc refuses those two
    // with EINVAL.)
    unsafe {
        for sig in 1..libc::SIGRTMIN() {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::signal(sig, libc::SIG_DFL);
            }
        }
    }
}

/// poll(2) over raw pollfds.
pub fn poll(fds: &mut [libc::pollfd], timeout_ms: i32) -> io::Result<usize> {
    // SAFETY: `fds` is a valid slice of pollfd structs of the given length.
    let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, timeout_ms) };
    if n < 0 {
        let e = io::Error::last_os_error();
        if e.kind() == io::ErrorKind::Interrupted {
            return Ok(0);
        }
        return Err(e);
    }
    Ok(n as usize)
}

pub fn sethostname(name: &str) -> io::Result<()> {
    Ok(unistd::sethostname(name)?)
}

pub fn setdomainname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::setdomainname(name.as_ptr() as *const libc::c_char, name.len()) })?;
    Ok(())
}

/// setrlimit(2) by resource number, as the host sends it (nix's Resource
/// is an enum).
pub fn setrlimit(resource: u32, soft: u64, hard: u64) -> io::Result<()> {
    let lim = libc::rlimit {
        rlim_cur: soft,
        rlim_max: hard,
    };
    // SAFETY: `lim` is a valid rlimit; an unknown resource is an EINVAL.
    check(unsafe { libc::setrlimit(resource as libc::__rlimit_resource_t, &lim) })?;
    Ok(())
}

pub fn setgroups(gids: &[u32]) -> io::Result<()> {
    let gids: Vec<Gid> = gids.iter().map(|&g| Gid::from_raw(g)).collect();
    Ok(unistd::setgroups(&gids)?)
}

pub fn setresgid(gid: u32) -> io::Result<()> {
    let gid = Gid::from_raw(gid);
    Ok(unistd::setresgid(gid, gid, gid)?)
}

pub fn setresuid(uid: u32) -> io::Result<()> {
    let uid = Uid::from_raw(uid);
    Ok(unistd::setresuid(uid, uid, uid)?)
}

pub fn set_keepcaps(on: bool) -> io::Result<()> {
    Ok(prctl::set_keepcaps(on)?)
}

pub fn set_no_new_privs() -> io::Result<()> {
    Ok(prctl::set_no_new_privs()?)
}

pub fn umask(mask: u32) {
    stat::umask(Mode::from_bits_retain(mask));
}

pub fn setsid() {
    // Failing (already a session leader) is harmless.
    let _ = unistd::setsid();
}

/// Sets the effective, permitted and inheritable capability sets of this
/// thread in one capset(2) call (set one by one, as the caps crate does,
/// each step would have to be a valid state on its own). Each set is a bit
/// mask of capability numbers.
pub fn capset(effective: u64, permitted: u64, inheritable: u64) -> io::Result<()> {
    #[repr(C)]
    struct Header {
        version: u32,
        pid: i32,
    }
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Data {
        effective: u32,
        permitted: u32,
        inheritable: u32,
    }
    const LINUX_CAPABILITY_VERSION_3: u32 = 0x2008_0522;
    let mut header = Header {
        version: LINUX_CAPABILITY_VERSION_3,
        pid: 0,
    };
    let lo = |m: u64| m as u32;
    let hi = |m: u64| (m >> 32) as u32;
    let data = [
        Data {
            effective: lo(effective),
            permitted: lo(permitted),
            inheritable: lo(inheritable),
        },
        Data {
            effective: hi(effective),
            permitted: hi(permitted),
            inheritable: hi(inheritable),
        },
    ];
    // SAFETY: header and data are the v3 layouts capset expects (one header,
    // two data structs) and live across the call.
    let ret = unsafe { libc::syscall(libc::SYS_capset, &mut header as *mut Header, data.as_ptr()) };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Opens a new pseudo-terminal pair through the multiplexer at `ptmx` (the
/// container's own devpts instance): (master, slave), both close-on-exec.
pub fn open_pty(ptmx: &Path) -> io::Result<(OwnedFd, OwnedFd)> {
    let p = cstring(ptmx)?;
    let flags = OFlag::O_RDWR | OFlag::O_NOCTTY | OFlag::O_CLOEXEC;
    let master = fcntl::open(p.as_c_str(), flags, Mode::empty())?;
    let unlock: libc::c_int = 0;
    // SAFETY: TIOCSPTLCK reads an int from the pointer.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCSPTLCK, &unlock) })?;
    // SAFETY: TIOCGPTPEER takes open flags and returns a new descriptor.
    let slave = check(unsafe {
        libc::ioctl(
            master.as_raw_fd(),
            libc::TIOCGPTPEER,
            libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
        )
    })?;
    // SAFETY: the ioctl succeeded, so this is a fresh descriptor we own.
    Ok((master, unsafe { OwnedFd::from_raw_fd(slave) }))
}

/// The number N of a pty slave, as in /dev/pts/N.
pub fn pty_number(master: &OwnedFd) -> io::Result<u32> {
    let mut n: libc::c_uint = 0;
    // SAFETY: TIOCGPTN writes an unsigned int to the pointer.
    check(unsafe { libc::ioctl(master.as_raw_fd(), libc::TIOCGPTN, &mut n) })?;
    Ok(n)
}

/// fchown(2) to `uid`, keeping the group.
pub fn fchown(fd: &OwnedFd, uid: u32) -> io::Result<()> {
    Ok(unistd::fchown(fd, Some(Uid::from_raw(uid)), None)?)
}

/// A connected pair of unix stream sockets, close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(socket::socketpair(
        AddressFamily::Unix,
        SockType::Stream,
        None,
        SockFlag::SOCK_CLOEXEC,
    )?)
}

/// Sends `fd` over the unix socket `sock`.
pub fn send_fd(sock: &OwnedFd, fd: &OwnedFd) -> io::Result<()> {
    let byte = [0u8; 1];
    let fds = [fd.as_raw_fd()];
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(&byte)],
        &[ControlMessage::ScmRights(&fds)],
        MsgFlags::empty(),
        None,
    )?;
    Ok(())
}

/// Receives one descriptor sent with [`send_fd`].
pub fn recv_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = [IoSliceMut::new(&mut byte)];
    let mut control = nix::cmsg_space!(RawFd);
    let msg = socket::recvmsg::<()>(
        sock.as_raw_fd(),
        &mut iov,
        Some(&mut control),
        MsgFlags::MSG_CMSG_CLOEXEC,
    )?;
    let fd = match msg.cmsgs().ok().and_then(|mut c| c.next()) {
        Some(ControlMessageOwned::ScmRights(fds)) if msg.bytes > 0 => fds.first().copied(),
        _ => None,
    };
    let fd =
        fd.ok_or_else(|| io::Error::new(io::ErrorKind::UnexpectedEof, "no descriptor received"))?;
    // SAFETY: the kernel has just installed `fd` in this process's table
    // for this message; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

pub fn set_winsize(fd: RawFd, rows: u16, cols: u16) -> io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    check(unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) })?;
    Ok(())
}

/// Makes the terminal on `fd` the controlling terminal of this session.
pub fn set_controlling_tty(fd: RawFd) -> io::Result<()> {
    // SAFETY: TIOCSCTTY takes an integer argument.
    check(unsafe { libc::ioctl(fd, libc::TIOCSCTTY, 0) })?;
    Ok(())
}

/// True when this process may execute `path` (access(2) with X_OK).
pub fn can_execute(path: &Path) -> bool {
    cstring(path).is_ok_and(|c| unistd::access(c.as_c_str(), AccessFlags::X_OK).is_ok())
}

/// execve(2): replaces this process's program with `path`, run with `args`
/// and the environment `env`. Returns only if that failed, with the reason.
pub fn execve(path: &CStr, args: &[CString], env: &[CString]) -> io::Error {
    match unistd::execve(path, args, env) {
        Err(e) => e.into(),
        Ok(never) => match never {},
    }
}

/// exit(2) without running destructors or atexit handlers (for forked
/// children).
pub fn exit_now(code: i32) -> ! {
    // SAFETY: _exit never returns and has no preconditions.
    unsafe { libc::_exit(code) }
}

/// Flushes every filesystem's dirty data to its backing store (for
/// virtio-fs: to the host).
pub fn sync() {
    unistd::sync();
}

/// Flushes filesystems and powers the VM off. Never returns.
pub fn power_off() -> ! {
    unistd::sync();
    // The kernel is booted with reboot=t and the VMM treats the reset as
    // the end of the VM.
    let _ = reboot(RebootMode::RB_AUTOBOOT);
    // Only reached when not PID 1 (reboot needs it), e.g. in tests.
    std::process::exit(1)
}

/// Writes a line to the guest console (the kernel log the host keeps).
pub fn console(msg: &str) {
    if let Ok(mut f) = File::options().write(true).open("/dev/console") {
        let _ = writeln!(f, "krun-guest-init: {msg}");
    } else {
        eprintln!("krun-guest-init: {msg}");
    }
}

// ---------------------------------------------------------------------------
// Network interfaces and routes, through the classic ioctls (no netlink):
// enough to put the host namespace's addresses and routes on an interface.

fn inet_socket(family: AddressFamily) -> io::Result<OwnedFd> {
    Ok(socket::socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_CLOEXEC,
        None,
    )?)
}

fn ifreq(name: &str) -> io::Result<libc::ifreq> {
    if name.is_empty() || name.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("bad interface name {name:?}"),
        ));
    }
    // SAFETY: ifreq is plain data; all zeroes is a valid value.
    let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in r.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    Ok(r)
}

/// One ioctl `req` on a fresh datagram socket of `family`, with `arg`.
///
/// # Safety
///
/// `req` must be a request that reads (and may write) one `T` and nothing
/// else, or memory that outlives the call.
unsafe fn socket_ioctl<T>(
    family: AddressFamily,
    req: libc::c_ulong,
    arg: &mut T,
) -> io::Result<()> {
    let s = inet_socket(family)?;
    // SAFETY: the caller vouches that `req` takes one T; `arg` is one, and
    // lives across the call.
    check(unsafe { libc::ioctl(s.as_raw_fd(), req as _, arg as *mut T) })?;
    Ok(())
}

/// An interface ioctl (SIOC[GS]IF*) on an AF_INET socket.
fn ioctl_ifreq(req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: every request this module passes here takes one ifreq.
    unsafe { socket_ioctl(AddressFamily::Inet, req, r) }
}

/// Sets IFF_UP on interface `name`.
pub fn if_up(name: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    ioctl_ifreq(libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl_ifreq(libc::SIOCSIFFLAGS, &mut r)
}

/// Sets the MAC address of interface `name` (an Ethernet one).
pub fn if_set_mac(name: &str, mac: [u8; 6]) -> io::Result<()> {
    let mut r = ifreq(name)?;
    let mut sa: libc::sockaddr = unsafe_zeroed_sockaddr();
    sa.sa_family = libc::ARPHRD_ETHER;
    for (d, s) in sa.sa_data.iter_mut().zip(mac) {
        *d = s as libc::c_char;
    }
    r.ifr_ifru.ifru_hwaddr = sa;
    ioctl_ifreq(libc::SIOCSIFHWADDR, &mut r)
}

fn unsafe_zeroed_sockaddr() -> libc::sockaddr {
    // SAFETY: sockaddr is plain old data; all zeros is a valid value.
    unsafe { std::mem::zeroed() }
}

pub fn if_set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl_ifreq(libc::SIOCSIFMTU, &mut r)
}

pub fn if_rename(name: &str, new: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    let n = ifreq(new)?;
    r.ifr_ifru.ifru_newname = n.ifr_name;
    ioctl_ifreq(libc::SIOCSIFNAME, &mut r)
}

pub fn if_index(name: &str) -> io::Result<i32> {
    let mut r = ifreq(name)?;
    ioctl_ifreq(libc::SIOCGIFINDEX, &mut r)?;
    // SAFETY: SIOCGIFINDEX filled the ifindex member of the union.
    Ok(unsafe { r.ifr_ifru.ifru_ifindex })
}

fn sockaddr_in(a: std::net::Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(a.octets()),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

fn v4_mask(prefix: u8) -> std::net::Ipv4Addr {
    let bits = if prefix == 0 {
        0
    } else {
        u32::MAX << (32 - u32::from(prefix.min(32)))
    };
    std::net::Ipv4Addr::from(bits)
}

/// Sets an IPv4 address with its prefix on interface `name` (an alias
/// such as "eth0:1" adds a further address).
pub fn if_set_ipv4(name: &str, addr: std::net::Ipv4Addr, prefix: u8) -> io::Result<()> {
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_addr = sockaddr_in(addr);
    ioctl_ifreq(libc::SIOCSIFADDR, &mut r)?;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_netmask = sockaddr_in(v4_mask(prefix));
    ioctl_ifreq(libc::SIOCSIFNETMASK, &mut r)
}

/// Adds an IPv6 address with its prefix to the interface numbered `index`.
pub fn if_add_ipv6(index: i32, addr: std::net::Ipv6Addr, prefix: u8) -> io::Result<()> {
    let mut r = libc::in6_ifreq {
        ifr6_addr: libc::in6_addr {
            s6_addr: addr.octets(),
        },
        ifr6_prefixlen: u32::from(prefix),
        ifr6_ifindex: index,
    };
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq.
    unsafe { socket_ioctl(AddressFamily::Inet6, libc::SIOCSIFADDR, &mut r) }
}

/// Adds an IPv4 route to `dst/prefix` on `dev`, through `gateway` if given.
pub fn route_add_v4(
    dev: &str,
    dst: std::net::Ipv4Addr,
    prefix: u8,
    gateway: Option<std::net::Ipv4Addr>,
) -> io::Result<()> {
    let dev = cstring(dev)?;
    // SAFETY: rtentry is plain data; all zeroes is a valid value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    rt.rt_dst = sockaddr_in(dst);
    rt.rt_genmask = sockaddr_in(v4_mask(prefix));
    rt.rt_flags = libc::RTF_UP;
    if let Some(gw) = gateway {
        rt.rt_gateway = sockaddr_in(gw);
        rt.rt_flags |= libc::RTF_GATEWAY;
    }
    if prefix == 32 {
        rt.rt_flags |= libc::RTF_HOST;
    }
    rt.rt_dev = dev.as_ptr() as *mut libc::c_char;
    // SAFETY: SIOCADDRT reads one rtentry; rt_dev points to `dev`, alive here.
    unsafe { socket_ioctl(AddressFamily::Inet, libc::SIOCADDRT, &mut rt) }
}

/// Linux's struct in6_rtmsg (libc's keeps its fields private).
#[repr(C)]
struct In6Rtmsg {
    dst: libc::in6_addr,
    src: libc::in6_addr,
    gateway: libc::in6_addr,
    typ: u32,
    dst_len: u16,
    src_len: u16,
    metric: u32,
    info: libc::c_ulong,
    flags: u32,
    ifindex: libc::c_int,
}

/// Adds an IPv6 route to `dst/prefix` on interface `index`, through
/// `gateway` if given.
pub fn route_add_v6(
    index: i32,
    dst: std::net::Ipv6Addr,
    prefix: u8,
    gateway: Option<std::net::Ipv6Addr>,
) -> io::Result<()> {
    let zero = libc::in6_addr { s6_addr: [0; 16] };
    let mut rt = In6Rtmsg {
        dst: libc::in6_addr {
            s6_addr: dst.octets(),
        },
        src: zero,
        gateway: zero,
        typ: 0,
        dst_len: u16::from(prefix),
        src_len: 0,
        metric: 1,
        info: 0,
        flags: libc::RTF_UP as u32,
        ifindex: index,
    };
    if let Some(gw) = gateway {
        rt.gateway = libc::in6_addr {
            s6_addr: gw.octets(),
        };
        rt.flags |= libc::RTF_GATEWAY as u32;
    }
    // SAFETY: SIOCADDRT on an AF_INET6 socket reads one in6_rtmsg.
    unsafe { socket_ioctl(AddressFamily::Inet6, libc::SIOCADDRT, &mut rt) }
}

#[cfg(test)]
mod tests {
    use std::io::Read;

    use nix::fcntl::{fcntl, FcntlArg, FdFlag, OFlag};

    use super::*;

    fn is_cloexec(fd: &OwnedFd) -> bool {
        let flags = fcntl(fd, FcntlArg::F_GETFD).unwrap();
        FdFlag::from_bits_retain(flags).contains(FdFlag::FD_CLOEXEC)
    }

    #[test]
    fn a_descriptor_crosses_a_socketpair_close_on_exec() {
        let (a, b) = socketpair().unwrap();
        assert!(is_cloexec(&a) && is_cloexec(&b));
        let (r, w) = pipe().unwrap();
        assert!(is_cloexec(&r) && is_cloexec(&w));
        send_fd(&a, &w).unwrap();
        drop(w);
        let got = recv_fd(&b).unwrap();
        assert!(is_cloexec(&got));
        File::from(got).write_all(b"through").unwrap();
        let mut text = String::new();
        File::from(r).read_to_string(&mut text).unwrap();
        assert_eq!(text, "through");
    }

    #[test]
    fn a_message_without_a_descriptor_is_an_error() {
        let (a, b) = socketpair().unwrap();
        File::from(a).write_all(b"x").unwrap();
        let e = recv_fd(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
        // And so is the peer's close.
        let e = recv_fd(&b).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof);
    }

    #[test]
    fn nonblocking_adds_to_the_flags() {
        let (r, w) = pipe().unwrap();
        set_nonblocking(&w).unwrap();
        let flags = OFlag::from_bits_retain(fcntl(&w, FcntlArg::F_GETFL).unwrap());
        assert!(flags.contains(OFlag::O_NONBLOCK | OFlag::O_WRONLY));
        drop(r);
    }

    #[test]
    fn the_boot_clock_runs() {
        let a = boottime_ns();
        assert!(a > 0);
        assert!(boottime_ns() >= a);
    }

    #[test]
    fn can_execute_follows_the_mode_bits() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("prog");
        std::fs::write(&f, "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
        // Without an execute bit nobody may, root included.
        assert!(!can_execute(&f));
        std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o744)).unwrap();
        assert!(can_execute(&f));
        assert!(!can_execute(&dir.path().join("missing")));
        assert!(!can_execute(Path::new("nul\0byte")));
    }
}

/// bpf(2) commands, program and attach types, and attach flags
/// (include/uapi/linux/bpf.h).
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_PROG_TYPE_CGROUP_DEVICE: u32 = 15;
const BPF_CGROUP_DEVICE: u32 = 6;
const BPF_F_ALLOW_MULTI: u32 = 2;

/// The `BPF_PROG_LOAD` part of `union bpf_attr`, up to the fields used.
#[repr(C)]
#[derive(Default)]
struct BpfProgLoad {
    prog_type: u32,
    insn_cnt: u32,
    insns: u64,
    license: u64,
    log_level: u32,
    log_size: u32,
    log_buf: u64,
    kern_version: u32,
    prog_flags: u32,
    prog_name: [u8; 16],
    prog_ifindex: u32,
    expected_attach_type: u32,
}

/// The `BPF_PROG_ATTACH` part of `union bpf_attr`.
#[repr(C)]
struct BpfProgAttach {
    target_fd: u32,
    attach_bpf_fd: u32,
    attach_type: u32,
    attach_flags: u32,
    replace_bpf_fd: u32,
}

/// Loads a cgroup device program of `insns` (each a `struct bpf_insn`'s
/// 8 bytes). When the kernel refuses it, the error carries the end of the
/// verifier's log.
pub fn load_device_program(insns: &[[u8; 8]]) -> io::Result<OwnedFd> {
    let license = c"GPL";
    let load = |log: &mut [u8]| -> io::Result<OwnedFd> {
        let mut attr = BpfProgLoad {
            prog_type: BPF_PROG_TYPE_CGROUP_DEVICE,
            insn_cnt: u32::try_from(insns.len())
                .map_err(|_| io::Error::from_raw_os_error(libc::E2BIG))?,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            expected_attach_type: BPF_CGROUP_DEVICE,
            ..Default::default()
        };
        attr.prog_name[..12].copy_from_slice(b"krun_devices");
        if !log.is_empty() {
            attr.log_level = 1;
            attr.log_size = log.len() as u32;
            attr.log_buf = log.as_mut_ptr() as u64;
        }
        // SAFETY: `attr` is a valid BPF_PROG_LOAD attribute of the size
        // given; the instructions, the license and the log buffer it points
        // to outlive the call, and the kernel writes at most `log_size`
        // bytes to the log.
        let fd = unsafe {
            libc::syscall(
                libc::SYS_bpf,
                BPF_PROG_LOAD,
                &attr as *const BpfProgLoad,
                std::mem::size_of::<BpfProgLoad>(),
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: the kernel returned a new descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd as RawFd) })
    };
    if let Ok(fd) = load(&mut []) {
        return Ok(fd);
    }
    // Again, for the verifier's word on why.
    let mut log = vec![0u8; 64 << 10];
    let err = match load(&mut log) {
        Ok(fd) => return Ok(fd),
        Err(e) => e,
    };
    let end = log.iter().position(|b| *b == 0).unwrap_or(log.len());
    let text = String::from_utf8_lossy(&log[..end]);
    let mut tail: Vec<&str> = text.lines().rev().take(8).collect();
    tail.reverse();
    Err(io::Error::new(
        err.kind(),
        format!("{err}; verifier: {}", tail.join(" / ")),
    ))
}

/// Attaches the cgroup device program `prog` to the cgroup open as
/// `cgroup`, beside any others (BPF_F_ALLOW_MULTI: a program of a
/// descendant cgroup still runs, and each must allow).
pub fn attach_device_program(cgroup: &File, prog: &OwnedFd) -> io::Result<()> {
    let attr = BpfProgAttach {
        target_fd: cgroup.as_raw_fd() as u32,
        attach_bpf_fd: prog.as_raw_fd() as u32,
        attach_type: BPF_CGROUP_DEVICE,
        attach_flags: BPF_F_ALLOW_MULTI,
        replace_bpf_fd: 0,
    };
    // SAFETY: `attr` is a valid BPF_PROG_ATTACH attribute of the size
    // given, naming descriptors this process holds.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_ATTACH,
            &attr as *const BpfProgAttach,
            std::mem::size_of::<BpfProgAttach>(),
        )
    };
    if ret < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}
