//! The TPR single-step of [`ApicVcpu`] (KVM checklist item 5): a few stepped
//! instructions after a vector became held back by TPR alone, never across an event.

use super::{ApicVcpu, RunState};
use crate::Error;
use vlapic::EntryPlan;

impl ApicVcpu {
    /// Single-steps a few instructions after a vector became held back by TPR alone
    /// (KVM checklist item 5): the guest usually lowers CR8 right away, without an exit.
    ///
    /// Never across an event: KVM's single-step sets RFLAGS.TF, and an exception or NMI
    /// delivered meanwhile would push that TF into the guest's frame (the guest then
    /// takes a #DB it never asked for). So no step when the last exit injects a #GP
    /// (an MSR fault), when an NMI or ExtINT was given this entry, or when KVM still
    /// holds any interrupt, exception or NMI (one given to it before an entry that a
    /// kick ended before delivery: the hostile guest's `tf_leaks`, 1 run in ~15).
    pub(super) fn step_for_tpr(&mut self, plan: &EntryPlan) -> Result<(), Error> {
        // A host that exits on CR8 lowering needs no stepping (checklist item 5).
        let budget = if self.rt.cr8_exits_seen() {
            0
        } else {
            self.rt.poll().tpr_step_instructions
        };
        let event = std::mem::take(&mut self.event_pending) || self.nmi_outstanding;
        if event {
            self.step_left = 0;
        }
        if plan.held_by_tpr && plan.inject.is_none() && self.state == RunState::Running {
            if !self.held_seen {
                self.held_seen = true;
                self.step_left = budget;
            }
        } else {
            self.held_seen = false;
            self.step_left = 0;
        }
        // KVM may still hold an event of its own for this entry: an interrupt we gave
        // it that a kick kept from being delivered (plan.inject is None now: the APIC
        // already moved it to ISR), or an exception it queued. Delivered during a step,
        // it would carry KVM's TF into the guest's frame as well.
        let step = self.step_left > 0 && !event && !self.kvm_holds_event();
        self.set_stepping(step)
    }

    /// Whether KVM holds an interrupt, exception or NMI it will deliver at the next
    /// entry (asked only before a single-stepped entry). An unanswered query counts
    /// as "holds": no step, the TPR poll covers it.
    fn kvm_holds_event(&mut self) -> bool {
        self.fd.get_vcpu_events().map_or(true, |e| {
            e.interrupt.injected != 0
                || e.exception.injected != 0
                || e.exception.pending != 0
                || e.nmi.injected != 0
                || e.nmi.pending != 0
        })
    }

    /// Turns KVM's single-step on or off (off also drops the TF KVM set for it).
    pub(super) fn set_stepping(&mut self, step: bool) -> Result<(), Error> {
        if step != self.stepping {
            let dbg = kvm_bindings::kvm_guest_debug {
                control: if step {
                    kvm_bindings::KVM_GUESTDBG_ENABLE | kvm_bindings::KVM_GUESTDBG_SINGLESTEP
                } else {
                    0
                },
                ..Default::default()
            };
            self.fd
                .set_guest_debug(&dbg)
                .map_err(|e| Error::kvm("KVM_SET_GUEST_DEBUG", e))?;
            self.stepping = step;
        }
        Ok(())
    }
}
