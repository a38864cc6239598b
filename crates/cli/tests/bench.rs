//! `pagewire bench` runs every built-in handler and a `--handler-cmd` on a
//! small memory file and reports verified results (no timing thresholds:
//! figures are for docs/benchmarks.md, not for tests). Needs userfaultfd.

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

mod common;
use common::have_uffd;

#[test]
fn bench_compares_every_handler_and_verifies() {
    if !have_uffd() {
        return;
    }
    // The user's own handler: here, pagewire serve again, named by command.
    let cmd = format!("{BIN} serve --socket {{socket}} --mem-file {{mem_file}} --cluster-pages 1");
    for pattern in ["seq", "random"] {
        let out = Command::new(BIN)
            .args([
                "bench",
                "--size",
                "8M",
                "--json",
                "--threads",
                "2",
                "--pattern",
                pattern,
            ])
            .args(["--handler-cmd", &cmd])
            .output()
            .expect("bench");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let r: serde_json::Value = serde_json::from_str(&stdout)
            .unwrap_or_else(|e| panic!("{e}: {stdout}\n{}", String::from_utf8_lossy(&out.stderr)));
        assert!(out.status.success(), "{r}");
        assert!(
            r["baselines"]["memcpy_gib_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{r}"
        );
        assert!(
            r["baselines"]["zero_fill_gib_s"].as_f64().unwrap_or(0.0) > 0.0,
            "{r}"
        );
        let rows = r["results"].as_array().expect("results");
        let names: Vec<&str> = rows.iter().filter_map(|x| x["handler"].as_str()).collect();
        assert_eq!(names, ["floor", "serve", "embedded", "cmd1"], "{r}");
        for row in rows {
            assert_eq!(row["ok"], true, "{row}");
            assert_eq!(row["mismatched_pages"], 0, "{row}");
            assert!(row["gib_s"].as_f64().unwrap_or(0.0) > 0.0, "{row}");
        }
        let pages = 8 * 1024 * 1024 / 4096;
        let floor = &rows[0];
        assert_eq!(floor["faults"], pages, "one fault per page: {floor}");
        for row in &rows[1..3] {
            let mapped = row["pages_copied"].as_u64().unwrap_or(0)
                + row["pages_zeroed"].as_u64().unwrap_or(0);
            assert_eq!(mapped, pages, "{row}");
            assert!(row["handler_cpu_ms"].as_f64().is_some(), "{row}");
        }
    }
}

#[test]
fn bench_rejects_bad_sizes_and_reports_a_broken_handler() {
    let out = Command::new(BIN)
        .args(["bench", "--size", "3M"])
        .output()
        .expect("bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("multiple of 2 MiB"));
    if !have_uffd() {
        return;
    }
    let out = Command::new(BIN)
        .args(["bench", "--size", "2M", "--json", "--handlers", "floor"])
        .args(["--handler-cmd", "false {socket}"])
        .output()
        .expect("bench");
    assert!(!out.status.success(), "a failing handler fails the run");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let bad = &r["results"][1];
    assert_eq!(bad["ok"], false, "{r}");
    assert!(
        bad["error"]
            .as_str()
            .unwrap_or_default()
            .contains("exited before listening"),
        "{r}"
    );
}

/// `--runs N` runs every handler N times, round by round, and summarizes
/// each handler's runs (medians; ratios to the floor of the same round).
#[test]
fn bench_runs_rounds_and_summarizes_them() {
    if !have_uffd() {
        return;
    }
    let out = Command::new(BIN)
        .args(["bench", "--size", "4M", "--json", "--runs", "2"])
        .args(["--handlers", "floor,serve", "--pattern", "random"])
        .output()
        .expect("bench");
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert!(out.status.success(), "{r}");
    let rows = r["results"].as_array().expect("results");
    let order: Vec<(u64, &str)> = rows
        .iter()
        .map(|x| {
            (
                x["run"].as_u64().unwrap_or(0),
                x["handler"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        order,
        [(1, "floor"), (1, "serve"), (2, "floor"), (2, "serve")],
        "{r}"
    );
    let summary = r["summary"].as_array().expect("summary");
    assert_eq!(summary.len(), 2, "{r}");
    for (s, name) in summary.iter().zip(["floor", "serve"]) {
        assert_eq!(s["handler"], name, "{s}");
        assert_eq!(s["runs_ok"], 2, "{s}");
        let (lo, mid, hi) = (
            s["gib_s_min"].as_f64().unwrap_or(-1.0),
            s["gib_s_median"].as_f64().unwrap_or(-1.0),
            s["gib_s_max"].as_f64().unwrap_or(-1.0),
        );
        assert!(0.0 < lo && lo <= mid && mid <= hi, "{s}");
    }
    assert!(summary[0]["x_floor_median"].is_null(), "{r}");
    assert!(
        summary[1]["x_floor_median"].as_f64().unwrap_or(0.0) > 0.0,
        "{r}"
    );
    let out = Command::new(BIN)
        .args(["bench", "--size", "2M", "--runs", "0"])
        .output()
        .expect("bench");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--runs must be at least 1"));
}
