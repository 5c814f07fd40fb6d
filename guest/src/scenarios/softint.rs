//! Software interrupts at CPL0: `int3` and `int n` through an interrupt gate, a trap
//! gate, an IST gate and a not-present gate, checked against the frame the CPU pushes.
//!
//! SDM Vol. 3A §6.12.1 and §6.14: the handler runs with RSP = the (IST or current)
//! stack aligned to 16 minus the 40-byte frame SS, RSP, RFLAGS, CS, RIP; RIP is the
//! address after the instruction; an interrupt gate clears IF, a trap gate keeps it;
//! a not-present gate raises #NP(vector·8+2) with RIP on the `int`. Some KVM hosts
//! cannot execute these instructions at CPL0 (the VMM then delivers them);
//! `soft-int-smp` runs them on two CPUs at once while fixed IPIs cross.

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::idt::{self, Frame};
use crate::percpu::{self, CPUS};
use crate::report::Res;
use crate::{apic, cpu, smp, time};

/// What the recording handler saw: [count, entry RSP, RIP, CS, RFLAGS, RSP, SS,
/// RFLAGS inside the handler].
#[repr(C)]
struct Rec([AtomicU64; 8]);
static REC: Rec = Rec([const { AtomicU64::new(0) }; 8]);

global_asm!(
    r#"
    .pushsection .text.softint, "ax"
    .balign 16
    .global softint_rec_entry
softint_rec_entry:
    mov [rip + {rec} + 8], rsp
    push rax
    pushfq
    pop rax
    mov [rip + {rec} + 56], rax
    mov rax, [rsp + 8]
    mov [rip + {rec} + 16], rax
    mov rax, [rsp + 16]
    mov [rip + {rec} + 24], rax
    mov rax, [rsp + 24]
    mov [rip + {rec} + 32], rax
    mov rax, [rsp + 32]
    mov [rip + {rec} + 40], rax
    mov rax, [rsp + 40]
    mov [rip + {rec} + 48], rax
    lock inc qword ptr [rip + {rec}]
    pop rax
    iretq
    .popsection
"#,
    rec = sym REC,
);

extern "C" {
    fn softint_rec_entry();
}

const V_TRAP: u8 = 0x61;
const V_IST: u8 = 0x62;
const V_ABSENT: u8 = 0x63;
const IF: u64 = 1 << 9;

/// RIP after the instruction, RSP and RFLAGS at it.
struct Shot {
    ret: u64,
    rsp: u64,
    rflags: u64,
}

/// Executes `$insn` below the red zone; records the return label, RSP and RFLAGS.
macro_rules! shot {
    ($insn:literal) => {{
        let (ret, rsp, rflags): (u64, u64, u64);
        unsafe {
            asm!(
                "sub rsp, 128",
                "pushfq",
                "pop {fl}",
                "lea {ret}, [rip + 2f]",
                "mov {sp}, rsp",
                $insn,
                "2:",
                "add rsp, 128",
                ret = out(reg) ret,
                sp = out(reg) rsp,
                fl = out(reg) rflags,
            );
        }
        Shot { ret, rsp, rflags }
    }};
}

fn selectors() -> (u64, u64) {
    let (cs, ss): (u16, u16);
    unsafe {
        asm!("mov {0:x}, cs", "mov {1:x}, ss", out(reg) cs, out(reg) ss, options(nomem, nostack, preserves_flags));
    }
    (u64::from(cs), u64::from(ss))
}

fn rec(i: usize) -> u64 {
    REC.0[i].load(SeqCst)
}

