//! The same work against several page-fault handlers in one run, with the
//! physical baselines measured alongside (`pagewire bench`).
//!
//! A memory file is generated (or given); then, for each handler, a client
//! process (`pagewire fc-client`) performs Firecracker's handshake, touches
//! the memory in the chosen pattern and checks every byte. Handlers:
//! - `serve`: `pagewire serve` in its own process (the Firecracker layout);
//! - `embedded`: the engine inside the client process (a VMM linking `pager`);
//! - `floor`: `pagewire bench-floor`, one page per fault on one thread with
//!   the file already in memory: the kernel mechanism with nothing added;
//! - `image-lz4`, `image-zstd`, `image-none`: `serve --source image://`, the
//!   memory file packed into a pagewire image first (timed: the report
//!   gives each codec's ratio and pack speed);
//! - any `--handler-cmd 'CMD {socket} {mem_file}'`.
//!
//! [`run`] drives the `pagewire` binary named in [`Config::exe`] (its
//! `serve`, `bench-floor` and `fc-client` commands) and returns the
//! [`Report`]; [`Table`] prints it as the table. [`floor`] is the floor
//! handler itself.

use std::fmt;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::{bail, chain, ensure, Context as _, Error, Mapping, TempDir};

mod migrate;
#[cfg(feature = "s3")]
mod s3;

pub use migrate::{mode_args, run_migrate, MigrateConfig, MigrateReport, MigrateTable};

pub use testbed::Result;

/// What to run: the `pagewire bench` flags, one field each (the binary
/// fills it from them), and the binary to run.
#[derive(Clone, Debug)]
pub struct Config {
    /// The `pagewire` binary whose `serve`, `bench-floor` and `fc-client`
    /// run the handlers and the clients.
    pub exe: PathBuf,
    /// Guest memory size (K, M, G suffixes).
    pub size: u64,
    /// Access pattern: seq, random, strided, hotset, trace:FILE.
    pub pattern: String,
    /// Client threads touching memory at once.
    pub threads: usize,
    /// Handlers to compare, comma separated: serve, embedded, floor, and
    /// serve-ws, embedded-ws (with a recorded working set, see --prefetch).
    pub handlers: Vec<String>,
    /// Another handler to compare: a shell command in which {socket} and
    /// {mem_file} are replaced; it must listen on {socket} and speak
    /// Firecracker's UFFD handshake. May be given several times.
    pub handler_cmd: Vec<String>,
    /// Pages served around each fault by serve and embedded.
    pub cluster_pages: usize,
    /// Background population in serve and embedded.
    pub background: bool,
    /// Keep the fault-around window of serve and embedded at
    /// --cluster-pages instead of following the guest.
    pub fixed_cluster: bool,
    /// serve and embedded prefetch this recorded working set (`.pwws`,
    /// recorded on the same memory file: give --mem-file, or the generated
    /// file of the same --size and --zero-every). Without it, the handlers
    /// `serve-ws` and `embedded-ws` prefetch a recording that `serve`
    /// makes of one untimed run of the same pattern first.
    pub prefetch: Option<PathBuf>,
    /// Serving threads for serve and embedded.
    pub serve_threads: usize,
    /// Use this memory file instead of generating one.
    pub mem_file: Option<PathBuf>,
    /// In the generated file, every Nth page is zero (0: none).
    pub zero_every: usize,
    /// What the generated file holds: `random` (incompressible pages) or
    /// `mixed` (records and text, one page in 8 random: compressible).
    pub content: String,
    /// Also pack this many clones of the memory file, each with
    /// `clone_change` of its pages changed (chosen at random, new content
    /// of the same kind), against the file's lz4 image as their base, and
    /// report the bytes stored against the base's (0: none).
    pub clones: usize,
    /// Share of a clone's pages changed (0..=1).
    pub clone_change: f64,
    /// Where the `s3-*` handlers push their images, `s3://BUCKET/PREFIX`
    /// (endpoint, region and keys from the AWS environment); default: a
    /// local `moto_server` the bench starts.
    pub s3: Option<String>,
    /// `s3-stall`: the delay added to every fetch of the cold image.
    pub s3_delay_ms: u64,
    /// Run every handler this many times, interleaved (round by round),
    /// and add a summary of medians: on a noisy machine one run's figures
    /// can be off by 2x, and ratios are only fair within a round.
    pub runs: usize,
}

#[derive(Debug, Serialize)]
struct Baselines {
    memcpy_gib_s: f64,
    zero_fill_gib_s: f64,
    /// The copy ceiling: one thread doing nothing but UFFDIO_COPY of 1 MiB
    /// pieces into registered memory.
    uffd_copy_gib_s: f64,
    /// The same, one 4 KiB page per UFFDIO_COPY: the ceiling for pages
    /// that are not next to each other (a sparse working set).
    uffd_copy_4k_gib_s: f64,
}

