//! The regions of one session and the state of each of their pages.
//!
//! Serving threads read the layout under the session's read lock and move
//! pages between states with compare-and-swap; the thread that reads the
//! userfaultfd takes the write lock around the read and applies REMOVE,
//! UNMAP and REMAP before anyone can issue another resolving ioctl (see
//! `session.rs` for why that ordering is what keeps stale pages out).

use std::ops::{Deref, Range};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

use crate::persist::PageStateFile;
use crate::region::Region;

/// Where a region's page states live: the heap, or a page-state file that
/// outlives the process (`persist.rs`).
#[derive(Debug)]
pub(crate) enum States {
    Owned(Box<[AtomicU8]>),
    /// Region `.1` of the file.
    Shared(Arc<PageStateFile>, usize),
}

impl Deref for States {
    type Target = [AtomicU8];
    fn deref(&self) -> &[AtomicU8] {
        match self {
            States::Owned(b) => b,
            States::Shared(f, i) => f.states(*i),
        }
    }
}

impl From<Box<[AtomicU8]>> for States {
    fn from(b: Box<[AtomicU8]>) -> States {
        States::Owned(b)
    }
}

/// The state of one page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageState {
    /// Not mapped yet: its bytes come from the source.
    Missing = 0,
    /// Claimed by one serving thread, which alone may move it on.
    Claimed = 1,
    /// Mapped (copied or zeroed) in the target.
    Present = 2,
    /// Released by the target (REMOVE): a later fault gets zeros.
    Discarded = 3,
    /// Claimed, then discarded by a REMOVE before its owner mapped it: the
    /// owner must not map source bytes there any more.
    ClaimedDiscarded = 4,
    /// Could not be served (poisoned, or unservable): never retried.
    Failed = 5,
}

impl PageState {
    fn from_u8(v: u8) -> PageState {
        match v {
            0 => PageState::Missing,
            1 => PageState::Claimed,
            2 => PageState::Present,
            3 => PageState::Discarded,
            4 => PageState::ClaimedDiscarded,
            _ => PageState::Failed,
        }
    }
}

/// One region and its per-page states.
#[derive(Debug)]
pub(crate) struct RegionState {
    /// Stable while the region exists (REMAP moves it without a new id).
    pub id: u64,
    pub region: Region,
    states: States,
    /// Pages known from the source to be all zero (holes).
    known_zero: Box<[bool]>,
}

impl RegionState {
    pub fn new(id: u64, region: Region, zero_ranges: &[Range<u64>]) -> RegionState {
        let n = region.pages();
        let ps = region.page_bytes();
        // Holes come sorted and disjoint (SEEK_DATA/SEEK_HOLE order), so a
        // binary search finds the one that could hold each page: a sparse
        // snapshot has tens of thousands of holes, and a linear scan per
        // page took a second for 512 MiB.
        let sorted = zero_ranges.windows(2).all(|w| w[0].end <= w[1].start);
        let known_zero = (0..n)
            .map(|p| {
                let s = region.source_offset + p as u64 * ps;
                let covers = |z: &Range<u64>| z.start <= s && s + ps <= z.end;
                if sorted {
                    let i = zero_ranges.partition_point(|z| z.end <= s);
                    zero_ranges.get(i).is_some_and(covers)
                } else {
                    zero_ranges.iter().any(covers)
                }
            })
            .collect();
        RegionState {
            id,
            region,
            states: States::Owned(
                (0..n)
                    .map(|_| AtomicU8::new(PageState::Missing as u8))
                    .collect(),
            ),
            known_zero,
        }
    }

    /// A region whose states live in region `index` of `file`, taken over
    /// from an earlier server: in-flight claims are let go (see
    /// `persist.rs`). Returns it and how many claims were let go.
    fn adopted(
        id: u64,
        file: &Arc<PageStateFile>,
        index: usize,
        zero_ranges: &[Range<u64>],
    ) -> (RegionState, u64) {
        let region = file.regions()[index];
        let mut r = RegionState::new(id, region, zero_ranges);
        r.states = States::Shared(file.clone(), index);
        let mut let_go = 0;
        for p in 0..r.pages() {
            match r.state(p) {
                PageState::Claimed => r.set(p, PageState::Missing),
                PageState::ClaimedDiscarded => r.set(p, PageState::Discarded),
                _ => continue,
            }
            let_go += 1;
        }
        (r, let_go)
    }

    pub fn pages(&self) -> usize {
        self.states.len()
    }

    pub fn state(&self, page: usize) -> PageState {
        PageState::from_u8(self.states[page].load(Ordering::Acquire))
    }

