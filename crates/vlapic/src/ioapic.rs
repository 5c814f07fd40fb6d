//! An 82093AA-compatible IOAPIC (version 0x20, with the EOI register at 0x40): registers,
//! redirection entries, pin levels, remote IRR. It only decides what to send; the fabric routes it.
//!
//! Model (82093AA datasheet §3.2, Intel SDM Vol. 3A §11.11 for the message fields):
//!
//! * The state is architectural only: ID, IOREGSEL, the redirection entries (remote
//!   IRR included) and the electrical level of each pin. Delivery status is derived
//!   on read: set while a level-triggered pin is asserted but masked (send pending).
//! * Edge-triggered pins fire on the inactive→active transition (polarity applied)
//!   while unmasked; an edge arriving while masked is lost.
//! * Level-triggered pins (fixed or lowest-priority mode) fire while asserted,
//!   unmasked and remote IRR clear. Remote IRR is set once a local APIC accepts the
//!   interrupt ([`IoApic::set_remote_irr`], called by the fabric) and cleared by a
//!   matching EOI (broadcast from a local APIC or written to the EOI register); a
//!   pin still asserted then fires again. Unmasking an asserted level pin fires it.
//!   Level mode with NMI, SMI, INIT or ExtINT is treated as edge (the datasheet
//!   requires edge for those).
//! * Rewriting an entry keeps remote IRR (so reprogramming from inside the handler
//!   does not lose the EOI), except that switching the entry to edge clears it.
//! * The destination field is 8 bits (63:56) in both modes; bits 55:49 extend a
//!   physical destination to 15 bits (the Linux/KVM "virtual extended destination
//!   ID", mirroring MSI address bits 11:5).

use crate::delivery::{Delivery, DeliveryMode, DestMode};
use crate::icr::Shorthand;
use crate::msi::MsiMessage;
use crate::routing::{Destination, Message};
use alloc::vec::Vec;

/// Redirection entry: vector (bits 7:0).
pub const RTE_VECTOR: u64 = 0xFF;
/// Redirection entry: logical destination mode (bit 11).
pub const RTE_DEST_LOGICAL: u64 = 1 << 11;
/// Redirection entry: delivery status (bit 12), read-only, derived.
pub const RTE_DELIVERY_STATUS: u64 = 1 << 12;
/// Redirection entry: polarity active low (bit 13).
pub const RTE_POLARITY_LOW: u64 = 1 << 13;
/// Redirection entry: remote IRR (bit 14), read-only.
pub const RTE_REMOTE_IRR: u64 = 1 << 14;
/// Redirection entry: level-triggered (bit 15).
pub const RTE_LEVEL: u64 = 1 << 15;
/// Redirection entry: masked (bit 16).
pub const RTE_MASKED: u64 = 1 << 16;
/// Guest-writable bits: vector, delivery mode, destination mode, polarity, trigger,
/// mask, extended destination (55:49) and destination (63:56).
pub const RTE_WRITABLE: u64 = 0x1_AFFF | 0xFFFE_0000_0000_0000;
/// An entry after reset: masked, everything else zero.
pub const RTE_RESET: u64 = RTE_MASKED;

/// IOREGSEL: the ID register.
pub const IOAPICID: u8 = 0x00;
/// IOREGSEL: the version register.
pub const IOAPICVER: u8 = 0x01;
/// IOREGSEL: the arbitration register.
pub const IOAPICARB: u8 = 0x02;
/// IOREGSEL: low half of redirection entry 0 (entry n: `0x10 + 2n`, high half `+ 1`).
pub const IOREDTBL: u8 = 0x10;

/// MMIO offset of IOREGSEL.
pub const MMIO_IOREGSEL: u64 = 0x00;
/// MMIO offset of IOWIN.
pub const MMIO_IOWIN: u64 = 0x10;
/// MMIO offset of the EOI register (version 0x20 and later).
pub const MMIO_EOI: u64 = 0x40;

/// A set of IOAPIC pins (at most [`IoApic::MAX_PINS`]), e.g. those needing service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct PinSet(u128);

impl PinSet {
    /// The empty set.
    pub const EMPTY: PinSet = PinSet(0);

    /// Adds a pin (pins ≥ 128 are ignored).
    pub fn insert(&mut self, pin: u8) {
        if let Some(bit) = 1u128.checked_shl(u32::from(pin)) {
            self.0 |= bit;
        }
    }

    /// Whether the pin is in the set.
    pub fn contains(&self, pin: u8) -> bool {
        1u128
            .checked_shl(u32::from(pin))
            .is_some_and(|b| self.0 & b != 0)
    }

    /// Whether the set is empty.
    pub fn is_empty(&self) -> bool {
        self.0 == 0
    }

