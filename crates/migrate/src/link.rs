//! The link: TCP connections, and the bandwidth limit that makes a slow link
//! testable on one machine (the kernel here has no netem).

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A token bucket over every byte the source sends, on both connections.
/// Urgent pages wait for their tokens too (the link is the link), but
/// ahead of the stream: while one waits, the stream takes no tokens, so a
/// request waits at most for the stream frame already paid for.
#[derive(Debug)]
pub struct Bandwidth {
    /// Bytes per second (None: unlimited).
    rate: Option<u64>,
    state: Mutex<(Instant, f64)>,
    urgent_waiting: AtomicUsize,
}

/// Tokens kept at most: 2 ms of the rate, so a pause does not bank a burst.
const BURST: Duration = Duration::from_millis(2);

impl Bandwidth {
    pub fn new(rate: Option<u64>) -> Bandwidth {
        Bandwidth {
            rate: rate.filter(|r| *r > 0),
            state: Mutex::new((Instant::now(), 0.0)),
            urgent_waiting: AtomicUsize::new(0),
        }
    }

    pub fn rate(&self) -> Option<u64> {
        self.rate
    }

    /// Takes `bytes` of tokens; returns how long to sleep to pay for them.
    fn debit(&self, rate: f64, bytes: usize) -> Duration {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let cap = rate * BURST.as_secs_f64();
        s.1 = (s.1 + now.duration_since(s.0).as_secs_f64() * rate).min(cap);
        s.0 = now;
        s.1 -= bytes as f64;
        if s.1 < 0.0 {
            Duration::from_secs_f64(-s.1 / rate)
        } else {
            Duration::ZERO
        }
    }

    /// The stream: waits until `bytes` may go, behind urgent pages.
    pub fn wait(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        while self.urgent_waiting.load(Ordering::Acquire) > 0 {
            std::thread::sleep(Duration::from_micros(100));
        }
        let d = self.debit(rate as f64, bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
    }

    /// Urgent pages: wait for their tokens ahead of the stream.
    pub fn take(&self, bytes: usize) {
        let Some(rate) = self.rate else { return };
        self.urgent_waiting.fetch_add(1, Ordering::AcqRel);
        let d = self.debit(rate as f64, bytes);
        if !d.is_zero() {
            std::thread::sleep(d);
        }
        self.urgent_waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The nice value of the threads that move post-copy pages (both ends):
/// the same as the pager's serving threads. In post-copy a vCPU that runs
/// needs pages these threads bring, so they go first.
pub const POSTCOPY_NICE: i32 = -10;

/// Sets the calling thread's nice value to [`POSTCOPY_NICE`] (a warning,
/// once, without CAP_SYS_NICE).
pub fn raise_priority() {
    let tid = rustix::thread::gettid();
    if let Err(e) = rustix::process::setpriority_process(Some(tid), POSTCOPY_NICE) {
        static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
        if !WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!("cannot raise the migration threads' priority ({e}): they keep theirs");
        }
    }
}

/// Connects to `to` with a deadline for the whole attempt.
pub fn connect(to: &str, timeout: Duration) -> io::Result<TcpStream> {
    let mut last = io::Error::new(io::ErrorKind::NotFound, format!("{to}: no address"));
    for addr in to.to_socket_addrs()? {
        match TcpStream::connect_timeout(&addr, timeout) {
            Ok(s) => {
                s.set_nodelay(true)?;
                return Ok(s);
            }
            Err(e) => last = e,
        }
    }
    Err(last)
}

/// Parses a bandwidth in bits per second, as links are sold: `1G` is
/// 1 Gbit/s (125,000,000 bytes/s); K, M, G, T are powers of 1000; a bare
/// number is bits/s. Returns bytes per second.
pub fn parse_bandwidth(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t
        .strip_suffix("bit/s")
        .or_else(|| t.strip_suffix("bps"))
        .unwrap_or(t);
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1e3),
        Some('m' | 'M') => (&t[..t.len() - 1], 1e6),
        Some('g' | 'G') => (&t[..t.len() - 1], 1e9),
        Some('t' | 'T') => (&t[..t.len() - 1], 1e12),
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("{s:?} is not a bandwidth (bits per second, e.g. 1G, 500M)"))?;
    let bytes = v * mult / 8.0;
    if !(bytes.is_finite() && bytes >= 1.0) {
        return Err(format!("{s:?}: the bandwidth must be at least 8 bits/s"));
    }
    Ok(bytes as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bandwidth_units() {
        assert_eq!(parse_bandwidth("1G"), Ok(125_000_000));
        assert_eq!(parse_bandwidth("100M"), Ok(12_500_000));
        assert_eq!(parse_bandwidth("8000"), Ok(1000));
        assert!(parse_bandwidth("fast").is_err());
        assert!(parse_bandwidth("0").is_err());
    }

    #[test]
    fn the_bucket_holds_the_rate() {
        let b = Bandwidth::new(Some(10_000_000));
        let t = Instant::now();
        for _ in 0..20 {
            b.wait(100_000);
        }
        // 2 MB at 10 MB/s: about 200 ms (the first 2 ms of burst aside).
        let e = t.elapsed();
        assert!(e >= Duration::from_millis(190), "{e:?}");
    }
}
