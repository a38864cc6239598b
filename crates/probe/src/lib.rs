//! Probes of a host's userfaultfd (`pagewire check`): the kernel's
//! features, and a live test of which ways of touching userfaultfd-registered
//! memory reach a handler. A VMM can call [`collect`] to check a host before
//! it relies on lazy restore.
//!
//! For each access path a fresh userfaultfd (not user-mode-only) covers a few
//! pages of anonymous private memory in MISSING mode. A handler thread reads
//! the fault messages and resolves each faulting page with `UFFDIO_COPY` of a
//! known pattern; it never touches the registered memory itself. The access
//! runs in another thread with a timeout, so a path the kernel never delivers
//! shows up as "hung" instead of hanging the check.

use std::fmt;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::Serialize;
use testbed::{bail, chain, Context as _, Mapping};
use tracing::debug;
use uffd::{CopyMode, Event, Features, Ioctls, RegisterMode, Uffd};

pub use testbed::{Error, Result};

/// How long an access may take before it is reported as hung.
const ACCESS_TIMEOUT: Duration = Duration::from_secs(5);
/// Pages registered for each access path.
const PAGES: usize = 4;
/// O_DIRECT needs the buffer, length and offset aligned; 4096 covers every
/// common logical block size.
const DIO_ALIGN: usize = 4096;
/// Seed of the pattern the handler serves.
const UFFD_SEED: usize = 0xa5;
/// Seed of the pattern written to the files read into registered memory.
const FILE_SEED: usize = 0x3c;
/// `USERFAULTFD_IOC_NEW`: `_IO(0xAA, 0x00)`.
const USERFAULTFD_IOC_NEW: libc::c_ulong = 0xaa00;
/// I/O port the KVM guest writes the loaded word to.
const KVM_PORT: u16 = 0x3f8;
/// Guest physical address of the userfaultfd-registered slot.
const KVM_UFFD_GPA: u64 = 0x1_0000;
/// Offset inside the registered slot that the guest loads a word from.
const KVM_LOAD_OFFSET: usize = 0x1234;

// ---------------------------------------------------------------------------
// Report

/// What [`collect`] found. `Serialize` gives the JSON of `pagewire check
/// --json`; [`Human`] the text.
#[derive(Serialize)]
pub struct Report {
    /// Kernel release (`uname -r`).
    kernel: String,
    features: Vec<FlagRow>,
    features_bits: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    features_error: Option<String>,
    ioctls: Vec<FlagRow>,
    ioctls_bits: String,
    /// Ioctls allowed on a range of anonymous memory registered in MISSING mode.
    range_ioctls: Vec<FlagRow>,
    range_ioctls_bits: String,
    open_paths: OpenPaths,
    paths: Vec<PathRow>,
    /// Every required path behaved as expected: lazy restore works here.
    pub all_required_as_expected: bool,
}

#[derive(Serialize)]
struct FlagRow {
    name: String,
    offered: bool,
}

#[derive(Serialize)]
struct OpenPaths {
    /// `open("/dev/userfaultfd")` plus `USERFAULTFD_IOC_NEW` and `UFFDIO_API`.
    dev_userfaultfd: OpenResult,
    /// The `userfaultfd(2)` system call plus `UFFDIO_API`.
    syscall: OpenResult,
    /// `Uffd::open()` (device first, then the system call).
    uffd_open: OpenResult,
}

#[derive(Serialize)]
struct OpenResult {
    works: bool,
    detail: String,
}

impl OpenResult {
    fn from_result(r: Result<String>) -> Self {
        match r {
            Ok(detail) => OpenResult {
                works: true,
                detail,
            },
            Err(e) => OpenResult {
                works: false,
                detail: chain(&e),
            },
        }
    }
}

#[derive(Serialize, Clone, Copy, PartialEq, Eq, Debug)]
#[serde(rename_all = "snake_case")]
enum Outcome {
    /// The access completed and saw the expected bytes.
    Served,
    /// The access failed (with `errno` when there is one).
    Failed,
    /// The access did not finish within the timeout.
    Hung,
    /// The access completed but saw the wrong bytes.
    Mismatch,
    /// The path cannot be tried here (no /dev/kvm).
    Skipped,
    /// The environment does not support the access (O_DIRECT on this
    /// filesystem): says nothing about userfaultfd.
    Unsupported,
    /// Setting up the test failed before the access.
    Error,
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Outcome::Served => "served",
            Outcome::Failed => "failed",
            Outcome::Hung => "hung",
            Outcome::Mismatch => "mismatch",
            Outcome::Skipped => "skipped",
            Outcome::Unsupported => "unsupported",
            Outcome::Error => "error",
        })
    }
}

#[derive(Serialize)]
struct PathRow {
    name: &'static str,
    description: &'static str,
    /// Whether a VMM needs this path to be served.
    required: bool,
    expected: Outcome,
    #[serde(skip_serializing_if = "Option::is_none")]
    expected_errno: Option<String>,
    observed: Outcome,
    errno: Option<String>,
    /// Page-fault messages the handler read.
    faults: u64,
    as_expected: bool,
    elapsed_ms: f64,
    detail: String,
}

