//! Per-session statistics: counters, and a first-touch latency histogram.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// Live counters, updated by serving threads without locks (the histogram
/// takes a short lock once per served fault).
#[derive(Debug)]
pub struct Stats {
    pub faults: AtomicU64,
    pub faults_already_served: AtomicU64,
    pub pages_copied: AtomicU64,
    pub pages_zeroed: AtomicU64,
    pub pages_discarded: AtomicU64,
    pub pages_poisoned: AtomicU64,
    pub bytes_copied: AtomicU64,
    pub pages_on_demand: AtomicU64,
    pub pages_fault_around: AtomicU64,
    pub pages_background: AtomicU64,
    pub retries: AtomicU64,
    pub errors: AtomicU64,
    pub events_remove: AtomicU64,
    pub events_unmap: AtomicU64,
    pub events_remap: AtomicU64,
    pub events_fork: AtomicU64,
    pub faults_undeclared: AtomicU64,
    pub faults_other_mode: AtomicU64,
    pub deferrals: AtomicU64,
    pub source_waits: AtomicU64,
    pub pages_untrusted: AtomicU64,
    pub pages_prefetched: AtomicU64,
    pub prefetch_samples: AtomicU64,
    pub prefetch_sample_hits: AtomicU64,
    pub faults_outside_set: AtomicU64,
    pub prefetch_done_us: AtomicU64,
    pub pages_readahead: AtomicU64,
    /// Sum of first-touch latencies: how long the session's threads waited
    /// on missing pages, from the fault being read to its page mapped.
    pub blocktime_ns: AtomicU64,
    /// The latency histogram, and blocktime per faulting thread when the
    /// kernel reports thread ids: one lock per served fault.
    latency: Mutex<(hdrhistogram::Histogram<u64>, HashMap<u32, u64>)>,
    timeline: Mutex<TimelineBuf>,
}

/// What mapped pages, for the timeline.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Cause {
    /// A fault message (not a page).
    Fault,
    OnDemand,
    FaultAround,
    Readahead,
    Background,
    Prefetch,
}

/// Most buckets a timeline keeps: past it, neighbours merge and the bucket
/// doubles, so a session of any length costs at most this much.
const TIMELINE_BUCKETS: usize = 512;

#[derive(Debug)]
struct TimelineBuf {
    started: Instant,
    bucket_us: u64,
    /// Per bucket: faults, on demand, fault-around, readahead, background,
    /// prefetch.
    counts: Vec<[u64; 6]>,
}

impl TimelineBuf {
    fn add(&mut self, us: u64, cause: Cause, n: u64) {
        let mut i = (us / self.bucket_us) as usize;
        while i >= TIMELINE_BUCKETS {
            let merged: Vec<[u64; 6]> = self
                .counts
                .chunks(2)
                .map(|c| {
                    let mut m = c[0];
                    if let Some(b) = c.get(1) {
                        for k in 0..6 {
                            m[k] += b[k];
                        }
                    }
                    m
                })
                .collect();
            self.counts = merged;
            self.bucket_us *= 2;
            i = (us / self.bucket_us) as usize;
        }
        if self.counts.len() <= i {
            self.counts.resize(i + 1, [0; 6]);
        }
        self.counts[i][cause as usize] += n;
    }
}

impl Default for Stats {
    fn default() -> Self {
        Stats {
            faults: AtomicU64::new(0),
            faults_already_served: AtomicU64::new(0),
            pages_copied: AtomicU64::new(0),
            pages_zeroed: AtomicU64::new(0),
            pages_discarded: AtomicU64::new(0),
            pages_poisoned: AtomicU64::new(0),
            bytes_copied: AtomicU64::new(0),
            pages_on_demand: AtomicU64::new(0),
            pages_fault_around: AtomicU64::new(0),
            pages_background: AtomicU64::new(0),
            retries: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            events_remove: AtomicU64::new(0),
            events_unmap: AtomicU64::new(0),
            events_remap: AtomicU64::new(0),
            events_fork: AtomicU64::new(0),
            faults_undeclared: AtomicU64::new(0),
            faults_other_mode: AtomicU64::new(0),
            deferrals: AtomicU64::new(0),
            source_waits: AtomicU64::new(0),
            pages_untrusted: AtomicU64::new(0),
            pages_prefetched: AtomicU64::new(0),
            prefetch_samples: AtomicU64::new(0),
            prefetch_sample_hits: AtomicU64::new(0),
            faults_outside_set: AtomicU64::new(0),
            prefetch_done_us: AtomicU64::new(0),
            pages_readahead: AtomicU64::new(0),
            blocktime_ns: AtomicU64::new(0),
            latency: Mutex::new((latency_histogram(), HashMap::new())),
            timeline: Mutex::new(TimelineBuf {
                started: Instant::now(),
                // 1 ms: a restore's first milliseconds are what matter; a
                // long session's buckets grow as it goes.
                bucket_us: 1000,
                counts: Vec::with_capacity(TIMELINE_BUCKETS),
            }),
        }
    }
}

