//! The disk cache: one file per blob, named by its content address.
//!
//! A file is `DIR/<first 2 hex>/<64 hex of the blob's blake3>`: a
//! [`FILE_HEADER`]-byte header (magic, codec, decoded pages, stored length,
//! xxh3 of the payload, the content address again) and the blob's stored
//! (compressed) bytes. Because the name is the decoded content's hash, one
//! directory serves every image and every process that uses it: a blob
//! shared by two images (or a base and its clones) is fetched and kept once.
//!
//! Multi-process safety: a file is written whole to a temporary file in its
//! own directory and renamed over its name (rename is atomic): a reader sees
//! the old file, the new one, or none, never a part. Two processes writing
//! the same blob at once both rename a complete file with the same content;
//! either wins, harmlessly. A reader checks the header and the payload's
//! xxh3 (a file cut short by a crash, or rotted, fails it) and deletes a bad
//! file; the blob is then fetched again. Deleting a file another process has
//! open is harmless on Unix.
//!
//! Size: each process keeps an index (size, last use) of the files it knows:
//! scanned at open, those it wrote or read since. When the total passes the
//! limit it deletes least recently used files until the total is at 90% of
//! it. The order across restarts and processes is the files' mtime, which a
//! hit touches (at most once a minute per file, so that hits cost no write).
//! Files another process wrote after the scan count once this one reads
//! them; so the directory may pass the limit by what others wrote since.
//!
//! Nothing here fails a read: errors are reported to the caller, which
//! treats the cache as a miss; write errors are logged (at most once a
//! minute) and ignored.

use std::collections::{BTreeSet, HashMap};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use image::Codec;

/// The cache file's magic.
const MAGIC: [u8; 8] = *b"PWCBLOB1";
/// The cache file header's length.
pub(crate) const FILE_HEADER: usize = 64;
/// A hit rewrites a file's mtime when it is older than this.
const TOUCH_EVERY: Duration = Duration::from_secs(60);
/// Temporary files older than this, found at open, are a crashed writer's.
const STALE_TMP: Duration = Duration::from_secs(3600);
/// Write errors are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(60);

/// A blob's stored bytes, read back and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Cached {
    pub codec: Codec,
    pub pages: u32,
    /// xxh3 of the stored bytes (checked).
    pub checksum: u64,
    /// The whole file: its header, then the stored bytes (not moved down
    /// over the header: that copy cost as much as the read).
    file: Vec<u8>,
}

impl Cached {
    /// The blob's stored bytes.
    pub fn stored(&self) -> &[u8] {
        self.file.get(FILE_HEADER..).unwrap_or(&[])
    }
}

/// What a look-up found.
#[derive(Debug)]
pub(crate) enum Lookup {
    Hit(Cached),
    Miss,
    /// The file was bad (and is deleted): why.
    Bad(String),
}

#[derive(Debug, Clone, Copy)]
struct FileInfo {
    size: u64,
    /// Last use, in nanoseconds since the epoch (LRU order).
    used: u64,
    /// The file's mtime as last set or seen, in nanoseconds.
    mtime: u64,
}

#[derive(Debug, Default)]
struct Index {
    files: HashMap<[u8; 32], FileInfo>,
    order: BTreeSet<(u64, [u8; 32])>,
    total: u64,
}

impl Index {
    fn insert(&mut self, hash: [u8; 32], info: FileInfo) {
        if let Some(old) = self.files.insert(hash, info) {
            self.order.remove(&(old.used, hash));
            self.total -= old.size;
        }
        self.order.insert((info.used, hash));
        self.total += info.size;
    }

    fn remove(&mut self, hash: &[u8; 32]) -> Option<FileInfo> {
        let old = self.files.remove(hash)?;
        self.order.remove(&(old.used, *hash));
        self.total -= old.size;
        Some(old)
    }
}

/// Counters of the disk cache.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct DiskCounts {
    pub files: u64,
    pub bytes: u64,
    pub evictions: u64,
    pub bad_files: u64,
    pub write_errors: u64,
}

/// A directory of cached blobs, bounded in bytes.
#[derive(Debug)]
pub(crate) struct DiskCache {
    dir: PathBuf,
    limit: u64,
    index: Mutex<Index>,
    tmp_seq: AtomicU64,
    evictions: AtomicU64,
    bad_files: AtomicU64,
    write_errors: AtomicU64,
    last_log: Mutex<Option<Instant>>,
}

