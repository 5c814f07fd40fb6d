//! Helpers shared by the VMM integration tests: the /dev/kvm check and
//! building small guests with binutils.

#![allow(dead_code)]

// SKIPPED lines go straight to stderr: the test harness captures print!/eprint!.
use std::io::Write as _;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use vlapic_vmm::{run_vm, ConsoleSink, RunReport, VmConfig};

/// True when /dev/kvm can run our VMs; otherwise prints the one skip line.
pub fn kvm_ok() -> bool {
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

fn tmp() -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
}

fn run(cmd: &mut Command) {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The mini guest (tests/mini/mini.S), assembled once per test binary.
pub fn mini_guest() -> Vec<u8> {
    static IMG: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    IMG.get_or_init(|| {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../vlapic-kvm/tests/mini");
        let out = tmp().join(format!("mini-{}.elf", std::process::id()));
        run(Command::new("sh").arg(dir.join("build.sh")).arg(&out));
        std::fs::read(&out).expect("mini guest image")
    })
    .clone()
}

/// A 32-bit multiboot guest from an assembly body (entered at `_start` in
/// protected mode, paging off; `exit` and `puts` helpers and a flat GDT provided).
pub fn asm32_guest(name: &str, body: &str) -> Vec<u8> {
    let src = format!(
        r#"
    .text
    .balign 4
    .long 0x1BADB002, 0x00000003, -(0x1BADB002 + 3)
    .code32
    .globl _start
_start:
    mov $stack_top, %esp
{body}
exit:                   /* eax = code */
    out %eax, $0xF4
1:  cli; hlt; jmp 1b
puts:                   /* esi = string */
    mov $0x3F8, %dx
2:  lodsb
    test %al, %al
    jz 3f
    out %al, %dx
    jmp 2b
3:  ret
    .bss
    .balign 16
    .skip 4096
stack_top:
"#
    );
    let dir = tmp().join(format!("asm-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp dir");
    let s = dir.join("g.S");
    std::fs::write(&s, src).expect("write source");
    run(Command::new("as")
        .arg("--32")
        .arg("-o")
        .arg(dir.join("g.o"))
        .arg(&s));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-N",
            "-Ttext",
            "0x100000",
            "-e",
            "_start",
            "--no-warn-rwx-segments",
            "-o",
        ])
        .arg(dir.join("g.elf"))
        .arg(dir.join("g.o")));
    std::fs::read(dir.join("g.elf")).expect("guest image")
}

/// Boots `kernel` with `vcpus` vCPUs, console captured, and returns the report.
pub fn boot(kernel: Vec<u8>, vcpus: usize, x2apic: bool, timeout_s: u64) -> RunReport {
    let cfg = VmConfig {
        kernel,
        vcpus,
        x2apic,
        memory_mib: 64,
        timeout: Some(Duration::from_secs(timeout_s)),
        console: ConsoleSink::Quiet,
        ..VmConfig::default()
    };
    run_vm(&cfg).unwrap_or_else(|e| panic!("run_vm: {e}"))
}
