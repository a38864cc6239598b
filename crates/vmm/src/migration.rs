//! Live migration of this VMM's VMs (`pagewire vm migrate|receive`): the
//! glue between a [`Vm`] and the `migrate` crate's protocol.
//!
//! The source tracks what the guest dirties with KVM's dirty log (vCPU
//! writes; measured here: see docs/vmm.md) and the memory's host log (the
//! VMM's own writes and balloon discards). The destination writes pre-copy
//! pages straight into guest memory, then serves the rest with the
//! embedded pager over a [`migrate::dest::NetSource`].

use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use migrate::bits::Bitmap;
use migrate::dest::{NetSource, Ram, Status};
use migrate::source::{Changes, Guest, Progress, Vcpus};
use migrate::{Complete, Layout};

use crate::error::Error;
use crate::memory::{Backing, GuestMemory, PAGE};
use crate::restore::{serve_embedded, EmbeddedOptions};
use crate::state::VmState;
use crate::vm::{DirtyLogger, Vm, VmConfig};

/// A lock the balloon takes around each of its steps and the switchover
/// takes around stopping the vCPUs, so that a step is never half done when
/// the guest's state is taken (tests use it; see [`Balloon`]).
pub type SwitchLock = Arc<Mutex<()>>;

fn layout_of(mem: &GuestMemory, vcpus: u32) -> Layout {
    Layout {
        mem_bytes: mem.len(),
        vcpus,
        backing: mem.backing().name().into(),
        page_size: mem.backing().page_size(),
    }
}

struct SourceGuest {
    log: DirtyLogger,
    vcpus: u32,
}

impl Guest for SourceGuest {
    fn layout(&self) -> Layout {
        layout_of(self.log.memory(), self.vcpus)
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), String> {
        self.log
            .memory()
            .read(offset, buf)
            .map_err(|e| e.to_string())
    }

    fn start_tracking(&self) -> Result<(), String> {
        self.log.start().map_err(|e| e.to_string())
    }

    fn stop_tracking(&self) {
        if let Err(e) = self.log.stop() {
            tracing::warn!("stopping dirty logging: {e}");
        }
    }

    fn take_discards(&self) -> Vec<std::ops::Range<u64>> {
        self.log
            .memory()
            .take_log()
            .discarded
            .iter()
            .map(|(gpa, len)| gpa / PAGE..(gpa + len) / PAGE)
            .collect()
    }

    fn take_changes(&self) -> Result<Changes, String> {
        let pages = self.log.memory().len() / PAGE;
        // The host log first: a balloon step after it shows up next time.
        let host = self.log.memory().take_log();
        let words = self.log.take_dirty_log().map_err(|e| e.to_string())?;
        let mut dirty = Bitmap::from_words(words, pages);
        for (gpa, len) in &host.written {
            dirty.set_range(gpa / PAGE..(gpa + len).div_ceil(PAGE));
        }
        Ok(Changes {
            dirty: Some(dirty),
            discarded: host
                .discarded
                .iter()
                .map(|(gpa, len)| gpa / PAGE..(gpa + len) / PAGE)
                .collect(),
        })
    }
}

struct SourceVcpus<'a> {
    vm: &'a mut Vm,
    lock: Option<&'a Mutex<()>>,
    /// Held from stopping the vCPUs until the switchover is sent, so that
    /// no balloon step is half done in the state and pages it carries.
    held: Option<std::sync::MutexGuard<'a, ()>>,
}

impl Vcpus for SourceVcpus<'_> {
    fn pause(&mut self) -> Result<Vec<u8>, String> {
        self.held = self
            .lock
            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
        self.vm
            .pause(Duration::from_secs(10))
            .map_err(|e| e.to_string())?;
        let state = self.vm.state().map_err(|e| e.to_string())?;
        serde_json::to_vec(&state).map_err(|e| e.to_string())
    }

    fn switched(&mut self) {
        self.held = None;
    }

    fn resume(&mut self) -> Result<(), String> {
        self.held = None;
        self.vm.resume();
        Ok(())
    }

    fn throttle(&mut self, percent: u32) {
        self.vm.set_throttle(percent);
    }
}