#[derive(Debug, Serialize, Default)]
struct Row {
    handler: String,
    /// The round this run belongs to (from 1).
    run: usize,
    ok: bool,
    error: Option<String>,
    wall_ms: f64,
    gib_s: f64,
    p50_us: f64,
    p99_us: f64,
    max_us: f64,
    /// Loads that waited for the handler (slower than 5 µs): how many, and
    /// their p99.
    waited: u64,
    waited_p99_us: f64,
    faults: Option<u64>,
    pages_copied: Option<u64>,
    pages_zeroed: Option<u64>,
    handler_cpu_ms: Option<f64>,
    /// The client's memory made resident by the touch phase, MiB (the
    /// engine's own buffers too, when embedded).
    resident_mib: Option<f64>,
    /// Bytes touched, MiB.
    touched_mib: f64,
    mismatched_pages: u64,
}

/// A bench run: the settings, the baselines, every handler's rows and,
/// with several runs, their medians.
#[derive(Debug, Serialize)]
pub struct Report {
    size: u64,
    pattern: String,
    threads: usize,
    cluster_pages: usize,
    background: bool,
    baselines: Baselines,
    runs: usize,
    /// The memory file packed for the `image-*` handlers.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    packs: Vec<Pack>,
    /// Clones packed against the memory file's image (`--clones`).
    #[serde(skip_serializing_if = "Option::is_none")]
    clones: Option<Clones>,
    results: Vec<Row>,
    /// With more than one run: each handler's medians.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    summary: Vec<Summary>,
}

/// The memory file packed into an image, as `image pack --json` said.
#[derive(Debug, Serialize, Clone)]
struct Pack {
    codec: String,
    path: PathBuf,
    mem_mib: f64,
    image_mib: f64,
    ratio: f64,
    pack_mib_s: f64,
}

/// `--clones`: a base image and clones packed against it.
#[derive(Debug, Serialize, Clone)]
struct Clones {
    count: usize,
    changed: f64,
    base_bytes: u64,
    /// Every clone image, in bytes.
    clone_bytes: Vec<u64>,
    /// (base + clones) / base.
    total_over_base: f64,
}

