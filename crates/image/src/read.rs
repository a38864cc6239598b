//! Reading pages out of an image over its base, whatever holds the blobs.

use std::ops::Range;
use std::sync::{Arc, Mutex};

use crate::format::{BlobEntry, BlobLocation, Codec, Index};
use crate::{ImageError, PAGE};

/// Which image of a [`Layers`] a blob is stored in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Layer {
    /// The image served.
    Top,
    /// Its base.
    Base,
}

/// A blob, resolved to the image whose data holds it (a top image's entry
/// that refers to a base blob resolves to `Base`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct BlobKey {
    /// The image whose data holds the blob.
    pub layer: Layer,
    /// The blob's index in that image's blob table.
    pub index: u32,
}

/// Where a page's bytes come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageFrom {
    /// A zero page.
    Zero,
    /// Page `page` of the decoded blob.
    Blob {
        /// The blob.
        key: BlobKey,
        /// The page's index in the decoded blob.
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
        /// Memory offsets, sorted and disjoint, within the read.
        bad: Vec<Range<u64>>,
        /// What failed, for the caller (the getter logs).
        why: String,
    },
    /// A blob is being fetched (every missing one was asked for).
    Pending,
    /// A getter failed otherwise, or the read lies past the end.
    Failed(String),
}

impl Layers {
    /// `base` must be given exactly when `top` has one, and be the image
    /// `top` was packed against ([`ImageError::MissingBase`],
    /// [`ImageError::BaseMismatch`]).
    pub fn new(top: Index, base: Option<Index>) -> Result<Layers, ImageError> {
        let what = format!("image {}", short_id(&top.header.id));
        let base_what = top.base_name.clone().unwrap_or_else(|| "its base".into());
        Layers::new_named(top, base, &what, &base_what)
    }

    /// [`Layers::new`], naming the images in errors.
    pub(crate) fn new_named(
        top: Index,
        base: Option<Index>,
        what: &str,
        base_what: &str,
    ) -> Result<Layers, ImageError> {
        let bad = |why: String| ImageError::BadHeader {
            what: what.to_string(),
            why,
        };
        let Some(b) = base else {
            if top.has_base() {
                return Err(ImageError::MissingBase {
                    what: what.to_string(),
                    base: base_what.to_string(),
                    why: "no base image was given".into(),
                });
            }
            return Ok(Layers { top, base: None });
        };
        if !top.has_base() {
            return Err(ImageError::Invalid(format!(
                "{what} has no base image, but {base_what} was given as its base"
            )));
        }
        if b.has_base() {
            return Err(ImageError::Invalid(format!(
                "{base_what} has a base image itself: a base must be a full image (format v1 has one level of bases)"
            )));
        }
        if b.header.id != top.header.base_id {
            return Err(ImageError::BaseMismatch {
                what: what.to_string(),
                base: base_what.to_string(),
                expected: hex(&top.header.base_id),
                found: hex(&b.header.id),
            });
        }
        // The ids match, so these are the very tables `top` was packed
        // against: what follows only rejects a top index written wrongly.
        if b.header.chunk_size != top.header.chunk_size {
            return Err(bad(format!(
                "chunk size {} differs from its base's {}",
                top.header.chunk_size, b.header.chunk_size
            )));
        }
        for (i, e) in top.blobs.iter().enumerate() {
            if let BlobLocation::Base { index } = e.location {
                let Some(be) = b.blobs.get(index as usize) else {
                    return Err(bad(format!(
                        "blob {i} refers to base blob {index}, past the base's {}",
                        b.blobs.len()
                    )));
                };
                if be.hash != e.hash || be.pages != e.pages {
                    return Err(bad(format!(
                        "blob {i} refers to base blob {index}, whose content differs"
                    )));
                }
            }
        }
        let base_pages = b.header.mem_len / PAGE as u64;
        let ppc = top.pages_per_chunk() as u64;
        for (s, slot) in top.slots.iter().enumerate() {
            let first = s as u64 * ppc;
            let last = BitIter::new(&slot.from_base).last();
            if let Some(p) = last {
                if first + p as u64 >= base_pages {
                    return Err(bad(format!(
                        "slot {s} takes pages from the base past the base's end"
                    )));
                }
            }
        }
        Ok(Layers { top, base: Some(b) })
    }

