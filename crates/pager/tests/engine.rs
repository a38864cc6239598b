//! The engine against the live kernel, in one process: the memory is mapped
//! and registered here, the engine's threads serve it, and test threads
//! touch it. Needs userfaultfd (root here); skips with a message otherwise,
//! unless PAGEWIRE_REQUIRE_KVM=1, where a skip is a failure.

use std::sync::Arc;
use std::time::{Duration, Instant};

use pager::*;
use uffd::{Features, RegisterMode, Uffd};

mod common;
use common::*;

#[test]
fn every_byte_matches_with_concurrent_faults() {
    every_byte_matches(0);
}

/// Single zero pages between data are copied along with the data (from a
/// buffer holding zeros there), and still read back as zero.
#[test]
fn every_byte_matches_with_zero_pages_copied_along() {
    every_byte_matches(8);
}

fn every_byte_matches(zero_merge_pages: usize) {
    let pages = 512;
    let config = SessionConfig {
        zero_merge_pages,
        ..SessionConfig::default()
    };
    let Some(s) = setup(pages, config, Features::THREAD_ID) else {
        return;
    };
    // Four threads fault in a scattered order.
    let order: Vec<usize> = (0..pages).map(|i| (i * 97) % pages).collect();
    s.mem.touch(order, 4, PAGE);
    assert_same(&s.mem.read_all(), &s.data, "served memory");
    let st = settle(&s.handle, |st| {
        st.pages_copied + st.pages_zeroed == pages as u64
    });
    let zero_pages = (0..pages).filter(|i| i % 5 == 3).count() as u64;
    assert_eq!(st.pages_copied + st.pages_zeroed, pages as u64, "{st:?}");
    if zero_merge_pages == 0 {
        assert_eq!(
            st.pages_zeroed, zero_pages,
            "all-zero pages use ZEROPAGE: {st:?}"
        );
    } else {
        assert!(
            st.pages_zeroed < zero_pages / 2,
            "most single zero pages are copied along: {st:?}"
        );
    }
    assert_eq!(st.bytes_copied, st.pages_copied * PAGE as u64);
    assert!(st.pages_fault_around > 0, "clusters were served: {st:?}");
    assert_eq!(st.first_touch_latency.count, st.pages_on_demand);
    assert_eq!(st.errors, 0);
    s.engine.shutdown();
}

#[test]
fn cluster_of_one_serves_single_pages() {
    let cfg = SessionConfig {
        cluster_pages: 1,
        ..Default::default()
    };
    let Some(s) = setup(8, cfg, Features::empty()) else {
        return;
    };
    s.mem.touch(vec![2], 1, PAGE);
    let st = settle(&s.handle, |st| st.pages_copied + st.pages_zeroed == 1);
    assert_eq!(st.pages_copied + st.pages_zeroed, 1, "{st:?}");
    assert_eq!(
        s.handle.page_state(s.mem.addr + 2 * PAGE as u64),
        Some(PageState::Present)
    );
    assert_eq!(s.handle.page_state(s.mem.addr), Some(PageState::Missing));
}

#[test]
fn background_population_fills_everything_once() {
    let cfg = SessionConfig {
        background: true,
        ..Default::default()
    };
    let pages = 1024;
    let Some(s) = setup(pages, cfg, Features::empty()) else {
        return;
    };
    wait_for("background population", || {
        let st = s.handle.stats();
        st.pages_copied + st.pages_zeroed == pages as u64
    });
    let before = s.handle.stats();
    assert!(before.pages_background > 0);
    assert_same(&s.mem.read_all(), &s.data, "populated memory");
    let after = s.handle.stats();
    assert_eq!(
        after.pages_copied + after.pages_zeroed,
        pages as u64,
        "nothing copied twice"
    );
    assert_eq!(after.faults, before.faults, "no faults after population");
}

#[test]
fn balloon_remove_reads_zero_and_keeps_the_rest() {
    let pages = 64;
    let Some(s) = setup(pages, SessionConfig::default(), Features::EVENT_REMOVE) else {
        return;
    };
    s.mem.touch((0..32).collect(), 2, PAGE);
    s.mem.dontneed(8 * PAGE, 16 * PAGE); // pages 8..24, served
    s.mem.dontneed(40 * PAGE, 8 * PAGE); // pages 40..48, never served
    let got = s.mem.read_all();
    let mut want = s.data.to_vec();
    want[8 * PAGE..24 * PAGE].fill(0);
    want[40 * PAGE..48 * PAGE].fill(0);
    assert_same(&got, &want, "after balloon");
    let st = settle(&s.handle, |st| st.events_remove == 2);
    assert_eq!(st.events_remove, 2, "{st:?}");
    assert_eq!(st.pages_discarded, 24);
}

