//! Software interrupts a host's KVM cannot execute: on an emulation failure at
//! `int3` / `int n`, the VMM delivers the event itself (a host-limit workaround).
//!
//! Some hosts run guest CPL0 code through KVM's instruction emulator (nested KVM
//! here), and that emulator performs `int3` and `int n` only in real mode: in
//! protected and long mode it fails with `KVM_EXIT_INTERNAL_ERROR` /
//! `KVM_INTERNAL_ERROR_EMULATION` and the VM cannot go on. [`deliver_at_rip`] takes
//! the instruction from the bytes KVM reports with the exit (or reads it at CS:RIP
//! through `KVM_TRANSLATE` and guest RAM, page by page, on a KVM that does not) and,
//! for `CC` or `CD nn`, performs the delivery as the CPU would
//! ([`delivery`]): the IDT gate and its checks, the target code segment, the stack
//! (IST, RSPn), the frame, RFLAGS, then `KVM_SET_REGS`/`KVM_SET_SREGS`. A fault the
//! delivery raises (#GP, #NP, #SS, #TS, #PF) is delivered here too, RIP pushed on
//! the instruction, and so on to #DF and shutdown (SDM Vol. 3A Table 6-5).
//!
//! Why not KVM's own event injection: KVM takes the length of a "soft" event from
//! its last exit (not this instruction), a delivery fault then reports the wrong RIP,
//! a `KVM_INTERRUPT` issued while the injected event is still queued replaces it,
//! and on this host an injected #NP whose delivery meets a read-only stack ends in a
//! triple fault instead of a #PF (kvm-unit-tests `eventinj`, "NP PF exceptions").
//! Delivering here has none of these problems and leaves nothing queued in KVM.
//!
//! Deviations (see the crate README): the stack and descriptor tables are written
//! and read without the guest's page protections (`KVM_TRANSLATE` reports no
//! permissions), the accessed bit of the target code-segment descriptor is not
//! written back, and an interrupt shadow (`sti; int3`) is not cleared. 32-bit
//! protected mode is handled at the same privilege level through 32-bit gates only.

pub mod delivery;
pub mod fault;
pub mod tables;

use kvm_bindings::{kvm_segment, kvm_sregs};
use kvm_ioctls::VcpuFd;
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap};

use crate::Error;
use delivery::{AccessError, CpuState, LinearMemory, Segment, SoftInt, TableReg};
pub use delivery::{Fault, Unsupported};

/// `KVM_INTERNAL_ERROR_EMULATION`.
const EMULATION: u32 = 1;
const PAGE: u64 = 4096;

/// What [`deliver_at_rip`] did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum SoftIntOutcome {
    /// The last exit was not an emulation failure on `int3` / `int n` (or the
    /// workaround is off): report it as before.
    NotSoftInt,
    /// The handler of this vector was entered.
    Delivered(u8),
    /// The delivery of this vector faulted; the handler of this exception (the
    /// last one raised on the way, possibly #DF) was entered instead.
    Faulted(u8, Fault),
    /// The delivery of this vector ended in a fault while delivering #DF: the
    /// guest is shut down (report a triple fault).
    Shutdown(u8),
    /// An `int3` / `int n` of this vector that this workaround does not deliver.
    Unsupported(u8, Unsupported),
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsupported::NotProtectedMode => f.write_str("real or virtual-8086 mode"),
            Unsupported::Fred => f.write_str("FRED event delivery (CR4.FRED) is on"),
            Unsupported::Legacy32 => f.write_str(
                "32-bit protected mode through a task gate, a 16-bit gate or to another privilege level",
            ),
            Unsupported::NotRam(a) => {
                write!(f, "a descriptor table, TSS or stack at {a:#x} is not in RAM")
            }
        }
    }
}

/// Guest memory by linear address for one delivery: `KVM_TRANSLATE` per page.
struct KvmLinear<'a> {
    fd: &'a VcpuFd,
    mem: &'a GuestMemoryMmap,
}

impl KvmLinear<'_> {
    /// The guest-physical pieces of `len` bytes at linear `addr`: (gpa, offset in
    /// the access, length); fails at the first page without a translation or in RAM.
    fn pieces(&self, addr: u64, len: usize) -> Result<Vec<(u64, usize, usize)>, AccessError> {
        let mut out = Vec::with_capacity(2);
        let mut done = 0usize;
        while done < len {
            let la = addr.wrapping_add(done as u64);
            let in_page = (PAGE - la % PAGE) as usize;
            let n = in_page.min(len - done);
            let t = self
                .fd
                .translate_gva(la)
                .map_err(|_| AccessError::NotRam(la))?;
            if t.valid == 0 {
                return Err(AccessError::NotMapped(la));
            }
            let gpa = t.physical_address;
            let last = gpa
                .checked_add(n as u64 - 1)
                .ok_or(AccessError::NotRam(gpa))?;
            if !self.mem.address_in_range(GuestAddress(gpa))
                || !self.mem.address_in_range(GuestAddress(last))
            {
                return Err(AccessError::NotRam(gpa));
            }
            out.push((gpa, done, n));
            done += n;
        }
        Ok(out)
    }
}

