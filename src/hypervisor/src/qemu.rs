//! The QEMU backend: `qemu-system-x86_64 -M microvm` with one virtiofsd per
//! share, KVM where the host can boot our kernel and TCG where it cannot.
//!
//! QEMU runs jailed (src/hypervisor/src/jail.rs): an unprivileged uid of its
//! own, rooted in an empty tmpfs (`<run dir>/qemu-root` on the host, empty
//! there and removed when the VM ends) that holds `/usr` and the libraries
//! read-only, the kernel and initramfs at `/kernel` and `/initrd`, and a
//! `/dev` of `kvm` (its own node, owned by its uid), `null`, `zero` and
//! `urandom`. Nothing else of the host's file system: every other thing it
//! uses comes in as a descriptor — the control socket, the console pipe
//! (an fd set, `/dev/fdset/1`, not `/dev/fd/N`: there is no `/proc`), the
//! taps, and one connected vhost-user socket per virtiofsd.

use std::fmt::Write as _;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::child::{kill_and_reap, spawn, PassFd, CONSOLE_FD, CONTROL_FD, NET_FD};
use crate::jail::Jail;
use crate::process::{last_lines, Companions, EmptyDir, VmProcess};
use crate::virtiofsd::{self, Virtiofsd};
use crate::{Accel, CappedLog, Error, Hypervisor, Vm, VmConfig};

// The control socket, the console pipe and the taps are at child.rs's
// fixed numbers; the vhost-user sockets follow the taps.
/// The jail's directory in the run directory.
const JAIL_DIR: &str = "qemu-root";
/// Where the kernel and the initramfs are in the jail.
const JAIL_KERNEL: &str = "/kernel";
const JAIL_INITRD: &str = "/initrd";
/// How long virtiofsd's log may take to reach its file once it has exited.
const LOG_FLUSH: Duration = Duration::from_secs(1);

/// QEMU with its helpers.
#[derive(Clone, Debug)]
pub struct Qemu {
    pub qemu: PathBuf,
    pub virtiofsd: PathBuf,
    pub accel: Accel,
}

impl Qemu {
    /// The QEMU command line for `config`, with the paths it has in the
    /// jail; the virtio-fs connections are fds after the taps', one per
    /// share in order.
    fn args(&self, config: &VmConfig) -> Vec<String> {
        let mem = config.memory_mib;
        let mut a: Vec<String> = Vec::new();
        let mut push = |s: &[&str]| a.extend(s.iter().map(|s| s.to_string()));
        // No ACPI: with it, microvm stops announcing virtio-mmio devices on
        // the command line. No option ROMs. The RTC stays: without kvm-clock
        // (under TCG) Linux 6.1 reads the CMOS clock at boot and, finding
        // none, waits up to a second for it.
        push(&[
            "-M",
            "microvm,x-option-roms=off,rtc=on,acpi=off,isa-serial=on,memory-backend=mem",
        ]);
        match self.accel {
            // Not `-cpu host`: it makes QEMU require MSRs (ARCH_CAPABILITIES)
            // that some KVMs do not offer; `max` is what KVM supports.
            Accel::Kvm => push(&["-accel", "kvm", "-cpu", "max"]),
            // TCG's translated code is host memory beyond the guest's, in
            // the container's host cgroup: capped at 128 MiB (QEMU's
            // default lets it grow to 1 GiB), inside the host overhead
            // (plan/host.rs); a full buffer is flushed, not grown.
            Accel::Tcg => push(&["-accel", "tcg,thread=multi,tb-size=128", "-cpu", "max"]),
        }
        let mem_arg = format!("{mem}M");
        let backend = format!("memory-backend-memfd,id=mem,size={mem}M,share=on");
        let smp = config.vcpus.to_string();
        push(&["-smp", &smp, "-m", &mem_arg, "-object", &backend]);
        // QEMU's own seccomp filter, beneath the runtime's deny-list: no
        // obsolete system calls, no setuid/setgid/capset, no fork or exec,
        // no scheduler or resource-limit changes.
        push(&[
            "-sandbox",
            "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny",
        ]);
        push(&[
            "-nodefaults",
            "-no-user-config",
            "-display",
            "none",
            "-no-reboot",
        ]);
        let cmdline = format!(
            "console=ttyS0 reboot=t panic=-1 oops=panic {}",
            config.cmdline
        );
        push(&[
            "-kernel",
            JAIL_KERNEL,
            "-initrd",
            JAIL_INITRD,
            "-append",
            cmdline.trim(),
        ]);
        // The console's pipe, which QEMU dups from an fd set by path;
        // appending, as it would truncate the dup (EINVAL on a pipe).
        let add = format!("fd={CONSOLE_FD},set=1");
        push(&["-add-fd", &add]);
        push(&["-chardev", "file,id=con,path=/dev/fdset/1,append=on"]);
        push(&["-serial", "chardev:con"]);
        let ctl = format!("socket,id=ctl,fd={CONTROL_FD}");
        let port = format!(
            "virtserialport,chardev=ctl,name={}",
            config.control_port_name
        );
        push(&[
            "-device",
            "virtio-serial-device,max_ports=2",
            "-chardev",
            &ctl,
            "-device",
            &port,
        ]);
        for (i, n) in config.nets.iter().enumerate() {
            let netdev = format!("tap,id=net{i},fd={}", NET_FD + i as i32);
            let dev = format!("virtio-net-device,netdev=net{i},mac={}", n.mac);
            push(&["-netdev", &netdev, "-device", &dev]);
        }
        let fs_fd = NET_FD + config.nets.len() as i32;
        for (i, share) in config.shares.iter().enumerate() {
            let chardev = format!("socket,id=fs{i},fd={}", fs_fd + i as i32);
            let dev = format!("vhost-user-fs-device,chardev=fs{i},tag={}", share.tag);
            push(&["-chardev", &chardev, "-device", &dev]);
        }
        // Last, so the other devices keep their slots: the guest reports
        // free pages and QEMU discards them (on the shared memfd a hole is
        // punched, so the host gets them back).
        push(&["-device", "virtio-balloon-device,free-page-reporting=on"]);
        a
    }
}

