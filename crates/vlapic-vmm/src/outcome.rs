//! How a run ended (shared by the vCPU threads, the main thread and the report).

/// How the run ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The guest wrote this value to the isa-debug-exit port (status `(n << 1) | 1`).
    DebugExit(u32),
    /// The guest entered ACPI S5 (soft off) through the FADT's sleep control register.
    PoweredOff,
    /// Every vCPU halted with interrupts off or waits for SIPI: nothing can ever run.
    AllStopped,
    /// The wall-clock limit passed.
    Timeout,
    /// The guest died: triple fault, KVM internal error, failed entry.
    GuestCrash(String),
    /// The VMM itself failed (an ioctl error).
    VmmError(String),
    /// `--save`: every vCPU was paused and the VM written to a save file; the
    /// text says what was saved.
    Saved(String),
    /// `--migrate-to`: the VM moved to another process, which acknowledged running
    /// it; the text names where.
    Migrated(String),
}
