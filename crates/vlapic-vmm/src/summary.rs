//! The run's result: outcome, per-vCPU counters, exits by reason, scenario
//! results from the console, APIC verifier figures; as text or one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use crate::console::ConsoleLog;

pub use crate::outcome::Outcome;
pub use crate::stats::{
    exit_delta, exit_list, ExitCounts, ExitReason, ExitStats, EXIT_NAMES, EXIT_REASONS,
};

/// Where a vCPU was when the run ended.
#[derive(Clone, Debug, Default)]
pub struct VcpuReport {
    /// vCPU index.
    pub index: usize,
    /// Run state: running, halted, halted-if0, wait-for-sipi.
    pub state: String,
    /// Last RIP seen (from KVM_GET_REGS after the loop ended).
    pub rip: u64,
    /// Exits by reason.
    pub exits: ExitCounts,
    /// Interrupts injected with KVM_INTERRUPT.
    pub interrupts: u64,
    /// NMIs injected.
    pub nmis: u64,
    /// SIPIs that started this vCPU.
    pub sipis: u64,
    /// One-line APIC summary (mode, TPR/PPR, highest IRR/ISR, pending, timer).
    pub apic: String,
}

/// Everything `vlapic run` prints at the end.
#[derive(Clone, Debug)]
pub struct RunReport {
    /// How the run ended.
    pub outcome: Outcome,
    /// Parsed console output.
    pub console: ConsoleLog,
    /// Per-vCPU data.
    pub vcpus: Vec<VcpuReport>,
    /// Deepest interrupt nesting seen by any APIC's verifier.
    pub max_nesting: u8,
    /// Verifier violations over all APICs.
    pub violations: u64,
    /// Live migrations performed.
    pub migrations: u64,
    /// Longest migration pause (every vCPU stopped), microseconds.
    pub max_downtime_us: u64,
    /// Migrations taken while some APIC had at least 3 vectors in service.
    pub nested_migrations: u64,
    /// Most vectors in service on one APIC in any migrated state.
    pub max_in_service_migrated: u64,
    /// Accesses to unclaimed ports.
    pub unknown_ports: u64,
    /// MMIO accesses outside RAM, LAPIC and IOAPIC.
    pub wild_mmio: u64,
    /// RDMSR/WRMSR answered with #GP (non-APIC MSRs KVM refused, APIC #GP cases).
    pub msr_gp: u64,
    /// The first unknown port, wild MMIO address and #GP MSR seen.
    pub first_odd: [u64; 3],
    /// Wall-clock run time.
    pub elapsed: Duration,
    /// Guest TSC frequency used for VM time.
    pub tsc_hz: u64,
}

/// Exit codes of `vlapic run`, documented in docs/vmm.md.
pub mod exit_code {
    /// Every scenario passed (at least one ran) and the guest ended cleanly.
    pub const PASS: u8 = 0;
    /// A scenario failed, none ran, or the guest ended without reporting.
    pub const FAIL: u8 = 1;
    /// Bad arguments, unusable /dev/kvm or an image that cannot be loaded.
    pub const SETUP: u8 = 2;
    /// The wall-clock limit (`--timeout`) passed.
    pub const TIMEOUT: u8 = 3;
    /// The guest crashed: triple fault, KVM internal error, entry failure.
    pub const GUEST_CRASH: u8 = 4;
    /// The VMM failed (unexpected ioctl error).
    pub const VMM_ERROR: u8 = 5;
    /// `--save`: the state was written (the same value as [`PASS`]).
    pub const SAVED: u8 = 0;
}

impl RunReport {
    /// Scenarios passed.
    pub fn passed(&self) -> usize {
        self.console.count("PASS")
    }

    /// Scenarios failed.
    pub fn failed(&self) -> usize {
        self.console.count("FAIL")
    }

    /// Scenarios skipped.
    pub fn skipped(&self) -> usize {
        self.console.count("SKIP")
    }

