//! The sending side: pre-copy rounds while the guest runs, a stop-and-copy,
//! then post-copy: the guest resumes on the destination at once, its faults
//! come back here as requests on the urgent connection (answered ahead of
//! everything else, and the stream moves to where they were), and the rest
//! streams in the background. A link that breaks in post-copy is
//! reconnected within a deadline; the destination then says which pages it
//! still needs, so none is lost and none is sent into its memory twice.
//!
//! # Invariant
//! After the switchover the source's guest never runs again, so its memory
//! changes only by the host (a balloon): `Guest::take_changes` reports
//! those, written pages are queued again and discarded ones are sent as
//! `Discard`. Before it, every page the guest or the host changed after it
//! was read is in the next `take_changes`, which the switchover takes with
//! the vCPUs stopped: so the destination ends up with every page's last
//! contents.

use std::io::Write;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::bits::{is_zero, Bitmap};
use crate::frame::{
    self, encode_bitmap, read_frame, write_frame, write_json, Complete, FrameError, Hello, Kind,
    Layout, Ranges, Resumed, Role, RoundEnd, Welcome, MAX_PAGES_PER_FRAME, PAGE,
};
use crate::link::{connect, Bandwidth};

/// When to stop the guest and move it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Switchover {
    /// Pre-copy for up to `precopy_rounds`; if what is left then fits the
    /// downtime limit, a plain stop-and-copy, otherwise post-copy.
    Auto,
    /// No pre-copy: post-copy from the start.
    Immediate,
    /// Pre-copy only: rounds go on, throttling the vCPUs more each round
    /// after `precopy_rounds` (as QEMU's auto-converge), until what is left
    /// fits the downtime limit; then stop-and-copy. No post-copy.
    AfterConverge,
}

impl Switchover {
    pub fn parse(s: &str) -> Option<Switchover> {
        match s {
            "auto" => Some(Switchover::Auto),
            "immediate" => Some(Switchover::Immediate),
            "after-converge" => Some(Switchover::AfterConverge),
            _ => None,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub precopy_rounds: u32,
    pub switchover: Switchover,
    /// Bytes per second over both connections (None: as fast as it goes).
    pub max_bandwidth: Option<u64>,
    /// The longest stop-and-copy that pre-copy may end with.
    pub downtime_limit: Duration,
    /// How long to try to reconnect after the link broke in post-copy.
    pub resume_timeout: Duration,
    /// How long to wait for the destination's final report.
    pub complete_timeout: Duration,
    /// Break the link at these moments of post-copy (tests: after this many
    /// pages have been streamed since the last connection).
    pub cut_after_pages: Vec<u64>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            precopy_rounds: 1,
            switchover: Switchover::Auto,
            max_bandwidth: None,
            downtime_limit: Duration::from_millis(50),
            resume_timeout: Duration::from_secs(30),
            complete_timeout: Duration::from_secs(300),
            cut_after_pages: Vec::new(),
        }
    }
}

/// What the guest's memory did since the last look.
#[derive(Debug, Default, Clone)]
pub struct Changes {
    /// Pages written (by vCPUs or the host).
    pub dirty: Option<Bitmap>,
    /// Pages given back (a balloon): they read as zero now.
    pub discarded: Vec<std::ops::Range<u64>>,
}

/// The VM being migrated, as the sender needs it.
pub trait Guest: Send + Sync {
    fn layout(&self) -> Layout;
    /// Copies guest memory at byte `offset` into `buf`.
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String>;
    /// Starts tracking what changes (dirty log, host log).
    fn start_tracking(&self) -> Result<(), String>;
    fn stop_tracking(&self);
    /// What changed since tracking started or the last call.
    fn take_changes(&self) -> Result<Changes, String>;
    /// Pages given back since the last call (after the switchover, when
    /// the vCPUs no longer run here and only a balloon changes memory).
    fn take_discards(&self) -> Vec<std::ops::Range<u64>>;
}

/// The VM's vCPUs, as the sender drives them.
pub trait Vcpus {
    /// Stops every vCPU and returns the vCPU and device state to send.
    fn pause(&mut self) -> Result<Vec<u8>, String>;
    /// Lets the vCPUs run again here (the migration failed before the
    /// switchover).
    fn resume(&mut self) -> Result<(), String>;
    /// Runs the vCPUs `100 - percent`% of the time.
    fn throttle(&mut self, percent: u32);
    /// The switchover has been sent (or failed): whatever `pause` held off
    /// to keep the guest's state and memory consistent may go on.
    fn switched(&mut self) {}
}

/// Progress, for a progress bar.
#[derive(Debug, Clone, Serialize)]
pub struct Progress {
    pub phase: &'static str,
    pub pages_sent: u64,
    pub pages_remaining: u64,
    pub bytes_sent: u64,
    /// Bytes per second over the last phase so far.
    pub rate: f64,
}

/// Pages and bytes one phase sent.
#[derive(Debug, Clone, Default, Serialize)]
pub struct PhaseStats {
    /// Pages sent with their data.
    pub pages: u64,
    /// Pages sent as zero (no data).
    pub zero_pages: u64,
    /// Pages sent as discarded (a balloon).
    pub discarded_pages: u64,
    /// Bytes on the wire, headers included.
    pub bytes: u64,
    pub ms: f64,
}

