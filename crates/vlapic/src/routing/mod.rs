//! Destination resolution: which local APICs an interrupt message targets (SDM Vol. 3A
//! §11.6.2), through a lookup map rebuilt on ID/LDR/DFR/enable/mode changes, plus a naive scan.
//!
//! # Matching rules
//!
//! An APIC is visible to routing only while hardware-enabled (IA32_APIC_BASE.EN);
//! software-disabled APICs still match (they take NMI, SMI, INIT and SIPI; their
//! [`LocalApic::deliver`](crate::LocalApic::deliver) refuses fixed vectors).
//!
//! * Destination formats: an 8-bit (xAPIC) destination, broadcast `0xFF`, or a 32-bit
//!   (x2APIC) destination, broadcast `0xFFFF_FFFF`. Broadcast reaches every visible
//!   APIC in both destination modes (SDM §11.6.2.1, §11.12.9).
//! * Physical: the destination equals the APIC's ID as routing sees it (8 bits in
//!   xAPIC mode, 32 in x2APIC mode). Aliased IDs all receive the message.
//! * Logical, x2APIC-mode target (§11.12.10.2): destination bits 31:16 equal the
//!   LDR's cluster and bits 15:0 intersect its member bit. An 8-bit destination is
//!   cluster 0.
//! * Logical, xAPIC-mode target (§11.6.2.2): only destinations ≤ 0xFF match. Flat
//!   model (DFR 1111b): `LDR[31:24] & dest != 0`. Cluster model (DFR 0000b): equal
//!   high nibbles and intersecting low nibbles. Any other DFR model matches nothing.
//! * Shorthands: self is the sender object (never looked up by its guest-writable
//!   ID), all-including-self every visible APIC, all-excluding-self every visible
//!   APIC but the sender.
//!
//! # The map
//!
//! [`RouteMap`] holds multi-valued hash tables (physical ID, x2APIC LDR, xAPIC flat
//! and cluster LDRs), so aliased IDs and mixed logical models are resolved exactly
//! by the map itself: there is no case where it must give up. A physical unicast is
//! one hash probe, an x2APIC logical message at most 16, an xAPIC cluster message at
//! most 15, an xAPIC flat message one probe per distinct flat LDR value (at most 256);
//! broadcasts walk the list of visible APICs. A naive scan over every APIC (test
//! only) is the reference the map is tested against.

use crate::delivery::{Delivery, DestMode};
use crate::icr::{IpiMessage, Shorthand};
use crate::lapic::{ApicMode, LocalApic};
use alloc::vec::Vec;

/// Where an interrupt message goes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Destination {
    /// Shorthand; `Shorthand::None` means "use `id`".
    pub shorthand: Shorthand,
    /// Physical or logical destination mode.
    pub mode: DestMode,
    /// Destination field: 8 bits when `x2apic_format` is false, else 32 bits.
    pub id: u32,
    /// 32-bit (x2APIC) destination format: broadcast is `0xFFFF_FFFF` instead of `0xFF`.
    pub x2apic_format: bool,
}

impl Destination {
    /// A physical destination in the given format.
    pub const fn physical(id: u32, x2apic_format: bool) -> Self {
        Self {
            shorthand: Shorthand::None,
            mode: DestMode::Physical,
            id,
            x2apic_format,
        }
    }

    /// A logical destination in the given format.
    pub const fn logical(id: u32, x2apic_format: bool) -> Self {
        Self {
            shorthand: Shorthand::None,
            mode: DestMode::Logical,
            id,
            x2apic_format,
        }
    }

    /// A shorthand destination (the destination field is ignored).
    pub const fn shorthand(shorthand: Shorthand) -> Self {
        Self {
            shorthand,
            mode: DestMode::Physical,
            id: 0,
            x2apic_format: false,
        }
    }

    /// Whether the destination field is the broadcast value of its format.
    pub const fn is_broadcast(&self) -> bool {
        if self.x2apic_format {
            self.id == u32::MAX
        } else {
            self.id == 0xFF
        }
    }
}

/// An interrupt message on its way to local APICs: what to deliver and where.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Message {
    /// What each target (or the lowest-priority winner) receives.
    pub delivery: Delivery,
    /// Which APICs are targeted.
    pub dest: Destination,
}

impl From<IpiMessage> for Message {
    /// An ICR message; IPIs are edge-triggered (SDM §11.6.1: the trigger mode of a
    /// level-assert IPI other than INIT is ignored).
    fn from(m: IpiMessage) -> Self {
        Message {
            delivery: Delivery {
                mode: m.mode,
                vector: m.vector,
                level_triggered: false,
            },
            dest: Destination {
                shorthand: m.shorthand,
                mode: m.dest_mode,
                id: m.dest,
                x2apic_format: m.x2apic,
            },
        }
    }
}