/// A handler's figures over its successful runs: medians, with the range of
/// throughput; ratios are taken within each round, then their median.
#[derive(Debug, Serialize)]
struct Summary {
    handler: String,
    runs_ok: usize,
    gib_s_median: f64,
    gib_s_min: f64,
    gib_s_max: f64,
    p99_us_median: f64,
    waited_p99_us_median: f64,
    /// Resident memory after the touch, MiB (median).
    resident_mib_median: Option<f64>,
    /// Throughput over the floor's in the same round.
    x_floor_median: Option<f64>,
    /// The loads that waited, p99, over the floor's p50 in the same round
    /// (the background-population target).
    waited_p99_over_floor_p50_median: Option<f64>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn summarize(rows: &[Row]) -> Vec<Summary> {
    let mut names: Vec<&str> = Vec::new();
    for r in rows {
        if !names.contains(&r.handler.as_str()) {
            names.push(&r.handler);
        }
    }
    let floor_of = |run: usize| {
        rows.iter()
            .find(|f| f.run == run && f.handler == "floor" && f.ok)
    };
    names
        .into_iter()
        .map(|name| {
            let ok: Vec<&Row> = rows.iter().filter(|r| r.handler == name && r.ok).collect();
            let pick = |f: &dyn Fn(&Row) -> f64| median(ok.iter().map(|r| f(r)).collect());
            let ratio = |f: &dyn Fn(&Row, &Row) -> Option<f64>| {
                let v: Vec<f64> = ok
                    .iter()
                    .filter_map(|r| floor_of(r.run).and_then(|fl| f(r, fl)))
                    .collect();
                (!v.is_empty() && name != "floor").then(|| median(v))
            };
            let gib: Vec<f64> = ok.iter().map(|r| r.gib_s).collect();
            Summary {
                handler: name.to_string(),
                runs_ok: ok.len(),
                gib_s_median: median(gib.clone()),
                gib_s_min: gib.iter().copied().fold(f64::NAN, f64::min),
                gib_s_max: gib.iter().copied().fold(f64::NAN, f64::max),
                p99_us_median: pick(&|r| r.p99_us),
                waited_p99_us_median: pick(&|r| r.waited_p99_us),
                resident_mib_median: {
                    let v: Vec<f64> = ok.iter().filter_map(|r| r.resident_mib).collect();
                    (!v.is_empty()).then(|| median(v))
                },
                x_floor_median: ratio(&|r, fl| (fl.gib_s > 0.0).then(|| r.gib_s / fl.gib_s)),
                waited_p99_over_floor_p50_median: ratio(&|r, fl| {
                    (fl.p50_us > 0.0 && r.waited > 0).then(|| r.waited_p99_us / fl.p50_us)
                }),
            }
        })
        .collect()
}

impl Report {
    /// Every run of every handler succeeded and served the right bytes.
    pub fn all_ok(&self) -> bool {
        self.results.iter().all(|r| r.ok)
    }
}

/// Generates the memory file (unless given), measures the baselines, and
/// runs every handler `runs` times, round by round. A handler that fails
/// makes a row with its error, not an error of the run.
pub fn run(args: &Config) -> Result<Report> {
    ensure!(args.runs >= 1, "--runs must be at least 1");
    let exe = args.exe.clone();
    let dir = TempDir::new()?;
    let mem = match &args.mem_file {
        Some(p) => p.clone(),
        None => {
            let p = dir.path().join("mem");
            match args.content.as_str() {
                "random" => testbed::generate(&p, args.size, args.zero_every)?,
                "mixed" => testbed::generate_mixed(&p, args.size, args.zero_every)?,
                other => bail!("--content {other:?}: expected random or mixed"),
            }
            p
        }
    };
    let mut packs = Vec::new();
    let wants_s3 = args.handlers.iter().any(|h| h.starts_with("s3-"));
    let clones = match args.clones {
        0 => None,
        n => Some(clones(&exe, &mem, dir.path(), n, args.clone_change)?),
    };
    for h in &args.handlers {
        let codec = match h.strip_prefix("image-") {
            Some(c) => Some(c),
            None => h.starts_with("s3-").then_some("lz4"),
        };
        if let Some(codec) = codec {
            if !packs.iter().any(|p: &Pack| p.codec == codec) {
                packs.push(pack(&exe, &mem, dir.path(), codec)?);
            }
        }
    }
    #[cfg(feature = "s3")]
    let mut s3 = match packs.iter().find(|p| p.codec == "lz4") {
        Some(p) if wants_s3 => Some(s3::S3::setup(&exe, dir.path(), args, &p.path, p.mem_mib)?),
        _ => None,
    };
    #[cfg(not(feature = "s3"))]
    ensure!(
        !wants_s3,
        "the s3 handlers need a pagewire built with the `s3` cargo feature"
    );
    let baselines = Baselines {
        memcpy_gib_s: memcpy_gib_s(args.size as usize),
        zero_fill_gib_s: zero_fill_gib_s(args.size as usize),
        uffd_copy_gib_s: uffd_copy_gib_s(args.size as usize, 1 << 20)?,
        uffd_copy_4k_gib_s: uffd_copy_gib_s(args.size as usize, 4096)?,
    };
    let wants_set = args.handlers.iter().any(|h| h.ends_with("-ws"));
    let recorded = match (&args.prefetch, wants_set) {
        (Some(p), _) => Some(p.clone()),
        (None, true) => Some(record_set(&exe, dir.path(), &mem, args)?),
        (None, false) => None,
    };
    let mut results = Vec::new();
    for run in 1..=args.runs {
        for h in &args.handlers {
            let ws = || recorded.as_deref().context("no working set");
            let row = match h.as_str() {
                "serve" | "floor" => external(
                    &exe,
                    dir.path(),
                    &mem,
                    args,
                    h,
                    None,
                    args.prefetch.as_deref(),
                    None,
                    Via::default(),
                ),
                "serve-ws" => ws().and_then(|w| {
                    external(
                        &exe,
                        dir.path(),
                        &mem,
                        args,
                        "serve",
                        None,
                        Some(w),
                        None,
                        Via::default(),
                    )
                    .map(|r| Row {
                        handler: h.clone(),
                        ..r
                    })
                }),
                image if image.starts_with("image-") => {
                    let codec = &image["image-".len()..];
                    packs
                        .iter()
                        .find(|p| p.codec == codec)
                        .context("no image packed")
                        .and_then(|p| {
                            let url = format!("image://{}", p.path.display());
                            let via = Via {
                                source: Some(&url),
                                ..Via::default()
                            };
                            via.run(&exe, dir.path(), &mem, args, h)
                        })
                }
                #[cfg(feature = "s3")]
                "s3-cold" | "s3-warm" | "s3-get" | "s3-stall" => {
                    let Some(s3) = s3.as_mut() else {
                        return Err(Error::Invalid("no S3 image".into()));
                    };
                    let rows = match h.as_str() {
                        "s3-cold" => s3.cold(&exe, dir.path(), &mem, args, run).map(|r| vec![r]),
                        "s3-warm" => s3.warm(&exe, dir.path(), &mem, args).map(|r| vec![r]),
                        "s3-get" => s3.get_loop(&exe).map(|r| vec![r]),
                        _ => s3.stall(&exe, dir.path(), &mem, args, run),
                    };
                    match rows {
                        Ok(rows) => {
                            results.extend(rows.into_iter().map(|r| Row { run, ..r }));
                            continue;
                        }
                        Err(e) => Err(e),
                    }
                }
                "embedded" => embedded(&exe, &mem, args, args.prefetch.as_deref()),
                "embedded-ws" => ws().and_then(|w| {
                    embedded(&exe, &mem, args, Some(w)).map(|r| Row {
                        handler: h.clone(),
                        ..r
                    })
                }),
                other => Err(Error::Invalid(format!(
                    "unknown handler {other:?} (serve, embedded, floor, serve-ws, embedded-ws, \
                     image-lz4, image-zstd, image-none, s3-cold, s3-warm, s3-get, s3-stall)"
                ))),
            };
            results.push(Row {
                run,
                ..row.unwrap_or_else(|e| failed(h, e))
            });
        }
        for (i, cmd) in args.handler_cmd.iter().enumerate() {
            let name = format!("cmd{}", i + 1);
            let row = external(
                &exe,
                dir.path(),
                &mem,
                args,
                &name,
                Some(cmd),
                None,
                None,
                Via::default(),
            );
            results.push(Row {
                run,
                ..row.unwrap_or_else(|e| failed(&name, e))
            });
        }
    }
    let summary = if args.runs > 1 {
        summarize(&results)
    } else {
        Vec::new()
    };
    let report = Report {
        size: args.size,
        pattern: args.pattern.clone(),
        threads: args.threads,
        cluster_pages: args.cluster_pages,
        background: args.background,
        baselines,
        runs: args.runs,
        packs,
        clones,
        results,
        summary,
    };
    Ok(report)
}

/// Packs `mem` with `codec` through `pagewire image pack`, timed.
fn pack(exe: &Path, mem: &Path, dir: &Path, codec: &str) -> Result<Pack> {
    let out = dir.join(format!("mem-{codec}.pwimg"));
    let o = Command::new(exe)
        .arg("image")
        .arg("pack")
        .arg(mem)
        .arg("-o")
        .arg(&out)
        .args(["--codec", codec, "--json"])
        .stdin(Stdio::null())
        .output()
        .context("running image pack")?;
    ensure!(
        o.status.success(),
        "image pack --codec {codec} failed: {}",
        String::from_utf8_lossy(&o.stderr).trim()
    );
    let r: serde_json::Value = serde_json::from_slice(&o.stdout).context("image pack's report")?;
    let mib = |v: &serde_json::Value| v.as_f64().unwrap_or(0.0) / (1u64 << 20) as f64;
    let (mem_mib, image_mib) = (mib(&r["mem_len"]), mib(&r["image_len"]));
    Ok(Pack {
        codec: codec.to_string(),
        path: out,
        mem_mib,
        image_mib,
        ratio: mem_mib / image_mib.max(1e-9),
        pack_mib_s: mem_mib / r["seconds"].as_f64().unwrap_or(f64::NAN),
    })
}

/// Packs the memory file (lz4) as a base and `n` clones of it against it,
/// each with `change` of its pages rewritten (seeded: the same clones
/// every run).
fn clones(exe: &Path, mem: &Path, dir: &Path, n: usize, change: f64) -> Result<Clones> {
    ensure!(
        (0.0..=1.0).contains(&change),
        "--clone-change must be within 0..=1"
    );
    let base = dir.join("clone-base.pwimg");
    let packed = |m: &Path, out: &Path, extra: &[&str]| -> Result<u64> {
        let o = Command::new(exe)
            .arg("image")
            .arg("pack")
            .arg(m)
            .arg("-o")
            .arg(out)
            .args(extra)
            .stdin(Stdio::null())
            .output()
            .context("running image pack")?;
        ensure!(
            o.status.success(),
            "image pack failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        );
        Ok(std::fs::metadata(out).context("the packed image")?.len())
    };
    let base_bytes = packed(mem, &base, &[])?;
    let data = std::fs::read(mem).context("reading the memory file")?;
    let pages = data.len() / 4096;
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut clone_bytes = Vec::new();
    let clone_mem = dir.join("clone.mem");
    let base_arg = base.to_string_lossy().into_owned();
    for i in 0..n {
        let mut c = data.clone();
        let k = (pages as f64 * change).round() as usize;
        for _ in 0..k {
            let p = (next() % pages.max(1) as u64) as usize;
            // New content of the kind the page had: a copy of another page
            // with its first word changed (zero pages stay zero-ish).
            let from = (next() % pages.max(1) as u64) as usize;
            let (src, dst) = (from * 4096, p * 4096);
            let page: Vec<u8> = data[src..src + 4096].to_vec();
            c[dst..dst + 4096].copy_from_slice(&page);
            c[dst..dst + 8].copy_from_slice(&next().to_le_bytes());
        }
        std::fs::write(&clone_mem, &c).context("writing a clone")?;
        let out = dir.join(format!("clone-{i}.pwimg"));
        clone_bytes.push(packed(&clone_mem, &out, &["--base", &base_arg])?);
        let _ = std::fs::remove_file(&out);
    }
    let _ = std::fs::remove_file(&clone_mem);
    let total: u64 = base_bytes + clone_bytes.iter().sum::<u64>();
    Ok(Clones {
        count: n,
        changed: change,
        base_bytes,
        clone_bytes,
        total_over_base: total as f64 / base_bytes.max(1) as f64,
    })
}

impl Via<'_> {
    fn run(&self, exe: &Path, dir: &Path, mem: &Path, args: &Config, name: &str) -> Result<Row> {
        external(exe, dir, mem, args, name, None, None, None, *self)
    }
}

fn failed(handler: &str, e: Error) -> Row {
    Row {
        handler: handler.to_string(),
        error: Some(chain(&e)),
        ..Row::default()
    }
}

/// A report as the table `pagewire bench` prints.
pub struct Table<'a>(pub &'a Report);

