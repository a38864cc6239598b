//! Between the engine's recordings and prefetch sets and the working-set
//! files of the `workset` crate: a recording becomes a file tied to its
//! snapshot, and a file becomes a prefetch set only for that snapshot.

use std::path::Path;

use pager::{PrefetchSet, Recording};
use workset::{SnapshotId, Touch, WorkingSet};

use crate::error::{Context, ServeError};

/// The identity of the memory file at `mem_file`.
pub fn snapshot_id(mem_file: &Path) -> Result<SnapshotId, ServeError> {
    let f = std::fs::File::open(mem_file)
        .with_context(|| format!("opening the memory file {}", mem_file.display()))?;
    SnapshotId::of_file(&f)
        .with_context(|| format!("fingerprinting the memory file {}", mem_file.display()))
}

/// The identity of the snapshot a source serves (the same as its memory
/// file's, read through the source: an image of a memory file has the
/// memory file's identity, so working sets recorded on one apply to the
/// other).
pub fn source_snapshot_id(source: &dyn pager::PageSource) -> Result<SnapshotId, ServeError> {
    SnapshotId::of_reader(source.len(), |offset, buf| {
        source
            .read_at(offset, buf)
            .map_err(|e| std::io::Error::other(e.to_string()))
    })
    .with_context(|| format!("fingerprinting {}", source.describe()))
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
pub fn save(rec: &Recording, snapshot: SnapshotId, out: &Path) -> Result<WorkingSet, ServeError> {
    let set = to_working_set(rec, snapshot);
    set.write(out)
        .with_context(|| format!("writing the working set {}", out.display()))?;
    Ok(set)
}

/// Reads the working set at `path` for the snapshot `snapshot` (refused,
/// with a clear error, if it was recorded on another one).
pub fn load(path: &Path, snapshot: &SnapshotId) -> Result<(PrefetchSet, WorkingSet), ServeError> {
    let set = WorkingSet::read(path)
        .with_context(|| format!("reading the working set {}", path.display()))?;
    set.check_snapshot(snapshot)
        .with_context(|| format!("working set {}", path.display()))?;
    let offsets = set.touches.iter().map(|t| t.page * workset::PAGE).collect();
    Ok((PrefetchSet::new(offsets), set))
}
