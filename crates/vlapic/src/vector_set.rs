//! A set of the 256 interrupt vectors kept as eight 32-bit words, exactly as
//! ISR0–7, TMR0–7 and IRR0–7 appear in the APIC page (SDM Vol. 3A §11.8.4).

use core::fmt;

/// 256 bits, one per interrupt vector; word `i` holds vectors `32*i ..= 32*i+31`.
///
/// ```
/// use vlapic::VectorSet;
/// let mut isr = VectorSet::EMPTY;
/// isr.insert(0x41);
/// isr.insert(0x92);
/// assert_eq!(isr.highest(), Some(0x92));
/// assert_eq!(isr.iter().collect::<Vec<_>>(), vec![0x41, 0x92]);
/// ```
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub struct VectorSet {
    words: [u32; 8],
}

/// Word index and bit mask of a vector. `v >> 5` is at most 7, so the index is
/// always inside the 8-word array.
#[inline(always)]
const fn slot(v: u8) -> (usize, u32) {
    ((v >> 5) as usize, 1u32 << (v & 31))
}

impl VectorSet {
    /// The empty set.
    pub const EMPTY: Self = Self { words: [0; 8] };

    /// Builds a set from the eight register words (word 0 = vectors 0–31).
    pub const fn from_words(words: [u32; 8]) -> Self {
        Self { words }
    }

    /// The eight register words (word 0 = vectors 0–31).
    pub const fn words(&self) -> [u32; 8] {
        self.words
    }

    /// Register word `i` (0–7); any other index reads 0.
    pub fn word(&self, i: usize) -> u32 {
        self.words.get(i).copied().unwrap_or(0)
    }

    /// Whether vector `v` is in the set.
    #[inline]
    pub const fn contains(&self, v: u8) -> bool {
        let (w, m) = slot(v);
        self.words[w] & m != 0
    }

    /// Adds vector `v`.
    #[inline]
    pub fn insert(&mut self, v: u8) {
        let (w, m) = slot(v);
        self.words[w] |= m;
    }

    /// Removes vector `v`.
    #[inline]
    pub fn remove(&mut self, v: u8) {
        let (w, m) = slot(v);
        self.words[w] &= !m;
    }

    /// Adds or removes vector `v`.
    #[inline]
    pub fn assign(&mut self, v: u8, present: bool) {
        let (w, m) = slot(v);
        self.words[w] = (self.words[w] & !m) | (m & 0u32.wrapping_sub(u32::from(present)));
    }

    /// The highest vector in the set, scanning words 7 down to 0.
    #[inline]
    pub fn highest(&self) -> Option<u8> {
        for i in (0..8usize).rev() {
            let w = self.words[i];
            if w != 0 {
                // i < 8 and the bit index (31 - leading zeros, i.e. 31 ^ lz) < 32.
                return Some(((i as u32) << 5 | (31 ^ w.leading_zeros())) as u8);
            }
        }
        None
    }

    /// The lowest vector in the set.
    pub fn lowest(&self) -> Option<u8> {
        self.iter().next()
    }

    /// Whether the set is empty.
    #[inline]
    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|&w| w == 0)
    }

    /// Number of vectors in the set.
    pub fn len(&self) -> u32 {
        self.words.iter().map(|w| w.count_ones()).sum()
    }

    /// Number of vectors of priority class `class` (vectors `16*class ..= 16*class+15`).
    pub fn count_in_class(&self, class: u8) -> u32 {
        let class = class & 0xF;
        let word = self.words[(class >> 1) as usize];
        let half = if class & 1 == 0 {
            word & 0xFFFF
        } else {
            word >> 16
        };
        half.count_ones()
    }

    /// Whether any of vectors 0–15 (the architecturally illegal ones) is present.
    pub fn has_illegal_vectors(&self) -> bool {
        self.words[0] & 0xFFFF != 0
    }

    /// The vectors in ascending order.
    pub fn iter(&self) -> VectorIter {
        VectorIter {
            words: self.words,
            word: 0,
        }
    }
}

