//! Page state that outlives the serving process.
//!
//! A served VM must survive its server: a crash, a restart for an upgrade,
//! a hand-over to a new process. Its userfaultfd and socket can be kept
//! alive elsewhere (systemd's file-descriptor store, pagewire's supervisor,
//! the successor), but what the server knew about each page cannot be asked
//! of the kernel: a page the guest released (a balloon's `MADV_DONTNEED`)
//! and a page never mapped are both simply missing, and serving snapshot
//! bytes to the first would hand the guest stale data. So a session that
//! may be handed on keeps its per-page states in a [`PageStateFile`]: a
//! memfd mapped shared, which *is* the state array the serving threads
//! update (one byte per page, no extra write on the fault path). Whoever
//! holds the memfd holds the page state, exactly as the last serving thread
//! left it.
//!
//! # What a successor may trust
//! - `Present`, `Discarded`, `Failed` and `Missing` mean what they meant: a
//!   page mapped once and faulting again is served as zero (the engine's
//!   rule for any present page, see `session/mod.rs`), a discarded page gets
//!   zeros, a failed one stays poisoned.
//! - `Claimed` was a serving thread's in-flight claim: the copy may or may
//!   not have landed. It becomes `Missing`; a copy onto a page that did
//!   land fails with EEXIST, which the engine treats as mapped.
//!   `ClaimedDiscarded` becomes `Discarded`.
//! - The file describes the regions of the handshake. After an UNMAP or
//!   REMAP the layout no longer matches them and the file says so
//!   ([`PageStateFile::layout_changed`]): such a session cannot be rebuilt
//!   (Firecracker never enables those events).
//!
//! Only one process may serve from the file at a time: a successor adopts it
//! after its predecessor has exited (the hand-over waits for that).
//!
//! # Format (native endian: the file never leaves the host)
//! | offset | bytes | field |
//! |---|---|---|
//! | 0 | 8 | magic `PWPAGES1` |
//! | 8 | 4 | version (1) |
//! | 12 | 4 | flags: bit 0 = layout changed |
//! | 16 | 8 | number of regions n (≤ `MAX_REGIONS`) |
//! | 24 | 8 | length m of the caller's metadata |
//! | 32 | 32·n | regions: host base, length, source offset, page size |
//! | 32+32n | m | metadata (opaque to the engine) |
//! | next 64-byte boundary | 2048 | journal: the last batch of userfaultfd messages read, zeroed once applied |
//! | next 4 KiB boundary | one byte per page, region after region | page states |
//!
//! # The journal
//! The kernel zaps a range released with `MADV_DONTNEED` as soon as its
//! REMOVE message is read, before the reader can mark the pages Discarded.
//! A server killed in between would leave them Missing, and its successor
//! would serve them snapshot bytes. So messages are read straight into the
//! journal (the kernel copies them there within the `read`, which a fatal
//! signal cannot cut short) and zeroed once applied; an adopter replays any
//! REMOVE still there (idempotent: a released page must read zero anyway)
//! and treats an UNMAP or REMAP there as a changed layout.

use std::ops::Range;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, AtomicU8, Ordering};

use rustix::io::Errno;

use crate::region::{validate, PageSize, Region, RegionError, MAX_REGIONS};

const MAGIC: &[u8; 8] = b"PWPAGES1";
const VERSION: u32 = 1;
const HEADER: usize = 32;
const REGION_BYTES: usize = 32;
const FLAG_LAYOUT_CHANGED: u32 = 1;
/// Room for one batch of messages.
const JOURNAL_BYTES: usize = uffd::MESSAGE_BYTES * uffd::MAX_BATCH;
/// Largest caller metadata (a VM's name, snapshot, pid as JSON).
pub const MAX_META: usize = 64 << 10;

