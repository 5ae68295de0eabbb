//! Building a VM from a [`VmConfig`] and running it: KVM, memory, devices,
//! boot, vCPU threads, and a typed exit.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::os::unix::thread::JoinHandleExt;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use krun_hypervisor::{AfterCapture, Vm, VmConfig, VmExit};
use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VcpuFd, VmFd};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::bus::{Bus, IrqTrigger};
use crate::devices::balloon::Balloon;
use crate::devices::console::Console;
use crate::devices::fs::Fs;
use crate::devices::net::Net;
use crate::layout::*;
use crate::snapshot::{CapturePlan, Header, Loaded, Snapshot, TransportState, VmState};
use crate::vcpu::{kick_signal, on_kick, Control};
use crate::virtio::mmio::{MmioTransport, NOTIFY_OFFSET};
use crate::virtio::pause::Paused;
use crate::virtio::{Interrupt, Mem, VirtioDevice};
use crate::{boot, cpu, memory, mptable};

/// Errors building or starting a VM.
#[derive(Debug, thiserror::Error)]
pub enum VmmError {
    #[error("cannot open /dev/kvm")]
    Kvm(#[source] kvm_ioctls::Error),
    #[error("KVM: {what}")]
    KvmCall {
        what: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot map {0} MiB of guest memory")]
    Memory(u64, #[source] vm_memory::mmap::FromRangesError),
    #[error("vCPU {0}")]
    Cpu(u8, #[source] cpu::CpuError),
    #[error("MP table")]
    MpTable(#[from] mptable::MpTableError),
    #[error("loading the guest")]
    Boot(#[from] boot::BootError),
    #[error("device {0}")]
    Device(String, #[source] std::io::Error),
    #[error("too many devices for the interrupts available")]
    TooManyDevices,
    #[error("a VM needs 1 to 254 vCPUs, not {0}")]
    Vcpus(u32),
    #[error("cannot start a thread")]
    Thread(#[source] std::io::Error),
    #[error("snapshot")]
    Snapshot(#[from] crate::snapshot::SnapshotError),
    #[error("the snapshot is of another VM: {0}")]
    SnapshotShape(String),
    #[error("restoring device {0}")]
    Restore(String, #[source] crate::virtio::mmio::RestoreError),
    #[error("capturing device {0}")]
    Capture(String, #[source] crate::virtio::mmio::CaptureError),
    #[error("capturing the vCPUs")]
    CaptureVcpus(#[source] crate::vcpu::VcpuCaptureError),
    #[error("the vCPUs did not stop for the capture within {0:?}")]
    VcpusBusy(Duration),
    #[error("the VM ended before its capture was written: {0:?}")]
    Ended(VmExit),
}

/// How a VM gets its first state.
pub enum Start<'a> {
    /// The kernel boots.
    Boot,
    /// From a snapshot (a template), instead of a boot.
    Restore(&'a Loaded),
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmmError {
    move |source| VmmError::KvmCall { what, source }
}

/// A running VM of the built-in VMM: vCPU threads in this process (the
/// VMM's own, see [`crate::process`]; or a test's).
pub struct BuiltinVm {
    control: Arc<Control>,
    vcpus: Vec<JoinHandle<VcpuFd>>,
    vm: Arc<VmFd>,
    mem: Mem,
    bus: Arc<Bus>,
    plan: Arc<CapturePlan>,
}

/// Builds and boots a VM: [`build`], then [`Built::run`].
pub fn start(config: VmConfig) -> Result<BuiltinVm, VmmError> {
    build(config, Start::Boot)?.run()
}

/// A VM built and loaded, its vCPUs configured but not yet running: the
/// guest has not run an instruction. Dropping it drops the VM.
pub struct Built {
    vm: VmFd,
    mem: Mem,
    bus: Arc<Bus>,
    control: Arc<Control>,
    vcpus: Vec<VcpuFd>,
    /// What a capture reads of each vCPU, probed before they run.
    plan: CapturePlan,
}

/// Builds a VM from `config`: KVM, memory, devices, the kernel and
/// initramfs loaded, vCPUs configured; or, from a snapshot, memory mapped
/// from it and every device and vCPU restored. Every file it needs
/// (`/dev/kvm`, the kernel, the initramfs, each share's root) is opened
/// here; no thread is left running.
pub fn build(config: VmConfig, start: Start) -> Result<Built, VmmError> {
    if config.vcpus == 0 || config.vcpus > 254 {
        return Err(VmmError::Vcpus(config.vcpus));
    }
    let restore = match start {
        Start::Restore(loaded) => Some(&loaded.snapshot),
        _ => None,
    };
    if let Some(snap) = restore {
        check_shape(&snap.header, &config)?;
    }
    raise_open_file_limit();
    let started = std::time::Instant::now();
    let kvm = Kvm::new().map_err(VmmError::Kvm)?;
    let vm = create_vm(&kvm)?;
    let created = started.elapsed();

    let mem = match start {
        Start::Restore(loaded) => loaded.map_memory()?,
        _ => memory::create(config.memory_mib << 20)
            .map_err(|e| VmmError::Memory(config.memory_mib, e))?,
    };
    // SAFETY: `mem` is kept (cloned) by the vCPU threads and devices for
    // as long as the VM runs.
    unsafe { memory::register(&vm, &mem) }.map_err(kvm_call("registering guest memory"))?;
    let mapped = started.elapsed();

    let stop = EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device("stop event".into(), e))?;
    let control = Arc::new(Control::new(stop));

    // Devices: the serial console for the kernel's log, the control port,
    // one virtio-fs device per share, one virtio-net device per network,
    // and last (the others keep their windows and interrupts) the balloon
    // the guest reports its free pages to.
    let serial_irq =
        EventFd::new(EFD_NONBLOCK).map_err(|e| VmmError::Device("serial".into(), e))?;
    vm.register_irqfd(&serial_irq, SERIAL_IRQ)
        .map_err(kvm_call("wiring the serial interrupt"))?;
    // The console goes into the caller's pipe, which the caller drains
    // and caps; a failed write is dropped, never the guest's problem.
    let console = File::from(config.console);
    let serial = match restore.and_then(|s| s.serial.as_ref()) {
        Some(state) => vm_superio::Serial::from_state(
            &state.state(),
            IrqTrigger(serial_irq),
            vm_superio::serial::NoEvents,
            console,
        )
        .map_err(|e| VmmError::SnapshotShape(format!("serial port: {e:?}")))?,
        None => vm_superio::Serial::new(IrqTrigger(serial_irq), console),
    };

    let mut devices: Vec<(String, Box<dyn VirtioDevice>)> = Vec::new();
    let control_stream = UnixStream::from(config.control);
    devices.push((
        "console".into(),
        Box::new(Console::new(&config.control_port_name, control_stream)),
    ));
    for share in &config.shares {
        let fs = Fs::new(&share.tag, &share.path, share.readonly).map_err(|e| {
            VmmError::Device(
                format!("virtio-fs {}", share.tag),
                std::io::Error::other(e.to_string()),
            )
        })?;
        devices.push((format!("virtio-fs {}", share.tag), Box::new(fs)));
    }
    for (i, n) in config.nets.into_iter().enumerate() {
        let name = format!("virtio-net {i} ({})", n.mac);
        let net = Net::new(n.tap, &n.mac)
            .map_err(|e| VmmError::Device(name.clone(), std::io::Error::other(e.to_string())))?;
        devices.push((name, Box::new(net)));
    }
    devices.push(("virtio-balloon".into(), Box::new(Balloon::new())));
    if let Some(snap) = restore {
        if snap.devices.len() != devices.len() {
            return Err(VmmError::SnapshotShape(format!(
                "{} devices captured, this VM has {}",
                snap.devices.len(),
                devices.len()
            )));
        }
    }
    let mut cmdline = format!(
        "console=ttyS0 reboot=t panic=-1 oops=panic {}",
        config.cmdline
    );
    let mut transports = Vec::new();
    for (n, (name, dev)) in devices.into_iter().enumerate() {
        let irq = virtio_irq(n).ok_or(VmmError::TooManyDevices)?;
        let base = virtio_mmio_addr(n);
        let state = restore.map(|s| &s.devices[n]);
        let t = wire(&vm, &mem, dev, irq, base, &control.stop, state).map_err(|e| match e {
            Wired::Io(e) => VmmError::Device(name, e),
            Wired::Restore(e) => VmmError::Restore(name, e),
        })?;
        cmdline.push_str(&format!(" virtio_mmio.device=4K@0x{base:x}:{irq}"));
        transports.push((base, t));
    }
    let bus = Arc::new(Bus::new(serial, transports));
    let wired = started.elapsed();

    let entry = match restore {
        Some(_) => None,
        None => {
            mptable::write(&mem, config.vcpus, MPTABLE_ADDR)?;
            Some(boot::load(&mem, &config.kernel, &config.initrd, &cmdline)?)
        }
    };

    let cpus = config.vcpus as u8;
    let mut fds = Vec::new();
    for id in 0..cpus {
        let vcpu = vm
            .create_vcpu(id as u64)
            .map_err(kvm_call("creating a vCPU"))?;
        if let Some(entry) = entry {
            cpu::configure(&kvm, &vcpu, id, cpus, (id == 0).then_some(entry))
                .map_err(|e| VmmError::Cpu(id, e))?;
        }
        fds.push(vcpu);
    }
    if let Some(snap) = restore {
        // The irqchip, PIT and clock before any vCPU's state (see the
        // snapshot module's doc for the order).
        snap.vm.restore(&vm)?;
        for (state, vcpu) in snap.vcpus.iter().zip(&fds) {
            state.restore(&vm, vcpu)?;
        }
    }
    // Cumulative, from the start of the build.
    tracing::debug!(
        restore = restore.is_some(),
        ?created,
        memory = ?mapped,
        devices = ?wired,
        vcpus = ?started.elapsed(),
        "VMM: VM built"
    );
    Built::assemble(&kvm, vm, mem, bus, control, fds)
}

/// A new KVM VM as every VM of this VMM has it: the TSS and identity map
/// addresses, the in-kernel irqchip (both PICs, the IOAPIC, a LAPIC per
/// vCPU) and PIT.
pub(crate) fn create_vm(kvm: &Kvm) -> Result<VmFd, VmmError> {
    let vm = kvm.create_vm().map_err(kvm_call("creating the VM"))?;
    vm.set_tss_address(0xfffb_d000)
        .map_err(kvm_call("setting the TSS address"))?;
    vm.set_identity_map_address(0xfffb_c000)
        .map_err(kvm_call("setting the identity map address"))?;
    vm.create_irq_chip()
        .map_err(kvm_call("creating the interrupt controllers"))?;
    let pit = kvm_pit_config {
        flags: KVM_PIT_SPEAKER_DUMMY,
        ..Default::default()
    };
    vm.create_pit2(pit).map_err(kvm_call("creating the PIT"))?;
    Ok(vm)
}

/// A snapshot restores only into a VM of its shape: vCPUs and memory here
/// (the devices are counted once built).
fn check_shape(h: &Header, config: &VmConfig) -> Result<(), VmmError> {
    if h.vcpus != config.vcpus || h.memory_size != config.memory_mib << 20 {
        return Err(VmmError::SnapshotShape(format!(
            "{} vCPUs and {} MiB captured, this VM has {} and {} MiB",
            h.vcpus,
            h.memory_size >> 20,
            config.vcpus,
            config.memory_mib
        )));
    }
    Ok(())
}

impl Built {
    /// A VM of `vm` (made by [`create_vm`]) from its parts: guest memory
    /// registered, the bus with its devices, the vCPUs set up (configured
    /// for a boot, or restored). Probes here, on the set-up thread, what a
    /// capture will read of each vCPU (the vCPU threads' filter has no
    /// /dev/kvm or VM-wide call), and installs the kick signal's handler.
    pub(crate) fn assemble(
        kvm: &Kvm,
        vm: VmFd,
        mem: Mem,
        bus: Arc<Bus>,
        control: Arc<Control>,
        vcpus: Vec<VcpuFd>,
    ) -> Result<Built, VmmError> {
        let first = vcpus.first().ok_or(VmmError::Vcpus(0))?;
        let plan = CapturePlan::probe(kvm, &vm, first, true)?;
        vmm_sys_util::signal::register_signal_handler(kick_signal(), on_kick)
            .map_err(|e| VmmError::Thread(std::io::Error::from_raw_os_error(e.errno())))?;
        Ok(Built {
            vm,
            mem,
            bus,
            control,
            vcpus,
            plan,
        })
    }

    /// Starts the vCPU threads: the guest runs from here on.
    pub fn run(self) -> Result<BuiltinVm, VmmError> {
        let Built {
            vm,
            mem,
            bus,
            control,
            vcpus: fds,
            plan,
        } = self;
        // The VM fd must outlive the vCPUs; the threads share it.
        let vm = Arc::new(vm);
        // Started before the vCPUs, so it carries none of their filter:
        // the device workers start on it (see crate::spawner).
        let spawner = crate::spawner::Spawner::start(&control.stop).map_err(VmmError::Thread)?;
        // Restored devices start their workers now, on the spawner (as a
        // vCPU's DRIVER_OK would), never from this thread directly.
        activate_restored(&bus, spawner.clone())?;
        let mut vcpus = Vec::new();
        for (id, vcpu) in fds.into_iter().enumerate() {
            let (bus, control, vm, mem) = (bus.clone(), control.clone(), vm.clone(), mem.clone());
            let spawner = spawner.clone();
            let handle = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || {
                    crate::vcpu::confine(spawner, &control);
                    let vcpu = crate::vcpu::run(vcpu, id, &bus, &control);
                    drop((vm, mem));
                    vcpu
                })
                .map_err(VmmError::Thread)?;
            vcpus.push(handle);
        }
        Ok(BuiltinVm {
            control,
            vcpus,
            vm,
            mem,
            bus,
            plan: Arc::new(plan),
        })
    }
}

/// Starts the workers of the devices restored as activated, on
/// `spawner`: from a thread of its own that enters it, so that this
/// thread keeps no spawner (the spawner ends with its last holder).
fn activate_restored(bus: &Arc<Bus>, spawner: crate::spawner::Spawner) -> Result<(), VmmError> {
    let bus = bus.clone();
    std::thread::Builder::new()
        .name("vmm-restore".into())
        .spawn(move || {
            spawner.enter();
            for t in bus.transports() {
                let mut t = t.lock().unwrap_or_else(|e| e.into_inner());
                let ty = t.device_type();
                t.activate_restored()
                    .map_err(|e| VmmError::Restore(format!("of type {ty}"), e))?;
            }
            Ok(())
        })
        .map_err(VmmError::Thread)?
        .join()
        .unwrap_or_else(|_| Err(VmmError::Thread(std::io::Error::other("panicked"))))
}

/// Why [`wire`] failed.
enum Wired {
    Io(std::io::Error),
    Restore(crate::virtio::mmio::RestoreError),
}

/// Puts `dev` behind an MMIO transport at `base` (restored from `state`
/// if given, its worker not started: see [`activate_restored`]), its
/// interrupt on `irq` (an irqfd) and its queue notifications on
/// ioeventfds; always with a pause line, made here on the set-up thread
/// (an eventfd, which no vCPU or worker thread may make), so that any VM
/// can be captured, ending ([`BuiltinVm::capture`]) or going on
/// ([`BuiltinVm::capture`]).
fn wire(
    vm: &VmFd,
    mem: &Mem,
    dev: Box<dyn VirtioDevice>,
    irq: u32,
    base: u64,
    stop: &EventFd,
    state: Option<&crate::snapshot::TransportState>,
) -> Result<MmioTransport, Wired> {
    let irq_evt = EventFd::new(EFD_NONBLOCK).map_err(Wired::Io)?;
    vm.register_irqfd(&irq_evt, irq)
        .map_err(|e| Wired::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    let interrupt = Arc::new(Interrupt::new(irq_evt));
    let stop = stop.try_clone().map_err(Wired::Io)?;
    let t = match state {
        Some(state) => MmioTransport::restore_inactive(dev, mem.clone(), interrupt, stop, state)
            .map_err(Wired::Restore)?,
        None => {
            let mut t = MmioTransport::new(dev, mem.clone(), interrupt, stop).map_err(Wired::Io)?;
            t.enable_pause().map_err(Wired::Io)?;
            t
        }
    };
    for (q, evt) in t.notify_eventfds().iter().enumerate() {
        vm.register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
            .map_err(|e| Wired::Io(std::io::Error::from_raw_os_error(e.errno())))?;
    }
    Ok(t)
}

impl BuiltinVm {
    /// Signals every vCPU thread still running, to make it leave KVM_RUN.
    fn kick(&self) {
        for h in &self.vcpus {
            if !h.is_finished() {
                // SAFETY: the thread handle is alive (not joined yet); the
                // signal's handler does nothing but interrupt KVM_RUN.
                unsafe { libc::pthread_kill(h.as_pthread_t(), kick_signal()) };
            }
        }
    }

    /// Kicks the vCPU threads every 5 ms until all have finished, `tries`
    /// times at most (a thread leaving its loop sees the flag at its next
    /// exit; the signal makes that exit come).
    fn kick_until_finished(&self, tries: u32) {
        for _ in 0..tries {
            if self.vcpus.iter().all(|h| h.is_finished()) {
                break;
            }
            self.kick();
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// Stops the vCPUs: they see the flag at their next exit, and a signal
    /// makes sure that exit comes.
    fn join(&mut self) {
        self.kick_until_finished(200);
        for h in self.vcpus.drain(..) {
            let _ = h.join();
        }
    }

    /// How the VM ended, if it did. A forbidden system call of one of its
    /// threads ends it with that report, whatever else it ended on.
    fn exit(&self) -> Option<VmExit> {
        if let Some(detail) = crate::seccomp::violation() {
            let failed = VmExit::VmmFailed { code: 1, detail };
            self.control.finish(failed.clone());
            return Some(failed);
        }
        self.control
            .exit
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

/// How long a device's worker may take to park for a capture.
const DEVICE_PAUSE: Duration = Duration::from_secs(2);
/// How long the vCPUs may take to park, and then to hand their states
/// back.
const VCPU_PAUSE: Duration = Duration::from_secs(2);
/// How often the vCPUs are kicked while they are asked to park.
const KICK_EVERY: Duration = Duration::from_millis(5);

/// Lets the vCPUs go on when dropped, unless they were paused before the
/// capture (a paused VM stays paused).
struct Unpark {
    control: Arc<Control>,
    resume: bool,
}

impl Drop for Unpark {
    fn drop(&mut self) {
        if self.resume {
            self.control.set_paused(false);
        }
    }
}

impl BuiltinVm {
    /// Asks every vCPU to park and kicks them out of KVM_RUN until all
    /// have, for [`VCPU_PAUSE`] at most; false (the flag cleared) if they
    /// did not.
    fn park_vcpus(&self) -> bool {
        self.control.set_paused(true);
        let running =
            |vcpus: &[JoinHandle<VcpuFd>]| vcpus.iter().filter(|h| !h.is_finished()).count();
        let tries = VCPU_PAUSE.as_millis() / KICK_EVERY.as_millis();
        for _ in 0..tries {
            if self
                .control
                .parked
                .load(std::sync::atomic::Ordering::SeqCst)
                >= running(&self.vcpus)
            {
                return true;
            }
            self.kick();
            std::thread::sleep(KICK_EVERY);
        }
        self.control.set_paused(false);
        false
    }

    /// Parks each device's worker and captures its transport, in the
    /// bus's order; the workers stay parked until the guards are dropped
    /// (on an error, those parked so far are let go).
    fn capture_devices(&self) -> Result<(Vec<TransportState>, Vec<Paused>), VmmError> {
        let mut paused = Vec::new();
        let mut devices = Vec::new();
        for t in self.bus.transports() {
            let t = t.lock().unwrap_or_else(|e| e.into_inner());
            let name = format!("of type {}", t.device_type());
            let p = t
                .pause(DEVICE_PAUSE)
                .map_err(|e| VmmError::Capture(name.clone(), e))?;
            devices.push(t.capture(&p).map_err(|e| VmmError::Capture(name, e))?);
            paused.push(p);
        }
        Ok((devices, paused))
    }

    /// Parks the vCPUs (each capturing its own state, on its own thread,
    /// its last exit completed) and the devices' workers, captures the
    /// devices, the VM (irqchip, PIT, clock) and the serial port, and
    /// writes it all with the guest memory into `file`. Returns with the
    /// vCPUs and the workers still parked (their guards); on an error
    /// both go on again before it returns.
    fn capture_parked(
        &mut self,
        file: &File,
        path: &std::path::Path,
        header: Header,
    ) -> Result<(Unpark, Vec<Paused>), VmmError> {
        if let Some(e) = self.exit() {
            return Err(VmmError::Ended(e));
        }
        let resume = !self.control.is_paused();
        if !self.park_vcpus() {
            return Err(VmmError::VcpusBusy(VCPU_PAUSE));
        }
        let parked = Unpark {
            control: self.control.clone(),
            resume,
        };
        let vcpus = self
            .control
            .capture_parked(self.vcpus.len(), &self.plan, VCPU_PAUSE)
            .map_err(VmmError::CaptureVcpus)?;
        let (devices, paused) = self.capture_devices()?;
        let snapshot = Snapshot {
            header,
            vcpus,
            vm: VmState::capture(&self.vm, true, true)?,
            devices,
            serial: Some(self.bus.serial_state().into()),
        };
        snapshot.write_to(file, path, &self.mem)?;
        // A forbidden call of a worker, say, during the capture.
        if let Some(e) = self.exit() {
            return Err(VmmError::Ended(e));
        }
        Ok((parked, paused))
    }

    /// Captures the VM into `file` (new and empty; `path` names it in
    /// errors) with `header`, then, as `then` says, lets it go on (the
    /// guest continues where it was, as if paused and resumed; a VM
    /// paused before stays paused: a checkpoint that leaves the container
    /// running) or ends it while it is still parked, the guest running no
    /// further instruction (a template; a checkpoint that stops the
    /// container). On an error the VM goes on as it was, unless it ended
    /// ([`VmmError::Ended`]).
    ///
    /// The calling thread reads the VM-wide KVM state (irqchip, PIT,
    /// clock) and writes the file; the vCPUs read their own.
    pub fn capture(
        &mut self,
        file: &File,
        path: &std::path::Path,
        header: Header,
        then: AfterCapture,
    ) -> Result<(), VmmError> {
        let (parked, devices) = self.capture_parked(file, path, header)?;
        if then == AfterCapture::End {
            self.control.finish(VmExit::GuestStopped);
        }
        // Let go only now: the workers see the stop event, the vCPUs
        // leave their loops.
        drop(devices);
        drop(parked);
        Ok(())
    }

    /// Confines the calling thread, which waits for this VM (the VMM
    /// process's main thread, once the vCPUs and the spawner run: they
    /// would inherit its filter), to [`crate::seccomp::Kind::Main`]'s list.
    pub fn confine_waiter(&self) -> Result<(), seccompiler::Error> {
        use std::os::fd::AsRawFd;
        crate::seccomp::confine(crate::seccomp::Kind::Main, self.control.stop.as_raw_fd())
    }

    /// Waits for the VM to end, as [`Vm::wait`] does, also ending it on a
    /// forbidden system call of one of its threads (which stops its
    /// device workers, not its vCPUs): checked every `poll`.
    /// Waits up to `timeout` for `fd` to be readable (true) or the VM to
    /// stop (its stop event, which every device sees and none reads).
    pub fn wait_for_request(&self, fd: std::os::fd::BorrowedFd<'_>, timeout: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let mut pfds = [
            libc::pollfd {
                fd: fd.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: self.control.stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
        // SAFETY: poll reads and writes the two pollfds, which outlive the
        // call; both descriptors stay open for it.
        let n = unsafe { libc::poll(pfds.as_mut_ptr(), 2, ms) };
        n > 0 && pfds[0].revents != 0
    }

    pub fn wait_until_end(&mut self, poll: Duration) -> VmExit {
        loop {
            if let Some(e) = self.exit() {
                self.join();
                return e;
            }
            let exit = self.control.exit.lock().unwrap_or_else(|e| e.into_inner());
            if exit.is_none() {
                let _ = self
                    .control
                    .done
                    .wait_timeout(exit, poll)
                    .unwrap_or_else(|e| e.into_inner());
            }
        }
    }
}

impl Vm for BuiltinVm {
    fn pid(&self) -> u32 {
        std::process::id()
    }

    fn wait(&mut self) -> Result<VmExit, krun_hypervisor::Error> {
        let mut exit = self.control.exit.lock().unwrap_or_else(|e| e.into_inner());
        while exit.is_none() {
            exit = self
                .control
                .done
                .wait(exit)
                .unwrap_or_else(|e| e.into_inner());
        }
        let e = exit.clone().expect("checked above");
        drop(exit);
        self.join();
        Ok(e)
    }

    fn try_wait(&mut self) -> Result<Option<VmExit>, krun_hypervisor::Error> {
        match self.exit() {
            Some(e) => {
                self.join();
                Ok(Some(e))
            }
            None => Ok(None),
        }
    }

    fn kill(&mut self) {
        self.control.finish(VmExit::Killed {
            signal: libc::SIGKILL,
        });
        self.join();
    }

    fn pause(&mut self) -> Result<(), krun_hypervisor::Error> {
        // Returns once every vCPU is out of the guest and parked.
        if self.park_vcpus() {
            return Ok(());
        }
        Err(krun_hypervisor::Error::Control {
            what: "pause",
            source: std::io::Error::other("the vCPUs did not stop"),
        })
    }

    fn resume(&mut self) -> Result<(), krun_hypervisor::Error> {
        self.control.set_paused(false);
        Ok(())
    }
}

impl Drop for BuiltinVm {
    fn drop(&mut self) {
        self.control.finish(VmExit::Killed {
            signal: libc::SIGKILL,
        });
        self.join();
    }
}

/// virtio-fs keeps a file descriptor for every inode the guest holds (as
/// virtiofsd does): with the usual soft limit of 1024 a container creating
/// a thousand files failed with EMFILE. The VMM takes its hard limit, as
/// virtiofsd raises its own.
fn raise_open_file_limit() {
    let mut l = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit read or write one rlimit, which outlives
    // the calls.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut l) == 0 && l.rlim_cur < l.rlim_max {
            l.rlim_cur = l.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &l) != 0 {
                tracing::debug!("cannot raise RLIMIT_NOFILE to {}", l.rlim_max);
            }
        }
    }
}