    /// Exits summed over vCPUs.
    pub fn total_exits(&self) -> ExitCounts {
        let mut t = [0u64; EXIT_REASONS];
        for v in &self.vcpus {
            for (a, b) in t.iter_mut().zip(v.exits.iter()) {
                *a = a.saturating_add(*b);
            }
        }
        t
    }

    /// The process exit code this run earns.
    pub fn exit_code(&self) -> u8 {
        match &self.outcome {
            Outcome::Timeout => exit_code::TIMEOUT,
            Outcome::GuestCrash(_) => exit_code::GUEST_CRASH,
            Outcome::VmmError(_) => exit_code::VMM_ERROR,
            Outcome::Saved(_) => exit_code::SAVED,
            Outcome::DebugExit(_) | Outcome::AllStopped => {
                // Success: nothing failed and something ran — scenarios, or (bench
                // mode) benchmark figures.
                if self.failed() == 0 && (self.passed() > 0 || !self.console.bench.is_empty()) {
                    exit_code::PASS
                } else {
                    exit_code::FAIL
                }
            }
        }
    }

    fn outcome_text(&self) -> String {
        match &self.outcome {
            Outcome::DebugExit(n) => {
                format!("guest exit {n} (status {})", (u64::from(*n) << 1) | 1)
            }
            Outcome::AllStopped => {
                "all vCPUs stopped (halted with IF=0 or waiting for SIPI)".into()
            }
            Outcome::Timeout => "timeout".into(),
            Outcome::GuestCrash(m) => format!("guest crash: {m}"),
            Outcome::VmmError(m) => format!("VMM error: {m}"),
            Outcome::Saved(m) => format!("saved {m}"),
        }
    }

    /// The human-readable summary (for a `--save` run, the one line saying what
    /// was saved).
    pub fn text(&self) -> String {
        let mut s = String::new();
        if let Outcome::Saved(_) = self.outcome {
            let _ = writeln!(s, "vlapic run: {}", self.outcome_text());
            return s;
        }
        let _ = writeln!(s, "== vlapic run summary ==");
        let _ = writeln!(s, "outcome:      {}", self.outcome_text());
        let _ = writeln!(
            s,
            "scenarios:    {} passed, {} failed, {} skipped{}",
            self.passed(),
            self.failed(),
            self.skipped(),
            self.console
                .done
                .as_ref()
                .map(|d| format!("  [{d}]"))
                .unwrap_or_default()
        );
        for sc in &self.console.scenarios {
            let n: u64 = sc.exits.iter().sum();
            let detail = if sc.detail.is_empty() {
                String::new()
            } else {
                format!(": {}", sc.detail)
            };
            let _ = writeln!(
                s,
                "  {} {}{detail}  [{:.1} ms, {n} exits: {}]",
                sc.status,
                sc.name,
                sc.elapsed.as_secs_f64() * 1e3,
                exit_list(&sc.exits)
            );
        }
        let _ = writeln!(s, "max nesting:  {}", self.max_nesting);
        let _ = writeln!(s, "violations:   {}", self.violations);
        if self.migrations > 0 {
            let _ = writeln!(
                s,
                "migrations:   {} (longest pause {} us; {} with >= 3 interrupts in service, up to {})",
                self.migrations,
                self.max_downtime_us,
                self.nested_migrations,
                self.max_in_service_migrated
            );
        } else {
            let _ = writeln!(s, "migrations:   0");
        }
        let _ = writeln!(
            s,
            "time:         {:.3} s wall, guest TSC {} MHz",
            self.elapsed.as_secs_f64(),
            self.tsc_hz / 1_000_000
        );
        let ints: Vec<String> = self
            .vcpus
            .iter()
            .map(|v| v.interrupts.to_string())
            .collect();
        let _ = writeln!(s, "interrupts:   per vCPU [{}]", ints.join(", "));
        let t = self.total_exits();
        let ex: Vec<String> = EXIT_NAMES
            .iter()
            .zip(t.iter())
            .filter(|(_, n)| **n > 0)
            .map(|(k, n)| format!("{k} {n}"))
            .collect();
        let _ = writeln!(
            s,
            "exits:        {} total: {}",
            t.iter().sum::<u64>(),
            ex.join(", ")
        );
        let _ = writeln!(
            s,
            "odd guest:    {} unknown-port, {} wild-MMIO, {} MSR #GP",
            self.unknown_ports, self.wild_mmio, self.msr_gp
        );
        for ((n, what), first) in [
            (self.unknown_ports, "unknown port"),
            (self.wild_mmio, "wild MMIO address"),
            (self.msr_gp, "#GP MSR"),
        ]
        .iter()
        .zip(self.first_odd.iter())
        {
            if *n > 0 {
                let _ = writeln!(s, "  first {what}: {first:#x}");
            }
        }
        if !matches!(self.outcome, Outcome::DebugExit(_)) {
            for v in &self.vcpus {
                let _ = writeln!(
                    s,
                    "  vcpu{}: {} rip={:#x} apic: {}",
                    v.index, v.state, v.rip, v.apic
                );
            }
        }
        s
    }

