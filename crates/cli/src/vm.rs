//! `pagewire vm run|snapshot|restore`: the reference KVM VMM for users.
//!
//! `run` boots a guest and lets it verify its memory for some passes;
//! `snapshot` does the same, then writes `state.json` and `memory.bin` into
//! a directory; `restore` brings such a snapshot back eagerly, with the pager
//! embedded in this process, or through a `pagewire serve` reached with
//! Firecracker's handshake, and runs more verified passes.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use clap::{Args, Subcommand};
use serde::Serialize;
use vmm::{Backing, EmbeddedOptions, RestoreMode, Vm, VmConfig, Workload, WorkloadKind};

#[derive(Subcommand)]
pub enum VmCommand {
    /// Boot a guest and run verified passes over its memory.
    Run(RunArgs),
    /// Boot a guest, run it, pause it and write a snapshot.
    Snapshot(SnapshotArgs),
    /// Restore a snapshot and run more verified passes.
    Restore(RestoreArgs),
    /// Boot a guest, run it, and live-migrate it while it runs to a
    /// `vm receive` on another host.
    Migrate(crate::migrate::MigrateArgs),
    /// Receive a live migration and run the guest here.
    Receive(crate::migrate::ReceiveArgs),
}

#[derive(Args, Clone)]
pub struct GuestArgs {
    /// Guest memory (a multiple of 2 MiB; K/M/G suffixes).
    #[arg(long, default_value = "64M", value_parser = testbed::parse_size_2m)]
    pub mem: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// walker (all memory), sparse (one page in ten) or halt (CPL0 console, HLT).
    #[arg(long, default_value = "walker", value_parser = parse_kind)]
    pub guest: WorkloadKind,
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Memory at the top that every vCPU reads each pass (K/M suffixes).
    #[arg(long, default_value = "0", value_parser = testbed::parse_size)]
    pub shared: u64,
    /// anonymous (as Firecracker), memfd or hugetlb (2 MiB pages).
    #[arg(long, default_value = "anonymous", value_parser = parse_backing)]
    pub backing: Backing,
    /// Verified passes over memory after the fill.
    #[arg(long, default_value_t = 2)]
    pub passes: u64,
    /// Give up after this many seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    /// Print a JSON report instead of text.
    #[arg(long)]
    pub json: bool,
}

#[derive(Args)]
pub struct RunArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
}

#[derive(Args)]
pub struct SnapshotArgs {
    #[command(flatten)]
    pub guest: GuestArgs,
    /// Directory for state.json and memory.bin.
    #[arg(long)]
    pub dir: PathBuf,
}

#[derive(Args, Clone)]
pub struct RestoreArgs {
    /// The snapshot's state.json (or its directory).
    #[arg(long)]
    pub state: PathBuf,
    /// eager, embedded or serve.
    #[arg(long, default_value = "embedded")]
    pub mode: String,
    /// With --mode serve: the page server's socket.
    #[arg(long)]
    pub socket: Option<PathBuf>,
    /// Embedded pager: where the bytes come from instead of the snapshot's
    /// memory file: `image://PATH` (a pagewire image) or `s3://BUCKET/KEY`
    /// (see `serve --source`).
    #[arg(long)]
    pub source: Option<String>,
    /// Verified passes to run after the restore.
    #[arg(long, default_value_t = 2)]
    pub passes: u64,
    /// Embedded pager: serving threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Embedded pager: 4 KiB pages served around each fault.
    #[arg(long, default_value_t = pager::DEFAULT_CLUSTER_PAGES)]
    pub cluster_pages: usize,
    /// Embedded pager: populate the rest of memory in the background.
    #[arg(long)]
    pub background: bool,
    /// Embedded pager: keep the fault-around window at --cluster-pages
    /// instead of following the guest.
    #[arg(long)]
    pub fixed_cluster: bool,
    /// Embedded pager: record the working set into this file (`.pwws`)
    /// when the guest has finished its passes (or at --record-window-ms).
    #[arg(long)]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub recording: crate::sets::RecordingArgs,
    /// Embedded pager: map this recorded working set right away, at lower
    /// priority than faults.
    #[arg(long)]
    pub prefetch: Option<PathBuf>,
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    #[arg(long)]
    pub json: bool,
}

