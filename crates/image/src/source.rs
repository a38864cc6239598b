//! A local image (and its base) as a page source.

use std::path::Path;

use pager::{PageSource, SourceError};

use crate::ImageError;

/// Serves pages from an image file and its base file: each read decodes
/// only the blobs it touches, keeps decoded blobs in a bounded
/// [`BlobCache`](crate::BlobCache), and reports the pages of a blob that
/// fails its checksum as untrusted (logged once per blob, counted).
pub struct ImageSource {
    _p: (),
}

impl ImageSource {
    /// Opens `path`; its base is `base`, or else the name its index gives,
    /// beside it. Every check of [`Index`](crate::Index) and
    /// [`Layers::new`](crate::Layers::new) happens here, before any VM waits.
    pub fn open(
        path: &Path,
        base: Option<&Path>,
        cache_bytes: usize,
    ) -> Result<ImageSource, ImageError> {
        let _ = (path, base, cache_bytes);
        todo!()
    }

    /// Blobs that failed their checksum so far.
    pub fn corrupt_blobs(&self) -> u64 {
        todo!()
    }
}

impl PageSource for ImageSource {
    fn len(&self) -> u64 {
        todo!()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let _ = (offset, buf);
        todo!()
    }

    fn describe(&self) -> String {
        todo!()
    }
}
