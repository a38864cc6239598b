//! `pagewire ws merge|inspect`: working sets (`.pwws` files) on disk.
//!
//! A working set is the list of snapshot pages a restored VM touched, in
//! first-touch order (the `workset` crate). `merge` combines recordings of
//! one snapshot into the pages most runs agreed on; `inspect` summarises one
//! and can check that it belongs to a given snapshot memory file.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context as _};
use clap::{Args, Subcommand};
use serde::Serialize;
use workset::{Summary, WorkingSet};

#[derive(Subcommand)]
pub enum WsCommand {
    /// Merge recordings of one snapshot into the pages most runs touched.
    Merge(MergeArgs),
    /// Summarise a working set; with --snapshot, check it belongs to that snapshot.
    Inspect(InspectArgs),
}

#[derive(Args)]
pub struct MergeArgs {
    /// The merged working set to write (atomically).
    #[arg(short = 'o', long = "output", value_name = "OUT")]
    pub output: PathBuf,
    /// Keep the pages seen in at least this many runs [default: a majority
    /// of the inputs' runs, n/2+1].
    #[arg(long, value_name = "K")]
    pub min_runs: Option<u32>,
    /// Recordings or earlier merges, all of the same snapshot.
    #[arg(required = true, value_name = "FILE")]
    pub files: Vec<PathBuf>,
}

#[derive(Args)]
pub struct InspectArgs {
    /// The working set.
    #[arg(value_name = "FILE")]
    pub file: PathBuf,
    /// Print the summary as JSON.
    #[arg(long)]
    pub json: bool,
    /// Check the working set against this snapshot memory file (exit 1 if
    /// it was recorded on another snapshot).
    #[arg(long, value_name = "MEM_FILE")]
    pub snapshot: Option<PathBuf>,
}

pub fn run(cmd: &WsCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        WsCommand::Merge(args) => merge(args),
        WsCommand::Inspect(args) => inspect(args),
    }
}

fn read(path: &Path) -> anyhow::Result<WorkingSet> {
    WorkingSet::read(path).with_context(|| format!("working set {}", path.display()))
}

/// A majority of `runs`: n/2 + 1.
fn majority(runs: u64) -> u32 {
    u32::try_from(runs / 2 + 1).unwrap_or(u32::MAX)
}

fn merge(args: &MergeArgs) -> anyhow::Result<ExitCode> {
    let sets = args
        .files
        .iter()
        .map(|p| read(p))
        .collect::<anyhow::Result<Vec<_>>>()?;
    // Check here too, to name the files rather than input numbers.
    let first = &sets[0].snapshot;
    for (path, ws) in args.files.iter().zip(&sets).skip(1) {
        if ws.snapshot != *first {
            bail!(
                "{} and {} were recorded on different snapshots: {} bytes (fingerprint {}) and {} bytes (fingerprint {}); only working sets of one snapshot merge",
                args.files[0].display(),
                path.display(),
                first.len,
                first.short(),
                ws.snapshot.len,
                ws.snapshot.short()
            );
        }
    }
    let total: u64 = sets.iter().map(|ws| u64::from(ws.runs)).sum();
    let min_runs = args.min_runs.unwrap_or_else(|| majority(total));
    let merged = workset::merge(&sets, min_runs).context("merging working sets")?;
    let sim = workset::similarity(&sets);
    merged
        .write(&args.output)
        .with_context(|| format!("writing the merged working set {}", args.output.display()))?;
    println!(
        "{}: kept {} of {} pages ({}) seen in at least {min_runs} of {total} runs; {} pages in every input; Jaccard mean {:.3}, min {:.3}",
        args.output.display(),
        merged.pages(),
        sim.union_pages,
        bytes(merged.bytes()),
        sim.common_pages,
        sim.mean_jaccard,
        sim.min_jaccard,
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Serialize)]
struct InspectJson<'a> {
    file: String,
    #[serde(flatten)]
    summary: &'a Summary,
    /// With --snapshot: whether the working set belongs to it.
    #[serde(skip_serializing_if = "Option::is_none")]
    snapshot_matches: Option<bool>,
}

fn inspect(args: &InspectArgs) -> anyhow::Result<ExitCode> {
    let ws = read(&args.file)?;
    let summary = ws.summary();
    let check = match &args.snapshot {
        None => None,
        Some(mem) => {
            let id = crate::sets::snapshot_id(mem)?;
            Some((mem, ws.check_snapshot(&id)))
        }
    };
    let matches = check.as_ref().map(|(_, r)| r.is_ok());
    if args.json {
        let report = InspectJson {
            file: args.file.display().to_string(),
            summary: &summary,
            snapshot_matches: matches,
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&report).context("serialising the summary")?
        );
    } else {
        print!("{}", table(&args.file, &summary));
    }
    if let Some((mem, result)) = &check {
        match result {
            Ok(()) => eprintln!("snapshot {}: matches", mem.display()),
            Err(e) => eprintln!("snapshot {}: does not match: {e}", mem.display()),
        }
    }
    Ok(if matches == Some(false) {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    })
}

