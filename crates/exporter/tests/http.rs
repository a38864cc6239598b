mod common;

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{check_histograms, parse, two_vms};
use pagewire_exporter::{spawn, MetricsServer, MAX_REQUEST_BYTES};

fn server() -> MetricsServer {
    let addr: SocketAddr = "127.0.0.1:0".parse().expect("an address");
    spawn(addr, two_vms).expect("the endpoint starts")
}

/// Sends `request` raw, reads to EOF, returns (status line, headers, body).
fn exchange(addr: SocketAddr, request: &[u8]) -> (String, String, String) {
    let mut s = TcpStream::connect(addr).expect("connects");
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    s.write_all(request).expect("sends the request");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).expect("reads the response");
    let raw = String::from_utf8(raw).expect("utf-8 response");
    let (head, body) = raw.split_once("\r\n\r\n").expect("headers end");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}

fn get(addr: SocketAddr, path: &str) -> (String, String, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/plain\r\n\r\n");
    exchange(addr, req.as_bytes())
}

#[test]
fn get_metrics_answers_200_with_the_exposition() {
    let srv = server();
    let (status, headers, body) = get(srv.local_addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        headers.contains("Content-Type: text/plain; version=0.0.4; charset=utf-8"),
        "{headers}"
    );
    assert!(
        headers.contains(&format!("Content-Length: {}", body.len())),
        "{headers}"
    );
    let exp = parse(&body).unwrap_or_else(|e| panic!("parses: {e}\n{body}"));
    assert_eq!(exp.value("pagewire_vms", &[]), 2.0);
    assert_eq!(
        exp.value("pagewire_vm_faults_total", &[("name", "web")]),
        100.0
    );
    check_histograms(&exp, "pagewire_vm_fault_latency_seconds");
    srv.shutdown();
}

#[test]
fn other_paths_and_methods_are_refused() {
    let srv = server();
    let addr = srv.local_addr();
    let (status, _, _) = get(addr, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = get(addr, "/metrics/x");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, headers, _) =
        exchange(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 405 Method Not Allowed");
    assert!(headers.contains("Allow: GET, HEAD"), "{headers}");
    let (status, _, _) = exchange(addr, b"nonsense\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 400 Bad Request");
    let (status, headers, body) = exchange(addr, b"HEAD /metrics HTTP/1.1\r\n\r\n");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(headers.contains("Content-Length: "), "{headers}");
    assert!(body.is_empty(), "HEAD has no body");
}

#[test]
fn an_oversized_request_is_refused() {
    let srv = server();
    let mut req = b"GET /metrics HTTP/1.1\r\nX: ".to_vec();
    req.resize(MAX_REQUEST_BYTES + 100, b'a');
    let (status, _, _) = exchange(srv.local_addr(), &req);
    assert_eq!(status, "HTTP/1.1 431 Request Header Fields Too Large");
}

#[test]
fn a_silent_client_does_not_block_scrapes() {
    let calls = Arc::new(AtomicU64::new(0));
    let srv = {
        let calls = calls.clone();
        spawn("127.0.0.1:0".parse().expect("an address"), move || {
            calls.fetch_add(1, Ordering::SeqCst);
            two_vms()
        })
        .expect("the endpoint starts")
    };
    let addr = srv.local_addr();
    // Clients that connect and say nothing, or half a request.
    let mut idle: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(addr).expect("connects"))
        .collect();
    idle[0].write_all(b"GET /metr").expect("half a request");
    let start = Instant::now();
    let (status, _, _) = get(addr, "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
    assert!(
        start.elapsed() < Duration::from_secs(1),
        "answered at once: {:?}",
        start.elapsed()
    );
    // The silent ones are dropped after the read deadline.
    let mut buf = [0u8; 256];
    idle[1]
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("read timeout");
    let t = Instant::now();
    let n = idle[1].read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "closed by the deadline: {:?}",
        t.elapsed()
    );
    assert_eq!(calls.load(Ordering::SeqCst), 1);
}

#[test]
fn a_panicking_callback_answers_500_and_the_server_lives_on() {
    let n = Arc::new(AtomicU64::new(0));
    let srv = {
        let n = n.clone();
        spawn("127.0.0.1:0".parse().expect("an address"), move || {
            if n.fetch_add(1, Ordering::SeqCst) == 0 {
                panic!("first scrape fails");
            }
            two_vms()
        })
        .expect("the endpoint starts")
    };
    let (status, _, _) = get(srv.local_addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 500 Internal Server Error");
    let (status, _, _) = get(srv.local_addr(), "/metrics");
    assert_eq!(status, "HTTP/1.1 200 OK");
}

#[test]
fn shutdown_stops_listening_and_a_taken_port_is_an_error() {
    let srv = server();
    let addr = srv.local_addr();
    let again = spawn(addr, two_vms);
    assert!(again.is_err(), "the port is taken");
    let msg = again.err().map(|e| e.to_string()).unwrap_or_default();
    assert!(msg.contains(&addr.to_string()), "{msg}");
    srv.shutdown();
    // The listener is closed: a connection is refused (or, at worst,
    // closed unanswered).
    if let Ok(mut s) = TcpStream::connect(addr) {
        let _ = s.write_all(b"GET /metrics HTTP/1.1\r\n\r\n");
        let mut buf = Vec::new();
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("read timeout");
        let _ = s.read_to_end(&mut buf);
        assert!(buf.is_empty(), "no answer after shutdown");
    }
}
