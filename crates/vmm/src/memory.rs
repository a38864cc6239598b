//! Guest RAM: one host mapping, placed at guest physical address 0.
//!
//! This module and `vcpu.rs` are the crate's only `unsafe`: the mapping is
//! created here, lives as long as the [`GuestMemory`] value, and every access
//! goes through a bounds-checked copy. The guest writes the same memory
//! concurrently, so no Rust reference to guest memory is ever handed out;
//! copies use raw pointers (a torn read of a word the guest is rewriting is
//! a value the guest could have seen, never undefined behaviour in the VMM's
//! own data).

use std::ffi::c_void;
use std::fs::File;
use std::io::Write;
use std::os::fd::OwnedFd;
use std::os::unix::fs::FileExt;
use std::ptr::NonNull;

use rustix::mm::{MapFlags, ProtFlags};
use serde::{Deserialize, Serialize};

use crate::error::Error;

/// 4 KiB.
pub const PAGE: u64 = 4096;
/// 2 MiB: guest memory sizes are a multiple of this (the guest's page tables
/// map it with 2 MiB pages, and hugetlbfs backing needs it).
pub const HUGE_PAGE: u64 = 2 << 20;

/// How guest RAM is backed on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub enum Backing {
    /// Anonymous private memory, as Firecracker maps it.
    #[default]
    Anonymous,
    /// A shared memfd (shmem), as a VMM that shares memory with a device
    /// process maps it.
    Memfd,
    /// 2 MiB pages from hugetlbfs (MAP_HUGETLB); needs free huge pages
    /// (`/proc/sys/vm/nr_hugepages`).
    Hugetlb,
}

impl Backing {
    /// The page size the userfaultfd serves this memory in.
    pub fn page_size(self) -> u64 {
        match self {
            Backing::Hugetlb => HUGE_PAGE,
            Backing::Anonymous | Backing::Memfd => PAGE,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Backing::Anonymous => "anonymous",
            Backing::Memfd => "memfd",
            Backing::Hugetlb => "hugetlb",
        }
    }
}

/// Guest RAM: `len` bytes at guest physical address 0.
#[derive(Debug)]
pub struct GuestMemory {
    ptr: NonNull<u8>,
    len: u64,
    backing: Backing,
    /// Keeps the memfd alive for the mapping's lifetime (memfd backing).
    _memfd: Option<OwnedFd>,
    /// While a migration tracks changes: what this process wrote or
    /// discarded in guest memory (KVM's dirty log sees only vCPU writes).
    log: std::sync::Mutex<Option<HostLog>>,
}

/// Changes made to guest memory from the host side (not by vCPUs) since the
/// log was started or last taken: `(gpa, len)` ranges.
#[derive(Debug, Default, Clone)]
pub struct HostLog {
    pub written: Vec<(u64, u64)>,
    /// Given back to the host (a balloon): these read as zeros now.
    pub discarded: Vec<(u64, u64)>,
}

// SAFETY: the mapping is plain memory owned by this value; every access is a
// raw copy through `ptr` with bounds checked, so sharing the address between
// threads is sound (the guest itself accesses it concurrently anyway).
unsafe impl Send for GuestMemory {}
// SAFETY: see `Send`; no method hands out references into the mapping.
unsafe impl Sync for GuestMemory {}

