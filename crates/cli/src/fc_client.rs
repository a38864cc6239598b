//! `pagewire fc-client`: the command line of the `fc-client` crate (Firecracker's
//! side of the UFFD handshake against a handler, and a check of every byte it
//! serves), and the printing of its report.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use fc_client::{Config, Outcome};

#[derive(clap::Args, Debug)]
pub struct FcClientArgs {
    /// Listening Unix socket of the page-fault handler (required unless
    /// --embedded).
    #[arg(
        long,
        required_unless_present = "embedded",
        conflicts_with = "embedded"
    )]
    pub socket: Option<PathBuf>,
    /// Snapshot memory file: the guest's regions end to end, and the truth
    /// every served page is compared against.
    #[arg(long)]
    pub mem_file: PathBuf,
    /// Split the file into this many guest memory regions, each mapped (and
    /// registered) separately at non-contiguous host addresses.
    #[arg(long, default_value_t = 1)]
    pub regions: usize,
    /// Back guest memory with 2 MiB huge pages (MAP_HUGETLB|MAP_HUGE_2MB);
    /// the file size must be a multiple of 2 MiB and enough huge pages must
    /// be reserved in /proc/sys/vm/nr_hugepages.
    #[arg(long)]
    pub huge: bool,
    /// Threads touching pages concurrently.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Order in which pages are touched (random: a deterministic permutation).
    /// --pattern overrides it.
    #[arg(long, value_enum, default_value_t = Order::Random)]
    pub order: Order,
    /// Access pattern of the touch phase; overrides --order. `seq` and
    /// `random` are --order sequential and random; `strided` visits pages 0,
    /// S, 2S, ..., then 1, S+1, ... (S = --stride), every page once; `hotset`
    /// touches a pseudo-random 10% of the pages (chosen with --seed) --passes
    /// times, each pass in the same shuffled order; `trace:FILE` replays a
    /// trace: one page index of the flat layout (file offset / page size) a
    /// line, in order, repeats allowed, lines starting with `#` ignored.
    #[arg(long, value_parser = fc_client::parse_pattern)]
    pub pattern: Option<fc_client::Pattern>,
    /// Stride in pages of `--pattern strided`.
    #[arg(long, default_value_t = pager::DEFAULT_CLUSTER_PAGES)]
    pub stride: usize,
    /// Passes over the hot set of `--pattern hotset`.
    #[arg(long, default_value_t = 10)]
    pub passes: usize,
    /// Write the pages the touch phase touched first, in the order they
    /// were handed out to the touching threads, as a trace for
    /// `--pattern trace:FILE`.
    #[arg(long)]
    pub record_trace: Option<PathBuf>,
    /// Seed of the random order (and of the hot set).
    #[arg(long, default_value_t = 0x5eed)]
    pub seed: u64,
    /// Touch only this fraction (0..=1) of the pages, the first ones in the
    /// chosen order (of one pass's sequence, for hotset and trace).
    #[arg(long, default_value_t = 1.0)]
    pub touch_fraction: f64,
    /// After the touch phase, release OFFSET:LEN (bytes of the guest's flat
    /// layout, i.e. file offsets; page aligned; K/M/G suffixes and 0x hex
    /// accepted) with MADV_DONTNEED, as the balloon device does. Repeatable.
    /// Every page there must then read zero.
    #[arg(long, value_parser = fc_client::parse_balloon)]
    pub balloon: Vec<fc_client::BalloonRange>,
    /// Pages OFFSET:LEN (as --balloon) the handler must poison (a corrupt
    /// chunk of an image): left out of the touch and verify phases, then
    /// each must fail a system call that reads it with EFAULT. Repeatable.
    #[arg(long, value_parser = fc_client::parse_balloon)]
    pub poisoned: Vec<fc_client::BalloonRange>,
    /// Touch this many pages (one thread), then exit at once with code 0
    /// without any cleanup (a VM dying mid-serve).
    #[arg(long)]
    pub exit_after: Option<usize>,
    /// After verification, write a byte to a few pages and read it back.
    #[arg(long)]
    pub write_check: bool,
    /// Sleep this long (after printing the report) before exiting.
    #[arg(long, default_value_t = 0)]
    pub hold_ms: u64,
    /// Exit with code 3 when a page access makes no progress for this long.
    #[arg(long, default_value_t = 30.0)]
    pub timeout_s: f64,
    /// Serve this process's own memory with an in-process `pager::Engine`
    /// instead of sending the userfaultfd to a handler (no --socket).
    #[arg(long)]
    pub embedded: bool,
    /// Serving threads of the embedded engine [default: 2].
    #[arg(long)]
    pub serve_threads: Option<usize>,
    /// Pages the embedded engine serves around each fault [default: 16].
    #[arg(long)]
    pub cluster_pages: Option<usize>,
    /// Let the embedded engine populate memory in the background.
    #[arg(long)]
    pub background: bool,
    /// Keep the embedded engine's fault-around window at --cluster-pages.
    #[arg(long)]
    pub fixed_cluster: bool,
    /// The embedded engine prefetches this recorded working set (`.pwws`).
    #[arg(long, requires = "embedded")]
    pub prefetch: Option<PathBuf>,
    /// Pages per background step of the embedded engine [default: 64].
    #[arg(long)]
    pub background_chunk: Option<usize>,
    /// Misbehave as a broken or hostile VMM would (tests of `serve`):
    /// `blocking-uffd` (no O_NONBLOCK), `no-api` (no UFFDIO_API; waits for
    /// the server to close the connection), `clear-nonblock` (a thread
    /// clears O_NONBLOCK on the shared file every millisecond),
    /// `declare-less:BYTES` (the last region declared shorter than
    /// registered), `split-vmas` (regions split into VMAs after
    /// registering).
    #[arg(long, value_parser = fc_client::hostile::parse_misbehave)]
    pub misbehave: Option<fc_client::hostile::Misbehave>,
    /// Before the touch phase, for this many milliseconds: threads read
    /// random pages while another discards random runs of them
    /// (MADV_DONTNEED), mostly in a small shared window. Every byte read
    /// must be the file's or zero, and every discarded page zero from then
    /// on (checked in the verify phase).
    #[arg(long)]
    pub balloon_race: Option<u64>,
    /// Wait this long after the handshake before the first access (lets a
    /// handler's prefetch finish first).
    #[arg(long, default_value_t = 0)]
    pub start_after_ms: u64,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Sequential,
    Random,
}

