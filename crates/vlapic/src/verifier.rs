//! The optional nesting verifier: illumos 12936's `isrvec_stk`, demoted from
//! load-bearing state to a checker that reports violations and the deepest nesting.
//!
//! It shadows the vectors accepted into ISR as a stack and checks, after every
//! accept, EOI, TPR change and restore, that (1) priority classes strictly increase
//! up the stack, (2) the stack equals the ISR bits in ascending order, and (3) the
//! depth never exceeds 15. A violation is counted and recorded (first and last);
//! the shadow is then rebuilt from ISR so one fault is reported once. Nothing here
//! is ever read to compute PPR or choose the EOI vector, and nothing panics.
//!
//! Cost (issue 14): each step checks in O(1), whatever the depth. Two values derived
//! from the stack are kept in step with every push and pop: the number of adjacent
//! pairs whose classes do not increase (zero unless a restore installed a bad ISR)
//! and the stack's vectors as a [`VectorSet`]. With no such pair the stack is
//! strictly ascending, so it equals ISR's bits in ascending order exactly when that
//! set equals ISR: one 256-bit comparison instead of a walk. The walk itself remains
//! as [`LocalApic::audit_verifier`](crate::LocalApic::audit_verifier), run on restore (rebuild) and on demand, and
//! [`Verifier::is_consistent`] re-derives both values from the stack for the tests.

use crate::priority::class;
use crate::vector_set::{slot_vector, Slot};
use crate::VectorSet;

/// Deepest legal nesting: one in-service vector per class 1–15.
pub const MAX_DEPTH: usize = 15;

/// What went wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
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
#[non_exhaustive]
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
    /// The vectors of `stack[..depth]` (derived).
    members: VectorSet,
    /// Adjacent pairs of `stack[..depth]` whose classes do not increase (derived).
    disorder: u8,
    max_depth: u8,
    violations: u64,
    first: Option<Violation>,
    last: Option<Violation>,
}

