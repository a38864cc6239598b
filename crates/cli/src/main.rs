//! `pagewire`: serve VM and process memory on demand through userfaultfd.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check;
mod demo;
mod fc_client;
mod serve;
mod sets;
mod vm;
mod ws;

#[derive(Parser)]
#[command(name = "pagewire", version, about)]
struct Cli {
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
    /// Working sets: merge recordings, inspect one.
    #[command(subcommand)]
    Ws(ws::WsCommand),
    /// The minimal one-page-per-fault handler `bench` measures as the floor.
    #[command(name = "bench-floor", hide = true)]
    BenchFloor(bench::FloorArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // The demo prints its own report; the engine's per-session lines would
    // interleave with it. PAGEWIRE_LOG still overrides.
    let default_level = match cli.command {
        Command::Demo(_) => "warn",
        _ => "info",
    };
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("PAGEWIRE_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_level)),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let result = match cli.command {
        Command::Demo(args) => demo::run(&args),
        Command::Vm(cmd) => vm::run(&cmd),
        Command::Check(args) => check::run(&args),
        Command::Serve(args) => serve::run(&args),
        Command::FcClient(args) => fc_client::run(&args),
        Command::Bench(args) => bench::run(&args),
        Command::BenchFloor(args) => bench::floor(&args),
        Command::Ws(cmd) => ws::run(&cmd),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pagewire: error: {e:#}");
            ExitCode::from(1)
        }
    }
}