impl fmt::Display for Table<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        writeln!(
            f,
            "pagewire bench: {} MiB, pattern {}, {} client thread(s), cluster {} pages{}",
            r.size >> 20,
            r.pattern,
            r.threads,
            r.cluster_pages,
            if r.background { ", background" } else { "" }
        )?;
        writeln!(
            f,
            "baselines: memcpy {:.2} GiB/s, kernel zero-fill faults {:.2} GiB/s, copy ceiling \
         (UFFDIO_COPY of 1 MiB pieces, one thread) {:.2} GiB/s",
            r.baselines.memcpy_gib_s, r.baselines.zero_fill_gib_s, r.baselines.uffd_copy_gib_s
        )?;
        if let Some(c) = &r.clones {
            writeln!(
                f,
                "{} clones, {:.0}% of pages changed each: base image {:.1} MiB, clones {:.1} MiB \
                 in all, base + clones = {:.2}x the base",
                c.count,
                c.changed * 100.0,
                c.base_bytes as f64 / (1u64 << 20) as f64,
                c.clone_bytes.iter().sum::<u64>() as f64 / (1u64 << 20) as f64,
                c.total_over_base
            )?;
        }
        for p in &r.packs {
            writeln!(
                f,
                "image {}: {:.0} MiB of memory in {:.1} MiB ({:.2}x), packed at {:.0} MiB/s",
                p.codec, p.mem_mib, p.image_mib, p.ratio, p.pack_mib_s
            )?;
        }
        if let Some(row) = r.results.iter().find(|x| x.ok) {
            let ms = |gib_s: f64| row.touched_mib / 1024.0 / gib_s * 1000.0;
            if r.baselines.uffd_copy_gib_s > 0.0 && r.baselines.uffd_copy_4k_gib_s > 0.0 {
                writeln!(
                    f,
                    "copy ceiling for the {:.1} MiB touched: {:.1} ms in 1 MiB pieces, {:.1} ms a \
                 4 KiB page at a time ({:.2} GiB/s)",
                    row.touched_mib,
                    ms(r.baselines.uffd_copy_gib_s),
                    ms(r.baselines.uffd_copy_4k_gib_s),
                    r.baselines.uffd_copy_4k_gib_s
                )?;
            }
        }
        let runs = r.runs > 1;
        writeln!(f, "{:<10}{} {:>9} {:>7} {:>9} {:>9} {:>9} {:>8} {:>10} {:>8} {:>8} {:>8} {:>9} {:>13}  verified",
        "handler",
        if runs { " run" } else { "" },
        "wall ms",
        "GiB/s",
        "p50 us",
        "p99 us",
        "max us",
        "waited",
        "wait p99",
        "faults",
        "copied",
        "zeroed",
        "cpu ms",
        "rss/touched"
    )?;
        let opt = |v: Option<u64>| v.map_or("-".to_string(), |v| v.to_string());
        for row in &r.results {
            let run = if runs {
                format!(" {:>3}", row.run)
            } else {
                String::new()
            };
            if let Some(e) = &row.error {
                writeln!(f, "{:<10}{run} failed: {e}", row.handler)?;
                continue;
            }
            writeln!(f, "{:<10}{run} {:>9.1} {:>7.3} {:>9.1} {:>9.1} {:>9.1} {:>8} {:>10.1} {:>8} {:>8} {:>8} {:>9} {:>13}  {}",
            row.handler,
            row.wall_ms,
            row.gib_s,
            row.p50_us,
            row.p99_us,
            row.max_us,
            row.waited,
            row.waited_p99_us,
            opt(row.faults),
            opt(row.pages_copied),
            opt(row.pages_zeroed),
            row.handler_cpu_ms
                .map_or("-".to_string(), |v| format!("{v:.0}")),
            row.resident_mib.map_or("-".to_string(), |v| format!(
                "{v:.0}/{:.0} MiB",
                row.touched_mib
            )),
            if row.mismatched_pages == 0 {
                "yes"
            } else {
                "NO"
            }
        )?;
        }
        if !r.summary.is_empty() {
            writeln!(
                f,
                "\nmedians of {} runs (ratios within each round, then their median)",
                r.runs
            )?;
            writeln!(
                f,
                "{:<10} {:>4} {:>7} {:>15} {:>9} {:>10} {:>8} {:>17} {:>8}",
                "handler",
                "ok",
                "GiB/s",
                "GiB/s range",
                "p99 us",
                "wait p99",
                "x floor",
                "wait p99/floor p50",
                "rss MiB"
            )?;
            let x = |v: Option<f64>| v.map_or("-".to_string(), |v| format!("{v:.2}"));
            for s in &r.summary {
                writeln!(
                    f,
                    "{:<10} {:>4} {:>7.3} {:>15} {:>9.1} {:>10.1} {:>8} {:>17} {:>8}",
                    s.handler,
                    s.runs_ok,
                    s.gib_s_median,
                    format!("{:.3}-{:.3}", s.gib_s_min, s.gib_s_max),
                    s.p99_us_median,
                    s.waited_p99_us_median,
                    x(s.x_floor_median),
                    x(s.waited_p99_over_floor_p50_median),
                    s.resident_mib_median
                        .map_or("-".to_string(), |v| format!("{v:.0}")),
                )?;
            }
            return Ok(());
        }
        if let (Some(fl), Some(s)) = (
            r.results.iter().find(|x| x.handler == "floor" && x.ok),
            r.results.iter().find(|x| x.handler == "serve" && x.ok),
        ) {
            if fl.gib_s > 0.0 {
                writeln!(f, "serve / floor throughput: {:.1}x", s.gib_s / fl.gib_s)?;
            }
        }
        Ok(())
    }
}

