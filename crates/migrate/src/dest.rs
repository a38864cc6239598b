//! The receiving side.
//!
//! [`accept`] takes a source's two connections (checking its hello and the
//! VM's layout); [`Incoming::receive_precopy`] writes pre-copy pages
//! straight into guest memory (before the guest or any pager touches it)
//! until the switchover. For post-copy, [`NetSource`] is the pager's page
//! source: pages the stream brings wait in a staging area until the pager
//! maps them; a fault on a page that has not arrived sends a request on the
//! urgent connection and parks (the pager's `Pending`), and the page's
//! arrival wakes it. When the link breaks, waiting faults stay waiting
//! (never zeros, never stale data) while the source has `resume_timeout` to
//! come back; the pages it then sends are only those still needed, and a
//! page that arrives twice is dropped, so none reaches the guest twice.
//!
//! # Invariant
//! A page of the post-copy set reaches guest memory only through the pager,
//! from the staging area, after its `arrived` bit is set; a Discard first
//! discards the guest's page (the pager then serves zeros there) and only
//! then marks it arrived.

use std::net::{TcpListener, TcpStream};
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use pager::{PageSource, SourceError, Waker};

use crate::bits::{AtomicBitmap, Bitmap};
use crate::frame::{
    self, decode_pages, encode_bitmap, read_frame, write_frame, write_json, Complete, FrameError,
    Hello, Kind, Layout, Ranges, Resumed, Role, RoundEnd, Welcome, PAGE,
};
use crate::staging::Staging;

/// Guest memory, as the receiver writes it.
pub trait Ram: Send + Sync {
    /// Copies `data` into guest memory at byte `offset`.
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String>;
    /// Gives `[offset, offset + len)` back: it reads as zeros afterwards.
    fn discard(&self, offset: u64, len: u64) -> Result<(), String>;
}

/// Why receiving failed.
#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error("{phase}: {source}")]
    Link {
        phase: &'static str,
        source: FrameError,
    },
    #[error("accepting a connection: {0}")]
    Accept(std::io::Error),
    #[error("no migration source connected within {0:?}")]
    Timeout(Duration),
    #[error("the source's VM does not fit here: {0}")]
    Layout(String),
    #[error("guest memory: {0}")]
    Ram(String),
    #[error("the source {0}")]
    Gone(String),
}

fn link(phase: &'static str) -> impl Fn(FrameError) -> ReceiveError {
    move |source| ReceiveError::Link { phase, source }
}

/// A source's connections, after the handshake.
#[derive(Debug)]
pub struct Incoming {
    pub layout: Layout,
    pub session: u64,
    main: TcpStream,
    urgent: TcpStream,
    listener: TcpListener,
    /// Pages written into guest memory in pre-copy.
    written: Bitmap,
    pub stats: PrecopyStats,
}

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PrecopyStats {
    pub rounds: u32,
    pub pages: u64,
    pub zero_pages: u64,
    pub discarded_pages: u64,
}

/// What the switchover brought.
#[derive(Debug)]
pub struct Switch {
    /// The VMM's vCPU and device state.
    pub state: Vec<u8>,
    /// Pages still to come (post-copy), or None for a plain stop-and-copy.
    pub postcopy: Option<Bitmap>,
    /// When the Switchover frame was read.
    pub at: Instant,
}

/// Discards page runs, the work split between this thread and one more.
fn discard_runs(ram: &dyn Ram, runs: &[(u64, u64)]) -> Result<(), String> {
    let total: u64 = runs.iter().map(|(s, e)| e - s).sum();
    // Split at half the pages (a run may be cut in two).
    let mut first = Vec::new();
    let mut second = Vec::new();
    let mut acc = 0;
    for &(s, e) in runs {
        let half = total / 2;
        if acc >= half {
            second.push((s, e));
        } else if acc + (e - s) <= half {
            first.push((s, e));
        } else {
            let m = s + (half - acc);
            first.push((s, m));
            second.push((m, e));
        }
        acc += e - s;
    }
    let go = |v: &[(u64, u64)]| -> Result<(), String> {
        for &(s, e) in v {
            ram.discard(s * PAGE, (e - s) * PAGE)?;
        }
        Ok(())
    };
    if total < 4096 {
        return go(runs);
    }
    std::thread::scope(|sc| {
        let h = sc.spawn(|| go(&second));
        let a = go(&first);
        let b = h
            .join()
            .unwrap_or_else(|_| Err("a discard thread panicked".into()));
        a.and(b)
    })
}

/// Reads a hello on a fresh connection and answers it: Welcome, or an
/// Error frame saying what was wrong.
fn read_hello(s: &mut TcpStream, buf: &mut Vec<u8>) -> Result<Hello, ReceiveError> {
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let r = read_frame(s, buf).and_then(|k| {
        frame::expect(k, Kind::Hello)?;
        frame::json::<Hello>(k, buf)
    });
    let h = match r {
        Ok(h) => h,
        Err(e) => {
            let _ = write_frame(s, Kind::Error, &[format!("bad hello: {e}").as_bytes()]);
            return Err(link("the source's hello")(e));
        }
    };
    let refuse = |s: &mut TcpStream, why: String| {
        let _ = write_frame(s, Kind::Error, &[why.as_bytes()]);
        ReceiveError::Layout(why)
    };
    if h.protocol != frame::PROTOCOL || h.version != frame::VERSION {
        return Err(refuse(
            s,
            format!(
                "protocol {:?} version {}: this destination speaks {} version {}",
                h.protocol,
                h.version,
                frame::PROTOCOL,
                frame::VERSION
            ),
        ));
    }
    if let Err(why) = h.layout.check() {
        return Err(refuse(s, why));
    }
    let _ = s.set_read_timeout(None);
    Ok(h)
}

