//! One vCPU thread: KVM_RUN, every exit dispatched to the fabric or the devices,
//! and at every exit the APIC's verdict applied (inject, NMI, INIT/SIPI, halt, CR8).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, RwLock};
use std::time::Duration;

use kvm_bindings::{kvm_interrupt, kvm_regs, kvm_sregs, KVMIO};
use kvm_ioctls::{VcpuExit, VcpuFd, VmFd};
use vlapic::{is_apic_msr, Effects, Events};
use vmm_sys_util::ioctl::ioctl_with_ref;
use vmm_sys_util::ioctl_iow_nr;

use crate::clock::VmClock;
use crate::devices::IoBus;
use crate::irqchip::{FabricConfig, Irqchip, Wake};
use crate::kick::{lock, TimerService, VcpuKick};
use crate::migrate::{MigrationGate, PausedVcpu};
use crate::snapshot::VcpuState;
use crate::summary::{ExitReason, ExitStats, Outcome, VcpuReport};

/// KVM_INTERRUPT, which kvm-ioctls does not wrap.
mod raw {
    #![allow(missing_docs)]
    use super::*;
    ioctl_iow_nr!(KVM_INTERRUPT, KVMIO, 0x86, kvm_interrupt);
}
use raw::KVM_INTERRUPT;

/// How often a vCPU whose pending vector is held back by TPR alone is kicked to
/// re-read CR8 (VM nanoseconds).
pub const TPR_POLL_NS: u64 = 200_000;

/// How often a vCPU with a vector waiting for the interrupt window (IF=0) is
/// kicked to re-check it (VM nanoseconds).
pub const WINDOW_POLL_NS: u64 = 20_000;

/// Guest-physical page of the IOAPIC.
pub const IOAPIC_BASE: u64 = 0xFEC0_0000;
/// Default xAPIC page (used for routing while an APIC has no MMIO page).
pub const DEFAULT_APIC_PAGE: u64 = 0xFEE0_0000;

/// A count of odd guest accesses and the first address (port, MSR) seen.
#[derive(Debug, Default)]
pub struct Odd {
    count: AtomicU64,
    first: AtomicU64,
}

impl Odd {
    /// Counts one access to `addr`.
    pub fn hit(&self, addr: u64) {
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            self.first.store(addr, Ordering::Relaxed);
        }
    }

    /// Sets the count and first address (a restored run continues the saved ones).
    pub fn set(&self, count: u64, first: u64) {
        self.count.store(count, Ordering::Relaxed);
        self.first.store(first, Ordering::Relaxed);
    }

    /// (count, first address).
    pub fn get(&self) -> (u64, u64) {
        (
            self.count.load(Ordering::Relaxed),
            self.first.load(Ordering::Relaxed),
        )
    }
}

/// State shared by every vCPU thread and the main thread.
pub struct Shared {
    /// The interrupt fabric (replaced by a fresh one, imported from the old one's
    /// exported state, at each migration).
    pub chip: RwLock<Arc<Irqchip>>,
    /// How the fabric was built (for the fresh one at migration).
    pub fabric_cfg: FabricConfig,
    /// Verifier figures of fabrics replaced by migration: (max depth, violations).
    pub verifier_carry: Mutex<(u8, u64)>,
    /// Port-I/O devices.
    pub io: IoBus,
    /// Kick machinery, one per vCPU.
    pub kicks: Vec<Arc<VcpuKick>>,
    /// LAPIC timer host thread.
    pub timers: Arc<TimerService>,
    /// VM time.
    pub clock: VmClock,
    /// Set when the run ends.
    pub stop: AtomicBool,
    /// How the run ended (first writer wins).
    pub outcome: Mutex<Option<Outcome>>,
    /// Signalled when `outcome` is set.
    pub done: Condvar,
    /// vCPUs that can never run again on their own (halted with IF=0, wait-for-SIPI).
    pub stuck: Vec<AtomicBool>,
    /// MMIO outside RAM, LAPIC and IOAPIC.
    pub wild_mmio: Odd,
    /// MSR accesses answered with #GP.
    pub msr_gp: Odd,
    /// Exit counters.
    pub exits: Arc<ExitStats>,
    /// Live-migration rendezvous.
    pub migration: MigrationGate,
    /// MSRs saved and restored through KVM at migration.
    pub msr_list: Vec<u32>,
    /// `--irqchip kernel`: KVM's own LAPICs/IOAPIC (the VM, for KVM_IRQ_LINE);
    /// `chip` is then unused.
    pub kernel_irqchip: Option<Arc<VmFd>>,
}

