//! The on-disk layout (`docs/image-format.md`): header, index, data.

use crate::ImageError;

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
        let _ = (first, what);
        todo!()
    }

    /// Parses and validates the header and index from the image's first
    /// bytes (at least [`Index::needed`]). `what` names the image in errors.
    pub fn parse(bytes: &[u8], what: &str) -> Result<Index, ImageError> {
        let _ = (bytes, what);
        todo!()
    }

    /// Checks that an image of `len` bytes holds all its data
    /// ([`ImageError::Truncated`] otherwise).
    pub fn check_len(&self, len: u64, what: &str) -> Result<(), ImageError> {
        let _ = (len, what);
        todo!()
    }

    pub fn has_base(&self) -> bool {
        self.header.base_id != [0; 32]
    }

    /// The id as hex, for messages.
    pub fn id_hex(&self) -> String {
        self.header.id.iter().map(|b| format!("{b:02x}")).collect()
    }
}
