//! The decision a VMM makes before entering the guest ([`LocalApic::plan_entry`]) and
//! the "held back by TPR" predicate for hypervisors that get no exit on CR8 lowering.

use crate::lapic::{Events, LocalApic};
use crate::priority;

/// What to do on the next entry into the guest, from [`LocalApic::plan_entry`].
///
/// Everything the APIC decided is already done when the plan is returned: the events
/// were taken, `inject` was acknowledged (IRR → ISR) and time was advanced. The VMM
/// only carries the plan out.
#[non_exhaustive]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct EntryPlan {
    /// NMI/SMI/INIT/SIPI/ExtINT taken from the APIC ([`LocalApic::take_events`]): they
    /// are no longer pending in the APIC, so the VMM must act on every one. With
    /// `events.init` the vCPU goes to wait-for-SIPI and nothing was injected.
    pub events: Events,
    /// A vector already acknowledged (moved from IRR to ISR): inject it now. Dropping
    /// it loses the interrupt (and leaves it in service until an EOI).
    pub inject: Option<u8>,
    /// A vector is pending ([`LocalApic::pending_vector`]) after the possible
    /// acknowledge and nothing was injected: ask for an interrupt-window exit and plan
    /// again then.
    pub request_window: bool,
    /// [`LocalApic::held_back_by_tpr`] after the plan: only TPR keeps a requested
    /// vector from the core, so a CR8 write that lowers TPR must be noticed.
    pub held_by_tpr: bool,
    /// The value to load into the vCPU's CR8: `TPR[7:4]` (SDM Vol. 3A §11.8.6.1).
    pub cr8: u64,
    /// [`LocalApic::next_timer_deadline`] after advancing to `now`: arm the host timer
    /// for this VM time (`None`: no timer running).
    pub timer_deadline: Option<u64>,
    /// [`LocalApic::mmio_base`] now: where the xAPIC page is (`None` outside xAPIC mode).
    pub mmio_base: Option<u64>,
}

impl LocalApic {
    /// The decision before entering the guest: [`advance`](LocalApic::advance) to
    /// `now`, take the events, acknowledge one vector if `can_inject` (the guest can
    /// take an interrupt now: RFLAGS.IF set, no interrupt shadow, no event already
    /// being injected) and neither INIT nor an NMI is among the events (an NMI is taken
    /// before any maskable interrupt, SDM Vol. 3A §6.9: the vector waits for the next
    /// entry, `request_window` says so), and report the rest.
    ///
    /// ```
    /// use vlapic::{Delivery, LapicConfig, LocalApic};
    ///
    /// let mut apic = LocalApic::new(LapicConfig::default());
    /// let _ = apic.write_register(0xF0, 0x1FF, 0); // SVR: software enable
    /// apic.deliver(Delivery::fixed(0x41), 0);
    /// apic.deliver(Delivery::fixed(0x31), 0);
    ///
    /// // Interrupts blocked (IF = 0): nothing is acknowledged, ask for the window.
    /// let plan = apic.plan_entry(10, false);
    /// assert_eq!((plan.inject, plan.request_window), (None, true));
    ///
    /// // The window opened: 0x41 is acknowledged; 0x31 is below its class now.
    /// let plan = apic.plan_entry(20, true);
    /// assert_eq!(plan.inject, Some(0x41));
    /// assert!(!plan.request_window);
    /// assert_eq!(plan.mmio_base, Some(0xFEE0_0000));
    /// assert_eq!(apic.isr().highest(), Some(0x41));
    /// ```
    pub fn plan_entry(&mut self, now: u64, can_inject: bool) -> EntryPlan {
        self.advance(now);
        let events = self.take_events();
        let inject = if can_inject && !events.init && events.nmi == 0 {
            self.acknowledge()
        } else {
            None
        };
        EntryPlan {
            events,
            inject,
            request_window: inject.is_none() && self.pending_vector().is_some(),
            held_by_tpr: self.held_back_by_tpr(),
            cr8: self.cr8(),
            timer_deadline: self.next_timer_deadline(),
            mmio_base: self.mmio_base(),
        }
    }

