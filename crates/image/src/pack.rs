//! Packing a raw memory file into an image.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::format::{
    encode_index, BlobEntry, BlobLocation, Codec, Header, Index, Slot, HEADER_LEN, MAX_CHUNK,
    MAX_NAME, MIN_CHUNK, VERSION,
};
use crate::read::{bit, decode};
use crate::source::open_index;
use crate::{ImageError, PAGE};

/// How to pack.
#[derive(Debug, Clone)]
pub struct PackOptions {
    /// How blobs are compressed (a blob that compression does not shrink by
    /// at least 1/8 is stored as is whatever this says).
    pub codec: Codec,
    /// Compression level (zstd; lz4 and none ignore it).
    pub level: i32,
    /// Bytes per chunk: a power of two, 4 KiB to 4 MiB. With a base, the
    /// base's chunk size is used.
    pub chunk_size: u32,
    /// Pack against this base image: pages equal to the base's at the same
    /// offset, and blobs equal to one of the base's, refer to it.
    pub base: Option<PathBuf>,
    /// The memory file is a Firecracker Diff snapshot: its holes are pages
    /// that did not change since `base` (needs `base`), not zero pages.
    pub diff: bool,
}

impl Default for PackOptions {
    fn default() -> PackOptions {
        PackOptions {
            codec: Codec::Lz4,
            level: 3,
            chunk_size: crate::DEFAULT_CHUNK_SIZE,
            base: None,
            diff: false,
        }
    }
}

/// What packing did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PackReport {
    /// The memory's size.
    pub mem_len: u64,
    /// The image file's size.
    pub image_len: u64,
    /// Chunks of memory.
    pub slots: u64,
    /// Entries of the blob table (stored here or referring to the base).
    pub blobs: u64,
    /// Pages elided as zero.
    pub zero_pages: u64,
    /// Pages taken from the base at the same offset.
    pub base_pages: u64,
    /// Slots whose blob an earlier slot of this image already stored.
    pub dedup_blobs: u64,
    /// Blobs equal to one of the base's (stored there, not here).
    pub base_blobs: u64,
    /// Wall time.
    pub seconds: f64,
}

/// Memory read and classified per batch (then compressed by the workers).
const BATCH_BYTES: u64 = 16 << 20;

static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// A base image opened for packing against.
struct Base {
    file: File,
    index: Index,
    path: PathBuf,
    hashes: HashMap<[u8; 32], u32>,
}

/// One slot, classified and its blob compressed, by a worker.
struct SlotWork {
    own: Vec<u64>,
    from_base: Vec<u64>,
    zero_pages: u64,
    base_pages: u64,
    blob: Option<BlobWork>,
}

struct BlobWork {
    hash: [u8; 32],
    pages: u32,
    stored: Stored,
}

