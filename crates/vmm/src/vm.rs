//! The VM: KVM glue, one thread per vCPU, and the controller that starts,
//! pauses, resumes, snapshots and stops them.
//!
//! vCPU threads own their `VcpuFd`. The controller talks to them through
//! [`Control`] (flags, a resume epoch and a condition variable) and hears
//! from them through a channel of [`VmEvent`]s. A vCPU blocked in `KVM_RUN`
//! (running guest code, or waiting for a page from userfaultfd) is kicked
//! out with a real-time signal; kicks repeat until the vCPU answers, so a
//! signal that lands just before `KVM_RUN` cannot be lost.

use std::collections::VecDeque;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};
use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use crate::error::Error;
use crate::guest::{
    self, Mailbox, PlanSums, VcpuPlan, Workload, MMIO_CONSOLE, MMIO_REPORT, PORT_CONSOLE,
};
use crate::memory::{Backing, GuestMemory};
use crate::state::{Fpu, MemoryRegion, MemoryState, Regs, Sregs, VcpuState, VmState};

/// The shape of a VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VmConfig {
    pub mem_bytes: u64,
    pub vcpus: u32,
    pub backing: Backing,
}

/// A vCPU finished a pass of its workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Report {
    pub vcpu: u32,
    pub pass: u64,
    pub sum: u64,
    /// Wrong words the guest has seen since it booted (kept in guest memory,
    /// so it survives snapshots).
    pub mismatches: u64,
    pub first_bad: u64,
    pub at: Instant,
}

/// What vCPU threads (and the page-server watch) tell the controller.
#[derive(Debug)]
pub enum VmEvent {
    Report(Report),
    Console(u32, u8),
    Halted(u32),
    Paused(u32, Box<VcpuState>),
    Failed(u32, String),
    /// The external page server's connection hung up.
    PageServerGone,
}

/// Shared between the controller and the vCPU threads.
struct Control {
    pause: AtomicBool,
    stop: AtomicBool,
    /// A vCPU parks itself after reporting this pass (u64::MAX: never).
    park_at: AtomicU64,
    /// Bumped by every resume; parked vCPUs wait for it to change.
    epoch: Mutex<u64>,
    cv: Condvar,
    /// Share of each [`THROTTLE_PERIOD`] a vCPU sleeps instead of running,
    /// in percent (0: none). See [`Vm::set_throttle`].
    throttle: AtomicU32,
    /// Each vCPU thread's kernel thread id, once it runs (0 before).
    tids: Vec<AtomicU32>,
}

/// KVM's dirty log and the memory's host log of one VM, usable from any
/// thread (see [`Vm::start_dirty_log`]).
#[derive(Clone)]
pub struct DirtyLogger {
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemory>,
}

impl DirtyLogger {
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    fn set_slot_flags(&self, flags: u32) -> Result<(), Error> {
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags,
            guest_phys_addr: 0,
            memory_size: self.memory.len(),
            userspace_addr: self.memory.host_addr(),
        };
        // SAFETY: the same mapping as in `Vm::create`, which `self.memory`
        // keeps alive at least as long as this VM fd; only the slot's flags
        // change.
        unsafe { self.vm_fd.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION (dirty logging)"))
    }

    /// Starts KVM's dirty log on guest RAM (`KVM_MEM_LOG_DIRTY_PAGES`):
    /// from now on [`take_dirty_log`](Self::take_dirty_log) says which pages
    /// vCPUs wrote. Host-side changes are in the memory's own log
    /// ([`GuestMemory::start_log`]), which this starts too.
    pub fn start(&self) -> Result<(), Error> {
        self.memory.start_log();
        self.set_slot_flags(kvm_bindings::KVM_MEM_LOG_DIRTY_PAGES)
    }

    /// Stops dirty logging (both logs).
    pub fn stop(&self) -> Result<(), Error> {
        self.memory.stop_log();
        self.set_slot_flags(0)
    }

