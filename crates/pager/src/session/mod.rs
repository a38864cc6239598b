//! One served address space: a userfaultfd, its regions, a page source.
//!
//! # Shape
//! This file reads events and serves claims: whoever claims pages
//! (`Missing → Claimed`, by compare-and-swap on page state) hands them to
//! `serve_claims`, which reads the source and maps them. Faults are urgent
//! and served here at once; the other producers of work are queued, yield
//! to faults (a serving thread looks at epoll before each of their steps,
//! and a fault on a page they have not claimed yet claims it), and live in
//! files of their own: `fault_around.rs` (how many pages a fault maps),
//! `readahead.rs` (sequential streams), `prefetch.rs` (a recorded working
//! set), `background.rs` (the rest of memory); `record.rs` records what the
//! guest touched.
//!
//! # Why there is a lock around reading the userfaultfd
//! `MADV_DONTNEED` on registered memory queues a REMOVE event, blocks until
//! it is read, and only then zaps the range. A COPY issued after the event
//! was read can land after the zap and keep stale source bytes alive (the
//! balloon-vs-population race). So every resolving ioctl is issued under the
//! session's read lock after checking page state, and whoever reads the
//! userfaultfd holds the write lock from before the `read` until the events
//! in it are applied to page state. A COPY that started before the event was
//! queued lands before the zap; one issued while it is queued fails with
//! EAGAIN; one issued after it was read sees the page discarded.
//!
//! # Why a fault on a present page is not simply woken
//! The zap follows the read, so a page mapped between the two (a zero page
//! for a fault that raced the discard) is zapped while page state says
//! Present. A fault message is the kernel saying the page is missing *now*:
//! it is answered by mapping what the page must hold (zeros, for a page
//! that was mapped and is gone) and woken only on EEXIST. Page state is
//! what the engine did, never proof of what is mapped.
//!
//! # Why no serving thread waits for EAGAIN to pass
//! The kernel fails resolving ioctls until the thread that raised a queued
//! event runs again, which a busy or throttled VM may not do for
//! milliseconds. Serving threads are shared by every VM, so after a few
//! immediate retries the work is put aside (`put_aside`) and a timer of the
//! engine brings it back; the claims go back to the state they came from.
//!
//! # Why no serving thread waits for a slow source either
//! A remote store takes milliseconds per fetch. A read the source cannot
//! answer from what it holds answers `Pending` (it has started the fetch);
//! the claims go back, the fault is parked in `source_waiting`, and the
//! source's waker (set by the engine) brings it back once the bytes are
//! there. Meanwhile faults on bytes at hand, and every other VM, are served
//! as usual. A wake that lands between the read and the parking is not
//! lost: the waker counts its calls, and a fault parked after a count
//! changed is brought back at once.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock, RwLockReadGuard};
use std::time::{Duration, Instant};

use rustix::io::Errno;
use uffd::{CopyMode, Error as UffdError, Event, FaultFlags, Uffd};

use crate::layout::{Layout, PageState, RegionState};
use crate::persist::PageStateFile;
use crate::region::{PageSize, Region};
use crate::source::{PageSource, SourceError, Waker};
use crate::stats::{Cause, Stats};

mod background;
mod fault_around;
mod prefetch;
mod readahead;
mod record;

pub use prefetch::PrefetchSet;
pub use record::{RecordConfig, RecordedTouch, Recording};

/// Default pages served around a fault: 128 KiB, the kernel's default file
/// readahead. Measured on random first touch through `serve` (256 MiB):
/// 16 pages 0.77-0.87 GiB/s, 32 pages 1.05-1.10, 64 pages 1.13-1.18 with a
/// p99 1.6x higher (docs/benchmarks.md).
pub const DEFAULT_CLUSTER_PAGES: usize = 32;

/// How a session is served.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Pages served around each fault: the aligned block of this many pages
    /// holding the faulting page (1: only the faulting page). For 2 MiB
    /// regions the block is `cluster_pages * 4 KiB / 2 MiB` pages, at least 1.
    /// With `adaptive_cluster` this is where each region's window starts,
    /// and a quarter of its largest size (see `fault_around.rs`).
    pub cluster_pages: usize,
    /// Let each region's fault-around window follow how many of the pages
    /// beyond it the guest touches (`fault_around.rs`); otherwise it stays
    /// `cluster_pages`.
    pub adaptive_cluster: bool,
    /// Record the working set (`record.rs`). Beside `prefetch`, only what
    /// the guest faulted on is recorded: a prefetched page makes no fault.
    pub record: Option<RecordConfig>,
    /// Map this working set right away, at lower priority than faults
    /// (`prefetch.rs`).
    pub prefetch: Option<PrefetchSet>,
    /// Populate the rest of memory in the background, yielding to faults.
    pub background: bool,
    /// Pages per background step (4 KiB regions).
    pub background_chunk: usize,
    /// Serve the children of a fork (EVENT_FORK); otherwise their
    /// userfaultfd is closed and they see zero pages where they had none.
    pub serve_forks: bool,
    /// How often work that meets EAGAIN (events queued) is retried at once,
    /// after reading the events, before it is put aside and retried later
    /// (see `Session::put_aside`).
    pub quick_retries: u32,
    /// Sequential readahead: a fault where the previous cluster or window
    /// ended maps a cluster from it onwards at once, and idle serving threads
    /// map the window after it, doubling on each sequential fault up to this
    /// many 4 KiB pages. No readahead when it is not above `cluster_pages`
    /// (so `cluster_pages: 1` keeps one page per fault).
    pub max_readahead_pages: usize,
    /// Pages an idle serving thread claims and maps at a time while reading
    /// ahead of a sequential stream (4 KiB regions).
    pub readahead_chunk: usize,
    /// Zero runs of at most this many pages between data pages are mapped
    /// with the data in one COPY (they then use memory) instead of a
    /// ZEROPAGE each. 0: every zero page gets ZEROPAGE.
    pub zero_merge_pages: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            cluster_pages: DEFAULT_CLUSTER_PAGES,
            adaptive_cluster: true,
            record: None,
            prefetch: None,
            background: false,
            background_chunk: 8,
            serve_forks: false,
            quick_retries: 8,
            max_readahead_pages: 1024,
            readahead_chunk: 64,
            zero_merge_pages: 8,
        }
    }
}

/// A fault message waiting to be served.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Fault {
    pub addr: u64,
    pub flags: FaultFlags,
    pub read_at: Instant,
    /// The faulting thread (0: unknown; the VMM did not ask for
    /// `UFFD_FEATURE_THREAD_ID`).
    pub thread: u32,
    /// Put aside before (`put_aside`): not counted again, and tried once
    /// per timer rather than with quick retries.
    pub again: bool,
}

impl Fault {
    pub fn new(addr: u64, flags: FaultFlags, read_at: Instant) -> Fault {
        Fault {
            addr,
            flags,
            read_at,
            thread: 0,
            again: false,
        }
    }
}

/// Faults waiting to be served: a serving thread's buffer, allocated once
/// (see `engine::Scratch`), consumed from the front so that serving frees
/// room for the events a retry must read.
pub(crate) type Faults = std::collections::VecDeque<Fault>;

/// Why a serving step stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Served {
    Done,
    /// Done for now: the kernel kept refusing (EAGAIN, ENOMEM) and the work
    /// was put aside (`put_aside`), its claims given back.
    PutAside,
    ProcessGone,
    /// The session cannot go on (`Session::take_failure` says why): a fault
    /// could be neither served nor poisoned, or its userfaultfd fails.
    Unservable,
}

/// Work put aside (EAGAIN that lasted) is tried again after 1 ms (the
/// engine's timers have the millisecond resolution of epoll_wait), doubling
/// while nothing goes through, up to this: a VMM stopped while it raised an
/// event (SIGSTOP, a frozen cgroup) costs the server a retry per VM every
/// 64 ms, not a core.
const MAX_DEFER: Duration = Duration::from_millis(64);
/// Faults put aside per session at most (their room is allocated with the
/// session: no allocation on this path, see `engine::Scratch`); past it a
/// fault's page is woken instead, and its thread faults again.
const MAX_DEFERRED: usize = 256;
/// Times a peer may clear O_NONBLOCK on its userfaultfd before its session
/// ends (each one costs the server an epoll error wake-up and a fcntl).
const MAX_NONBLOCK_RESETS: u32 = 16;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Origin {
    Fault,
    /// Readahead ahead of a sequential stream.
    Readahead,
    Background,
    /// A recorded working set, mapped ahead of faults.
    Prefetch,
}

#[derive(Debug, Clone, Copy)]
struct Ctx {
    origin: Origin,
    read_at: Option<Instant>,
    /// The faulting thread (0: unknown).
    thread: u32,
    /// Read and map the faulting page on its own, before the rest of its
    /// cluster is read: its thread waits for one page.
    fault_alone: bool,
    /// Immediate retries after EAGAIN before the work is put aside (none
    /// for a fault that was put aside before: its timer is the retry).
    quick_retries: u32,
}

impl Ctx {
    /// Work no fault asked for (readahead, background population).
    fn unprompted(origin: Origin, quick_retries: u32) -> Ctx {
        Ctx {
            origin,
            read_at: None,
            thread: 0,
            fault_alone: false,
            quick_retries,
        }
    }
}

/// A size given in 4 KiB pages, in pages of size `ps` (at least 1).
fn pages_of(pages_4k: usize, ps: PageSize) -> usize {
    ((pages_4k.max(1) * 4096) / ps.bytes()).max(1)
}

#[derive(Debug, Clone, Copy)]
struct Claim {
    page: usize,
    zero: bool,
    /// The read buffer holds this page's bytes (set by `read_source`;
    /// cleared when the page is discarded meanwhile and becomes zero).
    in_buf: bool,
}

impl Claim {
    fn new(page: usize, zero: bool) -> Claim {
        Claim {
            page,
            zero,
            in_buf: false,
        }
    }
}