impl Hypervisor for Qemu {
    fn name(&self) -> &'static str {
        "qemu"
    }

    fn start(&self, config: VmConfig) -> Result<Box<dyn Vm>, Error> {
        if config.snapshot.is_some() {
            return Err(Error::InvalidConfig(
                "the QEMU backend boots every VM: it neither captures nor restores templates"
                    .into(),
            ));
        }
        if config.vcpus == 0 || config.memory_mib == 0 {
            return Err(Error::InvalidConfig(
                "a VM needs at least one vCPU and some memory".into(),
            ));
        }
        let mut daemons: Vec<Virtiofsd> = Vec::new();
        for (i, share) in config.shares.iter().enumerate() {
            // On error, `daemons` is dropped and kills what already runs.
            daemons.push(virtiofsd::start(
                &self.virtiofsd,
                share,
                &config.run_dir,
                i,
                config.log_limit,
            )?);
        }
        let args = self.args(&config);
        tracing::debug!(qemu = %self.qemu.display(), args = ?args, "starting VM");
        // QEMU reports some of what the guest does wrong on stderr: its
        // log is capped like the guest's console.
        let log_path = config.run_dir.join("qemu.log");
        let (log, stderr) =
            CappedLog::create(&log_path, config.log_limit, "QEMU log").map_err(|source| {
                Error::Spawn {
                    program: log_path.display().to_string(),
                    source,
                }
            })?;
        let spawn_err = |source| Error::Spawn {
            program: self.qemu.display().to_string(),
            source,
        };
        let binary = self.qemu.canonicalize().map_err(spawn_err)?;
        let jail_dir = EmptyDir::create(config.run_dir.join(JAIL_DIR)).map_err(spawn_err)?;
        let jail = self
            .jail(&jail_dir.0, &binary, &config)
            .map_err(spawn_err)?;
        let mut cmd = Command::new(&binary);
        cmd.args(&args).stdout(Stdio::null()).stderr(stderr);
        let mut fds = PassFd::vm_fds(config.control, config.console, config.nets);
        // Connected here: the listening sockets are virtiofsd's, which
        // accepts the connections once it runs.
        let fs_fd = NET_FD + fds.len() as i32 - 2;
        for (i, d) in daemons.iter().enumerate() {
            let conn = UnixStream::connect(&d.socket).map_err(spawn_err)?;
            fds.push(PassFd {
                fd: conn.into(),
                target: fs_fd + i as i32,
            });
        }
        let child = spawn(&mut cmd, fds, crate::QEMU_CAPS, Some(jail))?;
        let helpers = Helpers {
            daemons,
            _jail_dir: jail_dir,
        };
        Ok(Box::new(VmProcess::new(
            child,
            log_path,
            log,
            5,
            Box::new(helpers),
        )))
    }
}

impl Qemu {
    /// Plans QEMU's jail on the empty directory `dir`: what QEMU needs of
    /// the host, read-only (see the module doc).
    fn jail(&self, dir: &Path, binary: &Path, config: &VmConfig) -> std::io::Result<Jail> {
        let mut jail = Jail::new(dir)?;
        jail.bind(Path::new("/usr"), Path::new("/usr"))?;
        for lib in ["/lib", "/lib64", "/lib32", "/libx32", "/etc/ld.so.cache"] {
            jail.mirror(Path::new(lib))?;
        }
        if !binary.starts_with("/usr") {
            jail.bind(binary, binary)?;
        }
        jail.bind(&config.kernel, Path::new(JAIL_KERNEL))?;
        jail.bind(&config.initrd, Path::new(JAIL_INITRD))?;
        for dev in ["/dev/null", "/dev/zero", "/dev/urandom"] {
            jail.device(Path::new(dev), false)?;
        }
        if self.accel == Accel::Kvm {
            jail.device(Path::new("/dev/kvm"), true)?;
        }
        Ok(jail)
    }
}

/// The virtiofsd daemons and the jail's directory, which end with QEMU.
struct Helpers {
    daemons: Vec<Virtiofsd>,
    /// Declared after `daemons`; removed once QEMU is reaped (the
    /// [`VmProcess`] drops its companions after its child).
    _jail_dir: EmptyDir,
}

impl Companions for Helpers {
    // virtiofsd exits when QEMU hangs up; make sure.
    fn kill(&mut self) {
        for d in &mut self.daemons {
            let _ = d.child.kill();
        }
    }

    fn reap(&mut self) {
        for d in &mut self.daemons {
            kill_and_reap(&mut d.child);
        }
    }

    fn detail(&mut self, detail: &mut String) {
        for d in &mut self.daemons {
            d.log.finish(LOG_FLUSH);
            for line in last_lines(&d.log_path, 3).lines() {
                let _ = writeln!(detail, "virtiofsd: {line}");
            }
        }
    }
}
