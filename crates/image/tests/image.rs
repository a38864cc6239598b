//! Round trips, clones, corruption and open errors of the image format.

use std::io::Write;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use image::{
    pack, unpack, verify, BlobLocation, Codec, ImageError, ImageSource, Index, PackOptions, PAGE,
};
use pager::{PageSource, SourceError};

/// xorshift64: tests are seeded and print their seed.
struct Rng(u64);
impl Rng {
    fn seeded(name: &str) -> Rng {
        let seed = std::env::var("IMAGE_TEST_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map(|d| d.as_nanos() as u64)
                    .unwrap_or(1)
                    | 1
            });
        eprintln!("{name}: seed {seed} (IMAGE_TEST_SEED={seed} to replay)");
        Rng(seed)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
    fn fill(&mut self, buf: &mut [u8]) {
        for w in buf.chunks_mut(8) {
            let x = self.next().to_le_bytes();
            w.copy_from_slice(&x[..w.len()]);
        }
    }
}

/// Memory of `pages` pages: random, zero, compressible and repeated pages.
fn mixed(rng: &mut Rng, pages: usize) -> Vec<u8> {
    let mut mem = vec![0u8; pages * PAGE];
    let mut repeated = vec![0u8; PAGE];
    rng.fill(&mut repeated);
    for p in 0..pages {
        let page = &mut mem[p * PAGE..(p + 1) * PAGE];
        match rng.below(5) {
            0 => {}
            1 => rng.fill(page),
            2 => {
                let v = rng.next();
                for (i, w) in page.chunks_mut(8).enumerate() {
                    w.copy_from_slice(&(v.wrapping_add(i as u64 % 7)).to_le_bytes());
                }
            }
            3 => page.copy_from_slice(&repeated),
            _ => {
                rng.fill(&mut page[..64]);
            }
        }
    }
    mem
}

fn write(path: &Path, bytes: &[u8]) {
    std::fs::write(path, bytes).expect("write");
}

fn opts(codec: Codec, chunk: u32) -> PackOptions {
    PackOptions {
        codec,
        level: 3,
        chunk_size: chunk,
        base: None,
        diff: false,
    }
}

fn read_all(src: &ImageSource, piece: usize) -> Vec<u8> {
    let len = src.len() as usize;
    let mut out = vec![0u8; len];
    let mut at = 0;
    while at < len {
        let n = piece.min(len - at);
        src.read_at(at as u64, &mut out[at..at + n]).expect("read");
        at += n;
    }
    out
}

fn check_roundtrip(dir: &Path, name: &str, mem: &[u8], options: &PackOptions) -> PathBuf {
    let mem_path = dir.join(format!("{name}.mem"));
    let img = dir.join(format!("{name}.img"));
    write(&mem_path, mem);
    let mut last = 0;
    let report = pack(&mem_path, &img, options, &mut |d| last = d).expect("pack");
    assert_eq!(last, mem.len() as u64, "progress reached the end");
    assert_eq!(
        report.image_len,
        std::fs::metadata(&img).expect("meta").len()
    );
    let src = ImageSource::open(&img, None, 1 << 20).expect("open");
    assert_eq!(src.len(), mem.len() as u64);
    assert!(
        read_all(&src, 128 << 10) == mem,
        "{name}: 128 KiB reads differ"
    );
    assert!(read_all(&src, PAGE) == mem, "{name}: page reads differ");
    // Reads that are not page-aligned.
    let mut rng = Rng(0x5eed ^ mem.len() as u64);
    for _ in 0..if mem.is_empty() { 0 } else { 50 } {
        let a = rng.below(mem.len() as u64) as usize;
        let n = (rng.below(3 * PAGE as u64) as usize).min(mem.len() - a);
        let mut buf = vec![0xAAu8; n];
        src.read_at(a as u64, &mut buf).expect("read");
        assert!(buf == mem[a..a + n], "{name}: read [{a}, +{n}) differs");
    }
    for z in src.zero_ranges() {
        assert!(mem[z.start as usize..z.end as usize]
            .iter()
            .all(|&b| b == 0));
    }
    let back = dir.join(format!("{name}.back"));
    assert_eq!(
        unpack(&img, None, &back, &mut |_| {}).expect("unpack"),
        mem.len() as u64
    );
    assert!(
        std::fs::read(&back).expect("read back") == mem,
        "{name}: unpack differs"
    );
    img
}

