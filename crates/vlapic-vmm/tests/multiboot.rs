//! The multiboot v1 loader against the tiny kernels of tests/multiboot (built by
//! scripts/build-mb-kernels.sh): ELF32 and a.out kludge, command line, modules,
//! memory information and map, as the kernel itself reports them on COM1.

mod common;
#[path = "../../../tests/support/kernel_build.rs"]
mod kernel_build;

use std::path::Path;
use std::time::Duration;

use common::kvm_ok;
use vlapic_vmm::{run_vm, ConsoleSink, Module, Outcome, VmConfig};

/// The kernels, built once per test process by scripts/build-mb-kernels.sh; `None`
/// (after one SKIPPED line) where gcc -m32 or binutils is missing.
fn kernels() -> Option<std::path::PathBuf> {
    static DIR: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();
    let out = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("mb-{}", std::process::id()));
    kernel_build::build_once(&DIR, "scripts/build-mb-kernels.sh", out)
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

/// Boots mbinfo (ELF32) with `cmdline`, 1 vCPU, 32 MiB.
fn boot_mbinfo(dir: &Path, cmdline: &str) -> vlapic_vmm::RunReport {
    let cfg = VmConfig {
        kernel: std::fs::read(dir.join("mbinfo-elf32.elf")).expect("kernel image"),
        cmdline: cmdline.into(),
        memory_mib: 32,
        console: ConsoleSink::Quiet,
        timeout: Some(Duration::from_secs(30)),
        ..VmConfig::default()
    };
    run_vm(&cfg).expect("run")
}

#[test]
fn pc_testdev_ports_and_pci_host_bridge_without_devices() {
    if !kvm_ok() {
        return;
    }
    let Some(dir) = kernels() else {
        return;
    };
    let rep = boot_mbinfo(&dir, "mbinfo-elf32.elf testdev pci");
    let out = rep.console.tail.join("\n");
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{out}");
    for want in [
        // QEMU's pc-testdev data register (0xE0, 4 bytes): byte, word and dword
        // accesses at their lane, the same values QEMU 7.2 gives this kernel.
        "MB testdev ioport=0x1122aa44 after_outw=0xbeefaa44 inw_e2=0x0000beef inb_e3=0x000000be",
        // The page flush (0xE4) leaves the page's contents and keeps it writable.
        "MB testdev flush bad_bytes=0 write_ok=1",
        // PCI mechanism #1: CONFIG_ADDRESS reads back with reserved bits 30:24 and
        // 1:0 as 0 (PCI 3.0 §3.2.2.3.2; QEMU keeps all 32 bits), no device answers
        // on bus 0 (master abort: all ones, §3.7.1).
        "MB pci addr_readback=0x80000000 all_ones_readback=0x80fffffc devices=0 id_word=0x0000ffff",
        "MB done",
    ] {
        assert!(out.contains(want), "{want:?} missing from:\n{out}");
    }
    // 0xE0-0xE4, 0xCF8 and 0xCFC are claimed: no unknown-port accesses at all.
    assert_eq!(
        (rep.unknown_ports, rep.first_odd[0]),
        (0, 0),
        "unknown ports:\n{}",
        rep.text()
    );
}

#[test]
fn debug_exit_value_gives_qemus_status() {
    if !kvm_ok() {
        return;
    }
    let Some(dir) = kernels() else {
        return;
    };
    use vlapic_vmm::summary::ExitRules;
    // QEMU's isa-debug-exit: status (N << 1) | 1; kvm-unit-tests reads 1 as
    // pass, 3 as fail and 77 (report_skip's exit 38) as skip.
    for (n, status) in [(0u32, 1u8), (1, 3), (38, 77)] {
        let rep = boot_mbinfo(&dir, &format!("mbinfo-elf32.elf exit={n}"));
        assert_eq!(rep.outcome, Outcome::DebugExit(n));
        assert_eq!(rep.exit_code_under(ExitRules::DebugExit), status);
        // The built-in guest's rules are unchanged: no PASS line here, so 1.
        assert_eq!(rep.exit_code_under(ExitRules::Scenarios), 1);
        assert!(rep
            .text()
            .contains(&format!("guest exit {n} (status {status})")));
    }
}