/// A [`VectorSet`] with a derived summary: bit `g` of the summary is set exactly
/// when group `g` of the set — vectors `g << G ..` up to the next group — has a vector
/// in it. `G = 4` groups by priority class (vectors `16c ..= 16c+15`: the highest class
/// is one bit scan, as PPR needs); `G = 5` by register word. Either way the highest
/// vector is two bit scans instead of a walk over the eight words. The summary is a
/// cache in the sense of issue 14: only this type's methods change the set and each
/// keeps the summary in step, every construction derives it afresh
/// ([`SummarySet::from_set`]), and [`SummarySet::is_consistent`] compares it with a
/// fresh derivation (the property tests call it after every operation). Reads go to
/// the plain set through `Deref`.
#[derive(Clone, Copy, Default, PartialEq, Eq, Hash)]
pub(crate) struct SummarySet<const G: u32> {
    set: VectorSet,
    summary: u16,
}

/// ISR's kind: one summary bit per priority class.
pub(crate) type ClassSummarySet = SummarySet<4>;
/// IRR's kind: one summary bit per register word.
pub(crate) type WordSummarySet = SummarySet<5>;

impl<const G: u32> SummarySet<G> {
    const CHECK: () = assert!(G == 4 || G == 5);

    /// The empty set.
    pub(crate) const EMPTY: Self = Self {
        set: VectorSet::EMPTY,
        summary: 0,
    };

    /// The bits of group `g` (of vector `v`'s group when `g = v >> G`) within `word`.
    #[inline(always)]
    const fn group_bits(word: u32, v: u32) -> u32 {
        if G == 4 {
            word >> (v & 16) & 0xFFFF
        } else {
            word
        }
    }

    /// The summary of a set, derived from its words.
    const fn summary_of(set: &VectorSet) -> u16 {
        let () = Self::CHECK;
        let mut s = 0u16;
        let mut g = 0u32;
        while g < (256 >> G) {
            let first = g << G;
            if Self::group_bits(set.words[(first >> 5) as usize], first) != 0 {
                s |= 1 << g;
            }
            g = g.wrapping_add(1);
        }
        s
    }

    /// A set with its summary derived from the words.
    pub(crate) const fn from_set(set: VectorSet) -> Self {
        Self {
            summary: Self::summary_of(&set),
            set,
        }
    }

    /// Whether the summary equals a fresh derivation from the words.
    pub(crate) fn is_consistent(&self) -> bool {
        self.summary == Self::summary_of(&self.set)
    }

    /// Adds vector `v`.
    #[inline(always)]
    pub(crate) fn insert(&mut self, v: u8) {
        let (w, m) = slot(v);
        self.set.words[w] |= m;
        self.summary |= 1 << (v >> G);
    }

    /// Removes vector `v`.
    #[cfg(test)]
    pub(crate) fn remove(&mut self, v: u8) {
        let (w, m) = slot(v);
        let word = self.set.words[w] & !m;
        self.set.words[w] = word;
        let empty = Self::group_bits(word, u32::from(v)) == 0;
        self.summary &= !(u16::from(empty) << (v >> G));
    }

    /// The summary bits: bit `g` set exactly when group `g` has a vector (for the
    /// class summary, `G = 4`, bit `c` is priority class `c`).
    #[inline(always)]
    pub(crate) fn summary(&self) -> u16 {
        self.summary
    }

    /// The summary group of the vector at a slot: its class (`G = 4`) or its word.
    #[inline(always)]
    const fn slot_group((i, bit): Slot) -> u32 {
        if G == 4 {
            (i as u32) << 1 | bit >> 4
        } else {
            i as u32
        }
    }

    /// Adds the vector at a slot (word masked to 0–7, bit to 0–31) whose summary group
    /// `g` (masked to 0–15) the caller has already computed: [`SummarySet::insert`]
    /// for a vector just found by a lookup.
    #[inline(always)]
    pub(crate) fn insert_at(&mut self, (i, bit): Slot, g: u32) {
        self.set.words[i & 7] |= 1 << (bit & 31);
        self.summary |= 1 << (g & 15);
    }

