//! `pagewire vm migrate` and `pagewire vm receive`: live migration of the
//! reference VMM's guest between two hosts (the protocol is in
//! `docs/protocol.md`, the design in `docs/vmm.md`).

use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Args;
use vmm::migration::{self, Balloon, ReceiveOptions};

use crate::image::Bar;
use crate::vm::{boot_and_run, GuestArgs};

#[derive(Args)]
pub struct MigrateArgs {
    /// The guest to boot and run here, then migrate (its --passes run
    /// before the migration starts; it keeps running throughout).
    #[command(flatten)]
    pub guest: GuestArgs,
    /// The destination: a `pagewire vm receive --listen` address.
    #[arg(long)]
    pub to: String,
    /// Pre-copy rounds before switching over (auto: at most this many).
    #[arg(long, default_value_t = 1)]
    pub precopy_rounds: u32,
    /// auto (pre-copy, then stop-and-copy if what is left fits the downtime
    /// limit, else post-copy), immediate (post-copy only) or
    /// after-converge (pre-copy only, throttling the vCPUs until it fits).
    #[arg(long, default_value = "auto", value_parser = parse_switchover)]
    pub switchover: migrate::Switchover,
    /// Limit the link, in bits per second (1G = 1 Gbit/s; K, M, G, T).
    #[arg(long, value_parser = migrate::link::parse_bandwidth)]
    pub max_bandwidth: Option<u64>,
    /// The longest stop-and-copy pre-copy may end with.
    #[arg(long, default_value_t = 50)]
    pub downtime_limit_ms: u64,
    /// After the link breaks in post-copy, keep trying to reconnect this long.
    #[arg(long, default_value_t = 30)]
    pub resume_timeout_s: u64,
    /// Run a balloon over free guest memory while migrating: each step
    /// writes a page and gives it back.
    #[arg(long)]
    pub balloon: bool,
    /// Tests: break the link after this many post-copy pages (one per
    /// connection, comma-separated).
    #[arg(long, hide = true, value_delimiter = ',')]
    pub cut_after_pages: Vec<u64>,
}

#[derive(Args)]
pub struct ReceiveArgs {
    /// Address to listen on (port 0: any; the address is printed).
    #[arg(long)]
    pub listen: String,
    /// The guest's memory this destination expects (checked against the
    /// source's; default: whatever the source has).
    #[arg(long, value_parser = testbed::parse_size_2m)]
    pub mem: Option<u64>,
    #[arg(long)]
    pub vcpus: Option<u32>,
    /// Verified passes to run once every page has arrived.
    #[arg(long, default_value_t = 2)]
    pub verify_passes: u64,
    /// How long faulting vCPUs wait for a source whose link broke.
    #[arg(long, default_value_t = 30)]
    pub resume_timeout_s: u64,
    /// How long to wait for a source to connect.
    #[arg(long, default_value_t = 300)]
    pub accept_timeout_s: u64,
    /// Pager serving threads.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Run a balloon over free guest memory while receiving; the pages must
    /// read as zero at the end.
    #[arg(long)]
    pub balloon: bool,
    #[arg(long, default_value_t = 300)]
    pub timeout_s: u64,
    #[arg(long)]
    pub json: bool,
}

fn parse_switchover(s: &str) -> Result<migrate::Switchover, String> {
    migrate::Switchover::parse(s)
        .ok_or_else(|| format!("{s:?}: expected auto, immediate or after-converge"))
}

fn ms(v: f64) -> String {
    format!("{v:.1} ms")
}

fn mib(b: u64) -> String {
    format!("{:.1} MiB", b as f64 / 1048576.0)
}

