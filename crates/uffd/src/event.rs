//! Messages read from a userfaultfd.

use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::Ordering;

use linux_raw_sys::general as g;
use rustix::io::{Errno, ReadWriteFlags};

use crate::{Error, Uffd};

bitflags::bitflags! {
    /// `UFFD_PAGEFAULT_FLAG_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct FaultFlags: u64 {
        /// The access was a write.
        const WRITE = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
        /// A write to a write-protected page (WP mode).
        const WP = g::UFFD_PAGEFAULT_FLAG_WP as u64;
        /// A minor fault: the page is in the page cache but not mapped.
        const MINOR = g::UFFD_PAGEFAULT_FLAG_MINOR as u64;
        const _ = !0;
    }
}

/// One message from a userfaultfd.
#[derive(Debug)]
pub enum Event {
    /// A thread is blocked on `address` (page-aligned unless EXACT_ADDRESS
    /// was negotiated). `thread_id` is set with FEATURE_THREAD_ID.
    PageFault {
        address: u64,
        flags: FaultFlags,
        thread_id: Option<u32>,
    },
    /// The process forked (EVENT_FORK): `uffd` covers the child's copy of the
    /// registered ranges. Dropping it unregisters them in the child.
    Fork { uffd: Uffd },
    /// `mremap` moved `[from, from+len)` to `to` (EVENT_REMAP).
    Remap { from: u64, to: u64, len: u64 },
    /// `MADV_DONTNEED`/`MADV_REMOVE` on `[start, end)` (EVENT_REMOVE). The
    /// madvise caller is blocked until this message is read and zaps the
    /// range right after: pages there must be treated as gone.
    Remove { start: u64, end: u64 },
    /// `munmap` (or a MAP_FIXED over it) removed `[start, end)` (EVENT_UNMAP).
    Unmap { start: u64, end: u64 },
    /// A message type this crate does not know (a newer kernel).
    Unknown { kind: u8 },
}

/// How many messages one `read` fetches at most.
pub const MAX_BATCH: usize = 64;

/// The size of one message (`struct uffd_msg`).
pub const MESSAGE_BYTES: usize = core::mem::size_of::<g::uffd_msg>();

/// One message as the kernel lays it out, decoded without side effects: a
/// FORK message names the new descriptor's number but takes no ownership of
/// it (see [`Event::Fork`] for the owned form that
/// [`Uffd::read_events`] returns).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Message {
    PageFault {
        address: u64,
        flags: FaultFlags,
        thread_id: Option<u32>,
    },
    Fork {
        fd: i32,
    },
    Remap {
        from: u64,
        to: u64,
        len: u64,
    },
    Remove {
        start: u64,
        end: u64,
    },
    Unmap {
        start: u64,
        end: u64,
    },
    Unknown {
        kind: u8,
    },
}

/// A message that is not [`MESSAGE_BYTES`] long.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("a userfaultfd message is {MESSAGE_BYTES} bytes, not {0}")]
pub struct DecodeError(pub usize);

impl Message {
    /// Decodes one message. Any 32 bytes decode to some message (an unknown
    /// type to [`Message::Unknown`]); only a wrong length is an error.
    pub fn decode(msg: &[u8]) -> Result<Message, DecodeError> {
        if msg.len() != MESSAGE_BYTES {
            return Err(DecodeError(msg.len()));
        }
        Ok(decode(msg))
    }
}

