//! Working sets: which pages of a snapshot a restored VM touched, and when.
//!
//! A *working set* (a *recording*) is the list of memory pages a VM touched
//! after being restored from a snapshot, in first-touch order. The page server
//! records one while it serves a restore; the next restore of the same
//! snapshot uses it to prefetch those pages before the guest asks for them.
//! Several recordings of the same snapshot can be [`merge`]d into one that
//! keeps the pages most runs agreed on.
//!
//! Pages are named by their offset in the snapshot's memory file (the
//! *source*), in 4 KiB units, never by guest address: the file is what a
//! working set is replayed against, a source offset means the same bytes
//! whatever the guest's memory layout or the region table a client sends,
//! and the same recording serves any VM restored from that file. A working
//! set is tied to its snapshot by a [`SnapshotId`] (length plus a sampled
//! fingerprint) and refuses to be used with another one.
//!
//! The file format (`.pwws`) is in [`WorkingSet::encode`] and
//! `docs/formats.md`.

#![warn(missing_docs)]

mod format;
mod merge;
mod summary;

use std::path::PathBuf;

pub use merge::{merge, similarity, Similarity};
pub use summary::Summary;

/// The page size working sets count in: one page is 4 KiB of the source.
pub const PAGE: u64 = 4096;

/// How many pages [`SnapshotId`] samples at most.
const SAMPLES: u64 = 256;

/// Which snapshot a working set belongs to: the memory file's length and a
/// fingerprint of sampled pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct SnapshotId {
    /// The memory file's length in bytes.
    pub len: u64,
    /// blake3 over the length and up to 256 sampled pages (see [`SnapshotId::of_reader`]).
    pub fingerprint: [u8; 32],
}

impl SnapshotId {
    /// The identity of a snapshot memory file (see [`SnapshotId::of_reader`]).
    pub fn of_file(file: &std::fs::File) -> Result<SnapshotId, WorksetError> {
        use std::os::unix::fs::FileExt;
        let len = file
            .metadata()
            .map_err(|source| WorksetError::Read { offset: 0, source })?
            .len();
        Self::of_reader(len, |offset, buf| file.read_exact_at(buf, offset))
    }

    /// The identity of a source of `len` bytes read through `read_at(offset,
    /// buf)`, which must fill `buf` entirely.
    ///
    /// The fingerprint is blake3 over the length (u64 little endian), then
    /// up to 256 samples: with `pages = ceil(len / 4096)`, sample `k` is the
    /// page at `k * max(1, pages / 256)` for `k` in `0..min(pages, 256)`,
    /// 4096 bytes or up to the end of the source for a partial last page.
    /// Reads at most 1 MiB.
    pub fn of_reader(
        len: u64,
        mut read_at: impl FnMut(u64, &mut [u8]) -> std::io::Result<()>,
    ) -> Result<SnapshotId, WorksetError> {
        let pages = len.div_ceil(PAGE);
        let step = (pages / SAMPLES).max(1);
        let mut hasher = blake3::Hasher::new();
        hasher.update(&len.to_le_bytes());
        let mut buf = vec![0u8; PAGE as usize];
        for k in 0..pages.min(SAMPLES) {
            let offset = k * step * PAGE;
            let n = (len - offset).min(PAGE) as usize;
            read_at(offset, &mut buf[..n])
                .map_err(|source| WorksetError::Read { offset, source })?;
            hasher.update(&buf[..n]);
        }
        Ok(SnapshotId {
            len,
            fingerprint: *hasher.finalize().as_bytes(),
        })
    }

