//! Live take-over: a new server process takes every VM from the running
//! one, which then exits.
//!
//! The running server listens on a control socket (SOCK_SEQPACKET). The
//! protocol, one message each:
//! 1. new → old: `TAKEOVER 1`.
//! 2. old → new: `FDS <name> <name> ...` with as many descriptors, as many
//!    messages as needed (at most [`msg::MAX_FDS`] each); then `DONE <n>`
//!    with `n` the number of descriptors sent in all.
//! 3. new → old: `OK`. The old server exits at once, without ending its
//!    sessions. Until `OK` it serves on (and goes back to accepting if the
//!    new one goes away), so a successor that fails half-way loses nothing.
//!
//! The new server adopts the sessions only after the old process has exited
//! ([`wait_exit`]): both must never serve one VM at once.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixListener;
use std::path::Path;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::{msg, HandoffError, Named};

const HELLO: &[u8] = b"TAKEOVER 1";

/// Binds the control socket at `path` (a stale socket file is replaced).
pub fn listen(path: &Path) -> Result<OwnedFd, HandoffError> {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        use std::os::unix::fs::FileTypeExt;
        if m.file_type().is_socket() {
            let _ = std::fs::remove_file(path);
        } else {
            return Err(HandoffError::Protocol(format!(
                "{} exists and is not a socket: refusing to replace it",
                path.display()
            )));
        }
    }
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(HandoffError::errno("creating the control socket"))?;
    let addr = SocketAddrUnix::new(path).map_err(HandoffError::errno(format!(
        "control socket path {}",
        path.display()
    )))?;
    rustix::net::bind(&fd, &addr)
        .map_err(HandoffError::errno(format!("binding {}", path.display())))?;
    // Only the owner (root, normally) may take the server over.
    let _ = rustix::fs::chmod(path, rustix::fs::Mode::from_raw_mode(0o600));
    rustix::net::listen(&fd, 4).map_err(HandoffError::errno("listen on the control socket"))?;
    Ok(fd)
}

/// Waits for a successor on the control socket `listener`; returns its
/// connection once it has asked to take over (other connections are
/// answered with an error and closed).
pub fn accept_request(listener: BorrowedFd<'_>) -> Result<OwnedFd, HandoffError> {
    loop {
        let conn = match rustix::net::accept_with(listener, SocketFlags::CLOEXEC) {
            Ok(c) => c,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(HandoffError::errno("accepting on the control socket")(e)),
        };
        // A peer that connects and says nothing must not hold the server.
        let _ = rustix::net::sockopt::set_socket_timeout(
            &conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(5)),
        );
        match msg::recv(&conn) {
            Ok(Some((text, fds))) if text == HELLO && fds.is_empty() => return Ok(conn),
            Ok(_) | Err(_) => {
                tracing::warn!("control socket: a connection that did not ask to take over");
                let _ = msg::send(&conn, b"ERR expected TAKEOVER 1", &[]);
            }
        }
    }
}

/// Old server: sends `fds` to the successor on `conn` and waits for its
/// `OK` (up to `timeout`). On `Ok(())` the caller must exit at once.
pub fn hand_over(conn: &OwnedFd, fds: &[Named], timeout: Duration) -> Result<(), HandoffError> {
    for chunk in fds.chunks(msg::MAX_FDS) {
        let mut text = String::from("FDS");
        for n in chunk {
            text.push(' ');
            text.push_str(&n.name);
        }
        let borrowed: Vec<BorrowedFd<'_>> = chunk.iter().map(|n| n.fd.as_fd()).collect();
        msg::send(conn, text.as_bytes(), &borrowed)?;
    }
    msg::send(conn, format!("DONE {}", fds.len()).as_bytes(), &[])?;
    let _ = rustix::net::sockopt::set_socket_timeout(
        conn,
        rustix::net::sockopt::Timeout::Recv,
        Some(timeout),
    );
    match msg::recv(conn)? {
        Some((t, _)) if t == b"OK" => Ok(()),
        Some((t, _)) => Err(HandoffError::Protocol(format!(
            "the successor answered {:?}",
            String::from_utf8_lossy(&t)
        ))),
        None => Err(HandoffError::Protocol(
            "the successor went away before taking everything".into(),
        )),
    }
}

