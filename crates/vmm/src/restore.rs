//! Restoring a snapshot three ways that must give the same guest:
//! eagerly (read the whole memory file), lazily with the pager embedded in
//! this process, and lazily through an external page server reached with
//! Firecracker's handshake (this VMM plays Firecracker's part).

use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use pager::{Engine, EngineConfig, SessionConfig, SessionHandle, SessionSpec, StatsSnapshot};
use uffd::{Features, RegisterMode, Uffd};

use crate::error::Error;
use crate::memory::GuestMemory;
use crate::state::VmState;
use crate::vm::{Vm, VmConfig, VmEvent};

/// How guest memory comes back.
#[derive(Debug, Clone)]
pub enum RestoreMode {
    /// Read the whole memory file before the guest runs.
    Eager,
    /// Serve pages on demand from threads inside this process.
    Embedded(EmbeddedOptions),
    /// Hand the userfaultfd to a page server (`pagewire serve`) on this socket.
    External { socket: PathBuf },
}

impl RestoreMode {
    pub fn name(&self) -> &'static str {
        match self {
            RestoreMode::Eager => "eager",
            RestoreMode::Embedded(_) => "embedded",
            RestoreMode::External { .. } => "serve",
        }
    }
}

/// Tuning of the embedded pager.
#[derive(Clone)]
pub struct EmbeddedOptions {
    /// Where the bytes come from (a pagewire image, object storage);
    /// default: the snapshot's memory file.
    pub source: Option<Arc<dyn pager::PageSource>>,
    pub threads: usize,
    pub cluster_pages: usize,
    /// Adaptive fault-around (see `pager::SessionConfig::adaptive_cluster`).
    pub adaptive_cluster: bool,
    pub background: bool,
    /// Pages per background step (`pager::SessionConfig::background_chunk`).
    pub background_chunk: usize,
    /// Record the working set (take it with [`Restored::recording`]).
    pub record: Option<pager::RecordConfig>,
    /// Map this recorded working set ahead of faults.
    pub prefetch: Option<pager::PrefetchSet>,
}

impl std::fmt::Debug for EmbeddedOptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedOptions")
            .field("source", &self.source.as_ref().map(|s| s.describe()))
            .field("threads", &self.threads)
            .field("cluster_pages", &self.cluster_pages)
            .field("adaptive_cluster", &self.adaptive_cluster)
            .field("background", &self.background)
            .field("background_chunk", &self.background_chunk)
            .field("record", &self.record)
            .field("prefetch", &self.prefetch)
            .finish()
    }
}

impl Default for EmbeddedOptions {
    fn default() -> EmbeddedOptions {
        EmbeddedOptions {
            source: None,
            threads: 2,
            cluster_pages: SessionConfig::default().cluster_pages,
            adaptive_cluster: true,
            background: false,
            background_chunk: SessionConfig::default().background_chunk,
            record: None,
            prefetch: None,
        }
    }
}

/// A restored VM, running, with whatever serves its memory.
pub struct Restored {
    /// The guest; see [`Vm::run_to_pass`].
    pub vm: Vm,
    pub state: VmState,
    /// When `restore` was called.
    pub started: Instant,
    /// From `started` until the vCPUs were running.
    pub resume_time: Duration,
    /// Eager restores: the bytes read from the memory file (its data; holes
    /// are zeros already).
    pub eager_bytes: Option<u64>,
    pager: Option<(Engine, SessionHandle)>,
    link: Option<ServerLink>,
    /// The VMM keeps its own userfaultfd open while an external server
    /// serves it: if the server dies, faults then wait (and the watch stops
    /// the VM) instead of the kernel silently mapping zero pages.
    _uffd: Option<Uffd>,
}

impl Restored {
    /// The embedded pager's statistics (None for other modes).
    pub fn pager_stats(&self) -> Option<StatsSnapshot> {
        self.pager.as_ref().map(|(_, h)| h.stats())
    }

    /// The working set the embedded pager recorded so far (None for other
    /// modes, or without `EmbeddedOptions::record`).
    pub fn recording(&self) -> Option<pager::Recording> {
        self.pager.as_ref().and_then(|(_, h)| h.recording())
    }

    /// Ends the embedded pager's recording window now.
    pub fn end_recording(&self) {
        if let Some((_, h)) = &self.pager {
            h.end_recording();
        }
    }