    /// The fingerprint's first 8 bytes in hex, for messages.
    pub fn short(&self) -> String {
        self.fingerprint[..8]
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// One page of a working set: where it is in the source and when it was first touched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Touch {
    /// Source offset / 4096.
    pub page: u64,
    /// First touch, microseconds since the session started serving (the
    /// median over the runs that saw the page, after a merge).
    pub t_us: u64,
    /// The faulting thread's id, 0 if unknown (the earliest touch's, after a merge).
    pub thread: u32,
    /// In how many runs this page was seen (1 for a recording).
    pub seen: u32,
}

/// The pages a VM touched after a restore of one snapshot, in first-touch order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkingSet {
    /// The snapshot the pages belong to.
    pub snapshot: SnapshotId,
    /// Recordings merged into this one (1 for a recording).
    pub runs: u32,
    /// The recording window in milliseconds (0: ended by the operator or the
    /// session end); after a merge, the longest of the inputs'.
    pub window_ms: u64,
    /// In first-touch order (ascending `t_us`, ties in any order); pages unique.
    pub touches: Vec<Touch>,
}

impl WorkingSet {
    /// The bytes the working set covers (pages × 4096).
    pub fn bytes(&self) -> u64 {
        self.pages() * PAGE
    }

    /// The number of pages.
    pub fn pages(&self) -> u64 {
        self.touches.len() as u64
    }

    /// Refuses a working set recorded on another snapshot than `actual`.
    pub fn check_snapshot(&self, actual: &SnapshotId) -> Result<(), WorksetError> {
        if self.snapshot == *actual {
            Ok(())
        } else {
            Err(WorksetError::SnapshotMismatch {
                recorded: self.snapshot,
                actual: *actual,
            })
        }
    }

    /// Checks what [`WorkingSet::decode`] checks: `runs ≥ 1`, every page
    /// inside the snapshot and unique, `t_us` ascending, `1 ≤ seen ≤ runs`.
    pub fn validate(&self) -> Result<(), WorksetError> {
        let invalid = |what: String| Err(WorksetError::Invalid { what });
        if self.runs == 0 {
            return invalid("runs is 0".into());
        }
        let limit = self.snapshot.len / PAGE;
        let mut seen_pages = std::collections::HashSet::with_capacity(self.touches.len());
        let mut last_t = 0;
        for (i, t) in self.touches.iter().enumerate() {
            if t.page >= limit {
                return invalid(format!(
                    "entry {i}: page {} is past the snapshot's {limit} pages",
                    t.page
                ));
            }
            if !seen_pages.insert(t.page) {
                return invalid(format!("entry {i}: page {} appears twice", t.page));
            }
            if t.t_us < last_t {
                return invalid(format!(
                    "entry {i}: t_us {} is before the previous entry's {last_t}",
                    t.t_us
                ));
            }
            last_t = t.t_us;
            if t.seen == 0 || t.seen > self.runs {
                return invalid(format!(
                    "entry {i}: page {} seen in {} runs of {}",
                    t.page, t.seen, self.runs
                ));
            }
        }
        Ok(())
    }
}

