//! The engine: serving threads shared by every session.
//!
//! Each worker waits on one epoll set holding every session's userfaultfd,
//! each watched process's pidfd and each session's hang-up fd. Userfaultfds
//! are level-triggered, not one-shot: re-arming would cost a system call
//! between reading a fault and serving it (measured: one page per fault went
//! from 33-36 to 40-45 MiB/s without it). Two workers may then wake for the
//! same readiness; they read under the session's write lock, so the second
//! finds nothing, off the faulting thread's path. With nothing ready, a worker takes one
//! step of queued work (readahead, then prefetch of a recorded working set,
//! then background population) and looks again, so queued work always
//! yields to faults. Work a session put aside (EAGAIN that lasted, see
//! `session.rs`) comes back through a timer heap: a worker's epoll wait ends
//! at the earliest deadline, and no worker waits on one session meanwhile.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rustix::event::epoll;
use rustix::io::Errno;
use serde::Serialize;
use uffd::Uffd;

use crate::layout::PageState;
use crate::persist::PageStateFile;
use crate::region::{validate, Region, RegionError};
use crate::session::{Faults, Recording, Served, Session, SessionConfig};
use crate::source::PageSource;
use crate::stats::StatsSnapshot;

/// Why the engine refused a session or could not start.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error("invalid regions: {0}")]
    Region(#[from] RegionError),
    #[error("process {pid} cannot be watched (pidfd_open: {errno}){}", pidfd_hint(*.errno))]
    Pidfd { pid: u32, errno: Errno },
    #[error("{what}: {errno}")]
    Os { what: &'static str, errno: Errno },
    #[error("the engine is shutting down")]
    Stopping,
    #[error("the page-state file describes other regions than the session's")]
    StateMismatch,
    #[error("the page-state file no longer describes the memory (the peer unmapped or moved part of it)")]
    LayoutChanged,
}

/// What a failed `pidfd_open` most likely means.
fn pidfd_hint(errno: Errno) -> &'static str {
    match errno {
        Errno::SRCH => "; it has exited already",
        Errno::MFILE | Errno::NFILE => {
            "; this process is out of file descriptors: raise its limit (ulimit -n, LimitNOFILE=)"
        }
        _ => "",
    }
}

/// The serving threads' default nice value (see [`EngineConfig::nice`]).
pub const DEFAULT_NICE: i32 = -10;

/// Engine-wide settings.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Serving threads (default: one per core).
    pub threads: usize,
    /// How many of them also populate memory in the background when idle
    /// (default 1). The others only serve faults, so a fault never waits
    /// for a background copy to finish on a busy machine, and background
    /// work never takes every core from the faulting process (measured:
    /// with 2 of 2 threads populating, loads that waited for the handler
    /// had a p99 of 460-490 µs; see docs/benchmarks.md).
    pub background_threads: usize,
    /// Nice value of the serving threads (set per thread), so that a busy
    /// served process does not keep them from the CPU: with 4 client
    /// threads on 2 cores, sequential first touch through serve went from
    /// 1.52-1.93 GiB/s to 2.20-2.46 at -10 (docs/benchmarks.md). A thread
    /// populating in the background goes back to the nice it started with
    /// meanwhile (see `Nice`). A negative value needs
    /// CAP_SYS_NICE; without it the threads keep their priority (a warning
    /// says so). `None`: leave it.
    pub nice: Option<i32>,
    /// How many serving threads map recorded working sets at once, at the
    /// serving priority (default: all). Measured on `bench --pattern hotset`
    /// replaying its recording through `serve` (256 MiB, 2 threads of 2):
    /// with both prefetching, the set was mapped 14-38 ms after the
    /// handshake and the client's touch took 20-46 ms; with one, 30-67 ms and
    /// 37-77 ms. The price is the guest's CPU meanwhile: its loads that
    /// waited had a p99 of 1.4-5.2 ms with both (descheduled), 0.5-0.7 ms
    /// with one.
    pub prefetch_threads: usize,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            threads: std::thread::available_parallelism().map_or(2, |n| n.get()),
            background_threads: 1,
            prefetch_threads: usize::MAX,
            nice: Some(DEFAULT_NICE),
        }
    }
}

/// What to serve.
pub struct SessionSpec {
    /// For logs and reports ("pid 1234", "vm-7").
    pub name: String,
    /// The userfaultfd, after its API handshake, with `regions` registered.
    pub uffd: Uffd,
    pub regions: Vec<Region>,
    pub source: Arc<dyn PageSource>,
    /// The process owning the memory: watched with a pidfd, and the session
    /// ends when it exits (the userfaultfd itself never signals that).
    pub pid: Option<u32>,
    /// The session also ends when this fd hangs up (a peer's socket).
    pub hangup: Option<OwnedFd>,
    pub config: SessionConfig,
    /// Keep page states in this file (made with `regions`, or adopted from
    /// an earlier server), so that the session can be handed on
    /// (`persist.rs`).
    pub state: Option<Arc<PageStateFile>>,
    /// What the session belongs to, for reports and metrics (`serve`: the
    /// snapshot it restores). Opaque to the engine.
    pub group: Option<String>,
    /// The session was served by an earlier process: wake every region once
    /// it is served, since faults that process read and never served are not
    /// sent again.
    pub adopted: bool,
}