    /// The pins, lowest first.
    pub fn iter(&self) -> impl Iterator<Item = u8> {
        let mut bits = self.0;
        core::iter::from_fn(move || {
            if bits == 0 {
                return None;
            }
            let pin = bits.trailing_zeros() as u8;
            bits &= bits.wrapping_sub(1);
            Some(pin)
        })
    }
}

/// An 82093AA-compatible IOAPIC. See the module documentation for the model.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IoApic {
    /// APIC ID, 4 bits (register bits 27:24).
    pub(crate) id: u8,
    /// IOREGSEL.
    pub(crate) select: u8,
    /// Redirection entries as stored (delivery status never stored).
    pub(crate) entries: Vec<u64>,
    /// Electrical level of each pin (`true` = high).
    pub(crate) levels: Vec<bool>,
}

impl IoApic {
    /// The version this IOAPIC reports (82093AA successor with the EOI register).
    pub const VERSION: u32 = 0x20;
    /// Default pin count.
    pub const DEFAULT_PINS: u8 = 24;
    /// Most pins addressable through the 8-bit IOREGSEL (`0x10 + 2n + 1 ≤ 0xFF`).
    pub const MAX_PINS: u8 = 120;
    /// The conventional MMIO base of the first IOAPIC.
    pub const DEFAULT_BASE: u64 = 0xFEC0_0000;

    /// An IOAPIC after reset with `pins` pins (clamped to 1..=[`IoApic::MAX_PINS`])
    /// and the 4-bit `id`: every entry masked, every pin low.
    pub fn new(pins: u8, id: u8) -> Self {
        let n = usize::from(pins.clamp(1, Self::MAX_PINS));
        Self {
            id: id & 0xF,
            select: 0,
            entries: alloc::vec![RTE_RESET; n],
            levels: alloc::vec![false; n],
        }
    }

    /// Number of pins.
    pub fn pins(&self) -> u8 {
        u8::try_from(self.entries.len()).unwrap_or(Self::MAX_PINS)
    }

    /// The 4-bit IOAPIC ID.
    pub fn id(&self) -> u8 {
        self.id
    }

    /// Sets the 4-bit IOAPIC ID (state import; higher bits are dropped).
    pub fn set_id(&mut self, id: u8) {
        self.id = id & 0xF;
    }

    /// IOREGSEL.
    pub fn select(&self) -> u8 {
        self.select
    }

    /// Sets IOREGSEL.
    pub fn set_select(&mut self, select: u8) {
        self.select = select;
    }

    /// A redirection entry as stored (remote IRR included, delivery status not).
    pub fn entry(&self, pin: u8) -> Option<u64> {
        self.entries.get(usize::from(pin)).copied()
    }

    /// All redirection entries as stored.
    pub fn entries(&self) -> &[u64] {
        &self.entries
    }

    /// Restores a redirection entry verbatim (state import): writable bits and remote
    /// IRR are kept, delivery status and reserved bits dropped. Sends nothing; call
    /// [`IoApic::pending`] afterwards. Returns false for a pin that does not exist.
    pub fn set_entry(&mut self, pin: u8, value: u64) -> bool {
        match self.entries.get_mut(usize::from(pin)) {
            Some(e) => {
                *e = value & (RTE_WRITABLE | RTE_REMOTE_IRR);
                true
            }
            None => false,
        }
    }

    /// The electrical level of a pin.
    pub fn line_level(&self, pin: u8) -> Option<bool> {
        self.levels.get(usize::from(pin)).copied()
    }

    /// All pin levels.
    pub fn line_levels(&self) -> &[bool] {
        &self.levels
    }

    /// Restores a pin level without acting on it (state import).
    pub fn set_line_level(&mut self, pin: u8, level: bool) -> bool {
        match self.levels.get_mut(usize::from(pin)) {
            Some(l) => {
                *l = level;
                true
            }
            None => false,
        }
    }

    /// Whether a pin is asserted: its level, inverted for active-low polarity.
    pub fn asserted(&self, pin: u8) -> bool {
        match (self.entry(pin), self.line_level(pin)) {
            (Some(e), Some(level)) => level != (e & RTE_POLARITY_LOW != 0),
            _ => false,
        }
    }

    /// Whether an entry behaves as level-triggered (level trigger with fixed or
    /// lowest-priority delivery).
    pub fn is_level(entry: u64) -> bool {
        entry & RTE_LEVEL != 0
            && matches!(
                DeliveryMode::from_bits((entry >> 8) as u32),
                Some(DeliveryMode::Fixed | DeliveryMode::LowestPriority)
            )
    }

    /// The entry with delivery status derived, as the guest reads it.
    pub fn entry_as_read(&self, pin: u8) -> Option<u64> {
        let e = self.entry(pin)?;
        let pending = Self::is_level(e) && e & RTE_MASKED != 0 && self.asserted(pin);
        Some(if pending { e | RTE_DELIVERY_STATUS } else { e })
    }

