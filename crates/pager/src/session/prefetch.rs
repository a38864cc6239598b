//! Prefetch: mapping a recorded working set right after the handshake,
//! before the guest asks for it.
//!
//! The set is a list of 4 KiB source offsets in the order the guest first
//! touched them. Idle serving threads take it in batches of
//! [`BATCH_PAGES`]: a batch is sorted by address and cut into runs of
//! nearby pages, each read from the source once and mapped with as few
//! ioctls as the runs allow. Prefetch is queued work of lower priority than
//! faults: a thread takes a batch only when epoll finds no fault, and a
//! fault on a page of the set that no batch has claimed yet is served at
//! once like any other (it takes the page over). Pages the guest released
//! meanwhile (a balloon REMOVE) are not prefetched: they stay zero.
//!
//! # Hits and waste
//! A prefetched page the guest then reads makes no fault, and this kernel
//! cannot say afterwards whether a mapped page was read (see `record.rs`).
//! So one page in 64 of the set (at most about [`SAMPLES`]), chosen by a
//! hash of its offset, is left out as a sample: a fault on a sample is a hit, a sample
//! never faulted is waste, and the report scales the rates to the set.
//! It costs that share of the set's faults back.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uffd::Event;

use super::{with_claims, Claim, Ctx, Faults, Origin, Served, Session};
use crate::layout::{Layout, PageState};
use crate::stats::Stats;

/// Pages of the set sorted together into runs (4 MiB of 4 KiB pages).
const BATCH_PAGES: usize = 1024;
/// Pages claimed per step at most: a step holds a serving thread, and a
/// fault that finds every serving thread prefetching waits for a step
/// (about 64 single-page runs of a sparse set: 0.1-0.2 ms here).
const STEP_PAGES: usize = 64;
/// Pages at most between two pages of one run: the gap is read from the
/// source with them (not mapped), which is cheaper than another read.
const MAX_GAP: usize = 1;
/// Pages at most per run (1 MiB of 4 KiB pages).
const MAX_RUN: usize = 256;
/// Samples wanted: one page of the set in 64, and at most about 64 of them
/// (a hit rate from 64 samples is within about six points; more samples
/// only cost faults: a 15k-page set would make 230).
const SAMPLES: u64 = 64;

/// A working set to prefetch: 4 KiB-aligned source offsets, in the order to
/// map them (first touch first).
#[derive(Debug, Clone)]
pub struct PrefetchSet {
    offsets: Arc<[u64]>,
}

impl PrefetchSet {
    /// Offsets are rounded down to 4 KiB; duplicates are mapped once.
    pub fn new(offsets: Vec<u64>) -> PrefetchSet {
        PrefetchSet {
            offsets: offsets.into_iter().map(|o| o & !4095).collect(),
        }
    }

    pub fn len(&self) -> usize {
        self.offsets.len()
    }

    pub fn is_empty(&self) -> bool {
        self.offsets.is_empty()
    }
}

/// Whether the 4 KiB source page `page` is a sample of a set in which one
/// page in `every` is.
fn is_sample(page: u64, every: u64) -> bool {
    // Fibonacci hashing: the top bits of the product are spread evenly
    // whatever the stride of the set's pages.
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32).is_multiple_of(every)
}

pub(super) struct Prefetch {
    set: PrefetchSet,
    /// Next index into the set, and the runs of the batch taken from it
    /// still to map (region id, page; sorted).
    queue: Mutex<Queue>,
    /// Runs remain to be handed out.
    pending: AtomicBool,
    /// Runs handed out and not mapped yet: the set is mapped when none
    /// remain to hand out and none are in flight.
    inflight: AtomicUsize,
    /// One bit per 4 KiB source page: in the set.
    in_set: Box<[u64]>,
    /// One bit per 4 KiB source page: a sample not faulted yet.
    samples: Box<[AtomicU64]>,
    started: Instant,
}