    /// The image served (the top of the layers).
    pub fn top(&self) -> &Index {
        &self.top
    }

    /// Its base, when it has one.
    pub fn base(&self) -> Option<&Index> {
        self.base.as_ref()
    }

    /// The memory's size in bytes.
    pub fn len(&self) -> u64 {
        self.top.header.mem_len
    }

    /// Whether the memory is empty.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The entry of a resolved blob. Panics if `key` did not come from this
    /// `Layers` (its index is past the table).
    pub fn entry(&self, key: BlobKey) -> &BlobEntry {
        match (key.layer, &self.base) {
            (Layer::Base, Some(b)) => &b.blobs[key.index as usize],
            _ => &self.top.blobs[key.index as usize],
        }
    }

    /// The blob key of top blob `index`, resolved through base references.
    fn resolve(&self, index: u32) -> BlobKey {
        match self.top.blobs.get(index as usize).map(|e| e.location) {
            Some(BlobLocation::Base { index }) => BlobKey {
                layer: Layer::Base,
                index,
            },
            _ => BlobKey {
                layer: Layer::Top,
                index,
            },
        }
    }

    /// Where the page at byte `offset` (page-aligned, below `len`) comes from.
    /// (A page past the end reads as zero.)
    pub fn locate(&self, offset: u64) -> PageFrom {
        let cs = self.top.header.chunk_size as u64;
        let s = (offset / cs) as usize;
        let p = ((offset % cs) / PAGE as u64) as usize;
        let Some(slot) = self.top.slots.get(s) else {
            return PageFrom::Zero;
        };
        if bit(&slot.own, p) {
            if let Some(b) = slot.blob {
                return PageFrom::Blob {
                    key: self.resolve(b),
                    page: rank(&slot.own, p),
                };
            }
        } else if bit(&slot.from_base, p) {
            if let Some(bs) = self.base.as_ref().and_then(|b| b.slots.get(s)) {
                if bit(&bs.own, p) {
                    if let Some(b) = bs.blob {
                        return PageFrom::Blob {
                            key: BlobKey {
                                layer: Layer::Base,
                                index: b,
                            },
                            page: rank(&bs.own, p),
                        };
                    }
                }
            }
        }
        PageFrom::Zero
    }

    /// The distinct blobs that bytes `range` need, in order.
    pub fn blobs_for(&self, range: Range<u64>) -> Vec<BlobKey> {
        let mut keys = Vec::new();
        let end = range.end.min(self.len());
        let mut pos = range.start & !(PAGE as u64 - 1);
        while pos < end {
            if let PageFrom::Blob { key, .. } = self.locate(pos) {
                if !keys.contains(&key) {
                    keys.push(key);
                }
            }
            pos += PAGE as u64;
        }
        keys
    }

