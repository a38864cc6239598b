//! Helpers shared by the engine's tests: memory to serve, sessions over it,
//! and waiting for the engine's counters.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::*;
use uffd::{Features, RegisterMode, Uffd};

pub const PAGE: usize = 4096;

pub fn uffd(features: Features) -> Option<Uffd> {
    match Uffd::open() {
        Ok(u) => {
            u.api(features).expect("api");
            Some(u)
        }
        Err(e) => {
            if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("userfaultfd required but unavailable: {e}");
            }
            eprintln!("SKIPPED: cannot create a userfaultfd here: {e}");
            None
        }
    }
}

/// Source content: page `i` is filled from a seed, every 5th page is zero.
pub fn content(pages: usize, page: usize) -> Vec<u8> {
    let mut v = vec![0u8; pages * page];
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    for (i, chunk) in v.chunks_mut(page).enumerate() {
        if i % 5 == 3 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
        chunk[0] = i as u8 | 1; // never all zero
    }
    v
}

pub struct Mem {
    pub addr: u64,
    pub len: usize,
}

impl Mem {
    pub fn anon(len: usize, huge: bool) -> Option<Mem> {
        let mut flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
        if huge {
            flags |= libc::MAP_HUGETLB | (21 << libc::MAP_HUGE_SHIFT);
        }
        // SAFETY: a fresh anonymous mapping that aliases nothing.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                flags,
                -1,
                0,
            )
        };
        (p != libc::MAP_FAILED).then(|| Mem {
            addr: p as u64,
            len,
        })
    }

    /// Copies the mapping out from a helper thread (faulting as needed).
    pub fn read_all(&self) -> Vec<u8> {
        let (addr, len) = (self.addr, self.len);
        std::thread::spawn(move || {
            // SAFETY: the mapping lives until the test drops `Mem`, after
            // this thread is joined.
            unsafe { std::slice::from_raw_parts(addr as *const u8, len) }.to_vec()
        })
        .join()
        .expect("reader")
    }

    /// Touches the given pages from `threads` threads at once.
    pub fn touch(&self, pages: Vec<usize>, threads: usize, page: usize) {
        let pages = Arc::new(pages);
        let hs: Vec<_> = (0..threads)
            .map(|t| {
                let (pages, addr) = (pages.clone(), self.addr);
                std::thread::spawn(move || {
                    for p in pages.iter().skip(t).step_by(threads) {
                        // SAFETY: inside the live mapping.
                        unsafe { std::ptr::read_volatile((addr + (p * page) as u64) as *const u8) };
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().expect("toucher");
        }
    }

    pub fn dontneed(&self, offset: usize, len: usize) {
        let addr = self.addr + offset as u64;
        std::thread::spawn(move || {
            // SAFETY: DONTNEED on our own private mapping; no references.
            let r = unsafe { libc::madvise(addr as *mut _, len, libc::MADV_DONTNEED) };
            assert_eq!(r, 0, "madvise");
        })
        .join()
        .expect("madvise thread");
    }
}

impl Drop for Mem {
    fn drop(&mut self) {
        // SAFETY: our mapping; every thread that used it has been joined.
        unsafe { libc::munmap(self.addr as *mut _, self.len) };
    }
}

/// A session spec serving the whole of `mem` from `source`.
pub fn spec(
    name: &str,
    u: Uffd,
    mem: &Mem,
    page_size: PageSize,
    source: Arc<dyn PageSource>,
    config: SessionConfig,
) -> SessionSpec {
    SessionSpec {
        name: name.into(),
        uffd: u,
        regions: vec![Region {
            host_base: mem.addr,
            len: mem.len as u64,
            source_offset: 0,
            page_size,
        }],
        source,
        pid: None,
        hangup: None,
        config,
        state: None,
        adopted: false,
        group: None,
    }
}

pub struct Setup {
    pub engine: Engine,
    pub handle: SessionHandle,
    pub mem: Mem,
    pub data: Arc<Vec<u8>>,
}

pub fn setup(pages: usize, config: SessionConfig, features: Features) -> Option<Setup> {
    setup_mode(pages, config, features, RegisterMode::MISSING)
}

/// `setup`, with the memory registered in `mode`.
pub fn setup_mode(
    pages: usize,
    config: SessionConfig,
    features: Features,
    mode: RegisterMode,
) -> Option<Setup> {
    let u = uffd(features)?;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, mode).expect("register");
    let data = Arc::new(content(pages, PAGE));
    let engine = engine(2);
    let handle = engine
        .add(spec(
            "test",
            u,
            &mem,
            PageSize::Base4K,
            Arc::new(Bytes(data.to_vec())),
            config,
        ))
        .expect("add");
    Some(Setup {
        engine,
        handle,
        mem,
        data,
    })
}

pub fn wait_for(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Waits until the session's counters satisfy `f`: a serving thread updates
/// them just after the ioctl that woke the faulting thread returns.
pub fn settle(h: &SessionHandle, f: impl Fn(&StatsSnapshot) -> bool) -> StatsSnapshot {
    let mut st = h.stats();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f(&st) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
        st = h.stats();
    }
    st
}

pub fn assert_same(got: &[u8], want: &[u8], what: &str) {
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (page {})", i / PAGE);
    }
    assert_eq!(got.len(), want.len());
}

/// An engine with `threads` serving threads and no end hook.
pub fn engine(threads: usize) -> Engine {
    Engine::start(
        EngineConfig {
            threads,
            ..EngineConfig::default()
        },
        None,
    )
    .expect("engine")
}

/// `huge_pages` 2 MiB huge pages registered for missing faults, with their
/// contents (4 KiB pages from `content`, passed through `edit`), and an
/// engine to serve them: `None` (with a message) where userfaultfd or huge
/// pages are missing.
pub struct HugeSetup {
    pub engine: Engine,
    pub mem: Mem,
    pub data: Arc<Vec<u8>>,
    uffd: Option<Uffd>,
}

impl HugeSetup {
    pub fn new(huge_pages: usize, edit: impl FnOnce(Vec<u8>) -> Vec<u8>) -> Option<HugeSetup> {
        let u = uffd(Features::MISSING_HUGETLBFS)?;
        // Reserve huge pages ourselves (needs root).
        let nr = "/proc/sys/vm/nr_hugepages";
        let have: usize = std::fs::read_to_string(nr)
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        if have < 2 * huge_pages {
            let _ = std::fs::write(nr, (2 * huge_pages).to_string());
        }
        let huge = 2 << 20;
        let Some(mem) = Mem::anon(huge_pages * huge, true) else {
            let msg =
                "cannot map 2 MiB huge pages (reserving them in /proc/sys/vm/nr_hugepages failed)";
            if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("{msg}");
            }
            eprintln!("SKIPPED: {msg}");
            return None;
        };
        u.register(mem.addr, mem.len, RegisterMode::MISSING)
            .expect("register hugetlb");
        let data = Arc::new(edit(content(huge_pages * 512, PAGE)));
        Some(HugeSetup {
            engine: engine(2),
            mem,
            data,
            uffd: Some(u),
        })
    }

    /// Serves the huge pages with `config` (once).
    pub fn add(&mut self, config: SessionConfig) -> SessionHandle {
        let u = self.uffd.take().expect("one session per setup");
        self.engine
            .add(spec(
                "huge",
                u,
                &self.mem,
                PageSize::Huge2M,
                Arc::new(Bytes(self.data.to_vec())),
                config,
            ))
            .expect("add")
    }
}