/// Why a session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum EndReason {
    /// The watched process exited (pidfd).
    ProcessExited,
    /// The hang-up fd hung up (the peer closed its socket).
    HungUp,
    /// The kernel reported the address space gone (ESRCH).
    AddressSpaceGone,
    /// The session it was forked from ended.
    ParentEnded,
    /// Ended by the caller or by engine shutdown.
    Stopped,
    /// The peer's userfaultfd or memory cannot be served: the report's
    /// `detail` says why (its fd keeps failing, a fault could be neither
    /// served nor poisoned).
    Failed,
}

/// The summary of a session, when it ends.
#[derive(Debug, Clone, Serialize)]
pub struct SessionReport {
    pub id: u64,
    pub name: String,
    pub pid: Option<u32>,
    pub reason: EndReason,
    pub duration_ms: f64,
    pub regions: usize,
    pub bytes: u64,
    pub stats: StatsSnapshot,
    /// What the session belongs to (`SessionSpec::group`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    /// Why, when `reason` is `failed`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
    /// The working set recorded, when the session recorded one.
    #[serde(skip)]
    pub recording: Option<Arc<Recording>>,
}

type EndHook = Box<dyn Fn(&SessionReport) + Send + Sync>;

const KIND_UFFD: u64 = 0;
const KIND_PID: u64 = 1;
const KIND_HANGUP: u64 = 2;
const CONTROL: u64 = u64::MAX;

fn token(id: u64, kind: u64) -> epoll::EventData {
    epoll::EventData::new_u64(id << 2 | kind)
}

struct Entry {
    id: u64,
    session: Arc<Session>,
    pid: Option<u32>,
    pidfd: Option<OwnedFd>,
    hangup: Option<OwnedFd>,
    parent: Option<u64>,
    started: Instant,
    regions: usize,
    bytes: u64,
    group: Option<String>,
    report: Mutex<Option<SessionReport>>,
    done: Condvar,
}

struct Shared {
    epoll: OwnedFd,
    control: Arc<OwnedFd>,
    /// Sessions whose slow source finished a fetch their faults wait for.
    woken: Arc<Woken>,
    sessions: Mutex<HashMap<u64, Arc<Entry>>>,
    next_id: AtomicU64,
    stopping: AtomicBool,
    /// Background work: `epoch << 1 | pending`. Adding a session bumps the
    /// epoch, so a worker that found nothing to do clears `pending` only if
    /// no session arrived meanwhile.
    background: AtomicU64,
    /// Readahead work, `epoch << 1 | pending` as for `background`. Any idle
    /// thread reads ahead (no token): a stream's thread is waiting for it.
    readahead: AtomicU64,
    /// Prefetch work (a recorded working set to map), `epoch << 1 | pending`
    /// as for `readahead`; any idle thread takes its steps, after readahead.
    prefetch: AtomicU64,
    /// Threads populating in the background now, and at most.
    populators: Tokens,
    /// Threads prefetching now, and at most.
    prefetchers: Tokens,
    nice: Option<i32>,
    round_robin: AtomicUsize,
    on_end: Option<EndHook>,
    /// When to come back to sessions whose work met lasting EAGAIN and was
    /// put aside (session id), earliest first.
    timers: Mutex<BinaryHeap<Reverse<(Instant, u64)>>>,
    /// The earliest of `timers`, in nanoseconds from `started` (`u64::MAX`:
    /// none), read without the lock on every turn of the serving loop.
    next_timer_ns: AtomicU64,
    started: Instant,
}

/// Sessions a slow source woke (its waker ran, from a fetching thread):
/// their parked faults are served again by the next worker that looks.
struct Woken {
    ids: Mutex<Vec<u64>>,
    any: AtomicBool,
    control: Arc<OwnedFd>,
}

impl Woken {
    fn wake(&self, id: u64) {
        let mut ids = self.ids.lock().unwrap_or_else(|e| e.into_inner());
        if !ids.contains(&id) {
            ids.push(id);
        }
        self.any.store(true, Ordering::Release);
        drop(ids);
        let _ = rustix::io::write(&self.control, &1u64.to_ne_bytes());
    }

