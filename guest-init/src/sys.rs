//! Thin, safe wrappers over the Linux calls guest-init makes. Every unsafe
//! block in guest-init lives here: the crate root denies unsafe code and
//! allows it in this module alone.

use std::ffi::{CStr, CString, OsStr};
use std::fs::File;
use std::io::{self, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;

use krun_proto::ExitStatus;

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
    let ptr = |c: &Option<CString>| c.as_ref().map_or(std::ptr::null(), |c| c.as_ptr());
    // SAFETY: every pointer is either null or a NUL-terminated string that
    // outlives the call.
    check(unsafe {
        libc::mount(
            ptr(&source),
            target.as_ptr(),
            ptr(&fstype),
            flags as libc::c_ulong,
            ptr(&data) as *const libc::c_void,
        )
    })?;
    Ok(())
}

/// mknod(2) for a character device.
pub fn mknod_char(path: &Path, mode: u32, major: u32, minor: u32) -> io::Result<()> {
    let p = cstring(path)?;
    // SAFETY: `p` is a valid C string; makedev is a pure computation.
    check(unsafe {
        libc::mknod(
            p.as_ptr(),
            libc::S_IFCHR | mode,
            libc::makedev(major, minor),
        )
    })?;
    Ok(())
}

/// setns(2) into the namespace open at `ns`.
pub fn setns(ns: &impl AsRawFd, kind: libc::c_int) -> io::Result<()> {
    // SAFETY: setns on a descriptor we hold; no memory is involved.
    check(unsafe { libc::setns(ns.as_raw_fd(), kind) })?;
    Ok(())
}

/// unshare(2).
pub fn unshare(flags: libc::c_int) -> io::Result<()> {
    // SAFETY: unshare has no memory effects.
    check(unsafe { libc::unshare(flags) })?;
    Ok(())
}

/// fchdir(2).
pub fn fchdir(dir: &impl AsRawFd) -> io::Result<()> {
    // SAFETY: fchdir on a descriptor we hold.
    check(unsafe { libc::fchdir(dir.as_raw_fd()) })?;
    Ok(())
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cstring(path)?;
    // SAFETY: `p` is a valid C string.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a valid timespec to write to.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// Nanoseconds since the guest kernel booted.
pub fn boottime_ns() -> u64 {
    clock_ns(libc::CLOCK_BOOTTIME)
}

/// Sets the wall clock.
pub fn set_realtime(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec.
    check(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// A pipe with both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    check(unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) })?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

pub fn set_nonblocking(fd: &OwnedFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own.
    let flags = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFL) })?;
    // SAFETY: as above.
    check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_SETFL, flags | libc::O_NONBLOCK) })?;
    Ok(())
}

/// dup2(2); the new descriptor is not close-on-exec.
pub fn dup2(fd: RawFd, target: RawFd) -> io::Result<()> {
    // SAFETY: dup2 only manipulates the descriptor table.
    check(unsafe { libc::dup2(fd, target) })?;
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

/// Reaps one exited child without blocking.
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

pub fn kill(pid: i32, signal: i32) -> io::Result<()> {
    // SAFETY: kill has no memory effects.
    check(unsafe { libc::kill(pid, signal) })?;
    Ok(())
}

/// Blocks SIGCHLD and returns a signalfd that becomes readable on it.
pub fn sigchld_fd() -> io::Result<OwnedFd> {
    // SAFETY: sigset_t is plain data; the calls initialise it before use.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGCHLD);
        check(libc::sigprocmask(
            libc::SIG_BLOCK,
            &set,
            std::ptr::null_mut(),
        ))?;
        let fd = check(libc::signalfd(
            -1,
            &set,
            libc::SFD_CLOEXEC | libc::SFD_NONBLOCK,
        ))?;
        Ok(OwnedFd::from_raw_fd(fd))
    }
}

/// Empties a signalfd.
pub fn drain_signalfd(fd: &OwnedFd) {
    let mut buf = [0u8; 128 * 8];
    // SAFETY: reads into a buffer of the given size; the fd is non-blocking.
    while unsafe {
        libc::read(
            fd.as_raw_fd(),
            buf.as_mut_ptr() as *mut libc::c_void,
            buf.len(),
        )
    } > 0
    {}
}

