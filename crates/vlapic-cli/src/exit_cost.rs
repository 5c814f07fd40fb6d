//! `vlapic bench --exit-cost`: host instructions spent in userspace per APIC exit (xAPIC
//! EOI, x2APIC EOI, TPR write, ICR write), counted by callgrind on tiny generated guests.
//!
//! Each guest is a multiboot image (a.out kludge, 32-bit protected mode) that performs
//! one operation N times in a loop and exits through port 0xF4. `vlapic run` runs it
//! under `valgrind --tool=callgrind`, collecting only inside the vCPU thread
//! (`vlapic_vmm::vcpu::run_vcpu`: from `KVM_RUN` returning to the next entry, the
//! adapter, the fabric and the VMM's loop); the guest itself runs in KVM and is not
//! counted. The figure is the difference between N = 2000 and N = 1000 divided by 1000,
//! so start-up, the boot and the exit cancel. Exits per operation come from the run's
//! own exit counters the same way (the architectural floor is 1).

use std::path::Path;
use std::process::{Command, ExitCode};

/// One measured operation.
#[derive(Clone, Copy, Debug)]
pub enum Op {
    /// `movl $0, 0xFEE000B0`.
    XapicEoi,
    /// `wrmsr 0x80B` (x2APIC mode).
    X2apicEoi,
    /// `movl $0, 0xFEE00080`.
    TprWrite,
    /// `movl $0x40, 0xFEE00300`: a fixed IPI to APIC ID 0x55, which does not exist (the
    /// ICR decode and the routing lookup, with no delivery to wait on).
    IcrWrite,
}

impl Op {
    const ALL: [Op; 4] = [Op::XapicEoi, Op::X2apicEoi, Op::TprWrite, Op::IcrWrite];

    fn name(self) -> &'static str {
        match self {
            Op::XapicEoi => "xapic_eoi",
            Op::X2apicEoi => "x2apic_eoi",
            Op::TprWrite => "tpr_write",
            Op::IcrWrite => "icr_write",
        }
    }
}

const LOAD: u32 = 0x10_0000;

/// `movl $imm, abs` (C7 05 addr imm).
fn movl(code: &mut Vec<u8>, addr: u32, imm: u32) {
    code.extend_from_slice(&[0xC7, 0x05]);
    code.extend_from_slice(&addr.to_le_bytes());
    code.extend_from_slice(&imm.to_le_bytes());
}

/// The guest image for `op` repeated `n` times (machine code checked with GNU as).
pub fn image(op: Op, n: u32) -> Vec<u8> {
    let mut code = Vec::new();
    movl(&mut code, 0xFEE0_00F0, 0x1FF); // SVR: software enable
    match op {
        Op::XapicEoi | Op::TprWrite | Op::IcrWrite => {
            if let Op::IcrWrite = op {
                movl(&mut code, 0xFEE0_0310, 0x5500_0000); // ICR high: APIC ID 0x55
            }
            code.push(0xB9); // mov $n, %ecx
            code.extend_from_slice(&n.to_le_bytes());
            let (addr, val) = match op {
                Op::XapicEoi => (0xFEE0_00B0, 0),
                Op::TprWrite => (0xFEE0_0080, 0),
                _ => (0xFEE0_0300, 0x40),
            };
            movl(&mut code, addr, val); // 10 bytes
            code.extend_from_slice(&[0x49, 0x75, 0xF3]); // dec %ecx; jnz back 13
        }
        Op::X2apicEoi => {
            // rdmsr 0x1B; or $0xC00 (EN | EXTD); wrmsr: into x2APIC mode.
            code.extend_from_slice(&[0xB9, 0x1B, 0, 0, 0, 0x0F, 0x32, 0x0D, 0x00, 0x0C, 0, 0]);
            code.extend_from_slice(&[0x0F, 0x30]);
            code.push(0xBE); // mov $n, %esi
            code.extend_from_slice(&n.to_le_bytes());
            // mov $0x80b,%ecx; xor %eax,%eax; xor %edx,%edx; wrmsr; dec %esi; jnz back 14
            code.extend_from_slice(&[0xB9, 0x0B, 0x08, 0, 0, 0x31, 0xC0, 0x31, 0xD2]);
            code.extend_from_slice(&[0x0F, 0x30, 0x4E, 0x75, 0xF2]);
        }
    }
    code.extend_from_slice(&[0x31, 0xC0, 0xE7, 0xF4, 0xF4]); // xor eax; out eax, 0xF4; hlt
                                                             // Multiboot v1 header with the a.out kludge (flags bit 16): load the whole image at
                                                             // LOAD, enter right after the 32-byte header.
    let magic: u32 = 0x1BAD_B002;
    let flags: u32 = 1 << 16;
    let mut img = Vec::new();
    for w in [
        magic,
        flags,
        magic.wrapping_add(flags).wrapping_neg(),
        LOAD,
        LOAD,
        0,
        0,
        LOAD + 32,
    ] {
        img.extend_from_slice(&w.to_le_bytes());
    }
    img.extend_from_slice(&code);
    img
}

