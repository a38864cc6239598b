//! Live migration of a running guest between two hosts.
//!
//! - [`frame`]: the protocol (`docs/protocol.md`, "Live migration"):
//!   versioned, framed, every frame bounded, checksummed and validated.
//! - [`source`]: the sending side (pre-copy, stop-and-copy, post-copy with
//!   an urgent connection, reconnection after a broken link).
//! - [`dest`]: the receiving side: pre-copy pages straight into guest
//!   memory, then [`dest::NetSource`], a page source for the pager that
//!   pulls what the guest faults on and keeps what the stream brings.
//!
//! The crate knows nothing of KVM: the VMM implements [`source::Guest`],
//! [`source::Vcpus`] and [`dest::Ram`].

pub mod bits;
pub mod dest;
pub mod frame;
pub mod link;
pub mod source;
mod staging;

pub use frame::{Complete, Layout};
pub use source::{migrate, MigrateError, Options, Report, Switchover};
