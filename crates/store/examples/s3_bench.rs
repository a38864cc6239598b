//! A short measurement against moto_server on this host:
//! `cargo run --release -p pagewire-store --example s3_bench [MiB]`.
//! Prints push time, cold reads (one fetch at a time, and with every blob
//! hinted), warm reads (memory, disk cache), and the latency of reads of
//! cached pages while slow fetches (`inject_delay`) are in flight.

use std::sync::Arc;
use std::time::{Duration, Instant};

use image::{Codec, PackOptions, PAGE};
use pager::{PageSource, SourceError, Waker};
use store::testing::{unique_bucket, MotoServer, Rng};
use store::{Client, S3Url, StoreConfig};

fn main() {
    let mib: usize = std::env::args()
        .nth(1)
        .and_then(|a| a.parse().ok())
        .unwrap_or(64);
    let Some(server) = MotoServer::start() else {
        return;
    };
    let bucket = unique_bucket("bench");
    server.create_bucket(&bucket);
    let tmp = tempfile::tempdir().unwrap();
    let mut rng = Rng::new("s3_bench");
    // Half random pages, a quarter compressible, a quarter zero.
    let pages = mib * 256;
    let mut mem = vec![0u8; pages * PAGE];
    for p in 0..pages {
        let page = &mut mem[p * PAGE..(p + 1) * PAGE];
        match rng.below(4) {
            0 | 1 => rng.fill(page),
            2 => page.fill((p % 251) as u8),
            _ => {}
        }
    }
    let mem_path = tmp.path().join("vm.mem");
    std::fs::write(&mem_path, &mem).unwrap();
    let img = tmp.path().join("vm.pwi");
    let chunk = 256 << 10;
    image::pack(
        &mem_path,
        &img,
        &PackOptions {
            codec: Codec::Zstd,
            level: 1,
            chunk_size: chunk,
            base: None,
            diff: false,
        },
        &mut |_| {},
    )
    .unwrap();
    let img_len = std::fs::metadata(&img).unwrap().len();
    println!(
        "memory {mib} MiB, image {:.1} MiB, chunks {} KiB",
        img_len as f64 / (1 << 20) as f64,
        chunk >> 10
    );
    let config = StoreConfig {
        cache_dir: Some(tmp.path().join("cache")),
        ..StoreConfig::default()
    };
    let client = Client::new(&server.options(), config.clone()).unwrap();
    let t = Instant::now();
    client
        .push(
            &img,
            &S3Url::parse(&format!("s3://{bucket}/b")).unwrap(),
            &mut |_| {},
        )
        .unwrap();
    let secs = t.elapsed().as_secs_f64();
    println!(
        "push: {secs:.2} s ({:.0} MB/s)",
        img_len as f64 / secs / 1e6
    );
    let url = S3Url::parse(&format!("s3://{bucket}/b/vm.pwi")).unwrap();
    let mb = mem.len() as f64 / 1e6;
    let read_all = |src: &dyn PageSource| {
        let mut buf = vec![0u8; mem.len()];
        let t = Instant::now();
        for (i, piece) in buf.chunks_mut(chunk as usize).enumerate() {
            src.read_at((i * chunk as usize) as u64, piece).unwrap();
        }
        let s = t.elapsed().as_secs_f64();
        assert!(buf == mem);
        s
    };

    // Cold, no disk cache: one blob at a time.
    let nodisk = Client::new(
        &server.options(),
        StoreConfig {
            cache_dir: None,
            ..config.clone()
        },
    )
    .unwrap();
    let src = nodisk.open(&url).unwrap();
    let s = read_all(&src);
    let st = src.stats();
    println!(
        "cold, serial: {s:.2} s, {:.0} MB/s of memory, {} fetches, {:.1} ms a fetch",
        mb / s,
        st.fetches,
        s * 1e3 / st.fetches as f64
    );
    let s = read_all(&src);
    println!("warm (memory): {:.1} ms, {:.0} MB/s", s * 1e3, mb / s);
    drop(src);

    // Cold with everything hinted (fetch_concurrency 16), through the disk
    // cache.
    let src = client.open(&url).unwrap();
    let t = Instant::now();
    src.hint(std::slice::from_ref(&(0..src.len())));
    read_all(&src);
    let s = t.elapsed().as_secs_f64();
    println!(
        "cold, hinted, 16 at once: {s:.2} s, {:.0} MB/s of memory ({} fetches)",
        mb / s,
        src.stats().fetches
    );
    drop(src);
    let src = client.open(&url).unwrap();
    let s = read_all(&src);
    println!(
        "a new source, from the disk cache: {:.1} ms, {:.0} MB/s ({} fetches, {} disk hits)",
        s * 1e3,
        mb / s,
        src.stats().fetches,
        src.stats().disk_hits
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
    .unwrap();
    let src = slow.open(&url).unwrap();
    let mut page = vec![0u8; PAGE];
    src.read_at(0, &mut page).unwrap(); // chunk 0 cached
    let noop: Waker = Arc::new(|| {});
    let t = Instant::now();
    let mut pending = 0;
    for i in 1..(src.len() / u64::from(chunk)).min(64) {
        if let Err(SourceError::Pending) =
            src.read_at_or_wake(i * u64::from(chunk), &mut page, &noop)
        {
            pending += 1;
        }
    }
    let asked = t.elapsed();
    let mut lat = Vec::new();
    for i in 0..2000u64 {
        let t = Instant::now();
        src.read_at_or_wake((i % 64) * PAGE as u64, &mut page, &noop)
            .unwrap();
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
