//! Live KVM tests of the reference VMM. They need /dev/kvm (and
//! /dev/userfaultfd for lazy restores); without them they skip with a
//! message, unless PAGEWIRE_REQUIRE_KVM=1 makes a skip a failure.

use std::time::{Duration, Instant};

use vmm::{Backing, Vm, VmConfig, VmEvent, Workload, WorkloadKind};

fn have_kvm(test: &str) -> bool {
    let ok = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .is_ok();
    if !ok {
        assert!(
            std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: /dev/kvm is required (PAGEWIRE_REQUIRE_KVM=1) but cannot be opened"
        );
        eprintln!("SKIPPED {test}: /dev/kvm cannot be opened");
    }
    ok
}

const T: Duration = Duration::from_secs(60);

fn vm(mib: u64, vcpus: u32) -> Vm {
    Vm::create(VmConfig {
        mem_bytes: mib << 20,
        vcpus,
        backing: Backing::Anonymous,
    })
    .expect("create VM")
}

#[test]
fn halt_guest_writes_console_and_halts() {
    if !have_kvm("halt_guest_writes_console_and_halts") {
        return;
    }
    let mut vm = vm(4, 1);
    vm.boot(Workload::new(WorkloadKind::Halt, 0)).expect("boot");
    vm.start(None).expect("start");
    let deadline = Instant::now() + T;
    loop {
        match vm.next_event(Duration::from_millis(100)).expect("event") {
            Some(VmEvent::Halted(0)) => break,
            _ => assert!(
                Instant::now() < deadline,
                "no HLT; console {:?}",
                vm.console
            ),
        }
    }
    assert_eq!(vm.console, "halt\n");
}

#[test]
fn walker_fills_and_verifies_passes() {
    if !have_kvm("walker_fills_and_verifies_passes") {
        return;
    }
    let mut vm = vm(32, 1);
    vm.boot(Workload::new(WorkloadKind::Walker, 42))
        .expect("boot");
    vm.start(Some(3)).expect("start");
    let p = vm.run_to_pass(Instant::now(), T).expect("run");
    let last = p.last[0].expect("reported");
    assert_eq!(last.pass, 3);
    assert_eq!(last.mismatches, 0);
}

fn have_uffd(test: &str) -> bool {
    if !have_kvm(test) {
        return false;
    }
    let ok = uffd::Uffd::open().is_ok();
    if !ok {
        assert!(
            std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() != Ok("1"),
            "{test}: userfaultfd is required (PAGEWIRE_REQUIRE_KVM=1) but cannot be opened"
        );
        eprintln!("SKIPPED {test}: userfaultfd cannot be opened");
    }
    ok
}

#[test]
fn pause_and_resume_mid_pass() {
    if !have_kvm("pause_and_resume_mid_pass") {
        return;
    }
    let mut vm = vm(64, 2);
    vm.boot(Workload::new(WorkloadKind::Walker, 5))
        .expect("boot");
    vm.start(None).expect("start");
    // Wait for both fills, then pause wherever the vCPUs are.
    let mut filled = [false; 2];
    let mut reached = 0;
    while !(filled[0] && filled[1]) {
        if let Some(VmEvent::Report(r)) = vm.next_event(T).expect("event") {
            filled[r.vcpu as usize] = true;
            reached = reached.max(r.pass);
        }
    }
    std::thread::sleep(Duration::from_millis(30));
    let states = vm.pause(T).expect("pause");
    assert_eq!(states.len(), 2);
    let paused_rip = states[0].regs.rip;
    std::thread::sleep(Duration::from_millis(30));
    // Paused means paused: a second pause returns the same registers.
    assert_eq!(vm.states().expect("states")[0].regs.rip, paused_rip);
    // Reports that raced with the pause are kept for next_event.
    while let Some(ev) = vm.next_event(Duration::from_millis(1)).expect("event") {
        if let VmEvent::Report(r) = ev {
            reached = reached.max(r.pass);
        }
    }
    vm.resume_to_pass(reached + 3);
    let p = vm.run_to_pass(Instant::now(), T).expect("run after resume");
    for r in p.last.iter().flatten() {
        assert!(r.pass >= reached + 3 && r.mismatches == 0);
    }
}