fn memcpy_gib_s(size: usize) -> f64 {
    let src = vec![0x5Au8; size];
    let mut dst = vec![0u8; size];
    dst.iter_mut().step_by(4096).for_each(|b| *b = 1); // populate
    let mut best = f64::MAX;
    for _ in 0..3 {
        let t = Instant::now();
        dst.copy_from_slice(std::hint::black_box(&src));
        best = best.min(t.elapsed().as_secs_f64());
    }
    std::hint::black_box(&dst);
    size as f64 / best / (1u64 << 30) as f64
}

/// The copy ceiling: one thread mapping `size` bytes of registered memory
/// with UFFDIO_COPY in pieces of `piece` bytes, nothing else (no faults, no
/// reads).
fn uffd_copy_gib_s(size: usize, piece: usize) -> Result<f64> {
    const PIECE: usize = 1 << 20;
    let piece = piece.clamp(4096, PIECE);
    let mem = Mapping::new(size)?;
    let uffd = uffd::Uffd::open().context("opening a userfaultfd for the copy ceiling")?;
    uffd.api(uffd::Features::empty())
        .context("UFFDIO_API for the copy ceiling")?;
    uffd.register(mem.addr(), size, uffd::RegisterMode::MISSING)
        .context("registering memory for the copy ceiling")?;
    let src: Vec<u8> = (0..PIECE).map(|i| (i % 251) as u8 | 1).collect();
    let t = Instant::now();
    for off in (0..size).step_by(piece) {
        let len = piece.min(size - off);
        uffd.copy(
            mem.addr() + off as u64,
            &src[..len],
            uffd::CopyMode::empty(),
        )
        .context("UFFDIO_COPY for the copy ceiling")?;
    }
    let s = t.elapsed().as_secs_f64();
    Ok(size as f64 / s / (1u64 << 30) as f64)
}

