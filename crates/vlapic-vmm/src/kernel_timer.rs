//! Leaving KVM's in-kernel APIC at a pause without losing a timer interrupt: one
//! `KVM_RUN` that KVM leaves after moving its counted timer expiries into IRR.
//!
//! KVM's APIC timer (`apic_timer_expired` in arch/x86/kvm/lapic.c) does not set IRR
//! when it expires: it counts the expiry in `lapic_timer.pending`, and the vCPU's run
//! loop (`vcpu_run` in arch/x86/kvm/x86.c) moves it into IRR
//! (`kvm_inject_pending_timer_irqs`) after each pass through `vcpu_enter_guest` or
//! `vcpu_block`. `KVM_GET_LAPIC` does not look at the counter, so an expiry counted
//! while the vCPU was out of `KVM_RUN` reads as TMCCT 0 with IRR clear: saved like
//! that, the interrupt is lost. A `KVM_RUN` with `immediate_exit` returns before that
//! loop. But a `KVM_RUN` entered with a signal pending (unblocked only inside
//! `KVM_RUN`, through `KVM_SET_SIGNAL_MASK`) goes through it without entering the
//! guest: `vcpu_enter_guest` sees the pending work before VM entry and returns 1 (a
//! halted vCPU's `vcpu_block` returns at once), the loop injects the counted timer
//! interrupts, then leaves with `KVM_EXIT_INTR`. The guest runs no instruction.

use kvm_bindings::KVMIO;
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::{ioctl_with_ref, ioctl_with_val};
use vmm_sys_util::ioctl_iow_nr;
use vmm_sys_util::signal;

mod nr {
    #![allow(missing_docs)]
    use super::*;
    ioctl_iow_nr!(
        KVM_SET_SIGNAL_MASK,
        KVMIO,
        0x8b,
        kvm_bindings::kvm_signal_mask
    );
}

/// `struct kvm_signal_mask` with its 8-byte kernel sigset (x86-64).
#[repr(C)]
struct SignalMask {
    len: u32,
    sigset: u64,
}

/// `KVM_EXIT_INTR`: KVM left `KVM_RUN` for a pending signal from its run loop.
const EXIT_INTR: u32 = kvm_bindings::KVM_EXIT_INTR;
/// Attempts before giving up (a concurrent kick's `immediate_exit` makes one return
/// early, before the run loop).
const ATTEMPTS: usize = 100;

/// Sets (`Some`) or clears (`None`) the signal mask KVM uses during `KVM_RUN`.
fn set_kvm_sigmask(fd: &VcpuFd, blocked: Option<u64>) -> Result<(), String> {
    let rc = match blocked {
        Some(sigset) => {
            let m = SignalMask { len: 8, sigset };
            // SAFETY: KVM_SET_SIGNAL_MASK reads a kvm_signal_mask header and `len`
            // (8) bytes of sigset from the pointer; `m` is that, alive for the call;
            // `fd` is a vCPU fd.
            unsafe { ioctl_with_ref(fd, nr::KVM_SET_SIGNAL_MASK(), &m) }
        }
        // SAFETY: a null argument makes KVM drop the vCPU's signal mask; nothing is
        // read from it.
        None => unsafe { ioctl_with_val(fd, nr::KVM_SET_SIGNAL_MASK(), 0) },
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(format!(
            "KVM_SET_SIGNAL_MASK: {}",
            std::io::Error::last_os_error()
        ))
    }
}

/// The kernel sigset (bit `n - 1` for signal `n`) of `signals`.
fn kernel_sigset(signals: &[libc::c_int]) -> u64 {
    signals
        .iter()
        .filter(|s| (1..=64).contains(*s))
        .fold(0u64, |a, s| a | 1u64 << (s - 1))
}

/// Runs the paused vCPU `fd` once through KVM's run loop without entering the guest,
/// so that timer expiries KVM has counted are in IRR before `KVM_GET_LAPIC`. `sig` is
/// a signal with a handler installed (the kick signal): it is blocked on this thread,
/// raised, unblocked for the `KVM_RUN` only, and consumed afterwards. An exit other
/// than `KVM_EXIT_INTR` (a request KVM turns into an exit before entry, such as a
/// pending triple fault) is an error naming it.
pub fn flush_pending_timers(fd: &mut VcpuFd, sig: libc::c_int) -> Result<(), String> {
    let blocked = signal::get_blocked_signals().map_err(|e| format!("sigprocmask: {e}"))?;
    let was_blocked = blocked.contains(&sig);
    let inside: Vec<libc::c_int> = blocked.iter().copied().filter(|s| *s != sig).collect();
    signal::block_signal(sig).map_err(|e| format!("blocking signal {sig}: {e}"))?;
    let res = flush_blocked(fd, sig, kernel_sigset(&inside));
    let cleared = set_kvm_sigmask(fd, None);
    let _ = signal::clear_signal(sig);
    if !was_blocked {
        signal::unblock_signal(sig).map_err(|e| format!("unblocking signal {sig}: {e}"))?;
    }
    cleared?;
    res
}

