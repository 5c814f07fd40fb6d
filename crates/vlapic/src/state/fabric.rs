//! IOAPIC and fabric state: plain records of the 82093AA-style IOAPIC and the set
//! of local APICs, with their rules, and export/import for [`IoApic`](crate::ioapic::IoApic).

use alloc::vec::Vec;
use core::fmt;

use crate::lapic::LapicConfig;
use crate::state::error::ImportError;
use crate::state::lapic::LapicState;

/// Most redirection entries an IOAPIC can have: entry n occupies registers
/// 0x10 + 2n and 0x11 + 2n, which must fit the 8-bit IOREGSEL.
pub const MAX_PINS: usize = 120;

/// Redirection-entry bits that are neither writable nor read-only status: bits 48:17
/// (82093AA datasheet §3.2.4 reserves 55:17; bits 55:49 carry the Linux/KVM extended
/// destination ID, which the fabric's IOAPIC honours, so they are state too).
pub const RTE_RESERVED: u64 = !(crate::ioapic::RTE_WRITABLE
    | crate::ioapic::RTE_REMOTE_IRR
    | crate::ioapic::RTE_DELIVERY_STATUS);
/// Redirection-entry bit 14: remote IRR (read-only, level-triggered entries only).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection-entry bit 15: level-triggered.
pub const RTE_LEVEL: u64 = 1 << 15;

/// Architectural state of one IOAPIC.
///
/// With the `serde` feature it implements `Serialize` and `Deserialize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct IoApicState {
    /// IOAPIC ID (register 0x00 bits 27:24).
    pub id: u8,
    /// IOREGSEL, the register-select latch.
    pub select: u8,
    /// Redirection entries, 64 bits each, pin 0 first.
    pub redirection: Vec<u64>,
    /// Input pin levels (true = asserted), one per redirection entry.
    pub pin_levels: Vec<bool>,
}

/// A rule an [`IoApicState`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoApicError {
    /// ID above 0xF.
    Id(u8),
    /// No redirection entries, or more than [`MAX_PINS`].
    Pins(usize),
    /// `pin_levels` and `redirection` lengths differ.
    Levels {
        /// Redirection entries.
        pins: usize,
        /// Pin levels.
        levels: usize,
    },
    /// A redirection entry sets reserved bits 55:17.
    RteReserved {
        /// The pin.
        pin: usize,
        /// The entry.
        value: u64,
    },
    /// Remote IRR set in an edge-triggered entry.
    RteRemoteIrr {
        /// The pin.
        pin: usize,
        /// The entry.
        value: u64,
    },
    /// The state's pin count differs from the destination IOAPIC's.
    PinCount {
        /// Entries in the state.
        found: usize,
        /// Pins of the destination.
        expected: usize,
    },
}

impl IoApicError {
    /// The field concerned.
    pub fn field(&self) -> &'static str {
        match self {
            IoApicError::Id(_) => "ioapic.id",
            IoApicError::Pins(_) | IoApicError::PinCount { .. } => "ioapic.redirection",
            IoApicError::Levels { .. } => "ioapic.pin_levels",
            IoApicError::RteReserved { .. } | IoApicError::RteRemoteIrr { .. } => {
                "ioapic.redirection"
            }
        }
    }
}

impl fmt::Display for IoApicError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: ", self.field())?;
        match *self {
            IoApicError::Id(id) => write!(f, "{id:#x} is above 0xf"),
            IoApicError::Pins(n) => write!(f, "{n} entries (1 to {MAX_PINS} allowed)"),
            IoApicError::Levels { pins, levels } => {
                write!(f, "{levels} pin levels for {pins} redirection entries")
            }
            IoApicError::RteReserved { pin, value } => {
                write!(f, "entry {pin} = {value:#x} sets reserved bits 48:17")
            }
            IoApicError::PinCount { found, expected } => {
                write!(f, "{found} entries for an IOAPIC with {expected} pins")
            }
            IoApicError::RteRemoteIrr { pin, value } => {
                write!(
                    f,
                    "entry {pin} = {value:#x} has remote IRR set but is edge-triggered"
                )
            }
        }
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for IoApicError {}

