//! Interrupt priority classes and the processor-priority rule
//! (SDM Vol. 3A §11.8.3.1): PPR is derived from TPR and ISR0–7, never cached.

use crate::VectorSet;

/// Priority class of a vector (bits 7:4).
#[inline(always)]
pub const fn class(vector: u8) -> u8 {
    vector >> 4
}

/// The in-service vector (ISRV): the highest vector set in ISR0–7, 0 when none.
#[inline]
pub fn in_service_vector(isr: &VectorSet) -> u8 {
    isr.highest().unwrap_or(0)
}

/// Processor priority, SDM §11.8.3.1:
/// `PPR = TPR` if `TPR[7:4] >= ISRV[7:4]`, else `ISRV[7:4] << 4`.
///
/// ```
/// use vlapic::{priority::processor_priority, VectorSet};
/// let isr: VectorSet = [0x51u8].into_iter().collect();
/// assert_eq!(processor_priority(0x32, &isr), 0x50); // ISR class wins
/// assert_eq!(processor_priority(0x63, &isr), 0x63); // TPR wins, keeps its low nibble
/// ```
#[inline]
pub fn processor_priority(tpr: u8, isr: &VectorSet) -> u8 {
    priority_from_isrv(tpr, in_service_vector(isr))
}

/// Processor priority from TPR and the in-service vector ISRV (the highest vector in
/// ISR0–7, 0 when none), SDM §11.8.3.1; [`processor_priority`] with ISRV already found.
///
/// ```
/// use vlapic::priority::priority_from_isrv;
/// assert_eq!(priority_from_isrv(0x32, 0x51), 0x50);
/// assert_eq!(priority_from_isrv(0x63, 0x51), 0x63);
/// ```
#[inline(always)]
pub const fn priority_from_isrv(tpr: u8, isrv: u8) -> u8 {
    if class(tpr) >= class(isrv) {
        tpr
    } else {
        isrv & 0xF0
    }
}

/// Whether a requested vector may be delivered to the core at this PPR:
/// its class must be above PPR's class (SDM §11.8.3.1).
#[inline(always)]
pub const fn above_ppr(vector: u8, ppr: u8) -> bool {
    class(vector) > class(ppr)
}

#[cfg(test)]
mod tests {
    use super::*;

    // SDM §11.8.3.1: PPR[7:4] = max(TPR[7:4], ISRV[7:4]); PPR[3:0] = TPR[3:0] only when TPR wins.
    #[test]
    fn ppr_rule() {
        let none = VectorSet::EMPTY;
        assert_eq!(processor_priority(0x00, &none), 0x00);
        assert_eq!(processor_priority(0x2F, &none), 0x2F);
        let isr: VectorSet = [0x41u8, 0x83].into_iter().collect();
        assert_eq!(processor_priority(0x10, &isr), 0x80);
        assert_eq!(processor_priority(0x8F, &isr), 0x8F); // equal class: TPR wins
        assert_eq!(processor_priority(0x9A, &isr), 0x9A);
    }

    #[test]
    fn deliverable_needs_strictly_higher_class() {
        assert!(!above_ppr(0x5F, 0x50));
        assert!(above_ppr(0x60, 0x5F));
        assert!(above_ppr(0x10, 0x00));
    }
}