    /// The 4 KiB pages vCPUs wrote since logging started or since the last
    /// call, one bit per page (bit `p % 64` of word `p / 64`); the log
    /// starts again, empty (`KVM_GET_DIRTY_LOG` write-protects the pages it
    /// reports).
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, Error> {
        self.vm_fd
            .get_dirty_log(0, self.memory.len() as usize)
            .map_err(Error::kvm("KVM_GET_DIRTY_LOG"))
    }
}

/// The period of vCPU throttling: a throttled vCPU is kicked out of the
/// guest this often and sleeps its share of it (QEMU's cpu-throttle uses
/// 10 ms too).
pub const THROTTLE_PERIOD: Duration = Duration::from_millis(10);

impl Control {
    fn epoch(&self) -> u64 {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn bump(&self) {
        *self.epoch.lock().unwrap_or_else(|e| e.into_inner()) += 1;
        self.cv.notify_all();
    }

    fn wait_for_epoch_change(&self, seen: u64) {
        let mut e = self.epoch.lock().unwrap_or_else(|e| e.into_inner());
        while *e == seen && !self.stop.load(Ordering::Acquire) {
            e = self.cv.wait(e).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> i32 {
    SIGRTMIN()
}

extern "C" fn on_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

fn install_kick_handler() -> Result<(), Error> {
    static RESULT: OnceLock<i32> = OnceLock::new();
    let err = *RESULT.get_or_init(|| match register_signal_handler(kick_signal(), on_kick) {
        Ok(()) => 0,
        Err(e) => e.errno(),
    });
    if err != 0 {
        return Err(Error::Os {
            what: "installing the vCPU kick signal handler",
            source: std::io::Error::from_raw_os_error(err),
        });
    }
    Ok(())
}

/// Progress of a run: when each vCPU first reported and where they parked.
#[derive(Debug, Clone)]
pub struct Progress {
    /// Per vCPU: time from `since` to its first report in this run.
    pub first_report: Vec<Option<Duration>>,
    /// Per vCPU: its last report.
    pub last: Vec<Option<Report>>,
    /// Time from `since` until every vCPU parked.
    pub elapsed: Duration,
}

/// A KVM virtual machine with guest RAM at address 0.
pub struct Vm {
    _kvm: Kvm,
    /// Kept only to keep the VM alive; dropped before `memory`.
    vm_fd: Arc<VmFd>,
    memory: Arc<GuestMemory>,
    config: VmConfig,
    idle: Vec<VcpuFd>,
    threads: Vec<Option<JoinHandle<()>>>,
    /// Kicks throttled vCPUs every [`THROTTLE_PERIOD`] (see `set_throttle`).
    throttler: Option<JoinHandle<()>>,
    ctl: Arc<Control>,
    tx: Sender<VmEvent>,
    rx: Receiver<VmEvent>,
    backlog: VecDeque<VmEvent>,
    workload: Option<Workload>,
    plans: Vec<VcpuPlan>,
    sums: Vec<Option<PlanSums>>,
    paused: Vec<Option<VcpuState>>,
    halted: Vec<bool>,
    last: Vec<Option<Report>>,
    /// Per vCPU: the last pass reported before the snapshot this VM was
    /// restored from.
    restored_passes: Vec<Option<u64>>,
    /// Everything the guest wrote to its console.
    pub console: String,
}

impl Vm {
    /// Opens /dev/kvm, creates the VM, its memory (unpopulated) and vCPUs.
    pub fn create(config: VmConfig) -> Result<Vm, Error> {
        install_kick_handler()?;
        if config.vcpus == 0 || config.vcpus > guest::MAX_VCPUS {
            return Err(Error::Config(format!(
                "{} vCPUs: between 1 and {} are supported",
                config.vcpus,
                guest::MAX_VCPUS
            )));
        }
        let kvm = Kvm::new().map_err(Error::NoKvm)?;
        let vm = kvm.create_vm().map_err(Error::kvm("KVM_CREATE_VM"))?;
        let memory = Arc::new(GuestMemory::new(config.mem_bytes, config.backing)?);
        let region = kvm_bindings::kvm_userspace_memory_region {
            slot: 0,
            flags: 0,
            guest_phys_addr: 0,
            memory_size: memory.len(),
            userspace_addr: memory.host_addr(),
        };
        // SAFETY: the region is our mapping, which `self.memory` keeps alive
        // for as long as the VM exists (the VmFd is dropped first: fields
        // drop in declaration order and `vm` precedes `memory`).
        unsafe { vm.set_user_memory_region(region) }
            .map_err(Error::kvm("KVM_SET_USER_MEMORY_REGION"))?;
        let cpuid = kvm
            .get_supported_cpuid(kvm_bindings::KVM_MAX_CPUID_ENTRIES)
            .map_err(Error::kvm("KVM_GET_SUPPORTED_CPUID"))?;
        let mut idle = Vec::new();
        for id in 0..config.vcpus {
            let vcpu = vm
                .create_vcpu(u64::from(id))
                .map_err(Error::kvm("KVM_CREATE_VCPU"))?;
            vcpu.set_cpuid2(&cpuid)
                .map_err(Error::kvm("KVM_SET_CPUID2"))?;
            idle.push(vcpu);
        }
        let (tx, rx) = mpsc::channel();
        let n = config.vcpus as usize;
        Ok(Vm {
            _kvm: kvm,
            vm_fd: Arc::new(vm),
            memory,
            config,
            idle,
            threads: Vec::new(),
            throttler: None,
            ctl: Arc::new(Control {
                pause: AtomicBool::new(false),
                stop: AtomicBool::new(false),
                park_at: AtomicU64::new(u64::MAX),
                epoch: Mutex::new(0),
                cv: Condvar::new(),
                throttle: AtomicU32::new(0),
                tids: (0..n).map(|_| AtomicU32::new(0)).collect(),
            }),
            tx,
            rx,
            backlog: VecDeque::new(),
            workload: None,
            plans: Vec::new(),
            sums: vec![None; n],
            paused: vec![None; n],
            halted: vec![false; n],
            last: vec![None; n],
            restored_passes: vec![None; n],
            console: String::new(),
        })
    }

    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.memory
    }

    /// Starts KVM's dirty log on guest RAM and the memory's host log; see
    /// [`DirtyLogger::start`].
    pub fn start_dirty_log(&self) -> Result<(), Error> {
        self.dirty_logger().start()
    }

    /// Stops dirty logging (both logs).
    pub fn stop_dirty_log(&self) -> Result<(), Error> {
        self.dirty_logger().stop()
    }

    /// See [`DirtyLogger::take_dirty_log`].
    pub fn take_dirty_log(&self) -> Result<Vec<u64>, Error> {
        self.dirty_logger().take_dirty_log()
    }

    /// Throttles every vCPU to run only `100 - percent`% of the time
    /// (0: not at all; at most 99), as QEMU's auto-converge does, so that a
    /// guest dirtying memory faster than a link carries it lets pre-copy
    /// converge. A throttled vCPU is kicked out of the guest every
    /// [`THROTTLE_PERIOD`] and sleeps its share of it.
    pub fn set_throttle(&mut self, percent: u32) {
        let p = percent.min(99);
        self.ctl.throttle.store(p, Ordering::Release);
        if p == 0 || self.throttler.as_ref().is_some_and(|h| !h.is_finished()) {
            return;
        }
        let ctl = self.ctl.clone();
        let targets: Vec<libc::pthread_t> = self
            .threads
            .iter()
            .flatten()
            .map(|h| std::os::unix::thread::JoinHandleExt::as_pthread_t(h) as libc::pthread_t)
            .collect();
        let spawned = std::thread::Builder::new()
            .name("vcpu-throttle".into())
            .spawn(move || {
                while !ctl.stop.load(Ordering::Acquire) && ctl.throttle.load(Ordering::Acquire) > 0
                {
                    for &t in &targets {
                        // SAFETY: the vCPU threads are joined only after
                        // `stop` is set, which ends this loop first
                        // (`Vm::stop` joins this thread before them); a
                        // signal to a live thread with a no-op handler only
                        // interrupts KVM_RUN.
                        unsafe { libc::pthread_kill(t, kick_signal()) };
                    }
                    std::thread::sleep(THROTTLE_PERIOD);
                }
            });
        match spawned {
            Ok(h) => self.throttler = Some(h),
            Err(e) => tracing::warn!("vCPU throttling is off: spawning its thread: {e}"),
        }
    }

    /// Each vCPU thread's kernel thread id (0 for one that has not started):
    /// what a page server's per-thread blocktime is keyed by.
    pub fn vcpu_tids(&self) -> Vec<u32> {
        self.ctl
            .tids
            .iter()
            .map(|t| t.load(Ordering::Acquire))
            .collect()
    }

    pub fn config(&self) -> VmConfig {
        self.config
    }

    pub fn workload(&self) -> Option<&Workload> {
        self.workload.as_ref()
    }

    pub fn plans(&self) -> &[VcpuPlan] {
        &self.plans
    }

    /// The highest pass any vCPU has reported (including before the
    /// snapshot this VM was restored from).
    pub fn last_pass(&self) -> Option<u64> {
        self.last
            .iter()
            .zip(&self.restored_passes)
            .filter_map(|(l, r)| l.map(|l| l.pass).or(*r))
            .max()
    }

    /// A sender for events from outside the VM (the page-server watch).
    pub fn event_sender(&self) -> Sender<VmEvent> {
        self.tx.clone()
    }

    fn set_workload(&mut self, workload: Workload) -> Result<(), Error> {
        self.plans = workload.plan(self.config.mem_bytes, self.config.vcpus)?;
        self.workload = Some(workload);
        Ok(())
    }

    /// Prepares a fresh boot of `workload` on every vCPU.
    pub fn boot(&mut self, workload: Workload) -> Result<(), Error> {
        self.set_workload(workload)?;
        let entry = guest::install(&self.memory, &workload, &self.plans)?;
        for (vcpu, plan) in self.idle.iter().zip(&self.plans) {
            let sregs = vcpu.get_sregs().map_err(Error::kvm("KVM_GET_SREGS"))?;
            vcpu.set_sregs(&guest::boot_sregs(sregs))
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&guest::boot_regs(plan, entry))
                .map_err(Error::kvm("KVM_SET_REGS"))?;
        }
        Ok(())
    }

    /// Loads saved vCPU state (restore). Memory must already be in place or
    /// be served on demand.
    pub fn load_state(&mut self, state: &VmState) -> Result<(), Error> {
        if state.vcpus.len() != self.idle.len() {
            return Err(Error::Config(format!(
                "the state has {} vCPUs, the VM {}",
                state.vcpus.len(),
                self.idle.len()
            )));
        }
        self.set_workload(state.workload)?;
        self.restored_passes = state.vcpus.iter().map(|v| v.last_pass).collect();
        for (vcpu, s) in self.idle.iter().zip(&state.vcpus) {
            vcpu.set_sregs(&s.sregs.to_kvm())
                .map_err(Error::kvm("KVM_SET_SREGS"))?;
            vcpu.set_regs(&(&s.regs).into())
                .map_err(Error::kvm("KVM_SET_REGS"))?;
            vcpu.set_fpu(&(&s.fpu).into())
                .map_err(Error::kvm("KVM_SET_FPU"))?;
        }
        Ok(())
    }

    /// Starts the vCPU threads. With `park_at`, each vCPU parks after
    /// reporting that pass (see [`Vm::run_to_pass`]).
    pub fn start(&mut self, park_at: Option<u64>) -> Result<(), Error> {
        self.ctl
            .park_at
            .store(park_at.unwrap_or(u64::MAX), Ordering::Release);
        for (id, fd) in std::mem::take(&mut self.idle).into_iter().enumerate() {
            let ctl = self.ctl.clone();
            let mem = self.memory.clone();
            let tx = self.tx.clone();
            let h = std::thread::Builder::new()
                .name(format!("vcpu{id}"))
                .spawn(move || vcpu_loop(id as u32, fd, &ctl, &mem, &tx))
                .map_err(|e| Error::io("spawning a vCPU thread", e))?;
            self.threads.push(Some(h));
        }
        Ok(())
    }

    fn kick(&self, id: usize) {
        if let Some(Some(h)) = self.threads.get(id) {
            if !h.is_finished() {
                let _ = h.kill(kick_signal());
            }
        }
    }

    /// The next event, with reports checked against the workload. Errors
    /// end the run: a vCPU failure, a guest mismatch or wrong checksum, or
    /// the page server going away.
    pub fn next_event(&mut self, timeout: Duration) -> Result<Option<VmEvent>, Error> {
        let ev = match self.backlog.pop_front() {
            Some(ev) => ev,
            None => match self.rx.recv_timeout(timeout) {
                Ok(ev) => ev,
                Err(RecvTimeoutError::Timeout) => return Ok(None),
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            },
        };
        match &ev {
            VmEvent::Report(r) => self.check_report(r)?,
            VmEvent::Console(_, b) => self.console.push(char::from(*b)),
            VmEvent::Halted(id) => self.halted[*id as usize] = true,
            VmEvent::Paused(id, s) => self.paused[*id as usize] = Some((**s).clone()),
            VmEvent::Failed(id, reason) => {
                return Err(Error::Vcpu {
                    vcpu: *id,
                    reason: reason.clone(),
                })
            }
            VmEvent::PageServerGone => return Err(Error::PageServerGone),
        }
        Ok(Some(ev))
    }

    fn check_report(&mut self, r: &Report) -> Result<(), Error> {
        self.last[r.vcpu as usize] = Some(*r);
        if r.mismatches != 0 {
            return Err(Error::GuestMismatch {
                vcpu: r.vcpu,
                mismatches: r.mismatches,
                first_bad: r.first_bad,
            });
        }
        if r.pass == 0 {
            return Ok(());
        }
        let plan = self
            .plans
            .get(r.vcpu as usize)
            .copied()
            .ok_or_else(|| Error::Vcpu {
                vcpu: r.vcpu,
                reason: "reported without a workload".into(),
            })?;
        let sums = *self.sums[r.vcpu as usize].get_or_insert_with(|| plan.sums());
        let want = VcpuPlan::expected_sum(&sums, r.pass);
        if r.sum != want {
            return Err(Error::Checksum {
                vcpu: r.vcpu,
                pass: r.pass,
                got: r.sum,
                want,
            });
        }
        Ok(())
    }

    /// Runs (or keeps running) until every vCPU has reported pass `pass`
    /// and parked there, checking every report. Call after `start(Some(pass))`
    /// or `resume_to_pass(pass)`.
    pub fn run_to_pass(&mut self, since: Instant, timeout: Duration) -> Result<Progress, Error> {
        let n = self.config.vcpus as usize;
        let mut first: Vec<Option<Duration>> = vec![None; n];
        let deadline = since + timeout;
        loop {
            let all_parked = (0..n).all(|i| self.paused[i].is_some() || self.halted[i]);
            if all_parked {
                return Ok(Progress {
                    first_report: first,
                    last: self.last.clone(),
                    elapsed: since.elapsed(),
                });
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(Error::Timeout(timeout, self.describe_progress()));
            }
            if let Some(VmEvent::Report(r)) =
                self.next_event(left.min(Duration::from_millis(100)))?
            {
                let f = &mut first[r.vcpu as usize];
                if f.is_none() {
                    *f = Some(r.at.saturating_duration_since(since));
                }
            }
        }
    }

    fn describe_progress(&self) -> String {
        let parts: Vec<String> = (0..self.config.vcpus as usize)
            .map(
                |i| match (self.halted[i], self.paused[i].is_some(), self.last[i]) {
                    (true, _, _) => format!("vCPU {i} halted"),
                    (_, true, _) => format!("vCPU {i} parked"),
                    (_, _, Some(r)) => format!("vCPU {i} last reported pass {}", r.pass),
                    (_, _, None) => format!("vCPU {i} has not reported"),
                },
            )
            .collect();
        format!("the guest did not finish: {}", parts.join(", "))
    }

    /// Lets parked or paused vCPUs go on until they report pass `pass`.
    pub fn resume_to_pass(&mut self, pass: u64) {
        self.ctl.park_at.store(pass, Ordering::Release);
        self.resume();
    }

    /// Lets paused vCPUs go on (parking only where `resume_to_pass` says).
    pub fn resume(&mut self) {
        self.ctl.pause.store(false, Ordering::Release);
        for p in &mut self.paused {
            *p = None;
        }
        self.ctl.bump();
    }

    /// Pauses every vCPU wherever it is and returns their state. Events
    /// that arrive meanwhile are kept for [`Vm::next_event`].
    pub fn pause(&mut self, timeout: Duration) -> Result<Vec<VcpuState>, Error> {
        self.ctl.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        loop {
            let n = self.config.vcpus as usize;
            let waiting: Vec<usize> = (0..n)
                .filter(|&i| self.paused[i].is_none() && !self.halted[i])
                .collect();
            if waiting.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    timeout,
                    format!("vCPUs {waiting:?} did not pause"),
                ));
            }
            for &i in &waiting {
                self.kick(i);
            }
            match self.rx.recv_timeout(Duration::from_millis(2)) {
                Ok(VmEvent::Paused(id, s)) => self.paused[id as usize] = Some(*s),
                Ok(VmEvent::Halted(id)) => self.halted[id as usize] = true,
                Ok(VmEvent::Failed(id, reason)) => return Err(Error::Vcpu { vcpu: id, reason }),
                Ok(other) => self.backlog.push_back(other),
                Err(_) => {}
            }
        }
        self.states()
    }

    /// The saved state of every vCPU; all must be paused or parked.
    pub fn states(&self) -> Result<Vec<VcpuState>, Error> {
        self.paused
            .iter()
            .enumerate()
            .map(|(i, s)| {
                s.clone().ok_or_else(|| Error::Vcpu {
                    vcpu: i as u32,
                    reason: "is not paused".into(),
                })
            })
            .collect()
    }

    /// The state of a paused VM (its memory aside): what a snapshot's
    /// `state.json` holds and what a migration sends.
    pub fn state(&self) -> Result<VmState, Error> {
        let mut vcpus = self.states()?;
        for ((v, last), before) in vcpus.iter_mut().zip(&self.last).zip(&self.restored_passes) {
            v.last_pass = last.map(|r| r.pass).or(*before);
        }
        let workload = self
            .workload
            .ok_or_else(|| Error::Config("nothing to save: no workload was booted".into()))?;
        Ok(VmState {
            format: crate::state::FORMAT.into(),
            version: crate::state::VERSION,
            memory: MemoryState {
                bytes: self.memory.len(),
                backing: self.memory.backing(),
                file: "memory.bin".into(),
                regions: vec![MemoryRegion {
                    guest_phys_addr: 0,
                    size: self.memory.len(),
                    file_offset: 0,
                }],
            },
            workload,
            vcpus,
        })
    }

    /// Each vCPU's last report in this run.
    pub fn last_reports(&self) -> Vec<Option<Report>> {
        self.last.clone()
    }

    /// Whether every vCPU is parked, paused or halted.
    pub fn all_parked(&self) -> bool {
        (0..self.config.vcpus as usize).all(|i| self.paused[i].is_some() || self.halted[i])
    }

    /// A handle on KVM's dirty log and the memory's host log that other
    /// threads can use (a migration's sender).
    pub fn dirty_logger(&self) -> DirtyLogger {
        DirtyLogger {
            vm_fd: self.vm_fd.clone(),
            memory: self.memory.clone(),
        }
    }

    /// Writes `dir/state.json` and `dir/memory.bin` (Firecracker's layout)
    /// for a paused VM.
    pub fn snapshot(&self, dir: &Path) -> Result<VmState, Error> {
        let state = self.state()?;
        std::fs::create_dir_all(dir)
            .map_err(|e| Error::io(format!("creating {}", dir.display()), e))?;
        let mem_path = dir.join("memory.bin");
        let mut f = std::fs::File::create(&mem_path)
            .map_err(|e| Error::io(format!("creating {}", mem_path.display()), e))?;
        self.memory.save(&mut f)?;
        f.sync_all()
            .map_err(|e| Error::io(format!("syncing {}", mem_path.display()), e))?;
        state.save(&dir.join("state.json"))?;
        Ok(state)
    }

    /// Stops every vCPU thread and waits for them (kicking any that is
    /// blocked in the guest or on a missing page).
    pub fn stop(&mut self, timeout: Duration) -> Result<(), Error> {
        self.ctl.stop.store(true, Ordering::Release);
        self.ctl.bump();
        if let Some(h) = self.throttler.take() {
            let _ = h.join();
        }
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<usize> = (0..self.threads.len())
                .filter(|&i| matches!(&self.threads[i], Some(h) if !h.is_finished()))
                .collect();
            if running.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                return Err(Error::Timeout(
                    timeout,
                    format!("vCPU threads {running:?} did not stop"),
                ));
            }
            for &i in &running {
                self.kick(i);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        for h in self.threads.iter_mut().filter_map(Option::take) {
            let _ = h.join();
        }
        Ok(())
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        if let Err(e) = self.stop(Duration::from_secs(5)) {
            tracing::error!("stopping the VM: {e}");
        }
    }
}

