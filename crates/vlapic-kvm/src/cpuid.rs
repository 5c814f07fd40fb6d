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

/// CPUID.1:ECX CMPXCHG16B.
pub const ECX_CX16: u32 = 1 << 13;
/// CPUID.1:ECX POPCNT (Linux patches `popcnt` into `hweight*()` when it is offered).
pub const ECX_POPCNT: u32 = 1 << 23;
/// CPUID.1:ECX XSAVE, OSXSAVE, AVX, FMA and F16C (the last three need XSAVE-managed
/// state: SDM Vol. 1 §14.3).
pub const ECX_XSAVE_FAMILY: u32 = (1 << 26) | (1 << 27) | (1 << 28) | (1 << 12) | (1 << 29);
/// CPUID.7.0:EBX AVX2 (5) and the AVX-512 bits (16, 17, 21, 26–28, 30, 31).
const EBX7_AVX: u32 =
    (1 << 5) | (1 << 16) | (1 << 17) | (1 << 21) | (7 << 26) | (1 << 30) | (1 << 31);
/// CPUID.7.0:EBX SMAP (Linux puts `clac`/`stac` on every kernel entry and user access
/// when it is offered; the emulator stopped on `clac` at `asm_sysvec_apic_timer_interrupt`).
pub const EBX7_SMAP: u32 = 1 << 20;

/// Hides what the host's instruction emulator cannot run when it executes guest
/// kernel code itself (nested KVM such as `kvm_pvm`, see
/// `/work/shared/reference/kvm-userspace-irqchip.md` §7–8): `CMPXCHG16B` (CX16) and
/// the XSAVE family (`XRSTOR`), with everything that needs XSAVE-managed state (AVX,
/// AVX2, AVX-512, FMA, F16C, leaf 0xD), SMAP (`clac`/`stac`), and `POPCNT` (Debian's 6.1 kernel stopped on
/// it in `hweight64` here, KVM internal error with bytes `f3 48 0f b8 c7`). A guest
/// such as Linux then uses `CMPXCHG8B` paths, FXSAVE/FXRSTOR and software popcount.
/// Leaves absent from `cpuid` stay absent. Caveat, probed on `kvm_pvm`: that KVM shows
/// the guest the hardware's CPUID.1:ECX POPCNT/XSAVE/OSXSAVE/AVX bits whatever
/// `KVM_SET_CPUID2` says (CX16 it honours), so a Linux guest there also needs
/// `noxsave clearcpuid=popcnt,smap` on its command line.
pub fn hide_unemulated(cpuid: &mut CpuId) {
    for e in cpuid.as_mut_slice() {
        match (e.function, e.index) {
            (1, _) => e.ecx &= !(ECX_CX16 | ECX_POPCNT | ECX_XSAVE_FAMILY),
            (7, 0) => e.ebx &= !(EBX7_AVX | EBX7_SMAP),
            (0xD, _) => {
                e.eax = 0;
                e.ebx = 0;
                e.ecx = 0;
                e.edx = 0;
            }
            _ => {}
        }
    }
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

    /// CX16 (CPUID.1:ECX[13]), POPCNT (bit 23) and XSAVE (bit 26, SDM Vol. 2A CPUID
    /// Table 3-10) and what depends on it go; x2APIC, TSC-deadline and SSE4.2 stay.
    #[test]
    fn hide_unemulated_clears_cx16_and_the_xsave_family_only() {
        let mut c = CpuId::new(3).expect("three entries");
        let keep = ECX_X2APIC | ECX_TSC_DEADLINE | (1 << 20);
        if let [a, b, d] = c.as_mut_slice() {
            a.function = 1;
            a.ecx = keep | ECX_CX16 | ECX_POPCNT | ECX_XSAVE_FAMILY;
            b.function = 7;
            b.ebx = EBX7_AVX | EBX7_SMAP | 1; // FSGSBASE (bit 0) stays
            d.function = 0xD;
            d.eax = 7;
            d.ebx = 0x340;
        }
        hide_unemulated(&mut c);
        let s = c.as_slice();
        assert_eq!(s[0].ecx, keep);
        assert_eq!(s[1].ebx, 1);
        assert_eq!((s[2].eax, s[2].ebx), (0, 0));
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
