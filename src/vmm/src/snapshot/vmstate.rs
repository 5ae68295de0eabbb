//! The VM-wide KVM state: the in-kernel irqchip (both PICs and the
//! IOAPIC), the PIT, and the KVM clock.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_state2, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{Cap, VmFd};
use serde::{Deserialize, Serialize};

use super::pod::{from_bytes, to_bytes, Pod};
use super::SnapshotError;

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SnapshotError {
    move |source| SnapshotError::Kvm { what, source }
}

const CHIPS: [(u32, &str); 3] = [
    (KVM_IRQCHIP_PIC_MASTER, "the master PIC"),
    (KVM_IRQCHIP_PIC_SLAVE, "the slave PIC"),
    (KVM_IRQCHIP_IOAPIC, "the IOAPIC"),
];

/// The VM's state; each part only if the VM has it. Restore it into a
/// new VM that has the same parts created (KVM_CREATE_IRQCHIP,
/// KVM_CREATE_PIT2), before its vCPUs are restored and long before they
/// run: the KVM clock must be set before a vCPU reads it.
///
/// The clock is restored to its captured value: the guest sees no time
/// pass while it was saved. Setting the guest's wall clock to now is the
/// template manager's job (over the control channel), not this one's.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct VmState {
    /// The master PIC, the slave PIC and the IOAPIC (kvm_irqchip each).
    pub irqchip: Option<[Vec<u8>; 3]>,
    pub pit: Option<Vec<u8>>,
    pub clock: Option<Vec<u8>>,
}

fn blob<T: Pod>(bytes: &[u8], what: &str) -> Result<T, SnapshotError> {
    from_bytes(bytes).ok_or_else(|| SnapshotError::Invalid {
        what: format!(
            "{what}: {} bytes, KVM's struct has {}",
            bytes.len(),
            std::mem::size_of::<T>()
        ),
    })
}

impl VmState {
    /// Captures the state of `vm`, whose vCPUs are all paused. `irqchip`
    /// and `pit` say what the VM was built with.
    pub fn capture(vm: &VmFd, irqchip: bool, pit: bool) -> Result<VmState, SnapshotError> {
        let clock = if vm.check_extension(Cap::AdjustClock) {
            Some(to_bytes(
                &vm.get_clock().map_err(kvm("reading the KVM clock"))?,
            ))
        } else {
            None
        };
        let irqchip = if irqchip {
            let mut chips: [Vec<u8>; 3] = Default::default();
            for (out, (id, what)) in chips.iter_mut().zip(CHIPS) {
                let mut chip = kvm_irqchip {
                    chip_id: id,
                    ..Default::default()
                };
                vm.get_irqchip(&mut chip)
                    .map_err(|source| SnapshotError::Kvm { what, source })?;
                *out = to_bytes(&chip);
            }
            Some(chips)
        } else {
            None
        };
        let pit = if pit {
            Some(to_bytes(&vm.get_pit2().map_err(kvm("reading the PIT"))?))
        } else {
            None
        };
        Ok(VmState {
            irqchip,
            pit,
            clock,
        })
    }

    /// Checks every length, and that each irqchip entry is the chip it
    /// stands for.
    pub fn validate(&self) -> Result<(), SnapshotError> {
        if let Some(chips) = &self.irqchip {
            for (bytes, (id, what)) in chips.iter().zip(CHIPS) {
                let chip: kvm_irqchip = blob(bytes, what)?;
                if chip.chip_id != id {
                    return Err(SnapshotError::Invalid {
                        what: format!("{what}: chip id {}", chip.chip_id),
                    });
                }
            }
        }
        if let Some(pit) = &self.pit {
            blob::<kvm_pit_state2>(pit, "the PIT")?;
        }
        if let Some(clock) = &self.clock {
            blob::<kvm_clock_data>(clock, "the KVM clock")?;
        }
        Ok(())
    }

    /// Restores into `vm`: irqchip, PIT, then the clock. The VM must have
    /// the irqchip and the PIT created if the state has them.
    pub fn restore(&self, vm: &VmFd) -> Result<(), SnapshotError> {
        self.validate()?;
        if let Some(chips) = &self.irqchip {
            for (bytes, (_, what)) in chips.iter().zip(CHIPS) {
                vm.set_irqchip(&blob(bytes, what)?)
                    .map_err(|source| SnapshotError::Kvm { what, source })?;
            }
        }
        if let Some(pit) = &self.pit {
            vm.set_pit2(&blob(pit, "the PIT")?)
                .map_err(kvm("setting the PIT"))?;
        }
        if let Some(clock) = &self.clock {
            let mut clock: kvm_clock_data = blob(clock, "the KVM clock")?;
            // KVM_GET_CLOCK reports flags (TSC_STABLE, REALTIME, HOST_TSC)
            // that KVM_SET_CLOCK would read as requests: set the bare
            // clock value.
            clock.flags = 0;
            vm.set_clock(&clock).map_err(kvm("setting the KVM clock"))?;
        }
        Ok(())
    }
}
