//! The vCPU adapter: one `KVM_RUN` per call with every APIC duty done around it
//! (entry plan, injection, NMI, INIT/SIPI, HLT parking, polls, CR8, APIC exits).

use std::sync::Arc;

use kvm_bindings::kvm_sregs;
use kvm_ioctls::VcpuFd;
use vlapic::fabric::SharedFabric;
use vlapic::regs::MSR_APIC_BASE;
use vlapic::{EntryPlan, Events};

use crate::exit::{decode, Decoded};
use crate::kick::VcpuKick;
use crate::raw::{self, RunSlot};
use crate::softint::SoftIntOutcome;
use crate::{reset, ApicRuntime, Error};

mod tpr_step;

pub use crate::exit::{Exit, Handled};

/// What the VMM knows of a vCPU's run state that KVM does not hold without an
/// in-kernel APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RunState {
    /// Executing guest code.
    Running,
    /// Halted; the guest's IF at the HLT (a halt with IF = 0 only ends by NMI/INIT).
    Halted(bool),
    /// After INIT (APs from power-up): only a SIPI starts it.
    WaitForSipi,
}

/// Counters of what the adapter did for one vCPU.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuCounters {
    /// Vectors injected with `KVM_INTERRUPT`.
    pub interrupts: u64,
    /// NMIs injected with `KVM_NMI`.
    pub nmis: u64,
    /// SIPIs that started the vCPU.
    pub sipis: u64,
    /// Of [`VcpuCounters::interrupts`], the vectors taken from the ExtINT source (the
    /// embedder's 8259), which no local APIC acknowledges or retires.
    pub extints: u64,
    /// `int3` / `int n` delivered by [`ApicVcpu::deliver_soft_interrupt`] (including
    /// those whose delivery raised a fault, which was injected instead).
    pub soft_interrupts: u64,
}

/// One vCPU run by the adapter. Call [`ApicVcpu::run`] in a loop on one thread.
pub struct ApicVcpu {
    index: usize,
    fd: VcpuFd,
    rt: Arc<ApicRuntime>,
    /// The runtime's fabric as of `fabric_gen` (re-read only when it was replaced).
    fabric: Arc<SharedFabric>,
    fabric_gen: u64,
    kick: Arc<VcpuKick>,
    registered: Option<libc::pthread_t>,
    state: RunState,
    carried: Events,
    armed: Option<u64>,
    last_cr8: u64,
    reset_sregs: kvm_sregs,
    counters: VcpuCounters,
    mirror_base: bool,
    /// A KVM_NMI was issued and KVM may still hold it (not yet delivered).
    nmi_outstanding: bool,
    /// The last exit makes KVM inject an exception at the next entry (a #GP).
    event_pending: bool,
    /// Single-steps left in this held-by-TPR episode, and whether one was seen.
    step_left: u32,
    held_seen: bool,
    stepping: bool,
    /// Guest RAM for the software-interrupt workaround (`None`: off).
    soft_int_ram: Option<vm_memory::GuestMemoryMmap>,
}

impl std::fmt::Debug for ApicVcpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApicVcpu")
            .field("index", &self.index)
            .field("state", &self.state)
            .field("counters", &self.counters)
            .finish_non_exhaustive()
    }
}

/// `a` then `b`: flags or'ed, NMIs added (at most 2: one taken, one latched), the
/// later SIPI vector wins.
pub fn merge_events(a: Events, b: Events) -> Events {
    let mut e = a;
    e.nmi = a.nmi.saturating_add(b.nmi).min(2);
    e.smi |= b.smi;
    e.init |= b.init;
    e.sipi = b.sipi.or(a.sipi);
    e.extint |= b.extint;
    e
}

impl ApicVcpu {
    /// The adapter for vCPU `index` of `rt`'s fabric, running `fd` (made with
    /// [`crate::setup::create_vcpu`]). Starts running if its APIC is the BSP, else in
    /// wait-for-SIPI; [`ApicVcpu::set_state`] changes that (a restored vCPU).
    pub fn new(rt: Arc<ApicRuntime>, index: usize, fd: VcpuFd) -> Result<Self, Error> {
        let kick = rt.kicker(index).ok_or(Error::NoSuchVcpu(index))?;
        let bsp = rt
            .fabric()
            .read_apic(index, |a| a.config().bsp)
            .ok_or(Error::NoSuchVcpu(index))?;
        let reset_sregs = fd.get_sregs().map_err(|e| Error::kvm("KVM_GET_SREGS", e))?;
        let fabric_gen = rt.generation();
        let fabric = rt.fabric();
        Ok(Self {
            index,
            fd,
            rt,
            fabric,
            fabric_gen,
            kick,
            registered: None,
            state: if bsp {
                RunState::Running
            } else {
                RunState::WaitForSipi
            },
            carried: Events::default(),
            armed: None,
            last_cr8: 0,
            reset_sregs,
            counters: VcpuCounters::default(),
            mirror_base: false,
            nmi_outstanding: false,
            event_pending: false,
            step_left: 0,
            held_seen: false,
            stepping: false,
            soft_int_ram: None,
        })
    }