fn welcome(s: &mut TcpStream) -> Result<(), ReceiveError> {
    write_json(
        s,
        Kind::Welcome,
        &Welcome {
            version: frame::VERSION,
        },
    )
    .map_err(link("answering the hello"))
}

/// Waits up to `timeout` for a source: its main connection, then its urgent
/// one. `expect` is the layout this destination was told to expect (None:
/// take the source's). Connections that fail the handshake get an error
/// frame and are logged; the listener goes on waiting.
pub fn accept(
    listener: TcpListener,
    expect: Option<&Layout>,
    timeout: Duration,
) -> Result<Incoming, ReceiveError> {
    let deadline = Instant::now() + timeout;
    let mut buf = Vec::new();
    listener
        .set_nonblocking(true)
        .map_err(ReceiveError::Accept)?;
    let mut main: Option<(TcpStream, Hello)> = None;
    loop {
        if Instant::now() > deadline {
            return Err(ReceiveError::Timeout(timeout));
        }
        let mut s = match poll_accept(&listener) {
            Ok(Some(s)) => s,
            Ok(None) => continue,
            Err(e) => return Err(ReceiveError::Accept(e)),
        };
        let peer = s.peer_addr().map_or_else(|_| "?".into(), |a| a.to_string());
        let h = match read_hello(&mut s, &mut buf) {
            Ok(h) => h,
            Err(e) => {
                tracing::error!("refused a connection from {peer}: {e}");
                continue;
            }
        };
        if let Some(want) = expect {
            if *want != h.layout {
                let why = format!(
                    "the source's VM is {:?}, this destination expects {want:?}",
                    h.layout
                );
                tracing::error!("refused a connection from {peer}: {why}");
                let _ = write_frame(&mut s, Kind::Error, &[why.as_bytes()]);
                continue;
            }
        }
        match (&main, h.role, h.resume) {
            (None, Role::Main, false) => {
                welcome(&mut s)?;
                main = Some((s, h));
            }
            (Some((_, m)), Role::Urgent, false)
                if m.session == h.session && m.layout == h.layout =>
            {
                welcome(&mut s)?;
                let Some((main_s, m)) = main.take() else {
                    continue;
                };
                let _ = listener.set_nonblocking(false);
                let pages = m.layout.pages();
                return Ok(Incoming {
                    layout: m.layout,
                    session: m.session,
                    main: main_s,
                    urgent: s,
                    listener,
                    written: Bitmap::new(pages),
                    stats: PrecopyStats::default(),
                });
            }
            _ => {
                let why = format!(
                    "unexpected {:?} connection (resume: {}) for session {:#x}",
                    h.role, h.resume, h.session
                );
                tracing::error!("refused a connection from {peer}: {why}");
                let _ = write_frame(&mut s, Kind::Error, &[why.as_bytes()]);
            }
        }
    }
}

impl Incoming {
    /// Receives pre-copy into `ram` until the switchover. `progress` is
    /// called after each round.
    pub fn receive_precopy(
        &mut self,
        ram: &dyn Ram,
        progress: &dyn Fn(&PrecopyStats),
    ) -> Result<Switch, ReceiveError> {
        let pages = self.layout.pages();
        let mut buf = Vec::new();
        let mut state = None;
        // Pre-copy streams without pause until the switchover.
        let _ = self.main.set_read_timeout(Some(PRECOPY_SILENCE));
        loop {
            let k = read_frame(&mut self.main, &mut buf).map_err(link("pre-copy"))?;
            match k {
                Kind::Pages => {
                    let (first, data) = decode_pages(&buf, pages).map_err(link("pre-copy"))?;
                    ram.write(first * PAGE, data).map_err(ReceiveError::Ram)?;
                    let n = data.len() as u64 / PAGE;
                    self.written.set_range(first..first + n);
                    self.stats.pages += n;
                }
                Kind::Zero | Kind::Discard => {
                    let r = Ranges::decode(k, &buf, pages).map_err(link("pre-copy"))?;
                    for (p, n) in r.0 {
                        let end = p + u64::from(n);
                        // Only pages that hold data here need discarding.
                        let mut q = p;
                        while let Some(s) = self.written.next_set_below(q, end) {
                            let e = self.written.run_end(s, end - s);
                            ram.discard(s * PAGE, (e - s) * PAGE)
                                .map_err(ReceiveError::Ram)?;
                            self.written.clear_range(s..e);
                            q = e;
                        }
                        if k == Kind::Zero {
                            self.stats.zero_pages += u64::from(n);
                        } else {
                            self.stats.discarded_pages += u64::from(n);
                        }
                    }
                }
                Kind::RoundEnd => {
                    let r: RoundEnd = frame::json(k, &buf).map_err(link("pre-copy"))?;
                    self.stats.rounds = r.round;
                    progress(&self.stats);
                }
                Kind::State => state = Some(buf.clone()),
                Kind::Switchover => {
                    let at = Instant::now();
                    let (post, bitmap) =
                        frame::decode_switchover(&buf, pages).map_err(link("the switchover"))?;
                    let state = state.take().ok_or_else(|| {
                        link("the switchover")(FrameError::Unexpected {
                            want: "State",
                            got: Kind::Switchover,
                        })
                    })?;
                    let postcopy = if post {
                        let need = Bitmap::from_words(bitmap, pages);
                        // Pages still to come may hold an older copy here:
                        // give them back before the guest runs. This is
                        // most of the switchover's time here when the
                        // guest dirtied everything (0.2 µs a page), so two
                        // threads share it.
                        let mut runs = Vec::new();
                        for r in need.runs() {
                            let mut q = r.start;
                            while let Some(s) = self.written.next_set_below(q, r.end) {
                                let e = self.written.run_end(s, r.end - s);
                                runs.push((s, e));
                                q = e;
                            }
                        }
                        discard_runs(ram, &runs).map_err(ReceiveError::Ram)?;
                        Some(need)
                    } else {
                        None
                    };
                    return Ok(Switch {
                        state,
                        postcopy,
                        at,
                    });
                }
                other => {
                    let e = FrameError::Unexpected {
                        want: "a pre-copy frame",
                        got: other,
                    };
                    let _ = write_frame(&mut self.main, Kind::Error, &[e.to_string().as_bytes()]);
                    return Err(link("pre-copy")(e));
                }
            }
        }
    }

