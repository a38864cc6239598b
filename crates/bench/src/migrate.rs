//! `pagewire bench-migrate`: live migration of a running guest between two
//! processes over loopback, in several modes, interleaved round by round,
//! with the link's and memory's own speeds measured in the same run.
//!
//! Each run starts `pagewire vm receive` and `pagewire vm migrate` (the
//! walker guest rewriting all its memory), and reads both JSON reports:
//! total time (until the destination has every page), downtime, guest
//! blocktime, bytes sent, the destination's peak resident memory, and
//! whether the guest verified every pass there.

use std::fmt;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Instant;

use serde::Serialize;
use testbed::{bail, Context as _, Result};

/// What to run.
#[derive(Clone, Debug)]
pub struct MigrateConfig {
    pub exe: PathBuf,
    pub mem: u64,
    pub vcpus: u32,
    /// Modes: postcopy, precopy+postcopy, precopy (see [`mode_args`]).
    pub modes: Vec<String>,
    /// The link's limit, bits/s as `vm migrate --max-bandwidth` takes it.
    pub max_bandwidth: Option<String>,
    pub downtime_limit_ms: u64,
    pub runs: usize,
}

/// The `vm migrate` flags of a mode.
pub fn mode_args(mode: &str, downtime_limit_ms: u64) -> Result<Vec<String>> {
    let limit = downtime_limit_ms.to_string();
    Ok(match mode {
        "postcopy" => vec!["--switchover".into(), "immediate".into()],
        "precopy+postcopy" => vec![
            "--switchover".into(),
            "auto".into(),
            "--precopy-rounds".into(),
            "1".into(),
            "--downtime-limit-ms".into(),
            limit,
        ],
        "precopy" => vec![
            "--switchover".into(),
            "after-converge".into(),
            "--downtime-limit-ms".into(),
            limit,
        ],
        other => bail!("unknown mode {other:?}: postcopy, precopy+postcopy or precopy"),
    })
}

/// One migration.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateRun {
    pub mode: String,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub blocktime_ms: f64,
    pub blocktime_per_vcpu_ms: Vec<f64>,
    pub precopy_rounds: u64,
    pub throttle_percent: u64,
    pub bytes_sent: u64,
    pub link_share: Option<f64>,
    pub dest_peak_rss_mib: f64,
    pub verified: bool,
    /// Why the migration failed (the guest then runs on at the source).
    pub error: Option<String>,
}

impl MigrateRun {
    fn failed(mode: &str, why: String) -> MigrateRun {
        MigrateRun {
            mode: mode.to_string(),
            total_ms: 0.0,
            downtime_ms: 0.0,
            blocktime_ms: 0.0,
            blocktime_per_vcpu_ms: Vec::new(),
            precopy_rounds: 0,
            throttle_percent: 0,
            bytes_sent: 0,
            link_share: None,
            dest_peak_rss_mib: 0.0,
            verified: false,
            error: Some(why),
        }
    }
}

/// Medians of a mode's runs.
#[derive(Clone, Debug, Serialize)]
pub struct MigrateSummary {
    pub mode: String,
    pub runs: usize,
    pub total_ms: f64,
    pub downtime_ms: f64,
    pub blocktime_ms: f64,
    pub bytes_sent: f64,
    pub link_share: Option<f64>,
    pub dest_peak_rss_mib: f64,
    /// Every migration that completed verified.
    pub all_verified: bool,
    /// Migrations that did not complete (not in the medians).
    pub failed: usize,
}

#[derive(Clone, Debug, Serialize)]
pub struct MigrateReport {
    pub mem_mib: u64,
    pub vcpus: u32,
    pub max_bandwidth: Option<String>,
    /// Baselines in the same run: one TCP stream over loopback carrying the
    /// guest's size, and memcpy of it.
    pub loopback_gib_s: f64,
    pub memcpy_gib_s: f64,
    pub runs: Vec<MigrateRun>,
    pub summary: Vec<MigrateSummary>,
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn gib_s(bytes: u64, secs: f64) -> f64 {
    bytes as f64 / (1u64 << 30) as f64 / secs.max(1e-9)
}

/// One TCP stream over loopback carrying `bytes`, 1 MiB writes.
fn loopback(bytes: u64) -> Result<f64> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding loopback")?;
    let addr = l.local_addr().context("loopback address")?;
    let rx = std::thread::spawn(move || -> std::io::Result<u64> {
        let (mut s, _) = l.accept()?;
        let mut buf = vec![0u8; 1 << 20];
        let mut got = 0u64;
        loop {
            let n = s.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            got += n as u64;
        }
    });
    let mut s = TcpStream::connect(addr).context("connecting over loopback")?;
    let buf = vec![7u8; 1 << 20];
    let t = Instant::now();
    let mut sent = 0u64;
    while sent < bytes {
        s.write_all(&buf).context("loopback write")?;
        sent += buf.len() as u64;
    }
    drop(s);
    let got = rx
        .join()
        .map_err(|_| testbed::Error::Failed("the loopback reader panicked".into()))?
        .context("loopback read")?;
    Ok(gib_s(got, t.elapsed().as_secs_f64()))
}