impl Shared {
    /// The current interrupt fabric.
    pub fn chip(&self) -> Arc<Irqchip> {
        self.chip
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Ends the run with `o` (if not already ended) and kicks every vCPU.
    pub fn finish(&self, o: Outcome) {
        {
            let mut g = lock(&self.outcome);
            if g.is_none() {
                *g = Some(o);
            }
        }
        self.stop.store(true, Ordering::SeqCst);
        for k in &self.kicks {
            k.kick();
        }
        self.migration.release_all();
        self.done.notify_all();
    }

    fn kick(&self, me: usize, w: &Wake) {
        for v in w.iter() {
            if v != me {
                if let Some(k) = self.kicks.get(v) {
                    k.kick();
                }
            }
        }
    }

    fn set_stuck(&self, me: usize, stuck: bool) {
        if let Some(s) = self.stuck.get(me) {
            s.store(stuck, Ordering::SeqCst);
        }
        if stuck && self.stuck.iter().all(|s| s.load(Ordering::SeqCst)) {
            // A vCPU may look stuck while an event that frees it (SIPI, INIT, NMI)
            // is already waiting for it: only a VM with none of those is stopped.
            let now = self.clock.now_ns();
            let waiting = (0..self.stuck.len()).any(|i| {
                self.chip()
                    .with_apic(i, now, |a| (a.events().any(), Effects::default()))
                    .is_some_and(|(e, _)| e)
            });
            if !waiting && self.stuck.iter().all(|s| s.load(Ordering::SeqCst)) {
                self.finish(Outcome::AllStopped);
            }
        }
    }
}

/// What the VMM knows about a vCPU's run state that KVM does not (no in-kernel APIC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Executing guest code.
    Running,
    /// Halted; `if_flag` at the HLT.
    Halted(bool),
    /// After INIT (APs from power-up): only a SIPI starts it.
    WaitForSipi,
}

/// What the APIC says at the top of each loop iteration.
struct Verdict {
    events: Events,
    injected: Option<u8>,
    pending: bool,
    /// An IRR vector is held back by TPR alone (not by ISR).
    tpr_blocked: bool,
    cr8: u64,
    deadline: Option<u64>,
    mmio_base: Option<u64>,
}

/// One vCPU and its thread-local state.
pub struct Vcpu {
    /// vCPU index (= APIC ID).
    pub index: usize,
    /// The KVM vCPU.
    pub fd: VcpuFd,
    /// Reset-state special registers (real mode), the template for SIPI.
    pub reset_sregs: kvm_sregs,
    /// The run state to start in: running (BSP), wait-for-SIPI (APs at boot), or
    /// whatever a restored vCPU was in.
    pub start: RunState,
    /// Events already taken from the APIC, to act on first (a restored vCPU's).
    pub carried: Events,
    /// Counters to continue from (interrupts, NMIs, SIPIs; a restored vCPU's).
    pub counters: [u64; 3],
}

