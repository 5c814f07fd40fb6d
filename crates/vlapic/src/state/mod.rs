//! Migration-grade architectural state: plain state types, their validation, and
//! the native, KVM and illumos bhyve file formats. Nothing derived is saved.
//!
//! [`LapicState`] holds only what the SDM defines as local APIC state plus the two
//! latches software cannot see directly (pending ESR bits, the timer expiry). PPR,
//! the verifier's stack and every cache are rebuilt on [`LocalApic::import`], which
//! validates everything first ([`LapicState::validate`]) and changes nothing when a
//! rule is broken. See `docs/state-formats.md` for the byte layouts.
//!
//! ```
//! use vlapic::state::{bhyve, native};
//! use vlapic::{Delivery, LapicConfig, LocalApic};
//!
//! let mut src = LocalApic::new(LapicConfig::default());
//! let _ = src.write_register(0xF0, 0x1FF, 0); // software enable
//! src.deliver(Delivery::fixed_level(0x41), 0);
//! src.acknowledge(); // 0x41 in service, mid-handler
//! let file = native::encode_lapic(&src.export());
//!
//! let mut dst = LocalApic::new(LapicConfig::default());
//! dst.import(&native::decode_lapic(&file).unwrap(), 1_000).unwrap();
//! assert_eq!(dst.ppr(), 0x40); // derived from ISR, not saved
//! assert_eq!(dst.write_register(0xB0, 0, 1_000).eoi, Some(0x41)); // level EOI to the IOAPIC
//!
//! let mut bad = src.export();
//! bad.isr[2] |= 1 << 9; // 0x49 in service next to 0x41
//! let err = dst.import(&bad, 1_000).unwrap_err();
//! assert_eq!(err.to_string(), "isr: vectors 0x41 and 0x49 both in service in priority class 4");
//! assert_eq!(bhyve::field_offset(err.field()), Some(28));
//! ```
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

pub use error::{DecodeError, Field, ImportError, VersionMismatch};
pub use fabric::{FabricError, FabricState, IoApicError, IoApicState};
pub use lapic::LapicState;
