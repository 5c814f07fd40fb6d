//! A KVM VMM whose guests' local APICs and IOAPIC are emulated in userspace by
//! `vlapic` (no in-kernel irqchip), on `vlapic-kvm`: loader, platform devices,
//! migration, save files and the run report.

// Dependency order, bottom-up (tests/layering.rs enforces it): files, stats, wire,
// outcome, memory, kvmclock, acpi, guest, hpet, rtc → console, snapshot, loader, linux,
// fill_in, boot → devices, clocks → gate → trace, trace_json (feature `trace`) → shared →
// vcpu → migrate → savefile → capture (a paused VM into a save file) → incoming,
// outgoing → config → supervisor (the main thread while the guest runs) → summary →
// run_end (joins and reports) → vm (setup and start). stream, the migration wire
// protocol, sits after guest. Nothing imports savefile or summary but the run's own
// modules and the live-migration modules.
pub mod acpi;
pub mod boot;
pub mod capture;
pub mod clocks;
pub mod config;
pub mod console;
pub mod devices;
pub mod files;
pub mod fill_in;
pub mod gate;
pub mod guest;
pub mod hpet;
pub mod incoming;
pub mod kernel_chip;
pub mod kernel_timer;
pub mod kvmclock;
pub mod linux;
pub mod loader;
pub mod memory;
pub mod migrate;
pub mod outcome;
pub mod outgoing;
pub mod pic;
pub mod rtc;
pub mod run_end;
pub mod savefile;
pub mod shared;
pub mod snapshot;
pub mod stats;
pub mod stream;
pub mod summary;
pub mod supervisor;
#[cfg(feature = "trace")]
pub mod trace;
#[cfg(feature = "trace")]
pub mod trace_json;
pub mod vcpu;
pub mod vm;
pub mod wire;

pub use console::ConsoleSink;
pub use loader::Module;
pub use outcome::Outcome;
pub use summary::{exit_code, RunReport};
pub use vm::{kvm_usable, run_vm, MigrateTo, SaveTo, VmConfig};

/// Locks a mutex, ignoring poisoning (the VMM's mutexes guard plain data).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

use std::fmt;

/// Why a run could not start or the VMM failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmmError {
    /// Bad configuration or unusable KVM.
    Setup(String),
    /// The kernel image could not be loaded.
    Load(String),
    /// The VMM failed.
    Internal(String),
    /// A save file given to `--restore` cannot be read or is malformed.
    SaveFile(String),
    /// `--incoming`: the stream was refused, or the source went away before its commit.
    Incoming(String),
}

impl VmmError {
    /// The process exit code for this error.
    pub fn exit_code(&self) -> u8 {
        match self {
            VmmError::Setup(_)
            | VmmError::Load(_)
            | VmmError::SaveFile(_)
            | VmmError::Incoming(_) => exit_code::SETUP,
            VmmError::Internal(_) => exit_code::VMM_ERROR,
        }
    }
}

impl fmt::Display for VmmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            VmmError::Setup(m) => write!(f, "setup: {m}"),
            VmmError::Load(m) => write!(f, "kernel image: {m}"),
            VmmError::Internal(m) => write!(f, "internal: {m}"),
            VmmError::SaveFile(m) => write!(f, "save file {m}"),
            VmmError::Incoming(m) => write!(f, "{m}"),
        }
    }
}

impl std::error::Error for VmmError {}