#[test]
fn remove_raced_against_background_population() {
    // Small chunks so that population and REMOVE interleave; several rounds.
    for round in 0..8 {
        let cfg = SessionConfig {
            background: true,
            background_chunk: 4,
            cluster_pages: 4,
            ..Default::default()
        };
        let pages = 2048;
        let Some(s) = setup(pages, cfg, Features::EVENT_REMOVE) else {
            return;
        };
        let mut removed = vec![false; pages];
        let mut x = 12345u64 + round;
        for _ in 0..40 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let start = (x >> 33) as usize % pages;
            let n = 1 + (x >> 20) as usize % 64;
            let end = (start + n).min(pages);
            s.mem.dontneed(start * PAGE, (end - start) * PAGE);
            removed[start..end].iter_mut().for_each(|r| *r = true);
        }
        let settled = || {
            // Every page is either populated or discarded-and-unpopulated.
            (0..pages).all(|p| {
                matches!(
                    s.handle.page_state(s.mem.addr + (p * PAGE) as u64),
                    Some(PageState::Present | PageState::Discarded)
                )
            }) && s.handle.stats().events_remove == 40
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        while !settled() {
            if Instant::now() > deadline {
                let mut counts = std::collections::BTreeMap::new();
                for p in 0..pages {
                    let st = s.handle.page_state(s.mem.addr + (p * PAGE) as u64);
                    *counts.entry(format!("{st:?}")).or_insert(0) += 1;
                }
                panic!(
                    "round {round}: population never settled: {counts:?} {:?}",
                    s.handle.stats()
                );
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        let got = s.mem.read_all();
        let mut want = s.data.to_vec();
        for (p, r) in removed.iter().enumerate() {
            if *r {
                want[p * PAGE..(p + 1) * PAGE].fill(0);
            }
        }
        assert_same(
            &got,
            &want,
            &format!("round {round}: stale page survived a REMOVE"),
        );
    }
}

/// A source whose reads fail for one page.
struct Flaky {
    data: Vec<u8>,
    bad_page: usize,
}

impl PageSource for Flaky {
    fn len(&self) -> u64 {
        self.data.len() as u64
    }
    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        let first = offset as usize / PAGE;
        let last = (offset as usize + buf.len()).div_ceil(PAGE);
        if (first..last).contains(&self.bad_page) {
            return Err(SourceError::Io {
                path: "flaky".into(),
                error: std::io::Error::other("injected read error"),
            });
        }
        Bytes(self.data.clone()).read_at(offset, buf)
    }
    fn describe(&self) -> String {
        "flaky".into()
    }
}

#[test]
fn unreadable_page_is_poisoned_not_served() {
    let Some(u) = uffd(Features::POISON) else {
        return;
    };
    let mem = Mem::anon(8 * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(8, PAGE);
    let engine = engine(1);
    let h = engine
        .add(spec(
            "flaky",
            u,
            &mem,
            PageSize::Base4K,
            Arc::new(Flaky {
                data: data.clone(),
                bad_page: 5,
            }),
            SessionConfig {
                cluster_pages: 1,
                ..Default::default()
            },
        ))
        .expect("add");
    // A system call that reads the bad page gets EFAULT instead of garbage
    // (a plain load would get SIGBUS).
    let mut fds = [0i32; 2];
    // SAFETY: creating a pipe into a local array.
    assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
    let bad = mem.addr + 5 * PAGE as u64;
    // SAFETY: the kernel reads the (poisoned) page and reports EFAULT.
    let r = unsafe { libc::write(fds[1], bad as *const _, 16) };
    assert_eq!(r, -1);
    assert_eq!(
        std::io::Error::last_os_error().raw_os_error(),
        Some(libc::EFAULT)
    );
    // SAFETY: closing our pipe.
    unsafe {
        libc::close(fds[0]);
        libc::close(fds[1]);
    }
    assert_eq!(h.page_state(bad), Some(PageState::Failed));
    let st = h.stats();
    assert_eq!(st.pages_poisoned, 1, "{st:?}");
    // Other pages are still served correctly.
    let (addr, want) = (mem.addr + 2 * PAGE as u64, data[2 * PAGE]);
    let got = std::thread::spawn(move || {
        // SAFETY: inside the live mapping.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    })
    .join()
    .expect("reader");
    assert_eq!(got, want);
}

#[test]
fn session_ends_when_the_watched_process_exits() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let mem = Mem::anon(4 * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let mut child = std::process::Command::new("sleep")
        .arg("0.2")
        .spawn()
        .expect("sleep");
    let ended = Arc::new(std::sync::Mutex::new(Vec::new()));
    let e2 = ended.clone();
    let engine = Engine::start(
        EngineConfig {
            threads: 1,
            ..EngineConfig::default()
        },
        Some(Box::new(move |r: &SessionReport| {
            e2.lock().expect("lock").push(r.reason)
        })),
    )
    .expect("engine");
    let h = engine
        .add({
            let source = Arc::new(Bytes(vec![1; 4 * PAGE]));
            let mut watched = spec(
                "watched",
                u,
                &mem,
                PageSize::Base4K,
                source,
                SessionConfig::default(),
            );
            watched.pid = Some(child.id());
            watched
        })
        .expect("add");
    let report = h.wait(Duration::from_secs(10)).expect("session ended");
    assert_eq!(report.reason, EndReason::ProcessExited);
    assert_eq!(*ended.lock().expect("lock"), vec![EndReason::ProcessExited]);
    assert_eq!(engine.session_count(), 0);
    child.wait().expect("wait");
}

#[test]
fn pid_that_does_not_exist_is_refused() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let engine = engine(1);
    let err = engine
        .add(SessionSpec {
            name: "ghost".into(),
            uffd: u,
            regions: vec![],
            source: Arc::new(Bytes(vec![])),
            pid: Some(0x3fff_fff0),
            hangup: None,
            config: SessionConfig::default(),
            state: None,
            adopted: false,
            group: None,
        })
        .err()
        .expect("refused");
    assert!(matches!(err, EngineError::Pidfd { .. }), "{err}");
}

#[test]
fn forked_child_is_served_when_enabled() {
    let pages = 16;
    let cfg = SessionConfig {
        serve_forks: true,
        cluster_pages: 1,
        ..Default::default()
    };
    let Some(s) = setup(pages, cfg, Features::EVENT_FORK) else {
        return;
    };
    // The parent has pages 0..4; the child reads everything and exits with
    // a checksum of what it saw.
    s.mem.touch((0..4).collect(), 1, PAGE);
    let want: u32 = s.data.iter().map(|&b| b as u32).sum::<u32>() & 0xff;
    let (addr, len) = (s.mem.addr, s.mem.len);
    let pid = std::thread::spawn(move || {
        // SAFETY: the child only reads memory and calls _exit.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let mut sum = 0u32;
            for i in 0..len {
                // SAFETY: inside the child's copy of the mapping.
                sum += unsafe { std::ptr::read_volatile((addr + i as u64) as *const u8) } as u32;
            }
            // SAFETY: exiting the child without running the parent's atexit.
            unsafe { libc::_exit((sum & 0xff) as i32) };
        }
        pid
    })
    .join()
    .expect("forker");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(
        libc::WEXITSTATUS(status) as u32,
        want,
        "the child saw the source bytes"
    );
    assert_eq!(settle(&s.handle, |st| st.events_fork == 1).events_fork, 1);
}

#[test]
fn hugetlb_2m_regions() {
    let huge = 2 << 20;
    let Some(mut hp) = HugeSetup::new(4, |mut data| {
        data[2 * huge..3 * huge].fill(0); // one all-zero huge page
        data
    }) else {
        return;
    };
    let h = hp.add(SessionConfig::default());
    hp.mem.touch(vec![0, 3, 1, 2], 2, huge);
    assert_same(&hp.mem.read_all(), &hp.data, "2 MiB pages");
    let st = settle(&h, |st| st.pages_copied + st.pages_zeroed == 4);
    assert_eq!(st.pages_copied, 3, "{st:?}");
    assert_eq!(st.pages_zeroed, 1, "{st:?}");
    assert_eq!(st.bytes_copied, 3 * huge as u64);
}

#[test]
fn remap_moves_regions_and_unmap_drops_them() {
    let pages = 32;
    let features = Features::EVENT_REMAP | Features::EVENT_UNMAP | Features::EVENT_REMOVE;
    let Some(s) = setup(pages, SessionConfig::default(), features) else {
        return;
    };
    s.mem.touch((0..4).collect(), 1, PAGE);
    // Move the whole mapping elsewhere (the mremap caller waits for the
    // REMAP to be read).
    let target = Mem::anon(pages * PAGE, false).expect("target");
    let (from, to, len) = (s.mem.addr, target.addr, s.mem.len);
    let moved = std::thread::spawn(move || {
        // SAFETY: moving our own mapping onto another of ours.
        let p = unsafe {
            libc::mremap(
                from as *mut _,
                len,
                len,
                libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED,
                to as *mut libc::c_void,
            )
        };
        p as u64
    })
    .join()
    .expect("mremap");
    assert_eq!(moved, to);
    std::mem::forget(target); // its range is now the moved mapping
    assert_eq!(s.handle.page_state(from), None, "the old range is gone");
    assert_eq!(s.handle.page_state(to), Some(PageState::Present));
    let moved_mem = Mem { addr: to, len };
    assert_same(&moved_mem.read_all(), &s.data, "served at the new address");
    // Unmap the second half: its pages are forgotten.
    let half = to + (len / 2) as u64;
    std::thread::spawn(move || {
        // SAFETY: unmapping part of our own mapping; nothing references it.
        assert_eq!(unsafe { libc::munmap(half as *mut _, len / 2) }, 0);
    })
    .join()
    .expect("munmap");
    assert_eq!(s.handle.page_state(half), None);
    assert_eq!(s.handle.page_state(to), Some(PageState::Present));
    let st = settle(&s.handle, |st| {
        st.pages_copied + st.pages_zeroed == pages as u64
    });
    // MREMAP_FIXED may report an UNMAP of its own besides the munmap's.
    assert_eq!((st.events_remap, st.errors), (1, 0), "{st:?}");
    assert!(st.events_unmap >= 1, "{st:?}");
    assert_eq!(st.pages_copied + st.pages_zeroed, pages as u64, "{st:?}");
    std::mem::forget(s.mem); // moved away; the remaining half goes with the process
                             // SAFETY: unmapping what is left of the moved mapping. The session must
                             // go first: it was registered with EVENT_UNMAP and this thread is not
                             // its reader, but the engine is, so this returns once it reads it.
    unsafe { libc::munmap(to as *mut _, len / 2) };
    std::mem::forget(moved_mem);
}

#[test]
fn sequential_faults_read_ahead_and_random_ones_do_not() {
    let pages = 1024;
    let touch_seq = |cfg: SessionConfig| -> Option<StatsSnapshot> {
        let s = setup(pages, cfg, Features::empty())?;
        s.mem.touch((0..pages).collect(), 1, PAGE);
        assert_same(&s.mem.read_all(), &s.data, "sequential");
        Some(settle(&s.handle, |st| {
            st.pages_copied + st.pages_zeroed == pages as u64
        }))
    };
    // Clusters of 16 without readahead: one fault served per cluster (the
    // stream may fault again on a page of its cluster still being mapped:
    // the faulting page is mapped before the rest is read).
    let Some(flat) = touch_seq(SessionConfig {
        cluster_pages: 16,
        adaptive_cluster: false,
        max_readahead_pages: 0,
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(
        flat.faults - flat.faults_already_served,
        (pages / 16) as u64,
        "{flat:?}"
    );
    assert_eq!(flat.pages_on_demand, (pages / 16) as u64, "{flat:?}");
    // With readahead every byte still matches.
    let Some(ahead) = touch_seq(SessionConfig {
        cluster_pages: 16,
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(ahead.pages_copied + ahead.pages_zeroed, pages as u64);
    // The serving threads map the window after a sequential fault without
    // the stream touching it: touch pages 0..=32 (the fault at 16 is
    // sequential and leaves 32..48 to readahead), and page 47 turns up.
    let cfg = SessionConfig {
        cluster_pages: 16,
        ..Default::default()
    };
    let Some(s) = setup(pages, cfg, Features::empty()) else {
        return;
    };
    s.mem.touch((0..=32).collect(), 1, PAGE);
    let st = settle(&s.handle, |st| st.pages_copied + st.pages_zeroed >= 48);
    assert!(st.pages_copied + st.pages_zeroed >= 48, "{st:?}");
    let untouched = s.mem.addr + 47 * PAGE as u64;
    assert_eq!(s.handle.page_state(untouched), Some(PageState::Present));
    assert_same(&s.mem.read_all(), &s.data, "read ahead");
    // A single page per fault stays a single page per fault.
    let Some(single) = touch_seq(SessionConfig {
        cluster_pages: 1,
        ..Default::default()
    }) else {
        return;
    };
    assert_eq!(single.faults, pages as u64, "{single:?}");
}

/// The serving threads run at the configured nice value, and a thread
/// populating in the background goes back to the one it started with. (A
/// positive value: lowering priority needs no privilege.)
#[test]
fn serving_threads_take_the_configured_nice_value() {
    let Some(u) = uffd(Features::empty()) else {
        return;
    };
    let engine = Engine::start(
        EngineConfig {
            threads: 1,
            nice: Some(7),
            ..EngineConfig::default()
        },
        None,
    )
    .expect("engine");
    // Nice is field 19 of /proc/self/task/TID/stat; after the command
    // name's closing parenthesis, fields start at 3.
    let at = |nice: i32| -> usize {
        let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
            return 0;
        };
        tasks
            .filter_map(|t| t.ok())
            .filter(|t| {
                std::fs::read_to_string(t.path().join("comm"))
                    .is_ok_and(|c| c.starts_with("pagewire-serve-"))
            })
            .filter_map(|t| std::fs::read_to_string(t.path().join("stat")).ok())
            .filter(|stat| {
                let after = stat.rsplit_once(')').map_or("", |(_, a)| a);
                after.split_whitespace().nth(16) == Some(nice.to_string().as_str())
            })
            .count()
    };
    let wait_for = |what: &dyn Fn() -> bool| {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !what() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    };
    // The thread sets it as it starts. (Other tests' engines run at the
    // default -10 or at the base nice, which is not 7 here.)
    wait_for(&|| at(7) == 1);
    assert_eq!(at(7), 1, "the serving thread runs at nice 7");
    // Populating in the background, it runs at the base nice.
    let pages = 256;
    let mem = Mem::anon(pages * PAGE, false).expect("mmap");
    u.register(mem.addr, mem.len, RegisterMode::MISSING)
        .expect("register");
    let data = content(pages, PAGE);
    let handle = engine
        .add(spec(
            "nice",
            u,
            &mem,
            PageSize::Base4K,
            Arc::new(Bytes(data.clone())),
            SessionConfig {
                background: true,
                ..SessionConfig::default()
            },
        ))
        .expect("add");
    let st = settle(&handle, |st| st.pages_background == pages as u64);
    assert_eq!(st.pages_background, pages as u64, "{st:?}");
    assert_eq!(at(7), 0, "no longer at nice 7 after populating");
    assert_same(&mem.read_all(), &data, "populated in the background");
    engine.shutdown();
}

/// Memory registered in write-protect mode as well, which the Firecracker
/// protocol does not use: a write to a protected page reaches the engine as
/// a write-protect fault. The engine lifts the protection, as the kernel
/// would without a handler; before, it took the fault for one on a present
/// page and woke the thread unserved, and the write faulted for ever.
#[test]
fn write_protect_fault_is_resolved_not_livelocked() {
    let mode = RegisterMode::MISSING | RegisterMode::WP;
    let Some(Setup {
        engine,
        handle,
        mem,
        data,
    }) = setup_mode(16, SessionConfig::default(), Features::empty(), mode)
    else {
        return;
    };
    // A second handle on the same userfaultfd, as the VMM keeps one.
    let fd = std::os::fd::AsFd::as_fd(&handle).try_clone_to_owned();
    let vmm = Uffd::from_fd(fd.expect("dup"));
    assert_same(&mem.read_all(), &data, "served");
    vmm.write_protect(mem.addr, mem.len, true, false)
        .expect("protect");
    let target = mem.addr + 3 * PAGE as u64 + 7;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // SAFETY: inside the live mapping, which outlives this thread's
        // use of it (the test waits for the answer before unmapping).
        unsafe { std::ptr::write_volatile(target as *mut u8, 0xA5) };
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(10))
        .expect("the write to a write-protected page went through");
    let got = mem.read_all();
    assert_eq!(got[3 * PAGE + 7], 0xA5);
    let st = settle(&handle, |s| s.faults_other_mode >= 1);
    assert!(st.faults_other_mode >= 1, "{st:?}");
    drop(engine);
}