impl FcClientArgs {
    fn config(&self) -> anyhow::Result<Config> {
        let prefetch = match &self.prefetch {
            Some(p) => {
                let id = crate::sets::snapshot_id(&self.mem_file)?;
                Some(crate::sets::load(p, &id)?.0)
            }
            None => None,
        };
        Ok(Config {
            socket: self.socket.clone(),
            mem_file: self.mem_file.clone(),
            regions: self.regions,
            huge: self.huge,
            threads: self.threads,
            order: match self.order {
                Order::Sequential => fc_client::Order::Sequential,
                Order::Random => fc_client::Order::Random,
            },
            pattern: self.pattern.clone(),
            stride: self.stride,
            passes: self.passes,
            record_trace: self.record_trace.clone(),
            seed: self.seed,
            touch_fraction: self.touch_fraction,
            balloon: self.balloon.clone(),
            poisoned: self.poisoned.clone(),
            exit_after: self.exit_after,
            write_check: self.write_check,
            timeout_s: self.timeout_s,
            embedded: self.embedded,
            serve_threads: self.serve_threads,
            cluster_pages: self.cluster_pages,
            background: self.background,
            fixed_cluster: self.fixed_cluster,
            prefetch,
            background_chunk: self.background_chunk,
            misbehave: self.misbehave,
            balloon_race: self.balloon_race,
            start_after_ms: self.start_after_ms,
        })
    }
}

pub fn run(args: &FcClientArgs) -> anyhow::Result<ExitCode> {
    let report = match fc_client::run(&args.config()?)? {
        Outcome::ClosedByServer(closed) => {
            println!("{}", serde_json::json!({ "closed_by_server": closed }));
            return Ok(if closed {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            });
        }
        Outcome::ExitedAfter { pages, mismatched } => {
            let line = serde_json::json!({
                "exit_after": pages,
                "pages_touched": pages,
                "mismatched_pages": mismatched,
                "pid": std::process::id(),
            });
            println!("{line}");
            let _ = std::io::stdout().flush();
            std::process::exit(0);
        }
        Outcome::Report(report) => report,
    };
    let text = serde_json::to_string_pretty(&report).context("serialising the report")?;
    let mut stdout = std::io::stdout().lock();
    writeln!(stdout, "{text}").context("writing the report")?;
    stdout.flush().context("writing the report")?;
    drop(stdout);

    if args.hold_ms > 0 {
        std::thread::sleep(Duration::from_millis(args.hold_ms));
    }
    Ok(if report.ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