    pub fn set(&self, page: usize, s: PageState) {
        self.states[page].store(s as u8, Ordering::Release);
    }

    /// Moves `page` from `from` to `to` if it is in `from`.
    pub fn transition(&self, page: usize, from: PageState, to: PageState) -> bool {
        self.states[page]
            .compare_exchange(from as u8, to as u8, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    pub fn known_zero(&self, page: usize) -> bool {
        self.known_zero[page]
    }

    pub fn page_addr(&self, page: usize) -> u64 {
        self.region.host_base + page as u64 * self.region.page_bytes()
    }

    /// Splits off the pages from `page` on into a new region with `id`.
    /// Pages claimed by a serving thread are handed back as missing in the
    /// new part (their owner no longer finds them); their addresses are
    /// appended to `wake` so that threads waiting there fault again.
    fn split_off(&mut self, page: usize, id: u64, wake: &mut Vec<(u64, usize)>) -> RegionState {
        let ps = self.region.page_bytes();
        let mut right = self.region;
        right.host_base += page as u64 * ps;
        right.source_offset += page as u64 * ps;
        right.len -= page as u64 * ps;
        self.region.len = page as u64 * ps;
        let states: Vec<AtomicU8> = self.states[page..]
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let v = match PageState::from_u8(s.load(Ordering::Acquire)) {
                    PageState::Claimed => {
                        wake.push((right.host_base + i as u64 * ps, ps as usize));
                        PageState::Missing
                    }
                    PageState::ClaimedDiscarded => {
                        wake.push((right.host_base + i as u64 * ps, ps as usize));
                        PageState::Discarded
                    }
                    other => other,
                };
                AtomicU8::new(v as u8)
            })
            .collect();
        let known_zero = self.known_zero[page..].to_vec().into_boxed_slice();
        self.states = States::Owned(
            self.states[..page]
                .iter()
                .map(|s| AtomicU8::new(s.load(Ordering::Acquire)))
                .collect(),
        );
        self.known_zero = self.known_zero[..page].to_vec().into_boxed_slice();
        RegionState {
            id,
            region: right,
            states: States::Owned(states.into_boxed_slice()),
            known_zero,
        }
    }

    /// A copy for a forked child: what the parent had mapped the child has
    /// too; pages in flight may or may not have made it and count as missing.
    pub fn fork_copy(&self) -> RegionState {
        RegionState {
            id: self.id,
            region: self.region,
            states: States::Owned(
                (0..self.pages())
                    .map(|p| {
                        let s = match self.state(p) {
                            PageState::Claimed => PageState::Missing,
                            PageState::ClaimedDiscarded => PageState::Discarded,
                            other => other,
                        };
                        AtomicU8::new(s as u8)
                    })
                    .collect(),
            ),
            known_zero: self.known_zero.clone(),
        }
    }
}

/// All regions of a session, sorted by host address.
#[derive(Debug, Default)]
pub(crate) struct Layout {
    pub regions: Vec<RegionState>,
    next_id: u64,
}

impl Layout {
    pub fn new(regions: &[Region], zero_ranges: &[Range<u64>]) -> Layout {
        let mut l = Layout::default();
        for r in regions {
            let id = l.fresh_id();
            l.regions.push(RegionState::new(id, *r, zero_ranges));
        }
        l.regions.sort_by_key(|r| r.region.host_base);
        l
    }

    /// The layout of a session whose states live in `file` (new, or
    /// adopted from an earlier server); also returns how many pages changed
    /// state in the adoption (in-flight claims let go, discards replayed
    /// from the journal).
    pub fn shared(file: &Arc<PageStateFile>, zero_ranges: &[Range<u64>]) -> (Layout, u64) {
        let mut l = Layout::default();
        let mut let_go = 0;
        for i in 0..file.regions().len() {
            let id = l.fresh_id();
            let (r, n) = RegionState::adopted(id, file, i, zero_ranges);
            l.regions.push(r);
            let_go += n;
        }
        l.regions.sort_by_key(|r| r.region.host_base);
        // A REMOVE the previous server read but never applied: the kernel
        // has zapped the range, so its pages must read zero (replaying one
        // that was applied changes nothing).
        for m in file.journal_messages() {
            if let uffd::Message::Remove { start, end } = m {
                let_go += l.discard(start, end);
            }
        }
        file.clear_journal(uffd::MAX_BATCH);
        (l, let_go)
    }

    pub fn fork_copy(&self) -> Layout {
        Layout {
            regions: self.regions.iter().map(RegionState::fork_copy).collect(),
            next_id: self.next_id,
        }
    }