/// The migration's result, as the source sees it, with the destination's
/// final report.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    pub mode: &'static str,
    pub switchover: Switchover,
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// From the start until the destination had every page (its guest
    /// then runs verification passes, not counted here).
    pub total_ms: f64,
    /// From stopping the vCPUs here to hearing they run there (an upper
    /// bound: it includes the reply's trip).
    pub downtime_ms: f64,
    pub precopy_rounds: u32,
    /// The highest vCPU throttle pre-copy used, percent.
    pub throttle_percent: u32,
    pub precopy: PhaseStats,
    pub stop_copy: PhaseStats,
    pub postcopy: PhaseStats,
    /// Pages sent on the urgent connection, for faults.
    pub urgent_pages: u64,
    pub requests: u64,
    /// Times the link broke in post-copy and was resumed.
    pub resumes: u32,
    pub bytes_total: u64,
    pub max_bandwidth: Option<u64>,
    /// Bytes sent over the link's capacity for the time it was used.
    pub link_share: Option<f64>,
    /// The destination's final report.
    pub destination: Option<Complete>,
    /// The guest's own checksums held on the destination.
    pub verified: bool,
}

/// Why a migration failed.
#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("connecting to the destination {to}: {source}")]
    Connect { to: String, source: std::io::Error },
    #[error("{phase}: {source}")]
    Link {
        phase: &'static str,
        source: FrameError,
    },
    #[error("the destination refused the migration: {0}")]
    Refused(String),
    #[error("the guest: {0}")]
    Guest(String),
    #[error("pre-copy did not converge after {rounds} rounds, the last ones with the vCPUs throttled to 1%: {dirty_mib} MiB were dirty again, {estimate:?} to send against a limit of {limit:?}; the guest runs on here. The guest dirties memory faster than the link carries it even throttled: use --switchover auto (post-copy) or a higher --downtime-limit-ms")]
    NoConvergence {
        rounds: u32,
        dirty_mib: u64,
        estimate: Duration,
        limit: Duration,
    },
    #[error("the link broke in post-copy and could not be resumed within {0:?}: the guest is stopped here and its memory is incomplete there")]
    ResumeFailed(Duration),
}

fn link(phase: &'static str) -> impl Fn(FrameError) -> MigrateError {
    move |source| MigrateError::Link { phase, source }
}

/// Counts bytes written.
struct Counted {
    s: TcpStream,
    bytes: Arc<AtomicU64>,
}

impl Write for Counted {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        let n = self.s.write(b)?;
        self.bytes.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        self.s.flush()
    }
}

fn hello(
    to: &str,
    role: Role,
    session: u64,
    resume: bool,
    layout: &Layout,
) -> Result<TcpStream, MigrateError> {
    let mut s = connect(to, Duration::from_secs(5)).map_err(|e| MigrateError::Connect {
        to: to.to_string(),
        source: e,
    })?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    write_json(
        &mut s,
        Kind::Hello,
        &Hello {
            protocol: frame::PROTOCOL.into(),
            version: frame::VERSION,
            role,
            session,
            resume,
            layout: layout.clone(),
        },
    )
    .map_err(link("sending the hello"))?;
    let mut buf = Vec::new();
    let k = match read_frame(&mut s, &mut buf) {
        Err(FrameError::Peer(m)) => return Err(MigrateError::Refused(m)),
        r => r.map_err(link("reading the destination's answer"))?,
    };
    frame::expect(k, Kind::Welcome).map_err(link("the handshake"))?;
    let w: Welcome = frame::json(k, &buf).map_err(link("the handshake"))?;
    if w.version != frame::VERSION {
        return Err(MigrateError::Refused(format!(
            "it speaks protocol version {}, this source {}",
            w.version,
            frame::VERSION
        )));
    }
    let _ = s.set_read_timeout(None);
    // A destination that stops reading for this long is a dead link (the
    // kernel's own retries would take a quarter of an hour).
    let _ = s.set_write_timeout(Some(WRITE_STALL));
    Ok(s)
}

/// How long a write may wait for the destination to read.
const WRITE_STALL: Duration = Duration::from_secs(10);
/// After Done, how long the source waits for the destination to close the
/// urgent connection (it does once every page is there).
const AFTER_DONE: Duration = Duration::from_secs(30);

fn session_id() -> u64 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    xxhash_rust::xxh3::xxh3_64(
        &[t.to_le_bytes(), u64::from(std::process::id()).to_le_bytes()].concat(),
    )
}

/// Sends pages, coalescing runs of data pages into `Pages` frames and runs
/// of zero pages into `Zero` frames.
struct PageWriter<'a> {
    guest: &'a dyn Guest,
    buf: Vec<u8>,
    zeros: Vec<(u64, u32)>,
}

impl<'a> PageWriter<'a> {
    fn new(guest: &'a dyn Guest) -> Self {
        PageWriter {
            guest,
            buf: vec![0; (MAX_PAGES_PER_FRAME as u64 * PAGE) as usize],
            zeros: Vec::new(),
        }
    }

