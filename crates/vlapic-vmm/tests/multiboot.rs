//! The multiboot v1 loader against the tiny kernels of tests/multiboot (built by
//! scripts/build-mb-kernels.sh): ELF32 and a.out kludge, command line, modules,
//! memory information and map, as the kernel itself reports them on COM1.

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use common::kvm_ok;
use vlapic_vmm::{run_vm, ConsoleSink, Module, Outcome, VmConfig};

/// Builds the kernels; `None` (after one SKIPPED line) where the toolchain
/// (gcc with -m32, binutils) is missing.
fn kernels() -> Option<std::path::PathBuf> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mb-{}", std::process::id()));
    match Command::new("bash")
        .arg(root.join("scripts/build-mb-kernels.sh"))
        .arg(&out)
        .output()
    {
        Ok(o) if o.status.success() => Some(out),
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cannot build the multiboot test kernels: {}",
                err.lines().next().unwrap_or("build-mb-kernels.sh failed")
            );
            None
        }
        Err(e) => {
            let _ = writeln!(
                std::io::stderr(),
                "SKIPPED: cannot build the multiboot test kernels: {e}"
            );
            None
        }
    }
}

#[test]
fn elf32_and_aout_kernels_see_cmdline_modules_and_memory() {
    if !kvm_ok() {
        return;
    }
    let Some(dir) = kernels() else {
        return;
    };
    for name in ["mbinfo-elf32.elf", "mbinfo-aout.bin"] {
        let kernel = std::fs::read(dir.join(name)).expect("kernel image");
        let cfg = VmConfig {
            kernel,
            cmdline: "console=ttyS0 answer=42".into(),
            modules: vec![
                Module {
                    data: b"NR_CPUS=1\n".to_vec(),
                    cmdline: "env".into(),
                },
                Module {
                    data: vec![b'x'; 5000],
                    cmdline: "blob".into(),
                },
            ],
            memory_mib: 32,
            console: ConsoleSink::Quiet,
            timeout: Some(Duration::from_secs(30)),
            ..VmConfig::default()
        };
        let rep = run_vm(&cfg).expect("run");
        let out = rep.console.tail.join("\n");
        assert_eq!(rep.outcome, Outcome::DebugExit(0), "{name}: {out}");
        for want in [
            "MB magic=0x2badb002 flags=0x0000024d",
            "MB cmdline=console=ttyS0 answer=42",
            "MB mem_lower=639 mem_upper=31744",
            "MB mmap entries=5 available_kib=32383",
            "MB modules=2",
            "MB module 0 size=10 aligned=1 cmdline=env text=NR_CPUS=1",
            "MB module 1 size=5000 aligned=1 cmdline=blob text=xxxx",
            "MB done",
        ] {
            assert!(out.contains(want), "{name}: {want:?} missing from:\n{out}");
        }
    }
}
