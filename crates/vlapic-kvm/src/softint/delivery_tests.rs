//! Tests of software-interrupt delivery against the SDM's rules (Vol. 3A §6.12,
//! §6.14; Vol. 2A `INT n`), on a flat fake memory with holes.

use super::*;
use proptest::prelude::*;

const PAGE: u64 = 4096;
const SIZE: usize = 64 * 1024;
const IDT: u64 = 0x1000;
const GDT: u64 = 0x3000;
const TSS: u64 = 0x3800;
const STACK: u64 = 0x8000;
const IST1: u64 = 0xA000;
const RSP0: u64 = 0xC000;
const HANDLER: u64 = 0xFFFF_FFFF_8000_1234;

/// 64 KiB at linear 0; pages listed in `holes` are not mapped; the rest is not mapped.
struct Flat {
    mem: Vec<u8>,
    holes: Vec<u64>,
}

impl Flat {
    fn ok(&self, addr: u64, len: usize) -> Result<usize, AccessError> {
        for i in 0..len as u64 {
            let a = addr.wrapping_add(i);
            if a >= SIZE as u64 || self.holes.contains(&(a / PAGE)) {
                return Err(AccessError::NotMapped(a));
            }
        }
        Ok(addr as usize)
    }
    fn u64_at(&self, addr: u64) -> u64 {
        let a = addr as usize;
        u64::from_le_bytes(self.mem[a..a + 8].try_into().expect("8 bytes"))
    }
}

impl LinearMemory for Flat {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        let a = self.ok(addr, buf.len())?;
        buf.copy_from_slice(&self.mem[a..a + buf.len()]);
        Ok(())
    }
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        let a = self.ok(addr, data.len())?;
        self.mem[a..a + data.len()].copy_from_slice(data);
        Ok(())
    }
}

fn gate_bytes(offset: u64, sel: u16, ist: u8, type_: u8, dpl: u8, present: bool) -> [u8; 16] {
    let mut g = [0u8; 16];
    g[0..2].copy_from_slice(&(offset as u16).to_le_bytes());
    g[2..4].copy_from_slice(&sel.to_le_bytes());
    g[4] = ist;
    g[5] = type_ | (dpl << 5) | if present { 0x80 } else { 0 };
    g[6..8].copy_from_slice(&((offset >> 16) as u16).to_le_bytes());
    g[8..12].copy_from_slice(&((offset >> 32) as u32).to_le_bytes());
    g
}

/// Flat 64-bit code (0x08, DPL0), data (0x10), 32-bit code (0x18), DPL3 64-bit code
/// (0x20); a 64-bit TSS with RSP0 and IST1.
fn machine() -> (Flat, CpuState) {
    let mut m = Flat {
        mem: vec![0; SIZE],
        holes: Vec::new(),
    };
    let gdt: [u64; 5] = [
        0,
        0x00AF_9B00_0000_FFFF, // 64-bit code, DPL0
        0x00CF_9300_0000_FFFF, // data
        0x00CF_9B00_0000_FFFF, // 32-bit code, DPL0
        0x00AF_FB00_0000_FFFF, // 64-bit code, DPL3
    ];
    for (i, d) in gdt.iter().enumerate() {
        let a = GDT as usize + 8 * i;
        m.mem[a..a + 8].copy_from_slice(&d.to_le_bytes());
    }
    let t = TSS as usize;
    m.mem[t + 4..t + 12].copy_from_slice(&RSP0.to_le_bytes());
    m.mem[t + 36..t + 44].copy_from_slice(&IST1.to_le_bytes());
    let cpu = CpuState {
        rip: 0xFFFF_FFFF_8000_0100,
        rsp: STACK - 0x13, // misaligned on purpose
        rflags: 0x202 | RFLAGS_TF | RFLAGS_RF | RFLAGS_NT,
        cs: segment_from_descriptor(gdt[1], 0x08),
        ss: segment_from_descriptor(gdt[2], 0x10),
        tr: Segment {
            base: TSS,
            limit: 0x67,
            selector: 0x28,
            type_: 0xB,
            present: true,
            ..Segment::default()
        },
        ldt: Segment {
            unusable: true,
            ..Segment::default()
        },
        gdt: TableReg {
            base: GDT,
            limit: 5 * 8 - 1,
        },
        idt: TableReg {
            base: IDT,
            limit: 256 * 16 - 1,
        },
        cr0: 0x8000_0011,
        cr4: 0x20,
        efer: 0x500,
    };
    (m, cpu)
}

fn set_gate(m: &mut Flat, v: u8, g: [u8; 16]) {
    let a = (IDT + 16 * u64::from(v)) as usize;
    m.mem[a..a + 16].copy_from_slice(&g);
}

