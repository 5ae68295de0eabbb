//! Choosing the hypervisor backend: the built-in VMM wherever KVM can boot
//! our kernel, QEMU (with KVM, or TCG emulation) otherwise or on request.

use krun_hypervisor::{detect_accel, Accel, Hypervisor, Qemu};
use krun_vmm::Builtin;

use crate::assets::{AssetError, Assets};
use crate::plan::HypervisorKind;

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the built-in VMM needs a KVM that can boot a Linux guest, and this host has none ({0}); use --hypervisor qemu")]
    NoKvm(String),
    #[error(transparent)]
    Asset(#[from] AssetError),
}

/// The backend for a container: `requested` (flag or annotation) if given,
/// else the built-in VMM when KVM is usable, else QEMU with TCG.
pub fn choose(
    requested: Option<HypervisorKind>,
    assets: &Assets,
) -> Result<Box<dyn Hypervisor>, BackendError> {
    let accel = detect_accel();
    let kind = requested.unwrap_or(if accel.accel == Accel::Kvm {
        HypervisorKind::Builtin
    } else {
        HypervisorKind::Qemu
    });
    tracing::debug!(backend = ?kind, accel = ?accel.accel, reason = %accel.reason, "hypervisor chosen");
    Ok(match kind {
        HypervisorKind::Builtin if accel.accel != Accel::Kvm => {
            return Err(BackendError::NoKvm(accel.reason))
        }
        HypervisorKind::Builtin => Box::new(Builtin),
        HypervisorKind::Qemu => Box::new(Qemu {
            qemu: assets.qemu()?,
            virtiofsd: assets.virtiofsd()?,
            accel: accel.accel,
        }),
    })
}
