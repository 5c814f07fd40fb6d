//! `vlapic replay` run as a user would: a trace of register accesses and interrupts,
//! its output lines tagged with their trace line, errors, JSON, and exports that
//! `inspect` reads back unchanged.

mod common;

use common::{broken_bhyve, json_of, stderr, stdout, tmp, vlapic};

const TRACE: &str = "\
# three nested handlers, exported mid-handler and imported back
mmio-write 0xF0 0x1FF   # software enable
mmio-write 0x80 0x20
irq 0x41 level
ack
irq 0x61 edge
ack
irq 0x81 edge
ack
irq 0x35 edge
mmio-read 0xA0
msr-read 0x802          # x2APIC MSR in xAPIC mode
msr-read 0x1B
export EXPORT_FMT EXPORT_FILE
eoi
eoi
eoi
import EXPORT_FMT EXPORT_FILE
mmio-read 0xA0
ack
eoi
eoi
eoi
ack
eoi
time 100
msr-write 0x1B 0xFEE00D00
msr-read 0x802
msr-write 0x80B 1
eoi
";

// Every line carries the number of the trace line that produced it; the summary `end`.
const EXPECTED: &str = "\
5: 0x41
7: 0x61
9: 0x81
11: 0xa0 = 0x80
12: 0x802 = #GP
13: 0x1b = 0xfee00900
17: ioapic-eoi 0x41
19: 0xa0 = 0x80
20: none
23: ioapic-eoi 0x41
24: 0x35
28: 0x802 = 0x0
29: 0x80b <- #GP
end: verifier violations 0
end: deepest nesting 3
";

// The replay tool reproduces issue 4's acceptance scenario through every format.
#[test]
fn replay_prints_reads_acks_and_verifier_summary() {
    for fmt in ["native", "kvm", "bhyve"] {
        let state = tmp(&format!("replay.{fmt}"));
        let trace = TRACE
            .replace("EXPORT_FMT", fmt)
            .replace("EXPORT_FILE", state.to_str().unwrap());
        let p = tmp(&format!("replay-{fmt}.trace"));
        std::fs::write(&p, trace).unwrap();
        let o = vlapic(&["replay", p.to_str().unwrap()]);
        assert_eq!(o.status.code(), Some(0), "{fmt}: {}", stderr(&o));
        let s = stdout(&o);
        // After the x2APIC switch the ID MSR reads the ID.
        assert_eq!(s, EXPECTED, "{fmt}");
    }
}

#[test]
fn replay_errors_name_file_and_line() {
    let p = tmp("bad.trace");
    std::fs::write(&p, "ack\nirq 300 edge\n").unwrap();
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.trace:2: vector above 255: `irq 300 edge`"),
        "{}",
        stderr(&o)
    );
    let bad = broken_bhyve();
    std::fs::write(&p, format!("import bhyve {}\n", bad.display())).unwrap();
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("bad.trace:1: ") && stderr(&o).contains("tpr (byte 0x8)"),
        "{}",
        stderr(&o)
    );
}

