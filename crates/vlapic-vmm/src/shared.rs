//! What every vCPU thread and the main thread share: the APIC runtime (fabric,
//! kicks, timers, VM time), the devices, counters, the migration gate, the outcome.

use std::sync::{Arc, Condvar, Mutex};

use kvm_ioctls::VmFd;
use vlapic::fabric::{FabricConfig, SharedFabric};
use vlapic_kvm::{ApicRuntime, VmClock};

use crate::devices::IoBus;
use crate::gate::MigrationGate;
use crate::lock;
use crate::outcome::Outcome;
use crate::stats::{ExitStats, Odd};

/// Highest vCPU count accepted.
pub const MAX_VCPUS: usize = 64;

/// State shared by every vCPU thread and the main thread.
pub struct Shared {
    /// The APIC runtime: the fabric (replaced by a fresh one, imported from the old
    /// one's exported state, at each migration), kicks, timers, VM time, stop.
    pub rt: Arc<ApicRuntime>,
    /// How the fabric was built (for the fresh one at migration).
    pub fabric_cfg: FabricConfig,
    /// Verifier figures of fabrics replaced by migration: (max depth, violations).
    pub verifier_carry: Mutex<(u8, u64)>,
    /// Port-I/O devices.
    pub io: IoBus,
    /// How the run ended (first writer wins).
    pub outcome: Mutex<Option<Outcome>>,
    /// Signalled when `outcome` is set.
    pub done: Condvar,
    /// MMIO outside RAM, LAPIC and IOAPIC.
    pub wild_mmio: Odd,
    /// MSR accesses answered with #GP.
    pub msr_gp: Odd,
    /// `int3` / `int n` delivered by the VMM (first: the vector), see
    /// `vlapic_kvm::softint`.
    pub soft_ints: Odd,
    /// Guest RAM for that workaround; `None`: off (`--no-soft-int`).
    pub soft_int_ram: Option<vm_memory::GuestMemoryMmap>,
    /// Exit counters.
    pub exits: Arc<ExitStats>,
    /// Live-migration rendezvous.
    pub migration: MigrationGate,
    /// MSRs saved and restored through KVM at migration.
    pub msr_list: Vec<u32>,
    /// `--irqchip kernel`: KVM's own LAPICs/IOAPIC (the VM, for KVM_IRQ_LINE); the
    /// runtime's fabric is then unused.
    pub kernel_irqchip: Option<Arc<VmFd>>,
}

impl Shared {
    /// The current interrupt fabric.
    pub fn chip(&self) -> Arc<SharedFabric> {
        self.rt.fabric()
    }

    /// VM time.
    pub fn clock(&self) -> &VmClock {
        self.rt.clock()
    }

    /// Whether the run has ended.
    pub fn stopped(&self) -> bool {
        self.rt.is_stopped()
    }

    /// Ends the run with `o` (if not already ended) and stops every vCPU.
    pub fn finish(&self, o: Outcome) {
        {
            let mut g = lock(&self.outcome);
            if g.is_none() {
                *g = Some(o);
            }
        }
        self.rt.stop();
        self.migration.release_all();
        self.done.notify_all();
    }
}