    /// A vector waits in IRR whose class is above the highest in-service class, but
    /// TPR alone keeps it from being pending ([`LocalApic::pending_vector`] is `None`):
    /// PPR is TPR because `TPR[7:4]` ≥ the vector's class (SDM Vol. 3A §11.8.3.1).
    /// Lowering TPR/CR8 would release it; hypervisors that get no exit on CR8
    /// lowering must poll while this is true (or set the CR8 threshold to the
    /// vector's class).
    ///
    /// ```
    /// use vlapic::{Delivery, LapicConfig, LocalApic};
    ///
    /// let mut apic = LocalApic::new(LapicConfig::default());
    /// let _ = apic.write_register(0xF0, 0x1FF, 0); // SVR: software enable
    /// apic.set_cr8(5).unwrap();                     // TPR = 0x50
    /// apic.deliver(Delivery::fixed(0x41), 0);
    /// assert_eq!(apic.pending_vector(), None);
    /// assert!(apic.held_back_by_tpr());
    /// apic.set_cr8(0).unwrap();
    /// assert_eq!(apic.pending_vector(), Some(0x41));
    /// assert!(!apic.held_back_by_tpr());
    /// ```
    pub fn held_back_by_tpr(&self) -> bool {
        let Some(v) = self.irr().highest() else {
            return false;
        };
        let isrv = priority::in_service_vector(self.isr());
        priority::class(v) > priority::class(isrv) && self.pending_vector().is_none()
    }

    /// Whether the vCPU must be kicked after something was posted to this APIC: it has
    /// work ([`LocalApic::has_work`]), or a vector waits that only TPR holds back. A
    /// running vCPU must see the latter too: on hosts where lowering CR8 does not exit,
    /// it arms its TPR poll at the next entry, or the vector would wait for an unrelated
    /// exit (kvm-unit-tests `vmexit` x2apic_self_ipi_tpr).
    pub fn needs_kick(&self) -> bool {
        self.has_work() || self.held_back_by_tpr()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Delivery, DeliveryMode, LapicConfig, VectorSet};
    use proptest::prelude::*;

    fn enabled() -> LocalApic {
        let mut a = LocalApic::new(LapicConfig::default());
        let _ = a.write_register(0xF0, 0x1FF, 0);
        a
    }

    /// The naive reading of the definition: some IRR vector is above the in-service
    /// class, none is above PPR's class, and PPR's class is TPR's (SDM §11.8.3.1).
    fn naive_held(irr: &VectorSet, isr: &VectorSet, tpr: u8) -> bool {
        let isrv_class = (0u8..=255)
            .filter(|&v| isr.contains(v))
            .map(|v| v >> 4)
            .max()
            .unwrap_or(0);
        let ppr_class = isrv_class.max(tpr >> 4);
        let above_isr = (0u8..=255).any(|v| irr.contains(v) && v >> 4 > isrv_class);
        let deliverable = (0u8..=255).any(|v| irr.contains(v) && v >> 4 > ppr_class);
        above_isr && !deliverable
    }

    proptest! {
        // SDM §11.8.3.1: PPR = max(TPR, ISRV) by class; held = above ISRV, not above PPR.
        #[test]
        fn held_back_by_tpr_matches_naive(
            irr in proptest::collection::vec(16u8..=255, 0..4),
            isr in proptest::collection::vec(16u8..=255, 0..3),
            tpr in any::<u8>(),
        ) {
            let mut a = enabled();
            for &v in &irr {
                a.irr.insert(v);
            }
            for &v in &isr {
                a.isr.insert(v);
            }
            a.tpr = tpr;
            prop_assert_eq!(a.held_back_by_tpr(), naive_held(&a.irr, &a.isr, tpr));
        }
    }

    // Injection needs can_inject; without it the vector stays in IRR and the window is asked for.
    #[test]
    fn plan_acknowledges_only_when_allowed() {
        let mut a = enabled();
        a.deliver(Delivery::fixed(0x50), 0);
        let p = a.plan_entry(0, false);
        assert_eq!(p.inject, None);
        assert!(p.request_window);
        assert!(a.irr().contains(0x50));
        let p = a.plan_entry(0, true);
        assert_eq!(p.inject, Some(0x50));
        assert!(!p.request_window);
        assert!(a.isr().contains(0x50) && !a.irr().contains(0x50));
    }

    // SDM §11.4.7.3: INIT puts the vCPU in wait-for-SIPI; nothing is injected with it.
    #[test]
    fn init_suppresses_injection() {
        let mut a = enabled();
        a.deliver(Delivery::event(DeliveryMode::Init, 0), 0);
        let _ = a.write_register(0xF0, 0x1FF, 0); // re-enabled after the INIT reset
        a.deliver(Delivery::fixed(0x60), 0);
        let p = a.plan_entry(0, true);
        assert!(p.events.init);
        assert_eq!(p.inject, None);
        assert!(a.irr().contains(0x60));
        assert!(!a.events().any());
    }
}