    /// A plain stop-and-copy: tells the source the guest runs here, then
    /// waits for its Done.
    pub fn finish_precopy(&mut self, restore: Duration) -> Result<(), ReceiveError> {
        write_json(
            &mut self.main,
            Kind::Resumed,
            &Resumed {
                restore_us: restore.as_micros() as u64,
            },
        )
        .map_err(link("the switchover"))?;
        let mut buf = Vec::new();
        let k = read_frame(&mut self.main, &mut buf).map_err(link("after the switchover"))?;
        frame::expect(k, Kind::Done).map_err(link("after the switchover"))
    }

    /// Sends the final report and closes.
    pub fn complete(mut self, c: &Complete) -> Result<(), ReceiveError> {
        write_json(&mut self.main, Kind::Complete, c).map_err(link("sending the final report"))
    }

    /// Starts post-copy: the page source for the pager, and the threads
    /// that receive the stream and keep the link.
    pub fn postcopy(
        self,
        need: Bitmap,
        ram: Arc<dyn Ram>,
        resume_timeout: Duration,
    ) -> Result<NetSource, ReceiveError> {
        let pages = self.layout.pages();
        let staging = Staging::new(self.layout.mem_bytes)
            .map_err(|e| ReceiveError::Ram(format!("the staging area: {e}")))?;
        let mut zero = Vec::new();
        let mut p = 0;
        for r in need.runs() {
            if r.start > p {
                zero.push(p * PAGE..r.start * PAGE);
            }
            p = r.end;
        }
        if p < pages {
            zero.push(p * PAGE..pages * PAGE);
        }
        let inner = Arc::new(Inner {
            pages,
            need_count: need.count(),
            need,
            arrived: AtomicBitmap::new(pages),
            requested: AtomicBitmap::new(pages),
            released: AtomicBitmap::new(pages.div_ceil(RELEASE_CHUNK)),
            staging,
            zero,
            waiters: Mutex::new(Vec::new()),
            req_tx: Mutex::new(None),
            conns: Mutex::new(None),
            link_thread: Mutex::new(None),
            completed: AtomicBool::new(false),
            main_w: Mutex::new(
                self.main
                    .try_clone()
                    .map_err(|e| link("post-copy")(e.into()))?,
            ),
            status: Mutex::new(Status::Running),
            ram,
            arrived_count: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            requests: AtomicU64::new(0),
            resumes: AtomicU64::new(0),
            discards_applied: AtomicU64::new(0),
            ended: AtomicBool::new(false),
            session: self.session,
            layout: self.layout.clone(),
        });
        let i = inner.clone();
        let listener = self.listener;
        let (main, urgent) = (self.main, self.urgent);
        let h = std::thread::Builder::new()
            .name("migrate-link".into())
            .spawn(move || {
                crate::link::raise_priority();
                i.keep_link(main, urgent, listener, resume_timeout)
            })
            .map_err(|e| ReceiveError::Ram(format!("spawning the link thread: {e}")))?;
        *inner.link_thread.lock().unwrap_or_else(|e| e.into_inner()) = Some(h);
        Ok(NetSource { inner })
    }
}

/// Pre-copy's stream never pauses either; this long without a frame is a
/// dead source (the destination then gives up: nothing ran here yet).
const PRECOPY_SILENCE: Duration = Duration::from_secs(60);

/// The stream never pauses until Done: this long without a frame on the
/// main connection is a dead link (then the resume path).
const STREAM_SILENCE: Duration = Duration::from_secs(10);

