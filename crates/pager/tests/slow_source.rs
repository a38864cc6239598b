//! Sources that are slow (a remote store) or cannot vouch for some bytes (a
//! chunk that failed its checksum): a fetch in flight holds no serving
//! thread, and untrusted bytes poison only their own pages.
//!
//! Needs userfaultfd; skips with a message without it, unless
//! PAGEWIRE_REQUIRE_KVM=1, where a skip is a failure.

mod common;

use std::collections::HashSet;
use std::ops::Range;
use std::sync::mpsc;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use common::*;
use pager::*;
use uffd::{Features, RegisterMode};

/// Pages per chunk of the gated source.
const CHUNK: usize = 16;

/// A source whose chunks are "fetched": a read touching a chunk not yet
/// released answers Pending and keeps the waker until the test releases it.
struct Gated {
    data: Vec<u8>,
    state: Mutex<GateState>,
    released: Condvar,
}

#[derive(Default)]
struct GateState {
    ready: HashSet<usize>,
    waiters: Vec<(usize, Waker)>,
    hints: Vec<Range<u64>>,
}

impl Gated {
    fn new(data: Vec<u8>, ready: impl IntoIterator<Item = usize>) -> Gated {
        Gated {
            data,
            state: Mutex::new(GateState {
                ready: ready.into_iter().collect(),
                ..Default::default()
            }),
            released: Condvar::new(),
        }
    }

    fn chunks(offset: u64, len: usize) -> Range<usize> {
        let first = offset as usize / (CHUNK * PAGE);
        let last = (offset as usize + len).div_ceil(CHUNK * PAGE);
        first..last
    }

    /// The chunk's bytes are there: wake whoever waits for them.
    fn release(&self, chunk: usize) {
        let wakers: Vec<Waker> = {
            let mut s = self.state.lock().expect("gate");
            s.ready.insert(chunk);
            let (now, later): (Vec<_>, Vec<_>) =
                s.waiters.drain(..).partition(|(c, _)| *c == chunk);
            s.waiters = later;
            now.into_iter().map(|(_, w)| w).collect()
        };
        self.released.notify_all();
        for w in wakers {
            w();
        }
    }
}

impl PageSource for Gated {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let mut s = self.state.lock().expect("gate");
        while Self::chunks(offset, buf.len()).any(|c| !s.ready.contains(&c)) {
            s = self.released.wait(s).expect("gate");
        }
        drop(s);
        Bytes(self.data.clone()).read_at(offset, buf)
    }

    fn read_at_or_wake(
        &self,
        offset: u64,
        buf: &mut [u8],
        waker: &Waker,
    ) -> Result<(), SourceError> {
        let mut s = self.state.lock().expect("gate");
        let missing: Vec<usize> = Self::chunks(offset, buf.len())
            .filter(|c| !s.ready.contains(c))
            .collect();
        if !missing.is_empty() {
            for c in missing {
                s.waiters.push((c, waker.clone()));
            }
            return Err(SourceError::Pending);
        }
        drop(s);
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        Ok(())
    }

    fn hint(&self, ranges: &[Range<u64>]) {
        self.state
            .lock()
            .expect("gate")
            .hints
            .extend_from_slice(ranges);
    }

    fn describe(&self) -> String {
        "gated".into()
    }
}

/// Reads `pages` of `mem` on a thread of its own; the result comes on the
/// channel (so that a test can wait with a deadline instead of hanging).
fn read_pages(mem: &Mem, pages: Range<usize>) -> mpsc::Receiver<Vec<u8>> {
    let (tx, rx) = mpsc::channel();
    let addr = mem.addr + (pages.start * PAGE) as u64;
    let len = pages.len() * PAGE;
    std::thread::spawn(move || {
        // SAFETY: inside the live mapping, which the test keeps until the
        // reader has answered (or the test fails and the process ends).
        let got = unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec();
        let _ = tx.send(got);
    });
    rx
}

#[test]
fn a_fetch_in_flight_holds_no_serving_thread() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 4 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), [0, 1, 3]));
    // One serving thread: if a fault waiting on the fetch held it, nothing
    // else would be served.
    let engine = engine(1);
    let h = engine
        .add(spec(
            "gated",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            SessionConfig::default(),
        ))
        .expect("add");
    let slow = read_pages(&mem, 2 * CHUNK + 3..2 * CHUNK + 4);
    settle(&h, |s| s.source_waits >= 1);
    // Chunks at hand are served meanwhile, whole and right.
    for c in [0, 1, 3] {
        let got = read_pages(&mem, c * CHUNK..(c + 1) * CHUNK)
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("chunk {c} not served while another was being fetched"));
        assert_same(
            &got,
            &data[c * CHUNK * PAGE..(c + 1) * CHUNK * PAGE],
            &format!("chunk {c}"),
        );
    }
    assert!(
        slow.try_recv().is_err(),
        "a page of a chunk still being fetched was served"
    );
    source.release(2);
    let got = slow
        .recv_timeout(Duration::from_secs(30))
        .expect("the fault waiting on the fetch was not served once it ended");
    assert_same(
        &got,
        &data[(2 * CHUNK + 3) * PAGE..][..PAGE],
        "fetched page",
    );
    assert_same(&mem.read_all(), &data, "whole memory");
    let st = h.stats();
    assert_eq!(st.pages_poisoned, 0, "{st:?}");
}