/// One address space being served.
pub struct Session {
    name: String,
    uffd: Uffd,
    source: Arc<dyn PageSource>,
    layout: RwLock<Layout>,
    pub(crate) stats: Stats,
    config: SessionConfig,
    background: Mutex<background::Cursor>,
    /// Fault-around windows, per region.
    sizer: Mutex<fault_around::Sizer>,
    /// The working set being recorded, and whether its window is open.
    recorder: Option<Mutex<record::Recorder>>,
    recording: AtomicBool,
    /// When the recording window closes, if it has a length.
    record_until: Option<Instant>,
    /// The working set being prefetched, and whether work was handed back
    /// to it (the engine raises its prefetch flag again).
    prefetch: Option<prefetch::Prefetch>,
    prefetch_added: AtomicBool,
    ended: AtomicBool,
    /// Where page states live when the session may be handed to another
    /// server (`persist.rs`); told when the layout stops matching it.
    state_file: Option<Arc<PageStateFile>>,
    /// Userfaultfds of forked children, read but not yet taken by the engine.
    /// With each, when forks are served, the page state the child starts
    /// from: taken as the FORK event is read, under the write lock, when
    /// the parent's page tables are what the child got (while a fork is in
    /// progress the kernel fails every COPY into the parent with EAGAIN).
    forks: Mutex<Vec<(Uffd, Option<Layout>)>>,
    /// Readahead: the sequential stream being followed.
    stream: Mutex<readahead::Stream>,
    /// Set when readahead work was added; the engine then wakes idle
    /// serving threads to do it.
    ahead_added: AtomicBool,
    /// Work put aside after lasting EAGAIN (see `put_aside`).
    aside: Mutex<Aside>,
    /// Why the session cannot go on; the engine ends it with this.
    failure: Mutex<Option<String>>,
    /// Times the peer cleared O_NONBLOCK on the userfaultfd.
    nonblock_resets: AtomicU32,
    /// Consecutive deferrals, for the delay; and whether readahead and
    /// background population are paused. Outside `aside`, so that the fault
    /// path looks at them without a lock.
    streak: AtomicU32,
    paused: AtomicBool,
    /// `failure` holds a reason.
    failed: AtomicBool,
    /// `aside.retry_at` was set since the engine last took it.
    retry_asked: AtomicBool,
    /// Faults whose bytes a slow source is fetching (see the module doc).
    source_waiting: Mutex<Vec<Fault>>,
    /// Calls of the waker so far.
    source_wakes: Arc<AtomicU64>,
    /// Given to the source with each read; set by the engine. Without it
    /// reads wait for the source (`PageSource::read_at`).
    waker: OnceLock<Waker>,
    /// Readahead, prefetch and background population wait for a fetch to
    /// end (their last read answered Pending). Apart from `paused`: it ends
    /// on the waker, not on a timer, and costs no back-off.
    source_paused: AtomicBool,
}

/// Work put aside because the kernel kept failing it with EAGAIN.
#[derive(Debug)]
struct Aside {
    faults: Vec<Fault>,
    /// Readahead and background population wait until then.
    unprompted_after: Option<Instant>,
    /// When the engine should come back (taken by `take_retry_at`).
    retry_at: Option<Instant>,
}

impl Aside {
    fn new() -> Aside {
        Aside {
            faults: Vec::with_capacity(MAX_DEFERRED),
            unprompted_after: None,
            retry_at: None,
        }
    }
}

/// A read buffer whose bytes start on a page boundary.
///
/// The allocator puts a large block 16 bytes into a page, and copies into
/// and out of such a block run several times slower here: `pread` of a
/// 256 MiB file in 1 MiB reads took 191-198 ms into a `malloc`ed buffer and
/// 34-39 ms into a page-aligned one (docs/benchmarks.md). Over-allocating by
/// a page and slicing from the first page boundary needs no `unsafe`.
#[derive(Default)]
struct PageBuf {
    raw: Vec<u8>,
    off: usize,
    len: usize,
}

const BUF_ALIGN: usize = 4096;

impl PageBuf {
    /// Makes room for `len` bytes and returns them (contents unspecified).
    fn prepare(&mut self, len: usize) -> &mut [u8] {
        if self.raw.len() < len + BUF_ALIGN {
            self.raw = vec![0u8; len + BUF_ALIGN];
        }
        let off = self.raw.as_ptr().align_offset(BUF_ALIGN);
        self.off = if off < BUF_ALIGN { off } else { 0 };
        self.len = len;
        &mut self.raw[self.off..self.off + len]
    }

    /// The bytes of the last `prepare`.
    fn data(&self) -> &[u8] {
        &self.raw[self.off..self.off + self.len]
    }

    fn data_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.off..self.off + self.len]
    }
}

thread_local! {
    static BUF: std::cell::RefCell<PageBuf> = std::cell::RefCell::new(PageBuf::default());
    static CLAIMS: std::cell::RefCell<Vec<Claim>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's claims buffer, emptied: no allocation per
/// fault once it has grown to the largest window.
fn with_claims<R>(f: impl FnOnce(&mut Vec<Claim>) -> R) -> R {
    let mut claims = CLAIMS.with(|c| std::mem::take(&mut *c.borrow_mut()));
    claims.clear();
    let r = f(&mut claims);
    CLAIMS.with(|c| *c.borrow_mut() = claims);
    r
}

/// Zeros to copy where ZEROPAGE is not available (hugetlbfs).
fn zeros(len: usize) -> &'static [u8] {
    static ZEROS: std::sync::OnceLock<Box<[u8]>> = std::sync::OnceLock::new();
    let z = ZEROS.get_or_init(|| vec![0u8; PageSize::Huge2M.bytes()].into_boxed_slice());
    &z[..len.min(z.len())]
}

impl Session {
    pub(crate) fn new(
        name: String,
        uffd: Uffd,
        regions: &[Region],
        source: Arc<dyn PageSource>,
        config: SessionConfig,
        state: Option<Arc<PageStateFile>>,
    ) -> Session {
        let (layout, let_go) = match &state {
            Some(file) => Layout::shared(file, source.zero_ranges()),
            None => (Layout::new(regions, source.zero_ranges()), 0),
        };
        if let_go > 0 {
            tracing::info!(
                session = %name,
                pages = let_go,
                "pages whose state the adoption changed: claims the previous server may not \
                 have mapped are missing again (a copy onto one that was mapped finds it \
                 there), and discards it read but never applied are replayed"
            );
        }
        let mut s = Self::with_layout(name, uffd, layout, source, config);
        s.state_file = state;
        s.hint_source();
        s
    }

    /// Reads messages from the userfaultfd (under the write lock). With a
    /// page-state file they are read into its journal, in memory that
    /// outlives this process: the kernel zaps a range once its REMOVE is
    /// read, so a server killed between the read and the discard below
    /// would otherwise leave its successor believing pages Missing that the
    /// guest released (it would serve them snapshot bytes). The successor
    /// replays what the journal holds (`persist.rs`).
    fn read_events(&self, events: &mut Vec<Event>) -> Result<usize, UffdError> {
        match &self.state_file {
            Some(f) => {
                f.with_journal(|buf| self.uffd.read_events_into(buf, events, uffd::MAX_BATCH))
            }
            None => self.uffd.read_events(events, uffd::MAX_BATCH),
        }
    }

    /// UNMAP or REMAP: the page-state file no longer describes the memory.
    fn layout_changes(&self) {
        if let Some(f) = &self.state_file {
            if !f.layout_changed() {
                f.mark_layout_changed();
                tracing::warn!(
                    session = %self.name,
                    "the peer unmapped or moved registered memory: this VM can no longer be \
                     handed to another server process"
                );
            }
        }
    }

    /// Wakes every thread waiting on a fault in any region: faults a
    /// previous server read but never served are not sent again, so their
    /// threads must fault anew (a thread whose page is there just goes on).
    pub(crate) fn wake_all(&self) -> usize {
        let layout = self.read_layout();
        let mut failed = 0;
        for r in &layout.regions {
            if let Err(e) = self.uffd.wake(r.region.host_base, r.region.len as usize) {
                failed += 1;
                crate::limited!(warn, session = %self.name, "waking a region after a take-over: {e}");
            }
        }
        layout.regions.len() - failed
    }

    /// A session for the child of a fork of this one, from the page state
    /// taken as the FORK event was read.
    /// The child neither records nor prefetches: its parent's set was
    /// mapped or is being mapped in the memory it copied.
    pub(crate) fn forked(&self, name: String, uffd: Uffd, layout: Layout) -> Session {
        let config = SessionConfig {
            record: None,
            prefetch: None,
            ..self.config.clone()
        };
        Self::with_layout(name, uffd, layout, self.source.clone(), config)
    }

    fn with_layout(
        name: String,
        uffd: Uffd,
        layout: Layout,
        source: Arc<dyn PageSource>,
        config: SessionConfig,
    ) -> Session {
        let started = Instant::now();
        let stats = Stats::default();
        let recorder = config
            .record
            .as_ref()
            .map(|r| Mutex::new(record::Recorder::new(r, source.len(), started)));
        let prefetch = config.prefetch.as_ref().map(|p| {
            prefetch::Prefetch::new(p, source.len(), started, &stats, |o| {
                prefetch::in_small_region(&layout, o)
            })
        });
        Session {
            name,
            uffd,
            source,
            layout: RwLock::new(layout),
            stats,
            background: Mutex::new(background::Cursor {
                done: !config.background,
                ..background::Cursor::default()
            }),
            sizer: Mutex::new(fault_around::Sizer::default()),
            recording: AtomicBool::new(recorder.is_some()),
            record_until: config
                .record
                .as_ref()
                .and_then(|r| r.window)
                .map(|w| started + w),
            recorder,
            prefetch,
            prefetch_added: AtomicBool::new(false),
            config,
            ended: AtomicBool::new(false),
            state_file: None,
            forks: Mutex::new(Vec::new()),
            stream: Mutex::new(readahead::Stream::default()),
            ahead_added: AtomicBool::new(false),
            aside: Mutex::new(Aside::new()),
            failure: Mutex::new(None),
            nonblock_resets: AtomicU32::new(0),
            streak: AtomicU32::new(0),
            paused: AtomicBool::new(false),
            failed: AtomicBool::new(false),
            retry_asked: AtomicBool::new(false),
            source_waiting: Mutex::new(Vec::with_capacity(MAX_DEFERRED)),
            source_wakes: Arc::new(AtomicU64::new(0)),
            waker: OnceLock::new(),
            source_paused: AtomicBool::new(false),
        }
    }

