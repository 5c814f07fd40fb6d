//! Getting a vCPU out of KVM_RUN or out of its halt: `immediate_exit` plus a
//! signal (the Firecracker pattern) and a per-vCPU parker for vCPUs halted in userspace.

use std::sync::atomic::{fence, AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::{Condvar, Mutex, OnceLock};
use std::time::Duration;

use crate::lock;

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only interrupts KVM_RUN; the acquire fence pairs with the kicker's release.
    fence(Ordering::Acquire);
}

/// The real-time signal used for kicks (registered once per process).
pub fn kick_signal() -> Result<libc::c_int, String> {
    static SIG: OnceLock<Result<libc::c_int, String>> = OnceLock::new();
    SIG.get_or_init(|| {
        let sig = vmm_sys_util::signal::SIGRTMIN();
        vmm_sys_util::signal::register_signal_handler(sig, kick_handler)
            .map_err(|e| format!("cannot install the vCPU kick signal handler: {e}"))?;
        Ok(sig)
    })
    .clone()
}

/// Where a kick lands while the vCPU thread runs: its `kvm_run.immediate_exit`
/// byte and its pthread.
struct KickTarget {
    immediate_exit: *mut u8,
    thread: libc::pthread_t,
}

// SAFETY: the pointer is only dereferenced (atomically) while the target is
// registered, and the owning vCPU thread unregisters before its `VcpuFd`
// (and thus the `kvm_run` mapping) can be dropped.
unsafe impl Send for KickTarget {}

/// Per-vCPU wake-up machinery shared by every thread that may kick it.
pub struct VcpuKick {
    target: Mutex<Option<KickTarget>>,
    /// The wake token: set by `unpark`, consumed by `park`, cleared before a re-check.
    token: AtomicBool,
    /// Held by `park` while it checks the token and waits, and by `unpark` to notify.
    parked: Mutex<()>,
    cv: Condvar,
    signal: libc::c_int,
    /// Kicks sent to this vCPU.
    pub kicks: AtomicU64,
}

impl VcpuKick {
    /// Kick machinery using `signal` (see [`kick_signal`]).
    pub fn new(signal: libc::c_int) -> Self {
        Self {
            target: Mutex::new(None),
            token: AtomicBool::new(false),
            parked: Mutex::new(()),
            cv: Condvar::new(),
            signal,
            kicks: AtomicU64::new(0),
        }
    }

    /// Registers the calling thread and its `kvm_run.immediate_exit` byte.
    ///
    /// # Safety
    /// `immediate_exit` must point into the vCPU's `kvm_run` mapping and stay valid
    /// until [`VcpuKick::unregister`] is called from the same thread.
    pub unsafe fn register(&self, immediate_exit: *mut u8) {
        // SAFETY: pthread_self has no preconditions.
        let thread = unsafe { libc::pthread_self() };
        *lock(&self.target) = Some(KickTarget {
            immediate_exit,
            thread,
        });
    }

    /// Unregisters the vCPU thread (before it exits or drops its `VcpuFd`).
    pub fn unregister(&self) {
        *lock(&self.target) = None;
    }

    /// Clears `immediate_exit` (vCPU thread, after KVM_RUN returned).
    pub fn clear_immediate_exit(&self) {
        if let Some(t) = lock(&self.target).as_ref() {
            // SAFETY: registered targets point into a live kvm_run (see `register`);
            // the byte is accessed atomically by every thread.
            unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(0, Ordering::Release);
        }
    }

    /// Sets `immediate_exit` (vCPU thread: the next KVM_RUN only completes the
    /// pending I/O, MMIO or MSR operation and returns EINTR).
    pub fn set_immediate_exit(&self) {
        if let Some(t) = lock(&self.target).as_ref() {
            // SAFETY: as in `clear_immediate_exit`.
            unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(1, Ordering::Release);
        }
    }

    /// Makes the vCPU re-evaluate its interrupt state soon: leaves KVM_RUN at once
    /// (or skips the next one) and wakes it from a halt.
    pub fn kick(&self) {
        self.kicks.fetch_add(1, Ordering::Relaxed);
        if let Some(t) = lock(&self.target).as_ref() {
            // SAFETY: as in `clear_immediate_exit`.
            unsafe { AtomicU8::from_ptr(t.immediate_exit) }.store(1, Ordering::Release);
            fence(Ordering::Release);
            // SAFETY: the thread is registered, so it has not exited (it unregisters
            // under this same lock before exiting). A failure (ESRCH) is harmless.
            unsafe { libc::pthread_kill(t.thread, self.signal) };
        }
        self.unpark();
    }

    /// Wakes the vCPU from [`VcpuKick::park`] (or makes its next park return at once).
    pub fn unpark(&self) {
        self.token.store(true, Ordering::Release);
        // Taken after the token is set: a parker that saw no token is already waiting.
        let _g = lock(&self.parked);
        self.cv.notify_all();
    }

    /// Sleeps until unparked or `timeout` passes; consumes the wake token.
    pub fn park(&self, timeout: Duration) {
        let g = lock(&self.parked);
        if !self.token.swap(false, Ordering::AcqRel) {
            let _g = match self.cv.wait_timeout(g, timeout) {
                Ok((g, _)) => g,
                Err(e) => e.into_inner().0,
            };
            self.token.store(false, Ordering::Release);
        }
    }

    /// Discards a pending wake token (before re-checking for work); lock-free.
    pub fn clear_token(&self) {
        self.token.store(false, Ordering::Release);
    }
}
