//! # vlapic — an emulated x86 local APIC whose only truth is architectural state
//!
//! One [`LocalApic`] per vCPU, emulating the xAPIC MMIO page and the x2APIC MSRs of
//! the Intel SDM (Vol. 3A, chapter "Advanced Programmable Interrupt Controller").
//! The design follows illumos bug 12936: the processor priority and the vector an
//! EOI retires are derived from ISR0–7 on every use; no private stack or cache is
//! ever load-bearing, so state restored from registers alone is complete. The old
//! nesting stack survives only as an optional [`verifier`] (feature `verify`).
//! (For speed, ISR carries a summary of which priority classes are occupied and IRR
//! one of which register words are, so PPR's class is one bit scan and the highest
//! vector two; both are derived from the words, rebuilt from them on every import and
//! reset, and checked against a fresh derivation by [`LocalApic::caches_consistent`]
//! in the property tests.)
//!
//! The library never reads a clock — callers pass VM time in nanoseconds — and
//! never calls into other objects: IPIs, IOAPIC EOIs and timer changes come back
//! as [`Effects`]; NMI/SMI/INIT/SIPI/ExtINT wait in [`Events`].
//!
//! ```
//! use vlapic::{LocalApic, LapicConfig, Delivery};
//!
//! let mut apic = LocalApic::new(LapicConfig::default());
//! let now = 0;
//! let _ = apic.write_register(0xF0, 0x1FF, now);        // SVR: software enable
//! apic.deliver(Delivery::fixed(0x30), now);              // a device interrupt
//! // The VMM injects when the guest can take it, then acknowledges:
//! let v = apic.pending_vector().unwrap();
//! assert_eq!(apic.acknowledge(), Some(v));
//! assert_eq!(apic.ppr(), 0x30);
//! let fx = apic.write_register(0xB0, 0, now);           // guest EOI
//! assert_eq!(fx.eoi, None);                              // edge: nothing for the IOAPIC
//! assert_eq!(apic.ppr(), 0x00);
//! ```
//!
//! A VM's APICs and IOAPIC together live in [`fabric::Fabric`] (single-threaded) or
//! `fabric::SharedFabric` (shared by vCPU threads, feature `std`); saved state and its
//! file formats are in [`state`].
//!
//! # Cargo features
//!
//! * **`std`** (default): [`std::error::Error`](core::error::Error) for the error types
//!   ([`GpFault`], [`msi::MsiError`], [`state::ImportError`], [`state::DecodeError`],
//!   [`state::fabric::IoApicError`], [`state::fabric::FabricError`]) and
//!   `fabric::SharedFabric`, the fabric shared by vCPU threads. Without it the crate is
//!   `#![no_std]` and needs only `alloc`.
//! * **`verify`** (default): the nesting verifier — the `verifier` module and
//!   `LocalApic::{verifier, set_verifier_enabled, clear_verifier_counters}`. Without
//!   it [`LapicConfig::verify`] is accepted and ignored, and nothing is checked.
//! * **`trace`** (off): interrupt trace events — each fixed interrupt's acceptance
//!   with its origin (IPI sender, IOAPIC pin, MSI, LVT, self), its acknowledge and
//!   EOI, NMI/SMI/INIT/SIPI/ExtINT, TPR changes — in a fixed ring per APIC that the
//!   embedder drains ([`trace`] module). Stamped with the VM time the caller passed
//!   in; no clock, no I/O, no allocation. Without it nothing is compiled in.
//! * **`serde`** (off): `Serialize`/`Deserialize` for the state types
//!   ([`state::LapicState`], [`state::fabric::IoApicState`],
//!   [`state::fabric::FabricState`]). The native binary format needs no dependency.
//!
//! Items that need a feature say so in their documentation (on docs.rs, which builds
//! with every feature, as a "feature" badge).
//!
//! # What is stable
//!
//! Everything public is covered by semantic versioning from 0.1: the names, the
//! signatures and the documented behaviour. Within that:
//!
//! * Types that will grow are `#[non_exhaustive]`: the configuration and result
//!   structs ([`LapicConfig`], [`Effects`], [`Events`], [`Stats`],
//!   [`fabric::FabricConfig`], [`EntryPlan`]) and the error and classification enums
//!   ([`state::ImportError`], [`state::Field`], [`state::native::Kind`],
//!   `verifier::ViolationKind` (feature `verify`), ...).
//!   Build the structs with their constructors and `with_*` methods
//!   (`LapicConfig::with_id(3).with_mode(ApicMode::X2Apic)`,
//!   `FabricConfig::with_vcpus(n).with_ioapic_id(2)`, `Events::default()`), read
//!   and assign their public fields, and match the enums with a `_` arm; new fields
//!   and variants arrive in minor versions.
//! * The saved-state types ([`state::LapicState`], [`state::fabric::IoApicState`],
//!   [`state::fabric::FabricState`]) are exhaustive on purpose: a field is a format
//!   change, made with a format version ([`state::native::FORMAT_VERSION`]).
//! * The register and bit constants (`regs`, `lvt`, `icr`, `ioapic`) are the SDM's
//!   and 82093AA's values and do not change.
//! * Not API: anything `#[doc(hidden)]` or private — the register decoder, the
//!   routing views and map construction, the ICR decoder, the verifier's internal
//!   stack operations, and the test oracles.
//!
//! One way in for each job: an APIC is built with [`LocalApic::new`], a VM with
//! [`fabric::Fabric::new`] or `fabric::SharedFabric::new`; guest accesses go through
//! the MMIO/MSR methods; saved state through `export`/`import` and [`state`]'s codecs.
//!
//! # Minimum supported Rust version
//!
//! Rust 1.85. Raising it is a minor-version change.
#![cfg_attr(not(feature = "std"), no_std)]
#![cfg_attr(docsrs, feature(doc_cfg))]
#![forbid(unsafe_code)]
#![deny(missing_docs)]
#![warn(clippy::arithmetic_side_effects)]
#![cfg_attr(test, allow(clippy::arithmetic_side_effects))]

