//! `--source URL`: where a snapshot's bytes come from.
//!
//! - `file://PATH` (or a bare path, or `--mem-file PATH`): a raw memory file,
//!   Firecracker's layout. Handed to a successor by descriptor, so a VM
//!   keeps its very bytes even if the file at that path is replaced.
//! - `image://PATH`: a pagewire image (`docs/image-format.md`), with its base
//!   beside it. Reopened by a successor by path and checked by image id.
//! - `s3://BUCKET/KEY`: an image in S3-compatible object storage (endpoint,
//!   region and credentials from the usual AWS environment variables),
//!   fetched through bounded caches in memory and on disk (`store` crate;
//!   built with the `s3` cargo feature).
//!
//! Every check (missing file, bad header, missing or wrong base, no such
//! object) happens when the source is opened, before any VM waits on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use pager::{MemFile, PageSource};

use crate::error::{bail, Context};
use crate::Result;

/// A parsed `--source`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceUrl {
    File(PathBuf),
    Image(PathBuf),
    S3(String),
}

impl SourceUrl {
    /// `file://PATH`, `image://PATH`, `s3://BUCKET/KEY`, or a bare path (a
    /// raw memory file; `.pwimg` files are images).
    pub fn parse(s: &str) -> Result<SourceUrl> {
        if let Some(p) = s.strip_prefix("file://") {
            return Ok(SourceUrl::File(nonempty(p, s)?));
        }
        if let Some(p) = s.strip_prefix("image://") {
            return Ok(SourceUrl::Image(nonempty(p, s)?));
        }
        if s.starts_with("s3://") {
            return Ok(SourceUrl::S3(s.to_string()));
        }
        if s.contains("://") {
            bail!("unknown source {s:?}: use file://PATH, image://PATH or s3://BUCKET/KEY");
        }
        let p = nonempty(s, s)?;
        if p.extension().is_some_and(|e| e == "pwimg") {
            Ok(SourceUrl::Image(p))
        } else {
            Ok(SourceUrl::File(p))
        }
    }

    /// For logs and a VM's metadata.
    pub fn display(&self) -> String {
        match self {
            SourceUrl::File(p) => format!("file://{}", p.display()),
            SourceUrl::Image(p) => format!("image://{}", p.display()),
            SourceUrl::S3(u) => u.clone(),
        }
    }
}

fn nonempty(p: &str, whole: &str) -> Result<PathBuf> {
    if p.is_empty() {
        bail!("source {whole:?} names no file");
    }
    Ok(PathBuf::from(p))
}

/// How image and S3 sources cache (`serve`'s flags).
#[derive(Debug, Clone)]
pub struct CacheOptions {
    /// Decoded chunks kept in memory per image source, in bytes.
    pub memory_bytes: usize,
    /// Where S3 chunks are kept on disk (shared by server processes).
    pub cache_dir: Option<PathBuf>,
    /// Bytes the disk cache may hold.
    pub cache_bytes: u64,
    /// S3 fetches in flight at most, per source.
    pub fetch_concurrency: usize,
}

impl Default for CacheOptions {
    fn default() -> Self {
        CacheOptions {
            memory_bytes: image::DEFAULT_CACHE_BYTES,
            cache_dir: None,
            cache_bytes: 10 << 30,
            fetch_concurrency: 16,
        }
    }
}

/// An opened source.
pub struct Opened {
    pub source: Arc<dyn PageSource>,
    /// The raw memory file, when it is one (handed over by descriptor).
    pub file: Option<Arc<MemFile>>,
    /// What identifies the bytes: the file's device and inode, or the
    /// image's id. With the snapshot's name, a VM's `source` label.
    pub identity: String,
}

/// Opens `url`.
pub fn open(url: &SourceUrl, cache: &CacheOptions) -> Result<Opened> {
    match url {
        SourceUrl::File(p) => {
            let f = Arc::new(
                MemFile::open(p)
                    .with_context(|| format!("opening the memory file {}", p.display()))?,
            );
            let identity = file_identity(f.file())?;
            Ok(Opened {
                source: f.clone(),
                file: Some(f),
                identity,
            })
        }
        SourceUrl::Image(p) => {
            let img = image::ImageSource::open(p, None, cache.memory_bytes)
                .with_context(|| format!("opening the image {}", p.display()))?;
            let identity = format!("img-{}", short(&img.layers().top().id_hex()));
            Ok(Opened {
                source: Arc::new(img),
                file: None,
                identity,
            })
        }
        SourceUrl::S3(u) => open_s3(u, cache),
    }
}