/// What a path is expected to do.
#[derive(Clone, Copy)]
enum Expect {
    /// Complete with the right bytes after at least one fault was served.
    Served,
    /// Fail at once with this errno while the handler sees no fault.
    FailsWithoutFault(i32),
}

// ---------------------------------------------------------------------------
// Collection

/// Reports the kernel's userfaultfd features and runs every access path
/// (about a second; a path that hangs costs its timeout, 5 s).
pub fn collect() -> Result<Report> {
    let page = rustix::param::page_size();
    if page != DIO_ALIGN {
        bail!("pagewire check assumes 4 KiB pages; this system uses {page}-byte pages");
    }

    let (features, features_bits, features_error, ioctls, ioctls_bits) =
        match Uffd::available_features() {
            Ok((f, i)) => {
                debug!(features = ?f, ioctls = ?i, "userfaultfd features");
                (
                    feature_rows(f),
                    format!("{:#x}", f.bits()),
                    None,
                    ioctl_rows(i),
                    format!("{:#x}", i.bits()),
                )
            }
            Err(e) => (
                Vec::new(),
                "0x0".to_owned(),
                Some(e.to_string()),
                Vec::new(),
                "0x0".to_owned(),
            ),
        };

    let (range_ioctls, range_ioctls_bits) = match range_ioctls_probe() {
        Ok(i) => (ioctl_rows(i), format!("{:#x}", i.bits())),
        Err(e) => {
            debug!(error = %chain(&e), "range ioctl probe failed");
            (Vec::new(), format!("unknown: {}", chain(&e)))
        }
    };

    let open_paths = OpenPaths {
        dev_userfaultfd: OpenResult::from_result(open_via_device()),
        syscall: OpenResult::from_result(open_via_syscall()),
        uffd_open: OpenResult::from_result(
            Uffd::open()
                .map(|_| "opened".to_owned())
                .context("Uffd::open"),
        ),
    };

    let served = Expect::Served;
    let mut paths = vec![
        run_path(
            "thread",
            "load by a thread of this process",
            true,
            served,
            access_thread,
        ),
        run_path(
            "o_direct",
            "read(2) with O_DIRECT from a file into the registered buffer",
            true,
            served,
            access_o_direct,
        ),
        run_path(
            "process_vm_readv",
            "process_vm_readv(2) of the registered memory",
            true,
            served,
            access_process_vm_readv,
        ),
        run_path(
            "futex",
            "FUTEX_WAIT on a word of a missing registered page",
            true,
            served,
            access_futex,
        ),
        run_path(
            "io_uring",
            "io_uring READ from a file into the registered buffer",
            true,
            served,
            access_io_uring,
        ),
        run_path(
            "proc_self_mem",
            "pread of /proc/self/mem at a missing registered page",
            false,
            Expect::FailsWithoutFault(libc::EIO),
            access_proc_self_mem,
        ),
    ];
    if Path::new("/dev/kvm").exists() {
        paths.push(run_path(
            "kvm",
            "KVM vCPU (real mode) loading from a registered guest slot",
            true,
            served,
            access_kvm,
        ));
    } else {
        paths.push(PathRow {
            name: "kvm",
            description: "KVM vCPU (real mode) loading from a registered guest slot",
            required: false,
            expected: Outcome::Served,
            expected_errno: None,
            observed: Outcome::Skipped,
            errno: None,
            faults: 0,
            as_expected: true,
            elapsed_ms: 0.0,
            detail: "skipped: no /dev/kvm".to_owned(),
        });
    }

    let all_required_as_expected = paths.iter().all(|p| !p.required || p.as_expected);
    Ok(Report {
        kernel: kernel_release(),
        features,
        features_bits,
        features_error,
        ioctls,
        ioctls_bits,
        range_ioctls,
        range_ioctls_bits,
        open_paths,
        paths,
        all_required_as_expected,
    })
}

fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_else(|e| format!("unknown ({e})"))
}

fn feature_rows(offered: Features) -> Vec<FlagRow> {
    flag_rows(offered)
}

fn ioctl_rows(offered: Ioctls) -> Vec<FlagRow> {
    flag_rows(offered)
}

/// One row per named flag, plus one for bits this build has no name for.
fn flag_rows<F: bitflags::Flags<Bits = u64>>(offered: F) -> Vec<FlagRow> {
    let mut rows: Vec<FlagRow> = F::all()
        .iter_names()
        .map(|(name, flag)| FlagRow {
            name: name.to_owned(),
            offered: offered.contains(flag),
        })
        .collect();
    let known = F::all()
        .iter_names()
        .fold(0u64, |acc, (_, f)| acc | f.bits());
    let unknown = offered.bits() & !known;
    if unknown != 0 {
        rows.push(FlagRow {
            name: format!("unknown bits {unknown:#x}"),
            offered: true,
        });
    }
    rows
}

/// The ioctls the kernel allows on one page of anonymous private memory
/// registered in MISSING mode.
fn range_ioctls_probe() -> Result<Ioctls> {
    let uffd = Uffd::open().context("creating a userfaultfd")?;
    uffd.api(Features::empty()).context("UFFDIO_API")?;
    let mem = Mapping::new(DIO_ALIGN)?;
    let ioctls = uffd
        .register(mem.addr(), mem.len(), RegisterMode::MISSING)
        .context("UFFDIO_REGISTER (MISSING)")?;
    drop(uffd);
    Ok(ioctls)
}

