//! Working sets against the live kernel: recording what a guest touches,
//! prefetching it on the next restore, and fault-around that follows the
//! guest. Every byte that reaches memory is checked against its source.
//! Needs userfaultfd (root here); skips with a message otherwise, unless
//! PAGEWIRE_REQUIRE_KVM=1, where a skip is a failure.

use std::collections::HashSet;

use pager::*;
use uffd::Features;

mod common;
use common::*;

/// A seeded shuffle of `pages` (xorshift; the seed is printed).
fn shuffled(mut pages: Vec<usize>, seed: u64) -> Vec<usize> {
    let mut x = seed | 1;
    for i in (1..pages.len()).rev() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        pages.swap(i, (x % (i as u64 + 1)) as usize);
    }
    pages
}

fn seed() -> u64 {
    let seed = std::env::var("PAGEWIRE_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(7, |d| d.as_nanos() as u64)
        });
    eprintln!("seed {seed}; repeat with PAGEWIRE_TEST_SEED={seed}");
    seed
}

/// Recording only: no readahead (a stream's pages are recorded as inferred,
/// which would make the comparison inexact).
fn recording() -> SessionConfig {
    SessionConfig {
        record: Some(RecordConfig::default()),
        max_readahead_pages: 0,
        ..SessionConfig::default()
    }
}

fn prefetching(offsets: Vec<u64>) -> SessionConfig {
    SessionConfig {
        prefetch: Some(PrefetchSet::new(offsets)),
        ..SessionConfig::default()
    }
}

fn offsets(rec: &Recording) -> Vec<u64> {
    rec.touches.iter().map(|t| t.offset).collect()
}

#[test]
fn a_recording_replayed_gives_the_same_bytes_with_faults_only_on_samples() {
    let pages = 4096;
    let seed = seed();
    // A quarter of memory, in a random order.
    let set = shuffled((0..pages).filter(|p| p % 4 == 1).collect(), seed);
    let Some(s) = setup(pages, recording(), Features::THREAD_ID) else {
        return;
    };
    s.mem.touch(set.clone(), 1, PAGE);
    s.handle.end_recording();
    let rec = s.handle.recording().expect("a recording");
    // Exactly the pages touched, in the order they were first touched, with
    // the faulting thread.
    let got: Vec<usize> = rec
        .touches
        .iter()
        .map(|t| t.offset as usize / PAGE)
        .collect();
    assert_eq!(got, set, "recorded pages and order");
    assert!(rec.touches.iter().all(|t| t.thread != 0), "thread ids");
    assert!(
        rec.touches.windows(2).all(|w| w[0].t_us <= w[1].t_us),
        "first-touch times in order"
    );
    assert_eq!(rec.inferred, 0);
    assert_same(&s.mem.read_all(), &s.data, "while recording");
    drop(s);

    // Replayed: the set is mapped before the guest asks; only the samples
    // left out of prefetch fault.
    let Some(s) = setup(pages, prefetching(offsets(&rec)), Features::empty()) else {
        return;
    };
    let st = settle(&s.handle, |st| st.prefetch_done_ms.is_some());
    assert!(
        st.prefetch_done_ms.is_some(),
        "prefetch never finished: {st:?}"
    );
    s.mem.touch(set.clone(), 1, PAGE);
    // Counters are updated just after the ioctl that wakes the thread.
    let st = settle(&s.handle, |st| {
        st.pages_copied + st.pages_zeroed >= set.len() as u64
    });
    assert_eq!(
        st.pages_prefetched + st.prefetch_samples,
        set.len() as u64,
        "{st:?}"
    );
    assert_eq!(st.faults, st.prefetch_samples, "{st:?}");
    assert_eq!(st.prefetch_sample_hits, st.prefetch_samples, "{st:?}");
    assert_eq!(st.faults_outside_set, 0, "{st:?}");
    // Nothing but the set (and the samples' own pages) was mapped.
    assert_eq!(
        st.pages_copied + st.pages_zeroed,
        set.len() as u64,
        "{st:?}"
    );
    assert_same(&s.mem.read_all(), &s.data, "replayed");
}

#[test]
fn a_guest_that_changed_is_served_correctly() {
    let pages = 2048;
    let seed = seed();
    // Recorded: the first half of memory, every other page. Now the guest
    // touches every third page of all of it.
    let recorded: Vec<u64> = (0..pages / 2)
        .filter(|p| p % 2 == 0)
        .map(|p| (p * PAGE) as u64)
        .collect();
    let Some(s) = setup(pages, prefetching(recorded), Features::empty()) else {
        return;
    };
    let now = shuffled((0..pages).filter(|p| p % 3 == 0).collect(), seed);
    s.mem.touch(now, 2, PAGE);
    assert_same(&s.mem.read_all(), &s.data, "changed guest");
    let st = s.handle.stats();
    assert!(st.faults_outside_set > 0, "{st:?}");
    assert!(st.pages_prefetched > 0, "{st:?}");
}

#[test]
fn a_recording_window_leaves_out_what_comes_after() {
    let pages = 512;
    let Some(s) = setup(pages, recording(), Features::empty()) else {
        return;
    };
    s.mem.touch(vec![7, 3, 100], 1, PAGE);
    s.handle.end_recording();
    s.mem.touch(vec![200, 300], 1, PAGE);
    let rec = s.handle.recording().expect("a recording");
    let got: Vec<u64> = offsets(&rec).iter().map(|o| o / PAGE as u64).collect();
    assert_eq!(got, [7, 3, 100]);
    // After the window, fault-around maps around faults again.
    assert!(s.handle.stats().pages_fault_around > 0);
    assert_same(&s.mem.read_all(), &s.data, "after the window");
}

