//! The store against a real S3-compatible server (moto_server).

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::sync::Arc;
use std::time::Duration;

use image::{BlobKey, Codec, PackOptions, PageFrom, PAGE};
use pager::{PageSource, SourceError, Waker};

use object_store::{ObjectStoreExt, PutPayload};
use store::testing::{unique_bucket, MotoServer, Rng};
use store::{Client, S3Options, S3Source, S3Url, StoreConfig, StoreError};

/// A server, a fresh bucket on it and a client.
struct Env {
    server: Arc<MotoServer>,
    bucket: String,
    client: Client,
}

impl Env {
    fn new(config: StoreConfig) -> Option<Env> {
        let server = MotoServer::shared()?;
        let bucket = unique_bucket("pw");
        server.create_bucket(&bucket);
        let client = Client::new(&server.options(), config).expect("client");
        Some(Env {
            server,
            bucket,
            client,
        })
    }

    fn url(&self, key: &str) -> S3Url {
        S3Url::parse(&format!("s3://{}/{key}", self.bucket)).expect("url")
    }

    fn get(&self, key: &str) -> Vec<u8> {
        let store = self.client.object_store(&self.bucket).expect("store");
        let path = object_store::path::Path::parse(key).expect("path");
        self.client
            .block_on(async move { store.get(&path).await?.bytes().await })
            .expect("get")
            .to_vec()
    }

    fn delete(&self, key: &str) {
        let store = self.client.object_store(&self.bucket).expect("store");
        let path = object_store::path::Path::parse(key).expect("path");
        self.client
            .block_on(async move { store.delete(&path).await })
            .expect("delete");
    }

    fn put(&self, key: &str, bytes: Vec<u8>) {
        let store = self.client.object_store(&self.bucket).expect("store");
        let path = object_store::path::Path::parse(key).expect("path");
        self.client
            .block_on(async move { store.put(&path, PutPayload::from(bytes)).await })
            .expect("put");
    }
}

fn quick() -> StoreConfig {
    StoreConfig {
        timeout: Duration::from_secs(5),
        retries: 1,
        ..StoreConfig::default()
    }
}

#[test]
fn put_file_streams_a_large_file_in_parts() {
    let Some(env) = Env::new(quick()) else { return };
    let mut rng = Rng::new("put_file_streams_a_large_file_in_parts");
    let tmp = tempfile::tempdir().unwrap();
    // Past one 8 MiB part: a multipart upload of three parts.
    let len = (8 << 20) * 2 + 1 + rng.below(1 << 20) as usize;
    let mut data = vec![0u8; len];
    rng.fill(&mut data);
    let path = tmp.path().join("big");
    std::fs::write(&path, &data).unwrap();
    let mut seen = Vec::new();
    let n = env
        .client
        .put_file(&path, &env.url("dir/big"), &mut |d| seen.push(d))
        .expect("upload");
    assert_eq!(n, len as u64);
    assert_eq!(seen.last().copied(), Some(len as u64));
    assert!(seen.windows(2).all(|w| w[0] < w[1]), "{seen:?}");
    assert!(
        env.get("dir/big") == data,
        "the object differs from the file"
    );
    // A small one: one PUT.
    std::fs::write(&path, b"small").unwrap();
    env.client
        .put_file(&path, &env.url("small"), &mut |_| {})
        .expect("upload");
    assert_eq!(env.get("small"), b"small");
    drop(env.server);
}

#[test]
fn open_errors_are_clear() {
    let Some(env) = Env::new(quick()) else { return };
    let e = env
        .client
        .open(&env.url("nothing/here"))
        .expect_err("missing");
    assert!(matches!(e, StoreError::NoSuchObject { .. }), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains(&format!("no such object s3://{}/nothing/here", env.bucket)),
        "{msg}"
    );
    let e = env
        .client
        .open(&S3Url::parse("s3://no-such-bucket-pw/x").unwrap())
        .expect_err("missing bucket");
    assert!(e.to_string().contains("s3://no-such-bucket-pw/x"), "{e}");
}