    /// Stops the guest, then whatever served it; returns the embedded
    /// pager's final statistics.
    pub fn finish(mut self) -> Result<Option<StatsSnapshot>, Error> {
        self.teardown()
    }

    /// The guest first: nothing may be served once its server is gone.
    fn teardown(&mut self) -> Result<Option<StatsSnapshot>, Error> {
        let stopped = self.vm.stop(Duration::from_secs(5));
        let stats = self.pager_stats();
        if let Some((engine, _)) = self.pager.take() {
            engine.shutdown();
        }
        if let Some(link) = self.link.take() {
            link.close();
        }
        stopped.map(|()| stats)
    }
}

impl Drop for Restored {
    fn drop(&mut self) {
        if let Err(e) = self.teardown() {
            tracing::error!("stopping the restored VM: {e}");
        }
    }
}

/// The connection to an external page server and the thread that watches
/// it for a hang-up.
struct ServerLink {
    stream: Arc<UnixStream>,
    done: Arc<AtomicBool>,
    watch: Option<JoinHandle<()>>,
}

impl ServerLink {
    fn new(stream: UnixStream, events: Sender<VmEvent>) -> Result<ServerLink, Error> {
        let stream = Arc::new(stream);
        let done = Arc::new(AtomicBool::new(false));
        let (s, d) = (stream.clone(), done.clone());
        let watch = std::thread::Builder::new()
            .name("server-watch".into())
            .spawn(move || watch_server(&s, &d, &events))
            .map_err(|e| Error::io("spawning the page-server watch", e))?;
        Ok(ServerLink {
            stream,
            done,
            watch: Some(watch),
        })
    }

    fn close(mut self) {
        self.done.store(true, Ordering::Release);
        if let Some(w) = self.watch.take() {
            let _ = w.join();
        }
        let _ = self.stream.shutdown(std::net::Shutdown::Both);
    }
}

fn watch_server(stream: &UnixStream, done: &AtomicBool, events: &Sender<VmEvent>) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let timeout = Timespec {
        tv_sec: 0,
        tv_nsec: 50_000_000,
    };
    let mut buf = [0u8; 256];
    while !done.load(Ordering::Acquire) {
        let mut fds = [PollFd::new(
            stream,
            PollFlags::IN | PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR,
        )];
        match poll(&mut fds, Some(&timeout)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(_) => break,
        }
        let rev = fds[0].revents();
        if rev.intersects(PollFlags::RDHUP | PollFlags::HUP | PollFlags::ERR) {
            break;
        }
        // The protocol has the server send nothing; drain and ignore.
        match rustix::io::read(stream.as_fd(), &mut buf) {
            Ok(0) => break,
            Ok(_) | Err(rustix::io::Errno::INTR) | Err(rustix::io::Errno::AGAIN) => continue,
            Err(_) => break,
        }
    }
    if !done.load(Ordering::Acquire) {
        tracing::error!("the page server hung up; stopping the VM");
        let _ = events.send(VmEvent::PageServerGone);
    }
}