    /// Sends `[first, first + n)` (n ≤ MAX_PAGES_PER_FRAME); returns
    /// (data pages, zero pages).
    fn send(
        &mut self,
        w: &mut impl Write,
        first: u64,
        n: u64,
        bw: &Bandwidth,
        urgent: bool,
    ) -> Result<(u64, u64), MigrateError> {
        let len = (n * PAGE) as usize;
        self.guest
            .read(first * PAGE, &mut self.buf[..len])
            .map_err(MigrateError::Guest)?;
        let (mut data, mut zero) = (0, 0);
        let mut i = 0u64;
        while i < n {
            let page = |j: u64| &self.buf[(j * PAGE) as usize..((j + 1) * PAGE) as usize];
            let z = is_zero(page(i));
            let mut j = i + 1;
            while j < n && is_zero(page(j)) == z {
                j += 1;
            }
            if z {
                zero += j - i;
                self.zeros.push((first + i, (j - i) as u32));
            } else {
                data += j - i;
                let bytes = &self.buf[(i * PAGE) as usize..(j * PAGE) as usize];
                if urgent {
                    bw.take(bytes.len() + 32);
                } else {
                    bw.wait(bytes.len() + 32);
                }
                write_frame(w, Kind::Pages, &[&(first + i).to_le_bytes(), bytes])
                    .map_err(link("sending pages"))?;
            }
            i = j;
        }
        if urgent || self.zeros.len() >= 4096 {
            self.flush_zeros(w)?;
        }
        Ok((data, zero))
    }

    fn flush_zeros(&mut self, w: &mut impl Write) -> Result<(), MigrateError> {
        if !self.zeros.is_empty() {
            let r = Ranges(std::mem::take(&mut self.zeros));
            write_frame(w, Kind::Zero, &[&r.encode()]).map_err(link("sending zero pages"))?;
        }
        Ok(())
    }
}

/// Discarded ranges as Discard payloads: sorted, merged, split to the
/// protocol's bounds; and the pages they cover.
fn discard_payloads(discarded: &[std::ops::Range<u64>], pages: u64) -> (u64, Vec<Vec<u8>>) {
    // Sorted and merged: the protocol takes disjoint ascending ranges, and
    // a balloon gives the same page back many times.
    let mut merged: Vec<std::ops::Range<u64>> = discarded
        .iter()
        .map(|r| r.start.min(pages)..r.end.min(pages))
        .filter(|r| r.start < r.end)
        .collect();
    merged.sort_by_key(|r| r.start);
    let mut m: Vec<std::ops::Range<u64>> = Vec::with_capacity(merged.len());
    for r in merged {
        match m.last_mut() {
            Some(l) if r.start <= l.end => l.end = l.end.max(r.end),
            _ => m.push(r),
        }
    }
    let mut v = Vec::new();
    let mut n = 0;
    for r in &m {
        let mut p = r.start;
        while p < r.end {
            let k = (r.end - p).min(u64::from(u32::MAX));
            v.push((p, k as u32));
            n += k;
            p += k;
        }
    }
    let payloads = v
        .chunks(frame::MAX_RANGES)
        .map(|c| Ranges(c.to_vec()).encode())
        .collect();
    (n, payloads)
}

/// Sends discarded ranges as Discard frames; returns the pages.
fn send_discards(
    w: &mut impl Write,
    discarded: &[std::ops::Range<u64>],
    pages: u64,
) -> Result<u64, MigrateError> {
    let (n, payloads) = discard_payloads(discarded, pages);
    for p in &payloads {
        write_frame(w, Kind::Discard, &[p]).map_err(link("sending discarded pages"))?;
    }
    Ok(n)
}

/// Post-copy: records the discards (first: a link that breaks while they
/// are written loses none, see `reconnect`), then sends them.
fn send_postcopy_discards(
    w: &mut impl Write,
    discarded: &[std::ops::Range<u64>],
    pages: u64,
    history: &Mutex<Vec<Vec<u8>>>,
) -> Result<u64, MigrateError> {
    let (n, payloads) = discard_payloads(discarded, pages);
    history
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .extend(payloads.iter().cloned());
    for p in &payloads {
        write_frame(w, Kind::Discard, &[p]).map_err(link("sending discarded pages"))?;
    }
    Ok(n)
}

