//! `vlapic run` as a user runs it: the summary, `--json` with its keys, exit codes
//! for a passing guest, a failing image and a timeout; the multiboot command line
//! and isa-debug-exit status QEMU gives a `--kernel` guest; `vlapic qemu`, the
//! QEMU-compatible front door, with the command line kvm-unit-tests' runner builds.

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

#[path = "../../../tests/support/kernel_build.rs"]
mod kernel_build;

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
fn json_summary_has_the_keys_and_qemus_exit_status() {
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
    // The mini guest writes 0 to isa-debug-exit: status (0 << 1) | 1, as QEMU.
    assert_eq!(
        o.status.code(),
        Some(1),
        "{out}\n{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let v: serde_json::Value = serde_json::from_str(out.trim()).expect("one JSON object on stdout");
    assert_eq!(
        v["exit_code"], 1,
        "the JSON says the status the process exits with"
    );
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
    assert_eq!(o.status.code(), Some(1), "{out}");
    for want in [
        "== vlapic run summary ==",
        "outcome:      guest exit 0 (status 1)",
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

/// The tiny multiboot kernels of tests/multiboot (scripts/build-mb-kernels.sh,
/// gcc -m32), built once per test process; `None` after one SKIPPED line where the
/// toolchain is missing.
fn mb_kernels() -> Option<PathBuf> {
    static DIR: std::sync::OnceLock<Option<PathBuf>> = std::sync::OnceLock::new();
    let out =
        Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("run-cli-mb-{}", std::process::id()));
    kernel_build::build_once(&DIR, "scripts/build-mb-kernels.sh", out)
}

#[test]
fn kernel_gets_its_file_name_as_argv0_and_qemus_exit_status() {
    if !kvm_ok() {
        return;
    }
    let Some(dir) = mb_kernels() else {
        return;
    };
    let k = dir.join("mbinfo-elf32.elf");
    let k = k.to_str().unwrap();
    // QEMU's isa-debug-exit: (N << 1) | 1; kvm-unit-tests' runner reads 1 as pass,
    // 3 as fail and 77 (report_skip's exit 38) as skip.
    for (n, status) in [(0, 1), (1, 3), (38, 77)] {
        let append = format!("exit={n}");
        let o = vlapic(&[
            "run", "--kernel", k, "--append", &append, "--vcpus", "1", "--memory", "32",
        ]);
        let out = String::from_utf8_lossy(&o.stdout);
        assert_eq!(o.status.code(), Some(status), "exit={n}:\n{out}");
        // The command line as QEMU builds it: the -kernel argument as given, a
        // space, the appended text; argv[0] is the file name (QEMU 7.2 gives this
        // kernel exactly these lines).
        assert!(out.contains(&format!("MB cmdline={k} exit={n}\n")), "{out}");
        assert!(out.contains(&format!("MB argv0={k}\n")), "{out}");
        // The summary still says what happened.
        assert!(
            out.contains(&format!("outcome:      guest exit {n} (status {status})")),
            "{out}"
        );
    }
    // No --append: the name and a trailing space, as QEMU.
    let o = vlapic(&[
        "run", "--kernel", k, "--vcpus", "1", "--memory", "32", "--quiet", "--json",
    ]);
    assert_eq!(o.status.code(), Some(1));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!err.contains("MB"), "--quiet: {err}");
    let o = vlapic(&["run", "--kernel", k, "--vcpus", "1", "--memory", "32"]);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains(&format!("MB cmdline={k} \n")), "{out}");
}

/// The command line kvm-unit-tests' x86/run builds around a test kernel
/// (scripts/arch-run.bash + x86/run; test_args become -append, the environment
/// file is -initrd).
fn runner_args<'a>(kernel: &'a str, initrd: &'a str, append: &'a str) -> Vec<&'a str> {
    vec![
        "qemu",
        "--no-reboot",
        "-nodefaults",
        "-global",
        "kvm-pit.lost_tick_policy=discard",
        "-device",
        "pc-testdev",
        "-device",
        "isa-debug-exit,iobase=0xf4,iosize=0x4",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-machine",
        "accel=kvm",
        "-kernel",
        kernel,
        "-smp",
        "2",
        "-cpu",
        "qemu64,+x2apic,+tsc-deadline",
        "-initrd",
        initrd,
        "-append",
        append,
    ]
}

