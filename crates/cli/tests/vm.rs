//! `pagewire vm` and `pagewire demo` end to end: real KVM guests restored
//! eagerly, embedded and through a real `pagewire serve` process. They need
//! /dev/kvm and userfaultfd; without them they skip with a message, unless
//! PAGEWIRE_REQUIRE_KVM=1 makes a skip a failure.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

fn pagewire(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("PAGEWIRE_LOG", "warn")
        .output()
        .expect("run pagewire")
}

fn json_ok(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "pagewire failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn snapshot(dir: &Path, args: &[&str]) -> serde_json::Value {
    let d = dir.to_string_lossy().to_string();
    let mut a = vec!["vm", "snapshot", "--dir", &d, "--json"];
    a.extend_from_slice(args);
    let r = json_ok(&pagewire(&a));
    assert_eq!(r["verified"], true, "{r}");
    r
}

struct Server {
    child: Child,
    socket: PathBuf,
    stats: PathBuf,
}

impl Server {
    /// `serve` of the snapshot's memory file in `dir`.
    fn start(dir: &Path, extra: &[&str]) -> Server {
        let mem = dir.join("memory.bin").to_string_lossy().to_string();
        Self::start_from(dir, &["--mem-file", &mem], extra)
    }

    /// `serve` with its bytes from `source` (`--mem-file F`, `--source U`).
    fn start_from(dir: &Path, source: &[&str], extra: &[&str]) -> Server {
        let socket = dir.join("serve.sock");
        let stats = dir.join("serve.jsonl");
        let child = Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(source)
            .arg("--stats-json")
            .arg(&stats)
            .args(extra)
            .env("PAGEWIRE_LOG", "warn")
            .stdin(Stdio::null())
            .spawn()
            .expect("start serve");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !socket.exists() {
            assert!(Instant::now() < deadline, "serve did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
        Server {
            child,
            socket,
            stats,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn restore(dir: &Path, mode: &str, extra: &[&str]) -> serde_json::Value {
    let state = dir.join("state.json").to_string_lossy().to_string();
    let mut a = vec!["vm", "restore", "--state", &state, "--mode", mode, "--json"];
    a.extend_from_slice(extra);
    let r = json_ok(&pagewire(&a));
    assert_eq!(r["verified"], true, "{r}");
    assert_eq!(r["mode"], mode, "{r}");
    r
}

#[test]
fn snapshot_then_restore_eager_embedded_and_through_serve() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let boot = snapshot(
        dir.path(),
        &[
            "--mem", "64M", "--vcpus", "2", "--guest", "walker", "--shared", "1M",
        ],
    );
    let pages = boot["working_set_pages"].as_u64().expect("pages");
    let eager = restore(dir.path(), "eager", &[]);
    assert!(
        eager["bytes_moved"].as_u64().expect("bytes") >= pages * 4096 / 2,
        "{eager}"
    );
    let embedded = restore(dir.path(), "embedded", &["--cluster-pages", "1"]);
    // One page per fault: every page of the working set was a fault.
    assert!(
        embedded["faults"].as_u64().expect("faults") >= pages - 2 * 256,
        "{embedded}"
    );
    let server = Server::start(dir.path(), &["--exit-after", "1"]);
    let sock = server.socket.to_string_lossy().to_string();
    restore(dir.path(), "serve", &["--socket", &sock, "--passes", "3"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // A whole line: one being written may be read cut short.
    while std::fs::read_to_string(&server.stats).map_or(true, |s| !s.contains('\n')) {
        assert!(Instant::now() < deadline, "serve wrote no statistics");
        std::thread::sleep(Duration::from_millis(20));
    }
    let line: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&server.stats)
            .expect("stats")
            .lines()
            .next()
            .expect("line"),
    )
    .expect("json");
    assert!(
        line["stats"]["pages_copied"].as_u64().unwrap_or(0) > 0,
        "{line}"
    );
    assert_eq!(line["stats"]["pages_poisoned"], 0, "{line}");
}

#[test]
fn a_page_server_that_dies_mid_run_stops_the_vm_with_a_clear_error() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    snapshot(dir.path(), &["--mem", "128M", "--guest", "walker"]);
    let mut server = Server::start(dir.path(), &["--cluster-pages", "1"]);
    let state = dir.path().join("state.json");
    let mut vm = Command::new(BIN)
        .args([
            "vm", "restore", "--mode", "serve", "--passes", "1000", "--state",
        ])
        .arg(&state)
        .arg("--socket")
        .arg(&server.socket)
        .env("PAGEWIRE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start vm");
    // One page per fault over 128 MiB takes seconds: kill the server while
    // the guest still needs most of its memory.
    std::thread::sleep(Duration::from_millis(300));
    server.child.kill().expect("kill serve");
    let _ = server.child.wait();
    let deadline = Instant::now() + Duration::from_secs(20);
    let status = loop {
        if let Some(s) = vm.try_wait().expect("wait") {
            break s;
        }
        if Instant::now() > deadline {
            let _ = vm.kill();
            panic!("the VMM hung after its page server died");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = vm.wait_with_output().expect("output");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!status.success(), "the VMM claimed success: {err}");
    assert!(err.contains("page server hung up"), "unclear error: {err}");
}

#[test]
fn a_truncated_memory_file_is_refused_with_a_clear_error() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    snapshot(dir.path(), &["--mem", "16M", "--guest", "sparse"]);
    let mem = dir.path().join("memory.bin");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .expect("open")
        .set_len(4 << 20)
        .expect("truncate");
    let state = dir.path().join("state.json").to_string_lossy().to_string();
    for mode in ["eager", "embedded"] {
        let out = pagewire(&["vm", "restore", "--state", &state, "--mode", mode]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{err}");
        assert!(
            err.contains("holds 4194304 bytes") && err.contains("not started"),
            "{err}"
        );
    }
}

#[test]
fn hugetlb_backed_guest_restores_lazily() {
    if !common::have_kvm() {
        return;
    }
    if !common::have_huge_pages(64, 40) {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    snapshot(
        dir.path(),
        &["--mem", "16M", "--guest", "walker", "--backing", "hugetlb"],
    );
    let r = restore(dir.path(), "embedded", &[]);
    assert!(r["faults"].as_u64().expect("faults") > 0, "{r}");
}

#[test]
fn demo_reports_five_verified_restores_and_the_recording_pays_off() {
    if !common::have_kvm() {
        return;
    }
    let out = pagewire(&["demo", "--mem", "64M", "--json"]);
    let r = json_ok(&out);
    assert_eq!(r["verified"], true, "{r}");
    let modes: Vec<&str> = r["restores"]
        .as_array()
        .expect("rows")
        .iter()
        .map(|x| x["mode"].as_str().unwrap_or("?"))
        .collect();
    assert_eq!(
        modes,
        ["eager", "embedded", "serve", "serve+rec", "serve+ws"]
    );
    for row in r["restores"].as_array().expect("rows") {
        assert_eq!(row["verified"], true, "{row}");
        assert!(row["working_set_ms"].as_f64().expect("ms") > 0.0, "{row}");
    }
    // The page server's own counts reached the report.
    let faults = |i: usize| r["restores"][i]["faults"].as_u64().unwrap_or(0);
    assert!(faults(2) > 0, "{r}");
    // The recorded set was prefetched, and most faults went away (counts,
    // not timings: the samples and the guest's zero pages still fault).
    // Against the recording restore, which faults once on every page the
    // guest touches: plain `serve` faults little on this guest already
    // (adaptive fault-around), and how many pages the guest reaches before
    // the prefetch does depends on the load (243 against 225 once, on a
    // busy CI machine).
    let ws = &r["restores"][4];
    assert!(ws["pages_prefetched"].as_u64().unwrap_or(0) > 0, "{ws}");
    assert!(faults(4) * 2 < faults(3), "{r}");
}

#[test]
fn an_embedded_restore_records_its_working_set_and_the_next_prefetches_it() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    snapshot(
        dir.path(),
        &["--mem", "64M", "--vcpus", "2", "--guest", "sparse"],
    );
    let set = dir.path().join("ws.pwws").to_string_lossy().to_string();
    let plain = restore(dir.path(), "embedded", &[]);
    let rec = restore(dir.path(), "embedded", &["--record", &set]);
    let pages = rec["recorded_pages"].as_u64().expect("recorded pages");
    assert!(pages > 0, "{rec}");
    let ws = restore(dir.path(), "embedded", &["--prefetch", &set]);
    // The guest's checksums verified (`restore`); the set was mapped ahead
    // of it, and faults went away (counts, not timings).
    assert!(
        ws["pages_prefetched"].as_u64().unwrap_or(0) > pages / 2,
        "{ws}"
    );
    assert_eq!(ws["faults_outside_set"].as_u64(), Some(0), "{ws}");
    let faults = |r: &serde_json::Value| r["faults"].as_u64().expect("faults");
    assert!(faults(&ws) * 2 < faults(&plain), "{plain}\n{ws}");
    // A set is for its snapshot only: --record and --prefetch go to the
    // embedded pager, and both at once are refused.
    let out = pagewire(&[
        "vm",
        "restore",
        "--state",
        &dir.path().join("state.json").to_string_lossy(),
        "--mode",
        "embedded",
        "--record",
        &set,
        "--prefetch",
        &set,
    ]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--record and --prefetch together"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A KVM guest restored from a pagewire image of its snapshot, embedded and
/// through `serve --source image://`: the guest's own checksums verify.
#[test]
fn a_guest_restores_from_an_image_of_its_snapshot() {
    if !common::have_kvm() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    snapshot(
        dir.path(),
        &["--mem", "64M", "--vcpus", "2", "--guest", "walker"],
    );
    let mem = dir.path().join("memory.bin").to_string_lossy().to_string();
    let img = dir
        .path()
        .join("memory.pwimg")
        .to_string_lossy()
        .to_string();
    let packed = pagewire(&["image", "pack", &mem, "-o", &img, "--json"]);
    let r = json_ok(&packed);
    assert!(
        r["image_len"].as_u64() < r["mem_len"].as_u64(),
        "the walker's memory should pack smaller: {r}"
    );
    let url = format!("image://{img}");
    restore(dir.path(), "embedded", &["--source", &url]);
    let server = Server::start_from(dir.path(), &["--source", &url], &["--exit-after", "1"]);
    let sock = server.socket.to_string_lossy().to_string();
    restore(dir.path(), "serve", &["--socket", &sock]);
}