/// Why a page-state file could not be made or read.
#[derive(Debug, thiserror::Error)]
pub enum PersistError {
    #[error("{what}: {errno}")]
    Os { what: &'static str, errno: Errno },
    #[error("not a pagewire page-state file (bad magic or version)")]
    NotStateFile,
    #[error("page-state file is {actual} bytes, its header needs {needed}: truncated or corrupt")]
    Truncated { needed: u64, actual: u64 },
    #[error("page-state file: {0}")]
    Corrupt(&'static str),
    #[error("page-state file regions: {0}")]
    Region(#[from] RegionError),
    #[error("metadata of {0} bytes is larger than {MAX_META}")]
    MetaTooLarge(usize),
}

fn os(what: &'static str) -> impl Fn(Errno) -> PersistError {
    move |errno| PersistError::Os { what, errno }
}

/// Per-page states kept in a shared memfd mapping (see the module doc).
#[derive(Debug)]
pub struct PageStateFile {
    fd: OwnedFd,
    base: NonNull<u8>,
    len: usize,
    regions: Vec<Region>,
    /// Where each region's states start in the mapping, and how many.
    spans: Vec<Range<usize>>,
    meta: Vec<u8>,
    /// Where the journal lies in the mapping.
    journal: Range<usize>,
    /// Whoever writes the journal holds this (in a session, the thread
    /// reading the userfaultfd, which holds the layout's write lock too).
    journal_lock: std::sync::Mutex<()>,
}

// SAFETY: the mapping is only reached through `&[AtomicU8]` and
// `&AtomicU32` views (atomics are Sync) and read-only copies made at open;
// the pointer itself is never written through non-atomically after creation.
unsafe impl Send for PageStateFile {}
// SAFETY: as above.
unsafe impl Sync for PageStateFile {}

fn journal_start(n_regions: usize, meta_len: usize) -> usize {
    (HEADER + REGION_BYTES * n_regions + meta_len).next_multiple_of(64)
}

fn states_start(n_regions: usize, meta_len: usize) -> usize {
    (journal_start(n_regions, meta_len) + JOURNAL_BYTES).next_multiple_of(4096)
}

fn spans_of(regions: &[Region], start: usize) -> Result<Vec<Range<usize>>, PersistError> {
    let mut at = start;
    let mut spans = Vec::with_capacity(regions.len());
    for r in regions {
        let end = at
            .checked_add(r.pages())
            .ok_or(PersistError::Corrupt("too many pages"))?;
        spans.push(at..end);
        at = end;
    }
    Ok(spans)
}

impl PageStateFile {
    /// A new file for `regions`, every page Missing, with `meta` kept
    /// beside them for whoever adopts the file.
    pub fn create(regions: &[Region], meta: &[u8]) -> Result<PageStateFile, PersistError> {
        if meta.len() > MAX_META {
            return Err(PersistError::MetaTooLarge(meta.len()));
        }
        if regions.len() > MAX_REGIONS {
            return Err(PersistError::Corrupt("too many regions"));
        }
        let start = states_start(regions.len(), meta.len());
        let spans = spans_of(regions, start)?;
        let len = spans.last().map_or(start, |s| s.end).max(start);
        let fd = rustix::fs::memfd_create(
            "pagewire-page-state",
            rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
        )
        .map_err(os("memfd_create"))?;
        rustix::fs::ftruncate(&fd, len as u64).map_err(os("ftruncate of the page-state file"))?;
        // The size is fixed from now on: a holder cannot shrink it under a
        // mapping (which would turn a state access into SIGBUS).
        rustix::fs::fcntl_add_seals(
            &fd,
            rustix::fs::SealFlags::SHRINK
                | rustix::fs::SealFlags::GROW
                | rustix::fs::SealFlags::SEAL,
        )
        .map_err(os("sealing the page-state file"))?;
        let mut header = Vec::with_capacity(start);
        header.extend_from_slice(MAGIC);
        header.extend_from_slice(&VERSION.to_ne_bytes());
        header.extend_from_slice(&0u32.to_ne_bytes());
        header.extend_from_slice(&(regions.len() as u64).to_ne_bytes());
        header.extend_from_slice(&(meta.len() as u64).to_ne_bytes());
        for r in regions {
            for v in [
                r.host_base,
                r.len,
                r.source_offset,
                r.page_size.bytes() as u64,
            ] {
                header.extend_from_slice(&v.to_ne_bytes());
            }
        }
        header.extend_from_slice(meta);
        let mut done = 0;
        while done < header.len() {
            done += rustix::io::pwrite(&fd, &header[done..], done as u64)
                .map_err(os("writing the page-state header"))?;
        }
        // Missing is 0: the states of a fresh memfd are already right.
        let journal = journal_start(regions.len(), meta.len());
        Self::map(fd, len, regions.to_vec(), spans, meta.to_vec(), journal)
    }

    /// Adopts a file made by [`create`](Self::create) (in this process or
    /// an earlier one). Everything in it is checked before it is used.
    pub fn open(fd: OwnedFd) -> Result<PageStateFile, PersistError> {
        // Only a file that cannot shrink may be mapped: a holder that
        // truncated it would turn the server's next state access into
        // SIGBUS.
        let seals = rustix::fs::fcntl_get_seals(&fd).unwrap_or(rustix::fs::SealFlags::empty());
        if !seals.contains(rustix::fs::SealFlags::SHRINK) {
            return Err(PersistError::Corrupt(
                "not sealed against shrinking (not made by pagewire)",
            ));
        }
        let actual = rustix::fs::fstat(&fd)
            .map_err(os("fstat of the page-state file"))?
            .st_size as u64;
        let read = |off: u64, buf: &mut [u8]| -> Result<(), PersistError> {
            let mut done = 0;
            while done < buf.len() {
                let n = rustix::io::pread(&fd, &mut buf[done..], off + done as u64)
                    .map_err(os("reading the page-state file"))?;
                if n == 0 {
                    return Err(PersistError::Truncated {
                        needed: off + buf.len() as u64,
                        actual,
                    });
                }
                done += n;
            }
            Ok(())
        };
        let mut h = [0u8; HEADER];
        read(0, &mut h)?;
        let u32_at = |b: &[u8], o: usize| u32::from_ne_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]]);
        let u64_at = |b: &[u8], o: usize| {
            let mut a = [0u8; 8];
            a.copy_from_slice(&b[o..o + 8]);
            u64::from_ne_bytes(a)
        };
        if &h[..8] != MAGIC || u32_at(&h, 8) != VERSION {
            return Err(PersistError::NotStateFile);
        }
        let n = u64_at(&h, 16);
        let m = u64_at(&h, 24);
        if n > MAX_REGIONS as u64 {
            return Err(PersistError::Corrupt("too many regions"));
        }
        if m > MAX_META as u64 {
            return Err(PersistError::Corrupt("metadata too large"));
        }
        let (n, m) = (n as usize, m as usize);
        let mut rest = vec![0u8; REGION_BYTES * n + m];
        read(HEADER as u64, &mut rest)?;
        let mut regions = Vec::with_capacity(n);
        for i in 0..n {
            let o = i * REGION_BYTES;
            let page_size = PageSize::from_bytes(u64_at(&rest, o + 24))
                .ok_or(PersistError::Corrupt("unknown page size"))?;
            regions.push(Region {
                host_base: u64_at(&rest, o),
                len: u64_at(&rest, o + 8),
                source_offset: u64_at(&rest, o + 16),
                page_size,
            });
        }
        // The source's length is not known here: the caller checks the
        // regions against its source when it serves them.
        validate(&regions, u64::MAX)?;
        let meta = rest[REGION_BYTES * n..].to_vec();
        let spans = spans_of(&regions, states_start(n, m))?;
        let len = spans.last().map_or(states_start(n, m), |s| s.end);
        if actual < len as u64 {
            return Err(PersistError::Truncated {
                needed: len as u64,
                actual,
            });
        }
        let len = len.max(states_start(n, m));
        Self::map(fd, len, regions, spans, meta, journal_start(n, m))
    }

