//! A small reference KVM VMM for pagewire.
//!
//! It exists to prove, on a real KVM guest, every path by which pagewire
//! serves memory: a guest (assembled at run time, see [`guest`]) fills and
//! keeps verifying its memory; the VMM snapshots it ([`state`], plus a
//! Firecracker-layout memory file) and restores it eagerly, with the pager
//! embedded in this process, or through an external `pagewire serve`
//! ([`restore`]). The guest's own checksums prove every byte.
//!
//! `unsafe` lives in [`memory`] (the guest RAM mapping) and [`vm`] (the KVM
//! memory slot), each block with its reason.

pub mod error;
pub mod guest;
pub mod memory;
pub mod migration;
pub mod restore;
pub mod state;
pub mod vm;

pub use error::Error;
pub use guest::{Workload, WorkloadKind};
pub use memory::{Backing, GuestMemory, HostLog};
pub use restore::{restore, serve_embedded, EmbeddedOptions, RestoreMode, Restored};
pub use state::VmState;
pub use vm::{Progress, Report, Vm, VmConfig, VmEvent};
