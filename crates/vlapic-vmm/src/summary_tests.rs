//! Unit tests of `summary.rs`.

use super::*;
use crate::console::{BenchLine, Scenario};
use serde_json::{json, Value};

/// Every top-level key of schema 1, in documentation order (docs/vmm.md).
const KEYS_V1: [&str; 29] = [
    "schema",
    "outcome",
    "exit_code",
    "passed",
    "failed",
    "skipped",
    "done",
    "bench",
    "scenarios",
    "max_nesting",
    "migrations",
    "max_downtime_us",
    "nested_migrations",
    "max_in_service_migrated",
    "violations",
    "interrupts",
    "exits",
    "unknown_ports",
    "wild_mmio",
    "msr_gp",
    "soft_interrupts",
    "first_unknown_port",
    "first_wild_mmio",
    "first_gp_msr",
    "elapsed_s",
    "tsc_hz",
    "vcpus",
    "live_migration_in",
    "live_migration_out",
];

fn report(outcome: Outcome) -> RunReport {
    let mut console = ConsoleLog::default();
    console.scenarios.push(Scenario {
        name: "nested".into(),
        status: "PASS".into(),
        detail: String::new(),
        exits: [0, 2, 0, 3, 0, 0, 0, 0, 0, 0, 0],
        elapsed: Duration::from_millis(4),
    });
    console.scenarios.push(Scenario {
        name: "timer".into(),
        status: "FAIL".into(),
        detail: "late by 3 ms".into(),
        exits: [0; EXIT_REASONS],
        elapsed: Duration::from_millis(1),
    });
    console.bench.push(BenchLine {
        name: "ipi".into(),
        cycles: 1200,
        iters: 1000,
    });
    console.done = Some("DONE passed=1 failed=1 skipped=0".into());
    RunReport {
        outcome,
        console,
        vcpus: vec![VcpuReport {
            index: 0,
            state: "halted".into(),
            rip: 0x10_0000,
            exits: [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0],
            interrupts: 42,
            extints: 0,
            nmis: 1,
            sipis: 0,
            apic: "xapic".into(),
        }],
        max_nesting: 3,
        violations: 0,
        migrations: 2,
        max_downtime_us: 900,
        nested_migrations: 1,
        max_in_service_migrated: 3,
        unknown_ports: 0,
        wild_mmio: 0,
        msr_gp: 0,
        soft_interrupts: 0,
        first_odd: [0; 3],
        nmi_masked: false,
        hpet_coalesced: 0,
        elapsed: Duration::from_millis(1500),
        tsc_hz: 2_000_000_000,
        live_in: None,
        live_out: None,
    }
}

fn keys(v: &Value) -> Vec<&str> {
    let mut k: Vec<&str> = v
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    k.sort_unstable();
    k
}

// Schema 1 is a contract: exactly these keys, `schema` = 1, and the types below.
#[test]
fn json_schema_1_has_exactly_the_documented_keys() {
    let v = report(Outcome::DebugExit(0)).json();
    assert_eq!(v["schema"], 1);
    assert_eq!(JSON_SCHEMA, 1);
    let mut want = KEYS_V1.to_vec();
    want.sort_unstable();
    assert_eq!(keys(&v), want);
    assert_eq!(v["exit_code"], 1, "a FAIL line fails the run");
    assert_eq!(v["passed"], 1);
    assert_eq!(v["failed"], 1);
    assert_eq!(v["skipped"], 0);
    assert_eq!(v["max_nesting"], 3);
    assert_eq!(v["migrations"], 2);
    assert_eq!(v["max_downtime_us"], 900);
    assert_eq!(v["nested_migrations"], 1);
    assert_eq!(v["max_in_service_migrated"], 3);
    assert_eq!(v["violations"], 0);
    assert_eq!(v["interrupts"], json!([42]));
    assert_eq!(v["tsc_hz"], 2_000_000_000u64);
    assert_eq!(v["elapsed_s"], 1.5);
    assert_eq!(
        v["bench"],
        json!([{"name": "ipi", "cycles": 1200, "iters": 1000}])
    );
    // Exits by reason: every reason, as integers.
    let exits = v["exits"].as_object().expect("exits");
    assert_eq!(exits.len(), EXIT_REASONS);
    assert_eq!(v["exits"]["io_out"], 2);
    assert_eq!(v["exits"]["kick"], 10);
    assert_eq!(v["exits"]["other"], 0);
    // Scenarios: only the non-zero exits.
    assert_eq!(
        v["scenarios"][0],
        json!({"name": "nested", "status": "PASS", "detail": "",
               "elapsed_ms": 4.0, "exits": {"io_out": 2, "mmio_write": 3}})
    );
    assert_eq!(v["scenarios"][1]["status"], "FAIL");
    assert_eq!(v["scenarios"][1]["detail"], "late by 3 ms");
    // vCPUs: RIP is an integer, not a hex string.
    let cpu = &v["vcpus"][0];
    assert_eq!(
        keys(cpu),
        [
            "apic",
            "exits",
            "extints",
            "index",
            "interrupts",
            "nmis",
            "rip",
            "sipis",
            "state"
        ]
    );
    assert_eq!(cpu["rip"], 0x10_0000);
    assert_eq!(cpu["state"], "halted");
    assert_eq!(cpu["exits"]["hlt"], 7);
}

