//! Prefetch: mapping a recorded working set right after the handshake,
//! before the guest asks for it.
//!
//! The set is a list of 4 KiB source offsets in the order the guest first
//! touched them. It is taken in batches of [`BATCH_PAGES`], each sorted by
//! address and cut into runs of nearby pages (at most a step), each read from
//! the source once and mapped with as few ioctls as the run allows.
//! Prefetch is queued work of lower priority than faults: a serving thread
//! maps at most [`STEP_BYTES`] of it before it looks at epoll again, and a
//! fault on a page of the set that no run has claimed yet is served at once
//! like any other (it takes the page over). Pages the guest released
//! meanwhile (a balloon REMOVE) are not prefetched: only missing pages are
//! claimed, so they stay zero. A run the kernel keeps refusing (EAGAIN,
//! ENOMEM) goes back to the front of the queue until the pause is over.
//! Pages that UNMAP or REMAP move to another region are left to faults.
//!
//! # Hits and waste
//! A prefetched page the guest then reads makes no fault, and this kernel
//! cannot say afterwards whether a mapped page was read (see `record.rs`).
//! So one page in 64 of the set (at most about [`SAMPLES`]), chosen by a
//! hash of its offset, is left out as a sample: a fault on a sample is a
//! hit, a sample never faulted is waste, and the report scales the rates to
//! the set. It costs that share of the set's faults back. A sample mapped
//! otherwise (around a fault outside the set, by readahead or background
//! population) says nothing and is dropped, and 2 MiB regions have none (a
//! huge page holds other pages of the set).

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use uffd::Event;

use super::{with_claims, Claim, Ctx, Faults, Origin, Served, Session};
use crate::layout::{Layout, PageState};
use crate::region::PageSize;
use crate::stats::Stats;

/// Pages of the set sorted together into runs (4 MiB of 4 KiB pages).
const BATCH_PAGES: usize = 1024;
/// Bytes mapped per step at most (at least one page): a step holds a
/// serving thread, and a fault that finds every serving thread prefetching
/// waits for a step (64 single-page runs of a sparse set: 0.1-0.2 ms here).
const STEP_BYTES: usize = 256 << 10;
/// Runs looked at per step at most, mapped or not (a set mostly present
/// already must not keep a thread from epoll either).
const STEP_RUNS: usize = 256;
/// Bytes at most between two pages of one run: the gap is read from the
/// source with them (not mapped), which is cheaper than another read.
const MAX_GAP_BYTES: usize = 4 << 10;
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

    /// The offsets, in the order to map them.
    pub fn offsets(&self) -> &[u64] {
        &self.offsets
    }
}

/// Whether the 4 KiB source page `page` is a sample of a set in which one
/// page in `every` is.
fn is_sample(page: u64, every: u64) -> bool {
    // Fibonacci hashing: the top bits of the product are spread evenly
    // whatever the stride of the set's pages.
    (page.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 32).is_multiple_of(every)
}

/// One bit per 4 KiB source page.
struct Bits(Box<[AtomicU64]>);

impl Bits {
    fn new(source_len: u64) -> Bits {
        let words = (source_len.div_ceil(4096) as usize).div_ceil(64);
        Bits((0..words).map(|_| AtomicU64::new(0)).collect())
    }

    fn get(&self, page: u64) -> bool {
        self.0
            .get((page / 64) as usize)
            .is_some_and(|w| w.load(Ordering::Acquire) & (1 << (page % 64)) != 0)
    }

    /// Sets the bit; returns whether it was clear.
    fn set(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.0
            .get((page / 64) as usize)
            .is_some_and(|w| w.fetch_or(bit, Ordering::AcqRel) & bit == 0)
    }

    /// Clears the bit; returns whether it was set. A load first: most
    /// calls find it clear, and need not take the cache line.
    fn clear(&self, page: u64) -> bool {
        let bit = 1u64 << (page % 64);
        self.0.get((page / 64) as usize).is_some_and(|w| {
            w.load(Ordering::Acquire) & bit != 0 && w.fetch_and(!bit, Ordering::AcqRel) & bit != 0
        })
    }
}

/// A page of a batch: region id, page in it, the region's page size.
type Queued = (u64, usize, usize);

/// Room allocated with the session: serving threads do not allocate (see
/// `engine::Scratch`).
struct Queue {
    /// Next index into the set.
    next: usize,
    /// The batch taken from it, still to map (sorted).
    batch: VecDeque<Queued>,
    staging: Vec<Queued>,
}

