//! Adaptive fault-around: how many pages a fault that does not continue a
//! stream maps besides its own.
//!
//! Pages mapped around a fault save the guest a fault each if it touches
//! them, and cost memory for good if it never does: with a fixed 32-page
//! cluster, a guest touching a random tenth of its memory had 9.6x the
//! memory it touched resident (issue 12). Whether the pages around a fault
//! get touched is a property of the guest, not of the machine, so the
//! window is measured per region, not tuned:
//!
//! - **Samples.** Each such fault leaves the page just beyond the block it
//!   maps unmapped on purpose (alternately after and before it): the page a
//!   window twice as large would have mapped. A fault on a sample is a
//!   *hit*, and so is a fault beside a page that is mapped already (the
//!   guest touches neighbours, only later: a sweep in several passes, or
//!   a random one well under way); a sample still missing (or mapped by
//!   another block without a fault of its own) when [`SAMPLES`] newer ones
//!   have been taken in its region is a *miss*. Samples cost nothing: they
//!   are pages the guest has not asked for and does not get. Only pages
//!   with data are samples: a zero page costs no memory to map.
//! - **Decisions**, every [`DECIDE`] resolved samples, on the hit rate `h`:
//!   with `h >= 1/3` the window doubles (up to four times
//!   `SessionConfig::cluster_pages`): a window whose neighbours are used at
//!   that rate keeps resident memory under three times what was touched
//!   (`W / (1 + (W-1) h) < 3`); with `h < 1/6` it halves, down to one page;
//!   in between it holds. Measured against 1/2 and 1/4 (`bench`, 256 MiB,
//!   one client thread, one run each): a random tenth touched kept 26 MiB
//!   resident for 26 MiB touched either way, while a random first touch of
//!   everything went from 0.63 to 0.85 GiB/s (a window of 32 pages: 1.65).
//!
//! A guest touching memory densely (or in runs) grows its window within a
//! few dozen faults; a sparse one shrinks it to one page within about a
//! hundred. A uniformly random first touch of all of memory cannot be told
//! from a uniformly random tenth of it until a tenth is touched (the chance
//! that a page's neighbour is touched is the same in both): it is served
//! with small windows until its neighbour hits say otherwise, and a
//! recorded working set, background population or `adaptive_cluster:
//! false` is the tool for it (docs/architecture.md has the figures).

use std::collections::VecDeque;

use super::{pages_of, Session};
use crate::layout::{PageState, RegionState};

/// Samples outstanding per region; an older one still missing is a miss.
pub(super) const SAMPLES: usize = 32;
/// Resolved samples per decision.
pub(super) const DECIDE: u32 = 16;

/// The window of one region.
#[derive(Debug)]
struct RegionWindow {
    id: u64,
    /// Pages (of the region's size) mapped per fault, a power of two.
    window: usize,
    max: usize,
    samples: VecDeque<usize>,
    hits: u32,
    misses: u32,
    /// Which side the next sample goes.
    after: bool,
}

/// Fault-around windows of a session's regions.
#[derive(Debug, Default)]
pub(super) struct Sizer {
    regions: Vec<RegionWindow>,
}

/// What a fault maps: pages `start..end`, holding the faulting page; with
/// `zero_only`, of the others only those known to be zero.
pub(super) struct Block {
    pub start: usize,
    pub end: usize,
    pub zero_only: bool,
}

impl Sizer {
    fn region(&mut self, r: &RegionState, start: usize, max: usize) -> &mut RegionWindow {
        let i = match self.regions.iter().position(|w| w.id == r.id) {
            Some(i) => i,
            None => {
                self.regions.push(RegionWindow {
                    id: r.id,
                    window: start.clamp(1, max),
                    max,
                    samples: VecDeque::with_capacity(SAMPLES),
                    hits: 0,
                    misses: 0,
                    after: true,
                });
                self.regions.len() - 1
            }
        };
        &mut self.regions[i]
    }

    /// The current window of region `id` (for reports and tests).
    pub fn window(&self, id: u64) -> Option<usize> {
        self.regions.iter().find(|w| w.id == id).map(|w| w.window)
    }
}

