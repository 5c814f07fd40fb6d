//! Software-interrupt delivery as the CPU performs it, without KVM: instruction
//! decoding, IDT gate and code-segment checks, stack choice and the frame pushed.
//!
//! Follows Intel SDM Vol. 3A §6.12 ("Exception and Interrupt Handling") and §6.14
//! ("Exception and Interrupt Handling in 64-bit Mode"), and the `INT n/INTO/INT3`
//! pseudocode of SDM Vol. 2A, for IA-32e mode (64-bit and compatibility mode) and
//! 32-bit protected mode (same privilege level only). Guest memory is reached
//! through [`LinearMemory`]; every value read from it is checked, nothing here can
//! panic on hostile IDT, GDT or TSS contents. A fault the delivery raises is
//! delivered the same way (error code pushed, RIP on the instruction), a fault during
//! that one as SDM Vol. 3A Table 6-5 says (serially, or #DF), and a fault while
//! delivering #DF is a shutdown.

pub use super::fault::Fault;
pub use super::tables::{
    canonical, gate32, gate64, segment_from_descriptor, Gate, Segment, TableReg,
};

/// The vCPU state a delivery reads.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CpuState {
    /// RIP of the `int` instruction.
    pub rip: u64,
    /// RSP.
    pub rsp: u64,
    /// RFLAGS.
    pub rflags: u64,
    /// CS.
    pub cs: Segment,
    /// SS.
    pub ss: Segment,
    /// TR (the current TSS).
    pub tr: Segment,
    /// LDTR.
    pub ldt: Segment,
    /// GDTR.
    pub gdt: TableReg,
    /// IDTR.
    pub idt: TableReg,
    /// CR0.
    pub cr0: u64,
    /// CR4.
    pub cr4: u64,
    /// IA32_EFER.
    pub efer: u64,
}

/// Why a linear access failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AccessError {
    /// The linear address has no valid translation: a page fault at this address.
    NotMapped(u64),
    /// It translates to a guest-physical address that is not RAM (MMIO, a hole).
    NotRam(u64),
}

/// Guest memory by linear address (the guest's paging applied).
pub trait LinearMemory {
    /// Reads `buf.len()` bytes at linear `addr` (may cross pages).
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), AccessError>;
    /// Writes `data` at linear `addr` (may cross pages); writes nothing unless every
    /// byte can be written.
    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), AccessError>;
}

/// A software-interrupt instruction.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftInt {
    /// The vector: 3 for `int3`, `n` for `int n`.
    pub vector: u8,
    /// The instruction length (1 or 2).
    pub len: u8,
}

/// Decodes `CC` (`int3`) or `CD nn` (`int nn`) at the start of `bytes`. No prefixes:
/// they change nothing for these instructions in the modes handled, and an
/// instruction with one is left to the crash report.
pub fn decode(bytes: &[u8]) -> Option<SoftInt> {
    match bytes {
        [0xCC, ..] => Some(SoftInt { vector: 3, len: 1 }),
        [0xCD, n, ..] => Some(SoftInt { vector: *n, len: 2 }),
        _ => None,
    }
}

/// The registers after a successful delivery (the frame is already in memory).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// The handler address.
    pub rip: u64,
    /// RSP after the pushes.
    pub rsp: u64,
    /// RFLAGS for the handler.
    pub rflags: u64,
    /// CS loaded from the gate selector and its descriptor.
    pub cs: Segment,
    /// SS when it changes (a privilege change), else `None`.
    pub ss: Option<Segment>,
    /// CR2 when a #PF was raised on the way.
    pub cr2: Option<u64>,
}

/// What the delivery came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The interrupt's handler is entered with these registers.
    Entered(Entry),
    /// The delivery faulted; the handler of this exception (the last one raised,
    /// possibly #DF) is entered instead, RIP pushed = the `int` instruction.
    Faulted(Fault, Entry),
    /// A fault while delivering #DF: the CPU shuts down (triple fault).
    Shutdown,
}

/// Why a delivery was not attempted (the caller keeps its crash report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Unsupported {
    /// CR4.FRED is set: events are delivered the FRED way, which this does not do.
    Fred,
    /// Real mode or virtual-8086 mode (KVM's emulator handles real mode itself).
    NotProtectedMode,
    /// 32-bit protected mode through a task gate, a 16-bit gate or to another
    /// privilege level.
    Legacy32,
    /// A descriptor table, TSS or the stack is not in RAM.
    NotRam(u64),
}

