//! `pagewire demo`: the whole thing on a fresh machine.
//!
//! With KVM: boot a guest that fills its memory with a seeded pattern and
//! keeps verifying it, snapshot it, then restore it three ways (eagerly,
//! lazily with the pager in this process, lazily through `pagewire serve`
//! in its own process over Firecracker's handshake) and report for each how
//! fast the guest resumed, when its working set was present, what was
//! moved, and whether the guest's own checksums verified every byte.
//! Without KVM: the process-memory version (a Firecracker-style client
//! process restored by `pagewire serve`).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Args;
use serde::Serialize;

use crate::vm::{GuestArgs, RestoreArgs, RestoreReport};
use testbed::TempDir;

#[derive(Args)]
pub struct DemoArgs {
    /// Guest memory.
    #[arg(long, default_value = "512M", value_parser = testbed::parse_size_2m)]
    pub mem: u64,
    #[arg(long, default_value_t = 2)]
    pub vcpus: u32,
    /// sparse (a 10% working set) or walker (all of memory).
    #[arg(long, default_value = "sparse")]
    pub guest: String,
    /// Memory every vCPU reads each pass (so vCPUs fault on the same pages).
    #[arg(long, default_value = "8M", value_parser = testbed::parse_size)]
    pub shared: u64,
    /// Keep the snapshot in this directory instead of a temporary one.
    #[arg(long)]
    pub keep: Option<PathBuf>,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
    /// How `serve` records the working set: exact or fast (see `pagewire
    /// serve --help`).
    #[arg(long, default_value = "exact", value_parser = ["exact", "fast"])]
    pub record_mode: String,
}

#[derive(Serialize)]
struct DemoReport {
    guest: crate::vm::BootReport,
    snapshot_mib_on_disk: f64,
    restores: Vec<Row>,
    verified: bool,
}

#[derive(Serialize)]
struct Row {
    #[serde(flatten)]
    report: Option<RestoreReport>,
    mode: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<String>,
}

fn kvm_usable() -> bool {
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok()
}