/// The routing-relevant architectural state of one APIC.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct ApicView {
    /// Mode; a `Disabled` APIC is invisible to routing.
    pub mode: ApicMode,
    /// The ID as routing sees it (8 bits in xAPIC mode, 32 in x2APIC mode).
    pub id: u32,
    /// LDR (derived from the ID in x2APIC mode).
    pub ldr: u32,
    /// DFR (meaningful in xAPIC mode only).
    pub dfr: u32,
    /// Software-enabled (SVR bit 8). Not used for matching; part of the view so that
    /// a change rebuilds the map, as the SDM's enable rules may matter to policies.
    pub sw_enabled: bool,
}

impl ApicView {
    /// The view of an APIC's current registers.
    pub fn of(apic: &LocalApic) -> Self {
        Self {
            mode: apic.mode(),
            id: apic.id(),
            ldr: apic.ldr(),
            dfr: apic.dfr(),
            sw_enabled: apic.is_enabled(),
        }
    }

    /// Whether routing can reach this APIC at all (hardware-enabled).
    pub const fn visible(&self) -> bool {
        !matches!(self.mode, ApicMode::Disabled)
    }

    /// Whether the APIC at index `me` matches `dest` sent by `sender` (the rules of
    /// the module documentation). This is the reference predicate.
    #[cfg(test)]
    pub fn matches(&self, me: usize, dest: &Destination, sender: Option<usize>) -> bool {
        if !self.visible() {
            return false;
        }
        match dest.shorthand {
            Shorthand::SelfOnly => return sender == Some(me),
            Shorthand::AllIncludingSelf => return true,
            Shorthand::AllExcludingSelf => return sender != Some(me),
            Shorthand::None => {}
        }
        if dest.is_broadcast() {
            return true;
        }
        match dest.mode {
            DestMode::Physical => self.id == dest.id,
            DestMode::Logical => match self.mode {
                ApicMode::X2Apic => {
                    self.ldr >> 16 == dest.id >> 16 && self.ldr & dest.id & 0xFFFF != 0
                }
                _ => {
                    let Ok(d) = u8::try_from(dest.id) else {
                        return false;
                    };
                    let l = (self.ldr >> 24) as u8;
                    match xapic_model(self.dfr) {
                        Some(XapicModel::Flat) => l & d != 0,
                        Some(XapicModel::Cluster) => l >> 4 == d >> 4 && l & d & 0xF != 0,
                        None => false,
                    }
                }
            },
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum XapicModel {
    Flat,
    Cluster,
}

/// DFR model bits 31:28: 1111b flat, 0000b cluster, anything else undefined.
fn xapic_model(dfr: u32) -> Option<XapicModel> {
    match dfr >> 28 {
        0xF => Some(XapicModel::Flat),
        0x0 => Some(XapicModel::Cluster),
        _ => None,
    }
}

/// The reference resolver (a test oracle): a scan over every APIC, in index order.
#[cfg(test)]
pub(crate) fn resolve_naive(
    views: &[ApicView],
    dest: &Destination,
    sender: Option<usize>,
) -> Vec<usize> {
    views
        .iter()
        .enumerate()
        .filter(|(i, v)| v.matches(*i, dest, sender))
        .map(|(i, _)| i)
        .collect()
}

/// One occupied slot of an [`IdTable`]: a key and its run in `members`.
#[derive(Clone, Copy, Debug, Default)]
struct Slot {
    key: u32,
    start: u32,
    /// 0 marks an empty slot.
    len: u32,
}

/// An open-addressing hash table from a 32-bit key to the APIC indices holding it.
#[derive(Clone, Debug, Default)]
struct IdTable {
    slots: Vec<Slot>,
    bits: u32,
    members: Vec<u32>,
    keys: Vec<u32>,
}

impl IdTable {
    /// Builds from `(key, apic index)` pairs.
    fn build(mut pairs: Vec<(u32, u32)>) -> Self {
        pairs.sort_unstable();
        let members: Vec<u32> = pairs.iter().map(|p| p.1).collect();
        let mut keys = Vec::new();
        let mut runs: Vec<Slot> = Vec::new();
        let mut start = 0u32;
        for chunk in pairs.chunk_by(|a, b| a.0 == b.0) {
            let len = u32::try_from(chunk.len()).unwrap_or(u32::MAX);
            let key = chunk.first().map(|p| p.0).unwrap_or(0);
            keys.push(key);
            runs.push(Slot { key, start, len });
            start = start.saturating_add(len);
        }
        // Load factor at most 1/2: probing always finds an empty slot.
        let cap = runs.len().saturating_mul(2).max(2).next_power_of_two();
        let bits = cap.trailing_zeros();
        let mut slots = alloc::vec![Slot::default(); cap];
        let mask = cap.wrapping_sub(1);
        for run in runs {
            let mut i = hash(run.key, bits);
            for _ in 0..cap {
                match slots.get_mut(i) {
                    Some(s) if s.len == 0 => {
                        *s = run;
                        break;
                    }
                    _ => i = i.wrapping_add(1) & mask,
                }
            }
        }
        Self {
            slots,
            bits,
            members,
            keys,
        }
    }

    /// The APIC indices holding `key` (empty if none).
    #[inline]
    fn get(&self, key: u32) -> &[u32] {
        let mask = self.slots.len().wrapping_sub(1);
        let mut i = hash(key, self.bits);
        for _ in 0..self.slots.len() {
            let Some(s) = self.slots.get(i) else {
                return &[];
            };
            if s.len == 0 {
                return &[];
            }
            if s.key == key {
                let start = s.start as usize;
                let end = start.saturating_add(s.len as usize);
                return self.members.get(start..end).unwrap_or(&[]);
            }
            i = i.wrapping_add(1) & mask;
        }
        &[]
    }
}

/// Fibonacci hashing into `bits` bits (1 ≤ bits ≤ 63).
#[inline(always)]
fn hash(key: u32, bits: u32) -> usize {
    let h = u64::from(key).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    (h >> (64u32.saturating_sub(bits).min(63))) as usize
}

/// The lookup map of one VM's APICs: built from the routing views of its APICs, immutable afterwards.
#[derive(Clone, Debug, Default)]
pub struct RouteMap {
    len: usize,
    /// Visible APICs, in index order (broadcast and shorthands).
    all: Vec<u32>,
    /// Physical ID → APICs (any mode).
    phys: IdTable,
    /// x2APIC LDR → x2APIC-mode APICs.
    x2_logical: IdTable,
    /// `LDR[31:24]` → xAPIC-mode APICs in the flat model.
    flat: IdTable,
    /// `LDR[31:24]` → xAPIC-mode APICs in the cluster model.
    cluster: IdTable,
}

impl RouteMap {
    /// Builds the map; `views[i]` is APIC `i`.
    pub(crate) fn build(views: &[ApicView]) -> Self {
        let mut all = Vec::new();
        let mut phys = Vec::new();
        let mut x2 = Vec::new();
        let mut flat = Vec::new();
        let mut cluster = Vec::new();
        for (i, v) in views.iter().enumerate() {
            let Ok(idx) = u32::try_from(i) else { break };
            if !v.visible() {
                continue;
            }
            all.push(idx);
            phys.push((v.id, idx));
            match v.mode {
                ApicMode::X2Apic => x2.push((v.ldr, idx)),
                _ => match xapic_model(v.dfr) {
                    Some(XapicModel::Flat) => flat.push((v.ldr >> 24, idx)),
                    Some(XapicModel::Cluster) => cluster.push((v.ldr >> 24, idx)),
                    None => {}
                },
            }
        }
        Self {
            len: views.len(),
            all,
            phys: IdTable::build(phys),
            x2_logical: IdTable::build(x2),
            flat: IdTable::build(flat),
            cluster: IdTable::build(cluster),
        }
    }

    /// Number of APICs the map was built for (visible or not).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the map covers no APIC.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Calls `f` once for every APIC index `dest` targets, as the matching rules of the module documentation
    /// decides; `sender` is the sending APIC's index for shorthands.
    #[inline]
    pub fn resolve(&self, dest: &Destination, sender: Option<usize>, mut f: impl FnMut(usize)) {
        match dest.shorthand {
            Shorthand::SelfOnly => {
                if let Some(s) = sender {
                    if self.is_visible(s) {
                        f(s);
                    }
                }
                return;
            }
            Shorthand::AllIncludingSelf => {
                self.all.iter().for_each(|&i| f(i as usize));
                return;
            }
            Shorthand::AllExcludingSelf => {
                self.all
                    .iter()
                    .map(|&i| i as usize)
                    .filter(|&i| Some(i) != sender)
                    .for_each(f);
                return;
            }
            Shorthand::None => {}
        }
        if dest.is_broadcast() {
            self.all.iter().for_each(|&i| f(i as usize));
            return;
        }
        match dest.mode {
            DestMode::Physical => self.phys.get(dest.id).iter().for_each(|&i| f(i as usize)),
            DestMode::Logical => {
                // x2APIC-mode targets: one probe per member bit.
                let cluster = dest.id >> 16;
                let mut members = dest.id & 0xFFFF;
                while members != 0 {
                    let bit = members.trailing_zeros();
                    members &= members.wrapping_sub(1);
                    let key = (cluster << 16) | (1u32 << (bit & 15));
                    self.x2_logical.get(key).iter().for_each(|&i| f(i as usize));
                }
                // xAPIC-mode targets.
                let Ok(d) = u8::try_from(dest.id) else {
                    return;
                };
                for &key in &self.flat.keys {
                    if key & u32::from(d) != 0 {
                        self.flat.get(key).iter().for_each(|&i| f(i as usize));
                    }
                }
                let high = u32::from(d >> 4) << 4;
                let low = u32::from(d & 0xF);
                if low != 0 && !self.cluster.keys.is_empty() {
                    for m in 1u32..16 {
                        if m & low != 0 {
                            self.cluster
                                .get(high | m)
                                .iter()
                                .for_each(|&i| f(i as usize));
                        }
                    }
                }
            }
        }
    }

    /// The targets of `dest`, in resolution order.
    pub fn targets(&self, dest: &Destination, sender: Option<usize>) -> Vec<usize> {
        let mut v = Vec::new();
        self.resolve(dest, sender, |i| v.push(i));
        v
    }

    fn is_visible(&self, idx: usize) -> bool {
        u32::try_from(idx).is_ok_and(|i| self.all.binary_search(&i).is_ok())
    }
}

#[cfg(test)]
mod prop;

#[cfg(test)]
mod tests {
    use super::*;

    fn xapic(id: u32, ldr: u32, dfr: u32) -> ApicView {
        ApicView {
            mode: ApicMode::XApic,
            id,
            ldr,
            dfr,
            sw_enabled: true,
        }
    }

    fn x2(id: u32) -> ApicView {
        ApicView {
            mode: ApicMode::X2Apic,
            id,
            ldr: crate::regs::x2apic_ldr(id),
            dfr: u32::MAX,
            sw_enabled: true,
        }
    }

    fn both(views: &[ApicView], dest: Destination, sender: Option<usize>) -> Vec<usize> {
        let map = RouteMap::build(views);
        let mut fast = map.targets(&dest, sender);
        fast.sort_unstable();
        let naive = resolve_naive(views, &dest, sender);
        assert_eq!(fast, naive, "{dest:?}");
        naive
    }

    // SDM §11.6.2.2: flat model, LDR[31:24] is a bit mask matched against the destination.
    #[test]
    fn xapic_flat_multiple_bits() {
        let v = [
            xapic(0, 0x0100_0000, u32::MAX),
            xapic(1, 0x0200_0000, u32::MAX),
            xapic(2, 0x0600_0000, u32::MAX),
        ];
        assert_eq!(both(&v, Destination::logical(0x02, false), None), [1, 2]);
        assert_eq!(both(&v, Destination::logical(0x05, false), None), [0, 2]);
        assert_eq!(
            both(&v, Destination::logical(0x100, true), None),
            Vec::<usize>::new()
        );
    }

    // SDM §11.6.2.2: cluster model, high nibble is the cluster, low nibble the members.
    #[test]
    fn xapic_cluster_and_bad_model() {
        let v = [
            xapic(0, 0x1100_0000, 0x0FFF_FFFF),
            xapic(1, 0x1200_0000, 0x0FFF_FFFF),
            xapic(2, 0x2100_0000, 0x0FFF_FFFF),
            xapic(3, 0x1100_0000, 0x5FFF_FFFF),
        ];
        assert_eq!(both(&v, Destination::logical(0x13, false), None), [0, 1]);
        assert_eq!(both(&v, Destination::logical(0x21, false), None), [2]);
        assert_eq!(
            both(&v, Destination::logical(0x10, false), None),
            Vec::<usize>::new()
        );
    }

    // SDM §11.12.10.2: x2APIC cluster = ID[19:4], member = 1 << ID[3:0].
    #[test]
    fn x2apic_cluster_and_aliases() {
        let v = [x2(0x10), x2(0x11), x2(0x21), x2(0x10_0010)];
        // 0x10_0010 aliases 0x10's LDR (cluster bits above 19 are lost).
        assert_eq!(
            both(&v, Destination::logical(0x0001_0003, true), None),
            [0, 1, 3]
        );
        assert_eq!(both(&v, Destination::physical(0x10_0010, true), None), [3]);
        assert_eq!(
            both(&v, Destination::physical(0x12345, true), None),
            Vec::<usize>::new()
        );
    }
}