    /// The top summary group (0–15), the word it lies in (0–7) and that word's
    /// highest bit; `None` for the empty set.
    #[inline(always)]
    fn top(&self) -> Option<(u32, Slot)> {
        if self.summary == 0 {
            return None;
        }
        // summary != 0: its top bit names an occupied group, in a word that is not
        // empty.
        let g = 15 ^ (self.summary.leading_zeros() & 15);
        let i = if G == 4 { g >> 1 } else { g & 7 } as usize;
        let w = self.set.words[i];
        // `| 1` changes nothing for a non-empty word and lets this be one bit scan.
        Some((g, (i, 31 ^ (w | 1).leading_zeros())))
    }

    /// Removes the highest vector, at `(i, bit)` in group `g`, as found by
    /// [`SummarySet::top`]. Nothing above it is set in its word, so its group is left
    /// empty exactly when no bit remains from the group's first one up; then the
    /// group's summary bit, set until now, is flipped off.
    #[inline(always)]
    fn remove_top(&mut self, g: u32, (i, bit): Slot) {
        let Some(word) = self.set.words.get_mut(i) else {
            return;
        };
        // The bit is set: the exclusive or clears it.
        let rest = *word ^ 1u32.wrapping_shl(bit);
        *word = rest;
        let first = if G == 4 { bit & 16 } else { 0 };
        if rest >> first == 0 {
            self.summary ^= 1 << (g & 15);
        }
    }

    /// Removes the highest vector, at the slot [`SummarySet::highest_slot`] returned
    /// (nothing changed in between).
    #[inline(always)]
    pub(crate) fn remove_highest_at(&mut self, at: Slot) {
        self.remove_top(Self::slot_group(at), at);
    }

    /// Removes and returns the highest vector's slot (one lookup for both).
    #[inline(always)]
    pub(crate) fn pop_highest_slot(&mut self) -> Option<Slot> {
        let (g, at) = self.top()?;
        self.remove_top(g, at);
        Some(at)
    }

    /// Removes and returns the highest vector (one lookup for both).
    #[cfg(test)]
    pub(crate) fn pop_highest(&mut self) -> Option<u8> {
        self.pop_highest_slot().map(slot_vector)
    }

    /// The highest class present, 0 for the empty set (as ISRV = 0 has class 0).
    /// Meaningful for the class summary (`G = 4`).
    #[cfg(test)]
    pub(crate) fn top_class(&self) -> u8 {
        // Setting bit 0 changes nothing but the empty case, which becomes class 0.
        ((31 ^ u32::from(self.summary | 1).leading_zeros()) & 15) as u8
    }

    /// The slot of the highest vector, from the summary: no word walk.
    #[inline(always)]
    pub(crate) fn highest_slot(&self) -> Option<Slot> {
        self.top().map(|(_, at)| at)
    }

    /// The highest vector in the set, from the summary: no word walk.
    #[inline(always)]
    pub(crate) fn highest(&self) -> Option<u8> {
        self.highest_slot().map(slot_vector)
    }
}

/// Where a vector lives in a [`VectorSet`]: register word (0–7) and bit (0–31).
/// Lookups return it so that the next step need not split the vector again.
pub(crate) type Slot = (usize, u32);

/// The vector at a slot (word and bit masked to their ranges).
#[inline(always)]
pub(crate) const fn slot_vector((i, bit): Slot) -> u8 {
    ((i as u32 & 7) << 5 | (bit & 31)) as u8
}

impl VectorSet {
    /// Whether the vector at a slot is in the set (slot masked to its ranges).
    #[inline(always)]
    pub(crate) const fn contains_slot(&self, (i, bit): Slot) -> bool {
        self.words[i & 7] >> (bit & 31) & 1 != 0
    }
}

impl<const G: u32> core::ops::Deref for SummarySet<G> {
    type Target = VectorSet;
    #[inline(always)]
    fn deref(&self) -> &VectorSet {
        &self.set
    }
}

impl<const G: u32> fmt::Debug for SummarySet<G> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.set.fmt(f)
    }
}

impl fmt::Debug for VectorSet {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter().map(VectorHex)).finish()
    }
}

struct VectorHex(u8);
impl fmt::Debug for VectorHex {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:#04x}", self.0)
    }
}

impl FromIterator<u8> for VectorSet {
    fn from_iter<T: IntoIterator<Item = u8>>(iter: T) -> Self {
        let mut s = Self::EMPTY;
        for v in iter {
            s.insert(v);
        }
        s
    }
}