fn memcpy(bytes: u64) -> f64 {
    let src = vec![3u8; bytes as usize];
    let mut dst = vec![0u8; bytes as usize];
    dst.copy_from_slice(&src); // first touch
    let t = Instant::now();
    dst.copy_from_slice(&src);
    let s = t.elapsed().as_secs_f64();
    std::hint::black_box(&dst);
    gib_s(bytes, s)
}

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap_or(0.0)
}

fn one(cfg: &MigrateConfig, mode: &str) -> Result<MigrateRun> {
    let mut dest = Command::new(&cfg.exe)
        .args(["vm", "receive", "--listen", "127.0.0.1:0", "--json"])
        .env("PAGEWIRE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting vm receive")?;
    let mut err = BufReader::new(dest.stderr.take().context("its stderr")?);
    let mut addr = None;
    for _ in 0..20 {
        let mut l = String::new();
        if err.read_line(&mut l).unwrap_or(0) == 0 {
            break;
        }
        if let Some(a) = l.trim().strip_prefix("pagewire: listening on ") {
            addr = Some(a.to_string());
            break;
        }
    }
    let Some(addr) = addr else {
        let _ = dest.kill();
        bail!("vm receive did not say where it listens");
    };
    let drain = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = err.read_to_string(&mut rest);
        rest
    });
    let mut args: Vec<String> = vec![
        "vm".into(),
        "migrate".into(),
        "--to".into(),
        addr,
        "--json".into(),
        "--mem".into(),
        cfg.mem.to_string(),
        "--vcpus".into(),
        cfg.vcpus.to_string(),
    ];
    args.extend(mode_args(mode, cfg.downtime_limit_ms)?);
    if let Some(b) = &cfg.max_bandwidth {
        args.extend(["--max-bandwidth".into(), b.clone()]);
    }
    let src = Command::new(&cfg.exe)
        .args(&args)
        .env("PAGEWIRE_LOG", "warn")
        .output()
        .context("running vm migrate")?;
    let dout = dest.wait_with_output().context("waiting for vm receive")?;
    let derr = drain.join().unwrap_or_default();
    if !src.status.success() {
        // A mode can fail by design (pre-copy that cannot converge): the
        // run says so, the others go on.
        let why = String::from_utf8_lossy(&src.stderr);
        let why = why.lines().last().unwrap_or("").trim().to_string();
        return Ok(MigrateRun::failed(mode, why));
    }
    if !dout.status.success() {
        bail!(
            "{mode}: the destination failed: {}\n{}",
            String::from_utf8_lossy(&dout.stdout),
            derr
        );
    }
    let s: serde_json::Value =
        serde_json::from_slice(&src.stdout).context("vm migrate's report")?;
    let d: serde_json::Value =
        serde_json::from_slice(&dout.stdout).context("vm receive's report")?;
    Ok(MigrateRun {
        mode: mode.to_string(),
        total_ms: f(&s["total_ms"]),
        downtime_ms: f(&s["downtime_ms"]),
        blocktime_ms: f(&d["blocktime_ms"]),
        blocktime_per_vcpu_ms: d["blocktime_per_vcpu_ms"]
            .as_array()
            .map(|a| a.iter().map(f).collect())
            .unwrap_or_default(),
        precopy_rounds: s["precopy_rounds"].as_u64().unwrap_or(0),
        throttle_percent: s["throttle_percent"].as_u64().unwrap_or(0),
        bytes_sent: s["bytes_total"].as_u64().unwrap_or(0),
        link_share: s["link_share"].as_f64(),
        dest_peak_rss_mib: f(&d["peak_rss_mib"]),
        verified: s["verified"] == true && d["verified"] == true,
        error: None,
    })
}