pub fn migrate(a: &MigrateArgs) -> anyhow::Result<ExitCode> {
    let (mut vm, boot) = boot_and_run(&a.guest)?;
    tracing::info!(
        "guest booted and verified {} passes; migrating to {}",
        boot.passes,
        a.to
    );
    vm.resume_to_pass(u64::MAX);
    let lock: migration::SwitchLock = Arc::new(Mutex::new(()));
    let balloon = a.balloon.then(|| {
        Balloon::start(
            vm.memory().clone(),
            true,
            Some(lock.clone()),
            Duration::from_micros(200),
        )
    });
    let opts = migrate::Options {
        precopy_rounds: a.precopy_rounds.max(1),
        switchover: a.switchover,
        max_bandwidth: a.max_bandwidth,
        downtime_limit: Duration::from_millis(a.downtime_limit_ms),
        resume_timeout: Duration::from_secs(a.resume_timeout_s),
        complete_timeout: Duration::from_secs(a.guest.timeout_s),
        cut_after_pages: a.cut_after_pages.clone(),
    };
    let pages = a.guest.mem / 4096;
    let bar = Bar::new(pages * 4096, "migrating");
    let r = migration::migrate_out(&mut vm, &a.to, &opts, Some(&lock), &|p| {
        bar.message(p.phase);
        bar.set((p.pages_sent * 4096).min(pages * 4096));
    });
    bar.finish();
    let steps = balloon.map(Balloon::stop);
    let report = r.context("migration failed")?;
    let _ = vm.stop(Duration::from_secs(5));
    if a.guest.json {
        let mut v = serde_json::to_value(&report)?;
        if let (Some(s), Some(o)) = (steps, v.as_object_mut()) {
            o.insert("balloon_steps".into(), s.into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print_report(&report, steps);
    }
    if !report.verified {
        bail!(
            "the destination did not verify the guest{}",
            report
                .destination
                .as_ref()
                .and_then(|d| d.error.as_ref())
                .map_or(String::new(), |e| format!(": {e}"))
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn print_report(r: &migrate::Report, balloon: Option<u64>) {
    println!(
        "{} migration of a {} MiB guest ({} vCPUs): total {}, downtime {}, {} pre-copy round(s){}",
        r.mode,
        r.mem_bytes >> 20,
        r.vcpus,
        ms(r.total_ms),
        ms(r.downtime_ms),
        r.precopy_rounds,
        if r.throttle_percent > 0 {
            format!(" (vCPUs throttled to {}%)", 100 - r.throttle_percent)
        } else {
            String::new()
        }
    );
    for (name, p) in [
        ("pre-copy", &r.precopy),
        ("stop-and-copy", &r.stop_copy),
        ("post-copy", &r.postcopy),
    ] {
        println!(
            "  {name:14} {:>8} pages, {:>8} zero, {:>6} discarded, {:>10} in {}",
            p.pages,
            p.zero_pages,
            p.discarded_pages,
            mib(p.bytes),
            ms(p.ms)
        );
    }
    println!(
        "  urgent pages {} ({} requests), link resumed {} time(s), {} sent{}",
        r.urgent_pages,
        r.requests,
        r.resumes,
        mib(r.bytes_total),
        r.link_share.map_or(String::new(), |s| format!(
            ", {:.0}% of the link",
            s * 100.0
        ))
    );
    if let Some(d) = &r.destination {
        let per: Vec<String> = d
            .blocktime_per_vcpu_us
            .iter()
            .enumerate()
            .map(|(i, u)| format!("vCPU {i} {:.1} ms", *u as f64 / 1e3))
            .collect();
        println!(
            "  destination: guest blocktime {:.1} ms ({}), every page there after {:.1} ms, {} passes",
            d.blocktime_us as f64 / 1e3,
            per.join(", "),
            d.postcopy_us as f64 / 1e3,
            d.passes
        );
    }
    if let Some(s) = balloon {
        println!("  balloon: {s} steps");
    }
    println!(
        "  {}",
        if r.verified {
            "verified"
        } else {
            "NOT verified"
        }
    );
}

/// This process's peak resident memory (VmHWM), KiB.
fn peak_rss_kib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let l = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    l.split_whitespace().nth(1)?.parse().ok()
}

pub fn receive(a: &ReceiveArgs) -> anyhow::Result<ExitCode> {
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr()?;
    eprintln!("pagewire: listening on {addr}");
    let expect = match (a.mem, a.vcpus) {
        (None, None) => None,
        (mem, vcpus) => Some(migrate::Layout {
            mem_bytes: mem.context("--vcpus needs --mem too")?,
            vcpus: vcpus.unwrap_or(1),
            backing: "anonymous".into(),
            page_size: 4096,
        }),
    };
    let opts = ReceiveOptions {
        expect,
        accept_timeout: Duration::from_secs(a.accept_timeout_s),
        resume_timeout: Duration::from_secs(a.resume_timeout_s),
        verify_passes: a.verify_passes.max(1),
        threads: a.threads.max(1),
        timeout: Duration::from_secs(a.timeout_s),
    };
    let balloon: Mutex<Option<Balloon>> = Mutex::new(None);
    let r = migration::receive(
        listener,
        &opts,
        &|mem| {
            if a.balloon {
                *balloon.lock().unwrap_or_else(|e| e.into_inner()) = Some(Balloon::start(
                    mem.clone(),
                    false,
                    None,
                    Duration::from_micros(200),
                ));
            }
        },
        &|p| tracing::debug!(round = p.rounds, pages = p.pages, "pre-copy round received"),
    );
    let steps = balloon
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .map(Balloon::stop);
    let received = r.context("receiving the migration")?;
    if steps.is_some() {
        Balloon::check_zero(received.vm.memory())?;
    }
    let report = received.report.clone();
    received.stop()?;
    // What this process held at its peak: guest memory plus staging.
    let peak_rss_mib = peak_rss_kib().unwrap_or(0) as f64 / 1024.0;
    if a.json {
        let mut v = serde_json::to_value(&report)?;
        if let Some(o) = v.as_object_mut() {
            if let Some(s) = steps {
                o.insert("balloon_steps".into(), s.into());
            }
            o.insert("peak_rss_mib".into(), peak_rss_mib.into());
        }
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!("peak resident memory {peak_rss_mib:.0} MiB");
        println!(
            "received a {} MiB guest ({} vCPUs) by {}: resumed {} after the switchover, every page here after {}, guest blocktime {} ({}), {} passes {}",
            report.mem_bytes >> 20,
            report.vcpus,
            report.mode,
            ms(report.restore_ms),
            ms(report.postcopy_ms),
            ms(report.blocktime_ms),
            report
                .blocktime_per_vcpu_ms
                .iter()
                .enumerate()
                .map(|(i, b)| format!("vCPU {i} {b:.1} ms"))
                .collect::<Vec<_>>()
                .join(", "),
            report.passes,
            if report.verified { "verified" } else { "NOT verified" }
        );
    }
    Ok(ExitCode::SUCCESS)
}
