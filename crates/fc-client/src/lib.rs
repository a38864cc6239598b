//! Firecracker's side of the UFFD snapshot-restore handshake, played against
//! a page-fault handler, then a check of every byte it serves (`pagewire
//! fc-client`).
//!
//! Why a crate of its own and not `wire`: `wire` holds the protocol, both
//! sides of it (`send_handshake` is what this crate sends with). This crate
//! is a stand-in VMM and a load generator: it maps guest memory, touches it
//! in patterns, times the faults, verifies the bytes, misbehaves on demand
//! ([`hostile`]) and can run the engine in-process (`embedded`); none of
//! that is protocol, and `wire` stays small enough for a handler to link.
//!
//! It does what Firecracker does on `PUT /snapshot/load` with a `Uffd` memory
//! backend: maps each guest memory region anonymous private (2 MiB hugetlb
//! with `--huge`), creates a userfaultfd (`/dev/userfaultfd`, else the
//! syscall; close-on-exec, non-blocking, not user-mode-only), negotiates
//! `EVENT_REMOVE` only, registers every region in MISSING mode, connects to the
//! handler's socket and sends one message: the JSON region table with the
//! userfaultfd as SCM_RIGHTS. The socket stays open until the process exits.
//!
//! Then threads touch guest pages and compare each with the memory file
//! (read with `pread`), balloon ranges are released with `MADV_DONTNEED` (and
//! must read as zero afterwards), and [`run`] returns a report (which the
//! binary prints as JSON). A watchdog exits the process with code 3
//! ([`EXIT_HUNG`]) when a page access (or a balloon madvise) does not finish
//! in time, naming the page.
//!
//! `--pattern` picks the access pattern of the touch phase (sequential,
//! random, strided, a hot set touched several times, or a replayed trace), and
//! `--record-trace` writes the pages a run touched first, in order, as a trace
//! that `--pattern trace:FILE` replays.
//!
//! With `--embedded` there is no socket and no separate handler: after
//! creating and registering the userfaultfd exactly as above, the client
//! starts a `pager::Engine` in its own process and serves its own memory, so
//! that the engine can be measured without a second process; the report then
//! adds the engine's statistics and the CPU time of its serving threads.

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::mem::MaybeUninit;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use pager::{
    Engine, EngineConfig, PageSize, SessionConfig, SessionHandle, SessionSpec, StatsSnapshot,
};
use rustix::mm::{Advice, MapFlags, ProtFlags};
use serde::Serialize;
use testbed::{bail, ensure, Context as _};
use tracing::debug;
use uffd::{Features, RegisterMode, Uffd};
use wire::firecracker::Mapping;

pub mod hostile;

pub use testbed::{Error, Result};

/// Page size of `--huge` (MAP_HUGE_2MB).
const HUGE_PAGE_SIZE: usize = 2 << 20;
/// How many mismatching pages the report lists.
const MAX_LISTED_MISMATCHES: usize = 8;
/// How many pages `--write-check` writes.
const WRITE_CHECK_PAGES: usize = 8;
/// Exit code when a page access hung.
pub const EXIT_HUNG: i32 = 3;
const MIB: f64 = (1u64 << 20) as f64;
/// The hot set of `--pattern hotset` is one page in this many (10%).
const HOTSET_FRACTION_DIVISOR: usize = 10;
/// Prefix of the engine's serving threads' names (`pagewire-serve-N`, cut to
/// 15 bytes by the kernel).
const SERVING_THREAD_PREFIX: &str = "pagewire-serv";

/// What a run does. The command line's `pagewire fc-client` flags, one
/// field each (the binary fills it from them).
#[derive(Clone, Debug)]
pub struct Config {
    /// Listening Unix socket of the page-fault handler (required unless
    /// --embedded).
    pub socket: Option<PathBuf>,
    /// Snapshot memory file: the guest's regions end to end, and the truth
    /// every served page is compared against.
    pub mem_file: PathBuf,
    /// Split the file into this many guest memory regions, each mapped (and
    /// registered) separately at non-contiguous host addresses.
    pub regions: usize,
    /// Back guest memory with 2 MiB huge pages (MAP_HUGETLB|MAP_HUGE_2MB);
    /// the file size must be a multiple of 2 MiB and enough huge pages must
    /// be reserved in /proc/sys/vm/nr_hugepages.
    pub huge: bool,
    /// Threads touching pages concurrently.
    pub threads: usize,
    /// Order in which pages are touched (random: a deterministic permutation).
    /// --pattern overrides it.
    pub order: Order,
    /// Access pattern of the touch phase; overrides --order. `seq` and
    /// `random` are --order sequential and random; `strided` visits pages 0,
    /// S, 2S, ..., then 1, S+1, ... (S = --stride), every page once; `hotset`
    /// touches a pseudo-random 10% of the pages (chosen with --seed) --passes
    /// times, each pass in the same shuffled order; `trace:FILE` replays a
    /// trace: one page index of the flat layout (file offset / page size) a
    /// line, in order, repeats allowed, lines starting with `#` ignored.
    pub pattern: Option<Pattern>,
    /// Stride in pages of `--pattern strided`.
    pub stride: usize,
    /// Passes over the hot set of `--pattern hotset`.
    pub passes: usize,
    /// Write the pages the touch phase touched first, in the order they
    /// were handed out to the touching threads, as a trace for
    /// `--pattern trace:FILE`.
    pub record_trace: Option<PathBuf>,
    /// Seed of the random order (and of the hot set).
    pub seed: u64,
    /// Touch only this fraction (0..=1) of the pages, the first ones in the
    /// chosen order (of one pass's sequence, for hotset and trace).
    pub touch_fraction: f64,
    /// After the touch phase, release OFFSET:LEN (bytes of the guest's flat
    /// layout, i.e. file offsets; page aligned; K/M/G suffixes and 0x hex
    /// accepted) with MADV_DONTNEED, as the balloon device does. Repeatable.
    /// Every page there must then read zero.
    pub balloon: Vec<BalloonRange>,
    /// Pages OFFSET:LEN (as --balloon) the handler must poison (a corrupt
    /// chunk of an image): they are left out of the touch and verify
    /// phases, and afterwards each must make a system call that reads it
    /// fail with EFAULT (a load would be SIGBUS). Repeatable.
    pub poisoned: Vec<BalloonRange>,
    /// Touch this many pages (one thread), then exit at once with code 0
    /// without any cleanup (a VM dying mid-serve).
    pub exit_after: Option<usize>,
    /// After verification, write a byte to a few pages and read it back.
    pub write_check: bool,
    /// Exit with code 3 when a page access makes no progress for this long.
    pub timeout_s: f64,
    /// Serve this process's own memory with an in-process `pager::Engine`
    /// instead of sending the userfaultfd to a handler (no --socket).
    pub embedded: bool,
    /// Serving threads of the embedded engine [default: 2].
    pub serve_threads: Option<usize>,
    /// Pages the embedded engine serves around each fault [default: 16].
    pub cluster_pages: Option<usize>,
    /// Let the embedded engine populate memory in the background.
    pub background: bool,
    /// Keep the embedded engine's fault-around window at --cluster-pages.
    pub fixed_cluster: bool,
    /// The embedded engine prefetches this working set (recorded on the
    /// memory file: the caller loads it and checks that it was).
    pub prefetch: Option<pager::PrefetchSet>,
    /// Pages per background step of the embedded engine [default: 64].
    pub background_chunk: Option<usize>,
    /// Misbehave as a broken or hostile VMM would (tests of `serve`):
    /// `blocking-uffd` (no O_NONBLOCK), `no-api` (no UFFDIO_API; waits for
    /// the server to close the connection), `clear-nonblock` (a thread
    /// clears O_NONBLOCK on the shared file every millisecond),
    /// `declare-less:BYTES` (the last region declared shorter than
    /// registered), `split-vmas` (regions split into VMAs after
    /// registering).
    pub misbehave: Option<hostile::Misbehave>,
    /// Before the touch phase, for this many milliseconds: threads read
    /// random pages while another discards random runs of them
    /// (MADV_DONTNEED), mostly in a small shared window. Every byte read
    /// must be the file's or zero, and every discarded page zero from then
    /// on (checked in the verify phase).
    pub balloon_race: Option<u64>,
    /// Wait this long after the handshake before touching anything (so a
    /// handler's prefetch of a recorded working set has run: tests that
    /// count faults then do not race it).
    pub start_after_ms: u64,
}