/// Ascending iterator over a [`VectorSet`].
#[derive(Clone, Debug)]
pub struct VectorIter {
    words: [u32; 8],
    word: usize,
}

impl Iterator for VectorIter {
    type Item = u8;
    fn next(&mut self) -> Option<u8> {
        while let Some(w) = self.words.get_mut(self.word) {
            if *w != 0 {
                let bit = w.trailing_zeros();
                *w &= w.wrapping_sub(1);
                return Some(((self.word as u32) << 5 | bit) as u8);
            }
            self.word = self.word.saturating_add(1);
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn highest_scans_from_the_top_word() {
        let mut s = VectorSet::EMPTY;
        assert_eq!(s.highest(), None);
        for v in [16u8, 31, 32, 200, 255] {
            s.insert(v);
            assert_eq!(s.highest(), Some(v));
        }
        s.remove(255);
        assert_eq!(s.highest(), Some(200));
    }

    // ACRN observed bug: scans skipped word 0, so vectors 16–31 were never seen.
    #[test]
    fn vectors_16_to_31_in_word_0_are_found() {
        let s: VectorSet = [16u8, 17].into_iter().collect();
        assert_eq!(s.highest(), Some(17));
        assert_eq!(s.lowest(), Some(16));
    }

    #[test]
    fn iter_is_ascending_and_complete() {
        let all: VectorSet = (0..=255u8).collect();
        assert_eq!(all.len(), 256);
        let v: Vec<u8> = all.iter().collect();
        assert_eq!(v, (0..=255u8).collect::<Vec<_>>());
    }

    // Issue 14: the summary-indexed highest() equals the word scan after any
    // insert/remove sequence, and the summary stays a fresh derivation.
    #[test]
    fn summary_set_tracks_the_words() {
        tracks::<4>();
        tracks::<5>();
    }

    fn tracks<const G: u32>() {
        let mut s = SummarySet::<G>::EMPTY;
        let mut plain = VectorSet::EMPTY;
        let mut x = 0x9E37_79B9u32;
        for _ in 0..10_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let v = (x >> 8) as u8;
            if x & 6 == 0 {
                let top = plain.highest();
                if let Some(t) = top {
                    plain.remove(t);
                }
                assert_eq!(s.pop_highest(), top);
            } else if x & 6 == 2 && x & 0x100_0000 != 0 {
                // The slot forms acknowledge uses: the highest vector's slot, its
                // removal there, and insertion at a slot with its group given.
                let top = plain.highest();
                assert_eq!(s.highest_slot().map(slot_vector), top);
                if let Some(at) = s.highest_slot() {
                    s.remove_highest_at(at);
                    plain.remove(slot_vector(at));
                }
                let at = (usize::from(v >> 5), u32::from(v & 31));
                s.insert_at(at, u32::from(v) >> G);
                plain.insert(v);
            } else if x & 1 == 0 {
                s.insert(v);
                plain.insert(v);
            } else {
                s.remove(v);
                plain.remove(v);
            }
            assert!(s.is_consistent());
            assert_eq!(*s, plain);
            assert_eq!(s.highest(), plain.highest());
            if G == 4 {
                assert_eq!(s.top_class(), plain.highest().unwrap_or(0) >> 4);
            }
        }
        assert_eq!(SummarySet::from_set(plain), s);
    }

    #[test]
    fn assign_sets_and_clears() {
        let mut s = VectorSet::EMPTY;
        s.assign(0x40, true);
        s.assign(0x41, true);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0x40, 0x41]);
        s.assign(0x40, false);
        assert_eq!(s.iter().collect::<Vec<_>>(), vec![0x41]);
    }

    #[test]
    fn count_in_class_uses_16_vector_groups() {
        // 0x41 and 0x49 share a class though they live in different bytes (O4).
        let s: VectorSet = [0x41u8, 0x49, 0x50].into_iter().collect();
        assert_eq!(s.count_in_class(4), 2);
        assert_eq!(s.count_in_class(5), 1);
        assert_eq!(s.count_in_class(0xF), 0);
    }
}
