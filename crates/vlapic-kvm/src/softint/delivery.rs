//! Software-interrupt delivery as the CPU performs it, without KVM: instruction
//! decoding, IDT gate and code-segment checks, stack choice and the frame pushed.
//!
//! Follows Intel SDM Vol. 3A §6.12 ("Exception and Interrupt Handling") and §6.14
//! ("Exception and Interrupt Handling in 64-bit Mode"), and the `INT n/INTO/INT3`
//! pseudocode of SDM Vol. 2A, for IA-32e mode (64-bit and compatibility mode) and
//! 32-bit protected mode (same privilege level only). Guest memory is reached
//! through [`LinearMemory`]; every value read from it is checked, nothing here can
//! panic on hostile IDT, GDT or TSS contents.

/// A segment register with its hidden part (the fields of KVM's `kvm_segment`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Limit in bytes (already scaled by the granularity).
    pub limit: u32,
    /// Selector.
    pub selector: u16,
    /// Type field (4 bits).
    pub type_: u8,
    /// Present.
    pub present: bool,
    /// Descriptor privilege level.
    pub dpl: u8,
    /// Default operation size (D/B).
    pub db: bool,
    /// Code or data segment (S = 1) rather than a system segment.
    pub s: bool,
    /// 64-bit code segment (L).
    pub l: bool,
    /// Granularity.
    pub g: bool,
    /// Available bit.
    pub avl: bool,
    /// Not usable (a null selector was loaded).
    pub unusable: bool,
}

/// A descriptor-table register (GDTR, IDTR).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TableReg {
    /// Linear base address.
    pub base: u64,
    /// Limit (last valid byte offset).
    pub limit: u16,
}

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

/// An exception the delivery raises instead (the `int` instruction then faults: RIP
/// stays on it).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// #GP with this error code.
    Gp(u16),
    /// #NP with this error code.
    Np(u16),
    /// #SS with this error code.
    Ss(u16),
    /// #TS with this error code.
    Ts(u16),
    /// #PF at this linear address with this error code.
    Pf {
        /// CR2.
        addr: u64,
        /// Error code (P, W/R, U/S, ...).
        code: u32,
    },
}

impl Fault {
    /// The exception vector.
    pub fn vector(self) -> u8 {
        match self {
            Fault::Ts(_) => 10,
            Fault::Np(_) => 11,
            Fault::Ss(_) => 12,
            Fault::Gp(_) => 13,
            Fault::Pf { .. } => 14,
        }
    }

    /// The error code pushed with it.
    pub fn error_code(self) -> u32 {
        match self {
            Fault::Gp(c) | Fault::Np(c) | Fault::Ss(c) | Fault::Ts(c) => u32::from(c),
            Fault::Pf { code, .. } => code,
        }
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
}

/// What the delivery came to.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The handler is entered with these registers.
    Entered(Entry),
    /// The instruction faults with this exception instead.
    Faulted(Fault),
}

/// Why a delivery was not attempted (the caller keeps its crash report).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unsupported {
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
const EFER_LMA: u64 = 1 << 10;
/// #PF error code bit: write access.
pub const PF_WRITE: u32 = 1 << 1;

/// Gate types (SDM Vol. 3A Table 3-2): IA-32e mode has only the 64-bit ones.
const GATE_INT32: u8 = 0xE;
const GATE_TRAP32: u8 = 0xF;

/// Whether `addr` is canonical for 48-bit (or 57-bit with CR4.LA57) linear addresses.
pub fn canonical(addr: u64, la57: bool) -> bool {
    let bits = if la57 { 57 } else { 48 };
    let top = (addr as i64) >> (bits - 1);
    top == 0 || top == -1
}

/// A descriptor's error-code form: selector with RPL cleared (EXT = 0, IDT = 0).
fn sel_err(sel: u16) -> u16 {
    sel & 0xFFFC
}

