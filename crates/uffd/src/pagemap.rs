//! `PAGEMAP_SCAN` on `/proc/PID/pagemap`: find pages by state (present,
//! written since write-protected, zero pfn, huge, ...) without reading one
//! entry per page, and optionally write-protect what was found in the same
//! call (exact dirty tracking with WP_ASYNC).

use std::fs::File;
use std::os::fd::AsFd;

use linux_raw_sys::general as g;

use crate::sys;

bitflags::bitflags! {
    /// `PAGE_IS_*` categories.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct Categories: u64 {
        const WPALLOWED = g::PAGE_IS_WPALLOWED as u64;
        const WRITTEN = g::PAGE_IS_WRITTEN as u64;
        const FILE = g::PAGE_IS_FILE as u64;
        const PRESENT = g::PAGE_IS_PRESENT as u64;
        const SWAPPED = g::PAGE_IS_SWAPPED as u64;
        const PFNZERO = g::PAGE_IS_PFNZERO as u64;
        const HUGE = g::PAGE_IS_HUGE as u64;
        const SOFT_DIRTY = g::PAGE_IS_SOFT_DIRTY as u64;
        const GUARD = g::PAGE_IS_GUARD as u64;
    }
}

bitflags::bitflags! {
    /// `PM_SCAN_*` flags.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct ScanFlags: u64 {
        /// Write-protect the pages that match (WP_ASYNC dirty tracking).
        const WP_MATCHING = g::PM_SCAN_WP_MATCHING as u64;
        /// Fail with EPERM unless every VMA in range is WP_ASYNC-registered.
        const CHECK_WPASYNC = g::PM_SCAN_CHECK_WPASYNC as u64;
    }
}

/// What to scan for. A page matches when
/// `((categories ^ inverted) & mask) == mask` and, if `anyof` is not empty,
/// `(categories ^ inverted) & anyof != 0`.
#[derive(Debug, Clone, Copy, Default)]
pub struct ScanArgs {
    pub start: u64,
    pub end: u64,
    pub flags: ScanFlags,
    pub inverted: Categories,
    pub mask: Categories,
    pub anyof: Categories,
    /// Categories reported in each [`PageRegion`].
    pub returned: Categories,
    /// Stop after this many matching pages (0: no limit).
    pub max_pages: u64,
}

/// A run of pages with the same reported categories.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageRegion {
    pub start: u64,
    pub end: u64,
    pub categories: Categories,
}

/// What one scan call did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanResult {
    /// Regions appended to the output.
    pub regions: usize,
    /// Where the walk stopped: `end` when the whole range was scanned,
    /// earlier when the output or `max_pages` filled up (call again from here).
    pub walk_end: u64,
}

/// An open `/proc/PID/pagemap`.
#[derive(Debug)]
pub struct PageMap {
    file: File,
}

impl PageMap {
    /// The calling process's page map.
    pub fn open_self() -> std::io::Result<PageMap> {
        Ok(PageMap {
            file: File::open("/proc/self/pagemap")?,
        })
    }

    /// Another process's page map (needs ptrace access to it).
    pub fn open_pid(pid: u32) -> std::io::Result<PageMap> {
        Ok(PageMap {
            file: File::open(format!("/proc/{pid}/pagemap"))?,
        })
    }

    /// Runs `PAGEMAP_SCAN`, appending at most `capacity` regions to `out`.
    pub fn scan(
        &self,
        args: &ScanArgs,
        out: &mut Vec<PageRegion>,
        capacity: usize,
    ) -> Result<ScanResult, crate::Error> {
        let capacity = capacity.max(1);
        let mut raw = vec![
            g::page_region {
                start: 0,
                end: 0,
                categories: 0,
            };
            capacity
        ];
        let mut arg = g::pm_scan_arg {
            size: core::mem::size_of::<g::pm_scan_arg>() as u64,
            flags: args.flags.bits(),
            start: args.start,
            end: args.end,
            walk_end: 0,
            vec: raw.as_mut_ptr() as u64,
            vec_len: capacity as u64,
            max_pages: args.max_pages,
            category_inverted: args.inverted.bits(),
            category_mask: args.mask.bits(),
            category_anyof_mask: args.anyof.bits(),
            return_mask: args.returned.bits(),
        };
        // SAFETY: PAGEMAP_SCAN takes a `struct pm_scan_arg` whose `vec`
        // points at `vec_len` writable `page_region`s, which `raw` provides.
        let n = unsafe { sys::call(self.file.as_fd(), sys::PAGEMAP_SCAN, &mut arg) }
            .map_err(|e| crate::Error::from_errno("PAGEMAP_SCAN", e))?;
        let n = usize::try_from(n).unwrap_or(0).min(capacity);
        out.extend(raw[..n].iter().map(|r| PageRegion {
            start: r.start,
            end: r.end,
            categories: Categories::from_bits_retain(r.categories),
        }));
        Ok(ScanResult {
            regions: n,
            walk_end: arg.walk_end,
        })
    }
}
