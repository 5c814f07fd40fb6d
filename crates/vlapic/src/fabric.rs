//! The VM-level interrupt fabric: N local APICs, one IOAPIC and MSI, routing every message
//! between them and reporting exactly which vCPUs need a kick ([`Wake`]).
//!
//! Two front ends share one routing core:
//!
//! * [`Fabric`] (no `std`, needs `alloc`): owns the APICs and the IOAPIC, `&mut self`
//!   everywhere; for single-threaded VMMs, tests and tools.
//! * [`SharedFabric`] (feature `std`): `Send + Sync`, one per VM, shared by the vCPU
//!   threads. See "Threads" below.
//!
//! # Delivery
//!
//! A message is resolved to target APICs by [`crate::routing`]; each target then gets
//! [`LocalApic::deliver`] (fixed vectors into IRR/TMR, NMI/SMI/INIT/SIPI/ExtINT into
//! [`crate::Events`]; INIT resets the target keeping its ID and mode). A vCPU is in
//! the returned [`Wake`] when its APIC took the message and now has work
//! ([`LocalApic::needs_kick`]: work to take, or a vector only TPR holds back). Messages that match nothing (a nonexistent ID, say)
//! are dropped. Every access goes through the fabric, and after each one the APIC's
//! routing view (ID, LDR, DFR, mode, enable) is compared with the map's; a
//! difference marks the map stale and it is rebuilt before the next lookup. The
//! `routing_changed` effect is therefore not needed, and state changed behind the
//! ICR (INIT, imports, resets done inside [`SharedFabric::with_apic`]) is caught too.
//!
//! # Lowest priority (SDM §11.6.2.4)
//!
//! Among the targets that are software-enabled, the one with the lowest processor
//! priority (PPR, all 8 bits) wins. Ties go to the first target at or after a
//! rotating arbitration pointer, which then moves just past the winner, so repeated
//! ties rotate over the tied APICs (the P6 rotating arbitration ID). No
//! software-enabled target: the message is dropped. The priorities are read one
//! lock at a time, so the winner can be software-disabled by its own vCPU before the
//! delivery reaches it; it then refuses, and arbitration runs again among the
//! candidates that have not refused (at most once per candidate). A message is
//! therefore lost only if no destination accepts it when it arrives. The same applies to an MSI with
//! the redirection hint and to IOAPIC entries in lowest-priority mode. Focus
//! processor checking is not modelled (SVR bit 9 is reserved since the Pentium 4).
//!
//! # Threads
//!
//! [`SharedFabric`] has one mutex per APIC, a mutex for the IOAPIC and a read-mostly
//! published map. A call locks at most one APIC at a time: the sender's lock is
//! released before any target is locked; targets are locked one after the other,
//! each only for its `deliver` (lowest-priority arbitration reads each candidate's
//! PPR under its lock, one by one). Lock order: IOAPIC → one APIC → view table →
//! published map; nothing is ever taken against that order, so there is no
//! deadlock. A vCPU thread holds its own APIC lock only while it handles an exit,
//! so senders wait at most that long. The closure given to
//! [`SharedFabric::with_apic`] runs under that vCPU's lock and must not call back
//! into the fabric (that would hold two APIC locks, or deadlock on its own).
//!
//! ```
//! use vlapic::fabric::{FabricConfig, SharedFabric};
//!
//! let fabric = SharedFabric::new(FabricConfig::with_vcpus(2));
//! let svr = 0xFEE0_00F0; // MMIO exits carry guest-physical addresses
//! for vcpu in 0..2 {
//!     fabric.mmio_write(vcpu, svr, &0x1FFu32.to_le_bytes(), 0); // SVR: enable
//! }
//! // vCPU 0's thread: the guest writes ICR high (destination 1), then ICR low.
//! fabric.mmio_write(0, 0xFEE0_0310, &(1u32 << 24).to_le_bytes(), 0);
//! let wake = fabric.mmio_write(0, 0xFEE0_0300, &0x4041u32.to_le_bytes(), 0).unwrap();
//! assert_eq!(wake.iter().collect::<Vec<_>>(), [1]); // kick vCPU 1 only
//! // vCPU 1's thread, before entering the guest (interrupts open): the entry plan.
//! let plan = fabric.plan_entry(1, 0, true).unwrap();
//! assert_eq!(plan.inject, Some(0x41)); // acknowledged: inject it
//! assert!(!plan.request_window);
//! assert_eq!(fabric.read_apic(1, |apic| apic.ppr()), Some(0x40));
//! // Not an interrupt-controller page: the VMM's other devices get it.
//! assert!(!fabric.mmio_read(1, 0xFED0_0000, &mut [0u8; 4], 0));
//! ```

pub use crate::ioapic::IoApic;
pub use crate::msi::MsiError;

