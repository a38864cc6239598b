//! The on-disk layout (`docs/image-format.md`): header, index, data.

use crate::{ImageError, PAGE};

pub const MAGIC: [u8; 8] = *b"PWIMAGE\0";
pub const VERSION: u32 = 1;
/// The fixed header's size; the index follows it.
pub const HEADER_LEN: usize = 256;

/// How a blob's bytes are stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Codec {
    None,
    Lz4,
    Zstd,
}

/// The fixed header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub version: u32,
    /// Bytes per chunk (slot): a power of two, 4 KiB to 4 MiB.
    pub chunk_size: u32,
    /// The memory's size in bytes.
    pub mem_len: u64,
    pub slot_count: u64,
    pub blob_count: u64,
    /// Where the index (slots, blobs, base name) starts and its length.
    pub index_offset: u64,
    pub index_len: u64,
    /// Where blob data starts and its length; the file ends there.
    pub data_offset: u64,
    pub data_len: u64,
    /// blake3 of the index bytes: the image's identity, checked at open.
    pub id: [u8; 32],
    /// The base's id; all zero when the image has no base.
    pub base_id: [u8; 32],
}

/// One chunk of memory: which of its pages come from its blob (in order),
/// which from the base image at the same offset; the others are zero.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Index into the blob table; `None`: no page from a blob.
    pub blob: Option<u32>,
    pub own: Vec<u64>,
    pub from_base: Vec<u64>,
}

/// Where a blob's stored bytes are.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlobLocation {
    /// In this image's data, at `offset` from the data section's start.
    Data { offset: u64 },
    /// The base image's blob of this index (identical content).
    Base { index: u32 },
}

/// A stored blob: the pages a slot takes from it, concatenated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlobEntry {
    pub location: BlobLocation,
    pub codec: Codec,
    /// Decoded size in 4 KiB pages.
    pub pages: u32,
    pub stored_len: u32,
    /// xxh3-64 of the stored bytes: checked on every read.
    pub checksum: u64,
    /// blake3 of the decoded bytes: the content address (dedup, caches).
    pub hash: [u8; 32],
}

/// An image's header and tables, parsed and validated.
#[derive(Debug, Clone)]
pub struct Index {
    pub header: Header,
    pub slots: Vec<Slot>,
    pub blobs: Vec<BlobEntry>,
    /// The base's file (or object) name, relative to this image's directory
    /// (or key prefix), when it has a base.
    pub base_name: Option<String>,
}

impl Index {
    /// How many bytes from the start [`Index::parse`] needs, from the first
    /// [`HEADER_LEN`] bytes (checks the magic, version and header checksum).
    pub fn needed(first: &[u8], what: &str) -> Result<u64, ImageError> {
        let header = parse_header(first, what)?;
        Ok(header.data_offset)
    }