/// Runs a vCPU until the run ends; returns the vCPU (so its `kvm_run` mapping
/// outlives every kicker) and its report.
pub fn run_vcpu(mut v: Vcpu, sh: Arc<Shared>) -> (Vcpu, VcpuReport) {
    let me = v.index;
    let kick = sh.kicks.get(me).cloned();
    let mut rep = VcpuReport {
        index: me,
        interrupts: v.counters[0],
        nmis: v.counters[1],
        sipis: v.counters[2],
        ..VcpuReport::default()
    };
    let Some(kick) = kick else {
        sh.finish(Outcome::VmmError(format!("vcpu{me}: no kick slot")));
        return (v, rep);
    };
    let ie: *mut u8 = &mut v.fd.get_kvm_run().immediate_exit;
    // SAFETY: `ie` points into this vCPU's kvm_run mapping, which lives as long as
    // `v.fd`; we unregister below before returning `v` (and `v` is only dropped
    // after every thread that could kick has been joined).
    unsafe { kick.register(ie) };
    let state = match sh.kernel_irqchip.clone() {
        Some(vm) => kernel_loop(&mut v, &sh, &vm, &kick, &mut rep),
        None => vcpu_loop(&mut v, &sh, &kick, &mut rep),
    };
    kick.unregister();
    rep.state = match state {
        RunState::Running => "running".into(),
        RunState::Halted(true) => "halted".into(),
        RunState::Halted(false) => "halted (IF=0)".into(),
        RunState::WaitForSipi => "wait-for-SIPI".into(),
    };
    rep.rip = v.fd.get_regs().map(|r| r.rip).unwrap_or(0);
    (v, rep)
}

fn start_at_sipi(v: &Vcpu, vector: u8) -> Result<(), String> {
    let mut s = v.reset_sregs;
    s.cs.selector = u16::from(vector) << 8;
    s.cs.base = u64::from(vector) << 12;
    v.fd.set_sregs(&s)
        .map_err(|e| format!("KVM_SET_SREGS (SIPI): {e}"))?;
    let regs = kvm_regs {
        rflags: 2,
        rip: 0,
        ..kvm_regs::default()
    };
    v.fd.set_regs(&regs)
        .map_err(|e| format!("KVM_SET_REGS (SIPI): {e}"))?;
    // INIT also drops whatever KVM still had queued for the old context (an
    // injected vector, a pending NMI or exception, an interrupt shadow).
    let events = kvm_bindings::kvm_vcpu_events {
        flags: kvm_bindings::KVM_VCPUEVENT_VALID_NMI_PENDING
            | kvm_bindings::KVM_VCPUEVENT_VALID_SHADOW,
        ..Default::default()
    };
    v.fd.set_vcpu_events(&events)
        .map_err(|e| format!("KVM_SET_VCPU_EVENTS (SIPI): {e}"))?;
    crate::vm::init_fpu(&v.fd).map_err(|e| e.to_string())
}

/// The loop for `--irqchip kernel`: KVM's LAPIC handles APIC accesses, HLT,
/// INIT/SIPI and injection; we only serve port I/O and report the end.
fn kernel_loop(
    v: &mut Vcpu,
    sh: &Shared,
    vm: &VmFd,
    kick: &VcpuKick,
    rep: &mut VcpuReport,
) -> RunState {
    let me = v.index;
    while !sh.stop.load(Ordering::SeqCst) {
        let mut end: Option<Outcome> = None;
        let mut why = ExitReason::Other;
        let res = v.fd.run();
        kick.clear_immediate_exit();
        match res {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    why = ExitReason::IoIn;
                    sh.io.port_in(port, data);
                }
                VcpuExit::IoOut(port, data) => {
                    why = ExitReason::IoOut;
                    let o = sh.io.port_out(port, data);
                    if let Some((pin, level)) = o.irq {
                        if let Err(e) = vm.set_irq_line(pin, level) {
                            end = Some(Outcome::VmmError(format!("KVM_IRQ_LINE({pin}): {e}")));
                        }
                    }
                    if let Some(n) = o.exit {
                        end = Some(Outcome::DebugExit(n));
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    why = ExitReason::MmioRead;
                    sh.wild_mmio.hit(addr);
                    data.fill(0xFF);
                }
                VcpuExit::MmioWrite(addr, _) => {
                    why = ExitReason::MmioWrite;
                    sh.wild_mmio.hit(addr);
                }
                VcpuExit::Hlt => why = ExitReason::Hlt,
                VcpuExit::IrqWindowOpen => why = ExitReason::IrqWindow,
                VcpuExit::Intr => why = ExitReason::Kick,
                VcpuExit::Shutdown => {
                    end = Some(Outcome::GuestCrash(format!(
                        "vcpu{me}: triple fault (KVM_EXIT_SHUTDOWN)"
                    )))
                }
                VcpuExit::InternalError => {
                    end = Some(Outcome::GuestCrash(format!("vcpu{me}: KVM internal error")))
                }
                other => {
                    end = Some(Outcome::GuestCrash(format!(
                        "vcpu{me}: unexpected VM exit {other:?}"
                    )))
                }
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                why = ExitReason::Kick
            }
            Err(e) => end = Some(Outcome::VmmError(format!("KVM_RUN: {e}"))),
        }
        sh.exits.count(me, why);
        if let Some(o) = end {
            sh.finish(o);
            break;
        }
    }
    rep.exits = sh.exits.vcpu(me);
    RunState::Running
}