/// Migrates a running VM to `to`. On success the guest is the
/// destination's (this VM stays paused); on an error before the switchover
/// it runs on here.
pub fn migrate_out(
    vm: &mut Vm,
    to: &str,
    opts: &migrate::Options,
    lock: Option<&SwitchLock>,
    progress: &dyn Fn(&Progress),
) -> Result<migrate::Report, Error> {
    if vm.memory().backing() == Backing::Hugetlb {
        return Err(Error::Config(
            "hugetlb guests cannot migrate yet (the protocol moves 4 KiB pages)".into(),
        ));
    }
    let guest = SourceGuest {
        log: vm.dirty_logger(),
        vcpus: vm.config().vcpus,
    };
    let mut vcpus = SourceVcpus {
        vm,
        lock: lock.map(|l| &**l),
        held: None,
    };
    let r = migrate::migrate(&guest, &mut vcpus, to, opts, progress);
    guest.stop_tracking();
    r.map_err(|e| Error::Migration(e.to_string()))
}

struct MemRam(Arc<GuestMemory>);

impl Ram for MemRam {
    fn write(&self, offset: u64, data: &[u8]) -> Result<(), String> {
        self.0.write(offset, data).map_err(|e| e.to_string())
    }

    fn discard(&self, offset: u64, len: u64) -> Result<(), String> {
        self.0.discard(offset, len).map_err(|e| e.to_string())
    }
}

/// Pages the pager maps per background step in post-copy (256 KiB, one
/// stream frame). The default (8 pages, tuned for a local file competing
/// with faults) left post-copy's pages in staging longer and cost a step
/// per 32 KiB.
const BACKGROUND_CHUNK: usize = 64;

/// How the destination runs.
#[derive(Debug, Clone)]
pub struct ReceiveOptions {
    /// The VM's shape, if the destination was told (it must match).
    pub expect: Option<Layout>,
    /// How long to wait for a source.
    pub accept_timeout: Duration,
    /// How long faults wait for a source whose link broke.
    pub resume_timeout: Duration,
    /// Verified passes the guest runs after every page arrived.
    pub verify_passes: u64,
    /// Serving threads of the pager.
    pub threads: usize,
    /// Give up on the guest after this long.
    pub timeout: Duration,
}

impl Default for ReceiveOptions {
    fn default() -> Self {
        ReceiveOptions {
            expect: None,
            accept_timeout: Duration::from_secs(300),
            resume_timeout: Duration::from_secs(30),
            verify_passes: 2,
            threads: 2,
            timeout: Duration::from_secs(300),
        }
    }
}

/// What the destination saw.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ReceiveReport {
    pub mode: &'static str,
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub precopy: migrate::dest::PrecopyStats,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub postcopy: Option<migrate::dest::PostcopyStats>,
    /// From reading the switchover to the vCPUs running here.
    pub restore_ms: f64,
    /// From the vCPUs running here to every page having arrived.
    pub postcopy_ms: f64,
    /// Time vCPUs were blocked (see `vcpu_blocktime`), in all and per vCPU.
    pub blocktime_ms: f64,
    pub blocktime_per_vcpu_ms: Vec<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pager: Option<PagerCounts>,
    /// The part of `blocktime_ms` before every page had arrived.
    pub blocktime_until_arrival_ms: f64,
    /// The pager's own sum of fault waits (it misses some; see
    /// `vcpu_blocktime`).
    pub pager_blocktime_ms: f64,
    /// The last pass the guest reported, and whether every pass here
    /// verified.
    pub passes: u64,
    pub verified: bool,
}

/// What the destination's pager did in post-copy.
#[derive(Debug, Clone, serde::Serialize)]
pub struct PagerCounts {
    pub faults: u64,
    pub faults_already_served: u64,
    /// Faults that waited for pages still on the wire.
    pub source_waits: u64,
    pub pages_on_demand: u64,
    pub pages_fault_around: u64,
    pub pages_readahead: u64,
    /// Pages mapped as they arrived, without a fault.
    pub pages_background: u64,
    pub pages_zeroed: u64,
    pub pages_discarded: u64,
}

/// The destination's VM once migration is over, still running (parked).
pub struct Received {
    pub vm: Vm,
    pub report: ReceiveReport,
    pager: Option<(pager::Engine, pager::SessionHandle)>,
}

impl Received {
    pub fn stop(mut self) -> Result<(), Error> {
        let r = self.vm.stop(Duration::from_secs(5));
        if let Some((engine, _)) = self.pager.take() {
            engine.shutdown();
        }
        r
    }
}