    /// Parses and validates the header and index from the image's first
    /// bytes (at least [`Index::needed`]). `what` names the image in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Index, ImageError> {
        let header = parse_header(bytes, what)?;
        let bad = |why: String| bad(what, why);
        let end = usize::try_from(header.data_offset)
            .map_err(|_| bad(format!("index end {} too large", header.data_offset)))?;
        if bytes.len() < end {
            return Err(ImageError::Truncated {
                what: what.to_string(),
                why: format!(
                    "the header and index need {end} bytes, only {} given",
                    bytes.len()
                ),
            });
        }
        let index = &bytes[HEADER_LEN..end];
        if *blake3::hash(index).as_bytes() != header.id {
            return Err(bad(
                "the index does not hash to the image id in the header (corrupt index)".into(),
            ));
        }
        let ppc = header.pages_per_chunk();
        let map_len = bitmap_bytes(ppc);
        // The sizes were checked against index_len by parse_header.
        let slot_count = header.slot_count as usize;
        let blob_count = header.blob_count as usize;
        let mut r = Reader {
            bytes: index,
            pos: 0,
        };
        let mut slots = Vec::with_capacity(slot_count);
        let mem_pages = header.mem_len / PAGE as u64;
        for s in 0..slot_count {
            let blob = r.u32();
            let own = words_from(r.take(map_len));
            let from_base = words_from(r.take(map_len));
            // Pages of this slot inside the memory.
            let first_page = s as u64 * ppc as u64;
            let valid = (mem_pages - first_page).min(ppc as u64) as usize;
            for (i, (o, b)) in own.iter().zip(&from_base).enumerate() {
                if o & b != 0 {
                    return Err(bad(format!(
                        "slot {s}: a page is both its own and from the base"
                    )));
                }
                let lo = i * 64;
                let mask = if valid >= lo + 64 {
                    u64::MAX
                } else if valid > lo {
                    (1u64 << (valid - lo)) - 1
                } else {
                    0
                };
                if (o | b) & !mask != 0 {
                    return Err(bad(format!(
                        "slot {s}: page bits set past the memory's end or the chunk"
                    )));
                }
            }
            if header.base_id == [0; 32] && from_base.iter().any(|&w| w != 0) {
                return Err(bad(format!(
                    "slot {s} takes pages from a base, but the image has none"
                )));
            }
            let own_count: u32 = own.iter().map(|w| w.count_ones()).sum();
            let blob = if blob == NO_BLOB {
                if own_count != 0 {
                    return Err(bad(format!(
                        "slot {s} has {own_count} own pages but no blob"
                    )));
                }
                None
            } else {
                if blob as usize >= blob_count {
                    return Err(bad(format!(
                        "slot {s} refers to blob {blob}, past the {blob_count} blobs"
                    )));
                }
                Some(blob)
            };
            slots.push(Slot {
                blob,
                own,
                from_base,
            });
        }
        let mut blobs = Vec::with_capacity(blob_count);
        for b in 0..blob_count {
            let kind = r.u8();
            let codec = r.u8();
            let reserved = r.u16();
            let pages = r.u32();
            let stored_len = r.u32();
            let reserved2 = r.u32();
            let location = r.u64();
            let checksum = r.u64();
            let mut hash = [0u8; 32];
            hash.copy_from_slice(r.take(32));
            if reserved != 0 || reserved2 != 0 {
                return Err(bad(format!("blob {b}: reserved bytes are not zero")));
            }
            let codec = match codec {
                0 => Codec::None,
                1 => Codec::Lz4,
                2 => Codec::Zstd,
                c => return Err(bad(format!("blob {b}: unknown codec {c}"))),
            };
            if pages == 0 || pages > ppc {
                return Err(bad(format!("blob {b}: {pages} pages (a chunk has {ppc})")));
            }
            let location = match kind {
                0 => {
                    let end = location.checked_add(stored_len as u64);
                    if end.is_none_or(|e| e > header.data_len) {
                        return Err(bad(format!(
                            "blob {b}: bytes [{location}, +{stored_len}) lie outside the {}-byte data section",
                            header.data_len
                        )));
                    }
                    if stored_len == 0 {
                        return Err(bad(format!("blob {b}: no stored bytes")));
                    }
                    if codec == Codec::None && stored_len as u64 != pages as u64 * PAGE as u64 {
                        return Err(bad(format!(
                            "blob {b}: stored plainly in {stored_len} bytes, but has {pages} pages"
                        )));
                    }
                    BlobLocation::Data { offset: location }
                }
                1 => {
                    if header.base_id == [0; 32] {
                        return Err(bad(format!(
                            "blob {b} is in the base, but the image has none"
                        )));
                    }
                    let index = u32::try_from(location)
                        .map_err(|_| bad(format!("blob {b}: base blob {location} out of range")))?;
                    BlobLocation::Base { index }
                }
                k => return Err(bad(format!("blob {b}: unknown location kind {k}"))),
            };
            blobs.push(BlobEntry {
                location,
                codec,
                pages,
                stored_len,
                checksum,
                hash,
            });
        }
        for (s, slot) in slots.iter().enumerate() {
            if let Some(b) = slot.blob {
                let own_count: u32 = slot.own.iter().map(|w| w.count_ones()).sum();
                let pages = blobs[b as usize].pages;
                if own_count != pages {
                    return Err(bad(format!(
                        "slot {s} takes {own_count} pages from blob {b}, which has {pages}"
                    )));
                }
            }
        }
        let name_len = r.u32() as usize;
        let name = r.take(name_len);
        if r.pos != index.len() {
            return Err(bad(format!(
                "the index has {} bytes after its tables",
                index.len() - r.pos
            )));
        }
        let base_name = if name_len == 0 {
            None
        } else {
            Some(
                std::str::from_utf8(name)
                    .map_err(|_| bad("the base name is not UTF-8".into()))?
                    .to_string(),
            )
        };
        if base_name.is_some() != (header.base_id != [0; 32]) {
            return Err(bad(
                "a base name without a base id, or a base id without a name".into(),
            ));
        }
        Ok(Index {
            header,
            slots,
            blobs,
            base_name,
        })
    }

    /// Checks that an image of `len` bytes holds all its data
    /// ([`ImageError::Truncated`] otherwise).
    pub fn check_len(&self, len: u64, what: &str) -> Result<(), ImageError> {
        // parse_header checked that this does not overflow.
        let end = self.header.data_offset + self.header.data_len;
        if len < end {
            return Err(ImageError::Truncated {
                what: what.to_string(),
                why: format!("{len} bytes, the header says {end}"),
            });
        }
        if len > end {
            return Err(bad(
                what,
                format!("{} bytes after the data's end at {end}", len - end),
            ));
        }
        Ok(())
    }

    /// Pages per slot.
    pub fn pages_per_chunk(&self) -> u32 {
        self.header.pages_per_chunk()
    }

    pub fn has_base(&self) -> bool {
        self.header.base_id != [0; 32]
    }

    /// The id as hex, for messages.
    pub fn id_hex(&self) -> String {
        self.header.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}