const RFLAGS_TF: u64 = 1 << 8;
const RFLAGS_IF: u64 = 1 << 9;
const RFLAGS_NT: u64 = 1 << 14;
const RFLAGS_RF: u64 = 1 << 16;
const RFLAGS_VM: u64 = 1 << 17;
const CR0_PE: u64 = 1;
const CR4_LA57: u64 = 1 << 12;
const CR4_FRED: u64 = 1 << 32;
const EFER_LMA: u64 = 1 << 10;
/// #PF error code bit: write access.
pub const PF_WRITE: u32 = 1 << 1;

/// Gate types (SDM Vol. 3A Table 3-2): IA-32e mode has only the 64-bit ones.
const GATE_INT32: u8 = 0xE;
const GATE_TRAP32: u8 = 0xF;

/// One event to deliver: the software interrupt, or an exception raised on the way.
#[derive(Clone, Copy, Debug)]
struct Event {
    vector: u8,
    /// `int n` / `int3`: the gate DPL is checked, RIP pushed is after the
    /// instruction (`len` bytes), and error codes carry EXT = 0.
    soft: bool,
    len: u8,
    error: Option<u32>,
}

impl Event {
    fn soft(si: SoftInt) -> Self {
        Event {
            vector: si.vector,
            soft: true,
            len: si.len,
            error: None,
        }
    }

    fn fault(f: Fault) -> Self {
        Event {
            vector: f.vector(),
            soft: false,
            len: 0,
            error: Some(f.error_code()),
        }
    }

    /// The EXT bit of error codes raised while delivering this event (SDM Vol. 3A
    /// §6.13): set for an exception, clear for a software interrupt.
    fn ext(self) -> u16 {
        u16::from(!self.soft)
    }

    /// RFLAGS as pushed: a fault-class exception pushes RF = 1 (SDM Vol. 3B
    /// §17.3.1.1; KVM does the same when it injects a fault); #DF is an abort and
    /// the software interrupt a trap, both push RFLAGS as they are.
    fn pushed_rflags(self, rflags: u64) -> u64 {
        if self.soft || self.vector == 8 {
            rflags
        } else {
            rflags | RFLAGS_RF
        }
    }
}

/// A descriptor's error-code form: selector with RPL cleared, plus EXT.
fn sel_err(sel: u16, ext: u16) -> u16 {
    (sel & 0xFFFC) | ext
}

/// The IDT error code of `vector` (IDT bit set, SDM Vol. 3A §6.13), plus EXT.
fn idt_err(vector: u8, ext: u16) -> u16 {
    (u16::from(vector) << 3) | 2 | ext
}

/// A read fault: a page fault becomes #PF (supervisor read of a not-present page),
/// memory that is not RAM ends the attempt.
fn read_fault(e: AccessError) -> Result<Fault, Unsupported> {
    match e {
        AccessError::NotMapped(addr) => Ok(Fault::Pf { addr, code: 0 }),
        AccessError::NotRam(a) => Err(Unsupported::NotRam(a)),
    }
}

/// Either a fault to raise or a reason not to deliver at all.
type Step<T> = Result<T, Result<Fault, Unsupported>>;

fn read<M: LinearMemory, const N: usize>(mem: &mut M, addr: u64) -> Step<[u8; N]> {
    let mut b = [0u8; N];
    mem.read(addr, &mut b).map_err(read_fault)?;
    Ok(b)
}

/// Pushes `words` (lowest address first) onto the stack whose new top is `at`, in
/// the CPU's order: the highest first. A push that faults stops the delivery with
/// #PF at that push's address; the pushes above it stay written, as on hardware.
fn push<M: LinearMemory, const W: usize>(mem: &mut M, at: u64, words: &[[u8; W]]) -> Step<()> {
    for (i, w) in words.iter().enumerate().rev() {
        let addr = at.wrapping_add((i * W) as u64);
        mem.write(addr, w).map_err(|e| match e {
            AccessError::NotMapped(_) => Ok(Fault::Pf {
                addr,
                code: PF_WRITE,
            }),
            AccessError::NotRam(a) => Err(Unsupported::NotRam(a)),
        })?;
    }
    Ok(())
}

