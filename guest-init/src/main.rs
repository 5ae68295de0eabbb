//! guest-init: PID 1 of every krun-oci VM, and the whole of its initramfs.
//!
//! It mounts what it needs, opens the control port, says hello to the host,
//! and then serves the host's requests ([`krun_proto::ToGuest`]): it sets
//! up the container from the bundle's config, execs the workload when told
//! to start, relays stdio, forwards signals and reports how each process
//! ended. Whatever goes wrong, it reports and powers the VM off: it never
//! leaves a guest hanging.
//!
//! Unsafe code is denied here and allowed in [`sys`] alone, the one module
//! that makes raw system calls.

#![deny(unsafe_code)]

mod agent;
mod boot;
mod container;
mod failure;
mod mounts;
mod net;
mod process;
#[allow(unsafe_code)]
mod sys;

fn main() {
    let started = sys::boottime_ns();
    if std::process::id() != 1 {
        eprintln!(
            "krun-guest-init runs as PID 1 of a krun-oci VM; it is not meant to be started by hand"
        );
        std::process::exit(2);
    }
    if let Err(e) = run(started) {
        sys::console(&format!("fatal: {e:#}"));
    }
    sys::power_off();
}

fn run(started: u64) -> anyhow::Result<()> {
    boot::mount_basics()?;
    let port = boot::open_control_port(krun_proto::CONTROL_PORT_NAME)?;
    agent::Agent::new(port, started)?.run()
}
