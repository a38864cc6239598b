//! Where post-copy pages wait between the socket and the pager: an
//! anonymous mapping as large as guest memory, of which only pages that
//! arrived and were not yet mapped into the guest use memory (`release`
//! gives the rest back). The only `unsafe` of the crate lives here.
//!
//! # Invariant
//! A page is written only before its `arrived` bit is set (the caller's
//! bitmap, Release) and read only after it was seen set (Acquire); a
//! discard happens only after the guest's own copy of the page was
//! discarded, so a reader racing it copies bytes the pager will not map.

use std::ffi::c_void;
use std::ptr::NonNull;

#[derive(Debug)]
pub(crate) struct Staging {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain memory owned by this value; every access is a bounds-checked
// raw copy, and callers order page accesses through atomic bitmaps (see the
// module's invariant).
unsafe impl Send for Staging {}
// SAFETY: as for Send; no reference into the mapping is ever handed out.
unsafe impl Sync for Staging {}

impl Staging {
    pub fn new(len: u64) -> std::io::Result<Staging> {
        let len = usize::try_from(len).map_err(std::io::Error::other)?;
        // SAFETY: a fresh private anonymous mapping at an address the kernel
        // chooses overlaps nothing of ours.
        let p = unsafe {
            rustix::mm::mmap_anonymous(
                std::ptr::null_mut(),
                len.max(1),
                rustix::mm::ProtFlags::READ | rustix::mm::ProtFlags::WRITE,
                rustix::mm::MapFlags::PRIVATE | rustix::mm::MapFlags::NORESERVE,
            )
        }
        .map_err(std::io::Error::from)?;
        let ptr = NonNull::new(p.cast::<u8>())
            .ok_or_else(|| std::io::Error::other("mmap returned a null mapping"))?;
        Ok(Staging { ptr, len })
    }

    fn check(&self, off: u64, len: usize) -> Option<usize> {
        let off = usize::try_from(off).ok()?;
        (off.checked_add(len)? <= self.len).then_some(off)
    }

    pub fn write(&self, off: u64, data: &[u8]) -> bool {
        let Some(at) = self.check(off, data.len()) else {
            return false;
        };
        // SAFETY: in bounds (checked); see the module's invariant for
        // concurrent access.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(at), data.len())
        };
        true
    }

    pub fn read(&self, off: u64, buf: &mut [u8]) -> bool {
        let Some(at) = self.check(off, buf.len()) else {
            return false;
        };
        // SAFETY: in bounds (checked); `buf` is the caller's and cannot
        // overlap the mapping.
        unsafe {
            std::ptr::copy_nonoverlapping(self.ptr.as_ptr().add(at), buf.as_mut_ptr(), buf.len())
        };
        true
    }

    /// Gives the range's memory back; it reads as zeros afterwards.
    pub fn discard(&self, off: u64, len: usize) {
        if let Some(at) = self.check(off, len) {
            // SAFETY: in bounds (checked); this only changes what the range
            // reads (zeros), which the caller wants.
            let _ = unsafe {
                rustix::mm::madvise(
                    self.ptr.as_ptr().add(at).cast::<c_void>(),
                    len,
                    rustix::mm::Advice::LinuxDontNeed,
                )
            };
        }
    }
}

impl Drop for Staging {
    fn drop(&mut self) {
        // SAFETY: our own mapping, unmapped once; nothing refers into it.
        let _ = unsafe { rustix::mm::munmap(self.ptr.as_ptr().cast::<c_void>(), self.len.max(1)) };
    }
}