/// Checks the frame of one delivery: count, return address, CS, RFLAGS, RSP, SS,
/// handler stack (`entry`), IF in the handler.
fn check(what: &str, s: &Shot, count: u64, entry: u64, handler_if: bool) -> Res {
    let (cs, ss) = selectors();
    ensure!(
        rec(0) == count,
        "{}: handler ran {} times, want {}",
        what,
        rec(0),
        count
    );
    ensure!(
        rec(2) == s.ret,
        "{}: pushed RIP {:#x}, want {:#x} (after the instruction)",
        what,
        rec(2),
        s.ret
    );
    ensure!(
        rec(3) == cs,
        "{}: pushed CS {:#x}, want {:#x}",
        what,
        rec(3),
        cs
    );
    ensure!(
        rec(4) == s.rflags,
        "{}: pushed RFLAGS {:#x}, want {:#x}",
        what,
        rec(4),
        s.rflags
    );
    ensure!(
        rec(5) == s.rsp,
        "{}: pushed RSP {:#x}, want {:#x}",
        what,
        rec(5),
        s.rsp
    );
    ensure!(
        rec(6) == ss,
        "{}: pushed SS {:#x}, want {:#x}",
        what,
        rec(6),
        ss
    );
    ensure!(
        rec(1) == entry,
        "{}: handler RSP {:#x}, want {:#x}",
        what,
        rec(1),
        entry
    );
    ensure!(
        (rec(7) & IF != 0) == handler_if,
        "{}: IF={} in the handler, want {}",
        what,
        u8::from(rec(7) & IF != 0),
        u8::from(handler_if)
    );
    Ok(())
}

static NP_ERR: AtomicU64 = AtomicU64::new(0);
static NP_RIP: AtomicU64 = AtomicU64::new(0);

/// #NP from the absent gate: record error code and RIP, resume after the `int`.
fn np_handler(f: &mut Frame) {
    NP_ERR.store(f.error, SeqCst);
    NP_RIP.store(f.rip, SeqCst);
    f.rip += 2;
}

fn run() -> Res {
    let h = softint_rec_entry as *const () as u64;
    idt::set_gate(3, h, 0, 0xEE); // interrupt gate, DPL3
    idt::set_gate(V_TRAP, h, 0, 0x8F); // trap gate
    idt::set_gate(V_IST, h, 1, 0x8E); // interrupt gate on IST1
    idt::set_gate(V_ABSENT, h, 0, 0x0E); // not present
    idt::set_handler(11, np_handler);

    crate::cpu::sti();
    let s = shot!("int3");
    crate::cpu::cli();
    check(
        "int3 (interrupt gate, IF=1)",
        &s,
        1,
        (s.rsp & !15) - 40,
        false,
    )?;

    crate::cpu::sti();
    let s = shot!("int 0x61");
    crate::cpu::cli();
    check(
        "int $0x61 (trap gate, IF=1)",
        &s,
        2,
        (s.rsp & !15) - 40,
        true,
    )?;

    let s = shot!("int 0x62");
    check(
        "int $0x62 (IST1 gate)",
        &s,
        3,
        (percpu::ist1_top() & !15) - 40,
        false,
    )?;

    let s = shot!("int3");
    check(
        "int3 (interrupt gate, IF=0)",
        &s,
        4,
        (s.rsp & !15) - 40,
        false,
    )?;

    let s = shot!("int 0x63");
    ensure!(rec(0) == 4, "int $0x63 (not present) ran the handler");
    let err = NP_ERR.load(SeqCst);
    ensure!(
        err == u64::from(V_ABSENT) * 8 + 2,
        "int $0x63 (not present): #NP error {:#x}, want {:#x}",
        err,
        u64::from(V_ABSENT) * 8 + 2
    );
    let rip = NP_RIP.load(SeqCst);
    ensure!(
        rip == s.ret - 2,
        "int $0x63 (not present): #NP at {:#x}, want the int at {:#x}",
        rip,
        s.ret - 2
    );
    Ok(())
}

/// Median TSC cycles of `int3` → handler → `iretq` over `samples` (an interrupt
/// gate on the current stack; the benchmark mode's `int3-roundtrip`).
pub fn int3_round_trip(samples: &mut [u64]) -> u64 {
    idt::set_gate(3, softint_rec_entry as *const () as u64, 0, 0xEE);
    for s in samples.iter_mut() {
        let t0 = crate::cpu::rdtsc();
        let _ = shot!("int3");
        *s = crate::cpu::rdtsc() - t0;
    }
    idt::default_gate(3);
    samples.sort_unstable();
    samples.get(samples.len() / 2).copied().unwrap_or(0)
}

/// `int3` and `int n` at CPL0 through four kinds of gate (see the module docs).
pub fn soft_int() -> Res {
    for r in REC.0.iter() {
        r.store(0, SeqCst);
    }
    NP_ERR.store(0, SeqCst);
    let r = run();
    for v in [3, V_TRAP, V_IST, V_ABSENT] {
        idt::default_gate(v);
    }
    r
}