/// First touch of fresh anonymous memory: the kernel's zero-fill faults.
fn zero_fill_gib_s(size: usize) -> f64 {
    // A large zeroed allocation comes straight from mmap: untouched pages.
    let mut v = vec![0u8; size];
    let t = Instant::now();
    for i in (0..size).step_by(4096) {
        v[i] = 1;
    }
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(&v);
    size as f64 / s / (1u64 << 30) as f64
}

/// How `serve` gets its bytes in a run: from `source` (a `--source` URL;
/// then any handler whose name is not `floor` or a command is a `serve`),
/// with `env` added to its environment and `extra` flags.
#[derive(Default, Clone, Copy)]
struct Via<'a> {
    source: Option<&'a str>,
    env: &'a [(String, String)],
    extra: &'a [String],
}

/// Runs the client against a handler in its own process; for `serve`,
/// with a working set to prefetch or a directory to record one into, and
/// its bytes as `via` says.
#[allow(clippy::too_many_arguments)]
fn external(
    exe: &Path,
    dir: &Path,
    mem: &Path,
    args: &Config,
    name: &str,
    cmd: Option<&String>,
    prefetch: Option<&Path>,
    record: Option<&Path>,
    via: Via<'_>,
) -> Result<Row> {
    let Via { source, env, extra } = via;
    let socket = dir.join(format!("{name}.sock"));
    let stats = dir.join(format!("{name}.stats"));
    let _ = std::fs::remove_file(&socket);
    let _ = std::fs::remove_file(&stats);
    let kind = if source.is_some() { "serve" } else { name };
    let mut handler = match (kind, cmd) {
        ("serve", _) => {
            let mut c = Command::new(exe);
            c.arg("serve").arg("--socket").arg(&socket);
            match source {
                Some(url) => c.arg("--source").arg(url),
                None => c.arg("--mem-file").arg(mem),
            };
            c.envs(env.iter().map(|(k, v)| (k, v))).args(extra);
            c.arg("--stats-json")
                .arg(&stats)
                .args(["--exit-after", "1", "--threads"])
                .arg(args.serve_threads.to_string())
                .arg("--cluster-pages")
                .arg(args.cluster_pages.to_string());
            engine_flags(&mut c, args, prefetch);
            if let Some(d) = record {
                c.arg("--record").arg(d);
            }
            c
        }
        ("floor", _) => {
            let mut c = Command::new(exe);
            c.arg("bench-floor")
                .arg("--socket")
                .arg(&socket)
                .arg("--mem-file")
                .arg(mem)
                .arg("--stats-json")
                .arg(&stats);
            c
        }
        (_, Some(cmd)) => {
            let line = cmd
                .replace("{socket}", &socket.to_string_lossy())
                .replace("{mem_file}", &mem.to_string_lossy());
            let mut c = Command::new("sh");
            c.arg("-c").arg(format!("exec {line}"));
            c
        }
        (other, None) => bail!("unknown handler {other}"),
    };
    let mut child = handler
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting handler {name}"))?;
    testbed::wait_listening(&mut child, &socket, name)?;
    let client = client_command(exe, mem, args)
        .arg("--socket")
        .arg(&socket)
        .output()
        .context("running the client");
    // Our handlers exit when their VM ends; another is told to.
    if cmd.is_some() {
        let _ = rustix::process::kill_process(
            rustix::process::Pid::from_child(&child),
            rustix::process::Signal::TERM,
        );
    }
    let cpu_ms = wait_cpu_ms(&mut child, Duration::from_secs(20));
    let out = client?;
    let mut row = row_from_client(name, &out)?;
    row.handler_cpu_ms = cpu_ms;
    if let Ok(text) = std::fs::read_to_string(&stats) {
        if let Some(line) = text.lines().next() {
            let v: serde_json::Value = serde_json::from_str(line).context("handler stats")?;
            let st = if v.get("stats").is_some() {
                &v["stats"]
            } else {
                &v
            };
            row.faults = st["faults"].as_u64();
            row.pages_copied = st["pages_copied"].as_u64();
            row.pages_zeroed = st["pages_zeroed"].as_u64();
        }
    }
    Ok(row)
}