#[test]
fn round_trips_every_codec_and_chunk_size() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("round_trips");
    // 97 pages: not a multiple of any chunk size above one page.
    let mem = mixed(&mut rng, 97);
    for codec in [Codec::None, Codec::Lz4, Codec::Zstd] {
        for chunk in [4096u32, 64 << 10, 256 << 10, 1 << 20] {
            let name = format!("{}-{chunk}", codec.name());
            check_roundtrip(dir.path(), &name, &mem, &opts(codec, chunk));
        }
    }
    // Empty and all-zero memory.
    check_roundtrip(dir.path(), "empty", &[], &opts(Codec::Lz4, 64 << 10));
    let img = check_roundtrip(
        dir.path(),
        "zeros",
        &vec![0u8; 40 * PAGE],
        &opts(Codec::Lz4, 64 << 10),
    );
    let src = ImageSource::open(&img, None, 1 << 20).expect("open");
    assert_eq!(src.zero_ranges().len(), 1);
    assert_eq!(src.zero_ranges()[0], 0..40 * PAGE as u64);
}

#[test]
fn incompressible_blobs_are_stored_plainly() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("incompressible");
    let mut mem = vec![0u8; 64 * PAGE];
    rng.fill(&mut mem);
    let img = check_roundtrip(dir.path(), "random", &mem, &opts(Codec::Zstd, 64 << 10));
    let index = Index::parse(&std::fs::read(&img).expect("read"), "t").expect("parse");
    assert!(index.blobs.iter().all(|b| b.codec == Codec::None));
}

#[test]
fn identical_slots_are_stored_once() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("dedup");
    let mut slot = vec![0u8; 16 * PAGE];
    rng.fill(&mut slot);
    let mut mem = Vec::new();
    for _ in 0..8 {
        mem.extend_from_slice(&slot);
    }
    let img = check_roundtrip(dir.path(), "dedup", &mem, &opts(Codec::Lz4, 64 << 10));
    let index = Index::parse(&std::fs::read(&img).expect("read"), "t").expect("parse");
    assert_eq!(index.slots.len(), 8);
    assert_eq!(index.blobs.len(), 1);
    let ins = image::inspect(&img).expect("inspect");
    assert_eq!(ins.duplicate_slots, 7);
    assert!(ins.image_len < 20 * PAGE as u64);
}

/// A base of `pages` mixed pages and a clone with 5% of them changed.
fn base_and_clone(rng: &mut Rng, pages: usize) -> (Vec<u8>, Vec<u8>, Vec<usize>) {
    let base = mixed(rng, pages);
    let mut clone = base.clone();
    let mut changed = Vec::new();
    for _ in 0..pages / 20 {
        let p = rng.below(pages as u64) as usize;
        rng.fill(&mut clone[p * PAGE..(p + 1) * PAGE]);
        changed.push(p);
    }
    (base, clone, changed)
}

#[test]
fn a_clone_against_its_base_round_trips_and_is_small() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("clone");
    let (base, clone, _) = base_and_clone(&mut rng, 2048);
    let base_img = check_roundtrip(dir.path(), "base", &base, &opts(Codec::Lz4, 64 << 10));
    let clone_mem = dir.path().join("clone.mem");
    write(&clone_mem, &clone);
    let clone_img = dir.path().join("clone.img");
    let o = PackOptions {
        base: Some(base_img.clone()),
        ..opts(Codec::Lz4, 64 << 10)
    };
    let report = pack(&clone_mem, &clone_img, &o, &mut |_| {}).expect("pack");
    let base_len = std::fs::metadata(&base_img).expect("meta").len();
    eprintln!(
        "base {base_len} bytes, clone {} bytes: {report:?}",
        report.image_len
    );
    assert!(report.image_len * 5 < base_len, "the clone is small");
    assert!(report.base_pages > 0);
    // Its base is found by the name its index records.
    let src = ImageSource::open(&clone_img, None, 1 << 20).expect("open");
    assert!(read_all(&src, 128 << 10) == clone);
    assert!(read_all(&src, PAGE) == clone);
    let back = dir.path().join("clone.back");
    unpack(&clone_img, None, &back, &mut |_| {}).expect("unpack");
    assert!(std::fs::read(&back).expect("read") == clone);
    let v = verify(&clone_img, None, &mut |_| {}).expect("verify");
    assert!(v.corrupt.is_empty(), "{v:?}");

    // The same memory as the base: every page from the base, no blob stored.
    let same = dir.path().join("same.img");
    let r = pack(&dir.path().join("base.mem"), &same, &o, &mut |_| {}).expect("pack");
    assert_eq!(r.blobs, 0, "{r:?}");
    let src = ImageSource::open(&same, None, 1 << 20).expect("open");
    assert!(read_all(&src, 128 << 10) == base);

    // A clone's slot equal to a base slot elsewhere refers to its blob.
    let mut moved = base.clone();
    moved.copy_within(0..16 * PAGE, 32 * PAGE);
    let moved_mem = dir.path().join("moved.mem");
    write(&moved_mem, &moved);
    let moved_img = dir.path().join("moved.img");
    pack(&moved_mem, &moved_img, &o, &mut |_| {}).expect("pack");
    let src = ImageSource::open(&moved_img, None, 1 << 20).expect("open");
    assert!(read_all(&src, 128 << 10) == moved);
}