#[test]
fn a_truncated_or_whole_image_manifest_is_refused_at_open() {
    let Some((env, _mem, url, tmp, mut rng)) = pushed(
        "a_truncated_or_whole_image_manifest_is_refused_at_open",
        quick(),
    ) else {
        return;
    };
    let manifest = env.get(url.key());
    let file = std::fs::read(tmp.path().join("vm.pwi")).unwrap();
    assert!(file.starts_with(&manifest) && manifest.len() < file.len());
    // Cut short anywhere past the header (the index is missing bytes).
    let cut = image::HEADER_LEN + rng.below((manifest.len() - image::HEADER_LEN) as u64) as usize;
    env.put(url.key(), manifest[..cut].to_vec());
    let e = env.client.open(&url).expect_err("truncated");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::Image(image::ImageError::Truncated { .. }))
            && msg.contains(&url.to_string())
            && msg.contains("push the image again"),
        "{msg}"
    );
    // The whole image file where the manifest belongs.
    env.put(url.key(), file);
    let e = env.client.open(&url).expect_err("not a manifest");
    assert!(e.to_string().contains("not a manifest"), "{e}");
    // Pushed again: right.
    env.client
        .push(&tmp.path().join("vm.pwi"), &url.parent(), &mut |_| {})
        .expect("push");
    env.client.open(&url).expect("open");
}

#[test]
fn no_endpoint_or_region_says_what_to_set() {
    let e = Client::new(&S3Options::default(), StoreConfig::default()).expect_err("no endpoint");
    assert!(matches!(e, StoreError::NoEndpoint));
    assert!(e.to_string().contains("set AWS_ENDPOINT_URL"), "{e}");
    let e = Client::new(
        &S3Options {
            region: Some("us-east-1".into()),
            ..S3Options::default()
        },
        StoreConfig {
            fetch_concurrency: 0,
            ..StoreConfig::default()
        },
    )
    .expect_err("bad config");
    assert!(e.to_string().contains("fetch_concurrency"), "{e}");
}

#[test]
fn a_stopped_server_is_a_clear_error_after_retries() {
    let Some(mut server) = MotoServer::start() else {
        return;
    };
    let options = server.options();
    server.stop();
    let client = Client::new(
        &options,
        StoreConfig {
            timeout: Duration::from_secs(2),
            retries: 2,
            ..StoreConfig::default()
        },
    )
    .expect("client");
    let url = S3Url::parse("s3://b/img").unwrap();
    let e = client.open(&url).expect_err("stopped");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::Request { .. })
            && msg.contains("s3://b/img")
            && msg.contains("after 3 attempts"),
        "{msg}"
    );
}

// ---- Images end to end ----

/// A memory file of `pages` pages: random pages, compressible pages, zero
/// pages and repeated pages, in runs.
fn memory(rng: &mut Rng, pages: usize) -> Vec<u8> {
    let mut mem = vec![0u8; pages * PAGE];
    let mut p = 0;
    while p < pages {
        let run = (1 + rng.below(24) as usize).min(pages - p);
        let kind = rng.below(4);
        for q in p..p + run {
            let page = &mut mem[q * PAGE..(q + 1) * PAGE];
            match kind {
                0 => rng.fill(page),
                1 => page.fill((q % 251) as u8),
                2 => {}
                _ => {
                    let b = rng.below(4) as u8;
                    for (i, x) in page.iter_mut().enumerate() {
                        *x = b.wrapping_add((i / 64) as u8);
                    }
                }
            }
        }
        p += run;
    }
    mem
}

fn pack(dir: &Path, name: &str, mem: &[u8], base: Option<PathBuf>) -> PathBuf {
    let mem_path = dir.join(format!("{name}.mem"));
    std::fs::write(&mem_path, mem).unwrap();
    let out = dir.join(name);
    image::pack(
        &mem_path,
        &out,
        &PackOptions {
            codec: Codec::Zstd,
            level: 1,
            chunk_size: 64 << 10,
            base,
            diff: false,
        },
        &mut |_| {},
    )
    .expect("pack");
    out
}

