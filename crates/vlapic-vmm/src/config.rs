//! What a run is asked to do: the guest, its size, its APIC model, and when it is
//! saved or migrated ([`VmConfig`], [`SaveTo`], [`MigrateTo`]).

use std::path::PathBuf;
use std::time::Duration;

use crate::console::ConsoleSink;
use crate::loader::Module;
use crate::outgoing::PreCopy;
use crate::stream::Addr;

/// Everything needed to boot one guest.
#[derive(Clone, Debug)]
pub struct VmConfig {
    /// The kernel image: multiboot v1, or Linux (bzImage, or vmlinux with a PVH note).
    pub kernel: Vec<u8>,
    /// Linux initrd (empty: none); multiboot images take modules instead.
    pub initrd: Vec<u8>,
    /// Kernel command line.
    pub cmdline: String,
    /// Boot modules.
    pub modules: Vec<Module>,
    /// Number of vCPUs (1–64).
    pub vcpus: usize,
    /// RAM in MiB.
    pub memory_mib: u64,
    /// Start every APIC in x2APIC mode.
    pub x2apic: bool,
    /// Run the APIC nesting verifier.
    pub verify: bool,
    /// Wall-clock limit.
    pub timeout: Option<Duration>,
    /// Where guest console output goes.
    pub console: ConsoleSink,
    /// Live-migrate the whole VM into a new KVM VM this often.
    pub migrate_every: Option<Duration>,
    /// Use KVM's in-kernel LAPICs/IOAPIC instead of vlapic (for comparison).
    pub kernel_irqchip: bool,
    /// Pause the VM after a while, write it to a save file and end the run.
    pub save: Option<SaveTo>,
    /// Start from this save file instead of booting `kernel` (vCPUs, memory,
    /// x2APIC and verifier settings come from the file; `migrate_every: None`
    /// then means the saved run's period).
    pub restore: Option<PathBuf>,
    /// `--incoming ADDR`: wait for a VM from another process instead of booting.
    pub incoming: Option<Addr>,
    /// `--incoming-timeout`: how long `--incoming` waits for a source to connect
    /// (`None`: for ever).
    pub incoming_timeout: Option<Duration>,
    /// `--migrate-to ADDR`: after a while, live-migrate the VM to another process.
    pub migrate_to: Option<MigrateTo>,
    /// Deliver `int3` / `int n` that KVM's instruction emulator fails on (hosts
    /// whose emulator performs them only in real mode; `vlapic_kvm::softint`).
    pub soft_interrupts: bool,
    /// `--trace FILE`: record the interrupts (feature `trace`) as Chrome trace JSON.
    pub trace: Option<PathBuf>,
}

/// Where and when `--migrate-to` sends the VM.
#[derive(Clone, Debug)]
pub struct MigrateTo {
    /// The destination (`vlapic run --incoming ADDR` there).
    pub addr: Addr,
    /// Wall time after this process's VM started running (booted or resumed).
    pub after: Duration,
    /// How the pre-copy proceeds.
    pub precopy: PreCopy,
}

/// Where and when `--save` writes the VM.
#[derive(Clone, Debug)]
pub struct SaveTo {
    /// The save file.
    pub path: PathBuf,
    /// Wall time after the start (of this process's run) at which to save.
    pub after: Duration,
}

impl Default for VmConfig {
    fn default() -> Self {
        Self {
            kernel: Vec::new(),
            initrd: Vec::new(),
            cmdline: String::new(),
            modules: Vec::new(),
            vcpus: 1,
            memory_mib: 128,
            x2apic: false,
            verify: true,
            timeout: Some(Duration::from_secs(60)),
            console: ConsoleSink::Stdout,
            migrate_every: None,
            kernel_irqchip: false,
            save: None,
            restore: None,
            incoming: None,
            incoming_timeout: None,
            migrate_to: None,
            soft_interrupts: true,
            trace: None,
        }
    }
}