// ---------------------------------------------------------------------------
// soft-int-smp
// ---------------------------------------------------------------------------

static SMP_TOTAL: AtomicU64 = AtomicU64::new(0);
static SMP_BAD: AtomicU64 = AtomicU64::new(0);

global_asm!(
    r#"
    .pushsection .text.softint, "ax"
    .balign 16
    .global softint_smp_entry
softint_smp_entry:
    push rax
    lea rax, [rip + softint_loop_ret]
    cmp rax, [rsp + 8]
    je 1f
    lock inc qword ptr [rip + {bad}]
1:  lock inc qword ptr [rip + {total}]
    pop rax
    iretq
    .balign 16
    .global softint_loop
softint_loop:
2:  int 0x65
    .global softint_loop_ret
softint_loop_ret:
    dec rdi
    jnz 2b
    ret
    .popsection
"#,
    bad = sym SMP_BAD,
    total = sym SMP_TOTAL,
);

extern "C" {
    fn softint_smp_entry();
    /// `int $0x65` `n` times (n > 0).
    fn softint_loop(n: u64);
}

const V_SMP: u8 = 0x65;
const V_CROSS: u8 = 0x64;
const ROUNDS: u64 = 100;
const PER_ROUND: u64 = 10;

/// ROUNDS times: PER_ROUND `int $0x65`, then a fixed IPI to `peer` (IF=1 all along).
fn storm(peer: u32) {
    for _ in 0..ROUNDS {
        unsafe { softint_loop(PER_ROUND) };
        apic::send_ipi(peer, apic::DM_FIXED | V_CROSS as u32);
    }
}

fn ap_storm(peer: u64) -> u64 {
    cpu::sti();
    storm(peer as u32);
    // Let the BSP's last IPI land here before the command loop's cli.
    time::settle(time::ms(5));
    cpu::cli();
    0
}

/// Two CPUs each execute 1,000 `int $0x65` (trap gate: IF stays 1, so fixed IPIs
/// from the other CPU land before, between and inside the handlers): every one
/// enters the handler exactly once with the return address after the instruction,
/// no other exception arises, and each CPU takes IPIs from the other.
pub fn soft_int_smp() -> Res {
    let Some(ap) = percpu::aps().next() else {
        skip!("needs 2 CPUs");
    };
    SMP_TOTAL.store(0, SeqCst);
    SMP_BAD.store(0, SeqCst);
    idt::set_gate(V_SMP, softint_smp_entry as *const () as u64, 0, 0x8F);
    let bsp_before = percpu::this().counts[V_CROSS as usize].load(SeqCst);
    let ap_before = CPUS[ap].counts[V_CROSS as usize].load(SeqCst);
    let r = match smp::post(ap, ap_storm, u64::from(apic::id())) {
        Some(seq) => {
            cpu::sti();
            storm(ap as u32);
            let r = smp::wait_ack(ap, seq);
            time::settle(time::ms(5));
            cpu::cli();
            r
        }
        None => None,
    };
    idt::default_gate(V_SMP);
    ensure!(r.is_some(), "cpu {} did not finish", ap);
    let total = SMP_TOTAL.load(SeqCst);
    ensure!(
        total == 2 * ROUNDS * PER_ROUND,
        "{} handler entries, want {}",
        total,
        2 * ROUNDS * PER_ROUND
    );
    let bad = SMP_BAD.load(SeqCst);
    ensure!(
        bad == 0,
        "{} entries with a pushed RIP other than the instruction's end",
        bad
    );
    let got_bsp = percpu::this().counts[V_CROSS as usize].load(SeqCst) - bsp_before;
    let got_ap = CPUS[ap].counts[V_CROSS as usize].load(SeqCst) - ap_before;
    // Fixed IPIs may merge in IRR (one pending per vector), so at most ROUNDS each.
    ensure!(
        (1..=ROUNDS as u32).contains(&got_bsp) && (1..=ROUNDS as u32).contains(&got_ap),
        "IPIs taken: BSP {}, cpu {} {} (each sent {})",
        got_bsp,
        ap,
        got_ap,
        ROUNDS
    );
    Ok(())
}