impl Config {
    fn serve_threads(&self) -> usize {
        self.serve_threads.unwrap_or(2)
    }

    fn cluster_pages(&self) -> usize {
        self.cluster_pages
            .unwrap_or(SessionConfig::default().cluster_pages)
    }

    fn background_chunk(&self) -> usize {
        self.background_chunk
            .unwrap_or(SessionConfig::default().background_chunk)
    }
}

/// A `--pattern`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Pattern {
    Seq,
    Random,
    Strided,
    Hotset,
    Trace(PathBuf),
}

impl Pattern {
    fn name(&self) -> &'static str {
        match self {
            Pattern::Seq => "seq",
            Pattern::Random => "random",
            Pattern::Strided => "strided",
            Pattern::Hotset => "hotset",
            Pattern::Trace(_) => "trace",
        }
    }
}

/// Parses a `--pattern`: `seq`, `random`, `strided`, `hotset` or
/// `trace:FILE`.
pub fn parse_pattern(s: &str) -> Result<Pattern, String> {
    match s {
        "seq" | "sequential" => Ok(Pattern::Seq),
        "random" => Ok(Pattern::Random),
        "strided" => Ok(Pattern::Strided),
        "hotset" => Ok(Pattern::Hotset),
        _ => match s.strip_prefix("trace:") {
            Some("") => Err("trace: needs a file name (trace:FILE)".to_string()),
            Some(path) => Ok(Pattern::Trace(PathBuf::from(path))),
            None => Err(format!(
                "{s:?}: expected seq, random, strided, hotset or trace:FILE"
            )),
        },
    }
}

/// The order of the touch phase without a [`Pattern`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Order {
    Sequential,
    Random,
}

/// A `--balloon` range, in bytes of the guest's flat layout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BalloonRange {
    pub offset: u64,
    pub len: u64,
}

/// Parses a `--balloon` range: `OFFSET:LEN`, each a size ([`testbed::parse_size`]).
pub fn parse_balloon(s: &str) -> Result<BalloonRange, String> {
    let (offset, len) = s
        .split_once(':')
        .ok_or_else(|| format!("{s:?}: expected OFFSET:LEN"))?;
    Ok(BalloonRange {
        offset: testbed::parse_size(offset)?,
        len: testbed::parse_size(len)?,
    })
}

// ---------------------------------------------------------------------------
// Guest memory

/// One guest memory region: `size` bytes at host address `host`, holding the
/// file's bytes from `offset`.
#[derive(Clone, Copy, Debug)]
struct Region {
    host: usize,
    size: usize,
    offset: u64,
}

/// The guest's regions. The mappings are never unmapped: they live until the
/// process exits, so no thread (even one the watchdog gives up on) can touch
/// freed memory.
#[derive(Clone, Debug)]
struct Layout {
    page_size: usize,
    regions: Vec<Region>,
    pages_total: usize,
}

/// Where a page of the guest's flat layout lives.
#[derive(Clone, Copy, Debug)]
struct PageLoc {
    region: usize,
    /// Bytes from the region's start.
    offset_in_region: usize,
    /// Bytes from the file's start.
    file_offset: u64,
    host: usize,
}

