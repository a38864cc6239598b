//! Every wrapper against the live kernel. These need a kernel with
//! userfaultfd and the right to create one (root, /dev/userfaultfd access or
//! vm.unprivileged_userfaultfd=1); without it they skip with a message,
//! unless PAGEWIRE_REQUIRE_KVM=1 (CI), where a skip is a failure.

use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use uffd::*;

const PAGE: usize = 4096;

fn open(features: Features) -> Option<Uffd> {
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

/// Anonymous private memory unmapped on drop.
struct Map {
    addr: u64,
    len: usize,
}

impl Map {
    fn new(pages: usize) -> Map {
        let len = pages * PAGE;
        // SAFETY: a fresh anonymous mapping aliases nothing.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE,
            )
        }
        .expect("mmap");
        Map {
            addr: p as u64,
            len,
        }
    }
    fn page(&self, i: usize) -> u64 {
        self.addr + (i * PAGE) as u64
    }
}

impl Drop for Map {
    fn drop(&mut self) {
        // SAFETY: this mapping is ours; no reference into it outlives the test.
        unsafe {
            let _ = rustix::mm::munmap(self.addr as *mut _, self.len);
        }
    }
}

/// Reads one byte at `addr` in a new thread (faulting if missing).
fn reader(addr: u64) -> JoinHandle<u8> {
    std::thread::spawn(move || {
        // SAFETY: `addr` is inside a live mapping owned by the test.
        unsafe { std::ptr::read_volatile(addr as *const u8) }
    })
}

/// Writes `v` at `addr` in a new thread.
fn writer(addr: u64, v: u8) -> JoinHandle<()> {
    std::thread::spawn(move || {
        // SAFETY: as in `reader`.
        unsafe { std::ptr::write_volatile(addr as *mut u8, v) }
    })
}

/// Waits (bounded) for the next messages.
fn next_events(u: &Uffd, want: usize) -> Vec<Event> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < want {
        assert!(Instant::now() < deadline, "timed out waiting for events");
        if u.read_events(&mut out, 64).expect("read") == 0 {
            std::thread::sleep(Duration::from_millis(1));
        }
    }
    out
}

fn wait_readable(u: &Uffd) {
    let mut fds = [rustix::event::PollFd::new(u, rustix::event::PollFlags::IN)];
    let timeout = rustix::event::Timespec {
        tv_sec: 10,
        tv_nsec: 0,
    };
    let n = rustix::event::poll(&mut fds, Some(&timeout)).expect("poll");
    assert_eq!(
        n, 1,
        "timed out waiting for the userfaultfd to become readable"
    );
}

fn fault_addr(e: &Event) -> u64 {
    match e {
        Event::PageFault { address, .. } => *address,
        other => panic!("expected a page fault, got {other:?}"),
    }
}

fn pattern(seed: u8) -> Vec<u8> {
    (0..PAGE)
        .map(|i| (i as u8).wrapping_mul(31) ^ seed)
        .collect()
}

fn is_present(addr: u64) -> bool {
    let pm = PageMap::open_self().expect("pagemap");
    let mut out = Vec::new();
    pm.scan(
        &ScanArgs {
            start: addr,
            end: addr + PAGE as u64,
            mask: Categories::PRESENT,
            returned: Categories::PRESENT,
            ..Default::default()
        },
        &mut out,
        4,
    )
    .expect("scan");
    !out.is_empty()
}

#[test]
fn api_reports_features_and_ioctls() {
    let Some(_) = open(Features::empty()) else {
        return;
    };
    let (features, ioctls) = Uffd::available_features().expect("probe");
    assert!(features.contains(Features::EVENT_REMOVE | Features::THREAD_ID));
    assert!(ioctls.contains(Ioctls::REGISTER | Ioctls::UNREGISTER | Ioctls::API));
}

