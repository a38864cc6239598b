//! Typed results that keep the kernel's distinctions.

use rustix::io::Errno;

/// What a userfaultfd operation reported, with the cases a page server must
/// tell apart kept apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    /// Part of the range was resolved before the kernel stopped (a later page
    /// was already present, for example). `done` bytes from the start of the
    /// range are now mapped and their waiters woken (unless DONTWAKE); advance
    /// by `done` and retry the rest.
    #[error("{op}: partial, {done} bytes done before the kernel stopped")]
    Partial { op: &'static str, done: usize },
    /// A non-cooperative event (REMOVE, UNMAP, REMAP, FORK) is queued on this
    /// userfaultfd and not read yet; every resolving ioctl fails until it is.
    /// Read the events, then retry.
    #[error("{op}: events are queued on the userfaultfd and must be read first (EAGAIN)")]
    EventsPending { op: &'static str },
    /// The first page of the range is already mapped. A failed operation
    /// wakes nobody: call `wake` if a thread may be waiting.
    #[error("{op}: the range is already populated (EEXIST)")]
    Exists { op: &'static str },
    /// The range is not mapped, not registered with this userfaultfd, or (for
    /// MOVE) the source is a hole.
    #[error("{op}: the range is not mapped or not registered (ENOENT)")]
    NotFound { op: &'static str },
    /// The process whose memory this userfaultfd covers has exited.
    #[error("{op}: the process owning the memory has exited (ESRCH)")]
    ProcessGone { op: &'static str },
    /// MOVE: the source page is shared (after fork, or KSM); copy instead.
    #[error("{op}: the source page is shared and cannot be moved (EBUSY)")]
    Busy { op: &'static str },
    /// Any other error from the kernel (EINVAL for misalignment, EFAULT for a
    /// bad source pointer, ENOTTY for an fd that is not a userfaultfd, ...).
    #[error("{op}: {errno}")]
    Os { op: &'static str, errno: Errno },
}

impl Error {
    /// Maps a plain errno from an ioctl that has no result field.
    pub(crate) fn from_errno(op: &'static str, errno: Errno) -> Self {
        match errno {
            Errno::AGAIN => Error::EventsPending { op },
            Errno::EXIST => Error::Exists { op },
            Errno::NOENT => Error::NotFound { op },
            Errno::SRCH => Error::ProcessGone { op },
            Errno::BUSY => Error::Busy { op },
            errno => Error::Os { op, errno },
        }
    }

    /// Maps the result of a resolving ioctl (COPY, ZEROPAGE, CONTINUE, MOVE,
    /// POISON) from its errno and the struct's result field, which holds the
    /// bytes done (partial) or a negated errno.
    pub(crate) fn from_resolve(op: &'static str, errno: Errno, field: i64) -> Self {
        if errno == Errno::AGAIN && field > 0 {
            return Error::Partial {
                op,
                done: field as usize,
            };
        }
        Error::from_errno(op, errno)
    }

    /// The raw errno behind this error (EAGAIN for `Partial`).
    pub fn errno(&self) -> Errno {
        match self {
            Error::Partial { .. } | Error::EventsPending { .. } => Errno::AGAIN,
            Error::Exists { .. } => Errno::EXIST,
            Error::NotFound { .. } => Errno::NOENT,
            Error::ProcessGone { .. } => Errno::SRCH,
            Error::Busy { .. } => Errno::BUSY,
            Error::Os { errno, .. } => *errno,
        }
    }
}

/// Why no userfaultfd could be created.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// Both `/dev/userfaultfd` and the `userfaultfd(2)` system call refused.
    #[error(
        "cannot create a userfaultfd: /dev/userfaultfd: {device}; userfaultfd(2): {syscall}. \
         Grant read/write access to /dev/userfaultfd (e.g. its group), or give the process \
         CAP_SYS_PTRACE, or set sysctl vm.unprivileged_userfaultfd=1{hint}"
    )]
    Denied {
        device: Errno,
        syscall: Errno,
        hint: &'static str,
    },
    /// The kernel was built without CONFIG_USERFAULTFD.
    #[error("this kernel has no userfaultfd support (CONFIG_USERFAULTFD is off): ENOSYS")]
    Unsupported,
}

/// Why the API handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The kernel does not offer some requested features.
    #[error(
        "the kernel lacks requested userfaultfd features {missing:?} \
         (requested {requested:?}); a newer kernel is needed, or do without them"
    )]
    MissingFeatures {
        requested: crate::Features,
        missing: crate::Features,
    },
    /// The kernel offers every requested feature but refused the handshake:
    /// UFFDIO_API was already called on this userfaultfd (it can be called
    /// once), or the combination is invalid (WP_ASYNC needs WP mode users).
    #[error(
        "UFFDIO_API refused although the kernel offers every requested feature: \
         the handshake was already done on this userfaultfd, or the combination is invalid"
    )]
    Rejected,
    /// Anything else.
    #[error("UFFDIO_API: {0}")]
    Os(Errno),
}

/// Why a userfaultfd received from a peer cannot be served.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum AdoptError {
    /// The fd is something else.
    #[error("the received fd is not a userfaultfd")]
    NotUserfaultfd,
    /// `UFFDIO_API` was never called on it: it cannot report faults, and
    /// epoll reports an error on it for ever.
    #[error(
        "the received userfaultfd never had its UFFDIO_API handshake: the VMM must call \
         UFFDIO_API (and register its memory) before sending it"
    )]
    NoApi,
    /// fcntl or poll on it failed.
    #[error("preparing the received userfaultfd: {0}")]
    Os(Errno),
}
