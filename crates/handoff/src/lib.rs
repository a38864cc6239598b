//! Keeping served VMs alive when their page server is not.
//!
//! A VM served by `pagewire serve` is a handful of file descriptors: its
//! userfaultfd, its connection (which says when the VMM goes away and who it
//! is), and the memfd that holds its page state (`pager::persist`). If they
//! outlive the serving process, a successor can serve the VM on as if
//! nothing happened. This crate moves them, by name, through whichever
//! keeper the host has:
//!
//! - **systemd**: the file-descriptor store (`FDSTORE=1` over
//!   `NOTIFY_SOCKET`) keeps them while the service restarts and hands them
//!   back as `LISTEN_FDS`/`LISTEN_FDNAMES`, beside socket-activated
//!   listeners ([`notify`], [`inherited`]).
//! - **pagewire's supervisor** ([`supervisor`]): a small parent process that
//!   speaks the same protocol to its child, restarts it when it dies or on
//!   `SIGUSR2` (upgrade), and fails closed: VMs no server took back within
//!   the orphan timeout are killed through a pidfd (or, if the operator
//!   chose, left waiting with a loud log line).
//! - **a live take-over** ([`takeover`]): a new server asks the running one
//!   for everything over a control socket; the old one stops accepting,
//!   sends, and exits once the new one has it all.
//!
//! Names follow [`Name`]: `listen.<snapshot>`, `source.<label>`, and
//! `vm.<key>` for a VM's three descriptors, stored in one message (so a
//! VM is kept whole or not at all) in the order [`VM_PARTS`] gives. systemd
//! allows printable ASCII without `:` up to 255 bytes; snapshot names, labels
//! and keys are kept to `[A-Za-z0-9_-]`.

use std::collections::BTreeMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

pub mod msg;
pub mod notify;
pub mod orphan;
pub mod supervisor;
pub mod takeover;

pub use notify::{inherited, Notifier};

/// Why a hand-over failed.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    #[error("{what}: {error}")]
    Io { what: String, error: std::io::Error },
    #[error("{0}")]
    Protocol(String),
}

impl HandoffError {
    pub(crate) fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> HandoffError {
        let what = what.into();
        move |error| HandoffError::Io { what, error }
    }
    pub(crate) fn errno(what: impl Into<String>) -> impl FnOnce(rustix::io::Errno) -> HandoffError {
        let what = what.into();
        move |e| HandoffError::Io {
            what,
            error: e.into(),
        }
    }
}

/// A file descriptor and the name it is kept under.
#[derive(Debug)]
pub struct Named {
    pub name: String,
    pub fd: OwnedFd,
}

/// What a name says a descriptor is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Name {
    /// A listening socket for a snapshot.
    Listen(String),
    /// A snapshot's memory file, open (VMs keep the bytes they started
    /// with, even if the file at that path is replaced).
    Source(String),
    /// A VM's descriptors, in the order of [`VM_PARTS`].
    Vm(String),
    /// Anything else (a socket systemd activated under its own name).
    Other(String),
}

/// The descriptors a VM is served with.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum VmPart {
    Uffd,
    Conn,
    Pages,
}

/// The order of a VM's descriptors under its name.
pub const VM_PARTS: [VmPart; 3] = [VmPart::Uffd, VmPart::Conn, VmPart::Pages];

/// Whether `s` may be part of a name (snapshot names, VM keys).
pub fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 200
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-'))
}

impl Name {
    pub fn parse(s: &str) -> Name {
        let other = || Name::Other(s.to_string());
        let Some((kind, rest)) = s.split_once('.') else {
            return other();
        };
        match kind {
            "listen" if valid_label(rest) => Name::Listen(rest.to_string()),
            "source" if valid_label(rest) => Name::Source(rest.to_string()),
            "vm" if valid_label(rest) => Name::Vm(rest.to_string()),
            _ => other(),
        }
    }

    pub fn render(&self) -> String {
        match self {
            Name::Listen(s) => format!("listen.{s}"),
            Name::Source(s) => format!("source.{s}"),
            Name::Vm(k) => format!("vm.{k}"),
            Name::Other(s) => s.clone(),
        }
    }
}

/// A VM's descriptors, as found among inherited ones (any may be missing).
#[derive(Debug, Default)]
pub struct VmFds {
    pub uffd: Option<OwnedFd>,
    pub conn: Option<OwnedFd>,
    pub pages: Option<OwnedFd>,
}