#[test]
fn api_names_missing_features() {
    let Some(_) = open(Features::empty()) else {
        return;
    };
    let u = Uffd::open().expect("open");
    let bogus = Features::from_bits_retain(1 << 50);
    match u.api(Features::EVENT_REMOVE | bogus) {
        Err(ApiError::MissingFeatures { missing, .. }) => assert_eq!(missing, bogus),
        other => panic!("expected MissingFeatures, got {other:?}"),
    }
}

#[test]
fn api_twice_is_rejected() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    assert!(matches!(u.api(Features::empty()), Err(ApiError::Rejected)));
}

#[test]
fn open_error_names_the_permission() {
    let e = OpenError::Denied {
        device: RawErrno::ACCESS,
        syscall: RawErrno::PERM,
        hint: "",
    };
    let s = e.to_string();
    assert!(
        s.contains("/dev/userfaultfd") && s.contains("CAP_SYS_PTRACE"),
        "{s}"
    );
    assert!(s.contains("vm.unprivileged_userfaultfd"), "{s}");
}

#[test]
fn is_userfaultfd_tells_fds_apart() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    assert!(is_userfaultfd(u.as_fd()));
    let f = std::fs::File::open("/proc/self/stat").expect("file");
    assert!(!is_userfaultfd(f.as_fd()));
}

/// A userfaultfd as a peer may send it: blocking, and with or without its
/// API handshake.
fn blocking_uffd(api: bool) -> Option<Uffd> {
    let u = match Uffd::open_with(OpenOptions {
        non_blocking: false,
        ..OpenOptions::default()
    }) {
        Ok(u) => u,
        Err(e) => {
            if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("userfaultfd required but unavailable: {e}");
            }
            eprintln!("SKIPPED: cannot create a userfaultfd here: {e}");
            return None;
        }
    };
    if api {
        u.api(Features::EVENT_REMOVE).expect("api");
    }
    Some(u)
}

#[test]
fn read_events_never_blocks_even_on_a_blocking_fd() {
    let Some(u) = blocking_uffd(true) else {
        return;
    };
    // Nothing is queued: a blocking read(2) would wait for ever here.
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = tx.send(u.read_events(&mut out, MAX_BATCH).map(|n| (n, u)));
    });
    let (n, _u) = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("read_events returned")
        .expect("read");
    assert_eq!(n, 0);
}

#[test]
fn adopt_sets_nonblocking_and_refuses_what_cannot_serve() {
    let Some(u) = blocking_uffd(true) else {
        return;
    };
    let fd: std::os::fd::OwnedFd = u.into();
    let peer = fd.try_clone().expect("dup");
    let u = Uffd::adopt(fd).expect("a userfaultfd after UFFDIO_API");
    let fl = rustix::fs::fcntl_getfl(&peer).expect("getfl");
    assert!(
        fl.contains(rustix::fs::OFlags::NONBLOCK),
        "set on the shared file"
    );
    // The peer clears it again (it shares the open file): set it back once.
    rustix::fs::fcntl_setfl(&peer, fl - rustix::fs::OFlags::NONBLOCK).expect("setfl");
    assert_eq!(u.ensure_nonblocking(), Ok(true));
    assert_eq!(u.ensure_nonblocking(), Ok(false));

    let Some(no_api) = blocking_uffd(false) else {
        return;
    };
    assert_eq!(Uffd::adopt(no_api.into()).err(), Some(AdoptError::NoApi));
    let f = std::fs::File::open("/proc/self/stat").expect("file");
    assert_eq!(
        Uffd::adopt(f.into()).err(),
        Some(AdoptError::NotUserfaultfd)
    );
}

#[test]
fn register_copy_serves_fault_with_thread_id() {
    let Some(u) = open(Features::THREAD_ID) else {
        return;
    };
    let m = Map::new(8);
    let ioctls = u
        .register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    assert!(ioctls.contains(Ioctls::COPY | Ioctls::ZEROPAGE | Ioctls::WAKE));
    let t = reader(m.page(3) + 5);
    let ev = next_events(&u, 1);
    match &ev[0] {
        Event::PageFault {
            address,
            flags,
            thread_id,
        } => {
            assert_eq!(*address, m.page(3));
            assert!(!flags.contains(FaultFlags::WRITE));
            assert!(thread_id.is_some());
        }
        other => panic!("{other:?}"),
    }
    let data = pattern(7);
    assert_eq!(u.copy(m.page(3), &data, CopyMode::empty()), Ok(PAGE));
    assert_eq!(t.join().expect("join"), data[5]);
    u.unregister(m.addr, m.len).expect("unregister");
}

