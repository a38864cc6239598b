//! Peers that get the handshake right and the rest wrong, for the tests of
//! `pagewire serve` (issue 11): `fc-client --misbehave KIND` plays a VMM
//! whose userfaultfd or memory is not what a page server may assume, and
//! `--balloon-race MS` discards pages while threads fault on them.

use std::fs::File;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustix::mm::Advice;
use testbed::{Context as _, Result};
use wire::firecracker::Mapping;

use super::{splitmix64 as next, Layout, Phase, Watch};

/// What a misbehaving client does wrong.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Misbehave {
    /// Creates its userfaultfd without O_NONBLOCK.
    BlockingUffd,
    /// Never calls UFFDIO_API (so registers nothing), sends the fd anyway,
    /// and waits for the server to close the connection.
    NoApi,
    /// After the handshake, a thread clears O_NONBLOCK on the open file it
    /// shares with the server, every millisecond, for the client's life.
    ClearNonblock,
    /// Declares its last region this many bytes shorter than it registered:
    /// faults in the rest are outside every declared region.
    DeclareLess(u64),
    /// Splits its regions into many VMAs after registering them
    /// (MADV_NOHUGEPAGE on every other run of 13 pages).
    SplitVmas,
}

/// Parses a `--misbehave` kind.
pub fn parse_misbehave(s: &str) -> Result<Misbehave, String> {
    match s {
        "blocking-uffd" => Ok(Misbehave::BlockingUffd),
        "no-api" => Ok(Misbehave::NoApi),
        "clear-nonblock" => Ok(Misbehave::ClearNonblock),
        "split-vmas" => Ok(Misbehave::SplitVmas),
        _ => match s.strip_prefix("declare-less:") {
            Some(n) => Ok(Misbehave::DeclareLess(testbed::parse_size(n)?)),
            None => Err(format!(
                "{s:?}: expected blocking-uffd, no-api, clear-nonblock, split-vmas or \
                 declare-less:BYTES"
            )),
        },
    }
}

/// Declares less than is registered (`DeclareLess`).
pub(crate) fn declare(
    m: Option<Misbehave>,
    messages: &mut [Mapping],
    page_size: usize,
) -> Result<()> {
    let Some(Misbehave::DeclareLess(n)) = m else {
        return Ok(());
    };
    let last = messages.last_mut().context("no regions")?;
    testbed::ensure!(
        n % page_size as u64 == 0 && n < last.size,
        "declare-less:{n}: a multiple of the page size, less than the last region ({} bytes)",
        last.size
    );
    last.size -= n;
    Ok(())
}

/// Run length of `SplitVmas`: odd, so that VMA boundaries fall inside the
/// server's 32-page clusters.
const SPLIT_RUN_PAGES: usize = 13;

/// Splits registered regions into VMAs (`SplitVmas`).
pub(crate) fn after_register(m: Option<Misbehave>, layout: &Layout) -> Result<()> {
    if m != Some(Misbehave::SplitVmas) {
        return Ok(());
    }
    let run = SPLIT_RUN_PAGES * layout.page_size;
    for r in &layout.regions {
        for start in (run..r.size).step_by(2 * run) {
            let len = run.min(r.size - start);
            // SAFETY: a range inside one of this process's guest mappings; the
            // advice changes only the VMA's huge-page flag, not its contents.
            unsafe {
                rustix::mm::madvise((r.host + start) as *mut _, len, Advice::LinuxNoHugepage)
            }
            .context("madvise(MADV_NOHUGEPAGE) to split a region into VMAs")?;
        }
    }
    Ok(())
}

/// Clears O_NONBLOCK on `fd` every millisecond, for ever (`ClearNonblock`).
pub(crate) fn start_clearing_nonblock(fd: OwnedFd) -> Result<()> {
    std::thread::Builder::new()
        .name("fc-client-clear-nonblock".into())
        .spawn(move || loop {
            if let Ok(fl) = rustix::fs::fcntl_getfl(&fd) {
                let _ = rustix::fs::fcntl_setfl(&fd, fl - rustix::fs::OFlags::NONBLOCK);
            }
            std::thread::sleep(Duration::from_millis(1));
        })
        .context("starting the O_NONBLOCK clearing thread")?;
    Ok(())
}

/// Waits up to `timeout` for the server to close `stream`: whether it did.
pub(crate) fn closed_by_server(stream: &UnixStream, timeout: Duration) -> bool {
    let _ = stream.set_read_timeout(Some(timeout));
    let mut b = [0u8; 1];
    matches!((&*stream).read(&mut b), Ok(0))
}

/// What `--balloon-race` did.
pub(crate) struct Race {
    /// Pages discarded at least once: they must read zero from now on.
    pub ballooned: Vec<bool>,
    pub reads: u64,
    pub discards: u64,
    /// The first byte that was neither the file's nor zero.
    pub wrong: Option<String>,
}

