//! # vlapic-kvm — the KVM half of a userspace local APIC
//!
//! [`vlapic`] emulates local APICs, an IOAPIC and MSI without knowing about any
//! hypervisor. This crate is what a Rust VMM needs to run it under KVM with **no
//! in-kernel irqchip** (no `KVM_CREATE_IRQCHIP`): VM setup, a vCPU adapter that owns
//! the run-loop duties, a kicker, a timer service and VM time from the guest TSC.
//! All of its `unsafe` (the `kvm_run` fields kvm-ioctls does not expose, the
//! `KVM_INTERRUPT` ioctl, the kick signal, the guest memory slot) is inside, each
//! block with a `// SAFETY:` comment; an embedder writes none.
//!
//! ```no_run
//! use std::sync::Arc;
//! use vlapic::fabric::{FabricConfig, SharedFabric};
//! use vlapic_kvm::{setup, ApicRuntime, ApicVcpu, Exit, GuestRam, VmClock};
//!
//! # fn main() -> Result<(), vlapic_kvm::Error> {
//! let kvm = kvm_ioctls::Kvm::new().map_err(|e| vlapic_kvm::Error::kvm("open /dev/kvm", e))?;
//! setup::check_kvm(&kvm)?;
//! let vm = kvm.create_vm().map_err(|e| vlapic_kvm::Error::kvm("KVM_CREATE_VM", e))?;
//! setup::configure_vm(&vm)?; // MSR exits (incl. the INVAL reason) + the MSR filter
//! let ram = GuestRam::new(16 << 20)?;
//! ram.register(&vm, 0)?;
//! let fabric_cfg = FabricConfig::with_vcpus(1);
//! let fd = setup::create_vcpu(&kvm, &vm, &fabric_cfg, 0)?; // CPUID from the LapicConfig
//! let clock = VmClock::from_vcpu(&fd)?; // VM time = guest TSC / TSC frequency
//! let rt = ApicRuntime::new(SharedFabric::new(fabric_cfg), clock)?;
//! let mut vcpu = ApicVcpu::new(rt.clone(), 0, fd)?;
//! loop {
//!     match vcpu.run()? {
//!         Exit::IoOut(0xF4, _) => break,  // your devices
//!         Exit::Stopped => break,
//!         _ => {}                          // APIC exits were handled already
//!     }
//! }
//! # Ok(()) }
//! ```
//!
//! # Cargo features
//!
//! * `rust-vmm` (default): the [`rust_vmm`] adapters — `vm_superio::Trigger` for an
//!   IOAPIC pin and `vm_device::DeviceMmio` for the IOAPIC page (pulls in `vm-superio`
//!   and `vm-device`).
//!
//! MSRV: Rust 1.85. Linux on x86-64 only (the crate is empty elsewhere).
//!
//! # The KVM checklist
//!
//! Every fact below cost someone a hung or crashed guest; each is handled here, and
//! each is probed on a nested KVM host by this crate's tests.
//!
//! 1. **x2APIC MSRs cannot be filtered.** KVM ignores `KVM_X86_SET_MSR_FILTER` ranges
//!    inside 0x800–0x8FF; without an in-kernel LAPIC it fails those accesses with the
//!    *invalid* reason. [`setup::configure_vm`] enables `KVM_MSR_EXIT_REASON_INVAL`
//!    (with UNKNOWN and FILTER) in `KVM_CAP_X86_USER_SPACE_MSR`; without it the guest
//!    takes #GP on its first `rdmsr 0x802` and no exit reaches userspace.
//! 2. **IA32_APIC_BASE (0x1B) and IA32_TSC_DEADLINE (0x6E0) must be filtered**, or
//!    KVM answers them itself. [`setup::configure_vm`] installs the filter. Accepted
//!    writes to 0x1B are mirrored into KVM so CPUID.1:EDX.APIC follows IA32_APIC_BASE.EN.
//! 3. **CPUID must agree with the APIC.** [`cpuid::configure`] derives x2APIC,
//!    TSC-deadline and the APIC bit from the vCPU's [`vlapic::LapicConfig`], and clears
//!    KVM's paravirtual features that need its own APIC (PV EOI, PV IPI, ...).
//! 4. **Fold `kvm_run.cr8` into TPR before handling the exit.** A guest doing
//!    `mov cr8, 5` and then reading TPR must see 5. kvm-ioctls' `VcpuExit` borrows
//!    the vCPU, so [`ApicVcpu`] reads `cr8` from the mapping before decoding the exit.
//!    And the other way: KVM loads the guest's CR8 from `kvm_run.cr8` at *every*
//!    `KVM_RUN`, so it must hold `TPR[7:4]` before each one — including the re-entry that
//!    completes an instruction before a pause, on a vCPU that was just restored into a
//!    new VM (its `kvm_run` is zeroed): back-to-back migrations otherwise dropped a
//!    guest's CR8 to 0 and delivered a vector it was holding back.
//! 5. **Lowering CR8 may not exit** (`KVM_EXIT_SET_TPR` is not guaranteed: on nested
//!    hosts it never comes). While a vector is held back by TPR alone
//!    ([`vlapic::LocalApic::held_back_by_tpr`]) and the vCPU runs, the adapter
//!    single-steps it for up to [`PollConfig::tpr_step_instructions`] instructions
//!    after the exit that left the vector so (the usual `raise TPR; post; lower TPR`
//!    then takes it right after the `mov cr8`), then has it kicked every
//!    [`PollConfig::tpr_poll_ns`]. Single-stepping is slow on nested hosts (~0.1 M
//!    cycles a step here), so both stop for good once KVM reports a CR8 lowering
//!    (`KVM_EXIT_SET_TPR`): such a host needs neither. KVM's single-step sets the
//!    guest's RFLAGS.TF, so an event delivered in a stepped entry carries that TF
//!    into the guest's frame, and once stepping stops its IRET gives the guest a #DB
//!    it never asked for. The adapter therefore never steps an entry that delivers
//!    anything: not after an MSR #GP, an NMI or an ExtINT it gave, and not while KVM
//!    still holds an interrupt, exception or NMI (`KVM_GET_VCPU_EVENTS` before each
//!    stepped entry: a kick can end an entry after KVM queued an event and before it
//!    delivered it). What it cannot see is a fault the stepped instruction itself
//!    raises inside the guest (a #PF, say), taken with TF in its frame: a guest whose
//!    handler for it makes more APIC accesses than the step budget before its IRET
//!    would still see the #DB; `PollConfig::with_tpr_step_instructions(0)` turns
//!    stepping off (the poll alone remains).
//! 6. **Interrupt-window exits can arrive late.** `KVM_INTERRUPT` only when
//!    `ready_for_interrupt_injection && if_flag`, otherwise `request_interrupt_window`;
//!    while a vector waits for the window the adapter also polls every
//!    [`PollConfig::window_poll_ns`].
//! 7. **kvm-ioctls has no `KVM_INTERRUPT` wrapper** (rust-vmm VMMs use the in-kernel
//!    irqchip); the adapter issues it.
//! 8. **Kicks must not be lost.** A kick sets `kvm_run.immediate_exit` and signals the
//!    vCPU thread ([`kick`]): a kick that lands before `KVM_RUN` makes it return at
//!    once; a vCPU parked in userspace (HLT, wait-for-SIPI) is woken by a condvar.
//! 9. **HLT is ours.** Without an in-kernel LAPIC, HLT exits to userspace; the adapter
//!    parks the vCPU until it has work or its timer deadline passes
//!    ([`timer::TimerService`] arms one host timer per vCPU from
//!    `next_timer_deadline()`).
//! 10. **INIT and SIPI are ours.** The library reports them as events; the adapter
//!     resets the vCPU to its INIT state and enters wait-for-SIPI, and a SIPI starts it
//!     in real mode at `vector << 12` (SDM Vol. 3A §9.4.4, §11.6.1).
//! 11. **VM time comes from the guest TSC.** The library defines guest TSC =
//!     `vm_ns × tsc_hz / 10⁹`; under KVM the guest TSC is hardware, so [`VmClock`]
//!     derives VM time from it (`KVM_GET_TSC_KHZ` and the offset read from IA32_TSC),
//!     and TSC-deadline fires when the guest's own `rdtsc` says so.
//! 12. **An exit is complete only after the next `KVM_RUN`.** IN/RDMSR data and the
//!     advanced RIP reach the registers when KVM resumes the vCPU; before saving a vCPU
//!     (migration, snapshot), [`ApicVcpu::finish_instruction`] re-enters with
//!     `immediate_exit` set, as many times as the instruction needs (a `rep movs` or a
//!     locked read-modify-write on the APIC page makes several accesses).
//! 13. **The xAPIC page is per vCPU and relocatable**: it is routed inside the fabric
//!     by the vCPU index ([`vlapic::fabric::SharedFabric::mmio_read`]), never on a
//!     shared MMIO bus.
//! 14. **A relocated xAPIC page over RAM is not an APIC.** KVM only exits for MMIO
//!     where no memory slot is, and slots are VM-wide while the page is per vCPU;
//!     [`ApicRuntime::refuse_apic_page_in`] makes such a WRMSR to IA32_APIC_BASE #GP
//!     (a deliberate deviation: hardware accepts any base) instead of letting the base
//!     read back an address whose accesses reach RAM.
//! 15. **Some hosts cannot execute `int3` / `int n` in protected or long mode.** A
//!     nested KVM may run guest CPL0 code through KVM's instruction emulator, which
//!     performs software interrupts only in real mode: `KVM_EXIT_INTERNAL_ERROR`
//!     (emulation failure) and the VM is lost — Linux's int3 self-test and text
//!     patching, Zephyr's `irq_offload`, kvm-unit-tests `eventinj` all do this. A
//!     workaround for such hosts, off unless asked for:
//!     [`ApicVcpu::enable_soft_interrupts`], then on [`Exit::InternalError`] call
//!     [`ApicVcpu::deliver_soft_interrupt`] ([`softint::deliver_at_rip`] for a vCPU
//!     not run by the adapter): for `CC` / `CD nn` at CS:RIP it delivers the event as
//!     the CPU would (IDT gate checks, IST/RSPn stack, frame, RIP after the
//!     instruction), faults on the way included, and the vCPU runs on; anything else
//!     stays a crash for you to report. Deviations are in the README.
//!
//! # Leaving KVM's in-kernel APIC
//!
//! An embedder that moves a VM *from* KVM's own APIC (`KVM_CREATE_IRQCHIP`) to vlapic
//! reads each vCPU with `KVM_GET_LAPIC` while it is out of `KVM_RUN`. KVM's APIC timer
//! does not set IRR when it expires: it counts the expiry (`lapic_timer.pending`) and
//! moves it into IRR in its run loop, after the vCPU's next pass through guest entry
//! or halt — which a `KVM_RUN` with `immediate_exit` never reaches. A one-shot expiry
//! counted while the vCPU was paused therefore reads as TMCCT 0 with IRR clear, and
//! is lost if saved like that. vlapic-vmm's `kernel_timer` module runs the vCPU once
//! through KVM's loop without entering the guest (a signal pending and unblocked only
//! inside `KVM_RUN` with `KVM_SET_SIGNAL_MASK`; KVM leaves with `KVM_EXIT_INTR` after
//! injecting), saves, and repeats once if the page shows an expired one-shot timer.
#![deny(missing_docs)]
#![cfg(target_arch = "x86_64")]
#![cfg_attr(docsrs, feature(doc_cfg))]