    fn fresh_id(&mut self) -> u64 {
        self.next_id += 1;
        self.next_id
    }

    /// The region holding `addr` (its index) and the page within it.
    pub fn find(&self, addr: u64) -> Option<(usize, usize)> {
        let i = self
            .regions
            .partition_point(|r| r.region.host_base <= addr)
            .checked_sub(1)?;
        let r = &self.regions[i];
        r.region.contains(addr).then(|| {
            (
                i,
                ((addr - r.region.host_base) / r.region.page_bytes()) as usize,
            )
        })
    }

    pub fn by_id(&self, id: u64) -> Option<&RegionState> {
        self.regions.iter().find(|r| r.id == id)
    }

    /// Makes `addr` a region boundary if it falls strictly inside a region
    /// (rounded down to that region's page size).
    fn split_at(&mut self, addr: u64, wake: &mut Vec<(u64, usize)>) {
        let Some((i, page)) = self.find(addr) else {
            return;
        };
        if page == 0 {
            return;
        }
        let id = self.fresh_id();
        let right = self.regions[i].split_off(page, id, wake);
        self.regions.insert(i + 1, right);
    }

    /// REMOVE: every page in `[start, end)` is discarded. Returns how many
    /// pages changed state.
    pub fn discard(&self, start: u64, end: u64) -> u64 {
        let mut n = 0;
        for r in &self.regions {
            let (lo, hi) = (start.max(r.region.host_base), end.min(r.region.end()));
            if lo >= hi {
                continue;
            }
            let ps = r.region.page_bytes();
            let first = ((lo - r.region.host_base) / ps) as usize;
            let last = (hi - r.region.host_base).div_ceil(ps) as usize;
            for p in first..last.min(r.pages()) {
                let to = match r.state(p) {
                    PageState::Claimed => PageState::ClaimedDiscarded,
                    PageState::ClaimedDiscarded | PageState::Discarded => continue,
                    _ => PageState::Discarded,
                };
                r.set(p, to);
                n += 1;
            }
        }
        n
    }

    /// UNMAP: the range is gone from the target; forget its pages.
    pub fn unmap(&mut self, start: u64, end: u64, wake: &mut Vec<(u64, usize)>) {
        if start >= end {
            return;
        }
        self.split_at(start, wake);
        self.split_at(end, wake);
        let gone = |r: &RegionState| r.region.end() > start && r.region.host_base < end;
        // A thread may wait on a page a serving thread claimed there: its
        // owner no longer finds the region, so wake it here (it faults
        // again and meets the unmapping).
        for r in self.regions.iter().filter(|r| gone(r)) {
            for p in 0..r.pages() {
                if matches!(r.state(p), PageState::Claimed | PageState::ClaimedDiscarded) {
                    wake.push((r.page_addr(p), r.region.page_size.bytes()));
                }
            }
        }
        self.regions.retain(|r| !gone(r));
    }

    /// REMAP: `[from, from+len)` now lives at `to`. What was registered at
    /// the destination is gone (`mremap` with MREMAP_FIXED unmaps it first).
    /// A move the kernel cannot report (overlapping ranges, past the end of
    /// the address space) changes nothing.
    pub fn remap(&mut self, from: u64, to: u64, len: u64, wake: &mut Vec<(u64, usize)>) {
        let (Some(end), Some(to_end)) = (from.checked_add(len), to.checked_add(len)) else {
            return;
        };
        if len == 0 || (from < to_end && to < end) {
            return;
        }
        self.unmap(to, to_end, wake);
        self.split_at(from, wake);
        self.split_at(end, wake);
        for r in &mut self.regions {
            if r.region.host_base >= from && r.region.end() <= end {
                // host_base - from < len, so this stays below to_end.
                r.region.host_base = r.region.host_base - from + to;
            }
        }
        self.regions.sort_by_key(|r| r.region.host_base);
    }