/// Unblocks every signal and resets the handlers a child inherited, so an
/// exec'd workload starts with a clean signal state.
pub fn reset_signals() {
    // SAFETY: sigset_t is plain data; sigprocmask and signal affect only
    // this process.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        libc::sigprocmask(libc::SIG_SETMASK, &set, std::ptr::null_mut());
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
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::sethostname(name.as_ptr() as *const libc::c_char, name.len()) })?;
    Ok(())
}

pub fn setdomainname(name: &str) -> io::Result<()> {
    // SAFETY: the pointer and length describe `name`'s bytes.
    check(unsafe { libc::setdomainname(name.as_ptr() as *const libc::c_char, name.len()) })?;
    Ok(())
}

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
    // SAFETY: the pointer and length describe `gids`.
    check(unsafe { libc::setgroups(gids.len(), gids.as_ptr()) })?;
    Ok(())
}

pub fn setresgid(gid: u32) -> io::Result<()> {
    // SAFETY: no memory effects.
    check(unsafe { libc::setresgid(gid, gid, gid) })?;
    Ok(())
}

pub fn setresuid(uid: u32) -> io::Result<()> {
    // SAFETY: no memory effects.
    check(unsafe { libc::setresuid(uid, uid, uid) })?;
    Ok(())
}

pub fn set_keepcaps(on: bool) -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_KEEPCAPS, on as libc::c_ulong, 0, 0, 0) })?;
    Ok(())
}

pub fn set_no_new_privs() -> io::Result<()> {
    // SAFETY: prctl with integer arguments only.
    check(unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) })?;
    Ok(())
}

pub fn umask(mask: u32) {
    // SAFETY: no memory effects.
    unsafe { libc::umask(mask as libc::mode_t) };
}

pub fn setsid() {
    // SAFETY: no memory effects; failing (already a leader) is harmless.
    unsafe { libc::setsid() };
}

/// Sets the effective, permitted and inheritable capability sets of this
/// thread in one capset(2) call (set one by one, each step would have to be
/// a valid state on its own). Each set is a bit mask of capability numbers.
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
    // SAFETY: `p` is a valid C string.
    let master =
        check(unsafe { libc::open(p.as_ptr(), libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC) })?;
    // SAFETY: open succeeded, so this is a fresh descriptor we own.
    let master = unsafe { OwnedFd::from_raw_fd(master) };
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

pub fn fchown(fd: &OwnedFd, uid: u32) -> io::Result<()> {
    // SAFETY: fchown on a descriptor we own; gid -1 keeps the group.
    check(unsafe { libc::fchown(fd.as_raw_fd(), uid, u32::MAX) })?;
    Ok(())
}

/// A connected pair of unix stream sockets, close-on-exec.
pub fn socketpair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as RawFd; 2];
    // SAFETY: `fds` has room for the two descriptors.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: socketpair succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Room for one SCM_RIGHTS control message carrying one descriptor.
const CMSG_SPACE_ONE_FD: usize = 24;

/// Sends `fd` over the unix socket `sock`.
pub fn send_fd(sock: &OwnedFd, fd: &OwnedFd) -> io::Result<()> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut control = [0u8; CMSG_SPACE_ONE_FD];
    // SAFETY: msghdr is plain data; every pointer set below points into
    // buffers that outlive the sendmsg call, and CMSG_FIRSTHDR/CMSG_DATA
    // stay within `control`, which is CMSG_SPACE(sizeof(int)) bytes.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = libc::CMSG_SPACE(std::mem::size_of::<libc::c_int>() as u32) as usize;
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<libc::c_int>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(cmsg) as *mut libc::c_int, fd.as_raw_fd());
        if libc::sendmsg(sock.as_raw_fd(), &msg, 0) < 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Receives one descriptor sent with [`send_fd`].
pub fn recv_fd(sock: &OwnedFd) -> io::Result<OwnedFd> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr() as *mut libc::c_void,
        iov_len: 1,
    };
    let mut control = [0u8; CMSG_SPACE_ONE_FD];
    // SAFETY: as in send_fd; the received descriptor is read only when the
    // kernel filled in a SCM_RIGHTS message of the expected size.
    unsafe {
        let mut msg: libc::msghdr = std::mem::zeroed();
        msg.msg_iov = &mut iov;
        msg.msg_iovlen = 1;
        msg.msg_control = control.as_mut_ptr() as *mut libc::c_void;
        msg.msg_controllen = control.len();
        let n = libc::recvmsg(sock.as_raw_fd(), &mut msg, libc::MSG_CMSG_CLOEXEC);
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        if n == 0 || cmsg.is_null() || (*cmsg).cmsg_type != libc::SCM_RIGHTS {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "no descriptor received",
            ));
        }
        let fd = std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::c_int);
        Ok(OwnedFd::from_raw_fd(fd))
    }
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
    let Ok(c) = cstring(path) else {
        return false;
    };
    // SAFETY: `c` is a valid C string; access has no other effects.
    unsafe { libc::access(c.as_ptr(), libc::X_OK) == 0 }
}