/// 1 ns to 100 s at 3 significant digits (values above are clamped).
fn latency_histogram() -> hdrhistogram::Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts (low >= 1,
    // high >= 2 * low, sigfig <= 5): construction cannot fail.
    #[allow(clippy::expect_used)]
    hdrhistogram::Histogram::new_with_bounds(1, 100_000_000_000, 3)
        .expect("constant histogram bounds are valid")
}

impl Stats {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Relaxed);
    }

    /// Records the time from reading a fault to its page being mapped, for
    /// the faulting thread (0: unknown).
    pub(crate) fn record_latency(&self, d: Duration, thread: u32) {
        let ns = (d.as_nanos() as u64).max(1);
        self.blocktime_ns.fetch_add(ns, Relaxed);
        if let Ok(mut l) = self.latency.lock() {
            l.0.saturating_record(ns);
            if thread != 0 {
                // Bounded: a process has finitely many threads, and a
                // session ends with its process.
                *l.1.entry(thread).or_insert(0) += ns;
            }
        }
    }

    /// Counts each `(cause, n)` in the timeline (zeros skipped), under one
    /// lock.
    pub(crate) fn timeline(&self, counts: &[(Cause, u64)]) {
        if counts.iter().all(|&(_, n)| n == 0) {
            return;
        }
        if let Ok(mut t) = self.timeline.lock() {
            let us = t.started.elapsed().as_micros() as u64;
            for &(cause, n) in counts {
                if n > 0 {
                    t.add(us, cause, n);
                }
            }
        }
    }

    pub fn snapshot(&self) -> StatsSnapshot {
        let mut s = self.counters();
        if let Some(rate) = s.prefetch_hit_rate() {
            let hits = (s.pages_prefetched as f64 * rate).round() as u64;
            s.prefetch_hits_est = Some(hits);
            s.prefetch_waste_est = Some(s.pages_prefetched.saturating_sub(hits));
        }
        s
    }

    fn counters(&self) -> StatsSnapshot {
        let g = |c: &AtomicU64| c.load(Relaxed);
        let (latency, mut by_thread) = self
            .latency
            .lock()
            .map(|l| {
                let by_thread: Vec<ThreadBlocktime> =
                    l.1.iter()
                        .map(|(&tid, &ns)| ThreadBlocktime { tid, us: ns / 1000 })
                        .collect();
                (LatencySummary::of(&l.0), by_thread)
            })
            .unwrap_or_default();
        by_thread.sort_by_key(|t| t.tid);
        let timeline = self
            .timeline
            .lock()
            .map(|t| Timeline::of(&t))
            .unwrap_or_default();
        StatsSnapshot {
            faults: g(&self.faults),
            faults_already_served: g(&self.faults_already_served),
            pages_copied: g(&self.pages_copied),
            pages_zeroed: g(&self.pages_zeroed),
            pages_discarded: g(&self.pages_discarded),
            pages_poisoned: g(&self.pages_poisoned),
            bytes_copied: g(&self.bytes_copied),
            pages_on_demand: g(&self.pages_on_demand),
            pages_fault_around: g(&self.pages_fault_around),
            pages_background: g(&self.pages_background),
            retries: g(&self.retries),
            errors: g(&self.errors),
            events_remove: g(&self.events_remove),
            events_unmap: g(&self.events_unmap),
            events_remap: g(&self.events_remap),
            events_fork: g(&self.events_fork),
            faults_undeclared: g(&self.faults_undeclared),
            faults_other_mode: g(&self.faults_other_mode),
            deferrals: g(&self.deferrals),
            source_waits: g(&self.source_waits),
            pages_untrusted: g(&self.pages_untrusted),
            pages_prefetched: g(&self.pages_prefetched),
            prefetch_samples: g(&self.prefetch_samples),
            prefetch_sample_hits: g(&self.prefetch_sample_hits),
            faults_outside_set: g(&self.faults_outside_set),
            prefetch_done_ms: match g(&self.prefetch_done_us) {
                0 => None,
                us => Some(us as f64 / 1000.0),
            },
            prefetch_hits_est: None,
            prefetch_waste_est: None,
            pages_unasked: g(&self.pages_fault_around)
                + g(&self.pages_readahead)
                + g(&self.pages_background)
                + g(&self.pages_prefetched),
            pages_readahead: g(&self.pages_readahead),
            blocktime_us: g(&self.blocktime_ns) / 1000,
            blocktime_by_thread: by_thread,
            first_touch_latency: latency,
            timeline,
        }
    }
}

