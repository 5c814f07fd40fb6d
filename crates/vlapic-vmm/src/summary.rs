//! The run's result: outcome, per-vCPU counters, exits by reason, scenario
//! results from the console, APIC verifier figures; as text or one JSON object.

use std::fmt::Write as _;
use std::time::Duration;

use crate::console::ConsoleLog;
use crate::stream::LiveStats;

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
    /// Of `interrupts`, those from the 8259 (ExtINT; not counted across a restore).
    pub extints: u64,
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
    /// `int3` / `int n` delivered by the VMM because KVM's emulator could not
    /// (`vlapic_kvm::softint`; not carried across save/restore or migration into
    /// another process).
    pub soft_interrupts: u64,
    /// The first unknown port, wild MMIO address and #GP MSR seen.
    pub first_odd: [u64; 3],
    /// The guest left the CMOS index port's NMI-mask bit (0x70 bit 7) set.
    pub nmi_masked: bool,
    /// HPET expiries that coalesced into an earlier interrupt (handled late).
    pub hpet_coalesced: u64,
    /// Wall-clock run time.
    pub elapsed: Duration,
    /// Guest TSC frequency used for VM time.
    pub tsc_hz: u64,
    /// `--incoming`: how the VM arrived (this process was the destination).
    pub live_in: Option<LiveStats>,
    /// `--migrate-to`: how the VM left, or why it stayed (this process was the source).
    pub live_out: Option<LiveStats>,
}

