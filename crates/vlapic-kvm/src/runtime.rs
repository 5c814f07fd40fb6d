//! The VM-wide half shared by every vCPU thread: the fabric (replaceable for
//! migration), VM time, one kicker per vCPU, the timer service and the stop flag.

use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use vlapic::fabric::{MsiError, SharedFabric, Wake};

use crate::clock::VmClock;
use crate::kick::{kick_signal, VcpuKick};
use crate::timer::TimerService;
use crate::{lock, Error};

/// The polls a host without CR8-lowering exits or with late window exits needs
/// (KVM checklist items 5 and 6), and how long a parked vCPU sleeps between checks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub struct PollConfig {
    /// While a vector is held back by TPR alone and the vCPU runs, kick it this often
    /// (VM ns) so a `mov cr8` that lowered TPR without an exit is seen.
    pub tpr_poll_ns: u64,
    /// While a vector waits for the interrupt window, kick this often (VM ns).
    pub window_poll_ns: u64,
    /// When a vector becomes held back by TPR alone while the vCPU runs, single-step
    /// the guest for up to this many instructions (`KVM_GUESTDBG_SINGLESTEP`), folding
    /// CR8 after each: a `mov cr8` that lowers TPR right after the exit (the usual
    /// pattern: raise TPR, post, lower TPR) releases the vector at once instead of at
    /// the next poll. 0 disables stepping.
    pub tpr_step_instructions: u32,
    /// Longest sleep of a vCPU parked in userspace (HLT, wait-for-SIPI) before it
    /// re-checks (a safety net: kicks and the timer service wake it on time).
    pub park_timeout: Duration,
}

impl Default for PollConfig {
    /// 200 µs TPR poll, 32 single-steps, 20 µs window poll, 100 ms park timeout.
    fn default() -> Self {
        Self {
            tpr_poll_ns: 200_000,
            tpr_step_instructions: 32,
            window_poll_ns: 20_000,
            park_timeout: Duration::from_millis(100),
        }
    }
}

impl PollConfig {
    /// This configuration with a TPR poll period.
    pub fn with_tpr_poll_ns(mut self, ns: u64) -> Self {
        self.tpr_poll_ns = ns;
        self
    }

    /// This configuration with a TPR single-step budget (0: no stepping).
    pub fn with_tpr_step_instructions(mut self, n: u32) -> Self {
        self.tpr_step_instructions = n;
        self
    }

    /// This configuration with a window poll period.
    pub fn with_window_poll_ns(mut self, ns: u64) -> Self {
        self.window_poll_ns = ns;
        self
    }
}

/// Asks a platform 8259 for the vector of an ExtINT (the INTA cycle); `None` when it
/// has nothing to give.
pub type ExtIntSource = Arc<dyn Fn() -> Option<u8> + Send + Sync>;

/// Everything the vCPU threads of one VM share. Build it once with
/// [`ApicRuntime::new`]; give each [`crate::ApicVcpu`] a clone of the `Arc`.
pub struct ApicRuntime {
    fabric: RwLock<Arc<SharedFabric>>,
    /// Bumped by every `replace_fabric`: vCPUs keep the fabric and re-read it only when
    /// this changed (no lock per entry).
    generation: AtomicU64,
    kicks: Vec<Arc<VcpuKick>>,
    timers: Arc<TimerService>,
    timer_thread: Mutex<Option<JoinHandle<()>>>,
    clock: VmClock,
    stuck: Vec<AtomicBool>,
    stop: AtomicBool,
    poll: PollConfig,
    extint: Option<ExtIntSource>,
    /// KVM reported a CR8 lowering (`KVM_EXIT_SET_TPR`) on this VM: the host exits on
    /// it, so the TPR single-step and poll are not needed.
    cr8_exits: AtomicBool,
    /// Guest-physical ranges an xAPIC page may not be moved over (guest RAM).
    no_apic_page: RwLock<Vec<Range<u64>>>,
}

impl std::fmt::Debug for ApicRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ApicRuntime")
            .field("vcpus", &self.kicks.len())
            .field("poll", &self.poll)
            .finish_non_exhaustive()
    }
}

impl ApicRuntime {
    /// A runtime for `fabric`'s vCPUs with VM time from `clock` and the default polls;
    /// installs the kick signal handler and starts the timer thread.
    pub fn new(fabric: SharedFabric, clock: VmClock) -> Result<Arc<Self>, Error> {
        Self::with_options(fabric, clock, PollConfig::default(), None)
    }

