//! The run's result: outcome, per-vCPU counters, exits by reason, scenario
//! results from the console, APIC verifier figures; as text or one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use crate::console::ConsoleLog;

/// Exit reasons counted per vCPU (index into [`ExitCounts`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(usize)]
pub enum ExitReason {
    /// Port read.
    IoIn,
    /// Port write.
    IoOut,
    /// MMIO read (LAPIC, IOAPIC or unbacked).
    MmioRead,
    /// MMIO write.
    MmioWrite,
    /// RDMSR to userspace (x2APIC, APIC base, TSC deadline, invalid).
    Rdmsr,
    /// WRMSR to userspace.
    Wrmsr,
    /// HLT.
    Hlt,
    /// Interrupt window open.
    IrqWindow,
    /// Guest lowered CR8.
    SetTpr,
    /// KVM_RUN interrupted by a kick (EINTR) or KVM_EXIT_INTR.
    Kick,
    /// Anything else (fatal).
    Other,
}

/// Number of [`ExitReason`]s.
pub const EXIT_REASONS: usize = 11;

/// Names of the exit reasons, in index order.
pub const EXIT_NAMES: [&str; EXIT_REASONS] = [
    "io_in",
    "io_out",
    "mmio_read",
    "mmio_write",
    "rdmsr",
    "wrmsr",
    "hlt",
    "irq_window",
    "set_tpr",
    "kick",
    "other",
];

/// Exit counts by reason.
pub type ExitCounts = [u64; EXIT_REASONS];

/// Live exit counters, one row per vCPU (read by the console to attribute
/// exits to scenarios while the guest runs).
pub struct ExitStats {
    rows: Vec<[std::sync::atomic::AtomicU64; EXIT_REASONS]>,
}

impl ExitStats {
    /// Counters for `n` vCPUs.
    pub fn new(n: usize) -> Self {
        Self {
            rows: (0..n).map(|_| Default::default()).collect(),
        }
    }

    /// Counts one exit of `vcpu`.
    pub fn count(&self, vcpu: usize, r: ExitReason) {
        if let Some(c) = self.rows.get(vcpu).and_then(|row| row.get(r as usize)) {
            c.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Sets one vCPU's counts (a restored run continues the saved ones).
    pub fn seed(&self, vcpu: usize, c: &ExitCounts) {
        if let Some(row) = self.rows.get(vcpu) {
            for (a, v) in row.iter().zip(c.iter()) {
                a.store(*v, std::sync::atomic::Ordering::Relaxed);
            }
        }
    }

    /// One vCPU's counts.
    pub fn vcpu(&self, vcpu: usize) -> ExitCounts {
        let mut t = [0u64; EXIT_REASONS];
        if let Some(row) = self.rows.get(vcpu) {
            for (a, c) in t.iter_mut().zip(row.iter()) {
                *a = c.load(std::sync::atomic::Ordering::Relaxed);
            }
        }
        t
    }

    /// Counts summed over vCPUs.
    pub fn total(&self) -> ExitCounts {
        let mut t = [0u64; EXIT_REASONS];
        for i in 0..self.rows.len() {
            for (a, b) in t.iter_mut().zip(self.vcpu(i).iter()) {
                *a = a.saturating_add(*b);
            }
        }
        t
    }
}

/// `a - b` per reason.
pub fn exit_delta(a: &ExitCounts, b: &ExitCounts) -> ExitCounts {
    let mut d = [0u64; EXIT_REASONS];
    for ((d, a), b) in d.iter_mut().zip(a.iter()).zip(b.iter()) {
        *d = a.saturating_sub(*b);
    }
    d
}

/// "name n, name n" for the non-zero counts.
pub fn exit_list(c: &ExitCounts) -> String {
    EXIT_NAMES
        .iter()
        .zip(c.iter())
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{k} {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this value to the isa-debug-exit port (status `(n << 1) | 1`).
    DebugExit(u32),
    /// Every vCPU halted with interrupts off or waits for SIPI: nothing can ever run.
    AllStopped,
    /// The wall-clock limit passed.
    Timeout,
    /// The guest died: triple fault, KVM internal error, failed entry.
    GuestCrash(String),
    /// The VMM itself failed (an ioctl error).
    VmmError(String),
    /// `--save`: every vCPU was paused and the VM written to a save file; the
    /// text says what was saved.
    Saved(String),
}

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

/// Which convention turns a run's outcome into the process exit status.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExitRules {
    /// The built-in test guest (and the library's tests): [`exit_code`] — 0 when
    /// something passed and nothing failed, 1 when a scenario failed or none ran.
    Scenarios,
    /// A `--kernel` guest, as QEMU's isa-debug-exit device does it: an
    /// isa-debug-exit write of N ends the process with `(N << 1) | 1`, truncated to
    /// 8 bits as `exit()` truncates it (kvm-unit-tests' runner reads 1 as pass, 3 as
    /// fail, 77 as skip). Other outcomes keep their [`exit_code`] (timeout 3, crash
    /// 4, VMM error 5; a run that ends without the write: 0 or 1 as under
    /// `Scenarios`).
    DebugExit,
}

/// QEMU's isa-debug-exit status for a write of `n`: `(n << 1) | 1`, low 8 bits.
pub fn debug_exit_status(n: u32) -> u8 {
    (((u64::from(n) << 1) | 1) & 0xFF) as u8
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

    /// The process exit code this run earns under `rules`.
    pub fn exit_code_under(&self, rules: ExitRules) -> u8 {
        match (rules, &self.outcome) {
            (ExitRules::DebugExit, Outcome::DebugExit(n)) => debug_exit_status(*n),
            _ => self.exit_code(),
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

#[cfg(test)]
mod exit_rules_tests {
    use super::*;

    #[test]
    fn debug_exit_status_is_qemus_n_shl_1_or_1() {
        // QEMU hw/misc/debugexit.c behaviour: exit((val << 1) | 1); kvm-unit-tests'
        // scripts/arch-run.bash reads 1 as pass, 3 as fail and 77 (N = 38) as skip.
        assert_eq!(debug_exit_status(0), 1);
        assert_eq!(debug_exit_status(1), 3);
        assert_eq!(debug_exit_status(38), 77);
        // exit() keeps the low 8 bits: 0x80 wraps to 1, u32::MAX to 0xFF.
        assert_eq!(debug_exit_status(0x80), 1);
        assert_eq!(debug_exit_status(u32::MAX), 0xFF);
    }
}
