//! The two things kvm-ioctls does not wrap for a VMM without an in-kernel irqchip:
//! the `KVM_INTERRUPT` ioctl and a read of `kvm_run.cr8` while an exit is borrowed.

use kvm_bindings::{kvm_interrupt, KVMIO};
use kvm_ioctls::VcpuFd;
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

mod nr {
    #![allow(missing_docs)]
    use super::*;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}

/// Queues external interrupt `vector` for injection at the next entry (the vCPU
/// must be ready for injection with IF = 1).
pub(crate) fn interrupt(fd: &VcpuFd, vector: u8) -> std::io::Result<()> {
    let irq = kvm_interrupt {
        irq: u32::from(vector),
    };
    // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer we pass, which
    // lives for the duration of the call; `fd` is a vCPU fd.
    let rc = unsafe { ioctl_with_ref(fd, nr::KVM_INTERRUPT(), &irq) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The vCPU's `kvm_run` fields KVM leaves on `KVM_RUN` return (CR8, IF), readable
/// while the exit (which borrows the `VcpuFd`) is alive.
pub(crate) struct RunSlot(*const kvm_bindings::kvm_run);

impl RunSlot {
    /// The `kvm_run` of `fd`.
    pub(crate) fn of(fd: &mut VcpuFd) -> Self {
        RunSlot(std::ptr::from_mut(fd.get_kvm_run()).cast_const())
    }

    /// CR8 after `KVM_RUN` returned.
    ///
    /// # Safety
    /// The `VcpuFd` this slot was taken from must still be alive (its `kvm_run`
    /// mapping lives as long as it) and `KVM_RUN` must have returned on this thread.
    pub(crate) unsafe fn cr8(&self) -> u64 {
        // SAFETY: per the contract the mapping is live and KVM is not writing it (no
        // KVM_RUN in progress for this vCPU, which only this thread runs); the exit's
        // borrowed buffers (I/O, MMIO, MSR data) do not cover this field.
        unsafe { std::ptr::addr_of!((*self.0).cr8).read_volatile() }
    }

    /// IF after `KVM_RUN` returned.
    ///
    /// # Safety
    /// As for [`RunSlot::cr8`].
    pub(crate) unsafe fn if_flag(&self) -> bool {
        // SAFETY: as in `cr8`.
        unsafe { std::ptr::addr_of!((*self.0).if_flag).read_volatile() != 0 }
    }
}

/// Suberror and data of a `KVM_EXIT_INTERNAL_ERROR` left in `fd`'s `kvm_run`.
pub(crate) fn internal_error(fd: &mut VcpuFd) -> Option<(u32, Vec<u64>)> {
    let r = fd.get_kvm_run();
    if r.exit_reason != kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
        return None;
    }
    // SAFETY: exit_reason says the `internal` union member is the live one.
    let int = unsafe { r.__bindgen_anon_1.internal };
    let n = (int.ndata as usize).min(int.data.len());
    Some((int.suberror, int.data.iter().take(n).copied().collect()))
}
