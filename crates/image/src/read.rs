//! Reading pages out of an image over its base, whatever holds the blobs.

use std::ops::Range;
use std::sync::Arc;

use crate::format::{BlobEntry, Index};
use crate::ImageError;

/// Which image of a [`Layers`] a blob is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    Top,
    Base,
}

/// A blob, resolved to the image whose data holds it (a top image's entry
/// that refers to a base blob resolves to `Base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobKey {
    pub layer: Layer,
    pub index: u32,
}

/// Where a page's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    Zero,
    /// Page `page` of the decoded blob.
    Blob {
        key: BlobKey,
        page: u32,
    },
}

/// Why a blob getter could not give a blob's decoded bytes.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    /// Its bytes cannot be trusted (checksum, failed fetch): its pages are
    /// reported bad, the rest of the read goes on.
    #[error("{0}")]
    Untrusted(String),
    /// Being fetched: the read goes on (so that every missing blob of it is
    /// asked for at once) and then answers `Pending`.
    #[error("being fetched")]
    Pending,
    /// Anything else: the read fails.
    #[error("{0}")]
    Failed(String),
}

/// An image over its base (checked to match when built).
#[derive(Debug)]
pub struct Layers {
    top: Index,
    base: Option<Index>,
}

/// What [`Layers::read`] found, when not every byte was filled.
#[derive(Debug)]
pub enum ReadError {
    /// Every byte outside these source ranges was filled.
    Untrusted {
        bad: Vec<Range<u64>>,
        why: String,
    },
    Pending,
    Failed(String),
}

impl Layers {
    /// `base` must be given exactly when `top` has one, and be the image
    /// `top` was packed against ([`ImageError::MissingBase`],
    /// [`ImageError::BaseMismatch`]).
    pub fn new(top: Index, base: Option<Index>) -> Result<Layers, ImageError> {
        let _ = (&top, &base);
        todo!()
    }

    pub fn top(&self) -> &Index {
        &self.top
    }

    pub fn base(&self) -> Option<&Index> {
        self.base.as_ref()
    }

    /// The memory's size in bytes.
    pub fn len(&self) -> u64 {
        todo!()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry of a resolved blob.
    pub fn entry(&self, key: BlobKey) -> &BlobEntry {
        let _ = key;
        todo!()
    }

    /// Where the page at byte `offset` (page-aligned, below `len`) comes from.
    pub fn locate(&self, offset: u64) -> PageFrom {
        let _ = offset;
        todo!()
    }

    /// The distinct blobs that bytes `range` need, in order.
    pub fn blobs_for(&self, range: Range<u64>) -> Vec<BlobKey> {
        let _ = range;
        todo!()
    }

    /// Runs of pages that read as zero (sorted, disjoint, page-aligned).
    pub fn zero_ranges(&self) -> Vec<Range<u64>> {
        todo!()
    }

    /// Fills `buf` with bytes `[offset, offset + buf.len())`, asking `get`
    /// once per distinct blob for its decoded bytes. A blob that is
    /// `Untrusted` leaves its pages out (reported bad); `Pending` blobs are
    /// all asked for before the read answers `Pending`.
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        get: &mut dyn FnMut(BlobKey, &BlobEntry) -> Result<Arc<[u8]>, GetError>,
    ) -> Result<(), ReadError> {
        let _ = (offset, buf, get);
        todo!()
    }
}

/// A blob's decoded bytes from its stored bytes: checks the stored bytes'
/// checksum (xxh3), decompresses, checks the size; with `content`, also the
/// content address (blake3 of the decoded bytes: `image verify`, and blobs
/// fetched from a remote store before they are cached).
pub fn decode(
    index: u32,
    entry: &BlobEntry,
    stored: &[u8],
    content: bool,
) -> Result<Vec<u8>, ImageError> {
    let _ = (index, entry, stored, content);
    todo!()
}

/// Decoded blobs kept in memory, least recently used out first, bounded in
/// bytes. Safe to share between threads.
pub struct BlobCache {
    _p: (),
}

impl BlobCache {
    pub fn new(max_bytes: usize) -> BlobCache {
        let _ = max_bytes;
        todo!()
    }

    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<[u8]>> {
        let _ = key;
        todo!()
    }

    pub fn insert(&self, key: [u8; 32], blob: Arc<[u8]>) {
        let _ = (key, blob);
        todo!()
    }
}
