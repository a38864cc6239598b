//! A local image (and its base) as a page source.

use std::cell::RefCell;
use std::fs::File;
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use pager::{PageSource, SourceError};

use crate::format::{BlobEntry, BlobLocation, Codec, Index, HEADER_LEN};
use crate::read::{
    check_stored, decode_into, BlobCache, BlobKey, GetError, Layer, Layers, PageFrom, ReadError,
};
use crate::{ImageError, PAGE};

/// The default bound of an [`ImageSource`]'s decoded-blob cache: 32 MiB.
///
/// Why: only compressed chunks are cached (chunks stored as is are read
/// straight from the file, whose pages the kernel caches), and a chunk's
/// pages are wanted close together in time (a fault's neighbours, a
/// sequential stream, another VM restoring the same image). Measured on
/// `pagewire bench --content mixed` (256 MiB, lz4 4.3x): with a 256 MiB
/// cache sequential first touch ran at 1.8 GiB/s and a quarter of the
/// server's CPU went to page faults on freshly allocated chunk buffers;
/// with 32 MiB, evicted buffers are reused and it ran at 2.5 GiB/s (raw
/// file 2.7), random 0.73 (raw 0.83), for an eighth of the memory.
pub const DEFAULT_CACHE_BYTES: usize = 32 << 20;

/// Serves pages from an image file and its base file: each read decodes
/// only the blobs it touches, keeps decoded blobs in a bounded
/// [`BlobCache`](crate::BlobCache), and reports the pages of a blob that
/// fails its checksum as untrusted (logged once per blob, counted).
pub struct ImageSource {
    layers: Layers,
    top: LayerFile,
    base: Option<LayerFile>,
    cache: BlobCache,
    corrupt: AtomicU64,
    zeros: Vec<Range<u64>>,
}

/// One image file of the layers.
pub(crate) struct LayerFile {
    pub(crate) file: File,
    pub(crate) path: PathBuf,
    /// Blobs that failed their checksum: never decoded again.
    bad: Vec<AtomicBool>,
    /// Blobs stored as is (codec none) whose checksum was checked: read
    /// straight from the file into the caller's buffer from then on.
    verified: Vec<AtomicBool>,
}

/// An image and its base, opened and checked.
pub(crate) struct Opened {
    pub(crate) layers: Layers,
    pub(crate) top: LayerFile,
    pub(crate) base: Option<LayerFile>,
}

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> ImageError + '_ {
    move |error| ImageError::Io {
        path: path.display().to_string(),
        error,
    }
}

/// Opens an image file and parses its header and index, checking its length.
pub(crate) fn open_index(path: &Path) -> Result<(File, Index), ImageError> {
    let io = io_err(path);
    let file = File::open(path).map_err(&io)?;
    let len = file.metadata().map_err(&io)?.len();
    let what = path.display().to_string();
    let mut first = vec![0u8; HEADER_LEN.min(len as usize)];
    file.read_exact_at(&mut first, 0).map_err(&io)?;
    let needed = Index::needed(&first, &what)?;
    if needed > len {
        return Err(ImageError::Truncated {
            what,
            why: format!("{len} bytes, the header and index need {needed}"),
        });
    }
    let needed = usize::try_from(needed).map_err(|_| ImageError::BadHeader {
        what: what.clone(),
        why: "index too large".into(),
    })?;
    let mut bytes = vec![0u8; needed];
    file.read_exact_at(&mut bytes, 0).map_err(&io)?;
    let index = Index::parse(&bytes, &what)?;
    index.check_len(len, &what)?;
    Ok((file, index))
}