use crate::delivery::{Delivery, DeliveryMode};
use crate::ioapic::PinSet;
use crate::lapic::{ApicMode, Effects, Events, GpFault, LapicConfig, LocalApic};
use crate::msi::Msi;
use crate::routing::{ApicView, Message, RouteMap};
use crate::state::{FabricError, FabricState};
use alloc::vec::Vec;

mod seam;

/// Construction-time description of a VM's interrupt hardware.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FabricConfig {
    /// One entry per vCPU, in vCPU-index order.
    pub apics: Vec<LapicConfig>,
    /// IOAPIC pin count (default 24, clamped to 1..=120).
    pub ioapic_pins: u8,
    /// IOAPIC ID (4 bits).
    pub ioapic_id: u8,
    /// Guest-physical address of the IOAPIC's 4 KiB MMIO page, for the dispatch by
    /// address of [`Fabric::mmio_read`] and friends (default
    /// [`IoApic::DEFAULT_BASE`], 0xFEC0_0000; bits 11:0 are ignored).
    pub ioapic_base: u64,
}

impl FabricConfig {
    /// `n` vCPUs with APIC IDs 0..n, vCPU 0 the BSP; xAPIC mode at power-up when every
    /// ID fits in 8 bits, else x2APIC mode; 24 IOAPIC pins with ID 0 at 0xFEC0_0000.
    pub fn with_vcpus(n: usize) -> Self {
        let x2 = n > 0xFF;
        let apics = (0..n)
            .map(|i| {
                let mut c = LapicConfig::with_id(u32::try_from(i).unwrap_or(u32::MAX));
                if x2 {
                    c.mode = ApicMode::X2Apic;
                }
                c
            })
            .collect();
        Self {
            apics,
            ioapic_pins: IoApic::DEFAULT_PINS,
            ioapic_id: 0,
            ioapic_base: IoApic::DEFAULT_BASE,
        }
    }
}

impl Default for FabricConfig {
    /// One vCPU (the BSP, APIC ID 0), 24 IOAPIC pins.
    fn default() -> Self {
        Self::with_vcpus(1)
    }
}

/// The vCPUs that need a kick after a fabric operation, sorted, each once.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Wake {
    /// The vCPU to kick when there is exactly one (the unicast case: no allocation).
    one: Option<u32>,
    /// Every vCPU to kick when there are two or more; empty otherwise (once normalized).
    vcpus: Vec<u32>,
    timer_changed: bool,
}

impl Wake {
    /// No vCPU to kick.
    pub fn is_empty(&self) -> bool {
        self.one.is_none() && self.vcpus.is_empty()
    }

    /// Number of vCPUs to kick.
    pub fn len(&self) -> usize {
        usize::from(self.one.is_some()).saturating_add(self.vcpus.len())
    }

    /// The vCPU indices to kick, ascending.
    pub fn iter(&self) -> impl Iterator<Item = usize> + '_ {
        self.one
            .iter()
            .chain(self.vcpus.iter())
            .map(|&v| v as usize)
    }

    /// Whether `vcpu` must be kicked.
    pub fn contains(&self, vcpu: usize) -> bool {
        u32::try_from(vcpu)
            .is_ok_and(|v| self.one == Some(v) || self.vcpus.binary_search(&v).is_ok())
    }

    /// The accessing APIC reported a timer change (re-read its
    /// [`LocalApic::next_timer_deadline`]).
    pub fn timer_changed(&self) -> bool {
        self.timer_changed
    }

    /// Adds the vCPUs of `other` (and its timer flag).
    pub fn merge(&mut self, other: &Wake) {
        for v in other.iter() {
            self.push(v);
        }
        self.timer_changed |= other.timer_changed;
        self.normalize();
    }

    fn push(&mut self, vcpu: usize) {
        let Ok(v) = u32::try_from(vcpu) else {
            return;
        };
        if !self.vcpus.is_empty() {
            self.vcpus.push(v);
            return;
        }
        match self.one {
            None => self.one = Some(v),
            Some(o) if o == v => {}
            Some(o) => {
                self.one = None;
                self.vcpus.extend_from_slice(&[o, v]);
            }
        }
    }

    /// Sorts and deduplicates; exactly one vCPU is kept in `one`, more in `vcpus`.
    fn normalize(&mut self) {
        if self.vcpus.is_empty() {
            return;
        }
        if let Some(o) = self.one.take() {
            self.vcpus.push(o);
        }
        if self.vcpus.len() > 1 {
            self.vcpus.sort_unstable();
            self.vcpus.dedup();
        }
        if self.vcpus.len() == 1 {
            self.one = self.vcpus.pop();
        }
    }
}

// ----- the routing core --------------------------------------------------------

/// Access to the APICs of one VM, one at a time. Implementations keep the routing
/// views in step with every access.
trait ApicAccess {
    fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R>;
}

/// Result of routing one message.
struct Routed {
    /// Targets whose APIC took the message.
    accepted: usize,
    /// New lowest-priority rotor, if arbitration ran.
    rotor: Option<usize>,
}

