//! containerd-shim-krun-v2: krun-oci for containerd (runtime type
//! `io.containerd.krun.v2`).
//!
//! containerd starts one shim per task — or per pod, grouped by the CRI's
//! sandbox id — and drives it over ttrpc with the Task API. The shim runs
//! each container's VM in-process, through the same monitor library the
//! `krun-oci` CLI uses: it never shells out to the CLI.

mod pod;
mod rootfs;
mod rpc;
mod service;
mod task;

fn main() {
    // The built-in VMM's own process (krun_vmm::process), started by this
    // shim: confined by its starter, before anything else of the shim.
    if krun_vmm::process::is_vmm(std::env::args_os().nth(1).as_deref()) {
        krun_vmm::process::main();
    }
    // Every shim process (`start`, the daemon it starts, `delete`) is
    // confined before its first thread: no_new_privs, the deny-list, and
    // the monitor's capabilities (the daemon runs monitors on its threads,
    // starts the built-in VMM's process with the file server's, and mounts,
    // joins network namespaces and cgroups for them): see
    // krun_hypervisor's `confine` module.
    let confined =
        krun_hypervisor::Confinement::monitor().and_then(|c| krun_hypervisor::confine_self(&c));
    if let Err(e) = confined {
        eprintln!("containerd-shim-krun-v2: cannot confine the shim: {e}");
        std::process::exit(1);
    }
    let config = containerd_shim::Config {
        // The shim reaps its own children (the VMM processes of the QEMU
        // backend) with their handles; a blanket reaper would steal their
        // exit statuses. No container process runs on the host, so there is
        // nothing for a subreaper to adopt.
        no_reaper: true,
        no_sub_reaper: true,
        ..Default::default()
    };
    containerd_shim::run::<service::Service>(service::RUNTIME_ID, Some(config));
}