impl IoApicState {
    /// Every rule this state breaks.
    pub fn validate(&self) -> Vec<IoApicError> {
        let mut out = Vec::new();
        if self.id > 0xF {
            out.push(IoApicError::Id(self.id));
        }
        let pins = self.redirection.len();
        if pins == 0 || pins > MAX_PINS {
            out.push(IoApicError::Pins(pins));
        }
        if self.pin_levels.len() != pins {
            out.push(IoApicError::Levels {
                pins,
                levels: self.pin_levels.len(),
            });
        }
        for (pin, &value) in self.redirection.iter().enumerate() {
            if value & RTE_RESERVED != 0 {
                out.push(IoApicError::RteReserved { pin, value });
            }
            if value & RTE_REMOTE_IRR != 0 && value & RTE_LEVEL == 0 {
                out.push(IoApicError::RteRemoteIrr { pin, value });
            }
        }
        out
    }
}

/// The state of a whole interrupt fabric: every local APIC and the IOAPIC.
///
/// With the `serde` feature it implements `Serialize` and `Deserialize`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
#[cfg_attr(feature = "serde", derive(serde::Serialize, serde::Deserialize))]
pub struct FabricState {
    /// Local APICs, in vCPU order.
    pub apics: Vec<LapicState>,
    /// The IOAPIC.
    pub ioapic: IoApicState,
}

/// A rule a [`FabricState`] breaks.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum FabricError {
    /// The number of APIC states differs from the number of configured APICs.
    ApicCount {
        /// States.
        found: usize,
        /// Configured APICs.
        expected: usize,
    },
    /// APIC `index` breaks a local APIC rule.
    Apic {
        /// vCPU index.
        index: usize,
        /// The rule.
        error: ImportError,
    },
    /// The IOAPIC breaks a rule.
    IoApic(IoApicError),
}

impl fmt::Display for FabricError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FabricError::ApicCount { found, expected } => {
                write!(f, "apics: {found} states for {expected} APICs")
            }
            FabricError::Apic { index, error } => write!(f, "apics[{index}].{error}"),
            FabricError::IoApic(e) => e.fmt(f),
        }
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for FabricError {}

impl FabricState {
    /// Every rule the fabric state breaks against APICs configured as `cfgs`
    /// (one per vCPU, in order). Aliased xAPIC IDs are legal (the guest may write the
    /// ID register; routing delivers to every alias), so they are not a rule.
    pub fn validate(&self, cfgs: &[LapicConfig]) -> Vec<FabricError> {
        let mut out = Vec::new();
        if self.apics.len() != cfgs.len() {
            out.push(FabricError::ApicCount {
                found: self.apics.len(),
                expected: cfgs.len(),
            });
        }
        for (index, (apic, cfg)) in self.apics.iter().zip(cfgs).enumerate() {
            out.extend(
                apic.validate(cfg)
                    .into_iter()
                    .map(|error| FabricError::Apic { index, error }),
            );
        }
        out.extend(self.ioapic.validate().into_iter().map(FabricError::IoApic));
        out
    }
}

impl crate::ioapic::IoApic {
    /// The IOAPIC's architectural state.
    pub fn export(&self) -> IoApicState {
        // Every field is named (no `..`): a new one does not compile without a
        // migration decision.
        let crate::ioapic::IoApic {
            id,
            select,
            entries,
            levels,
        } = self;
        IoApicState {
            id: *id,
            select: *select,
            redirection: entries.clone(),
            pin_levels: levels.clone(),
        }
    }

    /// Every rule `state` breaks as an import into this IOAPIC (its own rules plus a
    /// pin count equal to this IOAPIC's).
    pub fn check_import(&self, state: &IoApicState) -> Vec<IoApicError> {
        let mut out = state.validate();
        let expected = usize::from(self.pins());
        if state.redirection.len() != expected {
            out.push(IoApicError::PinCount {
                found: state.redirection.len(),
                expected,
            });
        }
        out
    }

    /// Installs `state` after validating it; on error nothing changes. Sends nothing
    /// (a pending level pin fires at its next trigger, as it would have on the source).
    pub fn import(&mut self, state: &IoApicState) -> Result<(), IoApicError> {
        if let Some(e) = self.check_import(state).into_iter().next() {
            return Err(e);
        }
        // Every field is named (no `..`): a new one does not compile until its
        // installation is decided.
        let IoApicState {
            id,
            select,
            redirection,
            pin_levels,
        } = state;
        self.set_id(*id);
        self.set_select(*select);
        for (pin, (&entry, &level)) in redirection.iter().zip(pin_levels).enumerate() {
            let pin = u8::try_from(pin).unwrap_or(u8::MAX);
            self.set_entry(pin, entry);
            self.set_line_level(pin, level);
        }
        Ok(())
    }
}
