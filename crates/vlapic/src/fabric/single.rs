//! [`Fabric`], the single-threaded front end: owns the APICs and the IOAPIC, `&mut self`
//! everywhere, no `std` needed; all routing goes through the shared core.

use super::core::*;
use super::ops::{self, Backend};
use super::{FabricConfig, IoApic, MsiError, Wake};
use crate::ioapic::PinSet;
use crate::lapic::{Effects, Events, GpFault, LapicConfig, LocalApic};
use crate::routing::{ApicView, Message, RouteMap};
use crate::state::{FabricError, FabricState};
use alloc::vec::Vec;

/// APIC storage and routing state of [`Fabric`] (split from the IOAPIC for borrows).
#[derive(Clone, Debug)]
pub(super) struct Core {
    pub(super) apics: Vec<LocalApic>,
    views: Vec<ApicView>,
    map: RouteMap,
    dirty: bool,
    rotor: usize,
}

pub(super) struct CoreAccess<'a> {
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
    pub(super) fn new(cfgs: &[LapicConfig]) -> Self {
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

    pub(super) fn access(&mut self) -> (CoreAccess<'_>, &RouteMap) {
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

    fn route(&mut self, msg: &Message, from: Origin, now: u64, wake: &mut Wake) -> usize {
        let rotor = self.rotor;
        let (mut acc, map) = self.access();
        let r = route_message(&mut acc, map, rotor, msg, from, now, wake);
        if let Some(new) = r.rotor {
            self.rotor = new;
        }
        r.accepted
    }

    pub(super) fn with<R>(&mut self, idx: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        let (mut acc, _) = self.access();
        acc.with(idx, f)
    }
}

/// The single-threaded fabric: owns the APICs and the IOAPIC, `&mut self` everywhere;
/// usable without `std`. [`SharedFabric`](super::SharedFabric) offers the same
/// operations with the same semantics through `&self`; the documentation of each
/// operation is here.
#[derive(Clone, Debug)]
pub struct Fabric {
    pub(super) core: Core,
    ioapic: IoApic,
    pub(super) ioapic_base: u64,
}

impl Backend for Fabric {
    fn len(&self) -> usize {
        self.core.apics.len()
    }

    fn ioapic_base(&self) -> u64 {
        self.ioapic_base
    }

    fn apic<R>(&mut self, vcpu: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        self.core.with(vcpu, f)
    }

    fn read<R>(&self, vcpu: usize, f: impl FnOnce(&LocalApic) -> R) -> Option<R> {
        self.core.apics.get(vcpu).map(f)
    }

    fn route(&mut self, msg: &Message, from: Origin, now: u64, wake: &mut Wake) -> usize {
        self.core.route(msg, from, now, wake)
    }

    fn ioapic<R>(
        &mut self,
        now: u64,
        wake: &mut Wake,
        f: impl FnOnce(&mut IoApic) -> (R, PinSet),
    ) -> R {
        let (r, pins) = f(&mut self.ioapic);
        let core = &mut self.core;
        service_pins(&mut self.ioapic, pins, |m, from| {
            core.route(m, from, now, wake)
        });
        r
    }

    fn read_ioapic<R>(&self, f: impl FnOnce(&IoApic) -> R) -> R {
        f(&self.ioapic)
    }
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

    /// Runs `f` on vCPU `vcpu`'s APIC, then routes the [`Effects`] it returns: the
    /// IPI, the EOI broadcast to the IOAPIC. The routing map follows any
    /// ID/LDR/DFR/enable/mode change `f` made. `None` if the vCPU does not exist.
    /// The caller's own vCPU appears in the [`Wake`] only if routing delivered to it
    /// (e.g. an all-including-self IPI); the caller re-checks its own APIC anyway.
    /// `f` must not call into the fabric.
    pub fn with_apic<R>(
        &mut self,
        vcpu: usize,
        now: u64,
        f: impl FnOnce(&mut LocalApic) -> (R, Effects),
    ) -> Option<(R, Wake)> {
        ops::with_apic(self, vcpu, now, f)
    }

    /// Routes a message that no APIC sent (a platform NMI, a test, a benchmark).
    /// Self shorthands reach nobody.
    pub fn send(&mut self, msg: &Message, now: u64) -> Wake {
        ops::send(self, msg, now)
    }

    /// A guest read of the xAPIC page of `vcpu` (all ones if the vCPU does not exist).
    pub fn lapic_mmio_read(&mut self, vcpu: usize, offset: u64, data: &mut [u8], now: u64) {
        ops::lapic_mmio_read(self, vcpu, offset, data, now)
    }

    /// A guest write to the xAPIC page of `vcpu`.
    pub fn lapic_mmio_write(&mut self, vcpu: usize, offset: u64, data: &[u8], now: u64) -> Wake {
        ops::lapic_mmio_write(self, vcpu, offset, data, now)
    }

    /// RDMSR on `vcpu` (#GP if the vCPU does not exist).
    pub fn lapic_msr_read(&mut self, vcpu: usize, msr: u32, now: u64) -> Result<u64, GpFault> {
        ops::lapic_msr_read(self, vcpu, msr, now)
    }

    /// WRMSR on `vcpu` (#GP if the vCPU does not exist).
    pub fn lapic_msr_write(
        &mut self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Wake, GpFault> {
        ops::lapic_msr_write(self, vcpu, msr, value, now)
    }

    /// Drives LINT0 (`pin` 0) or LINT1 (`pin` 1) of `vcpu`.
    pub fn set_lint(&mut self, vcpu: usize, pin: u8, level: bool, now: u64) -> Wake {
        ops::set_lint(self, vcpu, pin, level, now)
    }

    /// A guest read of the IOAPIC page (`offset` from its base).
    pub fn ioapic_mmio_read(&mut self, offset: u64, data: &mut [u8], now: u64) {
        ops::ioapic_mmio_read(self, offset, data, now)
    }

    /// A guest write to the IOAPIC page (`offset` from its base): IOREGSEL, IOWIN,
    /// EOI register.
    pub fn ioapic_mmio_write(&mut self, offset: u64, data: &[u8], now: u64) -> Wake {
        ops::ioapic_mmio_write(self, offset, data, now)
    }

    /// Drives IOAPIC pin `pin` to `level` (out-of-range pins are ignored).
    pub fn set_irq_line(&mut self, pin: u32, level: bool, now: u64) -> Wake {
        ops::set_irq_line(self, pin, level, now)
    }

    /// Fires every IOAPIC level pin that is asserted, unmasked and not in service.
    /// [`Fabric::import`] does not (it installs state exactly); an embedder that
    /// installs IOAPIC state from a source whose pending lines were never sent calls it.
    pub fn ioapic_service(&mut self, now: u64) -> Wake {
        ops::ioapic_service(self, now)
    }

    /// An MSI write (see [`crate::msi`]); malformed messages are refused.
    pub fn msi(&mut self, address: u64, data: u32, now: u64) -> Result<Wake, MsiError> {
        ops::msi(self, address, data, now)
    }

    /// Runs `f` on the IOAPIC (state export/import). Nothing is sent; call
    /// [`Fabric::ioapic_service`] after an import.
    pub fn with_ioapic<R>(&mut self, f: impl FnOnce(&mut IoApic) -> R) -> R {
        f(&mut self.ioapic)
    }

    /// Takes `vcpu`'s pending non-vectored events.
    pub fn take_events(&mut self, vcpu: usize) -> Option<Events> {
        ops::take_events(self, vcpu)
    }

    /// The architectural state of every APIC and the IOAPIC (for migration).
    pub fn export(&self) -> FabricState {
        ops::export(self)
    }

    /// Validates `state` against this VM's APICs and IOAPIC, then installs it; on
    /// error nothing changes. Afterwards the routing map follows the imported IDs and
    /// the returned [`Wake`] names every vCPU with something to take. Nothing is
    /// delivered by the import itself: an asserted level pin whose last delivery was
    /// not accepted (remote IRR clear) fires at its next trigger, as on the source, so
    /// exporting the imported fabric gives back exactly `state`.
    pub fn import(&mut self, state: &FabricState, now: u64) -> Result<Wake, FabricError> {
        ops::import(self, state, now)
    }

    /// The routing map currently in use (rebuilt first if stale).
    pub fn route_map(&mut self) -> &RouteMap {
        self.core.access().1
    }
}
