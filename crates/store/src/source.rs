//! [`S3Source`]: an image in the store as a page source; the fetcher.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use image::{BlobCache, BlobEntry, BlobKey, BlobLocation, GetError, Layer, Layers, ReadError};
use object_store::{ObjectStore, ObjectStoreExt};
use pager::{PageSource, SourceError, Waker};

use crate::client::{failure, Client, Retry, Runtime};
use crate::disk::{DiskCache, Lookup};
use crate::layout::{chunk_url, chunks_prefix, read_manifest};
use crate::{S3Url, StoreError};

/// Counters of a source, for logs and metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreStats {
    /// Blobs fetched from the store (GETs that succeeded, retries aside).
    pub fetches: u64,
    /// Stored bytes fetched.
    pub fetched_bytes: u64,
    /// Retried GET attempts.
    pub retries: u64,
    /// Blobs whose fetch failed for good (their pages are untrusted).
    pub failures: u64,
    /// Blobs found in memory (the memory cache or the ring of recent
    /// fetches).
    pub memory_hits: u64,
    /// Blobs read from the disk cache.
    pub disk_hits: u64,
    /// Reads answered `Pending` (a fetch started or joined).
    pub pending: u64,
    /// Blobs queued by hints.
    pub hinted: u64,
    /// Disk cache: files known.
    pub disk_files: u64,
    /// Disk cache: bytes of the files known.
    pub disk_bytes: u64,
    /// Disk cache: files deleted to stay under the limit.
    pub disk_evictions: u64,
    /// Disk cache: files found bad (deleted, their blob fetched again).
    pub disk_bad_files: u64,
    /// Disk cache: writes that failed (ignored).
    pub disk_write_errors: u64,
}

#[derive(Debug, Default)]
struct Counters {
    fetches: AtomicU64,
    fetched_bytes: AtomicU64,
    retries: AtomicU64,
    failures: AtomicU64,
    memory_hits: AtomicU64,
    disk_hits: AtomicU64,
    pending: AtomicU64,
    hinted: AtomicU64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Priority {
    Demand,
    Hint,
}

/// A blob being fetched.
struct Flight {
    /// Which queue it waits in; `None` once a worker took it.
    queued: Option<Priority>,
    waiters: Vec<Waker>,
}

/// How long a blob whose fetch failed for good is answered as untrusted
/// before a new demand fetches it again.
const FAILED_FOR: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Default)]
struct State {
    flights: HashMap<BlobKey, Flight>,
    demand: VecDeque<BlobKey>,
    hinted: VecDeque<BlobKey>,
    workers: usize,
    /// Workers fetching a hinted blob.
    hint_workers: usize,
    /// Blobs whose fetch failed for good, why, and when: a VM asking for
    /// one after `FAILED_FOR` starts a new fetch (an outage of the store
    /// poisons the pages asked for during it, not every later VM's).
    failed: HashMap<BlobKey, (String, std::time::Instant)>,
    /// The last blobs fetched (see the crate's notes on single flight).
    ready: VecDeque<(BlobKey, Arc<[u8]>)>,
}

/// What fetch workers share with the source.
struct Shared {
    layers: Layers,
    /// The image's manifest.
    manifest: S3Url,
    /// `PREFIX/chunks`: every chunk object, the image's and its base's.
    chunks: S3Url,
    store: Arc<dyn ObjectStore>,
    memory: BlobCache,
    disk: Option<DiskCache>,
    state: Mutex<State>,
    counters: Counters,
    retry: Retry,
    concurrency: usize,
    hint_limit: usize,
    ready_len: usize,
    runtime: tokio::runtime::Handle,
}

/// An image object (and its base) in an S3-compatible store, as a page
/// source: blobs are fetched on demand, checked, and kept in a memory cache
/// and an optional disk cache. See the crate's notes.
pub struct S3Source {
    shared: Arc<Shared>,
    zero: Vec<Range<u64>>,
    describe: String,
    // Last: its threads stop after the fetchers' state is gone.
    _runtime: Arc<Runtime>,
}

impl std::fmt::Debug for S3Source {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Source")
            .field("describe", &self.describe)
            .finish_non_exhaustive()
    }
}