fn entered(o: Result<Outcome, Unsupported>) -> Entry {
    match o {
        Ok(Outcome::Entered(e)) => e,
        other => panic!("expected entry, got {other:?}"),
    }
}

fn faulted(o: Result<Outcome, Unsupported>) -> Fault {
    match o {
        Ok(Outcome::Faulted(f)) => f,
        other => panic!("expected a fault, got {other:?}"),
    }
}

#[test]
fn decodes_int3_and_int_n_only() {
    assert_eq!(decode(&[0xCC]), Some(SoftInt { vector: 3, len: 1 }));
    assert_eq!(
        decode(&[0xCD, 0x80]),
        Some(SoftInt {
            vector: 0x80,
            len: 2
        })
    );
    assert_eq!(decode(&[0xCD]), None); // truncated
    assert_eq!(decode(&[0xCE]), None); // INTO is not handled
    assert_eq!(decode(&[0x66, 0xCD, 0x80]), None); // prefixes are not skipped
    assert_eq!(decode(&[]), None);
}

/// SDM Vol. 3A §6.14.2: 16-byte aligned stack, SS, RSP, RFLAGS, CS, RIP pushed;
/// RIP = the next instruction; §6.12.1.3: an interrupt gate clears IF, TF, NT, RF.
#[test]
fn interrupt_gate_same_level_frame() {
    let (mut m, cpu) = machine();
    set_gate(&mut m, 0x40, gate_bytes(HANDLER, 0x08, 0, 0xE, 0, true));
    let e = entered(deliver(
        &cpu,
        SoftInt {
            vector: 0x40,
            len: 2,
        },
        &mut m,
    ));
    let aligned = cpu.rsp & !0xF;
    assert_eq!(e.rsp, aligned - 40);
    assert_eq!(e.rip, HANDLER);
    assert_eq!(m.u64_at(e.rsp), cpu.rip + 2, "return address after `int n`");
    assert_eq!(m.u64_at(e.rsp + 8), 0x08);
    assert_eq!(m.u64_at(e.rsp + 16), cpu.rflags, "RFLAGS as before");
    assert_eq!(m.u64_at(e.rsp + 24), cpu.rsp, "the unaligned RSP");
    assert_eq!(m.u64_at(e.rsp + 32), 0x10);
    assert_eq!(e.rflags, 0x002, "IF, TF, NT, RF cleared");
    assert_eq!(e.cs.selector, 0x08);
    assert!(e.cs.l && !e.cs.db && e.cs.present && e.cs.s);
    assert_eq!(e.ss, None);
}

/// A trap gate keeps IF (SDM Vol. 3A §6.12.1.3); `int3` returns after its one byte.
#[test]
fn trap_gate_keeps_if() {
    let (mut m, cpu) = machine();
    set_gate(&mut m, 3, gate_bytes(HANDLER, 0x08, 0, 0xF, 3, true));
    let e = entered(deliver(&cpu, SoftInt { vector: 3, len: 1 }, &mut m));
    assert_eq!(m.u64_at(e.rsp), cpu.rip + 1);
    assert_eq!(e.rflags, 0x202);
}