impl Header {
    /// Pages per slot.
    pub fn pages_per_chunk(&self) -> u32 {
        self.chunk_size / PAGE as u32
    }

    /// The header's [`HEADER_LEN`] bytes, checksum included.
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&self.version.to_le_bytes());
        h[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        let fields = [
            self.mem_len,
            self.slot_count,
            self.blob_count,
            self.index_offset,
            self.index_len,
            self.data_offset,
            self.data_len,
        ];
        for (i, v) in fields.iter().enumerate() {
            h[16 + 8 * i..24 + 8 * i].copy_from_slice(&v.to_le_bytes());
        }
        h[72..104].copy_from_slice(&self.id);
        h[104..136].copy_from_slice(&self.base_id);
        let sum = xxhash_rust::xxh3::xxh3_64(&h[..CHECKSUM_AT]);
        h[CHECKSUM_AT..].copy_from_slice(&sum.to_le_bytes());
        h
    }
}

/// Where the header's checksum is: its last 8 bytes.
const CHECKSUM_AT: usize = HEADER_LEN - 8;
/// A slot's blob field when it has no blob.
pub(crate) const NO_BLOB: u32 = u32::MAX;
/// A blob table entry's size.
pub(crate) const BLOB_REC: usize = 64;
/// Smallest and largest chunk size.
pub(crate) const MIN_CHUNK: u32 = 4096;
pub(crate) const MAX_CHUNK: u32 = 4 << 20;

fn bad(what: &str, why: String) -> ImageError {
    ImageError::BadHeader {
        what: what.to_string(),
        why,
    }
}

/// Bytes of one bitmap of a slot in the file.
pub(crate) fn bitmap_bytes(pages_per_chunk: u32) -> usize {
    (pages_per_chunk as usize).div_ceil(8)
}

fn words_from(bytes: &[u8]) -> Vec<u64> {
    let mut words = vec![0u64; bytes.len().div_ceil(8)];
    for (i, &b) in bytes.iter().enumerate() {
        words[i / 8] |= (b as u64) << (8 * (i % 8));
    }
    words
}

/// Appends a bitmap's file form.
pub(crate) fn push_bitmap(out: &mut Vec<u8>, words: &[u64], bytes: usize) {
    for i in 0..bytes {
        let w = words.get(i / 8).copied().unwrap_or(0);
        out.push((w >> (8 * (i % 8))) as u8);
    }
}

/// Validates the fixed header alone.
fn parse_header(bytes: &[u8], what: &str) -> Result<Header, ImageError> {
    let bad = |why: String| bad(what, why);
    let Some(h) = bytes.get(..HEADER_LEN) else {
        if bytes.len() >= 8 && bytes[..8] != MAGIC {
            return Err(bad("bad magic (not a pagewire image)".into()));
        }
        return Err(ImageError::Truncated {
            what: what.to_string(),
            why: format!(
                "{} bytes, shorter than the {HEADER_LEN}-byte header",
                bytes.len()
            ),
        });
    };
    if h[..8] != MAGIC {
        return Err(bad("bad magic (not a pagewire image)".into()));
    }
    let u32_at = |o: usize| u32::from_le_bytes([h[o], h[o + 1], h[o + 2], h[o + 3]]);
    let u64_at = |o: usize| {
        let mut b = [0u8; 8];
        b.copy_from_slice(&h[o..o + 8]);
        u64::from_le_bytes(b)
    };
    let version = u32_at(8);
    if version != VERSION {
        return Err(bad(format!(
            "format version {version}; this build reads version {VERSION} (a newer pagewire wrote it?)"
        )));
    }
    let sum = xxhash_rust::xxh3::xxh3_64(&h[..CHECKSUM_AT]);
    if sum != u64_at(CHECKSUM_AT) {
        return Err(bad("the header fails its checksum (corrupt header)".into()));
    }
    if h[136..CHECKSUM_AT].iter().any(|&b| b != 0) {
        return Err(bad("reserved header bytes are not zero".into()));
    }
    let mut id = [0u8; 32];
    id.copy_from_slice(&h[72..104]);
    let mut base_id = [0u8; 32];
    base_id.copy_from_slice(&h[104..136]);
    let header = Header {
        version,
        chunk_size: u32_at(12),
        mem_len: u64_at(16),
        slot_count: u64_at(24),
        blob_count: u64_at(32),
        index_offset: u64_at(40),
        index_len: u64_at(48),
        data_offset: u64_at(56),
        data_len: u64_at(64),
        id,
        base_id,
    };
    let cs = header.chunk_size;
    if !cs.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&cs) {
        return Err(bad(format!(
            "chunk size {cs} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
        )));
    }
    if !header.mem_len.is_multiple_of(PAGE as u64) {
        return Err(bad(format!(
            "memory size {} is not a multiple of {PAGE}",
            header.mem_len
        )));
    }
    let slots = header.mem_len.div_ceil(cs as u64);
    if header.slot_count != slots {
        return Err(bad(format!(
            "{} slots for {} bytes of memory in {cs}-byte chunks (should be {slots})",
            header.slot_count, header.mem_len
        )));
    }
    if header.index_offset != HEADER_LEN as u64 {
        return Err(bad(format!(
            "the index starts at {}, not right after the header",
            header.index_offset
        )));
    }
    let slot_rec = 4 + 2 * bitmap_bytes(header.pages_per_chunk()) as u64;
    let tables = header
        .slot_count
        .checked_mul(slot_rec)
        .zip(header.blob_count.checked_mul(BLOB_REC as u64))
        .and_then(|(a, b)| a.checked_add(b))
        .and_then(|t| t.checked_add(4));
    let Some(tables) = tables else {
        return Err(bad("table sizes overflow".into()));
    };
    if header.index_len < tables || header.index_len - tables > MAX_NAME as u64 {
        return Err(bad(format!(
            "the index is {} bytes; its tables need {tables} (and a base name up to {MAX_NAME})",
            header.index_len
        )));
    }
    let index_end = header.index_offset + header.index_len;
    if header.data_offset != index_end {
        return Err(bad(format!(
            "the data starts at {}, not right after the index ({index_end})",
            header.data_offset
        )));
    }
    if header.data_offset.checked_add(header.data_len).is_none() {
        return Err(bad("the data's end overflows".into()));
    }
    Ok(header)
}