    fn map(
        fd: OwnedFd,
        len: usize,
        regions: Vec<Region>,
        spans: Vec<Range<usize>>,
        meta: Vec<u8>,
        journal: usize,
    ) -> Result<PageStateFile, PersistError> {
        // SAFETY: a new shared mapping of `len` bytes of our memfd, placed
        // by the kernel (no fixed address), so it overlaps nothing. The file
        // is at least `len` bytes and sealed against shrinking (created
        // here) or checked to be long enough (adopted); it is only accessed
        // through atomics (see the Sync impl).
        let p = unsafe {
            rustix::mm::mmap(
                std::ptr::null_mut(),
                len,
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::SHARED,
                &fd,
                0,
            )
        }
        .map_err(os("mapping the page-state file"))?;
        let base = NonNull::new(p.cast::<u8>()).ok_or(PersistError::Os {
            what: "mapping the page-state file",
            errno: Errno::NOMEM,
        })?;
        Ok(PageStateFile {
            fd,
            base,
            len,
            regions,
            spans,
            meta,
            journal: journal..journal + JOURNAL_BYTES,
            journal_lock: std::sync::Mutex::new(()),
        })
    }

    /// The regions of the handshake, in the order they were given.
    pub fn regions(&self) -> &[Region] {
        &self.regions
    }

