//! CPUID as the guest sees it, derived from the vCPU's `LapicConfig` so the two can
//! never disagree: x2APIC, TSC-deadline, the APIC bit, APIC IDs, topology, no PV APIC.

use kvm_bindings::CpuId;
use vlapic::{ApicMode, LapicConfig};

/// CPUID.1:ECX x2APIC.
const ECX_X2APIC: u32 = 1 << 21;
/// CPUID.1:ECX TSC-deadline.
const ECX_TSC_DEADLINE: u32 = 1 << 24;
/// CPUID.1:ECX hypervisor present.
const ECX_HYPERVISOR: u32 = 1 << 31;
/// CPUID.1:EDX on-chip APIC.
const EDX_APIC: u32 = 1 << 9;
/// CPUID.1:EDX HTT (the logical-processor count in EBX is valid).
const EDX_HTT: u32 = 1 << 28;
/// CPUID.6:EAX ARAT: the APIC timer runs in every C-state.
const EAX_ARAT: u32 = 1 << 2;
/// KVM PV feature bits kept (clocksource, NOP I/O delay, clocksource2, stable bit);
/// PV EOI, PV unhalt, PV IPI, PV TLB flush, async PF and the like need KVM's APIC.
const KVM_PV_KEEP: u32 = (1 << 0) | (1 << 1) | (1 << 3) | (1 << 24);

/// Number of bits needed to number `n` logical processors.
fn id_bits(n: u32) -> u32 {
    32 - n.saturating_sub(1).leading_zeros()
}

/// Sets or clears `bit` in `reg`.
fn set(reg: &mut u32, bit: u32, on: bool) {
    if on {
        *reg |= bit;
    } else {
        *reg &= !bit;
    }
}

/// Adjusts KVM's supported CPUID (`KVM_GET_SUPPORTED_CPUID`) for the vCPU whose APIC
/// is built from `apic`, in a VM of `ncpus` vCPUs: CPUID.1:ECX x2APIC (bit 21) and
/// TSC-deadline (bit 24) exactly as `apic` offers them, CPUID.1:EDX.APIC (bit 9) set
/// unless the APIC starts hardware-disabled, the initial APIC ID in `CPUID.1:EBX[31:24]`,
/// leaves 0xB/0x1F and 0x8000001E, ARAT, and only the KVM paravirtual features that
/// work without KVM's in-kernel APIC.
pub fn configure(base: &CpuId, apic: &LapicConfig, ncpus: u32) -> CpuId {
    let mut c = base.clone();
    let apic_id = apic.apic_id;
    let shift = id_bits(ncpus);
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                set(&mut e.ecx, ECX_X2APIC, apic.x2apic);
                set(&mut e.ecx, ECX_TSC_DEADLINE, apic.tsc_deadline);
                e.ecx |= ECX_HYPERVISOR;
                set(&mut e.edx, EDX_APIC, apic.mode != ApicMode::Disabled);
                e.edx |= EDX_HTT;
                e.ebx = (e.ebx & 0xFFFF) | ((ncpus.min(255)) << 16) | ((apic_id & 0xFF) << 24);
            }
            6 => e.eax |= EAX_ARAT,
            0xB | 0x1F => {
                e.edx = apic_id;
                match e.index {
                    0 => {
                        e.eax = 0;
                        e.ebx = 1;
                        e.ecx = 1 << 8;
                    }
                    1 => {
                        e.eax = shift;
                        e.ebx = ncpus;
                        e.ecx = (2 << 8) | 1;
                    }
                    i => {
                        e.eax = 0;
                        e.ebx = 0;
                        e.ecx = i;
                    }
                }
            }
            0x4000_0001 => e.eax &= KVM_PV_KEEP,
            0x8000_001E => e.eax = apic_id,
            _ => {}
        }
    }
    c
}

#[cfg(test)]
mod tests {
    use super::*;

    fn leaf1(apic: &LapicConfig) -> (u32, u32, u32) {
        let mut base = CpuId::new(1).expect("one entry");
        if let Some(e) = base.as_mut_slice().first_mut() {
            e.function = 1;
            e.ecx = ECX_X2APIC | ECX_TSC_DEADLINE;
        }
        let c = configure(&base, apic, 4);
        let e = c.as_slice().first().copied().expect("leaf 1");
        (e.ebx, e.ecx, e.edx)
    }

    /// CPUID.1 follows the LapicConfig (SDM Vol. 3A §11.4.1 APIC bit, §11.12.1 x2APIC,
    /// §11.5.4.1 TSC-deadline): what the APIC refuses is never advertised.
    #[test]
    fn leaf1_follows_the_config() {
        let mut a = LapicConfig::with_id(3);
        let (ebx, ecx, edx) = leaf1(&a);
        assert_eq!(ebx >> 24, 3);
        assert_ne!(ecx & ECX_X2APIC, 0);
        assert_ne!(ecx & ECX_TSC_DEADLINE, 0);
        assert_ne!(edx & EDX_APIC, 0);
        a.x2apic = false;
        a.tsc_deadline = false;
        a.mode = ApicMode::Disabled;
        let (_, ecx, edx) = leaf1(&a);
        assert_eq!(ecx & (ECX_X2APIC | ECX_TSC_DEADLINE), 0);
        assert_eq!(edx & EDX_APIC, 0);
    }

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(16), 4);
    }
}
