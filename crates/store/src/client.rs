//! The connection to the store, its runtime, requests with retries, and
//! `push`.

use std::collections::{HashMap, HashSet};
use std::fs::File;
use std::future::Future;
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{StreamExt, TryStreamExt};
use image::{BlobLocation, Index, HEADER_LEN};
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
use object_store::{
    BackoffConfig, ClientConfigKey, ObjectStore, ObjectStoreExt, PutPayload, RetryConfig,
    WriteMultipart,
};

use crate::layout::{chunk_name, chunk_url, chunks_prefix, list_chunks, read_manifest};
use crate::source::S3Source;
use crate::{S3Url, StoreConfig, StoreError, INJECT_DELAY_ENV};

/// Explicit connection settings (the same as the `AWS_*` variables of
/// [`Client::from_env`]), for callers that do not take them from the
/// process environment (tests, a config file).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct S3Options {
    /// `AWS_ENDPOINT_URL`: an S3-compatible server, e.g.
    /// `http://127.0.0.1:9000`. Path-style addressing is used with it; plain
    /// http is allowed when it starts with `http://`.
    pub endpoint: Option<String>,
    /// `AWS_REGION`.
    pub region: Option<String>,
    /// `AWS_ACCESS_KEY_ID`.
    pub access_key_id: Option<String>,
    /// `AWS_SECRET_ACCESS_KEY`.
    pub secret_access_key: Option<String>,
    /// `AWS_SESSION_TOKEN`.
    pub session_token: Option<String>,
}

/// A tokio runtime shut down without waiting when dropped (a drop from
/// inside another runtime would otherwise panic).
#[derive(Debug)]
pub(crate) struct Runtime(Option<tokio::runtime::Runtime>);

impl Runtime {
    fn new() -> std::io::Result<Runtime> {
        let rt = tokio::runtime::Builder::new_multi_thread()
            // Fetches are network waits, decoding runs on blocking threads:
            // two workers keep up with many GETs on a 2-core host.
            .worker_threads(2)
            .thread_name("pagewire-s3")
            .enable_all()
            .build()?;
        Ok(Runtime(Some(rt)))
    }

    pub(crate) fn handle(&self) -> tokio::runtime::Handle {
        match &self.0 {
            Some(rt) => rt.handle().clone(),
            // Only `drop` takes it.
            None => unreachable!("runtime used after drop"),
        }
    }

    /// Runs `f` to completion from a thread outside the runtime. From inside
    /// a tokio runtime (a caller's async code), on a helper thread, as
    /// `block_on` cannot nest.
    pub(crate) fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        let handle = self.handle();
        if tokio::runtime::Handle::try_current().is_err() {
            return handle.block_on(f);
        }
        std::thread::scope(|s| match s.spawn(move || handle.block_on(f)).join() {
            Ok(out) => out,
            Err(panic) => std::panic::resume_unwind(panic),
        })
    }
}

impl Drop for Runtime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// One bucket's two clients: `fetch` makes one attempt per call (the
/// caller retries, with its own per-attempt timeout, and counts retries);
/// `upload` retries itself (object_store's backoff) and allows long
/// requests (parts of a multipart upload).
#[derive(Debug, Clone)]
pub(crate) struct Stores {
    pub fetch: Arc<dyn ObjectStore>,
    pub upload: Arc<dyn ObjectStore>,
}

/// A connection to an S3-compatible store: its settings, its runtime (two
/// threads named `pagewire-s3`) and [`StoreConfig`]. Cheap to share;
/// sources opened through one client share its runtime and connections.
#[derive(Debug, Clone)]
pub struct Client {
    inner: Arc<ClientInner>,
}

#[derive(Debug)]
struct ClientInner {
    base: AmazonS3Builder,
    endpoint: Option<String>,
    config: StoreConfig,
    stores: Mutex<HashMap<String, Stores>>,
    // Last: dropped after everything that may hold its connections.
    runtime: Arc<Runtime>,
}

/// Why one request failed for good.
#[derive(Debug)]
pub(crate) enum Failure {
    NotFound,
    Failed(String),
}

/// How requests are retried.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Retry {
    pub timeout: Duration,
    pub retries: u32,
    /// Slept before every attempt (the test knob), outside the timeout.
    pub delay: Option<Duration>,
}

const BACKOFF_START: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);