/// Migrates the VM to `to`. On an error before the switchover the vCPUs
/// are resumed here (the guest goes on on this host); after it, the guest
/// is the destination's.
pub fn migrate(
    guest: &dyn Guest,
    vcpus: &mut dyn Vcpus,
    to: &str,
    opts: &Options,
    progress: &dyn Fn(&Progress),
) -> Result<Report, MigrateError> {
    let t0 = Instant::now();
    let layout = guest.layout();
    layout.check().map_err(MigrateError::Guest)?;

    let session = session_id();
    let bytes = Arc::new(AtomicU64::new(0));
    let main = hello(to, Role::Main, session, false, &layout)?;
    let urgent = hello(to, Role::Urgent, session, false, &layout)?;
    let bw = Arc::new(Bandwidth::new(opts.max_bandwidth));
    let mut report = Report {
        mode: "",
        switchover: opts.switchover,
        mem_bytes: layout.mem_bytes,
        vcpus: layout.vcpus,
        total_ms: 0.0,
        downtime_ms: 0.0,
        precopy_rounds: 0,
        throttle_percent: 0,
        precopy: PhaseStats::default(),
        stop_copy: PhaseStats::default(),
        postcopy: PhaseStats::default(),
        urgent_pages: 0,
        requests: 0,
        resumes: 0,
        bytes_total: 0,
        max_bandwidth: opts.max_bandwidth,
        link_share: None,
        destination: None,
        verified: false,
    };
    let mut w = Counted {
        s: main.try_clone().map_err(|e| MigrateError::Connect {
            to: to.into(),
            source: e,
        })?,
        bytes: bytes.clone(),
    };
    guest.start_tracking().map_err(MigrateError::Guest)?;
    let pre = precopy(
        guest,
        vcpus,
        &mut w,
        &bw,
        opts,
        &mut report,
        progress,
        &bytes,
    );
    let (to_send, converged) = match pre {
        Ok(v) => v,
        Err(e) => {
            vcpus.throttle(0);
            guest.stop_tracking();
            if let Err(r) = vcpus.resume() {
                tracing::error!("resuming the guest here after a failed migration: {r}");
            }
            return Err(e);
        }
    };
    // Stop and copy.
    let t_pause = Instant::now();
    let before = bytes.load(Ordering::Relaxed);
    let state = match vcpus.pause() {
        Ok(s) => s,
        Err(e) => {
            vcpus.throttle(0);
            vcpus.switched();
            guest.stop_tracking();
            if let Err(r) = vcpus.resume() {
                tracing::error!("resuming the guest here after a failed migration: {r}");
            }
            return Err(MigrateError::Guest(e));
        }
    };
    vcpus.throttle(0);
    let stop = stop_and_copy(guest, &mut w, &bw, &state, to_send, converged, &mut report);
    vcpus.switched();
    let mut to_send = match stop {
        Ok(t) => t,
        Err(e) => {
            guest.stop_tracking();
            if let Err(r) = vcpus.resume() {
                tracing::error!("resuming the guest here after a failed migration: {r}");
            }
            return Err(e);
        }
    };
    let postcopy = !converged;
    report.mode = match (report.precopy_rounds > 0, postcopy) {
        (true, true) => "precopy+postcopy",
        (true, false) => "precopy",
        (false, _) => "postcopy",
    };
    // The destination answers Resumed once its vCPUs run.
    let mut main_r = main.try_clone().map_err(|e| MigrateError::Connect {
        to: to.into(),
        source: e,
    })?;
    let mut buf = Vec::new();
    let _ = main_r.set_read_timeout(Some(Duration::from_secs(60)));
    let k = read_frame(&mut main_r, &mut buf).map_err(|e| {
        // Past the switchover there is no going back: the destination may
        // run the guest. Say what happened; keep the guest stopped here.
        MigrateError::Link {
            phase: "waiting for the destination to resume the guest",
            source: e,
        }
    })?;
    frame::expect(k, Kind::Resumed).map_err(link("the switchover"))?;
    let _: Resumed = frame::json(k, &buf).map_err(link("the switchover"))?;
    let _ = main_r.set_read_timeout(None);
    report.downtime_ms = t_pause.elapsed().as_secs_f64() * 1e3;
    report.stop_copy.bytes = bytes.load(Ordering::Relaxed) - before;
    report.stop_copy.ms = report.downtime_ms;
    let t_post = Instant::now();
    let before = bytes.load(Ordering::Relaxed);
    let mut conns = (main, urgent);
    // Post-copy Discard frames sent, in order (see `reconnect`).
    let history: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());
    if postcopy {
        // The guest runs on the destination now, waiting for what this
        // thread sends.
        crate::link::raise_priority();
        loop {
            match run_postcopy(
                guest,
                &conns,
                &bw,
                &mut to_send,
                opts,
                &mut report,
                progress,
                &bytes,
                &history,
            ) {
                Ok(()) => break,
                Err(e) => {
                    tracing::warn!(
                        "post-copy link broke: {e}; reconnecting for up to {:?}",
                        opts.resume_timeout
                    );
                    let (c, need, applied) = reconnect(to, session, &layout, opts.resume_timeout)?;
                    // Discards the destination did not apply went down with
                    // the link: again, in order, before anything else.
                    let mut w = Counted {
                        s: c.0.try_clone().map_err(|e| MigrateError::Connect {
                            to: to.into(),
                            source: e,
                        })?,
                        bytes: bytes.clone(),
                    };
                    let h = history.lock().unwrap_or_else(|e| e.into_inner());
                    for payload in h.iter().skip(applied as usize) {
                        write_frame(&mut w, Kind::Discard, &[payload])
                            .map_err(link("sending discarded pages again"))?;
                    }
                    drop(h);
                    conns = c;
                    to_send = need;
                    report.resumes += 1;
                }
            }
        }
    } else {
        let mut w = Counted {
            s: conns.0.try_clone().map_err(|e| MigrateError::Connect {
                to: to.into(),
                source: e,
            })?,
            bytes: bytes.clone(),
        };
        write_frame(&mut w, Kind::Done, &[]).map_err(link("sending Done"))?;
    }
    guest.stop_tracking();
    report.postcopy.bytes = bytes.load(Ordering::Relaxed) - before;
    // Migrated: the destination has every page (post-copy ends when it
    // closes the urgent connection, having them all).
    report.total_ms = t0.elapsed().as_secs_f64() * 1e3;
    if postcopy {
        report.postcopy.ms = t_post.elapsed().as_secs_f64() * 1e3;
    }
    // The destination's final word (it verifies the guest first).
    let mut r = conns.0.try_clone().map_err(|e| MigrateError::Connect {
        to: to.into(),
        source: e,
    })?;
    let _ = r.set_read_timeout(Some(opts.complete_timeout));
    loop {
        match read_frame(&mut r, &mut buf) {
            Ok(Kind::Complete) => {
                let c: Complete =
                    frame::json(Kind::Complete, &buf).map_err(link("the final report"))?;
                report.verified = c.verified;
                report.destination = Some(c);
                break;
            }
            Ok(Kind::Resumed) => continue,
            Ok(other) => {
                return Err(MigrateError::Link {
                    phase: "waiting for the final report",
                    source: FrameError::Unexpected {
                        want: "Complete",
                        got: other,
                    },
                })
            }
            Err(e) => {
                tracing::warn!("no final report from the destination: {e}");
                break;
            }
        }
    }
    report.bytes_total = bytes.load(Ordering::Relaxed);
    if let Some(rate) = opts.max_bandwidth {
        let busy = (report.precopy.ms + report.stop_copy.ms + report.postcopy.ms) / 1e3;
        if busy > 0.0 {
            report.link_share = Some(report.bytes_total as f64 / (rate as f64 * busy));
        }
    }
    Ok(report)
}