pub fn run(a: &DemoArgs) -> anyhow::Result<ExitCode> {
    if !kvm_usable() {
        println!(
            "/dev/kvm cannot be opened on this machine, so no KVM guest can run.\n\
             Running the process-memory demo instead: a client process restores 256 MiB \
             of memory exactly as Firecracker does, served by `pagewire serve`.\n"
        );
        return process_demo();
    }
    let exe = std::env::current_exe().context("finding the pagewire binary")?;
    let tmp = TempDir::named("demo")?;
    let dir = a.keep.clone().unwrap_or_else(|| tmp.path().to_path_buf());
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let say = |s: String| {
        if !a.json {
            println!("{s}");
        }
    };

    // 1. Run a guest and snapshot it.
    let guest = GuestArgs {
        mem: a.mem,
        vcpus: a.vcpus,
        guest: vmm::WorkloadKind::parse(&a.guest)
            .filter(|k| *k != vmm::WorkloadKind::Halt)
            .with_context(|| format!("--guest {:?}: expected sparse or walker", a.guest))?,
        seed: 2014,
        shared: a.shared,
        backing: vmm::Backing::Anonymous,
        passes: 2,
        timeout_s: 300,
        json: a.json,
    };
    say(format!(
        "== 1. booting a {} MiB KVM guest ({} guest, {} vCPUs): it fills its memory with a seeded pattern, then re-reads and rewrites it, checking every word",
        a.mem >> 20,
        a.guest,
        a.vcpus
    ));
    let (mut vm, mut boot) = crate::vm::boot_and_run(&guest)?;
    let t = Instant::now();
    vm.snapshot(&dir)?;
    boot.snapshot_ms = Some(t.elapsed().as_secs_f64() * 1e3);
    vm.stop(Duration::from_secs(5))?;
    drop(vm);
    let on_disk = allocated_mib(&dir.join("memory.bin"));
    say(format!(
        "   {} passes over a working set of {} pages verified in {:.0} ms; paused and snapshotted in {:.0} ms \
         ({} MiB memory file, {:.0} MiB of it data, zero pages left as holes)",
        boot.passes,
        boot.working_set_pages,
        boot.run_ms,
        boot.snapshot_ms.unwrap_or(0.0),
        a.mem >> 20,
        on_disk
    ));

    // 2. Restore it five ways.
    say("== 2. restoring the snapshot five ways (eager; lazily in-process; lazily through `pagewire serve`: \
         plain, recording its working set, then prefetching that recording); each guest runs 2 more \
         passes and checks every word it reads".into());
    let state = dir.join("state.json");
    let base = RestoreArgs {
        state: state.clone(),
        mode: String::new(),
        socket: None,
        source: None,
        passes: 2,
        threads: 2,
        cluster_pages: pager::DEFAULT_CLUSTER_PAGES,
        background: false,
        fixed_cluster: false,
        record: None,
        recording: crate::sets::RecordingArgs::default(),
        prefetch: None,
        timeout_s: 300,
        json: false,
    };
    let mut rows = Vec::new();
    for mode in ["eager", "embedded"] {
        let args = RestoreArgs {
            mode: mode.into(),
            ..base.clone()
        };
        rows.push(row(mode_name(mode), crate::vm::restore(&args)));
    }
    let mem = dir.join("memory.bin");
    rows.push(serve_restore(&exe, &dir, &mem, &base, "serve", &[]));
    // The working set: recorded through serve once, then prefetched.
    let rec_dir = dir.join("recorded");
    let _ = std::fs::remove_dir_all(&rec_dir);
    let record = [
        std::ffi::OsString::from("--record"),
        rec_dir.clone().into(),
        "--record-mode".into(),
        a.record_mode.clone().into(),
    ];
    rows.push(serve_restore(&exe, &dir, &mem, &base, "serve+rec", &record));
    let set = crate::sets::find_recording(&rec_dir);
    if let (Ok(path), Some(row)) = (&set, rows.last_mut()) {
        if let (Ok(ws), Some(r)) = (workset::WorkingSet::read(path), row.report.as_mut()) {
            r.recorded_pages = Some(ws.pages());
        }
    }
    match &set {
        Ok(set) => {
            let prefetch = [std::ffi::OsString::from("--prefetch"), set.clone().into()];
            rows.push(serve_restore(
                &exe, &dir, &mem, &base, "serve+ws", &prefetch,
            ));
        }
        Err(e) => rows.push(Row {
            report: None,
            mode: "serve+ws",
            error: Some(format!("no recording to prefetch: {e:#}")),
        }),
    }

    let verified = rows
        .iter()
        .all(|r| r.report.as_ref().is_some_and(|r| r.verified));
    let report = DemoReport {
        guest: boot,
        snapshot_mib_on_disk: on_disk,
        restores: rows,
        verified,
    };
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_table(&report);
    }
    if a.keep.is_some() {
        say(format!("snapshot kept in {}", dir.display()));
    }
    Ok(if verified {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

fn mode_name(m: &str) -> &'static str {
    match m {
        "eager" => "eager",
        "embedded" => "embedded",
        _ => "serve",
    }
}

fn row(mode: &'static str, r: anyhow::Result<RestoreReport>) -> Row {
    match r {
        Ok(report) => Row {
            report: Some(report),
            mode,
            error: None,
        },
        Err(e) => Row {
            report: None,
            mode,
            error: Some(format!("{e:#}")),
        },
    }
}

fn print_table(r: &DemoReport) {
    println!();
    println!(
        "{:<10} {:>10} {:>12} {:>9} {:>13} {:>12} {:>14}  result",
        "restore", "resume", "working set", "faults", "pages copied", "MiB moved", "fault p50/p99"
    );
    for row in &r.restores {
        match &row.report {
            Some(x) => {
                let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
                let lat = match (x.fault_p50_us, x.fault_p99_us) {
                    (Some(a), Some(b)) => format!("{a:.0}/{b:.0} us"),
                    _ => "-".into(),
                };
                println!(
                    "{:<10} {:>7.1} ms {:>9.1} ms {:>9} {:>13} {:>12} {:>14}  {}",
                    row.mode,
                    x.resume_ms,
                    x.working_set_ms,
                    opt(x.faults),
                    opt(x.pages_copied),
                    x.bytes_moved
                        .map_or("-".to_string(), |b| format!("{:.1}", b as f64 / 1048576.0)),
                    lat,
                    if x.verified {
                        format!("verified ({} passes)", x.passes)
                    } else {
                        "NOT verified".into()
                    }
                );
            }
            None => println!(
                "{:<10} FAILED: {}",
                row.mode,
                row.error.as_deref().unwrap_or("unknown error")
            ),
        }
    }
    println!();
    for row in &r.restores {
        let Some(x) = &row.report else { continue };
        if let Some(n) = x.recorded_pages {
            println!("{}: recorded a working set of {n} pages", row.mode);
        }
        if let Some(p) = x.pages_prefetched {
            println!(
                "{}: prefetched {p} pages, the whole set mapped {} ms after the handshake; {} of the \
                 set touched (sampled), {} faults outside it",
                row.mode,
                x.prefetch_done_ms.map_or("-".into(), |v| format!("{v:.1}")),
                x.prefetch_hit_rate.map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
                x.faults_outside_set.unwrap_or(0)
            );
        }
    }
    if let (Some(e), Some(w)) = (
        r.restores
            .iter()
            .find(|x| x.mode == "eager")
            .and_then(|x| x.report.as_ref()),
        r.restores
            .iter()
            .find(|x| x.mode == "serve+ws")
            .and_then(|x| x.report.as_ref()),
    ) {
        println!(
            "with its recorded working set, the lazy restore had the working set present in {:.2}x \
             the eager restore's time, resuming in {:.1} ms instead of {:.1}",
            w.working_set_ms / e.working_set_ms,
            w.resume_ms,
            e.resume_ms
        );
    }
    println!(
        "resume: restore started -> vCPUs running. working set: restore started -> every vCPU finished a full pass, \
         i.e. all {} pages it uses were present. faults/pages/latency: the page server's own counts \
         (fault read -> page mapped).",
        r.guest.working_set_pages
    );
    if r.verified {
        println!(
            "verified: in every restore the guest's checksums matched the snapshot, word for word."
        );
    } else {
        println!("NOT verified: see the rows above.");
    }
}

/// MiB of the file that hold data (the rest are holes).
fn allocated_mib(p: &Path) -> f64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).map_or(0.0, |m| (m.blocks() * 512) as f64 / 1048576.0)
}