#[test]
fn a_diff_snapshot_packs_against_its_base() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("diff");
    let (base, clone, changed) = base_and_clone(&mut rng, 1024);
    let base_img = check_roundtrip(dir.path(), "base", &base, &opts(Codec::Zstd, 64 << 10));
    // A Firecracker Diff snapshot: only the changed pages are written.
    let diff_mem = dir.path().join("diff.mem");
    let f = std::fs::File::create(&diff_mem).expect("create");
    f.set_len(clone.len() as u64).expect("len");
    for &p in &changed {
        f.write_all_at(&clone[p * PAGE..(p + 1) * PAGE], (p * PAGE) as u64)
            .expect("write");
    }
    drop(f);
    let img = dir.path().join("diff.img");
    let o = PackOptions {
        base: Some(base_img.clone()),
        diff: true,
        ..opts(Codec::Zstd, 64 << 10)
    };
    pack(&diff_mem, &img, &o, &mut |_| {}).expect("pack");
    let src = ImageSource::open(&img, Some(&base_img), 1 << 20).expect("open");
    assert!(
        read_all(&src, 128 << 10) == clone,
        "the diff reads as the clone"
    );
    // Without a base, --diff is refused.
    let e = pack(
        &diff_mem,
        &img,
        &opts(Codec::Zstd, 64 << 10).with_diff(),
        &mut |_| {},
    );
    assert!(matches!(e, Err(ImageError::Invalid(_))), "{e:?}");
}

trait WithDiff {
    fn with_diff(self) -> Self;
}
impl WithDiff for PackOptions {
    fn with_diff(mut self) -> Self {
        self.diff = true;
        self
    }
}

/// Flips one byte of the stored bytes of blob `blob`.
fn corrupt_blob(img: &Path, blob: usize) {
    let bytes = std::fs::read(img).expect("read");
    let index = Index::parse(&bytes, "t").expect("parse");
    let e = &index.blobs[blob];
    let BlobLocation::Data { offset } = e.location else {
        panic!("not stored here")
    };
    let at = index.header.data_offset + offset + e.stored_len as u64 / 2;
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(img)
        .expect("open");
    f.write_all_at(&[bytes[at as usize] ^ 0x40], at)
        .expect("write");
}

/// Captures log lines.
#[derive(Clone, Default)]
struct Logs(Arc<Mutex<Vec<u8>>>);
impl Write for Logs {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("logs").extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_corrupt_blob_poisons_exactly_its_pages() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("corrupt");
    let mem = mixed(&mut rng, 256);
    let img = check_roundtrip(dir.path(), "c", &mem, &opts(Codec::Lz4, 64 << 10));
    let bytes = std::fs::read(&img).expect("read");
    let index = Index::parse(&bytes, "t").expect("parse");
    let victim = index.blobs.len() / 2;
    corrupt_blob(&img, victim);
    // The memory the victim holds.
    let cs = index.header.chunk_size as u64;
    let mut expect_bad = Vec::new();
    for (s, slot) in index.slots.iter().enumerate() {
        if slot.blob == Some(victim as u32) {
            for p in 0..(cs as usize / PAGE) {
                if slot.own[p / 64] >> (p % 64) & 1 == 1 {
                    expect_bad.push(s as u64 * cs + (p * PAGE) as u64);
                }
            }
        }
    }
    assert!(!expect_bad.is_empty());

