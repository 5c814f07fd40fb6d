//! Instructions this host's KVM instruction emulator fails on (KVM internal error,
//! emulation failure) that the VMM completes itself: `FWAIT` (Linux's `fpu__drop`).

use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs, kvm_vcpu_events};

/// What the VMM did with an emulation failure.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FillIn {
    /// `FWAIT` with nothing pending: RIP moved past it.
    Fwait,
    /// `FWAIT` raised this exception vector (7 #NM or 16 #MF), injected, RIP kept.
    Fault(u8),
}

/// CR0.MP, CR0.TS, CR0.NE.
const CR0_MP: u64 = 1 << 1;
const CR0_TS: u64 = 1 << 3;
const CR0_NE: u64 = 1 << 5;
/// x87 FSW.ES: an unmasked exception is pending.
const FSW_ES: u16 = 1 << 7;

/// The instruction bytes of an emulation-failure exit's data (`KVM_INTERNAL_ERROR_EMULATION`
/// with `KVM_INTERNAL_ERROR_EMULATION_FLAG_INSTRUCTION_BYTES`: `data[0]` the flags, then
/// `insn_size` and up to 15 bytes packed little-endian from `data[1]`).
pub fn insn_bytes(data: &[u64]) -> Vec<u8> {
    if data.first().is_none_or(|f| f & 1 == 0) {
        return Vec::new();
    }
    let raw: Vec<u8> = data
        .iter()
        .skip(1)
        .take(2)
        .flat_map(|w| w.to_le_bytes())
        .collect();
    let n = usize::from(raw.first().copied().unwrap_or(0)).min(15);
    raw.get(1..1 + n).unwrap_or(&[]).to_vec()
}

/// `FWAIT` (SDM Vol. 2A "WAIT/FWAIT"): #NM when CR0.MP and CR0.TS are both set, else
/// #MF when an unmasked x87 exception is pending (FSW.ES) and CR0.NE is set, else a
/// no-op. `None` when `insn` is not `FWAIT`. [`complete`] applies the result to a
/// vCPU.
pub fn decide(insn: &[u8], cr0: u64, fsw: u16) -> Option<FillIn> {
    if insn.first() != Some(&0x9B) {
        return None;
    }
    Some(if cr0 & (CR0_MP | CR0_TS) == CR0_MP | CR0_TS {
        FillIn::Fault(7)
    } else if fsw & FSW_ES != 0 && cr0 & CR0_NE != 0 {
        FillIn::Fault(16)
    } else {
        FillIn::Fwait
    })
}

/// The vCPU state [`complete`] needs and changes.
pub trait FillInCpu {
    /// KVM_GET_REGS.
    fn regs(&self) -> Result<kvm_regs, String>;
    /// KVM_SET_REGS.
    fn set_regs(&self, r: &kvm_regs) -> Result<(), String>;
    /// KVM_GET_SREGS.
    fn sregs(&self) -> Result<kvm_sregs, String>;
    /// KVM_GET_FPU.
    fn fpu(&self) -> Result<kvm_fpu, String>;
    /// KVM_GET_VCPU_EVENTS.
    fn events(&self) -> Result<kvm_vcpu_events, String>;
    /// KVM_SET_VCPU_EVENTS.
    fn set_events(&self, e: &kvm_vcpu_events) -> Result<(), String>;
}

impl FillInCpu for kvm_ioctls::VcpuFd {
    fn regs(&self) -> Result<kvm_regs, String> {
        self.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))
    }
    fn set_regs(&self, r: &kvm_regs) -> Result<(), String> {
        kvm_ioctls::VcpuFd::set_regs(self, r).map_err(|e| format!("KVM_SET_REGS: {e}"))
    }
    fn sregs(&self) -> Result<kvm_sregs, String> {
        self.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))
    }
    fn fpu(&self) -> Result<kvm_fpu, String> {
        self.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))
    }
    fn events(&self) -> Result<kvm_vcpu_events, String> {
        self.get_vcpu_events()
            .map_err(|e| format!("KVM_GET_VCPU_EVENTS: {e}"))
    }
    fn set_events(&self, e: &kvm_vcpu_events) -> Result<(), String> {
        self.set_vcpu_events(e)
            .map_err(|e| format!("KVM_SET_VCPU_EVENTS: {e}"))
    }
}

