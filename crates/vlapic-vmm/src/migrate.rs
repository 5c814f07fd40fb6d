//! Live migration inside one process: pause every vCPU, save its KVM state and the
//! APIC/IOAPIC state (export, encode, decode, import), resume in a brand-new VM.

use std::sync::atomic::Ordering;
use std::time::Instant;

use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vlapic::fabric::SharedFabric;
use vlapic::state::native;

use vlapic::Events;

use crate::lock;
use crate::shared::Shared;

/// Main-thread side: one migration of the whole VM from `old`. Returns the new VM
/// (the caller drops the old one) or a message. kvmclock moves with it
/// (`KVM_GET_CLOCK` on `old`, `KVM_SET_CLOCK` on the new VM, while paused).
pub fn migrate(
    sh: &Shared,
    kvm: &Kvm,
    old_vm: &VmFd,
    make_vm: &dyn Fn(&Kvm) -> Result<VmFd, String>,
    make_vcpu: &dyn Fn(&VmFd, usize) -> Result<VcpuFd, String>,
) -> Result<Option<VmFd>, String> {
    let n = sh.rt.vcpus();
    let gate = &sh.migration;
    // The brand-new (empty) VM and vCPUs are built while the guest still runs;
    // only saving and loading state happens with the VM stopped.
    let vm = make_vm(kvm)?;
    let mut fds = Vec::with_capacity(n);
    for i in 0..n {
        fds.push(make_vcpu(&vm, i)?);
    }
    if !gate.pause_all(&sh.rt)? {
        return Ok(None);
    }
    let paused_at = Instant::now();
    crate::kvmclock::carry(old_vm, &vm)?;

    // Every vCPU is out of KVM_RUN and parked, and the HPET/RTC are held still (no
    // line moves until the new fabric is in place): the interrupt state is quiescent.
    // Export it, through the library's binary encoding, into a fresh fabric; the
    // devices go through their save-file encoding too.
    let mut clocks = sh.clocks.hold();
    *clocks = clocks.round_trip()?;
    let now = sh.rt.now_ns();
    let old = sh.chip();
    #[cfg(feature = "trace")]
    if let Some(t) = &sh.trace {
        // What the vCPUs did not drain yet goes with the old fabric: take it now.
        t.drain_all(&old);
    }
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
    let fresh = SharedFabric::new(sh.fabric_cfg.clone());
    let wake = fresh
        .import(&state, now)
        .map_err(|e| format!("importing the fabric state: {e:?}"))?;
    {
        // The verifier's history is not architectural state: carry its figures.
        let mut carry = lock(&sh.verifier_carry);
        for i in 0..n {
            if let Some((d, v)) = old.read_apic(i, |a| {
                let ver = a.verifier();
                (ver.max_depth(), ver.violations())
            }) {
                carry.0 = carry.0.max(d);
                carry.1 = carry.1.saturating_add(v);
            }
        }
    }
    // Pending NMI/SMI/INIT/SIPI/ExtINT are vCPU-side, not APIC registers (import
    // keeps them out of the state): hand them to their vCPUs with the new fds.
    let carried: Vec<Events> = (0..n)
        .map(|i| old.take_events(i).unwrap_or_default())
        .collect();
    #[cfg(feature = "trace")]
    if let Some(t) = &sh.trace {
        t.enable(&fresh);
    }
    sh.rt.replace_fabric(fresh);
    drop(clocks);
    sh.clocks.poke();
    drop(old);
    gate.state_bytes
        .fetch_max(bytes.len() as u64, Ordering::Relaxed);

    gate.resume_all(fds, carried);
    let down = u64::try_from(paused_at.elapsed().as_micros()).unwrap_or(u64::MAX);
    gate.max_downtime_us.fetch_max(down, Ordering::Relaxed);
    #[cfg(feature = "trace")]
    if let Some(t) = &sh.trace {
        t.pause(crate::trace::Pause {
            kind: "migration",
            start_ns: now,
            end_ns: sh.rt.now_ns().max(now),
            downtime_us: down,
            isr: state
                .apics
                .iter()
                .map(|a| crate::trace::isr_vectors(&a.isr))
                .collect(),
        });
    }
    gate.done.fetch_add(1, Ordering::Relaxed);
    sh.rt.wake(&wake);
    Ok(Some(vm))
}