/// Boots `workload`, runs it to pass 2, snapshots into `dir` and returns
/// the state file; `before_snapshot` may change memory first.
fn snapshot(
    dir: &std::path::Path,
    mib: u64,
    vcpus: u32,
    workload: Workload,
    backing: Backing,
    before_snapshot: impl FnOnce(&Vm),
) -> std::path::PathBuf {
    let mut vm = Vm::create(VmConfig {
        mem_bytes: mib << 20,
        vcpus,
        backing,
    })
    .expect("create VM");
    vm.boot(workload).expect("boot");
    vm.start(Some(2)).expect("start");
    vm.run_to_pass(Instant::now(), T).expect("run to pass 2");
    before_snapshot(&vm);
    vm.snapshot(dir).expect("snapshot");
    dir.join("state.json")
}

/// A page server in this process, as `pagewire serve` would be: it accepts
/// one VM, and serves it until the VMM hangs up.
fn start_server(dir: &std::path::Path, mem: std::path::PathBuf) -> std::path::PathBuf {
    use std::os::unix::net::UnixListener;
    let socket = dir.join("serve.sock");
    let listener = UnixListener::bind(&socket).expect("bind");
    std::thread::spawn(move || {
        let (stream, _) = listener.accept().expect("accept");
        let (maps, uffd) =
            wire::firecracker::read_handshake(&stream, Duration::from_secs(5), 1 << 20)
                .expect("handshake");
        let regions = maps
            .iter()
            .enumerate()
            .map(|(i, m)| pager::Region {
                host_base: m.base_host_virt_addr,
                len: m.size,
                source_offset: m.offset,
                page_size: pager::PageSize::from_bytes(m.page_size(i).expect("size"))
                    .expect("page size"),
            })
            .collect();
        let engine = pager::Engine::start(
            pager::EngineConfig {
                threads: 1,
                ..pager::EngineConfig::default()
            },
            None,
        )
        .expect("engine");
        let (tx, rx) = std::sync::mpsc::channel();
        let session = engine
            .add(pager::SessionSpec {
                name: "test server".into(),
                uffd,
                regions,
                source: std::sync::Arc::new(pager::MemFile::open(&mem).expect("mem file")),
                pid: None,
                hangup: Some(stream.try_clone().expect("clone").into()),
                config: pager::SessionConfig::default(),
                state: None,
                adopted: false,
                group: None,
            })
            .expect("session");
        let _ = tx.send(());
        // Serve until the VMM hangs up.
        let mut buf = [0u8; 1];
        let _ = std::io::Read::read(&mut &stream, &mut buf);
        drop(rx);
        let _ = session.stats();
        engine.shutdown();
    });
    socket
}

fn restore_and_check(
    state: &std::path::Path,
    mode: vmm::RestoreMode,
    to_pass: u64,
) -> Option<pager::StatsSnapshot> {
    let r = vmm::restore(state, &mode, Some(to_pass)).expect("restore");
    let mut r = r;
    let p =
        r.vm.run_to_pass(r.started, T)
            .unwrap_or_else(|e| panic!("{} restore: {e}", mode.name()));
    for (i, l) in p.last.iter().enumerate() {
        let l = l.unwrap_or_else(|| panic!("{}: vCPU {i} never reported", mode.name()));
        assert_eq!(l.pass, to_pass);
        assert_eq!(l.mismatches, 0);
    }
    r.finish().expect("finish")
}

#[test]
fn restore_three_ways_gives_the_same_guest() {
    if !have_uffd("restore_three_ways_gives_the_same_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let w = Workload {
        kind: WorkloadKind::Walker,
        seed: 99,
        shared_bytes: 256 << 10,
    };
    let state = snapshot(dir.path(), 48, 2, w, Backing::Anonymous, |_| {});
    assert!(restore_and_check(&state, vmm::RestoreMode::Eager, 4).is_none());
    let stats = restore_and_check(
        &state,
        vmm::RestoreMode::Embedded(vmm::EmbeddedOptions::default()),
        4,
    )
    .expect("embedded stats");
    assert!(stats.faults > 0 && stats.pages_copied > 0, "{stats:?}");
    assert_eq!(stats.pages_poisoned, 0);
    let socket = start_server(dir.path(), dir.path().join("memory.bin"));
    restore_and_check(&state, vmm::RestoreMode::External { socket }, 4);
}

