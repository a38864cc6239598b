//! A short measurement against moto_server on this host:
//! `cargo run --release -p pagewire-store --example s3_bench [MiB]`
//! (default 256).
//!
//! The memory is the bench's `random` content (pseudo-random pages, every
//! 4th page zero), packed with lz4 into 128 KiB chunks (the defaults).
//! Prints: push time (again: nothing to upload); a cold random read of
//! every chunk with 16 reads (so 16 fetches) in flight; the plain parallel
//! GET loop over the same chunk objects, 16 at once
//! ([`store::Client::get_loop`]); a new source reading everything from the
//! disk cache; and the latency of reads of cached pages while slow fetches
//! (`inject_delay`) are in flight.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{Codec, PackOptions, DEFAULT_CHUNK_SIZE, PAGE};
use pager::{PageSource, SourceError, Waker};
use store::testing::{unique_bucket, MotoServer, Rng};
use store::{Client, S3Source, S3Url, StoreConfig};

/// Readers at once in the cold and warm reads (each waits on its fetch).
const READERS: usize = 16;

/// The bench's `random` content (testbed::generate with zero_every 4).
fn bench_content(len: usize) -> Vec<u8> {
    let mut mem = vec![0u8; len];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for (i, page) in mem.chunks_mut(PAGE).enumerate() {
        if i % 4 == 3 {
            continue;
        }
        for w in page.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_ne_bytes());
        }
    }
    mem
}

