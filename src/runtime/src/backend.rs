//! Choosing the hypervisor backend: the built-in VMM wherever KVM can boot
//! our kernel, QEMU (with KVM, or TCG emulation) otherwise or on request.

use krun_hypervisor::{detect_accel, Accel, Hypervisor, Qemu};
use krun_vmm::Builtin;

use crate::assets::{AssetError, Assets};
use crate::plan::{HypervisorKind, ANNOTATION_REQUIRE_KVM};

#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    #[error("the built-in VMM needs a KVM that can boot a Linux guest, and this host has none ({0}); use --hypervisor qemu")]
    NoKvm(String),
    #[error("hardware isolation is required (--require-kvm or annotation {ANNOTATION_REQUIRE_KVM}), but this host's KVM cannot boot the guest ({0}); krun-oci does not fall back to TCG emulation, which is not a security boundary")]
    NoHardwareIsolation(String),
    #[error(transparent)]
    Asset(#[from] AssetError),
}

/// The backend for a container: `requested` (flag or annotation) if given,
/// else the built-in VMM when KVM is usable, else QEMU with TCG — which
/// is said loudly, since an emulator is not a security boundary (QEMU's
/// own security policy covers KVM guests only), and refused when
/// `require_kvm`.
pub fn choose(
    requested: Option<HypervisorKind>,
    require_kvm: bool,
    assets: &Assets,
) -> Result<Box<dyn Hypervisor>, BackendError> {
    let accel = detect_accel();
    if accel.accel != Accel::Kvm {
        if require_kvm {
            return Err(BackendError::NoHardwareIsolation(accel.reason));
        }
        tracing::warn!(
            target: crate::logging::FILE_ONLY,
            reason = %accel.reason,
            "no usable KVM: the VM runs under TCG emulation, which is not a security boundary \
             (use --require-kvm or annotation {ANNOTATION_REQUIRE_KVM}=true to refuse instead)"
        );
    }
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