/// Reads the whole source in pieces of random sizes.
fn read_all(src: &S3Source, rng: &mut Rng) -> Result<Vec<u8>, SourceError> {
    let len = src.len() as usize;
    let mut out = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = (1 + rng.below(300_000) as usize).min(len - at);
        src.read_at(at as u64, &mut out[at..at + n])?;
        at += n;
    }
    Ok(out)
}

/// The source ranges whose pages come from blob `key`.
fn pages_of(src: &S3Source, key: BlobKey) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for off in (0..src.len()).step_by(PAGE) {
        if let PageFrom::Blob { key: k, .. } = src.layers().locate(off) {
            if k == key {
                match out.last_mut() {
                    Some(r) if r.end == off => r.end = off + PAGE as u64,
                    _ => out.push(off..off + PAGE as u64),
                }
            }
        }
    }
    out
}

/// The chunk object key of a blob under `prefix`.
fn chunk_key(prefix: &str, entry: &image::BlobEntry) -> String {
    let hex: String = entry.hash.iter().map(|b| format!("{b:02x}")).collect();
    format!(
        "{prefix}/chunks/{hex}.{}.{:016x}",
        entry.codec.name(),
        entry.checksum
    )
}

/// The distinct chunk names an index stores in its own data.
fn chunk_names(index: &image::Index) -> std::collections::BTreeSet<String> {
    index
        .blobs
        .iter()
        .filter(|e| matches!(e.location, image::BlobLocation::Data { .. }))
        .map(|e| chunk_key("", e))
        .collect()
}

/// A local image's index.
fn local_index(path: &Path) -> image::Index {
    let bytes = std::fs::read(path).unwrap();
    image::Index::parse(&bytes, "local").unwrap()
}

/// An image pushed to a fresh bucket: (env, its memory, its URL).
fn pushed(
    what: &str,
    config: StoreConfig,
) -> Option<(Env, Vec<u8>, S3Url, tempfile::TempDir, Rng)> {
    let env = Env::new(config)?;
    let mut rng = Rng::new(what);
    let tmp = tempfile::tempdir().unwrap();
    let pages = 300 + rng.below(200) as usize;
    let mem = memory(&mut rng, pages);
    let img = pack(tmp.path(), "vm.pwi", &mem, None);
    let mut seen = Vec::new();
    let report = env
        .client
        .push(&img, &env.url("images"), &mut |d| seen.push(d))
        .expect("push");
    assert_eq!(report.base_url, None);
    let names = chunk_names(&local_index(&img));
    assert_eq!(
        (report.chunks_uploaded, report.chunks_present),
        (names.len() as u64, 0),
        "{report:?}"
    );
    let file_len = std::fs::metadata(&img).unwrap().len();
    assert_eq!(
        seen.last().copied(),
        Some(file_len),
        "progress ends at the file's length"
    );
    assert!(seen.windows(2).all(|w| w[0] <= w[1]), "{seen:?}");
    let url = env.url("images/vm.pwi");
    assert_eq!(report.image_url, url.to_string());
    Some((env, mem, url, tmp, rng))
}

#[test]
fn push_open_and_read_every_byte() {
    let Some((env, mem, url, _tmp, mut rng)) = pushed("push_open_and_read_every_byte", quick())
    else {
        return;
    };
    let src = env.client.open(&url).expect("open");
    assert_eq!(src.len(), mem.len() as u64);
    assert!(src.describe().contains(&url.to_string()));
    let got = read_all(&src, &mut rng).expect("read");
    assert!(got == mem, "the bytes differ from the memory file");
    for r in src.zero_ranges() {
        assert!(
            mem[r.start as usize..r.end as usize]
                .iter()
                .all(|&b| b == 0),
            "{r:?}"
        );
    }
    let stats = src.stats();
    let blobs = src.layers().top().blobs.len() as u64;
    assert_eq!(stats.fetches, blobs, "{stats:?}");
    assert_eq!(stats.failures, 0);
    // Again: every blob from memory.
    let got = read_all(&src, &mut rng).expect("read");
    assert!(got == mem);
    assert_eq!(src.stats().fetches, blobs);
}