impl Layout {
    /// Splits `file_size` bytes into `n` regions (each a multiple of the page
    /// size, the last taking the remainder) and maps each separately inside
    /// one PROT_NONE reservation, with a one-page guard gap before, between
    /// and after them, so that the host addresses are not contiguous.
    fn map(file_size: u64, n: usize, huge: bool) -> Result<Layout> {
        let page_size = if huge {
            HUGE_PAGE_SIZE
        } else {
            rustix::param::page_size()
        };
        let file_size = usize::try_from(file_size).context("memory file too large")?;
        ensure!(file_size > 0, "the memory file is empty");
        if file_size % page_size != 0 {
            if huge {
                bail!(
                    "the memory file is {file_size} bytes, not a multiple of 2 MiB: it cannot \
                     back 2 MiB huge pages (--huge)"
                );
            }
            bail!(
                "the memory file is {file_size} bytes, not a multiple of the page size {page_size}"
            );
        }
        let pages_total = file_size / page_size;
        ensure!(n >= 1, "--regions must be at least 1");
        ensure!(
            n <= pages_total,
            "--regions {n}: the memory file has only {pages_total} pages of {page_size} bytes"
        );
        let per_region = pages_total / n * page_size;
        let sizes: Vec<usize> = (0..n)
            .map(|i| {
                if i + 1 == n {
                    file_size - per_region * (n - 1)
                } else {
                    per_region
                }
            })
            .collect();

        let gap = page_size;
        // Extra page_size so that the start can be aligned to it.
        let reserve_len = file_size + gap * (n + 1) + page_size;
        // SAFETY: a fresh inaccessible mapping at an address the kernel picks
        // overlaps nothing that exists.
        let reserved = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                reserve_len,
                ProtFlags::empty(),
                MapFlags::PRIVATE | MapFlags::NORESERVE,
            )
        }
        .with_context(|| format!("reserving {reserve_len} bytes of address space"))?;
        let base = (reserved as usize).next_multiple_of(page_size);

        let mut flags = MapFlags::PRIVATE | MapFlags::FIXED;
        if huge {
            flags |= MapFlags::HUGETLB | MapFlags::HUGE_2MB;
        }
        let mut regions = Vec::with_capacity(n);
        let mut host = base + gap;
        let mut offset = 0u64;
        for (i, &size) in sizes.iter().enumerate() {
            // SAFETY: `[host, host+size)` lies inside the reservation made
            // above, which this program owns and nothing references; MAP_FIXED
            // replaces only that part of it.
            let ptr = unsafe {
                rustix::mm::mmap_anonymous(
                    host as *mut std::ffi::c_void,
                    size,
                    ProtFlags::READ | ProtFlags::WRITE,
                    flags,
                )
            };
            match ptr {
                Ok(p) if p as usize == host => {}
                Ok(p) => bail!("mmap of region {i} returned {p:?}, not the requested {host:#x}"),
                Err(e) if huge => bail!(
                    "mmap of region {i} ({size} bytes) with 2 MiB huge pages failed: {e}; huge \
                     pages must be reserved in /proc/sys/vm/nr_hugepages (this needs {} in all)",
                    file_size / HUGE_PAGE_SIZE
                ),
                Err(e) => return Err(e).context(format!("mmap of region {i} ({size} bytes)")),
            }
            regions.push(Region { host, size, offset });
            host += size + gap;
            offset += size as u64;
        }
        Ok(Layout {
            page_size,
            regions,
            pages_total,
        })
    }

    fn locate(&self, page: usize) -> PageLoc {
        let file_offset = (page * self.page_size) as u64;
        let region = self
            .regions
            .partition_point(|r| r.offset <= file_offset)
            .saturating_sub(1);
        let r = &self.regions[region];
        let offset_in_region = (file_offset - r.offset) as usize;
        PageLoc {
            region,
            offset_in_region,
            file_offset,
            host: r.host + offset_in_region,
        }
    }

    fn messages(&self) -> Vec<Mapping> {
        self.regions
            .iter()
            .map(|r| {
                Mapping::new(
                    r.host as u64,
                    r.size as u64,
                    r.offset,
                    self.page_size as u64,
                )
            })
            .collect()
    }

    /// Loads the byte at `host` (faulting its page in).
    fn load_byte(&self, host: usize) -> u8 {
        // SAFETY: `host` is inside one of the guest mappings, which are
        // readable and never unmapped. No Rust reference points into guest
        // memory; the kernel populates pages atomically.
        unsafe { std::ptr::read_volatile(host as *const u8) }
    }

    /// Copies the page at `host` into `out` (`page_size` bytes).
    fn read_page(&self, host: usize, out: &mut [u8]) {
        assert_eq!(out.len(), self.page_size);
        // SAFETY: `[host, host+page_size)` is one page inside a readable
        // mapping that is never unmapped; `out` is a distinct buffer of that
        // length. Nothing writes guest memory while pages are read (a trace
        // may have two threads read the same page at once, which is fine).
        unsafe { std::ptr::copy_nonoverlapping(host as *const u8, out.as_mut_ptr(), out.len()) }
    }

    /// Writes `value` at `host` and reads it back.
    fn write_read_byte(&self, host: usize, value: u8) -> u8 {
        // SAFETY: `host` is inside a readable and writable mapping that is
        // never unmapped, and no other thread accesses it during the write
        // check. Volatile, so the read really goes to memory.
        unsafe {
            std::ptr::write_volatile(host as *mut u8, value);
            std::ptr::read_volatile(host as *const u8)
        }
    }

    /// The pieces (host address, length) of a range of the flat layout, one
    /// per region it overlaps.
    fn host_pieces(&self, range: BalloonRange) -> Vec<(usize, usize)> {
        let end = range.offset + range.len;
        self.regions
            .iter()
            .filter_map(|r| {
                let r_end = r.offset + r.size as u64;
                let start = range.offset.max(r.offset);
                let stop = end.min(r_end);
                (start < stop).then(|| {
                    (
                        r.host + (start - r.offset) as usize,
                        (stop - start) as usize,
                    )
                })
            })
            .collect()
    }
}

// ---------------------------------------------------------------------------
// Watchdog

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
enum Phase {
    Touch = 0,
    Balloon = 1,
    Verify = 2,
    WriteCheck = 3,
}

impl Phase {
    fn from_u8(v: u8) -> Phase {
        match v {
            0 => Phase::Touch,
            1 => Phase::Balloon,
            2 => Phase::Verify,
            _ => Phase::WriteCheck,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Phase::Touch => "the touch phase",
            Phase::Balloon => "ballooning",
            Phase::Verify => "the verify phase",
            Phase::WriteCheck => "the write check",
        }
    }
}

const IDLE: u64 = u64::MAX;

/// What one worker is waiting on: a page (a balloon range index in the
/// balloon phase), since when.
struct Slot {
    item: AtomicU64,
    phase: AtomicU8,
    since_ms: AtomicU64,
}

struct Watch {
    start: Instant,
    timeout: Duration,
    slots: Vec<Slot>,
    layout: Layout,
    balloons: Vec<BalloonRange>,
}

impl Watch {
    fn now_ms(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn begin(&self, slot: usize, phase: Phase, item: usize) {
        let s = &self.slots[slot];
        s.phase.store(phase as u8, Ordering::Relaxed);
        s.since_ms.store(self.now_ms(), Ordering::Relaxed);
        s.item.store(item as u64, Ordering::Release);
    }

    fn end(&self, slot: usize) {
        self.slots[slot].item.store(IDLE, Ordering::Release);
    }

    /// Runs forever: exits the process with code 3 when a slot has been busy
    /// on one item for longer than the timeout.
    fn run(&self) {
        let tick = (self.timeout / 10).clamp(Duration::from_millis(10), Duration::from_millis(250));
        loop {
            std::thread::sleep(tick);
            let now = self.now_ms();
            for s in &self.slots {
                let item = s.item.load(Ordering::Acquire);
                if item == IDLE {
                    continue;
                }
                let since = s.since_ms.load(Ordering::Relaxed);
                if Duration::from_millis(now.saturating_sub(since)) < self.timeout {
                    continue;
                }
                let phase = Phase::from_u8(s.phase.load(Ordering::Relaxed));
                let what = if phase == Phase::Balloon {
                    let b = self.balloons.get(item as usize).copied();
                    match b {
                        Some(b) => format!(
                            "madvise(MADV_DONTNEED) of balloon range {:#x}:{:#x} did not return \
                             (the handler must read the REMOVE event)",
                            b.offset, b.len
                        ),
                        None => "a balloon madvise did not return".to_string(),
                    }
                } else {
                    let loc = self.layout.locate(item as usize);
                    format!(
                        "page {item} (region {}, offset {:#x} in the region, file offset {:#x}, \
                         host address {:#x}) was not served",
                        loc.region, loc.offset_in_region, loc.file_offset, loc.host
                    )
                };
                eprintln!(
                    "pagewire: error: fc-client: {what} within {:.1} s during {}; giving up",
                    self.timeout.as_secs_f64(),
                    phase.name()
                );
                std::process::exit(EXIT_HUNG);
            }
        }
    }
}

// ---------------------------------------------------------------------------
// Checking pages

const CHECKED: u8 = 1;
const MISMATCH: u8 = 2;
/// Touched in the touch phase (set by the first thread to touch the page).
const TOUCHED: u8 = 4;

#[derive(Serialize, Clone, Debug)]
pub struct Mismatch {
    pub phase: &'static str,
    pub region: usize,
    /// Bytes from the region's start.
    pub page_offset: u64,
    pub file_offset: u64,
    /// "file" or "zero" (a ballooned page).
    pub expected: &'static str,
    /// First differing byte within the page.
    pub first_diff_at: usize,
    pub expected_byte: u8,
    pub actual_byte: u8,
}

struct Checker<'a> {
    layout: &'a Layout,
    file: &'a File,
    watch: &'a Watch,
    /// Per page: CHECKED | MISMATCH.
    state: Vec<AtomicU8>,
    /// Per page: inside a ballooned range.
    ballooned: Vec<bool>,
    first: Mutex<Vec<Mismatch>>,
    abort: AtomicBool,
}