/// Delivers software interrupt `si` found at `cpu.rip`: checks, pushes the frame
/// through `mem` and returns the handler's registers; a fault on the way is
/// delivered in turn (Table 6-5), up to a shutdown.
pub fn deliver<M: LinearMemory>(
    cpu: &CpuState,
    si: SoftInt,
    mem: &mut M,
) -> Result<Outcome, Unsupported> {
    if cpu.cr0 & CR0_PE == 0 || cpu.rflags & RFLAGS_VM != 0 {
        return Err(Unsupported::NotProtectedMode);
    }
    if cpu.cr4 & CR4_FRED != 0 {
        return Err(Unsupported::Fred);
    }
    let mut fault = match deliver_one(cpu, Event::soft(si), mem) {
        Ok(e) => return Ok(Outcome::Entered(e)),
        Err(Ok(f)) => f,
        Err(Err(u)) => return Err(u),
    };
    let mut cr2 = None;
    // At most: the first fault, a serial #PF, #DF, then shutdown.
    for _ in 0..4 {
        if let Fault::Pf { addr, .. } = fault {
            cr2 = Some(addr);
        }
        match deliver_one(cpu, Event::fault(fault), mem) {
            Ok(mut e) => {
                e.cr2 = cr2;
                return Ok(Outcome::Faulted(fault, e));
            }
            Err(Ok(next)) => match fault.then(next) {
                Some(f) => fault = f,
                None => return Ok(Outcome::Shutdown),
            },
            Err(Err(u)) => return Err(u),
        }
    }
    Ok(Outcome::Shutdown)
}

fn deliver_one<M: LinearMemory>(cpu: &CpuState, ev: Event, mem: &mut M) -> Step<Entry> {
    if cpu.efer & EFER_LMA != 0 {
        deliver_ia32e(cpu, ev, mem)
    } else {
        deliver_legacy(cpu, ev, mem)
    }
}

/// The current privilege level: CS.RPL (SDM Vol. 3A §5.5).
fn cpl(cpu: &CpuState) -> u8 {
    (cpu.cs.selector & 3) as u8
}

/// Reads the gate of `ev` and applies the checks common to both modes: IDT limit,
/// gate type, DPL against CPL for software interrupts only, present (SDM Vol. 2A
/// `INT n` pseudocode, in that order).
fn read_gate<M: LinearMemory>(cpu: &CpuState, ev: Event, mem: &mut M, wide: bool) -> Step<Gate> {
    let size: u64 = if wide { 16 } else { 8 };
    let off = u64::from(ev.vector) * size;
    let err = idt_err(ev.vector, ev.ext());
    if off + size - 1 > u64::from(cpu.idt.limit) {
        return Err(Ok(Fault::Gp(err)));
    }
    let addr = cpu.idt.base.wrapping_add(off);
    let gate = if wide {
        gate64(&read::<M, 16>(mem, addr)?)
    } else {
        gate32(&read::<M, 8>(mem, addr)?)
    };
    let ok_type = if wide {
        matches!(gate.type_, GATE_INT32 | GATE_TRAP32)
    } else {
        // 16- and 32-bit interrupt and trap gates, and task gates (refused later).
        matches!(gate.type_, 0x5 | 0x6 | 0x7 | GATE_INT32 | GATE_TRAP32)
    };
    if !ok_type || (ev.soft && gate.dpl < cpl(cpu)) {
        return Err(Ok(Fault::Gp(err)));
    }
    if !gate.present {
        return Err(Ok(Fault::Np(err)));
    }
    Ok(gate)
}