impl Uffd {
    /// Reads up to `max` (at most [`MAX_BATCH`]) messages in one system call
    /// and appends them to `out`. Returns how many were read: 0 when none is
    /// queued (and also when the process has exited: nothing signals that;
    /// watch the process with a pidfd).
    ///
    /// It never blocks, whatever the fd's O_NONBLOCK flag says: that flag
    /// belongs to the open file, which a peer that sent its userfaultfd
    /// shares and can change at any time. The read asks for no waiting per
    /// call (`preadv2` with `RWF_NOWAIT`, which userfaultfd honours on this
    /// project's kernels). Where the kernel refuses that for a fd (an older
    /// kernel; on 6.18 the userfaultfds that FORK events create), that fd is
    /// read with plain `read` from then on, after setting O_NONBLOCK again
    /// if it was cleared: only there can a peer that clears the flag at the
    /// wrong moment still make a read wait.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, Error> {
        let mut buf = [0u8; MESSAGE_BYTES * MAX_BATCH];
        self.read_events_into(&mut buf, out, max)
    }

    /// As [`read_events`](Self::read_events), with the raw messages read
    /// into `buf` (at most `buf.len() / MESSAGE_BYTES` of them) and left
    /// there. A server that keeps `buf` in memory that outlives it (a shared
    /// memfd) has every message it read there even if it is killed right
    /// after the read: the kernel copies them out within the system call,
    /// before a fatal signal can take effect. Its successor can then find a
    /// REMOVE the dead process read but never applied (see
    /// `pager::persist`).
    pub fn read_events_into(
        &self,
        buf: &mut [u8],
        out: &mut Vec<Event>,
        max: usize,
    ) -> Result<usize, Error> {
        let max = max.clamp(1, MAX_BATCH).min(buf.len() / MESSAGE_BYTES);
        if max == 0 {
            return Ok(0);
        }
        let want = &mut buf[..MESSAGE_BYTES * max];
        let plain = |buf: &mut [u8]| {
            self.ensure_nonblocking()?;
            rustix::io::read(self, buf)
        };
        let read = if self.plain_read.load(Ordering::Relaxed) {
            plain(want)
        } else {
            let mut iov = [std::io::IoSliceMut::new(want)];
            // u64::MAX: the file's own position (a userfaultfd has none to
            // seek); the flag is the point.
            match rustix::io::preadv2(self, &mut iov, u64::MAX, ReadWriteFlags::NOWAIT) {
                Err(Errno::OPNOTSUPP) => {
                    self.plain_read.store(true, Ordering::Relaxed);
                    plain(&mut iov[0])
                }
                r => r,
            }
        };
        let n = match read {
            Ok(n) => n,
            Err(Errno::AGAIN) | Err(Errno::INTR) => return Ok(0),
            Err(errno) => return Err(Error::Os { op: "read", errno }),
        };
        let count = n / MESSAGE_BYTES;
        out.extend(
            buf[..count * MESSAGE_BYTES]
                .chunks_exact(MESSAGE_BYTES)
                .map(|m| {
                    match decode(m) {
                        Message::PageFault {
                            address,
                            flags,
                            thread_id,
                        } => Event::PageFault {
                            address,
                            flags,
                            thread_id,
                        },
                        Message::Fork { fd } if fd >= 0 => {
                            // SAFETY: for a FORK message the kernel installed this
                            // descriptor in our table as it was read; nothing else
                            // owns it.
                            let fd = unsafe { OwnedFd::from_raw_fd(fd) };
                            Event::Fork {
                                uffd: Uffd::from_fd(fd),
                            }
                        }
                        Message::Fork { .. } => Event::Unknown {
                            kind: g::UFFD_EVENT_FORK as u8,
                        },
                        Message::Remap { from, to, len } => Event::Remap { from, to, len },
                        Message::Remove { start, end } => Event::Remove { start, end },
                        Message::Unmap { start, end } => Event::Unmap { start, end },
                        Message::Unknown { kind } => Event::Unknown { kind },
                    }
                }),
        );
        Ok(count)
    }
}

// `struct uffd_msg` as the kernel lays it out: the event type in byte 0, the
// union of arguments from byte 8. Checked against linux-raw-sys at compile
// time, so that the decoding below needs no unsafe reads of the union.
const ARG: usize = 8;
const _: () = {
    assert!(core::mem::size_of::<g::uffd_msg>() == 32);
    assert!(core::mem::offset_of!(g::uffd_msg, arg) == ARG);
    assert!(core::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_1, address) == 8);
    assert!(core::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_1, feat) == 16);
    assert!(core::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_3, to) == 8);
    assert!(core::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_3, len) == 16);
    assert!(core::mem::offset_of!(g::uffd_msg__bindgen_ty_1__bindgen_ty_4, end) == 8);
};

