//! Test scaffolding (not part of the API): an S3-compatible server for
//! tests (`moto_server`, from the Python package `moto[server]`), seeded
//! randomness. Other crates' tests use it too.
//!
//! The server is a child process that can never outlive the test process:
//! it is started by a small shell that holds a pipe from the test process
//! and kills the server when that pipe closes, which happens when the
//! [`MotoServer`] is dropped and also when the test process dies in any way
//! (a panic, an abort, SIGKILL). Dropping it also waits for the shell.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use crate::S3Options;

/// The message printed when the server is missing.
pub const SKIP_MESSAGE: &str = "SKIPPED: moto_server not found (pip install 'moto[server]')";

/// A running `moto_server` on 127.0.0.1, killed when dropped.
#[derive(Debug)]
pub struct MotoServer {
    child: Child,
    /// Closing it makes the shell kill the server.
    stdin: Option<ChildStdin>,
    port: u16,
    log: PathBuf,
}

fn find_in_path(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(name))
        .find(|p| p.is_file())
}

/// Whether a missing server fails the test (`PAGEWIRE_REQUIRE_KVM=1`, as CI
/// sets: a skip there would hide a missing install step).
pub fn required() -> bool {
    std::env::var("PAGEWIRE_REQUIRE_KVM").is_ok_and(|v| v == "1")
}

impl MotoServer {
    /// Starts a server on a free port and waits until it answers. `None`
    /// (after printing [`SKIP_MESSAGE`]) when `moto_server` is not
    /// installed, unless [`required`], then it panics. Panics when the
    /// server does not come up (with its log).
    pub fn start() -> Option<MotoServer> {
        if find_in_path("moto_server").is_none() {
            if required() {
                panic!("{SKIP_MESSAGE}, and PAGEWIRE_REQUIRE_KVM=1 makes that a failure");
            }
            println!("{SKIP_MESSAGE}");
            return None;
        }
        for _ in 0..3 {
            let port = free_port();
            let log_path = std::env::temp_dir()
                .join(format!("pagewire-moto-{}-{port}.log", std::process::id()));
            let log = log_path.clone();
            // `read` returns at EOF: when the test drops the server, or
            // dies, the pipe closes and the server is killed.
            // The shell ignores Ctrl-C and hang-ups (a background job of a
            // shell without job control ignores SIGINT too, so the server
            // would outlive a shell that died of it): only the pipe's end
            // stops it, and then the server too.
            let script = r#"trap '' INT QUIT HUP
moto_server -H 127.0.0.1 -p "$1" >"$2" 2>&1 &
pid=$!
read _ignored
kill -KILL "$pid" 2>/dev/null
wait "$pid" 2>/dev/null
exit 0"#;
            let mut child = Command::new("sh")
                .arg("-c")
                .arg(script)
                .arg("sh")
                .arg(port.to_string())
                .arg(&log_path)
                .stdin(Stdio::piped())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("start sh for moto_server");
            let stdin = child.stdin.take();
            let mut server = MotoServer {
                child,
                stdin,
                port,
                log,
            };
            if server.wait_ready(Duration::from_secs(60)) {
                return Some(server);
            }
            let log = server.log_text();
            drop(server);
            if !log.contains("Address already in use") {
                panic!("moto_server did not come up on port {port}; its log:\n{log}");
            }
        }
        panic!("moto_server could not find a free port");
    }

    /// A server shared by the tests of this process that run at once
    /// (started by the first, stopped when the last drops it): one Python
    /// server instead of one per test on a small machine.
    pub fn shared() -> Option<Arc<MotoServer>> {
        static SHARED: Mutex<Weak<MotoServer>> = Mutex::new(Weak::new());
        let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = shared.upgrade() {
            return Some(s);
        }
        let s = Arc::new(MotoServer::start()?);
        *shared = Arc::downgrade(&s);
        Some(s)
    }

    fn wait_ready(&mut self, limit: Duration) -> bool {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return false;
            }
            if let Ok((status, _)) = http(self.port, "GET", "/", Duration::from_secs(2)) {
                if status > 0 {
                    return true;
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        false
    }

    fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `http://127.0.0.1:PORT`.
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// Client settings for this server (region us-east-1, dummy keys).
    pub fn options(&self) -> S3Options {
        S3Options {
            endpoint: Some(self.endpoint()),
            region: Some("us-east-1".to_string()),
            access_key_id: Some("testing".to_string()),
            secret_access_key: Some("testing".to_string()),
            session_token: None,
        }
    }

    /// The AWS environment a child process (`pagewire serve`, `image
    /// push`) needs to reach this server.
    pub fn env(&self) -> Vec<(String, String)> {
        let o = self.options();
        let mut env = vec![
            ("AWS_ENDPOINT_URL".to_string(), self.endpoint()),
            ("AWS_ALLOW_HTTP".to_string(), "true".to_string()),
        ];
        for (k, v) in [
            ("AWS_REGION", o.region),
            ("AWS_ACCESS_KEY_ID", o.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", o.secret_access_key),
        ] {
            if let Some(v) = v {
                env.push((k.to_string(), v));
            }
        }
        env
    }

    /// Creates bucket `name` (an unsigned CreateBucket, which moto
    /// accepts: object_store cannot create buckets). Panics on failure.
    pub fn create_bucket(&self, name: &str) {
        let (status, body) = http(
            self.port,
            "PUT",
            &format!("/{name}"),
            Duration::from_secs(30),
        )
        .expect("CreateBucket request");
        assert_eq!(status, 200, "CreateBucket {name}: {body}");
    }

    /// Stops the server now (the same as dropping it): later requests fail
    /// to connect.
    pub fn stop(&mut self) {
        self.stdin.take();
        let _ = self.child.wait();
    }
}

impl Drop for MotoServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

/// A minimal HTTP/1.1 request (test scaffolding only): the status and body.
fn http(port: u16, method: &str, path: &str, timeout: Duration) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    )?;
    let mut out = String::new();
    s.read_to_string(&mut out)?;
    let status = out
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = out
        .split_once("\r\n\r\n")
        .map_or("", |(_, b)| b)
        .to_string();
    Ok((status, body))
}

/// A bucket name no other test in this process uses.
pub fn unique_bucket(prefix: &str) -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    format!(
        "{prefix}-{}-{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    )
}

/// A small seeded generator (xorshift64*): tests print the seed, and
/// `PAGEWIRE_SEED` replays one.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// Seeded from `PAGEWIRE_SEED` or the clock; prints the seed with
    /// `what`.
    pub fn new(what: &str) -> Rng {
        let seed = std::env::var("PAGEWIRE_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        println!("{what}: seed {seed} (PAGEWIRE_SEED={seed} replays it)");
        Rng::seeded(seed)
    }

    /// From a given seed.
    pub fn seeded(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// The next number.
    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    /// A number below `n` (`n` > 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    /// Fills `buf` with random bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for chunk in buf.chunks_mut(8) {
            let v = self.next_u64().to_le_bytes();
            chunk.copy_from_slice(&v[..chunk.len()]);
        }
    }
}
