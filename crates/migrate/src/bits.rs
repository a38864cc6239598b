//! Page bitmaps: one bit per 4 KiB page, bit `p % 64` of word `p / 64`
//! (KVM's dirty-log layout).

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

/// A plain page bitmap.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    pub words: Vec<u64>,
    pub pages: u64,
}

impl Bitmap {
    pub fn new(pages: u64) -> Bitmap {
        Bitmap {
            words: vec![0; pages.div_ceil(64) as usize],
            pages,
        }
    }

    pub fn full(pages: u64) -> Bitmap {
        let mut b = Bitmap::new(pages);
        b.set_range(0..pages);
        b
    }

    pub fn from_words(words: Vec<u64>, pages: u64) -> Bitmap {
        let mut b = Bitmap { words, pages };
        b.words.resize(pages.div_ceil(64) as usize, 0);
        if !pages.is_multiple_of(64) {
            if let Some(w) = b.words.last_mut() {
                *w &= (1u64 << (pages % 64)) - 1;
            }
        }
        b
    }

    pub fn get(&self, p: u64) -> bool {
        p < self.pages && self.words[(p / 64) as usize] & (1 << (p % 64)) != 0
    }

    pub fn set(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] |= 1 << (p % 64);
        }
    }

    pub fn clear(&mut self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize] &= !(1 << (p % 64));
        }
    }

    pub fn set_range(&mut self, r: Range<u64>) {
        for p in r.start..r.end.min(self.pages) {
            self.set(p);
        }
    }

    pub fn clear_range(&mut self, r: Range<u64>) {
        for p in r.start..r.end.min(self.pages) {
            self.clear(p);
        }
    }

    pub fn or(&mut self, other: &Bitmap) {
        for (a, b) in self.words.iter_mut().zip(&other.words) {
            *a |= *b;
        }
    }

    pub fn count(&self) -> u64 {
        self.words.iter().map(|w| u64::from(w.count_ones())).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.words.iter().all(|w| *w == 0)
    }

    /// The first set page at or after `from`.
    pub fn next_set(&self, from: u64) -> Option<u64> {
        if from >= self.pages {
            return None;
        }
        let mut i = (from / 64) as usize;
        let mut w = self.words[i] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let p = i as u64 * 64 + u64::from(w.trailing_zeros());
                return (p < self.pages).then_some(p);
            }
            i += 1;
            if i >= self.words.len() {
                return None;
            }
            w = self.words[i];
        }
    }

    /// The first set page in `[from, end)`: scans only that far.
    pub fn next_set_below(&self, from: u64, end: u64) -> Option<u64> {
        let end = end.min(self.pages);
        if from >= end {
            return None;
        }
        let mut i = (from / 64) as usize;
        let last = ((end - 1) / 64) as usize;
        let mut w = self.words[i] & (!0u64 << (from % 64));
        loop {
            if w != 0 {
                let p = i as u64 * 64 + u64::from(w.trailing_zeros());
                return (p < end).then_some(p);
            }
            i += 1;
            if i > last {
                return None;
            }
            w = self.words[i];
        }
    }

    /// The end of the run of set pages starting at `p` (at most `max` long).
    pub fn run_end(&self, p: u64, max: u64) -> u64 {
        let mut e = p;
        while e < self.pages && e - p < max && self.get(e) {
            e += 1;
        }
        e
    }

    /// The set pages as maximal runs.
    pub fn runs(&self) -> Vec<Range<u64>> {
        let mut out = Vec::new();
        let mut p = 0;
        while let Some(s) = self.next_set(p) {
            let e = self.run_end(s, u64::MAX);
            out.push(s..e);
            p = e;
        }
        out
    }
}

/// A page bitmap shared between threads.
#[derive(Debug)]
pub struct AtomicBitmap {
    words: Box<[AtomicU64]>,
    pages: u64,
}

impl AtomicBitmap {
    pub fn new(pages: u64) -> AtomicBitmap {
        AtomicBitmap {
            words: (0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            pages,
        }
    }

    pub fn pages(&self) -> u64 {
        self.pages
    }

    pub fn get(&self, p: u64) -> bool {
        p < self.pages
            && self.words[(p / 64) as usize].load(Ordering::Acquire) & (1 << (p % 64)) != 0
    }

    /// Sets the bit; returns whether it was clear.
    pub fn set(&self, p: u64) -> bool {
        if p >= self.pages {
            return false;
        }
        let bit = 1 << (p % 64);
        self.words[(p / 64) as usize].fetch_or(bit, Ordering::AcqRel) & bit == 0
    }

    pub fn clear(&self, p: u64) {
        if p < self.pages {
            self.words[(p / 64) as usize].fetch_and(!(1 << (p % 64)), Ordering::AcqRel);
        }
    }

    pub fn all(&self, r: Range<u64>) -> bool {
        (r.start..r.end.min(self.pages)).all(|p| self.get(p))
    }

    pub fn count(&self) -> u64 {
        self.words
            .iter()
            .map(|w| u64::from(w.load(Ordering::Acquire).count_ones()))
            .sum()
    }

    pub fn snapshot(&self) -> Bitmap {
        Bitmap {
            words: self
                .words
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect(),
            pages: self.pages,
        }
    }
}

/// Whether a page is all zero bytes.
pub fn is_zero(page: &[u8]) -> bool {
    let mut words = page.chunks_exact(8);
    words
        .by_ref()
        .all(|c| u64::from_le_bytes(c.try_into().unwrap_or([1; 8])) == 0)
        && words.remainder().iter().all(|b| *b == 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_and_next_set() {
        let mut b = Bitmap::new(200);
        b.set_range(3..7);
        b.set(64);
        b.set_range(130..200);
        assert_eq!(b.runs(), vec![3..7, 64..65, 130..200]);
        assert_eq!(b.next_set(7), Some(64));
        assert_eq!(b.next_set_below(7, 64), None);
        assert_eq!(b.next_set_below(7, 65), Some(64));
        assert_eq!(b.next_set_below(65, 131), Some(130));
        assert_eq!(b.count(), 4 + 1 + 70);
        assert_eq!(b.run_end(130, 10), 140);
        let w = Bitmap::from_words(vec![!0; 4], 200);
        assert_eq!(w.count(), 200);
    }

    #[test]
    fn zero_pages() {
        let mut p = vec![0u8; 4096];
        assert!(is_zero(&p));
        p[4095] = 1;
        assert!(!is_zero(&p));
    }
}