    let logs = Logs::default();
    let writer = logs.clone();
    let subscriber = tracing_subscriber::fmt()
        .with_writer(move || writer.clone())
        .with_ansi(false)
        .finish();
    tracing::subscriber::with_default(subscriber, || {
        let src = ImageSource::open(&img, None, 1 << 20).expect("open");
        for piece in [128 << 10, PAGE, 3 * PAGE] {
            let mut bad_pages = Vec::new();
            let mut at = 0usize;
            while at < mem.len() {
                let n = piece.min(mem.len() - at);
                let mut buf = vec![0xAAu8; n];
                match src.read_at(at as u64, &mut buf) {
                    Ok(()) => assert!(buf == mem[at..at + n]),
                    Err(SourceError::Untrusted { bad, why }) => {
                        assert!(why.contains("corrupt"), "{why}");
                        for r in &bad {
                            assert!(r.start >= at as u64 && r.end <= (at + n) as u64);
                            let mut p = r.start;
                            while p < r.end {
                                bad_pages.push(p);
                                p += PAGE as u64;
                            }
                        }
                        // Everything else is right.
                        for p in (0..n).step_by(PAGE) {
                            let off = (at + p) as u64;
                            if !bad.iter().any(|r| r.contains(&off)) {
                                assert!(buf[p..p + PAGE] == mem[at + p..at + p + PAGE]);
                            }
                        }
                    }
                    Err(e) => panic!("read at {at}: {e}"),
                }
                at += n;
            }
            assert_eq!(bad_pages, expect_bad, "piece {piece}");
        }
        assert_eq!(src.corrupt_blobs(), 1);
    });
    let text = String::from_utf8(logs.0.lock().expect("logs").clone()).expect("utf8");
    let lines: Vec<&str> = text.lines().filter(|l| l.contains("ERROR")).collect();
    assert_eq!(lines.len(), 1, "one line per corrupt blob: {text}");
    assert!(lines[0].contains("poisoned") && lines[0].contains(&img.display().to_string()));

    // verify reports every corrupt blob.
    corrupt_blob(&img, 0);
    let v = verify(&img, None, &mut |_| {}).expect("verify");
    let bad: Vec<u32> = v.corrupt.iter().map(|c| c.0).collect();
    assert_eq!(bad, vec![0, victim as u32], "{v:?}");
    // unpack refuses.
    assert!(unpack(&img, None, &dir.path().join("x"), &mut |_| {}).is_err());
}

#[test]
fn a_bad_file_is_an_error_at_open() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("open_errors");
    let (base, clone, _) = base_and_clone(&mut rng, 128);
    let base_img = check_roundtrip(dir.path(), "base", &base, &opts(Codec::Lz4, 64 << 10));
    let good = std::fs::read(&base_img).expect("read");
    let index = Index::parse(&good, "t").expect("parse");
    let open = |bytes: &[u8]| {
        let p = dir.path().join("bad.img");
        write(&p, bytes);
        ImageSource::open(&p, None, 1 << 20).map(|_| ())
    };
    // A flipped byte anywhere in the header or the index.
    for at in [
        0usize,
        9,
        13,
        20,
        100,
        200,
        255,
        256,
        300,
        index.header.data_offset as usize - 1,
    ] {
        let mut b = good.clone();
        b[at] ^= 1;
        let e = open(&b);
        assert!(
            matches!(e, Err(ImageError::BadHeader { .. })),
            "byte {at}: {e:?}"
        );
    }
    // Truncated, in the index and in the data; a byte too many.
    for len in [100, 300, good.len() - 1] {
        let e = open(&good[..len]);
        assert!(
            matches!(e, Err(ImageError::Truncated { .. })),
            "len {len}: {e:?}"
        );
    }
    let mut longer = good.clone();
    longer.push(0);
    assert!(matches!(open(&longer), Err(ImageError::BadHeader { .. })));
    assert!(matches!(open(b"hello"), Err(ImageError::Truncated { .. })));
    assert!(matches!(
        open(&[7u8; 512]),
        Err(ImageError::BadHeader { .. })
    ));

    // A clone whose base is missing, or another image.
    let clone_mem = dir.path().join("clone.mem");
    write(&clone_mem, &clone);
    let clone_img = dir.path().join("clone.img");
    let o = PackOptions {
        base: Some(base_img.clone()),
        ..opts(Codec::Lz4, 64 << 10)
    };
    pack(&clone_mem, &clone_img, &o, &mut |_| {}).expect("pack");
    let e = ImageSource::open(&clone_img, Some(&dir.path().join("nope.img")), 1 << 20);
    assert!(
        matches!(e, Err(ImageError::MissingBase { .. })),
        "{:?}",
        e.err()
    );
    let other = check_roundtrip(dir.path(), "other", &clone, &opts(Codec::Lz4, 64 << 10));
    let e = ImageSource::open(&clone_img, Some(&other), 1 << 20);
    assert!(
        matches!(e, Err(ImageError::BaseMismatch { .. })),
        "{:?}",
        e.err()
    );
    // A clone as a base (v1: one level).
    let e = pack(
        &clone_mem,
        &dir.path().join("x.img"),
        &PackOptions {
            base: Some(clone_img.clone()),
            ..opts(Codec::Lz4, 64 << 10)
        },
        &mut |_| {},
    );
    assert!(
        matches!(e, Err(ImageError::Invalid(ref m)) if m.contains("base")),
        "{e:?}"
    );
    std::fs::remove_file(&base_img).expect("rm");
    let e = ImageSource::open(&clone_img, None, 1 << 20);
    assert!(
        matches!(e, Err(ImageError::MissingBase { .. })),
        "{:?}",
        e.err()
    );
    eprintln!("{}", e.err().map(|e| e.to_string()).unwrap_or_default());
}