#[derive(Default)]
struct PassResult {
    latencies_ns: Vec<u64>,
    balloon_zero: usize,
    balloon_nonzero: usize,
    elapsed: Duration,
}

impl Checker<'_> {
    /// Reads `pages` (global page indices) with `threads` threads, taking
    /// them in order from a shared cursor, and compares each with the file
    /// (or with zero where ballooned, if `after_balloon`).
    fn pass(
        &self,
        pages: &[usize],
        threads: usize,
        phase: Phase,
        after_balloon: bool,
    ) -> Result<PassResult> {
        let cursor = AtomicUsize::new(0);
        let start = Instant::now();
        let results: Vec<Result<PassResult>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..threads)
                .map(|slot| {
                    let cursor = &cursor;
                    s.spawn(move || self.worker(slot, pages, cursor, phase, after_balloon))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(Error::Failed("a checking thread panicked".into())))
                })
                .collect()
        });
        let mut total = PassResult {
            elapsed: start.elapsed(),
            ..PassResult::default()
        };
        for r in results {
            let r = r?;
            total.latencies_ns.extend(r.latencies_ns);
            total.balloon_zero += r.balloon_zero;
            total.balloon_nonzero += r.balloon_nonzero;
        }
        Ok(total)
    }

    fn worker(
        &self,
        slot: usize,
        pages: &[usize],
        cursor: &AtomicUsize,
        phase: Phase,
        after_balloon: bool,
    ) -> Result<PassResult> {
        let page_size = self.layout.page_size;
        let mut expected = vec![0u8; page_size];
        let mut actual = vec![0u8; page_size];
        let mut out = PassResult::default();
        if phase == Phase::Touch {
            out.latencies_ns
                .reserve(pages.len() / self.watch.slots.len().max(1) + 1);
        }
        while !self.abort.load(Ordering::Relaxed) {
            let i = cursor.fetch_add(1, Ordering::Relaxed);
            let Some(&page) = pages.get(i) else { break };
            let loc = self.layout.locate(page);
            if phase == Phase::Touch {
                // Timed: one load per page, as the kernel's zero-fill
                // baseline does. Every byte is compared afterwards
                // (`verify`), so that the client's own checking is not
                // counted as the handler's time.
                let first_touch =
                    self.state[page].fetch_or(TOUCHED, Ordering::Relaxed) & TOUCHED == 0;
                self.watch.begin(slot, phase, page);
                let t0 = Instant::now();
                let _ = self.layout.load_byte(loc.host);
                let dt = t0.elapsed();
                self.watch.end(slot);
                // Only a page's first touch is a fault worth timing (a trace
                // may repeat pages, a hot set is touched several times).
                if first_touch {
                    out.latencies_ns.push(dt.as_nanos() as u64);
                }
                continue;
            }
            let want_zero = after_balloon && self.ballooned[page];
            if want_zero {
                expected.fill(0);
            } else if let Err(e) = self.file.read_exact_at(&mut expected, loc.file_offset) {
                self.abort.store(true, Ordering::Relaxed);
                return Err(e).context(format!(
                    "reading {page_size} bytes of the memory file at {:#x}",
                    loc.file_offset
                ));
            }
            self.watch.begin(slot, phase, page);
            self.layout.read_page(loc.host, &mut actual);
            self.watch.end(slot);
            let diff = if expected == actual {
                None
            } else {
                expected.iter().zip(&actual).position(|(a, b)| a != b)
            };
            let mut flags = CHECKED;
            if want_zero {
                if diff.is_none() {
                    out.balloon_zero += 1;
                } else {
                    out.balloon_nonzero += 1;
                }
            } else if diff.is_some() {
                flags |= MISMATCH;
            }
            self.state[page].fetch_or(flags, Ordering::Relaxed);
            if let Some(at) = diff {
                let mut first = self.first.lock().unwrap_or_else(|p| p.into_inner());
                if first.len() < MAX_LISTED_MISMATCHES {
                    first.push(Mismatch {
                        phase: if after_balloon {
                            "after balloon"
                        } else {
                            "touch"
                        },
                        region: loc.region,
                        page_offset: loc.offset_in_region as u64,
                        file_offset: loc.file_offset,
                        expected: if want_zero { "zero" } else { "file" },
                        first_diff_at: at,
                        expected_byte: expected[at],
                        actual_byte: actual[at],
                    });
                }
            }
        }
        Ok(out)
    }

    /// The pages touched so far, in address order.
    fn touched(&self) -> Vec<usize> {
        (0..self.state.len())
            .filter(|&p| self.state[p].load(Ordering::Relaxed) & TOUCHED != 0)
            .collect()
    }

    fn count(&self, flag: u8) -> usize {
        self.state
            .iter()
            .filter(|s| s.load(Ordering::Relaxed) & flag != 0)
            .count()
    }
}

/// The pages in the order they are touched.
fn page_order(n: usize, order: Order, seed: u64) -> Vec<usize> {
    let mut pages: Vec<usize> = (0..n).collect();
    if order == Order::Random {
        // Fisher-Yates with splitmix64: the same permutation on every run.
        let mut state = seed;
        for i in (1..n).rev() {
            let j = (splitmix64(&mut state) % (i as u64 + 1)) as usize;
            pages.swap(i, j);
        }
    }
    pages
}

/// splitmix64: the next pseudo-random number of `state`.
fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// Pages 0, S, 2S, ..., then 1, S+1, ...: every page once.
fn strided_order(n: usize, stride: usize) -> Vec<usize> {
    let stride = stride.clamp(1, n.max(1));
    (0..stride).flat_map(|r| (r..n).step_by(stride)).collect()
}

