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
        if present {
            self.insert(v)
        } else {
            self.remove(v)
        }
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

    #[test]
    fn count_in_class_uses_16_vector_groups() {
        // 0x41 and 0x49 share a class though they live in different bytes (O4).
        let s: VectorSet = [0x41u8, 0x49, 0x50].into_iter().collect();
        assert_eq!(s.count_in_class(4), 2);
        assert_eq!(s.count_in_class(5), 1);
        assert_eq!(s.count_in_class(0xF), 0);
    }
}
