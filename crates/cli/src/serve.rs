//! `pagewire serve`: a drop-in Firecracker UFFD page-fault handler.
//!
//! Listens on a Unix socket; each connection is one VM that sends, in one
//! `sendmsg`, a JSON array of regions and its userfaultfd (SCM_RIGHTS). The
//! handshake is read on its own thread with a size bound and a deadline and
//! validated completely before the VM is served; a bad one is rejected with a
//! log line and disturbs nobody else. A VM ends when its socket hangs up or
//! its process exits (pidfd), whichever comes first.

use std::fs::OpenOptions;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use pager::{
    Engine, EngineConfig, MemFile, PageSize, PageSource, Region, SessionConfig, SessionSpec,
};
use wire::firecracker::{read_handshake, HandshakeError, Mapping};

#[derive(clap::Args, Debug, Clone)]
pub struct ServeArgs {
    /// Unix socket to listen on (Firecracker's `mem_backend.backend_path`).
    #[arg(long)]
    pub socket: PathBuf,
    /// The snapshot's guest memory file (regions end to end).
    #[arg(long)]
    pub mem_file: PathBuf,
    /// 4 KiB pages served around each fault (aligned block; 1 = only the
    /// faulting page).
    #[arg(long, default_value_t = pager::DEFAULT_CLUSTER_PAGES)]
    pub cluster_pages: usize,
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
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Reject {
    #[error("{0}")]
    Handshake(#[from] HandshakeError),
    #[error("{0}")]
    Regions(#[from] pager::RegionError),
}

pub fn run(args: &ServeArgs) -> anyhow::Result<ExitCode> {
    let source: Arc<dyn PageSource> = Arc::new(
        MemFile::open(&args.mem_file)
            .with_context(|| format!("opening the memory file {}", args.mem_file.display()))?,
    );
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
                            tracing::error!("writing the stats file: {e}");
                        }
                    }
                }
                Err(e) => tracing::error!("encoding stats: {e}"),
            }
        }
        if let Ok(tx) = ended_tx.lock() {
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
        .spawn(move || accept_loop(&listener, &accept_engine, &source, &accept_args))
        .context("spawning the accept thread")?;

    let mut ended = 0usize;
    while let Ok(msg) = ended_rx.recv() {
        match msg {
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
    Ok(ExitCode::SUCCESS)
}

enum Msg {
    /// A VM ended (its report is written).
    Ended,
    /// SIGTERM or SIGINT: end every VM (writing their reports) and exit.
    Signal(i32),
}

fn watch_signals(tx: mpsc::Sender<Msg>) -> anyhow::Result<()> {
    use signal_hook::consts::{SIGINT, SIGTERM};
    let mut signals = signal_hook::iterator::Signals::new([SIGTERM, SIGINT])
        .context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("pagewire-signals".into())
        .spawn(move || {
            if let Some(sig) = signals.forever().next() {
                let _ = tx.send(Msg::Signal(sig));
            }
        })
        .context("spawning the signal thread")?;
    Ok(())
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
) {
    for conn in listener.incoming() {
        let stream = match conn {
            Ok(s) => s,
            Err(e) => {
                tracing::error!("accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let (engine, source, args) = (engine.clone(), source.clone(), args.clone());
        let spawned = std::thread::Builder::new()
            .name("pagewire-handshake".into())
            .spawn(move || handle_connection(stream, &engine, source, &args));
        if let Err(e) = spawned {
            tracing::error!("cannot start a handshake thread: {e}");
        }
    }
}

fn handle_connection(
    stream: UnixStream,
    engine: &Engine,
    source: Arc<dyn PageSource>,
    args: &ServeArgs,
) {
    let peer = rustix::net::sockopt::socket_peercred(&stream).ok();
    let pid = peer.map(|c| c.pid.as_raw_nonzero().get() as u32);
    let uid = peer.map(|c| c.uid.as_raw());
    let who = pid.map_or_else(|| "unknown pid".to_string(), |p| format!("pid {p}"));
    let timeout = Duration::from_secs_f64(args.handshake_timeout_s.max(0.001));
    let (regions, uffd) = match read_handshake(&stream, timeout, args.max_handshake_bytes)
        .map_err(Reject::from)
        .and_then(|(fc, fd)| Ok((to_regions(&fc, source.len())?, fd)))
    {
        Ok(v) => v,
        Err(e) => {
            tracing::error!(
                peer = %who,
                uid,
                "handshake rejected: {e}. The connection is closed; a VMM that registered \
                 memory keeps its own userfaultfd and will block on its first missing page"
            );
            return;
        }
    };
    let total: u64 = regions.iter().map(|r| r.len).sum();
    tracing::info!(
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
        config: SessionConfig {
            cluster_pages: args.cluster_pages.max(1),
            background: args.background,
            background_chunk: args.background_chunk.max(1),
            ..SessionConfig::default()
        },
    };
    if let Err(e) = engine.add(spec) {
        tracing::error!(peer = %who, "VM not served: {e}");
    }
}

/// Turns Firecracker's regions into the engine's, checking everything.
pub(crate) fn to_regions(fc: &[Mapping], file_len: u64) -> Result<Vec<Region>, Reject> {
    if fc.is_empty() {
        return Err(HandshakeError::NoRegions.into());
    }
    let mut out = Vec::with_capacity(fc.len());
    for (index, r) in fc.iter().enumerate() {
        let page_size = r.page_size(index)?;
        let ps =
            PageSize::from_bytes(page_size).ok_or(HandshakeError::PageSize { index, page_size })?;
        out.push(Region {
            host_base: r.base_host_virt_addr,
            len: r.size,
            source_offset: r.offset,
            page_size: ps,
        });
    }
    pager::region::validate(&out, file_len)?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Vec<Region>, Reject> {
        let fc: Vec<Mapping> = serde_json::from_str(json)
            .map_err(|e| Reject::Handshake(HandshakeError::Json(e.to_string())))?;
        to_regions(&fc, 1 << 30)
    }

    #[test]
    fn accepts_firecracker_json() {
        let r = parse(r#"[{"base_host_virt_addr":139918424670208,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096}]"#)
            .expect("valid");
        assert_eq!(r[0].len, 256 << 20);
        // Older versions: page_size_kib only; newer: page_size only; extra fields ignored.
        assert!(parse(
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#
        )
        .is_ok());
        assert!(parse(
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"new":1}]"#
        )
        .is_ok());
    }

    #[test]
    fn rejects_bad_regions() {
        assert!(matches!(
            parse("[]"),
            Err(Reject::Handshake(HandshakeError::NoRegions))
        ));
        assert!(matches!(
            parse(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]"#),
            Err(Reject::Handshake(HandshakeError::PageSize { .. }))
        ));
        assert!(matches!(
            parse(
                r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#
            ),
            Err(Reject::Handshake(HandshakeError::PageSizeConflict { .. }))
        ));
        assert!(matches!(
            parse(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#),
            Err(Reject::Handshake(HandshakeError::NoPageSize { .. }))
        ));
        assert!(matches!(
            parse(
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#
            ),
            Err(Reject::Regions(pager::RegionError::Overlap { .. }))
        ));
    }
}
