//! `pagewire serve`: flags, and the wiring to the `server` crate (the
//! server itself) or to `handoff`'s supervisor (`--supervise`).

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::Context;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`).
    #[arg(long, required_unless_present = "snapshot_dir")]
    pub socket: Option<PathBuf>,
    /// The snapshot's guest memory file (regions end to end).
    #[arg(
        long,
        required_unless_present_any = ["snapshot_dir", "source"],
        conflicts_with_all = ["snapshot_dir", "source"]
    )]
    pub mem_file: Option<PathBuf>,
    /// Where the snapshot's bytes come from: `file://PATH` (a raw memory
    /// file, as --mem-file), `image://PATH` (a pagewire image, its base
    /// beside it) or `s3://BUCKET/KEY` (an image in S3-compatible object
    /// storage; endpoint, region and credentials from AWS_ENDPOINT_URL,
    /// AWS_REGION, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY).
    #[arg(long, conflicts_with = "snapshot_dir")]
    pub source: Option<String>,
    /// Decoded image chunks kept in memory per source (compressed chunks;
    /// chunks stored as is are read from the file or the disk cache).
    #[arg(long, default_value = "32M", value_parser = testbed::parse_size)]
    pub memory_cache: u64,
    /// Where chunks fetched from S3 are kept on disk (shared by every
    /// server using the same directory; survives restarts). Default:
    /// $XDG_CACHE_HOME/pagewire or ~/.cache/pagewire.
    #[arg(long)]
    pub cache_dir: Option<PathBuf>,
    /// Bytes the disk cache may hold (least recently used chunks go first).
    #[arg(long, default_value = "10G", value_parser = testbed::parse_size)]
    pub cache_size: u64,
    /// S3 fetches in flight at most, per source.
    #[arg(long, default_value_t = 16)]
    pub fetch_concurrency: usize,
    /// Serve every `NAME.mem` (raw memory file), `NAME.pwimg` (pagewire
    /// image) and `NAME.url` (a source URL on its first line, e.g.
    /// s3://bucket/key) in this directory, each on its own socket
    /// `--socket-dir/NAME.sock` (a `NAME.pwws` beside it is prefetched);
    /// SIGHUP reads the directory again.
    #[arg(long, requires = "socket_dir")]
    pub snapshot_dir: Option<PathBuf>,
    /// Where the sockets of `--snapshot-dir` go.
    #[arg(long)]
    pub socket_dir: Option<PathBuf>,
    /// Control socket a successor takes the server over through
    /// (`--take-over`). Default: `<socket>.control`, or `control` in
    /// `--socket-dir`.
    #[arg(long)]
    pub control: Option<PathBuf>,
    /// Take every VM (and the listening sockets) from the server running
    /// with this control socket; it exits once this one has them all.
    #[arg(long)]
    pub take_over: Option<PathBuf>,
    /// Run under pagewire's own supervisor, which keeps every VM's
    /// descriptors, restarts the server when it dies (or on SIGUSR2, to
    /// upgrade) and handles VMs left without a server (--orphan-timeout).
    #[arg(long)]
    pub supervise: bool,
    /// Seconds VMs may be without a ready server (under --supervise) before
    /// --orphan-action; also applies at once to a VM a new server cannot
    /// serve on.
    #[arg(long, default_value_t = 10.0)]
    pub orphan_timeout_s: f64,
    /// What happens to a VM no server can serve: `kill` it through a pidfd
    /// (default: better dead than silently hung), or `wait` with a loud log
    /// line.
    #[arg(long, default_value = "kill")]
    pub orphan_action: handoff::orphan::OrphanAction,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g.
    /// 127.0.0.1:9464.
    #[arg(long)]
    pub metrics: Option<std::net::SocketAddr>,
    /// Where each VM's fault-around window starts; it then follows how many
    /// of the pages around faults the guest touches, between one page and
    /// four times this (see --fixed-cluster).
    #[arg(long, default_value_t = pager::DEFAULT_CLUSTER_PAGES)]
    pub cluster_pages: usize,
    /// Keep the fault-around window at --cluster-pages.
    #[arg(long)]
    pub fixed_cluster: bool,
    /// Record each VM's working set (the pages it touches, in order) into
    /// this directory, as `vm-<n>-pid<pid>.pwws` when the VM ends (or the
    /// server stops). See --record-mode for what it costs.
    #[arg(long)]
    pub record: Option<PathBuf>,
    #[command(flatten)]
    pub recording: crate::sets::RecordingArgs,
    /// Map this recorded working set (`.pwws`, recorded on this memory
    /// file) into each VM right after its handshake, at lower priority than
    /// its faults.
    #[arg(long)]
    pub prefetch: Option<PathBuf>,
    /// Populate the rest of guest memory in the background (yields to faults).
    #[arg(long)]
    pub background: bool,
    /// 4 KiB pages per background step.
    #[arg(long, default_value_t = 8)]
    pub background_chunk: usize,
    /// Serving threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Nice value of the serving threads, so that busy vCPUs do not keep
    /// them from the CPU (negative values need CAP_SYS_NICE; without it
    /// they keep their priority and a warning says so).
    #[arg(long, default_value_t = pager::DEFAULT_NICE, allow_negative_numbers = true)]
    pub nice: i32,
    /// Append one JSON line with each VM's statistics when it ends (draw
    /// them with `pagewire report`).
    #[arg(long)]
    pub stats_json: Option<PathBuf>,
    /// Exit after this many VMs have ended (0: serve until killed).
    #[arg(long, default_value_t = 0)]
    pub exit_after: usize,
    /// Seconds a peer has to send its whole handshake.
    #[arg(long, default_value_t = 5.0)]
    pub handshake_timeout_s: f64,
    /// Largest handshake accepted, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    pub max_handshake_bytes: usize,
    /// Most regions one VM may declare (the state a VM costs the server is
    /// bounded by the memory file: regions may not share its bytes).
    #[arg(long, default_value_t = pager::region::MAX_REGIONS)]
    pub max_regions: usize,
    /// Handshakes read at once at most; further connections wait in the
    /// listen backlog (a peer that connects and stalls holds one for up to
    /// --handshake-timeout-s).
    #[arg(long, default_value_t = 64)]
    pub max_pending_handshakes: usize,
    /// Handshakes read at once from one user id at most; a connection past
    /// it is closed at once. A VMM sends one handshake per VM, and a
    /// jailed Firecracker runs as a user of its own, so a peer that opens
    /// connections and stalls can only delay its own user's VMs.
    #[arg(long, default_value_t = 8)]
    pub max_handshakes_per_uid: usize,
}

