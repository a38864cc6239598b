//! Merging recordings of one snapshot, and how much they agree.

use std::collections::{HashMap, HashSet};

use crate::{Touch, WorkingSet, WorksetError};

/// How much the page sets of several working sets agree.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize)]
pub struct Similarity {
    /// The working sets compared (each may itself be a merge of several runs).
    pub runs: u32,
    /// Pages in any of them.
    pub union_pages: u64,
    /// Pages in all of them.
    pub common_pages: u64,
    /// The mean of the pairwise Jaccard indices |A∩B| / |A∪B| (1 with fewer than two sets).
    pub mean_jaccard: f64,
    /// The smallest pairwise Jaccard index (1 with fewer than two sets).
    pub min_jaccard: f64,
}

/// What one page looks like across the inputs of a merge.
struct Acc {
    /// Its first-touch time in each input it appears in.
    times: Vec<u64>,
    /// The earliest touch: (t_us, thread).
    earliest: (u64, u32),
    /// Runs that saw it, summed over the inputs.
    seen: u64,
}

/// Merges working sets of the same snapshot into one.
///
/// A page is kept if the runs that saw it (`seen`, summed over the inputs)
/// number at least `min_runs`; its `t_us` is the lower median of its
/// first-touch times in the inputs it appears in, its thread the earliest
/// touch's. The result has `runs` = the inputs' runs summed, `window_ms` =
/// the longest input window, and is ordered by (median `t_us`, page).
/// Errors: no inputs, an invalid input, inputs of different snapshots,
/// `min_runs` 0 or more than the total runs.
pub fn merge(sets: &[WorkingSet], min_runs: u32) -> Result<WorkingSet, WorksetError> {
    let fail = |what: String| Err(WorksetError::Merge { what });
    let Some(first) = sets.first() else {
        return fail("no working sets".into());
    };
    for (i, ws) in sets.iter().enumerate() {
        if let Err(e) = ws.validate() {
            return fail(format!("input {i}: {e}"));
        }
        if ws.snapshot != first.snapshot {
            return fail(format!(
                "input 0 was recorded on a snapshot of {} bytes (fingerprint {}), input {i} on one of {} bytes (fingerprint {})",
                first.snapshot.len,
                first.snapshot.short(),
                ws.snapshot.len,
                ws.snapshot.short()
            ));
        }
    }
    let total: u64 = sets.iter().map(|ws| u64::from(ws.runs)).sum();
    let Ok(runs) = u32::try_from(total) else {
        return fail(format!(
            "{total} runs in all, more than a working set counts"
        ));
    };
    if min_runs == 0 || min_runs > runs {
        return fail(format!(
            "a page must be seen in 1 to {runs} runs, not {min_runs}"
        ));
    }

    let mut pages: HashMap<u64, Acc> = HashMap::new();
    for ws in sets {
        for t in &ws.touches {
            let acc = pages.entry(t.page).or_insert(Acc {
                times: Vec::new(),
                earliest: (t.t_us, t.thread),
                seen: 0,
            });
            acc.times.push(t.t_us);
            if t.t_us < acc.earliest.0 {
                acc.earliest = (t.t_us, t.thread);
            }
            acc.seen += u64::from(t.seen);
        }
    }
    let mut touches: Vec<Touch> = pages
        .into_iter()
        .filter(|(_, acc)| acc.seen >= u64::from(min_runs))
        .map(|(page, mut acc)| {
            acc.times.sort_unstable();
            Touch {
                page,
                t_us: acc.times[(acc.times.len() - 1) / 2],
                thread: acc.earliest.1,
                // At most the total runs, which fits in u32.
                seen: acc.seen as u32,
            }
        })
        .collect();
    touches.sort_unstable_by_key(|t| (t.t_us, t.page));
    Ok(WorkingSet {
        snapshot: first.snapshot,
        runs,
        window_ms: sets.iter().map(|ws| ws.window_ms).max().unwrap_or(0),
        touches,
    })
}