impl Retry {
    /// Runs `attempt` until it succeeds, fails for good (not found, denied:
    /// not retried), or has failed `retries + 1` times; each attempt is
    /// bounded by `timeout`; between attempts, exponential backoff with
    /// jitter. `retried` counts retries.
    pub(crate) async fn run<T, F, Fut>(
        &self,
        retried: &AtomicU64,
        mut attempt: F,
    ) -> Result<T, Failure>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = object_store::Result<T>>,
    {
        let mut backoff = BACKOFF_START;
        let mut tries = 0u32;
        loop {
            if let Some(d) = self.delay {
                tokio::time::sleep(d).await;
            }
            let why = match tokio::time::timeout(self.timeout, attempt()).await {
                Ok(Ok(v)) => return Ok(v),
                Ok(Err(object_store::Error::NotFound { .. })) => return Err(Failure::NotFound),
                Ok(Err(
                    e @ (object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. }
                    | object_store::Error::Precondition { .. }
                    | object_store::Error::NotSupported { .. }
                    | object_store::Error::InvalidPath { .. }),
                )) => return Err(Failure::Failed(e.to_string())),
                Ok(Err(e)) => e.to_string(),
                Err(_) => format!("no answer within {:?}", self.timeout),
            };
            if tries >= self.retries {
                let attempts = tries + 1;
                return Err(Failure::Failed(format!(
                    "{why} (after {attempts} attempt{})",
                    if attempts == 1 { "" } else { "s" }
                )));
            }
            tries += 1;
            retried.fetch_add(1, Ordering::Relaxed);
            // Full jitter over [backoff/2, backoff]: concurrent retries of
            // many blobs do not hit the store in step.
            let nanos = backoff.as_nanos() as u64;
            let jitter = jitter_seed() % (nanos / 2 + 1);
            tokio::time::sleep(Duration::from_nanos(nanos / 2 + jitter)).await;
            backoff = (backoff * 2).min(BACKOFF_MAX);
        }
    }
}

fn jitter_seed() -> u64 {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos() as u64);
    xxhash_rust::xxh3::xxh3_64(&(t ^ SEQ.fetch_add(1, Ordering::Relaxed)).to_le_bytes())
}

impl Client {
    /// A client from the usual AWS environment (`AWS_ENDPOINT_URL` or
    /// `AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
    /// `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, `AWS_ALLOW_HTTP`, and
    /// the rest object_store reads: web identity, container credentials).
    pub fn from_env(config: StoreConfig) -> Result<Client, StoreError> {
        Client::build(AmazonS3Builder::from_env(), config)
    }

    /// A client from explicit settings; the process environment is not
    /// read.
    pub fn new(options: &S3Options, config: StoreConfig) -> Result<Client, StoreError> {
        let mut b = AmazonS3Builder::new();
        if let Some(v) = &options.endpoint {
            b = b.with_endpoint(v);
        }
        if let Some(v) = &options.region {
            b = b.with_region(v);
        }
        if let Some(v) = &options.access_key_id {
            b = b.with_access_key_id(v);
        }
        if let Some(v) = &options.secret_access_key {
            b = b.with_secret_access_key(v);
        }
        if let Some(v) = &options.session_token {
            b = b.with_token(v);
        }
        Client::build(b, config)
    }