/// Pauses this vCPU for a migration: saves its state, waits for its vCPU in the
/// new VM, swaps it in (re-registering the kick target) and loads the state.
/// Returns the run state to continue with and the APIC events carried over,
/// or `None` if the run ended.
fn migrate_here(
    v: &mut Vcpu,
    sh: &Shared,
    kick: &VcpuKick,
    state: RunState,
    carried: Events,
    rep: &VcpuReport,
) -> Result<Option<(RunState, Events)>, String> {
    // An I/O, MMIO or MSR exit is only complete (RIP advanced, IN/RDMSR data in the
    // registers) after the next KVM_RUN: re-enter once with immediate_exit set so
    // KVM finishes it without running guest code, then save.
    kick.set_immediate_exit();
    match v.fd.run() {
        Err(e) if e.errno() == libc::EINTR => {}
        Err(e) => return Err(format!("completing the last exit: KVM_RUN: {e}")),
        Ok(exit) => return Err(format!("completing the last exit: unexpected {exit:?}")),
    }
    kick.clear_immediate_exit();
    let saved = PausedVcpu {
        kvm: VcpuState::save(&v.fd, &sh.msr_list)?,
        run: state,
        events: carried,
        counters: [rep.interrupts, rep.nmis, rep.sipis],
    };
    let Some((fd, st, events)) = sh.migration.pause(v.index, saved, &sh.stop) else {
        return Ok(None);
    };
    kick.unregister();
    let old = std::mem::replace(&mut v.fd, fd);
    drop(old);
    let ie: *mut u8 = &mut v.fd.get_kvm_run().immediate_exit;
    // SAFETY: as in `run_vcpu`: `ie` points into the new vCPU's kvm_run mapping,
    // owned by `v.fd`, which outlives the registration.
    unsafe { kick.register(ie) };
    st.kvm.restore(&v.fd, || sh.clock.guest_tsc())?;
    Ok(Some((st.run, merge_events(st.events, events))))
}

/// `a` then `b`: flags or'ed, NMIs added (at most 2), the later SIPI vector wins.
fn merge_events(a: Events, b: Events) -> Events {
    Events {
        nmi: a.nmi.saturating_add(b.nmi).min(2),
        smi: a.smi || b.smi,
        init: a.init || b.init,
        sipi: b.sipi.or(a.sipi),
        extint: a.extint || b.extint,
    }
}