#[test]
fn write_fault_has_write_flag() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    let m = Map::new(2);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let t = writer(m.page(1), 9);
    let ev = next_events(&u, 1);
    match &ev[0] {
        Event::PageFault {
            flags, thread_id, ..
        } => {
            assert!(flags.contains(FaultFlags::WRITE));
            assert_eq!(*thread_id, None, "no THREAD_ID negotiated");
        }
        other => panic!("{other:?}"),
    }
    u.zeropage(m.page(1), PAGE, false).expect("zeropage");
    t.join().expect("join");
}

#[test]
fn copy_distinguishes_exists_partial_and_notfound() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    let m = Map::new(4);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let data = pattern(1);
    u.copy(m.page(2), &data, CopyMode::empty()).expect("copy");
    assert_eq!(
        u.copy(m.page(2), &data, CopyMode::empty()),
        Err(Error::Exists { op: "UFFDIO_COPY" })
    );
    let four: Vec<u8> = data.iter().cycle().take(4 * PAGE).copied().collect();
    assert_eq!(
        u.copy(m.page(0), &four, CopyMode::empty()),
        Err(Error::Partial {
            op: "UFFDIO_COPY",
            done: 2 * PAGE
        })
    );
    // Outside any registered range: an unregistered mapping.
    let other = Map::new(1);
    assert_eq!(
        u.copy(other.addr, &data, CopyMode::empty()),
        Err(Error::NotFound { op: "UFFDIO_COPY" })
    );
    // Misaligned destination.
    assert!(matches!(
        u.copy(m.page(3) + 1, &data, CopyMode::empty()),
        Err(Error::Os { errno, .. }) if errno == RawErrno::INVAL
    ));
}

#[test]
fn dontwake_then_wake() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    let m = Map::new(1);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let done = Arc::new(AtomicBool::new(false));
    let d = done.clone();
    let addr = m.addr;
    let t = std::thread::spawn(move || {
        // SAFETY: inside the live mapping.
        let v = unsafe { std::ptr::read_volatile(addr as *const u8) };
        d.store(true, Ordering::SeqCst);
        v
    });
    next_events(&u, 1);
    let data = pattern(3);
    u.copy(m.addr, &data, CopyMode::DONTWAKE).expect("copy");
    std::thread::sleep(Duration::from_millis(100));
    assert!(!done.load(Ordering::SeqCst), "DONTWAKE woke the thread");
    u.wake(m.addr, PAGE).expect("wake");
    assert_eq!(t.join().expect("join"), data[0]);
}

#[test]
fn remove_event_blocks_copies_until_read() {
    let Some(u) = open(Features::EVENT_REMOVE) else {
        return;
    };
    let m = Map::new(4);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let data = pattern(5);
    u.copy(m.page(0), &data, CopyMode::empty()).expect("copy");
    assert!(is_present(m.page(0)));
    let (addr, len) = (m.page(0), PAGE);
    let t = std::thread::spawn(move || {
        // SAFETY: DONTNEED on our own anonymous mapping; no reference into it.
        unsafe { rustix::mm::madvise(addr as *mut _, len, rustix::mm::Advice::LinuxDontNeed) }
    });
    // Until the REMOVE is read, every resolving ioctl fails with EAGAIN.
    wait_readable(&u);
    assert_eq!(
        u.copy(m.page(3), &data, CopyMode::empty()),
        Err(Error::EventsPending { op: "UFFDIO_COPY" })
    );
    assert_eq!(
        u.zeropage(m.page(3), PAGE, false),
        Err(Error::EventsPending {
            op: "UFFDIO_ZEROPAGE"
        })
    );
    let ev = next_events(&u, 1);
    match ev[0] {
        Event::Remove { start, end } => {
            assert_eq!((start, end), (m.page(0), m.page(1)));
        }
        ref other => panic!("{other:?}"),
    }
    t.join().expect("join").expect("madvise");
    assert!(!is_present(m.page(0)), "the range is zapped after the read");
    assert_eq!(u.copy(m.page(3), &data, CopyMode::empty()), Ok(PAGE));
}

