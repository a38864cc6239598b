//! Safe bindings to Linux userfaultfd and `PAGEMAP_SCAN`.
//!
//! This crate covers the whole current kernel interface and keeps no policy:
//! it opens userfaultfds ([`Uffd::open`]), negotiates features
//! ([`Uffd::api`]), registers ranges in MISSING, WP and MINOR modes, resolves
//! faults (COPY, ZEROPAGE, CONTINUE, MOVE, POISON, WAKE, WRITEPROTECT), reads
//! messages in batches ([`Uffd::read_events`]) and scans page tables
//! ([`PageMap::scan`]).
//!
//! Results keep the kernel's distinctions (see [`Error`]): a partial copy
//! reports the bytes done, EAGAIN because events are queued is
//! [`Error::EventsPending`], and EEXIST, ENOENT and ESRCH have their own
//! variants, because a page server must react to each differently.
//!
//! Resolving ioctls take the destination as a plain address (`u64`): it lives
//! in the address space the userfaultfd was created for, often another
//! process, and the kernel checks it. Nothing here dereferences it.

mod error;
mod event;
mod pagemap;
mod sys;

use std::fs::OpenOptions as FsOpenOptions;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};

use linux_raw_sys::general as g;
use rustix::io::Errno;

pub use error::{AdoptError, ApiError, Error, OpenError};
pub use event::{DecodeError, Event, FaultFlags, Message, MAX_BATCH, MESSAGE_BYTES};
pub use pagemap::{Categories, PageMap, PageRegion, ScanArgs, ScanFlags, ScanResult};
pub use rustix::io::Errno as RawErrno;