/// One look at a non-blocking listener: a connection (blocking, no
/// Nagle), or None after a short sleep when there is none yet or `accept`
/// failed in a way worth trying again; other errors are returned.
fn poll_accept(listener: &TcpListener) -> std::io::Result<Option<TcpStream>> {
    match listener.accept() {
        Ok((s, _)) => {
            s.set_nonblocking(false)?;
            let _ = s.set_nodelay(true);
            Ok(Some(s))
        }
        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || transient_accept(&e) => {
            std::thread::sleep(Duration::from_millis(5));
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

/// Errors `accept` passes on from the network (or from a process that ran
/// out of descriptors for a moment): worth trying again, most likely during
/// the very outage a resume is waited for.
fn transient_accept(e: &std::io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(
            libc_errno::ENETDOWN
                | libc_errno::EPROTO
                | libc_errno::ENOPROTOOPT
                | libc_errno::EHOSTDOWN
                | libc_errno::ENONET
                | libc_errno::EHOSTUNREACH
                | libc_errno::EOPNOTSUPP
                | libc_errno::ENETUNREACH
                | libc_errno::ECONNABORTED
                | libc_errno::EINTR
                | libc_errno::EMFILE
                | libc_errno::ENFILE
                | libc_errno::ENOBUFS
                | libc_errno::ENOMEM
        )
    )
}

/// Linux errno values (those `transient_accept` names).
mod libc_errno {
    pub const EINTR: i32 = 4;
    pub const ENOMEM: i32 = 12;
    pub const ENFILE: i32 = 23;
    pub const EMFILE: i32 = 24;
    pub const ENONET: i32 = 64;
    pub const EPROTO: i32 = 71;
    pub const ENOPROTOOPT: i32 = 92;
    pub const EOPNOTSUPP: i32 = 95;
    pub const ENETDOWN: i32 = 100;
    pub const ENETUNREACH: i32 = 101;
    pub const ECONNABORTED: i32 = 103;
    pub const ENOBUFS: i32 = 105;
    pub const EHOSTDOWN: i32 = 112;
    pub const EHOSTUNREACH: i32 = 113;
}

fn unreachable_kind(k: Kind) -> Result<(), FrameError> {
    Err(FrameError::Unexpected {
        want: "pages",
        got: k,
    })
}

/// Staging memory is given back in chunks of this many pages (256 KiB).
const RELEASE_CHUNK: u64 = 64;

#[derive(Debug, Clone, PartialEq)]
pub enum Status {
    Running,
    /// The link broke at this moment; faults wait for the source to resume.
    Down(Instant),
    /// Every page has arrived.
    Finished,
    /// The source is gone for good (or sent something invalid).
    Failed(String),
}

struct Inner {
    pages: u64,
    need: Bitmap,
    need_count: u64,
    arrived: AtomicBitmap,
    requested: AtomicBitmap,
    released: AtomicBitmap,
    staging: Staging,
    /// Byte ranges outside the post-copy set: those pages are present
    /// already, or zero.
    zero: Vec<Range<u64>>,
    waiters: Mutex<Vec<(u64, u64, Waker)>>,
    /// Requests go to a writer thread of the current urgent connection:
    /// the pager's serving threads that ask never wait on a socket.
    req_tx: Mutex<Option<mpsc::Sender<Vec<u8>>>>,
    /// The current connections, to shut them down from `end`.
    conns: Mutex<Option<(TcpStream, TcpStream)>>,
    main_w: Mutex<TcpStream>,
    link_thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    /// The final report was sent: no resume is taken any more.
    completed: AtomicBool,
    status: Mutex<Status>,
    ram: Arc<dyn Ram>,
    arrived_count: AtomicU64,
    duplicates: AtomicU64,
    requests: AtomicU64,
    resumes: AtomicU64,
    /// Post-copy Discard frames applied (a resume tells the source).
    discards_applied: AtomicU64,
    ended: AtomicBool,
    session: u64,
    layout: Layout,
}

/// The post-copy page source (see the module's documentation).
#[derive(Clone)]
pub struct NetSource {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for NetSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NetSource")
            .field("session", &self.inner.session)
            .finish()
    }
}

/// Counters of the post-copy receiver.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct PostcopyStats {
    pub pages_needed: u64,
    pub pages_arrived: u64,
    pub duplicates_dropped: u64,
    pub requests: u64,
    pub resumes: u64,
}

impl NetSource {
    /// Tells the source the guest runs here.
    pub fn resumed(&self, restore: Duration) -> Result<(), ReceiveError> {
        let mut w = self.inner.main_w.lock().unwrap_or_else(|e| e.into_inner());
        write_json(
            &mut *w,
            Kind::Resumed,
            &Resumed {
                restore_us: restore.as_micros() as u64,
            },
        )
        .map_err(link("the switchover"))
    }