/// Pre-copy rounds; returns what is left to send and whether it converged
/// (fits a stop-and-copy within the downtime limit).
#[allow(clippy::too_many_arguments)]
fn precopy(
    guest: &dyn Guest,
    vcpus: &mut dyn Vcpus,
    w: &mut Counted,
    bw: &Bandwidth,
    opts: &Options,
    report: &mut Report,
    progress: &dyn Fn(&Progress),
    bytes: &AtomicU64,
) -> Result<(Bitmap, bool), MigrateError> {
    let pages = guest.layout().pages();
    let mut to_send = Bitmap::full(pages);
    if opts.switchover == Switchover::Immediate {
        return Ok((to_send, false));
    }
    let t = Instant::now();
    let mut pw = PageWriter::new(guest);
    let mut throttle = 0u32;
    let mut at_max = 0u32;
    loop {
        let round_start = Instant::now();
        let b0 = bytes.load(Ordering::Relaxed);
        let total = to_send.count();
        let mut sent = 0u64;
        let mut p = 0u64;
        while let Some(s) = to_send.next_set(p) {
            let e = to_send.run_end(s, u64::from(MAX_PAGES_PER_FRAME));
            let (d, z) = pw.send(w, s, e - s, bw, false)?;
            report.precopy.pages += d;
            report.precopy.zero_pages += z;
            sent += e - s;
            p = e;
            if sent % 8192 < u64::from(MAX_PAGES_PER_FRAME) {
                let el = t.elapsed().as_secs_f64().max(1e-9);
                progress(&Progress {
                    phase: "pre-copy",
                    pages_sent: sent,
                    pages_remaining: total - sent,
                    bytes_sent: bytes.load(Ordering::Relaxed),
                    rate: bytes.load(Ordering::Relaxed) as f64 / el,
                });
            }
        }
        pw.flush_zeros(w)?;
        let ch = guest.take_changes().map_err(MigrateError::Guest)?;
        to_send = ch.dirty.unwrap_or_else(|| Bitmap::new(pages));
        // Discards go first; a discarded page that is also dirty stays to
        // send: it may have been written after the discard (a balloon
        // deflated), and if not it reads as zero and goes as a Zero range.
        report.precopy.discarded_pages += send_discards(w, &ch.discarded, pages)?;
        report.precopy_rounds += 1;
        let dirty = to_send.count();
        write_json(
            w,
            Kind::RoundEnd,
            &RoundEnd {
                round: report.precopy_rounds,
                pages: sent,
                dirty,
            },
        )
        .map_err(link("ending a pre-copy round"))?;
        let round_bytes = bytes.load(Ordering::Relaxed) - b0;
        let rate = round_bytes as f64 / round_start.elapsed().as_secs_f64().max(1e-9);
        let estimate = Duration::from_secs_f64(dirty as f64 * PAGE as f64 / rate.max(1.0));
        tracing::info!(
            round = report.precopy_rounds,
            sent,
            dirty,
            rate_mib_s = rate / 1048576.0,
            ?estimate,
            throttle,
            "pre-copy round"
        );
        report.precopy.ms = t.elapsed().as_secs_f64() * 1e3;
        report.precopy.bytes = bytes.load(Ordering::Relaxed);
        if estimate <= opts.downtime_limit {
            return Ok((to_send, true));
        }
        if report.precopy_rounds >= opts.precopy_rounds {
            match opts.switchover {
                Switchover::Auto | Switchover::Immediate => return Ok((to_send, false)),
                Switchover::AfterConverge => {
                    if throttle >= MAX_THROTTLE {
                        at_max += 1;
                        if at_max > ROUNDS_AT_MAX_THROTTLE {
                            return Err(MigrateError::NoConvergence {
                                rounds: report.precopy_rounds,
                                dirty_mib: dirty * PAGE / 1048576,
                                estimate,
                                limit: opts.downtime_limit,
                            });
                        }
                    }
                    throttle = if throttle == 0 {
                        50
                    } else {
                        (throttle + 20).min(MAX_THROTTLE)
                    };
                    report.throttle_percent = throttle;
                    vcpus.throttle(throttle);
                }
            }
        }
    }
}

