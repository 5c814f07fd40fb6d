//! The end of a run: the vCPU threads joined, the timers stopped, each APIC's last
//! state and the verifier's totals read, and the [`RunReport`] built from them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::VmFd;
use vlapic_kvm::VmClock;

use crate::console::ConsoleOut;
use crate::lock;
use crate::outcome::Outcome;
use crate::shared::Shared;
use crate::stream::LiveStats;
use crate::summary::{RunReport, VcpuReport};
use crate::vcpu::VcpuEnd;

/// What is left of a run once its outcome is decided.
pub struct RunEnd {
    /// The vCPU threads, in vCPU order.
    pub handles: Vec<JoinHandle<VcpuEnd>>,
    /// The HPET/RTC thread.
    pub clocks_thread: JoinHandle<()>,
    /// The VM (dropped once the vCPU threads have ended).
    pub vm: Arc<VmFd>,
    /// VM time.
    pub clock: VmClock,
    /// The run used KVM's in-kernel irqchip (no vlapic state to report).
    pub kernel_irqchip: bool,
    /// Wall time the VM ran before this process.
    pub prior: Duration,
    /// When this process's vCPUs started.
    pub start: Instant,
    /// Guest TSC frequency (Hz).
    pub tsc_hz: u64,
    /// The console (its log goes into the report).
    pub console: ConsoleOut,
    /// `--incoming`'s figures.
    pub live_in: Option<LiveStats>,
    /// `--migrate-to`'s figures.
    pub live_out: Option<LiveStats>,
    /// `--trace`'s file, written here.
    #[cfg(feature = "trace")]
    pub tracer: Option<crate::trace_json::TraceFile>,
}

/// Ends the run (any vCPU still running stops with a timeout outcome) and reports it.
pub fn finish_run(sh: &Shared, end: RunEnd) -> RunReport {
    let RunEnd {
        handles,
        clocks_thread,
        vm,
        clock,
        kernel_irqchip,
        prior,
        start,
        tsc_hz,
        console,
        live_in,
        live_out,
        #[cfg(feature = "trace")]
        tracer,
    } = end;
    sh.finish(Outcome::Timeout);

    let mut reports: Vec<VcpuReport> = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join() {
            Ok(end) => reports.push(VcpuReport {
                index: end.index,
                state: end.state,
                rip: end.rip,
                exits: sh.exits.vcpu(end.index),
                interrupts: end.counters.interrupts,
                nmis: end.counters.nmis,
                sipis: end.counters.sipis,
                extints: end.counters.extints,
                ..VcpuReport::default()
            }),
            Err(_) => reports.push(VcpuReport {
                index: i,
                state: "thread panicked".into(),
                ..VcpuReport::default()
            }),
        }
    }
    sh.rt.stop();
    sh.clocks.stop();
    let _ = clocks_thread.join();
    let elapsed = prior + start.elapsed();
    drop(vm);

    let now = clock.now_ns();
    let (mut max_nesting, mut violations) = *lock(&sh.verifier_carry);
    let chip = sh.chip();
    for r in reports.iter_mut() {
        if let Some((depth, viol, line)) = chip.read_apic(r.index, |a| {
            let v = a.verifier();
            let line = format!(
                "{:?} TPR={:#04x} PPR={:#04x} IRR^={} ISR^={} pending={} timer={}",
                a.mode(),
                a.tpr(),
                a.ppr(),
                a.irr()
                    .highest()
                    .map_or("-".into(), |x| format!("{x:#04x}")),
                a.isr()
                    .highest()
                    .map_or("-".into(), |x| format!("{x:#04x}")),
                a.pending_vector()
                    .map_or("-".into(), |x| format!("{x:#04x}")),
                a.next_timer_deadline().map_or("off".into(), |d| format!(
                    "+{}ns",
                    d.saturating_sub(now) as i64
                )),
            );
            (v.max_depth(), v.violations(), line)
        }) {
            if kernel_irqchip {
                r.apic = "in-kernel (KVM's LAPIC)".into();
                continue;
            }
            max_nesting = max_nesting.max(depth);
            violations = violations.saturating_add(viol);
            r.apic = line;
        }
    }
    let outcome = lock(&sh.outcome).clone().unwrap_or(Outcome::Timeout);
    #[cfg(feature = "trace")]
    if let Some(t) = tracer {
        let meta = crate::trace_json::TraceMeta {
            vcpus: reports.len(),
            migrations: sh.migration.done.load(Ordering::Relaxed),
            max_nesting,
            violations,
            outcome: format!("{outcome:?}"),
            ..Default::default()
        };
        if let Err(e) = t.finish(&chip, meta) {
            eprintln!("vlapic run: {e}");
        }
    }
    RunReport {
        outcome,
        console: console.log(),
        vcpus: reports,
        max_nesting,
        violations,
        migrations: sh.migration.done.load(Ordering::Relaxed),
        max_downtime_us: sh.migration.max_downtime_us.load(Ordering::Relaxed),
        nested_migrations: sh.migration.nested_migrations.load(Ordering::Relaxed),
        max_in_service_migrated: sh.migration.max_in_service.load(Ordering::Relaxed),
        unknown_ports: sh.io.unknown_ports.get().0,
        wild_mmio: sh.wild_mmio.get().0,
        msr_gp: sh.msr_gp.get().0,
        soft_interrupts: sh.soft_ints.get().0,
        first_odd: [
            sh.io.unknown_ports.get().1,
            sh.wild_mmio.get().1,
            sh.msr_gp.get().1,
        ],
        nmi_masked: sh.clocks.nmi_masked(),
        hpet_coalesced: sh.clocks.hpet_missed(),
        elapsed,
        tsc_hz,
        live_in,
        live_out,
    }
}