impl LinearMemory for KvmLinear<'_> {
    fn read(&mut self, addr: u64, buf: &mut [u8]) -> Result<(), AccessError> {
        for (gpa, off, n) in self.pieces(addr, buf.len())? {
            let dst = buf.get_mut(off..off + n).ok_or(AccessError::NotRam(gpa))?;
            self.mem
                .read_slice(dst, GuestAddress(gpa))
                .map_err(|_| AccessError::NotRam(gpa))?;
        }
        Ok(())
    }

    fn write(&mut self, addr: u64, data: &[u8]) -> Result<(), AccessError> {
        // Every page is translated before anything is written.
        for (gpa, off, n) in self.pieces(addr, data.len())? {
            let src = data.get(off..off + n).ok_or(AccessError::NotRam(gpa))?;
            self.mem
                .write_slice(src, GuestAddress(gpa))
                .map_err(|_| AccessError::NotRam(gpa))?;
        }
        Ok(())
    }
}

fn seg_in(s: &kvm_segment) -> Segment {
    Segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present != 0,
        dpl: s.dpl,
        db: s.db != 0,
        s: s.s != 0,
        l: s.l != 0,
        g: s.g != 0,
        avl: s.avl != 0,
        unusable: s.unusable != 0,
    }
}

fn seg_out(s: &Segment) -> kvm_segment {
    kvm_segment {
        base: s.base,
        limit: s.limit,
        selector: s.selector,
        type_: s.type_,
        present: s.present.into(),
        dpl: s.dpl,
        db: s.db.into(),
        s: s.s.into(),
        l: s.l.into(),
        g: s.g.into(),
        avl: s.avl.into(),
        unusable: s.unusable.into(),
        padding: 0,
    }
}

fn cpu_state(regs: &kvm_bindings::kvm_regs, s: &kvm_sregs) -> CpuState {
    CpuState {
        rip: regs.rip,
        rsp: regs.rsp,
        rflags: regs.rflags,
        cs: seg_in(&s.cs),
        ss: seg_in(&s.ss),
        tr: seg_in(&s.tr),
        ldt: seg_in(&s.ldt),
        gdt: TableReg {
            base: s.gdt.base,
            limit: s.gdt.limit,
        },
        idt: TableReg {
            base: s.idt.base,
            limit: s.idt.limit,
        },
        cr0: s.cr0,
        cr4: s.cr4,
        efer: s.efer,
    }
}

/// `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`.
const FLAG_INSN_BYTES: u64 = 1;

/// The instruction bytes KVM's emulator fetched, from an emulation failure's data:
/// `data[0]` = flags, then one byte of length and 15 bytes of instruction (KVM's
/// `kvm_run.emulation_failure`). `None` when KVM did not include them.
pub fn exit_instruction(data: &[u64]) -> Option<Vec<u8>> {
    let flags = *data.first()?;
    if flags & FLAG_INSN_BYTES == 0 {
        return None;
    }
    let mut raw = Vec::with_capacity(16);
    for w in data.get(1..3)? {
        raw.extend_from_slice(&w.to_le_bytes());
    }
    let len = usize::from(*raw.first()?).min(15);
    let bytes = raw.get(1..1 + len)?.to_vec();
    (!bytes.is_empty()).then_some(bytes)
}

/// The data of `fd`'s last exit if it was `KVM_EXIT_INTERNAL_ERROR` / emulation
/// failure.
fn emulation_failure(fd: &mut VcpuFd) -> Option<Vec<u64>> {
    crate::raw::internal_error(fd).and_then(|(sub, data)| (sub == EMULATION).then_some(data))
}

/// The `int3` / `int n` that failed: from the bytes KVM fetched when it reports them
/// (what the vCPU executed, even if another vCPU rewrote the code since, as Linux's
/// `text_poke_bp` does), else read at CS:RIP.
fn fetch(cpu: &CpuState, data: &[u64], mem: &mut KvmLinear<'_>) -> Option<SoftInt> {
    match exit_instruction(data) {
        Some(bytes) => delivery::decode(&bytes),
        None => read_at_rip(cpu, mem),
    }
}