    pub fn status(&self) -> Status {
        self.inner
            .status
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    pub fn stats(&self) -> PostcopyStats {
        let i = &self.inner;
        PostcopyStats {
            pages_needed: i.need_count,
            pages_arrived: i.arrived_count.load(Ordering::Relaxed),
            duplicates_dropped: i.duplicates.load(Ordering::Relaxed),
            requests: i.requests.load(Ordering::Relaxed),
            resumes: i.resumes.load(Ordering::Relaxed),
        }
    }

    /// Gives back staging memory of pages the pager has mapped (or that
    /// were discarded): `installed(page)` says so. Call it now and then.
    pub fn release(&self, installed: impl Fn(u64) -> bool) {
        let i = &self.inner;
        for c in 0..i.pages.div_ceil(RELEASE_CHUNK) {
            if i.released.get(c) {
                continue;
            }
            let r = c * RELEASE_CHUNK..((c + 1) * RELEASE_CHUNK).min(i.pages);
            if r.clone()
                .all(|p| !i.need.get(p) || (i.arrived.get(p) && installed(p)))
            {
                i.released.set(c);
                i.staging
                    .discard(r.start * PAGE, ((r.end - r.start) * PAGE) as usize);
            }
        }
    }

    /// Sends the final report on the main connection.
    pub fn complete(&self, c: &Complete) -> Result<(), ReceiveError> {
        let r = {
            let mut w = self.inner.main_w.lock().unwrap_or_else(|e| e.into_inner());
            write_json(&mut *w, Kind::Complete, c).map_err(link("sending the final report"))
        };
        self.inner.completed.store(true, Ordering::Release);
        r
    }

    /// Ends the receiver (the VM stops, or the migration is over): the
    /// connections are shut and the link thread is joined. Faults still
    /// waiting stay parked (see `read_at_or_wake`).
    pub fn end(&self) {
        let i = &self.inner;
        i.ended.store(true, Ordering::Release);
        if let Some((m, u)) = i.conns.lock().unwrap_or_else(|e| e.into_inner()).as_ref() {
            let _ = m.shutdown(std::net::Shutdown::Both);
            let _ = u.shutdown(std::net::Shutdown::Both);
        }
        i.set_status(Status::Failed("the receiver ended".into()));
        let h = i
            .link_thread
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(h) = h {
            let _ = h.join();
        }
    }
}

impl Inner {
    fn set_status(&self, s: Status) {
        let failed = matches!(s, Status::Failed(_));
        {
            let mut g = self.status.lock().unwrap_or_else(|e| e.into_inner());
            if matches!(*g, Status::Finished | Status::Failed(_)) {
                return;
            }
            *g = s;
        }
        if failed {
            // Nothing will arrive: drop the wakers (their faults stay
            // parked until the VMM stops the guest, see `read_at_or_wake`).
            self.waiters
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .clear();
        }
    }

    fn all_arrived(&self) -> bool {
        self.arrived_count.load(Ordering::Acquire) >= self.need_count
    }

    /// Wakes every waiter whose pages have all arrived.
    fn wake(&self) {
        let mut w = self.waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.retain(|(s, e, waker)| {
            if (*s..*e).all(|p| !self.need.get(p) || self.arrived.get(p)) {
                waker();
                false
            } else {
                true
            }
        });
    }

    /// Stores pages that arrived; drops those that had arrived already.
    fn take_pages(&self, first: u64, data: &[u8]) {
        let n = data.len() as u64 / PAGE;
        let mut fresh = 0;
        for i in 0..n {
            let p = first + i;
            if !self.need.get(p) || self.arrived.get(p) {
                self.duplicates.fetch_add(1, Ordering::Relaxed);
                continue;
            }
            // Zero pages come as Zero frames: a data page is written as is.
            self.staging.write(
                p * PAGE,
                &data[(i * PAGE) as usize..((i + 1) * PAGE) as usize],
            );
            if self.arrived.set(p) {
                fresh += 1;
            }
        }
        self.arrived_count.fetch_add(fresh, Ordering::AcqRel);
    }

    fn take_zero(&self, r: &Ranges) {
        let mut fresh = 0;
        for &(p, n) in &r.0 {
            for q in p..p + u64::from(n) {
                if self.need.get(q) && self.arrived.set(q) {
                    fresh += 1;
                }
            }
        }
        self.arrived_count.fetch_add(fresh, Ordering::AcqRel);
    }

    fn take_discard(&self, r: &Ranges) -> Result<(), String> {
        for &(p, n) in &r.0 {
            self.ram.discard(p * PAGE, u64::from(n) * PAGE)?;
        }
        let mut fresh = 0;
        for &(p, n) in &r.0 {
            for q in p..p + u64::from(n) {
                if self.need.get(q) && self.arrived.set(q) {
                    fresh += 1;
                }
            }
            self.staging
                .discard(p * PAGE, (u64::from(n) * PAGE) as usize);
        }
        self.arrived_count.fetch_add(fresh, Ordering::AcqRel);
        Ok(())
    }

    /// Asks for the pages of `[s, e)` not arrived or requested yet (the
    /// writer thread sends it; nothing here waits on a socket). While the
    /// link is down nothing is sent: the resume asks again.
    fn request(&self, s: u64, e: u64) {
        let g = self.req_tx.lock().unwrap_or_else(|e| e.into_inner());
        let Some(tx) = g.as_ref() else {
            return;
        };
        let mut ranges = Vec::new();
        let mut p = s;
        while p < e {
            if self.need.get(p) && !self.arrived.get(p) && self.requested.set(p) {
                let start = p;
                p += 1;
                while p < e && self.need.get(p) && !self.arrived.get(p) && self.requested.set(p) {
                    p += 1;
                }
                ranges.push((start, (p - start) as u32));
            } else {
                p += 1;
            }
        }
        if ranges.is_empty() {
            return;
        }
        self.requests.fetch_add(1, Ordering::Relaxed);
        let _ = tx.send(Ranges(ranges).encode());
    }

