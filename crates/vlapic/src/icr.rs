//! The interrupt command register: decoding an ICR write into an outgoing
//! interrupt message, with the SDM's validity rules (SDM Vol. 3A §11.6.1).

use crate::delivery::{DeliveryMode, DestMode};

/// ICR bit 12: delivery status (xAPIC; always reads idle here, sends complete at once).
pub const ICR_DELIVERY_STATUS: u64 = 1 << 12;
/// ICR bit 14: level (assert = 1).
pub const ICR_LEVEL_ASSERT: u64 = 1 << 14;
/// ICR bit 15: trigger mode level.
pub const ICR_TRIGGER_LEVEL: u64 = 1 << 15;
/// ICR bit 11: logical destination mode.
pub const ICR_DEST_LOGICAL: u64 = 1 << 11;
/// Writable bits of ICR low: vector, delivery mode, destination mode, level,
/// trigger, shorthand.
pub const ICR_LOW_MASK: u64 = 0x000C_CFFF;
/// Reserved bits of the x2APIC 64-bit ICR that #GP (bits 13, 17:16, 31:20; as KVM).
pub const X2APIC_ICR_RESERVED: u64 = (1 << 13) | (3 << 16) | 0xFFF0_0000;
/// Writable bits of the xAPIC ICR high register (destination, bits 31:24).
pub const ICR_HIGH_MASK: u32 = 0xFF00_0000;

/// Destination shorthand (ICR bits 19:18).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Shorthand {
    /// 00: use the destination field.
    None,
    /// 01: the sender itself.
    SelfOnly,
    /// 10: every APIC including the sender.
    AllIncludingSelf,
    /// 11: every APIC except the sender.
    AllExcludingSelf,
}

impl Shorthand {
    /// Decodes ICR bits 19:18.
    pub const fn from_icr(icr: u64) -> Self {
        match (icr >> 18) & 3 {
            0 => Shorthand::None,
            1 => Shorthand::SelfOnly,
            2 => Shorthand::AllIncludingSelf,
            _ => Shorthand::AllExcludingSelf,
        }
    }
}

/// An interrupt message sent by a local APIC through its ICR, for the fabric to route.
/// Self-only IPIs never appear here: the sending APIC takes them itself.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct IpiMessage {
    /// Delivery mode (never ExtINT: ICR mode 111 is reserved, SDM Table 11-?).
    pub mode: DeliveryMode,
    /// Vector, or start page for SIPI.
    pub vector: u8,
    /// Physical or logical destination.
    pub dest_mode: DestMode,
    /// Shorthand; `None` means "use `dest`". Never `SelfOnly`.
    pub shorthand: Shorthand,
    /// Destination: 8 bits in xAPIC format, 32 bits in x2APIC format.
    pub dest: u32,
    /// Whether `dest` is an x2APIC (32-bit) destination; broadcast is then 0xFFFF_FFFF.
    pub x2apic: bool,
}

impl IpiMessage {
    /// Whether the destination field is the broadcast value for its format.
    pub const fn is_broadcast(&self) -> bool {
        if self.x2apic {
            self.dest == u32::MAX
        } else {
            self.dest == 0xFF
        }
    }
}

/// What an ICR value asks for, once decoded and checked.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum IcrCommand {
    /// A message to route.
    Send(IpiMessage),
    /// A fixed interrupt to the sender itself (shorthand self).
    SelfInterrupt(u8),
    /// A fixed or lowest-priority vector below 16: set ESR send-illegal-vector, send nothing.
    IllegalVector,
    /// A combination the SDM calls invalid, INIT level de-assert (not supported since
    /// the Pentium 4), or a reserved delivery mode: nothing is sent.
    Dropped(DropReason),
}

/// Why an ICR write sent nothing.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) enum DropReason {
    /// Delivery mode 011 or 111 (reserved in the ICR).
    ReservedMode,
    /// INIT level de-assert (P6-era arbitration-ID sync; ignored since the Pentium 4).
    InitDeassert,
    /// Shorthand and delivery mode may not be combined (e.g. NMI to self).
    InvalidShorthand,
    /// Level-triggered de-assert of a mode other than INIT.
    LevelDeassert,
}