/// Reads and checks the gate's target code segment (SDM Vol. 2A `INT n`,
/// TRAP-OR-INTERRUPT-GATE): null → #GP(EXT), outside its table → #GP(sel), not code
/// or DPL > CPL → #GP(sel), not present → #NP(sel).
fn target_cs<M: LinearMemory>(cpu: &CpuState, sel: u16, ext: u16, mem: &mut M) -> Step<Segment> {
    if sel & 0xFFFC == 0 {
        return Err(Ok(Fault::Gp(ext)));
    }
    let (base, limit) = if sel & 4 != 0 {
        if cpu.ldt.unusable || !cpu.ldt.present {
            return Err(Ok(Fault::Gp(sel_err(sel, ext))));
        }
        (cpu.ldt.base, u64::from(cpu.ldt.limit))
    } else {
        (cpu.gdt.base, u64::from(cpu.gdt.limit))
    };
    let off = u64::from(sel & 0xFFF8);
    if off + 7 > limit {
        return Err(Ok(Fault::Gp(sel_err(sel, ext))));
    }
    let desc = u64::from_le_bytes(read::<M, 8>(mem, base.wrapping_add(off))?);
    let seg = segment_from_descriptor(desc, sel);
    if !seg.s || seg.type_ & 8 == 0 || seg.dpl > cpl(cpu) {
        return Err(Ok(Fault::Gp(sel_err(sel, ext))));
    }
    if !seg.present {
        return Err(Ok(Fault::Np(sel_err(sel, ext))));
    }
    Ok(seg)
}