/// New server: takes every descriptor from the server listening on the
/// control socket at `path`. Returns them and the old server's pid, which
/// the caller must wait for ([`wait_exit`]) before serving.
pub fn take_over(path: &Path) -> Result<(Vec<Named>, Option<u32>), HandoffError> {
    let conn = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(HandoffError::errno("creating a socket"))?;
    let addr = SocketAddrUnix::new(path).map_err(HandoffError::errno(format!(
        "control socket path {}",
        path.display()
    )))?;
    rustix::net::connect(&conn, &addr).map_err(HandoffError::errno(format!(
        "connecting to the running server's control socket {} (is a server running with \
         --control there?)",
        path.display()
    )))?;
    let old_pid = crate::peer_pid(conn.as_fd());
    msg::send(&conn, HELLO, &[])?;
    // The old server waits for its handshakes in flight (at most its
    // handshake timeout) before it sends.
    let _ = rustix::net::sockopt::set_socket_timeout(
        &conn,
        rustix::net::sockopt::Timeout::Recv,
        Some(Duration::from_secs(60)),
    );
    let mut out = Vec::new();
    loop {
        let Some((text, fds)) = msg::recv(&conn)? else {
            return Err(HandoffError::Protocol(
                "the running server closed the control connection before sending everything".into(),
            ));
        };
        let text = String::from_utf8_lossy(&text).into_owned();
        if let Some(n) = text.strip_prefix("DONE ") {
            let n: usize = n
                .trim()
                .parse()
                .map_err(|_| HandoffError::Protocol(format!("bad DONE line {text:?}")))?;
            if n != out.len() {
                return Err(HandoffError::Protocol(format!(
                    "the running server said it sent {n} descriptors, {} arrived",
                    out.len()
                )));
            }
            break;
        }
        let Some(names) = text.strip_prefix("FDS") else {
            return Err(HandoffError::Protocol(format!(
                "unexpected message from the running server: {text:?}"
            )));
        };
        let names: Vec<&str> = names.split_whitespace().collect();
        if names.len() != fds.len() {
            return Err(HandoffError::Protocol(format!(
                "{} names for {} descriptors",
                names.len(),
                fds.len()
            )));
        }
        for (name, fd) in names.into_iter().zip(fds) {
            out.push(Named {
                name: name.to_string(),
                fd,
            });
        }
    }
    msg::send(&conn, b"OK", &[])?;
    Ok((out, old_pid))
}

/// Waits until process `pid` has exited, up to `timeout`; then kills it
/// (it has handed everything over and must not serve on beside us).
pub fn wait_exit(pid: u32, timeout: Duration) -> Result<(), HandoffError> {
    use rustix::event::{poll, PollFd, PollFlags};
    let Some(p) = rustix::process::Pid::from_raw(pid as i32) else {
        return Ok(());
    };
    let fd = match rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty()) {
        Ok(fd) => fd,
        Err(rustix::io::Errno::SRCH) => return Ok(()),
        Err(e) => return Err(HandoffError::errno("pidfd_open of the old server")(e)),
    };
    let wait = |d: Duration| -> bool {
        let ts = rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(&fd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    };
    if wait(timeout) {
        return Ok(());
    }
    tracing::warn!(
        pid,
        "the old server did not exit {timeout:?} after handing over: killing it"
    );
    let _ = rustix::process::pidfd_send_signal(&fd, rustix::process::Signal::KILL);
    if wait(Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(HandoffError::Protocol(format!(
            "the old server (pid {pid}) does not exit: refusing to serve its VMs beside it"
        )))
    }
}

/// A std listener for a listening descriptor taken over or inherited.
pub fn unix_listener(fd: OwnedFd) -> UnixListener {
    UnixListener::from(fd)
}