/// Compares the page sets of working sets, pairwise.
pub fn similarity(sets: &[WorkingSet]) -> Similarity {
    let page_sets: Vec<HashSet<u64>> = sets
        .iter()
        .map(|ws| ws.touches.iter().map(|t| t.page).collect())
        .collect();
    let union: HashSet<u64> = page_sets.iter().flatten().copied().collect();
    let common = match page_sets.split_first() {
        Some((first, rest)) => first
            .iter()
            .filter(|p| rest.iter().all(|s| s.contains(p)))
            .count(),
        None => 0,
    };
    let (mut sum, mut min, mut pairs) = (0.0, 1.0f64, 0u64);
    for (i, a) in page_sets.iter().enumerate() {
        for b in &page_sets[i + 1..] {
            let inter = a.intersection(b).count();
            let uni = a.len() + b.len() - inter;
            let j = if uni == 0 {
                1.0
            } else {
                inter as f64 / uni as f64
            };
            sum += j;
            min = min.min(j);
            pairs += 1;
        }
    }
    Similarity {
        runs: u32::try_from(sets.len()).unwrap_or(u32::MAX),
        union_pages: union.len() as u64,
        common_pages: common as u64,
        mean_jaccard: if pairs == 0 { 1.0 } else { sum / pairs as f64 },
        min_jaccard: min,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SnapshotId;

    const SNAP: SnapshotId = SnapshotId {
        len: 100 * crate::PAGE,
        fingerprint: [3; 32],
    };

    /// A recording from (page, t_us, thread) in first-touch order.
    fn rec(touches: &[(u64, u64, u32)]) -> WorkingSet {
        WorkingSet {
            snapshot: SNAP,
            runs: 1,
            window_ms: 1000,
            touches: touches
                .iter()
                .map(|&(page, t_us, thread)| Touch {
                    page,
                    t_us,
                    thread,
                    seen: 1,
                })
                .collect(),
        }
    }

    fn runs() -> Vec<WorkingSet> {
        vec![
            rec(&[(10, 0, 1), (11, 100, 1), (12, 200, 2), (40, 250, 2)]),
            rec(&[(11, 50, 3), (10, 300, 3), (12, 400, 3), (41, 450, 3)]),
            rec(&[(12, 10, 4), (10, 20, 4), (11, 500, 4), (42, 600, 4)]),
        ]
    }

    #[test]
    fn merge_keeps_majority_pages_at_median_time() {
        let merged = merge(&runs(), 2).expect("merge");
        assert_eq!(merged.runs, 3);
        merged.validate().expect("a valid set");
        // Pages 40, 41, 42 were seen in one run each: dropped.
        // 10: times 0, 300, 20 → median 20, earliest thread 1
        // 11: 100, 50, 500 → 100, earliest (50) thread 3
        // 12: 200, 400, 10 → 200, earliest (10) thread 4
        let expect = [(10, 20, 1, 3), (11, 100, 3, 3), (12, 200, 4, 3)];
        let got: Vec<_> = merged
            .touches
            .iter()
            .map(|t| (t.page, t.t_us, t.thread, t.seen))
            .collect();
        assert_eq!(got, expect);
        // All of them with k = 1, in median-time order.
        let all = merge(&runs(), 1).expect("merge");
        let order: Vec<u64> = all.touches.iter().map(|t| t.page).collect();
        assert_eq!(order, [10, 11, 12, 40, 41, 42]);
        assert_eq!(merge(&runs(), 3).expect("merge").pages(), 3);
    }

    #[test]
    fn merge_orders_by_median_then_page_and_takes_lower_median() {
        let a = rec(&[(5, 100, 1), (6, 100, 1)]);
        let b = rec(&[(6, 100, 2), (5, 300, 2)]);
        let merged = merge(&[a, b], 2).expect("merge");
        // Even counts: lower median. 5: {100, 300} → 100; 6: {100, 100} → 100; ties by page.
        let got: Vec<_> = merged.touches.iter().map(|t| (t.page, t.t_us)).collect();
        assert_eq!(got, [(5, 100), (6, 100)]);
    }

    #[test]
    fn merge_of_merges_sums_runs_and_seen() {
        let rs = runs();
        let first_two = merge(&rs[..2], 1).expect("merge");
        assert_eq!(first_two.runs, 2);
        let all = merge(&[first_two, rs[2].clone()], 2).expect("merge");
        assert_eq!(all.runs, 3);
        // The medians are over the inputs, not the runs inside them:
        // 10: {0, 20} → 0; 11: {50, 500} → 50; 12: {200, 10} → 10.
        let got: Vec<_> = all.touches.iter().map(|t| (t.page, t.t_us)).collect();
        assert_eq!(got, [(10, 0), (12, 10), (11, 50)]);
        assert!(all.touches.iter().all(|t| t.seen == 3));
    }

    #[test]
    fn merge_refuses_bad_inputs() {
        let mut other = rec(&[(1, 0, 0)]);
        other.snapshot.len *= 2;
        let err = merge(&[rec(&[]), other], 1).unwrap_err();
        assert!(matches!(err, WorksetError::Merge { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("409600 bytes") && msg.contains("819200 bytes"),
            "{msg}"
        );
        assert!(merge(&[], 1).is_err());
        assert!(merge(&runs(), 0).is_err());
        assert!(merge(&runs(), 4).is_err());
        let dup = rec(&[(1, 0, 0), (1, 5, 0)]);
        assert!(merge(&[dup], 1).is_err());
    }

    #[test]
    fn similarity_of_runs() {
        let s = similarity(&runs());
        assert_eq!(s.runs, 3);
        assert_eq!(s.union_pages, 6);
        assert_eq!(s.common_pages, 3);
        // Every pair shares 3 of 5 pages.
        assert!((s.mean_jaccard - 0.6).abs() < 1e-9);
        assert!((s.min_jaccard - 0.6).abs() < 1e-9);
        let one = similarity(&runs()[..1]);
        assert_eq!((one.mean_jaccard, one.common_pages), (1.0, 4));
    }
}
