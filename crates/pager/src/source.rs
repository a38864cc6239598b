//! Page sources: where the bytes of a region come from.

use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Why a source could not deliver bytes.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// The reason is part of the message (logs print it alone), so it is
    /// not also given as the error's source: a chain would print it twice.
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    #[error(
        "read of [{offset:#x}, +{len:#x}) lies past the end of the source ({source_len:#x} bytes)"
    )]
    OutOfRange {
        offset: u64,
        len: usize,
        source_len: u64,
    },
    /// The bytes in `bad` (source offsets, sorted and disjoint, each
    /// within the read) cannot be trusted: a chunk failed its checksum, or a
    /// fetch failed for good. Every other byte of the buffer was filled and
    /// is correct. The engine poisons the pages in `bad` (the guest gets
    /// SIGBUS there) and serves the rest. The source logs the reason once
    /// per chunk itself; `why` is for the caller.
    #[error("{why}")]
    Untrusted { bad: Vec<Range<u64>>, why: String },
    /// The bytes are being fetched from a slow store (only from
    /// [`PageSource::read_at_or_wake`]): the source calls the waker it was
    /// given once they can be read, or have failed for good.
    #[error("the bytes are being fetched")]
    Pending,
}

/// Called by a source, once, when bytes it answered [`SourceError::Pending`]
/// for can be read (or have failed for good). It must not block: it is
/// called from the source's fetching threads.
pub type Waker = Arc<dyn Fn() + Send + Sync>;

/// Where pages come from. Implementations must be safe to call from several
/// serving threads at once.
pub trait PageSource: Send + Sync + 'static {
    /// The source's size in bytes.
    fn len(&self) -> u64;

    /// Whether the source is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Fills `buf` with the bytes at `[offset, offset+buf.len())`. On error
    /// nothing in `buf` may be trusted (the pages will be poisoned).
    /// A slow source (a remote store) waits for the bytes here; see
    /// [`read_at_or_wake`](Self::read_at_or_wake) for serving threads.
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError>;

    /// As [`read_at`](Self::read_at), without waiting on a slow store: when
    /// some of the bytes are not at hand, the source starts fetching them
    /// (one fetch for concurrent asks), returns [`SourceError::Pending`] and
    /// calls `waker` once they are. Serving threads are shared by every VM,
    /// so they never wait on a fetch. Sources whose reads are local need
    /// not implement it.
    fn read_at_or_wake(
        &self,
        offset: u64,
        buf: &mut [u8],
        waker: &Waker,
    ) -> Result<(), SourceError> {
        let _ = waker;
        self.read_at(offset, buf)
    }

    /// Ranges that will be read soon, most urgent first (a recorded working
    /// set): a slow source starts fetching them, behind the fetches faults
    /// wait for. Others ignore it.
    fn hint(&self, ranges: &[Range<u64>]) {
        let _ = ranges;
    }

    /// Ranges known in advance to read as zero (sorted, disjoint): pages
    /// wholly inside them are served as zero pages without a read.
    fn zero_ranges(&self) -> &[Range<u64>] {
        &[]
    }

    /// A short description for logs.
    fn describe(&self) -> String;
}

/// A raw memory file: the guest's regions laid end to end, as Firecracker
/// writes them. Holes (a sparse Diff snapshot) read as zero and are found
/// with SEEK_HOLE/SEEK_DATA when the file is opened.
#[derive(Debug)]
pub struct MemFile {
    file: File,
    path: PathBuf,
    len: u64,
    holes: Vec<Range<u64>>,
}

impl MemFile {
    pub fn open(path: &Path) -> Result<MemFile, SourceError> {
        let io = |error| SourceError::Io {
            path: path.display().to_string(),
            error,
        };
        let file = File::open(path).map_err(io)?;
        Self::from_file(file, path)
    }

    /// A memory file already open (handed over by an earlier server, so
    /// that its VMs keep the very bytes they started with); `path` is for
    /// logs.
    pub fn from_file(file: File, path: &Path) -> Result<MemFile, SourceError> {
        let io = |error| SourceError::Io {
            path: path.display().to_string(),
            error,
        };
        let meta = file.metadata().map_err(io)?;
        if !meta.is_file() {
            return Err(io(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "not a regular file",
            )));
        }
        let len = meta.len();
        let holes = find_holes(&file, len);
        Ok(MemFile {
            file,
            path: path.to_path_buf(),
            len,
            holes,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file (to hand over to a successor).
    pub fn file(&self) -> &File {
        &self.file
    }
}

/// The file's holes, from SEEK_DATA/SEEK_HOLE; empty when the filesystem
/// does not report them (then zero pages are still found by content).
pub fn find_holes(file: &File, len: u64) -> Vec<Range<u64>> {
    use rustix::fs::{seek, SeekFrom};
    let mut holes = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            Err(rustix::io::Errno::NXIO) => len, // no data after pos
            Err(_) => return Vec::new(),
        };
        if data > pos {
            holes.push(pos..data.min(len));
        }
        if data >= len {
            break;
        }
        pos = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h,
            Err(_) => return Vec::new(),
        };
    }
    holes
}

impl PageSource for MemFile {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let end = offset.checked_add(buf.len() as u64);
        if end.is_none_or(|e| e > self.len) {
            return Err(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                source_len: self.len,
            });
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|error| SourceError::Io {
                path: self.path.display().to_string(),
                error,
            })
    }

    fn zero_ranges(&self) -> &[Range<u64>] {
        &self.holes
    }

    fn describe(&self) -> String {
        format!("memory file {} ({} bytes)", self.path.display(), self.len)
    }
}

/// A source held in memory (tests, generated images).
#[derive(Debug, Clone)]
pub struct Bytes(pub Vec<u8>);

impl PageSource for Bytes {
    fn len(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let out_of_range = || SourceError::OutOfRange {
            offset,
            len: buf.len(),
            source_len: self.0.len() as u64,
        };
        let start = usize::try_from(offset).map_err(|_| out_of_range())?;
        let src = start
            .checked_add(buf.len())
            .and_then(|end| self.0.get(start..end))
            .ok_or_else(out_of_range)?;
        buf.copy_from_slice(src);
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} bytes in memory", self.0.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Seek, SeekFrom, Write};

    #[test]
    fn memfile_reads_and_finds_holes() {
        let mut f = tempfile::NamedTempFile::new().expect("tmp");
        f.as_file_mut().set_len(1 << 20).expect("len");
        f.seek(SeekFrom::Start(256 << 10)).expect("seek");
        f.write_all(&[7u8; 4096]).expect("write");
        f.flush().expect("flush");
        let m = MemFile::open(f.path()).expect("open");
        assert_eq!(m.len(), 1 << 20);
        let mut buf = vec![0u8; 4096];
        m.read_at(256 << 10, &mut buf).expect("read");
        assert!(buf.iter().all(|&b| b == 7));
        assert!(matches!(
            m.read_at((1 << 20) - 100, &mut buf),
            Err(SourceError::OutOfRange { .. })
        ));
        // tmpfs and ext4 report holes; the data page is not inside any.
        for h in m.zero_ranges() {
            assert!(h.end <= 256 << 10 || h.start >= (256 << 10) + 4096, "{h:?}");
        }
    }

    #[test]
    fn missing_file_is_a_clear_error() {
        let e = MemFile::open(Path::new("/nonexistent/mem")).expect_err("missing");
        assert!(e.to_string().contains("/nonexistent/mem"), "{e}");
    }
}