/// RFLAGS for the handler: TF, NT, RF, VM cleared; IF too through an interrupt gate
/// (SDM Vol. 3A §6.12.1.3).
fn handler_rflags(rflags: u64, gate_type: u8) -> u64 {
    let mut f = rflags & !(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if gate_type & 1 == 0 {
        f &= !RFLAGS_IF;
    }
    f
}

/// The RIP pushed: after the instruction for the software interrupt, on it for a
/// fault; wrapped to the code segment's operand size outside 64-bit mode.
fn return_ip(cpu: &CpuState, len: u8, long: bool) -> u64 {
    let next = cpu.rip.wrapping_add(u64::from(len));
    if long {
        next
    } else if cpu.cs.db {
        next & 0xFFFF_FFFF
    } else {
        next & 0xFFFF
    }
}

/// IA-32e mode (64-bit and compatibility mode): SDM Vol. 3A §6.14.
fn deliver_ia32e<M: LinearMemory>(cpu: &CpuState, ev: Event, mem: &mut M) -> Step<Entry> {
    let la57 = cpu.cr4 & CR4_LA57 != 0;
    let ext = ev.ext();
    let gate = read_gate(cpu, ev, mem, true)?;
    let target = target_cs(cpu, gate.selector, ext, mem)?;
    // §6.14.1: the target must be a 64-bit code segment (L = 1, D = 0); the error
    // code used is the selector's, as for the other checks on the target segment.
    if !target.l || target.db {
        return Err(Ok(Fault::Gp(sel_err(gate.selector, ext))));
    }
    let cur = cpl(cpu);
    let conforming = target.type_ & 4 != 0;
    let new_cpl = if conforming { cur } else { target.dpl };
    let change = new_cpl < cur;
    // §6.14.4/§6.14.5: IST n, or RSPn of the new privilege level, from the 64-bit TSS.
    let tss_slot = if gate.ist != 0 {
        Some(u64::from(gate.ist) * 8 + 28)
    } else if change {
        Some(u64::from(new_cpl) * 8 + 4)
    } else {
        None
    };
    let new_rsp = match tss_slot {
        Some(off) => {
            if off + 7 > u64::from(cpu.tr.limit) || cpu.tr.unusable {
                return Err(Ok(Fault::Ts(sel_err(cpu.tr.selector, ext))));
            }
            u64::from_le_bytes(read::<M, 8>(mem, cpu.tr.base.wrapping_add(off))?)
        }
        None => cpu.rsp,
    };
    if !canonical(new_rsp, la57) {
        return Err(Ok(Fault::Ss(ext)));
    }
    if !canonical(gate.offset, la57) {
        return Err(Ok(Fault::Gp(ext)));
    }
    // §6.14.2: the new stack is 16-byte aligned, then SS, RSP, RFLAGS, CS, RIP and
    // the error code if any.
    let mut words = [0u64; 6];
    let body = [
        return_ip(cpu, ev.len, cpu.cs.l),
        u64::from(cpu.cs.selector),
        ev.pushed_rflags(cpu.rflags),
        cpu.rsp,
        u64::from(cpu.ss.selector),
    ];
    let words = match ev.error {
        Some(e) => {
            words[0] = u64::from(e);
            words[1..].copy_from_slice(&body);
            &words[..]
        }
        None => {
            words[..5].copy_from_slice(&body);
            &words[..5]
        }
    };
    let frame_rsp = (new_rsp & !0xF).wrapping_sub(8 * words.len() as u64);
    if !canonical(frame_rsp, la57) {
        return Err(Ok(Fault::Ss(ext)));
    }
    let bytes: Vec<[u8; 8]> = words.iter().map(|w| w.to_le_bytes()).collect();
    push(mem, frame_rsp, &bytes)?;
    let mut cs = target;
    cs.selector = (gate.selector & 0xFFFC) | u16::from(new_cpl);
    cs.type_ |= 1; // accessed
    let ss = change.then(|| null_ss(new_cpl));
    Ok(Entry {
        rip: gate.offset,
        rsp: frame_rsp,
        rflags: handler_rflags(cpu.rflags, gate.type_),
        cs,
        ss,
        cr2: None,
    })
}

/// The SS of an IA-32e privilege change: a null selector with RPL = the new CPL
/// (§6.14.4), held as KVM holds one (an expand-up writable data segment whose DPL
/// is the CPL, which KVM reads from SS.DPL).
fn null_ss(cpl: u8) -> Segment {
    Segment {
        base: 0,
        limit: u32::MAX,
        selector: u16::from(cpl),
        type_: 3,
        present: true,
        dpl: cpl,
        db: true,
        s: true,
        l: false,
        g: true,
        avl: false,
        unusable: false,
    }
}

/// 32-bit protected mode, same privilege level, 32-bit interrupt or trap gate
/// (SDM Vol. 3A §6.12.1, Figure 6-4 "no privilege-level change"): EFLAGS, CS, EIP
/// and the error code if any pushed on SS:ESP.
fn deliver_legacy<M: LinearMemory>(cpu: &CpuState, ev: Event, mem: &mut M) -> Step<Entry> {
    let ext = ev.ext();
    let gate = read_gate(cpu, ev, mem, false)?;
    if !matches!(gate.type_, GATE_INT32 | GATE_TRAP32) {
        return Err(Err(Unsupported::Legacy32));
    }
    let target = target_cs(cpu, gate.selector, ext, mem)?;
    let cur = cpl(cpu);
    let conforming = target.type_ & 4 != 0;
    if !conforming && target.dpl < cur {
        return Err(Err(Unsupported::Legacy32));
    }
    if gate.offset > u64::from(target.limit) {
        return Err(Ok(Fault::Gp(ext)));
    }
    if !cpu.ss.db || cpu.ss.type_ & 4 != 0 {
        // 16-bit or expand-down stack segment.
        return Err(Err(Unsupported::Legacy32));
    }
    let body = [
        return_ip(cpu, ev.len, false) as u32,
        u32::from(cpu.cs.selector),
        ev.pushed_rflags(cpu.rflags) as u32,
    ];
    let mut words = [0u32; 4];
    let words = match ev.error {
        Some(e) => {
            words[0] = e;
            words[1..].copy_from_slice(&body);
            &words[..]
        }
        None => {
            words[..3].copy_from_slice(&body);
            &words[..3]
        }
    };
    let size = 4 * words.len() as u64;
    let esp = cpu.rsp & 0xFFFF_FFFF;
    // The pushes must lie inside the (expand-up) stack segment.
    if esp < size || esp - 1 > u64::from(cpu.ss.limit) {
        return Err(Ok(Fault::Ss(ext)));
    }
    let new_esp = esp - size;
    let linear = cpu.ss.base.wrapping_add(new_esp) & 0xFFFF_FFFF;
    let bytes: Vec<[u8; 4]> = words.iter().map(|w| w.to_le_bytes()).collect();
    push(mem, linear, &bytes)?;
    let mut cs = target;
    cs.selector = (gate.selector & 0xFFFC) | u16::from(cur);
    cs.type_ |= 1;
    Ok(Entry {
        rip: gate.offset,
        rsp: (cpu.rsp & !0xFFFF_FFFF) | new_esp,
        rflags: handler_rflags(cpu.rflags, gate.type_),
        cs,
        ss: None,
        cr2: None,
    })
}

#[cfg(test)]
#[path = "delivery_tests.rs"]
mod tests;
