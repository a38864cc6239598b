//! `image inspect`, `verify`, `unpack`.

use std::path::Path;

use crate::ImageError;

/// What `image inspect` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    pub version: u32,
    pub id: String,
    pub base_id: Option<String>,
    pub base_name: Option<String>,
    pub codec: String,
    pub chunk_size: u32,
    pub mem_len: u64,
    pub image_len: u64,
    /// mem_len / image_len.
    pub ratio: f64,
    pub zero_pages: u64,
    pub base_pages: u64,
    pub own_pages: u64,
    pub blobs: u64,
    /// Slots whose blob another slot shares (stored once).
    pub duplicate_slots: u64,
    /// Blobs stored in the base, not here.
    pub base_blobs: u64,
}

pub fn inspect(path: &Path, base: Option<&Path>) -> Result<Inspection, ImageError> {
    let _ = (path, base);
    todo!()
}

/// What `image verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    pub blobs: u64,
    /// (blob index, reason) of every blob that failed.
    pub corrupt: Vec<(u32, String)>,
}

/// Decodes every blob of the image (and of its base that it uses) and checks
/// both checksums.
pub fn verify(
    path: &Path,
    base: Option<&Path>,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, ImageError> {
    let _ = (path, base, progress);
    todo!()
}

/// Writes the memory back out, byte for byte (zero pages as holes).
pub fn unpack(
    path: &Path,
    base: Option<&Path>,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, ImageError> {
    let _ = (path, base, out, progress);
    todo!()
}
