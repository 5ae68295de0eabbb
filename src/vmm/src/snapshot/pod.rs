//! KVM state structs stored as their bytes: the kernel's UAPI layout is
//! the stable format (Firecracker's kvm-bindings serde does the same), so
//! a snapshot never re-encodes them field by field. Reading bytes back
//! checks the length exactly; any bit pattern is a valid value.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    kvm_xsave,
};

/// A KVM UAPI struct that is plain bytes.
///
/// # Safety
///
/// Implementors are `repr(C)` structs made only of integers, arrays and
/// unions of integers, with every padding byte an explicit field (the
/// kernel's rule for its UAPI, which must look the same to 32- and 64-bit
/// callers): reading all `size_of` bytes reads no uninitialised padding,
/// and every bit pattern is a valid value.
pub unsafe trait Pod: Default {}

macro_rules! pod {
    ($($t:ty),* $(,)?) => {
        // SAFETY: each is a kernel UAPI struct of integers with explicit
        // padding fields (see the trait's contract).
        $(unsafe impl Pod for $t {})*
    };
}

pod!(
    kvm_regs,
    kvm_sregs,
    kvm_fpu,
    kvm_xsave,
    kvm_xcrs,
    kvm_lapic_state,
    kvm_vcpu_events,
    kvm_mp_state,
    kvm_debugregs,
    kvm_irqchip,
    kvm_pit_state2,
    kvm_clock_data,
    kvm_msr_entry,
    kvm_cpuid_entry2,
);

/// The bytes of `v`.
pub fn to_bytes<T: Pod>(v: &T) -> Vec<u8> {
    let mut out = vec![0u8; std::mem::size_of::<T>()];
    // SAFETY: `out` holds size_of::<T>() bytes and does not overlap `v`;
    // T has no implicit padding (Pod), so every byte read is initialised.
    unsafe {
        std::ptr::copy_nonoverlapping((v as *const T).cast::<u8>(), out.as_mut_ptr(), out.len())
    };
    out
}

/// A `T` from exactly `size_of::<T>()` bytes, or `None` for any other
/// length.
pub fn from_bytes<T: Pod>(bytes: &[u8]) -> Option<T> {
    if bytes.len() != std::mem::size_of::<T>() {
        return None;
    }
    let mut v = T::default();
    // SAFETY: `bytes` has exactly size_of::<T>() bytes; any bit pattern is
    // a valid T (Pod); the destination is a distinct local.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), (&mut v as *mut T).cast::<u8>(), bytes.len())
    };
    Some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bytes_round_trip_and_a_wrong_length_is_refused() {
        let r = kvm_regs {
            rip: 0x1234,
            rflags: 2,
            ..Default::default()
        };
        let b = to_bytes(&r);
        assert_eq!(b.len(), std::mem::size_of::<kvm_regs>());
        assert_eq!(from_bytes::<kvm_regs>(&b).unwrap().rip, 0x1234);
        assert!(from_bytes::<kvm_regs>(&b[1..]).is_none());
        assert!(from_bytes::<kvm_xsave>(&b).is_none());
    }
}
