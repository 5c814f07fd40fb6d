//! illumos bhyve's `struct vdi_lapic_v1` (`VDC_LAPIC` version 1, 200 bytes): the
//! register page `vdi_lapic_page_v1` (176 bytes), APIC base, timer target, ESR latch.
//!
//! Conventions: `vlp_id` is the ID register (xAPIC and disabled `id << 24`, bits
//! 23:0 zero; x2APIC the full ID); `vlp_icr` is `(high << 32) | low`;
//! `vl_timer_target` is our absolute VM time in ns as a signed 64-bit value (0 =
//! not armed; negative is rejected); `vl_esr_pending` is the ESR latch. The padding
//! at 132 and 196 is written as zero and ignored on decode. Nothing is lost in
//! either direction.

use crate::lapic::ApicMode;
use crate::state::error::{DecodeError, Field};
use crate::state::lapic::LapicState;
use crate::state::wire::{le_u32, le_u64, put};

/// Size of `struct vdi_lapic_v1`.
pub const SIZE: usize = 200;

const LVT_OFFSETS: [usize; 7] = [128, 144, 148, 152, 156, 160, 164];

/// Byte offset of `field` in the structure (`None` for IA32_TSC_DEADLINE, which
/// bhyve keeps among the MSRs).
pub fn field_offset(field: Field) -> Option<usize> {
    Some(match field {
        Field::Id => 0,
        Field::Version => 4,
        Field::Tpr => 8,
        Field::Apr => 12,
        Field::Ldr => 16,
        Field::Dfr => 20,
        Field::Svr => 24,
        Field::Isr => 28,
        Field::Tmr => 60,
        Field::Irr => 92,
        Field::Esr => 124,
        Field::Icr => 136,
        Field::Lvt(e) => LVT_OFFSETS.get(e.index()).copied().unwrap_or(144),
        Field::TimerInitial => 168,
        Field::TimerDivide => 172,
        Field::ApicBase => 176,
        Field::TimerDeadline => 184,
        Field::EsrPending => 192,
        Field::TscDeadline => return None,
    })
}

/// Encodes a state. IA32_TSC_DEADLINE is not part of the structure.
pub fn encode(state: &LapicState) -> [u8; SIZE] {
    let mut b = [0u8; SIZE];
    let x2 = state.mode() == Some(ApicMode::X2Apic);
    let mut w = |off: usize, v: u32| put(&mut b, off, &v.to_le_bytes());
    w(0, if x2 { state.id } else { state.id << 24 });
    w(4, state.version);
    w(8, state.tpr);
    w(12, state.apr);
    w(16, state.ldr);
    w(20, state.dfr);
    w(24, state.svr);
    for i in 0..8usize {
        let off = i.saturating_mul(4);
        w(
            off.saturating_add(28),
            state.isr.get(i).copied().unwrap_or(0),
        );
        w(
            off.saturating_add(60),
            state.tmr.get(i).copied().unwrap_or(0),
        );
        w(
            off.saturating_add(92),
            state.irr.get(i).copied().unwrap_or(0),
        );
    }
    w(124, state.esr);
    for (v, off) in state.lvt.iter().zip(LVT_OFFSETS) {
        w(off, *v);
    }
    w(168, state.timer_initial);
    w(172, state.timer_divide);
    w(192, state.esr_pending);
    put(&mut b, 136, &state.icr.to_le_bytes());
    put(&mut b, 176, &state.apic_base.to_le_bytes());
    let target = i64::try_from(state.timer_deadline).unwrap_or(i64::MAX);
    put(&mut b, 184, &target.to_le_bytes());
    b
}

/// Decodes exactly [`SIZE`] bytes; `tsc_deadline` comes from the MSRs. No rule is
/// checked beyond what the layout needs: see [`LapicState::validate`].
pub fn decode(bytes: &[u8], tsc_deadline: u64) -> Result<LapicState, DecodeError> {
    if bytes.len() != SIZE {
        return Err(DecodeError::new(
            bytes.len().min(SIZE),
            "vdi_lapic_v1",
            "vdi_lapic_v1 must be exactly 200 bytes",
        ));
    }
    let r = |off: usize, name: &'static str| le_u32(bytes, off, name);
    let mut s = LapicState {
        apic_base: le_u64(bytes, 176, "vl_msr_apicbase")?,
        tsc_deadline,
        ..LapicState::default()
    };
    let raw_id = r(0, "vlp_id")?;
    s.id = if s.mode() == Some(ApicMode::X2Apic) {
        raw_id
    } else {
        if raw_id & 0x00FF_FFFF != 0 {
            return Err(DecodeError::new(
                0,
                "vlp_id",
                "xAPIC ID register bits 23:0 are not zero",
            ));
        }
        raw_id >> 24
    };
    s.version = r(4, "vlp_version")?;
    s.tpr = r(8, "vlp_tpr")?;
    s.apr = r(12, "vlp_apr")?;
    s.ldr = r(16, "vlp_ldr")?;
    s.dfr = r(20, "vlp_dfr")?;
    s.svr = r(24, "vlp_svr")?;
    for i in 0..8usize {
        let off = i.saturating_mul(4);
        if let Some(w) = s.isr.get_mut(i) {
            *w = r(off.saturating_add(28), "vlp_isr")?;
        }
        if let Some(w) = s.tmr.get_mut(i) {
            *w = r(off.saturating_add(60), "vlp_tmr")?;
        }
        if let Some(w) = s.irr.get_mut(i) {
            *w = r(off.saturating_add(92), "vlp_irr")?;
        }
    }
    s.esr = r(124, "vlp_esr")?;
    for (slot, off) in s.lvt.iter_mut().zip(LVT_OFFSETS) {
        *slot = r(off, "vlp_lvt")?;
    }
    s.icr = le_u64(bytes, 136, "vlp_icr")?;
    s.timer_initial = r(168, "vlp_icr_timer")?;
    s.timer_divide = r(172, "vlp_dcr_timer")?;
    let target = le_u64(bytes, 184, "vl_timer_target")?;
    if target > i64::MAX as u64 {
        return Err(DecodeError::new(
            184,
            "vl_timer_target",
            "negative timer target",
        ));
    }
    s.timer_deadline = target;
    s.esr_pending = r(192, "vl_esr_pending")?;
    Ok(s)
}
