//! `pagewire fc-client --embedded`: the client serves its own memory with an
//! in-process engine, for each access pattern, and traces record and replay.
//! Needs userfaultfd (root here): skips with a message otherwise, unless
//! PAGEWIRE_REQUIRE_KVM=1 (CI), where a skip fails.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_pagewire");
const MIB: usize = 1 << 20;
const PAGE: usize = 4096;

mod common;
use common::have_uffd;

/// A memory file: pseudo-random pages, every 5th page zero.
fn mem_file(dir: &Path, bytes: usize) -> PathBuf {
    let path = dir.join("mem");
    let mut data = vec![0u8; bytes];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for (i, page) in data.chunks_mut(PAGE).enumerate() {
        if i % 5 == 3 {
            continue;
        }
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    std::fs::write(&path, &data).expect("write mem file");
    path
}

fn run(mem: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("fc-client")
        .arg("--embedded")
        .arg("--mem-file")
        .arg(mem)
        .args(args)
        .env("PAGEWIRE_LOG", "warn")
        .output()
        .expect("run fc-client")
}

/// Runs the client, checks it succeeded with every byte right, and returns
/// its report.
fn run_ok(mem: &Path, args: &[&str]) -> serde_json::Value {
    let out = run(mem, args);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "fc-client {args:?} failed ({}): stdout {stdout}\nstderr {stderr}",
        out.status
    );
    let r: serde_json::Value = serde_json::from_str(stdout.trim())
        .unwrap_or_else(|e| panic!("report is not JSON ({e}): {stdout}\nstderr {stderr}"));
    assert_eq!(r["ok"], true, "{r:#}");
    assert_eq!(r["mismatched_pages"], 0, "{r:#}");
    assert!(r["client_cpu_ms"].as_f64().is_some(), "{r:#}");
    assert!(r["handler_cpu_ms"].as_f64().is_some(), "{r:#}");
    assert!(r["first_pass_ms"].as_f64().is_some(), "{r:#}");
    assert!(r["touch_mib_per_s"].as_f64().is_some(), "{r:#}");
    let stats = &r["handler_stats"];
    assert_eq!(stats["errors"], 0, "{r:#}");
    assert_eq!(stats["pages_poisoned"], 0, "{r:#}");
    r
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64()
        .unwrap_or_else(|| panic!("{v} is not an integer"))
}

/// The page indexes of a trace file, comments left out.
fn trace_pages(path: &Path) -> Vec<usize> {
    std::fs::read_to_string(path)
        .expect("read trace")
        .lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .map(|l| l.trim().parse().expect("page index"))
        .collect()
}

#[test]
fn every_pattern_serves_every_byte() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let pages = (4 * MIB / PAGE) as u64;
    for threads in ["1", "2"] {
        for pattern in ["seq", "random", "strided"] {
            let r = run_ok(&mem, &["--pattern", pattern, "--threads", threads]);
            assert_eq!(r["pattern"], pattern);
            assert_eq!(r["threads"].to_string(), threads);
            assert_eq!(n(&r["pages_touched"]), pages, "{pattern}: {r:#}");
            assert_eq!(n(&r["pages_verified"]), pages, "{pattern}: {r:#}");
            assert_eq!(n(&r["touches"]), pages, "{pattern}: {r:#}");
            assert_eq!(n(&r["faults_latency"]["samples"]), pages, "{r:#}");
        }
    }
}

#[test]
fn strided_with_an_uneven_stride_touches_every_page_once() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let trace = dir.path().join("strided.trace");
    let r = run_ok(
        &mem,
        &[
            "--pattern",
            "strided",
            "--stride",
            "7",
            "--threads",
            "1",
            "--record-trace",
            trace.to_str().expect("utf-8 path"),
        ],
    );
    let pages = 4 * MIB / PAGE;
    assert_eq!(n(&r["pages_touched"]), pages as u64);
    let got = trace_pages(&trace);
    let want: Vec<usize> = (0..7).flat_map(|r| (r..pages).step_by(7)).collect();
    assert_eq!(got, want);
}