    fn take(&self, into: &mut Vec<u64>) {
        if !self.any.swap(false, Ordering::AcqRel) {
            return;
        }
        into.append(&mut self.ids.lock().unwrap_or_else(|e| e.into_inner()));
    }
}

/// Serving threads and the sessions they serve.
pub struct Engine {
    shared: Arc<Shared>,
    workers: Mutex<Vec<JoinHandle<()>>>,
}

/// A session being served.
#[derive(Clone)]
pub struct SessionHandle {
    entry: Arc<Entry>,
}

impl SessionHandle {
    pub fn id(&self) -> u64 {
        self.entry.id
    }

    pub fn stats(&self) -> StatsSnapshot {
        self.entry.session.stats.snapshot()
    }

    /// The session's name (as given in its spec).
    pub fn name(&self) -> &str {
        self.entry.session.name()
    }

    /// Whether the session has ended (its report may still be on its way:
    /// [`wait`](Self::wait) for it).
    pub fn has_ended(&self) -> bool {
        self.entry.session.is_ended()
    }

    /// What the session belongs to (`SessionSpec::group`).
    pub fn group(&self) -> Option<&str> {
        self.entry.group.as_deref()
    }

    /// The watched process.
    pub fn pid(&self) -> Option<u32> {
        self.entry.pid
    }

    /// The state of the page holding `addr`.
    pub fn page_state(&self, addr: u64) -> Option<PageState> {
        self.entry.session.page_state(addr)
    }

    /// The fault-around window (pages of its size) of the region holding
    /// `addr`, once a fault there has set it.
    pub fn fault_around_window(&self, addr: u64) -> Option<usize> {
        self.entry.session.fault_around_window_at(addr)
    }

    /// Ends the session's recording window now (see `SessionConfig::record`).
    pub fn end_recording(&self) {
        self.entry.session.end_recording();
    }

    /// The working set recorded so far, if the session records one.
    pub fn recording(&self) -> Option<Recording> {
        self.entry.session.recording()
    }

    /// Waits up to `timeout` for the session to end.
    pub fn wait(&self, timeout: Duration) -> Option<SessionReport> {
        let guard = self.entry.report.lock().unwrap_or_else(|e| e.into_inner());
        let (guard, _) = self
            .entry
            .done
            .wait_timeout_while(guard, timeout, |r| r.is_none())
            .unwrap_or_else(|e| e.into_inner());
        guard.clone()
    }
}

fn os(what: &'static str) -> impl Fn(Errno) -> EngineError {
    move |errno| EngineError::Os { what, errno }
}

impl Engine {
    /// Starts the serving threads. `on_end` is called once per session as it
    /// ends, on a serving thread.
    pub fn start(config: EngineConfig, on_end: Option<EndHook>) -> Result<Engine, EngineError> {
        let epoll = epoll::create(epoll::CreateFlags::CLOEXEC).map_err(os("epoll_create"))?;
        let control = Arc::new(
            rustix::event::eventfd(
                0,
                rustix::event::EventfdFlags::CLOEXEC | rustix::event::EventfdFlags::NONBLOCK,
            )
            .map_err(os("eventfd"))?,
        );
        epoll::add(
            &epoll,
            &control,
            epoll::EventData::new_u64(CONTROL),
            epoll::EventFlags::IN,
        )
        .map_err(os("epoll_ctl"))?;
        let shared = Arc::new(Shared {
            epoll,
            woken: Arc::new(Woken {
                ids: Mutex::new(Vec::with_capacity(64)),
                any: AtomicBool::new(false),
                control: control.clone(),
            }),
            control,
            sessions: Mutex::new(HashMap::new()),
            next_id: AtomicU64::new(1),
            stopping: AtomicBool::new(false),
            background: AtomicU64::new(0),
            readahead: AtomicU64::new(0),
            prefetch: AtomicU64::new(0),
            populators: Tokens::new(config.background_threads, config.threads),
            prefetchers: Tokens::new(config.prefetch_threads, config.threads),
            nice: config.nice,
            round_robin: AtomicUsize::new(0),
            on_end,
            // Room for the timers of many sessions at once, so that putting
            // work aside does not allocate (see `Scratch`).
            timers: Mutex::new(BinaryHeap::with_capacity(1024)),
            next_timer_ns: AtomicU64::new(u64::MAX),
            started: Instant::now(),
        });
        let mut workers = Vec::new();
        for n in 0..config.threads.max(1) {
            let s = shared.clone();

            let w = std::thread::Builder::new()
                .name(format!("pagewire-serve-{n}"))
                .spawn(move || worker(&s))
                .map_err(|e| EngineError::Os {
                    what: "spawning a serving thread",
                    errno: Errno::from_io_error(&e).unwrap_or(Errno::AGAIN),
                })?;
            workers.push(w);
        }
        Ok(Engine {
            shared,
            workers: Mutex::new(workers),
        })
    }

