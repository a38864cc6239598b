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
pub mod persist;
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
pub use persist::{PageStateFile, PersistError};
pub use region::{PageSize, Region, RegionError};
pub use session::{
    PrefetchSet, RecordConfig, RecordedTouch, Recording, Session, SessionConfig,
    DEFAULT_CLUSTER_PAGES,
};
pub use source::{Bytes, MemFile, PageSource, SourceError, Waker};
pub use stats::{LatencyBucket, LatencySummary, StatsSnapshot, ThreadBlocktime, Timeline};

/// Entry points for `cargo fuzz` (`fuzz/`): the engine's handling of
/// userfaultfd messages on a layout of regions, without a kernel.
#[cfg(feature = "fuzzing")]
pub mod fuzzing {
    use crate::layout::Layout;
    use crate::region::Region;

    /// Applies `messages` to a layout of `regions` as the engine does
    /// (REMOVE discards, UNMAP forgets, REMAP moves, a fault looks its page
    /// up), checking after each that the regions stay sorted and disjoint
    /// and that a fault finds the page that holds its address. Panics when
    /// something breaks. `regions` must have passed `region::validate`.
    pub fn apply_messages(regions: &[Region], messages: &[uffd::Message]) {
        let mut layout = Layout::new(regions, &[]);
        let mut wake = Vec::new();
        for m in messages {
            match *m {
                uffd::Message::Remove { start, end } => {
                    layout.discard(start, end);
                }
                uffd::Message::Unmap { start, end } => layout.unmap(start, end, &mut wake),
                uffd::Message::Remap { from, to, len } => layout.remap(from, to, len, &mut wake),
                uffd::Message::PageFault { address, .. } => {
                    if let Some((i, page)) = layout.find(address) {
                        let r = &layout.regions[i];
                        assert!(r.region.contains(address));
                        assert!(page < r.pages());
                        assert!(r.page_addr(page) <= address);
                        let _ = r.state(page);
                    }
                }
                uffd::Message::Fork { .. } | uffd::Message::Unknown { .. } => {}
            }
            layout.check();
        }
    }
}