impl RegionWindow {
    fn decide(&mut self) {
        let resolved = self.hits + self.misses;
        if resolved < DECIDE {
            return;
        }
        // h >= 1/3: grow; h < 1/6: shrink.
        if 3 * self.hits >= resolved {
            self.window = (self.window * 2).min(self.max);
        } else if 6 * self.hits < resolved {
            self.window = (self.window / 2).max(1);
        }
        self.hits = 0;
        self.misses = 0;
    }

    fn add_sample(&mut self, r: &RegionState, page: usize) {
        if self.samples.len() == SAMPLES {
            if let Some(old) = self.samples.pop_front() {
                // Still missing, or mapped meanwhile without a fault of its
                // own (by another block, readahead or background): it was
                // not worth a fault, so not worth mapping ahead either. A
                // sample unmapped or discarded meanwhile tells nothing.
                if old < r.pages()
                    && matches!(
                        r.state(old),
                        PageState::Missing | PageState::Present | PageState::Claimed
                    )
                {
                    self.misses += 1;
                }
            }
        }
        self.samples.push_back(page);
        self.decide();
    }
}

impl Session {
    /// The block a fault at `page` maps when it does not continue a stream:
    /// the aligned block of the region's current window holding it. Counts
    /// the fault as a hit if it is on a sample, and leaves a new sample
    /// beside the block. While a working set is recorded exactly
    /// (`record.rs`) only the block's pages known to be zero are mapped
    /// with the faulting one (they cost no memory and no read), and every
    /// page with data the guest touches faults.
    pub(super) fn fault_block(&self, r: &RegionState, page: usize) -> Block {
        let start_window = pages_of(self.config.cluster_pages, r.region.page_size);
        if start_window <= 1 {
            return Block {
                start: page,
                end: page + 1,
                zero_only: false,
            };
        }
        let zero_only = self.recording_exactly();
        if !self.config.adaptive_cluster {
            let start = page / start_window * start_window;
            return Block {
                start,
                end: (start + start_window).min(r.pages()),
                zero_only,
            };
        }
        let max = pages_of(self.config.cluster_pages * 4, r.region.page_size);
        let mut sizer = self.sizer.lock().unwrap_or_else(|e| e.into_inner());
        let w = sizer.region(r, start_window, max);
        if zero_only {
            // Recording exactly: the block is for zero pages only, and the
            // window is not learned meanwhile.
            let start = page / w.window * w.window;
            return Block {
                start,
                end: (start + w.window).min(r.pages()),
                zero_only,
            };
        }
        // A hit: the fault is on a sample, or beside a page that is
        // mapped already (the guest touches neighbours, if later).
        let beside =
            |q: Option<usize>| q.is_some_and(|q| q < r.pages() && r.state(q) == PageState::Present);
        if let Some(i) = w.samples.iter().position(|&s| s == page) {
            w.samples.remove(i);
            w.hits += 1;
            w.decide();
        } else if beside(page.checked_sub(1)) || beside(Some(page + 1)) {
            w.hits += 1;
            w.decide();
        }
        let start = page / w.window * w.window;
        let end = (start + w.window).min(r.pages());
        // The sample: the page just beyond the block, on alternate sides;
        // only a page with data (a zero page costs no memory to map).
        w.after = !w.after;
        let candidate = if w.after {
            Some(end).filter(|&p| p < r.pages())
        } else {
            start.checked_sub(1)
        };
        if let Some(s) = candidate {
            if r.state(s) == PageState::Missing && !r.known_zero(s) && !w.samples.contains(&s) {
                w.add_sample(r, s);
            }
        }
        Block {
            start,
            end,
            zero_only: false,
        }
    }

    /// The fault-around window now (pages of its size) of the region
    /// holding `addr`.
    pub fn fault_around_window_at(&self, addr: u64) -> Option<usize> {
        let id = {
            let layout = self.read_layout();
            let (i, _) = layout.find(addr)?;
            layout.regions[i].id
        };
        self.sizer
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .window(id)
    }
}