    /// The vCPU index (= fabric index).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The KVM vCPU (for saving its registers; do not run it yourself).
    pub fn fd(&self) -> &VcpuFd {
        &self.fd
    }

    /// Replaces the KVM vCPU (live migration into a new VM) and returns the old one.
    pub fn replace_fd(&mut self, fd: VcpuFd) -> VcpuFd {
        self.unregister();
        // The new vCPU has no guest-debug (single-step) setting yet.
        self.stepping = false;
        std::mem::replace(&mut self.fd, fd)
    }

    /// The run state.
    pub fn state(&self) -> RunState {
        self.state
    }

    /// Sets the run state (a restored or migrated vCPU).
    pub fn set_state(&mut self, s: RunState) {
        self.state = s;
    }

    /// Events taken from the APIC but not yet acted on (saved with a paused vCPU).
    pub fn take_carried(&mut self) -> Events {
        std::mem::take(&mut self.carried)
    }

    /// Adds events to act on at the next entry (a restored vCPU's).
    pub fn carry(&mut self, e: Events) {
        self.carried = merge_events(self.carried, e);
    }

    /// What the adapter did so far.
    pub fn counters(&self) -> VcpuCounters {
        self.counters
    }

    /// Continues the counters of a restored vCPU.
    pub fn set_counters(&mut self, c: VcpuCounters) {
        self.counters = c;
    }

    /// Registers this thread as the kick target (again after a move or a new fd).
    fn ensure_registered(&mut self) {
        // SAFETY: pthread_self has no preconditions.
        let me = unsafe { libc::pthread_self() };
        // SAFETY: pthread_equal compares two thread handles.
        if self
            .registered
            .is_some_and(|t| unsafe { libc::pthread_equal(t, me) } != 0)
        {
            return;
        }
        let ie: *mut u8 = &mut self.fd.get_kvm_run().immediate_exit;
        // SAFETY: `ie` points into the kvm_run mapping owned by `self.fd`; it is
        // unregistered (in `replace_fd` and `Drop`) before that fd is dropped, and
        // registered from the thread that runs the vCPU.
        unsafe { self.kick.register(ie) };
        self.registered = Some(me);
    }

    fn unregister(&mut self) {
        if self.registered.take().is_some() {
            self.kick.unregister();
        }
    }

    /// Tells KVM the APIC base the guest now has: 0x1B is filtered to userspace, so
    /// KVM never sees the guest's writes; this keeps CPUID.1:EDX.APIC in step with
    /// IA32_APIC_BASE.EN (SDM Vol. 3A §11.4.3). Best effort.
    fn mirror_apic_base(&mut self) {
        let Some(base) = self.fabric.read_apic(self.index, |a| a.apic_base()) else {
            return;
        };
        let entry = kvm_bindings::kvm_msr_entry {
            index: MSR_APIC_BASE,
            data: base,
            ..Default::default()
        };
        if let Ok(msrs) = kvm_bindings::Msrs::from_entries(&[entry]) {
            let _ = self.fd.set_msrs(&msrs);
        }
    }