impl S3Source {
    /// Opens the image object `url` with a client from the environment
    /// ([`Client::from_env`]).
    pub fn open(url: &S3Url, config: crate::StoreConfig) -> Result<S3Source, StoreError> {
        S3Source::open_with(&Client::from_env(config)?, url)
    }

    /// Opens the image whose manifest is `url` through `client`: reads
    /// its manifest (header and index, checked, and exactly that long),
    /// its base's manifest (the name its index gives, beside it) the same
    /// way and checks that it is the base the image was packed against,
    /// opens the disk cache. Chunk objects are `PREFIX/chunks/...` beside
    /// the manifest (see the crate's notes). Every error that can be found
    /// before a VM waits is found here.
    pub fn open_with(client: &Client, url: &S3Url) -> Result<S3Source, StoreError> {
        let config = client.config().clone();
        let prefix = url.parent();
        let chunks = chunks_prefix(&prefix)?;
        let top_index = read_manifest(client, url)?;
        let (base_index, base_url) = match (top_index.has_base(), &top_index.base_name) {
            (true, Some(name)) => {
                let base_url = prefix.join(name)?;
                match read_manifest(client, &base_url) {
                    Ok(i) => (Some(i), Some(base_url)),
                    Err(StoreError::NoSuchObject { .. }) => {
                        return Err(StoreError::Image(image::ImageError::MissingBase {
                            what: url.to_string(),
                            base: base_url.to_string(),
                            why: "no such object (push the image with its base)".to_string(),
                        }))
                    }
                    Err(e) => return Err(e),
                }
            }
            _ => (None, None),
        };
        let layers = Layers::new(top_index, base_index)?;
        let zero = layers.zero_ranges();
        let disk =
            match &config.cache_dir {
                Some(dir) => Some(DiskCache::open(dir, config.cache_bytes).map_err(|error| {
                    StoreError::Io {
                        path: dir.display().to_string(),
                        error,
                    }
                })?),
                None => None,
            };
        let describe = match &base_url {
            Some(b) => format!("{url} over base {b} ({} bytes)", layers.len()),
            None => format!("{url} ({} bytes)", layers.len()),
        };
        let concurrency = config.fetch_concurrency;
        let runtime = client.runtime().clone();
        let shared = Shared {
            layers,
            manifest: url.clone(),
            chunks,
            store: client.stores(url.bucket())?.fetch,
            memory: BlobCache::new(config.memory_bytes),
            disk,
            state: Mutex::new(State::default()),
            counters: Counters::default(),
            retry: Retry {
                timeout: config.timeout,
                retries: config.retries,
                delay: config.inject_delay,
            },
            concurrency,
            hint_limit: (concurrency - concurrency / 4).max(1),
            ready_len: (2 * concurrency).max(32),
            runtime: runtime.handle(),
        };
        tracing::info!(source = %describe, "opened");
        Ok(S3Source {
            shared: Arc::new(shared),
            zero,
            describe,
            _runtime: runtime,
        })
    }

    /// The image over its base.
    pub fn layers(&self) -> &Layers {
        &self.shared.layers
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> StoreStats {
        let c = &self.shared.counters;
        let n = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let disk = self
            .shared
            .disk
            .as_ref()
            .map(|d| d.counts())
            .unwrap_or_default();
        StoreStats {
            fetches: n(&c.fetches),
            fetched_bytes: n(&c.fetched_bytes),
            retries: n(&c.retries),
            failures: n(&c.failures),
            memory_hits: n(&c.memory_hits),
            disk_hits: n(&c.disk_hits),
            pending: n(&c.pending),
            hinted: n(&c.hinted),
            disk_files: disk.files,
            disk_bytes: disk.bytes,
            disk_evictions: disk.evictions,
            disk_bad_files: disk.bad_files,
            disk_write_errors: disk.write_errors,
        }
    }

    fn read(&self, offset: u64, buf: &mut [u8], waker: &Waker) -> Result<(), SourceError> {
        let len = self.shared.layers.len();
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > len)
        {
            return Err(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                source_len: len,
            });
        }
        let shared = &self.shared;
        let mut started = false;
        let mut lent: Vec<Lent> = Vec::new();
        let result = shared.layers.read(offset, buf, &mut |key, entry| {
            shared.get(key, entry, waker, &mut started, &mut lent)
        });
        give_back(&mut lent);
        if started {
            Shared::spawn_workers(&self.shared);
        }
        match result {
            Ok(()) => Ok(()),
            Err(ReadError::Pending) => {
                shared.counters.pending.fetch_add(1, Ordering::Relaxed);
                Err(SourceError::Pending)
            }
            Err(ReadError::Untrusted { bad, why }) => Err(SourceError::Untrusted { bad, why }),
            Err(ReadError::Failed(why)) => Err(SourceError::Io {
                path: self.shared.manifest.to_string(),
                error: std::io::Error::other(why),
            }),
        }
    }
}