/// Reads a trace: one page index a line, `#` comments and blank lines
/// ignored; every index must be below `pages_total`.
///
/// A recorded working set (`.pwws`, from `serve --record`) is a trace too:
/// its pages in first-touch order (4 KiB pages of the memory file, taken
/// in pages of `page_size`).
fn read_trace(path: &Path, pages_total: usize, page_size: usize) -> Result<Vec<usize>> {
    let bytes =
        std::fs::read(path).with_context(|| format!("reading the trace {}", path.display()))?;
    if bytes.starts_with(b"PWWSET") {
        let set = workset::WorkingSet::decode(&bytes)
            .with_context(|| format!("reading the working set {}", path.display()))?;
        let mut seen = std::collections::HashSet::new();
        let mut pages = Vec::new();
        for t in &set.touches {
            let page = (t.page * workset::PAGE / page_size as u64) as usize;
            ensure!(
                page < pages_total,
                "{}: page {page} lies past the end of guest memory ({pages_total} pages of \
                 {page_size} bytes)",
                path.display()
            );
            if seen.insert(page) {
                pages.push(page);
            }
        }
        return Ok(pages);
    }
    let text = String::from_utf8(bytes).with_context(|| {
        format!(
            "the trace {} is neither text nor a working set",
            path.display()
        )
    })?;
    let mut pages = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let page: usize = line.parse().map_err(|e| {
            Error::Invalid(format!(
                "{}:{}: {line:?} is not a page index: {e}",
                path.display(),
                i + 1
            ))
        })?;
        ensure!(
            page < pages_total,
            "{}:{}: page {page} lies past the end of guest memory ({pages_total} pages of \
             {page_size} bytes)",
            path.display(),
            i + 1
        );
        pages.push(page);
    }
    Ok(pages)
}

/// What the touch phase does: `passes` times the pages of `sequence`, in
/// order, handed out to the touching threads from a shared counter.
struct Plan {
    name: &'static str,
    sequence: Vec<usize>,
    passes: usize,
}

impl Plan {
    fn new(args: &Config, pages_total: usize, page_size: usize) -> Result<Plan> {
        let pattern = args.pattern.clone().unwrap_or(match args.order {
            Order::Sequential => Pattern::Seq,
            Order::Random => Pattern::Random,
        });
        let mut passes = 1;
        let mut sequence = match &pattern {
            Pattern::Seq => page_order(pages_total, Order::Sequential, args.seed),
            Pattern::Random => page_order(pages_total, Order::Random, args.seed),
            Pattern::Strided => strided_order(pages_total, args.stride),
            Pattern::Hotset => {
                let mut pages = page_order(pages_total, Order::Random, args.seed);
                pages.truncate((pages_total / HOTSET_FRACTION_DIVISOR).max(1));
                passes = args.passes;
                pages
            }
            Pattern::Trace(path) => read_trace(path, pages_total, page_size)?,
        };
        let keep = ((sequence.len() as f64) * args.touch_fraction).floor() as usize;
        sequence.truncate(keep);
        Ok(Plan {
            name: pattern.name(),
            sequence,
            passes,
        })
    }
}

/// Writes the first occurrence of each page of `sequence`, in order, as a
/// trace.
fn write_trace(
    path: &Path,
    sequence: &[usize],
    pages_total: usize,
    page_size: usize,
    pattern: &str,
) -> Result<()> {
    let write = || -> std::io::Result<()> {
        let mut out = BufWriter::new(File::create(path)?);
        writeln!(
            out,
            "# pagewire fc-client trace: pattern {pattern}, page size {page_size}, \
             {pages_total} pages"
        )?;
        let mut seen = vec![false; pages_total];
        for &page in sequence {
            if !std::mem::replace(&mut seen[page], true) {
                writeln!(out, "{page}")?;
            }
        }
        out.into_inner().map_err(|e| e.into_error())?.sync_all()
    };
    write().with_context(|| format!("writing the trace {}", path.display()))
}

// ---------------------------------------------------------------------------
// CPU time

/// This process's resident anonymous memory (`RssAnon`), in KiB.
fn rss_anon_kib() -> Option<u64> {
    std::fs::read_to_string("/proc/self/status")
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("RssAnon:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// CPU time (user + system) of this whole process, in milliseconds.
fn process_cpu_ms() -> Result<f64> {
    let mut usage = MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: `usage` is writable memory of the size and alignment of a
    // `struct rusage`, which is all getrusage writes.
    let rc = unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context("getrusage(RUSAGE_SELF)");
    }
    // SAFETY: getrusage succeeded and filled the struct; it is plain integers,
    // for which the zeroed start was valid anyway.
    let usage = unsafe { usage.assume_init() };
    let ms = |t: libc::timeval| t.tv_sec as f64 * 1000.0 + t.tv_usec as f64 / 1000.0;
    Ok(ms(usage.ru_utime) + ms(usage.ru_stime))
}

/// CPU time (user + system) of this process's threads whose name starts with
/// `prefix`, in milliseconds, from `/proc/self/task/*/stat` (clock-tick
/// resolution).
fn threads_cpu_ms(prefix: &str) -> Result<f64> {
    let ticks_per_s = rustix::param::clock_ticks_per_second();
    ensure!(ticks_per_s > 0, "sysconf(_SC_CLK_TCK) returned 0");
    let mut ticks = 0u64;
    for entry in std::fs::read_dir("/proc/self/task").context("listing /proc/self/task")? {
        let entry = entry.context("listing /proc/self/task")?;
        let path = entry.path().join("stat");
        // A thread may exit between listing and reading.
        let Ok(stat) = std::fs::read_to_string(&path) else {
            continue;
        };
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            bail!("{}: unexpected format {stat:?}", path.display());
        };
        if open >= close || !stat[open + 1..close].starts_with(prefix) {
            continue;
        }
        // After the comm come field 3 (state) onwards: utime and stime are
        // fields 14 and 15 of the line.
        let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
        let field = |n: usize| -> Result<u64> {
            let text = fields
                .get(n - 3)
                .with_context(|| format!("{}: no field {n}", path.display()))?;
            text.parse()
                .with_context(|| format!("{}: field {n} is {text:?}", path.display()))
        };
        ticks += field(14)? + field(15)?;
    }
    Ok(ticks as f64 * 1000.0 / ticks_per_s as f64)
}

// ---------------------------------------------------------------------------
// Report

/// A first load slower than this waited for the handler.
const WAITED_NS: u64 = 5_000;

#[derive(Serialize, Debug)]
pub struct Latency {
    pub samples: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub max_us: f64,
}

impl Latency {
    fn of(mut ns: Vec<u64>) -> Option<Latency> {
        if ns.is_empty() {
            return None;
        }
        ns.sort_unstable();
        let rank = |p: f64| {
            let idx = ((p / 100.0) * ns.len() as f64).ceil() as usize;
            ns[idx.clamp(1, ns.len()) - 1] as f64 / 1000.0
        };
        Some(Latency {
            samples: ns.len(),
            p50_us: rank(50.0),
            p99_us: rank(99.0),
            max_us: ns[ns.len() - 1] as f64 / 1000.0,
        })
    }
}