impl GuestMemory {
    /// Maps `len` bytes (a multiple of 2 MiB) of fresh memory. Nothing is
    /// populated: every page is missing until touched.
    pub fn new(len: u64, backing: Backing) -> Result<GuestMemory, Error> {
        if len == 0 || !len.is_multiple_of(HUGE_PAGE) {
            return Err(Error::Config(format!(
                "guest memory must be a non-zero multiple of 2 MiB, not {len} bytes"
            )));
        }
        let size = usize::try_from(len)
            .map_err(|_| Error::Config(format!("guest memory of {len} bytes is too large")))?;
        let prot = ProtFlags::READ | ProtFlags::WRITE;
        let (ptr, memfd) = match backing {
            Backing::Anonymous | Backing::Hugetlb => {
                let mut flags = MapFlags::PRIVATE | MapFlags::NORESERVE;
                if backing == Backing::Hugetlb {
                    flags |= MapFlags::HUGETLB;
                }
                // SAFETY: a fresh anonymous mapping at an address the kernel
                // chooses overlaps nothing of ours.
                let ptr =
                    unsafe { rustix::mm::mmap_anonymous(std::ptr::null_mut(), size, prot, flags) }
                        .map_err(|e| match (backing, e) {
                            (Backing::Hugetlb, rustix::io::Errno::NOMEM) => Error::Config(format!(
                                "no free 2 MiB huge pages for {} MiB of guest memory: raise \
                             /proc/sys/vm/nr_hugepages (needs {})",
                                len >> 20,
                                len / HUGE_PAGE
                            )),
                            _ => Error::os("mmap guest memory", e),
                        })?;
                (ptr, None)
            }
            Backing::Memfd => {
                let fd =
                    rustix::fs::memfd_create("pagewire-guest", rustix::fs::MemfdFlags::CLOEXEC)
                        .map_err(|e| Error::os("memfd_create", e))?;
                rustix::fs::ftruncate(&fd, len).map_err(|e| Error::os("ftruncate memfd", e))?;
                // SAFETY: a fresh shared mapping of our own memfd at an
                // address the kernel chooses overlaps nothing of ours.
                let ptr = unsafe {
                    rustix::mm::mmap(std::ptr::null_mut(), size, prot, MapFlags::SHARED, &fd, 0)
                }
                .map_err(|e| Error::os("mmap memfd", e))?;
                (ptr, Some(fd))
            }
        };
        let ptr = NonNull::new(ptr.cast::<u8>())
            .ok_or_else(|| Error::Config("mmap returned a null mapping".into()))?;
        Ok(GuestMemory {
            ptr,
            len,
            backing,
            _memfd: memfd,
            log: std::sync::Mutex::new(None),
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn backing(&self) -> Backing {
        self.backing
    }

    /// The host address of guest physical address 0.
    pub fn host_addr(&self) -> u64 {
        self.ptr.as_ptr() as u64
    }

    fn check(&self, gpa: u64, len: usize) -> Result<usize, Error> {
        match gpa.checked_add(len as u64) {
            Some(end) if end <= self.len => Ok(gpa as usize),
            _ => Err(Error::OutOfRange { gpa, len }),
        }
    }

    /// Copies `buf.len()` bytes out of guest memory at `gpa`.
    pub fn read(&self, gpa: u64, buf: &mut [u8]) -> Result<(), Error> {
        let at = self.check(gpa, buf.len())?;
        // SAFETY: `check` keeps the range inside the mapping, which lives as
        // long as `self`; `buf` is ours and cannot overlap guest memory
        // (no reference into the mapping is ever created).
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        Ok(())
    }

    /// Copies `data` into guest memory at `gpa`.
    pub fn write(&self, gpa: u64, data: &[u8]) -> Result<(), Error> {
        let at = self.check(gpa, data.len())?;
        // SAFETY: as in `read`, with the copy's direction reversed.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        };
        self.note(gpa, data.len() as u64, false);
        Ok(())
    }

    /// Starts (or restarts, empty) the log of host-side changes that a
    /// migration needs besides KVM's dirty log: [`write`](Self::write),
    /// [`fill_words`](Self::fill_words) and [`discard`](Self::discard) are
    /// recorded until [`stop_log`](Self::stop_log).
    pub fn start_log(&self) {
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = Some(HostLog::default());
    }

    /// What was changed since the log started or was last taken (empty
    /// when no log runs); the log goes on, empty.
    pub fn take_log(&self) -> HostLog {
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .as_mut()
            .map(std::mem::take)
            .unwrap_or_default()
    }

    pub fn stop_log(&self) {
        *self.log.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }

    /// Records a change, after it was made: a reader that takes the log
    /// then reads the memory sees the change (or a later one).
    fn note(&self, gpa: u64, len: u64, discard: bool) {
        if let Some(log) = self.log.lock().unwrap_or_else(|e| e.into_inner()).as_mut() {
            let v = if discard {
                &mut log.discarded
            } else {
                &mut log.written
            };
            match v.last_mut() {
                Some(last) if last.0 + last.1 == gpa => last.1 += len,
                _ => v.push((gpa, len)),
            }
        }
    }

    pub fn read_u64(&self, gpa: u64) -> Result<u64, Error> {
        let mut b = [0u8; 8];
        self.read(gpa, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    pub fn write_u64(&self, gpa: u64, v: u64) -> Result<(), Error> {
        self.write(gpa, &v.to_le_bytes())
    }

    /// Fills `[gpa, gpa + len)` with `f(address)` for each 8-byte word.
    pub fn fill_words(&self, gpa: u64, len: u64, f: impl Fn(u64) -> u64) -> Result<(), Error> {
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = gpa;
        let end = gpa + len;
        while at < end {
            let n = ((end - at) as usize).min(chunk.len());
            for (i, w) in chunk[..n].chunks_exact_mut(8).enumerate() {
                w.copy_from_slice(&f(at + 8 * i as u64).to_le_bytes());
            }
            self.write(at, &chunk[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    /// Writes all of guest memory to `file` from offset 0 (Firecracker's
    /// memory-file layout). 4 KiB pages of zeros are left as holes, so a
    /// page source can map them as zero pages without reading.
    pub fn save(&self, file: &mut File) -> Result<(), Error> {
        let mut chunk = vec![0u8; 1 << 20];
        let mut at = 0u64;
        while at < self.len {
            let n = ((self.len - at) as usize).min(chunk.len());
            self.read(at, &mut chunk[..n])?;
            for (i, page) in chunk[..n].chunks(PAGE as usize).enumerate() {
                if page.iter().any(|&b| b != 0) {
                    file.write_all_at(page, at + (i as u64) * PAGE)
                        .map_err(|e| Error::io("writing the memory file", e))?;
                }
            }
            at += n as u64;
        }
        file.set_len(self.len)
            .map_err(|e| Error::io("sizing the memory file", e))?;
        file.flush()
            .map_err(|e| Error::io("writing the memory file", e))?;
        Ok(())
    }

    /// Reads all of guest memory from `file` (eager restore), straight into
    /// the mapping. Only the file's data is read: its holes are zeros, which
    /// is what fresh memory already holds. Returns the bytes read. Must be
    /// called before any vCPU runs.
    pub fn load(&self, file: &File) -> Result<u64, Error> {
        let mut read = 0u64;
        for (start, end) in data_extents(file, self.len) {
            let mut at = start;
            while at < end {
                let n = ((end - at) as usize).min(64 << 20);
                let got = self.read_file_into(file, at, n)?;
                if got == 0 {
                    return Err(Error::io(
                        "reading the memory file",
                        std::io::Error::new(
                            std::io::ErrorKind::UnexpectedEof,
                            format!("the file ends at {at:#x}, before the guest's memory does"),
                        ),
                    ));
                }
                at += got as u64;
                read += got as u64;
            }
        }
        Ok(read)
    }

    /// One `pread` of up to `n` bytes at file offset `at` into guest memory
    /// at the same address.
    fn read_file_into(&self, file: &File, at: u64, n: usize) -> Result<usize, Error> {
        use std::os::fd::AsRawFd;
        let start = self.check(at, n)?;
        loop {
            // SAFETY: `check` keeps the range inside the mapping, which lives
            // as long as `self`; the kernel writes into it like any user
            // buffer, and no Rust reference into guest memory exists.
            let r = unsafe {
                libc::pread(
                    file.as_raw_fd(),
                    self.ptr.as_ptr().add(start).cast(),
                    n,
                    at as libc::off_t,
                )
            };
            if r >= 0 {
                return Ok(r as usize);
            }
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("reading the memory file", e));
            }
        }
    }

    /// Gives `[gpa, gpa + len)` back to the host, as a balloon does:
    /// MADV_DONTNEED (anonymous, hugetlb) or MADV_REMOVE (memfd). The range
    /// reads as zeros afterwards.
    pub fn discard(&self, gpa: u64, len: u64) -> Result<(), Error> {
        let page = self.backing.page_size();
        if !gpa.is_multiple_of(page) || !len.is_multiple_of(page) {
            return Err(Error::Config(format!(
                "discard of {len:#x} bytes at {gpa:#x} is not aligned to {page} bytes"
            )));
        }
        let at = self.check(gpa, len as usize)?;
        let advice = match self.backing {
            Backing::Memfd => rustix::mm::Advice::LinuxRemove,
            Backing::Anonymous | Backing::Hugetlb => rustix::mm::Advice::LinuxDontNeed,
        };
        // SAFETY: the range lies inside our mapping (checked); discarding it
        // only changes what the guest reads there, which is the point.
        unsafe {
            rustix::mm::madvise(
                self.ptr.as_ptr().add(at).cast::<c_void>(),
                len as usize,
                advice,
            )
        }
        .map_err(|e| Error::os("madvise (discard)", e))?;
        self.note(gpa, len, true);
        Ok(())
    }
}

/// The data extents of the first `len` bytes of `file` (SEEK_DATA and
/// SEEK_HOLE), or the whole range if the filesystem cannot say.
fn data_extents(file: &File, len: u64) -> Vec<(u64, u64)> {
    use rustix::fs::{seek, SeekFrom};
    let mut out = Vec::new();
    let mut pos = 0u64;
    while pos < len {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d.min(len),
            Err(rustix::io::Errno::NXIO) => break,
            Err(_) => return vec![(0, len)],
        };
        if data >= len {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) => h.min(len),
            Err(_) => return vec![(0, len)],
        };
        out.push((data, hole));
        pos = hole;
    }
    out
}

impl Drop for GuestMemory {
    fn drop(&mut self) {
        // SAFETY: the mapping was created by `new` with this address and
        // length, and nothing refers to it once `self` is dropped (the VM
        // that used it holds an `Arc` to this value).
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast(), self.len as usize) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_write_bounds_and_save_load() {
        let m = GuestMemory::new(HUGE_PAGE, Backing::Anonymous).expect("map");
        m.write_u64(8, 0x1122).expect("write");
        assert_eq!(m.read_u64(8).expect("read"), 0x1122);
        assert!(matches!(
            m.read_u64(HUGE_PAGE - 4),
            Err(Error::OutOfRange { .. })
        ));
        m.fill_words(PAGE * 3, PAGE, |a| a ^ 7).expect("fill");
        let mut f = tempfile::tempfile().expect("tmp");
        m.save(&mut f).expect("save");
        assert_eq!(f.metadata().expect("meta").len(), HUGE_PAGE);
        let n = GuestMemory::new(HUGE_PAGE, Backing::Memfd).expect("map");
        assert_eq!(n.load(&f).expect("load"), 2 * PAGE);
        assert_eq!(n.read_u64(8).expect("read"), 0x1122);
        assert_eq!(
            n.read_u64(PAGE * 3 + 16).expect("read"),
            (PAGE * 3 + 16) ^ 7
        );
        n.discard(PAGE * 3, PAGE).expect("discard");
        assert_eq!(n.read_u64(PAGE * 3 + 16).expect("read"), 0);
        assert!(GuestMemory::new(PAGE, Backing::Anonymous).is_err());
    }
}