#[test]
fn a_clone_with_its_base() {
    let Some(env) = Env::new(quick()) else { return };
    let mut rng = Rng::new("a_clone_with_its_base");
    let tmp = tempfile::tempdir().unwrap();
    let base_mem = memory(&mut rng, 256);
    let mut clone_mem = base_mem.clone();
    for _ in 0..5 {
        let p = rng.below(256) as usize;
        rng.fill(&mut clone_mem[p * PAGE..p * PAGE + 100]);
    }
    let base = pack(tmp.path(), "base.pwi", &base_mem, None);
    let clone = pack(tmp.path(), "clone.pwi", &clone_mem, Some(base.clone()));
    let base_names = chunk_names(&local_index(&base));
    let clone_names = chunk_names(&local_index(&clone));
    let new_names = clone_names.difference(&base_names).count() as u64;
    assert!(new_names > 0, "the clone has chunks of its own");
    let dest = env.url("set");
    // The base alone first.
    let report = env.client.push(&base, &dest, &mut |_| {}).expect("push");
    assert_eq!(
        report.chunks_uploaded,
        base_names.len() as u64,
        "{report:?}"
    );
    // Then the clone: only its new chunks go up; the base's manifest is
    // there already.
    let report = env.client.push(&clone, &dest, &mut |_| {}).expect("push");
    assert_eq!(
        report.base_url.as_deref(),
        Some(&*env.url("set/base.pwi").to_string())
    );
    assert!(!report.base_uploaded, "{report:?}");
    assert_eq!(report.chunks_uploaded, new_names, "{report:?}");
    assert_eq!(report.chunks_present, base_names.len() as u64, "{report:?}");
    // Again: nothing to upload.
    let report = env.client.push(&clone, &dest, &mut |_| {}).expect("push");
    assert_eq!(
        (
            report.chunks_uploaded,
            report.bytes_uploaded,
            report.base_uploaded
        ),
        (0, 0, false),
        "{report:?}"
    );
    // Another image of the same memory under another name, in the same
    // prefix: every chunk is there (dedup across images).
    let copy = pack(tmp.path(), "copy.pwi", &base_mem, None);
    let report = env.client.push(&copy, &dest, &mut |_| {}).expect("push");
    assert_eq!(report.chunks_uploaded, 0, "{report:?}");

    // The plain GET loop: every chunk of the clone and its base, once.
    let r = env
        .client
        .get_loop(&env.url("set/clone.pwi"), 4)
        .expect("get loop");
    let all = base_names.union(&clone_names).count() as u64;
    assert_eq!(r.objects, all, "{r:?}");
    // Over the prefix: every chunk object there.
    let r = env.client.get_loop(&dest, 4).expect("get loop");
    assert_eq!(r.objects, all, "{r:?}");

    let src = env.client.open(&env.url("set/clone.pwi")).expect("open");
    assert!(src.layers().base().is_some());
    assert!(read_all(&src, &mut rng).expect("read") == clone_mem);
    let src = env
        .client
        .open(&env.url("set/base.pwi"))
        .expect("open base");
    assert!(read_all(&src, &mut rng).expect("read") == base_mem);

    // Another image's manifest under the base's name: the wrong base.
    let other = pack(tmp.path(), "other.pwi", &memory(&mut rng, 16), None);
    let bytes = std::fs::read(&other).unwrap();
    let manifest_len = local_index(&other).header.data_offset as usize;
    env.put("set/base.pwi", bytes[..manifest_len].to_vec());
    let e = env
        .client
        .open(&env.url("set/clone.pwi"))
        .expect_err("wrong base");
    assert!(
        matches!(e, StoreError::Image(image::ImageError::BaseMismatch { .. })),
        "{e}"
    );
    // No base at all.
    env.delete("set/base.pwi");
    let e = env
        .client
        .open(&env.url("set/clone.pwi"))
        .expect_err("no base");
    let msg = e.to_string();
    assert!(
        matches!(e, StoreError::Image(image::ImageError::MissingBase { .. }))
            && msg.contains("set/base.pwi"),
        "{msg}"
    );
}

