//! `pagewire`: serve VM and process memory on demand through userfaultfd.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod demo;
mod fc_client;
mod image;
mod migrate;
mod serve;
mod sets;
mod vm;
mod ws;

#[derive(Parser)]
#[command(name = "pagewire", version, about)]
struct Cli {
    /// Log lines as `text` or as `json` objects (one a line, for log
    /// shippers). PAGEWIRE_LOG sets the level filter.
    #[arg(long, global = true, default_value = "text", value_parser = ["text", "json"], env = "PAGEWIRE_LOG_FORMAT")]
    log_format: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// The whole thing on this machine: run a KVM guest, snapshot it,
    /// restore it eagerly, embedded and through `pagewire serve`, and
    /// report (the process-memory version without /dev/kvm).
    Demo(demo::DemoArgs),
    /// The reference KVM VMM: run a guest, snapshot it, restore it.
    #[command(subcommand)]
    Vm(vm::VmCommand),
    /// Report the kernel's userfaultfd features and test which access paths
    /// to registered memory are served.
    Check(check::CheckArgs),
    /// Serve guest memory to Firecracker VMs over its UFFD handshake (a
    /// drop-in page-fault handler for `mem_backend: Uffd`).
    Serve(serve::ServeArgs),
    /// Play Firecracker's side of the UFFD handshake against a handler and
    /// check every byte it serves (for tests and the demo).
    #[command(name = "fc-client")]
    FcClient(fc_client::FcClientArgs),
    /// Run the same work against several handlers and the physical
    /// baselines, and print a table.
    Bench(bench::BenchArgs),
    /// Live migration between two processes over loopback: post-copy,
    /// pre-copy then post-copy, pre-copy alone; medians of several runs
    /// beside the link's and memcpy's own speeds.
    BenchMigrate(bench::BenchMigrateArgs),
    /// Draw what restores did, from `serve --stats-json` lines: per VM,
    /// pages mapped over time by cause and the fault-latency distribution.
    Report(ReportArgs),
    /// Working sets: merge recordings, inspect one.
    #[command(subcommand)]
    Ws(ws::WsCommand),
    /// Snapshot images: pack, inspect, verify, unpack, push to S3.
    #[command(subcommand)]
    Image(image::ImageCommand),
    /// The minimal one-page-per-fault handler `bench` measures as the floor.
    #[command(name = "bench-floor", hide = true)]
    BenchFloor(bench::FloorArgs),
}

#[derive(clap::Args)]
struct ReportArgs {
    /// The statistics, one JSON line per VM (`serve --stats-json`).
    stats: std::path::PathBuf,
    /// The picture to write (SVG).
    #[arg(short, long, default_value = "report.svg")]
    output: std::path::PathBuf,
    /// Most VMs drawn (the header counts all).
    #[arg(long, default_value_t = 16)]
    max_vms: usize,
    /// Skip malformed lines instead of stopping at the first.
    #[arg(long)]
    skip_malformed: bool,
}

fn report(args: &ReportArgs) -> anyhow::Result<ExitCode> {
    use anyhow::Context;
    let input = std::fs::read_to_string(&args.stats)
        .with_context(|| format!("reading {}", args.stats.display()))?;
    let opts = report::Options {
        max_vms: args.max_vms,
        skip_malformed: args.skip_malformed,
        ..report::Options::default()
    };
    let summary = report::render_svg(&input, &args.output, &opts)
        .with_context(|| format!("drawing {}", args.stats.display()))?;
    println!(
        "{}: {} VMs drawn of {}{}",
        args.output.display(),
        summary.drawn,
        summary.sessions,
        if summary.skipped_lines.is_empty() {
            String::new()
        } else {
            format!(", {} malformed lines skipped", summary.skipped_lines.len())
        }
    );
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; the engine's per-session lines would
    // interleave with it. PAGEWIRE_LOG still overrides.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_env("PAGEWIRE_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if cli.log_format == "json" {
        builder.json().init();
    } else {
        builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init();
    }
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Vm(cmd) => vm::run(&cmd),
        Command::Check(args) => check::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::FcClient(args) => fc_client::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::BenchMigrate(args) => bench::run_migrate(&args),
        Command::BenchFloor(args) => bench::floor(&args),
        Command::Ws(cmd) => ws::run(&cmd),
        Command::Image(cmd) => image::run(cmd).map(|()| ExitCode::SUCCESS),
        Command::Report(args) => report(&args),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagewire: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