enum Stored {
    /// Equal to this blob of the base.
    Base(u32),
    Bytes {
        codec: Codec,
        bytes: Vec<u8>,
    },
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
    let started = Instant::now();
    let mem_io = |error| ImageError::Io {
        path: mem.display().to_string(),
        error,
    };
    let out_io = |error| ImageError::Io {
        path: out.display().to_string(),
        error,
    };
    if options.diff && options.base.is_none() {
        return Err(ImageError::Invalid(
            "a diff snapshot's holes are pages of its base: give the base image it was taken over"
                .into(),
        ));
    }
    let base = match &options.base {
        Some(p) => {
            let (file, index) = open_index(p)?;
            if index.has_base() {
                return Err(ImageError::Invalid(format!(
                    "{} has a base image itself: pack against a full image (format v1 has one level of bases)",
                    p.display()
                )));
            }
            let hashes = index
                .blobs
                .iter()
                .enumerate()
                .map(|(i, b)| (b.hash, i as u32))
                .collect();
            Some(Base {
                file,
                index,
                path: p.clone(),
                hashes,
            })
        }
        None => None,
    };
    let chunk_size = match &base {
        Some(b) => {
            if b.index.header.chunk_size != options.chunk_size {
                tracing::info!(
                    "packing in the base's {}-byte chunks (not {})",
                    b.index.header.chunk_size,
                    options.chunk_size
                );
            }
            b.index.header.chunk_size
        }
        None => options.chunk_size,
    };
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(ImageError::Invalid(format!(
            "chunk size {chunk_size} is not a power of two from {MIN_CHUNK} to {MAX_CHUNK}"
        )));
    }
    let mem_file = File::open(mem).map_err(mem_io)?;
    let mem_len = mem_file.metadata().map_err(mem_io)?.len();
    if mem_len % PAGE as u64 != 0 {
        return Err(ImageError::Invalid(format!(
            "{}: {mem_len} bytes, not a whole number of {PAGE}-byte pages (not a memory file?)",
            mem.display()
        )));
    }
    let base_name = match &base {
        Some(b) => Some(relative_name(&b.path, out)?),
        None => None,
    };
    let holes = pager::source::find_holes(&mem_file, mem_len);
    let cs = chunk_size as u64;
    let ppc = chunk_size / PAGE as u32;
    let slot_count = mem_len.div_ceil(cs);

    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let data_tmp = tempfile::tempfile_in(&dir).map_err(out_io)?;
    let mut data = BufWriter::with_capacity(1 << 20, data_tmp);
    let mut data_len = 0u64;

    let mut slots: Vec<Slot> = Vec::with_capacity(slot_count as usize);
    let mut blobs: Vec<BlobEntry> = Vec::new();
    let mut by_hash: HashMap<[u8; 32], u32> = HashMap::new();
    let mut report = PackReport {
        mem_len,
        image_len: 0,
        slots: slot_count,
        blobs: 0,
        zero_pages: 0,
        base_pages: 0,
        dedup_blobs: 0,
        base_blobs: 0,
        seconds: 0.0,
    };
    let threads = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1)
        .clamp(1, 4);
    let per_batch = (BATCH_BYTES / cs).max(1);
    let mut buf = vec![0u8; (per_batch * cs) as usize];
    let mut first = 0u64;
    while first < slot_count {
        let last = (first + per_batch).min(slot_count);
        let range = first * cs..(last * cs).min(mem_len);
        let bytes = &mut buf[..(range.end - range.start) as usize];
        read_data(&mem_file, range.clone(), &holes, bytes).map_err(mem_io)?;
        let bytes = &buf[..(range.end - range.start) as usize];
        let ctx = Ctx {
            base: base.as_ref(),
            holes: &holes,
            diff: options.diff,
            codec: options.codec,
            level: options.level,
            cs,
            ppc,
            mem_len,
        };
        let n = (last - first) as usize;
        let mut works: Vec<Option<SlotWork>> = (0..n).map(|_| None).collect();
        let results: Vec<Result<Vec<(usize, SlotWork)>, ImageError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads.min(n))
                .map(|t| {
                    let ctx = &ctx;
                    s.spawn(move || {
                        let mut z = None;
                        let mut done = Vec::new();
                        for i in (t..n).step_by(threads) {
                            let slot = first + i as u64;
                            let at = i * cs as usize;
                            let end = (at + cs as usize).min(bytes.len());
                            done.push((i, ctx.slot(slot, &bytes[at..end], &mut z)?));
                        }
                        Ok(done)
                    })
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(ImageError::Invalid("a packing thread panicked".into()))
                    })
                })
                .collect()
        });
        for r in results {
            for (i, w) in r? {
                works[i] = Some(w);
            }
        }
        for w in works.into_iter().flatten() {
            report.zero_pages += w.zero_pages;
            report.base_pages += w.base_pages;
            let blob = match w.blob {
                None => None,
                Some(b) => Some(match by_hash.get(&b.hash) {
                    Some(&i) => {
                        report.dedup_blobs += 1;
                        i
                    }
                    None => {
                        let i = blobs.len() as u32;
                        let entry = match b.stored {
                            Stored::Base(bi) => {
                                report.base_blobs += 1;
                                let be = base
                                    .as_ref()
                                    .and_then(|base| base.index.blobs.get(bi as usize))
                                    .ok_or_else(|| {
                                        ImageError::Invalid(format!("no base blob {bi}"))
                                    })?;
                                BlobEntry {
                                    location: BlobLocation::Base { index: bi },
                                    ..be.clone()
                                }
                            }
                            Stored::Bytes { codec, bytes } => {
                                data.write_all(&bytes).map_err(out_io)?;
                                let e = BlobEntry {
                                    location: BlobLocation::Data { offset: data_len },
                                    codec,
                                    pages: b.pages,
                                    stored_len: bytes.len() as u32,
                                    checksum: xxhash_rust::xxh3::xxh3_64(&bytes),
                                    hash: b.hash,
                                };
                                data_len += bytes.len() as u64;
                                e
                            }
                        };
                        blobs.push(entry);
                        by_hash.insert(b.hash, i);
                        i
                    }
                }),
            };
            slots.push(Slot {
                blob,
                own: w.own,
                from_base: w.from_base,
            });
        }
        progress(range.end);
        first = last;
    }
    report.blobs = blobs.len() as u64;

    let index = encode_index(ppc, &slots, &blobs, base_name.as_deref());
    let index_len = index.len() as u64;
    let header = Header {
        version: VERSION,
        chunk_size,
        mem_len,
        slot_count,
        blob_count: blobs.len() as u64,
        index_offset: HEADER_LEN as u64,
        index_len,
        data_offset: HEADER_LEN as u64 + index_len,
        data_len,
        id: *blake3::hash(&index).as_bytes(),
        base_id: base.as_ref().map(|b| b.index.header.id).unwrap_or([0; 32]),
    };
    let mut data = data.into_inner().map_err(|e| out_io(e.into_error()))?;
    data.seek(SeekFrom::Start(0)).map_err(out_io)?;
    let mut tmp = tempfile::NamedTempFile::new_in(&dir).map_err(out_io)?;
    {
        let f = tmp.as_file_mut();
        f.write_all(&header.encode()).map_err(out_io)?;
        f.write_all(&index).map_err(out_io)?;
        // copy_file_range on Linux: the data stays in the kernel.
        let copied = std::io::copy(&mut data, f).map_err(out_io)?;
        if copied != data_len {
            return Err(out_io(std::io::Error::other(format!(
                "copied {copied} bytes of data, wrote {data_len}"
            ))));
        }
        f.sync_all().map_err(out_io)?;
    }
    tmp.persist(out).map_err(|e| out_io(e.error))?;
    if let Ok(d) = File::open(&dir) {
        let _ = d.sync_all();
    }
    report.image_len = header.data_offset + data_len;
    report.seconds = started.elapsed().as_secs_f64();
    tracing::info!(
        "packed {} ({} bytes) into {} ({} bytes, {} blobs) in {:.2} s",
        mem.display(),
        mem_len,
        out.display(),
        report.image_len,
        report.blobs,
        report.seconds
    );
    Ok(report)
}