fn flush_blocked(fd: &mut VcpuFd, sig: libc::c_int, inside: u64) -> Result<(), String> {
    set_kvm_sigmask(fd, Some(inside))?;
    for _ in 0..ATTEMPTS {
        // SAFETY: raise() sends `sig`, blocked on this thread, to this thread; it
        // stays pending (its handler is installed) until KVM_RUN unblocks it.
        if unsafe { libc::raise(sig) } != 0 {
            return Err(format!("raise({sig}): {}", std::io::Error::last_os_error()));
        }
        fd.set_kvm_immediate_exit(0);
        fd.get_kvm_run().exit_reason = kvm_bindings::KVM_EXIT_UNKNOWN;
        match fd.run() {
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                if fd.get_kvm_run().exit_reason == EXIT_INTR {
                    return Ok(());
                }
                // A kick's immediate_exit: KVM returned before its run loop.
            }
            Err(e) => return Err(format!("KVM_RUN (timer flush): {e}")),
            Ok(exit) => return Err(format!("KVM_RUN (timer flush) exited: {exit:?}")),
        }
    }
    Err(format!(
        "KVM_RUN never reached its run loop in {ATTEMPTS} attempts"
    ))
}

/// True when the LAPIC page (`struct kvm_lapic_state`) holds an unmasked one-shot
/// timer that has expired (TMICT not 0, TMCCT 0). Such a timer's interrupt is in
/// IRR, was delivered earlier, or — if it expired after the last flush — is still
/// counted only inside KVM.
pub fn oneshot_expired(page: &[u8]) -> bool {
    let reg = |off: usize| {
        page.get(off..off + 4)
            .and_then(|b| b.try_into().ok())
            .map_or(0, u32::from_le_bytes)
    };
    let lvtt = reg(0x320);
    let oneshot = lvtt >> 17 & 3 == 0;
    let masked = lvtt & 1 << 16 != 0;
    oneshot && !masked && reg(0x380) != 0 && reg(0x390) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(lvtt: u32, tmict: u32, tmcct: u32) -> Vec<u8> {
        let mut p = vec![0u8; 1024];
        p[0x320..0x324].copy_from_slice(&lvtt.to_le_bytes());
        p[0x380..0x384].copy_from_slice(&tmict.to_le_bytes());
        p[0x390..0x394].copy_from_slice(&tmcct.to_le_bytes());
        p
    }

    /// SDM Vol. 3A §11.5.4: one-shot mode (LVTT[18:17] = 00) counts TMICT down to 0
    /// once; periodic (01) reloads; TSC-deadline (10) ignores TMICT/TMCCT.
    #[test]
    fn an_expired_oneshot_is_tmict_set_tmcct_zero_unmasked() {
        assert!(oneshot_expired(&page(0x40, 1000, 0)));
        assert!(!oneshot_expired(&page(0x40, 1000, 1)), "still counting");
        assert!(!oneshot_expired(&page(0x40, 0, 0)), "stopped, never armed");
        assert!(!oneshot_expired(&page(0x1_0040, 1000, 0)), "masked");
        assert!(!oneshot_expired(&page(0x2_0040, 1000, 0)), "periodic");
        assert!(!oneshot_expired(&page(0x4_0040, 1000, 0)), "TSC-deadline");
        assert!(!oneshot_expired(&[0u8; 16]), "short page");
    }

    /// KVM's `sigset_t` for KVM_SET_SIGNAL_MASK: signal n is bit n - 1.
    #[test]
    fn kernel_sigset_puts_signal_n_at_bit_n_minus_1() {
        assert_eq!(kernel_sigset(&[1]), 1);
        assert_eq!(kernel_sigset(&[libc::SIGINT, 64]), 1 << 1 | 1 << 63);
        assert_eq!(kernel_sigset(&[0, 65, -1]), 0);
    }
}