/// Decodes an ICR value. `x2apic` selects the destination format: bits 63:32
/// (x2APIC) or 63:56 (xAPIC, from ICR high).
///
/// Validity follows SDM §11.6.1 (Table "Valid Combinations for the Local xAPIC
/// Interrupt Command Register"): the trigger mode is ignored except for INIT
/// de-assert, so a level-assert fixed IPI is sent as edge; lowest priority, SMI,
/// NMI, INIT and SIPI may not use the self or all-including-self shorthands.
pub(crate) fn decode(icr: u64, x2apic: bool) -> IcrCommand {
    let vector = (icr & 0xFF) as u8;
    let Some(mode) = DeliveryMode::from_bits((icr >> 8) as u32) else {
        return IcrCommand::Dropped(DropReason::ReservedMode);
    };
    let shorthand = Shorthand::from_icr(icr);
    let level = icr & ICR_LEVEL_ASSERT != 0;
    let trigger_level = icr & ICR_TRIGGER_LEVEL != 0;
    if mode == DeliveryMode::ExtInt {
        return IcrCommand::Dropped(DropReason::ReservedMode);
    }
    if trigger_level && !level {
        return IcrCommand::Dropped(if mode == DeliveryMode::Init {
            DropReason::InitDeassert
        } else {
            DropReason::LevelDeassert
        });
    }
    match (mode, shorthand) {
        (DeliveryMode::Fixed, _) => {}
        (_, Shorthand::None | Shorthand::AllExcludingSelf) => {}
        _ => return IcrCommand::Dropped(DropReason::InvalidShorthand),
    }
    if mode.uses_vector() && vector < 16 {
        return IcrCommand::IllegalVector;
    }
    if shorthand == Shorthand::SelfOnly {
        return IcrCommand::SelfInterrupt(vector);
    }
    let dest = if x2apic {
        (icr >> 32) as u32
    } else {
        (icr >> 56) as u32
    };
    IcrCommand::Send(IpiMessage {
        mode,
        vector,
        dest_mode: if icr & ICR_DEST_LOGICAL != 0 {
            DestMode::Logical
        } else {
            DestMode::Physical
        },
        shorthand,
        dest: if shorthand == Shorthand::None {
            dest
        } else {
            0
        },
        x2apic,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn icr(vector: u64, mode: u64, shorthand: u64) -> u64 {
        vector | mode << 8 | shorthand << 18 | ICR_LEVEL_ASSERT
    }

    // SDM §11.6.1: fixed IPIs use any shorthand; the destination comes from ICR high in xAPIC mode.
    #[test]
    fn fixed_physical_xapic() {
        let c = decode(0x0300_0000_0000_4041, false);
        assert_eq!(
            c,
            IcrCommand::Send(IpiMessage {
                mode: DeliveryMode::Fixed,
                vector: 0x41,
                dest_mode: DestMode::Physical,
                shorthand: Shorthand::None,
                dest: 3,
                x2apic: false,
            })
        );
    }

    #[test]
    fn x2apic_destination_is_32_bits() {
        let IcrCommand::Send(m) = decode(0x1234_5678_0000_0850, true) else {
            panic!("not sent")
        };
        assert_eq!(m.dest, 0x1234_5678);
        assert_eq!(m.dest_mode, DestMode::Logical);
    }

    #[test]
    fn self_shorthand_is_local() {
        assert_eq!(
            decode(icr(0x55, 0, 1), false),
            IcrCommand::SelfInterrupt(0x55)
        );
    }

    // SDM: NMI, INIT, SIPI, SMI, lowest priority to self or all-including-self are invalid.
    #[test]
    fn invalid_shorthand_combinations_are_dropped() {
        for mode in [1, 2, 4, 5, 6] {
            for sh in [1, 2] {
                assert_eq!(
                    decode(icr(0x40, mode, sh), false),
                    IcrCommand::Dropped(DropReason::InvalidShorthand),
                    "mode {mode} shorthand {sh}"
                );
            }
            assert!(matches!(
                decode(icr(0x40, mode, 3), false),
                IcrCommand::Send(_)
            ));
        }
    }

    #[test]
    fn illegal_vectors_and_reserved_modes() {
        assert_eq!(decode(icr(15, 0, 0), false), IcrCommand::IllegalVector);
        assert_eq!(decode(icr(3, 1, 0), false), IcrCommand::IllegalVector);
        assert_eq!(
            decode(icr(3, 0, 1), false),
            IcrCommand::IllegalVector,
            "self too"
        );
        // NMI/INIT ignore the vector.
        assert!(matches!(decode(icr(0, 4, 0), false), IcrCommand::Send(_)));
        assert_eq!(
            decode(icr(0x40, 3, 0), false),
            IcrCommand::Dropped(DropReason::ReservedMode)
        );
        assert_eq!(
            decode(icr(0x40, 7, 0), false),
            IcrCommand::Dropped(DropReason::ReservedMode)
        );
    }

    #[test]
    fn init_level_deassert_is_ignored() {
        let deassert = 5 << 8 | ICR_TRIGGER_LEVEL;
        assert_eq!(
            decode(deassert, false),
            IcrCommand::Dropped(DropReason::InitDeassert)
        );
        // A level-assert fixed IPI is sent (as edge).
        assert!(matches!(
            decode(0x41 | ICR_TRIGGER_LEVEL | ICR_LEVEL_ASSERT, false),
            IcrCommand::Send(_)
        ));
    }
}