fn stop_and_copy(
    guest: &dyn Guest,
    w: &mut Counted,
    bw: &Bandwidth,
    state: &[u8],
    mut to_send: Bitmap,
    converged: bool,
    report: &mut Report,
) -> Result<Bitmap, MigrateError> {
    let pages = guest.layout().pages();
    let ch = guest.take_changes().map_err(MigrateError::Guest)?;
    if let Some(d) = &ch.dirty {
        to_send.or(d);
    }
    // As in pre-copy: discards first, dirty pages after, whatever they hold.
    report.stop_copy.discarded_pages += send_discards(w, &ch.discarded, pages)?;
    if converged {
        let mut pw = PageWriter::new(guest);
        let mut p = 0;
        while let Some(s) = to_send.next_set(p) {
            let e = to_send.run_end(s, u64::from(MAX_PAGES_PER_FRAME));
            let (d, z) = pw.send(w, s, e - s, bw, false)?;
            report.stop_copy.pages += d;
            report.stop_copy.zero_pages += z;
            p = e;
        }
        pw.flush_zeros(w)?;
        to_send = Bitmap::new(pages);
    }
    write_frame(w, Kind::State, &[state]).map_err(link("sending the vCPU state"))?;
    let flags: u64 = if converged { 0 } else { 1 };
    let bitmap = if converged {
        Bitmap::new(pages)
    } else {
        to_send.clone()
    };
    write_frame(
        w,
        Kind::Switchover,
        &[&flags.to_le_bytes(), &encode_bitmap(&bitmap.words)],
    )
    .map_err(link("sending the switchover"))?;
    w.flush()
        .map_err(|e| link("sending the switchover")(e.into()))?;
    Ok(to_send)
}

