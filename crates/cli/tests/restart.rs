//! `serve` in production: VMs served through a SIGKILL of the server and
//! through a live take-over, with faults in flight at the switch, every
//! byte checked; the orphan timeout; socket activation; two snapshots in
//! one server; the metrics endpoint and the report picture.

mod common;

use std::io::{Read, Write};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::server::{client, mem_file, verified, Server, BIN, MIB};

/// The longest time one page access of the client waited.
fn longest_stall_ms(r: &serde_json::Value) -> f64 {
    r["waited_latency"]["max_us"].as_f64().unwrap_or(0.0) / 1000.0
}

/// A client touching every page of 256 MiB in random order, one page per
/// fault (the server maps no more), so that it is mid-touch for seconds.
fn slow_client(server: &Server, mem: &Path, extra: &[&str]) -> Child {
    client(server, mem, &["--threads", "2", "--timeout-s", "60"])
        .args(extra)
        .spawn()
        .expect("spawn client")
}

fn finish(c: Child, server: &Server) -> serde_json::Value {
    let out = c.wait_with_output().expect("client");
    let r = verified(&out, &server.log());
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    r
}

/// The children of `pid` (the supervisor's server).
fn children(pid: u32) -> Vec<u32> {
    let out = Command::new("pgrep")
        .arg("-P")
        .arg(pid.to_string())
        .output()
        .expect("pgrep");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.trim().parse().ok())
        .collect()
}

fn wait_for<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A child process killed when the test ends, passed or not (a server
/// left running would hold the test harness's output open).
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A memory file of `mib` MiB and a server started on it with `args`
/// (`None`, after a visible message, without userfaultfd).
fn setup(mib: usize, args: &[&str]) -> Option<(tempfile::TempDir, std::path::PathBuf, Server)> {
    if !common::have_uffd() {
        return None;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), mib * MIB);
    let server = Server::start(dir.path(), &mem, args);
    Some((dir, mem, server))
}

