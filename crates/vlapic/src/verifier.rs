//! The optional nesting verifier: illumos 12936's `isrvec_stk`, demoted from
//! load-bearing state to a checker that reports violations and the deepest nesting.
//!
//! It shadows the vectors accepted into ISR as a stack and checks, after every
//! accept, EOI, TPR change and restore, that (1) priority classes strictly increase
//! up the stack, (2) the stack equals the ISR bits in ascending order, and (3) the
//! depth never exceeds 15. A violation is counted and recorded (first and last);
//! the shadow is then rebuilt from ISR so one fault is reported once. Nothing here
//! is ever read to compute PPR or choose the EOI vector, and nothing panics.

use crate::priority::class;
use crate::VectorSet;

/// Deepest legal nesting: one in-service vector per class 1–15.
pub const MAX_DEPTH: usize = 15;

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ViolationKind {
    /// An accept would push a 16th vector.
    Overflow,
    /// An EOI found the shadow stack empty.
    Underflow,
    /// A vector was accepted whose class is not above the class below it.
    ClassOrder,
    /// The vector an EOI retired is not the top of the shadow stack.
    EoiMismatch,
    /// The shadow stack and the ISR bits (ascending) differ.
    IsrMismatch,
}

/// Which operation triggered the check.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Checkpoint {
    /// An interrupt moved from IRR to ISR.
    Accept,
    /// An EOI retired an in-service vector.
    Eoi,
    /// TPR (or CR8) changed.
    TprChange,
    /// State was restored or reset.
    Restore,
}

/// A recorded violation with the state that exposed it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Violation {
    /// The broken invariant.
    pub kind: ViolationKind,
    /// The operation during which it was found.
    pub at: Checkpoint,
    /// The vector the operation involved, if any.
    pub vector: Option<u8>,
    /// ISR at the time.
    pub isr: VectorSet,
    /// The shadow stack, bottom first (`stack[..depth]` is meaningful).
    pub stack: [u8; MAX_DEPTH],
    /// Shadow stack depth at the time.
    pub depth: u8,
}

/// The verifier. Disabled, it does nothing and keeps no stack.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Verifier {
    enabled: bool,
    stack: [u8; MAX_DEPTH],
    depth: u8,
    max_depth: u8,
    violations: u64,
    first: Option<Violation>,
    last: Option<Violation>,
}

impl Verifier {
    /// A verifier, enabled or not.
    pub fn new(enabled: bool) -> Self {
        Self {
            enabled,
            ..Self::default()
        }
    }

    /// Whether checks run.
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Turns checking on (rebuilding the shadow from `isr`) or off.
    pub fn set_enabled(&mut self, on: bool, isr: &VectorSet) {
        self.enabled = on;
        if on {
            self.rebuild(isr);
        } else {
            self.depth = 0;
        }
    }

    /// Violations found so far.
    pub fn violations(&self) -> u64 {
        self.violations
    }

    /// The first violation found.
    pub fn first_violation(&self) -> Option<&Violation> {
        self.first.as_ref()
    }

    /// The most recent violation.
    pub fn last_violation(&self) -> Option<&Violation> {
        self.last.as_ref()
    }

    /// The deepest nesting seen (the figure illumos engineers read with dtrace).
    pub fn max_depth(&self) -> u8 {
        self.max_depth
    }

    /// Current shadow depth.
    pub fn depth(&self) -> u8 {
        self.depth
    }

    /// The shadow stack, bottom first.
    pub fn stack(&self) -> &[u8] {
        self.stack.get(..usize::from(self.depth)).unwrap_or(&[])
    }

    /// Clears the counters and records (not the shadow).
    pub fn clear_counters(&mut self, isr: &VectorSet) {
        self.violations = 0;
        self.first = None;
        self.last = None;
        self.max_depth = 0;
        if self.enabled {
            self.rebuild(isr);
        }
    }

    /// Rebuilds the shadow from ISR alone: its bits in ascending order. ISR holding
    /// two vectors of one class (impossible through accept, possible only through a
    /// bad restore) is reported as a class-order violation.
    pub fn rebuild(&mut self, isr: &VectorSet) {
        if !self.enabled {
            return;
        }
        self.depth = 0;
        for v in isr.iter() {
            if let Some(slot) = self.stack.get_mut(usize::from(self.depth)) {
                *slot = v;
                self.depth = self.depth.saturating_add(1);
            }
        }
        self.note_depth();
        self.check(isr, Checkpoint::Restore, None);
    }

    /// An interrupt was accepted; `isr` is ISR after the accept.
    pub fn on_accept(&mut self, vector: u8, isr: &VectorSet) {
        if !self.enabled {
            return;
        }
        if let Some(&top) = self.stack().last() {
            if class(vector) <= class(top) {
                self.record(
                    ViolationKind::ClassOrder,
                    Checkpoint::Accept,
                    Some(vector),
                    isr,
                );
                return;
            }
        }
        match self.stack.get_mut(usize::from(self.depth)) {
            Some(slot) => {
                *slot = vector;
                self.depth = self.depth.saturating_add(1);
                self.note_depth();
                self.check(isr, Checkpoint::Accept, Some(vector));
            }
            None => self.record(
                ViolationKind::Overflow,
                Checkpoint::Accept,
                Some(vector),
                isr,
            ),
        }
    }