#[test]
fn a_fast_recording_keeps_fault_around_and_says_what_it_inferred() {
    let pages = 256;
    let config = SessionConfig {
        record: Some(RecordConfig {
            window: None,
            exact: false,
        }),
        cluster_pages: 8,
        adaptive_cluster: false,
        max_readahead_pages: 0,
        ..SessionConfig::default()
    };
    let Some(s) = setup(pages, config, Features::empty()) else {
        return;
    };
    s.mem.touch(vec![10], 1, PAGE);
    let st = settle(&s.handle, |st| st.pages_copied + st.pages_zeroed == 8);
    assert_eq!(st.pages_fault_around, 7, "{st:?}");
    let rec = s.handle.recording().expect("a recording");
    let got: HashSet<u64> = offsets(&rec).iter().map(|o| o / PAGE as u64).collect();
    // Page 8 is zero (`content`): mapped as a zero page, not recorded. Page
    // 13 is zero too, but copied along with the data around it.
    assert_eq!(got, (9..16).collect::<HashSet<u64>>());
    assert_eq!(rec.touches[0].offset, 10 * PAGE as u64, "the fault first");
    assert_eq!(rec.inferred, 6);
}

#[test]
fn fault_around_shrinks_for_sparse_access_and_grows_for_dense_runs() {
    let pages = 16384;
    let seed = seed();
    let no_streams = SessionConfig {
        max_readahead_pages: 0,
        ..SessionConfig::default()
    };
    // Sparse: one page in ten, anywhere.
    let sparse = shuffled((0..pages).filter(|p| p % 10 == 0).collect(), seed);
    let Some(s) = setup(pages, no_streams.clone(), Features::empty()) else {
        return;
    };
    s.mem.touch(sparse.clone(), 1, PAGE);
    let st = s.handle.stats();
    assert_eq!(s.handle.fault_around_window(s.mem.addr), Some(1), "{st:?}");
    // Mapped at most three times what was touched, while the window was
    // learned from a start of 32 pages (docs/architecture.md).
    let mapped = st.pages_copied + st.pages_zeroed;
    assert!(mapped <= 3 * sparse.len() as u64, "{mapped} mapped: {st:?}");
    assert_same(&s.mem.read_all(), &s.data, "sparse");
    drop(s);

    // Dense runs: 256-page runs at random places, each read in order.
    let runs = shuffled((0..pages / 256).collect(), seed ^ 1);
    let dense: Vec<usize> = runs
        .iter()
        .take(32)
        .flat_map(|r| r * 256..(r + 1) * 256)
        .collect();
    let Some(s) = setup(pages, no_streams, Features::empty()) else {
        return;
    };
    s.mem.touch(dense.clone(), 1, PAGE);
    let st = s.handle.stats();
    let window = s.handle.fault_around_window(s.mem.addr).unwrap_or(0);
    assert!(window > DEFAULT_CLUSTER_PAGES, "window {window}: {st:?}");
    assert!(
        st.faults < dense.len() as u64 / DEFAULT_CLUSTER_PAGES as u64,
        "{st:?}"
    );
    assert_same(&s.mem.read_all(), &s.data, "dense");
}

#[test]
fn prefetch_of_a_huge_page_region() {
    let Some(mut hp) = HugeSetup::new(4, |data| data) else {
        return;
    };
    let huge = 2 << 20;
    // Pages 1 and 3 of the region, named by 4 KiB offsets inside them.
    let set = vec![
        (huge + 5 * PAGE) as u64,
        (3 * huge) as u64,
        (huge + 9 * PAGE) as u64,
    ];
    let h = hp.add(prefetching(set));
    let st = settle(&h, |st| st.prefetch_done_ms.is_some());
    assert_eq!(st.pages_prefetched, 2, "{st:?}");
    assert_eq!(
        h.page_state(hp.mem.addr + huge as u64),
        Some(PageState::Present)
    );
    assert_eq!(h.page_state(hp.mem.addr), Some(PageState::Missing));
    assert_same(&hp.mem.read_all(), &hp.data, "2 MiB pages");
    let st = h.stats();
    assert_eq!(st.faults, 2, "pages 0 and 2 fault: {st:?}");
}

#[test]
fn a_huge_page_is_recorded_whole() {
    let Some(mut hp) = HugeSetup::new(4, |data| data) else {
        return;
    };
    let h = hp.add(SessionConfig {
        record: Some(RecordConfig::default()),
        ..SessionConfig::default()
    });
    let huge = 2 << 20;
    hp.mem.touch(vec![3, 1], 1, huge);
    h.end_recording();
    let rec = h.recording().expect("a recording");
    // Every 4 KiB page of both, the later-touched page's after the other's.
    let pages: Vec<u64> = offsets(&rec).iter().map(|o| o / PAGE as u64).collect();
    let want: Vec<u64> = (3 * 512..4 * 512).chain(512..2 * 512).collect();
    assert_eq!(pages, want);
    assert_same(&hp.mem.read_all(), &hp.data, "2 MiB pages");
}
