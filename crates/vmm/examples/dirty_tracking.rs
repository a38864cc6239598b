//! Measures the two ways a migration source can track what a running KVM
//! guest dirties, on the walker guest (it rewrites all its memory each
//! pass), and checks that each sees every page the guest wrote:
//!
//! - KVM's dirty log (`KVM_MEM_LOG_DIRTY_PAGES` + `KVM_GET_DIRTY_LOG`);
//! - userfaultfd write-protection with `WP_ASYNC` + `PAGEMAP_SCAN` (the
//!   kernel resolves write faults itself; a scan reports and re-protects).
//!
//! For each: the guest's pass time with tracking on (against off), and the
//! time to collect one round. `cargo run --release -p vmm --example
//! dirty_tracking [MiB] [rounds]`; figures in docs/vmm.md.

use std::time::{Duration, Instant};

use uffd::{Categories, Features, PageMap, RegisterMode, ScanArgs, ScanFlags, Uffd};
use vmm::{Backing, Vm, VmConfig, Workload, WorkloadKind};

const T: Duration = Duration::from_secs(120);

fn pass_time(vm: &mut Vm, pass: &mut u64) -> Duration {
    *pass += 1;
    let t = Instant::now();
    vm.resume_to_pass(*pass);
    vm.run_to_pass(t, T).expect("pass");
    t.elapsed()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let mib: u64 = args.get(1).and_then(|s| s.parse().ok()).unwrap_or(512);
    let rounds: usize = args.get(2).and_then(|s| s.parse().ok()).unwrap_or(5);
    let mut vm = Vm::create(VmConfig {
        mem_bytes: mib << 20,
        vcpus: 1,
        backing: Backing::Anonymous,
    })?;
    vm.boot(Workload::new(WorkloadKind::Walker, 3))?;
    vm.start(Some(1))?;
    vm.run_to_pass(Instant::now(), T)?;
    let mut pass = 1;
    let pages = (mib << 20) / 4096;
    let plan = vm.plans()[0];
    let written = (plan.end - plan.base) / 4096;

    let off: Vec<f64> = (0..rounds)
        .map(|_| ms(pass_time(&mut vm, &mut pass)))
        .collect();

    vm.start_dirty_log()?;
    let _ = vm.take_dirty_log()?;
    let (mut kvm_pass, mut kvm_collect) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        kvm_pass.push(ms(pass_time(&mut vm, &mut pass)));
        let t = Instant::now();
        let log = vm.take_dirty_log()?;
        kvm_collect.push(ms(t.elapsed()));
        let n: u64 = log.iter().map(|w| u64::from(w.count_ones())).sum();
        assert!(
            n >= written,
            "KVM's dirty log saw {n} pages, the guest wrote {written}"
        );
    }
    vm.stop_dirty_log()?;

    let host = vm.memory().host_addr();
    let len = vm.memory().len();
    let uffd = Uffd::open()?;
    uffd.api(Features::WP_ASYNC | Features::WP_UNPOPULATED)?;
    uffd.register(host, len as usize, RegisterMode::WP)?;
    let t = Instant::now();
    uffd.write_protect(host, len as usize, true, false)?;
    let protect_all = ms(t.elapsed());
    let pm = PageMap::open_self()?;
    let scan = |out: &mut Vec<uffd::PageRegion>| -> Result<u64, uffd::Error> {
        out.clear();
        let mut at = host;
        let mut n = 0;
        while at < host + len {
            let r = pm.scan(
                &ScanArgs {
                    start: at,
                    end: host + len,
                    flags: ScanFlags::WP_MATCHING | ScanFlags::CHECK_WPASYNC,
                    mask: Categories::WRITTEN,
                    returned: Categories::WRITTEN,
                    ..ScanArgs::default()
                },
                out,
                4096,
            )?;
            n += out[out.len() - r.regions..]
                .iter()
                .map(|p| (p.end - p.start) / 4096)
                .sum::<u64>();
            at = r.walk_end;
        }
        Ok(n)
    };
    let mut out = Vec::new();
    let _ = scan(&mut out)?;
    let (mut wp_pass, mut wp_collect) = (Vec::new(), Vec::new());
    for _ in 0..rounds {
        wp_pass.push(ms(pass_time(&mut vm, &mut pass)));
        let t = Instant::now();
        let n = scan(&mut out)?;
        wp_collect.push(ms(t.elapsed()));
        assert!(
            n >= written,
            "PAGEMAP_SCAN saw {n} written pages, the guest wrote {written}"
        );
    }
    vm.stop(Duration::from_secs(5))?;
    println!(
        "{mib} MiB guest ({pages} pages, {written} rewritten each pass), medians of {rounds} rounds:"
    );
    println!("  no tracking:           pass {:.1} ms", median(off));
    println!(
        "  KVM dirty log:         pass {:.1} ms, collecting a round {:.2} ms",
        median(kvm_pass),
        median(kvm_collect)
    );
    println!(
        "  uffd WP_ASYNC + scan:  pass {:.1} ms, collecting a round {:.2} ms (protecting all at first {protect_all:.2} ms)",
        median(wp_pass),
        median(wp_collect)
    );
    Ok(())
}
