//! Messages read from a userfaultfd.

use std::os::fd::{FromRawFd, OwnedFd};

use linux_raw_sys::general as g;
use rustix::io::Errno;

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

impl Uffd {
    /// Reads up to `max` (at most [`MAX_BATCH`]) messages in one `read(2)`
    /// and appends them to `out`. Returns how many were read: 0 when none is
    /// queued on a non-blocking userfaultfd (and also when the process has
    /// exited: nothing signals that; watch the process with a pidfd).
    /// On a blocking userfaultfd the call waits for at least one message.
    pub fn read_events(&self, out: &mut Vec<Event>, max: usize) -> Result<usize, Error> {
        const MSG: usize = core::mem::size_of::<g::uffd_msg>();
        let max = max.clamp(1, MAX_BATCH);
        let mut buf = [0u8; MSG * MAX_BATCH];
        let n = match rustix::io::read(self, &mut buf[..MSG * max]) {
            Ok(n) => n,
            Err(Errno::AGAIN) => return Ok(0),
            Err(errno) => return Err(Error::Os { op: "read", errno }),
        };
        let count = n / MSG;
        out.extend(buf[..count * MSG].chunks_exact(MSG).map(decode));
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

fn decode(msg: &[u8]) -> Event {
    match msg[0] as u32 {
        g::UFFD_EVENT_PAGEFAULT => {
            let tid = half(msg, 16);
            Event::PageFault {
                address: word(msg, 8),
                flags: FaultFlags::from_bits_retain(word(msg, 0)),
                thread_id: (tid != 0).then_some(tid),
            }
        }
        g::UFFD_EVENT_FORK => {
            // SAFETY: for a FORK message the kernel installed this descriptor
            // in our table as it was read; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(half(msg, 0) as i32) };
            Event::Fork {
                uffd: Uffd::from_fd(fd),
            }
        }
        g::UFFD_EVENT_REMAP => Event::Remap {
            from: word(msg, 0),
            to: word(msg, 8),
            len: word(msg, 16),
        },
        g::UFFD_EVENT_REMOVE => Event::Remove {
            start: word(msg, 0),
            end: word(msg, 8),
        },
        g::UFFD_EVENT_UNMAP => Event::Unmap {
            start: word(msg, 0),
            end: word(msg, 8),
        },
        kind => Event::Unknown { kind: kind as u8 },
    }
}