fn vcpu_loop(v: &mut Vcpu, sh: &Shared, kick: &VcpuKick, rep: &mut VcpuReport) -> RunState {
    let me = v.index;
    let mut state = v.start;
    let mut last_cr8: u64;
    let mut armed: Option<u64> = None;
    let mut carried = std::mem::take(&mut v.carried);

    while !sh.stop.load(Ordering::SeqCst) {
        if sh.migration.requested.load(Ordering::SeqCst) {
            match migrate_here(v, sh, kick, state, std::mem::take(&mut carried), rep) {
                Ok(Some((s, ev))) => {
                    state = s;
                    carried = merge_events(carried, ev);
                }
                Ok(None) => break,
                Err(e) => {
                    sh.finish(Outcome::VmmError(format!("vcpu{me}: migration: {e}")));
                    break;
                }
            }
            continue;
        }
        kick.clear_token();
        let chip = sh.chip();
        let now = sh.clock.now_ns();
        let (ready, if_flag) = {
            let r = v.fd.get_kvm_run();
            (r.ready_for_interrupt_injection != 0, r.if_flag != 0)
        };
        let can_inject = ready
            && match state {
                RunState::Running => if_flag,
                RunState::Halted(halt_if) => halt_if && if_flag,
                RunState::WaitForSipi => false,
            };
        let Some((vd, wake)) = chip.with_apic(me, now, |a| {
            a.advance(now);
            let events = merge_events(std::mem::take(&mut carried), a.take_events());
            let injected = if can_inject && !events.init {
                a.acknowledge()
            } else {
                None
            };
            let vd = Verdict {
                events,
                injected,
                pending: a.pending_vector().is_some(),
                tpr_blocked: a.pending_vector().is_none()
                    && a.irr()
                        .highest()
                        .is_some_and(|v| v >> 4 > a.isr().highest().unwrap_or(0) >> 4),
                cr8: a.cr8(),
                deadline: a.next_timer_deadline(),
                mmio_base: a.mmio_base(),
            };
            (vd, Effects::default())
        }) else {
            sh.finish(Outcome::VmmError(format!("vcpu{me}: no APIC")));
            break;
        };
        sh.kick(me, &wake);
        let mmio_base = vd.mmio_base;
        // A guest that lowers CR8 does not always exit (KVM's emulator path gives
        // no KVM_EXIT_SET_TPR), so while TPR alone holds a vector back, poll.
        // Likewise the interrupt-window exit can come late here (a pending vector
        // is often taken only at some later exit after STI): while a vector waits
        // for IF, poll faster.
        let window_wait = vd.pending
            && vd.injected.is_none()
            && matches!(state, RunState::Running | RunState::Halted(true));
        let poll = if window_wait {
            Some(WINDOW_POLL_NS)
        } else if vd.tpr_blocked && state == RunState::Running {
            Some(TPR_POLL_NS)
        } else {
            None
        };
        let want = match poll {
            Some(p) => {
                let t = now.saturating_add(p);
                Some(vd.deadline.map_or(t, |d| d.min(t)))
            }
            None => vd.deadline,
        };
        if want != armed {
            armed = want;
            sh.timers.arm(me, armed);
        }

        if vd.events.init {
            state = RunState::WaitForSipi;
        }
        if let Some(page) = vd.events.sipi {
            if state == RunState::WaitForSipi {
                if let Err(e) = start_at_sipi(v, page) {
                    sh.finish(Outcome::VmmError(format!("vcpu{me}: {e}")));
                    break;
                }
                rep.sipis += 1;
                state = RunState::Running;
            }
        }
        if state == RunState::WaitForSipi {
            sh.set_stuck(me, true);
            kick.park(Duration::from_millis(100));
            // We re-evaluate everything at the top: a kick that woke us needs no VM exit.
            kick.clear_immediate_exit();
            sh.set_stuck(me, false);
            continue;
        }
        if vd.events.nmi > 0 {
            // One KVM_NMI per NMI: KVM, like the core, takes one and latches one.
            let mut failed = None;
            for _ in 0..vd.events.nmi {
                if let Err(e) = v.fd.nmi() {
                    failed = Some(e);
                    break;
                }
                rep.nmis += 1;
            }
            if let Some(e) = failed {
                sh.finish(Outcome::VmmError(format!("vcpu{me}: KVM_NMI: {e}")));
                break;
            }
            state = RunState::Running;
        }
        if let Some(vec) = vd.injected {
            let irq = kvm_interrupt {
                irq: u32::from(vec),
            };
            // SAFETY: KVM_INTERRUPT reads one kvm_interrupt from the pointer we pass,
            // which lives for the duration of the call; the fd is a vCPU fd.
            let rc = unsafe { ioctl_with_ref(&v.fd, KVM_INTERRUPT(), &irq) };
            if rc != 0 {
                let e = std::io::Error::last_os_error();
                sh.finish(Outcome::VmmError(format!(
                    "vcpu{me}: KVM_INTERRUPT({vec:#x}): {e}"
                )));
                break;
            }
            rep.interrupts += 1;
            state = RunState::Running;
        }
        if let RunState::Halted(halt_if) = state {
            if vd.pending && halt_if {
                state = RunState::Running;
            } else {
                if !halt_if {
                    sh.set_stuck(me, true);
                }
                kick.park(Duration::from_millis(100));
                // We re-evaluate everything at the top: a kick that woke us needs no VM exit.
                kick.clear_immediate_exit();
                if !halt_if {
                    sh.set_stuck(me, false);
                }
                continue;
            }
        }

        {
            let r = v.fd.get_kvm_run();
            r.request_interrupt_window = u8::from(vd.pending && vd.injected.is_none());
            r.cr8 = vd.cr8;
        }
        last_cr8 = vd.cr8;

        let mut wake = None;
        let mut end: Option<Outcome> = None;
        let mut why = ExitReason::Other;
        // Where KVM leaves the guest's CR8 when KVM_RUN returns.
        let cr8_slot: *const u64 = std::ptr::addr_of!(v.fd.get_kvm_run().cr8);
        let res = v.fd.run();
        kick.clear_immediate_exit();
        // Fold a guest `mov cr8` into TPR *before* handling the exit: the exit may be a
        // TPR/PPR access (or an EOI) that must see the new value.
        // SAFETY: `cr8_slot` points into this vCPU's kvm_run mapping, which lives as long
        // as `v.fd`; KVM_RUN has returned, so KVM is not writing it; only this thread
        // touches this vCPU's kvm_run, and the exit's borrowed buffers (I/O data, MMIO
        // data, MSR data) do not cover the `cr8` field.
        let cr8_now = unsafe { cr8_slot.read_volatile() };
        let mut apic_base_written = false;
        if cr8_now != last_cr8 {
            let _ = chip.with_apic(me, sh.clock.now_ns(), |a| {
                let _ = a.set_cr8(cr8_now);
                ((), Effects::default())
            });
        }
        match res {
            Ok(exit) => match exit {
                VcpuExit::IoIn(port, data) => {
                    why = ExitReason::IoIn;
                    sh.io.port_in(port, data);
                }
                VcpuExit::IoOut(port, data) => {
                    why = ExitReason::IoOut;
                    let o = sh.io.port_out(port, data);
                    if let Some((pin, level)) = o.irq {
                        wake = Some(chip.set_irq_line(pin, level, now));
                    }
                    if let Some(n) = o.exit {
                        end = Some(Outcome::DebugExit(n));
                    }
                }
                VcpuExit::MmioRead(addr, data) => {
                    why = ExitReason::MmioRead;
                    let page = addr & !0xFFF;
                    let now = sh.clock.now_ns();
                    if Some(page) == mmio_base || (mmio_base.is_none() && page == DEFAULT_APIC_PAGE)
                    {
                        chip.lapic_mmio_read(me, addr & 0xFFF, data, now);
                    } else if page == IOAPIC_BASE {
                        chip.ioapic_mmio_read(addr & 0xFFF, data, now);
                    } else {
                        sh.wild_mmio.hit(addr);
                        data.fill(0xFF);
                    }
                }
                VcpuExit::MmioWrite(addr, data) => {
                    why = ExitReason::MmioWrite;
                    let page = addr & !0xFFF;
                    let now = sh.clock.now_ns();
                    if Some(page) == mmio_base || (mmio_base.is_none() && page == DEFAULT_APIC_PAGE)
                    {
                        wake = Some(chip.lapic_mmio_write(me, addr & 0xFFF, data, now));
                    } else if page == IOAPIC_BASE {
                        wake = Some(chip.ioapic_mmio_write(addr & 0xFFF, data, now));
                    } else {
                        sh.wild_mmio.hit(addr);
                    }
                }
                VcpuExit::X86Rdmsr(m) => {
                    why = ExitReason::Rdmsr;
                    let now = sh.clock.now_ns();
                    match is_apic_msr(m.index).then(|| chip.lapic_msr_read(me, m.index, now)) {
                        Some(Ok(val)) => *m.data = val,
                        _ => {
                            sh.msr_gp.hit(u64::from(m.index));
                            *m.error = 1;
                        }
                    }
                }
                VcpuExit::X86Wrmsr(m) => {
                    why = ExitReason::Wrmsr;
                    let now = sh.clock.now_ns();
                    match is_apic_msr(m.index)
                        .then(|| chip.lapic_msr_write(me, m.index, m.data, now))
                    {
                        Some(Ok(w)) => {
                            wake = Some(w);
                            apic_base_written = m.index == vlapic::regs::MSR_APIC_BASE;
                        }
                        _ => {
                            sh.msr_gp.hit(u64::from(m.index));
                            *m.error = 1;
                        }
                    }
                }
                VcpuExit::Hlt => why = ExitReason::Hlt,
                VcpuExit::IrqWindowOpen => why = ExitReason::IrqWindow,
                VcpuExit::SetTpr => why = ExitReason::SetTpr,
                VcpuExit::Intr => why = ExitReason::Kick,
                VcpuExit::Shutdown => {
                    end = Some(Outcome::GuestCrash(
                        "triple fault (KVM_EXIT_SHUTDOWN)".into(),
                    ))
                }
                VcpuExit::FailEntry(reason, cpu) => {
                    end = Some(Outcome::GuestCrash(format!(
                    "KVM_EXIT_FAIL_ENTRY: hardware entry failure reason {reason:#x} on cpu {cpu}"
                )))
                }
                VcpuExit::InternalError => {
                    end = Some(Outcome::GuestCrash("KVM internal error".into()))
                }
                VcpuExit::SystemEvent(t, _) => {
                    end = Some(Outcome::GuestCrash(format!("KVM system event {t}")))
                }
                other => end = Some(Outcome::GuestCrash(format!("unexpected VM exit {other:?}"))),
            },
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                why = ExitReason::Kick
            }
            Err(e) => end = Some(Outcome::VmmError(format!("KVM_RUN: {e}"))),
        }
        sh.exits.count(me, why);
        if why == ExitReason::Hlt {
            let r = v.fd.get_kvm_run();
            state = RunState::Halted(r.if_flag != 0);
        }
        if let Some(mut o) = end {
            if let Outcome::GuestCrash(m) = &mut o {
                let r = v.fd.get_kvm_run();
                if r.exit_reason == kvm_bindings::KVM_EXIT_INTERNAL_ERROR {
                    // SAFETY: exit_reason says the `internal` union member is the live one.
                    let int = unsafe { r.__bindgen_anon_1.internal };
                    let n = (int.ndata as usize).min(int.data.len());
                    let data: Vec<String> =
                        int.data.iter().take(n).map(|d| format!("{d:#x}")).collect();
                    m.push_str(&format!(
                        " (suberror {}, data [{}])",
                        int.suberror,
                        data.join(", ")
                    ));
                }
                let rip = v.fd.get_regs().map(|r| r.rip).unwrap_or(0);
                let cr =
                    v.fd.get_sregs()
                        .map(|s| format!(" [cr0={:#x} cr4={:#x} efer={:#x}]", s.cr0, s.cr4, s.efer))
                        .unwrap_or_default();
                *m = format!("vcpu{me} at rip {rip:#x}: {m}{cr}");
            }
            sh.finish(o);
            break;
        }
        if let Some(w) = wake {
            sh.kick(me, &w);
        }
        if apic_base_written {
            mirror_apic_base(v, &chip, me, sh.clock.now_ns());
        }
    }
    rep.exits = sh.exits.vcpu(me);
    state
}

/// Tells KVM the APIC base the guest now has. 0x1B is filtered to userspace, so KVM
/// never sees the guest's writes; a host-side KVM_SET_MSRS lets it keep the
/// CPUID.1:EDX.APIC bit (bit 9) in step with IA32_APIC_BASE.EN (SDM Vol. 3A §11.4.3).
/// Best effort: a KVM that refuses leaves only that CPUID bit stale.
fn mirror_apic_base(v: &mut Vcpu, chip: &Irqchip, me: usize, now: u64) {
    let Some((base, _)) = chip.with_apic(me, now, |a| (a.apic_base(), Effects::default())) else {
        return;
    };
    let entry = kvm_bindings::kvm_msr_entry {
        index: vlapic::regs::MSR_APIC_BASE,
        data: base,
        ..Default::default()
    };
    if let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[entry]) {
        let _ = v.fd.set_msrs(&msrs);
    }
}
