//! pagewire's network protocols.
//!
//! Today this is the Firecracker UFFD handshake ([`firecracker`]): the
//! message a VMM sends a page-fault handler over a Unix socket, with its
//! userfaultfd attached. Both sides live here so that the handler
//! (`pagewire serve`), the test client (`pagewire fc-client`) and the
//! reference VMM speak exactly the same bytes.

pub mod firecracker;