/// Inherited descriptors sorted by what they are.
#[derive(Debug, Default)]
pub struct Inherited {
    pub listeners: BTreeMap<String, OwnedFd>,
    pub sources: BTreeMap<String, OwnedFd>,
    pub vms: BTreeMap<String, VmFds>,
    /// VMs whose descriptors did not come as three (closed; named here
    /// so that the caller can say so).
    pub incomplete: Vec<String>,
    pub other: Vec<Named>,
}

impl Inherited {
    /// Sorts `fds` by name; a name seen twice keeps its first descriptor
    /// (the others are closed).
    pub fn sort(fds: Vec<Named>) -> Inherited {
        let mut out = Inherited::default();
        let mut vm_fds: BTreeMap<String, Vec<OwnedFd>> = BTreeMap::new();
        for Named { name, fd } in fds {
            match Name::parse(&name) {
                Name::Listen(s) => {
                    out.listeners.entry(s).or_insert(fd);
                }
                Name::Source(s) => {
                    out.sources.entry(s).or_insert(fd);
                }
                Name::Vm(k) => vm_fds.entry(k).or_default().push(fd),
                Name::Other(_) => out.other.push(Named { name, fd }),
            }
        }
        for (key, fds) in vm_fds {
            if fds.len() != VM_PARTS.len() {
                out.incomplete.push(key);
                continue;
            }
            let mut it = fds.into_iter();
            out.vms.insert(
                key,
                VmFds {
                    uffd: it.next(),
                    conn: it.next(),
                    pages: it.next(),
                },
            );
        }
        out
    }

    pub fn is_empty(&self) -> bool {
        self.listeners.is_empty()
            && self.sources.is_empty()
            && self.vms.is_empty()
            && self.other.is_empty()
    }
}

/// Whether `fd` is a listening Unix stream socket (what an inherited
/// listener must be; anything else handed to a server is not trusted as
/// one).
pub fn is_unix_listener(fd: BorrowedFd<'_>) -> bool {
    use rustix::net::sockopt;
    sockopt::socket_acceptconn(fd).unwrap_or(false)
        && sockopt::socket_type(fd).ok() == Some(rustix::net::SocketType::STREAM)
        && sockopt::socket_domain(fd).ok() == Some(rustix::net::AddressFamily::UNIX)
}

/// The pid of the process at the other end of a Unix socket.
pub fn peer_pid(sock: BorrowedFd<'_>) -> Option<u32> {
    rustix::net::sockopt::socket_peercred(sock)
        .ok()
        .map(|c| c.pid.as_raw_nonzero().get() as u32)
}

/// Whether the peer of a connected socket has closed its end (the VMM
/// exited).
pub fn hung_up(sock: impl AsFd) -> bool {
    use rustix::event::{poll, PollFd, PollFlags};
    let mut fds = [PollFd::new(&sock, PollFlags::RDHUP)];
    matches!(poll(&mut fds, Some(&rustix::time::Timespec::default())), Ok(n) if n > 0)
        && fds[0]
            .revents()
            .intersects(PollFlags::HUP | PollFlags::RDHUP | PollFlags::ERR)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vm_is_kept_whole_or_not_at_all() {
        let named = |n: &str| Named {
            name: n.into(),
            fd: rustix::fs::memfd_create("t", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd"),
        };
        let sorted = Inherited::sort(vec![
            named("vm.a"),
            named("listen.x"),
            named("vm.a"),
            named("vm.b"),
            named("vm.a"),
        ]);
        assert_eq!(sorted.vms.len(), 1);
        assert!(sorted.vms["a"].pages.is_some());
        assert_eq!(sorted.incomplete, vec!["b".to_string()]);
        assert_eq!(sorted.listeners.len(), 1);
    }

    #[test]
    fn names_round_trip_and_junk_is_other() {
        for n in [
            Name::Listen("base".into()),
            Name::Source("base-2".into()),
            Name::Vm("a1b2".into()),
        ] {
            assert_eq!(Name::parse(&n.render()), n);
        }
        for junk in [
            "",
            "listen.",
            "vm.",
            "vm.x.y",
            "vm..uffd",
            "listen.a:b",
            "x.y",
        ] {
            assert!(matches!(Name::parse(junk), Name::Other(_)), "{junk}");
        }
    }
}
