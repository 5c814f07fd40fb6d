//! The live-migration rendezvous: the main thread asks every vCPU to pause, each hands
//! over its KVM and run state and waits for its vCPU in the new VM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::VcpuFd;
use vlapic::Events;
use vlapic_kvm::{ApicRuntime, RunState};

use crate::kernel_chip::KernelApic;
use crate::lock;
use crate::snapshot::VcpuState;

/// What a paused vCPU hands over: its KVM state and the VMM-side run state
/// (halted, waiting for SIPI) that KVM does not hold without an in-kernel APIC.
#[derive(Clone)]
pub struct PausedVcpu {
    /// KVM's state of the vCPU.
    pub kvm: VcpuState,
    /// Halted / wait-for-SIPI / running.
    pub run: RunState,
    /// Events the vCPU had already taken from its APIC but not yet acted on.
    pub events: Events,
    /// The vCPU's counters: interrupts, NMIs, SIPIs and ExtINT interrupts so far.
    pub counters: [u64; 4],
    /// `--irqchip kernel`: KVM's LAPIC page, APIC base and TSC deadline.
    pub kernel_apic: Option<KernelApic>,
}

/// Rendezvous between the migrating main thread and the vCPU threads.
#[derive(Default)]
pub struct MigrationGate {
    /// Set while a migration wants every vCPU to stop at its next iteration.
    pub requested: AtomicBool,
    slots: Mutex<Slots>,
    cv: Condvar,
    /// Migrations completed.
    pub done: AtomicU64,
    /// Longest pause (all vCPUs stopped) in microseconds.
    pub max_downtime_us: AtomicU64,
    /// Size of the encoded APIC/IOAPIC state (bytes, largest seen).
    pub state_bytes: AtomicU64,
    /// Most vectors in service on one APIC in any migrated state.
    pub max_in_service: AtomicU64,
    /// Migrations taken while some APIC had at least 3 vectors in service.
    pub nested_migrations: AtomicU64,
}

#[derive(Default)]
struct Slots {
    paused: Vec<Option<PausedVcpu>>,
    fresh: Vec<Option<(Option<VcpuFd>, Events)>>,
    count: usize,
}

impl MigrationGate {
    /// A gate for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        let g = Self::default();
        {
            let mut s = lock(&g.slots);
            s.paused = (0..n).map(|_| None).collect();
            s.fresh = (0..n).map(|_| None).collect();
        }
        g
    }

    /// Main-thread side: asks every vCPU to pause and waits until all have.
    /// `Ok(false)` when the run ended meanwhile (the request is withdrawn).
    pub fn pause_all(&self, rt: &ApicRuntime) -> Result<bool, String> {
        let n = rt.vcpus();
        self.requested.store(true, Ordering::SeqCst);
        rt.kick_all();
        let t0 = Instant::now();
        let mut s = lock(&self.slots);
        while s.count < n {
            if rt.is_stopped() {
                self.requested.store(false, Ordering::SeqCst);
                return Ok(false);
            }
            if t0.elapsed() > Duration::from_secs(10) {
                return Err(format!("only {} of {n} vCPUs paused", s.count));
            }
            s = match self.cv.wait_timeout(s, Duration::from_millis(50)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
        Ok(true)
    }

    /// Main-thread side, after [`MigrationGate::pause_all`]: hands each paused vCPU its
    /// vCPU in the new VM and the APIC events that were pending for it, and lets all go.
    pub fn resume_all(&self, fds: Vec<VcpuFd>, events: Vec<Events>) {
        let mut s = lock(&self.slots);
        for ((slot, fd), ev) in s.fresh.iter_mut().zip(fds).zip(events) {
            *slot = Some((Some(fd), ev));
        }
        s.count = 0;
        self.requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Main-thread side, after [`MigrationGate::pause_all`], when the VM stays here
    /// (a migration to another process failed): every vCPU resumes in its own KVM
    /// vCPU, untouched, with its carried events and the APIC `events` taken meanwhile.
    pub fn resume_in_place(&self, events: Vec<Events>) {
        let mut s = lock(&self.slots);
        let n = s.fresh.len();
        let mut events = events.into_iter();
        for i in 0..n {
            let ev = events.next().unwrap_or_default();
            if let Some(slot) = s.fresh.get_mut(i) {
                *slot = Some((None, ev));
            }
        }
        s.count = 0;
        self.requested.store(false, Ordering::SeqCst);
        self.cv.notify_all();
    }

    /// Copies of the paused vCPUs' states (after [`MigrationGate::pause_all`]).
    pub fn paused(&self) -> Vec<Option<PausedVcpu>> {
        lock(&self.slots).paused.clone()
    }

    /// Wakes everything waiting at the gate (the run is ending).
    pub fn release_all(&self) {
        let _g = lock(&self.slots);
        self.cv.notify_all();
    }

    /// vCPU side: park `me` with its state until the new VM's vCPU arrives.
    /// Returns the new vCPU fd (`None`: resume in the current one, nothing was
    /// changed), the state to load into it and the APIC events that were pending for
    /// it (not part of the exported APIC state), or `None` when the run ends meanwhile.
    pub fn pause(
        &self,
        me: usize,
        state: PausedVcpu,
        rt: &ApicRuntime,
    ) -> Option<(Option<VcpuFd>, PausedVcpu, Events)> {
        let mut s = lock(&self.slots);
        if let Some(slot) = s.paused.get_mut(me) {
            *slot = Some(state);
        }
        s.count += 1;
        self.cv.notify_all();
        loop {
            if rt.is_stopped() {
                return None;
            }
            if let Some((fd, ev)) = s.fresh.get_mut(me).and_then(Option::take) {
                let st = s.paused.get_mut(me).and_then(Option::take)?;
                return Some((fd, st, ev));
            }
            s = match self.cv.wait_timeout(s, Duration::from_millis(100)) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
        }
    }
}
