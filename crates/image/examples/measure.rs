//! The measurements behind `DEFAULT_CHUNK_SIZE` (docs/image-format.md):
//! pack speed, size, cold random page reads and sequential reads per chunk
//! size and codec, on the bench content and on a compressible "mixed"
//! content; and the bytes of a base plus 10 clones (5% of pages changed).
//!
//! `cargo run --release -p pagewire-image --example measure -- [DIR] [MIB]`
//! (DIR: scratch space, default a temporary directory; MIB: memory size,
//! default 256). Prints a markdown table.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{Duration, Instant};

use image::{pack, Codec, ImageSource, PackOptions, DEFAULT_CACHE_BYTES, PAGE};
use pager::PageSource;

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

const WORDS: &[&str] = &[
    "the",
    "kernel",
    "page",
    "fault",
    "memory",
    "guest",
    "virtio",
    "block",
    "net",
    "task",
    "struct",
    "inode",
    "dentry",
    "cache",
    "slab",
    "0x7f3a",
    "error",
    "info",
    "user",
    "root",
    "GET",
    "/api/v1/items",
    "200",
    "OK",
    "json",
    "{\"id\":",
    "\"name\":",
    "null",
    "true",
    "\n",
];

/// "Mixed" memory, page by page: 35% text-like (words of a small vocabulary
/// with numbers: logs, heaps of strings), 30% arrays of 64-byte records
/// (an id counting up, pointers into one region, flags, padding), 15%
/// random (already compressed data, keys), 20% zero.
fn generate_mixed(path: &Path, size: u64) -> std::io::Result<()> {
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut rng = Rng(0x1234_5678_9ABC_DEF1);
    let mut page = vec![0u8; PAGE];
    let mut id = 0u64;
    for _ in 0..size / PAGE as u64 {
        let kind = rng.next() % 100;
        if kind < 35 {
            let mut at = 0;
            while at < PAGE {
                let r = rng.next();
                let w = if r.is_multiple_of(5) {
                    format!("{} ", r % 100_000)
                } else {
                    format!("{} ", WORDS[(r >> 8) as usize % WORDS.len()])
                };
                let n = w.len().min(PAGE - at);
                page[at..at + n].copy_from_slice(&w.as_bytes()[..n]);
                at += n;
            }
        } else if kind < 65 {
            for rec in page.chunks_exact_mut(64) {
                id += 1;
                let r = rng.next();
                rec.fill(0);
                rec[0..8].copy_from_slice(&id.to_le_bytes());
                rec[8..16]
                    .copy_from_slice(&(0xffff_8880_0000_0000u64 + (r % 4096) * 64).to_le_bytes());
                rec[16..24].copy_from_slice(
                    &(0xffff_8880_0000_0000u64 + (r >> 20) % 4096 * 64).to_le_bytes(),
                );
                rec[24] = (r >> 40) as u8 & 7;
            }
        } else if kind < 80 {
            for w in page.chunks_exact_mut(8) {
                w.copy_from_slice(&rng.next().to_le_bytes());
            }
        } else {
            page.fill(0);
        }
        f.write_all(&page)?;
    }
    f.flush()
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

/// Random cold page reads: a fresh source, every read a new page, pages of
/// the whole memory in random order, for at most `budget`.
fn random_reads(img: &Path, budget: Duration) -> f64 {
    let src = ImageSource::open(img, None, DEFAULT_CACHE_BYTES).expect("open");
    let pages = src.len() / PAGE as u64;
    let mut order: Vec<u64> = (0..pages).collect();
    let mut rng = Rng(0xfeed_beef_1234_5679);
    for i in (1..order.len()).rev() {
        order.swap(i, (rng.next() % (i as u64 + 1)) as usize);
    }
    let mut buf = vec![0u8; PAGE];
    let t = Instant::now();
    let mut n = 0u64;
    for p in order {
        src.read_at(p * PAGE as u64, &mut buf).expect("read");
        n += 1;
        if n.is_multiple_of(256) && t.elapsed() > budget {
            break;
        }
    }
    n as f64 / t.elapsed().as_secs_f64()
}

/// Sequential 128 KiB reads over the whole memory, fresh source.
fn sequential(img: &Path) -> f64 {
    let src = ImageSource::open(img, None, DEFAULT_CACHE_BYTES).expect("open");
    let mut buf = vec![0u8; 128 << 10];
    let t = Instant::now();
    let mut at = 0;
    while at < src.len() {
        let n = (buf.len() as u64).min(src.len() - at) as usize;
        src.read_at(at, &mut buf[..n]).expect("read");
        at += n as u64;
    }
    src.len() as f64 / t.elapsed().as_secs_f64() / (1u64 << 30) as f64
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = args
        .get(1)
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| tmp.path().to_path_buf());
    let size: u64 = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(256) << 20;
    let only_clones = std::env::var("ONLY_CLONES").is_ok();
    let chunks = [64u32 << 10, 128 << 10, 256 << 10, 512 << 10, 1 << 20];
    let bench = dir.join("bench.mem");
    let mixed = dir.join("mixed.mem");
    testbed::generate(&bench, size, 4).expect("bench");
    generate_mixed(&mixed, size).expect("mixed");
    let img = dir.join("m.img");
    if !only_clones {
        println!("| content | chunk | codec | pack MB/s | image MiB | ratio | random 4K reads/s (cold) | seq 128K GiB/s |");
        println!("|---|---|---|---|---|---|---|---|");
        for (name, mem) in [("bench", &bench), ("mixed", &mixed)] {
            for &chunk in &chunks {
                for codec in [Codec::Lz4, Codec::Zstd, Codec::None] {
                    let o = PackOptions {
                        codec,
                        level: 3,
                        chunk_size: chunk,
                        base: None,
                        diff: false,
                    };
                    let t = Instant::now();
                    let r = pack(mem, &img, &o, &mut |_| {}).expect("pack");
                    let secs = t.elapsed().as_secs_f64();
                    let rr = random_reads(&img, Duration::from_secs(2));
                    let seq = sequential(&img);
                    println!(
                        "| {name} | {}K | {} | {:.0} | {:.1} | {:.2} | {:.0} | {:.2} |",
                        chunk >> 10,
                        codec.name(),
                        size as f64 / 1e6 / secs,
                        mib(r.image_len),
                        size as f64 / r.image_len as f64,
                        rr,
                        seq
                    );
                }
            }
        }
    }
    // 10 clones of the bench memory, 5% of pages (random ones) given new
    // random content each, packed against the base (lz4).
    println!();
    println!("| chunk | base MiB | 10 clones MiB | (base + 10 clones) / base | clone pack s |");
    println!("|---|---|---|---|---|");
    let clone = dir.join("clone.mem");
    let pages = size / PAGE as u64;
    for &chunk in &chunks {
        let base_img = dir.join("base.img");
        let o = PackOptions {
            codec: Codec::Lz4,
            level: 3,
            chunk_size: chunk,
            base: None,
            diff: false,
        };
        let base_len = pack(&bench, &base_img, &o, &mut |_| {})
            .expect("pack")
            .image_len;
        let mut clones = 0u64;
        let mut secs = 0.0;
        let mut rng = Rng(0xC10E_0000_0000_0001 ^ chunk as u64);
        for c in 0..10 {
            std::fs::copy(&bench, &clone).expect("copy");
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open(&clone)
                .expect("open");
            let mut page = vec![0u8; PAGE];
            // 5% of the pages, distinct.
            let mut chosen = std::collections::HashSet::new();
            while (chosen.len() as u64) < pages / 20 {
                chosen.insert(rng.next() % pages);
            }
            for p in chosen {
                for w in page.chunks_exact_mut(8) {
                    w.copy_from_slice(&rng.next().to_le_bytes());
                }
                f.write_all_at(&page, p * PAGE as u64).expect("write");
            }
            drop(f);
            let out = dir.join(format!("clone{c}.img"));
            let oc = PackOptions {
                base: Some(base_img.clone()),
                ..o.clone()
            };
            let r = pack(&clone, &out, &oc, &mut |_| {}).expect("pack clone");
            clones += r.image_len;
            secs += r.seconds;
            std::fs::remove_file(&out).expect("rm");
        }
        println!(
            "| {}K | {:.1} | {:.1} | {:.3} | {:.2} |",
            chunk >> 10,
            mib(base_len),
            mib(clones),
            (base_len + clones) as f64 / base_len as f64,
            secs / 10.0
        );
    }
}