#[derive(Serialize, Debug)]
pub struct WriteCheck {
    pub pages: usize,
    pub failed: usize,
}

#[derive(Serialize, Debug)]
pub struct Report {
    pub ok: bool,
    /// Pages of --poisoned, and how many of them the kernel could read
    /// (must be 0: served garbage instead of poison).
    pub poisoned_pages: usize,
    pub poisoned_pages_readable: usize,
    pub pid: u32,
    pub page_size: usize,
    pub pages_total: usize,
    pub pages_touched: usize,
    /// Distinct pages compared at least once (touch and verify phases).
    pub pages_verified: usize,
    /// Distinct pages that differed from the file at least once.
    pub mismatched_pages: usize,
    pub first_mismatches: Vec<Mismatch>,
    pub balloon_pages: usize,
    pub balloon_pages_zero: usize,
    pub balloon_pages_nonzero: usize,
    /// With --balloon-race: reads, discards, and the first wrong byte.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balloon_race: Option<serde_json::Value>,
    /// The access pattern (seq, random, strided, hotset, trace).
    pub pattern: &'static str,
    /// Threads touching pages.
    pub threads: usize,
    /// Passes over the pattern's sequence (more than 1 for hotset).
    pub passes: usize,
    /// Page accesses of the touch phase, repeats included.
    pub touches: usize,
    /// The whole touch phase, every pass.
    pub touch_ms: f64,
    /// The first pass of the touch phase (all of it but for hotset).
    pub first_pass_ms: f64,
    /// Bytes of the touched pages per second of the first pass.
    pub touch_mib_per_s: f64,
    /// Anonymous memory the touch phase made resident in this process, MiB
    /// (`RssAnon` after minus before): what lazy loading costs in memory,
    /// to compare with the bytes touched.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub resident_mib: Option<f64>,
    /// Time of the first load of each page in the touch phase.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub faults_latency: Option<Latency>,
    /// The same, for the loads that waited for the handler (slower than
    /// WAITED_NS; a load of a page already mapped takes well under 1 µs):
    /// with background population this is what a fault on a page not yet
    /// populated costs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub waited_latency: Option<Latency>,
    /// Comparing every touched page with the file after the touch phase
    /// (and every page after ballooning), untimed.
    pub verify_ms: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub write_check: Option<WriteCheck>,
    /// CPU time (user + system) of the whole client process.
    pub client_cpu_ms: f64,
    /// With --embedded: the engine's statistics.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_stats: Option<StatsSnapshot>,
    /// With --embedded: CPU time (user + system) of the engine's serving
    /// threads.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handler_cpu_ms: Option<f64>,
    /// The region table sent to the handler (given to the engine with
    /// --embedded).
    pub regions: Vec<Mapping>,
}

// ---------------------------------------------------------------------------
// Main flow

/// How a run ended.
#[derive(Debug)]
pub enum Outcome {
    /// The run's report; `ok` says whether every byte was right.
    Report(Box<Report>),
    /// With [`hostile::Misbehave::NoApi`]: whether the server closed the
    /// connection within the timeout (it must).
    ClosedByServer(bool),
    /// With `exit_after`: the pages touched, and how many of them were
    /// wrong. The caller is to exit at once, without cleanup, as a VM that
    /// dies mid-serve does (the embedded engine, if any, is still running).
    ExitedAfter { pages: usize, mismatched: usize },
}