    /// An EOI retired `vector`; `isr` is ISR after the EOI.
    pub fn on_eoi(&mut self, vector: u8, isr: &VectorSet) {
        if !self.enabled {
            return;
        }
        let Some(&top) = self.stack().last() else {
            self.record(ViolationKind::Underflow, Checkpoint::Eoi, Some(vector), isr);
            return;
        };
        if top != vector {
            self.record(
                ViolationKind::EoiMismatch,
                Checkpoint::Eoi,
                Some(vector),
                isr,
            );
            return;
        }
        self.depth = self.depth.saturating_sub(1);
        self.check(isr, Checkpoint::Eoi, Some(vector));
    }

    /// TPR changed: re-check the invariants.
    pub fn on_tpr_change(&mut self, isr: &VectorSet) {
        if self.enabled {
            self.check(isr, Checkpoint::TprChange, None);
        }
    }

    fn note_depth(&mut self) {
        self.max_depth = self.max_depth.max(self.depth);
    }

    fn check(&mut self, isr: &VectorSet, at: Checkpoint, vector: Option<u8>) {
        let stack = self.stack();
        if stack.windows(2).any(|w| class(w[1]) <= class(w[0])) {
            self.record(ViolationKind::ClassOrder, at, vector, isr);
        } else if !stack.iter().copied().eq(isr.iter()) {
            self.record(ViolationKind::IsrMismatch, at, vector, isr);
        }
    }

    fn record(&mut self, kind: ViolationKind, at: Checkpoint, vector: Option<u8>, isr: &VectorSet) {
        let v = Violation {
            kind,
            at,
            vector,
            isr: *isr,
            stack: self.stack,
            depth: self.depth,
        };
        self.violations = self.violations.saturating_add(1);
        if self.first.is_none() {
            self.first = Some(v);
        }
        self.last = Some(v);
        // Resynchronise from the architectural truth, without re-checking (a
        // class-order fault in ISR itself would otherwise be reported twice).
        self.depth = 0;
        for v in isr.iter() {
            if let Some(slot) = self.stack.get_mut(usize::from(self.depth)) {
                *slot = v;
                self.depth = self.depth.saturating_add(1);
            }
        }
        self.note_depth();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(v: &[u8]) -> VectorSet {
        v.iter().copied().collect()
    }

    #[test]
    fn nesting_in_order_is_clean_and_depth_is_recorded() {
        let mut ver = Verifier::new(true);
        ver.on_accept(0x41, &set(&[0x41]));
        ver.on_accept(0x61, &set(&[0x41, 0x61]));
        ver.on_accept(0x81, &set(&[0x41, 0x61, 0x81]));
        ver.on_eoi(0x81, &set(&[0x41, 0x61]));
        ver.on_eoi(0x61, &set(&[0x41]));
        ver.on_eoi(0x41, &set(&[]));
        assert_eq!(ver.violations(), 0);
        assert_eq!(ver.max_depth(), 3);
        assert_eq!(ver.depth(), 0);
    }

    // illumos 12936: ISR set without a push (restore, APICv) used to panic the host.
    #[test]
    fn isr_disagreeing_with_shadow_is_reported_not_fatal() {
        let mut ver = Verifier::new(true);
        ver.on_accept(0x41, &set(&[0x41, 0x90]));
        assert_eq!(ver.violations(), 1);
        let v = ver.last_violation().copied().unwrap();
        assert_eq!(v.kind, ViolationKind::IsrMismatch);
        assert_eq!(v.vector, Some(0x41));
        // Resynchronised: the next in-order EOI is clean.
        ver.on_eoi(0x90, &set(&[0x41]));
        assert_eq!(ver.violations(), 1);
    }

    #[test]
    fn underflow_and_eoi_mismatch() {
        let mut ver = Verifier::new(true);
        ver.on_eoi(0x50, &set(&[]));
        assert_eq!(ver.last_violation().unwrap().kind, ViolationKind::Underflow);
        ver.on_accept(0x50, &set(&[0x50]));
        ver.on_eoi(0x51, &set(&[0x50]));
        assert_eq!(
            ver.last_violation().unwrap().kind,
            ViolationKind::EoiMismatch
        );
        assert_eq!(
            ver.first_violation().unwrap().kind,
            ViolationKind::Underflow
        );
        assert_eq!(ver.violations(), 2);
    }

    #[test]
    fn class_order_and_overflow() {
        let mut ver = Verifier::new(true);
        ver.on_accept(0x61, &set(&[0x61]));
        ver.on_accept(0x62, &set(&[0x61, 0x62]));
        assert_eq!(
            ver.last_violation().unwrap().kind,
            ViolationKind::ClassOrder
        );
        // Fill 15 classes, then one more.
        let mut ver = Verifier::new(true);
        let mut isr = VectorSet::EMPTY;
        for c in 1..=15u8 {
            isr.insert(c << 4);
            ver.on_accept(c << 4, &isr);
        }
        assert_eq!(ver.violations(), 0);
        assert_eq!(ver.max_depth(), 15);
        ver.on_accept(0xFF, &isr);
        assert_eq!(ver.violations(), 1, "a 16th push is reported");
    }

    #[test]
    fn rebuild_from_isr_and_disabled_costs_nothing() {
        let mut ver = Verifier::new(false);
        ver.on_accept(0x41, &set(&[0x99]));
        assert_eq!(ver.violations(), 0);
        assert_eq!(ver.depth(), 0);
        ver.set_enabled(true, &set(&[0x41, 0x61, 0x81]));
        assert_eq!(ver.stack(), &[0x41, 0x61, 0x81]);
        assert_eq!(ver.violations(), 0);
        // ISR with two vectors of one class cannot come from accepts: reported.
        ver.rebuild(&set(&[0x41, 0x49]));
        assert_eq!(ver.violations(), 1);
    }
}