/// Opens `path` and its base (`base`, or the name its index gives, beside
/// it) and checks that they match.
pub(crate) fn open_layers(path: &Path, base: Option<&Path>) -> Result<Opened, ImageError> {
    let (file, index) = open_index(path)?;
    let what = path.display().to_string();
    let base_path = match (base, &index.base_name) {
        (Some(b), _) => Some(b.to_path_buf()),
        (None, Some(name)) => Some(path.parent().unwrap_or(Path::new(".")).join(name)),
        (None, None) => None,
    };
    let base = match &base_path {
        Some(bp) if index.has_base() => match open_index(bp) {
            Ok(b) => Some(b),
            Err(ImageError::Io { error, .. }) if error.kind() == std::io::ErrorKind::NotFound => {
                return Err(ImageError::MissingBase {
                    what,
                    base: bp.display().to_string(),
                    why: error.to_string(),
                })
            }
            Err(e) => return Err(e),
        },
        Some(bp) => {
            return Err(ImageError::Invalid(format!(
                "{what} has no base image, but {} was given as its base",
                bp.display()
            )))
        }
        None => None,
    };
    let base_what = base_path
        .as_ref()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "its base".into());
    let (base_file, base_index) = match base {
        Some((f, i)) => (Some(f), Some(i)),
        None => (None, None),
    };
    let layers = Layers::new_named(index, base_index, &what, &base_what)?;
    let layer = |file: File, path: PathBuf, n: usize| LayerFile {
        file,
        path,
        bad: (0..n).map(|_| AtomicBool::new(false)).collect(),
        verified: (0..n).map(|_| AtomicBool::new(false)).collect(),
    };
    let top = layer(file, path.to_path_buf(), layers.top().blobs.len());
    let base = match (base_file, base_path, layers.base()) {
        (Some(f), Some(p), Some(b)) => Some(layer(f, p, b.blobs.len())),
        _ => None,
    };
    Ok(Opened { layers, top, base })
}

/// Why a blob could not be had.
pub(crate) enum Fetch {
    Io(std::io::Error),
    Corrupt(ImageError),
}