/// Post-copy over one pair of connections, until every page is sent (Ok)
/// or the link breaks (Err: reconnect and go on with what the destination
/// still needs).
#[allow(clippy::too_many_arguments)]
fn run_postcopy(
    guest: &dyn Guest,
    conns: &(TcpStream, TcpStream),
    bw: &Arc<Bandwidth>,
    to_send: &mut Bitmap,
    opts: &Options,
    report: &mut Report,
    progress: &dyn Fn(&Progress),
    bytes: &Arc<AtomicU64>,
    history: &Mutex<Vec<Vec<u8>>>,
) -> Result<(), MigrateError> {
    let pages = guest.layout().pages();
    let todo = Mutex::new(std::mem::replace(to_send, Bitmap::new(pages)));
    let cursor = AtomicU64::new(0);
    let broken = AtomicBool::new(false);
    let done = AtomicBool::new(false);
    let main_w = Mutex::new(Counted {
        s: conns
            .0
            .try_clone()
            .map_err(|e| link("post-copy")(e.into()))?,
        bytes: bytes.clone(),
    });
    let mut urgent_w = Counted {
        s: conns
            .1
            .try_clone()
            .map_err(|e| link("post-copy")(e.into()))?,
        bytes: bytes.clone(),
    };
    let mut urgent_r = conns
        .1
        .try_clone()
        .map_err(|e| link("post-copy")(e.into()))?;
    // Reads start only when poll says a frame is there: half a frame that
    // never completes is a dead link, not a wait for ever.
    let _ = urgent_r.set_read_timeout(Some(WRITE_STALL));
    let urgent_pages = AtomicU64::new(0);
    let requests = AtomicU64::new(0);
    let stream_done: Mutex<Option<Instant>> = Mutex::new(None);
    let streamed = AtomicU64::new(0);
    let zero_pages = AtomicU64::new(0);
    let discarded = AtomicU64::new(0);
    let total = todo.lock().unwrap_or_else(|e| e.into_inner()).count();
    let t = Instant::now();
    let cut_at = opts.cut_after_pages.get(report.resumes as usize).copied();
    let result: Result<(), MigrateError> = std::thread::scope(|sc| {
        // Urgent: requests in, their pages out, first.
        let urgent = sc.spawn(|| -> Result<(), MigrateError> {
            crate::link::raise_priority();
            let mut pw = PageWriter::new(guest);
            let mut buf = Vec::new();
            while !done.load(Ordering::Acquire) {
                // Wait for a request a second at a time, to notice a stream
                // that ended (and a destination that never closes) or broke.
                let ready = {
                    let mut fds = [rustix::event::PollFd::new(&urgent_r, rustix::event::PollFlags::IN)];
                    let t = rustix::event::Timespec { tv_sec: 1, tv_nsec: 0 };
                    rustix::event::poll(&mut fds, Some(&t)).unwrap_or(1)
                };
                if ready == 0 {
                    if broken.load(Ordering::Acquire) {
                        return Ok(());
                    }
                    let ended = stream_done.lock().unwrap_or_else(|e| e.into_inner()).is_some_and(|t: Instant| t.elapsed() > AFTER_DONE);
                    if ended {
                        tracing::warn!("the destination did not close the urgent connection {AFTER_DONE:?} after Done");
                        return Ok(());
                    }
                    continue;
                }
                let k = match read_frame(&mut urgent_r, &mut buf) {
                    Ok(k) => k,
                    // The destination closes it once every page arrived.
                    // The destination closes it once every page arrived,
                    // which is after Done; a close before is a broken link.
                    Err(FrameError::Closed)
                        if stream_done.lock().unwrap_or_else(|e| e.into_inner()).is_some() =>
                    {
                        return Ok(())
                    }
                    Err(FrameError::Closed) => {
                        broken.store(true, Ordering::Release);
                        return Err(link("the urgent connection")(FrameError::Closed));
                    }
                    Err(_) if done.load(Ordering::Acquire) => return Ok(()),
                    Err(e) => {
                        broken.store(true, Ordering::Release);
                        return Err(link("the urgent connection")(e));
                    }
                };
                frame::expect(k, Kind::Request).map_err(link("the urgent connection"))?;
                let r = Ranges::decode(k, &buf, pages).map_err(link("the urgent connection"))?;
                requests.fetch_add(1, Ordering::Relaxed);
                for &(first, n) in &r.0 {
                    let end = first + u64::from(n);
                    // Only pages not sent yet: the others are on their way
                    // on the stream, which TCP delivers in order (after a
                    // broken link, the destination's Need has them again).
                    let runs: Vec<(u64, u64)> = {
                        let mut todo = todo.lock().unwrap_or_else(|e| e.into_inner());
                        let mut runs = Vec::new();
                        let mut p = first;
                        while let Some(s) = todo.next_set_below(p, end) {
                            let e = todo.run_end(s, end - s);
                            todo.clear_range(s..e);
                            runs.push((s, e));
                            p = e;
                        }
                        runs
                    };
                    for (s, e) in runs {
                        let mut p = s;
                        while p < e {
                            let k = (e - p).min(u64::from(MAX_PAGES_PER_FRAME));
                            let (d, z) =
                                pw.send(&mut urgent_w, p, k, bw, true).inspect_err(|_| {
                                    broken.store(true, Ordering::Release);
                                })?;
                            urgent_pages.fetch_add(d, Ordering::Relaxed);
                            zero_pages.fetch_add(z, Ordering::Relaxed);
                            p += k;
                        }
                    }
                    // The stream goes on from where the guest faults.
                    cursor.store(end, Ordering::Release);
                }
            }
            Ok(())
        });
        // The stream, and host changes.
        let stream = (|| -> Result<(), MigrateError> {
            let mut pw = PageWriter::new(guest);
            let mut last_look = Instant::now();
            let mut since = 0u64;
            loop {
                if broken.load(Ordering::Acquire) {
                    return Err(MigrateError::Link {
                        phase: "post-copy",
                        source: FrameError::Closed,
                    });
                }
                if last_look.elapsed() >= Duration::from_millis(5) {
                    last_look = Instant::now();
                    // The guest runs on the destination now: only a balloon
                    // changes memory here, and its discards are passed on.
                    let gone = guest.take_discards();
                    if !gone.is_empty() {
                        let mut todo = todo.lock().unwrap_or_else(|e| e.into_inner());
                        for r in &gone {
                            todo.clear_range(r.clone());
                        }
                        drop(todo);
                        let mut w = main_w.lock().unwrap_or_else(|e| e.into_inner());
                        let n = send_postcopy_discards(&mut *w, &gone, pages, history)?;
                        discarded.fetch_add(n, Ordering::Relaxed);
                    }
                }
                let run = {
                    let mut todo = todo.lock().unwrap_or_else(|e| e.into_inner());
                    let c = cursor.load(Ordering::Acquire);
                    let s = todo.next_set(c).or_else(|| todo.next_set(0));
                    s.map(|s| {
                        let e = todo.run_end(s, STREAM_RUN);
                        todo.clear_range(s..e);
                        cursor.store(e, Ordering::Release);
                        (s, e)
                    })
                };
                let Some((s, e)) = run else {
                    break;
                };
                let mut w = main_w.lock().unwrap_or_else(|e| e.into_inner());
                // Zero runs go out with their run: a request for one finds
                // it gone from `todo`, so it must be on the wire already.
                let sent = pw
                    .send(&mut *w, s, e - s, bw, false)
                    .and_then(|v| pw.flush_zeros(&mut *w).map(|()| v));
                drop(w);
                let (d, z) = match sent {
                    Ok(v) => v,
                    Err(err) => {
                        // Those pages were not (wholly) sent: the
                        // destination's Need after a resume has them.
                        broken.store(true, Ordering::Release);
                        return Err(err);
                    }
                };
                streamed.fetch_add(d, Ordering::Relaxed);
                zero_pages.fetch_add(z, Ordering::Relaxed);
                since += e - s;
                if cut_at.is_some_and(|c| since >= c) {
                    tracing::warn!("breaking the link on purpose after {since} pages (test)");
                    let _ = conns.0.shutdown(std::net::Shutdown::Both);
                    let _ = conns.1.shutdown(std::net::Shutdown::Both);
                }
                if since % 8192 < 64 {
                    let left = todo.lock().unwrap_or_else(|e| e.into_inner()).count();
                    let el = t.elapsed().as_secs_f64().max(1e-9);
                    progress(&Progress {
                        phase: "post-copy",
                        pages_sent: total.saturating_sub(left),
                        pages_remaining: left,
                        bytes_sent: bytes.load(Ordering::Relaxed),
                        rate: bytes.load(Ordering::Relaxed) as f64 / el,
                    });
                }
            }
            let mut w = main_w.lock().unwrap_or_else(|e| e.into_inner());
            pw.flush_zeros(&mut *w)?;
            // The last discards, with the stream's lock held: none slips in
            // between them and Done.
            let gone = guest.take_discards();
            if !gone.is_empty() {
                let n = send_postcopy_discards(&mut *w, &gone, pages, history)?;
                discarded.fetch_add(n, Ordering::Relaxed);
            }
            write_frame(&mut *w, Kind::Done, &[]).map_err(link("sending Done"))?;
            w.flush().map_err(|e| link("sending Done")(e.into()))?;
            *stream_done.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
            Ok(())
        })();
        if stream.is_err() {
            let _ = conns.1.shutdown(std::net::Shutdown::Both);
        }
        // The urgent side ends when the destination closes it (it has every
        // page) or the link breaks.
        let u = urgent.join().unwrap_or_else(|_| {
            Err(MigrateError::Guest(
                "the urgent-channel thread panicked".into(),
            ))
        });
        done.store(true, Ordering::Release);
        // Once the stream has sent everything (Done went out), the
        // destination closes the urgent connection as soon as it has every
        // page, possibly while an answer to a request is on its way: that
        // is the end, not a broken link.
        match (stream, u) {
            (Ok(()), Err(e)) => {
                tracing::debug!("the urgent connection ended after Done: {e}");
                Ok(())
            }
            (s, _) => s,
        }
    });
    report.postcopy.pages += streamed.load(Ordering::Relaxed);
    report.postcopy.zero_pages += zero_pages.load(Ordering::Relaxed);
    report.postcopy.discarded_pages += discarded.load(Ordering::Relaxed);
    report.urgent_pages += urgent_pages.load(Ordering::Relaxed);
    report.requests += requests.load(Ordering::Relaxed);
    // What was not sent stays to send (a resume replaces it with Need).
    *to_send = todo.into_inner().unwrap_or_else(|e| e.into_inner());
    result
}