impl From<&ServeArgs> for server::Config {
    fn from(a: &ServeArgs) -> server::Config {
        server::Config {
            socket: a.socket.clone(),
            mem_file: a.mem_file.clone(),
            source: a.source.clone(),
            cache: server::CacheOptions {
                memory_bytes: usize::try_from(a.memory_cache).unwrap_or(usize::MAX),
                cache_dir: a.cache_dir.clone().or_else(default_cache_dir),
                cache_bytes: a.cache_size,
                fetch_concurrency: a.fetch_concurrency,
            },
            snapshot_dir: a.snapshot_dir.clone(),
            socket_dir: a.socket_dir.clone(),
            control: a.control.clone(),
            take_over: a.take_over.clone(),
            orphan_timeout_s: a.orphan_timeout_s,
            orphan_action: a.orphan_action,
            metrics: a.metrics,
            cluster_pages: a.cluster_pages,
            fixed_cluster: a.fixed_cluster,
            record: a.record.clone(),
            recording: a.recording.config(),
            prefetch: a.prefetch.clone(),
            background: a.background,
            background_chunk: a.background_chunk,
            threads: a.threads,
            nice: a.nice,
            stats_json: a.stats_json.clone(),
            exit_after: a.exit_after,
            handshake_timeout_s: a.handshake_timeout_s,
            max_handshake_bytes: a.max_handshake_bytes,
            max_regions: a.max_regions,
            max_pending_handshakes: a.max_pending_handshakes,
            max_handshakes_per_uid: a.max_handshakes_per_uid,
        }
    }
}

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    if args.supervise {
        return supervise(args);
    }
    server::run(&args.into())?;
    Ok(ExitCode::SUCCESS)
}

/// `--supervise`: this process becomes the supervisor and runs the server
/// (this same executable, without `--supervise`) as its child.
fn supervise(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let program = std::env::current_exe().context("finding this executable")?;
    let child_args: Vec<std::ffi::OsString> = std::env::args_os()
        .skip(1)
        .filter(|a| a != "--supervise")
        .collect();
    let runtime_dir = std::env::var_os("RUNTIME_DIRECTORY")
        .map(PathBuf::from)
        .unwrap_or_else(std::env::temp_dir);
    let (tx, rx) = mpsc::channel();
    {
        use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1, SIGUSR2};
        let mut signals =
            signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGUSR2, SIGHUP])
                .context("installing signal handlers")?;
        std::thread::Builder::new()
            .name("pagewire-supervisor-signals".into())
            .spawn(move || {
                for s in signals.forever() {
                    if tx.send(s).is_err() {
                        return;
                    }
                }
            })
            .context("spawning the signal thread")?;
    }
    let opts = handoff::supervisor::Options {
        program,
        args: child_args,
        orphan_timeout: Duration::from_secs_f64(args.orphan_timeout_s.max(0.0)),
        orphan_action: args.orphan_action,
        runtime_dir,
    };
    let code = handoff::supervisor::run(&opts, rx).context("supervising the server")?;
    Ok(ExitCode::from(code.clamp(0, 255) as u8))
}

/// `$XDG_CACHE_HOME/pagewire`, else `~/.cache/pagewire`.
pub fn default_cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))?;
    Some(base.join("pagewire"))
}
