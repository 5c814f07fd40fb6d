//! Helpers shared by the integration tests: building APICs in a known state.
#![allow(dead_code)]

use vlapic::{ApicMode, LapicConfig, LocalApic};

pub const SVR: u64 = 0xF0;
pub const TPR: u64 = 0x80;
pub const PPR: u64 = 0xA0;
pub const EOI: u64 = 0xB0;
pub const ESR: u64 = 0x280;
pub const ICR_LO: u64 = 0x300;
pub const ICR_HI: u64 = 0x310;
pub const LVT_TIMER: u64 = 0x320;
pub const LVT_LINT0: u64 = 0x350;
pub const LVT_LINT1: u64 = 0x360;
pub const LVT_ERROR: u64 = 0x370;
pub const TMICT: u64 = 0x380;
pub const TMCCT: u64 = 0x390;
pub const TDCR: u64 = 0x3E0;

/// A software-enabled xAPIC with the verifier on.
pub fn xapic() -> LocalApic {
    xapic_with(LapicConfig::default().with_verify(true))
}

pub fn xapic_with(cfg: LapicConfig) -> LocalApic {
    let mut a = LocalApic::new(cfg);
    let _ = a.write_register(SVR, 0x1FF, 0);
    a
}

/// A software-enabled x2APIC with the given initial ID and the verifier on.
pub fn x2apic(id: u32) -> LocalApic {
    let mut a = LocalApic::new(
        LapicConfig::default()
            .with_apic_id(id)
            .with_mode(ApicMode::X2Apic)
            .with_verify(true),
    );
    let _ = a.write_msr(0x80F, 0x1FF, 0).unwrap();
    a
}

/// Reads ESR the way software must: write, then read (SDM §11.5.3).
pub fn latch_esr(a: &mut LocalApic) -> u32 {
    let _ = a.write_register(ESR, 0, a.now());
    a.read_register(ESR, a.now())
}
