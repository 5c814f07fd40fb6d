//! Migration-grade architectural state: plain state types, their validation, and
//! the native, KVM and illumos bhyve file formats. Nothing derived is saved.
//!
//! [`LapicState`] holds only what the SDM defines as local APIC state plus the two
//! latches software cannot see directly (pending ESR bits, the timer expiry). PPR,
//! the verifier's stack and every cache are rebuilt on [`LocalApic::import`], which
//! validates everything first ([`LapicState::validate`]) and changes nothing when a
//! rule is broken. See `docs/state-formats.md` for the byte layouts.
//!
//! [`LocalApic::import`]: crate::LocalApic::import

pub mod bhyve;
pub mod error;
pub mod fabric;
pub mod kvm;
pub mod lapic;
pub mod native;
pub mod validate;
mod wire;

pub use error::{DecodeError, Field, ImportError};
pub use fabric::{FabricError, FabricState, IoApicError, IoApicState};
pub use lapic::LapicState;
