//! [`SharedFabric`], the front end shared by a VM's vCPU threads: one lock per APIC,
//! one for the IOAPIC; all routing goes through the shared core.

use super::core::*;
use super::ops::{self, Backend};
use super::{FabricConfig, IoApic, MsiError, Wake};
use crate::ioapic::PinSet;
use crate::lapic::{Effects, Events, GpFault, LocalApic};
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
    ///
    /// `dirty` is cleared only after the rebuilt map is published, both under the
    /// views lock (which every view change also holds): a thread that reads `dirty`
    /// false therefore finds a map holding every change made before its read.
    /// Clearing it first (as this once did) let a second sender route over the stale
    /// map in between and lose its interrupt (fabric_stress.rs,
    /// `routing_change_seen_by_racing_senders`).
    fn map(&self) -> Arc<RouteMap> {
        if self.dirty.load(Ordering::Acquire) {
            let views = lock(&self.views);
            if self.dirty.load(Ordering::Acquire) {
                let fresh = Arc::new(RouteMap::build(&views));
                *self.map.write().unwrap_or_else(PoisonError::into_inner) = fresh;
                self.dirty.store(false, Ordering::Release);
            }
        }
        self.map
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn route(&self, msg: &Message, from: Origin, now: u64, wake: &mut Wake) -> usize {
        let map = self.map();
        let rotor = self.rotor.load(Ordering::Relaxed);
        let r = route_message(&mut Locked(self), &map, rotor, msg, from, now, wake);
        if let Some(new) = r.rotor {
            self.rotor.store(new, Ordering::Relaxed);
        }
        r.accepted
    }
}

impl Backend for &SharedFabric {
    fn len(&self) -> usize {
        self.apics.len()
    }

    fn ioapic_base(&self) -> u64 {
        self.ioapic_base
    }

    fn apic<R>(&mut self, vcpu: usize, f: impl FnOnce(&mut LocalApic) -> R) -> Option<R> {
        self.locked(vcpu, f)
    }

    fn read<R>(&self, vcpu: usize, f: impl FnOnce(&LocalApic) -> R) -> Option<R> {
        Some(f(&lock(self.apics.get(vcpu)?).apic))
    }

    fn route(&mut self, msg: &Message, from: Origin, now: u64, wake: &mut Wake) -> usize {
        SharedFabric::route(self, msg, from, now, wake)
    }

    fn ioapic<R>(
        &mut self,
        now: u64,
        wake: &mut Wake,
        f: impl FnOnce(&mut IoApic) -> (R, PinSet),
    ) -> R {
        let mut io = lock(&self.ioapic);
        let (r, pins) = f(&mut io);
        service_pins(&mut io, pins, |m, from| {
            SharedFabric::route(self, m, from, now, wake)
        });
        r
    }

    fn read_ioapic<R>(&self, f: impl FnOnce(&IoApic) -> R) -> R {
        f(&lock(&self.ioapic))
    }
}

/// The operations of [`Fabric`](super::Fabric), through `&self` from any vCPU
/// thread; each is documented there, with the locking noted here where it matters.
impl SharedFabric {
    /// [`Fabric::with_apic`](super::Fabric::with_apic): locks vCPU `vcpu`'s APIC,
    /// runs `f`, releases the lock, then routes the [`Effects`] `f` returned. `f`
    /// runs under the lock and must not call into the fabric.
    pub fn with_apic<R>(
        &self,
        vcpu: usize,
        now: u64,
        f: impl FnOnce(&mut LocalApic) -> (R, Effects),
    ) -> Option<(R, Wake)> {
        ops::with_apic(&mut &*self, vcpu, now, f)
    }

    /// [`Fabric::send`](super::Fabric::send).
    pub fn send(&self, msg: &Message, now: u64) -> Wake {
        ops::send(&mut &*self, msg, now)
    }

    /// [`Fabric::lapic_mmio_read`](super::Fabric::lapic_mmio_read).
    pub fn lapic_mmio_read(&self, vcpu: usize, offset: u64, data: &mut [u8], now: u64) {
        ops::lapic_mmio_read(&mut &*self, vcpu, offset, data, now)
    }