/// Callgrind's instruction count and the run's total exits for `op` × `n`.
fn measure(exe: &Path, dir: &Path, op: Op, n: u32, trace: bool) -> Result<(u64, u64), String> {
    let kernel = dir.join(format!("{}-{n}.img", op.name()));
    std::fs::write(&kernel, image(op, n)).map_err(|e| format!("{}: {e}", kernel.display()))?;
    let trace_file = dir.join(format!("{}-{n}.trace.json", op.name()));
    let trace_args: Vec<&std::ffi::OsStr> = if trace {
        vec!["--trace".as_ref(), trace_file.as_os_str()]
    } else {
        Vec::new()
    };
    let out = Command::new("valgrind")
        .args([
            "--tool=callgrind",
            "--callgrind-out-file=/dev/null",
            "--toggle-collect=vlapic_vmm::vcpu::run_vcpu",
        ])
        .arg(exe)
        .args([
            "run",
            "--vcpus",
            "1",
            "--json",
            "--timeout",
            "300",
            "--kernel",
        ])
        .arg(&kernel)
        .args(&trace_args)
        .output()
        .map_err(|e| format!("cannot run valgrind: {e}"))?;
    let err = String::from_utf8_lossy(&out.stderr);
    let ir = err
        .lines()
        .find_map(|l| l.split("Collected :").nth(1))
        .and_then(|v| v.trim().replace(',', "").parse::<u64>().ok())
        .ok_or_else(|| format!("{}: no callgrind count in: {err}", op.name()))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)
        .map_err(|e| format!("{}: run --json: {e}", op.name()))?;
    if v["outcome"]["kind"] != "debug_exit" {
        return Err(format!(
            "{}: the guest did not finish: {}",
            op.name(),
            v["outcome"]
        ));
    }
    let exits = v["exits"].as_object().map_or(0, |m| {
        m.values().filter_map(serde_json::Value::as_u64).sum()
    });
    Ok((ir, exits))
}

/// `vlapic bench --exit-cost`; with `trace`, the measured runs record (`--trace`).
pub fn run(json: bool, trace: bool) -> ExitCode {
    if Command::new("valgrind").arg("--version").output().is_err() {
        eprintln!("vlapic bench: --exit-cost needs valgrind (apt-get install valgrind)");
        return ExitCode::from(2);
    }
    let exe = match std::env::current_exe() {
        Ok(p) => p,
        Err(e) => {
            eprintln!("vlapic bench: cannot find this executable: {e}");
            return ExitCode::from(2);
        }
    };
    let dir = std::env::temp_dir().join(format!("vlapic-exit-cost-{}", std::process::id()));
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("vlapic bench: {}: {e}", dir.display());
        return ExitCode::from(2);
    }
    let mut rows = Vec::new();
    for op in Op::ALL {
        let r = measure(&exe, &dir, op, 1000, trace)
            .and_then(|a| Ok((a, measure(&exe, &dir, op, 2000, trace)?)));
        match r {
            Ok(((ir1, ex1), (ir2, ex2))) => rows.push((
                op,
                ir2.saturating_sub(ir1) as f64 / 1000.0,
                ex2.saturating_sub(ex1) as f64 / 1000.0,
            )),
            Err(e) => {
                eprintln!("vlapic bench: {e}");
                let _ = std::fs::remove_dir_all(&dir);
                return ExitCode::from(5);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    if json {
        let ops: Vec<serde_json::Value> = rows
            .iter()
            .map(|(op, ir, ex)| serde_json::json!({"op": op.name(), "instructions_per_op": ir, "exits_per_op": ex}))
            .collect();
        println!("{}", serde_json::json!({"schema": 1, "exit_cost": ops}));
    } else {
        println!(
            "userspace instructions per operation (callgrind, vCPU thread, N=2000 minus N=1000):"
        );
        println!(
            "{:<12} {:>14} {:>13}",
            "operation", "instructions", "exits/op"
        );
        for (op, ir, ex) in &rows {
            println!("{:<12} {:>14.0} {:>13.2}", op.name(), ir, ex);
        }
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The loops' backward jumps land on their first instruction (the bytes GNU as
    /// produced for the same source).
    #[test]
    fn images_have_the_checked_encoding() {
        let x = image(Op::XapicEoi, 7);
        assert_eq!(&x[..4], &0x1BAD_B002u32.to_le_bytes());
        let code = &x[32..];
        // movl SVR (10) + mov ecx (5) + movl EOI (10) + dec + jnz -13.
        assert_eq!(&code[10..15], &[0xB9, 7, 0, 0, 0]);
        assert_eq!(&code[15..17], &[0xC7, 0x05]);
        assert_eq!(&code[25..28], &[0x49, 0x75, 0xF3]);
        let x2 = image(Op::X2apicEoi, 7);
        let c = &x2[32..];
        assert_eq!(
            &c[c.len() - 10..c.len() - 5],
            &[0x0F, 0x30, 0x4E, 0x75, 0xF2]
        );
        let sum = x2[..12]
            .chunks(4)
            .map(|w| u32::from_le_bytes([w[0], w[1], w[2], w[3]]))
            .fold(0u32, u32::wrapping_add);
        assert_eq!(sum, 0, "multiboot checksum");
    }
}