/// The `int3` / `int n` at CS:RIP, if that is what is there.
fn read_at_rip(cpu: &CpuState, mem: &mut KvmLinear<'_>) -> Option<SoftInt> {
    let long = cpu.efer & (1 << 10) != 0 && cpu.cs.l;
    let linear = |i: u64| {
        if long {
            cpu.rip.wrapping_add(i)
        } else {
            cpu.cs.base.wrapping_add(cpu.rip.wrapping_add(i)) & 0xFFFF_FFFF
        }
    };
    let mut b = [0u8; 2];
    mem.read(linear(0), &mut b[..1]).ok()?;
    if b[0] == 0xCD {
        mem.read(linear(1), &mut b[1..]).ok()?;
    }
    delivery::decode(&b[..if b[0] == 0xCD { 2 } else { 1 }])
}

/// After `fd`'s `KVM_RUN` returned `KVM_EXIT_INTERNAL_ERROR`: if it is an emulation
/// failure on `int3` / `int n` in protected or long mode, delivers the interrupt as
/// the CPU would (or injects the fault the delivery raises) and returns what it did;
/// the vCPU can then be run again. `mem` is the guest's RAM from guest-physical 0.
/// Any other exit gives [`SoftIntOutcome::NotSoftInt`] and changes nothing.
pub fn deliver_at_rip(fd: &mut VcpuFd, mem: &GuestMemoryMmap) -> Result<SoftIntOutcome, Error> {
    let Some(data) = emulation_failure(fd) else {
        return Ok(SoftIntOutcome::NotSoftInt);
    };
    let fd: &VcpuFd = fd;
    let mut regs = fd.get_regs().map_err(|e| Error::kvm("KVM_GET_REGS", e))?;
    let mut sregs = fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    let cpu = cpu_state(&regs, &sregs);
    let mut lin = KvmLinear { fd, mem };
    let Some(si) = fetch(&cpu, &data, &mut lin) else {
        return Ok(SoftIntOutcome::NotSoftInt);
    };
    let (entry, out) = match delivery::deliver(&cpu, si, &mut lin) {
        Ok(delivery::Outcome::Entered(e)) => (e, SoftIntOutcome::Delivered(si.vector)),
        Ok(delivery::Outcome::Faulted(f, e)) => (e, SoftIntOutcome::Faulted(si.vector, f)),
        Ok(delivery::Outcome::Shutdown) => return Ok(SoftIntOutcome::Shutdown(si.vector)),
        Err(u) => return Ok(SoftIntOutcome::Unsupported(si.vector, u)),
    };
    let old = (sregs.cs, sregs.ss, sregs.cr2);
    sregs.cs = seg_out(&entry.cs);
    if let Some(ss) = entry.ss {
        sregs.ss = seg_out(&ss);
    }
    if let Some(cr2) = entry.cr2 {
        sregs.cr2 = cr2;
    }
    // Same CS (the usual kernel-to-kernel case), SS and CR2: one ioctl fewer.
    if (sregs.cs, sregs.ss, sregs.cr2) != old {
        fd.set_sregs(&sregs)
            .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
    }
    regs.rip = entry.rip;
    regs.rsp = entry.rsp;
    regs.rflags = entry.rflags;
    fd.set_regs(&regs)
        .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The data of an emulation failure at `int3` as KVM reported it on this host
    /// (kvm_pvm, Linux 6.18): flags 1, length 15, then `cc 48 81 c4 80 00 ...`.
    #[test]
    fn instruction_bytes_from_the_exit() {
        let data = [
            0x1,
            0x80c4_8148_cc0f,
            0x894c_1824_4448_9800,
            0x1000,
            0,
            0,
            0,
            0,
        ];
        let b = exit_instruction(&data).expect("bytes");
        assert_eq!(b.len(), 15);
        assert_eq!(&b[..4], &[0xCC, 0x48, 0x81, 0xC4]);
        assert_eq!(
            delivery::decode(&b).map(|s| (s.vector, s.len)),
            Some((3, 1))
        );
        // `int $0x21` then other bytes, length 15 (constructed in the same layout).
        let data = [0x1, 0x008b_4821_cd0f, 0];
        let b = exit_instruction(&data).expect("bytes");
        assert_eq!(
            delivery::decode(&b).map(|s| (s.vector, s.len)),
            Some((0x21, 2))
        );
        // No flag, short data, zero length: not reported.
        assert_eq!(exit_instruction(&[0, 0x80c4_8148_cc0f, 0]), None);
        assert_eq!(exit_instruction(&[1]), None);
        assert_eq!(exit_instruction(&[1, 0xcc00, 0]), None);
        assert_eq!(exit_instruction(&[]), None);
    }
}
