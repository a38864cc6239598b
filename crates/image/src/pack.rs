//! Packing a raw memory file into an image.

use std::path::{Path, PathBuf};

use crate::format::Codec;
use crate::ImageError;

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    pub codec: Codec,
    /// Compression level (zstd; lz4 and none ignore it).
    pub level: i32,
    /// Bytes per chunk: a power of two, 4 KiB to 4 MiB.
    pub chunk_size: u32,
    /// Pack against this base image: pages equal to the base's at the same
    /// offset, and blobs equal to one of the base's, refer to it.
    pub base: Option<PathBuf>,
    /// The memory file is a Firecracker Diff snapshot: its holes are pages
    /// that did not change since `base` (needs `base`), not zero pages.
    pub diff: bool,
}

/// What packing did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackReport {
    pub mem_len: u64,
    pub image_len: u64,
    pub slots: u64,
    pub blobs: u64,
    pub zero_pages: u64,
    pub base_pages: u64,
    pub dedup_blobs: u64,
    pub base_blobs: u64,
    pub seconds: f64,
}

/// Packs memory file `mem` into image `out` (written to a temporary file
/// beside it and renamed: `out` is whole or absent). `progress` is called
/// with the bytes of `mem` done so far.
pub fn pack(
    mem: &Path,
    out: &Path,
    options: &PackOptions,
    progress: &mut dyn FnMut(u64),
) -> Result<PackReport, ImageError> {
    let _ = (mem, out, options, progress);
    todo!()
}
