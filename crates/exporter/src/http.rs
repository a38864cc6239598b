//! A small HTTP/1.x responder for `GET /metrics`, on `std::net` alone.

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

use crate::{encode::encode_owned, MetricsError, ServerSample};

/// Connections served at once; further ones are closed unanswered.
pub const MAX_CONNECTIONS: usize = 8;
/// The most a request line and its headers may take.
pub const MAX_REQUEST_BYTES: usize = 8 * 1024;
/// How long a client has to send its whole request.
pub const READ_DEADLINE: Duration = Duration::from_secs(2);
/// How long a client has to take the whole response.
pub const WRITE_DEADLINE: Duration = Duration::from_secs(5);

/// The running endpoint. Dropping it (or [`MetricsServer::shutdown`]) stops
/// accepting connections; a scrape being answered finishes on its own
/// thread within the deadlines.
#[derive(Debug)]
pub struct MetricsServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl MetricsServer {
    /// The address the endpoint listens on (the real port when `spawn` was
    /// given port 0).
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Stops accepting connections and waits for the accept thread.
    pub fn shutdown(mut self) {
        self.stop_accepting();
    }

    fn stop_accepting(&mut self) {
        let Some(thread) = self.thread.take() else {
            return;
        };
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept with a connection of our own.
        let mut wake = self.addr;
        if wake.ip().is_unspecified() {
            wake.set_ip(match wake.ip() {
                IpAddr::V4(_) => IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(_) => IpAddr::V6(Ipv6Addr::LOCALHOST),
            });
        }
        match TcpStream::connect_timeout(&wake, Duration::from_secs(1)) {
            Ok(_) => {
                if thread.join().is_err() {
                    tracing::warn!("the metrics accept thread panicked");
                }
            }
            Err(e) => {
                tracing::warn!(addr = %wake, error = %e, "cannot wake the metrics accept thread; leaving it")
            }
        }
    }
}

impl Drop for MetricsServer {
    fn drop(&mut self) {
        self.stop_accepting();
    }
}

/// Listens on `addr` and answers `GET /metrics` with `collect()`'s sample,
/// encoded by [`crate::encode`]. `collect` runs on the connection's thread,
/// once per scrape, possibly on several threads at once.
pub fn spawn<F>(addr: SocketAddr, collect: F) -> Result<MetricsServer, MetricsError>
where
    F: Fn() -> ServerSample + Send + Sync + 'static,
{
    let listener = TcpListener::bind(addr).map_err(|source| MetricsError::Bind { addr, source })?;
    let local = listener.local_addr().map_err(MetricsError::LocalAddr)?;
    let stop = Arc::new(AtomicBool::new(false));
    let collect = Arc::new(collect);
    let thread = {
        let stop = stop.clone();
        thread::Builder::new()
            .name("pagewire-metrics".into())
            .spawn(move || accept_loop(listener, stop, collect))
            .map_err(MetricsError::Spawn)?
    };
    tracing::info!(addr = %local, "serving metrics at /metrics");
    Ok(MetricsServer {
        addr: local,
        stop,
        thread: Some(thread),
    })
}

/// Counts a connection's thread while it lives.
struct Slot(Arc<AtomicUsize>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn accept_loop<F>(listener: TcpListener, stop: Arc<AtomicBool>, collect: Arc<F>)
where
    F: Fn() -> ServerSample + Send + Sync + 'static,
{
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            break;
        }
        let stream = match conn {
            Ok(stream) => stream,
            Err(e) => {
                tracing::debug!(error = %e, "metrics accept failed");
                // Out of descriptors and the like: do not spin.
                thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        if active.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            active.fetch_sub(1, Ordering::SeqCst);
            tracing::debug!("too many metrics connections; closing one");
            continue;
        }
        let slot = Slot(active.clone());
        let collect = collect.clone();
        let spawned = thread::Builder::new()
            .name("pagewire-metrics-conn".into())
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = serve(stream, &*collect) {
                    tracing::debug!(error = %e, "metrics connection ended");
                }
            });
        // On failure the closure, and so its slot, is dropped.
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "cannot start a metrics connection thread");
        }
    }
}

/// What a request asked for.
#[derive(Debug, PartialEq)]
enum Route {
    Metrics { head: bool },
    WrongMethod,
    NotFound,
    Bad,
}

fn route(head: &[u8]) -> Route {
    let Ok(text) = std::str::from_utf8(head) else {
        return Route::Bad;
    };
    let line = text.lines().next().unwrap_or_default();
    let mut parts = line.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::Bad;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::Bad;
    }
    let path = target.split(['?', '#']).next().unwrap_or_default();
    // Absolute form (`GET http://host/metrics`), as proxies send it.
    let path = match path.split_once("://") {
        Some((_, rest)) => rest.find('/').map_or("/", |i| &rest[i..]),
        None => path,
    };
    if path != "/metrics" {
        return Route::NotFound;
    }
    match method {
        "GET" => Route::Metrics { head: false },
        "HEAD" => Route::Metrics { head: true },
        _ => Route::WrongMethod,
    }
}

/// Reads up to the end of the headers, within the size bound and deadline.
/// `Ok(None)` when the request is too large.
fn read_head(stream: &mut TcpStream) -> std::io::Result<Option<Vec<u8>>> {
    let deadline = Instant::now() + READ_DEADLINE;
    let mut buf = vec![0u8; MAX_REQUEST_BYTES];
    let mut len = 0;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_read_timeout(Some(left))?;
        let Some(free) = buf.get_mut(len..) else {
            return Ok(None);
        };
        if free.is_empty() {
            return Ok(None);
        }
        let n = match stream.read(free) {
            Ok(0) => return Err(ErrorKind::UnexpectedEof.into()),
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // Look for the blank line from a little before the new bytes.
        let from = len.saturating_sub(3);
        len += n;
        let seen = &buf[from..len];
        if let Some(end) = find_end(seen) {
            buf.truncate(from + end);
            return Ok(Some(buf));
        }
    }
}