/// The IDT error code of `vector` (IDT bit set, SDM Vol. 3A §6.13).
fn idt_err(vector: u8) -> u16 {
    (u16::from(vector) << 3) | 2
}

/// A read fault: a page fault becomes #PF (supervisor read of a not-present page),
/// memory that is not RAM ends the attempt.
fn read_fault(e: AccessError) -> Result<Fault, Unsupported> {
    match e {
        AccessError::NotMapped(addr) => Ok(Fault::Pf { addr, code: 0 }),
        AccessError::NotRam(a) => Err(Unsupported::NotRam(a)),
    }
}

fn write_fault(e: AccessError) -> Result<Fault, Unsupported> {
    match e {
        AccessError::NotMapped(addr) => Ok(Fault::Pf {
            addr,
            code: PF_WRITE,
        }),
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
fn push<M: LinearMemory, const W: usize, const N: usize>(
    mem: &mut M,
    at: u64,
    words: &[[u8; W]; N],
) -> Step<()> {
    for (i, w) in words.iter().enumerate().rev() {
        let addr = at.wrapping_add((i * W) as u64);
        mem.write(addr, w).map_err(|e| match e {
            AccessError::NotMapped(_) => write_fault(AccessError::NotMapped(addr)),
            other => write_fault(other),
        })?;
    }
    Ok(())
}

/// Decodes an 8-byte code/data segment descriptor into a [`Segment`] for `selector`.
pub fn segment_from_descriptor(desc: u64, selector: u16) -> Segment {
    let raw_limit = (desc & 0xFFFF) | ((desc >> 32) & 0xF_0000);
    let g = desc & (1 << 55) != 0;
    let limit = if g {
        (raw_limit << 12) | 0xFFF
    } else {
        raw_limit
    };
    Segment {
        base: ((desc >> 16) & 0xFF_FFFF) | ((desc >> 32) & 0xFF00_0000),
        limit: u32::try_from(limit).unwrap_or(u32::MAX),
        selector,
        type_: ((desc >> 40) & 0xF) as u8,
        present: desc & (1 << 47) != 0,
        dpl: ((desc >> 45) & 3) as u8,
        db: desc & (1 << 54) != 0,
        s: desc & (1 << 44) != 0,
        l: desc & (1 << 53) != 0,
        g,
        avl: desc & (1 << 52) != 0,
        unusable: false,
    }
}

/// An IDT gate (either format), decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Gate {
    /// Handler offset.
    pub offset: u64,
    /// Code-segment selector.
    pub selector: u16,
    /// IST index (IA-32e mode; 0 = none).
    pub ist: u8,
    /// Type (4 bits).
    pub type_: u8,
    /// DPL.
    pub dpl: u8,
    /// Present.
    pub present: bool,
}

/// Decodes a 16-byte IA-32e mode gate (SDM Vol. 3A Figure 6-8).
pub fn gate64(b: &[u8; 16]) -> Gate {
    let lo = u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]);
    let hi = u32::from_le_bytes([b[8], b[9], b[10], b[11]]);
    Gate {
        offset: (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000) | (u64::from(hi) << 32),
        selector: ((lo >> 16) & 0xFFFF) as u16,
        ist: (b[4] & 7),
        type_: b[5] & 0xF,
        dpl: (b[5] >> 5) & 3,
        present: b[5] & 0x80 != 0,
    }
}

/// Decodes an 8-byte protected-mode gate (SDM Vol. 3A Figure 6-2).
pub fn gate32(b: &[u8; 8]) -> Gate {
    let lo = u64::from_le_bytes(*b);
    Gate {
        offset: (lo & 0xFFFF) | ((lo >> 32) & 0xFFFF_0000),
        selector: ((lo >> 16) & 0xFFFF) as u16,
        ist: 0,
        type_: b[5] & 0xF,
        dpl: (b[5] >> 5) & 3,
        present: b[5] & 0x80 != 0,
    }
}

