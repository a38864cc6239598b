//! `pagewire serve` in a process of its own, clients in others: the
//! harness the serve and hostile-peer tests share.
#![allow(dead_code)] // not every test binary uses every helper

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_pagewire");
pub const MIB: usize = 1 << 20;

/// A memory file: pseudo-random pages, every 7th page zero, and a hole.
pub fn mem_file(dir: &Path, bytes: usize) -> PathBuf {
    let path = dir.join("mem");
    let mut data = vec![0u8; bytes];
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for (i, page) in data.chunks_mut(4096).enumerate() {
        if i % 7 == 2 {
            continue;
        }
        for b in page.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    // A hole in the middle (sparse file): reads as zero.
    let hole = bytes / 2..bytes / 2 + bytes / 8;
    let mut f = std::fs::File::create(&path).expect("create mem file");
    f.write_all(&data[..hole.start]).expect("write");
    f.set_len(hole.end as u64).expect("hole");
    use std::io::Seek;
    f.seek(std::io::SeekFrom::Start(hole.end as u64))
        .expect("seek");
    f.write_all(&data[hole.end..]).expect("write");
    path
}

pub struct Server {
    pub child: Child,
    pub socket: PathBuf,
    pub log: PathBuf,
    pub stats: PathBuf,
}

impl Server {
    pub fn start(dir: &Path, mem: &Path, extra: &[&str]) -> Server {
        Self::start_with_fd_limits(dir, mem, extra, None)
    }

    /// Starts `serve --source URL` (an image, an object in S3).
    pub fn start_source(dir: &Path, url: &str, extra: &[&str]) -> Server {
        Self::spawn(dir, &["--source", url], extra, None, &[])
    }

    /// `start_source`, with `env` added to the server's environment.
    pub fn start_source_env(
        dir: &Path,
        url: &str,
        extra: &[&str],
        env: &[(String, String)],
    ) -> Server {
        Self::spawn(dir, &["--source", url], extra, None, env)
    }

    /// Starts `serve` with the soft and hard `RLIMIT_NOFILE` given, if any.
    pub fn start_with_fd_limits(
        dir: &Path,
        mem: &Path,
        extra: &[&str],
        limits: Option<(u64, u64)>,
    ) -> Server {
        let mem = mem.to_string_lossy();
        Self::spawn(dir, &["--mem-file", &mem], extra, limits, &[])
    }

    fn spawn(
        dir: &Path,
        source: &[&str],
        extra: &[&str],
        limits: Option<(u64, u64)>,
        env: &[(String, String)],
    ) -> Server {
        let socket = dir.join("uffd.sock");
        let log = dir.join("serve.log");
        let stats = dir.join("stats.jsonl");
        let mut cmd = match limits {
            Some((soft, hard)) => {
                let mut c = Command::new("sh");
                c.arg("-c")
                    .arg(format!(
                        "ulimit -Sn {soft} && ulimit -Hn {hard} && exec \"$0\" \"$@\""
                    ))
                    .arg(BIN);
                c
            }
            None => Command::new(BIN),
        };
        let child = cmd
            .arg("serve")
            .arg("--socket")
            .arg(&socket)
            .args(source)
            .arg("--stats-json")
            .arg(&stats)
            .args(extra)
            .env("PAGEWIRE_LOG", "info")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(std::fs::File::create(&log).expect("log"))
            .spawn()
            .expect("spawn serve");
        let mut server = Server {
            child,
            socket,
            log,
            stats,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while !server.socket.exists() {
            assert!(
                Instant::now() < deadline && server.alive(),
                "server did not listen; log:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
        server
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_log(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.log().contains(needle) {
            assert!(
                Instant::now() < deadline,
                "server log never said {needle:?}; log:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Lines the server has logged so far.
    pub fn log_lines(&self) -> usize {
        self.log().lines().count()
    }

    /// CPU time (user + system) the server has used so far, in seconds.
    pub fn cpu_seconds(&self) -> f64 {
        let stat =
            std::fs::read_to_string(format!("/proc/{}/stat", self.child.id())).unwrap_or_default();
        let after = stat.rfind(')').map_or("", |i| &stat[i + 1..]);
        let fields: Vec<&str> = after.split_whitespace().collect();
        // utime and stime are fields 14 and 15; `after` starts at field 3.
        let ticks: u64 = [11, 12]
            .iter()
            .filter_map(|&i| fields.get(i).and_then(|f| f.parse::<u64>().ok()))
            .sum();
        ticks as f64 / rustix::param::clock_ticks_per_second() as f64
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// The whole lines of the stats file (one being written may be read
    /// cut short: only lines that end in a newline count).
    pub fn stats_lines(&self) -> Vec<serde_json::Value> {
        let text = std::fs::read_to_string(&self.stats).unwrap_or_default();
        let whole = match text.rfind('\n') {
            Some(i) => &text[..=i],
            None => "",
        };
        whole
            .lines()
            .map(|l| serde_json::from_str(l).expect("stats line is JSON"))
            .collect()
    }

    pub fn wait_stats(&self, n: usize) -> Vec<serde_json::Value> {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let lines = self.stats_lines();
            if lines.len() >= n {
                return lines;
            }
            assert!(
                Instant::now() < deadline,
                "only {} stats lines; log:\n{}",
                lines.len(),
                self.log()
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub fn client(server: &Server, mem: &Path, args: &[&str]) -> Command {
    let mut c = Command::new(BIN);
    c.arg("fc-client")
        .arg("--socket")
        .arg(&server.socket)
        .arg("--mem-file")
        .arg(mem)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    c
}

pub fn report(out: &Output) -> serde_json::Value {
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| {
        panic!(
            "client report is not JSON ({e}): stdout {stdout}\nstderr {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}

pub fn run_ok(server: &Server, mem: &Path, args: &[&str]) -> serde_json::Value {
    let out = client(server, mem, args).output().expect("run client");
    verified(&out, &server.log())
}

/// The report of a client that succeeded and found every byte right (else
/// a failure that shows the server's `log`).
pub fn verified(out: &Output, log: &str) -> serde_json::Value {
    let r = report(out);
    assert!(
        out.status.success(),
        "client failed: {r}\nstderr {}\nserver log:\n{log}",
        String::from_utf8_lossy(&out.stderr),
    );
    assert_eq!(r["mismatched_pages"], 0, "{r}");
    r
}

/// 10 MiB that never becomes a complete JSON value (an unterminated string).
pub fn junk() -> Vec<u8> {
    let mut v = b"[{\"base_host_virt_addr\":\"".to_vec();
    v.resize(10 * MIB, b'a');
    v
}

/// Sends `data` with an optional fd, then waits for the server to close.
pub fn send_raw(socket: &Path, data: &[u8], fd: Option<std::os::fd::BorrowedFd<'_>>) {
    let stream = UnixStream::connect(socket).expect("connect");
    let fds = fd.map(|f| [f]);
    let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
    if let Some(fds) = &fds {
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(fds)));
    }
    let first = data.len().min(64 * 1024);
    let _ = rustix::net::sendmsg(
        &stream,
        &[std::io::IoSlice::new(&data[..first])],
        &mut control,
        rustix::net::SendFlags::NOSIGNAL,
    );
    let mut s = &stream;
    let _ = s.write_all(&data[first..]);
    let _ = stream.shutdown(std::net::Shutdown::Write);
    // The server closes a rejected connection: read sees EOF (or a reset).
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let mut b = [0u8; 1];
    let _ = (&stream).read(&mut b);
}