#[test]
fn parse_never_panics_on_damaged_indexes() {
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng::seeded("parse_fuzz");
    let mem = mixed(&mut rng, 64);
    let img = check_roundtrip(dir.path(), "p", &mem, &opts(Codec::Lz4, 16 << 10));
    let good = std::fs::read(&img).expect("read");
    for _ in 0..5000 {
        let mut b = good.clone();
        let n = 1 + rng.below(4);
        for _ in 0..n {
            let at = rng.below(b.len() as u64) as usize;
            b[at] = rng.next() as u8;
        }
        let cut = rng.below(b.len() as u64 + 1) as usize;
        let _ = Index::needed(&b[..cut], "t");
        let _ = Index::parse(&b[..cut], "t");
    }
}

/// Small valid images (header and index), the seeds of the `image_index`
/// fuzz target, parse; so do the seeds committed in its corpus (the corpus
/// follows the format). `IMAGE_SEEDS=fuzz/corpus/image_index cargo test -p
/// pagewire-image fuzz_seeds` writes them there.
#[test]
fn fuzz_seeds_are_valid_images() {
    let dir = tempfile::tempdir().expect("dir");
    let out = std::env::var_os("IMAGE_SEEDS")
        .map(PathBuf::from)
        .unwrap_or_else(|| dir.path().join("seeds"));
    std::fs::create_dir_all(&out).expect("dir");
    let mut rng = Rng(0x5EED_0000_0000_0001);
    let (base, clone, _) = base_and_clone(&mut rng, 40);
    let mut seeds = Vec::new();
    for (name, codec, chunk) in [
        ("a", Codec::Lz4, 16u32 << 10),
        ("b", Codec::Zstd, 4096),
        ("c", Codec::None, 64 << 10),
    ] {
        let img = check_roundtrip(dir.path(), name, &base, &opts(codec, chunk));
        seeds.push((name.to_string(), img));
    }
    let clone_mem = dir.path().join("clone.mem");
    write(&clone_mem, &clone);
    let clone_img = dir.path().join("clone.img");
    let o = PackOptions {
        base: Some(seeds[0].1.clone()),
        ..opts(Codec::Lz4, 16 << 10)
    };
    pack(&clone_mem, &clone_img, &o, &mut |_| {}).expect("pack");
    seeds.push(("clone".into(), clone_img));
    for (name, img) in seeds {
        let bytes = std::fs::read(&img).expect("read");
        let n = Index::needed(&bytes, "seed").expect("needed") as usize;
        Index::parse(&bytes[..n], "seed").expect("a seed parses");
        write(&out.join(format!("seed-{name}")), &bytes[..n]);
    }
    let corpus = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus/image_index");
    for name in ["seed-a", "seed-b", "seed-c", "seed-clone"] {
        let bytes = std::fs::read(corpus.join(name)).expect("a committed seed");
        Index::parse(&bytes, name).unwrap_or_else(|e| panic!("{name} no longer parses: {e}"));
    }
}