/// Pages of the window that readers and the balloon share, so that faults
/// meet discards of the same pages.
const HOT: usize = 16;

/// For `ms` milliseconds, `threads` threads read random pages (mostly of a
/// small window that moves every 200 ms) while one more discards random
/// runs of 1-4 pages there with MADV_DONTNEED. Every byte read must be the
/// file's or zero; a read or a discard that does not finish is the
/// watchdog's (slots `0..threads` read, slot `threads` discards).
pub(crate) fn balloon_race(
    layout: &Layout,
    file: &File,
    watch: &Watch,
    threads: usize,
    ms: u64,
    seed: u64,
) -> Result<Race> {
    testbed::ensure!(
        layout.page_size == rustix::param::page_size(),
        "--balloon-race needs 4 KiB pages (not --huge)"
    );
    let pages = layout.pages_total;
    let ballooned: Vec<AtomicBool> = (0..pages).map(|_| AtomicBool::new(false)).collect();
    let stop = AtomicBool::new(false);
    let (reads, discards) = (AtomicU64::new(0), AtomicU64::new(0));
    let start = Instant::now();
    let hot_base = || (start.elapsed().as_millis() as usize / 200 * HOT) % pages;
    let pick = |rng: &mut u64| {
        let r = next(rng);
        if r % 10 < 7 {
            (hot_base() + (r >> 8) as usize % HOT) % pages
        } else {
            (r >> 8) as usize % pages
        }
    };
    let wrong = std::thread::scope(|s| -> Result<Option<String>> {
        let readers: Vec<_> = (0..threads)
            .map(|slot| {
                let (stop, reads, pick) = (&stop, &reads, &pick);
                s.spawn(move || -> Result<Option<String>> {
                    let mut rng = seed ^ (slot as u64 + 1).wrapping_mul(0x9e37_79b9);
                    let ps = layout.page_size;
                    let (mut want, mut got) = (vec![0u8; ps], vec![0u8; ps]);
                    while !stop.load(Ordering::Relaxed) {
                        let page = pick(&mut rng);
                        let loc = layout.locate(page);
                        file.read_exact_at(&mut want, loc.file_offset)
                            .context("reading the memory file")?;
                        watch.begin(slot, Phase::Touch, page);
                        layout.read_page(loc.host, &mut got);
                        watch.end(slot);
                        reads.fetch_add(1, Ordering::Relaxed);
                        if let Some(i) = (0..ps).find(|&i| got[i] != want[i] && got[i] != 0) {
                            stop.store(true, Ordering::Relaxed);
                            return Ok(Some(format!(
                                "page {page} byte {i} is {:#x}: neither the file's {:#x} nor zero",
                                got[i], want[i]
                            )));
                        }
                    }
                    Ok(None)
                })
            })
            .collect();
        let balloon = {
            let (stop, discards, ballooned, pick) = (&stop, &discards, &ballooned, &pick);
            s.spawn(move || -> Result<()> {
                let mut rng = seed ^ 0x00ba_1100;
                let ps = layout.page_size;
                while !stop.load(Ordering::Relaxed) {
                    let len = 1 + (next(&mut rng) % 4) as usize;
                    let first = pick(&mut rng).min(pages - len);
                    // Discard twice in a row half the time: the second
                    // REMOVE then meets faults on the pages the first left
                    // missing.
                    let times = 1 + (next(&mut rng) % 2) as usize;
                    for _ in 0..times {
                        for b in &ballooned[first..first + len] {
                            b.store(true, Ordering::Relaxed);
                        }
                        for (host, bytes) in layout.host_pieces(super::BalloonRange {
                            offset: (first * ps) as u64,
                            len: (len * ps) as u64,
                        }) {
                            watch.begin(threads, Phase::Balloon, 0);
                            // SAFETY: a page-aligned range inside this
                            // process's guest mappings; no Rust reference
                            // points into guest memory, and dropping its
                            // pages is the point.
                            let r = unsafe {
                                rustix::mm::madvise(host as *mut _, bytes, Advice::LinuxDontNeed)
                            };
                            watch.end(threads);
                            r.context("madvise(MADV_DONTNEED) in the balloon race")?;
                        }
                        discards.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Ok(())
            })
        };
        std::thread::sleep(Duration::from_millis(ms));
        stop.store(true, Ordering::Relaxed);
        let mut wrong = None;
        for r in readers {
            let found = r
                .join()
                .map_err(|_| testbed::Error::Failed("a racing reader panicked".into()))??;
            wrong = wrong.or(found);
        }
        balloon
            .join()
            .map_err(|_| testbed::Error::Failed("the balloon thread panicked".into()))??;
        Ok(wrong)
    })?;
    Ok(Race {
        ballooned: ballooned.into_iter().map(AtomicBool::into_inner).collect(),
        reads: reads.into_inner(),
        discards: discards.into_inner(),
        wrong,
    })
}
