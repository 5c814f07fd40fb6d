//! IOAPIC and fabric state: plain records of the 82093AA-style IOAPIC and the set
//! of local APICs, with their own rules. Not yet wired to the fabric's types.

use alloc::vec::Vec;
use core::fmt;

use crate::lapic::LapicConfig;
use crate::state::error::ImportError;
use crate::state::lapic::LapicState;

/// Most redirection entries an IOAPIC can have: entry n occupies registers
/// 0x10 + 2n and 0x11 + 2n, which must fit the 8-bit IOREGSEL.
pub const MAX_PINS: usize = 120;

/// Redirection-entry bits 55:17: reserved (82093AA datasheet §3.2.4).
pub const RTE_RESERVED: u64 = 0x00FF_FFFF_FFFE_0000;
/// Redirection-entry bit 14: remote IRR (read-only, level-triggered entries only).
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection-entry bit 15: level-triggered.
pub const RTE_LEVEL: u64 = 1 << 15;

/// Architectural state of one IOAPIC.
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
}

impl IoApicError {
    /// The field concerned.
    pub fn field(&self) -> &'static str {
        match self {
            IoApicError::Id(_) => "ioapic.id",
            IoApicError::Pins(_) => "ioapic.redirection",
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
                write!(f, "entry {pin} = {value:#x} sets reserved bits 55:17")
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
    /// Two APICs in the same mode share an APIC ID (possible in xAPIC mode, where
    /// the guest may rewrite the ID register): routing would be ambiguous.
    DuplicateId {
        /// The first vCPU index.
        first: usize,
        /// The second vCPU index.
        second: usize,
        /// The shared ID.
        id: u32,
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
            FabricError::DuplicateId { first, second, id } => write!(
                f,
                "apics[{second}].id: {id:#x} is also the ID of apics[{first}]"
            ),
            FabricError::IoApic(e) => e.fmt(f),
        }
    }
}

#[cfg(feature = "std")]
impl std::error::Error for FabricError {}

impl FabricState {
    /// Every rule the fabric state breaks against APICs configured as `cfgs`
    /// (one per vCPU, in order), including distinct IDs among APICs in one mode.
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
        for (second, b) in self.apics.iter().enumerate() {
            let dup = self.apics.iter().take(second).position(|a| {
                a.id == b.id
                    && a.mode() == b.mode()
                    && a.mode().is_some_and(|m| m != crate::ApicMode::Disabled)
            });
            if let Some(first) = dup {
                out.push(FabricError::DuplicateId {
                    first,
                    second,
                    id: b.id,
                });
            }
        }
        out.extend(self.ioapic.validate().into_iter().map(FabricError::IoApic));
        out
    }
}