/// SDM Vol. 3A §6.14.5: an IST index switches stacks even at the same level.
#[test]
fn ist_stack_without_privilege_change() {
    let (mut m, cpu) = machine();
    set_gate(&mut m, 0x41, gate_bytes(HANDLER, 0x08, 1, 0xE, 0, true));
    let e = entered(deliver(
        &cpu,
        SoftInt {
            vector: 0x41,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(e.rsp, IST1 - 40);
    assert_eq!(m.u64_at(e.rsp + 24), cpu.rsp);
    assert_eq!(e.ss, None);
}

/// SDM Vol. 3A §6.14.4: from CPL3 to a DPL0 handler, RSP0 from the TSS and SS
/// becomes a null selector with RPL 0; the old SS:RSP are pushed.
#[test]
fn privilege_change_uses_rsp0_and_null_ss() {
    let (mut m, mut cpu) = machine();
    cpu.cs = segment_from_descriptor(0x00AF_FB00_0000_FFFF, 0x23);
    cpu.ss.selector = 0x1B;
    set_gate(&mut m, 0x80, gate_bytes(HANDLER, 0x08, 0, 0xE, 3, true));
    let e = entered(deliver(
        &cpu,
        SoftInt {
            vector: 0x80,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(e.rsp, RSP0 - 40);
    assert_eq!(m.u64_at(e.rsp + 8), 0x23);
    assert_eq!(m.u64_at(e.rsp + 32), 0x1B);
    assert_eq!(e.cs.selector, 0x08);
    let ss = e.ss.expect("SS changes");
    assert_eq!((ss.selector, ss.dpl), (0, 0));
}

/// SDM Vol. 2A `INT n`: gate DPL < CPL for a software interrupt → #GP(vector·8+2).
#[test]
fn gate_dpl_below_cpl_is_gp() {
    let (mut m, mut cpu) = machine();
    cpu.cs = segment_from_descriptor(0x00AF_FB00_0000_FFFF, 0x23);
    set_gate(&mut m, 0x81, gate_bytes(HANDLER, 0x08, 0, 0xE, 0, true));
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x81,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(f, Fault::Gp(0x81 * 8 + 2));
    assert_eq!((f.vector(), f.error_code()), (13, 0x81 * 8 + 2));
}

/// SDM Vol. 2A `INT n`: not present → #NP(vector·8+2); beyond the IDT limit or a
/// type other than a 64-bit interrupt/trap gate → #GP(vector·8+2).
#[test]
fn idt_checks() {
    let (mut m, mut cpu) = machine();
    set_gate(&mut m, 0x42, gate_bytes(HANDLER, 0x08, 0, 0xE, 0, false));
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x42,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!((f.vector(), f.error_code()), (11, 0x42 * 8 + 2));
    set_gate(&mut m, 0x43, gate_bytes(HANDLER, 0x08, 0, 0xC, 0, true)); // call gate
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x43,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(f, Fault::Gp(0x43 * 8 + 2));
    cpu.idt.limit = 0x43 * 16 + 14; // one byte short of gate 0x43
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x43,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(f, Fault::Gp(0x43 * 8 + 2));
}

/// SDM Vol. 2A `INT n`, TRAP-OR-INTERRUPT-GATE: null selector → #GP(0); a data
/// segment → #GP(selector); a 32-bit code segment in IA-32e mode → #GP(selector);
/// outside the GDT → #GP(selector); non-canonical handler → #GP(0).
#[test]
fn target_segment_checks() {
    let (mut m, cpu) = machine();
    let cases = [
        (gate_bytes(HANDLER, 0x00, 0, 0xE, 0, true), Fault::Gp(0)),
        (gate_bytes(HANDLER, 0x10, 0, 0xE, 0, true), Fault::Gp(0x10)),
        (gate_bytes(HANDLER, 0x18, 0, 0xE, 0, true), Fault::Gp(0x18)),
        (gate_bytes(HANDLER, 0x48, 0, 0xE, 0, true), Fault::Gp(0x48)),
        (
            gate_bytes(0x0000_8000_0000_0000, 0x08, 0, 0xE, 0, true),
            Fault::Gp(0),
        ),
    ];
    for (g, want) in cases {
        set_gate(&mut m, 0x44, g);
        let f = faulted(deliver(
            &cpu,
            SoftInt {
                vector: 0x44,
                len: 2,
            },
            &mut m,
        ));
        assert_eq!(f, want);
    }
}

/// A stack page that is not mapped → #PF with W set at the address of the push that
/// faults; pushes go highest first (SS, RSP, RFLAGS, CS, RIP: SDM Vol. 3A §6.14.2), so
/// those above the hole are written, those below are not.
#[test]
fn unmapped_stack_is_page_fault_at_the_faulting_push() {
    let (mut m, mut cpu) = machine();
    set_gate(&mut m, 0x45, gate_bytes(HANDLER, 0x08, 0, 0xE, 0, true));
    // The frame spans 0x7FB8..0x7FE0, all in page 7: the first push (SS) faults.
    m.holes.push(7);
    let before = m.mem.clone();
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x45,
            len: 2,
        },
        &mut m,
    ));
    let want = Fault::Pf {
        addr: 0x7FD8,
        code: PF_WRITE,
    };
    assert_eq!(f, want);
    assert_eq!(m.mem, before);
    // RSP 0x8010: SS and RSP land in page 8, RFLAGS at 0x7FF8 faults.
    cpu.rsp = 0x8010;
    let f = faulted(deliver(
        &cpu,
        SoftInt {
            vector: 0x45,
            len: 2,
        },
        &mut m,
    ));
    let want = Fault::Pf {
        addr: 0x7FF8,
        code: PF_WRITE,
    };
    assert_eq!(f, want);
    assert_eq!(m.u64_at(0x8008), 0x10, "SS pushed");
    assert_eq!(m.u64_at(0x8000), 0x8010, "RSP pushed");
}

/// Compatibility mode: the pushed RIP is the 32-bit EIP after the instruction.
#[test]
fn compatibility_mode_return_address_wraps() {
    let (mut m, mut cpu) = machine();
    cpu.cs = segment_from_descriptor(0x00CF_9B00_0000_FFFF, 0x18);
    cpu.rip = 0xFFFF_FFFF;
    set_gate(&mut m, 0x46, gate_bytes(HANDLER, 0x08, 0, 0xE, 0, true));
    let e = entered(deliver(
        &cpu,
        SoftInt {
            vector: 0x46,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(m.u64_at(e.rsp), 1);
}

/// 32-bit protected mode, same level (SDM Vol. 3A Figure 6-4): EFLAGS, CS, EIP on
/// SS:ESP, no alignment.
#[test]
fn legacy_32bit_same_level() {
    let (mut m, mut cpu) = machine();
    cpu.efer = 0;
    cpu.cr4 = 0;
    cpu.cs = segment_from_descriptor(0x00CF_9B00_0000_FFFF, 0x18);
    cpu.rip = 0x1_0000;
    cpu.rsp = STACK - 2;
    let mut g = [0u8; 8];
    g[0..2].copy_from_slice(&0x2345u16.to_le_bytes());
    g[2..4].copy_from_slice(&0x18u16.to_le_bytes());
    g[5] = 0x8E;
    let a = (IDT + 8 * 0x50) as usize;
    m.mem[a..a + 8].copy_from_slice(&g);
    let e = entered(deliver(
        &cpu,
        SoftInt {
            vector: 0x50,
            len: 2,
        },
        &mut m,
    ));
    assert_eq!(e.rsp, STACK - 14);
    let at = |o: u64| u32::from_le_bytes(m.mem[o as usize..o as usize + 4].try_into().unwrap());
    assert_eq!(at(e.rsp), 0x1_0002);
    assert_eq!(at(e.rsp + 4), 0x18);
    assert_eq!(at(e.rsp + 8), cpu.rflags as u32);
    assert_eq!(e.rip, 0x2345);
    assert_eq!(e.rflags & RFLAGS_IF, 0);
}

#[test]
fn real_mode_is_not_ours() {
    let (mut m, mut cpu) = machine();
    cpu.cr0 = 0;
    assert_eq!(
        deliver(&cpu, SoftInt { vector: 3, len: 1 }, &mut m),
        Err(Unsupported::NotProtectedMode)
    );
}

proptest! {
    /// The 16-byte gate decoder reads back what was encoded (SDM Vol. 3A Figure 6-8).
    #[test]
    fn gate64_roundtrip(off in any::<u64>(), sel in any::<u16>(), ist in 0u8..8,
                        ty in 0u8..16, dpl in 0u8..4, p in any::<bool>()) {
        let g = gate64(&gate_bytes(off, sel, ist, ty, dpl, p));
        prop_assert_eq!(g, Gate { offset: off, selector: sel, ist, type_: ty, dpl, present: p });
    }

    /// Hostile IDT, GDT and TSS contents and any register values never panic; an
    /// entered handler always gets a 16-byte aligned frame (RSP ≡ 8 mod 16 after
    /// five pushes) holding the address after the instruction, with TF/NT/RF clear.
    #[test]
    fn hostile_tables_never_panic(
        idt in proptest::collection::vec(any::<u8>(), 16 * 4),
        gdt in proptest::collection::vec(any::<u8>(), 64),
        tss in proptest::collection::vec(any::<u8>(), 0x68),
        vector in 0u8..4, len in 1u8..3,
        rsp in any::<u64>(), rip in any::<u64>(), cs_sel in any::<u16>(),
        idt_limit in any::<u16>(), gdt_limit in any::<u16>(), tr_limit in any::<u32>(),
        efer in prop_oneof![Just(0u64), Just(0x500u64)], l in any::<bool>(), db in any::<bool>(),
    ) {
        let (mut m, mut cpu) = machine();
        m.mem[IDT as usize..IDT as usize + idt.len()].copy_from_slice(&idt);
        m.mem[GDT as usize..GDT as usize + gdt.len()].copy_from_slice(&gdt);
        m.mem[TSS as usize..TSS as usize + tss.len()].copy_from_slice(&tss);
        cpu.rsp = rsp;
        cpu.rip = rip;
        cpu.cs.selector = cs_sel;
        cpu.cs.l = l;
        cpu.cs.db = db;
        cpu.idt.limit = idt_limit;
        cpu.gdt.limit = gdt_limit;
        cpu.tr.limit = tr_limit;
        cpu.efer = efer;
        let si = SoftInt { vector, len };
        if let Ok(Outcome::Entered(e)) = deliver(&cpu, si, &mut m) {
            prop_assert_eq!(e.rflags & (RFLAGS_TF | RFLAGS_NT | RFLAGS_RF), 0);
            if efer != 0 {
                prop_assert_eq!(e.rsp % 16, 8);
                let pushed = m.u64_at(e.rsp);
                prop_assert_eq!(pushed, return_ip(&cpu, si, l));
            }
        }
    }
}