    /// Starts serving a session.
    pub fn add(&self, spec: SessionSpec) -> Result<SessionHandle, EngineError> {
        if self.shared.stopping.load(Ordering::Acquire) {
            return Err(EngineError::Stopping);
        }
        validate(&spec.regions, spec.source.len())?;
        if let Some(f) = &spec.state {
            if f.regions() != spec.regions.as_slice() {
                return Err(EngineError::StateMismatch);
            }
            let moved = f
                .journal_messages()
                .iter()
                .any(|m| matches!(m, uffd::Message::Unmap { .. } | uffd::Message::Remap { .. }));
            if f.layout_changed() || moved {
                return Err(EngineError::LayoutChanged);
            }
        }
        let pidfd = match spec.pid {
            Some(pid) => {
                let p = rustix::process::Pid::from_raw(pid as i32).ok_or(EngineError::Pidfd {
                    pid,
                    errno: Errno::INVAL,
                })?;
                Some(
                    rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                        .map_err(|errno| EngineError::Pidfd { pid, errno })?,
                )
            }
            None => None,
        };
        let regions = spec.regions.len();
        let bytes = spec.regions.iter().map(|r| r.len).sum();
        let session = Session::new(
            spec.name,
            spec.uffd,
            &spec.regions,
            spec.source,
            spec.config,
            spec.state,
        );
        let adopted = spec.adopted;
        let handle = self.shared.insert(
            Arc::new(session),
            spec.pid,
            pidfd,
            spec.hangup,
            None,
            regions,
            bytes,
            spec.group,
        )?;
        if adopted {
            handle.entry.session.wake_all();
        }
        Ok(handle)
    }

    /// Ends a session now (its memory is no longer served).
    pub fn end(&self, handle: &SessionHandle) {
        self.shared.end(handle.id(), EndReason::Stopped);
    }