/// What the workers share.
struct Ctx<'a> {
    base: Option<&'a Base>,
    holes: &'a [Range<u64>],
    diff: bool,
    codec: Codec,
    level: i32,
    cs: u64,
    ppc: u32,
    mem_len: u64,
}

impl Ctx<'_> {
    /// Classifies slot `s`'s pages (`bytes`: its bytes, holes read as zero)
    /// and compresses its blob.
    fn slot(
        &self,
        s: u64,
        bytes: &[u8],
        zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    ) -> Result<SlotWork, ImageError> {
        let words = (self.ppc as usize).div_ceil(64);
        let mut own = vec![0u64; words];
        let mut from_base = vec![0u64; words];
        let mut zero_pages = 0;
        let mut base_pages = 0;
        let mut raw: Vec<u8> = Vec::new();
        let base_slot = self
            .base
            .and_then(|b| b.index.slots.get(s as usize))
            .filter(|bs| {
                // The base's memory may be shorter than this one.
                bs.blob.is_some()
            });
        let mut base_blob: Option<Vec<u8>> = None;
        let start = s * self.cs;
        for (p, page) in bytes.chunks(PAGE).enumerate() {
            let at = start + (p * PAGE) as u64;
            let in_base = base_slot.is_some_and(|bs| bit(&bs.own, p));
            let set = |m: &mut Vec<u64>| m[p / 64] |= 1 << (p % 64);
            if in_hole(self.holes, at) {
                if self.diff && in_base {
                    set(&mut from_base);
                    base_pages += 1;
                } else {
                    zero_pages += 1;
                }
                continue;
            }
            if page == &ZERO_PAGE[..page.len()] {
                zero_pages += 1;
                continue;
            }
            if let (true, Some(bs), Some(base)) = (in_base, base_slot, self.base) {
                if base_blob.is_none() {
                    base_blob = Some(decode_base(base, bs)?);
                }
                let k = crate::read::rank(&bs.own, p) as usize;
                let same = base_blob
                    .as_ref()
                    .and_then(|b| b.get(k * PAGE..(k + 1) * PAGE))
                    .is_some_and(|b| b == page);
                if same {
                    set(&mut from_base);
                    base_pages += 1;
                    continue;
                }
            }
            set(&mut own);
            if raw.is_empty() {
                raw.reserve(bytes.len());
            }
            raw.extend_from_slice(page);
        }
        debug_assert!(start + bytes.len() as u64 <= self.mem_len);
        let blob = if raw.is_empty() {
            None
        } else {
            let hash = *blake3::hash(&raw).as_bytes();
            let pages = (raw.len() / PAGE) as u32;
            let base_hit = self
                .base
                .and_then(|b| b.hashes.get(&hash).map(|&i| (i, b)))
                .filter(|(i, b)| {
                    b.index
                        .blobs
                        .get(*i as usize)
                        .is_some_and(|e| e.pages == pages)
                });
            let stored = match base_hit {
                Some((i, _)) => Stored::Base(i),
                None => self.compress(raw, zstd)?,
            };
            Some(BlobWork {
                hash,
                pages,
                stored,
            })
        };
        Ok(SlotWork {
            own,
            from_base,
            zero_pages,
            base_pages,
            blob,
        })
    }

    /// Compresses a blob, keeping it as is unless that saves 1/8.
    fn compress(
        &self,
        raw: Vec<u8>,
        zstd: &mut Option<zstd::bulk::Compressor<'static>>,
    ) -> Result<Stored, ImageError> {
        let packed = match self.codec {
            Codec::None => None,
            Codec::Lz4 => Some(lz4_flex::block::compress(&raw)),
            Codec::Zstd => {
                if zstd.is_none() {
                    *zstd = Some(zstd::bulk::Compressor::new(self.level).map_err(|e| {
                        ImageError::Invalid(format!("zstd level {}: {e}", self.level))
                    })?);
                }
                match zstd.as_mut() {
                    Some(z) => Some(
                        z.compress(&raw)
                            .map_err(|e| ImageError::Invalid(format!("zstd: {e}")))?,
                    ),
                    None => None,
                }
            }
        };
        Ok(match packed {
            Some(p) if p.len() <= raw.len() - raw.len() / 8 => Stored::Bytes {
                codec: self.codec,
                bytes: p,
            },
            _ => Stored::Bytes {
                codec: Codec::None,
                bytes: raw,
            },
        })
    }
}