#[test]
fn many_threads_wait_on_one_fetch_and_all_get_their_bytes() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 4 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), []));
    let engine = engine(2);
    let h = engine
        .add(spec(
            "gated",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            SessionConfig::default(),
        ))
        .expect("add");
    let readers: Vec<_> = (0..pages)
        .step_by(5)
        .map(|p| (p, read_pages(&mem, p..p + 1)))
        .collect();
    settle(&h, |s| s.source_waits >= 1);
    for c in 0..4 {
        std::thread::sleep(Duration::from_millis(5));
        source.release(c);
    }
    for (p, rx) in readers {
        let got = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| panic!("page {p} never served"));
        assert_same(&got, &data[p * PAGE..(p + 1) * PAGE], &format!("page {p}"));
    }
    assert_same(&mem.read_all(), &data, "whole memory");
}

/// A source that cannot vouch for pages `bad` (a corrupt chunk).
struct Corrupt {
    data: Vec<u8>,
    bad: Range<usize>,
}

impl PageSource for Corrupt {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let start = offset as usize;
        buf.copy_from_slice(&self.data[start..start + buf.len()]);
        let bad = (self.bad.start * PAGE) as u64..(self.bad.end * PAGE) as u64;
        let end = offset + buf.len() as u64;
        if bad.start < end && offset < bad.end {
            // Whatever is there must not be served.
            let lo = (bad.start.max(offset) - offset) as usize;
            let hi = (bad.end.min(end) - offset) as usize;
            buf[lo..hi].fill(0xEE);
            return Err(SourceError::Untrusted {
                bad: std::iter::once(bad.start.max(offset)..bad.end.min(end)).collect(),
                why: "injected checksum failure".into(),
            });
        }
        Ok(())
    }
    fn describe(&self) -> String {
        "corrupt".into()
    }
}

/// Whether the kernel can read the page at `addr` (a poisoned page makes a
/// system call that reads it fail with EFAULT).
fn readable(addr: u64) -> bool {
    let mut fds = [0i32; 2];
    // SAFETY: creating a pipe into a local array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    // SAFETY: the kernel reads 16 bytes of the page, or reports EFAULT.
    let r = unsafe { libc::write(fds[1], addr as *const _, 16) };
    let errno = std::io::Error::last_os_error().raw_os_error();
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    if r == -1 {
        assert_eq!(errno, Some(libc::EFAULT));
    }
    r == 16
}

#[test]
fn untrusted_bytes_poison_exactly_their_pages() {
    let Some(u) = uffd(Features::POISON) else {
        return;
    };
    let pages = 64;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let bad = 20..24;
    let engine = engine(2);
    let h = engine
        .add(spec(
            "corrupt",
            u,
            &mem,
            PageSize::Base4K,
            Arc::new(Corrupt {
                data: data.clone(),
                bad: bad.clone(),
            }),
            SessionConfig::default(),
        ))
        .expect("add");
    // Every page through the kernel first (a fault around a bad page
    // claims good ones with it), then the good ones by loads.
    for p in 0..pages {
        let ok = readable(mem.addr + (p * PAGE) as u64);
        assert_eq!(ok, !bad.contains(&p), "page {p}");
    }
    for p in (0..pages).filter(|p| !bad.contains(p)) {
        let got = read_pages(&mem, p..p + 1)
            .recv_timeout(Duration::from_secs(30))
            .expect("reader");
        assert_same(&got, &data[p * PAGE..(p + 1) * PAGE], &format!("page {p}"));
    }
    let st = h.stats();
    // A zero page among them too: only the source could have said so.
    assert_eq!(st.pages_untrusted, bad.len() as u64, "{st:?}");
    assert_eq!(st.pages_poisoned, bad.len() as u64, "{st:?}");
}

#[test]
fn a_working_set_is_hinted_to_the_source_in_order() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 4 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), [0, 1, 2, 3]));
    let set = vec![40 * PAGE as u64, 3 * PAGE as u64, 17 * PAGE as u64];
    let engine = engine(1);
    let h = engine
        .add(spec(
            "hinted",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            SessionConfig {
                prefetch: Some(PrefetchSet::new(set.clone())),
                ..Default::default()
            },
        ))
        .expect("add");
    let hints = source.state.lock().expect("gate").hints.clone();
    let want: Vec<Range<u64>> = set.iter().map(|&o| o..o + PAGE as u64).collect();
    assert_eq!(hints, want);
    assert_same(&mem.read_all(), &data, "whole memory");
    drop(h);
}