    /// Parks a vCPU that cannot run (halted, waiting for SIPI) until kicked.
    fn park(&mut self, stuck: bool) -> Exit<'static> {
        if stuck && self.rt.set_stuck(self.index, true) {
            return Exit::AllStopped;
        }
        self.kick.park(self.rt.poll().park_timeout);
        // Everything is re-evaluated at the next call: a kick that woke us needs no exit.
        self.kick.clear_immediate_exit();
        if stuck {
            self.rt.set_stuck(self.index, false);
        }
        Exit::Idle
    }

    /// Arms the host timer for the APIC deadline and the polls the plan needs.
    fn arm(&mut self, plan: &EntryPlan, now: u64) {
        let poll = self.rt.poll();
        let running = matches!(self.state, RunState::Running | RunState::Halted(true));
        let nmi_wait = self.carried.nmi > 0 || self.nmi_outstanding;
        let p = if (plan.request_window || nmi_wait) && running {
            Some(poll.window_poll_ns)
        } else if plan.held_by_tpr && self.state == RunState::Running && !self.rt.cr8_exits_seen() {
            Some(poll.tpr_poll_ns)
        } else {
            None
        };
        let want = match p {
            Some(p) => {
                let t = now.saturating_add(p);
                Some(plan.timer_deadline.map_or(t, |d| d.min(t)))
            }
            None => plan.timer_deadline,
        };
        if want != self.armed {
            self.armed = want;
            self.rt.arm_timer(self.index, want);
        }
    }

    /// Acts on the events of a plan: INIT, SIPI, NMI, ExtINT. Returns whether the
    /// vCPU can enter the guest.
    fn take_events(
        &mut self,
        events: Events,
        kvm_nmi: bool,
        can_inject: bool,
    ) -> Result<bool, Error> {
        if events.init {
            reset::init(&self.fd, &self.reset_sregs)?;
            self.state = RunState::WaitForSipi;
        }
        if let Some(page) = events.sipi {
            if self.state == RunState::WaitForSipi {
                reset::sipi(&self.fd, &self.reset_sregs, page)?;
                self.counters.sipis += 1;
                self.state = RunState::Running;
            }
        }
        if self.state == RunState::WaitForSipi {
            return Ok(false);
        }
        // One KVM_NMI at a time, and only when KVM holds none of ours: a second one
        // given while KVM still queues the first could be collapsed by KVM although the
        // core would latch it (one in service, one latched: SDM Vol. 3A §6.7.1). The rest
        // waits here; the window poll brings the vCPU back for it.
        if events.nmi > 0 {
            // The core holds at most one NMI in service plus one latched (SDM Vol. 3A
            // §6.7.1); more collapse. One KVM_NMI per entry and none while KVM still
            // holds one of ours (KVM could collapse what the core would latch); the
            // rest waits here, at most the one that could still latch, and the window
            // poll brings the vCPU back for it.
            if kvm_nmi {
                // KVM holds one. One in service (being injected or its handler
                // running) with another latched → the new ones collapse; otherwise one
                // more may still be taken or latched.
                let latched = self
                    .fd
                    .get_vcpu_events()
                    .map(|e| e.nmi.pending != 0 && (e.nmi.injected != 0 || e.nmi.masked != 0))
                    .unwrap_or(false);
                self.carried.nmi = if latched { 0 } else { events.nmi.min(1) };
            } else {
                self.fd.nmi().map_err(|e| Error::kvm("KVM_NMI", e))?;
                self.counters.nmis += 1;
                self.nmi_outstanding = true;
                self.carried.nmi = events.nmi.saturating_sub(1).min(1);
            }
            // An NMI KVM holds or was just given wakes the core from HLT.
            self.state = RunState::Running;
        } else if kvm_nmi {
            self.state = RunState::Running;
        }
        if events.extint {
            let src = self.rt.extint_source().cloned();
            match src {
                Some(src) if can_inject => {
                    if let Some(v) = src() {
                        raw::interrupt(&self.fd, v).map_err(|e| {
                            Error::Host(format!("KVM_INTERRUPT(ExtINT {v:#x}): {e}"))
                        })?;
                        self.counters.interrupts += 1;
                        self.counters.extints += 1;
                        self.state = RunState::Running;
                        // Delivered at this entry: no single-step across it.
                        self.event_pending = true;
                    }
                }
                // Not injectable now: keep it for the next entry.
                Some(_) => self.carried.extint = true,
                None => {}
            }
        }
        Ok(true)
    }

    /// Whether KVM still holds an NMI we gave it (queued or being injected); asked of
    /// KVM only while one may be outstanding.
    fn kvm_holds_nmi(&mut self) -> bool {
        if !self.nmi_outstanding {
            return false;
        }
        let held = self
            .fd
            .get_vcpu_events()
            .map(|e| e.nmi.pending != 0 || e.nmi.injected != 0)
            .unwrap_or(false);
        self.nmi_outstanding = held;
        held
    }

    /// Runs the vCPU once: plans the entry with the APIC (injecting, NMI, INIT/SIPI),
    /// parks it while it is halted or waiting for SIPI, else enters the guest with
    /// `KVM_RUN` and handles the APIC's exits. Returns what the embedder must see.
    pub fn run(&mut self) -> Result<Exit<'_>, Error> {
        if self.rt.is_stopped() {
            return Ok(Exit::Stopped);
        }
        self.ensure_registered();
        self.kick.clear_token();
        self.refresh_fabric();
        if std::mem::take(&mut self.mirror_base) {
            self.mirror_apic_base();
        }
        let now = self.rt.now_ns();
        let (ready, if_flag) = {
            let r = self.fd.get_kvm_run();
            (r.ready_for_interrupt_injection != 0, r.if_flag != 0)
        };
        let can_inject = ready
            && match self.state {
                RunState::Running => if_flag,
                RunState::Halted(halt_if) => halt_if && if_flag,
                RunState::WaitForSipi => false,
            };
        // NMIs go before any vector (SDM Vol. 3A §6.9): while KVM still holds an NMI
        // we gave it, or we have one to give, no KVM_INTERRUPT (KVM would deliver a
        // queued vector first); the vector waits for the window.
        let carried = std::mem::take(&mut self.carried);
        // (An NMI among the APIC's own events holds the vector back in `plan_entry`.)
        let kvm_nmi = self.kvm_holds_nmi();
        let nmi_first = kvm_nmi || carried.nmi > 0;
        let plan = self
            .fabric
            .plan_entry(self.index, now, can_inject && !nmi_first && !carried.extint)
            .ok_or(Error::NoSuchVcpu(self.index))?;
        let events = merge_events(carried, plan.events);
        self.arm(&plan, now);
        if !self.take_events(events, kvm_nmi, can_inject && plan.inject.is_none())? {
            return Ok(self.park(true));
        }
        if let Some(v) = plan.inject {
            raw::interrupt(&self.fd, v)
                .map_err(|e| Error::Host(format!("KVM_INTERRUPT({v:#x}): {e}")))?;
            self.counters.interrupts += 1;
            self.state = RunState::Running;
        }
        if let RunState::Halted(halt_if) = self.state {
            if plan.request_window && halt_if {
                self.state = RunState::Running;
            } else {
                return Ok(self.park(!halt_if));
            }
        }
        self.step_for_tpr(&plan)?;
        {
            let r = self.fd.get_kvm_run();
            r.request_interrupt_window = u8::from(plan.request_window || self.carried.extint);
            r.cr8 = plan.cr8;
        }
        self.last_cr8 = plan.cr8;
        self.enter()
    }

    /// Re-reads the runtime's fabric if it was replaced since we last looked.
    fn refresh_fabric(&mut self) {
        let g = self.rt.generation();
        if g != self.fabric_gen {
            self.fabric = self.rt.fabric();
            self.fabric_gen = g;
        }
    }

    /// Completes the instruction in flight before the vCPU's state is saved (KVM
    /// checklist item 12): re-enters with `immediate_exit` set so KVM finishes the
    /// last exit without running further guest code. `Ok(None)`: done, the state is
    /// consistent. `Ok(Some(exit))`: the instruction made another access; handle it
    /// as from [`ApicVcpu::run`] and call again (APIC accesses come back as
    /// [`Exit::Handled`] and need nothing).
    pub fn finish_instruction(&mut self) -> Result<Option<Exit<'_>>, Error> {
        self.ensure_registered();
        // No single-step across a pause: the saved RFLAGS must not carry KVM's TF.
        self.held_seen = false;
        self.step_left = 0;
        self.set_stepping(false)?;
        self.kick.set_immediate_exit();
        self.refresh_fabric();
        // KVM loads CR8 from kvm_run.cr8 at every KVM_RUN: give it TPR, or a vCPU that
        // never entered since `replace_fd` (its kvm_run is zeroed) would lose its CR8.
        let cr8 = self
            .fabric
            .read_apic(self.index, |a| a.cr8())
            .ok_or(Error::NoSuchVcpu(self.index))?;
        self.fd.get_kvm_run().cr8 = cr8;
        self.last_cr8 = cr8;
        match self.enter()? {
            Exit::Handled(Handled::Kick) => Ok(None),
            other => Ok(Some(other)),
        }
    }

    /// `KVM_RUN` once; CR8 folded into TPR first; APIC exits handled.
    fn enter(&mut self) -> Result<Exit<'_>, Error> {
        let me = self.index;
        let fabric: &SharedFabric = &self.fabric;
        let slot = RunSlot::of(&mut self.fd);
        let res = self.fd.run();
        self.kick.clear_immediate_exit();
        // SAFETY: the slot is from `self.fd`, alive; KVM_RUN returned on this thread.
        let cr8 = unsafe { slot.cr8() };
        if cr8 != self.last_cr8 {
            // Before the exit is handled: it may be a TPR/PPR read or an EOI.
            let _ = fabric.set_cr8(me, cr8);
            self.last_cr8 = cr8;
        }
        let decoded = match res {
            Ok(exit) => decode(&self.rt, fabric, me, exit),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                Decoded::Done(Handled::Kick, false)
            }
            Err(e) => return Err(Error::kvm("KVM_RUN", e)),
        };
        match decoded {
            Decoded::Done(h, base_written) => {
                if h == Handled::Step {
                    self.step_left = self.step_left.saturating_sub(1);
                }
                if let Handled::MsrFault(_) = h {
                    self.event_pending = true;
                }
                if h == Handled::SetTpr {
                    self.rt.note_cr8_exit();
                }
                if h == Handled::Hlt {
                    // SAFETY: as for `slot`.
                    self.state = RunState::Halted(unsafe { slot.if_flag() });
                }
                self.mirror_base |= base_written;
                Ok(Exit::Handled(h))
            }
            Decoded::Pass(exit) => Ok(exit),
        }
    }
}