/// A copy of the counters at one moment.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct StatsSnapshot {
    /// Page-fault messages read.
    pub faults: u64,
    /// Fault messages for pages already mapped or being mapped: dropped when
    /// in flight (the owner wakes the thread), mapped again as zero when the
    /// kernel says the page is gone (a discard raced the mapping), woken
    /// when it is there.
    pub faults_already_served: u64,
    /// Pages mapped with UFFDIO_COPY.
    pub pages_copied: u64,
    /// Pages mapped as zero (UFFDIO_ZEROPAGE, or a copy of zeros on hugetlbfs).
    pub pages_zeroed: u64,
    /// Pages discarded by REMOVE events (balloon, MADV_DONTNEED).
    pub pages_discarded: u64,
    /// Pages poisoned because their data could not be read or mapped, or
    /// because they lie outside every declared region.
    pub pages_poisoned: u64,
    pub bytes_copied: u64,
    /// Pages served because a thread faulted on them.
    pub pages_on_demand: u64,
    /// Pages served around a fault (its fault-around block).
    pub pages_fault_around: u64,
    /// Pages mapped ahead of a sequential stream.
    pub pages_readahead: u64,
    /// Pages served by background population.
    pub pages_background: u64,
    /// Resolving ioctls retried after EAGAIN (queued events).
    pub retries: u64,
    pub errors: u64,
    pub events_remove: u64,
    pub events_unmap: u64,
    pub events_remap: u64,
    pub events_fork: u64,
    /// Faults on memory outside every declared region (poisoned).
    pub faults_undeclared: u64,
    /// Faults of a kind the protocol does not use (write-protect, minor):
    /// the peer registered its memory in another mode.
    pub faults_other_mode: u64,
    /// Times work met EAGAIN for longer than a few retries and was put
    /// aside for later instead of keeping a serving thread waiting.
    pub deferrals: u64,
    /// Times work waited for a slow source (a remote store) to fetch its
    /// bytes: a fault's thread waited, no serving thread did.
    pub source_waits: u64,
    /// Pages poisoned because the source could not vouch for their bytes
    /// (a chunk failed its checksum, a fetch failed for good); also in
    /// `pages_poisoned`.
    pub pages_untrusted: u64,
    /// Pages of a recorded working set mapped before a fault asked for them.
    pub pages_prefetched: u64,
    /// Pages of the set left out of prefetch as samples (one in 64): a
    /// fault on one is a hit; one never faulted is waste.
    pub prefetch_samples: u64,
    /// Samples the guest touched (faulted on).
    pub prefetch_sample_hits: u64,
    /// Faults on pages outside the prefetched set (the guest's behaviour
    /// changed since the recording, or the set was cut).
    pub faults_outside_set: u64,
    /// From the session's start until the whole set was mapped.
    pub prefetch_done_ms: Option<f64>,
    /// Prefetched pages the guest touched, and those it did not (so far),
    /// estimated from the samples' faults (`None` without samples).
    pub prefetch_hits_est: Option<u64>,
    pub prefetch_waste_est: Option<u64>,
    /// Pages mapped without a fault asking for them: fault-around,
    /// readahead, background population and prefetch. What a guest may pay
    /// in memory for pages it never touches.
    pub pages_unasked: u64,
    /// How long the session's threads waited on missing pages: the sum of
    /// first-touch latencies (from the fault message being read to its page
    /// mapped; the time before the read is not seen), as QEMU's post-copy
    /// blocktime. Microseconds.
    pub blocktime_us: u64,
    /// The same per faulting thread, when the peer's userfaultfd reports
    /// thread ids (UFFD_FEATURE_THREAD_ID; Firecracker's does not).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub blocktime_by_thread: Vec<ThreadBlocktime>,
    /// From reading a fault message to the faulting page being mapped.
    pub first_touch_latency: LatencySummary,
    /// Faults and pages mapped over time, by cause.
    pub timeline: Timeline,
}

