//! CPUID as the guest sees it: KVM's supported leaves with the APIC facts made
//! true for our userspace APIC (x2APIC, TSC-deadline, APIC IDs, topology, no PV APIC).

use kvm_bindings::CpuId;

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

/// Adjusts KVM's supported CPUID for vCPU with `apic_id` in a VM of `ncpus`.
pub fn configure(base: &CpuId, apic_id: u32, ncpus: u32) -> CpuId {
    let mut c = base.clone();
    let shift = id_bits(ncpus);
    for e in c.as_mut_slice() {
        match e.function {
            1 => {
                e.ecx |= ECX_X2APIC | ECX_TSC_DEADLINE | ECX_HYPERVISOR;
                e.edx |= EDX_APIC | EDX_HTT;
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

    #[test]
    fn id_bits_counts() {
        assert_eq!(id_bits(1), 0);
        assert_eq!(id_bits(2), 1);
        assert_eq!(id_bits(4), 2);
        assert_eq!(id_bits(5), 3);
        assert_eq!(id_bits(16), 4);
    }
}