/// Delivers software interrupt `si` found at `cpu.rip`: checks, pushes the frame
/// through `mem` and returns the handler's registers, or the fault to raise.
pub fn deliver<M: LinearMemory>(
    cpu: &CpuState,
    si: SoftInt,
    mem: &mut M,
) -> Result<Outcome, Unsupported> {
    if cpu.cr0 & CR0_PE == 0 || cpu.rflags & RFLAGS_VM != 0 {
        return Err(Unsupported::NotProtectedMode);
    }
    let res = if cpu.efer & EFER_LMA != 0 {
        deliver_ia32e(cpu, si, mem)
    } else {
        deliver_legacy(cpu, si, mem)
    };
    match res {
        Ok(e) => Ok(Outcome::Entered(e)),
        Err(Ok(f)) => Ok(Outcome::Faulted(f)),
        Err(Err(u)) => Err(u),
    }
}

/// The current privilege level: CS.RPL (SDM Vol. 3A §5.5).
fn cpl(cpu: &CpuState) -> u8 {
    (cpu.cs.selector & 3) as u8
}

/// Reads the gate of `vector` and applies the checks common to both modes:
/// IDT limit, gate type, DPL against CPL for software interrupts, present (SDM
/// Vol. 2A `INT n` pseudocode, in that order).
fn read_gate<M: LinearMemory>(cpu: &CpuState, vector: u8, mem: &mut M, wide: bool) -> Step<Gate> {
    let size: u64 = if wide { 16 } else { 8 };
    let off = u64::from(vector) * size;
    if off + size - 1 > u64::from(cpu.idt.limit) {
        return Err(Ok(Fault::Gp(idt_err(vector))));
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
        // 16- and 32-bit interrupt and trap gates, and task gates (refused below).
        matches!(gate.type_, 0x5 | 0x6 | 0x7 | GATE_INT32 | GATE_TRAP32)
    };
    if !ok_type {
        return Err(Ok(Fault::Gp(idt_err(vector))));
    }
    if gate.dpl < cpl(cpu) {
        return Err(Ok(Fault::Gp(idt_err(vector))));
    }
    if !gate.present {
        return Err(Ok(Fault::Np(idt_err(vector))));
    }
    Ok(gate)
}

