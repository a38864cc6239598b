//! Images in S3-compatible object storage: [`Client::push`] uploads an image
//! (and its base), [`S3Source`] serves one's pages to the engine, fetching
//! its chunks (blobs) on demand through bounded local caches.
//!
//! # Shape
//! - [`S3Url`], an `s3://BUCKET/KEY` address.
//! - [`Client`]: the store's connection (from the usual `AWS_*` environment
//!   with [`Client::from_env`], or explicit [`S3Options`]), its own small
//!   tokio runtime, and [`StoreConfig`].
//! - [`Client::push`]: the chunks the store has not, then the manifests.
//! - [`S3Source`]: a [`pager::PageSource`] over an image's manifest (and
//!   its base's), fetching chunk objects.
//! - [`Client::get_loop`]: a plain parallel GET loop over an image's chunk
//!   objects, the benchmark's baseline.
//!
//! # Bucket layout
//! Content-addressed chunk objects, as real snapshot stores keep them
//! (AWS Lambda's, for one): the same chunk is stored once for every image
//! in the bucket under a prefix, and every fetch is one whole small object
//! (no range GETs of a large one).
//!
//! - `PREFIX/NAME`: the image's **manifest**: exactly bytes
//!   `[0, data_offset)` of the image file (header and index, see
//!   `docs/image-format.md`). Its length must be `data_offset`: a
//!   truncated manifest is refused at open
//!   ([`image::ImageError::Truncated`]), and so is a longer object (an
//!   image file copied whole).
//! - `PREFIX/chunks/<blake3 hex of the decoded blob>.<codec name>.<xxh3 hex
//!   of the stored bytes>` (e.g. `chunks/9f3a…e1.lz4.0c4f…`): a stored
//!   blob's bytes exactly as in the image file's data section, so one name
//!   for the same bytes in every image (two packs of one content with other
//!   compression settings get two names, never overwrite each other). A blob whose index entry refers to the base's blob is
//!   the base's entry, and so the base's chunk object.
//! - A clone's base: its manifest at `PREFIX/<base name>` (the name the
//!   clone's index gives), its chunks in the same `PREFIX/chunks/`.
//!
//! [`Client::push`] lists `PREFIX/chunks/` once (object_store pages the
//! listing), uploads the chunks of the image and of its base that are not
//! there (or whose size is wrong), 16 PUTs in flight, each read from the
//! local file with `pread`; then the base's manifest unless one with the
//! base's id is there; then the image's manifest, last: a manifest never
//! names a chunk the store has not. An interrupted push leaves only chunk
//! objects, which the next push finds. Nothing deletes chunks: an image's
//! manifest may be replaced, the chunks it no longer names stay (garbage
//! collection would list every manifest under the prefix first).
//!
//! # Serving threads never wait on the network
//! The engine's serving threads are shared by every VM: one of them waiting
//! on a GET would stall every VM behind it. So
//! [`read_at_or_wake`](pager::PageSource::read_at_or_wake) only ever reads
//! memory and local disk: a blob found in neither is queued for fetching,
//! the caller's waker is added to that blob's waiters, and the read answers
//! `Pending`. The fetcher (two runtime threads of the client's own) calls
//! every waiter once the blob is decoded and cached (or has failed for
//! good), and the engine serves the fault again.
//! [`read_at`](pager::PageSource::read_at) is the same read that then waits
//! (for tools and tests).
//!
//! # Single flight and priorities
//! A blob being fetched has one entry in the source's table of flights;
//! every ask for it while it is in flight adds its waker there and starts
//! nothing. A finished blob stays in a small ring of recent blobs (shared
//! with the memory cache) so that a read that missed the caches just before
//! the fetch ended still finds it, and no blob is fetched twice because the
//! memory cache let it go. There are two queues: blobs a fault waits for
//! (demand) and blobs [`hint`](pager::PageSource::hint)ed (a recorded
//! working set). Fetch workers, at most `fetch_concurrency` of them, always
//! take demand first; hints use at most three quarters of them, so that a
//! fault never waits behind a full set of prefetches, and a hinted blob that
//! a fault then asks for moves to the demand queue. A GET is not
//! interrupted once started.
//!
//! # What is trusted
//! A fetch is one GET of the blob's whole chunk object. Every fetched blob
//! is checked against its stored checksum (xxh3) and its
//! content address (blake3 of the decoded bytes, from the image's index,
//! itself checked against the image's id) before it is cached or served. A
//! blob whose fetch fails for good (after `retries` retries with exponential
//! backoff, each attempt bounded by `timeout`; or a missing chunk object, or
//! bytes that fail a check) is remembered as failed: reads of its pages
//! answer `Untrusted` with the reason, which names the chunk object's key
//! (the engine poisons those pages only, the server stays up), logged once
//! per failure. After 10 s a new demand fetches it again: an outage of the
//! store poisons the pages asked for during it, not every later VM's.
//!
//! # Caches
//! Memory: [`image::BlobCache`] of decoded blobs, `memory_bytes`. Disk
//! (optional, `cache_dir`, `cache_bytes`): the stored bytes of every blob,
//! one file per blob named by its content address, shared by every image
//! and every process using the directory; see the `disk` module's notes on
//! atomic writes, checks and eviction. A cache never fails a read: a bad
//! file is deleted and its blob fetched again, a write error is logged at
//! most once a minute.
//!
//! # Figures
//! `examples/s3_bench.rs` against moto_server on this 2-core host (release
//! build, shared with other work): 256 MiB of the bench's `random` content
//! (pseudo-random pages, every 4th zero), packed with lz4 into 128 KiB
//! chunks: 192 MiB of data in 2048 chunk objects of 96 KiB (the random
//! pages do not compress; zero pages are not stored).
//!
//! | what | figure |
//! | --- | --- |
//! | push (2048 chunk PUTs, 16 in flight, then the manifest) | 5.1 s, 39 MB/s of image |
//! | push again (one listing, nothing to upload) | 0.32 s |
//! | cold random read of every chunk, 16 reads (so 16 fetches) in flight, no disk cache | 5.4 s, 49 MB/s of memory, 2.65 ms a fetch |
//! | `get_loop`, the same 2048 objects, 16 at once | 5.4 s, 50 MB/s of memory |
//! | the same cold read filling the disk cache | 5.1 s |
//! | a new source, every chunk from the disk cache (16 readers) | 58 ms, 4.6 GB/s, 0 fetches |
//! | again, from memory | 19 ms, 14 GB/s |
//! | reads of cached pages while 63 fetches delayed by 500 ms are in flight | p50 0.1 µs, p99 0.1 µs, max 0.5 µs; asking for the 63 took 35 µs |
//!
//! A cold read goes as fast as the plain GET loop: the server is the
//! bound (moto answers about 380 small GETs a second, Python under a
//! lock). Before this layout (one object per image, range GETs) moto read
//! the whole object for every range GET: 23 ms a fetch on a 32 MiB image,
//! 150 ms on 192 MiB, so this image could not be measured at all. The last
//! line is the point of the design: a fault on a cached page is served in a
//! fraction of a microsecond whatever the store is doing.

