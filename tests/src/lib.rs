//! krun-e2e: the harness for the end-to-end tests of krun-oci, which boot
//! real microVMs with the binaries `hack/build` puts in target/dist.
//!
//! Every test gets a sandbox: its own state root, bundle folder and guest
//! console copies, a hard timeout on each run, and a check afterwards that
//! nothing of the container is left (state, processes, mounts). When the
//! VM assets or the binaries are missing or stale the tests fail with a
//! message saying how to get them; they never skip.
//!
//! The pieces: [`sandbox`] (a test's folder and krun-oci run in it),
//! [`cgroups`] (where host tasks are in the host's cgroups),
//! [`bundle`] (a busybox rootfs and its config), [`dist`] (the binaries and
//! VM assets under test), [`process`] (host processes and deadlines),
//! [`lifecycle`] (the runtime-spec lifecycle by hand), [`podman`] (a
//! private podman store), [`containerd`] (a private containerd and `ctr`),
//! [`cri`] (a CRI client) and [`systemd`] (a real systemd in namespaces of
//! its own, for `--systemd-cgroup`). The suites are this crate's test targets
//! (tests/*.rs); `src/bin/cri-pod-start.rs` is a benchmark tool over the
//! CRI client.

pub mod bundle;
pub mod cgroups;
pub mod containerd;
pub mod cri;
pub mod dist;
pub mod lifecycle;
pub mod podman;
pub mod process;
pub mod sandbox;
pub mod systemd;

// What the suites use most, at the top, as `harness::NAME`.
pub use bundle::{base_config, make_busybox_rootfs, HostVolumes, TestBundle};
pub use dist::{dist, fusehello, krun_oci_bin, libdir, netperf, shim_bin, workspace};
pub use process::{join_within, pipe_holders, pipe_inode, processes_mentioning, wait_timeout};
pub use sandbox::{
    hypervisor, krun_oci, run_with_timeout, spawn_run, Output, Sandbox, RUN_TIMEOUT,
};
