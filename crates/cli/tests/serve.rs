//! `pagewire serve` end to end: a real server process, clients in other
//! processes playing Firecracker's side (`pagewire fc-client`), and hostile
//! peers speaking raw sockets. Needs userfaultfd (root here): skips with a
//! message otherwise, unless PAGEWIRE_REQUIRE_KVM=1 (CI), where a skip fails.

use std::io::Write;
use std::os::fd::AsFd;
use std::os::unix::net::UnixStream;
use std::process::Command;

mod common;
use common::have_uffd;
use common::server::*;

#[test]
fn serves_every_byte_one_and_three_regions() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 16 * MIB);
    let server = Server::start(dir.path(), &mem, &[]);
    let r = run_ok(&server, &mem, &["--regions", "1", "--threads", "2"]);
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    let r = run_ok(
        &server,
        &mem,
        &["--regions", "3", "--threads", "3", "--write-check"],
    );
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    let stats = server.wait_stats(2);
    let pages = (16 * MIB / 4096) as u64;
    for s in &stats {
        let st = &s["stats"];
        let mapped =
            st["pages_copied"].as_u64().unwrap_or(0) + st["pages_zeroed"].as_u64().unwrap_or(0);
        assert_eq!(mapped, pages, "every page mapped exactly once: {s}");
        assert!(
            st["pages_zeroed"].as_u64().unwrap_or(0) >= pages / 8,
            "zero pages and the hole use ZEROPAGE: {s}"
        );
        assert_eq!(st["errors"], 0, "{s}");
        assert!(s["pid"].as_u64().is_some(), "peer pid logged: {s}");
    }
    assert!(server.log().contains("VM connected"));
}

#[test]
fn balloon_after_serving_reads_zero_and_keeps_the_rest() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let server = Server::start(dir.path(), &mem, &["--background"]);
    let r = run_ok(
        &server,
        &mem,
        &[
            "--regions",
            "2",
            "--touch-fraction",
            "0.5",
            "--balloon",
            "1048576:2097152",
            "--balloon",
            "6291456:65536",
        ],
    );
    assert_eq!(r["balloon_pages_nonzero"], 0, "{r}");
    assert_eq!(r["balloon_pages_zero"], (2 * MIB + 65536) / 4096, "{r}");
    let s = &server.wait_stats(1)[0];
    assert_eq!(s["stats"]["events_remove"], 2, "{s}");
}

#[test]
fn two_vms_at_once() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let server = Server::start(dir.path(), &mem, &[]);
    let a = client(&server, &mem, &["--regions", "2", "--hold-ms", "300"])
        .spawn()
        .expect("a");
    let b = client(&server, &mem, &["--regions", "1", "--hold-ms", "300"])
        .spawn()
        .expect("b");
    for c in [a, b] {
        let out = c.wait_with_output().expect("client");
        let r = report(&out);
        assert!(out.status.success(), "{r}");
        assert_eq!(r["mismatched_pages"], 0);
    }
    let stats = server.wait_stats(2);
    let pids: std::collections::HashSet<u64> =
        stats.iter().filter_map(|s| s["pid"].as_u64()).collect();
    assert_eq!(pids.len(), 2, "two distinct VMs: {stats:?}");
}

#[test]
fn client_exiting_mid_serve_ends_only_that_vm() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 16 * MIB);
    let mut server = Server::start(
        dir.path(),
        &mem,
        &["--background", "--background-chunk", "4"],
    );
    let out = client(&server, &mem, &["--exit-after", "200"])
        .output()
        .expect("client");
    assert!(out.status.success());
    let s = &server.wait_stats(1)[0];
    let reason = s["reason"].as_str().unwrap_or_default();
    assert!(
        ["process_exited", "hung_up", "address_space_gone"].contains(&reason),
        "{s}"
    );
    assert!(server.alive());
    // The server goes on serving others.
    run_ok(&server, &mem, &[]);
    assert!(server.alive());
}

#[test]
fn hugetlb_2m_regions() {
    if !have_uffd() {
        return;
    }
    if !common::have_huge_pages(16, 8) {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 8 * MIB);
    let server = Server::start(dir.path(), &mem, &[]);
    let r = run_ok(&server, &mem, &["--huge", "--regions", "2"]);
    assert_eq!(r["pages_verified"], r["pages_total"], "{r}");
    let s = &server.wait_stats(1)[0];
    assert_eq!(
        s["stats"]["pages_copied"].as_u64().unwrap_or(0)
            + s["stats"]["pages_zeroed"].as_u64().unwrap_or(0),
        4,
        "{s}"
    );
}