// `outcome` is split into fields; what does not apply is null.
#[test]
fn json_outcome_is_kind_code_message() {
    let cases = [
        (Outcome::DebugExit(0), "debug_exit", json!(0), Value::Null),
        (Outcome::DebugExit(7), "debug_exit", json!(7), Value::Null),
        (Outcome::AllStopped, "all_stopped", Value::Null, Value::Null),
        (Outcome::Timeout, "timeout", Value::Null, Value::Null),
        (
            Outcome::GuestCrash("vcpu1: triple fault".into()),
            "guest_crash",
            Value::Null,
            json!("vcpu1: triple fault"),
        ),
        (
            Outcome::VmmError("KVM_RUN: EFAULT".into()),
            "vmm_error",
            Value::Null,
            json!("KVM_RUN: EFAULT"),
        ),
        (
            Outcome::Saved("/tmp/s.vlsave: 1 bytes".into()),
            "saved",
            Value::Null,
            json!("/tmp/s.vlsave: 1 bytes"),
        ),
    ];
    for (outcome, kind, code, message) in cases {
        let r = report(outcome);
        let o = &r.json()["outcome"];
        assert_eq!(keys(o), ["code", "kind", "message", "text"], "{o}");
        assert_eq!(o["kind"], kind);
        assert_eq!(o["code"], code, "{kind}");
        assert_eq!(o["message"], message, "{kind}");
        assert_eq!(o["text"], r.outcome_text());
    }
    let o = report(Outcome::DebugExit(0)).json();
    assert_eq!(o["outcome"]["code"], 0, "code 0 is a value, not null");
    assert_eq!(o["outcome"]["text"], "guest exit 0 (status 1)");
}

// `done` is the parsed DONE line, or null when the guest printed none.
#[test]
fn json_done_is_parsed_or_null() {
    let r = report(Outcome::DebugExit(0));
    assert_eq!(
        r.json()["done"],
        json!({"line": "DONE passed=1 failed=1 skipped=0",
               "passed": 1, "failed": 1, "skipped": 0})
    );
    let mut r = report(Outcome::Timeout);
    r.console.done = None;
    assert_eq!(r.json()["done"], Value::Null);
    // A count the line lacks is null, not 0.
    r.console.done = Some("DONE passed=5".into());
    let d = &r.json()["done"];
    assert_eq!(d["passed"], 5);
    assert_eq!(d["failed"], Value::Null);
    assert_eq!(d["skipped"], Value::Null);
}

// "None seen" is null; port 0, address 0 and MSR 0 are real values.
#[test]
fn json_first_odd_values_are_null_only_when_none_was_seen() {
    let v = report(Outcome::DebugExit(0)).json();
    assert_eq!(v["unknown_ports"], 0);
    assert_eq!(v["first_unknown_port"], Value::Null);
    assert_eq!(v["first_wild_mmio"], Value::Null);
    assert_eq!(v["first_gp_msr"], Value::Null);
    let mut r = report(Outcome::DebugExit(0));
    r.unknown_ports = 3;
    r.wild_mmio = 1;
    r.msr_gp = 2;
    r.first_odd = [0, 0xFED0_0000, 0];
    let v = r.json();
    assert_eq!(v["first_unknown_port"], 0);
    assert_eq!(v["first_wild_mmio"], 0xFED0_0000u64);
    assert_eq!(v["first_gp_msr"], 0);
}

// Software interrupts delivered by the VMM: a text line only when there were any,
// always the JSON integer.
#[test]
fn soft_interrupts_in_text_and_json() {
    let r = report(Outcome::DebugExit(0));
    assert!(!r.text().contains("soft ints:"));
    assert_eq!(r.json()["soft_interrupts"], 0);
    let mut r = report(Outcome::DebugExit(0));
    r.soft_interrupts = 7;
    assert!(r
        .text()
        .contains("soft ints:    7 software interrupts delivered by the VMM"));
    assert_eq!(r.json()["soft_interrupts"], 7);
}

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
