//! The pagewire image format (`docs/image-format.md`): guest memory in
//! chunks that are compressed, content-addressed and checked when read, with
//! random access (serving one fault decodes only its chunk) and a base image
//! that per-VM or per-clone images refer to.
//!
//! # Shape
//! - [`Index`]: an image's header and tables, parsed and validated from its
//!   first bytes (a local file or an object in a store). It says, for every
//!   page, where its bytes come from ([`Layers::locate`]).
//! - [`decode`]: a stored blob's bytes, checked against its checksum and
//!   decompressed.
//! - [`Layers`]: an image over its base; [`Layers::read`] assembles any byte
//!   range through a caller's blob getter, so that local files
//!   ([`ImageSource`]) and remote stores (the `store` crate) share it.
//! - [`pack`], [`verify`], [`unpack`], [`inspect`]: the `pagewire image`
//!   commands' work, as functions.

mod format;
mod pack;
mod read;
mod source;
mod tools;

pub use format::{BlobEntry, BlobLocation, Codec, Header, Index, Slot, HEADER_LEN, MAGIC, VERSION};
pub use pack::{pack, PackOptions, PackReport};
pub use read::{decode, BlobCache, BlobKey, GetError, Layer, Layers, PageFrom, ReadError};
pub use source::{ImageSource, DEFAULT_CACHE_BYTES};
pub use tools::{inspect, unpack, verify, Inspection, VerifyReport};

/// Why an image cannot be opened, read or written. Every message says what
/// was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {error}")]
    Io { path: String, error: std::io::Error },
    /// The header or index is not a pagewire image of a version this build
    /// reads, or fails its checksum.
    #[error("{what}: not a valid pagewire image: {why}")]
    BadHeader { what: String, why: String },
    #[error("{what}: truncated: {why} (was the copy or upload cut short?)")]
    Truncated { what: String, why: String },
    #[error("{what} needs its base image {base}, which was not found: {why}")]
    MissingBase {
        what: String,
        base: String,
        why: String,
    },
    #[error("{what} was packed against another base than {base} (base id {expected}, found {found}): give the base it was packed with")]
    BaseMismatch {
        what: String,
        base: String,
        expected: String,
        found: String,
    },
    /// A blob failed its checksum or did not decompress to its size.
    #[error("chunk {blob} is corrupt: {why}")]
    Corrupt { blob: u32, why: String },
    #[error("{0}")]
    Invalid(String),
}

/// The bytes of a 4 KiB page: the unit of elision and of base references.
pub const PAGE: usize = 4096;

/// The chunk size `pack` uses unless told otherwise: 256 KiB (see
/// `docs/image-format.md`, "Measurements", for the figures behind it).
pub const DEFAULT_CHUNK_SIZE: u32 = 256 << 10;
