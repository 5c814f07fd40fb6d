//! Live migration inside one process: pause every vCPU, save its KVM state and the
//! APIC/IOAPIC state (export, encode, decode, import), resume in a brand-new VM.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vlapic::state::native;
use vlapic::{Effects, Events};

use crate::irqchip::Irqchip;
use crate::kick::lock;
use crate::snapshot::VcpuState;
use crate::vcpu::{RunState, Shared};

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
    /// The vCPU's counters: interrupts, NMIs and SIPIs so far.
    pub counters: [u64; 3],
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
    fresh: Vec<Option<(VcpuFd, Events)>>,
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
    pub fn pause_all(&self, sh: &Shared) -> Result<bool, String> {
        let n = sh.kicks.len();
        self.requested.store(true, Ordering::SeqCst);
        for k in &sh.kicks {
            k.kick();
        }
        let t0 = Instant::now();
        let mut s = lock(&self.slots);
        while s.count < n {
            if sh.stop.load(Ordering::SeqCst) {
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
    /// Returns the new vCPU fd, the state to load into it and the APIC events
    /// that were pending for it (not part of the exported APIC state), or `None`
    /// when the run ends meanwhile.
    pub fn pause(
        &self,
        me: usize,
        state: PausedVcpu,
        stop: &AtomicBool,
    ) -> Option<(VcpuFd, PausedVcpu, Events)> {
        let mut s = lock(&self.slots);
        if let Some(slot) = s.paused.get_mut(me) {
            *slot = Some(state);
        }
        s.count += 1;
        self.cv.notify_all();
        loop {
            if stop.load(Ordering::SeqCst) {
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

/// Main-thread side: one migration of the whole VM. Returns the new VM (the caller
/// drops the old one) or a message.
pub fn migrate(
    sh: &Shared,
    kvm: &Kvm,
    make_vm: &dyn Fn(&Kvm) -> Result<VmFd, String>,
    make_vcpu: &dyn Fn(&VmFd, usize) -> Result<VcpuFd, String>,
) -> Result<Option<VmFd>, String> {
    let n = sh.kicks.len();
    let gate = &sh.migration;
    // The brand-new (empty) VM and vCPUs are built while the guest still runs;
    // only saving and loading state happens with the VM stopped.
    let vm = make_vm(kvm)?;
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        fds.push(make_vcpu(&vm, i)?);
    }
    if !gate.pause_all(sh)? {
        return Ok(None);
    }
    let paused_at = Instant::now();

    // Every vCPU is out of KVM_RUN and parked: the APIC/IOAPIC state is quiescent.
    // Export it, through the library's binary encoding, into a fresh fabric.
    let now = sh.clock.now_ns();
    let old = sh.chip();
    let bytes = native::encode_fabric(&old.export());
    let state =
        native::decode_fabric(&bytes).map_err(|e| format!("decoding the fabric state: {e:?}"))?;
    // Evidence for "migrated mid-handler": the deepest ISR in the state that moved.
    let in_service = state
        .apics
        .iter()
        .map(|a| a.isr.iter().map(|w| u64::from(w.count_ones())).sum::<u64>())
        .max()
        .unwrap_or(0);
    gate.max_in_service.fetch_max(in_service, Ordering::Relaxed);
    if in_service >= 3 {
        gate.nested_migrations.fetch_add(1, Ordering::Relaxed);
    }
    let fresh = Arc::new(Irqchip::new(sh.fabric_cfg.clone()));
    let wake = fresh
        .import(&state, now)
        .map_err(|e| format!("importing the fabric state: {e:?}"))?;
    {
        // The verifier's history is not architectural state: carry its figures.
        let mut carry = lock(&sh.verifier_carry);
        for i in 0..n {
            if let Some(((d, v), _)) = old.with_apic(i, now, |a| {
                let ver = a.verifier();
                ((ver.max_depth(), ver.violations()), Effects::default())
            }) {
                carry.0 = carry.0.max(d);
                carry.1 = carry.1.saturating_add(v);
            }
        }
    }
    // Pending NMI/SMI/INIT/SIPI/ExtINT are vCPU-side, not APIC registers (import
    // keeps them out of the state): hand them to their vCPUs with the new fds.
    let carried: Vec<Events> = (0..n)
        .map(|i| {
            old.with_apic(i, now, |a| (a.take_events(), Effects::default()))
                .map(|(e, _)| e)
                .unwrap_or_default()
        })
        .collect();
    *sh.chip
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = fresh;
    drop(old);
    gate.state_bytes
        .fetch_max(bytes.len() as u64, Ordering::Relaxed);

    {
        let mut s = lock(&gate.slots);
        for ((slot, fd), ev) in s.fresh.iter_mut().zip(fds).zip(carried) {
            *slot = Some((fd, ev));
        }
        s.count = 0;
        gate.requested.store(false, Ordering::SeqCst);
        gate.cv.notify_all();
    }
    let down = u64::try_from(paused_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    gate.max_downtime_us.fetch_max(down, Ordering::Relaxed);
    gate.done.fetch_add(1, Ordering::Relaxed);
    for v in wake.iter() {
        if let Some(k) = sh.kicks.get(v) {
            k.kick();
        }
    }
    Ok(Some(vm))
}