/// What a `KVM_RUN` exit asks of the vCPU loop, detached from the borrow of
/// the vCPU's run structure.
enum Exit {
    Console(Vec<u8>),
    Report,
    OtherPortOut(u16),
    PortIn,
    Halt,
    Retry,
    Fail(String),
}

fn classify(r: Result<VcpuExit<'_>, kvm_ioctls::Error>) -> Exit {
    match r {
        Ok(VcpuExit::IoOut(PORT_CONSOLE, data)) => Exit::Console(data.to_vec()),
        Ok(VcpuExit::IoOut(port, _)) => Exit::OtherPortOut(port),
        Ok(VcpuExit::MmioWrite(MMIO_REPORT, _)) => Exit::Report,
        Ok(VcpuExit::MmioWrite(MMIO_CONSOLE, data)) => Exit::Console(data.to_vec()),
        Ok(VcpuExit::IoIn(_, data)) => {
            // No device answers: reads see all ones, as on real hardware.
            data.fill(0xff);
            Exit::PortIn
        }
        Ok(VcpuExit::Hlt) => Exit::Halt,
        Ok(VcpuExit::Intr) | Ok(VcpuExit::IrqWindowOpen) => Exit::Retry,
        Ok(VcpuExit::MmioRead(addr, _)) | Ok(VcpuExit::MmioWrite(addr, _)) => Exit::Fail(format!(
            "the guest accessed {addr:#x}, which is outside its memory"
        )),
        Ok(VcpuExit::Shutdown) => Exit::Fail("triple fault (KVM_EXIT_SHUTDOWN)".into()),
        Ok(VcpuExit::InternalError) => Exit::Fail(
            "KVM internal error: the instruction emulator could not run a guest instruction".into(),
        ),
        Ok(VcpuExit::FailEntry(reason, cpu)) => Exit::Fail(format!(
            "KVM could not enter the guest (hardware reason {reason:#x}, cpu {cpu})"
        )),
        Ok(other) => Exit::Fail(format!("unexpected exit {other:?}")),
        Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => Exit::Retry,
        Err(e) if e.errno() == libc::EFAULT => Exit::Fail(format!(
            "KVM_RUN: {e}: guest memory could not be faulted in (is its page server gone?)"
        )),
        Err(e) => Exit::Fail(format!("KVM_RUN: {e}")),
    }
}