pub(super) struct Prefetch {
    set: PrefetchSet,
    queue: Mutex<Queue>,
    /// Runs remain to be handed out.
    pending: AtomicBool,
    /// Runs handed out and not settled yet: the set is mapped when none
    /// remain to hand out and none are in flight.
    inflight: AtomicUsize,
    /// In the set.
    in_set: Bits,
    /// Samples not faulted (nor mapped otherwise) yet.
    samples: Bits,
    started: Instant,
}

impl Prefetch {
    /// Samples lie in 4 KiB regions only: `small(offset)` says whether the
    /// source page at `offset` is served in one.
    pub fn new(
        set: &PrefetchSet,
        source_len: u64,
        started: Instant,
        stats: &Stats,
        small: impl Fn(u64) -> bool,
    ) -> Prefetch {
        let in_set = Bits::new(source_len);
        let samples = Bits::new(source_len);
        let every = (set.len() as u64 / SAMPLES).max(SAMPLES);
        let mut n_samples = 0;
        for &o in set.offsets.iter() {
            let page = o / 4096;
            if in_set.set(page) && is_sample(page, every) && small(o) {
                samples.set(page);
                n_samples += 1;
            }
        }
        Stats::add(&stats.prefetch_samples, n_samples);
        Prefetch {
            set: set.clone(),
            queue: Mutex::new(Queue {
                next: 0,
                batch: VecDeque::with_capacity(2 * BATCH_PAGES),
                staging: Vec::with_capacity(BATCH_PAGES),
            }),
            pending: AtomicBool::new(!set.is_empty()),
            inflight: AtomicUsize::new(0),
            in_set,
            samples,
            started,
        }
    }

    /// Whether any 4 KiB page of `offset..offset + len` is in the set.
    fn holds(&self, offset: u64, len: u64) -> bool {
        (offset / 4096..(offset + len).div_ceil(4096)).any(|p| self.in_set.get(p))
    }
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

thread_local! {
    static RUN: std::cell::RefCell<Vec<usize>> = const { std::cell::RefCell::new(Vec::new()) };
}

impl Session {
    /// A fault on the page at source offset `offset` (`len` bytes) while a
    /// set is prefetched: a hit if the page is a sample, otherwise counted
    /// if outside the set (with `count`: not for a fault served again).
    /// Returns whether the page holds a page of the set (then the fault maps
    /// it alone: the set says which pages around it the guest needs).
    pub(super) fn prefetch_saw_fault(&self, offset: u64, len: u64, count: bool) -> bool {
        let Some(p) = &self.prefetch else {
            return false;
        };
        if !p.holds(offset, len) {
            if count {
                Stats::add(&self.stats.faults_outside_set, 1);
            }
            return false;
        }
        if count && p.samples.clear(offset / 4096) {
            Stats::add(&self.stats.prefetch_sample_hits, 1);
        }
        true
    }

