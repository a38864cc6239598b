//! `pagewire serve`: a drop-in Firecracker UFFD page-fault handler.
//!
//! Listens on a Unix socket; each connection is one VM that sends, in one
//! `sendmsg`, a JSON array of regions and its userfaultfd (SCM_RIGHTS). The
//! handshake is read on its own thread with a size bound and a deadline and
//! validated completely before the VM is served; a bad one is rejected with a
//! log line and disturbs nobody else. A VM ends when its socket hangs up or
//! its process exits (pidfd), whichever comes first.

use std::fs::OpenOptions;
use std::io::{IoSliceMut, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::FileTypeExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use pager::{
    Engine, EngineConfig, MemFile, PageSize, PageSource, Region, SessionConfig, SessionSpec,
};
use rustix::net::{RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags};
use serde::Deserialize;

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
    #[arg(long, default_value_t = 16)]
    pub cluster_pages: usize,
    /// Populate the rest of guest memory in the background (yields to faults).
    #[arg(long)]
    pub background: bool,
    /// 4 KiB pages per background step.
    #[arg(long, default_value_t = 64)]
    pub background_chunk: usize,
    /// Serving threads (default: one per core).
    #[arg(long)]
    pub threads: Option<usize>,
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

/// One region as Firecracker describes it. Unknown fields are ignored (newer
/// versions may add some); `page_size_kib` holds bytes despite its name and
/// is what older versions send instead of `page_size`.
#[derive(Debug, Deserialize)]
pub(crate) struct FcRegion {
    base_host_virt_addr: u64,
    size: u64,
    offset: u64,
    page_size: Option<u64>,
    page_size_kib: Option<u64>,
}

/// Why a handshake was refused.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Reject {
    #[error("peer closed the connection before sending a complete handshake ({0} bytes received)")]
    Eof(usize),
    #[error("no complete handshake within {0:?}")]
    Timeout(Duration),
    #[error("handshake larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("no userfaultfd received: the message must carry one fd (SCM_RIGHTS)")]
    NoFd,
    #[error("{0} file descriptors received: exactly one (the userfaultfd) is expected")]
    TooManyFds(usize),
    #[error("control data was truncated (too many or unexpected ancillary messages)")]
    Truncated,
    #[error("the received fd is not a userfaultfd")]
    NotUffd,
    #[error("no regions in the handshake")]
    NoRegions,
    #[error("region {index}: page_size {page_size} and page_size_kib {kib} disagree")]
    PageSizeConflict {
        index: usize,
        page_size: u64,
        kib: u64,
    },
    #[error("region {index}: page size {0} is not 4096 or 2097152", .page_size)]
    PageSize { index: usize, page_size: u64 },
    #[error("region {index}: no page_size")]
    NoPageSize { index: usize },
    #[error("{0}")]
    Regions(#[from] pager::RegionError),
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
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
    let mut config = EngineConfig::default();
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

/// Reads one handshake: bytes until they form one complete JSON value, and
/// exactly one fd, within `timeout` and `max` bytes.
pub(crate) fn read_handshake(
    stream: &UnixStream,
    timeout: Duration,
    max: usize,
) -> Result<(Vec<FcRegion>, uffd::Uffd), Reject> {
    let deadline = Instant::now() + timeout;
    let mut data: Vec<u8> = Vec::with_capacity(4096);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Reject::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg =
            match rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(m) => m,
                Err(rustix::io::Errno::AGAIN) => return Err(Reject::Timeout(timeout)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(Reject::Io(e.into())),
            };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(Reject::Truncated);
        }
        if msg.bytes == 0 {
            return Err(Reject::Eof(data.len()));
        }
        data.extend_from_slice(&chunk[..msg.bytes]);
        if data.len() > max {
            return Err(Reject::TooLarge(max));
        }
        let mut values = serde_json::Deserializer::from_slice(&data).into_iter::<Vec<FcRegion>>();
        match values.next() {
            Some(Ok(regions)) => {
                if fds.len() > 1 {
                    return Err(Reject::TooManyFds(fds.len()));
                }
                let fd = fds.pop().ok_or(Reject::NoFd)?;
                if !uffd::is_userfaultfd(fd.as_fd()) {
                    return Err(Reject::NotUffd);
                }
                return Ok((regions, uffd::Uffd::from_fd(fd)));
            }
            Some(Err(e)) if e.is_eof() => continue,
            Some(Err(e)) => return Err(Reject::Json(e.to_string())),
            None => continue, // only whitespace so far
        }
    }
}

/// Turns Firecracker's regions into the engine's, checking everything.
pub(crate) fn to_regions(fc: &[FcRegion], file_len: u64) -> Result<Vec<Region>, Reject> {
    if fc.is_empty() {
        return Err(Reject::NoRegions);
    }
    let mut out = Vec::with_capacity(fc.len());
    for (index, r) in fc.iter().enumerate() {
        let page_size = match (r.page_size, r.page_size_kib) {
            (Some(a), Some(b)) if a != b => {
                return Err(Reject::PageSizeConflict {
                    index,
                    page_size: a,
                    kib: b,
                })
            }
            (Some(a), _) | (None, Some(a)) => a,
            (None, None) => return Err(Reject::NoPageSize { index }),
        };
        let ps = PageSize::from_bytes(page_size).ok_or(Reject::PageSize { index, page_size })?;
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
        let fc: Vec<FcRegion> =
            serde_json::from_str(json).map_err(|e| Reject::Json(e.to_string()))?;
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
        assert!(matches!(parse("[]"), Err(Reject::NoRegions)));
        assert!(matches!(
            parse(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]"#),
            Err(Reject::PageSize { .. })
        ));
        assert!(matches!(
            parse(
                r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#
            ),
            Err(Reject::PageSizeConflict { .. })
        ));
        assert!(matches!(
            parse(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#),
            Err(Reject::NoPageSize { .. })
        ));
        assert!(matches!(
            parse(
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#
            ),
            Err(Reject::Regions(pager::RegionError::Overlap { .. }))
        ));
    }
}