/// Plays Firecracker's side of the handshake as `args` says, touches and
/// checks the pages, and reports.
///
/// Guest memory stays mapped, and the socket and the userfaultfd open,
/// until the process exits: the handler takes EOF as the end of the VM.
/// A page access that makes no progress for `timeout_s` makes the watchdog
/// print what hung on stderr and exit the process with [`EXIT_HUNG`]: the
/// thread stuck in the fault cannot be got back.
pub fn run(args: &Config) -> Result<Outcome> {
    ensure!(args.threads >= 1, "--threads must be at least 1");
    ensure!(
        (0.0..=1.0).contains(&args.touch_fraction),
        "--touch-fraction must be within 0..=1, not {}",
        args.touch_fraction
    );
    ensure!(
        args.timeout_s.is_finite() && args.timeout_s > 0.0,
        "--timeout-s must be positive"
    );
    ensure!(args.stride >= 1, "--stride must be at least 1");
    ensure!(args.passes >= 1, "--passes must be at least 1");
    match (&args.socket, args.embedded) {
        (None, false) => bail!(
            "--socket is required (the handler's socket), unless --embedded serves the memory \
             in this process"
        ),
        (Some(_), true) => bail!("--socket and --embedded exclude each other"),
        _ => {}
    }
    if !args.embedded {
        ensure!(
            args.serve_threads.is_none()
                && args.cluster_pages.is_none()
                && args.background_chunk.is_none()
                && !args.background,
            "--serve-threads, --cluster-pages, --background and --background-chunk need \
             --embedded"
        );
        ensure!(
            args.prefetch.is_none(),
            "--prefetch needs --embedded (a handler of its own prefetches its own set)"
        );
    }
    ensure!(
        args.serve_threads() >= 1,
        "--serve-threads must be at least 1"
    );
    ensure!(
        args.cluster_pages() >= 1,
        "--cluster-pages must be at least 1"
    );
    ensure!(
        args.background_chunk() >= 1,
        "--background-chunk must be at least 1"
    );

    let file = File::open(&args.mem_file)
        .with_context(|| format!("opening the memory file {}", args.mem_file.display()))?;
    let file_size = file
        .metadata()
        .with_context(|| format!("reading the size of {}", args.mem_file.display()))?
        .len();
    let layout = Layout::map(file_size, args.regions, args.huge)?;
    let page_size = layout.page_size;
    let mut plan = Plan::new(args, layout.pages_total, page_size)?;
    let mut poisoned = vec![false; layout.pages_total];
    for b in &args.poisoned {
        ensure!(
            b.offset % page_size as u64 == 0
                && b.len % page_size as u64 == 0
                && b.offset.checked_add(b.len).is_some_and(|e| e <= file_size),
            "--poisoned {:#x}:{:#x}: page aligned, within guest memory",
            b.offset,
            b.len
        );
        let first = (b.offset / page_size as u64) as usize;
        poisoned[first..first + (b.len / page_size as u64) as usize].fill(true);
    }
    plan.sequence.retain(|&p| !poisoned[p]);

    let mut ballooned = vec![false; layout.pages_total];
    for b in &args.balloon {
        ensure!(
            b.offset % page_size as u64 == 0 && b.len % page_size as u64 == 0 && b.len > 0,
            "--balloon {:#x}:{:#x}: offset and length must be multiples of the page size \
             {page_size}, and the length non-zero",
            b.offset,
            b.len
        );
        ensure!(
            b.offset
                .checked_add(b.len)
                .is_some_and(|end| end <= file_size),
            "--balloon {:#x}:{:#x} extends past the end of guest memory ({file_size:#x} bytes)",
            b.offset,
            b.len
        );
        let first = (b.offset / page_size as u64) as usize;
        let n = (b.len / page_size as u64) as usize;
        ballooned[first..first + n].fill(true);
    }

    // Firecracker's order: userfaultfd, API handshake, register, connect, send.
    let misbehave = args.misbehave;
    let uffd = Uffd::open_with(uffd::OpenOptions {
        non_blocking: misbehave != Some(hostile::Misbehave::BlockingUffd),
        ..uffd::OpenOptions::default()
    })
    .context("creating the userfaultfd")?;
    if misbehave != Some(hostile::Misbehave::NoApi) {
        uffd.api(Features::EVENT_REMOVE)
            .context("UFFDIO_API handshake with features = EVENT_REMOVE")?;
        for (i, r) in layout.regions.iter().enumerate() {
            uffd.register(r.host as u64, r.size, RegisterMode::MISSING)
                .with_context(|| {
                    format!(
                        "registering region {i} ({:#x}+{:#x}) in MISSING mode",
                        r.host, r.size
                    )
                })?;
        }
    }
    hostile::after_register(misbehave, &layout)?;
    let mut messages = layout.messages();
    hostile::declare(misbehave, &mut messages, page_size)?;
    let embedded = match &args.socket {
        Some(socket) if !args.embedded => {
            let stream = wire::firecracker::send_handshake(socket, &messages, &uffd)
                .map_err(Error::other)?;
            debug!(regions = messages.len(), "handshake sent");
            if misbehave == Some(hostile::Misbehave::NoApi) {
                let closed =
                    hostile::closed_by_server(&stream, Duration::from_secs_f64(args.timeout_s));
                return Ok(Outcome::ClosedByServer(closed));
            }
            if misbehave == Some(hostile::Misbehave::ClearNonblock) {
                let fd = std::os::fd::AsFd::as_fd(&uffd)
                    .try_clone_to_owned()
                    .context("duplicating the userfaultfd")?;
                hostile::start_clearing_nonblock(fd)?;
            }
            // Like the VMM, keep the socket and our copy of the userfaultfd
            // open until the process exits: the handler takes EOF as the end
            // of the VM.
            std::mem::forget(stream);
            std::mem::forget(uffd);
            None
        }
        _ => Some(Embedded::start(args, &layout, uffd)?),
    };

    // One more slot for the balloon thread of --balloon-race.
    let slots = args.threads.max(1) + usize::from(args.balloon_race.is_some());
    let watch = Arc::new(Watch {
        start: Instant::now(),
        timeout: Duration::from_secs_f64(args.timeout_s),
        slots: (0..slots)
            .map(|_| Slot {
                item: AtomicU64::new(IDLE),
                phase: AtomicU8::new(0),
                since_ms: AtomicU64::new(0),
            })
            .collect(),
        layout: layout.clone(),
        balloons: args.balloon.clone(),
    });
    {
        let watch = Arc::clone(&watch);
        std::thread::Builder::new()
            .name("fc-client-watchdog".into())
            .spawn(move || watch.run())
            .context("starting the watchdog thread")?;
    }

    if args.start_after_ms > 0 {
        std::thread::sleep(std::time::Duration::from_millis(args.start_after_ms));
    }
    let race = match args.balloon_race {
        Some(ms) => {
            let race = hostile::balloon_race(&layout, &file, &watch, args.threads, ms, args.seed)?;
            for (b, raced) in ballooned.iter_mut().zip(&race.ballooned) {
                *b |= *raced;
            }
            Some(race)
        }
        None => None,
    };
    let checker = Checker {
        layout: &layout,
        file: &file,
        watch: &watch,
        state: (0..layout.pages_total).map(|_| AtomicU8::new(0)).collect(),
        ballooned,
        first: Mutex::new(Vec::new()),
        abort: AtomicBool::new(false),
    };
    let order = &plan.sequence;

    if let Some(n) = args.exit_after {
        let n = n.min(order.len());
        checker.pass(&order[..n], 1, Phase::Touch, false)?;
        checker.pass(&checker.touched(), 1, Phase::Verify, false)?;
        if let Some(path) = &args.record_trace {
            write_trace(path, &order[..n], layout.pages_total, page_size, plan.name)?;
        }
        // No cleanup: the engine keeps serving until the process exits.
        std::mem::forget(embedded);
        return Ok(Outcome::ExitedAfter {
            pages: n,
            mismatched: checker.count(MISMATCH),
        });
    }

    // Touch phase: the first pass faults the pages in, later ones (hotset)
    // touch them again.
    let rss_before = rss_anon_kib();
    let touch = checker.pass(order, args.threads, Phase::Touch, false)?;
    let first_pass_secs = touch.elapsed.as_secs_f64();
    let mut touch_secs = first_pass_secs;
    let mut latencies_ns = touch.latencies_ns;
    for _ in 1..plan.passes {
        let again = checker.pass(order, args.threads, Phase::Touch, false)?;
        touch_secs += again.elapsed.as_secs_f64();
        latencies_ns.extend(again.latencies_ns);
    }
    let touch_n = checker.count(TOUCHED);
    // Memory the touch phase made resident: pages copied in (zero pages map
    // the shared zero page and add nothing), against the bytes touched.
    let resident_mib = match (rss_before, rss_anon_kib()) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 / 1024.0),
        _ => None,
    };
    if let Some(path) = &args.record_trace {
        write_trace(path, order, layout.pages_total, page_size, plan.name)?;
    }

    // Every byte of every touched page against the file (or zero, for the
    // pages a balloon race discarded).
    let verify = checker.pass(
        &checker.touched(),
        args.threads,
        Phase::Verify,
        race.is_some(),
    )?;
    let mut verify_ms = verify.elapsed.as_secs_f64() * 1000.0;

    // Balloon, then verify every page again.
    let mut balloon_zero = verify.balloon_zero;
    let mut balloon_nonzero = verify.balloon_nonzero;
    if !args.balloon.is_empty() {
        for (i, b) in args.balloon.iter().enumerate() {
            for (host, len) in layout.host_pieces(*b) {
                watch.begin(0, Phase::Balloon, i);
                // SAFETY: `[host, host+len)` is page aligned and inside one of
                // the guest mappings; no Rust reference points into guest
                // memory, and dropping its pages is what this test wants.
                let r = unsafe { rustix::mm::madvise(host as *mut _, len, Advice::LinuxDontNeed) };
                watch.end(0);
                r.with_context(|| {
                    format!(
                        "madvise(MADV_DONTNEED) of balloon range {:#x}:{:#x} (host {host:#x}+{len:#x})",
                        b.offset, b.len
                    )
                })?;
            }
        }
        let all: Vec<usize> = (0..layout.pages_total).collect();
        let verify = checker.pass(&all, args.threads, Phase::Verify, true)?;
        balloon_zero = verify.balloon_zero;
        balloon_nonzero = verify.balloon_nonzero;
        verify_ms += verify.elapsed.as_secs_f64() * 1000.0;
    }

    let write_check = if args.write_check {
        let k = WRITE_CHECK_PAGES.min(layout.pages_total);
        let mut failed = 0;
        for i in 0..k {
            let page = i * layout.pages_total / k;
            let loc = layout.locate(page);
            let host = loc.host + (i * 67 + 13) % page_size;
            watch.begin(0, Phase::WriteCheck, page);
            let old = layout.load_byte(host);
            let value = !old;
            let back = layout.write_read_byte(host, value);
            watch.end(0);
            if back != value {
                failed += 1;
            }
        }
        Some(WriteCheck { pages: k, failed })
    } else {
        None
    };

    // The engine's figures, before its threads (and their /proc entries) go.
    let (handler_stats, handler_cpu_ms) = match embedded {
        Some(e) => {
            let (stats, cpu_ms) = e.finish()?;
            (Some(stats), Some(cpu_ms))
        }
        None => (None, None),
    };
    let client_cpu_ms = process_cpu_ms()?;

    // Each page that must be poisoned: the kernel may not read it.
    let mut poisoned_readable = 0;
    for (page, _) in poisoned.iter().enumerate().filter(|(_, p)| **p) {
        let host = layout.locate(page).host;
        watch.begin(0, Phase::Verify, page);
        let readable = kernel_can_read(host)?;
        watch.end(0);
        if readable {
            poisoned_readable += 1;
        }
    }
    let mismatched_pages = checker.count(MISMATCH);
    let write_failed = write_check.as_ref().is_some_and(|w| w.failed > 0);
    let race_wrong = race.as_ref().is_some_and(|r| r.wrong.is_some());
    let ok = mismatched_pages == 0
        && balloon_nonzero == 0
        && !write_failed
        && !race_wrong
        && poisoned_readable == 0;
    let first_mismatches = checker
        .first
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let report = Report {
        ok,
        poisoned_pages: poisoned.iter().filter(|p| **p).count(),
        poisoned_pages_readable: poisoned_readable,
        pid: std::process::id(),
        page_size,
        pages_total: layout.pages_total,
        pages_touched: touch_n,
        pages_verified: checker.count(CHECKED),
        mismatched_pages,
        first_mismatches,
        balloon_pages: checker.ballooned.iter().filter(|b| **b).count(),
        balloon_pages_zero: balloon_zero,
        balloon_pages_nonzero: balloon_nonzero,
        balloon_race: race.map(
            |r| serde_json::json!({ "reads": r.reads, "discards": r.discards, "wrong": r.wrong }),
        ),
        pattern: plan.name,
        threads: args.threads,
        passes: plan.passes,
        touches: order.len() * plan.passes,
        touch_ms: touch_secs * 1000.0,
        first_pass_ms: first_pass_secs * 1000.0,
        resident_mib,
        touch_mib_per_s: if first_pass_secs > 0.0 {
            (touch_n * page_size) as f64 / MIB / first_pass_secs
        } else {
            0.0
        },
        waited_latency: Latency::of(
            latencies_ns
                .iter()
                .copied()
                .filter(|&ns| ns > WAITED_NS)
                .collect(),
        ),
        faults_latency: Latency::of(latencies_ns),
        verify_ms,
        write_check,
        client_cpu_ms,
        handler_stats,
        handler_cpu_ms,
        regions: messages,
    };
    Ok(Outcome::Report(Box::new(report)))
}