impl ApicVcpu {
    /// Turns the software-interrupt workaround on (KVM checklist item 15): with it,
    /// [`ApicVcpu::deliver_soft_interrupt`] delivers an `int3` / `int n` that KVM's
    /// emulator failed on, reading and writing the guest through `ram` (guest RAM
    /// from guest-physical 0, e.g. [`crate::GuestRam::memory`]).
    pub fn enable_soft_interrupts(&mut self, ram: &vm_memory::GuestMemoryMmap) {
        self.soft_int_ram = Some(ram.clone());
    }

    /// Turns the software-interrupt workaround off (the default).
    pub fn disable_soft_interrupts(&mut self) {
        self.soft_int_ram = None;
    }

    /// Call after [`Exit::InternalError`]: when the workaround is on and KVM's
    /// instruction emulator failed on `int3` / `int n` (hosts whose emulator performs
    /// them only in real mode), delivers it as the CPU would ([`crate::softint`]) and
    /// counts it; run the vCPU again unless the outcome is
    /// [`SoftIntOutcome::NotSoftInt`] or [`SoftIntOutcome::Unsupported`].
    pub fn deliver_soft_interrupt(&mut self) -> Result<SoftIntOutcome, Error> {
        let Some(ram) = &self.soft_int_ram else {
            return Ok(SoftIntOutcome::NotSoftInt);
        };
        let out = crate::softint::deliver_at_rip(&mut self.fd, ram)?;
        if matches!(
            out,
            SoftIntOutcome::Delivered(_) | SoftIntOutcome::Faulted(..)
        ) {
            self.counters.soft_interrupts += 1;
            // A delivered event: no single-step across it (see `step_for_tpr`).
            self.event_pending = true;
            // The exit's IF and readiness predate the delivery (an interrupt gate
            // cleared IF; an injected fault must go first): no KVM_INTERRUPT at the
            // next entry, a window request instead.
            let r = self.fd.get_kvm_run();
            r.ready_for_interrupt_injection = 0;
            r.if_flag = 0;
        }
        Ok(out)
    }

    /// Details of the last `KVM_EXIT_INTERNAL_ERROR` (suberror, data), for reports.
    pub fn internal_error(&mut self) -> Option<(u32, Vec<u64>)> {
        raw::internal_error(&mut self.fd)
    }
}

/// Details (suberror, data) of the `KVM_EXIT_INTERNAL_ERROR` left in a bare vCPU's
/// `kvm_run`, for a VMM that runs `fd` itself (as with KVM's in-kernel irqchip);
/// `None` when the last exit was something else. For an emulation failure
/// (suberror 1) KVM puts the instruction bytes in the data.
pub fn internal_error_of(fd: &mut VcpuFd) -> Option<(u32, Vec<u64>)> {
    raw::internal_error(fd)
}

impl Drop for ApicVcpu {
    fn drop(&mut self) {
        // Before `fd` (and its kvm_run mapping) goes: no kicker may touch it after.
        self.unregister();
    }
}