pub mod clock;
pub mod cpuid;
pub mod exit;
pub mod kick;
pub mod ram;
mod raw;
mod reset;
pub mod runtime;
#[cfg(feature = "rust-vmm")]
#[cfg_attr(docsrs, doc(cfg(feature = "rust-vmm")))]
pub mod rust_vmm;
pub mod setup;
pub mod softint;
pub mod timer;
pub mod vcpu;

pub use clock::VmClock;
pub use ram::GuestRam;
pub use runtime::{ApicRuntime, PollConfig};
pub use vcpu::{ApicVcpu, Exit, Handled, RunState};

/// Why a KVM operation or the runtime failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A KVM ioctl failed.
    #[error("{what}: {source}")]
    Kvm {
        /// The ioctl or step.
        what: &'static str,
        /// KVM's error.
        source: kvm_ioctls::Error,
    },
    /// KVM lacks a capability this crate needs.
    #[error("KVM lacks {0}")]
    MissingCapability(&'static str),
    /// A vCPU index the fabric does not have.
    #[error("vCPU {0} does not exist in the fabric")]
    NoSuchVcpu(usize),
    /// Guest memory could not be set up.
    #[error("guest memory: {0}")]
    Memory(String),
    /// A host resource (signal handler, thread) could not be had.
    #[error("host: {0}")]
    Host(String),
}

impl Error {
    /// A failed KVM ioctl.
    pub fn kvm(what: &'static str, source: kvm_ioctls::Error) -> Self {
        Error::Kvm { what, source }
    }
}

/// The README's Rust examples, compiled as doc tests so they cannot rot.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;

/// Locks a mutex, ignoring poisoning (the mutexes here guard plain data).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