thread_local! {
    /// Stored (compressed) bytes of the blob being decoded: one buffer per
    /// serving thread, not an allocation per read.
    static STORED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Reads and decodes blob `index` of an image (its xxh3 is checked, not
/// its content hash) into a new buffer.
pub(crate) fn load_blob(
    file: &File,
    index: &Index,
    blob: u32,
    entry: &BlobEntry,
    cache: Option<&BlobCache>,
) -> Result<Arc<[u8]>, Fetch> {
    let BlobLocation::Data { offset } = entry.location else {
        return Err(Fetch::Corrupt(ImageError::Corrupt {
            blob,
            why: "refers to a base blob, not to bytes of this image".into(),
        }));
    };
    let at = index.header.data_offset + offset;
    let n = entry.pages as usize * PAGE;
    let mut out: Arc<[u8]> = match cache {
        Some(c) => c.buffer(n),
        None => std::iter::repeat_n(0u8, n).collect(),
    };
    let Some(dst) = Arc::get_mut(&mut out) else {
        return Err(Fetch::Io(std::io::Error::other("a fresh buffer is shared")));
    };
    if entry.codec == Codec::None {
        // Stored as is: read straight into the decoded buffer.
        file.read_exact_at(dst, at).map_err(Fetch::Io)?;
        check_stored(blob, entry, dst).map_err(Fetch::Corrupt)?;
    } else {
        STORED.with(|s| {
            let mut s = s.borrow_mut();
            s.resize(entry.stored_len as usize, 0);
            file.read_exact_at(&mut s, at).map_err(Fetch::Io)?;
            decode_into(blob, entry, &s, dst).map_err(Fetch::Corrupt)
        })?;
    }
    Ok(out)
}

impl ImageSource {
    /// Opens `path`; its base is `base`, or else the name its index gives,
    /// beside it. Every check of [`Index`](crate::Index) and
    /// [`Layers::new`](crate::Layers::new) happens here, before any VM waits.
    /// `cache_bytes` bounds the decoded blobs kept
    /// ([`DEFAULT_CACHE_BYTES`] is a good default).
    pub fn open(
        path: &Path,
        base: Option<&Path>,
        cache_bytes: usize,
    ) -> Result<ImageSource, ImageError> {
        let Opened { layers, top, base } = open_layers(path, base)?;
        let zeros = layers.zero_ranges();
        Ok(ImageSource {
            layers,
            top,
            base,
            cache: BlobCache::new(cache_bytes),
            corrupt: AtomicU64::new(0),
            zeros,
        })
    }

    /// Blobs that failed their checksum so far.
    pub fn corrupt_blobs(&self) -> u64 {
        self.corrupt.load(Ordering::Relaxed)
    }

    /// The image over its base.
    pub fn layers(&self) -> &Layers {
        &self.layers
    }

    fn layer(&self, key: BlobKey) -> &LayerFile {
        match (key.layer, &self.base) {
            (Layer::Base, Some(b)) => b,
            _ => &self.top,
        }
    }

    /// The index a blob's entry and data offset are in.
    fn index_of(&self, key: BlobKey) -> &Index {
        match key.layer {
            Layer::Base => self.layers.base().unwrap_or(self.layers.top()),
            Layer::Top => self.layers.top(),
        }
    }

    /// Logs and counts a corrupt blob, once (whichever thread sees it
    /// first), and marks it bad.
    fn corrupt_once(&self, key: BlobKey, e: &ImageError) {
        let layer = self.layer(key);
        if layer
            .bad
            .get(key.index as usize)
            .is_some_and(|b| !b.swap(true, Ordering::Relaxed))
        {
            self.corrupt.fetch_add(1, Ordering::Relaxed);
            let ranges = self.layers.ranges_of(key);
            tracing::error!(
                image = %layer.path.display(),
                blob = key.index,
                "{}: {e}; the memory it holds, {}, is poisoned (the guest gets SIGBUS there)",
                layer.path.display(),
                format_ranges(&ranges),
            );
        }
    }

    /// Where the page at `offset` is stored as is, in a blob whose
    /// checksum was checked: (its layer file, its file offset). Checks the
    /// blob (reading it whole once) the first time; `None` for pages that
    /// are zero, compressed, bad, or whose blob cannot be read now.
    fn direct(&self, offset: u64) -> Option<(&LayerFile, u64)> {
        let PageFrom::Blob { key, page } = self.layers.locate(offset) else {
            return None;
        };
        let entry = self.layers.entry(key);
        let BlobLocation::Data { offset: at } = entry.location else {
            return None;
        };
        if entry.codec != Codec::None {
            return None;
        }
        let layer = self.layer(key);
        let i = key.index as usize;
        if layer.bad.get(i)?.load(Ordering::Relaxed) {
            return None;
        }
        let start = self.index_of(key).header.data_offset + at;
        if !layer.verified.get(i)?.load(Ordering::Relaxed) {
            let checked = STORED.with(|s| {
                let mut s = s.borrow_mut();
                s.resize(entry.stored_len as usize, 0);
                layer.file.read_exact_at(&mut s, start).ok()?;
                Some(check_stored(key.index, entry, &s))
            })?;
            if let Err(e) = checked {
                self.corrupt_once(key, &e);
                return None;
            }
            layer.verified.get(i)?.store(true, Ordering::Relaxed);
        }
        Some((layer, start + u64::from(page) * PAGE as u64))
    }

    /// Fills `buf` from `offset`: pages stored as is come straight from the
    /// file (after their blob's checksum was checked once), as from a raw
    /// memory file, with no copy and no cache; zero pages are zeroed; the
    /// rest (compressed, bad, or in a blob not checked yet that cannot be
    /// read) goes through [`Layers::read`] and the cache.
    fn read_pages(&self, offset: u64, buf: &mut [u8]) -> Result<(), ReadError> {
        let end = offset + buf.len() as u64;
        let mut bad: Vec<Range<u64>> = Vec::new();
        let mut why = String::new();
        let mut pending = false;
        let mut pos = offset;
        while pos < end {
            let page_end = ((pos & !(PAGE as u64 - 1)) + PAGE as u64).min(end);
            let zero = matches!(self.layers.locate(pos & !(PAGE as u64 - 1)), PageFrom::Zero);
            let direct = if zero {
                None
            } else {
                self.direct(pos & !(PAGE as u64 - 1))
            };
            if zero || direct.is_some() {
                // A run of zero pages, or of pages contiguous in one file.
                let mut run_end = page_end;
                while run_end < end {
                    let next = match (zero, &direct) {
                        (true, _) => {
                            matches!(self.layers.locate(run_end), PageFrom::Zero)
                        }
                        (false, Some((l, at))) => self.direct(run_end).is_some_and(|(l2, at2)| {
                            std::ptr::eq(*l, l2)
                                && at2 == at + (run_end - (pos & !(PAGE as u64 - 1)))
                        }),
                        (false, None) => false,
                    };
                    if !next {
                        break;
                    }
                    run_end = (run_end + PAGE as u64).min(end);
                }
                let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
                match direct {
                    None => dst.fill(0),
                    Some((layer, at)) => {
                        let from = at + (pos & (PAGE as u64 - 1));
                        if let Err(e) = layer.file.read_exact_at(dst, from) {
                            return Err(ReadError::Failed(format!(
                                "{}: reading [{from:#x}, +{:#x}): {e}",
                                layer.path.display(),
                                dst.len()
                            )));
                        }
                    }
                }
                pos = run_end;
                continue;
            }
            // A run of pages that need decoding: up to the next page that
            // does not.
            let mut run_end = page_end;
            while run_end < end {
                let p = run_end;
                if matches!(self.layers.locate(p), PageFrom::Zero) || self.direct(p).is_some() {
                    break;
                }
                run_end = (run_end + PAGE as u64).min(end);
            }
            let dst = &mut buf[(pos - offset) as usize..(run_end - offset) as usize];
            match self.layers.read(pos, dst, &mut |k, e| self.get(k, e)) {
                Ok(()) => {}
                Err(ReadError::Untrusted { bad: b, why: w }) => {
                    bad.extend(b);
                    if !why.is_empty() {
                        why.push_str("; ");
                    }
                    why.push_str(&w);
                }
                Err(ReadError::Pending) => pending = true,
                Err(e @ ReadError::Failed(_)) => return Err(e),
            }
            pos = run_end;
        }
        if pending {
            Err(ReadError::Pending)
        } else if !bad.is_empty() {
            Err(ReadError::Untrusted { bad, why })
        } else {
            Ok(())
        }
    }

    /// The getter of [`Layers::read`]: cache, else pread + decode + cache.
    fn get(&self, key: BlobKey, entry: &BlobEntry) -> Result<Arc<[u8]>, GetError> {
        let layer = self.layer(key);
        let poisoned = || {
            GetError::Untrusted(format!(
                "chunk {} of {} is corrupt: its pages are poisoned",
                key.index,
                layer.path.display()
            ))
        };
        let bad = layer.bad.get(key.index as usize);
        if bad.is_some_and(|b| b.load(Ordering::Relaxed)) {
            return Err(poisoned());
        }
        if let Some(blob) = self.cache.get(&entry.hash) {
            return Ok(blob);
        }
        let index = match key.layer {
            Layer::Base => self.layers.base().unwrap_or(self.layers.top()),
            Layer::Top => self.layers.top(),
        };
        match load_blob(&layer.file, index, key.index, entry, Some(&self.cache)) {
            Ok(blob) => {
                self.cache.insert(entry.hash, blob.clone());
                Ok(blob)
            }
            Err(Fetch::Io(e)) => Err(GetError::Failed(format!(
                "{}: reading chunk {}: {e}",
                layer.path.display(),
                key.index
            ))),
            Err(Fetch::Corrupt(e)) => {
                self.corrupt_once(key, &e);
                Err(poisoned())
            }
        }
    }
}

/// Ranges as `[0x1000, 0x3000) ...`, for logs.
fn format_ranges(ranges: &[Range<u64>]) -> String {
    let parts: Vec<String> = ranges
        .iter()
        .map(|r| format!("[{:#x}, {:#x})", r.start, r.end))
        .collect();
    parts.join(" ")
}

impl PageSource for ImageSource {
    fn len(&self) -> u64 {
        self.layers.len()
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let len = self.layers.len();
        if offset.checked_add(buf.len() as u64).is_none_or(|e| e > len) {
            return Err(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                source_len: len,
            });
        }
        self.read_pages(offset, buf).map_err(|e| match e {
            ReadError::Untrusted { bad, why } => SourceError::Untrusted { bad, why },
            ReadError::Pending => SourceError::Pending,
            ReadError::Failed(why) => SourceError::Io {
                path: self.top.path.display().to_string(),
                error: std::io::Error::other(why),
            },
        })
    }

    fn zero_ranges(&self) -> &[Range<u64>] {
        &self.zeros
    }

    fn describe(&self) -> String {
        let h = &self.layers.top().header;
        let base = match &self.base {
            Some(b) => format!(" over base {}", b.path.display()),
            None => String::new(),
        };
        format!(
            "image {}{base} ({} bytes in {} KiB chunks)",
            self.top.path.display(),
            h.mem_len,
            h.chunk_size >> 10
        )
    }
}
