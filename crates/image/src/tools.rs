//! `image inspect`, `verify`, `unpack`.

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::format::BlobLocation;
use crate::read::{check_content, hex, BlobKey, GetError, Layer, ReadError};
use crate::source::{load_blob, open_index, open_layers, Fetch, Opened};
use crate::{ImageError, PAGE};

/// What `image inspect` shows.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Inspection {
    /// Format version.
    pub version: u32,
    /// The image id (hex).
    pub id: String,
    /// The base's id (hex), when it has a base.
    pub base_id: Option<String>,
    /// The base's name as recorded.
    pub base_name: Option<String>,
    /// Codecs of the stored blobs, with counts (`lz4 1020, none 4`).
    pub codec: String,
    /// Bytes per chunk.
    pub chunk_size: u32,
    /// The memory's size.
    pub mem_len: u64,
    /// The image file's size.
    pub image_len: u64,
    /// mem_len / image_len.
    pub ratio: f64,
    /// Pages that read as zero.
    pub zero_pages: u64,
    /// Pages taken from the base.
    pub base_pages: u64,
    /// Pages stored in this image's blobs.
    pub own_pages: u64,
    /// Entries of the blob table.
    pub blobs: u64,
    /// Slots whose blob another slot shares (stored once).
    pub duplicate_slots: u64,
    /// Blobs stored in the base, not here.
    pub base_blobs: u64,
}

/// An image's header and tables, summarised (`image inspect`). Only the
/// image's own file is read: what comes from the base is in its index.
pub fn inspect(path: &Path) -> Result<Inspection, ImageError> {
    let (file, index) = open_index(path)?;
    let image_len = file
        .metadata()
        .map_err(|error| ImageError::Io {
            path: path.display().to_string(),
            error,
        })?
        .len();
    let h = &index.header;
    let pages_total = h.mem_len / PAGE as u64;
    let mut own = 0u64;
    let mut from_base = 0u64;
    let mut seen = HashSet::new();
    let mut duplicate_slots = 0u64;
    for s in &index.slots {
        own += s.own.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        from_base += s
            .from_base
            .iter()
            .map(|w| w.count_ones() as u64)
            .sum::<u64>();
        if let Some(b) = s.blob {
            if !seen.insert(b) {
                duplicate_slots += 1;
            }
        }
    }
    let mut codecs: BTreeMap<&str, u64> = BTreeMap::new();
    let mut base_blobs = 0;
    for b in &index.blobs {
        match b.location {
            BlobLocation::Base { .. } => base_blobs += 1,
            BlobLocation::Data { .. } => *codecs.entry(b.codec.name()).or_default() += 1,
        }
    }
    let codec = codecs
        .iter()
        .map(|(c, n)| format!("{c} {n}"))
        .collect::<Vec<_>>()
        .join(", ");
    Ok(Inspection {
        version: h.version,
        id: index.id_hex(),
        base_id: index.has_base().then(|| hex(&h.base_id)),
        base_name: index.base_name.clone(),
        codec,
        chunk_size: h.chunk_size,
        mem_len: h.mem_len,
        image_len,
        ratio: if image_len == 0 {
            0.0
        } else {
            h.mem_len as f64 / image_len as f64
        },
        zero_pages: pages_total.saturating_sub(own + from_base),
        base_pages: from_base,
        own_pages: own,
        blobs: index.blobs.len() as u64,
        duplicate_slots,
        base_blobs,
    })
}

/// What `image verify` found.
#[derive(Debug, Clone, serde::Serialize)]
pub struct VerifyReport {
    /// Blobs checked (the image's and the base's it uses).
    pub blobs: u64,
    /// (blob index, reason) of every blob that failed; a base blob's reason
    /// names the base.
    pub corrupt: Vec<(u32, String)>,
}