impl Verifier {
    /// A verifier, enabled or not.
    pub(crate) fn new(enabled: bool) -> Self {
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
    pub(crate) fn set_enabled(&mut self, on: bool, isr: &VectorSet) {
        self.enabled = on;
        if on {
            self.rebuild(isr);
        } else {
            self.depth = 0;
            self.members = VectorSet::EMPTY;
            self.disorder = 0;
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
    pub(crate) fn clear_counters(&mut self, isr: &VectorSet) {
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
    pub(crate) fn rebuild(&mut self, isr: &VectorSet) {
        if !self.enabled {
            return;
        }
        self.load(isr);
        self.note_depth();
        self.audit_at(isr, Checkpoint::Restore);
    }

    /// Checks the whole shadow stack against `isr` by walking it (the check every
    /// step made before issue 14): classes strictly increase and the stack equals
    /// ISR's bits in ascending order. A violation is recorded as a restore-time one.
    /// Returns whether the invariant held (true while disabled).
    pub(crate) fn audit(&mut self, isr: &VectorSet) -> bool {
        !self.enabled || self.audit_at(isr, Checkpoint::Restore)
    }

    fn audit_at(&mut self, isr: &VectorSet, at: Checkpoint) -> bool {
        let stack = self.stack();
        let kind = if stack.windows(2).any(|w| class(w[1]) <= class(w[0])) {
            ViolationKind::ClassOrder
        } else if !stack.iter().copied().eq(isr.iter()) {
            ViolationKind::IsrMismatch
        } else {
            return true;
        };
        self.record(kind, at, None, isr);
        false
    }

    /// Whether the values derived from the stack (its vector set and its count of
    /// class-order breaks) equal a fresh derivation. Always true unless this module
    /// has a bug; the property tests assert it after every operation.
    pub fn is_consistent(&self) -> bool {
        let stack = self.stack();
        let members: VectorSet = stack.iter().copied().collect();
        let disorder = stack
            .windows(2)
            .filter(|w| class(w[1]) <= class(w[0]))
            .count();
        members == self.members && disorder == usize::from(self.disorder)
    }

    /// Replaces the shadow by ISR's bits in ascending order (at most 15 of them).
    fn load(&mut self, isr: &VectorSet) {
        self.depth = 0;
        self.members = VectorSet::EMPTY;
        self.disorder = 0;
        let mut below: Option<u8> = None;
        for v in isr.iter() {
            if let Some(slot) = self.stack.get_mut(usize::from(self.depth)) {
                *slot = v;
                self.depth = self.depth.saturating_add(1);
                self.members.insert(v);
                if below.is_some_and(|b| class(v) <= class(b)) {
                    self.disorder = self.disorder.saturating_add(1);
                }
                below = Some(v);
            }
        }
    }

    /// An interrupt was accepted; `isr` is ISR after the accept.
    #[inline(always)]
    pub(crate) fn on_accept(&mut self, vector: u8, isr: &VectorSet) {
        if self.enabled {
            self.accept_checked(vector, isr);
        }
    }

    #[inline(never)]
    fn accept_checked(&mut self, vector: u8, isr: &VectorSet) {
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
                // Pushed above a lower class: no new class-order break.
                *slot = vector;
                self.depth = self.depth.saturating_add(1);
                self.members.insert(vector);
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
    #[cfg(test)]
    pub(crate) fn on_eoi(&mut self, vector: u8, isr: &VectorSet) {
        if self.enabled {
            self.eoi_checked(vector, isr);
        }
    }

    /// [`Verifier::on_eoi`] for the vector at a slot of ISR: the vector is put
    /// together only when the verifier is on (issue 14: off costs one test).
    #[inline(always)]
    pub(crate) fn on_eoi_at(&mut self, at: Slot, isr: &VectorSet) {
        if self.enabled {
            self.eoi_checked_at(at, isr);
        }
    }

    #[inline(never)]
    fn eoi_checked_at(&mut self, at: Slot, isr: &VectorSet) {
        self.eoi_checked(slot_vector(at), isr);
    }

    #[inline(never)]
    fn eoi_checked(&mut self, vector: u8, isr: &VectorSet) {
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
        let depth = usize::from(self.depth);
        if let Some(&[below, _]) = self.stack.get(depth.saturating_sub(2)..depth) {
            if class(top) <= class(below) {
                self.disorder = self.disorder.saturating_sub(1);
            }
        }
        self.depth = self.depth.saturating_sub(1);
        // The stack holds distinct vectors (it is ascending), so the top leaves the set.
        self.members.remove(top);
        self.check(isr, Checkpoint::Eoi, Some(vector));
    }

    /// TPR changed: re-check the invariants.
    pub(crate) fn on_tpr_change(&mut self, isr: &VectorSet) {
        if self.enabled {
            self.check(isr, Checkpoint::TprChange, None);
        }
    }

    fn note_depth(&mut self) {
        self.max_depth = self.max_depth.max(self.depth);
    }

    /// The per-step check, O(1): the same verdict as [`Verifier::audit`]'s walk.
    /// No class-order break means the stack is strictly ascending, and then it equals
    /// ISR's bits in ascending order exactly when its vector set equals ISR.
    #[inline]
    fn check(&mut self, isr: &VectorSet, at: Checkpoint, vector: Option<u8>) {
        if self.disorder != 0 {
            self.record(ViolationKind::ClassOrder, at, vector, isr);
        } else if self.members != *isr {
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
        self.load(isr);
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

    /// The verifier as it was before issue 14: after every step it walks the whole
    /// shadow stack against ISR. The O(1) checks must give the same verdicts.
    #[derive(Default)]
    struct Walking {
        stack: Vec<u8>,
        max_depth: u8,
        kinds: Vec<(ViolationKind, Checkpoint, Option<u8>)>,
    }

    impl Walking {
        fn load(&mut self, isr: &VectorSet) {
            self.stack = isr.iter().take(MAX_DEPTH).collect();
            self.max_depth = self.max_depth.max(self.stack.len() as u8);
        }
        fn record(&mut self, k: ViolationKind, at: Checkpoint, v: Option<u8>, isr: &VectorSet) {
            self.kinds.push((k, at, v));
            self.load(isr);
        }
        fn check(&mut self, isr: &VectorSet, at: Checkpoint, v: Option<u8>) {
            if self.stack.windows(2).any(|w| class(w[1]) <= class(w[0])) {
                self.record(ViolationKind::ClassOrder, at, v, isr);
            } else if !self.stack.iter().copied().eq(isr.iter()) {
                self.record(ViolationKind::IsrMismatch, at, v, isr);
            }
        }
        fn accept(&mut self, v: u8, isr: &VectorSet) {
            if self.stack.last().is_some_and(|&top| class(v) <= class(top)) {
                return self.record(ViolationKind::ClassOrder, Checkpoint::Accept, Some(v), isr);
            }
            if self.stack.len() == MAX_DEPTH {
                return self.record(ViolationKind::Overflow, Checkpoint::Accept, Some(v), isr);
            }
            self.stack.push(v);
            self.max_depth = self.max_depth.max(self.stack.len() as u8);
            self.check(isr, Checkpoint::Accept, Some(v));
        }
        fn eoi(&mut self, v: u8, isr: &VectorSet) {
            match self.stack.last() {
                None => self.record(ViolationKind::Underflow, Checkpoint::Eoi, Some(v), isr),
                Some(&top) if top != v => {
                    self.record(ViolationKind::EoiMismatch, Checkpoint::Eoi, Some(v), isr)
                }
                Some(_) => {
                    self.stack.pop();
                    self.check(isr, Checkpoint::Eoi, Some(v));
                }
            }
        }
        fn rebuild(&mut self, isr: &VectorSet) {
            self.load(isr);
            self.check(isr, Checkpoint::Restore, None);
        }
    }

    #[derive(Clone, Debug)]
    enum Step {
        Accept(u8),
        Eoi(u8),
        Tpr,
        Rebuild,
    }

    /// ISR after a step: mostly what the step itself would leave (legal traffic),
    /// sometimes a set changed behind the verifier's back (restore, APICv, bugs).
    fn step() -> impl proptest::strategy::Strategy<Value = (Step, Option<[u32; 8]>)> {
        use proptest::prelude::*;
        let s = prop_oneof![
            4 => any::<u8>().prop_map(Step::Accept),
            4 => any::<u8>().prop_map(Step::Eoi),
            1 => Just(Step::Tpr),
            1 => Just(Step::Rebuild),
        ];
        let behind = prop_oneof![
            6 => Just(None),
            1 => any::<[u32; 8]>().prop_map(Some),
            1 => (any::<u8>(), any::<u8>()).prop_map(|(a, b)| {
                let mut w = [0u32; 8];
                for v in [a, b] {
                    w[usize::from(v >> 5)] |= 1 << (v & 31);
                }
                Some(w)
            }),
        ];
        (s, behind)
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(512))]

        // Issue 14 point 3: the O(1) per-step checks report exactly the violations the
        // full walk reported (kind, checkpoint, vector, order), the shadows agree, and
        // the derived set and class-order count always equal a fresh derivation.
        #[test]
        fn constant_time_checks_match_the_full_walk(
            steps in proptest::collection::vec(step(), 0..120),
        ) {
            let mut fast = Verifier::new(true);
            let mut slow = Walking::default();
            let mut isr = VectorSet::EMPTY;
            for (st, behind) in &steps {
                match *st {
                    Step::Accept(v) => {
                        isr.insert(v);
                        if let Some(w) = behind { isr = VectorSet::from_words(*w); }
                        fast.on_accept(v, &isr);
                        slow.accept(v, &isr);
                    }
                    Step::Eoi(v) => {
                        isr.remove(v);
                        if let Some(w) = behind { isr = VectorSet::from_words(*w); }
                        fast.on_eoi(v, &isr);
                        slow.eoi(v, &isr);
                    }
                    Step::Tpr => {
                        if let Some(w) = behind { isr = VectorSet::from_words(*w); }
                        fast.on_tpr_change(&isr);
                        slow.check(&isr, Checkpoint::TprChange, None);
                    }
                    Step::Rebuild => {
                        if let Some(w) = behind { isr = VectorSet::from_words(*w); }
                        fast.rebuild(&isr);
                        slow.rebuild(&isr);
                    }
                }
                proptest::prop_assert!(fast.is_consistent());
                proptest::prop_assert_eq!(fast.stack(), &slow.stack[..]);
                proptest::prop_assert_eq!(fast.max_depth(), slow.max_depth);
                proptest::prop_assert_eq!(fast.violations(), slow.kinds.len() as u64);
                let last = fast.last_violation().map(|v| (v.kind, v.at, v.vector));
                proptest::prop_assert_eq!(last, slow.kinds.last().copied());
            }
            let first = fast.first_violation().map(|v| (v.kind, v.at, v.vector));
            proptest::prop_assert_eq!(first, slow.kinds.first().copied());
        }
    }

    // The on-demand walk finds what a bad restore left, and agrees with the O(1) state.
    #[test]
    fn audit_walks_the_whole_stack() {
        let mut ver = Verifier::new(true);
        ver.on_accept(0x41, &set(&[0x41]));
        ver.on_accept(0x61, &set(&[0x41, 0x61]));
        assert!(ver.audit(&set(&[0x41, 0x61])));
        assert!(
            !ver.audit(&set(&[0x41, 0x61, 0x81])),
            "ISR changed behind it"
        );
        assert_eq!(
            ver.last_violation().unwrap().kind,
            ViolationKind::IsrMismatch
        );
        assert!(ver.is_consistent());
        assert!(
            Verifier::new(false).audit(&set(&[0x41])),
            "off: nothing checked"
        );
    }
}