    fn build(base: AmazonS3Builder, mut config: StoreConfig) -> Result<Client, StoreError> {
        if config.fetch_concurrency == 0 {
            return Err(StoreError::Config(
                "fetch_concurrency must be at least 1".to_string(),
            ));
        }
        if config.timeout.is_zero() {
            return Err(StoreError::Config("timeout must not be zero".to_string()));
        }
        if config.inject_delay.is_none() {
            if let Ok(v) = std::env::var(INJECT_DELAY_ENV) {
                let ms: u64 = v.trim().parse().map_err(|_| {
                    StoreError::Config(format!("{INJECT_DELAY_ENV}={v:?}: expected milliseconds"))
                })?;
                config.inject_delay = Some(Duration::from_millis(ms));
                tracing::warn!(
                    "{INJECT_DELAY_ENV}: every blob GET is delayed by {ms} ms (a test knob)"
                );
            }
        }
        let endpoint = base
            .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
            .or_else(|| base.get_config_value(&AmazonS3ConfigKey::Endpoint));
        let region = base.get_config_value(&AmazonS3ConfigKey::Region);
        if endpoint.is_none() && region.is_none() {
            return Err(StoreError::NoEndpoint);
        }
        let runtime = Runtime::new().map_err(|e| {
            StoreError::Client(format!("cannot start the fetch runtime's threads: {e}"))
        })?;
        Ok(Client {
            inner: Arc::new(ClientInner {
                base,
                endpoint,
                config,
                stores: Mutex::new(HashMap::new()),
                runtime: Arc::new(runtime),
            }),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &StoreConfig {
        &self.inner.config
    }

    pub(crate) fn runtime(&self) -> &Arc<Runtime> {
        &self.inner.runtime
    }

    /// How open-time requests (HEAD, header and index GETs) are retried.
    pub(crate) fn retry(&self) -> Retry {
        Retry {
            timeout: self.inner.config.timeout,
            retries: self.inner.config.retries,
            delay: None,
        }
    }

    /// The clients of `bucket` (built once).
    pub(crate) fn stores(&self, bucket: &str) -> Result<Stores, StoreError> {
        let mut stores = self.inner.stores.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = stores.get(bucket) {
            return Ok(s.clone());
        }
        let config = &self.inner.config;
        let fetch = self.build_store(bucket, config.timeout, 0)?;
        let upload = self.build_store(
            bucket,
            (config.timeout * 10).max(Duration::from_secs(60)),
            config.retries as usize,
        )?;
        let s = Stores { fetch, upload };
        stores.insert(bucket.to_string(), s.clone());
        Ok(s)
    }

    fn build_store(
        &self,
        bucket: &str,
        timeout: Duration,
        retries: usize,
    ) -> Result<Arc<dyn ObjectStore>, StoreError> {
        let ms = |d: Duration| format!("{}ms", d.as_millis().max(1));
        let mut b = self
            .inner
            .base
            .clone()
            .with_bucket_name(bucket)
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::Timeout),
                ms(timeout),
            )
            .with_config(
                AmazonS3ConfigKey::Client(ClientConfigKey::ConnectTimeout),
                ms(timeout.min(Duration::from_secs(5))),
            )
            .with_retry(RetryConfig {
                backoff: BackoffConfig {
                    init_backoff: BACKOFF_START,
                    max_backoff: BACKOFF_MAX,
                    base: 2.0,
                },
                max_retries: retries,
                retry_timeout: timeout * (retries as u32 + 1) + BACKOFF_MAX * retries as u32,
            });
        if let Some(endpoint) = &self.inner.endpoint {
            // S3-compatible servers (moto, MinIO) want path-style requests.
            b = b.with_virtual_hosted_style_request(false);
            if endpoint.starts_with("http://") {
                b = b.with_allow_http(true);
            }
        }
        let store = b
            .build()
            .map_err(|e| StoreError::Client(format!("bucket {bucket}: {e}")))?;
        Ok(Arc::new(store))
    }

    /// Opens the image object `url` (and its base): see [`S3Source::open_with`].
    pub fn open(&self, url: &S3Url) -> Result<S3Source, StoreError> {
        S3Source::open_with(self, url)
    }

    /// Pushes the image file `image` under the prefix `dest` (see the
    /// crate's notes, "Bucket layout"): lists `dest/chunks/` once, uploads
    /// the chunk objects of the image and of its base (found beside it by
    /// the name its index gives) that are not there yet, 16 at once, read
    /// from the files; then the base's manifest `dest/<base name>` unless
    /// one with the base's id is there already; then the image's manifest
    /// `dest/<its file name>`, last, so that a manifest never names a chunk
    /// the store has not. `progress` is called with the bytes of the image
    /// processed so far (chunks found or uploaded, then its manifest); it
    /// ends at the file's length.
    pub fn push(
        &self,
        image: &Path,
        dest: &S3Url,
        progress: &mut dyn FnMut(u64),
    ) -> Result<PushReport, StoreError> {
        let start = Instant::now();
        let what = image.display().to_string();
        let (index, image_len) = local_index(image)?;
        let name = image
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| StoreError::Io {
                path: what.clone(),
                error: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    "no file name (or not UTF-8)",
                ),
            })?;
        let image_url = dest.join(name)?;
        let chunks = chunks_prefix(dest)?;
        let stores = self.stores(dest.bucket())?;
        let io = |path: &Path| {
            let path = path.display().to_string();
            move |error| StoreError::Io { path, error }
        };
        let mut base = None;
        if let (true, Some(base_name)) = (index.has_base(), &index.base_name) {
            let base_path = image.parent().unwrap_or(Path::new(".")).join(base_name);
            let (base_index, _) = local_index(&base_path).map_err(|e| match e {
                StoreError::Io { error, .. } if error.kind() == std::io::ErrorKind::NotFound => {
                    StoreError::Image(image::ImageError::MissingBase {
                        what: what.clone(),
                        base: base_path.display().to_string(),
                        why: "push looks for it beside the image".to_string(),
                    })
                }
                e => e,
            })?;
            if base_index.header.id != index.header.base_id {
                return Err(StoreError::Image(image::ImageError::BaseMismatch {
                    what,
                    base: base_path.display().to_string(),
                    expected: hex(&index.header.base_id),
                    found: base_index.id_hex(),
                }));
            }
            let base_url = dest.join(base_name)?;
            let file = File::open(&base_path).map_err(io(&base_path))?;
            base = Some((base_path, base_index, base_url, Arc::new(file)));
        }
        let image_file = Arc::new(File::open(image).map_err(io(image))?);
        let mut report = PushReport {
            image_url: image_url.to_string(),
            base_url: base.as_ref().map(|b| b.2.to_string()),
            base_uploaded: false,
            chunks_uploaded: 0,
            chunks_present: 0,
            bytes_uploaded: 0,
            bytes_present: 0,
            seconds: 0.0,
        };