/// A restore through a fresh `pagewire serve` (with `extra` arguments),
/// its row filled in with the server's own statistics.
fn serve_restore(
    exe: &Path,
    dir: &Path,
    mem: &Path,
    base: &RestoreArgs,
    label: &'static str,
    extra: &[std::ffi::OsString],
) -> Row {
    let socket = dir.join("uffd.sock");
    let stats = dir.join("serve.jsonl");
    let _ = std::fs::remove_file(&stats);
    let mut server = match start_server(exe, &socket, mem, &stats, extra) {
        Ok(s) => s,
        Err(e) => return row(label, Err(e)),
    };
    let args = RestoreArgs {
        mode: "serve".into(),
        socket: Some(socket.clone()),
        ..base.clone()
    };
    let mut serve_row = row(label, crate::vm::restore(&args));
    let ended = wait_child(&mut server, Duration::from_secs(10));
    if let Some(r) = serve_row.report.as_mut() {
        match (ended, read_serve_stats(&stats)) {
            (true, Ok(s)) => {
                r.faults = Some(s.faults);
                r.pages_copied = Some(s.pages_copied);
                r.pages_zeroed = Some(s.pages_zeroed);
                r.bytes_moved = Some(s.bytes_copied);
                r.fault_p50_us = Some(s.first_touch_latency.p50_us);
                r.fault_p99_us = Some(s.first_touch_latency.p99_us);
                r.pages_unasked = Some(s.pages_unasked);
                if s.pages_prefetched > 0 || s.prefetch_samples > 0 {
                    r.pages_prefetched = Some(s.pages_prefetched);
                    r.prefetch_hit_rate = s.prefetch_hit_rate();
                    r.faults_outside_set = Some(s.faults_outside_set);
                    r.prefetch_done_ms = s.prefetch_done_ms;
                }
            }
            (_, Err(e)) => tracing::warn!("no statistics from pagewire serve: {e:#}"),
            (false, _) => tracing::warn!("pagewire serve did not exit after the VM ended"),
        }
    }
    let _ = server.kill();
    let _ = server.wait();
    serve_row
}