    /// Starts the writer of requests on `urgent`.
    fn start_requests(&self, urgent: TcpStream) {
        let (tx, rx) = mpsc::channel::<Vec<u8>>();
        let spawned = std::thread::Builder::new()
            .name("migrate-requests".into())
            .spawn(move || {
                crate::link::raise_priority();
                let mut w = urgent;
                for payload in rx {
                    if let Err(err) = write_frame(&mut w, Kind::Request, &[&payload]) {
                        // The link supervisor says what happened to the link.
                        tracing::debug!("sending a page request: {err}");
                        let _ = w.shutdown(std::net::Shutdown::Both);
                        return;
                    }
                }
            });
        match spawned {
            Ok(_) => *self.req_tx.lock().unwrap_or_else(|e| e.into_inner()) = Some(tx),
            Err(e) => tracing::error!("spawning the page request writer: {e}"),
        }
    }

    fn stop_requests(&self) {
        *self.req_tx.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Stores a Pages or Zero frame's pages and wakes whom they complete.
    fn take(&self, k: Kind, buf: &[u8]) -> Result<(), FrameError> {
        match k {
            Kind::Pages => {
                let (first, data) = decode_pages(buf, self.pages)?;
                self.take_pages(first, data);
            }
            Kind::Zero => self.take_zero(&Ranges::decode(k, buf, self.pages)?),
            other => unreachable_kind(other)?,
        }
        self.wake();
        Ok(())
    }

    /// The main connection: the stream, until `Done` with every page here.
    fn receive_main(&self, mut s: TcpStream) -> Result<(), FrameError> {
        // The stream never pauses until Done: silence this long is a dead link.
        let _ = s.set_read_timeout(Some(STREAM_SILENCE));
        let mut buf = Vec::new();
        loop {
            let k = read_frame(&mut s, &mut buf)?;
            match k {
                Kind::Pages | Kind::Zero => self.take(k, &buf)?,
                Kind::Discard => {
                    let r = Ranges::decode(k, &buf, self.pages)?;
                    self.take_discard(&r)
                        .map_err(|e| FrameError::Malformed { kind: k, why: e })?;
                    self.discards_applied.fetch_add(1, Ordering::AcqRel);
                    self.wake();
                }
                Kind::Done => {
                    // Urgent pages may still be on their way on the other
                    // connection: wait for them, bounded.
                    let deadline = Instant::now() + STREAM_SILENCE;
                    while !self.all_arrived()
                        && Instant::now() < deadline
                        && !self.ended.load(Ordering::Acquire)
                    {
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    if self.all_arrived() {
                        return Ok(());
                    }
                    return Err(FrameError::Malformed {
                        kind: k,
                        why: format!(
                            "the source says it sent every page, but {} of {} are missing",
                            self.need_count - self.arrived_count.load(Ordering::Acquire),
                            self.need_count
                        ),
                    });
                }
                other => {
                    return Err(FrameError::Unexpected {
                        want: "a post-copy frame",
                        got: other,
                    });
                }
            }
        }
    }

    /// The urgent connection: answers to requests, until every page is here
    /// (or the connection is shut).
    fn receive_urgent(&self, mut s: TcpStream) -> Result<(), FrameError> {
        let mut buf = Vec::new();
        while !self.all_arrived() {
            let k = read_frame(&mut s, &mut buf)?;
            match k {
                Kind::Pages | Kind::Zero => self.take(k, &buf)?,
                other => {
                    return Err(FrameError::Unexpected {
                        want: "pages on the urgent connection",
                        got: other,
                    })
                }
            }
        }
        Ok(())
    }

    /// Runs the receivers; on a broken link, waits for the source to
    /// resume (up to `timeout`) and goes on; ends when every page arrived
    /// and the stream said Done. Afterwards it still answers a source that
    /// lost the link at the very end (an empty Need), until the final
    /// report was sent.
    fn keep_link(
        self: Arc<Self>,
        mut main: TcpStream,
        mut urgent: TcpStream,
        listener: TcpListener,
        timeout: Duration,
    ) {
        // Faults that came before the request writer ran asked nothing yet.
        let mut rerequest = true;
        loop {
            let (Ok(m), Ok(u), Ok(uw), Ok(mc), Ok(uc)) = (
                main.try_clone(),
                urgent.try_clone(),
                urgent.try_clone(),
                main.try_clone(),
                urgent.try_clone(),
            ) else {
                self.set_status(Status::Failed("cloning the connections failed".into()));
                return;
            };
            *self.conns.lock().unwrap_or_else(|e| e.into_inner()) = Some((mc, uc));
            if self.ended.load(Ordering::Acquire) {
                // `end` ran while a resume was being taken: it could not
                // shut these.
                let _ = main.shutdown(std::net::Shutdown::Both);
                let _ = urgent.shutdown(std::net::Shutdown::Both);
                return;
            }
            self.start_requests(uw);
            if rerequest {
                // Faults waiting since before the break (or during the
                // resume) ask again, on the new connection.
                for p in 0..self.pages {
                    if self.need.get(p) && !self.arrived.get(p) {
                        self.requested.clear(p);
                    }
                }
                let waits: Vec<(u64, u64)> = self
                    .waiters
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .iter()
                    .map(|(s, e, _)| (*s, *e))
                    .collect();
                for (s, e) in waits {
                    self.request(s, e);
                }
            }
            let r = std::thread::scope(|sc| {
                let uh = sc.spawn(|| {
                    crate::link::raise_priority();
                    self.receive_urgent(u)
                });
                let r = self.receive_main(m);
                let _ = urgent.shutdown(std::net::Shutdown::Both);
                let ur = uh.join().unwrap_or(Err(FrameError::Closed));
                match (r, ur) {
                    (Ok(()), _) => Ok(()),
                    // The urgent side's own error says more (a hostile frame).
                    (
                        Err(e),
                        Err(
                            ue @ (FrameError::Malformed { .. }
                            | FrameError::Unexpected { .. }
                            | FrameError::Checksum(_)),
                        ),
                    ) => {
                        tracing::debug!("main connection: {e}");
                        Err(ue)
                    }
                    (Err(e), _) => Err(e),
                }
            });
            self.stop_requests();
            match r {
                Ok(()) => {
                    self.set_status(Status::Finished);
                    self.after_finish(&listener);
                    return;
                }
                Err(
                    e @ (FrameError::Peer(_)
                    | FrameError::Malformed { .. }
                    | FrameError::Unexpected { .. }
                    | FrameError::Checksum(_)
                    | FrameError::Magic(_)
                    | FrameError::Kind(_)
                    | FrameError::TooLarge { .. }
                    | FrameError::Reserved),
                ) => {
                    let why = format!("sent something invalid: {e}");
                    tracing::error!("post-copy: the source {why}");
                    self.set_status(Status::Failed(why));
                    return;
                }
                Err(e) => {
                    if self.ended.load(Ordering::Acquire) {
                        return;
                    }
                    let waiting = self.waiters.lock().unwrap_or_else(|e| e.into_inner()).len();
                    tracing::warn!(
                        "post-copy: the link to the source broke ({e}) with {} of {} pages still to come and {waiting} faults waiting; waiting up to {timeout:?} for it to resume",
                        self.need_count - self.arrived_count.load(Ordering::Acquire),
                        self.need_count
                    );
                }
            }
            self.set_status(Status::Down(Instant::now()));
            match self.await_resume(&listener, timeout) {
                Ok((m, u)) => {
                    main = m;
                    urgent = u;
                    self.resumes.fetch_add(1, Ordering::Relaxed);
                    self.set_status(Status::Running);
                    rerequest = true;
                    tracing::info!("post-copy: the source resumed");
                }
                Err(why) => {
                    tracing::error!("post-copy: {why}");
                    self.set_status(Status::Failed(why));
                    return;
                }
            }
        }
    }

    /// Whether `h` resumes this migration; anything else is refused with
    /// an error frame.
    fn is_resume(&self, s: &mut TcpStream, h: &Hello) -> bool {
        if h.resume && h.session == self.session && h.layout == self.layout {
            return true;
        }
        let why = format!(
            "only a resume of session {:#x} is accepted now",
            self.session
        );
        let _ = write_frame(s, Kind::Error, &[why.as_bytes()]);
        false
    }

    /// After every page arrived: a source that lost the link at the very
    /// end reconnects to hear that nothing is needed (an empty Need) and to
    /// read the final report; until that report was sent, or a minute.
    fn after_finish(&self, listener: &TcpListener) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let _ = listener.set_nonblocking(true);
        let mut buf = Vec::new();
        while Instant::now() < deadline
            && !self.completed.load(Ordering::Acquire)
            && !self.ended.load(Ordering::Acquire)
        {
            let mut s = match poll_accept(listener) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(_) => return,
            };
            let Ok(h) = read_hello(&mut s, &mut buf) else {
                continue;
            };
            if !self.is_resume(&mut s, &h) {
                continue;
            }
            if welcome(&mut s).is_err() {
                continue;
            }
            if h.role == Role::Main {
                let applied = self.discards_applied.load(Ordering::Acquire);
                let none = Bitmap::new(self.pages);
                if write_frame(
                    &mut s,
                    Kind::Need,
                    &[&applied.to_le_bytes(), &encode_bitmap(&none.words)],
                )
                .is_ok()
                {
                    if let Ok(c) = s.try_clone() {
                        *self.main_w.lock().unwrap_or_else(|e| e.into_inner()) = c;
                    }
                }
            } else {
                // Nothing to request: the source sees the urgent side end.
                let _ = s.shutdown(std::net::Shutdown::Both);
            }
        }
    }