    /// The memory ranges (sorted, disjoint) whose pages come from blob
    /// `key` (for messages about a corrupt blob).
    pub fn ranges_of(&self, key: BlobKey) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        let cs = self.top.header.chunk_size as u64;
        for (s, slot) in self.top.slots.iter().enumerate() {
            let top_hit = slot.blob.is_some_and(|b| self.resolve(b) == key);
            let base_hit = key.layer == Layer::Base
                && self
                    .base
                    .as_ref()
                    .and_then(|b| b.slots.get(s))
                    .is_some_and(|bs| bs.blob == Some(key.index));
            if !top_hit && !base_hit {
                continue;
            }
            let start = s as u64 * cs;
            let end = (start + cs).min(self.len());
            let mut at = start;
            while at < end {
                if matches!(self.locate(at), PageFrom::Blob { key: k, .. } if k == key) {
                    match runs.last_mut() {
                        Some(r) if r.end == at => r.end = at + PAGE as u64,
                        _ => runs.push(at..at + PAGE as u64),
                    }
                }
                at += PAGE as u64;
            }
        }
        runs
    }

    /// Runs of pages that read as zero (sorted, disjoint, page-aligned).
    pub fn zero_ranges(&self) -> Vec<Range<u64>> {
        let mut runs: Vec<Range<u64>> = Vec::new();
        let ppc = self.top.pages_per_chunk() as usize;
        let cs = self.top.header.chunk_size as u64;
        let len = self.len();
        for (s, slot) in self.top.slots.iter().enumerate() {
            let base_own = self
                .base
                .as_ref()
                .and_then(|b| b.slots.get(s))
                .map(|bs| bs.own.as_slice());
            for p in 0..ppc {
                let at = s as u64 * cs + (p * PAGE) as u64;
                if at >= len {
                    break;
                }
                let data = bit(&slot.own, p)
                    || (bit(&slot.from_base, p) && base_own.is_some_and(|o| bit(o, p)));
                if data {
                    continue;
                }
                match runs.last_mut() {
                    Some(r) if r.end == at => r.end = at + PAGE as u64,
                    _ => runs.push(at..at + PAGE as u64),
                }
            }
        }
        runs
    }

    /// Fills `buf` with bytes `[offset, offset + buf.len())`, asking `get`
    /// once per distinct blob for its decoded bytes. A blob that is
    /// `Untrusted` leaves its pages out (reported bad); `Pending` blobs are
    /// all asked for before the read answers `Pending`.
    #[allow(clippy::type_complexity)]
    pub fn read(
        &self,
        offset: u64,
        buf: &mut [u8],
        get: &mut dyn FnMut(BlobKey, &BlobEntry) -> Result<Arc<[u8]>, GetError>,
    ) -> Result<(), ReadError> {
        let len = self.len();
        let end = match offset.checked_add(buf.len() as u64) {
            Some(e) if e <= len => e,
            _ => {
                return Err(ReadError::Failed(format!(
                "read of [{offset:#x}, +{:#x}) lies past the end of the memory ({len:#x} bytes)",
                buf.len()
            )))
            }
        };
        let mut memo = Memo::default();
        let mut bad: Vec<Range<u64>> = Vec::new();
        let mut why = String::new();
        let mut pending = false;
        let mut pos = offset;
        while pos < end {
            let page_start = pos & !(PAGE as u64 - 1);
            let page_end = (page_start + PAGE as u64).min(end);
            let in_page = (pos - page_start) as usize;
            let n = (page_end - pos) as usize;
            let at = (pos - offset) as usize;
            let dst = &mut buf[at..at + n];
            match self.locate(page_start) {
                PageFrom::Zero => dst.fill(0),
                PageFrom::Blob { key, page } => {
                    let got = match memo.find(key) {
                        Some(i) => i,
                        None => {
                            let outcome = match get(key, self.entry(key)) {
                                Ok(bytes) => Outcome::Got(bytes),
                                Err(GetError::Untrusted(w)) => {
                                    if !why.is_empty() {
                                        why.push_str("; ");
                                    }
                                    why.push_str(&w);
                                    Outcome::Untrusted
                                }
                                Err(GetError::Pending) => Outcome::Pending,
                                Err(GetError::Failed(w)) => return Err(ReadError::Failed(w)),
                            };
                            memo.push(key, outcome)
                        }
                    };
                    match memo.outcome(got) {
                        Outcome::Got(bytes) => {
                            let from = page as usize * PAGE + in_page;
                            match bytes.get(from..from + n) {
                                Some(src) => dst.copy_from_slice(src),
                                None => {
                                    return Err(ReadError::Failed(format!(
                                        "blob {:?} gave {} bytes, shorter than its pages",
                                        key,
                                        bytes.len()
                                    )))
                                }
                            }
                        }
                        Outcome::Untrusted => match bad.last_mut() {
                            Some(r) if r.end == pos => r.end = page_end,
                            _ => bad.push(pos..page_end),
                        },
                        Outcome::Pending => pending = true,
                    }
                }
            }
            pos = page_end;
        }
        if pending {
            Err(ReadError::Pending)
        } else if !bad.is_empty() {
            Err(ReadError::Untrusted { bad, why })
        } else {
            Ok(())
        }
    }
}

/// The outcome of one blob get within a read.
enum Outcome {
    Got(Arc<[u8]>),
    Untrusted,
    Pending,
}