/// Stops a supervisor the way an operator does (SIGTERM), so that it
/// cleans up after itself.
fn stop(sup: &mut Server) {
    let _ = Command::new("kill")
        .args(["-TERM", &sup.child.id().to_string()])
        .status();
    let deadline = Instant::now() + Duration::from_secs(10);
    while sup.child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = sup.child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// SIGKILLs the server that the supervisor `sup` runs now.
fn kill_supervised(sup: &Server) {
    let pid = wait_for("the supervised server", || {
        children(sup.child.id()).first().copied()
    });
    Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .expect("kill");
}

const ONE_PAGE: [&str; 3] = ["--fixed-cluster", "--cluster-pages", "1"];

#[test]
fn a_vm_is_served_through_a_sigkill_of_its_server() {
    let mut args = vec!["--supervise", "--orphan-timeout-s", "20"];
    args.extend(ONE_PAGE);
    let Some((_dir, mem, mut sup)) = setup(256, &args) else {
        return;
    };
    let c = slow_client(&sup, &mem, &["--balloon", "16M:8M"]);
    sup.wait_log("session started");
    std::thread::sleep(Duration::from_millis(300));
    // Threads of the client are blocked on pages right now.
    kill_supervised(&sup);
    let r = finish(c, &sup);
    let log = sup.log();
    assert!(log.contains("VM served on"), "{log}");
    assert!(log.contains("starting it again"), "{log}");
    assert_eq!(r["balloon_pages_nonzero"], 0, "{r}");
    eprintln!(
        "served through SIGKILL: longest stall {:.1} ms, touch {:.0} ms",
        longest_stall_ms(&r),
        r["touch_ms"].as_f64().unwrap_or(0.0)
    );
    stop(&mut sup);
}

/// The balloon-vs-migration race of the kernel thread behind this project,
/// across a server's death: threads read random pages while another
/// releases runs of them, and the server is killed in the middle. A page
/// released before, during or after the switch must read zero, never
/// snapshot bytes (the client checks every byte; seeded and printed).
#[test]
fn discards_survive_a_sigkill_of_the_server_during_a_balloon_race() {
    let Some((_dir, mem, mut sup)) = setup(64, &["--supervise"]) else {
        return;
    };
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(1, |d| d.as_nanos() as u64 % 1_000_000);
    eprintln!("seed {seed}");
    let c = client(
        &sup,
        &mem,
        &["--balloon-race", "1500", "--seed", &seed.to_string()],
    )
    .spawn()
    .expect("client");
    sup.wait_log("session started");
    for _ in 0..2 {
        std::thread::sleep(Duration::from_millis(400));
        kill_supervised(&sup);
    }
    let r = finish(c, &sup);
    // The kills landed while the VM was served: a new server served it on.
    assert!(sup.log().contains("VM served on"), "{}", sup.log());
    eprintln!(
        "balloon race through two SIGKILLs: longest stall {:.1} ms",
        longest_stall_ms(&r)
    );
    stop(&mut sup);
}

#[test]
fn a_vm_is_served_through_a_live_take_over() {
    let Some((dir, mem, mut old)) = setup(256, &ONE_PAGE) else {
        return;
    };
    // The first VM is mid-touch at the switch; the second races discards
    // against reads across it (its discards must survive the hand-over).
    let c = slow_client(&old, &mem, &[]);
    old.wait_log("session started");
    let racer = client(&old, &mem, &["--balloon-race", "1500", "--seed", "13"])
        .spawn()
        .expect("racer");
    // Both are served by the old server before the switch, however slow
    // the machine is to start a process.
    wait_for("the racer's session", || {
        (old.log().matches("session started").count() >= 2).then_some(())
    });
    std::thread::sleep(Duration::from_millis(300));
    let control = old.socket.with_extension("sock.control");
    let new_log = dir.path().join("new.log");
    let new = Reap(
        Command::new(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(&old.socket)
            .arg("--mem-file")
            .arg(&mem)
            .args(ONE_PAGE)
            .arg("--take-over")
            .arg(&control)
            .env("PAGEWIRE_LOG", "info")
            .stderr(std::fs::File::create(&new_log).expect("log"))
            .spawn()
            .expect("spawn the successor"),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = old.child.try_wait().expect("old server") {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the old server did not exit after a take-over:\n{}",
            old.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "the old server exits after handing over: {status}"
    );
    let r = finish(c, &old);
    finish(racer, &old);
    let log = std::fs::read_to_string(&new_log).unwrap_or_default();
    assert_eq!(log.matches("VM served on").count(), 2, "{log}");
    eprintln!(
        "served through a take-over: longest stall {:.1} ms",
        longest_stall_ms(&r)
    );
    // The successor accepts new VMs on the same socket.
    let out = client(&old, &mem, &["--balloon", "0:4M"])
        .output()
        .expect("client");
    verified(&out, &std::fs::read_to_string(&new_log).unwrap_or_default());
    drop(new);
}

#[test]
fn a_vm_no_server_takes_back_is_killed_after_the_orphan_timeout() {
    let mut args = vec!["--supervise", "--orphan-timeout-s", "1"];
    args.extend(ONE_PAGE);
    let Some((dir, mem, mut sup)) = setup(256, &args) else {
        return;
    };
    let c = slow_client(&sup, &mem, &[]);
    sup.wait_log("session started");
    // The server cannot come back: its memory file is gone.
    std::fs::rename(&mem, dir.path().join("moved")).expect("rename");
    kill_supervised(&sup);
    let started = Instant::now();
    let out = c.wait_with_output().expect("client");
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(
        out.status.signal(),
        Some(9),
        "the VMM is killed, not left hanging: {:?}\n{}",
        out.status,
        sup.log()
    );
    assert!(started.elapsed() < Duration::from_secs(15));
    sup.wait_log("VM killed: no page server took it over");
    stop(&mut sup);
}

#[test]
fn socket_activation_by_systemd_socket_activate() {
    if !common::have_uffd() {
        return;
    }
    if Command::new("systemd-socket-activate")
        .arg("--help")
        .stdout(Stdio::null())
        .status()
        .is_err()
    {
        if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("systemd-socket-activate required (apt-get install systemd)");
        }
        eprintln!("SKIPPED: systemd-socket-activate is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 16 * MIB);
    let socket = dir.path().join("activated.sock");
    let log = dir.path().join("serve.log");
    // The socket is systemd's: it exists before the server runs, and the
    // server gets it as LISTEN_FDS=1 with LISTEN_FDNAMES.
    let act = Reap(
        Command::new("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg("--fdname=listen.default")
            .arg(BIN)
            .arg("serve")
            .arg("--socket")
            .arg(dir.path().join("unused.sock"))
            .arg("--mem-file")
            .arg(&mem)
            .env("PAGEWIRE_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("systemd-socket-activate"),
    );
    wait_for("the activated socket", || socket.exists().then_some(()));
    let out = Command::new(BIN)
        .arg("fc-client")
        .arg("--socket")
        .arg(&socket)
        .arg("--mem-file")
        .arg(&mem)
        .output()
        .expect("client");
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    verified(&out, &text);
    assert!(
        !dir.path().join("unused.sock").exists(),
        "the activated socket was used, not a new one:\n{text}"
    );
    drop(act);
}

/// A second memory file, unlike the first.
fn other_mem(dir: &Path, bytes: usize) -> std::path::PathBuf {
    let p = dir.join("other.mem");
    let data: Vec<u8> = (0..bytes).map(|i| (i * 7 + i / 4096) as u8).collect();
    std::fs::write(&p, data).expect("write");
    p
}

#[test]
fn two_snapshots_are_served_by_one_server_to_two_vms_at_once() {
    if !common::have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = dir.path().join("snapshots");
    std::fs::create_dir(&snaps).expect("mkdir");
    let a = mem_file(dir.path(), 32 * MIB);
    std::fs::rename(&a, snaps.join("alpha.mem")).expect("move");
    let b = other_mem(dir.path(), 16 * MIB);
    std::fs::rename(&b, snaps.join("beta.mem")).expect("move");
    let socks = dir.path().join("sockets");
    let log = dir.path().join("serve.log");
    let metrics = free_port();
    let stats = dir.path().join("stats.jsonl");
    let server = Reap(
        Command::new(BIN)
            .arg("serve")
            .arg("--snapshot-dir")
            .arg(&snaps)
            .arg("--socket-dir")
            .arg(&socks)
            .arg("--metrics")
            .arg(format!("127.0.0.1:{metrics}"))
            .arg("--stats-json")
            .arg(&stats)
            .env("PAGEWIRE_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("serve"),
    );
    let (sa, sb) = (socks.join("alpha.sock"), socks.join("beta.sock"));
    wait_for("both sockets", || {
        (sa.exists() && sb.exists()).then_some(())
    });
    let run = |sock: &Path, mem: &Path, hold: &str| {
        Command::new(BIN)
            .arg("fc-client")
            .arg("--socket")
            .arg(sock)
            .arg("--mem-file")
            .arg(mem)
            .args(["--hold-ms", hold])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("client")
    };
    let ca = run(&sa, &snaps.join("alpha.mem"), "4000");
    let cb = run(&sb, &snaps.join("beta.mem"), "4000");
    // Scraped until both VMs are served at once (they hold after verifying).
    let (text, m) = wait_for("both VMs in the metrics", || {
        let text = scrape(metrics);
        let m = parse_metrics(&text);
        let live = m
            .iter()
            .filter(|(n, _, v)| n == "pagewire_vm_faults_total" && *v > 0.0)
            .count();
        (live == 2).then_some((text, m))
    });
    let vms = m
        .iter()
        .filter(|(n, _, _)| n == "pagewire_vm_faults_total")
        .collect::<Vec<_>>();
    assert_eq!(vms.len(), 2, "two VMs in the metrics:\n{text}");
    for (_, labels, v) in &vms {
        assert!(*v > 0.0, "{labels} faulted");
    }
    assert!(vms.iter().any(|(_, l, _)| l.contains("snapshot=\"alpha\"")));
    assert!(vms.iter().any(|(_, l, _)| l.contains("snapshot=\"beta\"")));
    let count = m
        .iter()
        .find(|(n, l, _)| n == "pagewire_fault_latency_seconds_count" && l.is_empty())
        .map(|x| x.2)
        .expect("latency count");
    let inf = m
        .iter()
        .find(|(n, l, _)| n == "pagewire_fault_latency_seconds_bucket" && l.contains("+Inf"))
        .map(|x| x.2)
        .expect("+Inf bucket");
    assert_eq!(count, inf, "{text}");
    for c in [ca, cb] {
        let out = c.wait_with_output().expect("client");
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        verified(&out, &text);
    }
    // The picture of what the two restores did.
    wait_for("two stats lines", || {
        let s = std::fs::read_to_string(&stats).unwrap_or_default();
        (s.matches('\n').count() >= 2).then_some(())
    });
    let svg = dir.path().join("report.svg");
    let out = Command::new(BIN)
        .arg("report")
        .arg(&stats)
        .arg("-o")
        .arg(&svg)
        .output()
        .expect("report");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let picture = std::fs::read_to_string(&svg).expect("svg");
    assert!(picture.contains("<svg") && picture.contains("alpha") && picture.contains("beta"));
    drop(server);
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn scrape(port: u16) -> String {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .expect("send");
    let mut out = String::new();
    s.read_to_string(&mut out).expect("read");
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    out.split_once("\r\n\r\n")
        .map(|x| x.1.to_string())
        .unwrap_or_default()
}

/// Samples of the text format: (name, labels, value).
fn parse_metrics(text: &str) -> Vec<(String, String, f64)> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').expect("a sample line");
            let (name, labels) = match series.split_once('{') {
                Some((n, rest)) => (n.to_string(), rest.trim_end_matches('}').to_string()),
                None => (series.to_string(), String::new()),
            };
            let v = match value {
                "+Inf" => f64::INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("value of {l:?}")),
            };
            (name, labels, v)
        })
        .collect()
}

/// A server whose VMs have a keeper refuses a take-over (its keeper would
/// start another server on them) and serves on; the successor says why.
#[test]
fn a_supervised_server_refuses_a_take_over_and_serves_on() {
    let Some((dir, mem, mut sup)) = setup(64, &["--supervise"]) else {
        return;
    };
    let c = client(&sup, &mem, &["--hold-ms", "1000"])
        .spawn()
        .expect("client");
    sup.wait_log("session started");
    let out = Command::new(BIN)
        .arg("serve")
        .arg("--socket")
        .arg(dir.path().join("other.sock"))
        .arg("--mem-file")
        .arg(&mem)
        .arg("--take-over")
        .arg(sup.socket.with_extension("sock.control"))
        .output()
        .expect("successor");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{err}");
    assert!(err.contains("refused") && err.contains("SIGUSR2"), "{err}");
    finish(c, &sup);
    stop(&mut sup);
}

/// SIGHUP reads the snapshot directory again: a new snapshot gets its
/// socket; logs can be JSON.
#[test]
fn sighup_adds_a_snapshot_and_logs_can_be_json() {
    if !common::have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let snaps = dir.path().join("snapshots");
    std::fs::create_dir(&snaps).expect("mkdir");
    let a = mem_file(dir.path(), 8 * MIB);
    std::fs::rename(&a, snaps.join("first.mem")).expect("move");
    let socks = dir.path().join("sockets");
    let log = dir.path().join("serve.log");
    let server = Reap(
        Command::new(BIN)
            .args(["--log-format", "json", "serve"])
            .arg("--snapshot-dir")
            .arg(&snaps)
            .arg("--socket-dir")
            .arg(&socks)
            .env("PAGEWIRE_LOG", "info")
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("serve"),
    );
    wait_for("the first socket", || {
        socks.join("first.sock").exists().then_some(())
    });
    let b = other_mem(dir.path(), 4 * MIB);
    std::fs::rename(&b, snaps.join("second.mem")).expect("move");
    Command::new("kill")
        .args(["-HUP", &server.0.id().to_string()])
        .status()
        .expect("kill");
    let second = socks.join("second.sock");
    wait_for("the second socket", || second.exists().then_some(()));
    let out = Command::new(BIN)
        .arg("fc-client")
        .arg("--socket")
        .arg(&second)
        .arg("--mem-file")
        .arg(snaps.join("second.mem"))
        .output()
        .expect("client");
    verified(&out, &std::fs::read_to_string(&log).unwrap_or_default());
    drop(server);
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let mut lines = 0;
    for line in text.lines() {
        let v: serde_json::Value =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        assert!(v["level"].is_string() && v["fields"].is_object(), "{line}");
        lines += 1;
    }
    assert!(lines >= 3, "{text}");
}

/// An upgrade under the supervisor (SIGUSR2): the server is asked to stop,
/// stops its serving threads with every event it read in the page states,
/// and a new one serves on; the guest races discards against reads across
/// it, every byte checked.
#[test]
fn an_upgrade_by_sigusr2_under_the_supervisor_loses_nothing() {
    let Some((_dir, mem, mut sup)) = setup(64, &["--supervise"]) else {
        return;
    };
    let c = client(&sup, &mem, &["--balloon-race", "1500", "--seed", "7"])
        .spawn()
        .expect("client");
    sup.wait_log("session started");
    std::thread::sleep(Duration::from_millis(500));
    Command::new("kill")
        .args(["-USR2", &sup.child.id().to_string()])
        .status()
        .expect("kill");
    let r = finish(c, &sup);
    let log = sup.log();
    assert!(
        log.contains("SIGUSR2") && log.contains("VM served on"),
        "{log}"
    );
    eprintln!(
        "served through an upgrade: longest stall {:.1} ms",
        longest_stall_ms(&r)
    );
    stop(&mut sup);
}

/// systemd's own protocol end to end, where systemd cannot run here (not
/// PID 1): `fake_systemd.py` binds the socket (activation), starts the
/// server with LISTEN_FDS/LISTEN_FDNAMES/LISTEN_PID and NOTIFY_SOCKET,
/// keeps what it stores, SIGKILLs it while a VM touches memory and starts it
/// again with everything kept; every byte is checked.
#[test]
fn systemd_fd_store_and_socket_activation_through_a_sigkill() {
    if !common::have_uffd() {
        return;
    }
    if Command::new("python3").arg("--version").output().is_err() {
        if std::env::var("PAGEWIRE_REQUIRE_KVM").as_deref() == Ok("1") {
            panic!("python3 is required for the systemd protocol test");
        }
        eprintln!("SKIPPED: python3 is not installed");
        return;
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let mem = mem_file(dir.path(), 256 * MIB);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fake_systemd.py");
    let out = Command::new("python3")
        .arg(&script)
        .arg(BIN)
        .arg(dir.path())
        .arg(&mem)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    eprintln!("{}", String::from_utf8_lossy(&out.stdout));
}
