//! The `vlapic` tool's state subcommands, run as a user would: inspect and convert,
//! their error lines and exit codes (0 ok, 1 invalid, 2 usage or unreadable input,
//! 3 output not written); `replay` is in replay_cli.rs.

mod common;

use std::path::Path;

use common::{broken_bhyve, golden, json_of, stderr, stdout, tmp, vlapic};

#[test]
fn inspect_text_shows_the_golden_state() {
    let o = vlapic(&["inspect", "--now", "2000", &golden("nested.kvm")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let s = stdout(&o);
    for want in [
        "mode       xapic",
        "tpr 0x20   ppr 0x80",
        "isr [0x41, 0x61, 0x81]",
        "irr [0x35]",
        "tmr [0x41]",
        "lvt timer   0x000200ec unmasked vector 0xec fixed periodic",
        "lvt lint0   0x00000700 unmasked vector 0x00 extint edge",
        "expires at 6000 ns, current count 0xfa0",
        "valid: every import rule holds",
    ] {
        assert!(s.contains(want), "missing `{want}` in\n{s}");
    }
}

#[test]
fn inspect_json_has_the_documented_keys() {
    let o = vlapic(&["inspect", "--json", &golden("nested.native")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["mode"], "xapic");
    assert_eq!(v["id"], 0);
    assert_eq!(v["tpr"], 0x20);
    assert_eq!(v["ppr"], 0x80);
    assert_eq!(v["isr"], serde_json::json!([0x41, 0x61, 0x81]));
    assert_eq!(v["irr"], serde_json::json!([0x35]));
    assert_eq!(v["tmr"], serde_json::json!([0x41]));
    assert_eq!(v["timer"]["deadline_ns"], 6000);
    assert_eq!(v["apic_base"], 0xFEE0_0900u64);
    assert_eq!(v["apic_base_decoded"]["bsp"], true);
    assert_eq!(v["esr_pending"], 0x20);
}

#[test]
fn convert_round_trips_and_matches_golden_files() {
    // bhyve -> native is lossless: it must reproduce the golden native file.
    let out = tmp("from_bhyve.native");
    let o = vlapic(&[
        "convert",
        "--from",
        "bhyve",
        "--to",
        "native",
        &golden("nested.bhyve"),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(golden("nested.native")).unwrap()
    );
    // native -> kvm at the golden time reproduces the golden KVM page.
    let kvm = tmp("from_native.kvm");
    let o = vlapic(&[
        "convert",
        "--from",
        "native",
        "--to",
        "kvm",
        "--now",
        "2000",
        &golden("nested.native"),
        kvm.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&kvm).unwrap(),
        std::fs::read(golden("nested.kvm")).unwrap()
    );
    assert!(
        stderr(&o).contains("apic_base 0xfee00900"),
        "KVM output names what the page lacks"
    );
    // json -> native.
    let n = tmp("from_json.native");
    let o = vlapic(&[
        "convert",
        "--from",
        "json",
        "--to",
        "native",
        &golden("nested.json"),
        n.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&n).unwrap(),
        std::fs::read(golden("nested.native")).unwrap()
    );
}

// illumos VVE_BAD_TPR and VVE_ISR_PRIORITY: convert refuses naming the first rule
// with its byte offset; inspect lists them all.
#[test]
fn convert_refuses_invalid_state_and_inspect_lists_every_rule() {
    let bad = broken_bhyve();
    let out = tmp("never.native");
    let _ = std::fs::remove_file(&out);
    let o = vlapic(&[
        "convert",
        "--from",
        "bhyve",
        "--to",
        "native",
        bad.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    let e = stderr(&o);
    assert_eq!(e.lines().count(), 1, "{e}");
    assert!(
        e.contains("broken.bhyve: tpr (byte 0x8): 0x100 is above 0xff [VVE_BAD_TPR]"),
        "{e}"
    );
    assert!(!out.exists(), "nothing written");
    let o = vlapic(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let s = stdout(&o);
    assert!(s.contains("INVALID: 2 rule(s) broken"), "{s}");
    assert!(
        s.contains("isr (byte 0x1c): vectors 0x41 and 0x42 both in service in priority class 4"),
        "{s}"
    );
    let o = vlapic(&["inspect", "--json", bad.to_str().unwrap()]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["valid"], false);
    assert_eq!(v["violations"][1]["rule"], "VVE_ISR_PRIORITY");
    assert_eq!(v["violations"][1]["offset"], 28);
}

#[test]
fn decode_errors_and_exit_codes() {
    let short = tmp("short.kvm");
    std::fs::write(&short, [0u8; 100]).unwrap();
    let o = vlapic(&["inspect", "--format", "kvm", short.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o)
        .contains("short.kvm: page (byte 0x64): kvm_lapic_state must be exactly 1024 bytes"));
    let o = vlapic(&["inspect", "/nonexistent/x.kvm"]);
    assert_eq!(o.status.code(), Some(2), "unreadable input: usage error");
    let o = vlapic(&["convert", "--from", "nope", "--to", "kvm", "a", "b"]);
    assert_eq!(o.status.code(), Some(2));
    let mut n = std::fs::read(golden("nested.native")).unwrap();
    let last = n.len() - 1;
    n[last] ^= 0xFF;
    let p = tmp("crc.native");
    std::fs::write(&p, n).unwrap();
    let o = vlapic(&["inspect", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("crc32 (byte 0x63): checksum mismatch"),
        "{}",
        stderr(&o)
    );
}

#[test]
fn help_explains_subcommands_with_examples() {
    let o = vlapic(&["--help"]);
    let s = stdout(&o);
    for want in [
        "vlapic inspect",
        "vlapic convert",
        "vlapic replay",
        "Exit codes",
    ] {
        assert!(s.contains(want), "{s}");
    }
    let o = vlapic(&["replay", "--help"]);
    assert!(stdout(&o).contains("mmio-write 0xF0 0x1FF"));
}

// `inspect --json` schema 1: the version key, every documented key, integers for
// numbers, null (not 0) for what does not exist.
#[test]
fn inspect_json_schema_1_keys_and_nulls() {
    let o = vlapic(&["inspect", "--json", "--now", "2000", &golden("nested.kvm")]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&o);
    assert_eq!(v["schema"], 1);
    let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
    keys.sort_unstable();
    let mut want = vec![
        "schema",
        "file",
        "format",
        "mode",
        "id",
        "version",
        "tpr",
        "ppr",
        "apr",
        "ldr",
        "dfr",
        "svr",
        "software_enabled",
        "spurious_vector",
        "isr",
        "irr",
        "tmr",
        "esr",
        "esr_pending",
        "icr",
        "lvt",
        "timer",
        "apic_base",
        "apic_base_from",
        "apic_base_decoded",
        "valid",
        "violations",
    ];
    want.sort_unstable();
    assert_eq!(keys, want);
    assert_eq!(v["format"], "kvm");
    // A kvm page has no APIC base: the default, and JSON says so.
    assert_eq!(v["apic_base_from"], "default");
    assert_eq!(v["apic_base"], 0xFEE0_0900u64);
    // Vectors and register values are integers, never hex strings.
    assert_eq!(v["lvt"]["timer"]["vector"], 0xEC);
    assert_eq!(v["lvt"]["timer"]["value"], 0x0002_00EC);
    assert_eq!(v["lvt"]["timer"]["timer_mode"], "periodic");
    // Vector 0 is a value (LINT0 ExtINT), not "none".
    assert_eq!(v["lvt"]["lint0"]["vector"], 0);
    assert_eq!(v["lvt"]["lint0"]["delivery_mode"], "extint");
    assert_eq!(v["timer"]["armed"], true);
    assert_eq!(v["timer"]["deadline_ns"], 6000);
    assert_eq!(v["timer"]["current_count"], 0xFA0);
    assert_eq!(v["timer"]["now_ns"], 2000);
    assert_eq!(v["valid"], true);
    assert_eq!(v["violations"], serde_json::json!([]));

    // A timer that is not armed has no deadline: null, not 0.
    let p = tmp("unarmed.trace");
    let out = tmp("unarmed.native");
    std::fs::write(
        &p,
        format!("mmio-write 0xF0 0x1FF\nexport native {}\n", out.display()),
    )
    .unwrap();
    let o = vlapic(&["replay", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let v = json_of(&vlapic(&["inspect", "--json", out.to_str().unwrap()]));
    assert_eq!(v["timer"]["armed"], false);
    assert_eq!(v["timer"]["deadline_ns"], serde_json::Value::Null);
    assert_eq!(v["apic_base_from"], "file");
    // A rule without a byte offset in the format (json) is null too.
    let bad = tmp("bad.json");
    let mut s: serde_json::Value =
        serde_json::from_slice(&std::fs::read(golden("nested.json")).unwrap()).unwrap();
    s["tpr"] = serde_json::json!(0x100);
    std::fs::write(&bad, s.to_string()).unwrap();
    let o = vlapic(&["inspect", "--json", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let v = json_of(&o);
    assert_eq!(v["valid"], false);
    assert_eq!(v["violations"][0]["rule"], "VVE_BAD_TPR");
    assert_eq!(v["violations"][0]["offset"], serde_json::Value::Null);
}

// INVALID is coloured only on a terminal: piped output stays plain.
#[test]
fn inspect_text_has_no_colour_when_piped() {
    let bad = broken_bhyve();
    let o = vlapic(&["inspect", bad.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(1));
    let s = stdout(&o);
    assert!(s.contains("\nINVALID: 2 rule(s) broken\n"), "{s}");
    assert!(!s.contains('\x1b'), "escape codes in piped output: {s:?}");
}

// `convert` detects the input format as `inspect` does; `--from` still overrides.
#[test]
fn convert_detects_the_input_format() {
    for (input, name) in [
        ("nested.bhyve", "bhyve"),
        ("nested.json", "json"),
        ("nested.native", "native"),
    ] {
        let out = tmp(&format!("detected-{name}.native"));
        let o = vlapic(&[
            "convert",
            "--to",
            "native",
            &golden(input),
            out.to_str().unwrap(),
        ]);
        assert_eq!(o.status.code(), Some(0), "{name}: {}", stderr(&o));
        assert_eq!(
            std::fs::read(&out).unwrap(),
            std::fs::read(golden("nested.native")).unwrap(),
            "{name}"
        );
    }
    // A KVM page (by its size), at the golden time.
    let out = tmp("detected-kvm.kvm");
    let o = vlapic(&[
        "convert",
        "--to",
        "kvm",
        "--now",
        "2000",
        &golden("nested.kvm"),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(
        std::fs::read(&out).unwrap(),
        std::fs::read(golden("nested.kvm")).unwrap()
    );
    // Undetectable input names the option that sets the format.
    let junk = tmp("junk.bin");
    std::fs::write(&junk, b"\x01\x02\x03").unwrap();
    let o = vlapic(&[
        "convert",
        "--to",
        "native",
        junk.to_str().unwrap(),
        tmp("never2.native").to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("junk.bin: format (byte 0x0): not recognised (3 bytes); use --from"),
        "{}",
        stderr(&o)
    );
}

// Issue 10 finding 3: every input has a size bound that follows from its format
// (kvm_lapic_state is 1024 bytes, vdi_lapic_v1 200, a native LAPIC file at most 270,
// JSON at most 64 KiB, a trace at most 64 MiB), checked before the file is read into
// memory: one byte over is refused with one line naming the file and the limit, as
// invalid input (exit 1).
#[test]
fn inputs_one_byte_over_their_format_bound_are_refused() {
    let mut native = std::fs::read(golden("nested.native")).unwrap();
    native.resize(271, 0);
    let cases: [(&str, Vec<u8>, Option<&str>, &str); 6] = [
        (
            "over.kvm",
            vec![0u8; 1025],
            Some("kvm"),
            "1024 bytes, the most a kvm",
        ),
        (
            "over.bhyve",
            vec![0u8; 201],
            Some("bhyve"),
            "200 bytes, the most a bhyve",
        ),
        (
            "over.native",
            native.clone(),
            Some("native"),
            "270 bytes, the most a native",
        ),
        (
            "detected.native",
            native,
            None,
            "270 bytes, the most a native",
        ),
        (
            "over.json",
            [b"{".as_slice(), &[b' '; 65536]].concat(),
            Some("json"),
            "65536 bytes, the most a json",
        ),
        (
            "over.bin",
            vec![7u8; 65537],
            None,
            "65536 bytes, the most any state",
        ),
    ];
    for (name, bytes, fmt, limit) in cases {
        let p = tmp(name);
        std::fs::write(&p, &bytes).unwrap();
        let mut args = vec!["inspect"];
        if let Some(f) = fmt {
            args.extend(["--format", f]);
        }
        args.push(p.to_str().unwrap());
        let o = vlapic(&args);
        assert_eq!(o.status.code(), Some(1), "{name}: {}", stderr(&o));
        let e = stderr(&o);
        assert_eq!(e.lines().count(), 1, "{name}: one line: {e}");
        assert!(e.contains(&format!("{name}: file (byte ")), "{name}: {e}");
        assert!(e.contains(&format!("larger than {limit}")), "{name}: {e}");
    }
    // The same bound for convert's input.
    let p = tmp("over-convert.kvm");
    std::fs::write(&p, [0u8; 1025]).unwrap();
    let out = tmp("never-written.native");
    let o = vlapic(&[
        "convert",
        "--from",
        "kvm",
        "--to",
        "native",
        p.to_str().unwrap(),
        out.to_str().unwrap(),
    ]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("larger than 1024 bytes"),
        "{}",
        stderr(&o)
    );
    assert!(!out.exists());
    // Exactly at the bound is read (and then judged on its content).
    let p = tmp("exact.kvm");
    std::fs::write(&p, [0u8; 1024]).unwrap();
    let o = vlapic(&["inspect", "--format", "kvm", p.to_str().unwrap()]);
    assert!(!stderr(&o).contains("larger than"), "{}", stderr(&o));
}

// An endless input (/dev/zero) is refused at the bound, quickly, by every reader.
#[test]
fn endless_input_is_refused_quickly() {
    if !Path::new("/dev/zero").exists() {
        return;
    }
    for (args, limit) in [
        (vec!["inspect", "/dev/zero"], "65536 bytes"),
        (
            vec!["inspect", "--format", "bhyve", "/dev/zero"],
            "200 bytes",
        ),
        (
            vec![
                "convert",
                "--from",
                "json",
                "--to",
                "kvm",
                "/dev/zero",
                "/dev/null",
            ],
            "65536 bytes",
        ),
        (vec!["replay", "/dev/zero"], "67108864 bytes"),
    ] {
        let start = std::time::Instant::now();
        let o = vlapic(&args);
        let took = start.elapsed();
        assert_eq!(o.status.code(), Some(1), "{args:?}: {}", stderr(&o));
        assert!(
            stderr(&o).contains("/dev/zero: file (byte ") && stderr(&o).contains(limit),
            "{args:?}: {}",
            stderr(&o)
        );
        assert!(took.as_secs() < 10, "{args:?} took {took:?}");
    }
}

// Issue 10 finding 6: an input path that cannot be opened or read is a usage error,
// exit 2 in every subcommand (as `vlapic run --restore`, docs/vmm.md); exit 3 stays for
// failing to write an output.
#[test]
fn unreadable_input_exits_2_unwritable_output_exits_3() {
    let dir = tmp("a-directory");
    std::fs::create_dir_all(&dir).unwrap();
    for args in [
        vec!["inspect", "/nonexistent/x.kvm"],
        vec!["inspect", dir.to_str().unwrap()],
        vec![
            "convert",
            "--from",
            "kvm",
            "--to",
            "native",
            "/nonexistent/x.kvm",
            "/dev/null",
        ],
        vec!["replay", "/nonexistent/x.trace"],
    ] {
        let o = vlapic(&args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert_eq!(stderr(&o).lines().count(), 1, "{args:?}: {}", stderr(&o));
    }
    let t = tmp("import-missing.trace");
    std::fs::write(&t, "import kvm /nonexistent/x.kvm\n").unwrap();
    let o = vlapic(&["replay", t.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("import-missing.trace:1: "),
        "{}",
        stderr(&o)
    );
    let o = vlapic(&[
        "convert",
        "--from",
        "kvm",
        "--to",
        "native",
        &golden("nested.kvm"),
        "/nonexistent/dir/out.native",
    ]);
    assert_eq!(o.status.code(), Some(3), "{}", stderr(&o));
}
