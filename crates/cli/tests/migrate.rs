//! `pagewire vm migrate` / `vm receive` end to end: two processes over
//! loopback (and over a veth pair between two network namespaces when the
//! machine allows it), with a guest that keeps rewriting and checking its
//! memory throughout. Every test needs /dev/kvm and userfaultfd and skips
//! with a message without them, unless PAGEWIRE_REQUIRE_KVM=1.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_pagewire");

/// A `vm receive` process and what it printed.
struct Dest {
    child: Child,
    addr: String,
    stderr: Arc<Mutex<String>>,
}

impl Dest {
    fn start(extra: &[&str]) -> Dest {
        Dest::start_in(None, "127.0.0.1:0", extra)
    }

    fn start_in(netns: Option<&str>, listen: &str, extra: &[&str]) -> Dest {
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, BIN]);
                c
            }
            None => Command::new(BIN),
        };
        cmd.args([
            "vm",
            "receive",
            "--listen",
            listen,
            "--json",
            "--accept-timeout-s",
            "60",
        ])
        .args(extra)
        .env("PAGEWIRE_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd.spawn().expect("start vm receive");
        let err = child.stderr.take().expect("stderr");
        let mut lines = BufReader::new(err);
        let mut addr = String::new();
        let mut seen = String::new();
        for _ in 0..50 {
            let mut l = String::new();
            if lines.read_line(&mut l).unwrap_or(0) == 0 {
                break;
            }
            seen.push_str(&l);
            if let Some(a) = l.trim().strip_prefix("pagewire: listening on ") {
                addr = a.to_string();
                break;
            }
        }
        assert!(
            !addr.is_empty(),
            "vm receive did not say where it listens: {seen}"
        );
        let stderr = Arc::new(Mutex::new(String::new()));
        let s = stderr.clone();
        std::thread::spawn(move || {
            let mut rest = String::new();
            let _ = lines.read_to_string(&mut rest);
            s.lock().unwrap_or_else(|e| e.into_inner()).push_str(&rest);
        });
        Dest {
            child,
            addr,
            stderr,
        }
    }

    /// Waits (bounded) for it to exit; returns (success, stdout, stderr).
    fn finish(mut self, within: Duration) -> (bool, String, String) {
        let deadline = Instant::now() + within;
        let status = loop {
            if let Some(s) = self.child.try_wait().expect("wait") {
                break s;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "vm receive did not finish within {within:?}: {}",
                    self.stderr.lock().unwrap_or_else(|e| e.into_inner())
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut out = String::new();
        if let Some(mut o) = self.child.stdout.take() {
            let _ = o.read_to_string(&mut out);
        }
        std::thread::sleep(Duration::from_millis(50));
        let err = self
            .stderr
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        (status.success(), out, err)
    }
}

impl Drop for Dest {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn migrate_cmd(to: &str, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.args(["vm", "migrate", "--to", to, "--json", "--timeout-s", "120"])
        .args(args)
        .env("PAGEWIRE_LOG", "warn");
    c
}

fn json(out: &str, what: &str) -> serde_json::Value {
    serde_json::from_str(out).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {out}"))
}

/// Runs a migration between two fresh processes; returns both reports.
fn run(src: &[&str], dst: &[&str]) -> (serde_json::Value, serde_json::Value) {
    let d = Dest::start(dst);
    let out = migrate_cmd(&d.addr, src).output().expect("run vm migrate");
    let (ok, dout, derr) = d.finish(Duration::from_secs(120));
    assert!(
        out.status.success(),
        "vm migrate failed: {}\n{}\ndestination: {derr}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "vm receive failed: {dout}\n{derr}");
    let s = json(&String::from_utf8_lossy(&out.stdout), "vm migrate");
    let r = json(&dout, "vm receive");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(r["verified"], true, "{r}");
    (s, r)
}

fn n(v: &serde_json::Value) -> u64 {
    v.as_u64().unwrap_or_else(|| panic!("not a number: {v}"))
}

#[test]
fn postcopy_only_with_two_vcpus() {
    if !common::have_kvm() {
        return;
    }
    let (s, r) = run(
        &["--mem", "64M", "--vcpus", "2", "--switchover", "immediate"],
        &[],
    );
    assert_eq!(s["mode"], "postcopy", "{s}");
    assert_eq!(n(&s["precopy"]["pages"]), 0, "{s}");
    assert!(n(&s["postcopy"]["pages"]) > 10_000, "{s}");
    // The walker's pages are all data; the low pages hold page tables and
    // code, the rest of the first 2 MiB is zero.
    assert!(n(&s["postcopy"]["zero_pages"]) > 0, "{s}");
    let d = &s["destination"];
    assert_eq!(
        d["blocktime_per_vcpu_us"].as_array().map(Vec::len),
        Some(2),
        "{s}"
    );
    assert!(n(&d["requests"]) > 0, "no fault asked for a page: {s}");
    assert_eq!(r["mode"], "postcopy");
    assert_eq!(
        n(&r["postcopy"]["pages_arrived"]),
        n(&r["postcopy"]["pages_needed"]),
        "{r}"
    );
}

#[test]
fn precopy_only_converges_by_throttling() {
    if !common::have_kvm() {
        return;
    }
    let (s, r) = run(
        &[
            "--mem",
            "32M",
            "--switchover",
            "after-converge",
            "--downtime-limit-ms",
            "50",
        ],
        &[],
    );
    assert_eq!(s["mode"], "precopy", "{s}");
    assert_eq!(n(&s["postcopy"]["pages"]), 0, "{s}");
    assert!(n(&s["precopy"]["pages"]) >= 32 * 256 - 512, "{s}");
    assert_eq!(r["mode"], "precopy");
    assert!(r.get("postcopy").is_none_or(|p| p.is_null()), "{r}");
}

#[test]
fn precopy_then_postcopy() {
    if !common::have_kvm() {
        return;
    }
    // A walker rewrites all its memory every pass: with no downtime to
    // spare pre-copy cannot converge, so auto switches to post-copy.
    let (s, r) = run(
        &[
            "--mem",
            "64M",
            "--precopy-rounds",
            "2",
            "--downtime-limit-ms",
            "0",
        ],
        &[],
    );
    assert_eq!(s["mode"], "precopy+postcopy", "{s}");
    assert_eq!(n(&s["precopy_rounds"]), 2, "{s}");
    assert!(
        n(&s["precopy"]["pages"]) > 0 && n(&s["postcopy"]["pages"]) > 0,
        "{s}"
    );
    assert_eq!(r["mode"], "postcopy");
}

#[test]
fn balloon_on_both_sides_in_every_phase() {
    if !common::have_kvm() {
        return;
    }
    for mode in [
        &["--precopy-rounds", "2", "--downtime-limit-ms", "0"][..],
        &["--switchover", "immediate"][..],
        &["--switchover", "after-converge"][..],
    ] {
        let mut src = vec!["--mem", "64M", "--vcpus", "2", "--balloon"];
        src.extend_from_slice(mode);
        // The destination checks that every ballooned page reads as zero at
        // the end, and fails otherwise.
        let (s, r) = run(&src, &["--balloon"]);
        assert!(n(&s["balloon_steps"]) > 0, "{s}");
        assert!(n(&r["balloon_steps"]) > 0, "{r}");
        let discarded = n(&s["precopy"]["discarded_pages"])
            + n(&s["stop_copy"]["discarded_pages"])
            + n(&s["postcopy"]["discarded_pages"]);
        assert!(discarded > 0, "no balloon page was sent as discarded: {s}");
    }
}

#[test]
fn link_cut_at_random_moments_in_postcopy_is_resumed() {
    if !common::have_kvm() {
        return;
    }
    // Seeded and printed (PAGEWIRE_SEED replays a run).
    let mut rng = store::testing::Rng::new("link cuts");
    for round in 0..3 {
        let cuts: Vec<String> = (0..1 + rng.below(3))
            .map(|_| (1 + rng.below(6000)).to_string())
            .collect();
        let cuts = cuts.join(",");
        eprintln!("round {round}: cutting after {cuts} pages");
        let (s, r) = run(
            &[
                "--mem",
                "64M",
                "--vcpus",
                "2",
                "--switchover",
                if round == 1 { "auto" } else { "immediate" },
                "--downtime-limit-ms",
                "0",
                "--cut-after-pages",
                &cuts,
            ],
            &["--resume-timeout-s", "20"],
        );
        let resumes = n(&s["resumes"]);
        assert!(resumes >= 1, "the link was never cut ({cuts}): {s}");
        assert_eq!(n(&r["postcopy"]["resumes"]), resumes, "{r}");
        assert_eq!(
            n(&r["postcopy"]["pages_arrived"]),
            n(&r["postcopy"]["pages_needed"]),
            "{r}"
        );
    }
}

#[test]
fn source_killed_in_postcopy_stops_the_destination_cleanly() {
    if !common::have_kvm() {
        return;
    }
    let d = Dest::start(&["--resume-timeout-s", "2"]);
    // A slow link, so the source dies in the middle of post-copy.
    let mut src = migrate_cmd(
        &d.addr,
        &[
            "--mem",
            "64M",
            "--switchover",
            "immediate",
            "--max-bandwidth",
            "80M",
        ],
    )
    .stdout(Stdio::null())
    .stderr(Stdio::null())
    .spawn()
    .expect("start vm migrate");
    std::thread::sleep(Duration::from_millis(1500));
    let _ = src.kill();
    let _ = src.wait();
    let t = Instant::now();
    let (ok, _, err) = d.finish(Duration::from_secs(30));
    assert!(
        !ok,
        "the destination claimed success without its source: {err}"
    );
    assert!(
        err.contains("did not come back") && err.contains("the guest is stopped"),
        "no clear report: {err}"
    );
    assert!(
        t.elapsed() < Duration::from_secs(15),
        "took {:?}",
        t.elapsed()
    );
}

fn frame(kind: u8, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::new();
    f.extend_from_slice(b"PWMG");
    f.extend_from_slice(&[kind, 0, 0, 0]);
    f.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&xxhash(payload).to_le_bytes());
    f.extend_from_slice(payload);
    f
}

/// The frame module's own checksum of `b`.
fn xxhash(b: &[u8]) -> u64 {
    let mut out = Vec::new();
    migrate::frame::write_frame(&mut out, migrate::frame::Kind::State, &[b]).expect("frame");
    u64::from_le_bytes(out[16..24].try_into().expect("8 bytes"))
}

/// Sends `bytes` on a fresh connection and returns what came back.
fn poke(addr: &str, bytes: &[u8]) -> String {
    let mut s = TcpStream::connect(addr).expect("connect");
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    let _ = s.write_all(bytes);
    let _ = s.shutdown(std::net::Shutdown::Write);
    let mut back = Vec::new();
    let _ = s.read_to_end(&mut back);
    String::from_utf8_lossy(&back).into_owned()
}

#[test]
fn junk_oversized_and_truncated_frames_get_clear_errors() {
    if !common::have_kvm() {
        return;
    }
    let d = Dest::start(&[]);
    let junk = poke(&d.addr, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n");
    assert!(junk.contains("not a pagewire migration frame"), "{junk:?}");
    let mut big = frame(3, &[]);
    big[8..12].copy_from_slice(&(100u32 << 20).to_le_bytes());
    let big = poke(&d.addr, &big);
    assert!(big.contains("larger than the protocol allows"), "{big:?}");
    let mut cut = frame(1, br#"{"protocol":"pagewire-migrate","version":1}"#);
    cut.truncate(cut.len() - 10);
    let cut = poke(&d.addr, &cut);
    assert!(cut.contains("ended inside a frame"), "{cut:?}");
    let bad_sum = {
        let mut f = frame(1, b"{}");
        f[HEADER_SUM] ^= 1;
        poke(&d.addr, &f)
    };
    assert!(bad_sum.contains("checksum"), "{bad_sum:?}");
    let wrong_version = poke(
        &d.addr,
        &frame(
            1,
            br#"{"protocol":"pagewire-migrate","version":9,"role":"main","session":1,"resume":false,"layout":{"mem_bytes":67108864,"vcpus":1,"backing":"anonymous","page_size":4096}}"#,
        ),
    );
    assert!(wrong_version.contains("version 9"), "{wrong_version:?}");
    // A hostile source past the handshake: a page beyond guest memory.
    let hello = |role: &str| {
        frame(
            1,
            format!(r#"{{"protocol":"pagewire-migrate","version":1,"role":"{role}","session":7,"resume":false,"layout":{{"mem_bytes":33554432,"vcpus":1,"backing":"anonymous","page_size":4096}}}}"#).as_bytes(),
        )
    };
    let mut m = TcpStream::connect(&d.addr).expect("connect");
    m.write_all(&hello("main")).expect("hello");
    let mut u = TcpStream::connect(&d.addr).expect("connect");
    u.write_all(&hello("urgent")).expect("hello");
    let mut page = (1u64 << 40).to_le_bytes().to_vec();
    page.extend_from_slice(&[1u8; 4096]);
    m.write_all(&frame(3, &page)).expect("pages");
    let (ok, _, err) = d.finish(Duration::from_secs(30));
    assert!(!ok);
    assert!(err.contains("outside the guest"), "{err}");
    for e in [
        "not a pagewire migration frame",
        "larger than the protocol allows",
        "checksum",
    ] {
        assert!(err.contains(e), "the destination did not log {e:?}: {err}");
    }
}

const HEADER_SUM: usize = 16;

#[test]
fn hostile_destination_gets_a_clear_error_at_the_source() {
    if !common::have_kvm() {
        return;
    }
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = l.local_addr().expect("addr").to_string();
    let t = std::thread::spawn(move || {
        if let Ok((mut s, _)) = l.accept() {
            let mut hello = [0u8; 64];
            let _ = s.read(&mut hello);
            let _ = s.write_all(&[0xffu8; 64]);
        }
    });
    let out = migrate_cmd(&addr, &["--mem", "32M"]).output().expect("run");
    let _ = t.join();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not a pagewire migration frame"), "{err}");
}

/// Two network namespaces joined by a veth pair, removed on drop.
struct Netns {
    a: String,
    b: String,
}

impl Netns {
    fn make() -> Option<Netns> {
        let id = std::process::id();
        let ns = Netns {
            a: format!("pwmig-a-{id}"),
            b: format!("pwmig-b-{id}"),
        };
        let sh = |args: &[&str]| -> bool {
            Command::new("ip")
                .args(args)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        let (va, vb) = (format!("pwa{id}"), format!("pwb{id}"));
        let (va, vb) = (&va[..va.len().min(15)], &vb[..vb.len().min(15)]);
        let ok = sh(&["netns", "add", &ns.a])
            && sh(&["netns", "add", &ns.b])
            && sh(&["link", "add", va, "type", "veth", "peer", "name", vb])
            && sh(&["link", "set", va, "netns", &ns.a])
            && sh(&["link", "set", vb, "netns", &ns.b])
            && sh(&["-n", &ns.a, "addr", "add", "10.219.83.1/30", "dev", va])
            && sh(&["-n", &ns.b, "addr", "add", "10.219.83.2/30", "dev", vb])
            && sh(&["-n", &ns.a, "link", "set", va, "up"])
            && sh(&["-n", &ns.b, "link", "set", vb, "up"])
            && sh(&["-n", &ns.a, "link", "set", "lo", "up"])
            && sh(&["-n", &ns.b, "link", "set", "lo", "up"]);
        if ok {
            Some(ns)
        } else {
            eprintln!("SKIPPED migration over veth: network namespaces or veth pairs cannot be made here (needs root and iproute2)");
            None
        }
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for n in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", n])
                .stderr(Stdio::null())
                .status();
        }
    }
}

#[test]
fn migration_between_two_network_namespaces_over_veth() {
    if !common::have_kvm() {
        return;
    }
    let Some(ns) = Netns::make() else { return };
    let d = Dest::start_in(Some(&ns.b), "10.219.83.2:0", &[]);
    let out = Command::new("ip")
        .args([
            "netns", "exec", &ns.a, BIN, "vm", "migrate", "--to", &d.addr, "--json",
        ])
        .args([
            "--mem",
            "64M",
            "--vcpus",
            "2",
            "--precopy-rounds",
            "1",
            "--downtime-limit-ms",
            "0",
        ])
        .env("PAGEWIRE_LOG", "warn")
        .output()
        .expect("run vm migrate in a namespace");
    let (ok, dout, derr) = d.finish(Duration::from_secs(120));
    assert!(
        out.status.success(),
        "{}\n{}\n{derr}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(ok, "{derr}");
    let s = json(&String::from_utf8_lossy(&out.stdout), "vm migrate");
    assert_eq!(s["verified"], true, "{s}");
    assert_eq!(s["mode"], "precopy+postcopy", "{s}");
    assert_eq!(json(&dout, "vm receive")["verified"], true);
}
