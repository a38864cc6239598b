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

#![warn(missing_docs)]

mod format;
mod pack;
mod read;
mod source;
mod tools;

pub use format::{BlobEntry, BlobLocation, Codec, Header, Index, Slot, HEADER_LEN, MAGIC, VERSION};
pub use pack::{pack, PackOptions, PackReport};
pub use read::{
    decode, decode_into, BlobCache, BlobKey, GetError, Layer, Layers, PageFrom, ReadError,
};
pub use source::{ImageSource, DEFAULT_CACHE_BYTES};
pub use tools::{inspect, unpack, verify, Inspection, VerifyReport};

/// Why an image cannot be opened, read or written. Every message says what
/// was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Reading or writing a file failed.
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// What the OS said.
        error: std::io::Error,
    },
    /// The header or index is not a pagewire image of a version this build
    /// reads, or fails its checksum.
    #[error("{what}: not a valid pagewire image: {why}")]
    BadHeader {
        /// The image.
        what: String,
        /// What is wrong.
        why: String,
    },
    /// The file is shorter than its header says.
    #[error("{what}: truncated: {why} (was the copy or upload cut short?)")]
    Truncated {
        /// The image.
        what: String,
        /// What is missing.
        why: String,
    },
    /// The image's base was not given or not found.
    #[error("{what} needs its base image {base}, which was not found: {why}")]
    MissingBase {
        /// The image.
        what: String,
        /// The base looked for.
        base: String,
        /// Why it was not found.
        why: String,
    },
    /// The base found is not the one the image was packed against.
    #[error("{what} was packed against another base than {base} (base id {expected}, found {found}): give the base it was packed with")]
    BaseMismatch {
        /// The image.
        what: String,
        /// The base given.
        base: String,
        /// The base id the image records (hex).
        expected: String,
        /// The given base's id (hex).
        found: String,
    },
    /// A blob failed its checksum or did not decompress to its size.
    #[error("chunk {blob} is corrupt: {why}")]
    Corrupt {
        /// The blob's index in its image.
        blob: u32,
        /// What failed.
        why: String,
    },
    /// A request that cannot be done (bad options, base of a base...).
    #[error("{0}")]
    Invalid(String),
}

/// The bytes of a 4 KiB page: the unit of elision and of base references.
pub const PAGE: usize = 4096;

/// The chunk size `pack` uses unless told otherwise: 128 KiB.
///
/// Why (`docs/image-format.md`, "Measurements"): a fault that misses the
/// cache decodes its whole chunk, so cold random page reads get slower in
/// proportion to the chunk (about 2x from 128 to 256 KiB, 4x to 512 KiB),
/// while the image's size gains under 0.5% from bigger chunks and the
/// bytes of clones do not depend on it (pages, not chunks, are shared with
/// the base). Below 128 KiB the index grows (64 bytes per blob: 32 MiB of
/// blob table for 64 GiB at 128 KiB, fetched before a remote image is
/// served) for little gain in random reads.
pub const DEFAULT_CHUNK_SIZE: u32 = 128 << 10;
