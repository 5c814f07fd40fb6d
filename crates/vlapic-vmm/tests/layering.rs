//! The VMM's modules depend one way: [`LAYERS`] lists them bottom-up (the order the
//! crate docs give), and each module may use only modules listed before it (no import
//! circles; savefile, summary and vm at the edge). This test reads the sources and
//! fails on any edge pointing up, and on a module missing from the list.

use std::path::Path;

/// The modules, bottom-up.
const LAYERS: [&str; 37] = [
    "files",
    "stats",
    "wire",
    "outcome",
    "memory",
    "kvmclock",
    "acpi",
    "guest",
    "hpet",
    "rtc",
    "pic",
    "stream",
    "console",
    "snapshot",
    "kernel_chip",
    "kernel_timer",
    "loader",
    "linux",
    "fill_in",
    "boot",
    "devices",
    "clocks",
    "gate",
    "trace",
    "trace_json",
    "shared",
    "vcpu",
    "migrate",
    "savefile",
    "capture",
    "incoming",
    "outgoing",
    "config",
    "supervisor",
    "summary",
    "run_end",
    "vm",
];

/// Module names declared in `lib.rs`.
fn declared(src: &Path) -> Vec<String> {
    let lib = std::fs::read_to_string(src.join("lib.rs")).expect("lib.rs");
    lib.lines()
        .filter_map(|l| l.trim().strip_prefix("pub mod "))
        .map(|m| m.trim_end_matches(';').to_string())
        .collect()
}

/// Modules of this crate that `file` names as `crate::x`.
fn uses(file: &str, modules: &[String]) -> Vec<String> {
    let mut out: Vec<String> = modules
        .iter()
        .filter(|m| {
            file.contains(&format!("crate::{m}::"))
                || file.contains(&format!("crate::{m};"))
                || file.contains(&format!("crate::{{{m}"))
                || file.contains(&format!("crate::{m}}}"))
                || file.contains(&format!("crate::{{self, {m}"))
                || file.contains(&format!(", {m}}}")) && file.contains("use crate::{")
        })
        .cloned()
        .collect();
    out.sort();
    out.dedup();
    out
}

#[test]
fn modules_depend_one_way() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let modules: Vec<String> = LAYERS.iter().map(|s| s.to_string()).collect();
    let mut lib = declared(&src);
    lib.sort();
    let mut ours = modules.clone();
    ours.sort();
    assert_eq!(lib, ours, "every module of lib.rs has a layer");
    let mut report = Vec::new();
    let mut bad = Vec::new();
    for (i, m) in modules.iter().enumerate() {
        let text = std::fs::read_to_string(src.join(format!("{m}.rs"))).expect("module file");
        let used = uses(&text, &modules);
        for u in &used {
            let j = modules.iter().position(|x| x == u).unwrap_or(usize::MAX);
            if u != m && j >= i {
                bad.push(format!("{m} uses {u}, which lib.rs lists after it"));
            }
        }
        report.push(format!("{m} -> {}", used.join(", ")));
    }
    eprintln!("{}", report.join("\n"));
    assert!(bad.is_empty(), "{bad:#?}");
}