/// The in-process engine of `--embedded`, serving this process's memory.
struct Embedded {
    engine: Engine,
    handle: SessionHandle,
}

impl Embedded {
    /// Starts the engine and gives it the userfaultfd (after its API
    /// handshake, with every region registered) and the region table.
    fn start(args: &Config, layout: &Layout, uffd: Uffd) -> Result<Embedded> {
        let page_size = PageSize::from_bytes(layout.page_size as u64).with_context(|| {
            format!(
                "the page size {} is not one the engine serves",
                layout.page_size
            )
        })?;
        let regions = layout
            .regions
            .iter()
            .map(|r| pager::Region {
                host_base: r.host as u64,
                len: r.size as u64,
                source_offset: r.offset,
                page_size,
            })
            .collect();
        let source = pager::MemFile::open(&args.mem_file)
            .with_context(|| format!("opening {} for the engine", args.mem_file.display()))?;
        let prefetch = args.prefetch.clone();
        let engine = Engine::start(
            EngineConfig {
                threads: args.serve_threads(),
                ..EngineConfig::default()
            },
            None,
        )
        .context("starting the embedded engine")?;
        let handle = engine
            .add(SessionSpec {
                name: format!("fc-client {}", std::process::id()),
                uffd,
                regions,
                source: Arc::new(source),
                pid: None,
                hangup: None,
                config: SessionConfig {
                    cluster_pages: args.cluster_pages(),
                    adaptive_cluster: !args.fixed_cluster,
                    background: args.background,
                    background_chunk: args.background_chunk(),
                    prefetch,
                    ..SessionConfig::default()
                },
                state: None,
                adopted: false,
                group: None,
            })
            .context("adding the session to the embedded engine")?;
        debug!(threads = args.serve_threads(), "embedded engine serving");
        Ok(Embedded { engine, handle })
    }

    /// The session's statistics and the serving threads' CPU time in
    /// milliseconds; then stops the engine. Nothing may touch guest memory
    /// afterwards.
    fn finish(self) -> Result<(StatsSnapshot, f64)> {
        let stats = self.handle.stats();
        let cpu_ms = threads_cpu_ms(SERVING_THREAD_PREFIX)
            .context("reading the CPU time of the serving threads")?;
        self.engine.shutdown();
        Ok((stats, cpu_ms))
    }
}

/// Whether the kernel can read 16 bytes at `host` (guest memory): a
/// poisoned page makes `write` from it fail with EFAULT, where a load would
/// kill the thread with SIGBUS.
fn kernel_can_read(host: usize) -> Result<bool> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe() writes two descriptors into the local array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    // SAFETY: the kernel reads from guest memory that stays mapped for the
    // process's life; no Rust reference is formed to it, and a poisoned
    // page makes the call fail instead of faulting here.
    let r = unsafe { libc::write(fds[1], host as *const libc::c_void, 16) };
    let err = std::io::Error::last_os_error();
    // SAFETY: closing the two descriptors pipe() gave us.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    match r {
        16 => Ok(true),
        -1 if err.raw_os_error() == Some(libc::EFAULT) => Ok(false),
        _ => bail!("probing a poisoned page: write returned {r}: {err}"),
    }
}
