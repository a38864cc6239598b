//! Working sets end to end: `pagewire serve --record` writes what a client
//! touched, `pagewire ws` merges and inspects recordings, `serve
//! --prefetch` maps a set before the client asks, and a set recorded on
//! another snapshot is refused. Every byte the client reads is checked
//! against the memory file (`fc-client`). Needs userfaultfd (root here):
//! skips with a message otherwise, unless PAGEWIRE_REQUIRE_KVM=1 (CI).

use std::path::{Path, PathBuf};
use std::process::Command;

mod common;
use common::have_uffd;
use common::server::*;

/// Runs a client with `args` against a fresh `serve` with `extra`, in
/// `dir/name`; returns the client's report and the session's statistics.
fn serve_once(
    dir: &Path,
    name: &str,
    mem: &Path,
    extra: &[&str],
    args: &[&str],
) -> (serde_json::Value, serde_json::Value) {
    let sub = dir.join(name);
    std::fs::create_dir_all(&sub).expect("dir");
    let mut all = vec!["--exit-after", "1"];
    all.extend_from_slice(extra);
    let mut server = Server::start(&sub, mem, &all);
    let r = run_ok(&server, mem, args);
    let stats = server.wait_stats(1).remove(0);
    let _ = server.child.wait();
    (r, stats["stats"].clone())
}

fn ws(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .arg("ws")
        .args(args)
        .output()
        .expect("run pagewire ws")
}