fn now_nanos() -> u64 {
    nanos(SystemTime::now())
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

fn hex(hash: &[u8; 32]) -> String {
    hash.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(name: &str) -> Option<[u8; 32]> {
    if name.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(name.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

fn codec_byte(codec: Codec) -> u8 {
    match codec {
        Codec::None => 0,
        Codec::Lz4 => 1,
        Codec::Zstd => 2,
    }
}

fn byte_codec(b: u8) -> Option<Codec> {
    match b {
        0 => Some(Codec::None),
        1 => Some(Codec::Lz4),
        2 => Some(Codec::Zstd),
        _ => None,
    }
}

fn header(hash: &[u8; 32], codec: Codec, pages: u32, stored: &[u8]) -> [u8; FILE_HEADER] {
    let mut h = [0u8; FILE_HEADER];
    h[0..8].copy_from_slice(&MAGIC);
    h[8] = codec_byte(codec);
    h[12..16].copy_from_slice(&pages.to_le_bytes());
    h[16..24].copy_from_slice(&(stored.len() as u64).to_le_bytes());
    h[24..32].copy_from_slice(&xxhash_rust::xxh3::xxh3_64(stored).to_le_bytes());
    h[32..64].copy_from_slice(hash);
    h
}

/// Checks a cache file's bytes; the payload's range and the header's fields.
fn check(hash: &[u8; 32], file: &[u8]) -> Result<(Codec, u32, u64), String> {
    let h = file
        .get(..FILE_HEADER)
        .ok_or_else(|| format!("{} bytes, shorter than its header", file.len()))?;
    let (codec, pages, stored_len, checksum) = check_header(hash, h)?;
    let payload = &file[FILE_HEADER..];
    check_payload(payload, stored_len, checksum)?;
    Ok((codec, pages, checksum))
}

/// A cache file's header: (codec, pages, stored length, checksum).
fn check_header(hash: &[u8; 32], h: &[u8]) -> Result<(Codec, u32, u64, u64), String> {
    let field = |r: std::ops::Range<usize>| {
        let mut b = [0u8; 8];
        b[..r.len()].copy_from_slice(&h[r]);
        u64::from_le_bytes(b)
    };
    if h[0..8] != MAGIC {
        return Err("not a pagewire cache file (bad magic)".to_string());
    }
    let codec = byte_codec(h[8]).ok_or_else(|| format!("unknown codec {}", h[8]))?;
    let pages = u32::try_from(field(12..16)).unwrap_or(u32::MAX);
    let stored_len = field(16..24);
    let checksum = field(24..32);
    if h[32..64] != hash[..] {
        return Err("holds another blob than its name says".to_string());
    }
    Ok((codec, pages, stored_len, checksum))
}

/// A cache file's payload against its header's length and checksum.
fn check_payload(payload: &[u8], stored_len: u64, checksum: u64) -> Result<(), String> {
    if payload.len() as u64 != stored_len {
        return Err(format!(
            "{} payload bytes, its header says {stored_len} (cut short?)",
            payload.len()
        ));
    }
    let actual = xxhash_rust::xxh3::xxh3_64(payload);
    if actual != checksum {
        return Err(format!(
            "payload checksum {actual:016x}, its header says {checksum:016x}"
        ));
    }
    Ok(())
}

impl DiskCache {
    /// Opens (creating) `dir`, bounded to `limit` bytes: scans it for the
    /// files already there (their size and mtime), deletes a crashed
    /// writer's temporary files, and evicts down to the limit.
    pub fn open(dir: &Path, limit: u64) -> std::io::Result<DiskCache> {
        fs::create_dir_all(dir)?;
        let mut index = Index::default();
        let now = SystemTime::now();
        for sub in fs::read_dir(dir)? {
            let sub = sub?;
            let name = sub.file_name();
            let Some(name) = name.to_str() else { continue };
            if name.len() != 2 || !sub.file_type()?.is_dir() {
                continue;
            }
            let entries = match fs::read_dir(sub.path()) {
                Ok(e) => e,
                Err(_) => continue,
            };
            for entry in entries.flatten() {
                let fname = entry.file_name();
                let Some(fname) = fname.to_str() else {
                    continue;
                };
                let Ok(meta) = entry.metadata() else { continue };
                let mtime = meta.modified().unwrap_or(UNIX_EPOCH);
                if fname.starts_with(".tmp-") {
                    if now.duration_since(mtime).unwrap_or_default() > STALE_TMP {
                        let _ = fs::remove_file(entry.path());
                    }
                    continue;
                }
                let Some(hash) = unhex(fname) else { continue };
                if !meta.is_file() || !fname.starts_with(name) {
                    continue;
                }
                let t = nanos(mtime);
                index.insert(
                    hash,
                    FileInfo {
                        size: meta.len(),
                        used: t,
                        mtime: t,
                    },
                );
            }
        }
        let cache = DiskCache {
            dir: dir.to_path_buf(),
            limit,
            index: Mutex::new(index),
            tmp_seq: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
            bad_files: AtomicU64::new(0),
            write_errors: AtomicU64::new(0),
            last_log: Mutex::new(None),
        };
        let mut index = cache.lock();
        let victims = cache.evict(&mut index, None);
        drop(index);
        Self::unlink(victims);
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, Index> {
        // A panic elsewhere while holding the lock leaves the index as
        // consistent as any single update: go on with it.
        self.index.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The file of blob `hash`.
    pub fn path(&self, hash: &[u8; 32]) -> PathBuf {
        let name = hex(hash);
        self.dir.join(&name[..2]).join(name)
    }

    /// Whether the index knows the blob (no disk access: for hints).
    pub fn contains(&self, hash: &[u8; 32]) -> bool {
        self.lock().files.contains_key(hash)
    }

    /// Reads blob `hash`: checks the file, deletes it when bad.
    /// A blob stored as is (codec none, `dst.len()` bytes, checksum `want`
    /// as the caller's index says), read straight into `dst` and checked:
    /// no intermediate copy. `None` when the file
    /// holds it otherwise (another codec, another size) or is missing or
    /// bad: then [`get`](Self::get) says which.
    pub fn get_raw_into(&self, hash: &[u8; 32], dst: &mut [u8], want: u64) -> Option<()> {
        use std::os::unix::fs::FileExt;
        let path = self.path(hash);
        let f = fs::File::open(&path).ok()?;
        let mut h = [0u8; FILE_HEADER];
        f.read_exact_at(&mut h, 0).ok()?;
        let (codec, _, stored_len, checksum) = check_header(hash, &h).ok()?;
        if codec != Codec::None || stored_len != dst.len() as u64 || checksum != want {
            return None;
        }
        let size = f.metadata().ok()?.len();
        if size != FILE_HEADER as u64 + stored_len {
            return None;
        }
        f.read_exact_at(dst, FILE_HEADER as u64).ok()?;
        check_payload(dst, stored_len, checksum).ok()?;
        self.used(hash, &path, size);
        Some(())
    }

    pub fn get(&self, hash: &[u8; 32]) -> Lookup {
        let path = self.path(hash);
        let bytes = match fs::read(&path) {
            Ok(b) => b,
            Err(e) => {
                self.lock().remove(hash);
                if e.kind() == std::io::ErrorKind::NotFound {
                    return Lookup::Miss;
                }
                return Lookup::Bad(format!("{}: {e}", path.display()));
            }
        };
        match check(hash, &bytes) {
            Ok((codec, pages, checksum)) => {
                self.used(hash, &path, bytes.len() as u64);
                Lookup::Hit(Cached {
                    codec,
                    pages,
                    checksum,
                    file: bytes,
                })
            }
            Err(why) => {
                self.remove_bad(hash);
                Lookup::Bad(format!("{}: {why}", path.display()))
            }
        }
    }

    /// Deletes a file found bad (by the caller too: a file that does not
    /// decode).
    pub fn remove_bad(&self, hash: &[u8; 32]) {
        self.bad_files.fetch_add(1, Ordering::Relaxed);
        self.lock().remove(hash);
        let _ = fs::remove_file(self.path(hash));
    }

    /// Marks a hit: LRU order in this process; the file's mtime (the order
    /// across processes and restarts) at most once a minute.
    fn used(&self, hash: &[u8; 32], path: &Path, size: u64) {
        let now = now_nanos();
        let mut index = self.lock();
        let old = index.files.get(hash).copied();
        let mtime = old.map_or(0, |o| o.mtime);
        let touch = now.saturating_sub(mtime) >= TOUCH_EVERY.as_nanos() as u64;
        index.insert(
            *hash,
            FileInfo {
                size,
                used: now,
                mtime: if touch { now } else { mtime },
            },
        );
        let victims = match old {
            // Written by another process since the scan: it counts now.
            None => self.evict(&mut index, Some(hash)),
            Some(_) => Vec::new(),
        };
        drop(index);
        Self::unlink(victims);
        if touch {
            if let Ok(f) = fs::File::options().write(true).open(path) {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    }

    /// Stores blob `hash` (its stored bytes), unless the index has it.
    /// Errors are logged (rate-limited) and otherwise ignored.
    pub fn put(&self, hash: &[u8; 32], codec: Codec, pages: u32, stored: &[u8]) {
        let size = (FILE_HEADER + stored.len()) as u64;
        if size > self.limit || self.contains(hash) {
            return;
        }
        match self.write(hash, codec, pages, stored) {
            Ok(()) => {
                let now = now_nanos();
                let mut index = self.lock();
                index.insert(
                    *hash,
                    FileInfo {
                        size,
                        used: now,
                        mtime: now,
                    },
                );
                let victims = self.evict(&mut index, Some(hash));
                drop(index);
                Self::unlink(victims);
            }
            Err(e) => self.write_error(hash, e),
        }
    }

    fn write(
        &self,
        hash: &[u8; 32],
        codec: Codec,
        pages: u32,
        stored: &[u8],
    ) -> std::io::Result<()> {
        let path = self.path(hash);
        let dir = path.parent().unwrap_or(&self.dir);
        fs::create_dir_all(dir)?;
        let seq = self.tmp_seq.fetch_add(1, Ordering::Relaxed);
        let tmp = dir.join(format!(".tmp-{}-{}-{seq}", hex(hash), std::process::id()));
        let result = (|| {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(&header(hash, codec, pages, stored))?;
            f.write_all(stored)?;
            // No fsync: a file cut short by a crash fails its checksum and
            // is fetched again, which is all a cache needs.
            drop(f);
            fs::rename(&tmp, &path)
        })();
        if result.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_error(&self, hash: &[u8; 32], e: std::io::Error) {
        let n = self.write_errors.fetch_add(1, Ordering::Relaxed) + 1;
        let mut last = self.last_log.lock().unwrap_or_else(|e| e.into_inner());
        if last.is_none_or(|t| t.elapsed() >= LOG_EVERY) {
            *last = Some(Instant::now());
            tracing::warn!(
                dir = %self.dir.display(),
                blob = %hex(hash),
                errors = n,
                "cannot write to the disk cache (ignored, the blob is served from memory): {e}"
            );
        }
    }

    /// Deletes least recently used files until the total is at 90% of the
    /// limit, sparing `keep` (the file just written or read).
    /// Drops least recently used files from the index down to 90% of the
    /// limit (never `keep`), and returns their paths: the caller unlinks
    /// them after letting go of the index ([`unlink`](Self::unlink)), so
    /// that a serving thread looking up a chunk never waits behind a
    /// thousand unlinks.
    #[must_use]
    fn evict(&self, index: &mut Index, keep: Option<&[u8; 32]>) -> Vec<PathBuf> {
        let mut victims = Vec::new();
        if index.total <= self.limit {
            return victims;
        }
        let target = self.limit - self.limit / 10;
        let mut spared = None;
        while index.total > target {
            let Some(&(used, hash)) = index.order.iter().next() else {
                break;
            };
            if Some(&hash) == keep {
                index.order.remove(&(used, hash));
                spared = Some((used, hash));
                continue;
            }
            index.remove(&hash);
            victims.push(self.path(&hash));
            self.evictions.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(entry) = spared {
            index.order.insert(entry);
        }
        victims
    }

    /// Deletes evicted files (outside the index's lock).
    fn unlink(victims: Vec<PathBuf>) {
        for p in victims {
            let _ = fs::remove_file(p);
        }
    }

    /// The counters.
    pub fn counts(&self) -> DiskCounts {
        let index = self.lock();
        DiskCounts {
            files: index.files.len() as u64,
            bytes: index.total,
            evictions: self.evictions.load(Ordering::Relaxed),
            bad_files: self.bad_files.load(Ordering::Relaxed),
            write_errors: self.write_errors.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8, len: usize) -> ([u8; 32], Vec<u8>) {
        let data: Vec<u8> = (0..len).map(|i| (i as u8).wrapping_mul(n)).collect();
        (*blake3::hash(&data).as_bytes(), data)
    }

    fn dir_bytes(dir: &Path) -> u64 {
        let mut total = 0;
        for sub in fs::read_dir(dir).unwrap() {
            let sub = sub.unwrap();
            if sub.file_type().unwrap().is_dir() {
                for f in fs::read_dir(sub.path()).unwrap() {
                    total += f.unwrap().metadata().unwrap().len();
                }
            }
        }
        total
    }

    #[test]
    fn stores_reads_and_survives_reopen() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        let (h, data) = blob(3, 5000);
        assert!(matches!(cache.get(&h), Lookup::Miss));
        cache.put(&h, Codec::Zstd, 2, &data);
        let Lookup::Hit(c) = cache.get(&h) else {
            panic!("miss")
        };
        assert_eq!((c.codec, c.pages, c.stored()), (Codec::Zstd, 2, &data[..]));
        assert_eq!(c.checksum, xxhash_rust::xxh3::xxh3_64(&data));
        drop(cache);
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        assert_eq!(cache.counts().files, 1);
        assert_eq!(cache.counts().bytes, (FILE_HEADER + 5000) as u64);
        assert!(cache.contains(&h));
        assert!(matches!(cache.get(&h), Lookup::Hit(_)));
    }

    #[test]
    fn a_bad_file_is_deleted() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        let (h, data) = blob(5, 3000);
        cache.put(&h, Codec::None, 1, &data);
        let path = cache.path(&h);
        let mut bytes = fs::read(&path).unwrap();
        bytes[FILE_HEADER + 100] ^= 1;
        fs::write(&path, &bytes).unwrap();
        let Lookup::Bad(why) = cache.get(&h) else {
            panic!("not bad")
        };
        assert!(why.contains("checksum"), "{why}");
        assert!(!path.exists());
        assert!(matches!(cache.get(&h), Lookup::Miss));
        // Cut short.
        cache.put(&h, Codec::None, 1, &data);
        fs::write(&path, &fs::read(&path).unwrap()[..FILE_HEADER + 10]).unwrap();
        let Lookup::Bad(why) = cache.get(&h) else {
            panic!("not bad")
        };
        assert!(why.contains("cut short"), "{why}");
        assert_eq!(cache.counts().bad_files, 2);
        // Named after another blob.
        let (h2, _) = blob(6, 10);
        cache.put(&h, Codec::None, 1, &data);
        fs::create_dir_all(cache.path(&h2).parent().unwrap()).unwrap();
        fs::copy(cache.path(&h), cache.path(&h2)).unwrap();
        assert!(matches!(cache.get(&h2), Lookup::Bad(w) if w.contains("another blob")));
    }

    #[test]
    fn evicts_least_recently_used_to_its_limit() {
        let tmp = tempfile::tempdir().unwrap();
        let each = (FILE_HEADER + 1000) as u64;
        let cache = DiskCache::open(tmp.path(), 5 * each).unwrap();
        let blobs: Vec<_> = (1..=8).map(|n| blob(n, 1000)).collect();
        for (i, (h, d)) in blobs.iter().enumerate() {
            cache.put(h, Codec::None, 1, d);
            // Keep the first one in use.
            assert!(matches!(cache.get(&blobs[0].0), Lookup::Hit(_)), "{i}");
            assert!(cache.counts().bytes <= 5 * each);
            assert!(dir_bytes(tmp.path()) <= 5 * each);
        }
        assert!(cache.counts().evictions >= 3);
        assert!(cache.contains(&blobs[0].0), "the most used one stays");
        assert!(cache.contains(&blobs[7].0), "the newest one stays");
        assert!(!cache.contains(&blobs[1].0), "the oldest unused one goes");
        // A smaller limit at the next open evicts at once, oldest mtime
        // first.
        drop(cache);
        let cache = DiskCache::open(tmp.path(), 2 * each).unwrap();
        assert!(cache.counts().bytes <= 2 * each);
        assert!(dir_bytes(tmp.path()) <= 2 * each);
    }

    #[test]
    fn another_process_file_is_read_and_counted() {
        let tmp = tempfile::tempdir().unwrap();
        let a = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        let b = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        let (h, data) = blob(9, 2000);
        a.put(&h, Codec::Lz4, 1, &data);
        assert!(!b.contains(&h));
        assert!(matches!(b.get(&h), Lookup::Hit(c) if c.stored() == &data[..]));
        assert!(b.contains(&h));
        // Both write the same blob: harmless.
        b.put(&h, Codec::Lz4, 1, &data);
        a.put(&h, Codec::Lz4, 1, &data);
        assert!(matches!(a.get(&h), Lookup::Hit(_)));
    }

    #[test]
    fn write_errors_are_ignored() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = DiskCache::open(tmp.path(), 1 << 20).unwrap();
        let (h, data) = blob(2, 100);
        // Make the fan-out directory a file: the write fails.
        let sub = cache.path(&h).parent().unwrap().to_path_buf();
        fs::write(&sub, b"x").unwrap();
        cache.put(&h, Codec::None, 1, &data);
        assert_eq!(cache.counts().write_errors, 1);
        assert!(matches!(cache.get(&h), Lookup::Miss | Lookup::Bad(_)));
    }
}
