//! Choosing between hardware virtualization (KVM) and emulation (TCG).

use std::fs::OpenOptions;
use std::path::Path;

/// How guest code is executed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    /// Hardware virtualization through /dev/kvm.
    Kvm,
    /// QEMU's software emulation: slow, but runs anywhere.
    Tcg,
}

/// The accelerator chosen for this host, and why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AccelChoice {
    pub accel: Accel,
    pub reason: String,
}

/// Detects whether this host's KVM can boot an ordinary Linux guest.
///
/// kvm-pvm (a paravirtual KVM for hosts without hardware virtualization)
/// provides /dev/kvm but only runs kernels built for PVM; ours is not, so
/// under kvm-pvm we emulate. This is decided by looking at the host, never
/// by trying a boot and waiting for it to fail.
pub fn detect_accel() -> AccelChoice {
    detect_accel_at(Path::new("/dev/kvm"), Path::new("/sys/module"))
}

fn detect_accel_at(kvm: &Path, modules: &Path) -> AccelChoice {
    let tcg = |reason: String| AccelChoice {
        accel: Accel::Tcg,
        reason,
    };
    if modules.join("kvm_pvm").exists() {
        return tcg("/dev/kvm is kvm-pvm, which cannot boot a non-PVM guest kernel".into());
    }
    match OpenOptions::new().read(true).write(true).open(kvm) {
        Ok(_) => AccelChoice {
            accel: Accel::Kvm,
            reason: format!("{} is usable", kvm.display()),
        },
        Err(e) => tcg(format!("{} is not usable: {e}", kvm.display())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pvm_means_tcg_even_with_dev_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, "").unwrap();
        let modules = dir.path().join("module");
        std::fs::create_dir_all(modules.join("kvm_pvm")).unwrap();
        let c = detect_accel_at(&kvm, &modules);
        assert_eq!(c.accel, Accel::Tcg);
        assert!(c.reason.contains("kvm-pvm"));
    }

    #[test]
    fn usable_kvm_without_pvm_is_kvm() {
        let dir = tempfile::tempdir().unwrap();
        let kvm = dir.path().join("kvm");
        std::fs::write(&kvm, "").unwrap();
        let c = detect_accel_at(&kvm, &dir.path().join("module"));
        assert_eq!(c.accel, Accel::Kvm);
    }

    #[test]
    fn missing_kvm_is_tcg() {
        let dir = tempfile::tempdir().unwrap();
        let c = detect_accel_at(&dir.path().join("nokvm"), &dir.path().join("module"));
        assert_eq!(c.accel, Accel::Tcg);
    }
}