/// One untimed run of the pattern through `serve --record`: the working
/// set the `-ws` handlers prefetch.
fn record_set(exe: &Path, dir: &Path, mem: &Path, args: &Config) -> Result<PathBuf> {
    let rec = dir.join("recorded");
    let _ = std::fs::remove_dir_all(&rec);
    let row = external(
        exe,
        dir,
        mem,
        args,
        "serve",
        None,
        None,
        Some(&rec),
        Via::default(),
    )?;
    ensure!(row.ok, "the recording run failed: {:?}", row.error);
    testbed::find_recording(&rec)
}

fn embedded(exe: &Path, mem: &Path, args: &Config, prefetch: Option<&Path>) -> Result<Row> {
    let mut c = client_command(exe, mem, args);
    c.arg("--embedded")
        .arg("--serve-threads")
        .arg(args.serve_threads.to_string())
        .arg("--cluster-pages")
        .arg(args.cluster_pages.to_string());
    engine_flags(&mut c, args, prefetch);
    let out = c.output().context("running the embedded client")?;
    let mut row = row_from_client("embedded", &out)?;
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_default();
    row.handler_cpu_ms = r["handler_cpu_ms"].as_f64();
    let st = &r["handler_stats"];
    row.faults = st["faults"].as_u64();
    row.pages_copied = st["pages_copied"].as_u64();
    row.pages_zeroed = st["pages_zeroed"].as_u64();
    Ok(row)
}

/// The engine's tuning, for `serve` and the embedded client alike.
fn engine_flags(c: &mut Command, args: &Config, prefetch: Option<&Path>) {
    if args.background {
        c.arg("--background");
    }
    if args.fixed_cluster {
        c.arg("--fixed-cluster");
    }
    if let Some(p) = prefetch {
        c.arg("--prefetch").arg(p);
    }
}

fn client_command(exe: &Path, mem: &Path, args: &Config) -> Command {
    let mut c = Command::new(exe);
    c.arg("fc-client")
        .arg("--mem-file")
        .arg(mem)
        .arg("--pattern")
        .arg(&args.pattern)
        .arg("--threads")
        .arg(args.threads.to_string())
        .stdin(Stdio::null());
    c
}