#[test]
fn memfd_backed_guest_restores_lazily() {
    if !have_uffd("memfd_backed_guest_restores_lazily") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let w = Workload::new(WorkloadKind::Sparse, 3);
    let state = snapshot(dir.path(), 32, 1, w, Backing::Memfd, |_| {});
    restore_and_check(
        &state,
        vmm::RestoreMode::Embedded(vmm::EmbeddedOptions::default()),
        3,
    );
}

#[test]
fn vcpus_fault_on_the_same_and_on_different_pages_at_once() {
    if !have_uffd("vcpus_fault_on_the_same_and_on_different_pages_at_once") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    // A large shared block: every vCPU reads all of it each pass, so after
    // restore they fault on the same pages at once, and on their own slices.
    let w = Workload {
        kind: WorkloadKind::Sparse,
        seed: 11,
        shared_bytes: 8 << 20,
    };
    let state = snapshot(dir.path(), 64, 4, w, Backing::Anonymous, |_| {});
    let stats = restore_and_check(
        &state,
        vmm::RestoreMode::Embedded(vmm::EmbeddedOptions {
            threads: 2,
            cluster_pages: 1,
            ..vmm::EmbeddedOptions::default()
        }),
        4,
    )
    .expect("stats");
    // One page per fault: every shared page was asked for by several vCPUs,
    // yet each was mapped once.
    assert!(
        stats.faults_already_served > 0 || stats.faults > 0,
        "{stats:?}"
    );
    assert_eq!(stats.pages_poisoned, 0);
}

#[test]
fn balloon_discard_while_the_guest_runs() {
    if !have_uffd("balloon_discard_while_the_guest_runs") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let w = Workload::new(WorkloadKind::Sparse, 21);
    // The sparse guest touches one page in ten; the page after each touched
    // one holds data the guest "freed" (written here before the snapshot).
    let freed: Vec<u64> = (0..64).map(|i| 0x40_0000 + (i * 10 + 1) * 4096).collect();
    let f2 = freed.clone();
    let state = snapshot(dir.path(), 32, 1, w, Backing::Anonymous, move |vm| {
        for a in &f2 {
            vm.memory().write_u64(*a, 0xdead_beef).expect("write");
        }
    });
    let mut r = vmm::restore(
        &state,
        &vmm::RestoreMode::Embedded(vmm::EmbeddedOptions::default()),
        Some(3),
    )
    .expect("restore");
    // Half the freed pages were faulted in (read) before the balloon takes
    // them, half never were; both must read as zeros afterwards.
    for a in freed.iter().step_by(2) {
        assert_eq!(r.vm.memory().read_u64(*a).expect("read"), 0xdead_beef);
    }
    for a in &freed {
        r.vm.memory().discard(*a, 4096).expect("discard");
    }
    for a in &freed {
        assert_eq!(
            r.vm.memory().read_u64(*a).expect("read"),
            0,
            "stale data at {a:#x}"
        );
    }
    let p = r.vm.run_to_pass(r.started, T).expect("guest after balloon");
    assert_eq!(p.last[0].expect("report").mismatches, 0);
    let stats = r.finish().expect("finish").expect("stats");
    assert!(
        stats.events_remove > 0 && stats.pages_discarded > 0,
        "{stats:?}"
    );
}

#[test]
fn short_memory_file_is_refused_before_the_guest_starts() {
    if !have_kvm("short_memory_file_is_refused_before_the_guest_starts") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let state = snapshot(
        dir.path(),
        16,
        1,
        Workload::new(WorkloadKind::Walker, 1),
        Backing::Anonymous,
        |_| {},
    );
    let mem = dir.path().join("memory.bin");
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&mem)
        .expect("open");
    f.set_len(8 << 20).expect("truncate");
    for mode in [
        vmm::RestoreMode::Eager,
        vmm::RestoreMode::Embedded(vmm::EmbeddedOptions::default()),
    ] {
        let err = vmm::restore(&state, &mode, Some(3))
            .err()
            .expect("must fail");
        assert!(
            matches!(err, vmm::Error::ShortMemoryFile { actual, expected, .. } if actual == 8 << 20 && expected == 16 << 20),
            "{err}"
        );
        assert!(err.to_string().contains("the guest was not started"));
    }
}