#[test]
fn hostile_handshakes_are_rejected_and_disturb_nobody() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 4 * MIB);
    let mut server = Server::start(dir.path(), &mem, &["--handshake-timeout-s", "1"]);
    // A VM being served while the attacks go on.
    let victim = client(
        &server,
        &mem,
        &["--hold-ms", "1500", "--touch-fraction", "0.5"],
    )
    .spawn()
    .expect("victim");
    let u = uffd::Uffd::open().expect("uffd");
    u.api(uffd::Features::EVENT_REMOVE).expect("api");
    let good = r#"[{"base_host_virt_addr":1073741824,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4096}]"#;
    let cases: Vec<(&str, Vec<u8>, bool, &str)> = vec![
        ("no fd", good.as_bytes().to_vec(), false, "no userfaultfd received"),
        ("bad JSON", b"[{\"base_host_virt_addr\": nope}]".to_vec(), true, "malformed JSON"),
        (
            "overlapping regions",
            br#"[{"base_host_virt_addr":1073741824,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":1073745920,"size":4096,"offset":8192,"page_size":4096}]"#.to_vec(),
            true,
            "overlap",
        ),
        (
            "region past the file",
            br#"[{"base_host_virt_addr":1073741824,"size":8388608,"offset":0,"page_size":4096}]"#.to_vec(),
            true,
            "past the end",
        ),
        (
            "bad page size",
            br#"[{"base_host_virt_addr":1073741824,"size":8192,"offset":0,"page_size":8192}]"#.to_vec(),
            true,
            "is not 4096 or 2097152",
        ),
        ("10 MiB of junk", junk(), true, "handshake larger than"),
        ("deep nesting", vec![b'['; 100_000], true, "invalid type: sequence"),
        ("nothing then close", Vec::new(), false, "before sending a complete handshake"),
    ];
    for (name, data, with_fd, needle) in &cases {
        let fd = with_fd.then(|| u.as_fd());
        send_raw(&server.socket, data, fd);
        server.wait_log(needle);
        assert!(server.alive(), "server died on {name}");
    }
    // A file descriptor that is not a userfaultfd.
    let f = std::fs::File::open(&mem).expect("file");
    send_raw(&server.socket, good.as_bytes(), Some(f.as_fd()));
    server.wait_log("not a userfaultfd");
    // A fd with every piece: refused at the second, before the JSON is
    // complete (a peer could otherwise fill the server's fd table).
    let many = UnixStream::connect(&server.socket).expect("connect");
    for piece in [&b"[{"[..], b" ", b" "] {
        let fds = [u.as_fd()];
        let mut space = [std::mem::MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(1))];
        let mut control = rustix::net::SendAncillaryBuffer::new(&mut space);
        assert!(control.push(rustix::net::SendAncillaryMessage::ScmRights(&fds)));
        let _ = rustix::net::sendmsg(
            &many,
            &[std::io::IoSlice::new(piece)],
            &mut control,
            rustix::net::SendFlags::NOSIGNAL,
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    server.wait_log("2 file descriptors received");
    drop(many);
    // A handshake a byte at a time: refused after 64 pieces.
    let drip = UnixStream::connect(&server.socket).expect("connect");
    for b in good.as_bytes().iter().take(100) {
        if (&drip).write_all(&[*b]).is_err() {
            break;
        }
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    server.wait_log("more than 64 pieces");
    drop(drip);
    // A peer that sends half a handshake and stalls.
    let stalled = UnixStream::connect(&server.socket).expect("connect");
    (&stalled).write_all(b"[{\"base_host").expect("write");
    server.wait_log("no complete handshake within");
    drop(stalled);
    // The victim was served correctly throughout, and new VMs still are.
    let out = victim.wait_with_output().expect("victim");
    assert!(out.status.success(), "{}", report(&out));
    assert_eq!(report(&out)["mismatched_pages"], 0);
    run_ok(&server, &mem, &["--regions", "2"]);
    assert!(server.alive());
}

#[test]
fn stale_socket_is_replaced_but_other_files_are_not() {
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), MIB);
    let not_socket = dir.path().join("regular");
    std::fs::write(&not_socket, b"keep me").expect("write");
    let out = Command::new(BIN)
        .args(["serve", "--socket"])
        .arg(&not_socket)
        .arg("--mem-file")
        .arg(&mem)
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("is not a socket"));
    assert_eq!(std::fs::read(&not_socket).expect("read"), b"keep me");
    let out = Command::new(BIN)
        .args([
            "serve",
            "--socket",
            "/tmp/x.sock",
            "--mem-file",
            "/nonexistent/mem",
        ])
        .output()
        .expect("serve");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/mem"));
}

#[test]
fn sigterm_ends_every_vm_with_its_report() {
    if !have_uffd() {
        return;
    }
    let dir = tempfile::tempdir().expect("tmp");
    let mem = mem_file(dir.path(), 4 * MIB);
    let mut server = Server::start(dir.path(), &mem, &[]);
    let mut held = client(&server, &mem, &["--hold-ms", "5000"])
        .spawn()
        .expect("client");
    server.wait_log("VM connected");
    let pid = rustix::process::Pid::from_child(&server.child);
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).expect("kill");
    let status = server.child.wait().expect("wait");
    assert!(status.success(), "{status:?}");
    let stats = server.stats_lines();
    assert_eq!(stats.len(), 1, "{stats:?}");
    assert_eq!(stats[0]["reason"], "stopped");
    assert!(!server.socket.exists(), "socket removed");
    // Its server is gone: the client waits on its next missing page for
    // ever (it keeps its userfaultfd, as a VMM does). Do not leave it.
    let _ = held.kill();
    let _ = held.wait();
}