    /// The caller's metadata.
    pub fn meta(&self) -> &[u8] {
        &self.meta
    }

    /// The memfd, to hand on (systemd's store, a successor).
    pub fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }

    fn flags(&self) -> &AtomicU32 {
        // SAFETY: offset 12 is 4-byte aligned (the mapping is page aligned)
        // and inside the header, which every mapping holds (len ≥ 4096);
        // the reference lives no longer than `self`, which owns the mapping.
        unsafe { &*self.base.as_ptr().add(12).cast::<AtomicU32>() }
    }

    /// Whether the session's layout changed (UNMAP, REMAP) after the file
    /// was made, so that its regions no longer describe the memory.
    pub fn layout_changed(&self) -> bool {
        self.flags().load(Ordering::Acquire) & FLAG_LAYOUT_CHANGED != 0
    }

    pub(crate) fn mark_layout_changed(&self) {
        self.flags().fetch_or(FLAG_LAYOUT_CHANGED, Ordering::AcqRel);
    }

    /// The states of region `i` (in [`regions`](Self::regions) order).
    pub(crate) fn states(&self, i: usize) -> &[AtomicU8] {
        let span = self.spans[i].clone();
        debug_assert!(span.end <= self.len);
        // SAFETY: `span` lies inside the mapping (checked at create/open:
        // len ≥ the last span's end), AtomicU8 has the size and alignment of
        // u8, and the slice lives no longer than `self`.
        unsafe {
            std::slice::from_raw_parts(
                self.base.as_ptr().add(span.start).cast::<AtomicU8>(),
                span.len(),
            )
        }
    }

    /// Runs `f` on the journal, alone.
    pub(crate) fn with_journal<R>(&self, f: impl FnOnce(&mut [u8]) -> R) -> R {
        let _alone = self.journal_lock.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: the journal lies inside the mapping (before the states,
        // after the header: see `states_start`); within this process only
        // the holder of `journal_lock` makes a reference to it, and another
        // process reads it only once this one has stopped serving (the
        // hand-over protocol); the slice does not outlive the lock.
        let buf = unsafe {
            std::slice::from_raw_parts_mut(
                self.base.as_ptr().add(self.journal.start),
                self.journal.len(),
            )
        };
        f(buf)
    }

    /// Forgets the journal's first `messages` messages: they have been
    /// applied (a read fills the journal from its start).
    pub(crate) fn clear_journal(&self, messages: usize) {
        self.with_journal(|buf| {
            let n = (messages * uffd::MESSAGE_BYTES).min(buf.len());
            buf[..n].fill(0);
        });
    }

    /// The messages the journal still holds: read by a server that stopped
    /// before it applied them (a REMOVE to replay, faults to wake).
    pub fn journal_messages(&self) -> Vec<uffd::Message> {
        self.with_journal(|buf| {
            buf.chunks_exact(uffd::MESSAGE_BYTES)
                .filter(|m| m[0] != 0)
                .filter_map(|m| uffd::Message::decode(m).ok())
                .collect()
        })
    }

    /// How many pages are in each state, for logs (Missing, Claimed,
    /// Present, Discarded, ClaimedDiscarded, Failed).
    pub fn census(&self) -> [u64; 6] {
        let mut c = [0u64; 6];
        for i in 0..self.regions.len() {
            for s in self.states(i) {
                c[(s.load(Ordering::Relaxed) as usize).min(5)] += 1;
            }
        }
        c
    }
}

