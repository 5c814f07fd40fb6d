//! The pitfall `kernel_timer` fixes, on real KVM (needs /dev/kvm; otherwise one
//! `SKIPPED:` line): a one-shot APIC timer of KVM's in-kernel APIC that expires while
//! its vCPU is out of `KVM_RUN` is counted in KVM's `lapic_timer.pending` and is not
//! in the page `KVM_GET_LAPIC` returns (TMCCT 0, IRR clear); the flush run puts it in
//! IRR without running a guest instruction, for a runnable and for a halted vCPU, and
//! leaves a timer still counting alone. SDM Vol. 3A §11.5.4: a one-shot timer's expiry
//! raises its LVT timer interrupt once.

use std::time::Duration;

use kvm_bindings::{kvm_lapic_state, kvm_mp_state, KVM_MAX_CPUID_ENTRIES, KVM_MP_STATE_HALTED};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use vlapic_kvm::GuestRam;
use vlapic_vmm::kernel_timer::{flush_pending_timers, oneshot_expired};

const VECTOR: usize = 0x41;

fn kvm() -> Option<Kvm> {
    match vlapic_kvm::setup::kvm_usable() {
        Ok(k) => Some(k),
        Err(e) => {
            eprintln!("SKIPPED: /dev/kvm not available: {e}");
            None
        }
    }
}

/// A VM with KVM's in-kernel irqchip, 1 MiB of RAM holding `jmp $` at 0, and one
/// vCPU in real mode at 0 with IF = `if_flag` (it never runs an instruction here).
fn in_kernel_vm(kvm: &Kvm, if_flag: bool) -> (VmFd, VcpuFd, GuestRam) {
    let vm = kvm.create_vm().expect("KVM_CREATE_VM");
    vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
    vm.set_tss_address(0xFFFB_D000).expect("TSS");
    let fd = vm.create_vcpu(0).expect("vCPU");
    let cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .expect("CPUID");
    fd.set_cpuid2(&cpuid).expect("KVM_SET_CPUID2");
    let ram = GuestRam::new(1 << 20).expect("RAM");
    ram.register(&vm, 0).expect("memory slot");
    ram.write(0, &[0xEB, 0xFE]).expect("jmp $");
    let mut sregs = fd.get_sregs().expect("sregs");
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    fd.set_sregs(&sregs).expect("sregs");
    let mut regs = fd.get_regs().expect("regs");
    regs.rip = 0;
    regs.rflags = 2 | if if_flag { 0x200 } else { 0 };
    fd.set_regs(&regs).expect("regs");
    (vm, fd, ram)
}

fn reg(p: &kvm_lapic_state, off: usize) -> u32 {
    let b: Vec<u8> = p.regs[off..off + 4].iter().map(|b| *b as u8).collect();
    u32::from_le_bytes(b.try_into().expect("4 bytes"))
}

fn put(p: &mut kvm_lapic_state, off: usize, v: u32) {
    for (d, b) in p.regs[off..off + 4].iter_mut().zip(v.to_le_bytes()) {
        *d = b as _;
    }
}

fn irr_has(p: &kvm_lapic_state, v: usize) -> bool {
    reg(p, 0x200 + v / 32 * 0x10) >> (v % 32) & 1 != 0
}

fn page_bytes(p: &kvm_lapic_state) -> Vec<u8> {
    p.regs.iter().map(|b| *b as u8).collect()
}

/// Arms a one-shot timer (vector 0x41, divide by 1) with `count`; KVM starts it from
/// TMCCT, so TMCCT = TMICT = `count`.
fn arm_oneshot(fd: &VcpuFd, count: u32) {
    let mut p = fd.get_lapic().expect("KVM_GET_LAPIC");
    put(&mut p, 0xF0, 0x1FF); // SVR: software enabled
    put(&mut p, 0x3E0, 0xB); // divide by 1
    put(&mut p, 0x320, VECTOR as u32); // LVTT: one-shot, unmasked
    put(&mut p, 0x380, count);
    put(&mut p, 0x390, count);
    fd.set_lapic(&p).expect("KVM_SET_LAPIC");
}

fn expires_while_out_of_kvm_run_then_flush(halted: bool) {
    let Some(kvm) = kvm() else { return };
    let (_vm, mut fd, _ram) = in_kernel_vm(&kvm, halted);
    let sig = vlapic_kvm::kick::kick_signal().expect("kick signal");
    if halted {
        fd.set_mp_state(kvm_mp_state {
            mp_state: KVM_MP_STATE_HALTED,
        })
        .expect("KVM_SET_MP_STATE");
    }
    // 1000 bus cycles: KVM's bus cycle is 1 ns, so it expires within microseconds
    // (KVM may round a tiny period up to its minimum; 50 ms covers that).
    arm_oneshot(&fd, 1000);
    std::thread::sleep(Duration::from_millis(50));
    let before = fd.get_lapic().expect("KVM_GET_LAPIC");
    assert!(
        oneshot_expired(&page_bytes(&before)),
        "TMICT {} TMCCT {}",
        reg(&before, 0x380),
        reg(&before, 0x390)
    );
    assert!(
        !irr_has(&before, VECTOR),
        "KVM put the expiry in IRR outside KVM_RUN: the pitfall is not there"
    );
    let rip = fd.get_regs().expect("regs").rip;
    flush_pending_timers(&mut fd, sig).expect("flush");
    let after = fd.get_lapic().expect("KVM_GET_LAPIC");
    assert!(
        irr_has(&after, VECTOR),
        "the expiry is not in IRR after the flush"
    );
    assert_eq!(reg(&after, 0x390), 0, "TMCCT");
    assert_eq!(
        reg(&after, 0x100 + VECTOR / 32 * 0x10) >> (VECTOR % 32) & 1,
        0,
        "not in ISR"
    );
    assert_eq!(fd.get_regs().expect("regs").rip, rip, "the guest ran");
    if halted {
        let mp = fd.get_mp_state().expect("KVM_GET_MP_STATE").mp_state;
        assert_eq!(mp, KVM_MP_STATE_HALTED, "the flush ran the vCPU");
    }
    // A halted vCPU stays halted: KVM wakes it at its next KVM_RUN (it is not blocked
    // any more with a deliverable vector in IRR; SDM Vol. 2A, HLT), as vlapic does.
    // A second flush changes nothing: a one-shot timer fires once.
    flush_pending_timers(&mut fd, sig).expect("flush");
    let again = fd.get_lapic().expect("KVM_GET_LAPIC");
    assert_eq!(page_bytes(&again), page_bytes(&after));
}

#[test]
fn an_expiry_counted_by_kvm_reaches_irr_through_the_flush() {
    expires_while_out_of_kvm_run_then_flush(false);
}

#[test]
fn a_halted_vcpus_expiry_reaches_irr_and_it_stays_halted() {
    expires_while_out_of_kvm_run_then_flush(true);
}

#[test]
fn a_timer_still_counting_is_left_alone() {
    let Some(kvm) = kvm() else { return };
    let (_vm, mut fd, _ram) = in_kernel_vm(&kvm, false);
    let sig = vlapic_kvm::kick::kick_signal().expect("kick signal");
    // About 4 s: it cannot expire during the test.
    arm_oneshot(&fd, 4_000_000_000);
    flush_pending_timers(&mut fd, sig).expect("flush");
    let p = fd.get_lapic().expect("KVM_GET_LAPIC");
    assert!(!irr_has(&p, VECTOR));
    assert!(reg(&p, 0x390) > 0, "TMCCT counts on");
    assert!(!oneshot_expired(&page_bytes(&p)));
}