/// The decoded blob of a base slot, checked (both checksums: what a clone
/// refers to had better be right).
fn decode_base(base: &Base, slot: &Slot) -> Result<Vec<u8>, ImageError> {
    let Some(bi) = slot.blob else {
        return Ok(Vec::new());
    };
    let entry = base
        .index
        .blobs
        .get(bi as usize)
        .ok_or_else(|| ImageError::Invalid(format!("no base blob {bi}")))?;
    let BlobLocation::Data { offset } = entry.location else {
        return Err(ImageError::Invalid(format!(
            "{}: blob {bi} is not stored in it",
            base.path.display()
        )));
    };
    let mut stored = vec![0u8; entry.stored_len as usize];
    base.file
        .read_exact_at(&mut stored, base.index.header.data_offset + offset)
        .map_err(|error| ImageError::Io {
            path: base.path.display().to_string(),
            error,
        })?;
    decode(bi, entry, &stored, true).map_err(|e| {
        ImageError::Invalid(format!(
            "{}: {e}: run `image verify` on it",
            base.path.display()
        ))
    })
}

/// Whether the page at `at` lies wholly in a hole.
fn in_hole(holes: &[Range<u64>], at: u64) -> bool {
    let i = holes.partition_point(|h| h.end <= at);
    holes
        .get(i)
        .is_some_and(|h| h.start <= at && at + PAGE as u64 <= h.end)
}

/// Reads `range` of the memory into `buf`: data with big reads, holes as zero.
fn read_data(
    file: &File,
    range: Range<u64>,
    holes: &[Range<u64>],
    buf: &mut [u8],
) -> std::io::Result<()> {
    let mut pos = range.start;
    let mut i = holes.partition_point(|h| h.end <= range.start);
    while pos < range.end {
        let hole = holes.get(i).filter(|h| h.start < range.end);
        let data_end = match hole {
            Some(h) if h.start <= pos => {
                let end = h.end.min(range.end);
                buf[(pos - range.start) as usize..(end - range.start) as usize].fill(0);
                pos = end;
                i += 1;
                continue;
            }
            Some(h) => h.start,
            None => range.end,
        };
        file.read_exact_at(
            &mut buf[(pos - range.start) as usize..(data_end - range.start) as usize],
            pos,
        )?;
        pos = data_end;
    }
    Ok(())
}

/// The base's name as the image records it: its file name when it is in
/// the image's directory, else its absolute path.
fn relative_name(base: &Path, out: &Path) -> Result<String, ImageError> {
    let io = |error| ImageError::Io {
        path: base.display().to_string(),
        error,
    };
    let abs = base.canonicalize().map_err(io)?;
    let out_dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let out_dir = out_dir.canonicalize().map_err(|error| ImageError::Io {
        path: out_dir.display().to_string(),
        error,
    })?;
    let name = match (abs.parent(), abs.file_name()) {
        (Some(d), Some(n)) if d == out_dir => PathBuf::from(n),
        _ => abs.clone(),
    };
    let name = name
        .to_str()
        .ok_or_else(|| ImageError::Invalid(format!("{}: not a UTF-8 path", abs.display())))?
        .to_string();
    if name.is_empty() || name.len() > MAX_NAME {
        return Err(ImageError::Invalid(format!(
            "{}: the base's name must be 1 to {MAX_NAME} bytes",
            abs.display()
        )));
    }
    Ok(name)
}
