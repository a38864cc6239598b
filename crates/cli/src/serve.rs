//! `pagewire serve`: a drop-in Firecracker UFFD page-fault handler.
//!
//! Listens on a Unix socket; each connection is one VM that sends, in one
//! `sendmsg`, a JSON array of regions and its userfaultfd (SCM_RIGHTS). The
//! handshake is read on its own thread with a size bound and a deadline and
//! validated completely before the VM is served; a bad one is rejected with a
//! log line and disturbs nobody else. A VM ends when its socket hangs up or
//! its process exits (pidfd), whichever comes first.
//!
//! # File descriptors
//! Each VM holds three for as long as it is served (its socket, its
//! userfaultfd, a pidfd). The soft `RLIMIT_NOFILE` is raised to the hard
//! limit at start, and the log says how many VMs that allows. A connection
//! is accepted only while there are descriptors for one more VM: beyond
//! that, VMs wait in the listen backlog until one ends, instead of being
//! accepted and then losing their userfaultfd to EMFILE (the kernel drops
//! an fd it cannot install, and such a VM waits for ever).

use std::collections::HashMap;
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use pager::{limited, Engine, EngineConfig, MemFile, PageSource, SessionConfig, SessionSpec};
use wire::firecracker::{read_handshake, to_regions};

/// Descriptors a served VM holds: its socket, its userfaultfd, a pidfd.
const FDS_PER_VM: u64 = 3;
/// Descriptors kept free for everything else (the stats file, /proc reads,
/// a handshake's transient fds).
const FD_RESERVE: u64 = 16;

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`).
    #[arg(long)]
    pub socket: PathBuf,
    /// The snapshot's guest memory file (regions end to end).
    #[arg(long)]
    pub mem_file: PathBuf,
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
    /// Append one JSON line with each VM's statistics when it ends.
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

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let fd_limit = raise_fd_limit();
    let source: Arc<dyn PageSource> = Arc::new(
        MemFile::open(&args.mem_file)
            .with_context(|| format!("opening the memory file {}", args.mem_file.display()))?,
    );
    let template = session_template(args)?;
    // Recordings are tied to the memory file: fingerprinted once, before any
    // VM is served.
    let snapshot = match &args.record {
        Some(_) => Some(crate::sets::snapshot_id(&args.mem_file)?),
        None => None,
    };
    if let Some(dir) = &args.record {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("creating the recording directory {}", dir.display()))?;
    }
    let listener = bind(&args.socket)?;
    tracing::info!(
        socket = %args.socket.display(),
        source = %source.describe(),
        "listening for Firecracker UFFD handshakes"
    );

    let (ended_tx, ended_rx) = mpsc::channel::<Msg>();
    watch_signals(ended_tx.clone())?;
    let stats_file = match &args.stats_json {
        Some(p) => Some(Mutex::new(
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .with_context(|| format!("opening the stats file {}", p.display()))?,
        )),
        None => None,
    };
    let ended_tx = Mutex::new(ended_tx);
    let hook = Box::new(move |report: &pager::SessionReport| {
        if let Some(f) = &stats_file {
            match serde_json::to_string(report) {
                Ok(line) => {
                    if let Ok(mut f) = f.lock() {
                        if let Err(e) = writeln!(f, "{line}") {
                            limited!(error, "writing the stats file: {e}");
                        }
                    }
                }
                Err(e) => limited!(error, "encoding stats: {e}"),
            }
        }
        if let Ok(tx) = ended_tx.lock() {
            if let Some(rec) = &report.recording {
                let _ = tx.send(Msg::Recorded(report.id, report.pid, rec.clone()));
            }
            let _ = tx.send(Msg::Ended);
        }
    });
    let mut config = EngineConfig {
        nice: Some(args.nice),
        ..EngineConfig::default()
    };
    if let Some(t) = args.threads {
        config.threads = t;
    }
    let engine =
        Arc::new(Engine::start(config, Some(hook)).context("starting the serving threads")?);

    let accept_engine = engine.clone();
    let accept_args = args.clone();
    std::thread::Builder::new()
        .name("pagewire-accept".into())
        .spawn(move || {
            accept_loop(
                &listener,
                &accept_engine,
                &source,
                &accept_args,
                fd_limit,
                &template,
            )
        })
        .context("spawning the accept thread")?;

    let mut ended = 0usize;
    while let Ok(msg) = ended_rx.recv() {
        match msg {
            Msg::Recorded(id, pid, rec) => save_recording(args, snapshot, id, pid, &rec),
            Msg::EndRecordings => {
                let n = engine.end_recordings();
                tracing::info!(vms = n, "SIGUSR1: recording windows ended");
            }
            Msg::Ended => {
                ended += 1;
                if args.exit_after > 0 && ended >= args.exit_after {
                    tracing::info!(vms = ended, "exiting after the requested number of VMs");
                    break;
                }
            }
            Msg::Signal(sig) => {
                tracing::warn!(
                    signal = sig,
                    vms = engine.session_count(),
                    "stopping: the VMs still running lose their page server and will block \
                     on their next missing page"
                );
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&args.socket);
    engine.shutdown();
    // The VMs still served when the loop ended were ended by the shutdown:
    // their recordings are in the channel (the engine holds a sender, so
    // only what is there already is taken).
    while let Ok(msg) = ended_rx.try_recv() {
        if let Msg::Recorded(id, pid, rec) = msg {
            save_recording(args, snapshot, id, pid, &rec);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes a VM's recording as `vm-<id>-pid<pid>.pwws` in `--record`'s
/// directory; a failure is logged, and the server goes on.
fn save_recording(
    args: &ServeArgs,
    snapshot: Option<workset::SnapshotId>,
    id: u64,
    pid: Option<u32>,
    rec: &pager::Recording,
) {
    let (Some(dir), Some(snapshot)) = (&args.record, snapshot) else {
        return;
    };
    let pid = pid.map_or_else(String::new, |p| format!("-pid{p}"));
    let path = dir.join(format!("vm-{id}{pid}.pwws"));
    match crate::sets::save(rec, snapshot, &path) {
        Ok(set) => tracing::info!(
            path = %path.display(),
            pages = set.touches.len(),
            inferred = rec.inferred,
            "working set recorded"
        ),
        Err(e) => tracing::error!("{e:#}"),
    }
}

enum Msg {
    /// A VM ended (its report is written).
    Ended,
    /// A VM that recorded its working set ended (session id, pid).
    Recorded(u64, Option<u32>, Arc<pager::Recording>),
    /// SIGUSR1: end every recording window.
    EndRecordings,
    /// SIGTERM or SIGINT: end every VM (writing their reports) and exit.
    Signal(i32),
}

fn watch_signals(tx: mpsc::Sender<Msg>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("pagewire-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let msg = match sig {
                    SIGUSR1 => Msg::EndRecordings,
                    sig => Msg::Signal(sig),
                };
                if tx.send(msg).is_err() {
                    return;
                }
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
}

/// Raises the soft `RLIMIT_NOFILE` to the hard limit (systemd starts
/// services with a soft limit of 1024: about 330 VMs), says how many VMs
/// the limit allows, and returns it.
fn raise_fd_limit() -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource};
    let before = getrlimit(Resource::Nofile);
    let soft = before.current.unwrap_or(u64::MAX);
    let mut limit = soft;
    if before.current != before.maximum {
        let raised = rustix::process::Rlimit {
            current: before.maximum,
            maximum: before.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => limit = before.maximum.unwrap_or(u64::MAX),
            Err(e) => tracing::warn!("cannot raise the file descriptor limit from {soft}: {e}"),
        }
    }
    let vms = limit.saturating_sub(FD_RESERVE) / FDS_PER_VM;
    tracing::info!(
        limit,
        raised_from = soft,
        "file descriptors: each VM holds {FDS_PER_VM}, so about {vms} VMs can be served at once; \
         raise the hard limit (LimitNOFILE=, ulimit -Hn) for more"
    );
    limit
}

/// Descriptors this process has open now.
fn open_fds() -> Option<u64> {
    // One of them is the directory being read.
    Some(std::fs::read_dir("/proc/self/fd").ok()?.count() as u64 - 1)
}

/// Waits until one more handshake may start: fewer than the bound are in
/// flight, and there are descriptors for one more VM beside those that
/// are being received.
fn wait_for_room(pending: &AtomicUsize, args: &ServeArgs, engine: &Engine, fd_limit: u64) {
    loop {
        let in_flight = pending.load(Ordering::Acquire);
        let open = open_fds();
        let need = FD_RESERVE + FDS_PER_VM * (in_flight as u64 + 1);
        let fds_ok = open.is_some_and(|open| open.saturating_add(need) <= fd_limit);
        if in_flight < args.max_pending_handshakes.max(1) && fds_ok {
            return;
        }
        if !fds_ok {
            limited!(
                warn,
                open_fds = open,
                limit = fd_limit,
                vms = engine.session_count(),
                "at the file descriptor limit: new VMs wait in the listen backlog until one \
                 ends (each VM holds {FDS_PER_VM}); raise LimitNOFILE= / ulimit -n to serve \
                 more at once"
            );
        } else {
            limited!(
                warn,
                in_flight,
                "{in_flight} handshakes are being read: new connections wait in the listen \
                 backlog (--max-pending-handshakes)"
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Binds the socket, replacing a stale socket file but nothing else.
pub(crate) fn bind(path: &Path) -> anyhow::Result<UnixListener> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            std::fs::remove_file(path)
                .with_context(|| format!("removing the stale socket {}", path.display()))?;
        }
        Ok(_) => bail!(
            "{} exists and is not a socket: refusing to replace it",
            path.display()
        ),
        Err(_) => {}
    }
    UnixListener::bind(path).with_context(|| format!("binding {}", path.display()))
}

fn accept_loop(
    listener: &UnixListener,
    engine: &Arc<Engine>,
    source: &Arc<dyn PageSource>,
    args: &ServeArgs,
    fd_limit: u64,
    template: &SessionConfig,
) {
    let pending = Arc::new(AtomicUsize::new(0));
    let per_uid: Arc<Mutex<HashMap<u32, usize>>> = Arc::default();
    loop {
        wait_for_room(&pending, args, engine, fd_limit);
        let stream = match listener.accept() {
            Ok((s, _)) => s,
            Err(e) => {
                let emfile = matches!(e.raw_os_error(), Some(c) if c == rustix::io::Errno::MFILE.raw_os_error() || c == rustix::io::Errno::NFILE.raw_os_error());
                if emfile {
                    limited!(
                        error,
                        "accept: out of file descriptors ({e}); raise LimitNOFILE= / ulimit -n"
                    );
                } else {
                    limited!(error, "accept: {e}");
                }
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let uid = rustix::net::sockopt::socket_peercred(&stream)
            .map(|c| c.uid.as_raw())
            .unwrap_or(u32::MAX);
        {
            let mut counts = per_uid.lock().unwrap_or_else(|e| e.into_inner());
            let n = counts.entry(uid).or_insert(0);
            if *n >= args.max_handshakes_per_uid.max(1) {
                limited!(
                    warn,
                    uid,
                    "user {uid} has {n} handshakes in flight: connection closed \
                     (--max-handshakes-per-uid)"
                );
                continue;
            }
            *n += 1;
        }
        let (engine, source, args) = (engine.clone(), source.clone(), args.clone());
        let config = template.clone();
        pending.fetch_add(1, Ordering::AcqRel);
        let (done, per_uid_done) = (pending.clone(), per_uid.clone());
        let finished = move || {
            done.fetch_sub(1, Ordering::AcqRel);
            let mut counts = per_uid_done.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(n) = counts.get_mut(&uid) {
                *n -= 1;
                if *n == 0 {
                    counts.remove(&uid);
                }
            }
        };
        let spawned = std::thread::Builder::new()
            .name("pagewire-handshake".into())
            // A handshake needs little stack; many may be read at once.
            .stack_size(256 << 10)
            .spawn({
                let finished = finished.clone();
                move || {
                    handle_connection(stream, &engine, source, &args, config);
                    finished();
                }
            });
        if let Err(e) = spawned {
            finished();
            limited!(error, "cannot start a handshake thread: {e}");
        }
    }
}

fn handle_connection(
    stream: UnixStream,
    engine: &Engine,
    source: Arc<dyn PageSource>,
    args: &ServeArgs,
    config: SessionConfig,
) {
    let peer = rustix::net::sockopt::socket_peercred(&stream).ok();
    let pid = peer.map(|c| c.pid.as_raw_nonzero().get() as u32);
    let uid = peer.map(|c| c.uid.as_raw());
    let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
    let timeout = Duration::from_secs_f64(args.handshake_timeout_s.max(0.001));
    let (regions, uffd) = match read_handshake(&stream, timeout, args.max_handshake_bytes)
        .and_then(|(fc, fd)| Ok((to_regions(&fc, source.len(), args.max_regions)?, fd)))
    {
        Ok(v) => v,
        Err(e) => {
            limited!(
                key = e.kind(),
                error,
                peer = %who,
                uid,
                "handshake rejected: {e}. The connection is closed; a VMM that registered \
                 memory keeps its own userfaultfd and will block on its first missing page"
            );
            return;
        }
    };
    let total: u64 = regions.iter().map(|r| r.len).sum();
    limited!(
        burst = 1000,
        info,
        peer = %who,
        uid,
        regions = regions.len(),
        mib = total >> 20,
        "VM connected"
    );
    let hangup: OwnedFd = stream.into();
    let spec = SessionSpec {
        name: format!("vm {who}"),
        uffd,
        regions,
        source,
        pid,
        hangup: Some(hangup),
        config,
    };
    if let Err(e) = engine.add(spec) {
        limited!(error, peer = %who, "VM not served: {e}");
    }
}

/// The configuration every VM's session starts from: tuning, and the
/// working set to record or prefetch (checked against the memory file once,
/// before any VM waits on it).
fn session_template(args: &ServeArgs) -> anyhow::Result<SessionConfig> {
    if args.record.is_some() && args.prefetch.is_some() {
        bail!(
            "--record and --prefetch together: a prefetched page makes no fault, so the \
             recording would miss the set; record without --prefetch"
        );
    }
    let prefetch = match &args.prefetch {
        Some(p) => {
            let snapshot = crate::sets::snapshot_id(&args.mem_file)?;
            let (set, ws) = crate::sets::load(p, &snapshot)?;
            tracing::info!(
                path = %p.display(),
                pages = ws.touches.len(),
                runs = ws.runs,
                "prefetching a working set into each VM"
            );
            Some(set)
        }
        None => None,
    };
    Ok(SessionConfig {
        cluster_pages: args.cluster_pages.max(1),
        adaptive_cluster: !args.fixed_cluster,
        background: args.background,
        background_chunk: args.background_chunk.max(1),
        record: args.record.as_ref().map(|_| args.recording.config()),
        prefetch,
        ..SessionConfig::default()
    })
}