#![warn(missing_docs)]

mod client;
mod disk;
mod layout;
mod source;
#[doc(hidden)]
pub mod testing;
mod url;

use std::path::PathBuf;
use std::time::Duration;

pub use client::{get_loop, push, Client, GetLoopReport, PushReport, S3Options};
pub use source::{S3Source, StoreStats};
pub use url::S3Url;

/// The environment variable that sets [`StoreConfig::inject_delay`] (in
/// milliseconds) when the config leaves it unset: a test and benchmark knob
/// that delays every blob GET, to show that slow fetches do not stall other
/// faults. Never set it in production.
pub const INJECT_DELAY_ENV: &str = "PAGEWIRE_S3_INJECT_DELAY_MS";

/// How the store is reached and cached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// The disk cache's directory. `None` (the default): no disk cache, as
    /// nothing should be written where the operator did not say.
    pub cache_dir: Option<PathBuf>,
    /// The disk cache's bound in bytes. Default 10 GiB: a few VM images'
    /// worth of compressed chunks, small for a host's local disk.
    pub cache_bytes: u64,
    /// The memory cache's bound in bytes (decoded blobs). Default 256 MiB:
    /// the hot chunks of several VMs, small beside their memory.
    pub memory_bytes: usize,
    /// Fetches at once per source. Default 16: enough to fill a link whose
    /// round trip is tens of milliseconds with 1 MiB chunks, few enough not
    /// to be throttled by the store.
    pub fetch_concurrency: usize,
    /// Bound on one GET attempt (and on one upload request, times ten).
    /// Default 10 s: a 4 MiB chunk at 10 MB/s takes 0.4 s; a slower answer
    /// is a stuck connection better retried.
    pub timeout: Duration,
    /// Retries of a failed or timed-out request, with exponential backoff
    /// (100 ms doubling, at most 5 s). Default 4: rides out a store's
    /// throttling or a restart of a few seconds before pages are poisoned.
    pub retries: u32,
    /// Test and benchmark knob: delay every blob GET by this much (see
    /// [`INJECT_DELAY_ENV`]). Default `None`.
    pub inject_delay: Option<Duration>,
}

impl Default for StoreConfig {
    fn default() -> StoreConfig {
        StoreConfig {
            cache_dir: None,
            cache_bytes: 10 << 30,
            memory_bytes: 256 << 20,
            fetch_concurrency: 16,
            timeout: Duration::from_secs(10),
            retries: 4,
            inject_delay: None,
        }
    }
}

/// Why the store could not be reached, an image pushed or opened. Every
/// message says what was wrong and, where it helps, what to do.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Not an `s3://BUCKET/KEY` URL.
    #[error("bad S3 URL {url:?}: {why}")]
    BadUrl {
        /// The URL given.
        url: String,
        /// What is wrong with it.
        why: String,
    },
    /// Neither an endpoint nor a region: the client would not know where
    /// to go.
    #[error("no S3 endpoint or region is configured: set AWS_ENDPOINT_URL (an S3-compatible server, e.g. http://127.0.0.1:9000) or AWS_REGION (AWS S3)")]
    NoEndpoint,
    /// object_store refused the settings, or the runtime could not start.
    #[error("cannot set up the S3 client: {0} (check the AWS_* environment)")]
    Client(String),
    /// A [`StoreConfig`] value out of range.
    #[error("bad store configuration: {0}")]
    Config(String),
    /// The object (or its bucket) does not exist.
    #[error("no such object {url} (check the bucket and key; push the image with `pagewire image push`)")]
    NoSuchObject {
        /// The object's URL.
        url: String,
    },
    /// A request failed for good (after retries).
    #[error("{op} {url}: {why}")]
    Request {
        /// The request (`HEAD`, `GET bytes A..B of`, `upload to`).
        op: String,
        /// The object's URL.
        url: String,
        /// What the store or the connection said.
        why: String,
    },
    /// A local file (an image to push, the cache directory).
    #[error("{path}: {error}")]
    Io {
        /// The file.
        path: String,
        /// The error.
        error: std::io::Error,
    },
    /// The image is not valid, truncated, or its base is missing or wrong.
    #[error(transparent)]
    Image(#[from] image::ImageError),
}
