//! A misbehaving guest gets a clear outcome and exit code, never a VMM panic:
//! triple fault, unknown ports, wild MMIO, invalid MSRs (#GP injected), spinning
//! forever (timeout), all vCPUs stopped, malformed images.

mod common;

use common::{asm32_guest, boot, kvm_ok};
use vlapic_vmm::{exit_code, run_vm, Outcome, VmConfig, VmmError};

#[test]
fn triple_fault_is_a_guest_crash() {
    if !kvm_ok() {
        return;
    }
    // Empty IDT, then #UD: #UD -> #GP -> #DF -> shutdown.
    let g = asm32_guest(
        "triple",
        "    lidt null_idt\n    ud2\nnull_idt: .word 0\n    .long 0\n",
    );
    let rep = boot(g, 1, false, 20);
    assert!(
        matches!(rep.outcome, Outcome::GuestCrash(ref m) if m.contains("triple fault")),
        "{}",
        rep.text()
    );
    assert_eq!(rep.exit_code(), exit_code::GUEST_CRASH);
}

#[test]
fn unknown_ports_read_all_ones_and_are_counted() {
    if !kvm_ok() {
        return;
    }
    let g = asm32_guest(
        "ports",
        r#"    in $0x99, %al
    mov %al, %bl
    out %al, $0x99
    cmp $0xFF, %bl
    jne 1f
    mov $pass, %esi
    call puts
1:  xor %eax, %eax
    jmp exit
pass: .asciz "PASS unknown_port\n"
"#,
    );
    let rep = boot(g, 1, false, 20);
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{}", rep.text());
    assert_eq!(rep.unknown_ports, 2);
    assert_eq!(rep.first_odd[0], 0x99);
    assert!(rep.text().contains("first unknown port: 0x99"));
    assert_eq!(rep.passed(), 1);
    assert_eq!(rep.exit_code(), 0);
}

#[test]
fn wild_mmio_reads_all_ones_and_is_counted() {
    if !kvm_ok() {
        return;
    }
    let g = asm32_guest(
        "mmio",
        r#"    movl $1, 0xD0000000
    mov 0xD0000000, %ebx
    cmp $0xFFFFFFFF, %ebx
    jne 1f
    mov $pass, %esi
    call puts
1:  xor %eax, %eax
    jmp exit
pass: .asciz "PASS wild_mmio\n"
"#,
    );
    let rep = boot(g, 1, false, 20);
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{}", rep.text());
    assert_eq!(rep.wild_mmio, 2);
    assert_eq!(rep.first_odd[1], 0xD000_0000);
    assert_eq!(rep.passed(), 1);
}

#[test]
fn invalid_msr_injects_gp() {
    if !kvm_ok() {
        return;
    }
    // #GP handler (vector 13) reports and exits; no IRET needed.
    let g = asm32_guest(
        "msr",
        r#"    mov $gp_handler, %eax
    mov %ax, idt+13*8
    shr $16, %eax
    mov %ax, idt+13*8+6
    movw $0x08, idt+13*8+2
    movw $0x8E00, idt+13*8+4
    lgdt gdtp
    ljmp $0x08, $1f
1:  mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %ss
    lidt idtp
    mov $0x808, %ecx        /* x2APIC TPR while in xAPIC mode: #GP */
    rdmsr
    mov $fail, %esi
    call puts
    mov $1, %eax
    jmp exit
gp_handler:
    mov $pass, %esi
    call puts
    xor %eax, %eax
    jmp exit
pass: .asciz "PASS msr_gp\n"
fail: .asciz "FAIL msr_gp: no #GP\n"
    .balign 8
gdt: .quad 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF
gdtp: .word 23
    .long gdt
idtp: .word 256*8-1
    .long idt
    .balign 8
idt: .skip 256*8
"#,
    );
    let rep = boot(g, 1, false, 20);
    assert_eq!(rep.outcome, Outcome::DebugExit(0), "{}", rep.text());
    assert_eq!(rep.passed(), 1, "{}", rep.text());
    assert_eq!(rep.msr_gp, 1);
    assert_eq!(rep.first_odd[2], 0x808);
}

#[test]
fn spinning_guest_times_out_with_vcpu_state() {
    if !kvm_ok() {
        return;
    }
    let g = asm32_guest("spin", "1:  jmp 1b\n");
    let rep = boot(g, 2, false, 2);
    assert_eq!(rep.outcome, Outcome::Timeout);
    assert_eq!(rep.exit_code(), exit_code::TIMEOUT);
    let text = rep.text();
    assert!(text.contains("vcpu0: running rip="), "{text}");
    assert!(text.contains("vcpu1: wait-for-SIPI"), "{text}");
}

#[test]
fn cli_hlt_with_nothing_else_is_all_stopped() {
    if !kvm_ok() {
        return;
    }
    let g = asm32_guest("cli-hlt", "    mov $msg, %esi\n    call puts\n    cli\n    hlt\nmsg: .asciz \"SKIP nothing: just stopping\\n\"\n");
    let rep = boot(g, 2, false, 20);
    assert_eq!(rep.outcome, Outcome::AllStopped, "{}", rep.text());
    assert_eq!(rep.exit_code(), exit_code::FAIL);
    assert_eq!(rep.skipped(), 1);
}

#[test]
fn malformed_images_are_one_clear_error() {
    for (img, want) in [
        (Vec::new(), "no header magic"),
        (b"\x7FELF garbage".to_vec(), "no header magic"),
        (
            {
                let mut v = vec![0u8; 64];
                v[0..4].copy_from_slice(&0x1BAD_B002u32.to_le_bytes());
                v[4..8].copy_from_slice(&0u32.to_le_bytes());
                v[8..12].copy_from_slice(&1u32.to_le_bytes());
                v
            },
            "bad checksum",
        ),
    ] {
        let cfg = VmConfig {
            kernel: img,
            ..VmConfig::default()
        };
        // The image is checked before KVM is touched: no /dev/kvm needed.
        match run_vm(&cfg) {
            Err(VmmError::Load(m)) => assert!(m.contains(want), "{m}"),
            other => panic!("expected a load error, got {other:?}"),
        }
    }
}