#[test]
fn zeropage_maps_zeros() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    let m = Map::new(2);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let t = reader(m.page(1) + 100);
    let ev = next_events(&u, 1);
    assert_eq!(fault_addr(&ev[0]), m.page(1));
    assert_eq!(u.zeropage(m.page(1), PAGE, false), Ok(PAGE));
    assert_eq!(t.join().expect("join"), 0);
    assert_eq!(
        u.zeropage(m.page(1), PAGE, false),
        Err(Error::Exists {
            op: "UFFDIO_ZEROPAGE"
        })
    );
}

#[test]
fn write_protect_faults_and_unprotect_wakes() {
    let Some(u) = open(Features::PAGEFAULT_FLAG_WP) else {
        return;
    };
    let m = Map::new(2);
    u.register(m.addr, m.len, RegisterMode::MISSING | RegisterMode::WP)
        .expect("register");
    let data = pattern(2);
    u.copy(m.page(0), &data, CopyMode::WP).expect("copy wp");
    let t = writer(m.page(0) + 1, 0xEE);
    let ev = next_events(&u, 1);
    match &ev[0] {
        Event::PageFault { address, flags, .. } => {
            assert_eq!(*address, m.page(0));
            assert!(
                flags.contains(FaultFlags::WRITE | FaultFlags::WP),
                "{flags:?}"
            );
        }
        other => panic!("{other:?}"),
    }
    u.write_protect(m.page(0), PAGE, false, false)
        .expect("unprotect");
    t.join().expect("join");
    // Protect again: reads still work, writes fault again.
    u.write_protect(m.page(0), PAGE, true, false)
        .expect("protect");
    assert_eq!(reader(m.page(0) + 1).join().expect("join"), 0xEE);
}