fn save_vcpu(id: u32, fd: &VcpuFd) -> Result<VcpuState, String> {
    let regs = fd.get_regs().map_err(|e| format!("KVM_GET_REGS: {e}"))?;
    let sregs = fd.get_sregs().map_err(|e| format!("KVM_GET_SREGS: {e}"))?;
    let fpu = fd.get_fpu().map_err(|e| format!("KVM_GET_FPU: {e}"))?;
    Ok(VcpuState {
        id,
        regs: Regs::from(&regs),
        sregs: Sregs::from_kvm(&sregs),
        fpu: Fpu::from(&fpu),
        last_pass: None,
    })
}

fn vcpu_loop(id: u32, mut fd: VcpuFd, ctl: &Control, mem: &GuestMemory, tx: &Sender<VmEvent>) {
    if let Some(t) = ctl.tids.get(id as usize) {
        t.store(
            rustix::thread::gettid().as_raw_nonzero().get() as u32,
            Ordering::Release,
        );
    }
    let mut parked = false;
    let fail = |reason: String, fd: &VcpuFd| {
        let rip = fd.get_regs().map(|r| r.rip).unwrap_or(0);
        let _ = tx.send(VmEvent::Failed(id, format!("{reason} (rip {rip:#x})")));
    };
    loop {
        if ctl.stop.load(Ordering::Acquire) {
            return;
        }
        if parked || ctl.pause.load(Ordering::Acquire) {
            let epoch = ctl.epoch();
            // Completes a pending I/O exit without entering the guest, so the
            // saved registers are consistent (KVM's API documentation asks
            // for exactly this before saving state).
            fd.set_kvm_immediate_exit(1);
            let r = fd.run().map(|_| ());
            fd.set_kvm_immediate_exit(0);
            if let Err(e) = r {
                if e.errno() != libc::EINTR {
                    fail(format!("completing the last exit: {e}"), &fd);
                    return;
                }
            }
            match save_vcpu(id, &fd) {
                Ok(s) => {
                    let _ = tx.send(VmEvent::Paused(id, Box::new(s)));
                }
                Err(e) => {
                    fail(e, &fd);
                    return;
                }
            }
            ctl.wait_for_epoch_change(epoch);
            parked = false;
            continue;
        }
        match classify(fd.run()) {
            Exit::Console(bytes) => {
                for b in bytes {
                    let _ = tx.send(VmEvent::Console(id, b));
                }
            }
            Exit::Report => {
                let at = Instant::now();
                let mb = Mailbox::addr(id);
                let read = |off| mem.read_u64(mb + off);
                match (
                    read(Mailbox::PASS),
                    read(Mailbox::SUM),
                    read(Mailbox::MISMATCHES),
                    read(Mailbox::FIRST_BAD),
                ) {
                    (Ok(pass), Ok(sum), Ok(mismatches), Ok(first_bad)) => {
                        let _ = tx.send(VmEvent::Report(Report {
                            vcpu: id,
                            pass,
                            sum,
                            mismatches,
                            first_bad,
                            at,
                        }));
                        if pass >= ctl.park_at.load(Ordering::Acquire) {
                            parked = true;
                        }
                    }
                    _ => {
                        fail("its mailbox is outside guest memory".into(), &fd);
                        return;
                    }
                }
            }
            Exit::OtherPortOut(port) => {
                tracing::debug!(vcpu = id, port, "write to a port with no device");
            }
            Exit::PortIn => {}
            Exit::Retry => {
                let t = ctl.throttle.load(Ordering::Acquire);
                if t > 0 && !ctl.pause.load(Ordering::Acquire) {
                    std::thread::sleep(THROTTLE_PERIOD * t / 100);
                }
            }
            Exit::Halt => {
                let _ = tx.send(VmEvent::Halted(id));
                return;
            }
            Exit::Fail(reason) => {
                fail(reason, &fd);
                return;
            }
        }
    }
}