    /// Sets what the source calls when bytes it was fetching are there:
    /// `wake` is the engine's, and brings this session's parked faults back
    /// (`take_source_woken`). Once; later calls do nothing.
    pub(crate) fn set_waker(&self, wake: Arc<dyn Fn() + Send + Sync>) {
        let wakes = self.source_wakes.clone();
        let _ = self.waker.set(Arc::new(move || {
            wakes.fetch_add(1, Ordering::AcqRel);
            wake();
        }));
    }

    /// Tells a slow source which bytes a recorded working set will want
    /// (most urgent first), so that it fetches them ahead of prefetch.
    fn hint_source(&self) {
        if let Some(p) = &self.config.prefetch {
            let ranges: Vec<std::ops::Range<u64>> =
                p.offsets().iter().map(|&o| o..o + 4096).collect();
            self.source.hint(&ranges);
        }
    }

    /// Moves the faults parked for the source to `faults` (as many as fit
    /// without growing it, leaving room for a batch of events; the rest
    /// stay parked and the engine is asked to come back), and lets
    /// readahead, prefetch and background population go on: a fetch ended.
    pub(crate) fn take_source_woken(&self, faults: &mut Faults) {
        {
            let mut w = self
                .source_waiting
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let room = faults
                .capacity()
                .saturating_sub(faults.len() + uffd::MAX_BATCH);
            let n = w.len().min(room);
            faults.extend(w.drain(..n));
            if !w.is_empty() {
                if let Some(wake) = self.waker.get() {
                    wake();
                }
            }
        }
        self.source_paused.store(false, Ordering::Release);
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn uffd(&self) -> &Uffd {
        &self.uffd
    }

    pub(crate) fn config(&self) -> &SessionConfig {
        &self.config
    }

    pub(crate) fn is_ended(&self) -> bool {
        self.ended.load(Ordering::Acquire)
    }

    pub(crate) fn mark_ended(&self) {
        self.ended.store(true, Ordering::Release);
    }

    fn read_layout(&self) -> RwLockReadGuard<'_, Layout> {
        // A panic elsewhere while holding the lock leaves page state as
        // consistent as it was: keep serving.
        self.layout.read().unwrap_or_else(|e| e.into_inner())
    }

    /// The state of the page holding `addr` (tests and diagnostics).
    pub fn page_state(&self, addr: u64) -> Option<PageState> {
        let l = self.read_layout();
        l.find(addr).map(|(i, p)| l.regions[i].state(p))
    }

    /// Reads the queued messages under the write lock, applies REMOVE,
    /// UNMAP and REMAP to page state before releasing it, and appends the
    /// faults to `faults` (served afterwards, by page state, whatever the
    /// order they were read in). It reads while `faults` has room for a
    /// whole batch without growing: one session's flood of faults does not
    /// keep a serving thread from the others (epoll is level-triggered, so
    /// the rest is read on a later round).
    ///
    /// `events` must have room for [`uffd::MAX_BATCH`] messages already:
    /// nothing here allocates before the read (see `engine::Scratch`). The
    /// read never blocks, whatever the peer did to the fd's flags; when it
    /// fails the session is marked failed (see `take_failure`).
    ///
    /// `leave` is room to keep free in `faults` for the reads of a retry
    /// (`serve_claims` drains the events itself after EAGAIN).
    pub(crate) fn pump(&self, faults: &mut Faults, events: &mut Vec<Event>, leave: usize) -> usize {
        let mut wake = Vec::new();
        let mut total = 0;
        if faults.is_empty() && faults.capacity() < uffd::MAX_BATCH + leave {
            faults.reserve(uffd::MAX_BATCH + leave); // only callers without scratch
        }
        {
            let mut layout = self.layout.write().unwrap_or_else(|e| e.into_inner());
            while faults.capacity() - faults.len() >= uffd::MAX_BATCH + leave {
                events.clear();
                let n = match self.read_events(events) {
                    Ok(n) => n,
                    Err(e) => {
                        Stats::add(&self.stats.errors, 1);
                        self.fail(format!("reading its userfaultfd failed: {e}"));
                        break;
                    }
                };
                let now = Instant::now();
                for ev in events.drain(..) {
                    match ev {
                        Event::PageFault {
                            address,
                            flags,
                            thread_id,
                        } => faults.push_back(Fault {
                            thread: thread_id.unwrap_or(0),
                            ..Fault::new(address, flags, now)
                        }),
                        Event::Remove { start, end } => {
                            Stats::add(&self.stats.events_remove, 1);
                            let n = layout.discard(start, end);
                            Stats::add(&self.stats.pages_discarded, n);
                            tracing::debug!(session = %self.name, start, end, pages = n, "remove");
                        }
                        Event::Unmap { start, end } => {
                            Stats::add(&self.stats.events_unmap, 1);
                            self.layout_changes();
                            layout.unmap(start, end, &mut wake);
                            tracing::debug!(session = %self.name, start, end, "unmap");
                        }
                        Event::Remap { from, to, len } => {
                            self.layout_changes();
                            Stats::add(&self.stats.events_remap, 1);
                            layout.remap(from, to, len, &mut wake);
                            tracing::debug!(session = %self.name, from, to, len, "remap");
                        }
                        Event::Fork { uffd } => {
                            Stats::add(&self.stats.events_fork, 1);
                            // The forking thread was released by the read:
                            // allocating here no longer risks its malloc
                            // locks (see `engine::Scratch`).
                            let child = self.config.serve_forks.then(|| layout.fork_copy());
                            self.forks
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .push((uffd, child));
                        }
                        Event::Unknown { kind } => {
                            crate::limited!(warn, session = %self.name, kind, "unknown userfaultfd message ignored");
                        }
                    }
                }
                // Applied: the journal need not be replayed (see
                // `read_events`).
                if n > 0 {
                    if let Some(f) = &self.state_file {
                        f.clear_journal(n);
                    }
                }
                total += n;
                if n < uffd::MAX_BATCH {
                    break;
                }
            }
        }
        for (addr, len) in wake {
            let _ = self.uffd.wake(addr, len);
        }
        total
    }