    fn await_resume(
        &self,
        listener: &TcpListener,
        timeout: Duration,
    ) -> Result<(TcpStream, TcpStream), String> {
        let deadline = Instant::now() + timeout;
        let _ = listener.set_nonblocking(true);
        let mut buf = Vec::new();
        let mut main: Option<TcpStream> = None;
        while Instant::now() < deadline {
            if self.ended.load(Ordering::Acquire) {
                return Err("the receiver ended while waiting for the source".into());
            }
            let mut s = match poll_accept(listener) {
                Ok(Some(s)) => s,
                Ok(None) => continue,
                Err(e) => return Err(format!("accepting the source's reconnection: {e}")),
            };
            let h = match read_hello(&mut s, &mut buf) {
                Ok(h) => h,
                Err(e) => {
                    tracing::error!(
                        "refused a connection while waiting for the source to resume: {e}"
                    );
                    continue;
                }
            };
            if !self.is_resume(&mut s, &h) {
                continue;
            }
            match (h.role, main.take()) {
                (Role::Main, _) => {
                    if welcome(&mut s).is_err() {
                        continue;
                    }
                    // What is still needed: not arrived (requests in flight
                    // on the broken link are asked again).
                    let mut need = Bitmap::new(self.pages);
                    for p in 0..self.pages {
                        if self.need.get(p) && !self.arrived.get(p) {
                            need.set(p);
                            self.requested.clear(p);
                        }
                    }
                    let applied = self.discards_applied.load(Ordering::Acquire);
                    if write_frame(
                        &mut s,
                        Kind::Need,
                        &[&applied.to_le_bytes(), &encode_bitmap(&need.words)],
                    )
                    .is_err()
                    {
                        continue;
                    }
                    main = Some(s);
                }
                (Role::Urgent, Some(m)) => {
                    if welcome(&mut s).is_err() {
                        continue;
                    }
                    let _ = listener.set_nonblocking(false);
                    *self.main_w.lock().unwrap_or_else(|e| e.into_inner()) = match m.try_clone() {
                        Ok(c) => c,
                        Err(_) => continue,
                    };
                    return Ok((m, s));
                }
                (Role::Urgent, None) => {
                    let _ = write_frame(
                        &mut s,
                        Kind::Error,
                        &[b"resume the main connection first".as_slice()],
                    );
                }
            }
        }
        Err(format!(
            "the source did not come back within {timeout:?}: {} of {} pages never arrived",
            self.need_count - self.arrived_count.load(Ordering::Acquire),
            self.need_count
        ))
    }
}

impl PageSource for NetSource {
    fn len(&self) -> u64 {
        self.inner.pages * PAGE
    }

    fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<(), SourceError> {
        // Only for callers that may wait: poll until the pages are here.
        let waker: Waker = Arc::new(|| {});
        loop {
            match self.read_at_or_wake(offset, buf, &waker) {
                Err(SourceError::Pending) => {
                    if matches!(self.status(), Status::Failed(_)) {
                        return Err(SourceError::Io {
                            path: "migration source".into(),
                            error: std::io::Error::other("the source is gone"),
                        });
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                r => return r,
            }
        }
    }

    fn read_at_or_wake(
        &self,
        offset: u64,
        buf: &mut [u8],
        waker: &Waker,
    ) -> Result<(), SourceError> {
        let i = &self.inner;
        let len = buf.len() as u64;
        if offset.checked_add(len).is_none_or(|e| e > self.len()) {
            return Err(SourceError::OutOfRange {
                offset,
                len: buf.len(),
                source_len: self.len(),
            });
        }
        let s = offset / PAGE;
        let e = (offset + len).div_ceil(PAGE);
        let ready = |p: u64| !i.need.get(p) || i.arrived.get(p);
        // A source gone for good leaves its faults parked: the VMM stops
        // the guest (`Status::Failed`). They are never answered, neither
        // with zeros nor with poison (a poisoned page would also kill the
        // VMM's own reads of guest memory with SIGBUS).
        if !(s..e).all(ready) {
            {
                let mut w = i.waiters.lock().unwrap_or_else(|e| e.into_inner());
                if !(s..e).all(ready) {
                    // One entry per range: a fault read again after a wake
                    // replaces its waker rather than piling up.
                    match w.iter_mut().find(|(ws, we, _)| *ws == s && *we == e) {
                        Some(entry) => entry.2 = waker.clone(),
                        None => w.push((s, e, waker.clone())),
                    }
                    drop(w);
                    i.request(s, e);
                    return Err(SourceError::Pending);
                }
            }
        }
        // Every page is here: in staging, or zero.
        let mut bad = Vec::new();
        for p in s..e {
            let lo = (p * PAGE).max(offset);
            let hi = ((p + 1) * PAGE).min(offset + len);
            let out = &mut buf[(lo - offset) as usize..(hi - offset) as usize];
            if !i.need.get(p) {
                out.fill(0);
            } else if i.released.get(p / RELEASE_CHUNK) {
                // Given back after the pager mapped it: a read now would be
                // zeros, never the page.
                bad.push(lo..hi);
            } else {
                i.staging.read(lo, out);
            }
        }
        if !bad.is_empty() {
            return Err(SourceError::Untrusted {
                bad,
                why: "a post-copy page was read again after it was mapped".into(),
            });
        }
        Ok(())
    }

    fn zero_ranges(&self) -> &[Range<u64>] {
        &self.inner.zero
    }

    fn describe(&self) -> String {
        format!("migration session {:#x}", self.inner.session)
    }
}