#[cfg(feature = "s3")]
fn open_s3(url: &str, cache: &CacheOptions) -> Result<Opened> {
    let config = store::StoreConfig {
        cache_dir: cache.cache_dir.clone(),
        cache_bytes: cache.cache_bytes,
        memory_bytes: cache.memory_bytes,
        fetch_concurrency: cache.fetch_concurrency.max(1),
        ..store::StoreConfig::default()
    };
    let parsed = store::S3Url::object(url).context("the source")?;
    let s = store::S3Source::open(&parsed, config).with_context(|| format!("opening {url}"))?;
    let identity = format!("s3-{}", short(&s.layers().top().id_hex()));
    Ok(Opened {
        source: Arc::new(s),
        file: None,
        identity,
    })
}

#[cfg(not(feature = "s3"))]
fn open_s3(url: &str, _cache: &CacheOptions) -> Result<Opened> {
    bail!("{url}: this pagewire was built without S3 support (cargo feature `s3`)")
}

fn short(id: &str) -> &str {
    id.get(..16).unwrap_or(id)
}

/// A file's identity: its device and inode.
pub(crate) fn file_identity(file: &std::fs::File) -> Result<String> {
    use std::os::unix::fs::MetadataExt;
    let m = file
        .metadata()
        .context("the memory file's identity (fstat)")?;
    Ok(format!("{:x}-{:x}", m.dev(), m.ino()))
}

/// What a snapshot directory entry serves, if it is one: `NAME.mem` (a raw
/// memory file), `NAME.pwimg` (an image) or `NAME.url` (a regular file of
/// at most 4 KiB holding a source URL, such as `s3://bucket/key`, on its
/// first line; a relative path in it is relative to the directory). Also
/// its rank when several files give one name: `.mem`, then `.pwimg`, then
/// `.url` (the others are skipped with a warning).
pub(crate) fn dir_entry(path: &Path) -> Option<(String, u8, Result<SourceUrl>)> {
    let stem = path.file_stem()?.to_str()?.to_string();
    match path.extension()?.to_str()? {
        "mem" => Some((stem, 0, Ok(SourceUrl::File(path.to_path_buf())))),
        "pwimg" => Some((stem, 1, Ok(SourceUrl::Image(path.to_path_buf())))),
        "url" => Some((stem, 2, url_file(path))),
        _ => None,
    }
}

/// The URL in a `.url` file.
fn url_file(path: &Path) -> Result<SourceUrl> {
    use std::io::Read;
    let what = || format!("reading {}", path.display());
    let f = std::fs::File::open(path).with_context(what)?;
    let meta = f.metadata().with_context(what)?;
    if !meta.is_file() || meta.len() > 4096 {
        bail!(
            "{}: a .url file must be a regular file of at most 4 KiB",
            path.display()
        );
    }
    let mut text = String::new();
    f.take(4096).read_to_string(&mut text).with_context(what)?;
    let url = SourceUrl::parse(text.lines().next().unwrap_or("").trim())?;
    let dir = path.parent().unwrap_or(Path::new("."));
    Ok(match url {
        SourceUrl::File(p) if p.is_relative() => SourceUrl::File(dir.join(p)),
        SourceUrl::Image(p) if p.is_relative() => SourceUrl::Image(dir.join(p)),
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            SourceUrl::parse("file:///a/b.mem").ok(),
            Some(SourceUrl::File("/a/b.mem".into()))
        );
        assert_eq!(
            SourceUrl::parse("image://x.pwimg").ok(),
            Some(SourceUrl::Image("x.pwimg".into()))
        );
        assert_eq!(
            SourceUrl::parse("/m/snap.pwimg").ok(),
            Some(SourceUrl::Image("/m/snap.pwimg".into()))
        );
        assert_eq!(
            SourceUrl::parse("s3://b/k").ok(),
            Some(SourceUrl::S3("s3://b/k".into()))
        );
        assert!(SourceUrl::parse("http://x").is_err());
        assert!(SourceUrl::parse("file://").is_err());
    }
}