/// Everything that can go wrong reading, checking or merging working sets.
#[derive(Debug, thiserror::Error)]
pub enum WorksetError {
    /// A file could not be read or written.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// What the system said.
        source: std::io::Error,
    },
    /// Reading the snapshot for its [`SnapshotId`] failed.
    #[error("reading the snapshot at offset {offset}: {source}")]
    Read {
        /// Where the read was.
        offset: u64,
        /// What the reader said.
        source: std::io::Error,
    },
    /// The data does not start with the working set magic.
    #[error("not a pagewire working set")]
    NotAWorkingSet,
    /// The file's version is not one this build reads.
    #[error(
        "written by a newer pagewire: version {found}, this one reads {}",
        format::VERSION
    )]
    Version {
        /// The version in the file.
        found: u32,
    },
    /// The data ends before what its header promises.
    #[error("truncated: {found} bytes, {what} needs {needed}")]
    Truncated {
        /// What was being read.
        what: &'static str,
        /// Bytes needed.
        needed: u64,
        /// Bytes there.
        found: u64,
    },
    /// The checksum does not match the contents.
    #[error("corrupt: the checksum does not match the contents")]
    Corrupt,
    /// Well-formed but not a valid working set.
    #[error("invalid working set: {what}")]
    Invalid {
        /// What is wrong.
        what: String,
    },
    /// The working set belongs to another snapshot.
    #[error(
        "the working set was recorded on a snapshot of {} bytes (fingerprint {}), this snapshot is {} bytes (fingerprint {}): record a new one",
        recorded.len, recorded.short(), actual.len, actual.short()
    )]
    SnapshotMismatch {
        /// The snapshot in the working set.
        recorded: SnapshotId,
        /// The snapshot it was checked against.
        actual: SnapshotId,
    },
    /// The inputs of a merge do not go together.
    #[error("cannot merge: {what}")]
    Merge {
        /// Why.
        what: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn file_with(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("temp file");
        f.write_all(bytes).expect("write");
        f.flush().expect("flush");
        f
    }

    #[test]
    fn snapshot_id_equal_files_equal_differing_sampled_page_differs() {
        let len = 1024 * PAGE as usize + 100; // partial last page
        let data: Vec<u8> = (0..len).map(|i| (i * 7 % 251) as u8).collect();
        let a = SnapshotId::of_file(file_with(&data).as_file()).expect("fingerprint");
        let b = SnapshotId::of_file(file_with(&data).as_file()).expect("fingerprint");
        assert_eq!(a, b);
        assert_eq!(a.len, len as u64);
        assert_eq!(a.short().len(), 16);

        // pages = 1025, step = 4: page 8 is sampled, page 9 is not.
        let mut sampled = data.clone();
        sampled[8 * PAGE as usize + 17] ^= 1;
        let c = SnapshotId::of_file(file_with(&sampled).as_file()).expect("fingerprint");
        assert_ne!(a, c);
        let mut unsampled = data.clone();
        unsampled[9 * PAGE as usize + 17] ^= 1;
        let d = SnapshotId::of_file(file_with(&unsampled).as_file()).expect("fingerprint");
        assert_eq!(
            a, d,
            "a page between samples is not part of the fingerprint"
        );

        let shorter =
            SnapshotId::of_file(file_with(&data[..len - 1]).as_file()).expect("fingerprint");
        assert_ne!(a, shorter);
    }

    #[test]
    fn snapshot_id_small_and_empty() {
        let empty = SnapshotId::of_file(file_with(&[]).as_file()).expect("fingerprint");
        assert_eq!(empty.len, 0);
        let mut reads = 0;
        let small = SnapshotId::of_reader(3 * PAGE, |_, buf| {
            reads += buf.len();
            buf.fill(1);
            Ok(())
        })
        .expect("fingerprint");
        assert_eq!(reads, 3 * PAGE as usize);
        assert_ne!(empty, small);
        let failing = SnapshotId::of_reader(PAGE, |_, _| Err(std::io::ErrorKind::Other.into()));
        assert!(matches!(failing, Err(WorksetError::Read { offset: 0, .. })));
    }

    #[test]
    fn snapshot_id_reads_at_most_one_mib() {
        let mut reads = 0;
        SnapshotId::of_reader(1 << 40, |_, buf| {
            reads += buf.len();
            Ok(())
        })
        .expect("fingerprint");
        assert_eq!(reads, 1 << 20);
    }

    #[test]
    fn check_snapshot_refuses_another_snapshot() {
        let id = SnapshotId {
            len: 1 << 20,
            fingerprint: [1; 32],
        };
        let ws = WorkingSet {
            snapshot: id,
            runs: 1,
            window_ms: 0,
            touches: vec![],
        };
        ws.check_snapshot(&id).expect("the same snapshot");
        let other = SnapshotId {
            len: 2 << 20,
            fingerprint: [2; 32],
        };
        let err = ws.check_snapshot(&other).unwrap_err();
        assert!(matches!(err, WorksetError::SnapshotMismatch { .. }));
        let msg = err.to_string();
        assert!(
            msg.contains("1048576 bytes (fingerprint 0101010101010101)"),
            "{msg}"
        );
        assert!(
            msg.contains("this snapshot is 2097152 bytes (fingerprint 0202020202020202)"),
            "{msg}"
        );
        assert!(msg.contains("record a new one"), "{msg}");
    }
}