    /// Checks what the engine relies on: regions sorted by address and
    /// disjoint, one state per page (fuzzing and tests).
    #[cfg(any(test, feature = "fuzzing"))]
    pub fn check(&self) {
        for w in self.regions.windows(2) {
            assert!(
                w[0].region.end() <= w[1].region.host_base,
                "regions out of order or overlapping: {:?} {:?}",
                w[0].region,
                w[1].region
            );
        }
        for r in &self.regions {
            assert_eq!(r.pages(), r.region.pages());
            assert_eq!(r.known_zero.len(), r.pages());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::region::PageSize;

    fn layout() -> Layout {
        Layout::new(
            &[Region {
                host_base: 0x10000,
                len: 0x8000,
                source_offset: 0,
                page_size: PageSize::Base4K,
            }],
            std::slice::from_ref(&(0x2000..0x4000)),
        )
    }

    #[test]
    fn find_and_known_zero() {
        let l = layout();
        assert_eq!(l.find(0x10000), Some((0, 0)));
        assert_eq!(l.find(0x17fff), Some((0, 7)));
        assert_eq!(l.find(0x18000), None);
        assert_eq!(l.find(0xffff), None);
        let r = &l.regions[0];
        assert!(!r.known_zero(1) && r.known_zero(2) && r.known_zero(3) && !r.known_zero(4));
    }

    #[test]
    fn many_holes_match_a_linear_scan() {
        // Holes of 1..3 pages between data of 1..2 pages, some partial pages,
        // with the region starting mid-file.
        let mut holes = Vec::new();
        let mut at = 0x800u64;
        for i in 0..500u64 {
            let len = 0x1000 * (1 + i % 3) + if i % 7 == 0 { 0x800 } else { 0 };
            holes.push(at..at + len);
            at += len + 0x1000 * (1 + i % 2);
        }
        let region = Region {
            host_base: 0x100000,
            len: 0x1000 * 1500,
            source_offset: 0x3000,
            page_size: PageSize::Base4K,
        };
        let fast = RegionState::new(0, region, &holes);
        for p in 0..fast.pages() {
            let s = 0x3000 + p as u64 * 0x1000;
            let want = holes.iter().any(|z| z.start <= s && s + 0x1000 <= z.end);
            assert_eq!(fast.known_zero(p), want, "page {p}");
        }
    }

    #[test]
    fn discard_marks_claimed_pages_for_their_owner() {
        let l = layout();
        let r = &l.regions[0];
        assert!(r.transition(1, PageState::Missing, PageState::Claimed));
        r.set(2, PageState::Present);
        assert_eq!(l.discard(0x11000, 0x13000), 2);
        assert_eq!(r.state(1), PageState::ClaimedDiscarded);
        assert_eq!(r.state(2), PageState::Discarded);
        assert_eq!(r.state(3), PageState::Missing);
    }

    #[test]
    fn unmap_and_remap_split_regions() {
        let mut l = layout();
        let mut wake = Vec::new();
        assert!(l.regions[0].transition(5, PageState::Missing, PageState::Claimed));
        l.remap(0x14000, 0x40000, 0x2000, &mut wake);
        assert_eq!(l.regions.len(), 3);
        // The waiter blocked at the old address is woken there.
        assert_eq!(wake, vec![(0x15000, 0x1000)]);
        let (i, p) = l.find(0x41000).expect("moved page");
        assert_eq!(l.regions[i].region.source_offset, 0x4000);
        assert_eq!((p, l.regions[i].state(1)), (1, PageState::Missing));
        assert_eq!(l.find(0x15000), None);
        let (i, p) = l.find(0x10000).expect("page 0");
        assert!(l.regions[i].transition(p, PageState::Missing, PageState::Claimed));
        wake.clear();
        l.unmap(0x10000, 0x12000, &mut wake);
        assert_eq!(l.find(0x10000), None);
        assert!(l.find(0x12000).is_some());
        assert_eq!(wake, vec![(0x10000, 0x1000)], "its waiter is woken");
        l.check();
    }

    #[test]
    fn remap_over_registered_memory_replaces_it_and_bad_moves_change_nothing() {
        let mut l = layout();
        let mut wake = Vec::new();
        // Pages 0-1 move onto pages 4-5: what was at 4-5 is gone.
        l.regions[0].set(4, PageState::Present);
        l.remap(0x10000, 0x14000, 0x2000, &mut wake);
        l.check();
        let (i, p) = l.find(0x14000).expect("moved");
        assert_eq!((l.regions[i].region.source_offset, p), (0, 0));
        assert_eq!(l.regions[i].state(0), PageState::Missing);
        assert_eq!(l.find(0x10000), None);
        // Overlapping, overflowing, empty or inverted: ignored.
        let before: Vec<Region> = l.regions.iter().map(|r| r.region).collect();
        l.remap(0x12000, 0x13000, 0x2000, &mut wake);
        l.remap(0x12000, u64::MAX - 0x1000, 0x2000, &mut wake);
        l.remap(0x12000, 0x40000, 0, &mut wake);
        l.unmap(0x17000, 0x11000, &mut wake);
        let after: Vec<Region> = l.regions.iter().map(|r| r.region).collect();
        assert_eq!(before, after);
        l.check();
    }
}
