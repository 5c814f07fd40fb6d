//! `vlapic run --trace` and `vlapic timeline` (issue 17): the main job's trace and the
//! nested-priorities scenario's, checked for structure against the run's own summary;
//! the page rendered by headless Chromium; bad files and paths refused in one line.
#![cfg(feature = "trace")]

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

fn vlapic(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(args)
        .output()
        .expect("run vlapic")
}

fn skip(why: &str) {
    let _ = writeln!(std::io::stderr(), "SKIPPED: {why}");
}

/// True when /dev/kvm can run our VMs and the test guest is built.
fn kvm_ok() -> bool {
    if let Err(reason) = vlapic_vmm::kvm_usable() {
        skip(&format!("/dev/kvm not available: {reason}"));
        return false;
    }
    if vlapic_vmm::guest::test_guest().is_none() {
        skip("test guest image not built");
        return false;
    }
    true
}

fn tmp(name: &str) -> PathBuf {
    Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("{}-{name}", std::process::id()))
}

/// Runs the built-in guest with `--json --trace`; returns the summary and the trace.
fn traced_run(name: &str, extra: &[&str]) -> (Value, Value) {
    let path = tmp(name);
    let p = path.to_str().unwrap();
    let mut args = vec!["run", "--quiet", "--json", "--trace", p];
    args.extend_from_slice(extra);
    let o = vlapic(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(
        o.status.success(),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let summary: Value = serde_json::from_str(&out).expect("--json summary");
    let trace: Value = serde_json::from_slice(&std::fs::read(&path).expect("trace file"))
        .expect("well-formed JSON");
    (summary, trace)
}

fn events(t: &Value) -> &Vec<Value> {
    t["traceEvents"].as_array().expect("traceEvents")
}

/// The handler slices (category `irq`) per vCPU track, in start order.
fn handlers(t: &Value) -> BTreeMap<u64, Vec<&Value>> {
    let mut m: BTreeMap<u64, Vec<&Value>> = BTreeMap::new();
    for e in events(t).iter().filter(|e| e["cat"] == "irq") {
        assert_eq!(e["ph"], "X");
        m.entry(e["tid"].as_u64().unwrap()).or_default().push(e);
    }
    for v in m.values_mut() {
        v.sort_by(|a, b| {
            let k = |e: &Value| (e["ts"].as_f64().unwrap(), -e["dur"].as_f64().unwrap());
            k(a).partial_cmp(&k(b)).unwrap()
        });
    }
    m
}

/// Checks what every trace must satisfy, against the run's summary: a named track per
/// vCPU; handler slices nest properly (each lies inside the one it interrupted, or
/// after it) with `depth` = the stack's, and their deepest = the summary's
/// `max_nesting`; one handler per interrupt the vCPU took; each IPI one `s`/`f`
/// flow pair; one pause per migration in the summary.
fn check_structure(summary: &Value, t: &Value) {
    let evs = events(t);
    let n = summary["vcpus"].as_array().unwrap().len();
    for i in 0..n {
        assert!(
            evs.iter().any(|e| e["ph"] == "M"
                && e["name"] == "thread_name"
                && e["tid"] == i
                && e["args"]["name"] == format!("vCPU {i}")),
            "no track for vCPU {i}"
        );
    }
    let hs = handlers(t);
    let mut deepest = 0;
    for (tid, list) in &hs {
        let mut stack: Vec<(f64, f64)> = Vec::new();
        for h in list {
            let (ts, dur) = (h["ts"].as_f64().unwrap(), h["dur"].as_f64().unwrap());
            assert!(dur >= 0.0);
            while stack.last().is_some_and(|&(_, end)| end <= ts) {
                stack.pop();
            }
            if let Some(&(_, end)) = stack.last() {
                assert!(
                    ts + dur <= end + 1e-6,
                    "vCPU {tid}: {h} overlaps its parent"
                );
            }
            stack.push((ts, ts + dur));
            assert_eq!(
                h["args"]["depth"].as_u64(),
                Some(stack.len() as u64),
                "vCPU {tid}: {h}"
            );
            deepest = deepest.max(stack.len() as u64);
        }
    }
    assert_eq!(
        Some(deepest),
        summary["max_nesting"].as_u64(),
        "deepest nesting"
    );
    for v in summary["vcpus"].as_array().unwrap() {
        let i = v["index"].as_u64().unwrap();
        let took = hs.get(&i).map_or(0, Vec::len) as u64;
        // ExtINT vectors come from the 8259 (the pic-extint scenario): no local APIC
        // acknowledges or retires them, so they are no handler slice of the APIC.
        let apic_handled = v["interrupts"].as_u64().unwrap() - v["extints"].as_u64().unwrap();
        assert_eq!(took, apic_handled, "vCPU {i}: handlers vs interrupts");
    }
    let mut flows: BTreeMap<u64, (Vec<u64>, Vec<u64>)> = BTreeMap::new();
    for e in evs
        .iter()
        .filter(|e| e["cat"] == "ipi" && (e["ph"] == "s" || e["ph"] == "f"))
    {
        let f = flows.entry(e["id"].as_u64().unwrap()).or_default();
        let tid = e["tid"].as_u64().unwrap();
        if e["ph"] == "s" {
            f.0.push(tid)
        } else {
            f.1.push(tid)
        }
    }
    for (id, (s, f)) in &flows {
        assert!(s.len() == 1 && f.len() == 1, "flow {id}: {s:?} -> {f:?}");
    }
    assert_eq!(
        Some(flows.len() as u64),
        t["otherData"]["vlapic"]["ipis"].as_u64()
    );
    // A handler whose source is an IPI from vCPU k had a flow from k to its vCPU.
    for (tid, list) in &hs {
        for h in list {
            if let Some(k) = h["args"]["source"]
                .as_str()
                .and_then(|s| s.strip_prefix("IPI from vCPU "))
            {
                let k: u64 = k.parse().unwrap();
                assert!(
                    flows.values().any(|(s, f)| s[0] == k && f[0] == *tid),
                    "{h}"
                );
            }
        }
    }
    let pauses = evs
        .iter()
        .filter(|e| e["cat"] == "pause" && e["name"] == "migration")
        .count();
    assert_eq!(
        Some(pauses as u64),
        summary["migrations"].as_u64(),
        "migration pauses"
    );
    // "Nested migrations" (3+ in service on some vCPU) from the pauses' ISRs.
    let nested = evs
        .iter()
        .filter(|e| e["cat"] == "pause")
        .filter(|e| {
            e["args"]["isr"]
                .as_object()
                .unwrap()
                .values()
                .any(|v| v.as_array().unwrap().len() >= 3)
        })
        .count();
    assert_eq!(Some(nested as u64), summary["nested_migrations"].as_u64());
    let meta = &t["otherData"]["vlapic"];
    assert_eq!(
        (meta["lost"].as_u64(), meta["dropped"].as_u64()),
        (Some(0), Some(0))
    );
}

/// The main job (test guest, 4 vCPUs, live migration every 10 ms).
#[test]
fn main_job_trace_matches_its_summary() {
    if !kvm_ok() {
        return;
    }
    let (summary, trace) = traced_run("main-job.json", &[]);
    assert!(summary["migrations"].as_u64().unwrap() >= 10, "{summary}");
    check_structure(&summary, &trace);
    assert!(t_count(&trace, "timer") > 0, "timer expiries recorded");
    assert!(t_count(&trace, "event") > 0, "INIT/SIPI recorded");
}

fn t_count(t: &Value, cat: &str) -> usize {
    events(t).iter().filter(|e| e["cat"] == cat).count()
}

/// nested-priorities (guest/src/scenarios/priority.rs): self IPIs 0x41, 0x61, 0x81,
/// 0xA1, each sent by the previous one's handler with interrupts open, nest four deep
/// (SDM §11.8.3.1: a higher class than PPR is delivered); 0xA5, same class as 0xA1,
/// waits for 0xA1's EOI and then runs inside 0x81 (§11.8.5).
#[test]
fn nested_priorities_trace_shows_the_chain() {
    if !kvm_ok() {
        return;
    }
    let (summary, trace) = traced_run("nested.json", &["--append", "only=nested-priorities"]);
    check_structure(&summary, &trace);
    let hs = handlers(&trace);
    let chain: Vec<&Value> = hs[&0]
        .iter()
        .copied()
        .filter(|h| [0x41, 0x61, 0x81, 0xA1, 0xA5].contains(&h["args"]["vector"].as_u64().unwrap()))
        .collect();
    let got: Vec<(u64, u64)> = chain
        .iter()
        .map(|h| {
            (
                h["args"]["vector"].as_u64().unwrap(),
                h["args"]["depth"].as_u64().unwrap(),
            )
        })
        .collect();
    assert_eq!(got, [(0x41, 1), (0x61, 2), (0x81, 3), (0xA1, 4), (0xA5, 4)]);
    let end = |h: &Value| h["ts"].as_f64().unwrap() + h["dur"].as_f64().unwrap();
    assert!(
        chain[4]["ts"].as_f64().unwrap() >= end(chain[3]),
        "0xA5 only after 0xA1's EOI"
    );
    assert!(end(chain[4]) <= end(chain[2]), "0xA5 inside 0x81");
    for h in &chain {
        assert_eq!(h["args"]["source"], "self IPI", "{h}");
    }
    let o = vlapic(&["timeline", tmp("nested.json").to_str().unwrap(), "--text"]);
    let text = String::from_utf8_lossy(&o.stdout);
    assert!(o.status.success());
    assert!(
        text.contains("vCPU 0: depth 4 (0x41 > 0x61 > 0x81 > 0xa1)"),
        "{text}"
    );
}

/// The page in a real browser: headless Chromium (Debian's `chromium`) loads it from
/// a file with networking off, lays out one lane per vCPU (the page's script counts
/// lanes with a non-empty box into `data-lanes-rendered`) and takes a screenshot.
#[test]
fn chromium_renders_the_lanes() {
    let Some(chromium) = ["chromium", "chromium-browser"].iter().find(|c| {
        Command::new(c)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success())
    }) else {
        skip("chromium not installed (apt-get install chromium)");
        return;
    };
    if !kvm_ok() {
        return;
    }
    let (_, _) = traced_run(
        "browser.json",
        &["--append", "only=nested-priorities,ipi-fixed"],
    );
    let html = tmp("browser.html");
    let o = vlapic(&[
        "timeline",
        tmp("browser.json").to_str().unwrap(),
        "-o",
        html.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let profile = tmp("chromium-profile");
    let url = format!("file://{}", html.display());
    let run = |extra: &[&str]| {
        let mut c = Command::new(chromium);
        c.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
        ]);
        c.arg(format!("--user-data-dir={}", profile.display()));
        c.args(extra).arg(&url).output().expect("chromium")
    };
    let dom = run(&["--dump-dom"]);
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("data-lanes-rendered=\"4\""),
        "lanes not laid out:\n{}",
        &dom[..dom.len().min(2000)]
    );
    let drawn = dom
        .split("data-handlers-rendered=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .and_then(|s| s.parse::<u32>().ok());
    assert!(drawn.is_some_and(|n| n > 0), "no handler bars");
    let png = tmp("timeline.png");
    let shot = run(&[
        &format!("--screenshot={}", png.display()),
        "--window-size=1600,900",
    ]);
    assert!(
        shot.status.success(),
        "{}",
        String::from_utf8_lossy(&shot.stderr)
    );
    let bytes = std::fs::read(&png).expect("screenshot");
    assert_eq!(&bytes[..8], b"\x89PNG\r\n\x1a\n");
    let (w, h) = (
        u32::from_be_bytes(bytes[16..20].try_into().unwrap()),
        u32::from_be_bytes(bytes[20..24].try_into().unwrap()),
    );
    assert_eq!((w, h), (1600, 900));
    let _ = std::fs::remove_dir_all(&profile);
}

/// A path that cannot be created fails before the run, in one line (exit 2); a file
/// that is not a trace is refused by `timeline` in one line.
#[test]
fn bad_paths_and_files_are_one_line() {
    let o = vlapic(&[
        "run",
        "--trace",
        "/nonexistent-dir/t.json",
        "--timeout",
        "5",
    ]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert!(err.contains("--trace /nonexistent-dir/t.json"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    let junk = tmp("junk.json");
    std::fs::write(&junk, b"{\"traceEvents\": 3}").unwrap();
    let o = vlapic(&["timeline", junk.to_str().unwrap(), "--text"]);
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2));
    assert!(err.contains("no traceEvents array"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}