/// Blocktime of one thread.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct ThreadBlocktime {
    pub tid: u32,
    pub us: u64,
}

/// Faults and pages mapped per interval since the session started, by
/// cause: bucket `i` covers `[i * bucket_ms, (i + 1) * bucket_ms)`. Buckets
/// start at 1 ms and double (neighbours merged) whenever there would be
/// more than 512, so a long session stays small.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct Timeline {
    pub bucket_ms: f64,
    /// Fault messages read.
    pub faults: Vec<u64>,
    /// Pages mapped because a thread faulted on them.
    pub on_demand: Vec<u64>,
    pub fault_around: Vec<u64>,
    pub readahead: Vec<u64>,
    pub background: Vec<u64>,
    pub prefetch: Vec<u64>,
}

impl Timeline {
    fn of(t: &TimelineBuf) -> Timeline {
        let col = |k: usize| t.counts.iter().map(|c| c[k]).collect();
        Timeline {
            bucket_ms: t.bucket_us as f64 / 1000.0,
            faults: col(0),
            on_demand: col(1),
            fault_around: col(2),
            readahead: col(3),
            background: col(4),
            prefetch: col(5),
        }
    }
}

/// One bucket of the latency distribution: `count` values in
/// `(previous le_us, le_us]`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencyBucket {
    pub le_us: f64,
    pub count: u64,
}

/// Buckets of powers of two: 1 µs .. 2^27 µs (134 s, above the histogram's
/// 100 s ceiling).
const LATENCY_BUCKETS: u32 = 28;

/// Latency percentiles in microseconds.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct LatencySummary {
    pub count: u64,
    pub mean_us: f64,
    pub p50_us: f64,
    pub p90_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
    /// The whole distribution, non-cumulative, on power-of-two bounds (for
    /// Prometheus and `pagewire report`).
    #[serde(default)]
    pub buckets: Vec<LatencyBucket>,
}

/// The histogram's counts on power-of-two microsecond bounds; each
/// recorded value counted once (in the bucket of its highest equivalent
/// value).
fn log2_buckets(h: &hdrhistogram::Histogram<u64>) -> Vec<LatencyBucket> {
    let mut counts = vec![0u64; LATENCY_BUCKETS as usize];
    for v in h.iter_recorded() {
        let ns = v.value_iterated_to();
        let us = ns.div_ceil(1000).max(1);
        // The smallest k with 2^k >= us.
        let k = (64 - (us - 1).leading_zeros()).min(LATENCY_BUCKETS - 1);
        counts[k as usize] += v.count_at_value();
    }
    counts
        .into_iter()
        .enumerate()
        .map(|(k, count)| LatencyBucket {
            le_us: (1u64 << k) as f64,
            count,
        })
        .collect()
}

impl LatencySummary {
    fn of(h: &hdrhistogram::Histogram<u64>) -> LatencySummary {
        if h.is_empty() {
            return LatencySummary::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        LatencySummary {
            count: h.len(),
            mean_us: h.mean() / 1000.0,
            p50_us: us(h.value_at_quantile(0.5)),
            p90_us: us(h.value_at_quantile(0.9)),
            p99_us: us(h.value_at_quantile(0.99)),
            max_us: us(h.max()),
            buckets: log2_buckets(h),
        }
    }
}

impl StatsSnapshot {
    /// The share of prefetched pages the guest touched, estimated from the
    /// samples (`None` without samples).
    pub fn prefetch_hit_rate(&self) -> Option<f64> {
        (self.prefetch_samples > 0)
            .then(|| self.prefetch_sample_hits as f64 / self.prefetch_samples as f64)
    }
}
