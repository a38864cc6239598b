//! `pagewire serve`: a drop-in Firecracker UFFD page-fault handler.
//!
//! Listens on a Unix socket; each connection is one VM that sends, in one
//! `sendmsg`, a JSON array of regions and its userfaultfd (SCM_RIGHTS). The
//! handshake is read on its own thread with a size bound and a deadline and
//! validated completely before the VM is served; a bad one is rejected with a
//! log line and disturbs nobody else. A VM ends when its socket hangs up or
//! its process exits (pidfd), whichever comes first.
//!
//! # Surviving its own restart
//! Every VM's page states live in a memfd (`pager::persist`), and its
//! userfaultfd, connection and that memfd are handed to a keeper when the
//! VM arrives: systemd's fd store or `serve --supervise` (both through
//! `NOTIFY_SOCKET`, see the `handoff` crate). A server that starts with
//! descriptors (`LISTEN_FDS`) or takes them from a running server
//! (`--take-over`) serves those VMs on: it adopts their page states, wakes
//! every region once (faults its predecessor read and never served are not
//! sent again) and serves what faults next. A VM that cannot be served on
//! is killed through a pidfd or left waiting with a loud line
//! (`--orphan-action`); its userfaultfd is never closed under it.
//!
//! # Many snapshots
//! `--snapshot-dir DIR` serves every `NAME.mem` (raw memory file),
//! `NAME.pwimg` (pagewire image) and `NAME.url` (a source URL such as
//! `s3://bucket/key`, see `source.rs`) in it on its own socket,
//! `--socket-dir/NAME.sock` (Firecracker sends only regions and a fd, so
//! the socket says which snapshot a VM restores); `NAME.pwws` beside it is
//! prefetched. SIGHUP reads the directory again: new snapshots get a
//! socket, removed ones lose theirs (their VMs are served on).
//!
//! # File descriptors
//! Each VM holds six for as long as it is served (its socket, its
//! userfaultfd, a pidfd, the page-state memfd, and copies of the first two
//! kept to hand over). The soft `RLIMIT_NOFILE` is raised to the hard
//! limit at start, and the log says how many VMs that allows. A connection
//! is accepted only while there are descriptors for one more VM: beyond
//! that, VMs wait in the listen backlog until one ends, instead of being
//! accepted and then losing their userfaultfd to EMFILE (the kernel drops
//! an fd it cannot install, and such a VM waits for ever).

use std::collections::{BTreeMap, HashMap};
use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

pub use crate::error::ServeError;
use crate::error::{bail, Context};
mod error;
pub mod sets;
pub mod source;

pub use source::{CacheOptions, SourceUrl};

/// The server's results.
type Result<T, E = ServeError> = std::result::Result<T, E>;

use pager::{
    limited, Engine, EngineConfig, MemFile, PageSource, PageStateFile, SessionConfig, SessionSpec,
};
use wire::firecracker::{read_handshake, to_regions};

/// Descriptors a served VM holds: its socket, its userfaultfd, a pidfd,
/// its page-state memfd, and copies of the socket and userfaultfd kept to
/// hand over.
const FDS_PER_VM: u64 = 6;
/// Descriptors kept free for everything else (the stats file, /proc reads,
/// a handshake's transient fds).
const FD_RESERVE: u64 = 16;

/// How the server serves (`pagewire serve`'s flags; their help text is
/// the documentation of each).
#[derive(Debug, Clone)]
pub struct Config {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`).
    pub socket: Option<PathBuf>,
    /// The snapshot's guest memory file (regions end to end).
    pub mem_file: Option<PathBuf>,
    /// Where the snapshot's bytes come from, as a URL (`source.rs`):
    /// `file://`, `image://` or `s3://`; instead of `mem_file`.
    pub source: Option<String>,
    /// How image and S3 sources cache chunks.
    pub cache: CacheOptions,
    /// Serve every `NAME.mem` in this directory, each on its own socket
    /// `--socket-dir/NAME.sock` (a `NAME.pwws` beside it is prefetched);
    /// SIGHUP reads the directory again.
    pub snapshot_dir: Option<PathBuf>,
    /// Where the sockets of `--snapshot-dir` go.
    pub socket_dir: Option<PathBuf>,
    /// Control socket a successor takes the server over through
    /// (`--take-over`). Default: `<socket>.control`, or `control` in
    /// `--socket-dir`.
    pub control: Option<PathBuf>,
    /// Take every VM (and the listening sockets) from the server running
    /// with this control socket; it exits once this one has them all.
    pub take_over: Option<PathBuf>,
    /// Seconds VMs may be without a ready server (under --supervise) before
    /// --orphan-action; also applies at once to a VM a new server cannot
    /// serve on.
    pub orphan_timeout_s: f64,
    /// What happens to a VM no server can serve: `kill` it through a pidfd
    /// (default: better dead than silently hung), or `wait` with a loud log
    /// line.
    pub orphan_action: handoff::orphan::OrphanAction,
    /// Serve Prometheus metrics on this address (`GET /metrics`), e.g.
    /// 127.0.0.1:9464.
    pub metrics: Option<std::net::SocketAddr>,
    /// Where each VM's fault-around window starts; it then follows how many
    /// of the pages around faults the guest touches, between one page and
    /// four times this (see --fixed-cluster).
    pub cluster_pages: usize,
    /// Keep the fault-around window at --cluster-pages.
    pub fixed_cluster: bool,
    /// Record each VM's working set (the pages it touches, in order) into
    /// this directory, as `vm-<n>-pid<pid>.pwws` when the VM ends (or the
    /// server stops). See --record-mode for what it costs.
    pub record: Option<PathBuf>,
    /// How working sets are recorded (with `record`).
    pub recording: pager::RecordConfig,
    /// Map this recorded working set (`.pwws`, recorded on this memory
    /// file) into each VM right after its handshake, at lower priority than
    /// its faults.
    pub prefetch: Option<PathBuf>,
    /// Populate the rest of guest memory in the background (yields to faults).
    pub background: bool,
    /// 4 KiB pages per background step.
    pub background_chunk: usize,
    /// Serving threads (default: one per core).
    pub threads: Option<usize>,
    /// Nice value of the serving threads, so that busy vCPUs do not keep
    /// them from the CPU (negative values need CAP_SYS_NICE; without it
    /// they keep their priority and a warning says so).
    pub nice: i32,
    /// Append one JSON line with each VM's statistics when it ends (draw
    /// them with `pagewire report`).
    pub stats_json: Option<PathBuf>,
    /// Exit after this many VMs have ended (0: serve until killed).
    pub exit_after: usize,
    /// Seconds a peer has to send its whole handshake.
    pub handshake_timeout_s: f64,
    /// Largest handshake accepted, in bytes.
    pub max_handshake_bytes: usize,
    /// Most regions one VM may declare (the state a VM costs the server is
    /// bounded by the memory file: regions may not share its bytes).
    pub max_regions: usize,
    /// Handshakes read at once at most; further connections wait in the
    /// listen backlog (a peer that connects and stalls holds one for up to
    /// --handshake-timeout-s).
    pub max_pending_handshakes: usize,
    /// Handshakes read at once from one user id at most; a connection past
    /// it is closed at once. A VMM sends one handshake per VM, and a
    /// jailed Firecracker runs as a user of its own, so a peer that opens
    /// connections and stalls can only delay its own user's VMs.
    pub max_handshakes_per_uid: usize,
}