#[test]
fn hotset_touches_a_tenth_of_the_pages_several_times() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let hot = (4 * MIB / PAGE / 10) as u64;
    for threads in ["1", "2"] {
        let r = run_ok(
            &mem,
            &["--pattern", "hotset", "--threads", threads, "--passes", "4"],
        );
        assert_eq!(r["pattern"], "hotset");
        assert_eq!(n(&r["pages_touched"]), hot, "{r:#}");
        assert_eq!(n(&r["pages_verified"]), hot, "{r:#}");
        assert_eq!(n(&r["passes"]), 4, "{r:#}");
        assert_eq!(n(&r["touches"]), 4 * hot, "{r:#}");
        // Only first touches are timed.
        assert_eq!(n(&r["faults_latency"]["samples"]), hot, "{r:#}");
        let first = r["first_pass_ms"].as_f64().expect("first_pass_ms");
        let all = r["touch_ms"].as_f64().expect("touch_ms");
        assert!(first <= all, "{r:#}");
    }
    // The same seed picks the same pages; another seed others.
    let record = |seed: &str, name: &str| {
        let path = dir.path().join(name);
        run_ok(
            &mem,
            &[
                "--pattern",
                "hotset",
                "--seed",
                seed,
                "--record-trace",
                path.to_str().expect("utf-8 path"),
            ],
        );
        trace_pages(&path)
    };
    let a = record("7", "a.trace");
    assert_eq!(a.len() as u64, hot);
    assert_eq!(a, record("7", "b.trace"));
    assert_ne!(a, record("8", "c.trace"));
}

#[test]
fn a_trace_replays_with_repeats_and_comments() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let trace = dir.path().join("hand.trace");
    let mut f = std::fs::File::create(&trace).expect("create trace");
    writeln!(
        f,
        "# a hand-written trace\n3\n1000\n3\n\n# again\n0\n1023\n1000"
    )
    .expect("write");
    drop(f);
    let spec = format!("trace:{}", trace.display());
    for threads in ["1", "2"] {
        let r = run_ok(&mem, &["--pattern", &spec, "--threads", threads]);
        assert_eq!(r["pattern"], "trace");
        assert_eq!(n(&r["pages_touched"]), 4, "{r:#}");
        assert_eq!(n(&r["pages_verified"]), 4, "{r:#}");
        assert_eq!(n(&r["touches"]), 6, "{r:#}");
    }

    // An index past the end is refused, naming the line.
    let bad = dir.path().join("bad.trace");
    std::fs::write(&bad, "1\n1024\n").expect("write");
    let out = run(&mem, &["--pattern", &format!("trace:{}", bad.display())]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("bad.trace:2"), "{stderr}");
}

#[test]
fn a_recorded_run_replays_the_same_pages() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let first = dir.path().join("first.trace");
    let second = dir.path().join("second.trace");
    let r1 = run_ok(
        &mem,
        &[
            "--pattern",
            "random",
            "--touch-fraction",
            "0.3",
            "--threads",
            "2",
            "--record-trace",
            first.to_str().expect("utf-8 path"),
        ],
    );
    let recorded = trace_pages(&first);
    assert_eq!(recorded.len() as u64, n(&r1["pages_touched"]));
    let r2 = run_ok(
        &mem,
        &[
            "--pattern",
            &format!("trace:{}", first.display()),
            "--threads",
            "2",
            "--record-trace",
            second.to_str().expect("utf-8 path"),
        ],
    );
    assert_eq!(r2["pages_touched"], r1["pages_touched"]);
    assert_eq!(r2["touches"], r1["touches"]);
    assert_eq!(trace_pages(&second), recorded);
}

#[test]
fn embedded_engine_options_and_balloon() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 4 * MIB);
    let pages = (4 * MIB / PAGE) as u64;
    let r = run_ok(
        &mem,
        &[
            "--pattern",
            "seq",
            "--regions",
            "3",
            "--serve-threads",
            "1",
            "--cluster-pages",
            "1",
            "--background",
            "--background-chunk",
            "8",
            "--balloon",
            "1M:256K",
            "--write-check",
        ],
    );
    assert_eq!(n(&r["pages_verified"]), pages, "{r:#}");
    assert_eq!(n(&r["balloon_pages_zero"]), 64, "{r:#}");
    assert_eq!(n(&r["balloon_pages_nonzero"]), 0, "{r:#}");
    assert_eq!(r["write_check"]["failed"], 0, "{r:#}");
    assert!(n(&r["handler_stats"]["events_remove"]) >= 1, "{r:#}");
}

#[test]
fn socket_is_required_without_embedded() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = dir.path().join("mem");
    std::fs::write(&mem, vec![0u8; PAGE]).expect("write");
    let out = Command::new(BIN)
        .arg("fc-client")
        .arg("--mem-file")
        .arg(&mem)
        .output()
        .expect("run fc-client");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--socket"), "{stderr}");

    let out = Command::new(BIN)
        .arg("fc-client")
        .arg("--mem-file")
        .arg(&mem)
        .args(["--socket", "/nonexistent.sock", "--cluster-pages", "4"])
        .output()
        .expect("run fc-client");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("--embedded"), "{stderr}");
}
