//! `pagewire image` and `serve --source image://`: round trips, every byte
//! served from an image checked against the memory file, a flipped byte
//! that poisons exactly its chunk's pages, and open errors before any VM
//! waits. Needs userfaultfd (root here) for the serving tests: they skip
//! with a message otherwise, unless PAGEWIRE_REQUIRE_KVM=1 (CI), where a
//! skip fails.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

mod common;
use common::have_uffd;
use common::server::*;

fn pagewire(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PAGEWIRE_LOG", "info")
        .output()
        .expect("run pagewire")
}

fn ok(args: &[&str]) -> Output {
    let out = pagewire(args);
    assert!(
        out.status.success(),
        "pagewire {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn pack(mem: &Path, out: &Path, extra: &[&str]) {
    let mut args = vec!["image", "pack", s(mem), "-o", s(out)];
    args.extend_from_slice(extra);
    ok(&args);
}

/// The image's index, as the crate reads it.
fn index(img: &Path) -> image::Index {
    let bytes = std::fs::read(img).expect("read image");
    image::Index::parse(&bytes, "test").expect("parse")
}

#[test]
fn pack_unpack_round_trips_for_every_codec_and_chunk_size() {
    let dir = tempfile::tempdir().expect("tmp");
    // Not a multiple of the larger chunk sizes, with a hole.
    let mem = mem_file(dir.path(), 9 * MIB + 12 * 4096);
    let want = std::fs::read(&mem).expect("read mem");
    for codec in ["lz4", "zstd", "none"] {
        for chunk in ["64K", "256K", "1M"] {
            let img = dir.path().join(format!("m-{codec}-{chunk}.pwimg"));
            pack(&mem, &img, &["--codec", codec, "--chunk", chunk]);
            let back = dir.path().join("back");
            ok(&["image", "unpack", s(&img), "-o", s(&back)]);
            let got = std::fs::read(&back).expect("read back");
            assert!(got == want, "{codec} {chunk}: unpacked bytes differ");
            let out = ok(&["image", "verify", s(&img)]);
            assert!(String::from_utf8_lossy(&out.stdout).contains("all good"));
        }
    }
    let out = ok(&[
        "image",
        "inspect",
        "--json",
        s(&dir.path().join("m-lz4-64K.pwimg")),
    ]);
    let i: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(i["mem_len"].as_u64(), Some(want.len() as u64));
    assert!(i["zero_pages"].as_u64().unwrap_or(0) > 0, "{i}");
}

#[test]
fn serve_from_an_image_and_a_clone_verifies_every_byte() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 16 * MIB);
    for codec in ["lz4", "zstd"] {
        let img = dir.path().join(format!("m-{codec}.pwimg"));
        pack(&mem, &img, &["--codec", codec]);
        let sub = dir.path().join(codec);
        std::fs::create_dir_all(&sub).expect("mkdir");
        let server = Server::start_source(&sub, &format!("image://{}", s(&img)), &[]);
        let r = run_ok(&server, &mem, &["--threads", "2", "--order", "random"]);
        assert_eq!(r["pages_touched"], r["pages_total"], "{r}");
    }
    // A clone: 5% of its pages changed, packed against the base.
    let base = dir.path().join("m-lz4.pwimg");
    let mut bytes = std::fs::read(&mem).expect("read");
    let pages = bytes.len() / 4096;
    for p in (0..pages).step_by(20) {
        bytes[p * 4096..p * 4096 + 64].fill(p as u8 ^ 0x5a);
    }
    let clone_mem = dir.path().join("clone.mem");
    std::fs::write(&clone_mem, &bytes).expect("write clone");
    let clone = dir.path().join("clone.pwimg");
    pack(&clone_mem, &clone, &["--base", s(&base)]);
    let (b, c) = (
        std::fs::metadata(&base).expect("base").len(),
        std::fs::metadata(&clone).expect("clone").len(),
    );
    assert!(
        c * 5 < b,
        "a clone with 5% changed takes {c} bytes, its base {b}"
    );
    let sub = dir.path().join("clone");
    std::fs::create_dir_all(&sub).expect("mkdir");
    let server = Server::start_source(&sub, &format!("image://{}", s(&clone)), &[]);
    run_ok(
        &server,
        &clone_mem,
        &["--threads", "2", "--order", "random"],
    );
}