/// The blobs a read asked for: a few inline (a read touches one or two
/// blobs), more on the heap.
#[derive(Default)]
struct Memo {
    inline: [Option<(BlobKey, Outcome)>; 4],
    more: Vec<(BlobKey, Outcome)>,
}

impl Memo {
    fn find(&self, key: BlobKey) -> Option<usize> {
        for (i, e) in self.inline.iter().enumerate() {
            match e {
                Some((k, _)) if *k == key => return Some(i),
                None => return None,
                _ => {}
            }
        }
        self.more
            .iter()
            .position(|(k, _)| *k == key)
            .map(|i| i + self.inline.len())
    }

    fn push(&mut self, key: BlobKey, outcome: Outcome) -> usize {
        for (i, e) in self.inline.iter_mut().enumerate() {
            if e.is_none() {
                *e = Some((key, outcome));
                return i;
            }
        }
        self.more.push((key, outcome));
        self.inline.len() + self.more.len() - 1
    }

    fn outcome(&self, i: usize) -> &Outcome {
        match self.inline.get(i) {
            Some(Some((_, o))) => o,
            _ => &self.more[i - self.inline.len()].1,
        }
    }
}

/// Whether bit `p` of a bitmap is set.
pub(crate) fn bit(words: &[u64], p: usize) -> bool {
    words.get(p / 64).is_some_and(|w| w >> (p % 64) & 1 == 1)
}

/// How many bits below `p` are set.
pub(crate) fn rank(words: &[u64], p: usize) -> u32 {
    let full = p / 64;
    let mut n: u32 = words.iter().take(full).map(|w| w.count_ones()).sum();
    if let Some(w) = words.get(full) {
        let mask = (1u64 << (p % 64)).wrapping_sub(1);
        n += (w & mask).count_ones();
    }
    n
}

/// The set bits of a bitmap, in order.
pub(crate) struct BitIter<'a> {
    words: &'a [u64],
    word: usize,
    cur: u64,
}

impl<'a> BitIter<'a> {
    pub(crate) fn new(words: &'a [u64]) -> BitIter<'a> {
        BitIter {
            words,
            word: 0,
            cur: words.first().copied().unwrap_or(0),
        }
    }
}

impl Iterator for BitIter<'_> {
    type Item = usize;
    fn next(&mut self) -> Option<usize> {
        loop {
            if self.cur != 0 {
                let b = self.cur.trailing_zeros() as usize;
                self.cur &= self.cur - 1;
                return Some(self.word * 64 + b);
            }
            self.word += 1;
            self.cur = *self.words.get(self.word)?;
        }
    }
}

/// Bytes as hex.
pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn short_id(id: &[u8; 32]) -> String {
    hex(&id[..8])
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
    let mut out = vec![0u8; entry.pages as usize * PAGE];
    decode_into(index, entry, stored, &mut out)?;
    if content {
        check_content(index, entry, &out)?;
    }
    Ok(out)
}

/// Checks decoded bytes against the entry's content address.
pub(crate) fn check_content(
    index: u32,
    entry: &BlobEntry,
    decoded: &[u8],
) -> Result<(), ImageError> {
    if *blake3::hash(decoded).as_bytes() != entry.hash {
        return Err(ImageError::Corrupt {
            blob: index,
            why: "its decoded bytes do not match its content hash (blake3)".into(),
        });
    }
    Ok(())
}