/// Checks that a freshly created userfaultfd completes the API handshake.
fn handshake(fd: OwnedFd) -> Result<String> {
    let uffd = Uffd::from_fd(fd);
    let info = uffd
        .api(Features::empty())
        .context("UFFDIO_API on the new userfaultfd")?;
    Ok(format!(
        "opened; UFFDIO_API ok (features {:#x})",
        info.available.bits()
    ))
}

fn open_via_device() -> Result<String> {
    let dev = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/userfaultfd")
        .context("open /dev/userfaultfd")?;
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: USERFAULTFD_IOC_NEW takes its flags as an integer argument and
    // touches no memory of ours.
    let fd = unsafe { libc::ioctl(dev.as_raw_fd(), USERFAULTFD_IOC_NEW, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error())
            .context("ioctl USERFAULTFD_IOC_NEW on /dev/userfaultfd");
    }
    // SAFETY: on success the ioctl returned a new descriptor that nothing
    // else owns.
    handshake(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn open_via_syscall() -> Result<String> {
    let flags = libc::O_CLOEXEC | libc::O_NONBLOCK;
    // SAFETY: userfaultfd(2) takes only flags and touches no memory of ours.
    let fd = unsafe { libc::syscall(libc::SYS_userfaultfd, flags) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error()).context("userfaultfd(2)");
    }
    let fd = i32::try_from(fd).context("userfaultfd(2) returned an out-of-range fd")?;
    // SAFETY: on success the system call returned a new descriptor that
    // nothing else owns.
    handshake(unsafe { OwnedFd::from_raw_fd(fd) })
}

// ---------------------------------------------------------------------------
// Memory, pattern and handler

/// The byte at `offset` of page `page` in the pattern with `seed`: never
/// zero, different from page to page.
fn pattern_byte(seed: usize, page: usize, offset: usize) -> u8 {
    ((offset * 7 + page * 61 + seed) % 251 + 1) as u8
}

/// `len` bytes of the pattern starting at byte `start` of the region.
fn pattern(seed: usize, start: usize, len: usize) -> Vec<u8> {
    (start..start + len)
        .map(|i| pattern_byte(seed, i / DIO_ALIGN, i % DIO_ALIGN))
        .collect()
}

/// A handler thread resolving MISSING faults on one registered mapping.
struct Handler {
    stop: Arc<AtomicBool>,
    faults: Arc<AtomicU64>,
    errors: Arc<Mutex<Vec<String>>>,
    join: JoinHandle<()>,
}

impl Handler {
    fn spawn(uffd: Arc<Uffd>, base: u64, len: usize) -> Result<Handler> {
        let stop = Arc::new(AtomicBool::new(false));
        let faults = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(Mutex::new(Vec::new()));
        let pages: Vec<Vec<u8>> = (0..len / DIO_ALIGN)
            .map(|p| pattern(UFFD_SEED, p * DIO_ALIGN, DIO_ALIGN))
            .collect();
        let (s, f, e) = (stop.clone(), faults.clone(), errors.clone());
        let join = std::thread::Builder::new()
            .name("uffd-handler".to_owned())
            .spawn(move || handler_loop(&uffd, base, &pages, &s, &f, &e))
            .context("spawning the fault handler thread")?;
        Ok(Handler {
            stop,
            faults,
            errors,
            join,
        })
    }

    /// Stops the handler and returns the faults it saw and its errors.
    fn finish(self) -> (u64, Vec<String>) {
        self.stop.store(true, Ordering::Relaxed);
        let mut errors = match self.join.join() {
            Ok(()) => Vec::new(),
            Err(_) => vec!["the handler thread panicked".to_owned()],
        };
        if let Ok(mut e) = self.errors.lock() {
            errors.append(&mut e);
        }
        (self.faults.load(Ordering::Relaxed), errors)
    }
}

fn handler_loop(
    uffd: &Uffd,
    base: u64,
    pages: &[Vec<u8>],
    stop: &AtomicBool,
    faults: &AtomicU64,
    errors: &Mutex<Vec<String>>,
) {
    use rustix::event::{poll, PollFd, PollFlags, Timespec};
    let record = |msg: String| {
        debug!(%msg, "handler error");
        if let Ok(mut e) = errors.lock() {
            e.push(msg);
        }
    };
    let page = DIO_ALIGN as u64;
    let end = base + (pages.len() * DIO_ALIGN) as u64;
    let tick = Timespec {
        tv_sec: 0,
        tv_nsec: 20_000_000,
    };
    let mut events = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        let mut fds = [PollFd::new(uffd, PollFlags::IN)];
        match poll(&mut fds, Some(&tick)) {
            Ok(0) | Err(rustix::io::Errno::INTR) => continue,
            Ok(_) => {}
            Err(e) => {
                record(format!("poll on the userfaultfd: {e}"));
                return;
            }
        }
        events.clear();
        if let Err(e) = uffd.read_events(&mut events, 64) {
            record(format!("reading userfaultfd messages: {e}"));
            return;
        }
        for event in &events {
            let Event::PageFault {
                address,
                flags,
                thread_id,
            } = event
            else {
                debug!(?event, "ignoring non-fault event");
                continue;
            };
            faults.fetch_add(1, Ordering::Relaxed);
            debug!(
                address = format_args!("{address:#x}"),
                ?flags,
                ?thread_id,
                "fault"
            );
            let at = address & !(page - 1);
            if at < base || at >= end {
                record(format!(
                    "fault at {address:#x} outside the registered range"
                ));
                continue;
            }
            let src = &pages[((at - base) / page) as usize];
            match uffd.copy(at, src, CopyMode::empty()) {
                Ok(_) => {}
                // Another message for a page already served: wake the waiter.
                Err(uffd::Error::Exists { .. }) => {
                    if let Err(e) = uffd.wake(at, DIO_ALIGN) {
                        record(format!("UFFDIO_WAKE at {at:#x}: {e}"));
                    }
                }
                Err(e) => record(format!("UFFDIO_COPY at {at:#x}: {e}")),
            }
        }
    }
}

