//! Interrupt trace events (feature `trace`): what happened to one APIC's interrupts,
//! stamped with the VM time the caller last passed in, kept in a fixed ring to drain.
//!
//! The library reads no clock and does no I/O: each [`LocalApic`](crate::LocalApic)
//! holds a [`TraceRing`] of [`TRACE_CAPACITY`] events, off until
//! [`LocalApic::set_trace_enabled`](crate::LocalApic::set_trace_enabled). The
//! embedder drains it (typically after every exit, on the vCPU's own thread) with
//! [`LocalApic::drain_trace`](crate::LocalApic::drain_trace); events that do not fit
//! are counted in [`TraceRing::lost`], never allocated for. Without the feature none
//! of this is compiled and the APIC's code is unchanged.
//!
//! ```
//! use vlapic::trace::{Source, TraceKind};
//! use vlapic::{Delivery, LapicConfig, LocalApic};
//!
//! let mut apic = LocalApic::new(LapicConfig::default());
//! apic.set_trace_enabled(true);
//! let _ = apic.write_register(0xF0, 0x1FF, 0); // SVR: software enable
//! apic.deliver(Delivery::fixed(0x30), 5);
//! assert_eq!(apic.acknowledge(), Some(0x30));
//! let _ = apic.write_register(0xB0, 0, 9); // EOI
//! let mut seen = Vec::new();
//! apic.drain_trace(|e| seen.push((e.time, e.kind)));
//! assert_eq!(
//!     seen,
//!     [
//!         (5, TraceKind::Accepted { vector: 0x30, level: false, source: Source::Unknown }),
//!         (5, TraceKind::Acknowledged { vector: 0x30 }),
//!         (9, TraceKind::Eoi { vector: 0x30 }),
//!     ]
//! );
//! ```

use crate::lvt::Lvt;

/// Events one APIC holds between drains; more are counted as lost.
pub const TRACE_CAPACITY: usize = 64;

/// Where an interrupt came from.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Source {
    /// Delivered by [`LocalApic::deliver`](crate::LocalApic::deliver) directly, not
    /// through a fabric that knows its origin.
    #[default]
    Unknown,
    /// An IPI sent through the ICR of the vCPU with this fabric index.
    Ipi {
        /// The sender's vCPU index.
        from: u32,
    },
    /// An IOAPIC redirection entry (pin).
    IoApic {
        /// The IOAPIC input pin.
        pin: u8,
    },
    /// An MSI write.
    Msi,
    /// A message the embedder routed itself (`Fabric::send`).
    Host,
    /// A self IPI (ICR shorthand self, or the x2APIC SELF IPI register).
    SelfIpi,
    /// A local vector table entry: the timer, LINT0/1, error, thermal, perf, CMCI.
    Local(Lvt),
}

/// One thing that happened to an APIC's interrupts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum TraceKind {
    /// A fixed interrupt was accepted into IRR (SDM §11.8.3).
    Accepted {
        /// The vector.
        vector: u8,
        /// Level-triggered (TMR set).
        level: bool,
        /// Its origin.
        source: Source,
    },
    /// The core took the vector: IRR → ISR, its handler starts (SDM §11.8.4).
    Acknowledged {
        /// The vector.
        vector: u8,
    },
    /// EOI retired this vector from ISR (SDM §11.8.5): its handler ended.
    Eoi {
        /// The vector.
        vector: u8,
    },
    /// A non-vectored event arrived: NMI, SMI, INIT, SIPI or ExtINT.
    Event {
        /// What kind.
        mode: crate::DeliveryMode,
        /// The SIPI start page (0 for the others).
        vector: u8,
        /// Its origin.
        source: Source,
    },
    /// TPR changed (MMIO, MSR or CR8).
    Tpr {
        /// The new value.
        tpr: u8,
    },
    /// The registers were reset (INIT or RESET): ISR and IRR emptied.
    Reset,
}

/// A [`TraceKind`] at VM time `time` (nanoseconds, the latest `now` the APIC saw).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TraceEvent {
    /// VM time in nanoseconds.
    pub time: u64,
    /// What happened.
    pub kind: TraceKind,
}

const EMPTY: TraceEvent = TraceEvent {
    time: 0,
    kind: TraceKind::Reset,
};

/// A fixed ring of [`TraceEvent`]s, off by default.
#[derive(Clone, Debug)]
pub struct TraceRing {
    events: [TraceEvent; TRACE_CAPACITY],
    len: usize,
    lost: u64,
    enabled: bool,
    /// The origin of the delivery under way, set by the fabric or the LVT path.
    source: Source,
}

impl Default for TraceRing {
    fn default() -> Self {
        Self {
            events: [EMPTY; TRACE_CAPACITY],
            len: 0,
            lost: 0,
            enabled: false,
            source: Source::Unknown,
        }
    }
}

impl TraceRing {
    /// Whether events are recorded.
    #[inline(always)]
    pub fn enabled(&self) -> bool {
        self.enabled
    }

    /// Events dropped because the ring was full, since the APIC was built.
    pub fn lost(&self) -> u64 {
        self.lost
    }

    /// Events waiting to be drained.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no event waits.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub(crate) fn set_enabled(&mut self, on: bool) {
        self.enabled = on;
        self.source = Source::Unknown;
    }

    /// Appends one event, or counts it lost (callers test [`TraceRing::enabled`]
    /// first: the trace macros do).
    #[inline(never)]
    pub(crate) fn record(&mut self, time: u64, kind: TraceKind) {
        if !self.enabled {
            return;
        }
        match self.events.get_mut(self.len) {
            Some(slot) => {
                *slot = TraceEvent { time, kind };
                self.len = self.len.saturating_add(1);
            }
            None => self.lost = self.lost.saturating_add(1),
        }
    }

    /// Notes the origin of the delivery about to happen.
    #[inline]
    pub(crate) fn set_source(&mut self, s: Source) {
        self.source = s;
    }

    /// The origin noted for this delivery, cleared.
    #[inline]
    pub(crate) fn take_source(&mut self) -> Source {
        core::mem::take(&mut self.source)
    }

    /// Hands every waiting event to `f`, oldest first, and empties the ring.
    pub(crate) fn drain(&mut self, mut f: impl FnMut(TraceEvent)) {
        for e in self.events.iter().take(self.len) {
            f(*e);
        }
        self.len = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_ring_counts_the_rest_lost_and_drains_in_order() {
        let mut r = TraceRing::default();
        r.record(1, TraceKind::Reset);
        assert!(r.is_empty(), "off by default: nothing recorded");
        r.set_enabled(true);
        for t in 0..(TRACE_CAPACITY as u64 + 3) {
            r.record(t, TraceKind::Tpr { tpr: t as u8 });
        }
        assert_eq!((r.len(), r.lost()), (TRACE_CAPACITY, 3));
        let mut times = alloc::vec::Vec::new();
        r.drain(|e| times.push(e.time));
        assert_eq!(
            times,
            (0..TRACE_CAPACITY as u64).collect::<alloc::vec::Vec<_>>()
        );
        assert!(r.is_empty());
    }
}
