//! Software interrupts at CPL0: `int3` and `int n` through an interrupt gate, a trap
//! gate, an IST gate and a not-present gate, checked against the frame the CPU pushes.
//!
//! SDM Vol. 3A §6.12.1 and §6.14: the handler runs with RSP = the (IST or current)
//! stack aligned to 16 minus the 40-byte frame SS, RSP, RFLAGS, CS, RIP; RIP is the
//! address after the instruction; an interrupt gate clears IF, a trap gate keeps it;
//! a not-present gate raises #NP(vector·8+2) with RIP on the `int`. Some KVM hosts
//! cannot execute these instructions at CPL0 (the VMM then delivers them).

use core::arch::{asm, global_asm};
use core::sync::atomic::{AtomicU64, Ordering::SeqCst};

use crate::idt::{self, Frame};
use crate::percpu;
use crate::report::Res;

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
    ensure!(rec(0) == count, "{}: handler ran {} times, want {}", what, rec(0), count);
    ensure!(rec(2) == s.ret, "{}: pushed RIP {:#x}, want {:#x} (after the instruction)", what, rec(2), s.ret);
    ensure!(rec(3) == cs, "{}: pushed CS {:#x}, want {:#x}", what, rec(3), cs);
    ensure!(rec(4) == s.rflags, "{}: pushed RFLAGS {:#x}, want {:#x}", what, rec(4), s.rflags);
    ensure!(rec(5) == s.rsp, "{}: pushed RSP {:#x}, want {:#x}", what, rec(5), s.rsp);
    ensure!(rec(6) == ss, "{}: pushed SS {:#x}, want {:#x}", what, rec(6), ss);
    ensure!(rec(1) == entry, "{}: handler RSP {:#x}, want {:#x}", what, rec(1), entry);
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
    check("int3 (interrupt gate, IF=1)", &s, 1, (s.rsp & !15) - 40, false)?;

    crate::cpu::sti();
    let s = shot!("int 0x61");
    crate::cpu::cli();
    check("int $0x61 (trap gate, IF=1)", &s, 2, (s.rsp & !15) - 40, true)?;

    let s = shot!("int 0x62");
    check("int $0x62 (IST1 gate)", &s, 3, (percpu::ist1_top() & !15) - 40, false)?;

    let s = shot!("int3");
    check("int3 (interrupt gate, IF=0)", &s, 4, (s.rsp & !15) - 40, false)?;

    let s = shot!("int 0x63");
    ensure!(rec(0) == 4, "int $0x63 (not present) ran the handler");
    let err = NP_ERR.load(SeqCst);
    ensure!(err == u64::from(V_ABSENT) * 8 + 2, "int $0x63 (not present): #NP error {:#x}, want {:#x}", err, u64::from(V_ABSENT) * 8 + 2);
    let rip = NP_RIP.load(SeqCst);
    ensure!(rip == s.ret - 2, "int $0x63 (not present): #NP at {:#x}, want the int at {:#x}", rip, s.ret - 2);
    Ok(())
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