#[test]
fn concurrent_reads_of_one_blob_make_one_fetch() {
    let config = StoreConfig {
        inject_delay: Some(Duration::from_millis(200)),
        ..quick()
    };
    let Some((env, mem, url, _tmp, _rng)) =
        pushed("concurrent_reads_of_one_blob_make_one_fetch", config)
    else {
        return;
    };
    let src = Arc::new(env.client.open(&url).expect("open"));
    // A page from a blob.
    let off = (0..src.len())
        .step_by(PAGE)
        .find(|&o| matches!(src.layers().locate(o), PageFrom::Blob { .. }))
        .expect("a blob page");
    let threads: Vec<_> = (0..8)
        .map(|_| {
            let src = src.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; PAGE];
                src.read_at(off, &mut buf).map(|()| buf)
            })
        })
        .collect();
    for t in threads {
        let buf = t.join().unwrap().expect("read");
        assert!(buf[..] == mem[off as usize..off as usize + PAGE]);
    }
    assert_eq!(src.stats().fetches, 1, "{:?}", src.stats());
}

#[test]
fn read_at_or_wake_answers_pending_then_wakes() {
    let Some((env, mem, url, _tmp, _rng)) =
        pushed("read_at_or_wake_answers_pending_then_wakes", quick())
    else {
        return;
    };
    let src = env.client.open(&url).expect("open");
    let (tx, rx) = mpsc::channel();
    let tx = std::sync::Mutex::new(tx);
    let waker: Waker = Arc::new(move || {
        let _ = tx.lock().unwrap().send(());
    });
    let len = src.len().min(1 << 20) as usize;
    let mut buf = vec![0u8; len];
    match src.read_at_or_wake(0, &mut buf, &waker) {
        Err(SourceError::Pending) => {}
        other => panic!("expected Pending, got {other:?}"),
    }
    // Every blob of the read was asked for at once: wait until the read
    // succeeds (each wake is one blob).
    loop {
        rx.recv_timeout(Duration::from_secs(60))
            .expect("the waker fires");
        match src.read_at_or_wake(0, &mut buf, &waker) {
            Ok(()) => break,
            Err(SourceError::Pending) => continue,
            Err(e) => panic!("{e}"),
        }
    }
    assert!(buf[..] == mem[..len]);
    assert!(src.stats().pending >= 1);
}

#[test]
fn a_missing_chunk_object_poisons_only_its_blob() {
    let Some((env, mem, url, _tmp, mut rng)) =
        pushed("a_missing_chunk_object_poisons_only_its_blob", quick())
    else {
        return;
    };
    let src = env.client.open(&url).expect("open");
    // Fetch the first half's blobs, then delete the chunk object of a blob
    // of the second half only.
    let half = (src.len() / 2) & !(PAGE as u64 - 1);
    let mut buf = vec![0u8; half as usize];
    src.read_at(0, &mut buf).expect("read");
    let fetched: std::collections::HashSet<BlobKey> =
        src.layers().blobs_for(0..half).into_iter().collect();
    let later: Vec<BlobKey> = src
        .layers()
        .blobs_for(half..src.len())
        .into_iter()
        .filter(|k| !fetched.contains(k))
        .collect();
    assert!(!later.is_empty(), "the second half needs blobs of its own");
    let victim = later[rng.below(later.len() as u64) as usize];
    let key = chunk_key("images", src.layers().entry(victim));
    env.delete(&key);

    let mut all = vec![0u8; src.len() as usize];
    let e = src.read_at(0, &mut all).expect_err("deleted");
    let SourceError::Untrusted { bad, why } = e else {
        panic!("expected Untrusted, got {e}")
    };
    assert!(
        why.contains("not found") && why.contains(&format!("s3://{}/{key}", env.bucket)),
        "{why}"
    );
    assert_eq!(merge(bad.clone()), pages_of(&src, victim));
    // Every other byte is right.
    for (i, (a, b)) in all.iter().zip(&mem).enumerate() {
        if !bad.iter().any(|r| r.contains(&(i as u64))) {
            assert_eq!(a, b, "byte {i}");
        }
    }
    // The failure is remembered: no new fetch; the good half still reads.
    let stats = src.stats();
    assert_eq!(stats.failures, 1, "{stats:?}");
    assert!(src.read_at(0, &mut all).is_err());
    assert_eq!(src.stats().failures, 1);
    assert_eq!(src.stats().fetches, stats.fetches);
    assert!(read_half(&src, half, &mut rng) == mem[..half as usize]);
}