impl Prefetch {
    pub fn new(set: &PrefetchSet, source_len: u64, started: Instant, stats: &Stats) -> Prefetch {
        let words = (source_len.div_ceil(4096) as usize).div_ceil(64);
        let mut in_set = vec![0u64; words].into_boxed_slice();
        let samples: Box<[AtomicU64]> = (0..words).map(|_| AtomicU64::new(0)).collect();
        let sample_every = (set.len() as u64 / SAMPLES).max(SAMPLES);
        let mut n_samples = 0;
        for &o in set.offsets.iter() {
            let page = o / 4096;
            let (w, bit) = ((page / 64) as usize, 1u64 << (page % 64));
            let Some(word) = in_set.get_mut(w) else {
                continue;
            };
            if *word & bit != 0 {
                continue;
            }
            *word |= bit;
            if is_sample(page, sample_every) {
                samples[w].fetch_or(bit, Ordering::Relaxed);
                n_samples += 1;
            }
        }
        Stats::add(&stats.prefetch_samples, n_samples);
        Prefetch {
            set: set.clone(),
            queue: Mutex::new(Queue::new()),
            pending: AtomicBool::new(!set.is_empty()),
            inflight: AtomicUsize::new(0),
            in_set,
            samples,
            started,
        }
    }

    /// Whether the 4 KiB source page `page` is a sample still unfaulted.
    fn is_sample(&self, page: u64) -> bool {
        self.samples
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Makes `page` no sample; returns whether it was one still.
    fn unsample(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.samples
            .get((page / 64) as usize)
            .is_some_and(|w| w.fetch_and(!bit, Ordering::AcqRel) & bit != 0)
    }

    fn contains(&self, page: u64) -> bool {
        self.in_set
            .get((page / 64) as usize)
            .is_some_and(|w| w & (1 << (page % 64)) != 0)
    }
}

/// Room allocated with the session: serving threads do not allocate (see
/// `engine::Scratch`).
struct Queue {
    next: usize,
    batch: std::collections::VecDeque<(u64, usize)>,
    staging: Vec<(u64, usize)>,
}

impl Queue {
    fn new() -> Queue {
        Queue {
            next: 0,
            batch: std::collections::VecDeque::with_capacity(BATCH_PAGES),
            staging: Vec::with_capacity(BATCH_PAGES),
        }
    }
}

thread_local! {
    static RUN: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The region (index) and page holding source offset `offset`, trying
/// `hint` first.
fn find_source(layout: &Layout, offset: u64, hint: &mut usize) -> Option<(usize, usize)> {
    let holds = |i: usize| {
        let r = &layout.regions[i].region;
        (r.source_offset..r.source_offset + r.len)
            .contains(&offset)
            .then(|| (i, ((offset - r.source_offset) / r.page_bytes()) as usize))
    };
    if *hint < layout.regions.len() {
        if let Some(found) = holds(*hint) {
            return Some(found);
        }
    }
    let found = (0..layout.regions.len()).find_map(holds)?;
    *hint = found.0;
    Some(found)
}

impl Session {
    /// A fault at source offset `offset` while a set is prefetched: a hit
    /// if the page is a sample, otherwise counted if outside the set.
    /// Returns whether the page is in the set (then the fault maps it
    /// alone: the set says which pages around it the guest needs).
    pub(super) fn prefetch_saw_fault(&self, offset: u64, count: bool) -> bool {
        let Some(p) = &self.prefetch else {
            return false;
        };
        let page = offset / 4096;
        if !p.contains(page) {
            if count {
                Stats::add(&self.stats.faults_outside_set, 1);
            }
            return false;
        }
        if count && p.unsample(page) {
            Stats::add(&self.stats.prefetch_sample_hits, 1);
        }
        true
    }

    /// Whether prefetch work remains.
    pub(crate) fn prefetch_pending(&self) -> bool {
        self.prefetch
            .as_ref()
            .is_some_and(|p| p.pending.load(Ordering::Acquire))
    }

    /// One prefetch step: the next runs of the set, [`STEP_PAGES`] pages at
    /// most. Returns `None` when there is nothing (left) to prefetch.
    pub(crate) fn prefetch_step(
        &self,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Option<Served> {
        let p = self.prefetch.as_ref()?;
        if self.is_ended() || !p.pending.load(Ordering::Acquire) || self.unprompted_paused() {
            return None;
        }
        let mut claimed = 0;
        let mut served = None;
        let mut run = RUN.with(|r| std::mem::take(&mut *r.borrow_mut()));
        while claimed < STEP_PAGES {
            run.clear();
            let Some(id) = self.next_run(p, &mut run) else {
                break;
            };
            let s = with_claims(|claims| {
                let layout = self.read_layout();
                let r = layout.by_id(id)?;
                for &page in run.iter() {
                    // Missing only: a page the guest released stays zero,
                    // and one mapped or in flight is somebody else's.
                    if page < r.pages()
                        && r.transition(page, PageState::Missing, PageState::Claimed)
                    {
                        claims.push(Claim::new(page, r.known_zero(page)));
                    }
                }
                if claims.is_empty() {
                    return None;
                }
                claimed += claims.len();
                let ctx = Ctx::unprompted(Origin::Prefetch, self.config.quick_retries);
                Some(self.serve_claims(layout, id, claims, ctx, deferred, events))
            });
            if self.paused.load(Ordering::Acquire) {
                // The kernel kept refusing (EAGAIN, ENOMEM): the run was put
                // aside, its claims given back. Hand it out again after the
                // pause (`put_aside`).
                self.requeue(p, id, &run);
            }
            if p.inflight.fetch_sub(1, Ordering::AcqRel) == 1 && !p.pending.load(Ordering::Acquire)
            {
                self.prefetch_done(p);
            }
            match s {
                Some(Served::Done) | None => served = Some(Served::Done),
                Some(other) => {
                    served = Some(other);
                    break;
                }
            }
        }
        RUN.with(|r| *r.borrow_mut() = run);
        served
    }

    /// Puts the pages of a run of region `id` that are still missing back
    /// at the front of the queue.
    fn requeue(&self, p: &Prefetch, id: u64, run: &[usize]) {
        let layout = self.read_layout();
        let Some(r) = layout.by_id(id) else { return };
        let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        for &page in run.iter().rev() {
            if page < r.pages() && r.state(page) == PageState::Missing {
                q.batch.push_front((id, page));
            }
        }
        // Other threads may have put runs back too: keep the batch sorted.
        q.batch.make_contiguous().sort_unstable();
        p.pending.store(true, Ordering::Release);
    }

    /// Notes when the whole set was mapped (once).
    fn prefetch_done(&self, p: &Prefetch) {
        let us = (p.started.elapsed().as_micros() as u64).max(1);
        let _ = self.stats.prefetch_done_us.compare_exchange(
            0,
            us,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The next run of the set to map (region id, pages): nearby pages of
    /// one region, from a batch sorted by address. Refills the batch from
    /// the set when it is empty; marks prefetch done when both are.
    fn next_run(&self, p: &Prefetch, run: &mut Vec<usize>) -> Option<u64> {
        let mut guard = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        let q = &mut *guard;
        if q.batch.is_empty() {
            let layout = self.read_layout();
            let mut hint = 0;
            q.staging.clear();
            while q.next < p.set.offsets.len() && q.staging.len() < BATCH_PAGES {
                let offset = p.set.offsets[q.next];
                q.next += 1;
                let Some((i, page)) = find_source(&layout, offset, &mut hint) else {
                    continue;
                };
                let r = &layout.regions[i];
                if p.is_sample(offset / 4096) {
                    if r.region.page_size == crate::region::PageSize::Base4K {
                        continue; // left to its fault (`prefetch_saw_fault`)
                    }
                    // A huge page holds other pages of the set: mapped with
                    // them, it is no sample.
                    if p.unsample(offset / 4096) {
                        self.stats.prefetch_samples.fetch_sub(1, Ordering::Relaxed);
                    }
                }
                q.staging.push((r.id, page));
            }
            q.staging.sort_unstable();
            q.staging.dedup();
            q.batch.extend(q.staging.drain(..));
        }
        let Some(&(id, first)) = q.batch.front() else {
            if p.pending.swap(false, Ordering::AcqRel) && p.inflight.load(Ordering::Acquire) == 0 {
                self.prefetch_done(p);
            }
            return None;
        };
        p.inflight.fetch_add(1, Ordering::AcqRel);
        // A run: one region, ascending, gaps of at most MAX_GAP, MAX_RUN
        // pages.
        let mut last = first;
        while let Some(&(rid, page)) = q.batch.front() {
            if rid != id || page < last || page - last > MAX_GAP + 1 || page - first >= MAX_RUN {
                break;
            }
            run.push(page);
            last = page;
            q.batch.pop_front();
        }
        Some(id)
    }
}