fn table(file: &Path, s: &Summary) -> String {
    let window = if s.window_ms == 0 {
        "until stopped or the session ended".to_string()
    } else {
        format!("{} ms", s.window_ms)
    };
    let seen = s
        .pages_by_seen
        .iter()
        .map(|(runs, pages)| format!("{runs}: {pages}"))
        .collect::<Vec<_>>()
        .join(", ");
    let mut out = String::new();
    let mut row = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
    row("working set", file.display().to_string());
    row(
        "snapshot",
        format!(
            "{} ({} bytes), fingerprint {}",
            bytes(s.snapshot_len),
            s.snapshot_len,
            s.snapshot_fingerprint
        ),
    );
    row(
        "pages",
        format!(
            "{} ({}, {:.1}% of the snapshot)",
            s.pages,
            bytes(s.bytes),
            s.share_of_snapshot * 100.0
        ),
    );
    row("runs", s.runs.to_string());
    row("window", window);
    row(
        "first touches",
        format!(
            "{} to {}; half by {}, 90% by {}",
            micros(s.first_t_us),
            micros(s.last_t_us),
            micros(s.p50_t_us),
            micros(s.p90_t_us)
        ),
    );
    row(
        "contiguous runs",
        format!("{} (mean {:.1} pages)", s.contiguous_runs, s.mean_run_pages),
    );
    row("threads", s.threads.to_string());
    row("pages by runs", seen);
    out
}

fn bytes(n: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

fn micros(us: u64) -> String {
    match us {
        0..1_000 => format!("{us} µs"),
        1_000..1_000_000 => format!("{:.1} ms", us as f64 / 1e3),
        _ => format!("{:.3} s", us as f64 / 1e6),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use workset::{SnapshotId, Touch};

    fn recording(snapshot: SnapshotId, pages: &[u64]) -> WorkingSet {
        WorkingSet {
            snapshot,
            runs: 1,
            window_ms: 0,
            touches: pages
                .iter()
                .enumerate()
                .map(|(i, &page)| Touch {
                    page,
                    t_us: i as u64 * 100,
                    thread: 1,
                    seen: 1,
                })
                .collect(),
        }
    }

    #[test]
    fn merge_then_inspect_against_the_snapshot() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = dir.path().join("memory.bin");
        std::fs::write(&mem, vec![7u8; 64 * 4096]).expect("write");
        let id =
            SnapshotId::of_file(&std::fs::File::open(&mem).expect("open")).expect("fingerprint");
        let inputs: Vec<PathBuf> = [[1, 2, 3], [2, 3, 4], [3, 2, 5]]
            .iter()
            .enumerate()
            .map(|(i, pages)| {
                let p = dir.path().join(format!("run{i}.pwws"));
                recording(id, pages)
                    .write(&p)
                    .expect("write the working set");
                p
            })
            .collect();
        let out = dir.path().join("merged.pwws");
        let code = run(&WsCommand::Merge(MergeArgs {
            output: out.clone(),
            min_runs: None,
            files: inputs.clone(),
        }))
        .expect("ws command");
        assert_eq!(code, ExitCode::SUCCESS);
        let merged = WorkingSet::read(&out).expect("read the working set");
        let pages: Vec<u64> = merged.touches.iter().map(|t| t.page).collect();
        assert_eq!(pages, [2, 3], "majority of 3 runs is 2");

        let inspect = |snapshot| {
            run(&WsCommand::Inspect(InspectArgs {
                file: out.clone(),
                json: false,
                snapshot,
            }))
            .expect("ws command")
        };
        assert_eq!(inspect(Some(mem.clone())), ExitCode::SUCCESS);
        let other = dir.path().join("other.bin");
        std::fs::write(&other, vec![8u8; 64 * 4096]).expect("write");
        assert_eq!(inspect(Some(other.clone())), ExitCode::from(1));

        // A recording of another snapshot is refused, naming both files.
        let foreign = dir.path().join("foreign.pwws");
        let other_id =
            SnapshotId::of_file(&std::fs::File::open(&other).expect("open")).expect("open");
        recording(other_id, &[1])
            .write(&foreign)
            .expect("write the working set");
        let err = run(&WsCommand::Merge(MergeArgs {
            output: dir.path().join("x.pwws"),
            min_runs: None,
            files: vec![inputs[0].clone(), foreign],
        }))
        .unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("run0.pwws") && msg.contains("foreign.pwws"),
            "{msg}"
        );
    }

    #[test]
    fn helpers() {
        assert_eq!(majority(1), 1);
        assert_eq!(majority(2), 2);
        assert_eq!(majority(3), 2);
        assert_eq!(majority(4), 3);
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 20), "3.0 MiB");
        assert_eq!(micros(999), "999 µs");
        assert_eq!(micros(1_500), "1.5 ms");
        assert_eq!(micros(2_000_000), "2.000 s");
    }
}
