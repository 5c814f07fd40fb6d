//! Software interrupts a host's KVM cannot execute: on an emulation failure at
//! `int3` / `int n`, the VMM delivers the event itself (a host-limit workaround).
//!
//! Some hosts run guest CPL0 code through KVM's instruction emulator (nested KVM
//! here), and that emulator performs `int3` and `int n` only in real mode: in
//! protected and long mode it fails with `KVM_EXIT_INTERNAL_ERROR` /
//! `KVM_INTERNAL_ERROR_EMULATION` and the VM cannot go on. [`deliver_at_rip`] reads
//! the instruction at CS:RIP (through `KVM_TRANSLATE` and guest RAM, page by page)
//! and, for `CC` or `CD nn`, performs the delivery as the CPU would
//! ([`delivery`]): the IDT gate and its checks, the target code segment, the stack
//! (IST, RSPn), the frame, RFLAGS, then `KVM_SET_REGS`/`KVM_SET_SREGS`. A fault the
//! delivery raises instead (#GP, #NP, #SS, #TS, #PF) is injected with
//! `KVM_SET_VCPU_EVENTS`, RIP left on the instruction.
//!
//! Why not KVM's own event injection: KVM takes the length of a "soft" event from
//! its last exit (not this instruction), a delivery fault then reports the wrong RIP,
//! and a `KVM_INTERRUPT` issued while the injected event is still queued replaces
//! it. Delivering here has none of these problems and needs no queued state.
//!
//! Deviations (see the crate README): the stack and descriptor tables are written
//! and read without the guest's page protections (`KVM_TRANSLATE` reports no
//! permissions), the accessed bit of the target code-segment descriptor is not
//! written back, and an interrupt shadow (`sti; int3`) is not cleared. 32-bit
//! protected mode is handled at the same privilege level through 32-bit gates only.

pub mod delivery;

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
pub enum SoftIntOutcome {
    /// The last exit was not an emulation failure on `int3` / `int n` (or the
    /// workaround is off): report it as before.
    NotSoftInt,
    /// The handler of this vector was entered.
    Delivered(u8),
    /// The delivery of this vector raised this exception instead (injected).
    Faulted(u8, Fault),
    /// An `int3` / `int n` of this vector that this workaround does not deliver.
    Unsupported(u8, Unsupported),
}

impl std::fmt::Display for Unsupported {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Unsupported::NotProtectedMode => f.write_str("real or virtual-8086 mode"),
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

/// Whether `fd`'s last exit was `KVM_EXIT_INTERNAL_ERROR` / emulation failure.
fn emulation_failure(fd: &mut VcpuFd) -> bool {
    crate::raw::internal_error(fd).is_some_and(|(sub, _)| sub == EMULATION)
}

/// The `int3` / `int n` at CS:RIP, if that is what is there.
fn fetch(cpu: &CpuState, mem: &mut KvmLinear<'_>) -> Option<SoftInt> {
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
    if !emulation_failure(fd) {
        return Ok(SoftIntOutcome::NotSoftInt);
    }
    let fd: &VcpuFd = fd;
    let mut regs = fd.get_regs().map_err(|e| Error::kvm("KVM_GET_REGS", e))?;
    let mut sregs = fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
    let cpu = cpu_state(&regs, &sregs);
    let mut lin = KvmLinear { fd, mem };
    let Some(si) = fetch(&cpu, &mut lin) else {
        return Ok(SoftIntOutcome::NotSoftInt);
    };
    match delivery::deliver(&cpu, si, &mut lin) {
        Ok(delivery::Outcome::Entered(e)) => {
            sregs.cs = seg_out(&e.cs);
            if let Some(ss) = e.ss {
                sregs.ss = seg_out(&ss);
            }
            fd.set_sregs(&sregs)
                .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
            regs.rip = e.rip;
            regs.rsp = e.rsp;
            regs.rflags = e.rflags;
            fd.set_regs(&regs)
                .map_err(|e| Error::kvm("KVM_SET_REGS", e))?;
            Ok(SoftIntOutcome::Delivered(si.vector))
        }
        Ok(delivery::Outcome::Faulted(f)) => {
            if let Fault::Pf { addr, .. } = f {
                sregs.cr2 = addr;
                fd.set_sregs(&sregs)
                    .map_err(|e| Error::kvm("KVM_SET_SREGS", e))?;
            }
            let mut ev = fd
                .get_vcpu_events()
                .map_err(|e| Error::kvm("KVM_GET_VCPU_EVENTS", e))?;
            ev.exception.injected = 1;
            ev.exception.nr = f.vector();
            ev.exception.has_error_code = 1;
            ev.exception.error_code = f.error_code();
            ev.flags = 0;
            fd.set_vcpu_events(&ev)
                .map_err(|e| Error::kvm("KVM_SET_VCPU_EVENTS", e))?;
            Ok(SoftIntOutcome::Faulted(si.vector, f))
        }
        Err(u) => Ok(SoftIntOutcome::Unsupported(si.vector, u)),
    }
}