/// Receives a VM on `listener`, runs it here, and returns once the
/// migration is over and the guest has verified `verify_passes` passes with
/// every page here. `on_ready(memory)` is called once guest memory exists
/// (a balloon may start then).
pub fn receive(
    listener: TcpListener,
    opts: &ReceiveOptions,
    on_ready: &dyn Fn(&Arc<GuestMemory>),
    progress: &dyn Fn(&migrate::dest::PrecopyStats),
) -> Result<Received, Error> {
    let mig = |e: migrate::dest::ReceiveError| Error::Migration(e.to_string());
    let mut inc =
        migrate::dest::accept(listener, opts.expect.as_ref(), opts.accept_timeout).map_err(mig)?;
    let backing = match inc.layout.backing.as_str() {
        "anonymous" => Backing::Anonymous,
        "memfd" => Backing::Memfd,
        other => {
            return Err(Error::Config(format!(
                "the source's memory backing {other:?} cannot be received"
            )))
        }
    };
    let mut vm = Vm::create(VmConfig {
        mem_bytes: inc.layout.mem_bytes,
        vcpus: inc.layout.vcpus,
        backing,
    })?;
    let ram: Arc<dyn Ram> = Arc::new(MemRam(vm.memory().clone()));
    on_ready(vm.memory());
    let sw = inc.receive_precopy(&*ram, progress).map_err(mig)?;
    let state: VmState = serde_json::from_slice(&sw.state)
        .map_err(|e| Error::Migration(format!("the source's vCPU state is not valid: {e}")))?;
    if state.memory.bytes != inc.layout.mem_bytes || state.vcpus.len() != inc.layout.vcpus as usize
    {
        return Err(Error::Migration(format!(
            "the source's state ({} bytes, {} vCPUs) does not match its hello ({} bytes, {} vCPUs)",
            state.memory.bytes,
            state.vcpus.len(),
            inc.layout.mem_bytes,
            inc.layout.vcpus
        )));
    }
    let start_pass = state.last_pass().unwrap_or(0);
    let mut report = ReceiveReport {
        mode: if sw.postcopy.is_some() {
            "postcopy"
        } else {
            "precopy"
        },
        mem_bytes: inc.layout.mem_bytes,
        vcpus: inc.layout.vcpus,
        precopy: inc.stats.clone(),
        postcopy: None,
        restore_ms: 0.0,
        postcopy_ms: 0.0,
        blocktime_ms: 0.0,
        blocktime_per_vcpu_ms: vec![0.0; inc.layout.vcpus as usize],
        pager_blocktime_ms: 0.0,
        blocktime_until_arrival_ms: 0.0,
        pager: None,
        passes: start_pass,
        verified: false,
    };
    let Some(need) = sw.postcopy else {
        vm.load_state(&state)?;
        vm.start(Some(start_pass + opts.verify_passes))?;
        report.restore_ms = sw.at.elapsed().as_secs_f64() * 1e3;
        inc.finish_precopy(sw.at.elapsed()).map_err(mig)?;
        let outcome = vm.run_to_pass(Instant::now(), opts.timeout);
        let c = complete_report(&mut report, outcome.as_ref().err(), &vm, None, None);
        let _ = inc.complete(&c);
        outcome?;
        return Ok(Received {
            vm,
            report,
            pager: None,
        });
    };
    let net = inc.postcopy(need, ram, opts.resume_timeout).map_err(mig)?;
    let pager = serve_embedded(
        vm.memory(),
        Arc::new(net.clone()),
        &EmbeddedOptions {
            threads: opts.threads,
            background: true,
            background_chunk: BACKGROUND_CHUNK,
            ..EmbeddedOptions::default()
        },
        "migrated vm".into(),
    )?;
    vm.load_state(&state)?;
    // No parking during post-copy: a vCPU parked early would look blocked
    // (and is not serving its guest); the passes to verify are set once
    // every page is here.
    let mut target = u64::MAX;
    let resumed = Instant::now();
    vm.start(None)?;
    report.restore_ms = sw.at.elapsed().as_secs_f64() * 1e3;
    net.resumed(sw.at.elapsed()).map_err(mig)?;
    let outcome = run_postcopy(
        &mut vm,
        &net,
        &pager.1,
        &mut target,
        resumed,
        opts,
        &mut report,
    );
    let mut c = complete_report(
        &mut report,
        outcome.as_ref().err(),
        &vm,
        Some(&pager.1),
        Some(&net),
    );
    if outcome.is_ok() {
        vcpu_blocktime(&vm, resumed, &mut report, &mut c);
    }
    let _ = net.complete(&c);
    if let Err(e) = outcome {
        net.end();
        let _ = vm.stop(Duration::from_secs(5));
        pager.0.shutdown();
        return Err(e);
    }
    Ok(Received {
        vm,
        report,
        pager: Some(pager),
    })
}