/// A blob read from the disk cache as is, lent to a read: its content
/// hash and its (checked) bytes.
type Lent = ([u8; 32], Arc<[u8]>);

thread_local! {
    /// Buffers for blobs read from the disk cache as is (see `read_disk`),
    /// oldest first, each still holding the blob it held: a fault reads
    /// its own page, then the rest of its cluster, mostly from one blob,
    /// and the second read finds it here instead of reading and checking
    /// the file again.
    static SCRATCH: std::cell::RefCell<Vec<Lent>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Buffers a thread keeps.
const SCRATCH_BUFFERS: usize = 8;

/// The blob `hash` if one of this thread's buffers still holds it
/// (taken: lent to this read).
fn scratch_hit(hash: &[u8; 32]) -> Option<Arc<[u8]>> {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        let i = s.iter().position(|(h, _)| h == hash)?;
        Some(s.remove(i).1)
    })
}

/// A buffer of `len` bytes to read into: this thread's oldest of that size
/// that an earlier read gave back ([`give_back`]), else a new one.
fn scratch(len: usize) -> Arc<[u8]> {
    SCRATCH
        .with(|s| {
            let mut s = s.borrow_mut();
            let i = s.iter().position(|(_, b)| b.len() == len)?;
            Some(s.remove(i).1)
        })
        .unwrap_or_else(|| std::iter::repeat_n(0u8, len).collect())
}