#[test]
fn a_corrupt_memory_file_is_caught_by_the_guest() {
    if !have_uffd("a_corrupt_memory_file_is_caught_by_the_guest") {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let state = snapshot(
        dir.path(),
        16,
        1,
        Workload::new(WorkloadKind::Walker, 8),
        Backing::Anonymous,
        |_| {},
    );
    // Flip one byte of one word in the guest's working set.
    let mem = dir.path().join("memory.bin");
    let mut bytes = std::fs::read(&mem).expect("read");
    let at = 0x30_0000 + 8 * 77;
    bytes[at] ^= 0x40;
    std::fs::write(&mem, &bytes).expect("write");
    for mode in [
        vmm::RestoreMode::Eager,
        vmm::RestoreMode::Embedded(vmm::EmbeddedOptions::default()),
    ] {
        let mut r = vmm::restore(&state, &mode, Some(3)).expect("restore");
        match r.vm.run_to_pass(r.started, T) {
            Err(vmm::Error::GuestMismatch {
                first_bad,
                mismatches,
                ..
            }) => {
                assert_eq!(first_bad, at as u64);
                assert_eq!(mismatches, 1);
            }
            other => panic!("{}: corruption not caught: {other:?}", mode.name()),
        }
    }
}

#[test]
fn dirty_log_sees_guest_and_host_writes_and_discards() {
    if !have_kvm("dirty_log_sees_guest_and_host_writes_and_discards") {
        return;
    }
    let mut vm = vm(16, 1);
    vm.boot(Workload::new(WorkloadKind::Sparse, 5))
        .expect("boot");
    vm.start(Some(1)).expect("start");
    vm.run_to_pass(std::time::Instant::now(), T)
        .expect("pass 1");
    vm.start_dirty_log().expect("dirty log");
    // Parked: nothing written since logging started.
    let quiet = vm.take_dirty_log().expect("log");
    let count = |b: &[u64]| b.iter().map(|w| w.count_ones() as u64).sum::<u64>();
    assert_eq!(count(&quiet), 0, "a parked guest dirtied pages");
    vm.resume_to_pass(2);
    vm.run_to_pass(std::time::Instant::now(), T)
        .expect("pass 2");
    let dirty = vm.take_dirty_log().expect("log");
    let plan = vm.plans()[0];
    // The sparse guest rewrites one page in ten of its slice each pass.
    for p in (plan.base..plan.end).step_by(10 * 4096) {
        let page = (p / 4096) as usize;
        assert!(
            dirty[page / 64] & (1 << (page % 64)) != 0,
            "page {p:#x} written by the guest is not in the dirty log"
        );
    }
    let untouched = ((plan.base + 4096) / 4096) as usize;
    assert!(dirty[untouched / 64] & (1 << (untouched % 64)) == 0);
    assert_eq!(count(&vm.take_dirty_log().expect("log")), 0);
    // Host-side changes go to the memory's own log.
    vm.memory().write_u64(0xc_0000, 7).expect("write");
    vm.memory().discard(0xc_1000, 8192).expect("discard");
    let host = vm.memory().take_log();
    assert_eq!(host.written, vec![(0xc_0000, 8)]);
    assert_eq!(host.discarded, vec![(0xc_1000, 8192)]);
    assert!(vm.memory().take_log().written.is_empty());
    vm.stop_dirty_log().expect("stop");
    vm.memory().write_u64(0xc_0000, 8).expect("write");
    assert!(vm.memory().take_log().written.is_empty());
}

#[test]
fn throttled_guest_runs_slower_and_still_verifies() {
    if !have_kvm("throttled_guest_runs_slower_and_still_verifies") {
        return;
    }
    let mut vm = vm(16, 2);
    vm.boot(Workload::new(WorkloadKind::Walker, 6))
        .expect("boot");
    vm.start(Some(2)).expect("start");
    vm.run_to_pass(std::time::Instant::now(), T)
        .expect("pass 2");
    assert!(
        vm.vcpu_tids().iter().all(|t| *t != 0),
        "{:?}",
        vm.vcpu_tids()
    );
    vm.set_throttle(90);
    vm.resume_to_pass(4);
    let p = vm
        .run_to_pass(std::time::Instant::now(), T)
        .expect("pass 4");
    assert!(p.last.iter().all(|r| r.is_some_and(|r| r.mismatches == 0)));
    vm.set_throttle(0);
}