    /// Ends the recording window of every session recording a working set
    /// (the operator marks the end of the start-up phase); returns how many.
    pub fn end_recordings(&self) -> usize {
        let entries: Vec<Arc<Entry>> = match self.shared.sessions.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return 0,
        };
        entries
            .iter()
            .filter(|e| e.session.recording_open())
            .map(|e| e.session.end_recording())
            .count()
    }

    /// Every session being served now (for metrics).
    pub fn sessions(&self) -> Vec<SessionHandle> {
        self.shared.sessions.lock().map_or_else(
            |_| Vec::new(),
            |m| {
                m.values()
                    .map(|e| SessionHandle { entry: e.clone() })
                    .collect()
            },
        )
    }

    /// Sessions being served.
    pub fn session_count(&self) -> usize {
        self.shared.sessions.lock().map_or(0, |s| s.len())
    }

    /// Stops the serving threads and waits for them, without ending any
    /// session: whatever a thread read from a userfaultfd is applied to page
    /// state before it stops (a REMOVE read is always recorded). For a
    /// process about to exit and leave its sessions to a successor (their
    /// page states in `persist` files); nothing is served afterwards.
    pub fn quiesce(&self) {
        self.shared.stopping.store(true, Ordering::Release);
        let _ = rustix::io::write(&self.shared.control, &1u64.to_ne_bytes());
        let workers = std::mem::take(&mut *self.workers.lock().unwrap_or_else(|e| e.into_inner()));
        for w in workers {
            let _ = w.join();
        }
    }

    /// Stops the serving threads and ends every session (each gets its
    /// report, with reason `Stopped`). Later calls do nothing.
    pub fn shutdown(&self) {
        self.quiesce();
        let ids: Vec<u64> = self
            .shared
            .sessions
            .lock()
            .map(|s| s.keys().copied().collect())
            .unwrap_or_default();
        for id in ids {
            self.shared.end(id, EndReason::Stopped);
        }
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl Shared {
    #[allow(clippy::too_many_arguments)]
    fn insert(
        &self,
        session: Arc<Session>,
        pid: Option<u32>,
        pidfd: Option<OwnedFd>,
        hangup: Option<OwnedFd>,
        parent: Option<u64>,
        regions: usize,
        bytes: u64,
        group: Option<String>,
    ) -> Result<SessionHandle, EngineError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let background = session.config().background;
        let woken = Arc::downgrade(&self.woken);
        session.set_waker(Arc::new(move || {
            if let Some(w) = woken.upgrade() {
                w.wake(id);
            }
        }));
        let entry = Arc::new(Entry {
            id,
            session,
            pid,
            pidfd,
            hangup,
            parent,
            started: Instant::now(),
            regions,
            bytes,
            group,
            report: Mutex::new(None),
            done: Condvar::new(),
        });
        self.sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, entry.clone());
        // `shutdown` sets `stopping`, then ends the sessions it finds under
        // the lock: one inserted after that must end itself, or nothing
        // would serve it and no report would say so.
        if self.stopping.load(Ordering::Acquire) {
            self.end(id, EndReason::Stopped);
            return Err(EngineError::Stopping);
        }
        let one_shot = epoll::EventFlags::ONESHOT;
        let added = (|| {
            epoll::add(
                &self.epoll,
                entry.session.uffd(),
                token(id, KIND_UFFD),
                epoll::EventFlags::IN,
            )?;
            if let Some(fd) = &entry.pidfd {
                epoll::add(
                    &self.epoll,
                    fd,
                    token(id, KIND_PID),
                    epoll::EventFlags::IN | one_shot,
                )?;
            }
            if let Some(fd) = &entry.hangup {
                epoll::add(
                    &self.epoll,
                    fd,
                    token(id, KIND_HANGUP),
                    epoll::EventFlags::RDHUP | epoll::EventFlags::HUP | one_shot,
                )?;
            }
            Ok(())
        })();
        if let Err(errno) = added {
            self.end(id, EndReason::Stopped);
            return Err(EngineError::Os {
                what: "epoll_ctl",
                errno,
            });
        }
        let prefetch = entry.session.prefetch_pending();
        for (wanted, flag) in [(background, &self.background), (prefetch, &self.prefetch)] {
            if wanted {
                raise(flag);
                // Wake a worker that may be asleep with nothing to wait for.
                let _ = rustix::io::write(&self.control, &1u64.to_ne_bytes());
            }
        }
        crate::limited!(
            burst = 1000,
            info,
            id,
            name = entry.session.name(),
            pid,
            regions,
            bytes,
            "session started"
        );
        Ok(SessionHandle { entry })
    }

    fn get(&self, id: u64) -> Option<Arc<Entry>> {
        self.sessions.lock().ok()?.get(&id).cloned()
    }

    /// Ends session `id` (once) and the sessions forked from it.
    fn end(&self, id: u64, reason: EndReason) {
        self.end_with(id, reason, None);
    }

    /// Ends session `id` as `end` does, with a reason for the report.
    fn end_with(&self, id: u64, reason: EndReason, detail: Option<String>) {
        let (entry, children) = {
            let mut map = self.sessions.lock().unwrap_or_else(|e| e.into_inner());
            let Some(entry) = map.remove(&id) else { return };
            let children: Vec<u64> = map
                .values()
                .filter(|e| e.parent == Some(id))
                .map(|e| e.id)
                .collect();
            (entry, children)
        };
        entry.session.mark_ended();
        let _ = epoll::delete(&self.epoll, entry.session.uffd());
        if let Some(fd) = &entry.pidfd {
            let _ = epoll::delete(&self.epoll, fd);
        }
        if let Some(fd) = &entry.hangup {
            let _ = epoll::delete(&self.epoll, fd);
        }
        let report = SessionReport {
            id,
            name: entry.session.name().to_string(),
            pid: entry.pid,
            reason,
            duration_ms: entry.started.elapsed().as_secs_f64() * 1000.0,
            regions: entry.regions,
            bytes: entry.bytes,
            stats: entry.session.stats.snapshot(),
            detail,
            group: entry.group.clone(),
            recording: entry.session.recording().map(Arc::new),
        };
        match &report.detail {
            Some(why) => crate::limited!(
                error,
                id,
                name = %report.name,
                faults = report.stats.faults,
                "session ended: {why}"
            ),
            None => crate::limited!(
                burst = 1000,
                info,
                id,
                name = %report.name,
                ?reason,
                faults = report.stats.faults,
                copied = report.stats.pages_copied,
                zeroed = report.stats.pages_zeroed,
                unasked = report.stats.pages_unasked,
                prefetched = report.stats.pages_prefetched,
                errors = report.stats.errors,
                "session ended"
            ),
        }
        if let Some(hook) = &self.on_end {
            hook(&report);
        }
        *entry.report.lock().unwrap_or_else(|e| e.into_inner()) = Some(report);
        entry.done.notify_all();
        for child in children {
            self.end(child, EndReason::ParentEnded);
        }
    }

    fn serve_uffd(&self, entry: &Arc<Entry>, scratch: &mut Scratch) {
        let session = &entry.session;
        // Leave room for a batch: a fault that meets EAGAIN reads the
        // queued events itself into the same buffer.
        session.pump(&mut scratch.faults, &mut scratch.events, uffd::MAX_BATCH);
        self.serve_faults(entry, scratch);
    }

    fn serve_faults(&self, entry: &Arc<Entry>, scratch: &mut Scratch) {
        while let Some(f) = scratch.faults.pop_front() {
            match entry
                .session
                .serve_fault(f, &mut scratch.faults, &mut scratch.events)
            {
                Served::Done | Served::PutAside => {}
                Served::ProcessGone => {
                    scratch.faults.clear();
                    self.end(entry.id, EndReason::AddressSpaceGone);
                    return;
                }
                Served::Unservable => break,
            }
        }
        scratch.faults.clear();
        if self.end_if_failed(entry) {
            return;
        }
        self.schedule(entry);
        for (added, flag) in [
            (entry.session.take_ahead_added(), &self.readahead),
            (entry.session.take_prefetch_added(), &self.prefetch),
        ] {
            if added {
                raise(flag);
                // Wake an idle thread to share the copying.
                let _ = rustix::io::write(&self.control, &1u64.to_ne_bytes());
            }
        }
        self.adopt_forks(entry);
    }

    fn adopt_forks(&self, entry: &Arc<Entry>) {
        for (child, layout) in entry.session.take_forks() {
            let Some(layout) = layout else {
                crate::limited!(
                    info,
                    session = entry.session.name(),
                    "fork: child not served (its userfaultfd is closed)"
                );
                continue;
            };
            let name = format!("{} (fork)", entry.session.name());
            let session = Arc::new(entry.session.forked(name, child, layout));
            if let Err(e) = self.insert(
                session,
                None,
                None,
                None,
                Some(entry.id),
                entry.regions,
                entry.bytes,
                entry.group.clone(),
            ) {
                crate::limited!(
                    error,
                    session = entry.session.name(),
                    "fork: cannot serve the child: {e}"
                );
            }
        }
    }

    /// Ends the session if it cannot go on (its failure says why). The
    /// threads of a VM whose session fails this way keep waiting on the
    /// VMM's own copy of the userfaultfd; the log and the report say why.
    fn end_if_failed(&self, entry: &Arc<Entry>) -> bool {
        match entry.session.take_failure() {
            Some(why) => {
                self.end_with(entry.id, EndReason::Failed, Some(why));
                true
            }
            None => false,
        }
    }

    /// Asks for a timer if the session put work aside.
    fn schedule(&self, entry: &Arc<Entry>) {
        if let Some(at) = entry.session.take_retry_at() {
            let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
            timers.push(Reverse((at, entry.id)));
            self.publish_next_timer(&timers);
            drop(timers);
            // A worker asleep in epoll_wait must see the new deadline.
            let _ = rustix::io::write(&self.control, &1u64.to_ne_bytes());
        }
    }

    /// Records the earliest timer for `next_timer` (called with the lock).
    fn publish_next_timer(&self, timers: &BinaryHeap<Reverse<(Instant, u64)>>) {
        let ns = timers.peek().map_or(u64::MAX, |Reverse((at, _))| {
            at.saturating_duration_since(self.started).as_nanos() as u64
        });
        self.next_timer_ns.store(ns, Ordering::Release);
    }

    /// The earliest timer, if any.
    fn next_timer(&self) -> Option<Instant> {
        match self.next_timer_ns.load(Ordering::Acquire) {
            u64::MAX => None,
            ns => Some(self.started + Duration::from_nanos(ns)),
        }
    }

    /// Serves the work put aside by sessions whose timers are due, and lets
    /// readahead and background population look again.
    fn run_timers(&self, scratch: &mut Scratch) {
        let now = Instant::now();
        loop {
            let id = {
                let mut timers = self.timers.lock().unwrap_or_else(|e| e.into_inner());
                match timers.peek() {
                    Some(Reverse((at, id))) if *at <= now => {
                        let id = *id;
                        timers.pop();
                        self.publish_next_timer(&timers);
                        id
                    }
                    _ => return,
                }
            };
            let Some(entry) = self.get(id) else { continue };
            entry.session.take_put_aside(&mut scratch.faults);
            self.serve_faults(&entry, scratch);
            for flag in [&self.background, &self.readahead, &self.prefetch] {
                raise(flag);
            }
        }
    }

    /// Serves again the faults of sessions whose slow source finished a
    /// fetch, and lets their queued work go on.
    fn run_woken(&self, scratch: &mut Scratch) {
        let mut ids = std::mem::take(&mut scratch.woken);
        self.woken.take(&mut ids);
        for id in ids.drain(..) {
            let Some(entry) = self.get(id) else { continue };
            entry.session.take_source_woken(&mut scratch.faults);
            self.serve_faults(&entry, scratch);
            for flag in [&self.background, &self.readahead, &self.prefetch] {
                raise(flag);
            }
        }
        scratch.woken = ids;
    }

    /// One readahead step on the next session that has some.
    fn readahead_round(&self, scratch: &mut Scratch) -> bool {
        self.round(scratch, Session::readahead_step)
    }

    /// One prefetch step on the next session that has some.
    fn prefetch_round(&self, scratch: &mut Scratch) -> bool {
        self.round(scratch, Session::prefetch_step)
    }

    /// One background step on the next session that has work.
    fn background_round(&self, scratch: &mut Scratch) -> bool {
        self.round(scratch, Session::background_step)
    }

    /// One `step` on the next session (round robin) for which it finds
    /// work. Returns whether any session did some.
    fn round(
        &self,
        scratch: &mut Scratch,
        step: fn(&Session, &mut Faults, &mut Vec<uffd::Event>) -> Option<Served>,
    ) -> bool {
        let entries: Vec<Arc<Entry>> = match self.sessions.lock() {
            Ok(m) => m.values().cloned().collect(),
            Err(_) => return false,
        };
        let n = entries.len();
        let start = self.round_robin.fetch_add(1, Ordering::Relaxed);
        for k in 0..n {
            let entry = &entries[(start + k) % n.max(1)];
            match step(&entry.session, &mut scratch.faults, &mut scratch.events) {
                None => continue,
                Some(Served::ProcessGone) => {
                    scratch.faults.clear();
                    self.end(entry.id, EndReason::AddressSpaceGone);
                    return true;
                }
                Some(Served::Done | Served::PutAside | Served::Unservable) => {
                    // Faults read while retrying belong to this session.
                    self.serve_faults(entry, scratch);
                    return true;
                }
            }
        }
        false
    }
}