/// Decodes every blob of the image (and of its base that it uses) and checks
/// both checksums. `progress` gets the stored bytes checked so far.
pub fn verify(
    path: &Path,
    base: Option<&Path>,
    progress: &mut dyn FnMut(u64),
) -> Result<VerifyReport, ImageError> {
    let Opened { layers, top, base } = open_layers(path, base)?;
    let mut keys: Vec<BlobKey> = Vec::new();
    for (i, e) in layers.top().blobs.iter().enumerate() {
        match e.location {
            BlobLocation::Data { .. } => keys.push(BlobKey {
                layer: Layer::Top,
                index: i as u32,
            }),
            BlobLocation::Base { index } => keys.push(BlobKey {
                layer: Layer::Base,
                index,
            }),
        }
    }
    // Base blobs that the top's from-base pages use.
    if let Some(b) = layers.base() {
        for (s, slot) in layers.top().slots.iter().enumerate() {
            let uses = slot.from_base.iter().any(|&w| w != 0);
            if let (true, Some(bi)) = (uses, b.slots.get(s).and_then(|bs| bs.blob)) {
                keys.push(BlobKey {
                    layer: Layer::Base,
                    index: bi,
                });
            }
        }
    }
    let mut seen = HashSet::new();
    keys.retain(|k| seen.insert(*k));
    let mut report = VerifyReport {
        blobs: keys.len() as u64,
        corrupt: Vec::new(),
    };
    let mut done = 0u64;
    for key in keys {
        let entry = layers.entry(key);
        let (file, index, where_) = match (key.layer, &base, layers.base()) {
            (Layer::Base, Some(bf), Some(bi)) => {
                (&bf.file, bi, format!("base {}: ", bf.path.display()))
            }
            _ => (&top.file, layers.top(), String::new()),
        };
        match load_blob(file, index, key.index, entry, None) {
            Ok(blob) => {
                if let Err(e) = check_content(key.index, entry, &blob) {
                    report.corrupt.push((key.index, format!("{where_}{e}")));
                }
            }
            Err(Fetch::Corrupt(e)) => report.corrupt.push((key.index, format!("{where_}{e}"))),
            Err(Fetch::Io(error)) => {
                return Err(ImageError::Io {
                    path: if key.layer == Layer::Base {
                        base.as_ref()
                            .map(|b| b.path.display().to_string())
                            .unwrap_or_default()
                    } else {
                        path.display().to_string()
                    },
                    error,
                })
            }
        }
        done += entry.stored_len as u64;
        progress(done);
    }
    for (blob, why) in &report.corrupt {
        tracing::error!("{}: blob {blob}: {why}", path.display());
    }
    Ok(report)
}

/// Writes the memory back out, byte for byte (zero pages as holes), to a
/// temporary file beside `out` renamed when whole. Returns the bytes of
/// memory. Fails on the first corrupt blob (`verify` lists them all).
pub fn unpack(
    path: &Path,
    base: Option<&Path>,
    out: &Path,
    progress: &mut dyn FnMut(u64),
) -> Result<u64, ImageError> {
    let Opened { layers, top, base } = open_layers(path, base)?;
    let out_io = |error| ImageError::Io {
        path: out.display().to_string(),
        error,
    };
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => std::path::PathBuf::from("."),
    };
    let tmp = tempfile::NamedTempFile::new_in(&dir).map_err(out_io)?;
    let len = layers.len();
    tmp.as_file().set_len(len).map_err(out_io)?;
    let cs = layers.top().header.chunk_size as u64;
    let mut buf = vec![0u8; cs as usize];
    let mut get = |key: BlobKey, entry: &crate::BlobEntry| -> Result<Arc<[u8]>, GetError> {
        let (file, index): (&File, _) = match (key.layer, &base, layers.base()) {
            (Layer::Base, Some(bf), Some(bi)) => (&bf.file, bi),
            _ => (&top.file, layers.top()),
        };
        load_blob(file, index, key.index, entry, None).map_err(|e| match e {
            Fetch::Io(e) => GetError::Failed(e.to_string()),
            Fetch::Corrupt(e) => GetError::Untrusted(e.to_string()),
        })
    };
    let mut at = 0u64;
    while at < len {
        let n = cs.min(len - at) as usize;
        let chunk = &mut buf[..n];
        layers.read(at, chunk, &mut get).map_err(|e| match e {
            ReadError::Untrusted { why, .. } => ImageError::Invalid(format!(
                "{}: {why} (run `image verify` for every corrupt blob)",
                path.display()
            )),
            ReadError::Pending => ImageError::Invalid("a blob is pending".into()),
            ReadError::Failed(w) => ImageError::Invalid(format!("{}: {w}", path.display())),
        })?;
        // Non-zero pages only: the others stay holes.
        let mut p = 0;
        while p < n {
            let q = (p + PAGE).min(n);
            if chunk[p..q].iter().any(|&b| b != 0) {
                let mut e = q;
                while e < n && chunk[e..(e + PAGE).min(n)].iter().any(|&b| b != 0) {
                    e = (e + PAGE).min(n);
                }
                tmp.as_file()
                    .write_all_at(&chunk[p..e], at + p as u64)
                    .map_err(out_io)?;
                p = e;
            } else {
                p = q;
            }
        }
        at += n as u64;
        progress(at);
    }
    tmp.as_file().sync_all().map_err(out_io)?;
    tmp.persist(out).map_err(|e| out_io(e.error))?;
    Ok(len)
}