/// Keeps the buffers a finished read lent out for the next reads of this
/// thread, newest last.
fn give_back(lent: &mut Vec<Lent>) {
    SCRATCH.with(|s| {
        let mut s = s.borrow_mut();
        for (h, mut b) in lent.drain(..) {
            if Arc::get_mut(&mut b).is_some() {
                if s.len() >= SCRATCH_BUFFERS {
                    s.remove(0);
                }
                s.push((h, b));
            }
        }
    });
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        // The state is updated in steps that each leave it consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The blob getter of reads: memory, disk, else join or start a fetch.
    fn get(
        &self,
        key: BlobKey,
        entry: &BlobEntry,
        waker: &Waker,
        started: &mut bool,
        lent: &mut Vec<Lent>,
    ) -> Result<Arc<[u8]>, GetError> {
        // Blobs stored as is are not kept in memory when there is a disk
        // cache (see below): no lock to look for them there.
        let in_memory = entry.codec != image::Codec::None || self.disk.is_none();
        if let Some(blob) = in_memory.then(|| self.memory.get(&entry.hash)).flatten() {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(blob);
        }
        if let Some(blob) = self.read_disk(key, entry, lent) {
            self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
            // A blob stored as is costs a read from the disk cache (the
            // kernel's page cache) either way: memory keeps the decoded
            // ones, which cost a decompression.
            if entry.codec != image::Codec::None {
                self.memory.insert(entry.hash, blob.clone());
            }
            return Ok(blob);
        }
        if !in_memory {
            // Not on disk (a write that failed, an eviction): memory may
            // still have it from its fetch.
            if let Some(blob) = self.memory.get(&entry.hash) {
                self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
                return Ok(blob);
            }
        }
        let mut state = self.lock();
        if let Some((why, at)) = state.failed.get(&key) {
            if at.elapsed() < FAILED_FOR {
                return Err(GetError::Untrusted(why.clone()));
            }
            state.failed.remove(&key);
        }
        if let Some((_, blob)) = state.ready.iter().find(|(k, _)| *k == key) {
            self.counters.memory_hits.fetch_add(1, Ordering::Relaxed);
            return Ok(blob.clone());
        }
        let state = &mut *state;
        match state.flights.get_mut(&key) {
            Some(flight) => {
                // A fault put aside and tried again asks again: one wake
                // per waker is enough.
                if !flight.waiters.iter().any(|w| Arc::ptr_eq(w, waker)) {
                    flight.waiters.push(waker.clone());
                }
                if flight.queued == Some(Priority::Hint) {
                    // A fault waits for it now: ahead of the hints.
                    flight.queued = Some(Priority::Demand);
                    state.demand.push_back(key);
                    *started = true;
                }
            }
            None => {
                state.flights.insert(
                    key,
                    Flight {
                        queued: Some(Priority::Demand),
                        waiters: vec![waker.clone()],
                    },
                );
                state.demand.push_back(key);
                *started = true;
            }
        }
        Err(GetError::Pending)
    }

    /// The blob from the disk cache, decoded; a bad file is deleted.
    fn read_disk(
        &self,
        key: BlobKey,
        entry: &BlobEntry,
        lent: &mut Vec<Lent>,
    ) -> Option<Arc<[u8]>> {
        let disk = self.disk.as_ref()?;
        if entry.codec == image::Codec::None {
            // Stored as is: straight from the file into one of this
            // thread's buffers, free again once the read has copied it out.
            if let Some(out) = scratch_hit(&entry.hash) {
                lent.push((entry.hash, out.clone()));
                return Some(out);
            }
            let mut out = scratch(entry.pages as usize * image::PAGE);
            if let Some(dst) = Arc::get_mut(&mut out) {
                // The file's checksum must be the index's: the directory is
                // shared, and a file is trusted for this image only if it
                // holds this image's bytes.
                if disk
                    .get_raw_into(&entry.hash, dst, entry.checksum)
                    .is_some()
                {
                    lent.push((entry.hash, out.clone()));
                    return Some(out);
                }
            }
            // Not there: the buffer goes back for the next read.
            lent.push(([0; 32], out));
        }
        let why = match disk.get(&entry.hash) {
            Lookup::Miss => return None,
            // Deleted by the look-up.
            Lookup::Bad(why) => why,
            Lookup::Hit(c) => {
                // The file may hold the blob as another image stored it
                // (another codec): decode it as the file says.
                let as_stored = BlobEntry {
                    location: BlobLocation::Data { offset: 0 },
                    codec: c.codec,
                    pages: c.pages,
                    stored_len: c.stored().len() as u32,
                    checksum: c.checksum,
                    hash: entry.hash,
                };
                let why = if c.pages != entry.pages {
                    format!("{} pages, the index says {}", c.pages, entry.pages)
                } else {
                    // Decoded into a buffer the memory cache recycles: a
                    // fresh one per chunk costs a page fault per 4 KiB.
                    let mut out = self.memory.buffer(entry.pages as usize * image::PAGE);
                    match Arc::get_mut(&mut out) {
                        Some(dst) => {
                            match image::decode_into(key.index, &as_stored, c.stored(), dst) {
                                // This image's very bytes (its index's
                                // checksum), or else the right content: the
                                // directory is shared, so a file is trusted
                                // by what this image's index says.
                                Ok(())
                                    if (c.codec == entry.codec && c.checksum == entry.checksum)
                                        || *blake3::hash(dst).as_bytes() == entry.hash =>
                                {
                                    return Some(out)
                                }
                                Ok(()) => "its bytes are not this image's (content hash)".into(),
                                Err(e) => e.to_string(),
                            }
                        }
                        None => "a fresh buffer is shared".to_string(),
                    }
                };
                disk.remove_bad(&entry.hash);
                why
            }
        };
        tracing::warn!(blob = %crate::client::hex(&entry.hash), "bad disk cache file deleted, the blob will be fetched again: {why}");
        None
    }

    /// Starts fetch workers for queued blobs, up to the concurrency bound.
    fn spawn_workers(this: &Arc<Shared>) {
        let mut state = this.lock();
        let queued = state.demand.len() + state.hinted.len();
        let want = queued.min(this.concurrency.saturating_sub(state.workers));
        state.workers += want;
        drop(state);
        for _ in 0..want {
            let shared = this.clone();
            this.runtime.spawn(async move { shared.work().await });
        }
    }

    /// The next blob to fetch: demand first; hints while fewer than
    /// `hint_limit` workers fetch hints.
    fn next(&self, state: &mut State) -> Option<(BlobKey, Priority)> {
        while let Some(key) = state.demand.pop_front() {
            if let Some(f) = state.flights.get_mut(&key) {
                if f.queued == Some(Priority::Demand) {
                    f.queued = None;
                    return Some((key, Priority::Demand));
                }
            }
        }
        if state.hint_workers >= self.hint_limit {
            return None;
        }
        while let Some(key) = state.hinted.pop_front() {
            if let Some(f) = state.flights.get_mut(&key) {
                if f.queued == Some(Priority::Hint) {
                    f.queued = None;
                    state.hint_workers += 1;
                    return Some((key, Priority::Hint));
                }
            }
        }
        None
    }

    async fn work(self: Arc<Shared>) {
        loop {
            let (key, priority) = {
                let mut state = self.lock();
                match self.next(&mut state) {
                    Some(next) => next,
                    None => {
                        state.workers -= 1;
                        return;
                    }
                }
            };
            let result = self.clone().fetch(key).await;
            // Waiters first, the disk cache after: a fault does not wait
            // for a file to be written.
            let (result, to_disk) = match result {
                Ok((blob, stored)) => (Ok(blob), stored),
                Err(e) => (Err(e), None),
            };
            self.complete(key, priority, result);
            if let (Some(stored), Some(_)) = (to_disk, &self.disk) {
                let this = self.clone();
                let entry = self.layers.entry(key).clone();
                let _ = tokio::task::spawn_blocking(move || {
                    if let Some(disk) = &this.disk {
                        disk.put(&entry.hash, entry.codec, entry.pages, &stored);
                    }
                })
                .await;
            }
        }
    }

    /// Fetches, checks and caches one blob in memory; with its stored bytes
    /// when they are to be written to the disk cache.
    async fn fetch(
        self: Arc<Shared>,
        key: BlobKey,
    ) -> Result<(Arc<[u8]>, Option<bytes::Bytes>), String> {
        let entry = self.layers.entry(key).clone();
        // Another process may have cached it since, or a hint asked for a
        // blob the disk has.
        let this = self.clone();
        let e = entry.clone();
        if let Ok(Some(blob)) =
            tokio::task::spawn_blocking(move || this.read_disk(key, &e, &mut Vec::new())).await
        {
            self.counters.disk_hits.fetch_add(1, Ordering::Relaxed);
            self.memory.insert(entry.hash, blob.clone());
            return Ok((blob, None));
        }
        let what = match key.layer {
            Layer::Top => "",
            Layer::Base => " of the base",
        };
        if !matches!(entry.location, BlobLocation::Data { .. }) {
            return Err(format!(
                "blob {}{what} of {} is not in its image's data (bad index)",
                key.index, self.manifest
            ));
        }
        let url = chunk_url(&self.chunks, &entry).map_err(|e| e.to_string())?;
        let path = url.path();
        let store = &self.store;
        let stored = self
            .retry
            .run(&self.counters.retries, || async {
                store.get(&path).await?.bytes().await
            })
            .await
            .map_err(|f| format!("fetching blob {}{what} ({url}): {}", key.index, failure(f)))?;
        if stored.len() != entry.stored_len as usize {
            return Err(format!(
                "blob {}{what}: {url} has {} bytes, the manifest says {} (re-push the image)",
                key.index,
                stored.len(),
                entry.stored_len
            ));
        }
        self.counters.fetches.fetch_add(1, Ordering::Relaxed);
        self.counters
            .fetched_bytes
            .fetch_add(stored.len() as u64, Ordering::Relaxed);
        let this = self.clone();
        let decoded = tokio::task::spawn_blocking(move || {
            // Checked against its content address before it is trusted or
            // cached.
            let decoded = image::decode(key.index, &entry, &stored, true)
                .map_err(|e| format!("{url}: {e}"))?;
            let blob: Arc<[u8]> = Arc::from(decoded);
            this.memory.insert(entry.hash, blob.clone());
            Ok::<_, String>((blob, stored))
        })
        .await
        .map_err(|e| format!("decoding blob {}: {e}", key.index))??;
        Ok((decoded.0, Some(decoded.1)))
    }

    /// Ends a flight: records the blob (or the failure) and wakes every
    /// waiter, outside the lock.
    fn complete(&self, key: BlobKey, priority: Priority, result: Result<Arc<[u8]>, String>) {
        let mut state = self.lock();
        if priority == Priority::Hint {
            state.hint_workers -= 1;
        }
        let waiters = state
            .flights
            .remove(&key)
            .map(|f| f.waiters)
            .unwrap_or_default();
        let mut failed = None;
        match result {
            Ok(blob) => {
                state.ready.push_back((key, blob));
                while state.ready.len() > self.ready_len {
                    state.ready.pop_front();
                }
            }
            Err(why) => {
                self.counters.failures.fetch_add(1, Ordering::Relaxed);
                // Remembered only when a read waits for it: a prefetch that
                // failed poisons nothing, a fault fetches it itself.
                if !waiters.is_empty() {
                    state
                        .failed
                        .insert(key, (why.clone(), std::time::Instant::now()));
                }
                failed = Some(why);
            }
        }
        drop(state);
        if let Some(why) = failed {
            // Once per failure, outside the lock (a slow log sink must not
            // hold up serving threads).
            if waiters.is_empty() {
                tracing::warn!(layer = ?key.layer, blob = key.index, "a prefetch of a chunk failed (a fault will fetch it again): {why}");
            } else {
                tracing::error!(
                    layer = ?key.layer,
                    blob = key.index,
                    "a chunk cannot be fetched, its pages will be poisoned: {why}"
                );
            }
        }
        for w in waiters {
            w();
        }
    }

    /// Queues the blobs of `ranges` behind demand fetches.
    fn hint(this: &Arc<Shared>, ranges: &[Range<u64>]) {
        let len = this.layers.len();
        let mut seen = HashSet::new();
        let mut queued = 0u64;
        for r in ranges {
            let r = r.start.min(len)..r.end.min(len);
            if r.is_empty() {
                continue;
            }
            for key in this.layers.blobs_for(r) {
                if !seen.insert(key) {
                    continue;
                }
                let hash = this.layers.entry(key).hash;
                if this.memory.get(&hash).is_some()
                    || this.disk.as_ref().is_some_and(|d| d.contains(&hash))
                {
                    continue;
                }
                let mut state = this.lock();
                if state.failed.contains_key(&key)
                    || state.flights.contains_key(&key)
                    || state.ready.iter().any(|(k, _)| *k == key)
                {
                    continue;
                }
                state.flights.insert(
                    key,
                    Flight {
                        queued: Some(Priority::Hint),
                        waiters: Vec::new(),
                    },
                );
                state.hinted.push_back(key);
                queued += 1;
            }
        }
        this.counters.hinted.fetch_add(queued, Ordering::Relaxed);
        if queued > 0 {
            Shared::spawn_workers(this);
        }
    }
}

