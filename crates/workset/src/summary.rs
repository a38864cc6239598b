//! A working set in a few numbers.

use std::collections::{BTreeMap, HashSet};

use crate::WorkingSet;

/// What `pagewire ws inspect` shows. Times are 0 for an empty working set.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Summary {
    /// Pages in the working set.
    pub pages: u64,
    /// Their bytes.
    pub bytes: u64,
    /// `bytes` / the snapshot's length (0 for an empty snapshot).
    pub share_of_snapshot: f64,
    /// Recordings merged into it.
    pub runs: u32,
    /// The recording window in milliseconds (0: ended by the operator or the session end).
    pub window_ms: u64,
    /// The snapshot's length in bytes.
    pub snapshot_len: u64,
    /// The snapshot's fingerprint, first 8 bytes in hex.
    pub snapshot_fingerprint: String,
    /// The earliest first touch.
    pub first_t_us: u64,
    /// The latest first touch.
    pub last_t_us: u64,
    /// When half the pages had been touched.
    pub p50_t_us: u64,
    /// When 90% of the pages had been touched.
    pub p90_t_us: u64,
    /// Runs of consecutive pages, with the pages sorted by offset.
    pub contiguous_runs: u64,
    /// Their mean length in pages.
    pub mean_run_pages: f64,
    /// Distinct faulting threads (0, unknown, not counted).
    pub threads: u64,
    /// (seen in this many runs, pages), ascending.
    pub pages_by_seen: Vec<(u32, u64)>,
}

impl WorkingSet {
    /// The working set in a few numbers.
    pub fn summary(&self) -> Summary {
        let mut times: Vec<u64> = self.touches.iter().map(|t| t.t_us).collect();
        times.sort_unstable();
        // The time by which `pct` percent of the pages had been touched.
        let at = |pct: usize| match times.len() {
            0 => 0,
            n => times[(n * pct).div_ceil(100).max(1) - 1],
        };
        let mut pages: Vec<u64> = self.touches.iter().map(|t| t.page).collect();
        pages.sort_unstable();
        pages.dedup();
        let contiguous_runs = pages
            .iter()
            .enumerate()
            .filter(|&(i, &p)| i == 0 || pages[i - 1] + 1 != p)
            .count() as u64;
        let mut by_seen = BTreeMap::new();
        for t in &self.touches {
            *by_seen.entry(t.seen).or_insert(0u64) += 1;
        }
        Summary {
            pages: self.pages(),
            bytes: self.bytes(),
            share_of_snapshot: if self.snapshot.len == 0 {
                0.0
            } else {
                self.bytes() as f64 / self.snapshot.len as f64
            },
            runs: self.runs,
            window_ms: self.window_ms,
            snapshot_len: self.snapshot.len,
            snapshot_fingerprint: self.snapshot.short(),
            first_t_us: times.first().copied().unwrap_or(0),
            last_t_us: times.last().copied().unwrap_or(0),
            p50_t_us: at(50),
            p90_t_us: at(90),
            contiguous_runs,
            mean_run_pages: if contiguous_runs == 0 {
                0.0
            } else {
                pages.len() as f64 / contiguous_runs as f64
            },
            threads: self
                .touches
                .iter()
                .filter(|t| t.thread != 0)
                .map(|t| t.thread)
                .collect::<HashSet<_>>()
                .len() as u64,
            pages_by_seen: by_seen.into_iter().collect(),
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::{SnapshotId, Touch, WorkingSet, PAGE};

    #[test]
    fn summary_numbers() {
        // Pages 0-3, 10-11 and 20: 7 pages in three contiguous runs, touched at 0, 10, .. 60 µs.
        let pages = [3, 0, 1, 20, 2, 10, 11];
        let ws = WorkingSet {
            snapshot: SnapshotId {
                len: 70 * PAGE,
                fingerprint: [0xab; 32],
            },
            runs: 2,
            window_ms: 0,
            touches: pages
                .iter()
                .enumerate()
                .map(|(i, &page)| Touch {
                    page,
                    t_us: i as u64 * 10,
                    thread: (i % 3) as u32,
                    seen: 1 + (i % 2) as u32,
                })
                .collect(),
        };
        let s = ws.summary();
        assert_eq!((s.pages, s.bytes), (7, 7 * PAGE));
        assert!((s.share_of_snapshot - 0.1).abs() < 1e-9);
        assert_eq!((s.first_t_us, s.last_t_us), (0, 60));
        assert_eq!((s.p50_t_us, s.p90_t_us), (30, 60)); // 4th and 7th of 7
        assert_eq!(s.contiguous_runs, 3);
        assert!((s.mean_run_pages - 7.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.threads, 2);
        assert_eq!(s.pages_by_seen, [(1, 4), (2, 3)]);
        assert_eq!(s.snapshot_fingerprint, "abababababababab");

        let empty = WorkingSet {
            touches: vec![],
            ..ws
        }
        .summary();
        assert_eq!(
            (empty.pages, empty.p90_t_us, empty.contiguous_runs),
            (0, 0, 0)
        );
    }
}