    /// Userfaultfds of forked children read since the last call.
    pub(crate) fn take_forks(&self) -> Vec<(Uffd, Option<Layout>)> {
        std::mem::take(&mut *self.forks.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Marks the session as unable to go on, with the reason (the first one
    /// is kept); the engine ends it and logs the reason once.
    fn fail(&self, why: String) -> Served {
        let mut f = self.failure.lock().unwrap_or_else(|e| e.into_inner());
        if f.is_none() {
            *f = Some(why);
        }
        self.failed.store(true, Ordering::Release);
        Served::Unservable
    }

    /// Why the session cannot go on, if it cannot.
    ///
    /// Asked after every batch of faults: a load, without a lock, when the
    /// session is well.
    pub(crate) fn take_failure(&self) -> Option<String> {
        if !self.failed.load(Ordering::Acquire) {
            return None;
        }
        self.failure
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
    }

    /// Sets O_NONBLOCK on the userfaultfd again after epoll reported an
    /// error on it. The peer shares the open file and can clear the flag
    /// (epoll then reports an error on every wait); reads never depend on
    /// it, but a peer that keeps clearing it is ending its own service.
    /// Returns false when the session must end (its failure says why).
    pub(crate) fn repair_fd(&self) -> bool {
        match self.uffd.ensure_nonblocking() {
            Ok(true) => {
                let n = self.nonblock_resets.fetch_add(1, Ordering::AcqRel) + 1;
                crate::limited!(warn, session = %self.name, times = n, "the VMM cleared O_NONBLOCK on its userfaultfd; set again");
                if n > MAX_NONBLOCK_RESETS {
                    self.fail(format!(
                        "the VMM cleared O_NONBLOCK on its userfaultfd {n} times: a userfaultfd \
                         must stay non-blocking while it is served"
                    ));
                    return false;
                }
                true
            }
            // Set already: another serving thread woke for the same error
            // and repaired it first. (The kernel reports an error on a
            // userfaultfd only while it is blocking or has no API, and the
            // API cannot be undone; a read that fails ends the session.)
            Ok(false) => true,
            Err(e) => {
                self.fail(format!("its userfaultfd cannot be made non-blocking: {e}"));
                false
            }
        }
    }

    /// Puts a fault aside to be tried again after a short delay (the
    /// kernel fails resolving ioctls with EAGAIN until the thread that
    /// raised a queued event runs again). Past `MAX_DEFERRED` faults the
    /// page is woken instead: its thread faults again, a new message.
    fn defer(&self, fault: Fault) {
        Stats::add(&self.stats.deferrals, 1);
        let mut aside = self.aside.lock().unwrap_or_else(|e| e.into_inner());
        if aside.faults.len() >= MAX_DEFERRED {
            drop(aside);
            let _ = self.uffd.wake(fault.addr & !0xfff, 4096);
            return;
        }
        aside.faults.push(Fault {
            again: true,
            ..fault
        });
        self.schedule(&mut aside);
    }

    /// Pauses readahead and background population after lasting EAGAIN.
    fn pause_unprompted(&self) {
        Stats::add(&self.stats.deferrals, 1);
        let mut aside = self.aside.lock().unwrap_or_else(|e| e.into_inner());
        let at = self.schedule(&mut aside);
        aside.unprompted_after = Some(at);
        self.paused.store(true, Ordering::Release);
    }

    /// Asks the engine to come back after the next delay; returns when.
    fn schedule(&self, aside: &mut Aside) -> Instant {
        let streak = self.streak.fetch_add(1, Ordering::AcqRel).min(6);
        let delay = Duration::from_millis(1 << streak).min(MAX_DEFER);
        let at = Instant::now() + delay;
        aside.retry_at = Some(aside.retry_at.map_or(at, |t| t.min(at)));
        self.retry_asked.store(true, Ordering::Release);
        at
    }

    /// When the engine should come back to this session's work put aside
    /// (taken: asked once per deferral).
    pub(crate) fn take_retry_at(&self) -> Option<Instant> {
        if !self.retry_asked.swap(false, Ordering::AcqRel) {
            return None;
        }
        self.aside
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retry_at
            .take()
    }

    /// Moves the faults put aside to `faults`, as many as fit without
    /// growing it and leaving room for a batch of events (see `pump`); asks
    /// for another timer for the rest, and for when readahead and
    /// background population may go on.
    pub(crate) fn take_put_aside(&self, faults: &mut Faults) {
        let mut aside = self.aside.lock().unwrap_or_else(|e| e.into_inner());
        let room = faults
            .capacity()
            .saturating_sub(faults.len() + uffd::MAX_BATCH);
        let n = aside.faults.len().min(room);
        faults.extend(aside.faults.drain(..n));
        if !aside.faults.is_empty() {
            self.schedule(&mut aside);
        }
        if let Some(t) = aside.unprompted_after {
            if t > Instant::now() {
                aside.retry_at = Some(aside.retry_at.map_or(t, |r| r.min(t)));
                self.retry_asked.store(true, Ordering::Release);
            }
        }
    }

    /// Whether readahead and background population wait (EAGAIN lasted).
    fn unprompted_paused(&self) -> bool {
        if self.source_paused.load(Ordering::Acquire) {
            return true;
        }
        if !self.paused.load(Ordering::Acquire) {
            return false;
        }
        let mut aside = self.aside.lock().unwrap_or_else(|e| e.into_inner());
        match aside.unprompted_after {
            Some(t) if Instant::now() < t => true,
            _ => {
                aside.unprompted_after = None;
                self.paused.store(false, Ordering::Release);
                false
            }
        }
    }

    /// Work went through without EAGAIN: the next deferral waits briefly.
    fn progressed(&self) {
        if self.streak.load(Ordering::Relaxed) != 0 {
            self.streak.store(0, Ordering::Relaxed);
        }
    }

    /// Serves one fault: the faulting page first, then the missing pages of
    /// its cluster. A fault on a page in flight is dropped (its owner wakes
    /// the thread). A fault is the kernel saying the page is missing now, so
    /// one on a page the engine mapped is answered by asking the kernel (see
    /// `claim_and_serve`), never by a bare WAKE; one outside every declared
    /// region is poisoned.
    pub(crate) fn serve_fault(
        &self,
        fault: Fault,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Served {
        if !fault.again {
            Stats::add(&self.stats.faults, 1);
            self.stats.timeline(&[(Cause::Fault, 1)]);
        }
        if fault.flags.intersects(FaultFlags::WP | FaultFlags::MINOR) {
            return self.serve_other_mode(fault);
        }
        let layout = self.read_layout();
        let Some((i, page)) = layout.find(fault.addr) else {
            let served = self.poison_undeclared(fault);
            drop(layout);
            return served;
        };
        let mut in_set = false;
        if self.recorder.is_some() || self.prefetch.is_some() {
            // The faulting page, as source bytes (a 2 MiB page whole).
            let r = &layout.regions[i];
            let ps = r.region.page_bytes();
            let offset = r.region.source_offset + page as u64 * ps;
            if !fault.again {
                self.record_touch(offset, ps, fault.thread, false);
            }
            in_set = self.prefetch_saw_fault(offset, ps, !fault.again);
        }
        with_claims(|claims| {
            self.claim_and_serve(layout, i, page, fault, in_set, claims, deferred, events)
        })
    }

    /// A fault outside every region the VMM declared: it registered memory
    /// it did not declare (or declared less than it registered). There are
    /// no bytes to serve there, and a WAKE only brings the fault straight
    /// back: the page is poisoned, so the thread gets SIGBUS instead of
    /// waiting for ever (`docs/protocol.md`). Called under the read lock,
    /// like every resolving ioctl.
    fn poison_undeclared(&self, fault: Fault) -> Served {
        Stats::add(&self.stats.faults_undeclared, 1);
        // The page size of undeclared memory is unknown: 4 KiB, else 2 MiB
        // (hugetlbfs refuses a range that is not whole huge pages).
        for ps in [4096u64, PageSize::Huge2M.bytes() as u64] {
            let page = fault.addr & !(ps - 1);
            match self.uffd.poison(page, ps as usize, false) {
                Ok(_) => {
                    Stats::add(&self.stats.pages_poisoned, 1);
                    crate::limited!(warn, session = %self.name, addr = page, "fault outside every region the VMM declared: page poisoned (the VMM registered memory it did not declare)");
                    return Served::Done;
                }
                Err(UffdError::Os {
                    errno: Errno::INVAL,
                    ..
                }) if ps == 4096 => continue,
                Err(e) => return self.after_failed_resolve(fault, page, ps, e),
            }
        }
        self.fail(format!(
            "a fault at {:#x}, outside every declared region, could not be poisoned",
            fault.addr
        ))
    }

    /// What to do when an ioctl resolving `fault` (at `page`, `ps` bytes)
    /// failed with `e` other than by success.
    fn after_failed_resolve(&self, fault: Fault, page: u64, ps: u64, e: UffdError) -> Served {
        match e {
            // Resolved meanwhile, or the message was read before the page
            // was mapped: wake its thread.
            UffdError::Exists { .. } => {
                let _ = self.uffd.wake(page, ps as usize);
                Served::Done
            }
            UffdError::EventsPending { .. }
            | UffdError::Os {
                errno: Errno::NOMEM,
                ..
            } => {
                self.defer(fault);
                Served::Done
            }
            UffdError::ProcessGone { .. } => {
                self.mark_ended();
                Served::ProcessGone
            }
            // Unmapped or unregistered meanwhile: its thread faults again
            // and finds that out.
            UffdError::NotFound { .. } => {
                let _ = self.uffd.wake(page, ps as usize);
                Served::Done
            }
            e => self.fail(format!(
                "a fault at {:#x} could be neither served nor poisoned: {e}",
                fault.addr
            )),
        }
    }

    /// A write-protect or minor fault: the VMM registered memory in a mode
    /// the Firecracker protocol does not use (it registers MISSING only).
    /// The page is present, so the fault is resolved as the kernel would
    /// without a handler: write protection is lifted (the write goes
    /// through) or the page-cache page is mapped (CONTINUE).
    fn serve_other_mode(&self, fault: Fault) -> Served {
        Stats::add(&self.stats.faults_other_mode, 1);
        let wp = fault.flags.contains(FaultFlags::WP);
        crate::limited!(warn, session = %self.name, addr = fault.addr, write_protect = wp, "a write-protect or minor fault: the VMM registered memory in a mode the protocol does not use; resolved without serving bytes");
        let _layout = self.read_layout();
        for ps in [4096u64, PageSize::Huge2M.bytes() as u64] {
            let page = fault.addr & !(ps - 1);
            let done = if wp {
                self.uffd.write_protect(page, ps as usize, false, false)
            } else {
                self.uffd
                    .continue_range(page, ps as usize, false, false)
                    .map(drop)
            };
            match done {
                Ok(()) => return Served::Done,
                Err(UffdError::Os {
                    errno: Errno::INVAL,
                    ..
                }) if ps == 4096 => continue,
                Err(e) => return self.after_failed_resolve(fault, page, ps, e),
            }
        }
        self.fail(format!(
            "a write-protect or minor fault at {:#x} could not be resolved",
            fault.addr
        ))
    }

    /// A fault on a page whose bytes could not be trusted (poisoned): the
    /// poison is gone (a discard the engine was not told of zapped it), or
    /// the message was read before the poison landed. Poison it again;
    /// never serve it.
    fn repoison(&self, r: &RegionState, page: usize, fault: Fault) -> Served {
        let ps = r.region.page_bytes();
        let addr = r.page_addr(page);
        match self.uffd.poison(addr, ps as usize, false) {
            Ok(_) => {
                Stats::add(&self.stats.pages_poisoned, 1);
                Served::Done
            }
            Err(e) => self.after_failed_resolve(fault, addr, ps, e),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn claim_and_serve(
        &self,
        layout: RwLockReadGuard<'_, Layout>,
        i: usize,
        page: usize,
        fault: Fault,
        in_set: bool,
        claims: &mut Vec<Claim>,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Served {
        let r = &layout.regions[i];
        let mut mapped_before = false;
        loop {
            match r.state(page) {
                PageState::Missing => {
                    if r.transition(page, PageState::Missing, PageState::Claimed) {
                        claims.push(Claim::new(page, r.known_zero(page)));
                        break;
                    }
                }
                // A page that must read as zero is claimed as
                // ClaimedDiscarded, not Claimed: whatever happens to the
                // claim (given back, split off by UNMAP or REMAP, copied
                // for a fork), the page goes back to Discarded, never to
                // Missing, so the source's bytes never reach a page the
                // guest released.
                PageState::Discarded => {
                    if r.transition(page, PageState::Discarded, PageState::ClaimedDiscarded) {
                        claims.push(Claim::new(page, true));
                        break;
                    }
                }
                PageState::Present => {
                    // The engine mapped this page, yet the kernel reports it
                    // missing: the message was read before that mapping woke
                    // its thread, or the page was zapped since. A REMOVE's
                    // caller zaps only after its event is read, so a page
                    // mapped in between (a zero page for a fault that raced
                    // the discard) is zapped again behind the engine's back;
                    // a VMM that did not ask for REMOVE events discards
                    // unseen. Either way a zapped anonymous page must read
                    // as zero. Ask the kernel: map zeros (on its own, no
                    // cluster); EEXIST says the page is there, and its
                    // thread gets a WAKE. A bare WAKE here livelocked a
                    // guest thread for ever (issue 11, class 7).
                    if r.transition(page, PageState::Present, PageState::ClaimedDiscarded) {
                        Stats::add(&self.stats.faults_already_served, 1);
                        claims.push(Claim::new(page, true));
                        mapped_before = true;
                        break;
                    }
                }
                PageState::Failed => {
                    Stats::add(&self.stats.faults_already_served, 1);
                    return self.repoison(r, page, fault);
                }
                PageState::Claimed | PageState::ClaimedDiscarded => {
                    // Its owner maps it and wakes the waiters. If that is
                    // readahead, the stream caught up with it: read further.
                    Stats::add(&self.stats.faults_already_served, 1);
                    self.stream_caught_up(r, page);
                    return Served::Done;
                }
            }
        }
        // A page of a prefetched set is mapped alone: the set says which
        // pages the guest needs around it, and prefetch maps them.
        let sequential = !mapped_before && !in_set && self.extend_claims(r, page, claims);
        let id = r.id;
        let ctx = Ctx {
            origin: Origin::Fault,
            read_at: Some(fault.read_at),
            thread: fault.thread,
            fault_alone: !sequential,
            quick_retries: if fault.again {
                0
            } else {
                self.config.quick_retries
            },
        };
        self.serve_claims(layout, id, claims, ctx, deferred, events)
    }

    /// Adds the pages served with the faulting one, and returns whether the
    /// fault was sequential.
    ///
    /// A fault that continues a sequential stream (`readahead.rs`) gets a
    /// cluster from its page onwards, mapped at once in one COPY, and the
    /// stream's window is left to idle serving threads. Any other fault gets
    /// the aligned block of its region's fault-around window
    /// (`fault_around.rs`), its own page mapped first on its own.
    fn extend_claims(&self, r: &RegionState, page: usize, claims: &mut Vec<Claim>) -> bool {
        let (b, sequential) = self.follow_stream(r, page, || self.fault_block(r, page));
        for q in b.start..b.end {
            if q != page
                && (!b.zero_only || r.known_zero(q))
                && r.transition(q, PageState::Missing, PageState::Claimed)
            {
                claims.push(Claim::new(q, r.known_zero(q)));
            }
        }
        claims[1..].sort_by_key(|c| c.page);
        sequential
    }

    /// Maps the claimed pages of region `id` (the first claim is served
    /// first; the rest in runs). Retries after EAGAIN by reading the queued
    /// events itself, re-checking page state each time.
    fn serve_claims(
        &self,
        mut layout: RwLockReadGuard<'_, Layout>,
        id: u64,
        claims: &mut Vec<Claim>,
        mut ctx: Ctx,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Served {
        let origin = ctx.origin;
        let fault_page = match origin {
            Origin::Fault => claims.first().map(|c| c.page),
            Origin::Readahead | Origin::Background | Origin::Prefetch => None,
        };
        // Source bytes for the non-zero claims, read once: (first page, bytes).
        let mut data: Option<usize> = None;
        // The faulting page goes first on its own: its bytes are read and
        // mapped before the rest of the cluster is read, so that its thread
        // waits for one page, not for the whole cluster's read.
        let mut alone = ctx.fault_alone && fault_page.is_some();
        let mut attempts = 0u32;
        BUF.with(|buf| {
            let mut buf = buf.borrow_mut();
            loop {
                let Some(r) = layout.by_id(id) else {
                    return Served::Done; // unmapped meanwhile
                };
                self.reconcile(r, claims, fault_page);
                if claims.is_empty() {
                    return Served::Done;
                }
                if alone && claims.first().map(|c| c.page) != fault_page {
                    // The faulting page was settled otherwise (unmapped,
                    // split away): read the rest of the cluster now.
                    alone = false;
                    data = None;
                }
                if data.is_none() {
                    // Read the source without the lock, so that a thread
                    // reading the userfaultfd never waits for it. The claims
                    // stay ours; a REMOVE meanwhile is seen by `reconcile`.
                    let span = if alone {
                        Self::source_span(&claims[..1])
                    } else {
                        Self::source_span(claims)
                    };
                    let ps = r.region.page_size.bytes();
                    let source_offset = r.region.source_offset;
                    drop(layout);
                    let wakes = self.source_wakes.load(Ordering::Acquire);
                    let read = match span {
                        Some((lo, hi)) => {
                            let offset = source_offset + (lo * ps) as u64;
                            let buf = buf.prepare((hi - lo + 1) * ps);
                            match self.waker.get() {
                                Some(w) => self.source.read_at_or_wake(offset, buf, w),
                                None => self.source.read_at(offset, buf),
                            }
                        }
                        None => {
                            buf.prepare(0);
                            Ok(())
                        }
                    };
                    layout = self.read_layout();
                    let Some(r) = layout.by_id(id) else {
                        return Served::Done;
                    };
                    self.reconcile(r, claims, fault_page);
                    if matches!(read, Err(SourceError::Pending)) {
                        let first_is_fault =
                            fault_page.is_some() && claims.first().map(|c| c.page) == fault_page;
                        if !alone && first_is_fault && claims.len() > 1 {
                            // The faulting page's own bytes may be at hand
                            // (a sequential cluster crossing into a chunk
                            // being fetched): read and map it alone first.
                            alone = true;
                            ctx.fault_alone = true;
                            data = None;
                            continue;
                        }
                        return self.wait_for_source(r, claims, fault_page, &ctx, wakes);
                    }
                    if let Some(span) = span {
                        self.after_read(r, claims, &mut buf, span, read);
                    }
                    data = Some(span.map_or(0, |(lo, _)| lo));
                    continue;
                }
                let first_data = data.unwrap_or(0);
                match self.map_claims(r, claims, buf.data(), first_data, &ctx, fault_page, alone) {
                    MapResult::Done => {
                        self.progressed();
                        return Served::Done;
                    }
                    MapResult::More if alone => {
                        // The faulting page is mapped: read the rest.
                        alone = false;
                        data = None;
                        drop(layout);
                        layout = self.read_layout();
                    }
                    MapResult::More => {
                        // Let a thread waiting to read the userfaultfd in.
                        drop(layout);
                        layout = self.read_layout();
                    }
                    MapResult::ProcessGone => return Served::ProcessGone,
                    MapResult::EventsPending { read_more } => {
                        attempts += 1;
                        Stats::add(&self.stats.retries, 1);
                        drop(layout);
                        // Read the queued events; the faults found are served
                        // after this run.
                        let read = if read_more {
                            self.pump(deferred, events, 0)
                        } else {
                            0
                        };
                        layout = self.read_layout();
                        if read > 0 {
                            continue;
                        }
                        if attempts <= ctx.quick_retries {
                            drop(layout);
                            std::thread::yield_now();
                            layout = self.read_layout();
                            continue;
                        }
                        // The kernel keeps failing copies until the thread
                        // that raised the event runs again, not merely until
                        // the event is read: on a busy or CPU-throttled VM
                        // that takes milliseconds. Waiting for it here kept
                        // a serving thread from every other VM (and after a
                        // second of it, gave the pages back as never
                        // discarded: stale bytes). Put the work aside.
                        if let Some(r) = layout.by_id(id) {
                            self.reconcile(r, claims, fault_page);
                            self.put_aside(r, claims, fault_page, ctx.read_at);
                        }
                        return Served::PutAside;
                    }
                }
            }
        })
    }

    /// Drops claims this thread no longer owns the right to fill with source
    /// bytes: a REMOVE discarded them meanwhile. The faulting page is then
    /// served as zero (its thread waits); others are released and woken.
    fn reconcile(&self, r: &RegionState, claims: &mut Vec<Claim>, fault_page: Option<usize>) {
        claims.retain_mut(|c| {
            if c.page >= r.pages() {
                return false; // split away; the split woke its waiters
            }
            match r.state(c.page) {
                PageState::Claimed => true,
                // The faulting page is served as zero; it stays
                // ClaimedDiscarded until mapped (see `claim_and_serve`).
                PageState::ClaimedDiscarded if Some(c.page) == fault_page => {
                    c.zero = true;
                    c.in_buf = false;
                    true
                }
                PageState::ClaimedDiscarded => {
                    r.set(c.page, PageState::Discarded);
                    let _ = self
                        .uffd
                        .wake(r.page_addr(c.page), r.region.page_size.bytes());
                    false
                }
                _ => false,
            }
        });
    }

    /// The pages whose source bytes must be read: from the first to the
    /// last claim not known to be zero.
    fn source_span(claims: &[Claim]) -> Option<(usize, usize)> {
        let data = claims.iter().filter(|c| !c.zero).map(|c| c.page);
        Some((data.clone().min()?, data.max()?))
    }

    /// After the source bytes of pages `lo..=hi` were read into `buf` (or
    /// failed to be): marks all-zero pages as zero claims and the claims
    /// whose bytes the buffer holds; on a read error poisons the pages that
    /// needed the bytes. Called under the lock, after `reconcile`.
    fn after_read(
        &self,
        r: &RegionState,
        claims: &mut Vec<Claim>,
        buf: &mut PageBuf,
        (lo, hi): (usize, usize),
        read: Result<(), SourceError>,
    ) {
        let ps = r.region.page_size.bytes();
        let read = match read {
            Err(SourceError::Untrusted { bad, .. }) => {
                // The source logged why, once per chunk: poison the pages
                // it cannot vouch for; the rest of the buffer is good.
                let base = r.region.source_offset;
                claims.retain(|c| {
                    let at = base + (c.page * ps) as u64;
                    let hit = !c.zero
                        && (lo..=hi).contains(&c.page)
                        && bad.iter().any(|b| b.start < at + ps as u64 && at < b.end);
                    if hit {
                        self.poison_untrusted(r, c.page);
                    }
                    !hit
                });
                Ok(())
            }
            other => other,
        };
        if let Err(e) = read {
            let offset = r.region.source_offset + (lo * ps) as u64;
            crate::limited!(error, session = %self.name, offset, len = (hi - lo + 1) * ps, "source read failed, poisoning the pages: {e}");
            Stats::add(&self.stats.errors, 1);
            claims.retain(|c| {
                if c.zero {
                    return true;
                }
                if (lo..=hi).contains(&c.page) {
                    self.fail_pages(r, c.page, 1, "source read failed");
                } else {
                    // Not read (the faulting page went alone): given back,
                    // to the state it came from, for a later fault to read.
                    let back = match r.state(c.page) {
                        PageState::ClaimedDiscarded => Some(PageState::Discarded),
                        PageState::Claimed => Some(PageState::Missing),
                        _ => None,
                    };
                    if let Some(back) = back {
                        r.set(c.page, back);
                        let _ = self.uffd.wake(r.page_addr(c.page), ps);
                    }
                }
                false
            });
            return;
        }
        let data = buf.data_mut();
        for c in claims.iter_mut().filter(|c| (lo..=hi).contains(&c.page)) {
            let page = &mut data[(c.page - lo) * ps..][..ps];
            if c.zero {
                // Known zero (a hole, a discarded page): the buffer must hold
                // zeros there, because a short zero run is copied along.
                page.fill(0);
            } else {
                c.zero = is_zero(page);
            }
            c.in_buf = true;
        }
    }

    /// Poisons a page whose source bytes cannot be trusted (the source said
    /// why, once per chunk), and marks it failed.
    fn poison_untrusted(&self, r: &RegionState, page: usize) {
        let ps = r.region.page_size.bytes();
        let addr = r.page_addr(page);
        let poisoned = self.uffd.poison(addr, ps, true);
        r.set(page, PageState::Failed);
        Stats::add(&self.stats.pages_untrusted, 1);
        match poisoned {
            Ok(_) => Stats::add(&self.stats.pages_poisoned, 1),
            Err(e) => {
                crate::limited!(error, session = %self.name, addr, "an untrusted page could not be poisoned ({e}): woken");
            }
        }
        let _ = self.uffd.wake(addr, ps);
    }

    /// The source is fetching the bytes of these claims: gives them back
    /// (each to the state it came from) and parks the fault, if the
    /// faulting page is among them, until the source's waker brings it
    /// back (`take_source_woken`); unprompted work pauses until then.
    /// `wakes` is the waker's count from before the read: if it moved, the
    /// wake may have come before the fault was parked, so it is taken again
    /// at once.
    fn wait_for_source(
        &self,
        r: &RegionState,
        claims: &mut Vec<Claim>,
        fault_page: Option<usize>,
        ctx: &Ctx,
        wakes: u64,
    ) -> Served {
        Stats::add(&self.stats.source_waits, 1);
        let ps = r.region.page_size.bytes();
        let parked = fault_page.filter(|&p| claims.first().map(|c| c.page) == Some(p));
        if ctx.origin == Origin::Readahead {
            // The stream's window moved past these pages when they were
            // claimed: back to the first, so that they are read ahead once
            // the fetch ends.
            if let Some(first) = claims.iter().map(|c| c.page).min() {
                let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
                if stream.region == r.id {
                    stream.ahead = stream.ahead.min(first);
                }
            }
        }
        for c in claims.drain(..) {
            let back = match r.state(c.page) {
                PageState::Claimed => PageState::Missing,
                PageState::ClaimedDiscarded => PageState::Discarded,
                _ => continue,
            };
            r.set(c.page, back);
            if Some(c.page) != parked {
                let _ = self.uffd.wake(r.page_addr(c.page), ps);
            }
        }
        match parked {
            Some(page) => {
                let fault = Fault {
                    thread: ctx.thread,
                    again: true,
                    ..Fault::new(
                        r.page_addr(page),
                        FaultFlags::empty(),
                        ctx.read_at.unwrap_or_else(Instant::now),
                    )
                };
                let mut w = self
                    .source_waiting
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                if w.len() < MAX_DEFERRED {
                    w.push(fault);
                } else {
                    // Its thread faults again, a new message.
                    let _ = self.uffd.wake(fault.addr, ps);
                }
                drop(w);
                if self.source_wakes.load(Ordering::Acquire) != wakes {
                    if let Some(wake) = self.waker.get() {
                        wake();
                    }
                }
                Served::Done
            }
            // The faulting page was mapped already: the rest of its cluster
            // is left to later faults.
            None if fault_page.is_some() => Served::Done,
            None => {
                // Queued work waits for the fetch (prefetch puts its run
                // back at the front); a fetch that ended meanwhile lifts
                // the pause at once.
                self.source_paused.store(true, Ordering::Release);
                if self.source_wakes.load(Ordering::Acquire) != wakes {
                    self.source_paused.store(false, Ordering::Release);
                }
                Served::PutAside
            }
        }
    }

    /// Poisons `n` pages from `page` (the guest gets SIGBUS, not garbage)
    /// and marks them failed.
    fn fail_pages(&self, r: &RegionState, page: usize, n: usize, why: &str) {
        let ps = r.region.page_size.bytes();
        let addr = r.page_addr(page);
        // State first, then wake: whoever wakes finds the page settled.
        let poisoned = self.uffd.poison(addr, n * ps, true);
        for p in page..page + n {
            r.set(p, PageState::Failed);
        }
        match poisoned {
            Ok(_) => {
                Stats::add(&self.stats.pages_poisoned, n as u64);
                crate::limited!(error, session = %self.name, addr, pages = n, "poisoned: {why}");
            }
            Err(e) => {
                // Its thread faults again, on a Failed page: poisoned again
                // then, or the session ends saying why (`repoison`).
                crate::limited!(error, session = %self.name, addr, pages = n, "{why}; poisoning failed too ({e}): woken");
            }
        }
        let _ = self.uffd.wake(addr, n * ps);
    }

    /// Gives the claims back, each to the state it was claimed from (a
    /// discarded page stays discarded), after EAGAIN lasted. The faulting
    /// page's fault is put aside and served again after a short delay
    /// (`defer`); the other pages are woken, in case a thread faulted on
    /// them meanwhile and was left to this claim's owner; readahead or
    /// background work pauses for a while (`pause_unprompted`).
    fn put_aside(
        &self,
        r: &RegionState,
        claims: &mut Vec<Claim>,
        fault_page: Option<usize>,
        read_at: Option<Instant>,
    ) {
        let ps = r.region.page_size.bytes();
        for c in claims.drain(..) {
            // Back to where it came from: ClaimedDiscarded pages must read
            // as zero (see `claim_and_serve`).
            let back = match r.state(c.page) {
                PageState::Claimed => PageState::Missing,
                PageState::ClaimedDiscarded => PageState::Discarded,
                _ => continue,
            };
            r.set(c.page, back);
            if Some(c.page) == fault_page {
                self.defer(Fault::new(
                    r.page_addr(c.page),
                    FaultFlags::empty(),
                    read_at.unwrap_or_else(Instant::now),
                ));
            } else {
                let _ = self.uffd.wake(r.page_addr(c.page), ps);
            }
        }
        if fault_page.is_none() {
            self.pause_unprompted();
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn map_claims(
        &self,
        r: &RegionState,
        claims: &mut Vec<Claim>,
        buf: &[u8],
        first_data: usize,
        ctx: &Ctx,
        fault_page: Option<usize>,
        first_only: bool,
    ) -> MapResult {
        let (origin, read_at, thread) = (ctx.origin, ctx.read_at, ctx.thread);
        let alone = if ctx.fault_alone { fault_page } else { None };
        let ps = r.region.page_size.bytes();
        let hugetlb = r.region.page_size == PageSize::Huge2M;
        let merge = self.config.zero_merge_pages;
        // Map at most a piece per call, so that the lock is released between
        // pieces and a thread waiting to read the userfaultfd (it needs the
        // write lock) waits for one piece, not a whole readahead chunk.
        let piece = (PIECE_BYTES / ps).max(1);
        let mut mapped = 0;
        // Pages per ioctl at most: halved when a run met ENOENT, which a
        // run across a VMA boundary gets although every page of it is
        // registered (the VMM split the region with madvise, mprotect or
        // mlock).
        let mut max_run = usize::MAX;
        while !claims.is_empty() {
            if mapped >= piece || (first_only && mapped > 0) {
                return MapResult::More;
            }
            // A run: the faulting page alone when it goes first on its own,
            // otherwise consecutive claims, short zero runs copied along.
            let (k, zero) = if Some(claims[0].page) == alone {
                (1, claims[0].zero)
            } else {
                // Zero runs are not cut to the piece: a ZEROPAGE is cheap,
                // and a cut would leave a short zero run behind.
                let (k, zero) = plan_run(claims, merge, hugetlb);
                let k = if zero { k } else { k.min(piece - mapped) };
                (k.min(max_run).max(1), zero)
            };
            mapped += k;
            let page = claims[0].page;
            let addr = r.page_addr(page);
            let len = k * ps;
            let result = if zero && !hugetlb {
                self.uffd.zeropage(addr, len, false)
            } else if zero {
                self.uffd.copy(addr, zeros(ps), CopyMode::empty())
            } else {
                let at = (page - first_data) * ps;
                self.uffd.copy(addr, &buf[at..at + len], CopyMode::empty())
            };
            let done_pages = match result {
                Ok(_) => k,
                Err(UffdError::Partial { done, .. }) => done / ps,
                Err(UffdError::Exists { .. }) => {
                    // Mapped by someone else: it is present; wake its waiters.
                    r.set(page, PageState::Present);
                    let _ = self.uffd.wake(addr, ps);
                    claims.remove(0);
                    continue;
                }
                Err(UffdError::EventsPending { .. }) => {
                    return MapResult::EventsPending { read_more: true };
                }
                // The VM's memory cgroup is full: not the page's fault, and
                // not for ever. Try again later, as after EAGAIN.
                Err(UffdError::Os {
                    errno: Errno::NOMEM,
                    ..
                }) => {
                    return MapResult::EventsPending { read_more: false };
                }
                Err(UffdError::ProcessGone { .. }) => {
                    self.mark_ended();
                    return MapResult::ProcessGone;
                }
                Err(UffdError::NotFound { .. }) if k > 1 => {
                    // Not proof that every page of the run is gone: the run
                    // may cross a VMA boundary. Try again in halves.
                    mapped -= k;
                    max_run = k / 2;
                    continue;
                }
                Err(UffdError::NotFound { .. }) => {
                    // This page is not mapped or not registered any more,
                    // without an event saying so (the VMM did not ask for
                    // UNMAP events, or unregistered it). Nothing to serve:
                    // if it comes back and faults, it is fresh memory and
                    // reads as zero. Wake whoever waits there: its thread
                    // faults again and meets what the VMM did.
                    Stats::add(&self.stats.errors, 1);
                    crate::limited!(warn, session = %self.name, addr, "page no longer mapped or registered: not served");
                    r.set(page, PageState::Discarded);
                    let _ = self.uffd.wake(addr, ps);
                    claims.remove(0);
                    continue;
                }
                Err(e) => {
                    Stats::add(&self.stats.errors, 1);
                    self.fail_pages(r, page, k, &e.to_string());
                    claims.drain(..k);
                    continue;
                }
            };
            let mut on_demand = 0;
            for (n, c) in claims.drain(..done_pages).enumerate() {
                r.set(c.page, PageState::Present);
                if n == 0 && Some(c.page) == fault_page {
                    on_demand = 1;
                    if let Some(t) = read_at {
                        self.stats.record_latency(t.elapsed(), thread);
                    }
                }
            }
            let done = done_pages as u64;
            // One timeline entry (one lock) per mapped run.
            let (cause, of_cause) = match origin {
                Origin::Background => {
                    Stats::add(&self.stats.pages_background, done);
                    (Cause::Background, done)
                }
                Origin::Prefetch => {
                    Stats::add(&self.stats.pages_prefetched, done);
                    (Cause::Prefetch, done)
                }
                Origin::Readahead => {
                    Stats::add(&self.stats.pages_readahead, done);
                    (Cause::Readahead, done)
                }
                Origin::Fault => {
                    Stats::add(&self.stats.pages_on_demand, on_demand);
                    Stats::add(&self.stats.pages_fault_around, done - on_demand);
                    (Cause::FaultAround, done - on_demand)
                }
            };
            self.stats
                .timeline(&[(Cause::OnDemand, on_demand), (cause, of_cause)]);
            // While recording, pages with data mapped with a fault are
            // those of a sequential stream, or (recording fast, not
            // exactly) of its fault-around block: recorded as inferred
            // (`record.rs`). Zero pages mapped around are not recorded.
            let unasked_from =
                r.region.source_offset + (page + on_demand as usize) as u64 * ps as u64;
            let unasked_len = (done - on_demand) * ps as u64;
            if matches!(origin, Origin::Readahead | Origin::Fault)
                && unasked_len > 0
                && !zero
                && self.recording.load(Ordering::Acquire)
            {
                self.record_touch(unasked_from, unasked_len, 0, true);
            }
            if origin != Origin::Prefetch && unasked_len > 0 {
                self.prefetch_mapped_otherwise(unasked_from, unasked_len);
            }
            if zero {
                Stats::add(&self.stats.pages_zeroed, done_pages as u64);
            } else {
                Stats::add(&self.stats.pages_copied, done_pages as u64);
                Stats::add(&self.stats.bytes_copied, (done_pages * ps) as u64);
            }
        }
        MapResult::Done
    }
}

/// Claims up to `max` missing pages of `r` from `from` (before `end`), one
/// run: it stops at the first page not missing after the first claim.
/// Returns the page after the last one looked at.
fn claim_run(
    r: &RegionState,
    from: usize,
    end: usize,
    max: usize,
    claims: &mut Vec<Claim>,
) -> usize {
    let mut p = from;
    while p < end && claims.len() < max {
        if r.transition(p, PageState::Missing, PageState::Claimed) {
            claims.push(Claim::new(p, r.known_zero(p)));
        } else if !claims.is_empty() {
            break;
        }
        p += 1;
    }
    p
}

/// Bytes mapped per hold of the session's read lock (see `map_claims`).
const PIECE_BYTES: usize = 64 * 1024;

/// Plans the next ioctl over `claims` (sorted by page, not empty): returns
/// how many claims it maps and whether it is a ZEROPAGE (or, on hugetlbfs, a
/// COPY of zeros, one page at a time) rather than a COPY from the buffer.
///
/// A COPY runs over consecutive pages; a run of at most `merge` zero pages
/// whose zeros are in the read buffer, with data after it, is copied
/// along from the buffer (which holds zeros there) instead of costing an
/// ioctl of its own: with every 4th page zero, splitting runs made four
/// ioctls per 16 KiB (measured: sequential 1.07 GiB/s against 1.73 without
/// zero pages). Longer zero runs still get ZEROPAGE, which uses no memory.
fn plan_run(claims: &[Claim], merge: usize, hugetlb: bool) -> (usize, bool) {
    let first = claims[0].page;
    let consecutive = claims
        .iter()
        .enumerate()
        .take_while(|(k, c)| c.page == first + k)
        .count();
    let span = &claims[..consecutive];
    // Length of the zero run starting at `k` in `span`.
    let zero_run = |k: usize| span[k..].iter().take_while(|c| c.zero).count();
    // Whether the zero run at `k` (of length `n`) is copied along: only
    // between data pages of this span. A leading zero run may be the tail of
    // a longer one whose start went out in an earlier ioctl.
    let copied_along = |k: usize, n: usize| {
        n <= merge && k > 0 && k + n < span.len() && span[k..k + n].iter().all(|c| c.in_buf)
    };
    if span[0].zero {
        let n = zero_run(0);
        return (if hugetlb { 1 } else { n }, true);
    }
    let mut k = 0;
    while k < span.len() {
        if span[k].zero {
            let n = zero_run(k);
            if !copied_along(k, n) {
                break;
            }
            k += n;
        } else if span[k].in_buf {
            k += 1;
        } else {
            break;
        }
    }
    (k.max(1), false)
}

enum MapResult {
    Done,
    /// A piece was mapped; more claims remain.
    More,
    /// The kernel refused for now: events are queued (read them, then
    /// retry), or (`read_more: false`) memory is short.
    EventsPending {
        read_more: bool,
    },
    ProcessGone,
}

/// Whether a page is all zero (16 bytes at a time; pages are multiples of 16).
fn is_zero(page: &[u8]) -> bool {
    let mut chunks = page.chunks_exact(16);
    chunks.all(|c| c.iter().fold(0u8, |acc, &b| acc | b) == 0)
        && chunks.remainder().iter().all(|&b| b == 0)
}

#[cfg(test)]
mod tests {
    //! Drives a session by hand, so that the order of kernel events is
    //! exact. Needs userfaultfd (root here); skips with a message otherwise.

    use super::*;
    use crate::source::Bytes;
    use std::time::Duration;
    use uffd::{Features, RegisterMode};

    const PAGE: usize = 4096;

    fn open() -> Option<Uffd> {
        match Uffd::open() {
            Ok(u) => Some(u),
            Err(e) if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") => {
                panic!("userfaultfd required but unavailable: {e}")
            }
            Err(e) => {
                eprintln!("SKIPPED: cannot create a userfaultfd here: {e}");
                None
            }
        }
    }

    /// A session over a fresh anonymous mapping of `pages` pages, registered
    /// for missing faults, served from `data`: the session and the mapping's
    /// address (unmapped by the caller).
    fn manual(
        pages: usize,
        features: Features,
        data: Vec<u8>,
        config: SessionConfig,
    ) -> Option<(Session, u64)> {
        let u = open()?;
        u.api(features).expect("api");
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping used only by the calling test.
        let base = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert_ne!(base, libc::MAP_FAILED, "mmap");
        let base = base as u64;
        u.register(base, len, RegisterMode::MISSING)
            .expect("register");
        let region = Region {
            host_base: base,
            len: len as u64,
            source_offset: 0,
            page_size: PageSize::Base4K,
        };
        let session = Session::new(
            "manual".into(),
            u,
            &[region],
            Arc::new(Bytes(data)),
            config,
            None,
        );
        Some((session, base))
    }

    /// Waits up to 10 s for the session's userfaultfd to be readable.
    fn wait_readable(session: &Session, what: &str) {
        let mut fds = [rustix::event::PollFd::new(
            &session.uffd,
            rustix::event::PollFlags::IN,
        )];
        let ten = rustix::event::Timespec {
            tv_sec: 10,
            tv_nsec: 0,
        };
        assert_eq!(
            rustix::event::poll(&mut fds, Some(&ten)).expect("poll"),
            1,
            "{what}"
        );
    }

    /// A fault is read; then a REMOVE is queued behind it before the fault
    /// is served. The COPY must fail with EAGAIN, the serving thread must
    /// read the REMOVE itself, give up the discarded cluster page, retry,
    /// and serve the faulting page with the source bytes.
    #[test]
    fn eagain_while_remove_is_queued_is_drained_and_retried() {
        // A fault at page 0 starts a sequential stream: one COPY from it on.
        eagain_with_remove(0, 2);
        // A fault at page 1 does not: its page goes first on its own (read
        // and mapped before the rest of the cluster is read).
        eagain_with_remove(1, 3);
        eagain_with_remove(2, 0);
    }

    /// The case above for a 4-page cluster faulted at `fault` while a
    /// REMOVE of page `removed` is queued.
    fn eagain_with_remove(fault: usize, removed: usize) {
        let len = 4 * PAGE;
        let data: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 + 1).collect();
        let config = SessionConfig {
            cluster_pages: 4,
            ..SessionConfig::default()
        };
        let Some((session, base)) = manual(4, Features::EVENT_REMOVE, data, config) else {
            return;
        };
        let at = |page: usize| base + (page * PAGE) as u64;
        let fault_addr = at(fault);
        // SAFETY (both threads): reads and madvise inside our live mapping.
        let reader =
            std::thread::spawn(move || unsafe { std::ptr::read_volatile(fault_addr as *const u8) });
        let mut events = Vec::with_capacity(uffd::MAX_BATCH);
        let deadline = Instant::now() + Duration::from_secs(10);
        while events.is_empty() {
            assert!(Instant::now() < deadline, "no fault");
            session.uffd.read_events(&mut events, 1).expect("read");
        }
        let Some(Event::PageFault { address, .. }) = events.pop() else {
            panic!("expected the fault first")
        };
        let removed_addr = at(removed);
        let remover = std::thread::spawn(move || unsafe {
            libc::madvise(removed_addr as *mut _, PAGE, libc::MADV_DONTNEED)
        });
        // The madvise caller sleeps until its REMOVE is read; wait until it
        // is queued (the fault was read already, so only the REMOVE can make
        // the userfaultfd readable).
        wait_readable(&session, "no REMOVE queued");
        let mut deferred = Faults::new();
        // The EAGAIN lasts until the madvise caller runs again, which the
        // scheduler decides: when the quick retries do not outlast it, the
        // work is put aside (its claims go back), and served again here as
        // the engine's timer would.
        let mut served = Served::PutAside;
        for _ in 0..1000 {
            served = session.serve_fault(
                Fault::new(address, FaultFlags::empty(), Instant::now()),
                &mut deferred,
                &mut events,
            );
            if served != Served::PutAside {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        assert_eq!(served, Served::Done);
        assert_eq!(
            reader.join().expect("reader"),
            fault as u8 + 1,
            "the source byte"
        );
        assert_eq!(remover.join().expect("remover"), 0, "madvise returned");
        let st = session.stats.snapshot();
        assert!(
            st.retries >= 1,
            "the COPY met EAGAIN and was retried: {st:?}"
        );
        assert_eq!(st.events_remove, 1, "{st:?}");
        for page in 0..4 {
            let want = if page == removed {
                PageState::Discarded
            } else {
                PageState::Present
            };
            assert_eq!(session.page_state(at(page)), Some(want), "page {page}");
        }
        assert_eq!(
            st.pages_copied, 3,
            "the removed page was discarded, not copied: {st:?}"
        );
        assert_eq!(st.pages_on_demand, 1, "{st:?}");
        // Every page served holds its source bytes.
        for page in (0..4).filter(|&p| p != removed) {
            // SAFETY: reading our own mapping; the page is present.
            let b = unsafe { std::ptr::read_volatile(at(page) as *const u8) };
            assert_eq!(b, page as u8 + 1, "page {page}");
        }
        // SAFETY: unmapping our mapping; both threads are joined.
        unsafe { libc::munmap(base as *mut _, len) };
    }

    /// A balloon discards pages of a working set while they wait in the
    /// prefetch queue: prefetch must leave them alone (a page the guest
    /// released reads as zero, never as the snapshot's bytes), and a fault
    /// there gets zeros.
    #[test]
    fn balloon_remove_of_pages_queued_for_prefetch_leaves_them_zero() {
        let pages = 16;
        let len = pages * PAGE;
        let data: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 + 1).collect();
        let set = (0..pages as u64).map(|p| p * PAGE as u64).collect();
        let config = SessionConfig {
            prefetch: Some(PrefetchSet::new(set)),
            ..SessionConfig::default()
        };
        let Some((session, base)) = manual(pages, Features::EVENT_REMOVE, data, config) else {
            return;
        };
        let at = |page: usize| base + (page * PAGE) as u64;
        let (from, to) = (4, 8);
        let discard = at(from);
        // SAFETY: madvise on our own mapping.
        let remover = std::thread::spawn(move || unsafe {
            libc::madvise(discard as *mut _, (to - from) * PAGE, libc::MADV_DONTNEED)
        });
        // The madvise caller sleeps until its REMOVE is read.
        wait_readable(&session, "no REMOVE queued");
        let (mut faults, mut events) = (Faults::new(), Vec::with_capacity(uffd::MAX_BATCH));
        session.pump(&mut faults, &mut events, 0);
        assert_eq!(remover.join().expect("remover"), 0, "madvise returned");
        while session.prefetch_step(&mut faults, &mut events).is_some() {}
        let st = session.stats.snapshot();
        assert_eq!(st.events_remove, 1, "{st:?}");
        for page in 0..pages {
            let state = session.page_state(at(page));
            if (from..to).contains(&page) {
                assert_eq!(state, Some(PageState::Discarded), "page {page}");
            } else if state == Some(PageState::Present) {
                // SAFETY: reading our own mapping; the page is present.
                let b = unsafe { std::ptr::read_volatile(at(page) as *const u8) };
                assert_eq!(b, page as u8 + 1, "page {page}");
            } else {
                // Left out of prefetch as a sample: still missing.
                assert_eq!(state, Some(PageState::Missing), "page {page}");
            }
        }
        assert_eq!(
            st.pages_prefetched + st.prefetch_samples,
            (pages - (to - from)) as u64,
            "{st:?}"
        );
        // A fault on a discarded page gets zeros.
        let addr = at(from + 1);
        // SAFETY: reading our own mapping (served below).
        let reader =
            std::thread::spawn(move || unsafe { std::ptr::read_volatile(addr as *const u8) });
        let deadline = Instant::now() + Duration::from_secs(10);
        while faults.is_empty() {
            assert!(Instant::now() < deadline, "no fault");
            session.pump(&mut faults, &mut events, 0);
        }
        while let Some(f) = faults.pop_front() {
            let mut more = Faults::new();
            assert_eq!(session.serve_fault(f, &mut more, &mut events), Served::Done);
        }
        assert_eq!(
            reader.join().expect("reader"),
            0,
            "a released page reads zero"
        );
        // SAFETY: unmapping our mapping; every thread is joined.
        unsafe { libc::munmap(base as *mut _, len) };
    }

    /// Background population keeps out of a sequential stream's way: after
    /// two sequential faults from page 0 it starts beyond the stream's
    /// readahead limit, not at page 0 inside the window readahead maps.
    #[test]
    fn background_population_starts_past_a_sequential_stream() {
        let pages = 4096;
        let len = pages * PAGE;
        let data: Vec<u8> = (0..len).map(|i| (i / PAGE) as u8 | 1).collect();
        let config = SessionConfig {
            background: true,
            ..SessionConfig::default()
        };
        let (cluster, limit) = (config.cluster_pages, config.max_readahead_pages);
        let Some((session, base)) = manual(pages, Features::empty(), data.clone(), config) else {
            return;
        };
        let at = |page: usize| base + (page * PAGE) as u64;
        let (mut deferred, mut events) = (Faults::new(), Vec::with_capacity(uffd::MAX_BATCH));
        // Resolving ioctls need no faulting thread: serve two "faults" by
        // hand, the second where the first cluster ended.
        for page in [0, cluster] {
            let fault = Fault::new(at(page), FaultFlags::empty(), Instant::now());
            assert_eq!(
                session.serve_fault(fault, &mut deferred, &mut events),
                Served::Done
            );
        }
        let ahead_end = session.stream.lock().expect("stream").ahead_end;
        assert!(ahead_end > 2 * cluster, "a readahead window: {ahead_end}");
        assert_eq!(
            session.background_step(&mut deferred, &mut events),
            Some(Served::Done)
        );
        let first = ahead_end + limit;
        assert_eq!(session.page_state(at(first)), Some(PageState::Present));
        assert_eq!(
            session.page_state(at(first - 1)),
            Some(PageState::Missing),
            "background starts past the readahead limit"
        );
        assert_eq!(
            session.page_state(at(2 * cluster)),
            Some(PageState::Missing),
            "the window is left to readahead"
        );
        // Populating to the end, the cursor wraps and fills what it skipped.
        while session
            .background_step(&mut deferred, &mut events)
            .is_some()
        {}
        for page in 0..pages {
            assert_eq!(
                session.page_state(at(page)),
                Some(PageState::Present),
                "page {page}"
            );
        }
        // SAFETY: every page is present; reading our own mapping.
        let mem = unsafe { std::slice::from_raw_parts(base as *const u8, len) };
        assert!(mem == &data[..], "every byte matches the source");
        // SAFETY: unmapping our mapping; nothing else uses it.
        unsafe { libc::munmap(base as *mut _, len) };
    }

    /// Claims from a pattern: `d` data, `z` zero in the buffer, `Z` zero not
    /// in the buffer (a hole outside the read, or discarded meanwhile), `.`
    /// no claim (a gap).
    fn claims(pattern: &str) -> Vec<Claim> {
        pattern
            .chars()
            .enumerate()
            .filter(|(_, ch)| *ch != '.')
            .map(|(page, ch)| Claim {
                page,
                zero: ch != 'd',
                in_buf: ch != 'Z',
            })
            .collect()
    }

    fn runs(pattern: &str, merge: usize, hugetlb: bool) -> Vec<(usize, bool)> {
        let mut c = claims(pattern);
        let mut out = Vec::new();
        while !c.is_empty() {
            let (k, zero) = plan_run(&c, merge, hugetlb);
            assert!(k >= 1 && k <= c.len());
            out.push((k, zero));
            c.drain(..k);
        }
        out
    }

    #[test]
    fn short_zero_runs_between_data_are_copied_along() {
        // Every 4th page zero: one COPY instead of eight ioctls.
        assert_eq!(runs("dddzdddzdddzdddd", 8, false), vec![(16, false)]);
        // A long zero run keeps its ZEROPAGE; a trailing one is not copied.
        assert_eq!(
            runs("ddzzzzdd", 3, false),
            vec![(2, false), (4, true), (2, false)]
        );
        assert_eq!(runs("dddzz", 8, false), vec![(3, false), (2, true)]);
        // A leading zero run is never copied: it may be the tail of a long
        // run split by an earlier ioctl.
        assert_eq!(runs("zzdd", 8, false), vec![(2, true), (2, false)]);
        // The sparse guest's layout: nine zero pages between data pages.
        assert_eq!(
            runs("dzzzzzzzzzd", 8, false),
            vec![(1, false), (9, true), (1, false)]
        );
        // Zeros whose bytes are not in the buffer are never copied.
        assert_eq!(
            runs("ddZdd", 8, false),
            vec![(2, false), (1, true), (2, false)]
        );
        // Gaps end a run.
        assert_eq!(runs("dd.dd", 8, false), vec![(2, false), (2, false)]);
        // merge 0: every zero run gets its own ioctl.
        assert_eq!(
            runs("dzd", 0, false),
            vec![(1, false), (1, true), (1, false)]
        );
        // hugetlbfs: zero pages not copied along go one at a time.
        assert_eq!(
            runs("dZZd", 8, true),
            vec![(1, false), (1, true), (1, true), (1, false)]
        );
        assert_eq!(runs("dzzd", 8, true), vec![(4, false)]);
    }
}