/// The longest base name.
pub(crate) const MAX_NAME: usize = 4096;

/// Reads fields from a slice whose length was checked beforehand (every
/// read is in bounds; a short slice gives zeros, never a panic).
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> &'a [u8] {
        let start = self.pos.min(self.bytes.len());
        let end = self.pos.saturating_add(n).min(self.bytes.len());
        self.pos = self.pos.saturating_add(n);
        &self.bytes[start..end]
    }
    fn fixed<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        let got = self.take(N);
        out[..got.len()].copy_from_slice(got);
        out
    }
    fn u8(&mut self) -> u8 {
        self.fixed::<1>()[0]
    }
    fn u16(&mut self) -> u16 {
        u16::from_le_bytes(self.fixed())
    }
    fn u32(&mut self) -> u32 {
        u32::from_le_bytes(self.fixed())
    }
    fn u64(&mut self) -> u64 {
        u64::from_le_bytes(self.fixed())
    }
}

/// The index bytes of `slots`, `blobs` and `base_name` (the header's
/// counts and `pages_per_chunk` must match).
pub(crate) fn encode_index(
    pages_per_chunk: u32,
    slots: &[Slot],
    blobs: &[BlobEntry],
    base_name: Option<&str>,
) -> Vec<u8> {
    let map = bitmap_bytes(pages_per_chunk);
    let name = base_name.unwrap_or("").as_bytes();
    let mut out =
        Vec::with_capacity(slots.len() * (4 + 2 * map) + blobs.len() * BLOB_REC + 4 + name.len());
    for s in slots {
        out.extend_from_slice(&s.blob.unwrap_or(NO_BLOB).to_le_bytes());
        push_bitmap(&mut out, &s.own, map);
        push_bitmap(&mut out, &s.from_base, map);
    }
    for b in blobs {
        let (kind, loc) = match b.location {
            BlobLocation::Data { offset } => (0u8, offset),
            BlobLocation::Base { index } => (1u8, index as u64),
        };
        out.push(kind);
        out.push(match b.codec {
            Codec::None => 0,
            Codec::Lz4 => 1,
            Codec::Zstd => 2,
        });
        out.extend_from_slice(&0u16.to_le_bytes());
        out.extend_from_slice(&b.pages.to_le_bytes());
        out.extend_from_slice(&b.stored_len.to_le_bytes());
        out.extend_from_slice(&0u32.to_le_bytes());
        out.extend_from_slice(&loc.to_le_bytes());
        out.extend_from_slice(&b.checksum.to_le_bytes());
        out.extend_from_slice(&b.hash);
    }
    out.extend_from_slice(&(name.len() as u32).to_le_bytes());
    out.extend_from_slice(name);
    out
}

impl Codec {
    /// Its name, as in `--codec`.
    pub fn name(self) -> &'static str {
        match self {
            Codec::None => "none",
            Codec::Lz4 => "lz4",
            Codec::Zstd => "zstd",
        }
    }
}
