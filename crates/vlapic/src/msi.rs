//! MSI address/data decoding into interrupt messages (Intel SDM Vol. 3A §11.11), with the
//! 15-bit extended destination ID of address bits 11:5; malformed addresses are refused.
//!
//! Address (bits 31:20 must be 0xFEE, bits 63:32 zero): destination ID 19:12,
//! extended destination ID 11:5 (destination bits 14:8, as Linux and KVM use it
//! without an IOMMU), bit 4 the remappable format (refused: there is no IOMMU),
//! redirection hint bit 3, destination mode bit 2 (1 = logical), bits 1:0 ignored.
//! Data: vector 7:0, delivery mode 10:8 (011 and 110 are reserved: refused), level
//! assert bit 14, trigger mode bit 15 (1 = level); bits 31:16 are ignored.
//!
//! A destination with no extended bits is in the 8-bit format (0xFF broadcasts); a
//! destination with extended bits is a 15-bit physical or logical ID that never
//! broadcasts. The redirection hint turns a fixed message into lowest priority
//! among the destinations (SDM §11.11.1; KVM and ACRN do the same).

use crate::delivery::{Delivery, DeliveryMode, DestMode};
use crate::icr::Shorthand;
use crate::routing::{Destination, Message};
use core::fmt;

/// Why an MSI write was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MsiError {
    /// Address bits 63:20 are not 0x0000_0000_FEE.
    NotInterruptAddress,
    /// Address bit 4: the interrupt-remapping format, which needs an IOMMU.
    Remappable,
    /// Data delivery mode 011 or 110.
    ReservedDeliveryMode,
}

impl fmt::Display for MsiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            MsiError::NotInterruptAddress => "MSI address outside 0xFEExxxxx",
            MsiError::Remappable => "remappable-format MSI without an IOMMU",
            MsiError::ReservedDeliveryMode => "reserved MSI delivery mode",
        })
    }
}

#[cfg(feature = "std")]
#[cfg_attr(docsrs, doc(cfg(feature = "std")))]
impl std::error::Error for MsiError {}

/// A decoded MSI.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Msi {
    /// Destination ID: bits 7:0 from address 19:12, bits 14:8 from address 11:5.
    pub dest_id: u32,
    /// Whether address bits 11:5 were non-zero (15-bit destination format).
    pub extended: bool,
    /// Destination mode (address bit 2).
    pub dest_mode: DestMode,
    /// Redirection hint (address bit 3).
    pub redirection_hint: bool,
    /// Delivery mode (data 10:8).
    pub mode: DeliveryMode,
    /// Vector (data 7:0).
    pub vector: u8,
    /// Level-triggered (data bit 15).
    pub level_triggered: bool,
    /// Level assert (data bit 14); a level-triggered de-assert sends nothing.
    pub assert: bool,
}

impl Msi {
    /// Decodes an MSI address/data pair; see the module documentation.
    pub fn decode(address: u64, data: u32) -> Result<Self, MsiError> {
        if address >> 20 != 0xFEE {
            return Err(MsiError::NotInterruptAddress);
        }
        if address & (1 << 4) != 0 {
            return Err(MsiError::Remappable);
        }
        let mode = match DeliveryMode::from_bits(data >> 8) {
            Some(DeliveryMode::StartUp) | None => return Err(MsiError::ReservedDeliveryMode),
            Some(m) => m,
        };
        let ext = ((address >> 5) & 0x7F) as u32;
        let low = ((address >> 12) & 0xFF) as u32;
        Ok(Msi {
            dest_id: (ext << 8) | low,
            extended: ext != 0,
            dest_mode: if address & (1 << 2) != 0 {
                DestMode::Logical
            } else {
                DestMode::Physical
            },
            redirection_hint: address & (1 << 3) != 0,
            mode,
            vector: data as u8,
            level_triggered: data & (1 << 15) != 0,
            assert: data & (1 << 14) != 0,
        })
    }

    /// The message to route, or `None` for a level-triggered de-assert.
    pub fn message(&self) -> Option<Message> {
        if self.level_triggered && !self.assert {
            return None;
        }
        let mode = if self.redirection_hint && self.mode == DeliveryMode::Fixed {
            DeliveryMode::LowestPriority
        } else {
            self.mode
        };
        Some(Message {
            delivery: Delivery {
                mode,
                vector: self.vector,
                level_triggered: self.level_triggered && mode.uses_vector(),
            },
            dest: Destination {
                shorthand: Shorthand::None,
                mode: self.dest_mode,
                id: self.dest_id,
                x2apic_format: self.extended,
            },
        })
    }
}

/// An MSI as a device (or a split-model VMM's IOAPIC) writes it: the address and data
/// to hand to the hypervisor (KVM_SIGNAL_MSI) or to [`Msi::decode`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct MsiMessage {
    /// The address: 0xFEE in bits 31:20, fields as in the module documentation.
    pub address: u64,
    /// The data: vector, delivery mode, level assert, trigger mode.
    pub data: u32,
}

impl MsiMessage {
    /// The MSI an IOAPIC redirection entry sends (the fields of both are the same
    /// message, SDM Vol. 3A §11.11 and the 82093AA datasheet §3.2.4): address
    /// `0xFEE0_0000`, destination 63:56 → address 19:12, the extended destination of
    /// entry bits 55:49 → address 11:5 (destination bits 14:8, as [`Msi::decode`]
    /// reads them), lowest-priority delivery → redirection hint (bit 3), logical →
    /// bit 2. Data: vector, delivery mode in 10:8, and for a level-triggered entry
    /// the trigger (bit 15) and level-assert (bit 14) bits. Mask, polarity, remote
    /// IRR and delivery status are the IOAPIC's own state and are not encoded.
    ///
    /// ```
    /// use vlapic::msi::{Msi, MsiMessage};
    /// // Vector 0x41, lowest priority, logical destination 0x03, level-triggered.
    /// let m = MsiMessage::from_redirection_entry(0x0300_0000_0000_0000 | 1 << 15 | 1 << 11 | 1 << 8 | 0x41);
    /// assert_eq!(m.address, 0xFEE0_300C);
    /// assert_eq!(m.data, 0xC141);
    /// assert_eq!(Msi::decode(m.address, m.data).unwrap().dest_id, 3);
    /// ```
    pub const fn from_redirection_entry(entry: u64) -> MsiMessage {
        let dest8 = (entry >> 56) & 0xFF;
        let ext = (entry >> 49) & 0x7F;
        let mode = ((entry >> 8) & 7) as u32;
        let logical = entry & (1 << 11) != 0;
        let level = entry & (1 << 15) != 0;
        let mut address = 0xFEE0_0000 | dest8 << 12 | ext << 5;
        if mode == DeliveryMode::LowestPriority.bits() {
            address |= 1 << 3;
        }
        if logical {
            address |= 1 << 2;
        }
        let mut data = (entry & 0xFF) as u32 | mode << 8;
        if level {
            data |= 1 << 15 | 1 << 14;
        }
        MsiMessage { address, data }
    }
}

/// Builds an MSI address (no redirection hint) for a destination, using address
/// bits 11:5 for destination bits 14:8. `None` if `dest_id` needs more than 15 bits.
pub fn address(dest_id: u32, logical: bool) -> Option<u64> {
    if dest_id > 0x7FFF {
        return None;
    }
    let low = u64::from(dest_id & 0xFF) << 12;
    let ext = u64::from(dest_id >> 8) << 5;
    Some(0xFEE0_0000 | low | ext | if logical { 1 << 2 } else { 0 })
}