#[test]
fn a_flipped_byte_poisons_exactly_its_chunk_with_one_log_line() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let img = dir.path().join("m.pwimg");
    pack(&mem, &img, &["--codec", "lz4", "--chunk", "64K"]);
    let idx = index(&img);
    // A chunk of its own (no other slot shares its blob), in the middle.
    let users = |b: u32| idx.slots.iter().filter(|s| s.blob == Some(b)).count();
    let (slot, blob) = idx
        .slots
        .iter()
        .enumerate()
        .skip(idx.slots.len() / 3)
        .find_map(|(i, sl)| sl.blob.filter(|&b| users(b) == 1).map(|b| (i, b)))
        .expect("a chunk with data");
    let entry = &idx.blobs[blob as usize];
    let image::BlobLocation::Data { offset } = entry.location else {
        panic!("blob in the base")
    };
    let mut bytes = std::fs::read(&img).expect("read");
    let at = (idx.header.data_offset + offset + u64::from(entry.stored_len) / 2) as usize;
    bytes[at] ^= 0x40;
    std::fs::write(&img, &bytes).expect("write");
    // The pages that come from that chunk's blob.
    let chunk = u64::from(idx.header.chunk_size);
    let ppc = chunk / 4096;
    let own = &idx.slots[slot].own;
    let bad: Vec<u64> = (0..ppc)
        .filter(|p| own[(p / 64) as usize] >> (p % 64) & 1 == 1)
        .map(|p| slot as u64 * chunk + p * 4096)
        .collect();
    assert!(!bad.is_empty());
    // verify names it.
    let out = pagewire(&["image", "verify", s(&img)]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains(&format!("chunk {blob}")), "{err}");
    // serve poisons exactly those pages, and says so once.
    let server = Server::start_source(dir.path(), &format!("image://{}", s(&img)), &[]);
    let mut args: Vec<String> = vec!["--threads".into(), "2".into()];
    for off in &bad {
        args.push("--poisoned".into());
        args.push(format!("{off}:4096"));
    }
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let r = run_ok(&server, &mem, &args);
    assert_eq!(r["poisoned_pages"].as_u64(), Some(bad.len() as u64), "{r}");
    assert_eq!(r["poisoned_pages_readable"].as_u64(), Some(0), "{r}");
    assert_eq!(
        r["pages_touched"].as_u64(),
        r["pages_total"].as_u64().map(|t| t - bad.len() as u64),
        "{r}"
    );
    let log = server.log();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| l.contains(&format!("chunk {blob}")) || l.contains(&format!("blob {blob}")))
        .collect();
    assert_eq!(lines.len(), 1, "one line about the corrupt chunk:\n{log}");
}

#[test]
fn bad_images_are_refused_before_any_vm_waits() {
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 4 * MIB);
    let img = dir.path().join("m.pwimg");
    pack(&mem, &img, &[]);
    let serve_fails = |url: &str, want: &str| {
        let sock = dir.path().join("never.sock");
        let out = Command::new(BIN)
            .args(["serve", "--socket", s(&sock), "--source", url])
            .output()
            .expect("serve");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "serve {url} started");
        assert!(err.contains(want), "serve {url}: {err}");
        assert!(!sock.exists(), "serve {url} listened");
    };
    // Truncated.
    let bytes = std::fs::read(&img).expect("read");
    let cut = dir.path().join("cut.pwimg");
    std::fs::write(&cut, &bytes[..bytes.len() - 100]).expect("write");
    serve_fails(&format!("image://{}", s(&cut)), "truncated");
    // A flipped byte in the header.
    let mut hdr = bytes.clone();
    hdr[20] ^= 1;
    let bad = dir.path().join("hdr.pwimg");
    std::fs::write(&bad, &hdr).expect("write");
    serve_fails(
        &format!("image://{}", s(&bad)),
        "not a valid pagewire image",
    );
    // Missing file.
    serve_fails("image:///nonexistent/x.pwimg", "/nonexistent/x.pwimg");
    // A clone whose base is gone, or another image.
    let mut other = std::fs::read(&mem).expect("read");
    other[4096] ^= 1;
    let other_mem = dir.path().join("other.mem");
    std::fs::write(&other_mem, &other).expect("write");
    let base_dir = dir.path().join("b");
    std::fs::create_dir_all(&base_dir).expect("mkdir");
    let base = base_dir.join("base.pwimg");
    pack(&mem, &base, &[]);
    let clone = base_dir.join("clone.pwimg");
    pack(&other_mem, &clone, &["--base", s(&base)]);
    let moved: PathBuf = base_dir.join("base.moved");
    std::fs::rename(&base, &moved).expect("rename");
    serve_fails(&format!("image://{}", s(&clone)), "base");
    pack(&other_mem, &base, &[]); // another image under the base's name
    serve_fails(&format!("image://{}", s(&clone)), "another base");
}

/// A VM served from an image under `--supervise` is served on through a
/// SIGKILL of its server: the new server opens the same image and knows it
/// by its id. Every byte is checked.
#[test]
fn a_vm_served_from_an_image_survives_a_sigkill_of_its_server() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 64 * MIB);
    let img = dir.path().join("m.pwimg");
    pack(&mem, &img, &["--codec", "lz4"]);
    let mut sup = Server::start_source(
        dir.path(),
        &format!("image://{}", s(&img)),
        &[
            "--supervise",
            "--orphan-timeout-s",
            "20",
            "--fixed-cluster",
            "--cluster-pages",
            "1",
        ],
    );
    let c = client(&sup, &mem, &["--threads", "2", "--timeout-s", "60"])
        .spawn()
        .expect("client");
    sup.wait_log("session started");
    std::thread::sleep(std::time::Duration::from_millis(200));
    // The supervised server: the supervisor's child.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let pid = loop {
        let out = Command::new("pgrep")
            .arg("-P")
            .arg(sup.child.id().to_string())
            .output()
            .expect("pgrep");
        let kids: Vec<u32> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect();
        if let Some(p) = kids.first() {
            break *p;
        }
        assert!(std::time::Instant::now() < deadline, "no supervised server");
        std::thread::sleep(std::time::Duration::from_millis(10));
    };
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
    let out = c.wait_with_output().expect("client");
    let r = verified(&out, &sup.log());
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    let log = sup.log();
    assert!(log.contains("VM served on"), "{log}");
    let _ = Command::new("kill")
        .args(["-TERM", &sup.child.id().to_string()])
        .status();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while sup.child.try_wait().ok().flatten().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = sup.child.kill();
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}