fn run_postcopy(
    vm: &mut Vm,
    net: &NetSource,
    handle: &pager::SessionHandle,
    target: &mut u64,
    resumed: Instant,
    opts: &ReceiveOptions,
    report: &mut ReceiveReport,
) -> Result<(), Error> {
    let host = vm.memory().host_addr();
    let mut finished = false;
    let mut down_logged = false;
    let mut last_release = Instant::now();
    loop {
        match net.status() {
            Status::Finished if !finished => {
                finished = true;
                report.postcopy_ms = resumed.elapsed().as_secs_f64() * 1e3;
                // Blocked so far: waiting for pages still on the link.
                let wall = resumed.elapsed().as_nanos() as u64;
                report.blocktime_until_arrival_ms = vm
                    .vcpu_tids()
                    .into_iter()
                    .filter_map(schedstat)
                    .map(|(cpu, runq)| wall.saturating_sub(cpu + runq) as f64 / 1e6)
                    .sum();
                // `verify_passes` more passes, the first of which may have
                // begun before the last page came: so one more than that.
                let now = vm.last_pass().unwrap_or(0);
                *target = now + opts.verify_passes + 1;
                vm.resume_to_pass(*target);
            }
            Status::Failed(why) => {
                return Err(Error::Migration(format!(
                    "post-copy failed: {why}; the guest is stopped"
                )))
            }
            Status::Down(since) if !down_logged => {
                down_logged = true;
                tracing::warn!(
                    "the link to the source is down since {:?} ago; faulting vCPUs wait",
                    since.elapsed()
                );
            }
            Status::Running => down_logged = false,
            _ => {}
        }
        if finished && vm.all_parked() {
            return Ok(());
        }
        if resumed.elapsed() > opts.timeout {
            return Err(Error::Timeout(
                opts.timeout,
                "the migrated guest did not finish its passes".into(),
            ));
        }
        if let Err(e) = vm.next_event(Duration::from_millis(10)) {
            // A vCPU that failed because its pages never came (the pager
            // poisons them once the source is gone for good): say why.
            if let Status::Failed(why) = net.status() {
                tracing::debug!("vCPU error after the source failed: {e}");
                return Err(Error::Migration(format!(
                    "post-copy failed: {why}; the guest is stopped"
                )));
            }
            return Err(e);
        }
        if last_release.elapsed() > Duration::from_millis(50) {
            last_release = Instant::now();
            net.release(|p| {
                matches!(
                    handle.page_state(host + p * PAGE),
                    Some(pager::PageState::Present | pager::PageState::Discarded)
                )
            });
        }
    }
}

/// A thread's CPU time and time waiting for a CPU, from
/// `/proc/self/task/TID/schedstat` (ns).
fn schedstat(tid: u32) -> Option<(u64, u64)> {
    let s = std::fs::read_to_string(format!("/proc/self/task/{tid}/schedstat")).ok()?;
    let mut it = s.split_whitespace().map(|v| v.parse::<u64>().ok());
    Some((it.next()??, it.next()??))
}

/// Guest blocktime per vCPU, measured from the scheduler rather than from
/// the pager's fault records: from the vCPUs starting here to each vCPU's
/// last verified pass, the time its thread was neither running (guest or
/// VMM code) nor waiting for a CPU, i.e. blocked, which in post-copy means
/// waiting for pages. It counts every wait, also those the pager's own
/// figure (`pager_blocktime_ms`) misses: a fault whose page another thread
/// (the stream's background population) mapped while it waited.
fn vcpu_blocktime(vm: &Vm, started: Instant, report: &mut ReceiveReport, c: &mut Complete) {
    let last = vm.last_reports();
    let mut per = Vec::new();
    for (tid, r) in vm.vcpu_tids().into_iter().zip(last) {
        let (Some((cpu, runq)), Some(r)) = (schedstat(tid), r) else {
            per.push(0);
            continue;
        };
        let wall = r.at.saturating_duration_since(started).as_nanos() as u64;
        per.push(wall.saturating_sub(cpu + runq) / 1000);
    }
    report.pager_blocktime_ms = report.blocktime_ms;
    c.blocktime_us = per.iter().sum();
    report.blocktime_ms = c.blocktime_us as f64 / 1e3;
    report.blocktime_per_vcpu_ms = per.iter().map(|u| *u as f64 / 1e3).collect();
    c.blocktime_per_vcpu_us = per;
}