/// Completes the instruction of an emulation failure whose exit data is `data`, if it
/// is one this module knows; `Ok(None)`: not ours (report the crash as before).
pub fn complete(cpu: &dyn FillInCpu, data: &[u64]) -> Result<Option<FillIn>, String> {
    let insn = insn_bytes(data);
    if insn.first() != Some(&0x9B) {
        return Ok(None);
    }
    let s = cpu.sregs()?;
    let fsw = cpu.fpu()?.fsw;
    let Some(what) = decide(&insn, s.cr0, fsw) else {
        return Ok(None);
    };
    match what {
        FillIn::Fwait => {
            let mut r = cpu.regs()?;
            r.rip = r.rip.wrapping_add(1);
            cpu.set_regs(&r)?;
        }
        FillIn::Fault(v) => {
            let mut e = cpu.events()?;
            e.exception.injected = 1;
            e.exception.nr = v;
            e.exception.has_error_code = 0;
            e.exception.error_code = 0;
            e.flags = 0;
            cpu.set_events(&e)?;
        }
    }
    Ok(Some(what))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;

    struct Fake {
        regs: RefCell<kvm_regs>,
        cr0: u64,
        fsw: u16,
        events: RefCell<Option<kvm_vcpu_events>>,
    }

    impl FillInCpu for Fake {
        fn regs(&self) -> Result<kvm_regs, String> {
            Ok(*self.regs.borrow())
        }
        fn set_regs(&self, r: &kvm_regs) -> Result<(), String> {
            *self.regs.borrow_mut() = *r;
            Ok(())
        }
        fn sregs(&self) -> Result<kvm_sregs, String> {
            Ok(kvm_sregs {
                cr0: self.cr0,
                ..Default::default()
            })
        }
        fn fpu(&self) -> Result<kvm_fpu, String> {
            Ok(kvm_fpu {
                fsw: self.fsw,
                ..Default::default()
            })
        }
        fn events(&self) -> Result<kvm_vcpu_events, String> {
            Ok(kvm_vcpu_events::default())
        }
        fn set_events(&self, e: &kvm_vcpu_events) -> Result<(), String> {
            *self.events.borrow_mut() = Some(*e);
            Ok(())
        }
    }

    /// The exit data of Debian 6.1's failure in `fpu__drop+0x7e` on this host.
    const FPU_DROP: [u64; 3] = [0x1, 0x144d_05c7_4865_9b0f, 0x9066_0000_0000_7efe];

    fn fake(cr0: u64, fsw: u16) -> Fake {
        Fake {
            regs: RefCell::new(kvm_regs {
                rip: 0xFFFF_FFFF_8103_E6CE,
                ..Default::default()
            }),
            cr0,
            fsw,
            events: RefCell::new(None),
        }
    }

    #[test]
    fn instruction_bytes_come_from_the_exit_data() {
        assert_eq!(
            insn_bytes(&FPU_DROP),
            [0x9B, 0x65, 0x48, 0xC7, 0x05, 0x4D, 0x14, 0xFE, 0x7E, 0, 0, 0, 0, 0x66, 0x90]
        );
        assert!(insn_bytes(&[0, 0x0F]).is_empty()); // no bytes flag
        assert!(insn_bytes(&[]).is_empty());
        assert!(insn_bytes(&[1]).is_empty());
    }

    /// SDM Vol. 2A WAIT/FWAIT: no-op without a pending unmasked x87 exception (Linux's
    /// CR0 0x80050033: PE MP ET NE WP AM PG, TS clear).
    #[test]
    fn fwait_with_nothing_pending_steps_over() {
        let f = fake(0x8005_0033, 0);
        assert_eq!(complete(&f, &FPU_DROP), Ok(Some(FillIn::Fwait)));
        assert_eq!(f.regs.borrow().rip, 0xFFFF_FFFF_8103_E6CF);
        assert!(f.events.borrow().is_none());
    }

    /// #MF (vector 16) when FSW.ES and CR0.NE; #NM (vector 7) when CR0.MP and CR0.TS
    /// (SDM Vol. 3A §6.15 "Interrupt 16", "Interrupt 7"); RIP stays on the FWAIT.
    #[test]
    fn fwait_faults_as_the_sdm_says() {
        for (cr0, fsw, v) in [(0x8005_0033, FSW_ES, 16u8), (0x8005_003B, 0, 7)] {
            let f = fake(cr0, fsw);
            assert_eq!(complete(&f, &FPU_DROP), Ok(Some(FillIn::Fault(v))));
            assert_eq!(f.regs.borrow().rip, 0xFFFF_FFFF_8103_E6CE);
            let e = f.events.borrow().expect("injected");
            assert_eq!((e.exception.injected, e.exception.nr), (1, v));
        }
        // ES without NE: no #MF from FWAIT (legacy FERR# reporting is not modelled).
        assert_eq!(decide(&[0x9B], 0x8005_0013, FSW_ES), Some(FillIn::Fwait));
    }

    #[test]
    fn other_instructions_are_not_ours() {
        let f = fake(0x8005_0033, 0);
        // popcnt %rdi,%rax (bytes f3 48 0f b8 c7)
        let popcnt = [0x1, 0x0141_c7b8_0f48_f30f, 0];
        assert_eq!(complete(&f, &popcnt), Ok(None));
        assert_eq!(decide(&[], 0, 0), None);
    }
}