#[test]
fn qemu_front_door_runs_the_kvm_unit_tests_command_line() {
    if !kvm_ok() {
        return;
    }
    let Some(dir) = mb_kernels() else {
        return;
    };
    let k = dir.join("mbinfo-elf32.elf");
    let k = k.to_str().unwrap();
    let env = dir.join("env");
    std::fs::write(&env, "NR_CPUS=2\nQEMU_ACCEL=kvm\n").unwrap();
    let env = env.to_str().unwrap();
    for (n, status) in [(0, 1), (1, 3), (38, 77)] {
        let append = format!("exit={n} testdev pci");
        let o = vlapic(&runner_args(k, env, &append));
        let out = String::from_utf8_lossy(&o.stdout);
        let err = String::from_utf8_lossy(&o.stderr);
        assert_eq!(o.status.code(), Some(status), "exit={n}:\n{out}\n{err}");
        // As QEMU: stdout carries the guest's serial output only (the runner takes
        // its SUMMARY from the last lines), stderr stays empty (the runner reads
        // status 1 with anything but warnings on stderr as a QEMU failure).
        assert!(err.is_empty(), "stderr: {err}");
        assert!(!out.contains("vlapic run summary"), "{out}");
        assert!(out.ends_with("MB done\n"), "{out}");
        assert!(out.contains(&format!("MB cmdline={k} {append}\n")), "{out}");
        assert!(out.contains(&format!("MB argv0={k}\n")), "{out}");
        // -initrd is the one module, its string the file name.
        assert!(
            out.contains(&format!(
                "MB module 0 size=25 aligned=1 cmdline={env} text=NR_CPUS=2"
            )),
            "{out}"
        );
        assert!(
            out.contains("MB testdev flush bad_bytes=0 write_ok=1"),
            "{out}"
        );
        assert!(out.contains("devices=0"), "{out}");
    }
    // VLAPIC_QEMU_SUMMARY=FILE: vlapic's summary goes to FILE, not to stdout/stderr.
    let sum = dir.join("summary.txt");
    let _ = std::fs::remove_file(&sum);
    let o = Command::new(env!("CARGO_BIN_EXE_vlapic"))
        .args(runner_args(k, env, "exit=38"))
        .env("VLAPIC_QEMU_SUMMARY", &sum)
        .output()
        .expect("run vlapic");
    assert_eq!(o.status.code(), Some(77));
    assert!(
        o.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let text = std::fs::read_to_string(&sum).expect("summary file written");
    assert!(text.contains("(exit status 77) =="), "{text}");
    assert!(
        text.contains("outcome:      guest exit 38 (status 77)"),
        "{text}"
    );
    let json = text
        .lines()
        .find_map(|l| l.strip_prefix("json: "))
        .expect("json line");
    let v: serde_json::Value = serde_json::from_str(json).expect("JSON");
    assert_eq!(v["exit_code"], 77);
    // -m and -smp reach the guest: 64 MiB (mem_upper = 63 MiB in KiB).
    let mut args = runner_args(k, env, "");
    args.extend(["-m", "64"]);
    let o = vlapic(&args);
    let out = String::from_utf8_lossy(&o.stdout);
    assert!(out.contains("MB mem_lower=639 mem_upper=64512"), "{out}");
    assert!(out.contains(&format!("MB cmdline={k} \n")), "{out}");
}

#[test]
fn qemu_front_door_refuses_unknown_options_and_answers_probes() {
    // No KVM needed: nothing boots.
    let o = vlapic(&[
        "qemu",
        "-kernel",
        "k",
        "-chardev",
        "socket,id=mon,path=/tmp/x",
    ]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(err.starts_with("vlapic qemu: -chardev: "), "{err}");
    // kvm-unit-tests' premature-failure probe runs the whole command line with the
    // kernel _NO_FILE_4Uhere_ and looks for QEMU's "could not load kernel" words
    // and the file name; any other answer makes it SKIP the test with our line.
    let o = vlapic(&runner_args("_NO_FILE_4Uhere_", "/nonexistent-env", ""));
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("could not load kernel '_NO_FILE_4Uhere_'"),
        "{err}"
    );
    // Probes: exit 0, answer on stdout.
    for (args, want) in [
        (vec!["qemu", "-device", "?"], "name \"pc-testdev\", bus ISA"),
        (vec!["qemu", "--help"], "QEMU emulator version 7.2.0 "),
        (vec!["qemu", "-version"], "QEMU emulator version"),
        (vec!["qemu", "-machine", "help"], "pc "),
        (vec!["qemu", "-accel", "help"], "kvm"),
    ] {
        let o = vlapic(&args);
        assert_eq!(o.status.code(), Some(0), "{args:?}");
        let out = String::from_utf8_lossy(&o.stdout);
        assert!(out.contains(want), "{args:?}: {out}");
    }
    // The wrapper script the runner is pointed at (QEMU=.../scripts/vlapic-qemu).
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../scripts/vlapic-qemu");
    let o = Command::new(script)
        .arg("-device")
        .arg("?")
        .env("VLAPIC", env!("CARGO_BIN_EXE_vlapic"))
        .output()
        .expect("run scripts/vlapic-qemu");
    assert_eq!(o.status.code(), Some(0));
    assert!(String::from_utf8_lossy(&o.stdout).contains("\"pc-testdev\""));
}