/// Reads and checks the gate's target code segment (SDM Vol. 2A `INT n`,
/// TRAP-OR-INTERRUPT-GATE): null → #GP(0), outside its table → #GP(sel), not code or
/// DPL > CPL → #GP(sel), not present → #NP(sel).
fn target_cs<M: LinearMemory>(cpu: &CpuState, sel: u16, mem: &mut M) -> Step<Segment> {
    if sel & 0xFFFC == 0 {
        return Err(Ok(Fault::Gp(0)));
    }
    let (base, limit) = if sel & 4 != 0 {
        if cpu.ldt.unusable || !cpu.ldt.present {
            return Err(Ok(Fault::Gp(sel_err(sel))));
        }
        (cpu.ldt.base, u64::from(cpu.ldt.limit))
    } else {
        (cpu.gdt.base, u64::from(cpu.gdt.limit))
    };
    let off = u64::from(sel & 0xFFF8);
    if off + 7 > limit {
        return Err(Ok(Fault::Gp(sel_err(sel))));
    }
    let desc = u64::from_le_bytes(read::<M, 8>(mem, base.wrapping_add(off))?);
    let seg = segment_from_descriptor(desc, sel);
    if !seg.s || seg.type_ & 8 == 0 || seg.dpl > cpl(cpu) {
        return Err(Ok(Fault::Gp(sel_err(sel))));
    }
    if !seg.present {
        return Err(Ok(Fault::Np(sel_err(sel))));
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

/// The address after the instruction, wrapped to the code segment's operand size.
fn return_ip(cpu: &CpuState, si: SoftInt, long: bool) -> u64 {
    let next = cpu.rip.wrapping_add(u64::from(si.len));
    if long {
        next
    } else if cpu.cs.db {
        next & 0xFFFF_FFFF
    } else {
        next & 0xFFFF
    }
}

/// IA-32e mode (64-bit and compatibility mode): SDM Vol. 3A §6.14.
fn deliver_ia32e<M: LinearMemory>(cpu: &CpuState, si: SoftInt, mem: &mut M) -> Step<Entry> {
    let la57 = cpu.cr4 & CR4_LA57 != 0;
    let gate = read_gate(cpu, si.vector, mem, true)?;
    let target = target_cs(cpu, gate.selector, mem)?;
    // §6.14.1: the target must be a 64-bit code segment (L = 1, D = 0); the error
    // code used is the selector's, as for the other checks on the target segment.
    if !target.l || target.db {
        return Err(Ok(Fault::Gp(sel_err(gate.selector))));
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
                return Err(Ok(Fault::Ts(sel_err(cpu.tr.selector))));
            }
            u64::from_le_bytes(read::<M, 8>(mem, cpu.tr.base.wrapping_add(off))?)
        }
        None => cpu.rsp,
    };
    if !canonical(new_rsp, la57) {
        return Err(Ok(Fault::Ss(0)));
    }
    if !canonical(gate.offset, la57) {
        return Err(Ok(Fault::Gp(0)));
    }
    // §6.14.2: the new stack is 16-byte aligned, then SS, RSP, RFLAGS, CS, RIP.
    let frame_rsp = (new_rsp & !0xF).wrapping_sub(40);
    if !canonical(frame_rsp, la57) {
        return Err(Ok(Fault::Ss(0)));
    }
    let long = cpu.cs.l;
    let words = [
        return_ip(cpu, si, long),
        u64::from(cpu.cs.selector),
        cpu.rflags,
        cpu.rsp,
        u64::from(cpu.ss.selector),
    ];
    push(mem, frame_rsp, &words.map(u64::to_le_bytes))?;
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
/// pushed on SS:ESP.
fn deliver_legacy<M: LinearMemory>(cpu: &CpuState, si: SoftInt, mem: &mut M) -> Step<Entry> {
    let gate = read_gate(cpu, si.vector, mem, false)?;
    if !matches!(gate.type_, GATE_INT32 | GATE_TRAP32) {
        return Err(Err(Unsupported::Legacy32));
    }
    let target = target_cs(cpu, gate.selector, mem)?;
    let cur = cpl(cpu);
    let conforming = target.type_ & 4 != 0;
    if !conforming && target.dpl < cur {
        return Err(Err(Unsupported::Legacy32));
    }
    if gate.offset > u64::from(target.limit) {
        return Err(Ok(Fault::Gp(0)));
    }
    if !cpu.ss.db || cpu.ss.type_ & 4 != 0 {
        // 16-bit or expand-down stack segment.
        return Err(Err(Unsupported::Legacy32));
    }
    let esp = cpu.rsp & 0xFFFF_FFFF;
    let new_esp = esp.wrapping_sub(12) & 0xFFFF_FFFF;
    // The three pushes must lie inside the (expand-up) stack segment.
    if esp < 12 || new_esp + 11 > u64::from(cpu.ss.limit) {
        return Err(Ok(Fault::Ss(0)));
    }
    let words = [
        return_ip(cpu, si, false) as u32,
        u32::from(cpu.cs.selector),
        cpu.rflags as u32,
    ];
    let linear = cpu.ss.base.wrapping_add(new_esp) & 0xFFFF_FFFF;
    push(mem, linear, &words.map(u32::to_le_bytes))?;
    let mut cs = target;
    cs.selector = (gate.selector & 0xFFFC) | u16::from(cur);
    cs.type_ |= 1;
    Ok(Entry {
        rip: gate.offset,
        rsp: (cpu.rsp & !0xFFFF_FFFF) | new_esp,
        rflags: handler_rflags(cpu.rflags, gate.type_),
        cs,
        ss: None,
    })
}

#[cfg(test)]
#[path = "delivery_tests.rs"]
mod tests;
