//! Between the engine's recordings and prefetch sets and the working-set
//! files of the `workset` crate: a recording becomes a file tied to its
//! snapshot, and a file becomes a prefetch set only for that snapshot.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use pager::{PrefetchSet, Recording};
use workset::{SnapshotId, Touch, WorkingSet};

/// The identity of the memory file at `mem_file`.
pub fn snapshot_id(mem_file: &Path) -> anyhow::Result<SnapshotId> {
    let f = std::fs::File::open(mem_file)
        .with_context(|| format!("opening the memory file {}", mem_file.display()))?;
    SnapshotId::of_file(&f)
        .with_context(|| format!("fingerprinting the memory file {}", mem_file.display()))
}

/// A recording as a working set of `snapshot` (one run).
pub fn to_working_set(rec: &Recording, snapshot: SnapshotId) -> WorkingSet {
    let last_page = snapshot.len / workset::PAGE;
    let mut touches: Vec<Touch> = rec
        .touches
        .iter()
        .filter(|t| t.offset / workset::PAGE < last_page)
        .map(|t| Touch {
            page: t.offset / workset::PAGE,
            t_us: t.t_us,
            thread: t.thread,
            seen: 1,
        })
        .collect();
    // Serving threads record concurrently: order by time, ties as recorded.
    touches.sort_by_key(|t| t.t_us);
    WorkingSet {
        snapshot,
        runs: 1,
        window_ms: rec.window_ms,
        touches,
    }
}

/// Writes `rec` as a working set of `snapshot` to `out`.
pub fn save(rec: &Recording, snapshot: SnapshotId, out: &Path) -> anyhow::Result<WorkingSet> {
    let set = to_working_set(rec, snapshot);
    set.write(out)
        .with_context(|| format!("writing the working set {}", out.display()))?;
    Ok(set)
}

/// The recording `serve --record` wrote into `dir` (the first one found).
pub fn find_recording(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(testbed::find_recording(dir)?)
}

/// Reads the working set at `path` for the snapshot `snapshot` (refused,
/// with a clear error, if it was recorded on another one).
pub fn load(path: &Path, snapshot: &SnapshotId) -> anyhow::Result<(PrefetchSet, WorkingSet)> {
    let set = WorkingSet::read(path)
        .with_context(|| format!("reading the working set {}", path.display()))?;
    set.check_snapshot(snapshot)
        .with_context(|| format!("working set {}", path.display()))?;
    let offsets = set.touches.iter().map(|t| t.page * workset::PAGE).collect();
    Ok((PrefetchSet::new(offsets), set))
}

/// How a working set is recorded: `serve` and `vm restore` alike.
#[derive(clap::Args, Debug, Clone)]
pub struct RecordingArgs {
    /// Stop recording this many milliseconds after the VM's session started
    /// (0: when the session ends, or when the operator ends the window:
    /// SIGUSR1 to `serve`; `vm restore` ends it when the guest has finished
    /// its passes).
    #[arg(long, default_value_t = 0)]
    pub record_window_ms: u64,
    /// `exact`: only pages the guest touched are recorded (while recording,
    /// pages with data are not mapped around faults, so each one touched
    /// faults: slower). `fast`: fault-around goes on, and the pages it maps
    /// are recorded too, touched or not.
    #[arg(long, default_value = "exact", value_parser = ["exact", "fast"])]
    pub record_mode: String,
}

impl Default for RecordingArgs {
    fn default() -> Self {
        RecordingArgs {
            record_window_ms: 0,
            record_mode: "exact".into(),
        }
    }
}

impl RecordingArgs {
    /// The engine's recording configuration.
    pub fn config(&self) -> pager::RecordConfig {
        pager::RecordConfig {
            window: (self.record_window_ms > 0)
                .then(|| Duration::from_millis(self.record_window_ms)),
            exact: self.record_mode == "exact",
        }
    }
}