/// Version of the `vlapic run --json` object (its `"schema"` key), documented in
/// docs/vmm.md. Raised whenever a key is removed, renamed or changes type or
/// meaning; adding a key does not raise it.
pub const JSON_SCHEMA: u32 = 1;

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
            Outcome::Migrated(_) => exit_code::PASS,
            // As QEMU: a guest that powers itself off ends with status 0.
            Outcome::PoweredOff => exit_code::PASS,
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
            Outcome::PoweredOff => "powered off (ACPI S5)".into(),
            Outcome::AllStopped => {
                "all vCPUs stopped (halted with IF=0 or waiting for SIPI)".into()
            }
            Outcome::Timeout => "timeout".into(),
            Outcome::GuestCrash(m) => format!("guest crash: {m}"),
            Outcome::VmmError(m) => format!("VMM error: {m}"),
            Outcome::Saved(m) => format!("saved {m}"),
            Outcome::Migrated(m) => format!("migrated to {m} (the destination runs the VM)"),
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
        for l in [&self.live_in, &self.live_out].into_iter().flatten() {
            let _ = writeln!(s, "{}", live_text(l));
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
        if self.soft_interrupts > 0 {
            let _ = writeln!(
                s,
                "soft ints:    {} software interrupts delivered by the VMM (int3/int n KVM's emulator could not execute)",
                self.soft_interrupts
            );
        }
        if self.nmi_masked || self.hpet_coalesced > 0 {
            let _ = writeln!(
                s,
                "platform:     CMOS NMI mask {}, {} HPET expiries coalesced",
                if self.nmi_masked { "set" } else { "clear" },
                self.hpet_coalesced
            );
        }
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

    /// `outcome` as a JSON object: `kind` (`debug_exit`, `all_stopped`, `timeout`,
    /// `guest_crash`, `vmm_error`, `saved`, `migrated`, `powered_off`), `code` (the
    /// debug-exit value, else null),
    /// `message` (crash, error or save detail, else null) and `text` (the summary's
    /// human-readable line).
    fn outcome_json(&self) -> serde_json::Value {
        let (kind, code, message) = match &self.outcome {
            Outcome::DebugExit(n) => ("debug_exit", Some(*n), None),
            Outcome::AllStopped => ("all_stopped", None, None),
            Outcome::PoweredOff => ("powered_off", None, None),
            Outcome::Timeout => ("timeout", None, None),
            Outcome::GuestCrash(m) => ("guest_crash", None, Some(m.as_str())),
            Outcome::VmmError(m) => ("vmm_error", None, Some(m.as_str())),
            Outcome::Saved(m) => ("saved", None, Some(m.as_str())),
            Outcome::Migrated(m) => ("migrated", None, Some(m.as_str())),
        };
        serde_json::json!({
            "kind": kind,
            "code": code,
            "message": message,
            "text": self.outcome_text(),
        })
    }

    /// The guest's `DONE passed=P failed=F skipped=S` line as `{"line", "passed",
    /// "failed", "skipped"}` (a count the line lacks is null); null without one.
    fn done_json(&self) -> serde_json::Value {
        let Some(line) = &self.console.done else {
            return serde_json::Value::Null;
        };
        let count = |key: &str| -> Option<u64> {
            line.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .find(|(k, _)| *k == key)
                .and_then(|(_, v)| v.parse().ok())
        };
        serde_json::json!({
            "line": line,
            "passed": count("passed"),
            "failed": count("failed"),
            "skipped": count("skipped"),
        })
    }

    /// The same as one JSON object, version [`JSON_SCHEMA`] (key `"schema"`). Every
    /// number is a JSON integer (addresses, ports and MSR indexes too; never a hex
    /// string) except the `elapsed_*` times; a value that does not exist is `null`,
    /// never 0. Keys are listed in docs/vmm.md.
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
                    "interrupts": v.interrupts, "extints": v.extints, "nmis": v.nmis, "sipis": v.sipis,
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
        // The first odd port/address/MSR exists only if one was seen (port 0 is a port).
        let first = |n: u64, v: u64| (n > 0).then_some(v);
        serde_json::json!({
            "schema": JSON_SCHEMA,
            "outcome": self.outcome_json(),
            "exit_code": self.exit_code(),
            "passed": self.passed(),
            "failed": self.failed(),
            "skipped": self.skipped(),
            "done": self.done_json(),
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
            "soft_interrupts": self.soft_interrupts,
            "first_unknown_port": first(self.unknown_ports, self.first_odd[0]),
            "first_wild_mmio": first(self.wild_mmio, self.first_odd[1]),
            "first_gp_msr": first(self.msr_gp, self.first_odd[2]),
            "elapsed_s": self.elapsed.as_secs_f64(),
            "tsc_hz": self.tsc_hz,
            "vcpus": vcpus,
            "live_migration_in": self.live_in.as_ref().map(live_json),
            "live_migration_out": self.live_out.as_ref().map(live_json),
        })
    }
}

/// One line about a live migration between processes.
fn live_text(l: &LiveStats) -> String {
    let rounds: Vec<String> = l
        .round_pages
        .iter()
        .zip(&l.round_bytes)
        .map(|(p, b)| format!("{p}p/{}KiB", b / 1024))
        .collect();
    format!(
        "live {}:  {} {} — {}; {} pre-copy rounds + paused [{}], {} bytes, {:.1} ms total, downtime {}",
        if l.role == "source" { "out" } else { "in " },
        if l.role == "source" { "to" } else { "from" },
        l.peer,
        l.result,
        l.rounds,
        rounds.join(", "),
        l.bytes,
        l.total_ms,
        l.downtime_us
            .map_or("-".to_string(), |d| format!("{d} us")),
    )
}

/// A live migration as JSON (`live_migration_in` / `live_migration_out`).
fn live_json(l: &LiveStats) -> serde_json::Value {
    serde_json::json!({
        "role": l.role,
        "peer": l.peer,
        "completed": l.completed,
        "result": l.result,
        "rounds": l.rounds,
        "round_pages": l.round_pages,
        "round_bytes": l.round_bytes,
        "bytes": l.bytes,
        "total_ms": l.total_ms,
        "downtime_us": l.downtime_us,
    })
}

#[cfg(test)]
#[path = "summary_tests.rs"]
mod tests;