// `replay --json`: one object, every event with its trace line; errors too.
#[test]
fn replay_json_events_carry_their_line() {
    let p = tmp("json.trace");
    std::fs::write(
        &p,
        "# comment\n\
         mmio-write 0xF0 0x1FF\n\
         irq 0x41 level\n\
         ack\n\
         ack\n\
         mmio-read 0xA0\n\
         msr-read 0x802\n\
         mmio-write 0x310 0x01000000\n\
         mmio-write 0x300 0x4051\n\
         eoi\n\
         irq 0 edge\n",
    )
    .unwrap();
    let o = vlapic(&["replay", "--json", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["schema"], 1);
    assert_eq!(v["error"], serde_json::Value::Null);
    assert_eq!(
        v["events"],
        serde_json::json!([
            {"line": 4, "kind": "ack", "vector": 0x41},
            {"line": 5, "kind": "ack", "vector": null},
            {"line": 6, "kind": "mmio_read", "offset": 0xA0, "value": 0x40},
            {"line": 7, "kind": "msr_read", "msr": 0x802, "value": null, "gp": true},
            {"line": 9, "kind": "ipi", "mode": "fixed", "vector": 0x51, "dest": 1,
             "dest_mode": "physical", "shorthand": "none"},
            {"line": 10, "kind": "ioapic_eoi", "vector": 0x41},
        ])
    );
    assert_eq!(
        v["verifier"],
        serde_json::json!({"violations": 0, "first": null, "max_depth": 1})
    );
    // The same trace as text: `N: ` on every line, `end: ` on the summary.
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(
        stdout(&o),
        "4: 0x41\n5: none\n6: 0xa0 = 0x40\n7: 0x802 = #GP\n\
         9: ipi Fixed vector 0x51 dest 0x1 Physical None\n10: ioapic-eoi 0x41\n\
         end: verifier violations 0\nend: deepest nesting 1\n"
    );
    // A bad line: the events before it, and the error with its line.
    std::fs::write(
        &p,
        "mmio-write 0xF0 0x1FF\nirq 0x30 edge\nack\nfrobnicate\n",
    )
    .unwrap();
    let o = vlapic(&["replay", "--json", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert_eq!(
        v["events"],
        serde_json::json!([{"line": 3, "kind": "ack", "vector": 0x30}])
    );
    assert_eq!(v["error"]["line"], 4);
    assert!(
        v["error"]["message"]
            .as_str()
            .unwrap()
            .contains("json.trace:4: unknown operation `frobnicate`"),
        "{v}"
    );
}

// Every file `vlapic replay` exports — every format, xAPIC and x2APIC, timers armed,
// software- and hardware-disabled — passes `vlapic inspect` as written, with no
// options, and all formats show the same state.
#[test]
fn every_replay_export_passes_inspect_unchanged() {
    const FORMATS: [&str; 4] = ["native", "kvm", "bhyve", "json"];
    let steps: [(&str, &str); 7] = [
        ("reset", ""),
        (
            "xapic-nested",
            "mmio-write 0xF0 0x1FF\nmmio-write 0x80 0x20\nirq 0x41 level\nack\n\
             irq 0x61 edge\nack\nirq 0x35 edge\nmmio-write 0xD0 0x05000000\n",
        ),
        (
            "xapic-timer",
            "mmio-write 0x3E0 0x3\nmmio-write 0x320 0x200EC\nmmio-write 0x380 10000\ntime 300\n",
        ),
        ("sw-disabled", "mmio-write 0xF0 0xFF\n"),
        ("hw-disabled", "msr-write 0x1B 0xFEE00100\n"),
        (
            "x2apic",
            "msr-write 0x1B 0xFEE00900\nmsr-write 0x1B 0xFEE00D00\nmsr-write 0x80F 0x1FF\n\
             irq 0x52 edge\nack\nmsr-write 0x808 0x30\n",
        ),
        (
            "x2apic-timer",
            "msr-write 0x83E 0x1\nmsr-write 0x832 0x20051\nmsr-write 0x838 5000\ntime 900\n",
        ),
    ];
    let mut trace = String::new();
    for (name, ops) in steps {
        trace.push_str(ops);
        for fmt in FORMATS {
            let f = tmp(&format!("export-{name}.{fmt}"));
            trace.push_str(&format!("export {fmt} {}\n", f.display()));
        }
    }
    let p = tmp("exports.trace");
    std::fs::write(&p, &trace).unwrap();
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    for (name, _) in steps {
        let mut views = Vec::new();
        for fmt in FORMATS {
            let f = tmp(&format!("export-{name}.{fmt}"));
            let o = vlapic(&["inspect", "--json", f.to_str().unwrap()]);
            assert_eq!(
                o.status.code(),
                Some(0),
                "{name}.{fmt}: {}{}",
                stdout(&o),
                stderr(&o)
            );
            let v = json_of(&o);
            assert_eq!(v["format"], fmt, "{name}: detected format");
            assert_eq!(v["valid"], true, "{name}.{fmt}: {v:#}");
            // The text view agrees and never says INVALID.
            let o = vlapic(&["inspect", f.to_str().unwrap()]);
            assert!(
                stdout(&o).contains("valid: every import rule holds"),
                "{name}.{fmt}: {}",
                stdout(&o)
            );
            views.push((fmt, v));
        }
        // The same architectural state through every format (a kvm page cannot hold
        // "hardware-disabled": it reads as the reset xAPIC state it equals).
        let native = &views[0].1;
        for (fmt, v) in &views[1..] {
            let mut keys = vec![
                "id", "tpr", "ppr", "ldr", "svr", "isr", "irr", "tmr", "icr", "lvt",
            ];
            if !(*fmt == "kvm" && name == "hw-disabled") {
                keys.push("mode");
            }
            for k in keys {
                assert_eq!(v[k], native[k], "{name}: {k} in {fmt} vs native");
            }
        }
    }
    // The x2APIC kvm page is recognised by its shape and said so.
    let f = tmp("export-x2apic.kvm");
    let v = json_of(&vlapic(&["inspect", "--json", f.to_str().unwrap()]));
    assert_eq!(v["mode"], "x2apic");
    assert_eq!(v["apic_base_from"], "inferred-x2apic");
    assert_eq!(v["apic_base"], 0xFEE0_0D00u64);
    let o = vlapic(&["inspect", f.to_str().unwrap()]);
    assert!(
        stdout(&o).contains("inferred: x2APIC, as the page's ID and LDR are x2APIC-shaped"),
        "{}",
        stdout(&o)
    );
    // --apic-base still decides when given.
    let o = vlapic(&[
        "inspect",
        "--json",
        "--apic-base",
        "0xFEE00900",
        f.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert_eq!(v["apic_base_from"], "option");
    assert_eq!(v["violations"][0]["field"], "ldr");
    // The xAPIC kvm page keeps the default.
    let f = tmp("export-xapic-nested.kvm");
    let v = json_of(&vlapic(&["inspect", "--json", f.to_str().unwrap()]));
    assert_eq!(v["apic_base_from"], "default");
    assert_eq!(v["ldr"], 0x0500_0000);
}

// The example trace in `replay --help` prints what its comments say it prints.
#[test]
fn replay_help_example_is_true() {
    let help = stdout(&vlapic(&["replay", "--help"]));
    let example: Vec<&str> = help
        .lines()
        .skip_while(|l| !l.starts_with("Example trace:"))
        .skip(1)
        .take_while(|l| !l.trim().is_empty())
        .map(str::trim)
        .collect();
    assert_eq!(example.len(), 5, "{help}");
    let p = tmp("help.trace");
    std::fs::write(&p, example.join("\n")).unwrap();
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let printed: Vec<String> = example
        .iter()
        .filter_map(|l| l.split_once("# prints ").map(|(_, p)| p))
        .map(|p| p.trim_end_matches(" (PPR)").to_string())
        .collect();
    assert_eq!(printed.len(), 3);
    let out = stdout(&o);
    let lines: Vec<&str> = out.lines().take(3).collect();
    assert_eq!(lines, printed, "{out}");
}
