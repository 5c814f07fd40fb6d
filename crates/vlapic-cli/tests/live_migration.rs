//! Live migration between two `vlapic` processes (issue 15; docs/migration-stream.md):
//! `--migrate-to ADDR` in one, `--incoming ADDR` in the other, over unix sockets and
//! TCP loopback. What is checked follows the stream's rules: the VM finishes every
//! scenario exactly once wherever it ends up (the console transcript travels with it);
//! a stream cut or corrupted at every step leaves the VM running in the source only
//! (the destination exits 2 with one line, having run nothing); a foreign or newer
//! stream is refused with one line; and the built-in guest is passed back and forth
//! through a chain of processes at least 20 times in one run, some pauses landing
//! with nested interrupts in service (as `tests/test_guest.rs` asserts for the
//! in-process path).

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_vlapic"))
}

/// True when /dev/kvm can run our VMs and the test guest was built; otherwise
/// prints the one skip line.
fn ready() -> bool {
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

fn sock(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("lm-{name}-{}.sock", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

fn free_tcp_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A run's output for an assertion message: first one line naming its outcome and
/// the scenarios that did not pass (CI logs cut long messages), then everything.
fn text(o: &Output) -> String {
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
fn digest(o: &Output) -> String {
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

fn json(o: &Output) -> Value {
    serde_json::from_str(String::from_utf8_lossy(&o.stdout).trim())
        .unwrap_or_else(|e| panic!("one JSON object on stdout ({e}): {}", text(o)))
}

/// The number of scenarios in the test guest (its `SCENARIOS` table).
fn scenario_count() -> usize {
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
fn check_whole_run(v: &Value, o: &Output) {
    let total = scenario_count();
    let all = format!("{}\n{v:#}", text(o));
    assert_eq!(o.status.code(), Some(0), "{all}");
    assert_eq!(v["passed"], total, "{all}");
    assert_eq!(v["failed"], 0, "{all}");
    assert_eq!(v["violations"], 0, "{all}");
    let mut names: Vec<&str> = v["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total, "a scenario counted twice: {all}");
}

fn source(addr: &str, after_ms: u64, vcpus: &str) -> Child {
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

fn destination(addr: &str) -> Child {
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
fn migrate_once(addr: &str) {
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

#[test]
fn migrate_over_unix_socket() {
    if !ready() {
        return;
    }
    let p = sock("unix");
    migrate_once(&format!("unix:{}", p.display()));
}

#[test]
fn migrate_over_tcp_loopback() {
    if !ready() {
        return;
    }
    migrate_once(&format!("tcp:127.0.0.1:{}", free_tcp_port()));
}

/// `--incoming-timeout MS`: with no source in time the destination gives up with one
/// line and exit 2, having run nothing, and removes its socket file; a source that
/// comes in time migrates as usual.
#[test]
fn incoming_gives_up_after_its_accept_timeout() {
    if !ready() {
        return;
    }
    let p = sock("accept-timeout");
    let addrs = [
        format!("unix:{}", p.display()),
        format!("tcp:127.0.0.1:{}", free_tcp_port()),
    ];
    for addr in &addrs {
        let o = bin()
            .args(["run", "--incoming", addr, "--incoming-timeout", "300"])
            .args(["--quiet", "--json"])
            .output()
            .expect("destination");
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{addr}: {all}");
        assert!(o.stdout.is_empty(), "{addr}: ran something: {all}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{addr}: one line: {all}");
        assert!(
            err.contains("no source connected within 300 ms"),
            "{addr}: {all}"
        );
    }
    assert!(!p.exists(), "the socket file is left behind");
    let addr = format!("unix:{}", sock("accept-in-time").display());
    let dst = bin()
        .args(["run", "--incoming", &addr, "--incoming-timeout", "60000"])
        .args(["--quiet", "--json", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("destination");
    std::thread::sleep(Duration::from_millis(100));
    let so = source(&addr, 300, "2").wait_with_output().expect("source");
    let d = dst.wait_with_output().expect("destination");
    assert_eq!(json(&so)["outcome"]["kind"], "migrated", "{}", text(&so));
    check_whole_run(&json(&d), &d);
}

/// Writes `bytes` to a waiting `--incoming` and returns its output.
fn feed_destination(name: &str, bytes: &[u8]) -> Output {
    let p = sock(name);
    let addr = format!("unix:{}", p.display());
    let dst = destination(&addr);
    let t0 = Instant::now();
    let mut c = loop {
        match UnixStream::connect(&p) {
            Ok(c) => break c,
            Err(_) if t0.elapsed() < Duration::from_secs(10) => {
                std::thread::sleep(Duration::from_millis(10))
            }
            Err(e) => panic!("connect: {e}"),
        }
    };
    let _ = c.write_all(bytes);
    let _ = c.shutdown(std::net::Shutdown::Write);
    let mut sink = Vec::new();
    let _ = c.read_to_end(&mut sink);
    dst.wait_with_output().expect("destination")
}

fn frame(tag: &[u8; 4], body: &[u8]) -> Vec<u8> {
    let mut f = tag.to_vec();
    f.extend_from_slice(&(body.len() as u32).to_le_bytes());
    f.extend_from_slice(body);
    let crc = vlapic_vmm::wire::crc32(&f);
    f.extend_from_slice(&crc.to_le_bytes());
    f
}

#[test]
fn destination_refuses_foreign_newer_and_corrupt_streams_with_one_line() {
    if !ready() {
        return;
    }
    let pre = |v: u32| {
        let mut b = b"VLAPICMG".to_vec();
        b.extend_from_slice(&v.to_le_bytes());
        b.extend_from_slice(&0u32.to_le_bytes());
        b
    };
    let hello = |vcpus: u32| {
        let mut h = vcpus.to_le_bytes().to_vec();
        h.extend_from_slice(&64u64.to_le_bytes());
        h.extend_from_slice(&2u32.to_le_bytes());
        h.extend_from_slice(&2_000_000_000u64.to_le_bytes());
        h
    };
    let corrupt = {
        let mut b = pre(1);
        let mut f = frame(b"HELO", &hello(2));
        f[10] ^= 1;
        b.extend_from_slice(&f);
        b
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "foreign",
            b"GET / HTTP/1.1\r\nHost: x\r\n\r\n".to_vec(),
            "bad magic",
        ),
        ("newer", pre(2), "version 2 is not supported"),
        ("corrupt", corrupt, "checksum mismatch"),
        (
            "oversized",
            [pre(1), frame(b"HELO", &[0; 70_000])].concat(),
            "at most",
        ),
        (
            "no vcpus",
            [pre(1), frame(b"HELO", &hello(0))].concat(),
            "0 vCPUs",
        ),
        ("empty", Vec::new(), "preamble"),
        (
            "closed before commit",
            [pre(1), frame(b"HELO", &hello(1))].concat(),
            "before the commit",
        ),
    ];
    for (what, bytes, want) in cases {
        let o = feed_destination(what, &bytes);
        let all = text(&o);
        assert_eq!(o.status.code(), Some(2), "{what}: {all}");
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(err.lines().count(), 1, "{what}: one line: {all}");
        assert!(err.contains(want), "{what}: wanted {want:?}: {all}");
        assert!(o.stdout.is_empty(), "{what}: ran something: {all}");
    }
}

/// A fault injector between a real source and a real destination: forwards the
/// stream, and at the `cut`-th message from the source (0: the first after the
/// preamble; counted over tags in `which`), either drops both connections or flips a
/// byte of that message.
fn proxy(listen: &Path, to: &Path, which: &'static [&'static [u8; 4]], cut: usize, flip: bool) {
    let l = UnixListener::bind(listen).expect("proxy bind");
    let to = to.to_path_buf();
    std::thread::spawn(move || {
        let Ok((mut a, _)) = l.accept() else { return };
        let Ok(mut b) = UnixStream::connect(&to) else {
            return;
        };
        let (mut a2, mut b2) = (a.try_clone().expect("clone"), b.try_clone().expect("clone"));
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut b2, &mut a2);
            let _ = a2.shutdown(std::net::Shutdown::Both);
        });
        let mut pre = [0u8; 16];
        if a.read_exact(&mut pre).is_err() || b.write_all(&pre).is_err() {
            return;
        }
        let mut seen = 0;
        loop {
            let mut head = [0u8; 8];
            if a.read_exact(&mut head).is_err() {
                break;
            }
            let len = u32::from_le_bytes(head[4..8].try_into().expect("4")) as usize;
            let mut body = vec![0u8; len + 4];
            if a.read_exact(&mut body).is_err() {
                break;
            }
            let hit = which.iter().any(|t| head[..4] == t[..]);
            if hit && seen == cut {
                if flip {
                    let i = body.len() / 2;
                    body[i] ^= 0x04;
                } else {
                    let _ = a.shutdown(std::net::Shutdown::Both);
                    let _ = b.shutdown(std::net::Shutdown::Both);
                    return;
                }
            }
            if hit {
                seen += 1;
            }
            if b.write_all(&head).is_err() || b.write_all(&body).is_err() {
                break;
            }
        }
        let _ = b.shutdown(std::net::Shutdown::Both);
    });
}

#[test]
fn a_stream_cut_or_corrupted_at_every_step_leaves_the_vm_running_once() {
    if !ready() {
        return;
    }
    let cases: Vec<(&str, &'static [&'static [u8; 4]], usize, bool)> = vec![
        ("cut before HELO", &[b"HELO"], 0, false),
        ("cut in the first round", &[b"PAGS"], 0, false),
        ("cut before ROND", &[b"ROND"], 0, false),
        ("cut before FINL (paused)", &[b"FINL"], 0, false),
        ("cut before COMT", &[b"COMT"], 0, false),
        ("flipped byte in PAGS", &[b"PAGS"], 1, true),
        ("flipped byte in FINL", &[b"FINL"], 0, true),
        ("flipped byte in COMT", &[b"COMT"], 0, true),
    ];
    for (i, (what, which, cut, flip)) in cases.into_iter().enumerate() {
        let d = sock(&format!("cut{i}-d"));
        let p = sock(&format!("cut{i}-p"));
        let dst = destination(&format!("unix:{}", d.display()));
        std::thread::sleep(Duration::from_millis(100));
        proxy(&p, &d, which, cut, flip);
        let src = source(&format!("unix:{}", p.display()), 300, "2");
        let so = src.wait_with_output().expect("source");
        let dout = dst.wait_with_output().expect("destination");
        let all = format!("{what}:\nSOURCE {}\nDESTINATION {}", text(&so), text(&dout));
        // The destination ran nothing and said why in one line.
        assert_eq!(dout.status.code(), Some(2), "{all}");
        assert!(dout.stdout.is_empty(), "{all}");
        assert_eq!(
            String::from_utf8_lossy(&dout.stderr).lines().count(),
            1,
            "{all}"
        );
        // The source kept the VM and finished every scenario.
        let s = json(&so);
        check_whole_run(&s, &so);
        assert_eq!(s["outcome"]["kind"], "debug_exit", "{all}");
        assert_eq!(s["live_migration_out"]["completed"], false, "{all}");
        let err = String::from_utf8_lossy(&so.stderr);
        assert!(err.contains("the VM keeps running here"), "{all}");
        eprintln!("{what}: source: {}", err.trim());
        eprintln!(
            "{what}: destination: {}",
            String::from_utf8_lossy(&dout.stderr).trim()
        );
    }
}

#[test]
fn killing_either_side_at_random_points_never_loses_or_doubles_the_vm() {
    if !ready() {
        return;
    }
    // Deterministic "random" kill times (ms after the source starts), spread over
    // start-up, the pre-copy and the pause: the source starts migrating 300 ms after
    // its VM starts, and a debug build's pre-copy of 64 MiB takes several hundred ms.
    let delays = [250u64, 800, 1400];
    for (i, kill_at) in delays.iter().enumerate() {
        for kill_source in [false, true] {
            let d = sock(&format!("kill{i}{kill_source}"));
            let addr = format!("unix:{}", d.display());
            let mut dst = destination(&addr);
            std::thread::sleep(Duration::from_millis(100));
            let mut src = source(&addr, 300, "2");
            std::thread::sleep(Duration::from_millis(*kill_at));
            let victim = if kill_source { &mut src } else { &mut dst };
            let _ = victim.kill();
            let so = src.wait_with_output().expect("source");
            // A destination whose source died before connecting waits for ever: it
            // has run nothing; stop it after a while.
            let t0 = Instant::now();
            while dst.try_wait().ok().flatten().is_none() && t0.elapsed() < Duration::from_secs(15)
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = dst.kill();
            let dout = dst.wait_with_output().expect("destination");
            let all = format!(
                "kill {} at {kill_at} ms:\nSOURCE {}\nDESTINATION {}",
                if kill_source { "source" } else { "destination" },
                text(&so),
                text(&dout)
            );
            let ran_src =
                so.status.code() == Some(0) && json(&so)["outcome"]["kind"] == "debug_exit";
            let moved = so.status.code() == Some(0) && json(&so)["outcome"]["kind"] == "migrated";
            let ran_dst = dout.status.code() == Some(0);
            if kill_source {
                // Either the destination never ran (exit 2, one line) or it had
                // acknowledged the commit and runs the whole guest.
                if ran_dst {
                    check_whole_run(&json(&dout), &dout);
                } else {
                    assert!(dout.stdout.is_empty(), "{all}");
                    if dout.status.code() == Some(2) {
                        assert_eq!(
                            String::from_utf8_lossy(&dout.stderr).lines().count(),
                            1,
                            "{all}"
                        );
                    }
                }
                eprintln!("kill source at {kill_at} ms: destination ran: {ran_dst}");
            } else {
                // The source finished the guest itself, or had handed it over.
                assert!(ran_src || moved, "{all}");
                if ran_src {
                    check_whole_run(&json(&so), &so);
                }
                eprintln!(
                    "kill destination at {kill_at} ms: source ran it: {ran_src}, moved: {moved}"
                );
            }
        }
    }
}

#[test]
fn ping_pong_twenty_times_through_a_chain_of_processes() {
    if !ready() {
        return;
    }
    // Process k receives from k-1 (k > 0) and sends to k+1 after a few ms of running;
    // consecutive processes alternate between two socket names, so the VM goes back
    // and forth between "A" and "B" ends. The chain is longer than needed: the
    // guest ends in whichever process it is in then, and the rest are stopped.
    const HOPS: usize = 40;
    let addr = |k: usize| {
        format!(
            "unix:{}",
            Path::new(env!("CARGO_TARGET_TMPDIR"))
                .join(format!(
                    "pp-{}-{}-{k}.sock",
                    std::process::id(),
                    if k % 2 == 0 { "A" } else { "B" }
                ))
                .display()
        )
    };
    let mut kids: Vec<Child> = Vec::new();
    for k in 1..=HOPS {
        let mut c = bin();
        c.args([
            "run",
            "--incoming",
            &addr(k),
            "--quiet",
            "--json",
            "--timeout",
            "120",
        ]);
        if k < HOPS {
            c.args(["--migrate-to", &addr(k + 1), "--migrate-after", "25"]);
        }
        // Some pauses wait (up to 120 ms) for a moment with 3+ vectors in service.
        c.env("VLAPIC_MIGRATE_NESTED_WAIT_MS", "120");
        kids.push(
            c.stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn"),
        );
    }
    std::thread::sleep(Duration::from_millis(200));
    let first = bin()
        .args([
            "run",
            "--vcpus",
            "4",
            "--memory",
            "16",
            "--quiet",
            "--json",
            "--timeout",
            "120",
            "--migrate-to",
            &addr(1),
            "--migrate-after",
            "40",
        ])
        .env("VLAPIC_MIGRATE_NESTED_WAIT_MS", "120")
        .output()
        .expect("first");
    assert_eq!(
        json(&first)["outcome"]["kind"],
        "migrated",
        "{}",
        text(&first)
    );
    let mut last = None;
    let mut downtimes = Vec::new();
    let mut kids = kids.into_iter();
    for (k, c) in kids.by_ref().enumerate() {
        let o = c.wait_with_output().expect("hop");
        let v = json(&o);
        if let Some(d) = v["live_migration_in"]["downtime_us"].as_u64() {
            downtimes.push(d);
        }
        if v["outcome"]["kind"] != "migrated" {
            last = Some((k + 1, o, v));
            break;
        }
        assert_eq!(o.status.code(), Some(0), "hop {}: {}", k + 1, text(&o));
    }
    for mut c in kids {
        let _ = c.kill();
        let _ = c.wait();
    }
    let (hop, o, v) = last.expect("the guest ended in some process");
    check_whole_run(&v, &o);
    let migrations = v["migrations"].as_u64().unwrap_or(0);
    downtimes.sort_unstable();
    eprintln!(
        "guest ended in process {hop} after {migrations} migrations; {} with >= 3 in \
         service (up to {}); downtime median {} us, max {} us",
        v["nested_migrations"],
        v["max_in_service_migrated"],
        downtimes.get(downtimes.len() / 2).copied().unwrap_or(0),
        downtimes.last().copied().unwrap_or(0)
    );
    assert!(
        migrations >= 20,
        "only {migrations} migrations: {}",
        text(&o)
    );
    assert_eq!(migrations as usize, hop, "{}", text(&o));
    assert!(
        v["nested_migrations"].as_u64() >= Some(1),
        "no pause with 3+ in service: {v:#}"
    );
}

/// The test guest's scenarios that pass on KVM's in-kernel APIC on this host (nested
/// KVM, kvm_pvm): SMP start-up, fixed/broadcast/NMI IPIs, the three timer modes, an
/// IOAPIC edge pin, the x2APIC switch and x2APIC IPIs and TSC deadline. Left out
/// because KVM's own APIC fails them here (`vlapic run --irqchip kernel`, also
/// without any migration): nested priorities and immediate-EOI ("vector dispatched
/// but not in ISR"), self IPIs (left pending until a later exit), logical and
/// lowest-priority IPIs, IOAPIC level pins (remote IRR), ESR. `timer-oneshot` is in:
/// a one-shot expiry KVM has counted but not yet put in IRR used to be lost when
/// leaving KVM's irqchip (once in 13 round trips); the pause now flushes it into IRR
/// first (`vlapic_vmm::kernel_timer`, docs/vmm.md).
const ON_BOTH: &str = "only=smp-boot,ipi-fixed,ipi-broadcast,ipi-all-but-self,ipi-nmi,\
timer-oneshot,timer-periodic,timer-tsc-deadline,ioapic-edge,x2apic-switch,ipi-fixed-x2apic,\
ipi-broadcast-x2apic,timer-tsc-deadline-x2apic";

#[test]
fn kvm_in_kernel_apic_to_vlapic_and_back() {
    if !ready() {
        return;
    }
    // KVM's irqchip (boot) -> vlapic -> KVM's irqchip: the LAPIC pages, IOAPIC, timer
    // and APIC base go through vlapic::state::kvm and the library's import each way.
    // Three timings, so the pauses land in different scenarios.
    for (t1, t2) in [("150", "400"), ("250", "250"), ("450", "150")] {
        let (first, mid, v) = kernel_round_trip(t1, t2, ON_BOTH, "64");
        let total = ON_BOTH.trim_start_matches("only=").split(',').count();
        assert_eq!(v["passed"], total, "{v:#}");
        eprintln!(
            "kernel -> vlapic after {} scenarios, vlapic -> kernel after {}; downtimes {} us, {} us",
            first["passed"],
            mid["passed"],
            mid["live_migration_in"]["downtime_us"],
            v["live_migration_in"]["downtime_us"]
        );
    }
}

/// Runs `append`'s scenarios on KVM's irqchip, sends the VM to a vlapic process
/// after `t1` ms, which sends it on to a KVM-irqchip process after `t2` ms; checks
/// that both hops completed and every scenario passed once in the last process;
/// returns the three JSON reports.
fn kernel_round_trip(t1: &str, t2: &str, append: &str, memory: &str) -> (Value, Value, Value) {
    let tag = format!("{t1}-{}", append.len());
    let a = format!("unix:{}", sock(&format!("k2v{tag}")).display());
    let b = format!("unix:{}", sock(&format!("v2k{tag}")).display());
    let mut last = bin()
        .args([
            "run",
            "--incoming",
            &b,
            "--irqchip",
            "kernel",
            "--quiet",
            "--json",
            "--timeout",
            "120",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kernel destination");
    let mid = bin()
        .args([
            "run",
            "--incoming",
            &a,
            "--migrate-to",
            &b,
            "--migrate-after",
            t2,
        ])
        .args(["--quiet", "--json", "--timeout", "120"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("vlapic hop");
    std::thread::sleep(Duration::from_millis(100));
    let first = bin()
        .args([
            "run",
            "--irqchip",
            "kernel",
            "--vcpus",
            "2",
            "--memory",
            memory,
            "--append",
            append,
        ])
        .args([
            "--migrate-to",
            &a,
            "--migrate-after",
            t1,
            "--quiet",
            "--json",
            "--timeout",
            "120",
        ])
        .output()
        .expect("kernel source");
    let mid = mid.wait_with_output().expect("vlapic hop");
    let moved_on = serde_json::from_slice::<Value>(&mid.stdout)
        .is_ok_and(|v| v["outcome"]["kind"] == "migrated");
    if !moved_on {
        // Nothing will come: do not leave the last process waiting for ever.
        let _ = last.kill();
    }
    let last = last.wait_with_output().expect("kernel destination");
    let all = format!(
        "FIRST {}\nMID {}\nLAST {}",
        text(&first),
        text(&mid),
        text(&last)
    );
    assert_eq!(json(&first)["outcome"]["kind"], "migrated", "{all}");
    let m = json(&mid);
    assert_eq!(m["outcome"]["kind"], "migrated", "{all}");
    assert_eq!(m["live_migration_in"]["completed"], true, "{all}");
    let v = json(&last);
    assert_eq!(last.status.code(), Some(0), "{all}");
    let total = append.trim_start_matches("only=").split(',').count();
    assert_eq!(v["passed"], total, "{all}");
    assert_eq!(v["failed"], 0, "{all}");
    assert_eq!(v["migrations"], 2, "{all}");
    let mut names: Vec<&str> = v["scenarios"]
        .as_array()
        .expect("scenarios")
        .iter()
        .map(|s| s["name"].as_str().unwrap_or(""))
        .collect();
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), total, "each scenario once: {all}");
    (json(&first), m, v)
}

/// The 8259 pair through KVM's irqchip → vlapic → KVM's irqchip: `pic-extint`
/// programs both 8259s (ICW1-4, bases 0x30/0x38, masks), then for 1.2 s raises ISA
/// lines 5 and 10 and checks each ExtINT vector (base + IRQ, through the cascade)
/// and both IMRs. Both pauses land inside it (it is the only scenario and neither
/// process finished it; 16 MiB keeps each pre-copy short), so its state went KVM_GET_IRQCHIP (chips 0, 1) → the save
/// file's PIC8 → vlapic's 8259 (ports, LINT0 ExtINT) → PIC8 → KVM_SET_IRQCHIP.
#[test]
fn kvm_in_kernel_pic_to_vlapic_and_back() {
    if !ready() {
        return;
    }
    let (first, mid, v) = kernel_round_trip("250", "150", "only=pic-extint", "16");
    let all = format!("FIRST {first:#}\nMID {mid:#}\nLAST {v:#}");
    assert_eq!(
        first["passed"], 0,
        "the first pause came after the scenario: {all}"
    );
    assert_eq!(
        mid["passed"], 0,
        "the second pause came after the scenario: {all}"
    );
    assert_eq!(v["scenarios"][0]["name"], "pic-extint", "{all}");
    assert_eq!(v["scenarios"][0]["status"], "PASS", "{all}");
    eprintln!(
        "pic-extint: downtimes {} us, {} us",
        mid["live_migration_in"]["downtime_us"], v["live_migration_in"]["downtime_us"]
    );
}
