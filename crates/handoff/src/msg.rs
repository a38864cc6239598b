//! One message: text and file descriptors, over a Unix datagram or
//! seqpacket socket (message boundaries kept).

use std::io::{IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};

use crate::HandoffError;

/// Most descriptors in one message (the kernel's SCM_MAX_FD is 253).
pub const MAX_FDS: usize = 200;
/// Largest text of one message.
pub const MAX_TEXT: usize = 64 << 10;

/// Sends `text` with `fds` in one message.
pub fn send(sock: impl AsFd, text: &[u8], fds: &[BorrowedFd<'_>]) -> Result<(), HandoffError> {
    if fds.len() > MAX_FDS || text.len() > MAX_TEXT {
        return Err(HandoffError::Protocol(format!(
            "message too large: {} fds, {} bytes",
            fds.len(),
            text.len()
        )));
    }
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(HandoffError::Protocol("no room for the descriptors".into()));
    }
    let iov = [IoSlice::new(text)];
    loop {
        match rustix::net::sendmsg(&sock, &iov, &mut control, SendFlags::NOSIGNAL) {
            Ok(n) if n == text.len() => return Ok(()),
            Ok(n) => {
                return Err(HandoffError::Protocol(format!(
                    "short send: {n} of {} bytes",
                    text.len()
                )))
            }
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(HandoffError::errno("sending descriptors")(e)),
        }
    }
}

/// A message received: its text and descriptors.
pub type Received = (Vec<u8>, Vec<OwnedFd>);

/// Receives one message: its text and descriptors (close-on-exec). A
/// message whose descriptors did not all fit (or text was cut) is an error;
/// whatever arrived of it is closed. `Ok(None)`: the peer closed.
pub fn recv(sock: impl AsFd) -> Result<Option<Received>, HandoffError> {
    recv_with(sock, RecvFlags::CMSG_CLOEXEC)
}

/// As [`recv`], but `Ok(None)` at once when no message is queued.
pub fn try_recv(sock: impl AsFd) -> Result<Option<Received>, HandoffError> {
    match recv_with(sock, RecvFlags::CMSG_CLOEXEC | RecvFlags::DONTWAIT) {
        Err(HandoffError::Io { error, .. }) if error.kind() == std::io::ErrorKind::WouldBlock => {
            Ok(None)
        }
        other => other,
    }
}

fn recv_with(sock: impl AsFd, flags: RecvFlags) -> Result<Option<Received>, HandoffError> {
    let mut buf = vec![0u8; MAX_TEXT];
    let mut space = vec![MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
    loop {
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut buf)];
        let m = match rustix::net::recvmsg(&sock, &mut iov, &mut control, flags) {
            Ok(m) => m,
            Err(rustix::io::Errno::INTR) => continue,
            Err(e) => return Err(HandoffError::errno("receiving descriptors")(e)),
        };
        let mut fds = Vec::new();
        for c in control.drain() {
            if let RecvAncillaryMessage::ScmRights(r) = c {
                fds.extend(r);
            }
        }
        if m.flags.intersects(ReturnFlags::CTRUNC | ReturnFlags::TRUNC) {
            return Err(HandoffError::Protocol(
                "a message was cut (too many descriptors or too long): out of file descriptors?"
                    .into(),
            ));
        }
        if m.bytes == 0 && fds.is_empty() {
            return Ok(None);
        }
        buf.truncate(m.bytes);
        return Ok(Some((buf, fds)));
    }
}