    // ----- registers ---------------------------------------------------------

    /// Reads the register IOREGSEL-index `index`. Unimplemented indices read 0.
    pub fn read_register(&self, index: u8) -> u32 {
        match index {
            IOAPICID => u32::from(self.id) << 24,
            IOAPICVER => Self::VERSION | u32::from(self.pins().saturating_sub(1)) << 16,
            // The arbitration ID is loaded from the APIC ID (82093AA §3.2.3).
            IOAPICARB => u32::from(self.id) << 24,
            _ => match self.rte_index(index) {
                Some((pin, high)) => {
                    let e = self.entry_as_read(pin).unwrap_or(0);
                    if high {
                        (e >> 32) as u32
                    } else {
                        e as u32
                    }
                }
                None => 0,
            },
        }
    }

    /// Writes the register IOREGSEL-index `index`. Returns the pin that now needs
    /// service (an asserted level pin unmasked with remote IRR clear).
    pub fn write_register(&mut self, index: u8, value: u32) -> Option<u8> {
        match index {
            IOAPICID => {
                self.id = ((value >> 24) & 0xF) as u8;
                None
            }
            IOAPICVER | IOAPICARB => None,
            _ => {
                let (pin, high) = self.rte_index(index)?;
                let old = self.entry(pin)?;
                let mut new = if high {
                    (old & 0xFFFF_FFFF) | (u64::from(value) << 32)
                } else {
                    (old & 0xFFFF_FFFF_0000_0000) | u64::from(value)
                };
                new = (new & RTE_WRITABLE) | (old & RTE_REMOTE_IRR);
                if !Self::is_level(new) {
                    new &= !RTE_REMOTE_IRR;
                }
                if let Some(e) = self.entries.get_mut(usize::from(pin)) {
                    *e = new;
                }
                self.needs_service(pin).then_some(pin)
            }
        }
    }

    /// `(pin, high half)` for a redirection-table register index.
    fn rte_index(&self, index: u8) -> Option<(u8, bool)> {
        let off = index.checked_sub(IOREDTBL)?;
        let pin = off >> 1;
        (usize::from(pin) < self.entries.len()).then_some((pin, off & 1 != 0))
    }

    /// Whether a level pin should fire now: asserted, unmasked, remote IRR clear.
    fn needs_service(&self, pin: u8) -> bool {
        let Some(e) = self.entry(pin) else {
            return false;
        };
        Self::is_level(e) && e & (RTE_MASKED | RTE_REMOTE_IRR) == 0 && self.asserted(pin)
    }

    /// Level pins that should fire now (after a state import, for example).
    pub fn pending(&self) -> PinSet {
        let mut set = PinSet::EMPTY;
        for pin in 0..self.pins() {
            if self.needs_service(pin) {
                set.insert(pin);
            }
        }
        set
    }

    // ----- MMIO --------------------------------------------------------------

    /// A guest read of `data.len()` bytes at `offset` from the IOAPIC base. Reads of
    /// 1, 2 or 4 bytes within IOREGSEL or IOWIN return those bytes; anything else
    /// (the write-only EOI register included) reads zeros.
    pub fn mmio_read(&self, offset: u64, data: &mut [u8]) {
        data.fill(0);
        let within = (offset & 3) as usize;
        let value = match offset & !3 {
            MMIO_IOREGSEL => u32::from(self.select),
            MMIO_IOWIN => self.read_register(self.select),
            _ => return,
        };
        if !matches!(data.len(), 1 | 2 | 4) {
            return;
        }
        let bytes = value.to_le_bytes();
        if let Some(src) = within
            .checked_add(data.len())
            .and_then(|end| bytes.get(within..end))
        {
            data.copy_from_slice(src);
        }
    }

    /// A guest write of `data` at `offset` from the IOAPIC base. IOREGSEL takes a 1-,
    /// 2- or 4-byte write at offset 0 (low byte); IOWIN and the EOI register take
    /// 4-byte writes at their offsets (the EOI register also a 1-byte write). Other
    /// writes are ignored. Returns the pins that now need service.
    pub fn mmio_write(&mut self, offset: u64, data: &[u8]) -> PinSet {
        let mut set = PinSet::EMPTY;
        match (offset, data.len()) {
            (MMIO_IOREGSEL, 1 | 2 | 4) => {
                if let Some(&b) = data.first() {
                    self.select = b;
                }
            }
            (MMIO_IOWIN, 4) => {
                if let Ok(bytes) = <[u8; 4]>::try_from(data) {
                    if let Some(pin) = self.write_register(self.select, u32::from_le_bytes(bytes)) {
                        set.insert(pin);
                    }
                }
            }
            (MMIO_EOI, 1 | 4) => {
                if let Some(&v) = data.first() {
                    set = self.eoi(v);
                }
            }
            _ => {}
        }
        set
    }