/// [`decode`] into `out` (exactly the blob's decoded size), without the
/// content check: for a buffer from [`BlobCache::buffer`].
pub fn decode_into(
    index: u32,
    entry: &BlobEntry,
    stored: &[u8],
    out: &mut [u8],
) -> Result<(), ImageError> {
    let corrupt = |why: String| ImageError::Corrupt { blob: index, why };
    if stored.len() != entry.stored_len as usize {
        return Err(corrupt(format!(
            "{} stored bytes, the index says {}",
            stored.len(),
            entry.stored_len
        )));
    }
    check_stored(index, entry, stored)?;
    let want = entry.pages as usize * PAGE;
    if out.len() != want {
        return Err(corrupt(format!(
            "a buffer of {} bytes for {want} decoded bytes",
            out.len()
        )));
    }
    let got = match entry.codec {
        Codec::None => {
            out.copy_from_slice(stored);
            want
        }
        Codec::Lz4 => lz4_flex::block::decompress_into(stored, out)
            .map_err(|e| corrupt(format!("lz4: {e}")))?,
        Codec::Zstd => ZSTD.with(|z| {
            let mut z = z.borrow_mut();
            if z.is_none() {
                *z = Some(
                    zstd::bulk::Decompressor::new()
                        .map_err(|e| corrupt(format!("zstd context: {e}")))?,
                );
            }
            match z.as_mut() {
                Some(d) => d
                    .decompress_to_buffer(stored, out)
                    .map_err(|e| corrupt(format!("zstd: {e}"))),
                None => Err(corrupt("no zstd context".into())),
            }
        })?,
    };
    if got != want {
        return Err(corrupt(format!(
            "decompressed to {got} bytes, the index says {want}"
        )));
    }
    Ok(())
}

/// Checks stored bytes against the entry's checksum.
pub(crate) fn check_stored(index: u32, entry: &BlobEntry, stored: &[u8]) -> Result<(), ImageError> {
    let sum = xxhash_rust::xxh3::xxh3_64(stored);
    if sum != entry.checksum {
        return Err(ImageError::Corrupt {
            blob: index,
            why: format!(
                "its stored bytes fail their checksum (xxh3 {sum:016x}, the index says {:016x})",
                entry.checksum
            ),
        });
    }
    Ok(())
}

thread_local! {
    /// A zstd context per thread (making one allocates).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Decoded blobs kept in memory, least recently used out first, bounded in
/// bytes. Safe to share between threads.
pub struct BlobCache {
    inner: Mutex<CacheInner>,
}

struct CacheInner {
    lru: lru::LruCache<[u8; 32], Arc<[u8]>>,
    bytes: usize,
    max: usize,
    /// Buffers of evicted blobs nobody else holds, to decode the next ones
    /// into: a fresh allocation of a chunk's size is fresh memory, and its
    /// first touch costs the kernel a zero-filled page per 4 KiB (measured
    /// on sequential reads of a compressible image: a quarter of the
    /// server's CPU went to those page faults).
    spare: Vec<Arc<[u8]>>,
}

/// Evicted buffers kept for reuse at most.
const SPARE_BUFFERS: usize = 16;

impl BlobCache {
    /// A cache of at most `max_bytes` of decoded blobs (a blob larger than
    /// that is not kept).
    pub fn new(max_bytes: usize) -> BlobCache {
        BlobCache {
            inner: Mutex::new(CacheInner {
                lru: lru::LruCache::unbounded(),
                bytes: 0,
                max: max_bytes,
                spare: Vec::new(),
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, CacheInner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blob of content hash `key`, if kept (it becomes the most
    /// recently used).
    pub fn get(&self, key: &[u8; 32]) -> Option<Arc<[u8]>> {
        self.lock().lru.get(key).cloned()
    }

    /// Keeps `blob` under its content hash, dropping the least recently
    /// used blobs to stay within the bound.
    pub fn insert(&self, key: [u8; 32], blob: Arc<[u8]>) {
        let mut c = self.lock();
        let size = blob.len();
        if size > c.max {
            return;
        }
        if let Some(old) = c.lru.put(key, blob) {
            c.bytes -= old.len();
        }
        c.bytes += size;
        while c.bytes > c.max {
            match c.lru.pop_lru() {
                Some((_, mut old)) => {
                    c.bytes -= old.len();
                    if c.spare.len() < SPARE_BUFFERS && Arc::get_mut(&mut old).is_some() {
                        c.spare.push(old);
                    }
                }
                None => break,
            }
        }
    }

    /// A buffer of `len` bytes to decode a blob into (contents
    /// unspecified): an evicted blob's, when one of that size is free,
    /// else a new one.
    pub fn buffer(&self, len: usize) -> Arc<[u8]> {
        let reused = {
            let mut c = self.lock();
            c.spare
                .iter()
                .position(|b| b.len() == len)
                .map(|i| c.spare.swap_remove(i))
        };
        reused.unwrap_or_else(|| std::iter::repeat_n(0u8, len).collect())
    }

    /// Bytes kept.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}