/// A registered mapping with its handler running.
struct Fixture {
    uffd: Arc<Uffd>,
    mem: Arc<Mapping>,
    handler: Handler,
}

impl Fixture {
    fn new(pages: usize) -> Result<Fixture> {
        let uffd = Uffd::open().context("creating a userfaultfd")?;
        uffd.api(Features::empty()).context("UFFDIO_API")?;
        let mem = Mapping::new(pages * DIO_ALIGN)?;
        uffd.register(mem.addr(), mem.len(), RegisterMode::MISSING)
            .context("UFFDIO_REGISTER (MISSING)")?;
        debug!(
            base = format_args!("{:#x}", mem.addr()),
            len = mem.len(),
            "registered"
        );
        let uffd = Arc::new(uffd);
        let handler = Handler::spawn(uffd.clone(), mem.addr(), mem.len())?;
        Ok(Fixture {
            uffd,
            mem: Arc::new(mem),
            handler,
        })
    }

    /// Stops the handler and closes the userfaultfd (which also releases any
    /// thread still waiting on a fault). The mapping lives on as long as an
    /// access thread holds it.
    fn finish(self) -> (u64, Vec<String>) {
        let result = self.handler.finish();
        drop(self.uffd);
        drop(self.mem);
        result
    }
}

// ---------------------------------------------------------------------------
// Running one path

/// What an access reported.
enum Access {
    /// The access completed; `ok` says whether it saw the expected bytes.
    Data { ok: bool, detail: String },
    /// The access failed.
    Failed { errno: Option<i32>, detail: String },
    /// The environment cannot do this access (not a userfaultfd matter).
    Unsupported(String),
    /// Preparing the access failed.
    Setup(String),
}

impl Access {
    fn compare(observed: &[u8], expected: &[u8], what: &str) -> Access {
        match observed.iter().zip(expected).position(|(a, b)| a != b) {
            None if observed.len() == expected.len() => Access::Data {
                ok: true,
                detail: format!("{} bytes {what}", observed.len()),
            },
            None => Access::Data {
                ok: false,
                detail: format!("{} bytes seen, {} expected", observed.len(), expected.len()),
            },
            Some(i) => Access::Data {
                ok: false,
                detail: format!(
                    "byte {i} is {:#04x}, expected {:#04x} ({what})",
                    observed[i], expected[i]
                ),
            },
        }
    }

    fn errno(errno: Option<i32>, detail: impl Into<String>) -> Access {
        Access::Failed {
            errno,
            detail: detail.into(),
        }
    }

    fn io(e: &std::io::Error, what: &str) -> Access {
        Access::errno(e.raw_os_error(), format!("{what}: {e}"))
    }
}

fn run_path(
    name: &'static str,
    description: &'static str,
    required: bool,
    expect: Expect,
    access: fn(&Mapping) -> Access,
) -> PathRow {
    debug!(path = name, "running access path");
    let mut row = PathRow {
        name,
        description,
        required,
        expected: match expect {
            Expect::Served => Outcome::Served,
            Expect::FailsWithoutFault(_) => Outcome::Failed,
        },
        expected_errno: match expect {
            Expect::Served => None,
            Expect::FailsWithoutFault(e) => Some(errno_name(e)),
        },
        observed: Outcome::Error,
        errno: None,
        faults: 0,
        as_expected: false,
        elapsed_ms: 0.0,
        detail: String::new(),
    };
    let fixture = match Fixture::new(PAGES) {
        Ok(f) => f,
        Err(e) => {
            row.detail = format!("setup: {e:#}");
            return row;
        }
    };
    let mem = fixture.mem.clone();
    let start = Instant::now();
    let result = with_timeout(name, ACCESS_TIMEOUT, move || access(&mem));
    row.elapsed_ms = start.elapsed().as_secs_f64() * 1e3;
    let (faults, errors) = fixture.finish();
    row.faults = faults;

    let (observed, errno, mut detail) = match result {
        Err(e) => (Outcome::Error, None, format!("{e:#}")),
        Ok(None) => (
            Outcome::Hung,
            None,
            format!("no result after {} s", ACCESS_TIMEOUT.as_secs()),
        ),
        Ok(Some(Access::Data { ok: true, detail })) => (Outcome::Served, None, detail),
        Ok(Some(Access::Data { ok: false, detail })) => (Outcome::Mismatch, None, detail),
        Ok(Some(Access::Failed { errno, detail })) => (Outcome::Failed, errno, detail),
        Ok(Some(Access::Unsupported(detail))) => (Outcome::Unsupported, None, detail),
        Ok(Some(Access::Setup(detail))) => (Outcome::Error, None, format!("setup: {detail}")),
    };
    if !errors.is_empty() {
        detail = format!("{detail}; handler: {}", errors.join("; "));
    }
    row.as_expected = match (expect, observed) {
        (Expect::Served, Outcome::Served) => faults > 0 && errors.is_empty(),
        (Expect::FailsWithoutFault(want), Outcome::Failed) => errno == Some(want) && faults == 0,
        // Not a userfaultfd matter: the environment cannot do this access.
        (_, Outcome::Unsupported) => true,
        _ => false,
    };
    if observed == Outcome::Served && faults == 0 {
        detail = format!("{detail}; but the handler saw no fault");
    }
    row.observed = observed;
    row.errno = errno.map(errno_name);
    row.detail = detail;
    debug!(path = name, observed = %row.observed, faults, as_expected = row.as_expected, "path done");
    row
}