fn parse_kind(s: &str) -> Result<WorkloadKind, String> {
    WorkloadKind::parse(s).ok_or_else(|| format!("{s:?}: expected walker, sparse or halt"))
}

fn parse_backing(s: &str) -> Result<Backing, String> {
    match s {
        "anonymous" => Ok(Backing::Anonymous),
        "memfd" => Ok(Backing::Memfd),
        "hugetlb" => Ok(Backing::Hugetlb),
        _ => Err(format!("{s:?}: expected anonymous, memfd or hugetlb")),
    }
}

pub fn run(cmd: &VmCommand) -> anyhow::Result<ExitCode> {
    match cmd {
        VmCommand::Run(a) => {
            let (vm, report) = boot_and_run(&a.guest)?;
            drop(vm);
            print(&report, a.guest.json, |r| print_boot(r, None))?;
        }
        VmCommand::Snapshot(a) => {
            let (mut vm, mut report) = boot_and_run(&a.guest)?;
            let t = Instant::now();
            vm.snapshot(&a.dir)
                .with_context(|| format!("writing the snapshot into {}", a.dir.display()))?;
            report.snapshot_ms = Some(ms(t.elapsed()));
            report.snapshot_dir = Some(a.dir.clone());
            vm.stop(Duration::from_secs(5))?;
            print(&report, a.guest.json, |r| print_boot(r, Some(&a.dir)))?;
        }
        VmCommand::Restore(a) => {
            let report = restore(a)?;
            print(&report, a.json, print_restore)?;
        }
        VmCommand::Migrate(a) => return crate::migrate::migrate(a),
        VmCommand::Receive(a) => return crate::migrate::receive(a),
    }
    Ok(ExitCode::SUCCESS)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn print<T: Serialize>(report: &T, json: bool, text: impl Fn(&T)) -> anyhow::Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(report)?);
    } else {
        text(report);
    }
    Ok(())
}

/// What a boot (and optional snapshot) did.
#[derive(Serialize, Debug, Clone)]
pub struct BootReport {
    pub guest: &'static str,
    pub mem_mib: u64,
    pub vcpus: u32,
    pub backing: &'static str,
    /// Pages the guest's passes touch (its working set).
    pub working_set_pages: u64,
    pub passes: u64,
    pub run_ms: f64,
    /// Every pass's checksum matched and the guest saw no wrong word.
    pub verified: bool,
    pub console: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub snapshot_dir: Option<PathBuf>,
}