fn row_from_client(name: &str, out: &std::process::Output) -> Result<Row> {
    let r: serde_json::Value = serde_json::from_slice(&out.stdout).with_context(|| {
        format!(
            "the client's report is not JSON (exit {}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        )
    })?;
    let lat = &r["faults_latency"];
    let mismatched = r["mismatched_pages"].as_u64().unwrap_or(u64::MAX);
    let mib_s = r["touch_mib_per_s"].as_f64().unwrap_or(0.0);
    Ok(Row {
        handler: name.to_string(),
        ok: out.status.success() && mismatched == 0,
        error: (!out.status.success()).then(|| format!("client exited with {}", out.status)),
        wall_ms: r["touch_ms"].as_f64().unwrap_or(0.0),
        gib_s: mib_s / 1024.0,
        p50_us: lat["p50_us"].as_f64().unwrap_or(0.0),
        p99_us: lat["p99_us"].as_f64().unwrap_or(0.0),
        max_us: lat["max_us"].as_f64().unwrap_or(0.0),
        waited: r["waited_latency"]["samples"].as_u64().unwrap_or(0),
        waited_p99_us: r["waited_latency"]["p99_us"].as_f64().unwrap_or(0.0),
        resident_mib: r["resident_mib"].as_f64(),
        touched_mib: (r["pages_touched"].as_u64().unwrap_or(0)
            * r["page_size"].as_u64().unwrap_or(0)) as f64
            / (1u64 << 20) as f64,
        mismatched_pages: mismatched,
        ..Row::default()
    })
}

/// Waits for a handler to exit (killing it after `limit`) and returns the
/// CPU time it used, user + system, from wait4's rusage.
fn wait_cpu_ms(child: &mut Child, limit: Duration) -> Option<f64> {
    let deadline = Instant::now() + limit;
    loop {
        let mut status = 0;
        // SAFETY: an all-zero rusage is a valid value to be overwritten.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: waiting (without blocking) for our own child; both out
        // pointers are valid for writes.
        let pid = unsafe { libc::wait4(child.id() as i32, &mut status, libc::WNOHANG, &mut usage) };
        if pid > 0 {
            let ms = |t: libc::timeval| t.tv_sec as f64 * 1e3 + t.tv_usec as f64 / 1e3;
            return Some(ms(usage.ru_utime) + ms(usage.ru_stime));
        }
        if pid < 0 {
            return None;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The floor (`pagewire bench-floor`): one connection on `listener`
/// (bound at `socket`, removed once connected), one thread, one page per
/// fault, the memory file already in memory as `data`. Returns when the VM
/// hangs up, after writing `{faults, pages_copied}` to `stats_json`.
pub fn floor(
    data: &[u8],
    listener: UnixListener,
    socket: &Path,
    stats_json: Option<&Path>,
) -> Result<()> {
    let (stream, _) = listener.accept().context("accept")?;
    let (fc, uffd) = wire::firecracker::read_handshake(&stream, Duration::from_secs(5), 1 << 20)
        .map_err(|e| Error::Failed(format!("handshake: {e}")))?;
    let regions = wire::firecracker::to_regions(&fc, data.len() as u64, usize::MAX)
        .map_err(|e| Error::Failed(format!("handshake: {e}")))?;
    let _ = std::fs::remove_file(socket);
    let mut faults = 0u64;
    let mut copied = 0u64;
    let mut events = Vec::with_capacity(uffd::MAX_BATCH);
    loop {
        let mut fds = [
            rustix::event::PollFd::new(&uffd, rustix::event::PollFlags::IN),
            rustix::event::PollFd::new(&stream, rustix::event::PollFlags::RDHUP),
        ];
        match rustix::event::poll(&mut fds, None) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => bail!("poll: {e}"),
        }
        if !fds[1].revents().is_empty() {
            break; // the VM hung up
        }
        events.clear();
        uffd.read_events(&mut events, 1)
            .context("reading the userfaultfd")?;
        for ev in events.drain(..) {
            let uffd::Event::PageFault { address, .. } = ev else {
                continue;
            };
            faults += 1;
            let Some(r) = regions.iter().find(|r| r.contains(address)) else {
                continue;
            };
            let ps = r.page_bytes();
            let page = address & !(ps - 1);
            let off = (r.source_offset + page - r.host_base) as usize;
            loop {
                match uffd.copy(page, &data[off..off + ps as usize], uffd::CopyMode::empty()) {
                    Ok(_) => {
                        copied += 1;
                        break;
                    }
                    Err(uffd::Error::Exists { .. }) => {
                        let _ = uffd.wake(page, ps as usize);
                        break;
                    }
                    Err(uffd::Error::EventsPending { .. }) => {
                        let mut drained = Vec::with_capacity(uffd::MAX_BATCH);
                        let _ = uffd.read_events(&mut drained, uffd::MAX_BATCH);
                        std::thread::yield_now();
                    }
                    Err(e) => bail!("copy: {e}"),
                }
            }
        }
    }
    if let Some(p) = stats_json {
        std::fs::write(
            p,
            format!("{{\"faults\":{faults},\"pages_copied\":{copied}}}\n"),
        )
        .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}
