//! KVM's `struct kvm_lapic_state` (`KVM_GET_LAPIC`/`KVM_SET_LAPIC`): the first
//! 1 KiB of the APIC page, plus IA32_APIC_BASE and IA32_TSC_DEADLINE kept outside.
//!
//! Each register owns a 16-byte slot at its xAPIC offset; its 32-bit value is in
//! bytes 0–3 (little-endian) and bytes 4–15 are reserved (ignored on decode, zero
//! on encode). Conventions:
//!
//! * ID (0x20): xAPIC and disabled mode `id << 24` (bits 23:0 must be 0); x2APIC
//!   mode the full 32-bit ID — KVM's `KVM_X2APIC_API_USE_32BIT_IDS` convention.
//! * LDR (0xD0): in x2APIC mode the derived value.
//! * ICR: low half at 0x300, high half at 0x310, in both modes.
//! * PPR (0xA0) is written on encode and ignored on decode (KVM recomputes it);
//!   EOI, RRD and SELF IPI are written as 0 and ignored.
//! * TMCCT (0x390) carries the current count at the caller's `now`, as KVM's GET
//!   does; decode re-arms the timer `TMCCT` ticks after `now`, clamped to TMICT
//!   (KVM's SET behaviour). An expiry already due at `now` is encoded as 1 so it is
//!   not lost. In TSC-deadline mode TMCCT is 0 and the expiry is derived from
//!   IA32_TSC_DEADLINE.
//! * ESR pending bits have no place in the page: encode drops them, decode yields 0.
//! * LVT CMCI (0x2F0) exists only if the version register announces 7 LVT entries
//!   (max LVT 6). KVM leaves the slot 0 for a vCPU without CMCI (no
//!   `KVM_X86_SETUP_MCE` with `MCG_CMCI_P`: `nr_lvt_entries` is 6 and nothing ever
//!   writes the register), so decode reads an absent CMCI entry as its reset value
//!   (masked), which is what an APIC without CMCI holds; encode writes it as stored.
//! * IRR vectors 0–15: KVM's in-kernel APIC accepts a fixed IPI (self IPI included)
//!   with an illegal vector into IRR (`__apic_accept_irq` does not check it), where a
//!   real APIC refuses it and sets ESR "send/receive illegal vector" (SDM §11.5.3).
//!   Decode drops such bits (the interrupt a real APIC would never have accepted), so
//!   every page KVM produces imports; found by the KVM oracle test
//!   (`crates/vlapic-vmm/tests/kvm_format_oracle.rs`).
//! * LVT timer mode 11 (reserved): KVM stores a guest's write of it (its LVTT mask
//!   keeps bits 18:17) and runs the timer as one-shot (`apic_update_lvtt`: neither
//!   periodic nor TSC-deadline). Decode reads it as one-shot (mode 00), the behaviour
//!   the guest had; found by the same test.

use crate::lapic::ApicMode;
use crate::lvt::{Lvt, TimerMode};
use crate::state::error::{DecodeError, Field};
use crate::state::lapic::LapicState;
use crate::state::wire::{le_u32, put};
use crate::timer::{divisor, TimerClock};

/// Size of `struct kvm_lapic_state` (`KVM_APIC_REG_SIZE`).
pub const PAGE_SIZE: usize = 0x400;

/// What `KVM_GET_LAPIC` leaves out: IA32_APIC_BASE (saved with the special
/// registers) and IA32_TSC_DEADLINE (saved with the MSRs).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct KvmExtra {
    /// IA32_APIC_BASE.
    pub apic_base: u64,
    /// IA32_TSC_DEADLINE.
    pub tsc_deadline: u64,
}

impl Default for KvmExtra {
    /// An enabled xAPIC BSP at the default base, no TSC deadline.
    fn default() -> Self {
        Self {
            apic_base: crate::regs::DEFAULT_APIC_BASE
                | crate::regs::APIC_BASE_EN
                | crate::regs::APIC_BASE_BSP,
            tsc_deadline: 0,
        }
    }
}

