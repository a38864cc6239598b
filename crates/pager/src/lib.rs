//! The pagewire engine: serves the memory of processes and virtual machines
//! on demand through userfaultfd.
//!
//! A [`Session`] is one address space: a userfaultfd, the [`Region`]s
//! registered with it and a [`PageSource`] their bytes come from. The
//! [`Engine`] runs serving threads (one per core by default) shared by all
//! sessions. On a fault it maps the faulting page first, then the missing
//! pages of its cluster; it can populate the rest in the background, always
//! yielding to faults. Every page is mapped once (per-page state with
//! compare-and-swap claims); all-zero pages are mapped with ZEROPAGE; REMOVE
//! events (balloon, `MADV_DONTNEED`) discard pages before anything else can
//! touch them; pages whose bytes cannot be read are poisoned. The engine
//! knows nothing of KVM or sockets.

mod engine;
mod layout;
pub mod ratelimit;
pub mod region;
mod session;
pub mod source;
pub mod stats;

pub use engine::{
    EndReason, Engine, EngineConfig, EngineError, SessionHandle, SessionReport, SessionSpec,
    DEFAULT_NICE,
};
pub use layout::PageState;
pub use region::{PageSize, Region, RegionError};
pub use session::{Session, SessionConfig, DEFAULT_CLUSTER_PAGES};
pub use source::{Bytes, MemFile, PageSource, SourceError};
pub use stats::{LatencySummary, StatsSnapshot};