/// Per-worker buffers, allocated before serving starts: between being woken
/// and reading the userfaultfd a worker must not allocate, because a thread
/// of the served process may be inside `fork()` holding the allocator's
/// locks while it waits for that very read (EVENT_FORK, in-process use).
struct Scratch {
    faults: Faults,
    events: Vec<uffd::Event>,
    /// Session ids a slow source woke (`Shared::run_woken`).
    woken: Vec<u64>,
}

/// A serving thread. When background work is pending it takes background
/// steps between faults, if it holds one of the `background_threads` tokens
/// (any thread may take a free one: whichever thread drained the kick).
fn worker(shared: &Shared) {
    let mut holds_token = false;
    let mut holds_prefetch = false;
    let mut nice = Nice::new(shared.nice);
    let mut events: Vec<epoll::Event> = Vec::with_capacity(16);
    let mut scratch = Scratch {
        faults: Faults::with_capacity(4 * uffd::MAX_BATCH),
        events: Vec::with_capacity(uffd::MAX_BATCH),
        woken: Vec::with_capacity(64),
    };
    let zero = rustix::event::Timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    loop {
        if shared.stopping.load(Ordering::Acquire) {
            return;
        }
        let background = shared.background.load(Ordering::Acquire);
        let populate = shared
            .populators
            .keep(&mut holds_token, background & 1 == 1);
        let readahead = shared.readahead.load(Ordering::Acquire);
        let ahead = readahead & 1 == 1;
        let prefetch = shared.prefetch.load(Ordering::Acquire);
        let prefetching = shared
            .prefetchers
            .keep(&mut holds_prefetch, prefetch & 1 == 1);
        events.clear();
        let until_timer = shared.next_timer().map(|at| {
            let d = at.saturating_duration_since(Instant::now());
            rustix::event::Timespec {
                tv_sec: d.as_secs() as i64,
                tv_nsec: d.subsec_nanos() as i64,
            }
        });
        let timeout = if populate || ahead || prefetching {
            Some(&zero)
        } else {
            until_timer.as_ref()
        };
        match epoll::wait(
            &shared.epoll,
            rustix::buffer::spare_capacity(&mut events),
            timeout,
        ) {
            Ok(_) | Err(Errno::INTR) => {}
            Err(e) => {
                crate::limited!(error, "epoll_wait: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        }
        for ev in &events {
            let data = ev.data.u64();
            if data == CONTROL {
                if shared.stopping.load(Ordering::Acquire) {
                    return;
                }
                // A kick: background work was added. Drain it.
                let mut b = [0u8; 8];
                let _ = rustix::io::read(&shared.control, &mut b);
                continue;
            }
            let (id, kind) = (data >> 2, data & 3);
            let Some(entry) = shared.get(id) else {
                continue;
            };
            match kind {
                KIND_UFFD => {
                    // An error on a userfaultfd that passed `Uffd::adopt`:
                    // the peer cleared O_NONBLOCK on the file it shares
                    // with us (epoll then reports an error on every wait).
                    let flags = ev.flags;
                    if flags.contains(epoll::EventFlags::ERR) && !entry.session.repair_fd() {
                        shared.end_if_failed(&entry);
                        continue;
                    }
                    nice.serving();
                    shared.serve_uffd(&entry, &mut scratch)
                }
                KIND_PID => shared.end(id, EndReason::ProcessExited),
                _ => shared.end(id, EndReason::HungUp),
            }
        }
        if shared.next_timer().is_some_and(|at| at <= Instant::now()) {
            nice.serving();
            shared.run_timers(&mut scratch);
        }
        if shared.woken.any.load(Ordering::Acquire) {
            nice.serving();
            shared.run_woken(&mut scratch);
        }
        if !events.is_empty() {
            continue;
        }
        if ahead {
            nice.serving();
            if !shared.readahead_round(&mut scratch) {
                settle(&shared.readahead, readahead);
            }
            continue;
        }
        if prefetching {
            // A recorded working set: the guest will fault on it soon, so
            // at the serving priority, but after readahead (a thread is
            // waiting for that now).
            nice.serving();
            if !shared.prefetch_round(&mut scratch) {
                settle(&shared.prefetch, prefetch);
            }
            continue;
        }
        if populate {
            nice.populating();
        }
        if populate && !shared.background_round(&mut scratch) {
            settle(&shared.background, background);
            shared.populators.keep(&mut holds_token, false);
        }
    }
}

/// Queued work of one kind (`Shared::readahead`, `prefetch`, `background`:
/// `epoch << 1 | pending`) was added: sets `pending` and bumps the epoch.
fn raise(flag: &AtomicU64) {
    let _ = flag.fetch_update(Ordering::AcqRel, Ordering::Acquire, |v| Some((v + 2) | 1));
}

/// A round found none of that work: clears `pending`, unless work was added
/// since the flag read `seen`.
fn settle(flag: &AtomicU64, seen: u64) {
    let _ = flag.compare_exchange(seen, seen & !1, Ordering::AcqRel, Ordering::Acquire);
}

/// At most so many serving threads doing one kind of queued work at once:
/// a thread takes a token while there is such work and gives it back when
/// there is none.
struct Tokens {
    taken: AtomicUsize,
    max: usize,
}

impl Tokens {
    /// `wanted` tokens at most, between 1 and `threads`.
    fn new(wanted: usize, threads: usize) -> Tokens {
        Tokens {
            taken: AtomicUsize::new(0),
            max: wanted.clamp(1, threads.max(1)),
        }
    }

    /// Takes a token (if one is free and this thread has none) while there
    /// is work, gives it back when there is none; returns whether this
    /// thread holds one and there is work.
    fn keep(&self, holds: &mut bool, work: bool) -> bool {
        if work && !*holds {
            *holds = self
                .taken
                .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                    (n < self.max).then_some(n + 1)
                })
                .is_ok();
        } else if !work && *holds {
            self.taken.fetch_sub(1, Ordering::AcqRel);
            *holds = false;
        }
        work && *holds
    }
}

/// A serving thread's nice value: [`EngineConfig::nice`] while it serves
/// faults or reads ahead of a stream (a faulting thread waits for that
/// work), the one it started with while it populates in the background:
/// work nobody waits for must not take a core from the served process at a
/// raised priority. (Measured, the fault-wait p99 during population was
/// within noise either way: 2.46-3.09x the floor's p50 in medians of 4-5
/// rounds, against 2.84-2.98x.) Readahead at the raised priority is what
/// keeps 4 client threads on 2 cores at the 1-thread speed: at the base
/// nice, 4-thread sequential fell from 2.29 to 1.84 GiB/s. Changed only on
/// a switch, one system call.
struct Nice {
    serving: Option<i32>,
    base: i32,
    current: i32,
}

impl Nice {
    fn new(serving: Option<i32>) -> Nice {
        let tid = rustix::thread::gettid();
        let base = rustix::process::getpriority_process(Some(tid)).unwrap_or(0);
        let mut n = Nice {
            serving,
            base,
            current: base,
        };
        n.serving();
        n
    }

    fn serving(&mut self) {
        self.set(self.serving.unwrap_or(self.base));
    }

    fn populating(&mut self) {
        self.set(self.base);
    }

    fn set(&mut self, nice: i32) {
        if nice != self.current {
            // Recorded even if the call fails (no CAP_SYS_NICE: warned
            // once), so that a failing value is tried again only on the
            // next switch, not before every fault.
            self.current = nice;
            set_nice(nice);
        }
    }
}

/// Sets the calling thread's nice value.
fn set_nice(nice: i32) {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), nice) {
        static WARNED: AtomicBool = AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "cannot set the serving threads' nice value to {nice} ({e}); they keep their \
                 priority. Raising it needs CAP_SYS_NICE (or an RLIMIT_NICE that allows it)."
            );
        }
    }
}

impl AsFd for SessionHandle {
    /// The session's userfaultfd.
    fn as_fd(&self) -> std::os::fd::BorrowedFd<'_> {
        self.entry.session.uffd().as_fd()
    }
}