/// Reads every chunk of `src` once, in a random order, `READERS` at once;
/// checks the bytes. Seconds.
fn random_read(src: &S3Source, mem: &[u8], rng: &mut Rng) -> f64 {
    let chunk = DEFAULT_CHUNK_SIZE as usize;
    let mut order: Vec<usize> = (0..mem.len().div_ceil(chunk)).collect();
    for i in (1..order.len()).rev() {
        order.swap(i, rng.below(i as u64 + 1) as usize);
    }
    let next = AtomicUsize::new(0);
    let t = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..READERS {
            s.spawn(|| {
                let mut buf = vec![0u8; chunk];
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let Some(&c) = order.get(i) else { break };
                    let at = c * chunk;
                    let n = chunk.min(mem.len() - at);
                    src.read_at(at as u64, &mut buf[..n]).expect("read");
                    assert!(buf[..n] == mem[at..at + n], "chunk {c} differs");
                }
            });
        }
    });
    t.elapsed().as_secs_f64()
}

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(256);
    let Some(server) = MotoServer::start() else {
        return;
    };
    let bucket = unique_bucket("bench");
    server.create_bucket(&bucket);
    let tmp = tempfile::tempdir().expect("temp dir");
    let mut rng = Rng::new("s3_bench");
    let mem = bench_content(mib << 20);
    let mem_path = tmp.path().join("vm.mem");
    std::fs::write(&mem_path, &mem).expect("write the memory file");
    let img = tmp.path().join("vm.pwi");
    image::pack(
        &mem_path,
        &img,
        &PackOptions {
            codec: Codec::Lz4,
            level: 1,
            chunk_size: DEFAULT_CHUNK_SIZE,
            base: None,
            diff: false,
        },
        &mut |_| {},
    )
    .expect("pack");
    let img_len = std::fs::metadata(&img).expect("image").len();
    println!(
        "memory {mib} MiB (random pages, every 4th zero), image {:.1} MiB, lz4, {} KiB chunks",
        img_len as f64 / (1 << 20) as f64,
        DEFAULT_CHUNK_SIZE >> 10
    );
    let config = StoreConfig {
        cache_dir: Some(tmp.path().join("cache")),
        ..StoreConfig::default()
    };
    let client = Client::new(&server.options(), config.clone()).expect("client");
    let prefix = S3Url::parse(&format!("s3://{bucket}/b")).expect("url");
    let t = Instant::now();
    let r = client.push(&img, &prefix, &mut |_| {}).expect("push");
    let secs = t.elapsed().as_secs_f64();
    println!(
        "push: {secs:.2} s, {:.0} MB/s, {} chunks uploaded",
        img_len as f64 / secs / 1e6,
        r.chunks_uploaded
    );
    let t = Instant::now();
    let r = client.push(&img, &prefix, &mut |_| {}).expect("push");
    println!(
        "push again: {:.2} s, {} uploaded, {} present",
        t.elapsed().as_secs_f64(),
        r.chunks_uploaded,
        r.chunks_present
    );
    let url = prefix.join("vm.pwi").expect("url");
    let mb = mem.len() as f64 / 1e6;

    // Cold, no disk cache, READERS fetches in flight.
    let nodisk = Client::new(
        &server.options(),
        StoreConfig {
            cache_dir: None,
            ..config.clone()
        },
    )
    .expect("client");
    let src = nodisk.open(&url).expect("open");
    let s = random_read(&src, &mem, &mut rng);
    let st = src.stats();
    println!(
        "cold random read, {READERS} in flight: {s:.2} s, {:.0} MB/s of memory, {} fetches ({:.1} MB), {:.2} ms a fetch",
        mb / s,
        st.fetches,
        st.fetched_bytes as f64 / 1e6,
        s * 1e3 / st.fetches as f64
    );
    drop(src);

    // The plain GET loop over the same objects.
    let r = nodisk.get_loop(&url, READERS).expect("get loop");
    println!(
        "get_loop, {READERS} at once: {:.2} s, {} objects, {:.0} MB/s of chunks ({:.0} MB/s of memory)",
        r.seconds,
        r.objects,
        r.bytes as f64 / r.seconds / 1e6,
        mb / r.seconds
    );

    // Through the disk cache: cold (fills it), then a new source from it.
    let src = client.open(&url).expect("open");
    let s = random_read(&src, &mem, &mut rng);
    println!(
        "cold random read filling the disk cache: {s:.2} s, {:.0} MB/s",
        mb / s
    );
    drop(src);
    let src = client.open(&url).expect("open");
    let s = random_read(&src, &mem, &mut rng);
    println!(
        "a new source, every chunk from the disk cache: {:.1} ms, {:.0} MB/s ({} fetches, {} disk hits)",
        s * 1e3,
        mb / s,
        src.stats().fetches,
        src.stats().disk_hits
    );
    let s = random_read(&src, &mem, &mut rng);
    println!(
        "the same, from memory: {:.1} ms, {:.0} MB/s",
        s * 1e3,
        mb / s
    );
    drop(src);

    // Slow fetches in flight do not stall reads of cached pages.
    let slow = Client::new(
        &server.options(),
        StoreConfig {
            cache_dir: None,
            inject_delay: Some(Duration::from_millis(500)),
            ..config
        },
    )
    .expect("client");
    let src = slow.open(&url).expect("open");
    let chunk = u64::from(DEFAULT_CHUNK_SIZE);
    let mut page = vec![0u8; PAGE];
    src.read_at(0, &mut page).expect("read"); // chunk 0 cached
    let noop: Waker = Arc::new(|| {});
    let t = Instant::now();
    let mut pending = 0;
    for i in 1..(src.len() / chunk).min(64) {
        if let Err(SourceError::Pending) = src.read_at_or_wake(i * chunk, &mut page, &noop) {
            pending += 1;
        }
    }
    let asked = t.elapsed();
    let mut lat = Vec::new();
    for i in 0..2000u64 {
        let t = Instant::now();
        src.read_at_or_wake((i % 24) * PAGE as u64, &mut page, &noop)
            .expect("a cached page");
        lat.push(t.elapsed());
    }
    lat.sort();
    println!(
        "with {pending} fetches of 500 ms in flight (asked in {:.0} us): reads of cached pages p50 {:.1} us, p99 {:.1} us, max {:.1} us; fetches done meanwhile: {}",
        asked.as_secs_f64() * 1e6,
        lat[lat.len() / 2].as_secs_f64() * 1e6,
        lat[lat.len() * 99 / 100].as_secs_f64() * 1e6,
        lat[lat.len() - 1].as_secs_f64() * 1e6,
        src.stats().fetches - 1
    );
}