/// Runs `f` in a new thread; `None` when it does not finish within `timeout`
/// (the thread is then left behind, detached).
fn with_timeout<T: Send + 'static>(
    name: &str,
    timeout: Duration,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<Option<T>> {
    let (tx, rx) = mpsc::sync_channel(1);
    std::thread::Builder::new()
        .name(format!("access-{name}"))
        .spawn(move || {
            // The receiver is gone when the access was declared hung.
            let _ = tx.send(f());
        })
        .context("spawning the access thread")?;
    match rx.recv_timeout(timeout) {
        Ok(v) => Ok(Some(v)),
        Err(mpsc::RecvTimeoutError::Timeout) => Ok(None),
        Err(mpsc::RecvTimeoutError::Disconnected) => bail!("the access thread panicked"),
    }
}

// ---------------------------------------------------------------------------
// The access paths

fn access_thread(mem: &Mapping) -> Access {
    let mut buf = vec![0u8; mem.len()];
    mem.read(0, &mut buf);
    Access::compare(
        &buf,
        &pattern(UFFD_SEED, 0, mem.len()),
        "loaded match the served pattern",
    )
}

/// A file removed on drop.
struct ScratchFile {
    path: PathBuf,
}

impl ScratchFile {
    fn create(dir: &Path, tag: &str, content: &[u8]) -> std::io::Result<ScratchFile> {
        let path = dir.join(format!("pagewire-check-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_file(&path);
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)?;
        let scratch = ScratchFile { path };
        f.write_all(content)?;
        f.sync_all()?;
        Ok(scratch)
    }
}

impl ScratchFile {
    /// Creates the file in the temporary directory, or in /dev/shm when that
    /// fails.
    fn create_anywhere(tag: &str, content: &[u8]) -> Result<ScratchFile, String> {
        let mut errors = Vec::new();
        for dir in scratch_dirs() {
            match ScratchFile::create(&dir, tag, content) {
                Ok(s) => return Ok(s),
                Err(e) => errors.push(format!("creating a file in {}: {e}", dir.display())),
            }
        }
        Err(errors.join("; "))
    }
}

/// Where scratch files go: the temporary directory, then /dev/shm.
fn scratch_dirs() -> [PathBuf; 2] {
    [std::env::temp_dir(), PathBuf::from("/dev/shm")]
}

impl Drop for ScratchFile {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_file(&self.path) {
            debug!(path = %self.path.display(), error = %e, "removing scratch file");
        }
    }
}