    /// [`ApicRuntime::new`] with explicit polls and an optional 8259 for ExtINT.
    pub fn with_options(
        fabric: SharedFabric,
        clock: VmClock,
        poll: PollConfig,
        extint: Option<ExtIntSource>,
    ) -> Result<Arc<Self>, Error> {
        let signal = kick_signal().map_err(Error::Host)?;
        let n = fabric.len();
        let kicks: Vec<Arc<VcpuKick>> = (0..n).map(|_| Arc::new(VcpuKick::new(signal))).collect();
        let timers = Arc::new(TimerService::new(n));
        let thread = {
            let (t, k, c) = (timers.clone(), kicks.clone(), clock.clone());
            std::thread::Builder::new()
                .name("lapic-timer".into())
                .spawn(move || t.run(c, k))
                .map_err(|e| Error::Host(format!("cannot start the timer thread: {e}")))?
        };
        Ok(Arc::new(Self {
            fabric: RwLock::new(Arc::new(fabric)),
            generation: AtomicU64::new(0),
            kicks,
            timers,
            timer_thread: Mutex::new(Some(thread)),
            clock,
            stuck: (0..n).map(|_| AtomicBool::new(false)).collect(),
            stop: AtomicBool::new(false),
            poll,
            extint,
            cr8_exits: AtomicBool::new(false),
            no_apic_page: RwLock::new(Vec::new()),
        }))
    }

    /// Number of vCPUs.
    pub fn vcpus(&self) -> usize {
        self.kicks.len()
    }

