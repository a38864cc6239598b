//! The VMM's typed errors.

/// Everything the VMM can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("migration: {0}")]
    Migration(String),
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("/dev/kvm cannot be opened ({0}): this machine cannot run KVM guests")]
    NoKvm(kvm_ioctls::Error),
    #[error("guest address range {gpa:#x} + {len:#x} lies outside guest memory")]
    OutOfRange { gpa: u64, len: usize },
    #[error("assembling the guest program: {0}")]
    Assemble(String),
    #[error("vCPU {vcpu}: {reason}")]
    Vcpu { vcpu: u32, reason: String },
    #[error(
        "the guest reported {mismatches} wrong words (first at {first_bad:#x}) on vCPU {vcpu}"
    )]
    GuestMismatch {
        vcpu: u32,
        mismatches: u64,
        first_bad: u64,
    },
    #[error(
        "vCPU {vcpu} reported checksum {got:#x} for pass {pass}; the workload implies {want:#x}"
    )]
    Checksum {
        vcpu: u32,
        pass: u64,
        got: u64,
        want: u64,
    },
    #[error("state file {path}: {reason}")]
    State { path: String, reason: String },
    #[error("memory file {path} holds {actual} bytes but the state file says the guest has {expected}: the snapshot is truncated or does not belong to this state file; the guest was not started")]
    ShortMemoryFile {
        path: String,
        actual: u64,
        expected: u64,
    },
    #[error("userfaultfd: {0}")]
    UffdOpen(String),
    #[error("userfaultfd: {0}")]
    Uffd(#[from] uffd::Error),
    #[error("page server handshake: {0}")]
    Handshake(#[from] wire::firecracker::HandshakeError),
    #[error("embedded pager: {0}")]
    Engine(String),
    #[error("the page server hung up while the guest still needed it: the VM was stopped, its memory is incomplete and cannot be resumed")]
    PageServerGone,
    #[error("timed out after {0:?}: {1}")]
    Timeout(std::time::Duration, String),
}

impl Error {
    pub(crate) fn os(what: &'static str, e: rustix::io::Errno) -> Error {
        Error::Os {
            what,
            source: e.into(),
        }
    }

    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        Error::Io {
            what: what.into(),
            source,
        }
    }

    pub(crate) fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> Error {
        move |source| Error::Kvm { what, source }
    }
}