/// `pread(2)` into the mapping at `offset`.
fn pread_into(file: &File, mem: &Mapping, offset: usize, len: usize) -> std::io::Result<usize> {
    assert!(offset <= mem.len() && len <= mem.len() - offset);
    // SAFETY: the kernel writes at most `len` bytes inside the mapping, which
    // `mem` keeps alive for the whole call; no Rust reference points into it.
    let n = unsafe { libc::pread(file.as_raw_fd(), mem.ptr().add(offset).cast(), len, 0) };
    if n < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

fn access_o_direct(mem: &Mapping) -> Access {
    let len = 2 * DIO_ALIGN;
    let content = pattern(FILE_SEED, 0, len);
    let mut unsupported = Vec::new();
    for dir in scratch_dirs() {
        let scratch = match ScratchFile::create(&dir, "odirect", &content) {
            Ok(s) => s,
            Err(e) => {
                unsupported.push(format!("{}: cannot create a file: {e}", dir.display()));
                continue;
            }
        };
        let file = match OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_DIRECT)
            .open(&scratch.path)
        {
            Ok(f) => f,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                unsupported.push(format!("{}: open with O_DIRECT: EINVAL", dir.display()));
                continue;
            }
            Err(e) => return Access::io(&e, "open with O_DIRECT"),
        };
        match pread_into(&file, mem, 0, len) {
            Ok(n) if n == len => {}
            Ok(n) => {
                return Access::Data {
                    ok: false,
                    detail: format!("short O_DIRECT read: {n} of {len} bytes"),
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => {
                unsupported.push(format!("{}: O_DIRECT read: EINVAL", dir.display()));
                continue;
            }
            Err(e) => return Access::io(&e, "O_DIRECT read"),
        }
        let mut buf = vec![0u8; len];
        mem.read(0, &mut buf);
        let what = format!("read from {} match the file", dir.display());
        return Access::compare(&buf, &content, &what);
    }
    Access::Unsupported(format!(
        "unsupported by filesystem: {}",
        unsupported.join("; ")
    ))
}

fn access_process_vm_readv(mem: &Mapping) -> Access {
    let mut buf = vec![0u8; mem.len()];
    let local = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let remote = libc::iovec {
        iov_base: mem.ptr().cast(),
        iov_len: mem.len(),
    };
    let pid = std::process::id() as libc::pid_t;
    // SAFETY: the kernel writes at most `buf.len()` bytes into `buf`, which
    // this function owns; the remote range is only read, through the
    // kernel's own checks, and lies in the live mapping.
    let n = unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) };
    if n < 0 {
        return Access::io(&std::io::Error::last_os_error(), "process_vm_readv");
    }
    let n = n as usize;
    Access::compare(
        &buf[..n],
        &pattern(UFFD_SEED, 0, mem.len()),
        "read match the served pattern",
    )
}

/// `FUTEX_WAIT` (private) on the word at `addr`: `Ok(())` when woken,
/// otherwise the errno (EAGAIN: the word differs from `val`; ETIMEDOUT).
fn futex_wait(addr: u64, val: u32, timeout: Duration) -> Result<(), i32> {
    let ts = libc::timespec {
        tv_sec: timeout.as_secs() as libc::time_t,
        tv_nsec: timeout.subsec_nanos() as libc::c_long,
    };
    // SAFETY: FUTEX_WAIT only reads the aligned u32 at `addr` (the kernel
    // checks the address) and the timespec, which lives across the call.
    let r = unsafe {
        libc::syscall(
            libc::SYS_futex,
            addr as usize as *const u32,
            libc::FUTEX_WAIT | libc::FUTEX_PRIVATE_FLAG,
            val,
            &ts as *const libc::timespec,
            0usize,
            0u32,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error()
            .raw_os_error()
            .unwrap_or(libc::EINVAL))
    }
}

fn access_futex(mem: &Mapping) -> Access {
    let offset = DIO_ALIGN + 64;
    let word = pattern(UFFD_SEED, offset, 4);
    let pattern_word = u32::from_ne_bytes([word[0], word[1], word[2], word[3]]);
    let addr = mem.addr() + offset as u64;
    match futex_wait(addr, !pattern_word, Duration::from_secs(1)) {
        Err(libc::EAGAIN) => {}
        Ok(()) => return Access::errno(None, "FUTEX_WAIT returned 0 (woken) instead of EAGAIN"),
        Err(e) => return Access::errno(Some(e), "FUTEX_WAIT on the missing page"),
    }
    // Confirm that the kernel read the served pattern: waiting for the
    // pattern's own value must block until the (short) timeout.
    match futex_wait(addr, pattern_word, Duration::from_millis(10)) {
        Err(libc::ETIMEDOUT) => Access::Data {
            ok: true,
            detail: "EAGAIN; then waiting on the pattern's value timed out (word matches)"
                .to_owned(),
        },
        Err(libc::EAGAIN) => Access::Data {
            ok: false,
            detail: "EAGAIN, but the futex word differs from the served pattern".to_owned(),
        },
        Ok(()) => Access::Data {
            ok: false,
            detail: "EAGAIN; the confirming wait was woken unexpectedly".to_owned(),
        },
        Err(e) => Access::errno(Some(e), "confirming FUTEX_WAIT"),
    }
}

fn access_io_uring(mem: &Mapping) -> Access {
    use io_uring::{opcode, types, IoUring};
    let len = 2 * DIO_ALIGN;
    let content = pattern(FILE_SEED, 0, len);
    let scratch = match ScratchFile::create_anywhere("io-uring", &content) {
        Ok(s) => s,
        Err(e) => return Access::Setup(e),
    };
    let file = match File::open(&scratch.path) {
        Ok(f) => f,
        Err(e) => return Access::Setup(format!("opening {}: {e}", scratch.path.display())),
    };
    let mut ring = match IoUring::new(4) {
        Ok(r) => r,
        Err(e) => return Access::io(&e, "io_uring_setup"),
    };
    let sqe = opcode::Read::new(types::Fd(file.as_raw_fd()), mem.ptr(), len as u32)
        .offset(0)
        .build()
        .user_data(1);
    // SAFETY: the read targets `len` bytes of the mapping, which `mem` keeps
    // alive, and `file`, which stays open; this function waits for the
    // completion below before either is released.
    if unsafe { ring.submission().push(&sqe) }.is_err() {
        return Access::Setup("the submission queue is full".to_owned());
    }
    loop {
        match ring.submit_and_wait(1) {
            Ok(_) => break,
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => continue,
            Err(e) => {
                // The read may still be in flight: never unmap its buffer.
                std::mem::forget(ring);
                return Access::io(&e, "io_uring_enter");
            }
        }
    }
    let Some(cqe) = ring.completion().next() else {
        return Access::Setup("io_uring_enter returned without a completion".to_owned());
    };
    let res = cqe.result();
    if res < 0 {
        return Access::errno(Some(-res), "io_uring READ");
    }
    if res as usize != len {
        return Access::Data {
            ok: false,
            detail: format!("short io_uring read: {res} of {len} bytes"),
        };
    }
    let mut buf = vec![0u8; len];
    mem.read(0, &mut buf);
    Access::compare(&buf, &content, "read match the file")
}