impl Drop for PageStateFile {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `map`; no view of it
        // outlives `self` (views borrow `self`).
        let _ = unsafe { rustix::mm::munmap(self.base.as_ptr().cast(), self.len) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn region(base: u64, len: u64, off: u64) -> Region {
        Region {
            host_base: base,
            len,
            source_offset: off,
            page_size: PageSize::Base4K,
        }
    }

    #[test]
    fn the_journal_keeps_what_was_read_until_cleared() {
        let f = PageStateFile::create(&[region(0x10000, 8 << 12, 0)], b"").expect("create");
        assert!(f.journal_messages().is_empty());
        // A REMOVE message as the kernel lays it out: event in byte 0,
        // start and end in the argument union from byte 8.
        f.with_journal(|buf| {
            buf[0] = linux_raw_sys::general::UFFD_EVENT_REMOVE as u8;
            buf[8..16].copy_from_slice(&0x10000u64.to_ne_bytes());
            buf[16..24].copy_from_slice(&0x12000u64.to_ne_bytes());
        });
        let g = PageStateFile::open(f.as_fd().try_clone_to_owned().expect("dup")).expect("open");
        assert_eq!(
            g.journal_messages(),
            vec![uffd::Message::Remove {
                start: 0x10000,
                end: 0x12000
            }]
        );
        f.clear_journal(1);
        assert!(g.journal_messages().is_empty());
    }

    #[test]
    fn states_survive_a_reopen_through_another_fd() {
        let regions = [
            region(0x10000, 8 << 12, 0),
            region(0x100000, 3 << 12, 8 << 12),
        ];
        let f = PageStateFile::create(&regions, b"{\"vm\":1}").expect("create");
        f.states(0)[3].store(2, Ordering::Release);
        f.states(1)[2].store(3, Ordering::Release);
        let dup = f.as_fd().try_clone_to_owned().expect("dup");
        let g = PageStateFile::open(dup).expect("open");
        assert_eq!(g.regions(), &regions);
        assert_eq!(g.meta(), b"{\"vm\":1}");
        assert_eq!(g.states(0)[3].load(Ordering::Acquire), 2);
        assert_eq!(g.states(1)[2].load(Ordering::Acquire), 3);
        assert_eq!(g.states(1).len(), 3);
        // One memory: a change through one mapping shows in the other.
        g.states(0)[0].store(5, Ordering::Release);
        assert_eq!(f.states(0)[0].load(Ordering::Acquire), 5);
        assert!(!g.layout_changed());
        f.mark_layout_changed();
        assert!(g.layout_changed());
        assert_eq!(g.census(), [8, 0, 1, 1, 0, 1]);
    }

    #[test]
    fn garbage_is_refused_with_a_reason() {
        let sealed = |name: &str, bytes: &[u8]| {
            let fd = rustix::fs::memfd_create(
                name,
                rustix::fs::MemfdFlags::CLOEXEC | rustix::fs::MemfdFlags::ALLOW_SEALING,
            )
            .expect("memfd");
            rustix::io::pwrite(&fd, bytes, 0).expect("write");
            rustix::fs::fcntl_add_seals(&fd, rustix::fs::SealFlags::SHRINK).expect("seal");
            fd
        };
        let unsealed =
            rustix::fs::memfd_create("unsealed", rustix::fs::MemfdFlags::CLOEXEC).expect("memfd");
        assert!(matches!(
            PageStateFile::open(unsealed),
            Err(PersistError::Corrupt(_))
        ));
        let fd = sealed("junk", b"not a state file at all, no, no...");
        assert!(matches!(
            PageStateFile::open(fd),
            Err(PersistError::NotStateFile)
        ));
        // A truncated file: header says more regions than there are bytes.
        let f = PageStateFile::create(&[region(0x10000, 1 << 20, 0)], b"").expect("create");
        let mut head = vec![0u8; 4096];
        rustix::io::pread(f.as_fd(), &mut head, 0).expect("read");
        let fd = sealed("short", &head);
        assert!(matches!(
            PageStateFile::open(fd),
            Err(PersistError::Truncated { .. })
        ));
    }
}
