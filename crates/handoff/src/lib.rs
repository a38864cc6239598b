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
            // By what each descriptor is, not by position: systemd gives a
            // name's descriptors back in an order of its own.
            let mut vm = VmFds::default();
            let mut extra = false;
            for fd in fds {
                let slot = match kind_of(fd.as_fd()) {
                    Some(VmPart::Uffd) => &mut vm.uffd,
                    Some(VmPart::Conn) => &mut vm.conn,
                    Some(VmPart::Pages) => &mut vm.pages,
                    None => {
                        extra = true;
                        continue;
                    }
                };
                if slot.is_some() {
                    extra = true;
                }
                *slot = Some(fd);
            }
            if extra || vm.uffd.is_none() || vm.conn.is_none() || vm.pages.is_none() {
                out.incomplete.push(key);
            } else {
                out.vms.insert(key, vm);
            }
        }
        out
    }

    /// How many VMs `fds` hold (distinct `vm.<key>` names).
    pub fn count_vms<'a>(names: impl Iterator<Item = &'a str>) -> usize {
        let mut keys: Vec<&str> = names
            .filter(|n| matches!(Name::parse(n), Name::Vm(_)))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        keys.len()
    }
}

/// What one of a VM's descriptors is: a socket is its connection, a
/// memfd that can be sealed its page state, a userfaultfd its userfaultfd.
fn kind_of(fd: BorrowedFd<'_>) -> Option<VmPart> {
    let st = rustix::fs::fstat(fd).ok()?;
    let kind = rustix::fs::FileType::from_raw_mode(st.st_mode);
    if kind == rustix::fs::FileType::Socket {
        return Some(VmPart::Conn);
    }
    if rustix::fs::fcntl_get_seals(fd).is_ok() {
        return Some(VmPart::Pages);
    }
    let link = std::fs::read_link(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(&fd)
    ))
    .ok()?;
    (link.as_os_str() == "anon_inode:[userfaultfd]").then_some(VmPart::Uffd)
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
    fn a_vms_descriptors_are_told_apart_by_kind_in_any_order() {
        let Ok(uffd) = uffd::Uffd::open() else {
            eprintln!("SKIPPED: cannot create a userfaultfd here");
            return;
        };
        let memfd = || {
            rustix::fs::memfd_create(
                "t",
                rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
            )
            .expect("memfd")
        };
        let (a, _b) = std::os::unix::net::UnixStream::pair().expect("pair");
        let named = |n: &str, fd: OwnedFd| Named { name: n.into(), fd };
        let sorted = Inherited::sort(vec![
            named("vm.a", memfd()),
            named("listen.x", memfd()),
            named("vm.a", uffd.as_fd().try_clone_to_owned().expect("dup")),
            named("vm.b", memfd()),
            named("vm.b", memfd()),
            named("vm.a", OwnedFd::from(a)),
        ]);
        assert_eq!(sorted.vms.len(), 1);
        let vm = &sorted.vms["a"];
        let kind = |f: &Option<OwnedFd>| f.as_ref().and_then(|f| kind_of(f.as_fd()));
        assert_eq!(kind(&vm.conn), Some(VmPart::Conn));
        assert_eq!(kind(&vm.uffd), Some(VmPart::Uffd));
        assert_eq!(kind(&vm.pages), Some(VmPart::Pages));
        assert_eq!(sorted.incomplete, vec!["b".to_string()]);
        assert_eq!(sorted.listeners.len(), 1);
        let names = ["vm.a", "vm.a", "vm.b", "listen.x"];
        assert_eq!(Inherited::count_vms(names.into_iter()), 2);
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