    /// The same as one JSON object.
    pub fn json(&self) -> serde_json::Value {
        let t = self.total_exits();
        let exits: serde_json::Map<String, serde_json::Value> = EXIT_NAMES
            .iter()
            .zip(t.iter())
            .map(|(k, n)| ((*k).to_string(), serde_json::json!(n)))
            .collect();
        let vcpus: Vec<serde_json::Value> = self
            .vcpus
            .iter()
            .map(|v| {
                let ex: serde_json::Map<String, serde_json::Value> = EXIT_NAMES
                    .iter()
                    .zip(v.exits.iter())
                    .map(|(k, n)| ((*k).to_string(), serde_json::json!(n)))
                    .collect();
                serde_json::json!({
                    "index": v.index, "state": v.state, "rip": v.rip,
                    "interrupts": v.interrupts, "nmis": v.nmis, "sipis": v.sipis,
                    "apic": v.apic, "exits": ex,
                })
            })
            .collect();
        let scenarios: Vec<serde_json::Value> = self
            .console
            .scenarios
            .iter()
            .map(|s| {
                let ex: serde_json::Map<String, serde_json::Value> = EXIT_NAMES
                    .iter()
                    .zip(s.exits.iter())
                    .filter(|(_, n)| **n > 0)
                    .map(|(k, n)| ((*k).to_string(), serde_json::json!(n)))
                    .collect();
                serde_json::json!({"name": s.name, "status": s.status, "detail": s.detail,
                    "elapsed_ms": s.elapsed.as_secs_f64() * 1e3, "exits": ex})
            })
            .collect();
        serde_json::json!({
            "outcome": self.outcome_text(),
            "exit_code": self.exit_code(),
            "passed": self.passed(),
            "failed": self.failed(),
            "skipped": self.skipped(),
            "done": self.console.done,
            "bench": self.console.bench.iter().map(|b| serde_json::json!({"name": b.name, "cycles": b.cycles, "iters": b.iters})).collect::<Vec<_>>(),
            "scenarios": scenarios,
            "max_nesting": self.max_nesting,
            "migrations": self.migrations,
            "max_downtime_us": self.max_downtime_us,
            "nested_migrations": self.nested_migrations,
            "max_in_service_migrated": self.max_in_service_migrated,
            "violations": self.violations,
            "interrupts": self.vcpus.iter().map(|v| v.interrupts).collect::<Vec<_>>(),
            "exits": exits,
            "unknown_ports": self.unknown_ports,
            "wild_mmio": self.wild_mmio,
            "msr_gp": self.msr_gp,
            "first_unknown_port": self.first_odd[0],
            "first_wild_mmio": self.first_odd[1],
            "first_gp_msr": self.first_odd[2],
            "elapsed_s": self.elapsed.as_secs_f64(),
            "tsc_hz": self.tsc_hz,
            "vcpus": vcpus,
        })
    }
}