fn access_proc_self_mem(mem: &Mapping) -> Access {
    let file = match File::open("/proc/self/mem") {
        Ok(f) => f,
        Err(e) => return Access::Setup(format!("opening /proc/self/mem: {e}")),
    };
    let offset = 2 * DIO_ALIGN;
    let mut buf = vec![0u8; DIO_ALIGN];
    match file.read_at(&mut buf, mem.addr() + offset as u64) {
        Ok(n) => Access::compare(
            &buf[..n],
            &pattern(UFFD_SEED, offset, DIO_ALIGN),
            "read match the served pattern",
        ),
        Err(e) => Access::io(&e, "pread /proc/self/mem"),
    }
}

/// Real-mode guest code, loaded at guest physical 0x1000:
/// load a word from the registered slot, write it to port 0x3f8, halt.
fn kvm_guest_code() -> Vec<u8> {
    let seg = (KVM_UFFD_GPA >> 4) as u16;
    let off = KVM_LOAD_OFFSET as u16;
    let port = KVM_PORT;
    let mut code = Vec::new();
    code.push(0xb8); // mov ax, seg
    code.extend_from_slice(&seg.to_le_bytes());
    code.extend_from_slice(&[0x8e, 0xd8]); // mov ds, ax
    code.push(0xa1); // mov ax, [off]
    code.extend_from_slice(&off.to_le_bytes());
    code.push(0xba); // mov dx, port
    code.extend_from_slice(&port.to_le_bytes());
    code.push(0xef); // out dx, ax
    code.push(0xf4); // hlt
    code
}

fn access_kvm(mem: &Mapping) -> Access {
    use kvm_bindings::kvm_userspace_memory_region;
    use kvm_ioctls::{Kvm, VcpuExit};

    let kvm_err = |e: kvm_ioctls::Error, what: &str| Access::errno(Some(e.errno()), what);
    let kvm = match Kvm::new() {
        Ok(k) => k,
        Err(e) => return kvm_err(e, "opening /dev/kvm"),
    };
    // Declared before the VM so that it is unmapped only after the VM is gone.
    let low = match Mapping::new(0x2000) {
        Ok(m) => m,
        Err(e) => return Access::Setup(format!("{e:#}")),
    };
    low.write(0x1000, &kvm_guest_code());
    let vm = match kvm.create_vm() {
        Ok(v) => v,
        Err(e) => return kvm_err(e, "KVM_CREATE_VM"),
    };
    let slots = [
        kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: low.len() as u64,
            userspace_addr: low.addr(),
        },
        kvm_userspace_memory_region {
            slot: 1,
            flags: 0,
            guest_phys_addr: KVM_UFFD_GPA,
            memory_size: mem.len() as u64,
            userspace_addr: mem.addr(),
        },
    ];
    for slot in slots {
        // SAFETY: both mappings are page-aligned, as long as the slots say,
        // and outlive the VM (`low` is declared before `vm`; `mem` is
        // borrowed for this whole function).
        if let Err(e) = unsafe { vm.set_user_memory_region(slot) } {
            return kvm_err(e, "KVM_SET_USER_MEMORY_REGION");
        }
    }
    let mut vcpu = match vm.create_vcpu(0) {
        Ok(v) => v,
        Err(e) => return kvm_err(e, "KVM_CREATE_VCPU"),
    };
    let mut sregs = match vcpu.get_sregs() {
        Ok(s) => s,
        Err(e) => return kvm_err(e, "KVM_GET_SREGS"),
    };
    sregs.cs.base = 0;
    sregs.cs.selector = 0;
    if let Err(e) = vcpu.set_sregs(&sregs) {
        return kvm_err(e, "KVM_SET_SREGS");
    }
    let mut regs = match vcpu.get_regs() {
        Ok(r) => r,
        Err(e) => return kvm_err(e, "KVM_GET_REGS"),
    };
    regs.rip = 0x1000;
    regs.rflags = 2;
    if let Err(e) = vcpu.set_regs(&regs) {
        return kvm_err(e, "KVM_SET_REGS");
    }

    let mut seen: Option<Vec<u8>> = None;
    for _ in 0..64 {
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == KVM_PORT => {
                debug!(?data, "guest wrote to the port");
                seen = Some(data.to_vec());
            }
            Ok(VcpuExit::Hlt) => {
                let Some(seen) = seen else {
                    return Access::errno(None, "the guest halted without writing to the port");
                };
                let expected = pattern(UFFD_SEED, KVM_LOAD_OFFSET, 2);
                return Access::compare(&seen, &expected, "the guest loaded match the pattern");
            }
            Ok(exit) => {
                return Access::errno(None, format!("unexpected vCPU exit {exit:?}"));
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => continue,
            Err(e) => return kvm_err(e, "KVM_RUN"),
        }
    }
    Access::errno(None, "the guest did not halt after 64 exits")
}