fn start_server(
    exe: &Path,
    socket: &Path,
    mem: &Path,
    stats: &Path,
    extra: &[std::ffi::OsString],
) -> anyhow::Result<Child> {
    let _ = std::fs::remove_file(socket);
    let mut child = Command::new(exe)
        .arg("serve")
        .args(extra)
        .arg("--socket")
        .arg(socket)
        .arg("--mem-file")
        .arg(mem)
        .arg("--stats-json")
        .arg(stats)
        .args(["--exit-after", "1"])
        .env("PAGEWIRE_LOG", "warn")
        .stdin(Stdio::null())
        .spawn()
        .context("starting pagewire serve")?;
    testbed::wait_listening(&mut child, socket, "pagewire serve")?;
    Ok(child)
}

fn wait_child(child: &mut Child, limit: Duration) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    false
}

#[derive(serde::Deserialize)]
struct ServeLine {
    stats: pager::StatsSnapshot,
}

fn read_serve_stats(p: &Path) -> anyhow::Result<pager::StatsSnapshot> {
    let text = std::fs::read_to_string(p).with_context(|| format!("reading {}", p.display()))?;
    let line = text.lines().next().context("no line")?;
    Ok(serde_json::from_str::<ServeLine>(line)?.stats)
}

/// Without KVM: a client process restores memory as Firecracker does.
fn process_demo() -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the pagewire binary")?;
    let tmp = TempDir::named("demo")?;
    let mem = tmp.path().join("memory.bin");
    testbed::generate(&mem, 256 << 20, 4)?;
    let socket = tmp.path().join("uffd.sock");
    let stats = tmp.path().join("serve.jsonl");
    let mut server = start_server(&exe, &socket, &mem, &stats, &[])?;
    let out = Command::new(&exe)
        .arg("fc-client")
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(&mem)
        .args(["--regions", "2", "--threads", "2"])
        .output()
        .context("running pagewire fc-client")?;
    let ended = wait_child(&mut server, Duration::from_secs(10));
    let _ = server.kill();
    let _ = server.wait();
    let c: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "fc-client printed no report: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    let get = |k: &str| c.get(k).and_then(|v| v.as_f64()).unwrap_or(0.0);
    println!(
        "client: {} of {} pages verified against the file, {} mismatched; touched at {:.0} MiB/s",
        get("pages_verified"),
        get("pages_total"),
        get("mismatched_pages"),
        get("touch_mib_per_s")
    );
    if ended {
        if let Ok(s) = read_serve_stats(&stats) {
            println!(
                "server: {} faults, {} pages copied, {} zero pages mapped without a copy; fault-to-mapped p50 {:.0} us, p99 {:.0} us",
                s.faults,
                s.pages_copied,
                s.pages_zeroed,
                s.first_touch_latency.p50_us,
                s.first_touch_latency.p99_us
            );
        }
    }
    let ok = out.status.success() && get("mismatched_pages") == 0.0;
    println!("{}", if ok { "verified" } else { "NOT verified" });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