    /// [`Fabric::lapic_mmio_write`](super::Fabric::lapic_mmio_write).
    pub fn lapic_mmio_write(&self, vcpu: usize, offset: u64, data: &[u8], now: u64) -> Wake {
        ops::lapic_mmio_write(&mut &*self, vcpu, offset, data, now)
    }

    /// [`Fabric::lapic_msr_read`](super::Fabric::lapic_msr_read).
    pub fn lapic_msr_read(&self, vcpu: usize, msr: u32, now: u64) -> Result<u64, GpFault> {
        ops::lapic_msr_read(&mut &*self, vcpu, msr, now)
    }

    /// [`Fabric::lapic_msr_write`](super::Fabric::lapic_msr_write).
    pub fn lapic_msr_write(
        &self,
        vcpu: usize,
        msr: u32,
        value: u64,
        now: u64,
    ) -> Result<Wake, GpFault> {
        ops::lapic_msr_write(&mut &*self, vcpu, msr, value, now)
    }

    /// [`Fabric::ioapic_mmio_read`](super::Fabric::ioapic_mmio_read).
    pub fn ioapic_mmio_read(&self, offset: u64, data: &mut [u8], now: u64) {
        ops::ioapic_mmio_read(&mut &*self, offset, data, now)
    }

    /// [`Fabric::ioapic_mmio_write`](super::Fabric::ioapic_mmio_write). The IOAPIC
    /// lock is held across routing, so remote IRR is set before any EOI for the
    /// interrupt can be processed.
    pub fn ioapic_mmio_write(&self, offset: u64, data: &[u8], now: u64) -> Wake {
        ops::ioapic_mmio_write(&mut &*self, offset, data, now)
    }

    /// [`Fabric::set_irq_line`](super::Fabric::set_irq_line).
    pub fn set_irq_line(&self, pin: u32, level: bool, now: u64) -> Wake {
        ops::set_irq_line(&mut &*self, pin, level, now)
    }

    /// [`Fabric::ioapic_service`](super::Fabric::ioapic_service).
    pub fn ioapic_service(&self, now: u64) -> Wake {
        ops::ioapic_service(&mut &*self, now)
    }

    /// [`Fabric::msi`](super::Fabric::msi).
    pub fn msi(&self, address: u64, data: u32, now: u64) -> Result<Wake, MsiError> {
        ops::msi(&mut &*self, address, data, now)
    }

    /// [`Fabric::set_lint`](super::Fabric::set_lint).
    pub fn set_lint(&self, vcpu: usize, pin: u8, level: bool, now: u64) -> Wake {
        ops::set_lint(&mut &*self, vcpu, pin, level, now)
    }

    /// [`Fabric::with_ioapic`](super::Fabric::with_ioapic), under the IOAPIC lock.
    /// Nothing is sent; call [`SharedFabric::ioapic_service`] after an import.
    pub fn with_ioapic<R>(&self, f: impl FnOnce(&mut IoApic) -> R) -> R {
        f(&mut lock(&self.ioapic))
    }

    /// [`Fabric::take_events`](super::Fabric::take_events).
    pub fn take_events(&self, vcpu: usize) -> Option<Events> {
        ops::take_events(&mut &*self, vcpu)
    }

    /// [`Fabric::export`](super::Fabric::export). Each APIC is locked in turn: pause
    /// the vCPUs first for a consistent snapshot.
    pub fn export(&self) -> FabricState {
        ops::export(&self)
    }

    /// [`Fabric::import`](super::Fabric::import). The vCPUs must be paused.
    pub fn import(&self, state: &FabricState, now: u64) -> Result<Wake, FabricError> {
        ops::import(&mut &*self, state, now)
    }

    /// The routing map currently published (rebuilt first if stale).
    pub fn route_map(&self) -> Arc<RouteMap> {
        self.map()
    }
}
