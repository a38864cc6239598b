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
        for chunk in buf[..count * MSG].chunks_exact(MSG) {
            // SAFETY: `uffd_msg` is plain old data (integers and unions of
            // integers) for which every bit pattern is valid, and `chunk` is
            // exactly `size_of::<uffd_msg>()` bytes; read_unaligned copes
            // with the packed layout.
            let msg: g::uffd_msg = unsafe { core::ptr::read_unaligned(chunk.as_ptr().cast()) };
            out.push(decode(&msg));
        }
        Ok(count)
    }
}

fn decode(msg: &g::uffd_msg) -> Event {
    let arg = msg.arg;
    // SAFETY (for each union read below): the kernel fills the union member
    // that `msg.event` names, and every member is plain integers.
    match msg.event as u32 {
        g::UFFD_EVENT_PAGEFAULT => {
            let pf = unsafe { arg.pagefault };
            let tid = unsafe { pf.feat.ptid };
            Event::PageFault {
                address: pf.address,
                flags: FaultFlags::from_bits_retain(pf.flags),
                thread_id: (tid != 0).then_some(tid),
            }
        }
        g::UFFD_EVENT_FORK => {
            let ufd = unsafe { arg.fork }.ufd;
            // SAFETY: the kernel installed this descriptor in our table for
            // this message; nothing else owns it.
            let fd = unsafe { OwnedFd::from_raw_fd(ufd as i32) };
            Event::Fork {
                uffd: Uffd::from_fd(fd),
            }
        }
        g::UFFD_EVENT_REMAP => {
            let r = unsafe { arg.remap };
            Event::Remap {
                from: r.from,
                to: r.to,
                len: r.len,
            }
        }
        g::UFFD_EVENT_REMOVE => {
            let r = unsafe { arg.remove };
            Event::Remove {
                start: r.start,
                end: r.end,
            }
        }
        g::UFFD_EVENT_UNMAP => {
            let r = unsafe { arg.remove };
            Event::Unmap {
                start: r.start,
                end: r.end,
            }
        }
        kind => Event::Unknown { kind: kind as u8 },
    }
}