bitflags::bitflags! {
    /// `UFFD_FEATURE_*`: optional behaviour negotiated with [`Uffd::api`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Features: u64 {
        const PAGEFAULT_FLAG_WP = g::UFFD_FEATURE_PAGEFAULT_FLAG_WP as u64;
        const EVENT_FORK = g::UFFD_FEATURE_EVENT_FORK as u64;
        const EVENT_REMAP = g::UFFD_FEATURE_EVENT_REMAP as u64;
        const EVENT_REMOVE = g::UFFD_FEATURE_EVENT_REMOVE as u64;
        const MISSING_HUGETLBFS = g::UFFD_FEATURE_MISSING_HUGETLBFS as u64;
        const MISSING_SHMEM = g::UFFD_FEATURE_MISSING_SHMEM as u64;
        const EVENT_UNMAP = g::UFFD_FEATURE_EVENT_UNMAP as u64;
        const SIGBUS = g::UFFD_FEATURE_SIGBUS as u64;
        const THREAD_ID = g::UFFD_FEATURE_THREAD_ID as u64;
        const MINOR_HUGETLBFS = g::UFFD_FEATURE_MINOR_HUGETLBFS as u64;
        const MINOR_SHMEM = g::UFFD_FEATURE_MINOR_SHMEM as u64;
        const EXACT_ADDRESS = g::UFFD_FEATURE_EXACT_ADDRESS as u64;
        const WP_HUGETLBFS_SHMEM = g::UFFD_FEATURE_WP_HUGETLBFS_SHMEM as u64;
        const WP_UNPOPULATED = g::UFFD_FEATURE_WP_UNPOPULATED as u64;
        const POISON = g::UFFD_FEATURE_POISON as u64;
        const WP_ASYNC = g::UFFD_FEATURE_WP_ASYNC as u64;
        const MOVE = g::UFFD_FEATURE_MOVE as u64;
        // Bits a newer kernel may report are kept, not dropped.
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// Which ioctls the kernel allows: on the fd after [`Uffd::api`], or on a
    /// range after [`Uffd::register`].
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct Ioctls: u64 {
        const REGISTER = 1 << g::_UFFDIO_REGISTER;
        const UNREGISTER = 1 << g::_UFFDIO_UNREGISTER;
        const WAKE = 1 << g::_UFFDIO_WAKE;
        const COPY = 1 << g::_UFFDIO_COPY;
        const ZEROPAGE = 1 << g::_UFFDIO_ZEROPAGE;
        const MOVE = 1 << g::_UFFDIO_MOVE;
        const WRITEPROTECT = 1 << g::_UFFDIO_WRITEPROTECT;
        const CONTINUE = 1 << g::_UFFDIO_CONTINUE;
        const POISON = 1 << g::_UFFDIO_POISON;
        const API = 1 << g::_UFFDIO_API;
        const _ = !0;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_REGISTER_MODE_*`: which faults of a range are reported.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
    pub struct RegisterMode: u64 {
        /// Access to a page that is not mapped.
        const MISSING = g::UFFDIO_REGISTER_MODE_MISSING as u64;
        /// Write to a write-protected page.
        const WP = g::UFFDIO_REGISTER_MODE_WP as u64;
        /// Access to a shmem/hugetlbfs page that is in the page cache but not
        /// mapped (resolve with CONTINUE).
        const MINOR = g::UFFDIO_REGISTER_MODE_MINOR as u64;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_COPY_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct CopyMode: u64 {
        /// Do not wake threads waiting on the range.
        const DONTWAKE = g::UFFDIO_COPY_MODE_DONTWAKE as u64;
        /// Map the page write-protected (range registered in WP mode too).
        const WP = g::UFFDIO_COPY_MODE_WP as u64;
    }
}

bitflags::bitflags! {
    /// `UFFDIO_MOVE_MODE_*`.
    #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
    pub struct MoveMode: u64 {
        const DONTWAKE = 1;
        /// Treat holes in the source as success instead of ENOENT.
        const ALLOW_SRC_HOLES = 2;
    }
}

/// How to create a userfaultfd.
#[derive(Debug, Clone, Copy)]
pub struct OpenOptions {
    /// `O_CLOEXEC` (default on).
    pub close_on_exec: bool,
    /// `O_NONBLOCK` (default on): `read_events` returns no events instead of
    /// blocking.
    pub non_blocking: bool,
    /// `UFFD_USER_MODE_ONLY` (default off). With it, every kernel-mode access
    /// (KVM, O_DIRECT, futex, io_uring) fails with EFAULT instead of waiting:
    /// never use it for a VMM's guest memory.
    pub user_mode_only: bool,
}

impl Default for OpenOptions {
    fn default() -> Self {
        OpenOptions {
            close_on_exec: true,
            non_blocking: true,
            user_mode_only: false,
        }
    }
}

impl OpenOptions {
    fn flags(&self) -> u32 {
        let mut flags = 0u32;
        if self.close_on_exec {
            flags |= g::O_CLOEXEC;
        }
        if self.non_blocking {
            flags |= g::O_NONBLOCK;
        }
        if self.user_mode_only {
            flags |= g::UFFD_USER_MODE_ONLY;
        }
        flags
    }
}

/// What the API handshake reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ApiInfo {
    /// Features this userfaultfd now has (what was requested).
    pub enabled: Features,
    /// Every feature the kernel offers.
    pub available: Features,
    /// Ioctls allowed on the fd.
    pub ioctls: Ioctls,
}

/// A userfaultfd.
#[derive(Debug)]
pub struct Uffd {
    fd: OwnedFd,
    /// The kernel refused `RWF_NOWAIT` on this fd (see `read_events`).
    plain_read: std::sync::atomic::AtomicBool,
}

impl AsFd for Uffd {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl AsRawFd for Uffd {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

impl From<Uffd> for OwnedFd {
    fn from(u: Uffd) -> OwnedFd {
        u.fd
    }
}

/// Converts a length to the kernel's `__u64`.
fn u64_of(n: usize) -> u64 {
    n as u64
}

impl Uffd {
    /// Creates a userfaultfd with the default options (close-on-exec,
    /// non-blocking, kernel faults delivered).
    pub fn open() -> Result<Uffd, OpenError> {
        Self::open_with(OpenOptions::default())
    }

    /// Creates a userfaultfd: through `/dev/userfaultfd` first (which needs
    /// only access to that file), then the `userfaultfd(2)` system call
    /// (which needs CAP_SYS_PTRACE or `vm.unprivileged_userfaultfd=1` unless
    /// user-mode-only). The error names what to grant when both refuse.
    pub fn open_with(options: OpenOptions) -> Result<Uffd, OpenError> {
        let flags = options.flags();
        let device = match Self::open_device(flags) {
            Ok(fd) => return Ok(Uffd::from_fd(fd)),
            Err(e) => e,
        };
        let bits = rustix::mm::UserfaultfdFlags::from_bits_retain(flags);
        // SAFETY: creating a userfaultfd has no memory-safety preconditions;
        // rustix marks it unsafe because the fd can later be used to change
        // this process's memory, which this crate only does through ioctls
        // that the kernel validates.
        match unsafe { rustix::mm::userfaultfd(bits) } {
            Ok(fd) => Ok(Uffd::from_fd(fd)),
            Err(Errno::NOSYS) => Err(OpenError::Unsupported),
            Err(syscall) => Err(OpenError::Denied {
                device,
                syscall,
                hint: if options.user_mode_only {
                    ""
                } else {
                    " (or, if no kernel-mode access must be served, open it user-mode-only)"
                },
            }),
        }
    }

    fn open_device(flags: u32) -> Result<OwnedFd, Errno> {
        let dev = FsOpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/userfaultfd")
            .map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::NOENT))?;
        // SAFETY: USERFAULTFD_IOC_NEW takes its flags as an integer argument.
        let fd = unsafe { sys::call_int(&dev, sys::IOC_NEW, flags as usize) }?;
        // SAFETY: on success the ioctl returns a new file descriptor that
        // nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Wraps a userfaultfd received from elsewhere (over SCM_RIGHTS, or from
    /// a FORK event). Nothing is checked here: an fd that is not a
    /// userfaultfd makes every call fail with ENOTTY. A fd from a peer that
    /// is not trusted goes through [`Uffd::adopt`] instead.
    pub fn from_fd(fd: OwnedFd) -> Uffd {
        Uffd {
            fd,
            plain_read: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Takes a userfaultfd from a peer that is not trusted, and makes it fit
    /// to serve: it must be a userfaultfd ([`AdoptError::NotUserfaultfd`])
    /// whose `UFFDIO_API` handshake was done ([`AdoptError::NoApi`]: such a
    /// fd can report no fault, and epoll reports an error on it forever), and
    /// it is set O_NONBLOCK, which epoll needs to report it readable (the
    /// kernel answers poll on a blocking userfaultfd with an error). The
    /// flag belongs to the open file the peer shares, so the peer can clear
    /// it again: reads never depend on it ([`Uffd::read_events`]), and
    /// [`Uffd::ensure_nonblocking`] sets it again.
    pub fn adopt(fd: OwnedFd) -> Result<Uffd, AdoptError> {
        if !is_userfaultfd(fd.as_fd()) {
            return Err(AdoptError::NotUserfaultfd);
        }
        let uffd = Uffd::from_fd(fd);
        uffd.ensure_nonblocking().map_err(AdoptError::Os)?;
        // With O_NONBLOCK set, poll reports POLLERR only for a userfaultfd
        // whose API handshake was never done.
        let mut fds = [rustix::event::PollFd::new(
            &uffd,
            rustix::event::PollFlags::IN,
        )];
        let zero = rustix::event::Timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        match rustix::event::poll(&mut fds, Some(&zero)) {
            Ok(_) if fds[0].revents().contains(rustix::event::PollFlags::ERR) => {
                Err(AdoptError::NoApi)
            }
            Ok(_) => Ok(uffd),
            Err(e) => Err(AdoptError::Os(e)),
        }
    }

    /// Sets O_NONBLOCK on the userfaultfd's open file if it is not set.
    /// Returns whether it had to (someone sharing the file cleared it).
    pub fn ensure_nonblocking(&self) -> Result<bool, Errno> {
        let flags = rustix::fs::fcntl_getfl(self)?;
        if flags.contains(rustix::fs::OFlags::NONBLOCK) {
            return Ok(false);
        }
        rustix::fs::fcntl_setfl(self, flags | rustix::fs::OFlags::NONBLOCK)?;
        Ok(true)
    }

    /// Every feature the running kernel offers, found with a throwaway
    /// userfaultfd (the handshake can be done once per fd).
    pub fn available_features() -> Result<(Features, Ioctls), ProbeError> {
        let uffd = Uffd::open()?;
        let info = uffd.api(Features::empty())?;
        Ok((info.available, info.ioctls))
    }

    /// The `UFFDIO_API` handshake: enables `requested`. It can be done once
    /// per userfaultfd. When the kernel lacks some requested features the
    /// error lists exactly which.
    pub fn api(&self, requested: Features) -> Result<ApiInfo, ApiError> {
        let mut arg = g::uffdio_api {
            api: g::UFFD_API as u64,
            features: requested.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_API takes a `struct uffdio_api`.
        match unsafe { sys::call(self, sys::API, &mut arg) } {
            Ok(_) => Ok(ApiInfo {
                enabled: requested,
                available: Features::from_bits_retain(arg.features),
                ioctls: Ioctls::from_bits_retain(arg.ioctls),
            }),
            Err(Errno::INVAL) => {
                let available = Uffd::available_features()
                    .map(|(f, _)| f)
                    .map_err(|_| ApiError::Os(Errno::INVAL))?;
                let missing = requested.difference(available);
                if missing.is_empty() {
                    Err(ApiError::Rejected)
                } else {
                    Err(ApiError::MissingFeatures { requested, missing })
                }
            }
            Err(e) => Err(ApiError::Os(e)),
        }
    }

    /// Registers `[start, start+len)` in `mode`. Returns the ioctls allowed
    /// on the range (for example no ZEROPAGE on hugetlbfs).
    pub fn register(&self, start: u64, len: usize, mode: RegisterMode) -> Result<Ioctls, Error> {
        let mut arg = g::uffdio_register {
            range: g::uffdio_range {
                start,
                len: u64_of(len),
            },
            mode: mode.bits(),
            ioctls: 0,
        };
        // SAFETY: UFFDIO_REGISTER takes a `struct uffdio_register`.
        unsafe { sys::call(self, sys::REGISTER, &mut arg) }
            .map_err(|e| Error::from_errno("UFFDIO_REGISTER", e))?;
        Ok(Ioctls::from_bits_retain(arg.ioctls))
    }

    /// Unregisters `[start, start+len)`; waiting threads are woken and later
    /// faults are handled by the kernel as if never registered.
    pub fn unregister(&self, start: u64, len: usize) -> Result<(), Error> {
        let mut arg = range(start, len);
        // SAFETY: UFFDIO_UNREGISTER takes a `struct uffdio_range`.
        unsafe { sys::call(self, sys::UNREGISTER, &mut arg) }
            .map(drop)
            .map_err(|e| Error::from_errno("UFFDIO_UNREGISTER", e))
    }

    /// Wakes threads waiting on faults in `[start, start+len)`. A wake that
    /// does not resolve the fault makes it fault again (a new message).
    pub fn wake(&self, start: u64, len: usize) -> Result<(), Error> {
        let mut arg = range(start, len);
        // SAFETY: UFFDIO_WAKE takes a `struct uffdio_range`.
        unsafe { sys::call(self, sys::WAKE, &mut arg) }
            .map(drop)
            .map_err(|e| Error::from_errno("UFFDIO_WAKE", e))
    }

    /// `UFFDIO_COPY`: maps new pages at `dst` holding a copy of `src`
    /// (`src.len()` must be a multiple of the page size). Returns the bytes
    /// copied (all of them) or an [`Error`]; see [`Error::Partial`].
    pub fn copy(&self, dst: u64, src: &[u8], mode: CopyMode) -> Result<usize, Error> {
        let mut arg = g::uffdio_copy {
            dst,
            src: src.as_ptr() as u64,
            len: u64_of(src.len()),
            mode: mode.bits(),
            copy: 0,
        };
        // SAFETY: UFFDIO_COPY takes a `struct uffdio_copy`; the kernel reads
        // `len` bytes at `src`, which `src` borrows for the whole call.
        match unsafe { sys::call(self, sys::COPY, &mut arg) } {
            Ok(_) => Ok(src.len()),
            Err(e) => Err(Error::from_resolve("UFFDIO_COPY", e, arg.copy)),
        }
    }

    /// `UFFDIO_ZEROPAGE`: maps the shared zero page over `[start, start+len)`
    /// (not available on hugetlbfs). A later write is an ordinary
    /// copy-on-write fault that the kernel handles without a message.
    pub fn zeropage(&self, start: u64, len: usize, dontwake: bool) -> Result<usize, Error> {
        let mut arg = g::uffdio_zeropage {
            range: range(start, len),
            mode: if dontwake {
                g::UFFDIO_ZEROPAGE_MODE_DONTWAKE as u64
            } else {
                0
            },
            zeropage: 0,
        };
        // SAFETY: UFFDIO_ZEROPAGE takes a `struct uffdio_zeropage`.
        match unsafe { sys::call(self, sys::ZEROPAGE, &mut arg) } {
            Ok(_) => Ok(len),
            Err(e) => Err(Error::from_resolve("UFFDIO_ZEROPAGE", e, arg.zeropage)),
        }
    }

    /// `UFFDIO_WRITEPROTECT`: sets (`protect`) or clears write protection on
    /// a range registered in WP mode. Clearing it wakes blocked writers
    /// unless `dontwake`.
    pub fn write_protect(
        &self,
        start: u64,
        len: usize,
        protect: bool,
        dontwake: bool,
    ) -> Result<(), Error> {
        let mut mode = 0u64;
        if protect {
            mode |= 1; // UFFDIO_WRITEPROTECT_MODE_WP
        }
        if dontwake {
            mode |= 2; // UFFDIO_WRITEPROTECT_MODE_DONTWAKE
        }
        let mut arg = g::uffdio_writeprotect {
            range: range(start, len),
            mode,
        };
        // SAFETY: UFFDIO_WRITEPROTECT takes a `struct uffdio_writeprotect`.
        unsafe { sys::call(self, sys::WRITEPROTECT, &mut arg) }
            .map(drop)
            .map_err(|e| Error::from_errno("UFFDIO_WRITEPROTECT", e))
    }

    /// `UFFDIO_CONTINUE`: maps the page-cache pages behind a MINOR fault.
    /// `write_protect` maps them write-protected; `dontwake` skips the wake.
    pub fn continue_range(
        &self,
        start: u64,
        len: usize,
        write_protect: bool,
        dontwake: bool,
    ) -> Result<usize, Error> {
        let mut mode = 0u64;
        if dontwake {
            mode |= 1; // UFFDIO_CONTINUE_MODE_DONTWAKE
        }
        if write_protect {
            mode |= 2; // UFFDIO_CONTINUE_MODE_WP
        }
        let mut arg = g::uffdio_continue {
            range: range(start, len),
            mode,
            mapped: 0,
        };
        // SAFETY: UFFDIO_CONTINUE takes a `struct uffdio_continue`.
        match unsafe { sys::call(self, sys::CONTINUE, &mut arg) } {
            Ok(_) => Ok(len),
            Err(e) => Err(Error::from_resolve("UFFDIO_CONTINUE", e, arg.mapped)),
        }
    }

    /// `UFFDIO_POISON`: marks `[start, start+len)` so that a later access
    /// raises SIGBUS (and a system call touching it gets EFAULT). A later
    /// COPY over it replaces the poison.
    pub fn poison(&self, start: u64, len: usize, dontwake: bool) -> Result<usize, Error> {
        let mut arg = g::uffdio_poison {
            range: range(start, len),
            mode: if dontwake { 1 } else { 0 },
            updated: 0,
        };
        // SAFETY: UFFDIO_POISON takes a `struct uffdio_poison`.
        match unsafe { sys::call(self, sys::POISON, &mut arg) } {
            Ok(_) => Ok(len),
            Err(e) => Err(Error::from_resolve("UFFDIO_POISON", e, arg.updated)),
        }
    }

    /// `UFFDIO_MOVE`: moves the pages at `src` (in the userfaultfd's address
    /// space) to `dst` without copying. [`Error::Busy`] means the source is
    /// shared; copy instead.
    ///
    /// # Safety
    /// After the call the source range is unmapped: when the userfaultfd
    /// belongs to the calling process, no live Rust reference may point into
    /// `[src, src+len)`.
    pub unsafe fn move_pages(
        &self,
        dst: u64,
        src: u64,
        len: usize,
        mode: MoveMode,
    ) -> Result<usize, Error> {
        let mut arg = g::uffdio_move {
            dst,
            src,
            len: u64_of(len),
            mode: mode.bits(),
            move_: 0,
        };
        // SAFETY: UFFDIO_MOVE takes a `struct uffdio_move`; the caller
        // guarantees that unmapping the source breaks no Rust reference.
        match unsafe { sys::call(self, sys::MOVE, &mut arg) } {
            Ok(_) => Ok(len),
            Err(e) => Err(Error::from_resolve("UFFDIO_MOVE", e, arg.move_)),
        }
    }
}

fn range(start: u64, len: usize) -> g::uffdio_range {
    g::uffdio_range {
        start,
        len: u64_of(len),
    }
}

/// Why the kernel's features could not be probed.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error(transparent)]
    Open(#[from] OpenError),
    #[error(transparent)]
    Api(#[from] ApiError),
}

/// Whether `fd` refers to a userfaultfd (its `/proc/self/fd` link reads
/// `anon_inode:[userfaultfd]`). Use it to validate an fd received from a
/// peer before trusting it.
pub fn is_userfaultfd(fd: BorrowedFd<'_>) -> bool {
    std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd()))
        .map(|p| p.as_os_str() == "anon_inode:[userfaultfd]")
        .unwrap_or(false)
}