/// The most after-converge throttles the vCPUs, percent (QEMU's maximum).
const MAX_THROTTLE: u32 = 99;
/// Rounds at that throttle before pre-copy gives up.
const ROUNDS_AT_MAX_THROTTLE: u32 = 3;

/// Pages the stream sends at a time (256 KiB): small enough that a
/// request moves it within a fraction of a millisecond, large enough that
/// frames cost little.
const STREAM_RUN: u64 = 64;

/// Opens both connections again as a resume; returns them, the pages the
/// destination still needs and how many post-copy Discard frames it applied.
fn reconnect(
    to: &str,
    session: u64,
    layout: &Layout,
    timeout: Duration,
) -> Result<((TcpStream, TcpStream), Bitmap, u64), MigrateError> {
    let deadline = Instant::now() + timeout;
    let mut last = None;
    while Instant::now() < deadline {
        match resume_once(to, session, layout) {
            Ok(v) => return Ok(v),
            Err(e @ MigrateError::Refused(_)) => return Err(e),
            Err(e) => {
                last = Some(e);
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    if let Some(e) = last {
        tracing::error!("last attempt to resume: {e}");
    }
    Err(MigrateError::ResumeFailed(timeout))
}

fn resume_once(
    to: &str,
    session: u64,
    layout: &Layout,
) -> Result<((TcpStream, TcpStream), Bitmap, u64), MigrateError> {
    let mut main = hello(to, Role::Main, session, true, layout)?;
    let mut buf = Vec::new();
    let _ = main.set_read_timeout(Some(Duration::from_secs(10)));
    let k = read_frame(&mut main, &mut buf).map_err(link("resuming"))?;
    frame::expect(k, Kind::Need).map_err(link("resuming"))?;
    let (applied, need) = frame::decode_need(&buf, layout.pages()).map_err(link("resuming"))?;
    let _ = main.set_read_timeout(None);
    let urgent = hello(to, Role::Urgent, session, true, layout)?;
    Ok((
        (main, urgent),
        Bitmap::from_words(need, layout.pages()),
        applied,
    ))
}