        // Which chunks the store has, and which to upload.
        let present = list_chunks(self, &*stores.upload, &chunks)?;
        let mut jobs = Vec::new();
        let mut seen = HashSet::new();
        let mut done = 0u64;
        let mut layers: Vec<(&Index, &Path, &Arc<File>, bool)> = Vec::new();
        if let Some((path, index, _, file)) = &base {
            layers.push((index, path, file, false));
        }
        layers.push((&index, image, &image_file, true));
        for (index, path, file, top) in layers {
            for entry in &index.blobs {
                let BlobLocation::Data { offset } = entry.location else {
                    continue;
                };
                let len = u64::from(entry.stored_len);
                let image_bytes = if top { len } else { 0 };
                let name = chunk_name(entry);
                if !seen.insert(name.clone()) {
                    // The same content twice in this push.
                    done += image_bytes;
                    continue;
                }
                match present.get(&name) {
                    Some(&size) if size == len => {
                        report.chunks_present += 1;
                        report.bytes_present += len;
                        done += image_bytes;
                        continue;
                    }
                    Some(&size) => tracing::warn!(
                        chunk = %name,
                        "the store's chunk object has {size} bytes, not {len}: uploading it again"
                    ),
                    None => {}
                }
                jobs.push(Job {
                    file: file.clone(),
                    path: path.display().to_string(),
                    at: index.header.data_offset + offset,
                    len,
                    url: chunks.join(&name)?,
                    image_bytes,
                });
            }
        }
        progress(done);
        report.chunks_uploaded = jobs.len() as u64;
        report.bytes_uploaded = jobs.iter().map(|j| j.len).sum();
        tracing::info!(
            image = %image_url,
            upload = report.chunks_uploaded,
            present = report.chunks_present,
            "pushing chunks"
        );
        self.upload_chunks(&stores, jobs, &mut |n| {
            done += n;
            progress(done);
        })?;