extern crate alloc;

// Trace hooks (feature `trace`): defined before the modules so every one sees them.
/// Records `kind` on `$apic`'s ring at its current time; nothing without the feature.
macro_rules! trace_event {
    ($apic:expr, $kind:expr) => {
        #[cfg(feature = "trace")]
        if $apic.trace.enabled() {
            // Off: one test of a flag; the event (and the origin it takes) is
            // built only when recording.
            let now = $apic.now;
            let kind = $kind;
            $apic.trace.record(now, kind);
        }
    };
}

/// Notes the origin of the next delivery on `$apic`; nothing without the feature.
macro_rules! trace_source {
    ($apic:expr, $source:expr) => {
        #[cfg(feature = "trace")]
        $apic.trace.set_source($source);
    };
}
pub mod delivery;
pub mod entry;
pub mod fabric;
pub mod icr;
pub mod ioapic;
pub mod lapic;
pub mod lvt;
mod mmio;
pub mod msi;
pub mod priority;
pub mod regs;
pub mod routing;
pub mod state;
pub mod timer;
#[cfg(feature = "trace")]
#[cfg_attr(docsrs, doc(cfg(feature = "trace")))]
pub mod trace;
pub mod vector_set;
#[cfg(feature = "verify")]
#[cfg_attr(docsrs, doc(cfg(feature = "verify")))]
pub mod verifier;
pub mod x2apic;

pub use delivery::{Delivery, DeliveryMode, DestMode};
pub use entry::EntryPlan;
pub use icr::{IpiMessage, Shorthand};
pub use lapic::{ApicMode, Effects, Events, GpFault, LapicConfig, LocalApic, Stats};
pub use lvt::{Lvt, TimerMode};
pub use timer::TimerClock;
pub use vector_set::VectorSet;
pub use x2apic::is_apic_msr;

/// The crate README's Rust examples, compiled and run as doc tests so they cannot
/// rot. The README is inside the package, so this also runs in the packaged crate
/// (`scripts/package-check.sh`).
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
struct ReadmeDoctests;