/// Runs every mode `runs` times, interleaved.
pub fn run_migrate(cfg: &MigrateConfig) -> Result<MigrateReport> {
    for m in &cfg.modes {
        mode_args(m, 0)?;
    }
    let loopback_gib_s = loopback(cfg.mem)?;
    let memcpy_gib_s = memcpy(cfg.mem);
    let mut runs = Vec::new();
    for _ in 0..cfg.runs.max(1) {
        for m in &cfg.modes {
            runs.push(one(cfg, m)?);
        }
    }
    let summary = cfg
        .modes
        .iter()
        .map(|m| {
            let all: Vec<&MigrateRun> = runs.iter().filter(|r| &r.mode == m).collect();
            let failed = all.iter().filter(|r| r.error.is_some()).count();
            let rs: Vec<&MigrateRun> = all.iter().copied().filter(|r| r.error.is_none()).collect();
            let med = |g: &dyn Fn(&MigrateRun) -> f64| median(rs.iter().map(|r| g(r)).collect());
            MigrateSummary {
                mode: m.clone(),
                runs: rs.len(),
                total_ms: med(&|r| r.total_ms),
                downtime_ms: med(&|r| r.downtime_ms),
                blocktime_ms: med(&|r| r.blocktime_ms),
                bytes_sent: med(&|r| r.bytes_sent as f64),
                link_share: rs
                    .iter()
                    .all(|r| r.link_share.is_some())
                    .then(|| med(&|r| r.link_share.unwrap_or(0.0))),
                dest_peak_rss_mib: med(&|r| r.dest_peak_rss_mib),
                all_verified: rs.iter().all(|r| r.verified),
                failed,
            }
        })
        .collect();
    Ok(MigrateReport {
        mem_mib: cfg.mem >> 20,
        vcpus: cfg.vcpus,
        max_bandwidth: cfg.max_bandwidth.clone(),
        loopback_gib_s,
        memcpy_gib_s,
        runs,
        summary,
    })
}

/// The report as a table.
pub struct MigrateTable<'a>(pub &'a MigrateReport);

impl fmt::Display for MigrateTable<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let r = self.0;
        writeln!(
            f,
            "live migration of a {} MiB walker guest ({} vCPU), loopback{}; baselines: one TCP stream {:.2} GiB/s, memcpy {:.2} GiB/s",
            r.mem_mib,
            r.vcpus,
            r.max_bandwidth
                .as_ref()
                .map_or(String::new(), |b| format!(", link limited to {b}bit/s")),
            r.loopback_gib_s,
            r.memcpy_gib_s
        )?;
        for x in &r.runs {
            if let Some(e) = &x.error {
                writeln!(f, "  run  {:18} FAILED: {e}", x.mode)?;
                continue;
            }
            writeln!(
                f,
                "  run  {:18} total {:7.1} ms  downtime {:6.1} ms  blocktime {:6.1} ms  {:6.0} MiB sent  rounds {} throttle {}%  dest rss {:4.0} MiB  {}",
                x.mode,
                x.total_ms,
                x.downtime_ms,
                x.blocktime_ms,
                x.bytes_sent as f64 / 1048576.0,
                x.precopy_rounds,
                x.throttle_percent,
                x.dest_peak_rss_mib,
                if x.verified { "verified" } else { "NOT VERIFIED" }
            )?;
        }
        writeln!(
            f,
            "| mode | runs (failed) | total | downtime | guest blocktime | bytes sent | link used | destination peak RSS | verified |"
        )?;
        writeln!(f, "|---|---|---|---|---|---|---|---|---|")?;
        for s in &r.summary {
            if s.runs == 0 {
                writeln!(
                    f,
                    "| {} | 0 ({}) | did not complete | | | | | | |",
                    s.mode, s.failed
                )?;
                continue;
            }
            writeln!(
                f,
                "| {} | {} ({}) | {:.2} s | {:.1} ms | {:.1} ms | {:.2} GB | {} | {:.0} MiB | {} |",
                s.mode,
                s.runs,
                s.failed,
                s.total_ms / 1e3,
                s.downtime_ms,
                s.blocktime_ms,
                s.bytes_sent / 1e9,
                s.link_share
                    .map_or("-".into(), |l| format!("{:.0}%", l * 100.0)),
                s.dest_peak_rss_mib,
                if s.all_verified { "yes" } else { "NO" }
            )?;
        }
        Ok(())
    }
}
