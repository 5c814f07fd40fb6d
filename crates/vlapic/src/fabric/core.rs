//! The routing core both front ends share: a message resolved over the route map,
//! lowest-priority arbitration, delivery to each target and IOAPIC pin service.

use super::{IoApic, Wake};
use crate::delivery::{Delivery, DeliveryMode};
use crate::ioapic::PinSet;
use crate::lapic::{LapicConfig, LocalApic};
use crate::routing::{Message, RouteMap};
use crate::state::{FabricError, FabricState};
use alloc::vec::Vec;

/// Access to the APICs of one VM, one at a time. Implementations keep the routing
/// views in step with every access.
pub(super) trait ApicAccess {
    fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R>;
}

/// Who sent a message: the sending vCPU (which shorthands include or exclude) and,
/// with feature `trace`, the origin the targets' trace records.
#[derive(Clone, Copy, Debug)]
pub(super) struct Origin {
    pub(super) sender: Option<usize>,
    #[cfg(feature = "trace")]
    pub(super) source: crate::trace::Source,
}

impl Origin {
    /// An IPI from `vcpu`'s ICR.
    #[inline(always)]
    pub(super) fn vcpu(vcpu: usize) -> Self {
        Self {
            sender: Some(vcpu),
            #[cfg(feature = "trace")]
            source: crate::trace::Source::Ipi {
                from: u32::try_from(vcpu).unwrap_or(u32::MAX),
            },
        }
    }

    /// IOAPIC pin `_pin`.
    #[inline(always)]
    pub(super) fn pin(_pin: u8) -> Self {
        Self {
            sender: None,
            #[cfg(feature = "trace")]
            source: crate::trace::Source::IoApic { pin: _pin },
        }
    }

    /// An MSI write.
    #[inline(always)]
    pub(super) fn msi() -> Self {
        Self {
            sender: None,
            #[cfg(feature = "trace")]
            source: crate::trace::Source::Msi,
        }
    }

    /// A message the embedder routed itself.
    #[inline(always)]
    pub(super) fn host() -> Self {
        Self {
            sender: None,
            #[cfg(feature = "trace")]
            source: crate::trace::Source::Host,
        }
    }
}

/// The origin handed to each target's trace: the trace's source with feature
/// `trace`, nothing (a zero-sized value, no register passed) without it.
#[cfg(feature = "trace")]
pub(super) type TraceSource = crate::trace::Source;
/// The origin handed to each target's trace (nothing without feature `trace`).
#[cfg(not(feature = "trace"))]
pub(super) type TraceSource = NoSource;

/// Zero-sized: what the targets' traces get without feature `trace`.
#[cfg(not(feature = "trace"))]
#[derive(Clone, Copy, Debug)]
pub(super) struct NoSource;

impl Origin {
    /// What the targets' traces record as the origin.
    #[inline(always)]
    pub(super) fn trace_source(&self) -> TraceSource {
        #[cfg(feature = "trace")]
        return self.source;
        #[cfg(not(feature = "trace"))]
        NoSource
    }
}

/// Result of routing one message.
pub(super) struct Routed {
    /// Targets whose APIC took the message.
    pub(super) accepted: usize,
    /// New lowest-priority rotor, if arbitration ran.
    pub(super) rotor: Option<usize>,
}

/// Routes one message over `map`. `rotor` is the lowest-priority arbitration pointer.
#[inline]
pub(super) fn route_message<A: ApicAccess>(
    apics: &mut A,
    map: &RouteMap,
    rotor: usize,
    msg: &Message,
    from: Origin,
    now: u64,
    wake: &mut Wake,
) -> Routed {
    let d = msg.delivery;
    if d.mode == DeliveryMode::LowestPriority {
        return route_lowest_priority(apics, map, rotor, msg, from, now, wake);
    }
    let mut accepted = 0usize;
    map.resolve(&msg.dest, from.sender, |t| {
        if deliver_one(apics, t, d, from.trace_source(), now, wake) {
            accepted = accepted.saturating_add(1);
        }
    });
    Routed {
        accepted,
        rotor: None,
    }
}

