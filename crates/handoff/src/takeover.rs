//! Live take-over: a new server process takes every VM from the running
//! one, which then exits.
//!
//! The running server listens on a control socket (SOCK_SEQPACKET). The
//! protocol, one message each:
//! 1. new → old: `TAKEOVER 1`.
//! 2. old → new: `FDS <name> <name> ...` with as many descriptors, as many
//!    messages as needed (at most [`msg::MAX_FDS`] each); then `DONE <n>`
//!    with `n` the number of descriptors sent in all.
//! 3. new → old: `OK`, once the new server is ready to serve. The old server
//!    stops its serving threads (without ending its sessions), answers `BYE`
//!    and exits. Until `OK` it serves on (and goes back to accepting if the
//!    new one goes away), so a successor that fails half-way loses nothing;
//!    a successor that gets no `BYE` gives up and kills nothing.
//!
//! The new server sends `OK` only once it is ready to serve (everything that
//! can fail at its start has been done), and adopts the sessions only after
//! the old process has exited ([`Received::accept`]): both must never serve
//! one VM at once. A server whose VMs are kept by systemd or a supervisor
//! refuses (`ERR ...`): a keeper would start another server on them.

use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::time::Duration;

use rustix::net::{AddressFamily, SocketAddrUnix, SocketFlags, SocketType};

use crate::{msg, HandoffError, Named};

const HELLO: &[u8] = b"TAKEOVER 1";

/// A seqpacket socket, and the address of the control socket at `path`.
fn control_socket(path: &Path) -> Result<(OwnedFd, SocketAddrUnix), HandoffError> {
    let fd = rustix::net::socket_with(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )
    .map_err(HandoffError::errno("creating a control socket"))?;
    let addr = SocketAddrUnix::new(path).map_err(HandoffError::errno(format!(
        "control socket path {}",
        path.display()
    )))?;
    Ok((fd, addr))
}

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
    let (fd, addr) = control_socket(path)?;
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

/// What a successor received, before it tells the old server so: until
/// [`Received::accept`] the old server serves on, and if this is dropped
/// instead (the successor could not start), it goes back to accepting.
#[derive(Debug)]
pub struct Received {
    conn: OwnedFd,
    /// The old server, taken while it was connected (so that it cannot be
    /// a process that reused its pid).
    old: OwnedFd,
    pub fds: Vec<Named>,
    pub old_pid: u32,
}

impl Received {
    /// Tells the old server it may go, waits for its `BYE` (its serving
    /// threads have stopped), then for its exit (killing it after
    /// `timeout`: it has stopped serving and must not linger). Without a
    /// `BYE` the old server goes on serving and nothing is killed: an error.
    pub fn accept(self, timeout: Duration) -> Result<(), HandoffError> {
        msg::send(&self.conn, b"OK", &[])?;
        let _ = rustix::net::sockopt::set_socket_timeout(
            &self.conn,
            rustix::net::sockopt::Timeout::Recv,
            Some(Duration::from_secs(60)),
        );
        match msg::recv(&self.conn) {
            Ok(Some((t, _))) if t == b"BYE" => wait_exit(&self.old, self.old_pid, timeout),
            Ok(other) => Err(HandoffError::Protocol(format!(
                "the old server did not let go (it answered {:?}): it serves on",
                other.map(|(t, _)| String::from_utf8_lossy(&t).into_owned())
            ))),
            Err(e) => Err(HandoffError::Protocol(format!(
                "the old server did not let go ({e}): it serves on"
            ))),
        }
    }
}

/// New server: takes every descriptor from the server listening on the
/// control socket at `path`. Nothing is final until [`Received::accept`].
pub fn take_over(path: &Path) -> Result<Received, HandoffError> {
    let (conn, addr) = control_socket(path)?;
    rustix::net::connect(&conn, &addr).map_err(HandoffError::errno(format!(
        "connecting to the running server's control socket {} (is a server running with \
         --control there?)",
        path.display()
    )))?;
    let old_pid = crate::peer_pid(conn.as_fd()).ok_or_else(|| {
        HandoffError::Protocol("the running server's pid is unknown (SO_PEERCRED)".into())
    })?;
    let old = rustix::process::Pid::from_raw(old_pid as i32)
        .ok_or_else(|| HandoffError::Protocol(format!("bad pid {old_pid}")))
        .and_then(|p| {
            rustix::process::pidfd_open(p, rustix::process::PidfdFlags::empty())
                .map_err(HandoffError::errno("pidfd_open of the running server"))
        })?;
    // The pidfd is the connected peer's only if the peer still holds the
    // connection now: it cannot have exited and been replaced meanwhile.
    if crate::hung_up(&conn) {
        return Err(HandoffError::Protocol(
            "the running server went away while connecting".into(),
        ));
    }
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
        if let Some(why) = text.strip_prefix("ERR") {
            return Err(HandoffError::Protocol(format!(
                "the running server refused:{why}"
            )));
        }
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
    Ok(Received {
        conn,
        old,
        fds: out,
        old_pid,
    })
}

/// Old server: its serving threads have stopped; the successor may serve.
/// The caller exits right after.
pub fn goodbye(conn: &OwnedFd) {
    let _ = msg::send(conn, b"BYE", &[]);
}

/// Old server: refuses a successor on `conn`, saying why.
pub fn refuse(conn: &OwnedFd, why: &str) {
    let _ = msg::send(conn, format!("ERR {why}").as_bytes(), &[]);
}

/// Waits until the process behind `pidfd` has exited, up to `timeout`; then
/// kills it.
fn wait_exit(pidfd: &OwnedFd, pid: u32, timeout: Duration) -> Result<(), HandoffError> {
    use rustix::event::{poll, PollFd, PollFlags};
    let wait = |d: Duration| -> bool {
        let ts = rustix::time::Timespec {
            tv_sec: d.as_secs() as i64,
            tv_nsec: d.subsec_nanos() as i64,
        };
        let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
        matches!(poll(&mut fds, Some(&ts)), Ok(n) if n > 0)
    };
    if wait(timeout) {
        return Ok(());
    }
    tracing::warn!(
        pid,
        "the old server did not exit {timeout:?} after handing over: killing it"
    );
    let _ = rustix::process::pidfd_send_signal(pidfd, rustix::process::Signal::KILL);
    if wait(Duration::from_secs(5)) {
        Ok(())
    } else {
        Err(HandoffError::Protocol(format!(
            "the old server (pid {pid}) does not exit: refusing to serve its VMs beside it"
        )))
    }
}