const LVT_OFFSETS: [usize; 7] = [0x2F0, 0x320, 0x330, 0x340, 0x350, 0x360, 0x370];

/// Byte offset of `field` in the page (`None` for the fields kept outside it).
pub fn field_offset(field: Field) -> Option<usize> {
    Some(match field {
        Field::ApicBase | Field::EsrPending | Field::TscDeadline => return None,
        Field::Id => 0x20,
        Field::Version => 0x30,
        Field::Tpr => 0x80,
        Field::Apr => 0x90,
        Field::Ldr => 0xD0,
        Field::Dfr => 0xE0,
        Field::Svr => 0xF0,
        Field::Isr => 0x100,
        Field::Tmr => 0x180,
        Field::Irr => 0x200,
        Field::Esr => 0x280,
        Field::Icr => 0x300,
        Field::Lvt(e) => LVT_OFFSETS.get(e.index()).copied().unwrap_or(0x320),
        Field::TimerInitial => 0x380,
        Field::TimerDeadline => 0x390,
        Field::TimerDivide => 0x3E0,
    })
}

fn tick_ns(dcr: u32, clock: &TimerClock) -> u64 {
    divisor(dcr).saturating_mul(u64::from(clock.bus_cycle_ns.max(1)))
}

/// The current count a state implies at `now` (what TMCCT reads).
pub fn current_count(state: &LapicState, now: u64, clock: &TimerClock) -> u32 {
    if state.timer_mode() == Some(TimerMode::TscDeadline) || state.timer_deadline == 0 {
        return 0;
    }
    let remaining = state.timer_deadline.saturating_sub(now);
    let tick = tick_ns(state.timer_divide, clock).max(1);
    let ticks = remaining.div_ceil(tick);
    let count = u32::try_from(ticks)
        .unwrap_or(u32::MAX)
        .min(state.timer_initial);
    if count == 0 && state.timer_initial != 0 {
        1 // armed and due: keep the expiry
    } else {
        count
    }
}

/// Encodes a state as a KVM page at VM time `now`; the APIC base and TSC deadline
/// are returned alongside.
pub fn encode(state: &LapicState, now: u64, clock: &TimerClock) -> ([u8; PAGE_SIZE], KvmExtra) {
    let mut page = [0u8; PAGE_SIZE];
    let mut w = |off: usize, v: u32| put(&mut page, off, &v.to_le_bytes());
    let x2 = state.mode() == Some(ApicMode::X2Apic);
    w(0x20, if x2 { state.id } else { state.id << 24 });
    w(0x30, state.version);
    w(0x80, state.tpr);
    w(0x90, state.apr);
    w(0xA0, u32::from(state.ppr()));
    w(0xD0, state.ldr);
    w(0xE0, state.dfr);
    w(0xF0, state.svr);
    for i in 0..8usize {
        let off = i.saturating_mul(0x10);
        w(
            off.saturating_add(0x100),
            state.isr.get(i).copied().unwrap_or(0),
        );
        w(
            off.saturating_add(0x180),
            state.tmr.get(i).copied().unwrap_or(0),
        );
        w(
            off.saturating_add(0x200),
            state.irr.get(i).copied().unwrap_or(0),
        );
    }
    w(0x280, state.esr);
    w(0x300, state.icr as u32);
    w(0x310, (state.icr >> 32) as u32);
    for (entry, off) in Lvt::ALL.iter().zip(LVT_OFFSETS) {
        w(off, state.lvt(*entry));
    }
    w(0x380, state.timer_initial);
    w(0x390, current_count(state, now, clock));
    w(0x3E0, state.timer_divide);
    (
        page,
        KvmExtra {
            apic_base: state.apic_base,
            tsc_deadline: state.tsc_deadline,
        },
    )
}