/// Lowest-priority routing: arbitration, then delivery to the winner. The winner
/// can be disabled by its own vCPU between the priority reads and the delivery
/// (each under its own lock); it then refuses, and arbitration runs again among the
/// candidates that have not refused, so a message is lost only if no candidate
/// accepts it at delivery time. Each round excludes one more candidate, so there are
/// at most as many rounds as candidates.
pub(super) fn route_lowest_priority<A: ApicAccess>(
    apics: &mut A,
    map: &RouteMap,
    rotor: usize,
    msg: &Message,
    from: Origin,
    now: u64,
    wake: &mut Wake,
) -> Routed {
    let d = msg.delivery;
    let n = map.len().max(1);
    let start = rotor.checked_rem(n).unwrap_or(0);
    // Candidates that refused because they were disabled at delivery (allocated only
    // when the race happens).
    let mut refused: Vec<usize> = Vec::new();
    let mut rotor_out = None;
    loop {
        let mut winner: Option<(u8, usize, usize)> = None; // (ppr, distance, index)
        let mut candidates = 0usize;
        map.resolve(&msg.dest, from.sender, |t| {
            candidates = candidates.saturating_add(1);
            if refused.contains(&t) {
                return;
            }
            let Some((enabled, ppr)) = apics.with(t, |a| (a.is_enabled(), a.ppr())) else {
                return;
            };
            if !enabled {
                return;
            }
            let dist = t
                .wrapping_add(n)
                .wrapping_sub(start)
                .checked_rem(n)
                .unwrap_or(0);
            if winner.is_none_or(|(p, dd, _)| (ppr, dist) < (p, dd)) {
                winner = Some((ppr, dist, t));
            }
        });
        let Some((_, _, w)) = winner else {
            return Routed {
                accepted: 0,
                rotor: rotor_out,
            };
        };
        rotor_out = Some(w.wrapping_add(1).checked_rem(n).unwrap_or(0));
        match deliver_to(apics, w, d, from.trace_source(), now, wake) {
            Outcome::Accepted => {
                return Routed {
                    accepted: 1,
                    rotor: rotor_out,
                }
            }
            Outcome::Disabled if refused.len() < candidates => refused.push(w),
            Outcome::Disabled | Outcome::Refused => {
                return Routed {
                    accepted: 0,
                    rotor: rotor_out,
                }
            }
        }
    }
}

/// What one target did with a message.
pub(super) enum Outcome {
    /// Taken.
    Accepted,
    /// Refused because the APIC was (software- or hardware-) disabled when it arrived.
    Disabled,
    /// Refused for another reason (an illegal vector, which latched ESR).
    Refused,
}

pub(super) fn deliver_to<A: ApicAccess>(
    apics: &mut A,
    t: usize,
    d: Delivery,
    _source: TraceSource,
    now: u64,
    wake: &mut Wake,
) -> Outcome {
    let Some((ok, work, enabled)) = apics.with(t, |a| {
        #[cfg(feature = "trace")]
        a.set_trace_source(_source);
        let ok = a.deliver(d, now);
        (ok, ok && a.needs_kick(), a.is_enabled())
    }) else {
        return Outcome::Refused;
    };
    if work {
        wake.push(t);
    }
    match (ok, enabled) {
        (true, _) => Outcome::Accepted,
        (false, false) => Outcome::Disabled,
        (false, true) => Outcome::Refused,
    }
}

#[inline]
pub(super) fn deliver_one<A: ApicAccess>(
    apics: &mut A,
    t: usize,
    d: Delivery,
    source: TraceSource,
    now: u64,
    wake: &mut Wake,
) -> bool {
    matches!(
        deliver_to(apics, t, d, source, now, wake),
        Outcome::Accepted
    )
}

/// Fires IOAPIC pins through `route` (which returns how many APICs accepted), setting
/// remote IRR for accepted level-triggered interrupts.
pub(super) fn service_pins(
    io: &mut IoApic,
    pins: PinSet,
    mut route: impl FnMut(&Message, Origin) -> usize,
) {
    for pin in pins.iter() {
        let Some(msg) = io.message(pin) else { continue };
        if route(&msg, Origin::pin(pin)) > 0 && msg.delivery.level_triggered {
            io.set_remote_irr(pin);
        }
    }
}

pub(super) fn one_pin(pin: Option<u8>) -> PinSet {
    let mut s = PinSet::EMPTY;
    if let Some(p) = pin {
        s.insert(p);
    }
    s
}

// ----- the single-threaded fabric ------------------------------------------------
/// Every rule of a fabric import, stopping at the first: the fabric's rules, then the
/// IOAPIC's pin count.
pub(super) fn check_fabric_import(
    state: &FabricState,
    cfgs: &[LapicConfig],
    io: &IoApic,
) -> Result<(), FabricError> {
    if let Some(e) = state.validate(cfgs).into_iter().next() {
        return Err(e);
    }
    if let Some(e) = io.check_import(&state.ioapic).into_iter().next() {
        return Err(FabricError::IoApic(e));
    }
    Ok(())
}

// ----- the shared fabric ---------------------------------------------------------