// ---------------------------------------------------------------------------
// Output

fn errno_name(errno: i32) -> String {
    let name = match errno {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::ESRCH => "ESRCH",
        libc::EINTR => "EINTR",
        libc::EIO => "EIO",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::ENOMEM => "ENOMEM",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::EBUSY => "EBUSY",
        libc::EEXIST => "EEXIST",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::ENOSPC => "ENOSPC",
        libc::ENOSYS => "ENOSYS",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ENOTTY => "ENOTTY",
        other => return format!("errno {other}"),
    };
    name.to_owned()
}

/// The report as text.
pub struct Human<'a>(pub &'a Report);

fn yes_no(b: bool) -> &'static str {
    if b {
        "yes"
    } else {
        "no"
    }
}

/// Writes `rows` as columns padded to the widest cell (the last column is
/// not padded).
fn table(f: &mut fmt::Formatter<'_>, rows: &[Vec<String>], indent: &str) -> fmt::Result {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|s| s.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for row in rows {
        let mut line = indent.to_owned();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 == row.len() {
                line.push_str(cell);
            } else {
                line.push_str(&format!("{cell:<w$}  ", w = widths[c]));
            }
        }
        writeln!(f, "{}", line.trim_end())?;
    }
    Ok(())
}

impl fmt::Display for Human<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        writeln!(f, "kernel {}", r.kernel)?;
        writeln!(f)?;
        writeln!(f, "userfaultfd features offered ({}):", r.features_bits)?;
        if let Some(e) = &r.features_error {
            writeln!(f, "  cannot probe: {e}")?;
        }
        let rows: Vec<Vec<String>> = r
            .features
            .iter()
            .map(|x| vec![x.name.clone(), yes_no(x.offered).to_owned()])
            .collect();
        table(f, &rows, "  ")?;
        writeln!(f)?;
        writeln!(f, "ioctls allowed on the fd ({}):", r.ioctls_bits)?;
        let rows: Vec<Vec<String>> = r
            .ioctls
            .iter()
            .map(|x| vec![x.name.clone(), yes_no(x.offered).to_owned()])
            .collect();
        table(f, &rows, "  ")?;
        writeln!(f)?;
        writeln!(
            f,
            "ioctls allowed on anonymous memory registered MISSING ({}):",
            r.range_ioctls_bits
        )?;
        let rows: Vec<Vec<String>> = r
            .range_ioctls
            .iter()
            .map(|x| vec![x.name.clone(), yes_no(x.offered).to_owned()])
            .collect();
        table(f, &rows, "  ")?;
        writeln!(f)?;
        writeln!(f, "ways to create a userfaultfd:")?;
        let o = &r.open_paths;
        let rows: Vec<Vec<String>> = [
            ("/dev/userfaultfd (USERFAULTFD_IOC_NEW)", &o.dev_userfaultfd),
            ("userfaultfd(2) system call", &o.syscall),
            ("Uffd::open()", &o.uffd_open),
        ]
        .iter()
        .map(|(name, res)| {
            vec![
                (*name).to_owned(),
                if res.works { "works" } else { "FAILS" }.to_owned(),
                res.detail.clone(),
            ]
        })
        .collect();
        table(f, &rows, "  ")?;
        writeln!(f)?;
        writeln!(
            f,
            "access paths to missing pages (MISSING mode, {PAGES} pages, handler copies a pattern, \
             {} s timeout):",
            ACCESS_TIMEOUT.as_secs()
        )?;
        let mut rows = vec![[
            "PATH",
            "REQUIRED",
            "EXPECTED",
            "OBSERVED",
            "FAULTS",
            "AS EXPECTED",
            "TIME",
            "DETAIL",
        ]
        .map(str::to_owned)
        .to_vec()];
        for p in &r.paths {
            let with_errno = |o: Outcome, e: &Option<String>| match e {
                Some(e) => format!("{o} {e}"),
                None => o.to_string(),
            };
            let expected = match p.expected {
                Outcome::Failed => {
                    format!("{}, no fault", with_errno(p.expected, &p.expected_errno))
                }
                o => o.to_string(),
            };
            rows.push(vec![
                p.name.to_owned(),
                yes_no(p.required).to_owned(),
                expected,
                with_errno(p.observed, &p.errno),
                p.faults.to_string(),
                yes_no(p.as_expected).to_owned(),
                format!("{:.1} ms", p.elapsed_ms),
                p.detail.clone(),
            ]);
        }
        table(f, &rows, "  ")?;
        writeln!(f)?;
        writeln!(
            f,
            "{}",
            if r.all_required_as_expected {
                "every required path behaves as expected"
            } else {
                "SOME REQUIRED PATHS DO NOT BEHAVE AS EXPECTED"
            }
        )
    }
}