fn print_boot(r: &BootReport, dir: Option<&Path>) {
    println!(
        "{} guest, {} MiB ({}), {} vCPU(s): {} passes over {} pages in {:.0} ms, {}",
        r.guest,
        r.mem_mib,
        r.backing,
        r.vcpus,
        r.passes,
        r.working_set_pages,
        r.run_ms,
        if r.verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
    if !r.console.is_empty() {
        print!("console: {}", r.console);
    }
    if let (Some(d), Some(t)) = (dir, r.snapshot_ms) {
        println!("snapshot written to {} in {t:.0} ms", d.display());
    }
}

/// Boots a guest and runs it to `passes` (or to HLT for the halt guest).
pub fn boot_and_run(g: &GuestArgs) -> anyhow::Result<(Vm, BootReport)> {
    let mut vm = Vm::create(VmConfig {
        mem_bytes: g.mem,
        vcpus: g.vcpus,
        backing: g.backing,
    })?;
    let workload = Workload {
        kind: g.guest,
        seed: g.seed,
        shared_bytes: g.shared,
    };
    vm.boot(workload)?;
    let t = Instant::now();
    let timeout = Duration::from_secs(g.timeout_s);
    vm.start(Some(g.passes))?;
    if g.guest == WorkloadKind::Halt {
        let mut halted = 0;
        while halted < g.vcpus {
            if t.elapsed() > timeout {
                bail!("the guest did not halt within {timeout:?}");
            }
            if let Some(vmm::VmEvent::Halted(_)) = vm.next_event(Duration::from_millis(100))? {
                halted += 1;
            }
        }
    } else {
        vm.run_to_pass(t, timeout)?;
    }
    let report = BootReport {
        guest: g.guest.name(),
        mem_mib: g.mem >> 20,
        vcpus: g.vcpus,
        backing: g.backing.name(),
        working_set_pages: vm.plans().iter().map(|p| p.pages()).sum(),
        passes: if g.guest == WorkloadKind::Halt {
            0
        } else {
            g.passes
        },
        run_ms: ms(t.elapsed()),
        verified: true,
        console: vm.console.clone(),
        snapshot_ms: None,
        snapshot_dir: None,
    };
    Ok((vm, report))
}

/// What a restore did.
#[derive(Serialize, Debug, Clone)]
pub struct RestoreReport {
    pub mode: &'static str,
    pub guest: &'static str,
    pub mem_mib: u64,
    pub vcpus: usize,
    /// From the start of the restore until the vCPUs ran.
    pub resume_ms: f64,
    /// From the start of the restore until every vCPU had finished a full
    /// pass over its working set, i.e. every page it needs was present.
    pub working_set_ms: f64,
    /// From the start of the restore until the last verified pass.
    pub total_ms: f64,
    pub passes: u64,
    pub working_set_pages: u64,
    /// Every pass's checksum matched and the guest saw no wrong word.
    pub verified: bool,
    /// Working-set prefetch and recording (embedded; for `serve`, filled in
    /// from its --stats-json by the demo).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_prefetched: Option<u64>,
    /// Share of the prefetched pages the guest touched (estimated from
    /// samples), and faults outside the set.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_hit_rate: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults_outside_set: Option<u64>,
    /// From the start of the restore until the whole set was mapped.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prefetch_done_ms: Option<f64>,
    /// Pages recorded (with --record).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub recorded_pages: Option<u64>,
    /// Pages mapped without a fault asking for them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_unasked: Option<u64>,
    /// Page faults the pager read (embedded only; for `serve`, see its
    /// --stats-json).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_copied: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pages_zeroed: Option<u64>,
    /// Bytes copied into guest memory by this process (eager: the whole
    /// file; embedded: what the pager copied).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bytes_moved: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_p50_us: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fault_p99_us: Option<f64>,
}

fn print_restore(r: &RestoreReport) {
    println!(
        "{} restore of a {} MiB {} guest: resumed in {:.1} ms, working set present after {:.1} ms, {} passes {} in {:.0} ms",
        r.mode,
        r.mem_mib,
        r.guest,
        r.resume_ms,
        r.working_set_ms,
        r.passes,
        if r.verified { "verified" } else { "NOT verified" },
        r.total_ms
    );
    if let (Some(f), Some(c), Some(z)) = (r.faults, r.pages_copied, r.pages_zeroed) {
        println!(
            "pager: {f} faults, {c} pages copied, {z} zero pages mapped, {} mapped unasked",
            r.pages_unasked.unwrap_or(0)
        );
    }
    if let Some(p) = r.pages_prefetched {
        println!(
            "prefetch: {p} pages, whole set mapped after {} ms, {} of it touched (sampled), {} faults outside it",
            r.prefetch_done_ms.map_or("-".into(), |v| format!("{v:.1}")),
            r.prefetch_hit_rate.map_or("-".into(), |v| format!("{:.0}%", v * 100.0)),
            r.faults_outside_set.unwrap_or(0)
        );
    }
    if let Some(n) = r.recorded_pages {
        println!("recorded: {n} pages");
    }
}

pub fn resolve_state(p: &Path) -> PathBuf {
    if p.is_dir() {
        p.join("state.json")
    } else {
        p.to_path_buf()
    }
}

/// Restores, runs `passes` more verified passes and reports.
pub fn restore(a: &RestoreArgs) -> anyhow::Result<RestoreReport> {
    let state_path = resolve_state(&a.state);
    if (a.record.is_some() || a.prefetch.is_some()) && a.mode != "embedded" {
        bail!(
            "--record and --prefetch apply to --mode embedded; for --mode serve, give them to \
             `pagewire serve`"
        );
    }
    if a.record.is_some() && a.prefetch.is_some() {
        bail!("--record and --prefetch together: a prefetched page makes no fault, so the recording would miss the set");
    }
    if a.source.is_some() && a.mode != "embedded" {
        bail!("--source applies to --mode embedded; for --mode serve, give it to `pagewire serve`");
    }
    let state = vmm::VmState::load(&state_path)?;
    let mem_path = state.memory_path(&state_path);
    let source = match &a.source {
        Some(u) => {
            let url = server::SourceUrl::parse(u)?;
            let cache = server::CacheOptions {
                cache_dir: crate::serve::default_cache_dir(),
                ..server::CacheOptions::default()
            };
            Some(server::source::open(&url, &cache)?.source)
        }
        None => None,
    };
    let snapshot = match (&a.record, &a.prefetch, &source) {
        (None, None, _) => None,
        (_, _, Some(s)) => Some(server::sets::source_snapshot_id(&**s)?),
        _ => Some(crate::sets::snapshot_id(&mem_path)?),
    };
    let prefetch = match (&a.prefetch, &snapshot) {
        (Some(p), Some(id)) => Some(crate::sets::load(p, id)?.0),
        _ => None,
    };
    let mode = match a.mode.as_str() {
        "eager" => RestoreMode::Eager,
        "embedded" => RestoreMode::Embedded(EmbeddedOptions {
            source,
            threads: a.threads,
            cluster_pages: a.cluster_pages,
            adaptive_cluster: !a.fixed_cluster,
            background: a.background,
            record: a.record.as_ref().map(|_| a.recording.config()),
            prefetch,
            ..EmbeddedOptions::default()
        }),
        "serve" => RestoreMode::External {
            socket: a
                .socket
                .clone()
                .context("--mode serve needs --socket (where `pagewire serve` listens)")?,
        },
        other => bail!("--mode {other:?}: expected eager, embedded or serve"),
    };
    let start_pass = state.last_pass().map_or(0, |p| p + 1);
    let target = start_pass + a.passes.max(1) - 1;
    let mut r = vmm::restore(&state_path, &mode, Some(target))
        .with_context(|| format!("restoring {}", state_path.display()))?;
    let progress =
        r.vm.run_to_pass(r.started, Duration::from_secs(a.timeout_s))?;
    // The start-up phase is over once every vCPU has finished a pass: what
    // the guest touches later is not its start-up working set.
    let recorded = match (&a.record, snapshot) {
        (Some(out), Some(id)) => {
            r.end_recording();
            let rec = r.recording().context("the pager recorded nothing")?;
            Some(crate::sets::save(&rec, id, out)?.touches.len() as u64)
        }
        _ => None,
    };
    let working_set = progress
        .first_report
        .iter()
        .map(|d| d.unwrap_or(progress.elapsed))
        .max()
        .unwrap_or(progress.elapsed);
    let working_set_pages = r.vm.plans().iter().map(|p| p.pages()).sum();
    let resume = r.resume_time;
    let eager_bytes = r.eager_bytes;
    let total = progress.elapsed;
    let stats = r.finish()?;
    Ok(RestoreReport {
        mode: mode.name(),
        guest: state.workload.kind.name(),
        mem_mib: state.memory.bytes >> 20,
        vcpus: state.vcpus.len(),
        resume_ms: ms(resume),
        working_set_ms: ms(working_set),
        total_ms: ms(total),
        passes: a.passes.max(1),
        working_set_pages,
        verified: true,
        pages_prefetched: stats
            .as_ref()
            .filter(|s| s.pages_prefetched > 0 || a.prefetch.is_some())
            .map(|s| s.pages_prefetched),
        prefetch_hit_rate: stats.as_ref().and_then(|s| s.prefetch_hit_rate()),
        faults_outside_set: stats
            .as_ref()
            .filter(|_| a.prefetch.is_some())
            .map(|s| s.faults_outside_set),
        prefetch_done_ms: stats.as_ref().and_then(|s| s.prefetch_done_ms),
        recorded_pages: recorded,
        pages_unasked: stats.as_ref().map(|s| s.pages_unasked),
        faults: stats.as_ref().map(|s| s.faults),
        pages_copied: stats.as_ref().map(|s| s.pages_copied),
        pages_zeroed: stats.as_ref().map(|s| s.pages_zeroed),
        bytes_moved: match &mode {
            RestoreMode::Eager => eager_bytes,
            _ => stats.as_ref().map(|s| s.bytes_copied),
        },
        fault_p50_us: stats.as_ref().map(|s| s.first_touch_latency.p50_us),
        fault_p99_us: stats.as_ref().map(|s| s.first_touch_latency.p99_us),
    })
}