/// Decodes a KVM page (exactly [`PAGE_SIZE`] bytes) at VM time `now`. No rule is
/// checked beyond what the layout needs: see [`LapicState::validate`].
pub fn decode(
    page: &[u8],
    extra: KvmExtra,
    now: u64,
    clock: &TimerClock,
) -> Result<LapicState, DecodeError> {
    if page.len() != PAGE_SIZE {
        return Err(DecodeError::new(
            page.len().min(PAGE_SIZE),
            "page",
            "kvm_lapic_state must be exactly 1024 bytes",
        ));
    }
    let r = |off: usize, name: &'static str| le_u32(page, off, name);
    let mut s = LapicState {
        apic_base: extra.apic_base,
        tsc_deadline: extra.tsc_deadline,
        ..LapicState::default()
    };
    let raw_id = r(0x20, "id")?;
    s.id = if s.mode() == Some(ApicMode::X2Apic) {
        raw_id
    } else {
        if raw_id & 0x00FF_FFFF != 0 {
            return Err(DecodeError::new(
                0x20,
                "id",
                "xAPIC ID register bits 23:0 are not zero",
            ));
        }
        raw_id >> 24
    };
    s.version = r(0x30, "version")?;
    s.tpr = r(0x80, "tpr")?;
    s.apr = r(0x90, "apr")?;
    s.ldr = r(0xD0, "ldr")?;
    s.dfr = r(0xE0, "dfr")?;
    s.svr = r(0xF0, "svr")?;
    for i in 0..8usize {
        let off = i.saturating_mul(0x10);
        if let Some(w) = s.isr.get_mut(i) {
            *w = r(off.saturating_add(0x100), "isr")?;
        }
        if let Some(w) = s.tmr.get_mut(i) {
            *w = r(off.saturating_add(0x180), "tmr")?;
        }
        if let Some(w) = s.irr.get_mut(i) {
            *w = r(off.saturating_add(0x200), "irr")?;
        }
    }
    s.esr = r(0x280, "esr")?;
    s.icr = u64::from(r(0x300, "icr")?) | u64::from(r(0x310, "icr")?) << 32;
    for (slot, (off, field)) in s
        .lvt
        .iter_mut()
        .zip(LVT_OFFSETS.iter().zip(Field::ALL.iter().skip(14)))
    {
        *slot = r(*off, field.name())?;
    }
    // KVM's reserved timer mode 11 runs as one-shot.
    if let Some(t) = s.lvt.get_mut(Lvt::Timer.index()) {
        if *t & 0x6_0000 == 0x6_0000 {
            *t &= !0x6_0000;
        }
    }
    // KVM may hold illegal vectors 0-15 in IRR; a real APIC never accepts them.
    if let Some(w) = s.irr.get_mut(0) {
        *w &= !0xFFFF;
    }
    // No CMCI (version: max LVT entry below 6): KVM's 0 is the absent register.
    if (s.version >> 16) & 0xFF < 6 && s.lvt(Lvt::Cmci) == 0 {
        if let Some(c) = s.lvt.get_mut(Lvt::Cmci.index()) {
            *c = crate::lvt::LVT_RESET;
        }
    }
    s.timer_initial = r(0x380, "timer_initial")?;
    let tmcct = r(0x390, "timer_current")?;
    s.timer_divide = r(0x3E0, "timer_divide")?;
    s.timer_deadline = match s.timer_mode() {
        Some(TimerMode::TscDeadline) => {
            if s.tsc_deadline == 0 {
                0
            } else {
                clock
                    .tsc_to_ns(s.tsc_deadline)
                    .unwrap_or(u64::MAX)
                    .clamp(1, i64::MAX as u64)
            }
        }
        _ => {
            let count = tmcct.min(s.timer_initial);
            if count == 0 {
                0
            } else {
                u64::from(count)
                    .checked_mul(tick_ns(s.timer_divide, clock))
                    .and_then(|d| now.checked_add(d))
                    .filter(|&d| d <= i64::MAX as u64)
                    .ok_or(DecodeError::new(
                        0x390,
                        "timer_current",
                        "expiry after now cannot be represented",
                    ))?
            }
        }
    };
    Ok(s)
}
