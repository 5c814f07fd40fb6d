//! Helpers shared by the live-migration tests (`live_migration`,
//! `live_migration_kvm`): source and destination processes, skip checks, output digests.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::Duration;

use serde_json::Value;

pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vlapic"))
}

/// True when /dev/kvm can run our VMs and the test guest was built; otherwise
/// prints the one skip line.
pub fn ready() -> bool {
    if let Err(reason) = vlapic_vmm::kvm_usable() {
        eprintln!("SKIPPED: /dev/kvm not available: {reason}");
        return false;
    }
    if vlapic_vmm::guest::test_guest().is_none() {
        eprintln!("SKIPPED: test guest image not built (scripts/build-guest.sh failed)");
        return false;
    }
    true
}

pub fn sock(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lm-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

pub fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A run's output for an assertion message: first one line naming its outcome and
/// the scenarios that did not pass (CI logs cut long messages), then everything.
pub fn text(o: &Output) -> String {
    format!(
        "exit {:?} {}\n--- stdout\n{}\n--- stderr\n{}",
        o.status.code(),
        digest(o),
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// "outcome: ...; not passed: name (status: detail), ..." from a run's JSON summary,
/// or "" when stdout holds none.
pub fn digest(o: &Output) -> String {
    let Ok(v) = serde_json::from_str::<Value>(String::from_utf8_lossy(&o.stdout).trim()) else {
        return String::new();
    };
    let bad: Vec<String> = v["scenarios"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|s| s["status"] != "PASS")
                .map(|s| format!("{} ({}: {})", s["name"], s["status"], s["detail"]))
                .collect()
        })
        .unwrap_or_default();
    format!(
        "outcome: {}; passed {} failed {}; not passed: [{}]",
        v["outcome"]["text"],
        v["passed"],
        v["failed"],
        bad.join(", ")
    )
}

pub fn json(o: &Output) -> Value {
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim())
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {}", text(o)))
}

/// The number of scenarios in the test guest (its `SCENARIOS` table).
pub fn scenario_count() -> usize {
    let src = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../../guest/src/scenarios/mod.rs"),
    )
    .expect("guest scenario list");
    let table = src
        .split("pub const SCENARIOS")
        .nth(1)
        .and_then(|t| t.split("];").next())
        .expect("SCENARIOS table");
    table.matches("sc(").count()
}

/// Every scenario passed, each exactly once, no verifier violations, exit 0.
pub fn check_whole_run(v: &Value, o: &Output) {
    let total = scenario_count();
    let all = format!("{}\n{v:#}", text(o));
    assert_eq!(o.status.code(), Some(0), "{all}");
    assert_eq!(v["passed"], total, "{all}");
    assert_eq!(v["failed"], 0, "{all}");
    assert_eq!(v["violations"], 0, "{all}");
    assert_eq!(
        distinct_scenarios(v),
        total,
        "a scenario counted twice: {all}"
    );
}

/// How many different scenario names a run's JSON summary lists.
pub fn distinct_scenarios(v: &Value) -> usize {
    let mut names: Vec<&str> = v["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    names.dedup();
    names.len()
}

pub fn source(addr: &str, after_ms: u64, vcpus: &str) -> Child {
    bin()
        .args([
            "run",
            "--vcpus",
            vcpus,
            "--memory",
            "64",
            "--quiet",
            "--json",
            "--timeout",
            "120",
            "--migrate-to",
            addr,
            "--migrate-after",
        ])
        .arg(after_ms.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn source")
}

pub fn destination(addr: &str) -> Child {
    bin()
        .args([
            "run",
            "--incoming",
            addr,
            "--quiet",
            "--json",
            "--timeout",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn destination")
}

/// One migration of the test guest (4 vCPUs) to `addr`: both sides report it.
pub fn migrate_once(addr: &str) {
    let dst = destination(addr);
    std::thread::sleep(Duration::from_millis(100));
    let src = source(addr, 600, "4");
    let so = src.wait_with_output().expect("source");
    let d = dst.wait_with_output().expect("destination");
    let s = json(&so);
    let all = format!("SOURCE {}\nDESTINATION {}", text(&so), text(&d));
    assert_eq!(so.status.code(), Some(0), "{all}");
    assert_eq!(s["outcome"]["kind"], "migrated", "{all}");
    let out = &s["live_migration_out"];
    assert_eq!(out["completed"], true, "{all}");
    assert!(out["downtime_us"].as_u64().is_some(), "{all}");
    assert!(out["rounds"].as_u64() >= Some(1), "{all}");
    let v = json(&d);
    check_whole_run(&v, &d);
    let inn = &v["live_migration_in"];
    assert_eq!(inn["completed"], true, "{all}");
    assert_eq!(inn["rounds"], out["rounds"], "{all}");
    assert_eq!(v["migrations"], 1, "{all}");
    eprintln!(
        "{addr}: source {} s, destination {} scenarios; out {out}; in {inn}",
        s["elapsed_s"], v["passed"]
    );
}