/// Adjacent ranges merged.
fn merge(ranges: Vec<Range<u64>>) -> Vec<Range<u64>> {
    let mut merged: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        match merged.last_mut() {
            Some(m) if m.end == r.start => m.end = r.end,
            _ => merged.push(r),
        }
    }
    merged
}

fn read_half(src: &S3Source, half: u64, rng: &mut Rng) -> Vec<u8> {
    let mut out = vec![0u8; half as usize];
    let mut at = 0usize;
    while at < half as usize {
        let n = (1 + rng.below(100_000) as usize).min(half as usize - at);
        src.read_at(at as u64, &mut out[at..at + n]).expect("read");
        at += n;
    }
    out
}

#[test]
fn a_corrupt_blob_in_the_store_is_untrusted_alone() {
    let Some((env, mem, url, _tmp, mut rng)) =
        pushed("a_corrupt_blob_in_the_store_is_untrusted_alone", quick())
    else {
        return;
    };
    let src = env.client.open(&url).expect("open");
    let keys = src.layers().blobs_for(0..src.len());
    let key = keys[rng.below(keys.len() as u64) as usize];
    let object = chunk_key("images", src.layers().entry(key));
    drop(src);
    let mut bytes = env.get(&object);
    let at = rng.below(bytes.len() as u64) as usize;
    bytes[at] ^= 0x40;
    env.put(&object, bytes);

    let src = env.client.open(&url).expect("open");
    let mut all = vec![0u8; src.len() as usize];
    let e = src.read_at(0, &mut all).expect_err("corrupt");
    let SourceError::Untrusted { bad, why } = e else {
        panic!("expected Untrusted, got {e}")
    };
    assert!(why.contains(&object), "{why}");
    assert_eq!(merge(bad), pages_of(&src, key), "{why}");
    for r in pages_of(&src, key) {
        all[r.start as usize..r.end as usize]
            .copy_from_slice(&mem[r.start as usize..r.end as usize]);
    }
    assert!(all == mem, "every other byte is right");
    assert_eq!(src.stats().failures, 1);
}