/// Routes one message over `map`. `rotor` is the lowest-priority arbitration pointer.
#[inline]
fn route_message<A: ApicAccess>(
    apics: &mut A,
    map: &RouteMap,
    rotor: usize,
    msg: &Message,
    sender: Option<usize>,
    now: u64,
    wake: &mut Wake,
) -> Routed {
    let d = msg.delivery;
    if d.mode == DeliveryMode::LowestPriority {
        return route_lowest_priority(apics, map, rotor, msg, sender, now, wake);
    }
    let mut accepted = 0usize;
    map.resolve(&msg.dest, sender, |t| {
        if deliver_one(apics, t, d, now, wake) {
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
fn route_lowest_priority<A: ApicAccess>(
    apics: &mut A,
    map: &RouteMap,
    rotor: usize,
    msg: &Message,
    sender: Option<usize>,
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
        map.resolve(&msg.dest, sender, |t| {
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
        match deliver_to(apics, w, d, now, wake) {
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
enum Outcome {
    /// Taken.
    Accepted,
    /// Refused because the APIC was (software- or hardware-) disabled when it arrived.
    Disabled,
    /// Refused for another reason (an illegal vector, which latched ESR).
    Refused,
}

fn deliver_to<A: ApicAccess>(
    apics: &mut A,
    t: usize,
    d: Delivery,
    now: u64,
    wake: &mut Wake,
) -> Outcome {
    let Some((ok, work, enabled)) = apics.with(t, |a| {
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
fn deliver_one<A: ApicAccess>(
    apics: &mut A,
    t: usize,
    d: Delivery,
    now: u64,
    wake: &mut Wake,
) -> bool {
    matches!(deliver_to(apics, t, d, now, wake), Outcome::Accepted)
}

/// Fires IOAPIC pins through `route` (which returns how many APICs accepted), setting
/// remote IRR for accepted level-triggered interrupts.
fn service_pins(io: &mut IoApic, pins: PinSet, mut route: impl FnMut(&Message) -> usize) {
    for pin in pins.iter() {
        let Some(msg) = io.message(pin) else { continue };
        if route(&msg) > 0 && msg.delivery.level_triggered {
            io.set_remote_irr(pin);
        }
    }
}

fn one_pin(pin: Option<u8>) -> PinSet {
    let mut s = PinSet::EMPTY;
    if let Some(p) = pin {
        s.insert(p);
    }
    s
}

// ----- the single-threaded fabric ------------------------------------------------

/// APIC storage and routing state of [`Fabric`] (split from the IOAPIC for borrows).
#[derive(Clone, Debug)]
struct Core {
    apics: Vec<LocalApic>,
    views: Vec<ApicView>,
    map: RouteMap,
    dirty: bool,
    rotor: usize,
}

struct CoreAccess<'a> {
    apics: &'a mut [LocalApic],
    views: &'a mut [ApicView],
    dirty: &'a mut bool,
}

impl ApicAccess for CoreAccess<'_> {
    fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        let apic = self.apics.get_mut(idx)?;
        let r = f(apic);
        let view = ApicView::of(apic);
        if let Some(old) = self.views.get_mut(idx) {
            if *old != view {
                *old = view;
                *self.dirty = true;
            }
        }
        Some(r)
    }
}

impl Core {
    fn new(cfgs: &[LapicConfig]) -> Self {
        let apics: Vec<LocalApic> = cfgs.iter().map(|c| LocalApic::new(*c)).collect();
        let views: Vec<ApicView> = apics.iter().map(ApicView::of).collect();
        let map = RouteMap::build(&views);
        Self {
            apics,
            views,
            map,
            dirty: false,
            rotor: 0,
        }
    }

    fn access(&mut self) -> (CoreAccess<'_>, &RouteMap) {
        if self.dirty {
            self.map = RouteMap::build(&self.views);
            self.dirty = false;
        }
        (
            CoreAccess {
                apics: &mut self.apics,
                views: &mut self.views,
                dirty: &mut self.dirty,
            },
            &self.map,
        )
    }

    fn route(&mut self, msg: &Message, sender: Option<usize>, now: u64, wake: &mut Wake) -> usize {
        let rotor = self.rotor;
        let (mut acc, map) = self.access();
        let r = route_message(&mut acc, map, rotor, msg, sender, now, wake);
        if let Some(new) = r.rotor {
            self.rotor = new;
        }
        r.accepted
    }

    fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        let (mut acc, _) = self.access();
        acc.with(idx, f)
    }
}

/// The single-threaded fabric: owns the APICs and the IOAPIC. Same operations and
/// semantics as [`SharedFabric`], through `&mut self`; usable without `std`.
#[derive(Clone, Debug)]
pub struct Fabric {
    core: Core,
    ioapic: IoApic,
    ioapic_base: u64,
}

impl Fabric {
    /// Builds the APICs (power-up state) and the IOAPIC (reset state).
    pub fn new(cfg: FabricConfig) -> Self {
        Self {
            core: Core::new(&cfg.apics),
            ioapic: IoApic::new(cfg.ioapic_pins, cfg.ioapic_id),
            ioapic_base: cfg.ioapic_base,
        }
    }

    /// Number of vCPUs.
    pub fn len(&self) -> usize {
        self.core.apics.len()
    }

    /// Whether there is no vCPU.
    pub fn is_empty(&self) -> bool {
        self.core.apics.is_empty()
    }

    /// Read access to one APIC.
    pub fn apic(&self, vcpu: usize) -> Option<&LocalApic> {
        self.core.apics.get(vcpu)
    }

    /// The IOAPIC.
    pub fn ioapic(&self) -> &IoApic {
        &self.ioapic
    }

    /// Runs `f` on vCPU `vcpu`'s APIC, then routes the [`Effects`] it returns (IPI,
    /// EOI broadcast to the IOAPIC). `None` if the vCPU does not exist.
    pub fn with_apic<R>(
        &mut self,
        vcpu: usize,
        now: u64,
        f: impl FnOnce(&mut LocalApic) -> (R, Effects),
    ) -> Option<(R, Wake)> {
        let (r, fx) = self.core.with(vcpu, f)?;
        Some((r, self.effects(vcpu, fx, now)))
    }

    fn effects(&mut self, vcpu: usize, fx: Effects, now: u64) -> Wake {
        let mut wake = Wake {
            timer_changed: fx.timer_changed,
            ..Wake::default()
        };
        if let Some(ipi) = fx.ipi {
            self.core
                .route(&Message::from(ipi), Some(vcpu), now, &mut wake);
        }
        if let Some(v) = fx.eoi {
            let pins = self.ioapic.eoi(v);
            self.service(pins, now, &mut wake);
        }
        wake.normalize();
        wake
    }

    fn service(&mut self, pins: PinSet, now: u64, wake: &mut Wake) {
        let core = &mut self.core;
        service_pins(&mut self.ioapic, pins, |m| core.route(m, None, now, wake));
    }

    /// Routes a message that no APIC sent (a platform NMI, a test). Self shorthands
    /// reach nobody.
    pub fn send(&mut self, msg: &Message, now: u64) -> Wake {
        let mut wake = Wake::default();
        self.core.route(msg, None, now, &mut wake);
        wake.normalize();
        wake
    }

    /// A guest read of the xAPIC page of `vcpu` (all ones if the vCPU does not exist).
    pub fn lapic_mmio_read(&mut self, vcpu: usize, offset: u64, data: &mut [u8], now: u64) {
        if self
            .core
            .with(vcpu, |a| a.mmio_read(offset, data, now))
            .is_none()
        {
            data.fill(0xFF);
        }
    }

    /// A guest write to the xAPIC page of `vcpu`.
    pub fn lapic_mmio_write(&mut self, vcpu: usize, offset: u64, data: &[u8], now: u64) -> Wake {
        self.with_apic(vcpu, now, |a| ((), a.mmio_write(offset, data, now)))
            .map(|(_, w)| w)
            .unwrap_or_default()
    }

    /// RDMSR on `vcpu` (#GP if the vCPU does not exist).
    pub fn lapic_msr_read(&mut self, vcpu: usize, msr: u32, now: u64) -> Result<u64, GpFault> {
        self.core
            .with(vcpu, |a| a.read_msr(msr, now))
            .unwrap_or(Err(GpFault))
    }

    /// WRMSR on `vcpu` (#GP if the vCPU does not exist).
    pub fn lapic_msr_write(
        &mut self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Wake, GpFault> {
        let (res, wake) = self
            .with_apic(vcpu, now, |a| match a.write_msr(msr, value, now) {
                Ok(fx) => (Ok(()), fx),
                Err(e) => (Err(e), Effects::default()),
            })
            .ok_or(GpFault)?;
        res.map(|()| wake)
    }

    /// Drives LINT0/LINT1 of `vcpu`.
    pub fn set_lint(&mut self, vcpu: usize, pin: u8, level: bool, now: u64) -> Wake {
        let mut wake = Wake::default();
        if self
            .core
            .with(vcpu, |a| a.set_lint(pin, level, now) && a.needs_kick())
            == Some(true)
        {
            wake.push(vcpu);
        }
        wake
    }

    /// A guest read of the IOAPIC page (`offset` from its base).
    pub fn ioapic_mmio_read(&mut self, offset: u64, data: &mut [u8], _now: u64) {
        self.ioapic.mmio_read(offset, data);
    }

    /// A guest write to the IOAPIC page (`offset` from its base).
    pub fn ioapic_mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Wake {
        let pins = self.ioapic.mmio_write(offset, data);
        let mut wake = Wake::default();
        self.service(pins, now, &mut wake);
        wake.normalize();
        wake
    }

    /// Drives IOAPIC pin `pin` (out-of-range pins are ignored).
    pub fn set_irq_line(&mut self, pin: u32, level: bool, now: u64) -> Wake {
        let pins = one_pin(self.ioapic.set_line(pin, level));
        let mut wake = Wake::default();
        self.service(pins, now, &mut wake);
        wake.normalize();
        wake
    }

    /// Fires every IOAPIC level pin that is asserted, unmasked and not in service
    /// (after importing IOAPIC state).
    pub fn ioapic_service(&mut self, now: u64) -> Wake {
        let pins = self.ioapic.pending();
        let mut wake = Wake::default();
        self.service(pins, now, &mut wake);
        wake.normalize();
        wake
    }

    /// An MSI write (see [`crate::msi`]).
    pub fn msi(&mut self, address: u64, data: u32, now: u64) -> Result<Wake, MsiError> {
        let msi = Msi::decode(address, data)?;
        let mut wake = Wake::default();
        if let Some(m) = msi.message() {
            self.core.route(&m, None, now, &mut wake);
        }
        wake.normalize();
        Ok(wake)
    }

    /// Runs `f` on the IOAPIC (state export/import). Nothing is sent; call
    /// [`Fabric::ioapic_service`] after an import.
    pub fn with_ioapic<R>(&mut self, f: impl FnOnce(&mut IoApic) -> R) -> R {
        f(&mut self.ioapic)
    }

    /// Takes `vcpu`'s pending non-vectored events.
    pub fn take_events(&mut self, vcpu: usize) -> Option<Events> {
        self.core.with(vcpu, |a| a.take_events())
    }

    /// The architectural state of every APIC and the IOAPIC (issue: migration).
    pub fn export(&self) -> FabricState {
        FabricState {
            apics: self.core.apics.iter().map(LocalApic::export).collect(),
            ioapic: self.ioapic.export(),
        }
    }

    /// Validates `state` against this VM's APICs and IOAPIC, then installs it; on
    /// error nothing changes. Afterwards the routing map follows the imported IDs,
    /// asserted level lines with remote IRR clear are re-delivered, and the returned
    /// [`Wake`] names every vCPU with something to take.
    pub fn import(&mut self, state: &FabricState, now: u64) -> Result<Wake, FabricError> {
        let cfgs: Vec<LapicConfig> = self.core.apics.iter().map(|a| *a.config()).collect();
        check_fabric_import(state, &cfgs, &self.ioapic)?;
        for (i, s) in state.apics.iter().enumerate() {
            let r = self.core.with(i, |a| a.import(s, now));
            if let Some(Err(error)) = r {
                return Err(FabricError::Apic { index: i, error });
            }
        }
        self.ioapic
            .import(&state.ioapic)
            .map_err(FabricError::IoApic)?;
        let mut wake = self.ioapic_service(now);
        for i in 0..self.core.apics.len() {
            if self.core.with(i, |a| a.needs_kick()) == Some(true) {
                wake.push(i);
            }
        }
        wake.normalize();
        Ok(wake)
    }

    /// The routing map currently in use (rebuilt first if stale).
    pub fn route_map(&mut self) -> &RouteMap {
        self.core.access().1
    }
}

/// Every rule of a fabric import, stopping at the first: the fabric's rules, then the
/// IOAPIC's pin count.
fn check_fabric_import(
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

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
pub use shared::SharedFabric;

#[cfg(feature = "std")]
mod shared {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard, PoisonError, RwLock};

    mod seam;

    /// One APIC and the routing view last published for it.
    struct Slot {
        apic: LocalApic,
        view: ApicView,
    }

    /// The fabric shared by a VM's vCPU threads (`Send + Sync`). One mutex per APIC,
    /// never two held at once; see the module documentation for the lock order.
    pub struct SharedFabric {
        apics: Box<[Mutex<Slot>]>,
        /// Latest view of every APIC; `dirty` says the published map is older.
        views: Mutex<Vec<ApicView>>,
        dirty: AtomicBool,
        map: RwLock<Arc<RouteMap>>,
        ioapic: Mutex<IoApic>,
        ioapic_base: u64,
        rotor: AtomicUsize,
    }

    // The contract: one fabric shared by every vCPU thread.
    const _: () = {
        const fn shared<T: Send + Sync>() {}
        shared::<SharedFabric>()
    };

    fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
        m.lock().unwrap_or_else(PoisonError::into_inner)
    }

    struct Locked<'a>(&'a SharedFabric);

    impl ApicAccess for Locked<'_> {
        fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
            self.0.locked(idx, f)
        }
    }

    impl core::fmt::Debug for SharedFabric {
        fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
            f.debug_struct("SharedFabric")
                .field("vcpus", &self.apics.len())
                .finish_non_exhaustive()
        }
    }

    impl SharedFabric {
        /// Builds the APICs (power-up state) and the IOAPIC (reset state).
        pub fn new(cfg: FabricConfig) -> Self {
            let apics: Vec<LocalApic> = cfg.apics.iter().map(|c| LocalApic::new(*c)).collect();
            let views: Vec<ApicView> = apics.iter().map(ApicView::of).collect();
            let map = Arc::new(RouteMap::build(&views));
            let slots: Vec<Mutex<Slot>> = apics
                .into_iter()
                .zip(views.iter())
                .map(|(apic, &view)| Mutex::new(Slot { apic, view }))
                .collect();
            Self {
                apics: slots.into_boxed_slice(),
                views: Mutex::new(views),
                dirty: AtomicBool::new(false),
                map: RwLock::new(map),
                ioapic: Mutex::new(IoApic::new(cfg.ioapic_pins, cfg.ioapic_id)),
                ioapic_base: cfg.ioapic_base,
                rotor: AtomicUsize::new(0),
            }
        }

        /// Number of vCPUs.
        pub fn len(&self) -> usize {
            self.apics.len()
        }

        /// Whether there is no vCPU.
        pub fn is_empty(&self) -> bool {
            self.apics.is_empty()
        }

        /// Locks one APIC, runs `f`, publishes a changed routing view, unlocks.
        #[inline]
        fn locked<R>(&self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
            let mut slot = lock(self.apics.get(idx)?);
            let r = f(&mut slot.apic);
            let view = ApicView::of(&slot.apic);
            if view != slot.view {
                slot.view = view;
                let mut views = lock(&self.views);
                if let Some(v) = views.get_mut(idx) {
                    *v = view;
                }
                self.dirty.store(true, Ordering::Release);
            }
            Some(r)
        }

        /// The published map, rebuilt first if a view changed.
        fn map(&self) -> Arc<RouteMap> {
            if self.dirty.load(Ordering::Acquire) {
                let views = lock(&self.views);
                if self.dirty.swap(false, Ordering::AcqRel) {
                    let fresh = Arc::new(RouteMap::build(&views));
                    *self.map.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                }
            }
            self.map
                .read()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
        }

        fn route(&self, msg: &Message, sender: Option<usize>, now: u64, wake: &mut Wake) -> usize {
            let map = self.map();
            let rotor = self.rotor.load(Ordering::Relaxed);
            let r = route_message(&mut Locked(self), &map, rotor, msg, sender, now, wake);
            if let Some(new) = r.rotor {
                self.rotor.store(new, Ordering::Relaxed);
            }
            r.accepted
        }

        /// Services IOAPIC pins; the IOAPIC lock is held across routing so that
        /// remote IRR is set before any EOI for the interrupt can be processed.
        fn service(&self, io: &mut IoApic, pins: PinSet, now: u64, wake: &mut Wake) {
            service_pins(io, pins, |m| self.route(m, None, now, wake));
        }

        /// Locks vCPU `vcpu`'s APIC, runs `f`, releases it, then routes the
        /// [`Effects`] `f` returned: the IPI, the EOI broadcast to the IOAPIC. The
        /// routing map follows any ID/LDR/DFR/enable/mode change `f` made. `None` if
        /// the vCPU does not exist. The caller's own vCPU appears in the [`Wake`]
        /// only if routing delivered to it (e.g. an all-including-self IPI); the
        /// caller re-checks its own APIC anyway. `f` must not call into the fabric.
        pub fn with_apic<R>(
            &self,
            vcpu: usize,
            now: u64,
            f: impl FnOnce(&mut LocalApic) -> (R, Effects),
        ) -> Option<(R, Wake)> {
            let (r, fx) = self.locked(vcpu, f)?;
            Some((r, self.effects(vcpu, fx, now)))
        }

        fn effects(&self, vcpu: usize, fx: Effects, now: u64) -> Wake {
            let mut wake = Wake {
                timer_changed: fx.timer_changed,
                ..Wake::default()
            };
            if let Some(ipi) = fx.ipi {
                self.route(&Message::from(ipi), Some(vcpu), now, &mut wake);
            }
            if let Some(v) = fx.eoi {
                let mut io = lock(&self.ioapic);
                let pins = io.eoi(v);
                self.service(&mut io, pins, now, &mut wake);
            }
            wake.normalize();
            wake
        }

        /// Routes a message that no APIC sent (a platform NMI, a test, a benchmark).
        pub fn send(&self, msg: &Message, now: u64) -> Wake {
            let mut wake = Wake::default();
            self.route(msg, None, now, &mut wake);
            wake.normalize();
            wake
        }

        /// A guest read of the xAPIC page of `vcpu` (all ones if the vCPU does not exist).
        pub fn lapic_mmio_read(&self, vcpu: usize, offset: u64, data: &mut [u8], now: u64) {
            if self
                .locked(vcpu, |a| a.mmio_read(offset, data, now))
                .is_none()
            {
                data.fill(0xFF);
            }
        }

        /// A guest write to the xAPIC page of `vcpu`.
        pub fn lapic_mmio_write(&self, vcpu: usize, offset: u64, data: &[u8], now: u64) -> Wake {
            self.with_apic(vcpu, now, |a| ((), a.mmio_write(offset, data, now)))
                .map(|(_, w)| w)
                .unwrap_or_default()
        }

        /// RDMSR on `vcpu` (#GP if the vCPU does not exist).
        pub fn lapic_msr_read(&self, vcpu: usize, msr: u32, now: u64) -> Result<u64, GpFault> {
            self.locked(vcpu, |a| a.read_msr(msr, now))
                .unwrap_or(Err(GpFault))
        }

        /// WRMSR on `vcpu` (#GP if the vCPU does not exist).
        pub fn lapic_msr_write(
            &self,
            vcpu: usize,
            msr: u32,
            value: u64,
            now: u64,
        ) -> Result<Wake, GpFault> {
            let (res, wake) = self
                .with_apic(vcpu, now, |a| match a.write_msr(msr, value, now) {
                    Ok(fx) => (Ok(()), fx),
                    Err(e) => (Err(e), Effects::default()),
                })
                .ok_or(GpFault)?;
            res.map(|()| wake)
        }

        /// A guest read of the IOAPIC page (`offset` from its base).
        pub fn ioapic_mmio_read(&self, offset: u64, data: &mut [u8], _now: u64) {
            lock(&self.ioapic).mmio_read(offset, data);
        }

        /// A guest write to the IOAPIC page (`offset` from its base): IOREGSEL, IOWIN,
        /// EOI register.
        pub fn ioapic_mmio_write(&self, offset: u64, data: &[u8], now: u64) -> Wake {
            let mut wake = Wake::default();
            let mut io = lock(&self.ioapic);
            let pins = io.mmio_write(offset, data);
            self.service(&mut io, pins, now, &mut wake);
            drop(io);
            wake.normalize();
            wake
        }

        /// Drives IOAPIC pin `pin` to `level` (out-of-range pins are ignored).
        pub fn set_irq_line(&self, pin: u32, level: bool, now: u64) -> Wake {
            let mut wake = Wake::default();
            let mut io = lock(&self.ioapic);
            let pins = one_pin(io.set_line(pin, level));
            self.service(&mut io, pins, now, &mut wake);
            drop(io);
            wake.normalize();
            wake
        }

        /// Fires every IOAPIC level pin that is asserted, unmasked and not in service
        /// (after importing IOAPIC state).
        pub fn ioapic_service(&self, now: u64) -> Wake {
            let mut wake = Wake::default();
            let mut io = lock(&self.ioapic);
            let pins = io.pending();
            self.service(&mut io, pins, now, &mut wake);
            drop(io);
            wake.normalize();
            wake
        }

        /// An MSI write (see [`crate::msi`]); malformed messages are refused.
        pub fn msi(&self, address: u64, data: u32, now: u64) -> Result<Wake, MsiError> {
            let msi = Msi::decode(address, data)?;
            let mut wake = Wake::default();
            if let Some(m) = msi.message() {
                self.route(&m, None, now, &mut wake);
            }
            wake.normalize();
            Ok(wake)
        }

        /// Drives LINT0 (`pin` 0) or LINT1 (`pin` 1) of `vcpu`.
        pub fn set_lint(&self, vcpu: usize, pin: u8, level: bool, now: u64) -> Wake {
            let mut wake = Wake::default();
            if self.locked(vcpu, |a| a.set_lint(pin, level, now) && a.needs_kick()) == Some(true) {
                wake.push(vcpu);
            }
            wake
        }

        /// Runs `f` on the IOAPIC under its lock (state export/import). Nothing is
        /// sent; call [`SharedFabric::ioapic_service`] after an import.
        pub fn with_ioapic<R>(&self, f: impl FnOnce(&mut IoApic) -> R) -> R {
            f(&mut lock(&self.ioapic))
        }

        /// Takes `vcpu`'s pending non-vectored events.
        pub fn take_events(&self, vcpu: usize) -> Option<Events> {
            self.locked(vcpu, |a| a.take_events())
        }

        /// The architectural state of every APIC and the IOAPIC. Each APIC is locked
        /// in turn: pause the vCPUs first for a consistent snapshot.
        pub fn export(&self) -> FabricState {
            let apics = (0..self.apics.len())
                .filter_map(|i| self.locked(i, |a| a.export()))
                .collect();
            FabricState {
                apics,
                ioapic: lock(&self.ioapic).export(),
            }
        }

        /// Validates `state` against this VM's APICs and IOAPIC, then installs it; on
        /// error nothing changes. The vCPUs must be paused. Returns the vCPUs with
        /// something to take (after re-delivering asserted level lines).
        pub fn import(&self, state: &FabricState, now: u64) -> Result<Wake, FabricError> {
            let cfgs: Vec<LapicConfig> = (0..self.apics.len())
                .filter_map(|i| self.locked(i, |a| *a.config()))
                .collect();
            {
                let io = lock(&self.ioapic);
                check_fabric_import(state, &cfgs, &io)?;
            }
            for (i, s) in state.apics.iter().enumerate() {
                if let Some(Err(error)) = self.locked(i, |a| a.import(s, now)) {
                    return Err(FabricError::Apic { index: i, error });
                }
            }
            lock(&self.ioapic)
                .import(&state.ioapic)
                .map_err(FabricError::IoApic)?;
            let mut wake = self.ioapic_service(now);
            for i in 0..self.apics.len() {
                if self.locked(i, |a| a.needs_kick()) == Some(true) {
                    wake.push(i);
                }
            }
            wake.normalize();
            Ok(wake)
        }

        /// The routing map currently published (rebuilt first if stale).
        pub fn route_map(&self) -> Arc<RouteMap> {
            self.map()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::Destination;

    /// Disables APIC `victim` (SVR bit 8 clear) just before the `at`-th access, as
    /// another vCPU thread could between arbitration and delivery.
    struct DisableBefore<'a> {
        inner: CoreAccess<'a>,
        calls: usize,
        at: usize,
        victim: usize,
    }

    impl ApicAccess for DisableBefore<'_> {
        fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
            self.calls += 1;
            if self.calls == self.at {
                let victim = self.victim;
                self.inner.with(victim, |a| {
                    let _ = a.write_register(0xF0, 0xFF, 0);
                });
            }
            self.inner.with(idx, f)
        }
    }

    fn lowest(vector: u8) -> Message {
        Message {
            delivery: Delivery {
                mode: DeliveryMode::LowestPriority,
                vector,
                level_triggered: false,
            },
            dest: Destination::physical(0xFF, false),
        }
    }

    // Finding 4 (issue 10): the arbitration winner is software-disabled after the
    // priorities were read (two reads, then the delivery is access 3). SDM §11.6.2.4:
    // the message goes to a destination processor that can take it; APIC 1 can.
    #[test]
    fn lowest_priority_retries_when_the_winner_refuses() {
        let mut core = Core::new(&[LapicConfig::with_id(0), LapicConfig::with_id(1)]);
        for i in 0..2 {
            let _ = core.with(i, |a| a.write_register(0xF0, 0x1FF, 0));
        }
        let (acc, map) = core.access();
        let map = map.clone();
        let mut acc = DisableBefore {
            inner: acc,
            calls: 0,
            at: 3,
            victim: 0,
        };
        let mut wake = Wake::default();
        let r = route_message(&mut acc, &map, 0, &lowest(0x41), None, 5, &mut wake);
        assert_eq!(r.accepted, 1, "delivered to the APIC still enabled");
        assert_eq!(
            r.rotor,
            Some(0),
            "rotor moves past the actual winner (1 of 2)"
        );
        assert_eq!(wake.iter().collect::<Vec<_>>(), [1]);
        assert!(core.apics[1].irr().contains(0x41));
        assert!(!core.apics[0].irr().contains(0x41));
        assert_eq!(core.apics[0].stats().refused_disabled, 1);
    }

    // No candidate accepts: the retries end (bounded by the candidate count) and the
    // message is dropped, as with no software-enabled target at all.
    #[test]
    fn lowest_priority_retry_is_bounded() {
        let mut core = Core::new(&[LapicConfig::with_id(0), LapicConfig::with_id(1)]);
        let _ = core.with(0, |a| a.write_register(0xF0, 0x1FF, 0));
        let (acc, map) = core.access();
        let map = map.clone();
        let mut acc = DisableBefore {
            inner: acc,
            calls: 0,
            at: 3,
            victim: 0,
        };
        let mut wake = Wake::default();
        let r = route_message(&mut acc, &map, 0, &lowest(0x41), None, 5, &mut wake);
        assert_eq!(r.accepted, 0);
        assert!(wake.is_empty());
        assert!(acc.calls <= 6, "{} accesses", acc.calls);
    }

    // A refusal by an enabled winner (illegal vector: ESR, SDM §11.5.3) is not retried:
    // every candidate would refuse it the same way, latching ESR on each.
    #[test]
    fn lowest_priority_illegal_vector_is_not_retried() {
        let mut f = Fabric::new(FabricConfig::with_vcpus(2));
        for i in 0..2 {
            let _ = f.lapic_mmio_write(i, 0xF0, &0x1FFu32.to_le_bytes(), 0);
        }
        let wake = f.send(&lowest(0x05), 0);
        assert!(wake.is_empty());
        let esr: Vec<u32> = (0..2)
            .filter_map(|i| f.apic(i).map(|a| a.esr_pending()))
            .collect();
        assert_eq!(esr.iter().filter(|&&e| e != 0).count(), 1, "{esr:?}");
    }
}
