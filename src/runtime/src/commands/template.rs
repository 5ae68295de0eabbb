//! `krun-oci template build`: a VM template made ahead of a container's
//! first start; `template list` and `template prune`: what the template
//! directory holds, and removing what no start will use again (see
//! [`crate::template`]).

use crate::assets::Assets;
use crate::error::{Error, Result};
use crate::plan::HypervisorKind;
use crate::template::{self, Shape};

/// Builds (or finds and verifies) the template of a VM of `vcpus`,
/// `memory_mib` and `nets` network cards, and prints its path.
pub fn build(vcpus: u32, memory_mib: u64, nets: usize) -> Result<i32> {
    if nets > 1 {
        return Err(Error::Invalid(format!(
            "--nets {nets}: a container's VM carries at most one network card"
        )));
    }
    if vcpus == 0 || vcpus > 254 {
        return Err(Error::Invalid(format!(
            "--vcpus {vcpus}: a VM has 1 to 254 vCPUs"
        )));
    }
    if memory_mib < 64 {
        return Err(Error::Invalid(format!(
            "--memory-mib {memory_mib}: a VM needs at least 64 MiB"
        )));
    }
    let accel = krun_hypervisor::detect_accel();
    if accel.accel != krun_hypervisor::Accel::Kvm {
        return Err(Error::Unsupported(format!(
            "VM templates are the built-in VMM's, which needs a KVM that can boot a Linux \
             guest, and this host has none ({}): the QEMU backend boots every VM cold",
            accel.reason
        )));
    }
    let assets = Assets::find()?;
    let hv = crate::backend::choose(Some(HypervisorKind::Builtin), true, &assets)?;
    let shape = Shape {
        vcpus,
        memory_mib,
        cmdline: crate::session::CMDLINE.into(),
        nets,
    };
    let t = template::obtain(hv.as_ref(), &shape, &assets)
        .map_err(|e| Error::Failed(format!("building the VM template: {}", template::chain(&e))))?;
    println!(
        "{} ({})",
        template::dir().join(format!("{}.snap", t.key)).display(),
        if t.built { "built" } else { "already there" }
    );
    Ok(0)
}

/// Prints the templates, as a table or as JSON.
pub fn list(format: &str) -> Result<i32> {
    let all = template::list(&template::dir());
    if format == "json" {
        println!(
            "{}",
            serde_json::to_string_pretty(&all).expect("the list serializes")
        );
        return Ok(0);
    }
    println!(
        "{:<32}  {:>5}  {:>10}  {:>4}  {:>10}  STANDING",
        "KEY", "VCPUS", "MEMORY", "NETS", "ON DISK"
    );
    for t in &all {
        let (vcpus, memory, nets) = match &t.inputs {
            Some(i) => (
                i.shape.vcpus.to_string(),
                format!("{} MiB", i.shape.memory_mib),
                i.shape.nets.to_string(),
            ),
            None => ("?".into(), "?".into(), "?".into()),
        };
        let standing = match &t.standing {
            template::Standing::Current => "current".to_string(),
            template::Standing::Stale(why) => format!("stale: {why}"),
        };
        println!(
            "{:<32}  {:>5}  {:>10}  {:>4}  {:>6} MiB  {standing}",
            t.key,
            vcpus,
            memory,
            nets,
            t.disk_bytes >> 20
        );
    }
    Ok(0)
}

/// Removes the stale templates (every one with `all`), printing the key
/// of each removed.
pub fn prune(all: bool) -> Result<i32> {
    let dir = template::dir();
    if !dir.exists() {
        return Ok(0);
    }
    // Removing files is for a directory only root reaches, as a build
    // made it.
    template::check_dir(&dir).map_err(|e| Error::Invalid(template::chain(&e)))?;
    for t in template::prune(&dir, all, None) {
        println!("{}", t.key);
    }
    Ok(0)
}