/// The name a single `--mem-file` snapshot is served and kept under.
const DEFAULT_SNAPSHOT: &str = "default";

/// One snapshot being served: where its bytes come from and how its VMs
/// are served.
struct Snapshot {
    name: String,
    /// `source_label` of its source.
    label: String,
    /// Its source, as a URL (logs, a VM's metadata).
    url: String,
    source: Arc<dyn PageSource>,
    template: SessionConfig,
    /// Recordings are tied to the memory file: fingerprinted once.
    id: Option<workset::SnapshotId>,
    socket: PathBuf,
    /// Set to stop its accept thread (removed from the directory).
    stop: Arc<AtomicBool>,
    listener_fd: OwnedFd,
}

/// A source VMs are served from, and the memory file behind it when it is
/// one (handed on by descriptor).
#[derive(Clone)]
struct Held {
    source: Arc<dyn PageSource>,
    file: Option<Arc<MemFile>>,
}

/// A VM being served, as the server must hand it on.
struct Vm {
    key: String,
    uffd: OwnedFd,
    conn: OwnedFd,
    pages: Arc<PageStateFile>,
}

/// What the threads of the server share.
struct Server {
    args: Config,
    engine: Arc<Engine>,
    fd_limit: u64,
    /// The service manager (READY=1, status lines), if any.
    notifier: Option<handoff::Notifier>,
    /// It, if it keeps descriptors (systemd's store, the supervisor): then
    /// every VM is handed to it, and a stop leaves VMs to the next server.
    keeper: Option<handoff::Notifier>,
    snapshots: Mutex<HashMap<String, Arc<Snapshot>>>,
    /// Served VMs by session id.
    vms: Mutex<HashMap<u64, Vm>>,
    /// Every source VMs are served from, by `source_label`.
    sources: Mutex<HashMap<String, Held>>,
    /// Accept threads hold off while a take-over is under way.
    paused: AtomicBool,
    pending: Arc<AtomicUsize>,
    /// Accept threads between their look at `paused` and handing a
    /// connection to a handshake thread (see `hand_over`).
    accepting: AtomicUsize,
    per_uid: Arc<Mutex<HashMap<u32, usize>>>,
    /// Totals of VMs that ended, for metrics (totals never go down).
    ended: Mutex<exporter::Counters>,
    adopted: AtomicU64,
    rejected: AtomicU64,
    started: std::time::Instant,
    next_key: AtomicU64,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Serves until SIGTERM/SIGINT (or `exit_after` VMs ended); see the
/// module documentation.
pub fn run(args: &Config) -> Result<(), ServeError> {
    // First, before any thread exists: descriptors handed to this process
    // (and room for those a predecessor sends).
    let mut fds = handoff::inherited().context("reading the descriptors handed to this server")?;
    let fd_limit = raise_fd_limit();
    let mut predecessor = None;
    if let Some(ctl) = &args.take_over {
        let mut received = handoff::takeover::take_over(ctl)
            .with_context(|| format!("taking over from the server at {}", ctl.display()))?;
        tracing::info!(
            fds = received.fds.len(),
            old_pid = received.old_pid,
            "received everything from the running server; it serves on until this one is ready"
        );
        fds.append(&mut received.fds);
        predecessor = Some(received);
    }
    let from_keeper = args.take_over.is_none();
    let inherited = handoff::Inherited::sort(fds);
    let notifier = handoff::Notifier::from_env();

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
    let mut config = EngineConfig {
        nice: Some(args.nice),
        ..EngineConfig::default()
    };
    if let Some(t) = args.threads {
        config.threads = t;
    }
    // The hook needs the server, which needs the engine: it finds the
    // server through this cell, set right after.
    let server_cell: Arc<std::sync::OnceLock<std::sync::Weak<Server>>> = Arc::default();
    let hook_cell = server_cell.clone();
    let ended_tx = Mutex::new(ended_tx);
    let hook = Box::new(move |report: &pager::SessionReport| {
        let server = hook_cell.get().and_then(|w| w.upgrade());
        if let Some(s) = &server {
            s.forget(report);
        }
        if let Some(f) = &stats_file {
            let mut line = serde_json::to_value(report).unwrap_or_default();
            // The engine's "group" is, here, the snapshot.
            if let (Some(group), Some(obj)) = (&report.group, line.as_object_mut()) {
                obj.remove("group");
                obj.insert("snapshot".into(), group.clone().into());
            }
            match serde_json::to_string(&line) {
                Ok(mut line) => {
                    // One write per line, newline included.
                    line.push('\n');
                    if let Ok(mut f) = f.lock() {
                        if let Err(e) = f.write_all(line.as_bytes()) {
                            limited!(error, "writing the stats file: {e}");
                        }
                    }
                }
                Err(e) => limited!(error, "encoding stats: {e}"),
            }
        }
        if let Ok(tx) = ended_tx.lock() {
            if let Some(rec) = &report.recording {
                let snapshot = report.group.clone().unwrap_or_default();
                let _ = tx.send(Msg::Recorded(snapshot, report.id, report.pid, rec.clone()));
            }
            let _ = tx.send(Msg::Ended);
        }
    });
    let engine =
        Arc::new(Engine::start(config, Some(hook)).context("starting the serving threads")?);
    let server = Arc::new(Server {
        args: args.clone(),
        engine: engine.clone(),
        fd_limit,
        keeper: notifier.as_ref().and_then(|n| n.keeper()).cloned(),
        notifier,
        snapshots: Mutex::default(),
        vms: Mutex::default(),
        sources: Mutex::default(),
        // A successor accepts no VM before the old server has let go.
        paused: AtomicBool::new(args.take_over.is_some()),
        pending: Arc::default(),
        accepting: AtomicUsize::new(0),
        per_uid: Arc::default(),
        ended: Mutex::default(),
        adopted: AtomicU64::new(0),
        rejected: AtomicU64::new(0),
        started: std::time::Instant::now(),
        next_key: AtomicU64::new(0),
    });
    let _ = server_cell.set(Arc::downgrade(&server));

    let handoff::Inherited {
        mut listeners,
        sources,
        vms,
        other,
        incomplete,
    } = inherited;
    for key in incomplete {
        if let Some(n) = &server.keeper {
            remove_vm(n, &key);
        }
        tracing::error!(
            vm = key,
            "a VM handed to this server lacks some of its descriptors: it cannot be served \
             (nor killed: its connection is among what is missing)"
        );
    }
    // A socket systemd activated under its unit's name serves the single
    // snapshot of --mem-file.
    if args.snapshot_dir.is_none() && !listeners.contains_key(DEFAULT_SNAPSHOT) {
        if let Some(o) = other
            .into_iter()
            .find(|o| handoff::is_unix_listener(o.fd.as_fd()))
        {
            tracing::info!(name = %o.name, "serving on the socket systemd activated");
            listeners.insert(DEFAULT_SNAPSHOT.to_string(), o.fd);
        }
    }
    server.load_snapshots(&mut listeners)?;
    // Everything that can fail at start is done: the old server may go.
    // Never serve a VM beside the process that served it until now.
    if let Some(received) = predecessor {
        received
            .accept(Duration::from_secs(10))
            .context("waiting for the old server to let go")?;
        server.paused.store(false, Ordering::SeqCst);
    }
    let adopted_at = std::time::Instant::now();
    let n = server.adopt(vms, sources, from_keeper);
    if n > 0 {
        tracing::info!(
            vms = n,
            ms = adopted_at.elapsed().as_secs_f64() * 1000.0,
            "VMs taken over: their page states adopted, every region woken"
        );
    }
    if let Some(addr) = args.metrics {
        let s = Arc::downgrade(&server);
        let m = exporter::spawn(addr, move || {
            s.upgrade().map(|s| s.sample()).unwrap_or_default()
        })
        .with_context(|| format!("serving metrics on {addr}"))?;
        tracing::info!(addr = %m.local_addr(), "metrics at http://{}/metrics", m.local_addr());
        std::mem::forget(m);
    }
    server.listen_control()?;
    if let Some(n) = &server.notifier {
        let status = format!("serving {} VMs", engine.session_count());
        if let Err(e) = n.ready(&status) {
            tracing::warn!("telling the keeper we are ready: {e}");
        }
    }

    let mut ended = 0usize;
    while let Ok(msg) = ended_rx.recv() {
        match msg {
            Msg::Recorded(snap, id, pid, rec) => server.save_recording(&snap, id, pid, &rec),
            Msg::EndRecordings => {
                let n = engine.end_recordings();
                tracing::info!(vms = n, "SIGUSR1: recording windows ended");
            }
            Msg::Reload => {
                if let Err(e) = server.load_snapshots(&mut BTreeMap::new()) {
                    tracing::error!("SIGHUP: reloading the snapshots: {e:#}");
                }
            }
            Msg::Ended => {
                ended += 1;
                if args.exit_after > 0 && ended >= args.exit_after {
                    tracing::info!(vms = ended, "exiting after the requested number of VMs");
                    if server.keeper.is_some() {
                        server.leave_to_keeper();
                    }
                    break;
                }
            }
            Msg::Signal(sig) => {
                if server.keeper.is_some() {
                    tracing::info!(signal = sig, "stopping");
                    server.leave_to_keeper();
                }
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
    for snap in lock(&server.snapshots).values() {
        let _ = std::fs::remove_file(&snap.socket);
    }
    engine.shutdown();
    // The VMs still served when the loop ended were ended by the shutdown:
    // their recordings are in the channel (the engine holds a sender, so
    // only what is there already is taken).
    while let Ok(msg) = ended_rx.try_recv() {
        if let Msg::Recorded(snap, id, pid, rec) = msg {
            server.save_recording(&snap, id, pid, &rec);
        }
    }
    Ok(())
}

impl Server {
    /// Opens every snapshot not served yet (from --mem-file, or the
    /// directory), with its listener: `listeners` holds inherited ones by
    /// snapshot name. Snapshots gone from the directory stop accepting.
    fn load_snapshots(self: &Arc<Self>, listeners: &mut BTreeMap<String, OwnedFd>) -> Result<()> {
        let single = match (&self.args.source, &self.args.mem_file) {
            (Some(_), Some(_)) => bail!("give --source or --mem-file, not both"),
            (Some(u), None) => Some(SourceUrl::parse(u)?),
            (None, Some(m)) => Some(SourceUrl::File(m.clone())),
            (None, None) => None,
        };
        let wanted: Vec<(String, SourceUrl, PathBuf, Option<PathBuf>)> = match (
            &self.args.snapshot_dir,
            single,
            &self.args.socket,
        ) {
            (Some(dir), _, _) => {
                let sock_dir = self.args.socket_dir.clone().unwrap_or_else(|| dir.clone());
                std::fs::create_dir_all(&sock_dir)
                    .with_context(|| format!("creating {}", sock_dir.display()))?;
                let mut v = Vec::new();
                let entries = std::fs::read_dir(dir)
                    .with_context(|| format!("reading the snapshot directory {}", dir.display()))?;
                for e in entries.flatten() {
                    let path = e.path();
                    let Some((stem, rank, url)) = source::dir_entry(&path) else {
                        continue;
                    };
                    let url = match url {
                        Ok(u) => u,
                        Err(e) => {
                            limited!(warn, file = %path.display(), "snapshot skipped: {e}");
                            continue;
                        }
                    };
                    if !handoff::valid_label(&stem) {
                        limited!(warn, file = %path.display(), "snapshot skipped: name must be letters, digits, '-' or '_'");
                        continue;
                    }
                    let ws = path.with_extension("pwws");
                    let prefetch = ws.exists().then_some(ws);
                    let sock = sock_dir.join(format!("{stem}.sock"));
                    v.push((rank, (stem, url, sock, prefetch)));
                }
                // One source per name, whatever order the directory lists
                // them in: a memory file, else an image, else a URL.
                v.sort_by(|a, b| (&a.1 .0, a.0).cmp(&(&b.1 .0, b.0)));
                let mut one: Vec<(String, SourceUrl, PathBuf, Option<PathBuf>)> = Vec::new();
                for (_, w) in v {
                    if one.last().is_some_and(|l| l.0 == w.0) {
                        limited!(warn, snapshot = %w.0, source = %w.1.display(), "snapshot skipped: another file gives the same name (a .mem is served before a .pwimg, a .pwimg before a .url)");
                        continue;
                    }
                    one.push(w);
                }
                one
            }
            (None, Some(url), Some(sock)) => vec![(
                DEFAULT_SNAPSHOT.to_string(),
                url,
                sock.clone(),
                self.args.prefetch.clone(),
            )],
            _ => bail!("give --mem-file (or --source) and --socket, or --snapshot-dir"),
        };
        let mut snaps = lock(&self.snapshots);
        // Gone from the directory: stop accepting (their VMs are served on).
        let names: std::collections::HashSet<&str> = wanted.iter().map(|w| w.0.as_str()).collect();
        let gone: Vec<String> = snaps
            .keys()
            .filter(|k| !names.contains(k.as_str()))
            .cloned()
            .collect();
        for name in gone {
            if let Some(s) = snaps.remove(&name) {
                s.stop.store(true, Ordering::Release);
                let _ = std::fs::remove_file(&s.socket);
                if let Some(n) = &self.keeper {
                    // Its source stays kept: its VMs are served on from it.
                    let _ = n.remove(&handoff::Name::Listen(name.clone()).render());
                }
                tracing::info!(snapshot = %name, "snapshot removed: its socket is closed, its VMs are served on");
            }
        }
        for (name, url, socket, prefetch) in wanted {
            if snaps.contains_key(&name) {
                continue;
            }
            let opened = (|| -> Result<Snapshot> {
                let opened = source::open(&url, &self.args.cache)?;
                let source = opened.source;
                let template = session_template(&self.args, &*source, prefetch.as_deref())?;
                let id = match &self.args.record {
                    Some(dir) => {
                        std::fs::create_dir_all(dir).with_context(|| {
                            format!("creating the recording directory {}", dir.display())
                        })?;
                        Some(crate::sets::source_snapshot_id(&*source)?)
                    }
                    None => None,
                };
                let (listener, inherited) = match listeners.remove(&name) {
                    Some(fd) if handoff::is_unix_listener(fd.as_fd()) => {
                        (UnixListener::from(fd), true)
                    }
                    Some(_) => {
                        tracing::warn!(snapshot = %name, "the descriptor handed over as its listener is not a listening Unix stream socket: binding a new one");
                        if let Some(n) = &self.keeper {
                            let _ = n.remove(&handoff::Name::Listen(name.clone()).render());
                        }
                        (bind(&socket)?, false)
                    }
                    None => (bind(&socket)?, false),
                };
                let listener_fd: OwnedFd = listener.into();
                let label = format!("{name}-{}", opened.identity);
                if let Some(n) = &self.keeper {
                    if !inherited {
                        n.store(
                            &handoff::Name::Listen(name.clone()).render(),
                            listener_fd.as_fd(),
                        )?;
                    }
                    // A memory file goes by descriptor; an image is opened
                    // again by its URL and known by its id.
                    if let Some(f) = &opened.file {
                        n.store(
                            &handoff::Name::Source(label.clone()).render(),
                            f.file().as_fd(),
                        )?;
                    }
                }
                lock(&self.sources).insert(
                    label.clone(),
                    Held {
                        source: source.clone(),
                        file: opened.file.clone(),
                    },
                );
                Ok(Snapshot {
                    label,
                    name: name.clone(),
                    url: url.display(),
                    source,
                    template,
                    id,
                    socket: socket.clone(),
                    stop: Arc::default(),
                    listener_fd,
                })
            })();
            let snap = match opened {
                Ok(s) => Arc::new(s),
                Err(e) if self.args.snapshot_dir.is_some() => {
                    tracing::error!(snapshot = %name, "snapshot not served: {e:#}");
                    continue;
                }
                Err(e) => return Err(e),
            };
            tracing::info!(
                snapshot = %name,
                socket = %snap.socket.display(),
                source = %snap.source.describe(),
                "listening for Firecracker UFFD handshakes"
            );
            let (me, s) = (self.clone(), snap.clone());
            std::thread::Builder::new()
                .name("pagewire-accept".into())
                .spawn(move || me.accept_loop(&s))
                .context("spawning the accept thread")?;
            snaps.insert(name, snap);
        }
        Ok(())
    }

    /// Serves on the VMs handed to this process. Each VM that cannot be
    /// served on is handled as --orphan-action says. Returns how many are
    /// served.
    fn adopt(
        &self,
        vms: BTreeMap<String, handoff::VmFds>,
        mut sources: BTreeMap<String, OwnedFd>,
        from_keeper: bool,
    ) -> usize {
        let mut opened: HashMap<String, Arc<dyn PageSource>> = HashMap::new();
        let mut served = 0;
        for (key, fds) in vms {
            match self.adopt_one(&key, &fds, &mut sources, &mut opened, from_keeper) {
                Ok(()) => served += 1,
                Err(e) => {
                    let why = format!("it could not be served on: {e:#}");
                    handoff::orphan::handle(&key, &fds, self.args.orphan_action, &why);
                    if let Some(n) = &self.keeper {
                        let _ = n.remove(&handoff::Name::Vm(key.clone()).render());
                    }
                }
            }
        }
        served
    }

    fn adopt_one(
        &self,
        key: &str,
        fds: &handoff::VmFds,
        sources: &mut BTreeMap<String, OwnedFd>,
        opened: &mut HashMap<String, Arc<dyn PageSource>>,
        from_keeper: bool,
    ) -> Result<()> {
        let (Some(uffd), Some(conn), Some(pages)) = (&fds.uffd, &fds.conn, &fds.pages) else {
            bail!("some of its descriptors are missing (userfaultfd, connection, page state)");
        };
        if handoff::hung_up(conn) {
            bail!("its VMM has exited");
        }
        let pages = Arc::new(
            PageStateFile::open(pages.try_clone().context("copying its page-state file")?)
                .context("reading its page-state file")?,
        );
        let meta: VmMeta = serde_json::from_slice(pages.meta()).context("reading its metadata")?;
        // The very file it was served from (by identity, never by path):
        // handed over with it, or open here already.
        let source = match opened.get(&meta.source) {
            Some(s) => s.clone(),
            None => {
                let known = lock(&self.sources).get(&meta.source).cloned();
                let s = match (known, sources.remove(&meta.source)) {
                    (Some(s), _) => s,
                    (None, Some(fd)) => {
                        let file = std::fs::File::from(fd);
                        if source_label(&meta.snapshot, &file)? != meta.source {
                            bail!("the memory file handed over for it is another file");
                        }
                        let f = Arc::new(
                            MemFile::from_file(file, &meta.path)
                                .context("opening its memory file (handed over)")?,
                        );
                        Held {
                            source: f.clone(),
                            file: Some(f),
                        }
                    }
                    // An image or an object in a store: opened again from
                    // its URL, and served on only if it is the very image
                    // (the label holds its id).
                    (None, None) => {
                        let url = meta.path.to_string_lossy().into_owned();
                        let reopened = SourceUrl::parse(&url)
                            .ok()
                            .filter(|u| !matches!(u, SourceUrl::File(_)))
                            .map(|u| source::open(&u, &self.args.cache));
                        match reopened {
                            Some(Ok(o))
                                if format!("{}-{}", meta.snapshot, o.identity) == meta.source =>
                            {
                                Held {
                                    source: o.source,
                                    file: o.file,
                                }
                            }
                            Some(Ok(_)) => bail!(
                                "its source {url} now holds another image than the one it was \
                                 served from"
                            ),
                            Some(Err(e)) => bail!("its source {url} cannot be opened again: {e}"),
                            None => bail!(
                                "its source ({}, snapshot {:?}) was not handed over and is not \
                                 open here",
                                meta.path.display(),
                                meta.snapshot
                            ),
                        }
                    }
                };
                lock(&self.sources).insert(meta.source.clone(), s.clone());
                opened.insert(meta.source.clone(), s.source.clone());
                s.source
            }
        };
        let config = lock(&self.snapshots)
            .get(&meta.snapshot)
            .map(|s| SessionConfig {
                // A restarted VM is past its start: no prefetch, no recording.
                prefetch: None,
                record: None,
                ..s.template.clone()
            })
            .unwrap_or_else(|| SessionConfig {
                cluster_pages: self.args.cluster_pages.max(1),
                adaptive_cluster: !self.args.fixed_cluster,
                ..SessionConfig::default()
            });
        let pid = handoff::peer_pid(conn.as_fd()).or(meta.pid);
        let census = pages.census();
        // Everything that can fail, before the session starts: a VM being
        // served must never be handled as an orphan.
        let vm = Vm {
            key: key.to_string(),
            uffd: uffd.try_clone().context("copying its userfaultfd")?,
            conn: conn.try_clone().context("copying its connection")?,
            pages: pages.clone(),
        };
        let spec = SessionSpec {
            name: meta.name.clone(),
            uffd: uffd::Uffd::adopt(uffd.try_clone().context("copying its userfaultfd")?)
                .context("its userfaultfd")?,
            regions: pages.regions().to_vec(),
            source,
            pid,
            hangup: Some(conn.try_clone().context("copying its connection")?),
            config,
            state: Some(pages.clone()),
            adopted: true,
            group: Some(meta.snapshot.clone()),
        };
        if !from_keeper {
            if let Some(n) = &self.keeper {
                if let Err(e) = store_vm(n, key, uffd.as_fd(), conn.as_fd(), pages.as_fd()) {
                    tracing::warn!(vm = key, "the keeper did not take this VM's descriptors: a restart of the server would lose it: {e}");
                }
            }
        }
        let handle = self.engine.add(spec)?;
        tracing::info!(
            vm = key,
            pid,
            present = census[2],
            discarded = census[3],
            in_flight = census[1] + census[4],
            "VM served on"
        );
        self.register(&handle, vm);
        self.adopted.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Keeps what a VM needs to be handed on, once its session runs. A
    /// session that ended already (its hook found nothing to forget) is
    /// forgotten here.
    fn register(&self, handle: &pager::SessionHandle, vm: Vm) {
        lock(&self.vms).insert(handle.id(), vm);
        // Ended already: its hook may have run before the insert and found
        // nothing. Its report follows the hook; forgetting twice is harmless.
        if handle.has_ended() {
            if let Some(report) = handle.wait(Duration::from_secs(10)) {
                self.forget(&report);
            }
        }
    }

    /// A VM ended: forget it (and tell the keeper).
    fn forget(&self, report: &pager::SessionReport) {
        let Some(vm) = lock(&self.vms).remove(&report.id) else {
            return;
        };
        if report.reason == pager::EndReason::Failed {
            // Its VMM may live on, with nobody to serve it.
            let fds = handoff::VmFds {
                uffd: None,
                conn: vm.conn.try_clone().ok(),
                pages: None,
            };
            let why = format!(
                "its session failed: {}",
                report.detail.as_deref().unwrap_or("unknown")
            );
            handoff::orphan::handle(&vm.key, &fds, self.args.orphan_action, &why);
        }
        if let Some(n) = &self.keeper {
            let _ = n.remove(&handoff::Name::Vm(vm.key.clone()).render());
        }
        lock(&self.ended).add(&counters(&report.stats));
    }

    /// Exits leaving every VM to the keeper, for the next server: no new
    /// VM joins (handshakes in flight finish and are kept), the serving
    /// threads stop with every event they read in the page states, and the
    /// sockets stay (they are the keeper's too).
    fn leave_to_keeper(&self) -> ! {
        self.paused.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now()
            + Duration::from_secs_f64(self.args.handshake_timeout_s.max(0.001) + 1.0);
        while self.accepting.load(Ordering::SeqCst) + self.pending.load(Ordering::SeqCst) > 0
            && std::time::Instant::now() < deadline
        {
            std::thread::sleep(Duration::from_millis(5));
        }
        self.engine.quiesce();
        tracing::info!(
            vms = self.engine.session_count(),
            "stopped: the VMs stay with the keeper for the next server"
        );
        std::process::exit(0);
    }

    /// Listens on the control socket for a successor (`--take-over`).
    fn listen_control(self: &Arc<Self>) -> Result<()> {
        let path = match (&self.args.control, &self.args.socket_dir, &self.args.socket) {
            (Some(p), _, _) => p.clone(),
            (None, Some(d), _) if self.args.snapshot_dir.is_some() => d.join("control"),
            (None, _, Some(s)) => {
                let mut p = s.clone().into_os_string();
                p.push(".control");
                PathBuf::from(p)
            }
            _ => return Ok(()),
        };
        let listener = handoff::takeover::listen(&path)
            .with_context(|| format!("the control socket {}", path.display()))?;
        let me = self.clone();
        std::thread::Builder::new()
            .name("pagewire-control".into())
            .spawn(move || loop {
                let conn = match handoff::takeover::accept_request(listener.as_fd()) {
                    Ok(c) => c,
                    Err(e) => {
                        limited!(error, "control socket: {e}");
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                };
                me.hand_over(&conn);
            })
            .context("spawning the control thread")?;
        Ok(())
    }

    /// A successor asked for everything: stop accepting, let handshakes in
    /// flight finish, send every descriptor, and exit once it has them
    /// (serving on until then; accepting again if it fails).
    fn hand_over(&self, conn: &OwnedFd) {
        if self.keeper.is_some() {
            // Its keeper would start another server on the same VMs.
            tracing::warn!("a successor asked to take over: refused, this server has a keeper");
            handoff::takeover::refuse(
                conn,
                "this server's VMs are kept by systemd or pagewire's supervisor: upgrade \
                 through it (SIGUSR2 to the supervisor, systemctl restart)",
            );
            return;
        }
        tracing::info!("a successor asks to take over: handing every VM to it");
        // Accept threads reserve `accepting` before they look at `paused`
        // (both SeqCst), so once this sees no reservation, no connection
        // can become a VM of this process any more.
        self.paused.store(true, Ordering::SeqCst);
        let deadline = std::time::Instant::now()
            + Duration::from_secs_f64(self.args.handshake_timeout_s.max(0.001) + 1.0);
        // `accepting` first: an accept thread moves its reservation to
        // `pending` before it drops it, so read in this order the two never
        // both miss it.
        while self.accepting.load(Ordering::SeqCst) + self.pending.load(Ordering::SeqCst) > 0 {
            if std::time::Instant::now() >= deadline {
                tracing::error!("the take-over is refused: handshakes are still in flight");
                handoff::takeover::refuse(conn, "handshakes still in flight; try again");
                self.paused.store(false, Ordering::SeqCst);
                return;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let result = (|| -> Result<usize> {
            let mut named = Vec::new();
            let dup = |fd: std::os::fd::BorrowedFd<'_>| fd.try_clone_to_owned();
            for s in lock(&self.snapshots).values() {
                named.push(handoff::Named {
                    name: handoff::Name::Listen(s.name.clone()).render(),
                    fd: dup(s.listener_fd.as_fd())?,
                });
            }
            // Every file a VM is served from, current or replaced since.
            for (label, held) in lock(&self.sources).iter() {
                if let Some(f) = &held.file {
                    named.push(handoff::Named {
                        name: handoff::Name::Source(label.clone()).render(),
                        fd: dup(f.file().as_fd())?,
                    });
                }
            }
            let vms = lock(&self.vms);
            for vm in vms.values() {
                for fd in [vm.uffd.as_fd(), vm.conn.as_fd(), vm.pages.as_fd()] {
                    named.push(handoff::Named {
                        name: handoff::Name::Vm(vm.key.clone()).render(),
                        fd: dup(fd)?,
                    });
                }
            }
            let n = vms.len();
            drop(vms);
            handoff::takeover::hand_over(conn, &named, Duration::from_secs(30))?;
            Ok(n)
        })();
        match result {
            Ok(n) => {
                // Not `engine.shutdown()`: that would end the sessions the
                // successor now serves. The serving threads stop (what they
                // read is in the page states), and the process exits; the
                // successor waits for that before it serves.
                self.engine.quiesce();
                handoff::takeover::goodbye(conn);
                tracing::info!(vms = n, "handed over: exiting (the successor serves on)");
                std::process::exit(0);
            }
            Err(e) => {
                tracing::error!("the take-over failed, serving on: {e:#}");
                self.paused.store(false, Ordering::Release);
            }
        }
    }

    /// Metrics at this moment.
    fn sample(&self) -> exporter::ServerSample {
        let vms = self
            .engine
            .sessions()
            .into_iter()
            .map(|h| {
                let st = h.stats();
                exporter::VmSample {
                    id: h.id(),
                    name: h.name().to_string(),
                    snapshot: h.group().unwrap_or_default().to_string(),
                    pid: h.pid(),
                    blocktime_by_thread: st
                        .blocktime_by_thread
                        .iter()
                        .map(|t| (t.tid, t.us))
                        .collect(),
                    counters: counters(&st),
                }
            })
            .collect();
        exporter::ServerSample {
            vms,
            ended: lock(&self.ended).clone(),
            sessions_adopted: self.adopted.load(Ordering::Relaxed),
            handshakes_rejected: self.rejected.load(Ordering::Relaxed),
            uptime_s: self.started.elapsed().as_secs_f64(),
        }
    }

    /// Writes a VM's recording as `<snapshot>-vm-<id>-pid<pid>.pwws` (the
    /// snapshot's name only with --snapshot-dir) in `--record`'s directory;
    /// a failure is logged, and the server goes on.
    fn save_recording(&self, snapshot: &str, id: u64, pid: Option<u32>, rec: &pager::Recording) {
        let Some(dir) = &self.args.record else {
            return;
        };
        let Some(snap_id) = lock(&self.snapshots).get(snapshot).and_then(|s| s.id) else {
            return;
        };
        let pid = pid.map_or_else(String::new, |p| format!("-pid{p}"));
        let prefix = if self.args.snapshot_dir.is_some() {
            format!("{snapshot}-")
        } else {
            String::new()
        };
        let path = dir.join(format!("{prefix}vm-{id}{pid}.pwws"));
        match crate::sets::save(rec, snap_id, &path) {
            Ok(set) => tracing::info!(
                path = %path.display(),
                pages = set.touches.len(),
                inferred = rec.inferred,
                "working set recorded"
            ),
            Err(e) => tracing::error!("{e:#}"),
        }
    }
}

/// A memory file's identity (device, inode), as the label it is kept
/// under: `<snapshot>-<dev>-<inode>`. A file replaced at the same path is
/// another source, kept apart: its VMs keep the bytes they started with.
fn source_label(snapshot: &str, file: &std::fs::File) -> Result<String> {
    Ok(format!("{snapshot}-{}", source::file_identity(file)?))
}

/// What a VM's page-state file says about it, for a successor.
#[derive(serde::Serialize, serde::Deserialize)]
struct VmMeta {
    name: String,
    snapshot: String,
    path: PathBuf,
    pid: Option<u32>,
    /// `source_label` of the file it is served from.
    source: String,
}

fn remove_vm(n: &handoff::Notifier, key: &str) {
    let _ = n.remove(&handoff::Name::Vm(key.into()).render());
}

fn store_vm(
    n: &handoff::Notifier,
    key: &str,
    uffd: std::os::fd::BorrowedFd<'_>,
    conn: std::os::fd::BorrowedFd<'_>,
    pages: std::os::fd::BorrowedFd<'_>,
) -> Result<(), handoff::HandoffError> {
    // In the order of handoff::VM_PARTS, in one message.
    n.store_all(
        &handoff::Name::Vm(key.into()).render(),
        &[uffd, conn, pages],
    )
}

/// The exporter's counters from a session's statistics.
fn counters(st: &pager::StatsSnapshot) -> exporter::Counters {
    let l = &st.first_touch_latency;
    exporter::Counters {
        faults: st.faults,
        pages_copied: st.pages_copied,
        pages_zeroed: st.pages_zeroed,
        pages_poisoned: st.pages_poisoned,
        pages_discarded: st.pages_discarded,
        bytes_copied: st.bytes_copied,
        pages_on_demand: st.pages_on_demand,
        pages_fault_around: st.pages_fault_around,
        pages_readahead: st.pages_readahead,
        pages_background: st.pages_background,
        pages_prefetched: st.pages_prefetched,
        latency: exporter::Latency {
            buckets: l.buckets.iter().map(|b| (b.le_us, b.count)).collect(),
            sum_us: l.mean_us * l.count as f64,
            count: l.count,
        },
        blocktime_us: st.blocktime_us,
    }
}

enum Msg {
    /// A VM ended (its report is written).
    Ended,
    /// A VM that recorded its working set ended (snapshot, session id,
    /// pid).
    Recorded(String, u64, Option<u32>, Arc<pager::Recording>),
    /// SIGHUP: read the snapshot directory again.
    Reload,
    /// SIGUSR1: end every recording window.
    EndRecordings,
    /// SIGTERM or SIGINT: end every VM (writing their reports) and exit.
    Signal(i32),
}

fn watch_signals(tx: mpsc::Sender<Msg>) -> Result<()> {
    use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM, SIGUSR1};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT, SIGUSR1, SIGHUP])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("pagewire-signals".into())
        .spawn(move || {
            for sig in signals.forever() {
                let msg = match sig {
                    SIGUSR1 => Msg::EndRecordings,
                    SIGHUP => Msg::Reload,
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
fn wait_for_room(pending: &AtomicUsize, args: &Config, engine: &Engine, fd_limit: u64) {
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
pub fn bind(path: &Path) -> Result<UnixListener> {
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

impl Server {
    fn accept_loop(self: &Arc<Self>, snap: &Arc<Snapshot>) {
        use rustix::event::{poll, PollFd, PollFlags};
        let listener = match snap.listener_fd.try_clone() {
            Ok(fd) => UnixListener::from(fd),
            Err(e) => {
                tracing::error!(snapshot = %snap.name, "cannot use its listening socket: {e}");
                return;
            }
        };
        let args = &self.args;
        loop {
            if snap.stop.load(Ordering::Acquire) {
                return;
            }
            // A reservation in `pending` first, then the look at `paused`
            // (see `hand_over`); the reservation becomes the handshake's.
            self.accepting.fetch_add(1, Ordering::SeqCst);
            let release = || {
                self.accepting.fetch_sub(1, Ordering::SeqCst);
            };
            if self.paused.load(Ordering::SeqCst) {
                release();
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
            // Wait for a connection a short while at a time, so that a
            // take-over or a removal is seen without a connection.
            let mut fds = [PollFd::new(&listener, PollFlags::IN)];
            let ts = rustix::time::Timespec {
                tv_sec: 0,
                tv_nsec: 50_000_000,
            };
            if !matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0) {
                release();
                continue;
            }
            if snap.stop.load(Ordering::Acquire) {
                release();
                continue;
            }
            wait_for_room(&self.pending, args, &self.engine, self.fd_limit);
            if self.paused.load(Ordering::SeqCst) {
                release();
                continue;
            }
            listener.set_nonblocking(true).ok();
            let stream = match listener.accept() {
                Ok((s, _)) => s,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    release();
                    continue;
                }
                Err(e) => {
                    release();
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
            let _ = stream.set_nonblocking(false);
            let uid = rustix::net::sockopt::socket_peercred(&stream)
                .map(|c| c.uid.as_raw())
                .unwrap_or(u32::MAX);
            {
                let mut counts = lock(&self.per_uid);
                let n = counts.entry(uid).or_insert(0);
                if *n >= args.max_handshakes_per_uid.max(1) {
                    limited!(
                        warn,
                        uid,
                        "user {uid} has {n} handshakes in flight: connection closed \
                         (--max-handshakes-per-uid)"
                    );
                    self.rejected.fetch_add(1, Ordering::Relaxed);
                    drop(counts);
                    release();
                    continue;
                }
                *n += 1;
            }
            // The reservation becomes a handshake in flight.
            self.pending.fetch_add(1, Ordering::SeqCst);
            release();
            let (done, per_uid_done) = (self.pending.clone(), self.per_uid.clone());
            let finished = move || {
                done.fetch_sub(1, Ordering::SeqCst);
                let mut counts = lock(&per_uid_done);
                if let Some(n) = counts.get_mut(&uid) {
                    *n -= 1;
                    if *n == 0 {
                        counts.remove(&uid);
                    }
                }
            };
            let (me, snap) = (self.clone(), snap.clone());
            let spawned = std::thread::Builder::new()
                .name("pagewire-handshake".into())
                // A handshake needs little stack; many may be read at once.
                .stack_size(256 << 10)
                .spawn({
                    let finished = finished.clone();
                    move || {
                        me.handle_connection(stream, &snap);
                        finished();
                    }
                });
            if let Err(e) = spawned {
                finished();
                limited!(error, "cannot start a handshake thread: {e}");
            }
        }
    }

    fn handle_connection(&self, stream: UnixStream, snap: &Snapshot) {
        let args = &self.args;
        let peer = rustix::net::sockopt::socket_peercred(&stream).ok();
        let pid = peer.map(|c| c.pid.as_raw_nonzero().get() as u32);
        let uid = peer.map(|c| c.uid.as_raw());
        let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
        let timeout = Duration::from_secs_f64(args.handshake_timeout_s.max(0.001));
        let source: Arc<dyn PageSource> = snap.source.clone();
        let (regions, uffd) = match read_handshake(&stream, timeout, args.max_handshake_bytes)
            .and_then(|(fc, fd)| Ok((to_regions(&fc, source.len(), args.max_regions)?, fd)))
        {
            Ok(v) => v,
            Err(e) => {
                self.rejected.fetch_add(1, Ordering::Relaxed);
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
            snapshot = %snap.name,
            regions = regions.len(),
            mib = total >> 20,
            "VM connected"
        );
        let name = format!("vm {who}");
        // Unique across server processes: time, this process, a counter.
        let key = format!(
            "{:x}-{:x}-{:x}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as u64),
            std::process::id(),
            self.next_key.fetch_add(1, Ordering::Relaxed)
        );
        let meta = VmMeta {
            name: name.clone(),
            snapshot: snap.name.clone(),
            path: PathBuf::from(&snap.url),
            pid,
            source: snap.label.clone(),
        };
        let prepared = (|| -> Result<(Arc<PageStateFile>, OwnedFd, OwnedFd)> {
            let meta = serde_json::to_vec(&meta)?;
            let pages = Arc::new(PageStateFile::create(&regions, &meta)?);
            Ok((
                pages,
                uffd.as_fd().try_clone_to_owned()?,
                stream.as_fd().try_clone_to_owned()?,
            ))
        })();
        let (pages, uffd_copy, conn_copy) = match prepared {
            Ok(v) => v,
            Err(e) => {
                limited!(error, peer = %who, "VM not served: its page state cannot be kept: {e:#}");
                return;
            }
        };
        let hangup: OwnedFd = stream.into();
        // Kept before the session starts: a server that dies right after
        // leaves the VM to its successor, never unserved and unkept.
        if let Some(n) = &self.keeper {
            if let Err(e) = store_vm(n, &key, uffd_copy.as_fd(), conn_copy.as_fd(), pages.as_fd()) {
                limited!(warn, peer = %who, "the keeper did not take this VM's descriptors: a restart of the server would lose it: {e}");
            }
        }
        let spec = SessionSpec {
            name,
            uffd,
            regions,
            source,
            pid,
            hangup: Some(hangup),
            config: snap.template.clone(),
            state: Some(pages.clone()),
            adopted: false,
            group: Some(snap.name.clone()),
        };
        match self.engine.add(spec) {
            Ok(handle) => self.register(
                &handle,
                Vm {
                    key,
                    uffd: uffd_copy,
                    conn: conn_copy,
                    pages,
                },
            ),
            Err(pager::EngineError::Stopping) if self.keeper.is_some() => {
                // The server is leaving its VMs to the next one: this one
                // too (it is with the keeper already).
            }
            Err(e) => {
                limited!(error, peer = %who, "VM not served: {e}");
                if let Some(n) = &self.keeper {
                    remove_vm(n, &key);
                }
            }
        }
    }
}

/// The configuration every VM's session starts from: tuning, and the
/// working set to record or prefetch (checked against the memory file once,
/// before any VM waits on it).
fn session_template(
    args: &Config,
    source: &dyn PageSource,
    prefetch: Option<&Path>,
) -> Result<SessionConfig> {
    if args.record.is_some() && prefetch.is_some() {
        bail!(
            "--record and --prefetch together: a prefetched page makes no fault, so the \
             recording would miss the set; record without --prefetch"
        );
    }
    let prefetch = match prefetch {
        Some(p) => {
            let snapshot = crate::sets::source_snapshot_id(source)?;
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
        record: args.record.as_ref().map(|_| args.recording.clone()),
        prefetch,
        ..SessionConfig::default()
    })
}
