//! The fields shared by every interrupt message (ICR, LVT, IOAPIC redirection
//! entry, MSI): delivery mode, destination mode, trigger mode.

/// Delivery mode (SDM §11.6.1 and the LVT/IOAPIC equivalents).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DeliveryMode {
    /// 000: the vector goes to IRR.
    Fixed,
    /// 001: fixed, to the lowest-priority target.
    LowestPriority,
    /// 010: system management interrupt.
    Smi,
    /// 100: non-maskable interrupt.
    Nmi,
    /// 101: INIT.
    Init,
    /// 110: start-up IPI (the vector is the start page).
    StartUp,
    /// 111: external interrupt (vector comes from an 8259-style controller).
    ExtInt,
}

impl DeliveryMode {
    /// Decodes the 3-bit field; 011 is reserved and yields `None`.
    pub const fn from_bits(bits: u32) -> Option<Self> {
        Some(match bits & 7 {
            0 => DeliveryMode::Fixed,
            1 => DeliveryMode::LowestPriority,
            2 => DeliveryMode::Smi,
            4 => DeliveryMode::Nmi,
            5 => DeliveryMode::Init,
            6 => DeliveryMode::StartUp,
            7 => DeliveryMode::ExtInt,
            _ => return None,
        })
    }

    /// The 3-bit encoding.
    pub const fn bits(self) -> u32 {
        match self {
            DeliveryMode::Fixed => 0,
            DeliveryMode::LowestPriority => 1,
            DeliveryMode::Smi => 2,
            DeliveryMode::Nmi => 4,
            DeliveryMode::Init => 5,
            DeliveryMode::StartUp => 6,
            DeliveryMode::ExtInt => 7,
        }
    }

    /// Whether the message carries a vector that lands in IRR (fixed, lowest priority).
    pub const fn uses_vector(self) -> bool {
        matches!(self, DeliveryMode::Fixed | DeliveryMode::LowestPriority)
    }
}

/// Destination mode.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DestMode {
    /// The destination is an APIC ID.
    Physical,
    /// The destination is matched against LDR (and DFR in xAPIC mode).
    Logical,
}

/// An interrupt handed to one local APIC for acceptance.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Delivery {
    /// How the interrupt is delivered.
    pub mode: DeliveryMode,
    /// Vector (fixed/lowest priority), start page (SIPI), ignored otherwise.
    pub vector: u8,
    /// Level-triggered (sets the TMR bit so the EOI is reported to the IOAPIC).
    pub level_triggered: bool,
}

impl Delivery {
    /// An edge-triggered fixed interrupt.
    pub const fn fixed(vector: u8) -> Self {
        Self {
            mode: DeliveryMode::Fixed,
            vector,
            level_triggered: false,
        }
    }

    /// A level-triggered fixed interrupt.
    pub const fn fixed_level(vector: u8) -> Self {
        Self {
            mode: DeliveryMode::Fixed,
            vector,
            level_triggered: true,
        }
    }

    /// A message of a mode that carries no IRR vector (NMI, SMI, INIT, ExtINT),
    /// or a SIPI with its start page.
    pub const fn event(mode: DeliveryMode, vector: u8) -> Self {
        Self {
            mode,
            vector,
            level_triggered: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delivery_mode_round_trip_and_reserved() {
        for bits in 0..8 {
            match DeliveryMode::from_bits(bits) {
                Some(m) => assert_eq!(m.bits(), bits),
                None => assert_eq!(bits, 3),
            }
        }
    }
}