    /// Pages at source offsets `offset..offset + len` were mapped by other
    /// work than prefetch, without a fault of their own: samples among them
    /// say nothing any more.
    pub(super) fn prefetch_mapped_otherwise(&self, offset: u64, len: u64) {
        let Some(p) = &self.prefetch else { return };
        for page in offset / 4096..(offset + len).div_ceil(4096) {
            if p.samples.clear(page) {
                self.stats.prefetch_samples.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Whether prefetch work remains.
    pub(crate) fn prefetch_pending(&self) -> bool {
        self.prefetch
            .as_ref()
            .is_some_and(|p| p.pending.load(Ordering::Acquire))
    }

    /// Whether prefetch work was handed back since the last call (a run put
    /// aside); the engine then raises its prefetch flag again.
    pub(crate) fn take_prefetch_added(&self) -> bool {
        self.prefetch_added.swap(false, Ordering::AcqRel)
    }

    /// One prefetch step: the next runs of the set, [`STEP_BYTES`] at most
    /// (at least one page). Returns `None` when there is nothing (left) to
    /// prefetch.
    pub(crate) fn prefetch_step(
        &self,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Option<Served> {
        let p = self.prefetch.as_ref()?;
        if self.is_ended() || !p.pending.load(Ordering::Acquire) || self.unprompted_paused() {
            return None;
        }
        let mut budget = STEP_BYTES;
        let mut served = None;
        let mut run = RUN.with(|r| std::mem::take(&mut *r.borrow_mut()));
        for _ in 0..STEP_RUNS {
            // Another thread's run may have met lasting EAGAIN meanwhile:
            // its pause holds for every thread (one load while none is).
            if self.paused.load(Ordering::Acquire) && self.unprompted_paused() {
                break;
            }
            run.clear();
            let Some((id, ps)) = self.next_run(p, &mut run, budget) else {
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
                budget = budget.saturating_sub(claims.len() * ps);
                let ctx = Ctx::unprompted(Origin::Prefetch, self.config.quick_retries);
                Some(self.serve_claims(layout, id, claims, ctx, deferred, events))
            });
            if s == Some(Served::PutAside) {
                // The kernel kept refusing: the claims were given back, and
                // the run waits at the front of the queue for the pause.
                self.requeue(p, id, ps, &run);
            }
            // SeqCst here and in `next_run`: each side writes one counter
            // and reads the other's.
            if p.inflight.fetch_sub(1, Ordering::SeqCst) == 1 && !p.pending.load(Ordering::SeqCst) {
                self.prefetch_done(p);
            }
            match s {
                Some(Served::Done) | None => served = Some(Served::Done),
                Some(other) => {
                    served = Some(other);
                    break;
                }
            }
            if budget == 0 {
                break;
            }
        }
        RUN.with(|r| *r.borrow_mut() = run);
        served
    }

    /// Puts the pages of a run of region `id` back at the front of the
    /// queue (those mapped meanwhile are skipped when claimed again). Takes
    /// no layout lock: `next_run` holds the queue while it takes one.
    fn requeue(&self, p: &Prefetch, id: u64, ps: usize, run: &[usize]) {
        let mut q = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        for &page in run.iter().rev() {
            q.batch.push_front((id, page, ps));
        }
        // Other threads may have put runs back too: keep the batch sorted.
        q.batch.make_contiguous().sort_unstable();
        p.pending.store(true, Ordering::Release);
        self.prefetch_added.store(true, Ordering::Release);
    }

    /// Notes when the whole set was mapped (the first time).
    fn prefetch_done(&self, p: &Prefetch) {
        let us = (p.started.elapsed().as_micros() as u64).max(1);
        let _ = self.stats.prefetch_done_us.compare_exchange(
            0,
            us,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }

    /// The next run of the set to map: nearby pages of one region, from a
    /// batch sorted by address, `budget` bytes at most (at least one page).
    /// Fills `run` and returns the region's id and page size, counting the
    /// run in flight. Refills the batch from the set when it is empty; ends
    /// prefetch when both are.
    fn next_run(&self, p: &Prefetch, run: &mut Vec<usize>, budget: usize) -> Option<(u64, usize)> {
        let mut guard = p.queue.lock().unwrap_or_else(|e| e.into_inner());
        let q = &mut *guard;
        if q.batch.is_empty() {
            let layout = self.read_layout();
            let mut hint = 0;
            q.staging.clear();
            while q.next < p.set.offsets.len() && q.staging.len() < BATCH_PAGES {
                let offset = p.set.offsets[q.next];
                q.next += 1;
                if p.samples.get(offset / 4096) {
                    continue; // left to its fault (`prefetch_saw_fault`)
                }
                if let Some((i, page)) = find_source(&layout, offset, &mut hint) {
                    let r = &layout.regions[i];
                    q.staging.push((r.id, page, r.region.page_size.bytes()));
                }
            }
            q.staging.sort_unstable();
            q.staging.dedup();
            q.batch.extend(q.staging.drain(..));
        }
        let Some(&(id, first, ps)) = q.batch.front() else {
            if p.pending.swap(false, Ordering::SeqCst) && p.inflight.load(Ordering::SeqCst) == 0 {
                self.prefetch_done(p);
            }
            return None;
        };
        p.inflight.fetch_add(1, Ordering::AcqRel);
        // One region, ascending, small gaps, bounded.
        let max_gap = MAX_GAP_BYTES / ps + 1;
        let max_pages = (budget / ps).max(1);
        let mut last = first;
        while let Some(&(rid, page, _)) = q.batch.front() {
            if rid != id || page < last || page - last > max_gap || page - first >= max_pages {
                break;
            }
            run.push(page);
            last = page;
            q.batch.pop_front();
        }
        Some((id, ps))
    }
}

/// Whether the 4 KiB source page at `offset` is served in a 4 KiB region
/// of `layout`.
pub(super) fn in_small_region(layout: &Layout, offset: u64) -> bool {
    layout.regions.iter().any(|r| {
        r.region.page_size == PageSize::Base4K
            && (r.region.source_offset..r.region.source_offset + r.region.len).contains(&offset)
    })
}