/// execve(2): replaces this process's program with `path`, run with `args`
/// and the environment `env`. Returns only if that failed, with the reason.
pub fn execve(path: &CStr, args: &[CString], env: &[CString]) -> io::Error {
    let mut argv: Vec<*const libc::c_char> = args.iter().map(|a| a.as_ptr()).collect();
    argv.push(std::ptr::null());
    let mut envp: Vec<*const libc::c_char> = env.iter().map(|e| e.as_ptr()).collect();
    envp.push(std::ptr::null());
    // SAFETY: path, argv and envp are NUL-terminated strings and
    // null-terminated arrays that live across the call.
    unsafe { libc::execve(path.as_ptr(), argv.as_ptr(), envp.as_ptr()) };
    io::Error::last_os_error()
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
    // SAFETY: sync has no preconditions.
    unsafe { libc::sync() };
}

/// Flushes filesystems and powers the VM off. Never returns.
pub fn power_off() -> ! {
    // SAFETY: sync and reboot have no memory effects. The kernel is booted
    // with reboot=t and the VMM treats the reset as the end of the VM.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
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

fn inet_socket(family: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: socket has no memory effects; the fd is owned at once.
    let fd = check(unsafe { libc::socket(family, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
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

fn ioctl_ifreq(family: libc::c_int, req: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
    let s = inet_socket(family)?;
    // SAFETY: the request reads/writes one ifreq, which outlives the call.
    check(unsafe { libc::ioctl(s.as_raw_fd(), req as _, r as *mut libc::ifreq) })?;
    Ok(())
}

/// Sets IFF_UP on interface `name`.
pub fn if_up(name: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    ioctl_ifreq(libc::AF_INET, libc::SIOCGIFFLAGS, &mut r)?;
    // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
    unsafe { r.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
    ioctl_ifreq(libc::AF_INET, libc::SIOCSIFFLAGS, &mut r)
}

pub fn if_set_mtu(name: &str, mtu: u32) -> io::Result<()> {
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_mtu = mtu as libc::c_int;
    ioctl_ifreq(libc::AF_INET, libc::SIOCSIFMTU, &mut r)
}

pub fn if_rename(name: &str, new: &str) -> io::Result<()> {
    let mut r = ifreq(name)?;
    let n = ifreq(new)?;
    r.ifr_ifru.ifru_newname = n.ifr_name;
    ioctl_ifreq(libc::AF_INET, libc::SIOCSIFNAME, &mut r)
}

pub fn if_index(name: &str) -> io::Result<i32> {
    let mut r = ifreq(name)?;
    ioctl_ifreq(libc::AF_INET, libc::SIOCGIFINDEX, &mut r)?;
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
    ioctl_ifreq(libc::AF_INET, libc::SIOCSIFADDR, &mut r)?;
    let mut r = ifreq(name)?;
    r.ifr_ifru.ifru_netmask = sockaddr_in(v4_mask(prefix));
    ioctl_ifreq(libc::AF_INET, libc::SIOCSIFNETMASK, &mut r)
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
    let s = inet_socket(libc::AF_INET6)?;
    // SAFETY: SIOCSIFADDR on an AF_INET6 socket reads one in6_ifreq.
    check(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCSIFADDR as _,
            &mut r as *mut libc::in6_ifreq,
        )
    })?;
    Ok(())
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
    let s = inet_socket(libc::AF_INET)?;
    // SAFETY: SIOCADDRT reads one rtentry; rt_dev points to `dev`, alive here.
    check(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut libc::rtentry,
        )
    })?;
    Ok(())
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
    let s = inet_socket(libc::AF_INET6)?;
    // SAFETY: SIOCADDRT on an AF_INET6 socket reads one in6_rtmsg.
    check(unsafe {
        libc::ioctl(
            s.as_raw_fd(),
            libc::SIOCADDRT as _,
            &mut rt as *mut In6Rtmsg,
        )
    })?;
    Ok(())
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