/// The `u64` at `arg + at` of a 32-byte message.
fn word(msg: &[u8], at: usize) -> u64 {
    let mut b = [0u8; 8];
    b.copy_from_slice(&msg[ARG + at..ARG + at + 8]);
    u64::from_ne_bytes(b)
}

/// The `u32` at `arg + at` of a 32-byte message.
fn half(msg: &[u8], at: usize) -> u32 {
    let mut b = [0u8; 4];
    b.copy_from_slice(&msg[ARG + at..ARG + at + 4]);
    u32::from_ne_bytes(b)
}

/// Decodes a message of exactly [`MESSAGE_BYTES`] bytes.
fn decode(msg: &[u8]) -> Message {
    match msg[0] as u32 {
        g::UFFD_EVENT_PAGEFAULT => {
            let tid = half(msg, 16);
            Message::PageFault {
                address: word(msg, 8),
                flags: FaultFlags::from_bits_retain(word(msg, 0)),
                thread_id: (tid != 0).then_some(tid),
            }
        }
        g::UFFD_EVENT_FORK => Message::Fork {
            fd: half(msg, 0) as i32,
        },
        g::UFFD_EVENT_REMAP => Message::Remap {
            from: word(msg, 0),
            to: word(msg, 8),
            len: word(msg, 16),
        },
        g::UFFD_EVENT_REMOVE => Message::Remove {
            start: word(msg, 0),
            end: word(msg, 8),
        },
        g::UFFD_EVENT_UNMAP => Message::Unmap {
            start: word(msg, 0),
            end: word(msg, 8),
        },
        kind => Message::Unknown { kind: kind as u8 },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(kind: u32, words: [u64; 3]) -> [u8; MESSAGE_BYTES] {
        let mut m = [0u8; MESSAGE_BYTES];
        m[0] = kind as u8;
        for (i, w) in words.iter().enumerate() {
            m[ARG + 8 * i..ARG + 8 * i + 8].copy_from_slice(&w.to_ne_bytes());
        }
        m
    }

    #[test]
    fn decodes_every_kind_and_rejects_wrong_lengths() {
        let flags = g::UFFD_PAGEFAULT_FLAG_WRITE as u64;
        let mut fault = msg(g::UFFD_EVENT_PAGEFAULT, [flags, 0x7000_1000, 0]);
        fault[ARG + 16..ARG + 20].copy_from_slice(&42u32.to_ne_bytes());
        assert_eq!(
            Message::decode(&fault),
            Ok(Message::PageFault {
                address: 0x7000_1000,
                flags: FaultFlags::WRITE,
                thread_id: Some(42),
            })
        );
        assert_eq!(
            Message::decode(&msg(g::UFFD_EVENT_REMOVE, [0x1000, 0x3000, 0])),
            Ok(Message::Remove {
                start: 0x1000,
                end: 0x3000
            })
        );
        assert_eq!(
            Message::decode(&msg(g::UFFD_EVENT_REMAP, [1, 2, 3])),
            Ok(Message::Remap {
                from: 1,
                to: 2,
                len: 3
            })
        );
        assert_eq!(
            Message::decode(&msg(g::UFFD_EVENT_UNMAP, [4, 5, 0])),
            Ok(Message::Unmap { start: 4, end: 5 })
        );
        assert_eq!(
            Message::decode(&msg(g::UFFD_EVENT_FORK, [7, 0, 0])),
            Ok(Message::Fork { fd: 7 })
        );
        assert_eq!(
            Message::decode(&msg(0xee, [0, 0, 0])),
            Ok(Message::Unknown { kind: 0xee })
        );
        assert_eq!(Message::decode(&[0u8; 31]), Err(DecodeError(31)));
        assert_eq!(Message::decode(&[0u8; 33]), Err(DecodeError(33)));
    }
}