#[test]
fn queued_work_over_a_slow_source_waits_and_finishes() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 8 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), []));
    let set: Vec<u64> = (0..pages / 2).map(|p| (p * 2 * PAGE) as u64).collect();
    let engine = engine(2);
    let h = engine
        .add(spec(
            "queued",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            SessionConfig {
                prefetch: Some(PrefetchSet::new(set)),
                background: true,
                ..Default::default()
            },
        ))
        .expect("add");
    settle(&h, |s| s.source_waits >= 1);
    for c in 0..8 {
        source.release(c);
    }
    // Prefetch and background population go on once the fetches end, and
    // map everything without a fault.
    settle(&h, |s| {
        s.pages_prefetched + s.pages_background >= pages as u64
    });
    assert_eq!(h.stats().faults, 0);
    assert_same(&mem.read_all(), &data, "whole memory");
}

/// A sequential fault whose own chunk is at hand, but whose cluster reaches
/// into a chunk being fetched, is served without waiting for that fetch.
#[test]
fn a_sequential_fault_on_a_page_at_hand_does_not_wait_for_its_neighbours() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 8 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), [0, 1, 2]));
    let engine = engine(2);
    let config = SessionConfig {
        adaptive_cluster: false,
        ..SessionConfig::default()
    };
    let h = engine
        .add(spec(
            "seq",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            config,
        ))
        .expect("add");
    // Page 0: its block 0..32 (chunks 0 and 1) is mapped; the stream goes
    // on at page 32, whose sequential cluster 32..64 reaches chunk 3.
    read_pages(&mem, 0..1)
        .recv_timeout(Duration::from_secs(30))
        .expect("page 0");
    settle(&h, |s| s.pages_on_demand + s.pages_fault_around >= 32);
    let got = read_pages(&mem, 32..33)
        .recv_timeout(Duration::from_secs(30))
        .expect("page 32 (its chunk at hand) waited for chunk 3's fetch");
    assert_same(&got, &data[32 * PAGE..33 * PAGE], "page 32");
    for c in 3..8 {
        source.release(c);
    }
    assert_same(&mem.read_all(), &data, "whole memory");
}

/// Readahead whose window met a fetch maps it once the fetch ends.
#[test]
fn readahead_goes_on_once_its_fetch_ends() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let pages = 16 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), [0, 1, 2, 3]));
    let engine = engine(2);
    let config = SessionConfig {
        adaptive_cluster: false,
        ..SessionConfig::default()
    };
    let h = engine
        .add(spec(
            "ra",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            config,
        ))
        .expect("add");
    read_pages(&mem, 0..1)
        .recv_timeout(Duration::from_secs(30))
        .expect("page 0");
    settle(&h, |s| s.pages_on_demand + s.pages_fault_around >= 32);
    read_pages(&mem, 32..33)
        .recv_timeout(Duration::from_secs(30))
        .expect("page 32");
    settle(&h, |s| s.source_waits >= 1);
    for c in 4..16 {
        source.release(c);
    }
    settle(&h, |s| s.pages_readahead > 0);
    assert_same(&mem.read_all(), &data, "whole memory");
}

/// A balloon REMOVE of a page whose fault waits on a fetch: the fault ends,
/// and the page reads as zero, never the fetched bytes.
#[test]
fn a_page_released_while_its_fault_waits_reads_zero() {
    let Some(u) = uffd(Features::EVENT_REMOVE) else {
        return;
    };
    let pages = 4 * CHUNK;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let source = Arc::new(Gated::new(data.clone(), [0, 1, 3]));
    let engine = engine(1);
    let h = engine
        .add(spec(
            "rm",
            u,
            &mem,
            PageSize::Base4K,
            source.clone(),
            SessionConfig::default(),
        ))
        .expect("add");
    let p = 2 * CHUNK + 4;
    let slow = read_pages(&mem, p..p + 1);
    settle(&h, |s| s.source_waits >= 1);
    mem.dontneed(p * PAGE, PAGE);
    source.release(2);
    slow.recv_timeout(Duration::from_secs(30))
        .expect("a parked fault was never served after a REMOVE");
    // Whatever the racing read saw, the page is zero from now on.
    let got = read_pages(&mem, p..p + 1)
        .recv_timeout(Duration::from_secs(30))
        .expect("reader");
    assert!(
        got.iter().all(|&b| b == 0),
        "a released page read source bytes"
    );
}
