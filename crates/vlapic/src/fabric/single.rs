//! [`Fabric`], the single-threaded front end: owns the APICs and the IOAPIC, `&mut self`
//! everywhere, no `std` needed; all routing goes through the shared core.

use super::core::*;
use super::{FabricConfig, IoApic, MsiError, Wake};
use crate::ioapic::PinSet;
use crate::lapic::{Effects, Events, GpFault, LapicConfig, LocalApic};
use crate::msi::Msi;
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

    fn route(&mut self, msg: &Message, sender: Option<usize>, now: u64, wake: &mut Wake) -> usize {
        let rotor = self.rotor;
        let (mut acc, map) = self.access();
        let r = route_message(&mut acc, map, rotor, msg, sender, now, wake);
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

/// The single-threaded fabric: owns the APICs and the IOAPIC. Same operations and
/// semantics as [`SharedFabric`], through `&mut self`; usable without `std`.
#[derive(Clone, Debug)]
pub struct Fabric {
    pub(super) core: Core,
    ioapic: IoApic,
    pub(super) ioapic_base: u64,
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
