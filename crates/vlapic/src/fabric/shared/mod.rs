//! [`SharedFabric`], the front end shared by a VM's vCPU threads: one lock per APIC,
//! one for the IOAPIC; all routing goes through the shared core.

use super::core::*;
use super::{FabricConfig, IoApic, MsiError, Wake};
use crate::ioapic::PinSet;
use crate::lapic::{Effects, Events, GpFault, LapicConfig, LocalApic};
use crate::msi::Msi;
use crate::routing::{ApicView, Message, RouteMap};
use crate::state::{FabricError, FabricState};
use alloc::vec::Vec;
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