        // The manifests, base first: each only names chunks now there.
        if let Some((path, index, url, file)) = &base {
            if self.remote_id(url)? == Some(index.header.id) {
                tracing::info!(base = %url, "the store has the base's manifest already");
            } else {
                self.put_manifest(&stores, file, path, index, url)?;
                report.base_uploaded = true;
            }
        }
        self.put_manifest(&stores, &image_file, image, &index, &image_url)?;
        progress(image_len);
        report.seconds = start.elapsed().as_secs_f64();
        Ok(report)
    }

    /// Uploads `jobs`, [`PUSH_CONCURRENCY`] at once; `progress` is called
    /// (on this thread) with each finished job's `image_bytes`. Stops at
    /// the first failure.
    fn upload_chunks(
        &self,
        stores: &Stores,
        jobs: Vec<Job>,
        progress: &mut dyn FnMut(u64),
    ) -> Result<(), StoreError> {
        if jobs.is_empty() {
            return Ok(());
        }
        let (tx, rx) = std::sync::mpsc::channel::<u64>();
        let store = stores.upload.clone();
        let task = self.inner.runtime.handle().spawn(async move {
            let tx = &tx;
            let store = &store;
            futures::stream::iter(jobs.into_iter().map(Ok))
                .try_for_each_concurrent(PUSH_CONCURRENCY, |job| async move {
                    let Job {
                        file,
                        path,
                        at,
                        len,
                        url,
                        image_bytes,
                    } = job;
                    let read = tokio::task::spawn_blocking(move || {
                        let mut buf = vec![0u8; len as usize];
                        file.read_exact_at(&mut buf, at).map(|()| buf)
                    })
                    .await
                    .map_err(std::io::Error::other)
                    .and_then(|r| r);
                    let buf = read.map_err(|error| StoreError::Io {
                        path: path.clone(),
                        error,
                    })?;
                    store
                        .put(&url.path(), PutPayload::from(buf))
                        .await
                        .map_err(|e| StoreError::Request {
                            op: "upload to".to_string(),
                            url: url.to_string(),
                            why: e.to_string(),
                        })?;
                    // The receiver outlives the task.
                    let _ = tx.send(image_bytes);
                    Ok(())
                })
                .await
        });
        // Ends when the task drops the sender: done or failed.
        for n in rx {
            progress(n);
        }
        match self.inner.runtime.block_on(task) {
            Ok(result) => result,
            Err(e) => Err(StoreError::Client(format!("the upload task failed: {e}"))),
        }
    }

    /// Uploads the manifest of the image file `path` (its first
    /// `data_offset` bytes) to `url`.
    fn put_manifest(
        &self,
        stores: &Stores,
        file: &File,
        path: &Path,
        index: &Index,
        url: &S3Url,
    ) -> Result<(), StoreError> {
        let mut buf = vec![0u8; index.header.data_offset as usize];
        file.read_exact_at(&mut buf, 0)
            .map_err(|error| StoreError::Io {
                path: path.display().to_string(),
                error,
            })?;
        self.inner
            .runtime
            .block_on(stores.upload.put(&url.path(), PutPayload::from(buf)))
            .map_err(|e| StoreError::Request {
                op: "upload to".to_string(),
                url: url.to_string(),
                why: e.to_string(),
            })?;
        Ok(())
    }

    /// GETs every chunk object of the image whose manifest is `url` (and
    /// of its base), `concurrency` at once, discarding the bytes: what a
    /// plain parallel GET loop gets from the store, the baseline for
    /// [`S3Source`]'s cold reads. When `url` is a prefix (or names no
    /// object), every chunk object under `url/chunks/`. Requests are
    /// retried as fetches are; a missing chunk object fails the loop.
    pub fn get_loop(&self, url: &S3Url, concurrency: usize) -> Result<GetLoopReport, StoreError> {
        if concurrency == 0 {
            return Err(StoreError::Config(
                "get_loop: concurrency must be at least 1".to_string(),
            ));
        }
        let manifest = if url.key().is_empty() {
            None
        } else {
            match read_manifest(self, url) {
                Ok(index) => Some(index),
                Err(StoreError::NoSuchObject { .. }) => None,
                Err(e) => return Err(e),
            }
        };
        let stores = self.stores(url.bucket())?;
        let mut objects: Vec<(S3Url, u64)> = Vec::new();
        match manifest {
            Some(top) => {
                let prefix = url.parent();
                let chunks = chunks_prefix(&prefix)?;
                let base = match (top.has_base(), &top.base_name) {
                    (true, Some(name)) => {
                        let base_url = prefix.join(name)?;
                        Some(read_manifest(self, &base_url).map_err(|e| match e {
                            StoreError::NoSuchObject { .. } => {
                                StoreError::Image(image::ImageError::MissingBase {
                                    what: url.to_string(),
                                    base: base_url.to_string(),
                                    why:
                                        "no such object (push the image with its base)".to_string(),
                                })
                            }
                            e => e,
                        })?)
                    }
                    _ => None,
                };
                let mut seen = HashSet::new();
                for index in std::iter::once(&top).chain(base.as_ref()) {
                    for entry in &index.blobs {
                        if matches!(entry.location, BlobLocation::Data { .. })
                            && seen.insert(chunk_name(entry))
                        {
                            objects.push((chunk_url(&chunks, entry)?, u64::from(entry.stored_len)));
                        }
                    }
                }
            }
            None => {
                let chunks = chunks_prefix(url)?;
                for (name, size) in list_chunks(self, &*stores.fetch, &chunks)? {
                    objects.push((chunks.join(&name)?, size));
                }
                if objects.is_empty() {
                    return Err(StoreError::NoSuchObject {
                        url: format!("{url} (neither a manifest nor a prefix with chunks)"),
                    });
                }
            }
        }
        let retry = self.retry();
        let store = stores.fetch;
        let count = objects.len() as u64;
        let start = Instant::now();
        let bytes = self.inner.runtime.block_on(async {
            let retried = AtomicU64::new(0);
            let (retried, store) = (&retried, &store);
            futures::stream::iter(objects)
                .map(|(url, _)| async move {
                    let path = url.path();
                    retry
                        .run(retried, || async {
                            Ok(store.get(&path).await?.bytes().await?.len() as u64)
                        })
                        .await
                        .map_err(|f| match f {
                            Failure::NotFound => StoreError::NoSuchObject {
                                url: url.to_string(),
                            },
                            Failure::Failed(why) => StoreError::Request {
                                op: "GET".to_string(),
                                url: url.to_string(),
                                why,
                            },
                        })
                })
                .buffer_unordered(concurrency)
                .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
                .await
        })?;
        Ok(GetLoopReport {
            url: url.to_string(),
            objects: count,
            bytes,
            seconds: start.elapsed().as_secs_f64(),
            concurrency,
        })
    }

    /// The id of the image whose manifest is at `url`; `None` when there is
    /// no object there, or not a whole manifest (it is then replaced).
    fn remote_id(&self, url: &S3Url) -> Result<Option<[u8; 32]>, StoreError> {
        match read_manifest(self, url) {
            Ok(index) => Ok(Some(index.header.id)),
            Err(StoreError::NoSuchObject { .. } | StoreError::Image(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Uploads file `path` as is to the object `url` (one PUT when small,
    /// else a multipart upload); returns its length. `progress` is called with the
    /// bytes uploaded so far.
    pub fn put_file(
        &self,
        path: &Path,
        url: &S3Url,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let stores = self.stores(url.bucket())?;
        self.upload(&stores, path, url, &mut 0, progress)
    }

    /// The object_store client of `bucket` (tests: to delete or replace
    /// objects). Run its futures with [`Client::block_on`].
    #[doc(hidden)]
    pub fn object_store(&self, bucket: &str) -> Result<Arc<dyn ObjectStore>, StoreError> {
        Ok(self.stores(bucket)?.upload)
    }

    /// Runs `f` on the client's runtime (tests).
    #[doc(hidden)]
    pub fn block_on<F>(&self, f: F) -> F::Output
    where
        F: Future + Send,
        F::Output: Send,
    {
        self.inner.runtime.block_on(f)
    }

    /// Streams file `path` to `url`: one PUT when small, else a multipart
    /// upload of `part`-sized parts, four in flight (memory: five parts).
    fn upload(
        &self,
        stores: &Stores,
        path: &Path,
        url: &S3Url,
        done: &mut u64,
        progress: &mut dyn FnMut(u64),
    ) -> Result<u64, StoreError> {
        let io = |error| StoreError::Io {
            path: path.display().to_string(),
            error,
        };
        let request = |why: object_store::Error| StoreError::Request {
            op: "upload to".to_string(),
            url: url.to_string(),
            why: why.to_string(),
        };
        let mut file = File::open(path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        // S3 allows 10,000 parts: 8 MiB parts up to 78 GiB, larger beyond.
        let part = (8u64 << 20).max(len.div_ceil(9000)) as usize;
        let store = &stores.upload;
        let key = url.path();
        let rt = &self.inner.runtime;
        if len <= part as u64 {
            let mut buf = Vec::with_capacity(len as usize);
            file.read_to_end(&mut buf).map_err(io)?;
            let n = buf.len() as u64;
            rt.block_on(store.put(&key, PutPayload::from(buf)))
                .map_err(request)?;
            *done += n;
            progress(*done);
            return Ok(n);
        }
        let upload = rt.block_on(store.put_multipart(&key)).map_err(request)?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let mut sent = 0u64;
        let result = loop {
            let mut buf = vec![0u8; part];
            let n = match read_full(&mut file, &mut buf) {
                Ok(n) => n,
                Err(e) => break Err(io(e)),
            };
            if n == 0 {
                break Ok(());
            }
            buf.truncate(n);
            let w = &mut writer;
            if let Err(e) = rt.block_on(async move {
                w.wait_for_capacity(4).await?;
                w.put(bytes::Bytes::from(buf));
                Ok::<(), object_store::Error>(())
            }) {
                break Err(request(e));
            }
            sent += n as u64;
            *done += n as u64;
            progress(*done);
        };
        match result {
            Ok(()) => {
                rt.block_on(writer.finish()).map_err(request)?;
                Ok(sent)
            }
            Err(e) => {
                let _ = rt.block_on(writer.abort());
                Err(e)
            }
        }
    }
}

fn read_full(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..]) {
            Ok(0) => break,
            Ok(k) => n += k,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

pub(crate) fn failure(f: Failure) -> String {
    match f {
        Failure::NotFound => "the object is gone (not found)".to_string(),
        Failure::Failed(why) => why,
    }
}

pub(crate) fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// A local image's index, checked against the file's length, and that
/// length.
fn local_index(path: &Path) -> Result<(Index, u64), StoreError> {
    let what = path.display().to_string();
    let io = |error| StoreError::Io {
        path: what.clone(),
        error,
    };
    let file = File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let mut first = vec![0u8; HEADER_LEN.min(len as usize)];
    file.read_exact_at(&mut first, 0).map_err(io)?;
    let needed = Index::needed(&first, &what)?;
    if needed > len {
        return Err(StoreError::Image(image::ImageError::Truncated {
            what,
            why: format!("its index ends at byte {needed}, the file has {len}"),
        }));
    }
    let mut bytes = vec![0u8; needed as usize];
    file.read_exact_at(&mut bytes, 0).map_err(io)?;
    let index = Index::parse(&bytes, &what)?;
    index.check_len(len, &what)?;
    Ok((index, len))
}

/// What [`Client::push`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PushReport {
    /// The image's manifest.
    pub image_url: String,
    /// Its base's manifest (when it has a base).
    pub base_url: Option<String>,
    /// Whether the base's manifest was uploaded (false: the store had one
    /// with the base's id, or there is no base).
    pub base_uploaded: bool,
    /// Chunk objects uploaded (of the image and its base).
    pub chunks_uploaded: u64,
    /// Chunk objects the store had already (any image's under the prefix).
    pub chunks_present: u64,
    /// Bytes of the chunks uploaded.
    pub bytes_uploaded: u64,
    /// Bytes of the chunks the store had already.
    pub bytes_present: u64,
    /// How long the push took.
    pub seconds: f64,
}

/// What [`Client::get_loop`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GetLoopReport {
    /// The manifest (or prefix) whose chunks were fetched.
    pub url: String,
    /// Chunk objects fetched.
    pub objects: u64,
    /// Their bytes.
    pub bytes: u64,
    /// How long the GETs took (the manifests' reads aside).
    pub seconds: f64,
    /// GETs in flight at once.
    pub concurrency: usize,
}

/// One chunk to upload: `len` bytes at `at` of `file`.
struct Job {
    file: Arc<File>,
    /// The file's name, for errors.
    path: String,
    at: u64,
    len: u64,
    url: S3Url,
    /// Its bytes when it is the image's (progress), else 0.
    image_bytes: u64,
}

/// Chunk uploads in flight in [`Client::push`].
const PUSH_CONCURRENCY: usize = 16;

/// [`Client::push`] with a client from the environment and the default
/// configuration.
pub fn push(
    image: &Path,
    dest: &S3Url,
    progress: &mut dyn FnMut(u64),
) -> Result<PushReport, StoreError> {
    Client::from_env(StoreConfig::default())?.push(image, dest, progress)
}

/// [`Client::get_loop`] with a client from the environment and the
/// default configuration.
pub fn get_loop(url: &S3Url, concurrency: usize) -> Result<GetLoopReport, StoreError> {
    Client::from_env(StoreConfig::default())?.get_loop(url, concurrency)
}