    // ----- lines and EOI -----------------------------------------------------

    /// Drives a pin to an electrical level. Returns the pin if it must fire now:
    /// an edge entry on the inactive→active transition, or a level entry asserted
    /// with remote IRR clear; masked entries never fire (edges are lost).
    /// Pins that do not exist are ignored.
    pub fn set_line(&mut self, pin: u32, level: bool) -> Option<u8> {
        let pin = u8::try_from(pin).ok()?;
        let was = self.asserted(pin);
        let slot = self.levels.get_mut(usize::from(pin))?;
        *slot = level;
        let e = self.entry(pin)?;
        if e & RTE_MASKED != 0 {
            return None;
        }
        if Self::is_level(e) {
            return self.needs_service(pin).then_some(pin);
        }
        (!was && self.asserted(pin)).then_some(pin)
    }

    /// An EOI for `vector`: clears remote IRR on every level entry with that vector.
    /// Returns the pins that must fire again (still asserted and unmasked).
    pub fn eoi(&mut self, vector: u8) -> PinSet {
        let mut set = PinSet::EMPTY;
        for pin in 0..self.pins() {
            let Some(e) = self.entries.get_mut(usize::from(pin)) else {
                break;
            };
            if *e & RTE_REMOTE_IRR != 0 && (*e & RTE_VECTOR) as u8 == vector {
                *e &= !RTE_REMOTE_IRR;
                if self.needs_service(pin) {
                    set.insert(pin);
                }
            }
        }
        set
    }

    /// The message an unmasked entry sends, or `None` when masked or when its
    /// delivery mode is reserved for the IOAPIC (011, 110).
    pub fn message(&self, pin: u8) -> Option<Message> {
        let e = self.entry(pin)?;
        if e & RTE_MASKED != 0 {
            return None;
        }
        let mode = DeliveryMode::from_bits((e >> 8) as u32)?;
        if mode == DeliveryMode::StartUp {
            return None;
        }
        let ext = ((e >> 49) & 0x7F) as u32;
        let dest8 = (e >> 56) as u32;
        Some(Message {
            delivery: Delivery {
                mode,
                vector: (e & RTE_VECTOR) as u8,
                level_triggered: Self::is_level(e),
            },
            dest: Destination {
                shorthand: Shorthand::None,
                mode: if e & RTE_DEST_LOGICAL != 0 {
                    DestMode::Logical
                } else {
                    DestMode::Physical
                },
                id: (ext << 8) | dest8,
                x2apic_format: ext != 0,
            },
        })
    }

    /// The MSI that `pin`'s entry sends, for VMMs that keep only the IOAPIC in
    /// userspace and the local APICs in the hypervisor (KVM's split irqchip, as in
    /// Cloud Hypervisor). `None` for a pin out of range, a masked entry, or a
    /// delivery mode reserved for the IOAPIC (011, 110): whenever
    /// [`IoApic::message`] sends nothing.
    ///
    /// Use: drive the pin with [`IoApic::set_line`] (or feed the pins returned by
    /// [`IoApic::mmio_write`], [`IoApic::eoi`] and [`IoApic::pending`]); for each pin
    /// that fires, send `msi_message(pin)` (KVM_SIGNAL_MSI) and, for a level-triggered
    /// entry, mark it in service with [`IoApic::set_remote_irr`]. When the guest EOIs
    /// a level vector (KVM_EXIT_IOAPIC_EOI), call [`IoApic::eoi`]: it clears remote
    /// IRR and returns the pins still asserted, which fire again.
    ///
    /// ```
    /// use vlapic::ioapic::IoApic;
    /// let mut io = IoApic::default();
    /// io.set_entry(4, 1 << 56 | 1 << 15 | 0x34); // level, vector 0x34 to APIC 1
    /// let pin = io.set_line(4, true).unwrap();
    /// let msi = io.msi_message(pin).unwrap();
    /// assert_eq!((msi.address, msi.data), (0xFEE0_1000, 0xC034));
    /// io.set_remote_irr(pin);
    /// assert_eq!(io.eoi(0x34).iter().collect::<Vec<_>>(), [4]); // still asserted: fires again
    /// ```
    pub fn msi_message(&self, pin: u8) -> Option<MsiMessage> {
        self.message(pin)?;
        Some(MsiMessage::from_redirection_entry(self.entry(pin)?))
    }

    /// Records that a local APIC accepted the level interrupt from `pin`.
    pub fn set_remote_irr(&mut self, pin: u8) {
        if let Some(e) = self.entries.get_mut(usize::from(pin)) {
            if Self::is_level(*e) {
                *e |= RTE_REMOTE_IRR;
            }
        }
    }
}

impl Default for IoApic {
    fn default() -> Self {
        Self::new(Self::DEFAULT_PINS, 0)
    }
}