#[test]
fn the_disk_cache_survives_is_bounded_and_checked() {
    let Some((env, mem, url, tmp, mut rng)) =
        pushed("the_disk_cache_survives_is_bounded_and_checked", quick())
    else {
        return;
    };
    let cache = tmp.path().join("cache");
    let config = StoreConfig {
        cache_dir: Some(cache.clone()),
        ..quick()
    };
    let client = Client::new(&env.server.options(), config.clone()).unwrap();
    let src = client.open(&url).unwrap();
    assert!(read_all(&src, &mut rng).unwrap() == mem);
    let blobs = src.layers().top().blobs.len() as u64;
    assert_eq!(src.stats().fetches, blobs);
    // Chunks are written to disk after their waiters were woken.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while src.stats().disk_files < blobs {
        assert!(std::time::Instant::now() < deadline, "{:?}", src.stats());
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let disk_bytes = src.stats().disk_bytes;
    assert_eq!(src.stats().disk_files, blobs);
    drop(src);

    // A new source (as after a restart): everything from disk.
    let src = client.open(&url).unwrap();
    assert_eq!(src.stats().disk_bytes, disk_bytes, "the scan finds them");
    assert!(read_all(&src, &mut rng).unwrap() == mem);
    assert_eq!(src.stats().fetches, 0, "{:?}", src.stats());
    // At least once each: blobs stored as is are not kept in memory (the
    // page cache holds their file), so a blob read twice is two hits.
    assert!(src.stats().disk_hits >= blobs, "{:?}", src.stats());
    drop(src);

    // Another image of the same memory, under another prefix and name:
    // the cache is keyed by content, so nothing is fetched either.
    let copy = tmp.path().join("copy.pwi");
    std::fs::copy(tmp.path().join("vm.pwi"), &copy).unwrap();
    let report = client
        .push(&copy, &env.url("elsewhere"), &mut |_| {})
        .unwrap();
    assert_eq!(
        report.chunks_uploaded, blobs,
        "another prefix: its own chunks"
    );
    let src = client.open(&env.url("elsewhere/copy.pwi")).unwrap();
    assert!(read_all(&src, &mut rng).unwrap() == mem);
    assert_eq!(src.stats().fetches, 0, "{:?}", src.stats());
    drop(src);

    // A corrupt file is deleted and its blob fetched again.
    let victim = walk(&cache)[rng.below(blobs) as usize].clone();
    let mut bytes = std::fs::read(&victim).unwrap();
    let at = bytes.len() - 1 - rng.below(bytes.len() as u64 / 2) as usize;
    bytes[at] ^= 1;
    std::fs::write(&victim, bytes).unwrap();
    let src = client.open(&url).unwrap();
    assert!(read_all(&src, &mut rng).unwrap() == mem);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while src.stats().disk_files < blobs && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let stats = src.stats();
    assert_eq!((stats.fetches, stats.disk_bad_files), (1, 1), "{stats:?}");
    assert_eq!(stats.disk_files, blobs, "fetched and written again");
    drop(src);

    // A limit of a third of it: evicts and stays under.
    let limit = disk_bytes / 3;
    let client = Client::new(
        &env.server.options(),
        StoreConfig {
            cache_bytes: limit,
            ..config
        },
    )
    .unwrap();
    let src = client.open(&url).unwrap();
    assert!(src.stats().disk_bytes <= limit);
    assert!(read_all(&src, &mut rng).unwrap() == mem);
    let stats = src.stats();
    assert!(
        stats.disk_bytes <= limit && stats.disk_evictions > 0,
        "{stats:?}"
    );
    // Chunks are written to the disk cache after their waiters are woken:
    // the last writes (and their evictions) may still be under way.
    drop(src);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let on_disk: u64 = walk(&cache)
            .iter()
            .filter_map(|p| p.metadata().ok())
            .map(|m| m.len())
            .sum();
        if on_disk <= limit {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{on_disk} > {limit}");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for sub in std::fs::read_dir(dir).unwrap() {
        let sub = sub.unwrap().path();
        if sub.is_dir() {
            for f in std::fs::read_dir(&sub).unwrap() {
                out.push(f.unwrap().path());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn hints_fetch_ahead_and_faults_go_first() {
    let config = StoreConfig {
        fetch_concurrency: 1,
        inject_delay: Some(Duration::from_millis(100)),
        ..quick()
    };
    let Some((env, mem, url, _tmp, mut rng)) =
        pushed("hints_fetch_ahead_and_faults_go_first", config)
    else {
        return;
    };
    let src = env.client.open(&url).expect("open");
    let keys = src.layers().blobs_for(0..src.len());
    assert!(keys.len() >= 6, "{}", keys.len());
    // Hint every blob but the last, then fault on the last: with one
    // worker, it is fetched right after the hint in flight, long before
    // the other hints (each GET is delayed by 100 ms).
    let last = *keys.last().unwrap();
    let last_page = pages_of(&src, last)[0].start;
    src.hint(std::slice::from_ref(&(0..last_page)));
    let hinted = src.stats().hinted;
    assert_eq!(hinted, keys.len() as u64 - 1);
    let mut buf = vec![0u8; PAGE];
    src.read_at(last_page, &mut buf).expect("read");
    assert!(buf[..] == mem[last_page as usize..last_page as usize + PAGE]);
    let at_fault = src.stats().fetches;
    assert!(
        at_fault < hinted,
        "the fault waited behind the hints: {at_fault} fetches"
    );
    // Everything reads, each blob fetched once.
    assert!(read_all(&src, &mut rng).expect("read") == mem);
    assert_eq!(src.stats().fetches, keys.len() as u64);
}