#[test]
fn minor_fault_resolved_with_continue() {
    let Some(u) = open(Features::MINOR_SHMEM) else {
        return;
    };
    let fd =
        rustix::fs::memfd_create("uffd-minor", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
    rustix::fs::ftruncate(&fd, PAGE as u64).expect("truncate");
    let rw = rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE;
    // SAFETY: two fresh shared mappings of our memfd.
    let (a, b) = unsafe {
        (
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE,
                rw,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
            .expect("mmap a"),
            rustix::mm::mmap(
                std::ptr::null_mut(),
                PAGE,
                rw,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
            .expect("mmap b"),
        )
    };
    // SAFETY: `a` is a live one-page mapping that only this test uses.
    unsafe { std::ptr::write_bytes(a.cast::<u8>(), 0x5A, PAGE) };
    u.register(b as u64, PAGE, RegisterMode::MINOR)
        .expect("register minor");
    let t = reader(b as u64 + 10);
    let ev = next_events(&u, 1);
    match &ev[0] {
        Event::PageFault { flags, .. } => assert!(flags.contains(FaultFlags::MINOR)),
        other => panic!("{other:?}"),
    }
    assert_eq!(u.continue_range(b as u64, PAGE, false, false), Ok(PAGE));
    assert_eq!(t.join().expect("join"), 0x5A);
    assert_eq!(
        u.continue_range(b as u64, PAGE, false, false),
        Err(Error::Exists {
            op: "UFFDIO_CONTINUE"
        })
    );
    // SAFETY: unmapping our own mappings; no references remain.
    unsafe {
        rustix::mm::munmap(a, PAGE).expect("munmap");
        rustix::mm::munmap(b, PAGE).expect("munmap");
    }
}

#[test]
fn move_pages_without_copying() {
    let Some(u) = open(Features::MOVE) else {
        return;
    };
    let dst = Map::new(1);
    let src = Map::new(1);
    // SAFETY: `src` is a live mapping only this test touches.
    unsafe { std::ptr::write_bytes(src.addr as *mut u8, 0x77, PAGE) };
    u.register(dst.addr, PAGE, RegisterMode::MISSING)
        .expect("register");
    let t = reader(dst.addr + 3);
    next_events(&u, 1);
    // SAFETY: no reference into `src` is alive.
    let moved = unsafe { u.move_pages(dst.addr, src.addr, PAGE, MoveMode::empty()) };
    assert_eq!(moved, Ok(PAGE));
    assert_eq!(t.join().expect("join"), 0x77);
    assert!(!is_present(src.addr), "the source page was moved away");
    // Empty source: ENOENT unless holes are allowed.
    let dst2 = Map::new(1);
    u.register(dst2.addr, PAGE, RegisterMode::MISSING)
        .expect("register");
    // SAFETY: as above.
    let r = unsafe { u.move_pages(dst2.addr, src.addr, PAGE, MoveMode::empty()) };
    assert_eq!(r, Err(Error::NotFound { op: "UFFDIO_MOVE" }));
}

#[test]
fn poison_makes_syscalls_fail_and_copy_replaces_it() {
    let Some(u) = open(Features::POISON) else {
        return;
    };
    let m = Map::new(1);
    u.register(m.addr, PAGE, RegisterMode::MISSING)
        .expect("register");
    assert_eq!(u.poison(m.addr, PAGE, false), Ok(PAGE));
    let (r, w) = rustix::pipe::pipe().expect("pipe");
    // A system call reading the poisoned page gets EFAULT (no signal).
    // SAFETY: the kernel reads the poisoned address and reports EFAULT.
    let slice = unsafe { std::slice::from_raw_parts(m.addr as *const u8, 16) };
    assert_eq!(rustix::io::write(&w, slice), Err(RawErrno::FAULT));
    drop(r);
    let data = pattern(9);
    assert_eq!(u.copy(m.addr, &data, CopyMode::empty()), Ok(PAGE));
    assert_eq!(reader(m.addr + 4).join().expect("join"), data[4]);
}

#[test]
fn batch_read_of_faults_from_many_threads() {
    let Some(u) = open(Features::THREAD_ID) else {
        return;
    };
    let m = Map::new(8);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let threads: Vec<_> = (0..4).map(|i| reader(m.page(i * 2))).collect();
    let ev = next_events(&u, 4);
    let mut addrs: Vec<u64> = ev.iter().map(fault_addr).collect();
    let mut tids: Vec<u32> = ev
        .iter()
        .map(|e| match e {
            Event::PageFault { thread_id, .. } => thread_id.expect("tid"),
            _ => 0,
        })
        .collect();
    addrs.sort();
    tids.sort();
    tids.dedup();
    assert_eq!(addrs, (0..4).map(|i| m.page(i * 2)).collect::<Vec<_>>());
    assert_eq!(tids.len(), 4, "each fault carries its own thread id");
    for (i, a) in addrs.iter().enumerate() {
        u.copy(*a, &pattern(i as u8), CopyMode::empty())
            .expect("copy");
    }
    for t in threads {
        t.join().expect("join");
    }
}

#[test]
fn unmap_event() {
    let Some(u) = open(Features::EVENT_UNMAP) else {
        return;
    };
    let m = Map::new(4);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let addr = m.page(2);
    let t = std::thread::spawn(move || {
        // SAFETY: unmapping the last two pages of our mapping; `Map::drop`
        // tolerates the hole.
        unsafe { rustix::mm::munmap(addr as *mut _, 2 * PAGE) }
    });
    let ev = next_events(&u, 1);
    match ev[0] {
        Event::Unmap { start, end } => assert_eq!((start, end), (m.page(2), m.page(4))),
        ref other => panic!("{other:?}"),
    }
    t.join().expect("join").expect("munmap");
    let data = pattern(0);
    assert_eq!(
        u.copy(m.page(2), &data, CopyMode::empty()),
        Err(Error::NotFound { op: "UFFDIO_COPY" })
    );
    // Unregister before `Map::drop` unmaps the rest: an munmap of a range
    // registered with EVENT_UNMAP waits for a reader, and this thread is it.
    u.unregister(m.addr, 2 * PAGE).expect("unregister");
}

#[test]
fn remap_event() {
    let Some(u) = open(Features::EVENT_REMAP) else {
        return;
    };
    let m = Map::new(2);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    let target = Map::new(2);
    let (from, to) = (m.addr, target.addr);
    let t = std::thread::spawn(move || {
        // SAFETY: moving our own mapping onto another of ours; nothing
        // references either.
        unsafe {
            rustix::mm::mremap_fixed(
                from as *mut _,
                2 * PAGE,
                2 * PAGE,
                rustix::mm::MremapFlags::MAYMOVE,
                to as *mut _,
            )
        }
        .map(|p| p as u64)
    });
    let ev = next_events(&u, 1);
    match ev[0] {
        Event::Remap { from, to, len } => {
            assert_eq!((from, to, len), (m.addr, target.addr, 2 * PAGE as u64))
        }
        ref other => panic!("{other:?}"),
    }
    assert_eq!(t.join().expect("join").expect("mremap"), target.addr);
    // The registration moved with the mapping.
    let r = reader(target.addr);
    let ev = next_events(&u, 1);
    assert_eq!(fault_addr(&ev[0]), target.addr);
    u.zeropage(target.addr, PAGE, false).expect("zeropage");
    assert_eq!(r.join().expect("join"), 0);
    std::mem::forget(m); // its range now belongs to `target`
}

#[test]
fn fork_event_gives_child_uffd_then_esrch() {
    let Some(u) = open(Features::EVENT_FORK) else {
        return;
    };
    let m = Map::new(1);
    u.register(m.addr, PAGE, RegisterMode::MISSING)
        .expect("register");
    let addr = m.addr;
    let forker = std::thread::spawn(move || {
        // SAFETY: the child only reads memory and calls _exit, both safe
        // after fork in a multi-threaded process.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: reading our (the child's) own mapping, then exiting.
            unsafe {
                let v = std::ptr::read_volatile(addr as *const u8);
                libc::_exit(v as i32);
            }
        }
        pid
    });
    let ev = next_events(&u, 1);
    let child = match ev.into_iter().next() {
        Some(Event::Fork { uffd }) => uffd,
        other => panic!("{other:?}"),
    };
    assert!(is_userfaultfd(child.as_fd()));
    let pid = forker.join().expect("join");
    assert!(pid > 0);
    let ev = next_events(&child, 1);
    assert_eq!(fault_addr(&ev[0]), addr);
    let data = vec![42u8; PAGE];
    child
        .copy(addr, &data, CopyMode::empty())
        .expect("copy to child");
    let mut status = 0;
    // SAFETY: waiting for our own child.
    assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
    assert_eq!(libc::WEXITSTATUS(status), 42);
    assert_eq!(
        child.copy(addr, &data, CopyMode::empty()),
        Err(Error::ProcessGone { op: "UFFDIO_COPY" })
    );
}

#[test]
fn pagemap_scan_finds_present_pages() {
    let Some(u) = open(Features::empty()) else {
        return;
    };
    let m = Map::new(8);
    u.register(m.addr, m.len, RegisterMode::MISSING)
        .expect("register");
    for i in [1usize, 2, 6] {
        u.copy(m.page(i), &pattern(i as u8), CopyMode::empty())
            .expect("copy");
    }
    // By pid: the same page tables as /proc/self.
    let pm = PageMap::open_pid(std::process::id()).expect("pagemap");
    let mut out = Vec::new();
    let r = pm
        .scan(
            &ScanArgs {
                start: m.addr,
                end: m.page(8),
                mask: Categories::PRESENT,
                returned: Categories::PRESENT,
                ..Default::default()
            },
            &mut out,
            16,
        )
        .expect("scan");
    assert_eq!(r.walk_end, m.page(8));
    let runs: Vec<(u64, u64)> = out.iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(runs, vec![(m.page(1), m.page(3)), (m.page(6), m.page(7))]);
}

#[test]
fn pagemap_scan_wp_async_dirty_tracking() {
    let Some(u) = open(Features::WP_ASYNC | Features::WP_UNPOPULATED) else {
        return;
    };
    let m = Map::new(8);
    u.register(m.addr, m.len, RegisterMode::WP)
        .expect("register wp");
    u.write_protect(m.addr, m.len, true, false)
        .expect("protect");
    let pm = PageMap::open_self().expect("pagemap");
    let args = ScanArgs {
        start: m.addr,
        end: m.page(8),
        flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
        mask: Categories::WRITTEN,
        returned: Categories::WRITTEN,
        ..Default::default()
    };
    // Clear: nothing written yet.
    let mut out = Vec::new();
    pm.scan(&args, &mut out, 16).expect("scan");
    assert!(out.is_empty(), "{out:?}");
    for i in [0usize, 5] {
        writer(m.page(i), 1).join().expect("join");
    }
    pm.scan(&args, &mut out, 16).expect("scan");
    let runs: Vec<(u64, u64)> = out.iter().map(|r| (r.start, r.end)).collect();
    assert_eq!(runs, vec![(m.page(0), m.page(1)), (m.page(5), m.page(6))]);
    // The scan re-protected what it found: a second scan is clean.
    out.clear();
    pm.scan(&args, &mut out, 16).expect("scan");
    assert!(out.is_empty(), "{out:?}");
}

/// Run as `nobody` by `unprivileged_open_names_what_to_grant`: prints the
/// result of opening a userfaultfd.
#[test]
fn child_open_as_nobody() {
    if std::env::var("UFFD_TEST_CHILD").as_deref() != Ok("open") {
        return;
    }
    match Uffd::open() {
        Ok(_) => println!("RESULT: opened"),
        Err(e) => println!("RESULT: {e}"),
    }
    match Uffd::open_with(OpenOptions {
        user_mode_only: true,
        ..OpenOptions::default()
    }) {
        Ok(_) => println!("USERMODE: opened"),
        Err(e) => println!("USERMODE: {e}"),
    }
}

#[test]
fn unprivileged_open_names_what_to_grant() {
    use std::os::unix::process::CommandExt;
    let root = rustix::process::geteuid().is_root();
    let sysctl =
        std::fs::read_to_string("/proc/sys/vm/unprivileged_userfaultfd").unwrap_or_default();
    if !root || sysctl.trim() != "0" {
        eprintln!(
            "SKIPPED: needs root (to drop to nobody) and vm.unprivileged_userfaultfd=0 (it is {:?})",
            sysctl.trim()
        );
        return;
    }
    let out = std::process::Command::new(std::env::current_exe().expect("exe"))
        .args([
            "--exact",
            "child_open_as_nobody",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("UFFD_TEST_CHILD", "open")
        .uid(65534)
        .gid(65534)
        .output()
        .expect("run as nobody");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let result = stdout
        .lines()
        .find_map(|l| l.split_once("RESULT: ").map(|(_, r)| r))
        .unwrap_or_else(|| panic!("child printed no result: {stdout}"));
    // /dev/userfaultfd is root-only here and the sysctl forbids the syscall
    // for kernel faults: the error names both ways and what to grant.
    assert!(result.contains("/dev/userfaultfd"), "{result}");
    assert!(result.contains("CAP_SYS_PTRACE"), "{result}");
    assert!(result.contains("vm.unprivileged_userfaultfd=1"), "{result}");
    assert!(result.contains("user-mode-only"), "{result}");
    // A user-mode-only userfaultfd is allowed without privileges.
    assert!(stdout.contains("USERMODE: opened"), "{stdout}");
}