/// The end of the headers (`\r\n\r\n`, or a bare `\n\n`), as an index past it.
fn find_end(b: &[u8]) -> Option<usize> {
    b.windows(4)
        .position(|w| w == b"\r\n\r\n")
        .map(|i| i + 4)
        .or_else(|| b.windows(2).position(|w| w == b"\n\n").map(|i| i + 2))
}

/// One response.
struct Reply {
    status: &'static str,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers of the body, not the body.
    head_only: bool,
    extra_headers: &'static str,
}

impl Reply {
    fn text(status: &'static str, body: &str) -> Reply {
        Reply {
            status,
            content_type: "text/plain; charset=utf-8",
            body: body.to_string(),
            head_only: false,
            extra_headers: "",
        }
    }
}

fn respond<F>(head: Option<Vec<u8>>, collect: &F) -> Reply
where
    F: Fn() -> ServerSample,
{
    let Some(head) = head else {
        return Reply::text("431 Request Header Fields Too Large", "request too large\n");
    };
    match route(&head) {
        Route::Metrics { head } => {
            let reply = match catch_unwind(AssertUnwindSafe(collect)).map(encode_owned) {
                Ok(Ok(text)) => Reply {
                    status: "200 OK",
                    content_type: CONTENT_TYPE,
                    body: text,
                    head_only: false,
                    extra_headers: "",
                },
                Ok(Err(e)) => {
                    tracing::warn!(error = %e, "cannot encode metrics");
                    Reply::text("500 Internal Server Error", "cannot encode metrics\n")
                }
                Err(_) => {
                    tracing::warn!("the metrics callback panicked");
                    Reply::text("500 Internal Server Error", "cannot collect metrics\n")
                }
            };
            Reply {
                head_only: head,
                ..reply
            }
        }
        Route::WrongMethod => Reply {
            extra_headers: "Allow: GET, HEAD\r\n",
            ..Reply::text("405 Method Not Allowed", "only GET and HEAD\n")
        },
        Route::NotFound => Reply::text("404 Not Found", "metrics are at /metrics\n"),
        Route::Bad => Reply::text("400 Bad Request", "bad request\n"),
    }
}

fn serve<F>(mut stream: TcpStream, collect: &F) -> std::io::Result<()>
where
    F: Fn() -> ServerSample,
{
    let head = read_head(&mut stream)?;
    let reply = respond(head, collect);
    let mut out = format!(
        "HTTP/1.1 {}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{}Connection: close\r\n\r\n",
        reply.status,
        reply.content_type,
        reply.body.len(),
        reply.extra_headers,
    )
    .into_bytes();
    if !reply.head_only {
        out.extend_from_slice(reply.body.as_bytes());
    }
    write_all_by(&mut stream, &out, Instant::now() + WRITE_DEADLINE)?;
    stream.shutdown(Shutdown::Write)?;
    linger(&mut stream);
    Ok(())
}

/// Reads what the client still sends (a body, the rest of an oversized
/// request) for a moment before closing: closing with unread input makes
/// the kernel reset the connection, which can lose the response.
fn linger(stream: &mut TcpStream) {
    let deadline = Instant::now() + LINGER;
    let mut buf = [0u8; 4096];
    let mut drained = 0;
    while drained < LINGER_BYTES {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() || stream.set_read_timeout(Some(left)).is_err() {
            return;
        }
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => drained += n,
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(_) => return,
        }
    }
}

const LINGER: Duration = Duration::from_millis(250);
const LINGER_BYTES: usize = 64 * 1024;

/// `write_all` that gives up at `deadline`, however slowly the peer reads.
fn write_all_by(stream: &mut TcpStream, mut data: &[u8], deadline: Instant) -> std::io::Result<()> {
    while !data.is_empty() {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ErrorKind::TimedOut.into());
        }
        stream.set_write_timeout(Some(left))?;
        match stream.write(data) {
            Ok(0) => return Err(ErrorKind::WriteZero.into()),
            Ok(n) => data = data.get(n..).unwrap_or_default(),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    stream.flush()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        let r = |s: &str| route(s.as_bytes());
        assert_eq!(
            r("GET /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("GET /metrics?x=1 HTTP/1.0\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("GET http://h:9/metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: false }
        );
        assert_eq!(
            r("HEAD /metrics HTTP/1.1\r\n\r\n"),
            Route::Metrics { head: true }
        );
        assert_eq!(r("POST /metrics HTTP/1.1\r\n\r\n"), Route::WrongMethod);
        assert_eq!(r("GET / HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metricsx HTTP/1.1\r\n\r\n"), Route::NotFound);
        assert_eq!(r("GET /metrics\r\n\r\n"), Route::Bad);
        assert_eq!(r("GET /metrics SPDY/3\r\n\r\n"), Route::Bad);
        assert_eq!(route(b"\xff\xfe /metrics HTTP/1.1\r\n\r\n"), Route::Bad);
    }

    #[test]
    fn finds_the_end_of_headers() {
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"), Some(27));
        assert_eq!(find_end(b"GET / HTTP/1.1\n\n"), Some(16));
        assert_eq!(find_end(b"GET / HTTP/1.1\r\nHost: x\r\n"), None);
    }
}
