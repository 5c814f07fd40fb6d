//! `vlapic run` as a user runs it: the summary, `--json` with its keys, exit codes
//! for a passing guest, a failing image and a timeout.

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn vlapic(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(args)
        .output()
        .expect("run vlapic")
}

/// True when /dev/kvm can run our VMs; otherwise prints the one skip line.
fn kvm_ok() -> bool {
    match vlapic_vmm::kvm_usable() {
        Ok(()) => true,
        Err(reason) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: /dev/kvm not available: {reason}"
            );
            false
        }
    }
}

/// The VMM's mini guest, assembled once by its build script.
fn mini_guest() -> PathBuf {
    static IMG: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let out = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .join(format!("run-cli-mini-{}.elf", std::process::id()));
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlapic-kvm/tests/mini/build.sh");
        let st = Command::new("sh")
            .arg(script)
            .arg(&out)
            .status()
            .expect("sh");
        assert!(st.success(), "mini guest build failed");
        out
    })
    .clone()
}

#[test]
fn json_summary_has_the_keys_and_exit_code_0() {
    if !kvm_ok() {
        return;
    }
    let k = mini_guest();
    let o = vlapic(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--vcpus",
        "2",
        "--json",
        "--timeout",
        "60",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(
        o.status.code(),
        Some(0),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object on stdout");
    for key in [
        "passed",
        "failed",
        "max_nesting",
        "migrations",
        "violations",
    ] {
        assert!(v.get(key).is_some(), "missing {key}: {v}");
    }
    assert_eq!(v["passed"], 11);
    assert_eq!(v["failed"], 0);
    assert_eq!(v["max_nesting"], 3);
    assert_eq!(v["violations"], 0);
    // The guest console went to stderr, so stdout stayed pure JSON.
    assert!(String::from_utf8_lossy(&o.stderr).contains("PASS self_ipi_1000"));
}

#[test]
fn text_summary_and_migration() {
    if !kvm_ok() {
        return;
    }
    let k = mini_guest();
    let o = vlapic(&[
        "run",
        "--kernel",
        k.to_str().unwrap(),
        "--vcpus",
        "4",
        "--x2apic",
        "--quiet",
        "--migrate-every",
        "3",
    ]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert_eq!(o.status.code(), Some(0), "{out}");
    for want in [
        "== vlapic run summary ==",
        "scenarios:    11 passed, 0 failed",
        "max nesting:  3",
        "violations:   0",
        "exits:",
    ] {
        assert!(out.contains(want), "{want:?} missing:\n{out}");
    }
    assert!(
        !out.contains("migrations:   0\n"),
        "no migration happened:\n{out}"
    );
}

#[test]
fn bad_image_is_exit_2_with_one_line() {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("not-a-kernel.bin");
    std::fs::write(&p, b"hello").unwrap();
    let o = vlapic(&["run", "--kernel", p.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.contains("not a multiboot v1 image"), "{err}");
}