impl PageSource for S3Source {
    fn len(&self) -> u64 {
        self.shared.layers.len()
    }

    /// Waits for the fetches the read needs (tools and tests; serving
    /// threads call [`read_at_or_wake`](PageSource::read_at_or_wake)).
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let signal = Arc::new((Mutex::new(0u64), Condvar::new()));
        let s = signal.clone();
        let waker: Waker = Arc::new(move || {
            let (m, c) = &*s;
            *m.lock().unwrap_or_else(|e| e.into_inner()) += 1;
            c.notify_all();
        });
        loop {
            let (m, c) = &*signal;
            let seen = *m.lock().unwrap_or_else(|e| e.into_inner());
            match self.read(offset, buf, &waker) {
                Err(SourceError::Pending) => {
                    let mut n = m.lock().unwrap_or_else(|e| e.into_inner());
                    while *n == seen {
                        n = c.wait(n).unwrap_or_else(|e| e.into_inner());
                    }
                }
                other => return other,
            }
        }
    }

    fn read_at_or_wake(
        &self,
        offset: u64,
        buf: &mut [u8],
        waker: &Waker,
    ) -> Result<(), SourceError> {
        self.read(offset, buf, waker)
    }

    fn hint(&self, ranges: &[Range<u64>]) {
        Shared::hint(&self.shared, ranges);
    }

    fn zero_ranges(&self) -> &[Range<u64>] {
        &self.zero
    }

    fn describe(&self) -> String {
        self.describe.clone()
    }
}