fn complete_report(
    report: &mut ReceiveReport,
    err: Option<&Error>,
    vm: &Vm,
    handle: Option<&pager::SessionHandle>,
    net: Option<&NetSource>,
) -> Complete {
    report.passes = vm.last_pass().unwrap_or(0);
    report.verified = err.is_none();
    let mut c = Complete {
        verified: report.verified,
        passes: report.passes,
        error: err.map(|e| e.to_string()),
        ..Complete::default()
    };
    if let Some(h) = handle {
        let st = h.stats();
        report.pager = Some(PagerCounts {
            faults: st.faults,
            faults_already_served: st.faults_already_served,
            source_waits: st.source_waits,
            pages_on_demand: st.pages_on_demand,
            pages_fault_around: st.pages_fault_around,
            pages_readahead: st.pages_readahead,
            pages_background: st.pages_background,
            pages_zeroed: st.pages_zeroed,
            pages_discarded: st.pages_discarded,
        });
        let tids = vm.vcpu_tids();
        let per: Vec<u64> = tids
            .iter()
            .map(|t| {
                st.blocktime_by_thread
                    .iter()
                    .filter(|b| b.tid == *t)
                    .map(|b| b.us)
                    .sum()
            })
            .collect();
        c.blocktime_us = per.iter().sum();
        report.blocktime_ms = c.blocktime_us as f64 / 1e3;
        report.blocktime_per_vcpu_ms = per.iter().map(|u| *u as f64 / 1e3).collect();
        c.blocktime_per_vcpu_us = per;
    }
    if let Some(n) = net {
        let s = n.stats();
        c.requests = s.requests;
        report.postcopy = Some(s);
    }
    c.postcopy_us = (report.postcopy_ms * 1e3) as u64;
    c
}

/// A balloon loop over free guest memory (no workload touches it): each
/// step writes a marker into one page (source side) and gives the page
/// back, holding the [`SwitchLock`] so a step is never half done at the
/// switchover. After any step every balloon page reads as zero.
pub struct Balloon {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<u64>>,
}

/// The free range the balloon uses: between the user stacks and the data
/// (see the guest's layout in `guest.rs`).
pub const BALLOON_RANGE: std::ops::Range<u64> = crate::guest::USTACK_TOP..crate::guest::DATA_START;

impl Balloon {
    pub fn start(
        mem: Arc<GuestMemory>,
        write_markers: bool,
        lock: Option<SwitchLock>,
        period: Duration,
    ) -> Balloon {
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let s = stop.clone();
        let thread = std::thread::Builder::new()
            .name("balloon".into())
            .spawn(move || {
                let pages = (BALLOON_RANGE.end - BALLOON_RANGE.start) / PAGE;
                let mut steps = 0u64;
                let mut i = 0u64;
                while !s.load(std::sync::atomic::Ordering::Acquire) {
                    let gpa = BALLOON_RANGE.start + (i % pages) * PAGE;
                    {
                        let _step = lock
                            .as_ref()
                            .map(|l| l.lock().unwrap_or_else(|e| e.into_inner()));
                        if write_markers {
                            let _ = mem.write_u64(gpa, 0xba11_0000 + i);
                        }
                        if let Err(e) = mem.discard(gpa, PAGE) {
                            tracing::error!("balloon: {e}");
                            break;
                        }
                    }
                    steps += 1;
                    i += 7;
                    std::thread::sleep(period);
                }
                steps
            })
            .ok();
        Balloon { stop, thread }
    }

    /// Stops the loop; returns how many steps it made.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Release);
        self.thread.take().and_then(|t| t.join().ok()).unwrap_or(0)
    }

    /// Checks that every balloon page reads as zero.
    pub fn check_zero(mem: &GuestMemory) -> Result<(), Error> {
        let mut page = vec![0u8; PAGE as usize];
        let mut gpa = BALLOON_RANGE.start;
        while gpa < BALLOON_RANGE.end {
            mem.read(gpa, &mut page)?;
            if page.iter().any(|b| *b != 0) {
                return Err(Error::Migration(format!(
                    "stale data in ballooned page {gpa:#x}: it must read as zero"
                )));
            }
            gpa += PAGE;
        }
        Ok(())
    }
}