    /// The current fabric.
    pub fn fabric(&self) -> Arc<SharedFabric> {
        self.fabric
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Installs a new fabric (a migration imports the old one's state into a fresh
    /// one while every vCPU is paused) and returns the old one.
    pub fn replace_fabric(&self, fabric: SharedFabric) -> Arc<SharedFabric> {
        let mut g = self.fabric.write().unwrap_or_else(PoisonError::into_inner);
        let old = std::mem::replace(&mut *g, Arc::new(fabric));
        self.generation.fetch_add(1, Ordering::AcqRel);
        old
    }

    /// The fabric's generation (see [`ApicRuntime::replace_fabric`]).
    pub(crate) fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// VM time.
    pub fn clock(&self) -> &VmClock {
        &self.clock
    }

    /// VM time now (ns).
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// The polls in force.
    pub fn poll(&self) -> &PollConfig {
        &self.poll
    }

    /// Makes vCPU `vcpu` re-evaluate its interrupt state at once.
    pub fn kick(&self, vcpu: usize) {
        if let Some(k) = self.kicks.get(vcpu) {
            k.kick();
        }
    }

    /// Kicks every vCPU.
    pub fn kick_all(&self) {
        for k in &self.kicks {
            k.kick();
        }
    }

    /// Kicks every vCPU in `wake` (what a fabric operation returned).
    pub fn wake(&self, wake: &Wake) {
        for v in wake.iter() {
            self.kick(v);
        }
    }

    /// Kicks every vCPU in `wake` except `me` (the caller, which re-checks anyway).
    pub fn wake_others(&self, me: usize, wake: &Wake) {
        if wake.is_empty() {
            return;
        }
        for v in wake.iter().filter(|&v| v != me) {
            self.kick(v);
        }
    }

    /// Drives IOAPIC pin `pin` to `level` (a device interrupt line) and kicks whoever
    /// must take the result.
    pub fn set_irq_line(&self, pin: u32, level: bool) {
        let w = self.fabric().set_irq_line(pin, level, self.now_ns());
        self.wake(&w);
    }

    /// Delivers an MSI and kicks its targets.
    pub fn msi(&self, address: u64, data: u32) -> Result<(), MsiError> {
        let w = self.fabric().msi(address, data, self.now_ns())?;
        self.wake(&w);
        Ok(())
    }

    /// Refuses (#GP) a WRMSR to IA32_APIC_BASE that would put an enabled xAPIC page
    /// inside one of `ranges` (guest RAM). The page of a userspace APIC is an MMIO
    /// exit only where KVM has no memory slot: over RAM, the guest's accesses would
    /// reach RAM while the base MSR reads back the new address. KVM's memory slots are
    /// VM-wide and the page is per vCPU, so the slot cannot be split for one vCPU; this
    /// is a deliberate deviation (real hardware accepts any base).
    pub fn refuse_apic_page_in(&self, ranges: Vec<Range<u64>>) {
        *self
            .no_apic_page
            .write()
            .unwrap_or_else(PoisonError::into_inner) = ranges;
    }

    /// Whether writing `value` to IA32_APIC_BASE is refused by
    /// [`ApicRuntime::refuse_apic_page_in`]: EN set, EXTD clear, and the 4 KiB page at
    /// the base inside a refused range.
    pub fn apic_base_refused(&self, value: u64) -> bool {
        const EN: u64 = 1 << 11;
        const EXTD: u64 = 1 << 10;
        if value & EN == 0 || value & EXTD != 0 {
            return false;
        }
        let page = value & 0x000F_FFFF_FFFF_F000;
        self.no_apic_page
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .any(|r| r.start < page.saturating_add(0x1000) && page < r.end)
    }

    /// Whether this host was seen to exit on CR8 lowering (then no TPR step or poll).
    pub fn cr8_exits_seen(&self) -> bool {
        self.cr8_exits.load(Ordering::Relaxed)
    }

    pub(crate) fn note_cr8_exit(&self) {
        self.cr8_exits.store(true, Ordering::Relaxed);
    }

    /// Kicks sent to `vcpu` so far.
    pub fn kicks_sent(&self, vcpu: usize) -> u64 {
        self.kicks
            .get(vcpu)
            .map_or(0, |k| k.kicks.load(Ordering::Relaxed))
    }

    /// Ends the run: every [`crate::ApicVcpu::run`] returns [`crate::Exit::Stopped`]
    /// from now on (parked vCPUs are woken), and the timer thread ends.
    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
        self.kick_all();
        self.timers.stop();
        if let Some(t) = lock(&self.timer_thread).take() {
            let _ = t.join();
        }
    }

    /// Whether [`ApicRuntime::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// The kicker of `vcpu`, for a VMM that runs a vCPU without [`crate::ApicVcpu`]
    /// (e.g. with KVM's in-kernel irqchip, for comparison) but stops it the same way.
    pub fn kicker(&self, vcpu: usize) -> Option<Arc<VcpuKick>> {
        self.kicks.get(vcpu).cloned()
    }

    pub(crate) fn arm_timer(&self, vcpu: usize, deadline: Option<u64>) {
        self.timers.arm(vcpu, deadline);
    }

    pub(crate) fn extint_source(&self) -> Option<&ExtIntSource> {
        self.extint.as_ref()
    }

    /// Marks `vcpu` as unable to run on its own (halted with IF = 0, waiting for SIPI)
    /// or not; true when every vCPU is so and no NMI/INIT/SIPI/ExtINT waits for any:
    /// the VM can never run again.
    pub(crate) fn set_stuck(&self, vcpu: usize, stuck: bool) -> bool {
        if let Some(s) = self.stuck.get(vcpu) {
            s.store(stuck, Ordering::SeqCst);
        }
        if !stuck || !self.stuck.iter().all(|s| s.load(Ordering::SeqCst)) {
            return false;
        }
        let fabric = self.fabric();
        let waiting = (0..self.stuck.len())
            .any(|i| fabric.read_apic(i, |a| a.events().any()).unwrap_or(false));
        !waiting && self.stuck.iter().all(|s| s.load(Ordering::SeqCst))
    }
}

impl Drop for ApicRuntime {
    fn drop(&mut self) {
        self.timers.stop();
        if let Some(t) = lock(&self.timer_thread).take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use vlapic::fabric::FabricConfig;

    /// Relocating the xAPIC page over RAM is refused; the default page, x2APIC mode
    /// and a disabled APIC are not (SDM Vol. 3A §11.4.5 gives any base; our deviation).
    #[test]
    fn apic_page_over_ram_is_refused() {
        let rt = ApicRuntime::new(
            SharedFabric::new(FabricConfig::with_vcpus(1)),
            VmClock::new(0, 0, 1_000_000_000),
        )
        .expect("runtime");
        let en = 1u64 << 11;
        assert!(!rt.apic_base_refused(0x10_0000 | en), "nothing refused yet");
        let ram = 0..64 << 20;
        rt.refuse_apic_page_in(vec![ram]);
        assert!(rt.apic_base_refused(0x10_0000 | en | (1 << 8)));
        assert!(rt.apic_base_refused(0x3FF_F000 | en), "last RAM page");
        assert!(
            !rt.apic_base_refused(0x400_0000 | en),
            "first page above RAM"
        );
        assert!(!rt.apic_base_refused(0xFEE0_0000 | en | (1 << 8)));
        assert!(!rt.apic_base_refused(0x10_0000), "disabled: no page");
        assert!(
            !rt.apic_base_refused(0x10_0000 | en | (1 << 10)),
            "x2APIC: no page"
        );
        rt.stop();
    }
}
