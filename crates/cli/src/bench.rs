//! `pagewire bench` and `pagewire bench-floor`: the command line of the
//! `bench` crate (the same work against several handlers, with the physical
//! baselines), and the printing of its report.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context as _;

#[derive(clap::Args, Debug)]
pub struct BenchArgs {
    /// Guest memory size (K, M, G suffixes).
    #[arg(long, default_value = "256M", value_parser = testbed::parse_size_2m)]
    pub size: u64,
    /// Access pattern: seq, random, strided, hotset, trace:FILE.
    #[arg(long, default_value = "seq")]
    pub pattern: String,
    /// Client threads touching memory at once.
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Handlers to compare, comma separated: serve, embedded, floor,
    /// serve-ws, embedded-ws (with a recorded working set, see --prefetch),
    /// image-lz4, image-zstd, image-none (serve from the memory file packed
    /// into an image; the pack is timed), s3-cold (an empty disk cache),
    /// s3-warm (a filled one), s3-get (a plain parallel GET loop over the
    /// image's chunks: the store's own speed), s3-stall (a warm VM alone and
    /// beside a cold one whose fetches take --s3-delay-ms more); see --s3.
    #[arg(long, value_delimiter = ',', default_value = "floor,serve,embedded")]
    pub handlers: Vec<String>,
    /// Another handler to compare: a shell command in which {socket} and
    /// {mem_file} are replaced; it must listen on {socket} and speak
    /// Firecracker's UFFD handshake. May be given several times.
    #[arg(long)]
    pub handler_cmd: Vec<String>,
    /// Pages served around each fault by serve and embedded.
    #[arg(long, default_value_t = pager::DEFAULT_CLUSTER_PAGES)]
    pub cluster_pages: usize,
    /// Background population in serve and embedded.
    #[arg(long)]
    pub background: bool,
    /// Keep the fault-around window of serve and embedded at
    /// --cluster-pages instead of following the guest.
    #[arg(long)]
    pub fixed_cluster: bool,
    /// serve and embedded prefetch this recorded working set (`.pwws`,
    /// recorded on the same memory file: give --mem-file, or the generated
    /// file of the same --size and --zero-every). Without it, the handlers
    /// `serve-ws` and `embedded-ws` prefetch a recording that `serve`
    /// makes of one untimed run of the same pattern first.
    #[arg(long)]
    pub prefetch: Option<PathBuf>,
    /// Serving threads for serve and embedded.
    #[arg(long, default_value_t = 2)]
    pub serve_threads: usize,
    /// Use this memory file instead of generating one.
    #[arg(long)]
    pub mem_file: Option<PathBuf>,
    /// In the generated file, every Nth page is zero (0: none).
    #[arg(long, default_value_t = 4)]
    pub zero_every: usize,
    /// What the generated file holds: random (incompressible pages) or
    /// mixed (records and text, one page in 8 random: compressible).
    #[arg(long, default_value = "random")]
    pub content: String,
    /// Also pack this many clones of the memory file against its lz4 image
    /// (each with --clone-change of its pages changed) and report the bytes
    /// stored against the base's.
    #[arg(long, default_value_t = 0)]
    pub clones: usize,
    /// Share of each clone's pages changed.
    #[arg(long, default_value_t = 0.05)]
    pub clone_change: f64,
    /// Where the s3-* handlers push their images, s3://BUCKET/PREFIX
    /// (endpoint, region and keys from the AWS environment); default: a
    /// local moto_server started for the run (pip install 'moto[server]').
    #[arg(long)]
    pub s3: Option<String>,
    /// s3-stall: the delay added to every fetch of the cold image, ms.
    #[arg(long, default_value_t = 50)]
    pub s3_delay_ms: u64,
    /// Run every handler this many times, interleaved (round by round),
    /// and add a summary of medians: on a noisy machine one run's figures
    /// can be off by 2x, and ratios are only fair within a round.
    #[arg(long, default_value_t = 1)]
    pub runs: usize,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

/// `pagewire bench-migrate`: live migration between two processes over
/// loopback, mode by mode, interleaved, with the link's and memcpy's speeds.
#[derive(clap::Args, Debug)]
pub struct BenchMigrateArgs {
    /// Guest memory (the walker rewrites all of it, every pass).
    #[arg(long, default_value = "512M", value_parser = testbed::parse_size_2m)]
    pub mem: u64,
    #[arg(long, default_value_t = 1)]
    pub vcpus: u32,
    /// Modes, comma separated: postcopy, precopy+postcopy, precopy.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "postcopy,precopy+postcopy,precopy"
    )]
    pub modes: Vec<String>,
    /// Limit the link (bits/s: 1G is 1 Gbit/s).
    #[arg(long)]
    pub max_bandwidth: Option<String>,
    #[arg(long, default_value_t = 50)]
    pub downtime_limit_ms: u64,
    #[arg(long, default_value_t = 3)]
    pub runs: usize,
    #[arg(long)]
    pub json: bool,
}

pub fn run_migrate(args: &BenchMigrateArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the pagewire binary")?;
    let report = bench::run_migrate(&bench::MigrateConfig {
        exe,
        mem: args.mem,
        vcpus: args.vcpus,
        modes: args.modes.clone(),
        max_bandwidth: args.max_bandwidth.clone(),
        downtime_limit_ms: args.downtime_limit_ms,
        runs: args.runs,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::MigrateTable(&report));
    }
    Ok(if report.summary.iter().all(|s| s.all_verified) {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `pagewire bench-floor`: the minimal handler (hidden).
#[derive(clap::Args, Debug)]
pub struct FloorArgs {
    #[arg(long)]
    pub socket: PathBuf,
    #[arg(long)]
    pub mem_file: PathBuf,
    /// Write `{faults, pages_copied}` here when the VM ends.
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
}

pub fn run(args: &BenchArgs) -> anyhow::Result<ExitCode> {
    let exe = std::env::current_exe().context("finding the pagewire binary")?;
    let report = bench::run(&bench::Config {
        exe,
        size: args.size,
        pattern: args.pattern.clone(),
        threads: args.threads,
        handlers: args.handlers.clone(),
        handler_cmd: args.handler_cmd.clone(),
        cluster_pages: args.cluster_pages,
        background: args.background,
        fixed_cluster: args.fixed_cluster,
        prefetch: args.prefetch.clone(),
        serve_threads: args.serve_threads,
        mem_file: args.mem_file.clone(),
        zero_every: args.zero_every,
        content: args.content.clone(),
        clones: args.clones,
        clone_change: args.clone_change,
        s3: args.s3.clone(),
        s3_delay_ms: args.s3_delay_ms,
        runs: args.runs,
    })?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print!("{}", bench::Table(&report));
    }
    Ok(if report.all_ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// The floor handler: the memory file read whole, then one connection.
pub fn floor(args: &FloorArgs) -> anyhow::Result<ExitCode> {
    let data = std::fs::read(&args.mem_file)
        .with_context(|| format!("reading {}", args.mem_file.display()))?;
    let listener = server::bind(&args.socket)?;
    bench::floor(&data, listener, &args.socket, args.stats_json.as_deref())?;
    Ok(ExitCode::SUCCESS)
}