/// Restores the VM described by `state_path` and starts it; with
/// `park_at`, vCPUs park after reporting that pass.
pub fn restore(
    state_path: &Path,
    mode: &RestoreMode,
    park_at: Option<u64>,
) -> Result<Restored, Error> {
    let started = Instant::now();
    let state = VmState::load(state_path)?;
    let mem_path = state.memory_path(state_path);
    let expected = state.memory.bytes;
    let given = match mode {
        RestoreMode::Embedded(o) => o.source.clone(),
        _ => None,
    };
    match std::fs::metadata(&mem_path) {
        _ if given.as_ref().is_some_and(|s| s.len() < expected) => {
            return Err(Error::ShortMemoryFile {
                path: given.as_ref().map_or_else(String::new, |s| s.describe()),
                actual: given.as_ref().map_or(0, |s| s.len()),
                expected,
            })
        }
        _ if given.is_some() => {}
        Ok(m) if m.len() < expected => {
            return Err(Error::ShortMemoryFile {
                path: mem_path.display().to_string(),
                actual: m.len(),
                expected,
            })
        }
        Ok(_) => {}
        // An external server may read a file this process cannot see.
        Err(_) if matches!(mode, RestoreMode::External { .. }) => {}
        Err(e) => {
            return Err(Error::io(
                format!("opening the memory file {}", mem_path.display()),
                e,
            ))
        }
    }
    tracing::debug!(at = ?started.elapsed(), "state loaded");
    let mut vm = Vm::create(VmConfig {
        mem_bytes: expected,
        vcpus: state.vcpus.len() as u32,
        backing: state.memory.backing,
    })?;
    let memory = vm.memory().clone();
    let page_size = memory.backing().page_size();
    let mut pager = None;
    let mut link = None;
    let mut kept_uffd = None;
    let mut eager_bytes = None;
    match mode {
        RestoreMode::Eager => {
            let f = std::fs::File::open(&mem_path)
                .map_err(|e| Error::io(format!("opening {}", mem_path.display()), e))?;
            eager_bytes = Some(memory.load(&f)?);
        }
        RestoreMode::Embedded(opts) => {
            let source: Arc<dyn pager::PageSource> = match given {
                Some(s) => s,
                None => Arc::new(
                    pager::MemFile::open(&mem_path)
                        .map_err(|e| Error::Engine(format!("memory file: {e}")))?,
                ),
            };
            tracing::debug!(at = ?started.elapsed(), "source open");
            pager = Some(serve_embedded(
                &memory,
                source,
                opts,
                format!("vm {}", state_path.display()),
            )?);
            tracing::debug!(at = ?started.elapsed(), "session added");
        }
        RestoreMode::External { socket } => {
            let uffd = register(memory.host_addr(), memory.len())?;
            let mapping =
                wire::firecracker::Mapping::new(memory.host_addr(), memory.len(), 0, page_size);
            let stream = wire::firecracker::send_handshake(socket, &[mapping], &uffd)?;
            link = Some(ServerLink::new(stream, vm.event_sender())?);
            kept_uffd = Some(uffd);
        }
    }
    tracing::debug!(at = ?started.elapsed(), "memory ready");
    vm.load_state(&state)?;
    vm.start(park_at)?;
    let resume_time = started.elapsed();
    Ok(Restored {
        vm,
        state,
        started,
        resume_time,
        eager_bytes,
        pager,
        link,
        _uffd: kept_uffd,
    })
}

/// Registers guest memory with a userfaultfd and serves its missing pages
/// from `source` with a pager engine running in this process (its own
/// threads). Faults report the faulting thread, so the session's statistics
/// have blocktime per vCPU thread ([`Vm::vcpu_tids`]).
pub fn serve_embedded(
    memory: &GuestMemory,
    source: Arc<dyn pager::PageSource>,
    opts: &EmbeddedOptions,
    name: String,
) -> Result<(Engine, SessionHandle), Error> {
    let uffd = register(memory.host_addr(), memory.len())?;
    let page_size = memory.backing().page_size();
    let engine = Engine::start(
        EngineConfig {
            threads: opts.threads.max(1),
            ..EngineConfig::default()
        },
        None,
    )
    .map_err(|e| Error::Engine(e.to_string()))?;
    let ps = pager::PageSize::from_bytes(page_size)
        .ok_or_else(|| Error::Engine(format!("page size {page_size}")))?;
    let handle = engine
        .add(SessionSpec {
            name,
            uffd,
            regions: vec![pager::Region {
                host_base: memory.host_addr(),
                len: memory.len(),
                source_offset: 0,
                page_size: ps,
            }],
            source,
            pid: None,
            hangup: None,
            config: SessionConfig {
                cluster_pages: opts.cluster_pages.max(1),
                adaptive_cluster: opts.adaptive_cluster,
                background: opts.background,
                background_chunk: opts.background_chunk.max(1),
                record: opts.record.clone(),
                prefetch: opts.prefetch.clone(),
                ..SessionConfig::default()
            },
            state: None,
            adopted: false,
            group: None,
        })
        .map_err(|e| Error::Engine(e.to_string()))?;
    Ok((engine, handle))
}

/// A userfaultfd (with REMOVE events, for balloons, and the faulting
/// thread's id) registered over guest memory in MISSING mode.
fn register(host: u64, len: u64) -> Result<Uffd, Error> {
    let uffd = Uffd::open().map_err(|e| Error::UffdOpen(e.to_string()))?;
    uffd.api(Features::EVENT_REMOVE | Features::THREAD_ID)
        .map_err(|e| Error::UffdOpen(e.to_string()))?;
    uffd.register(host, len as usize, RegisterMode::MISSING)?;
    Ok(uffd)
}