fn inspect(file: &Path) -> serde_json::Value {
    let out = ws(&["inspect", "--json", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("inspect JSON")
}

/// The one recording in `dir`.
fn recording(dir: &Path) -> PathBuf {
    std::fs::read_dir(dir)
        .expect("recording dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "pwws"))
        .unwrap_or_else(|| panic!("no recording in {}", dir.display()))
}

#[test]
fn recorded_merged_and_prefetched_every_byte_checked() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 16 * MIB);
    let hot = |seed: &'static str| ["--pattern", "hotset", "--passes", "1", "--seed", seed];

    // Three recordings: two runs of one guest, one of a guest that
    // disagrees (another hot set).
    let mut files = Vec::new();
    let (mut touched, mut recorded) = (0, 0);
    for (i, seed) in ["1", "1", "2"].into_iter().enumerate() {
        let rec = dir.path().join(format!("rec{i}"));
        let (r, st) = serve_once(
            dir.path(),
            &format!("record{i}"),
            &mem,
            &["--record", &rec.to_string_lossy()],
            &hot(seed),
        );
        let file = recording(&rec);
        let summary = inspect(&file);
        // Only pages touched, each because it faulted (`--record-mode
        // exact`): every page with data, and the zero pages (the file's
        // hole) that were not mapped around another fault.
        let pages = summary["pages"].as_u64().expect("pages");
        let n = r["pages_touched"].as_u64().expect("touched");
        assert_eq!(st["faults"].as_u64(), Some(pages), "{st}");
        assert!(
            pages <= n && pages >= n * 3 / 4,
            "{pages} of {n}: {summary}"
        );
        if seed == "1" {
            (touched, recorded) = (n, pages);
        }
        files.push(file);
    }
    let merged = dir.path().join("merged.pwws");
    let mut args = vec![
        "merge".to_string(),
        "-o".into(),
        merged.display().to_string(),
    ];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = ws(&args);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A majority (2 of 3): the pages of seed 1, hardly any of seed 2's.
    let m = inspect(&merged);
    assert_eq!(m["runs"], 3, "{m}");
    let kept = m["pages"].as_u64().expect("pages");
    assert!(kept >= recorded && kept < recorded + recorded / 4, "{m}");

    // Prefetched: every byte right, and only the samples fault.
    let set = merged.to_string_lossy().to_string();
    // Replayed into a VM whose memory is laid out in three regions (the set
    // names file offsets, not addresses).
    let mut three = hot("1").to_vec();
    // The guest starts once the set is mapped: a test counts faults, and
    // must not race the prefetch (it lost on a loaded machine).
    three.extend_from_slice(&["--regions", "3", "--start-after-ms", "300"]);
    let (r, st) = serve_once(dir.path(), "replay", &mem, &["--prefetch", &set], &three);
    assert_eq!(r["pages_touched"].as_u64(), Some(touched), "{r}");
    assert!(
        st["pages_prefetched"].as_u64().unwrap_or(0) > touched / 2,
        "{st}"
    );
    assert!(
        st["faults"].as_u64().unwrap_or(u64::MAX) < touched / 4,
        "most pages were prefetched: {st}"
    );
    assert!(st["prefetch_done_ms"].as_f64().is_some(), "{st}");

    // A guest that changed: still every byte right; the faults outside the
    // set are counted.
    let (_, st) = serve_once(
        dir.path(),
        "changed",
        &mem,
        &["--prefetch", &set],
        &hot("3"),
    );
    assert!(st["faults_outside_set"].as_u64().unwrap_or(0) > 0, "{st}");

    // A recording is a trace too: replayed page by page, in its order.
    let sub = dir.path().join("trace");
    std::fs::create_dir_all(&sub).expect("dir");
    let server = Server::start(&sub, &mem, &[]);
    let pattern = format!("trace:{}", files[0].display());
    let r = run_ok(&server, &mem, &["--pattern", &pattern]);
    assert_eq!(r["pages_touched"].as_u64(), Some(recorded), "{r}");
}

#[test]
fn a_working_set_of_another_snapshot_is_refused() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let rec = dir.path().join("rec");
    serve_once(
        dir.path(),
        "record",
        &mem,
        &["--record", &rec.to_string_lossy()],
        &["--pattern", "hotset", "--passes", "1"],
    );
    let file = recording(&rec);
    // Another snapshot: the same size, one page different.
    let other = dir.path().join("other");
    let mut bytes = std::fs::read(&mem).expect("read mem");
    bytes[..4096].iter_mut().for_each(|b| *b ^= 0x5a);
    std::fs::write(&other, bytes).expect("write other");
    let out = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(dir.path().join("refused.sock"))
        .arg("--mem-file")
        .arg(&other)
        .arg("--prefetch")
        .arg(&file)
        .output()
        .expect("run serve");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "serve accepted it: {err}");
    assert!(err.contains("recorded on a snapshot"), "{err}");
    assert!(
        err.contains(&file.display().to_string()),
        "names the file: {err}"
    );
    // `ws inspect --snapshot` says the same, with exit status 1.
    let out = ws(&[
        "inspect",
        &file.to_string_lossy(),
        "--snapshot",
        &other.to_string_lossy(),
    ]);
    assert_eq!(
        out.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

#[test]
fn sigusr1_ends_the_recording_and_a_shutdown_still_saves_it() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let rec = dir.path().join("rec");
    let mut server = Server::start(dir.path(), &mem, &["--record", &rec.to_string_lossy()]);
    // A VM that touches its hot set, reports, and stays connected.
    let mut vm = client(
        &server,
        &mem,
        &["--pattern", "hotset", "--passes", "1", "--hold-ms", "20000"],
    )
    .spawn()
    .expect("client");
    // The report (JSON, over several lines) comes before the hold.
    let r: serde_json::Value = {
        use std::io::BufRead;
        let out = vm.stdout.as_mut().expect("client stdout");
        let mut text = String::new();
        let mut reader = std::io::BufReader::new(out);
        loop {
            let mut line = String::new();
            assert!(
                reader.read_line(&mut line).expect("client report") > 0,
                "{text}"
            );
            text.push_str(&line);
            if let Ok(v) = serde_json::from_str(&text) {
                break v;
            }
        }
    };
    assert_eq!(r["mismatched_pages"], 0, "{r}");
    let pid = rustix::process::Pid::from_child(&server.child);
    rustix::process::kill_process(pid, rustix::process::Signal::USR1).expect("SIGUSR1");
    server.wait_log("recording windows ended");
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("SIGTERM");
    let _ = server.child.wait();
    let _ = vm.kill();
    let _ = vm.wait();
    // Saved by the shutdown, with what was touched before SIGUSR1.
    let summary = inspect(&recording(&rec));
    let pages = summary["pages"].as_u64().expect("pages");
    let touched = r["pages_touched"].as_u64().expect("touched");
    assert!(pages > 0 && pages <= touched, "{summary}");
}
