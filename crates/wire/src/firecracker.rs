//! Firecracker's UFFD handshake (see `docs/protocol.md`).
//!
//! The VMM connects to the handler's Unix socket and sends, in one
//! `sendmsg`, a JSON array of [`Mapping`]s with its userfaultfd attached as
//! SCM_RIGHTS. The connection then stays open for the VM's lifetime: the
//! handler treats EOF as "the VM is gone", and the VMM can treat EOF or a
//! hang-up as "the handler is gone".

use std::io::{IoSlice, IoSliceMut, Write};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use rustix::net::{
    RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, SendAncillaryBuffer,
    SendAncillaryMessage, SendFlags,
};
use serde::{Deserialize, Serialize};

/// One guest memory region as Firecracker describes it
/// (`GuestRegionUffdMapping`). Unknown fields are ignored when reading (newer
/// versions may add some); `page_size_kib` holds bytes despite its name and
/// is what older versions send instead of `page_size`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mapping {
    /// Where the region starts in the VMM's address space.
    pub base_host_virt_addr: u64,
    /// Its length in bytes.
    pub size: u64,
    /// Where its bytes start in the memory file.
    pub offset: u64,
    /// Page size in bytes (newer Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size: Option<u64>,
    /// Page size in bytes, despite the name (older Firecracker).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub page_size_kib: Option<u64>,
}

impl HandshakeError {
    /// A number per kind of error (its variant), below 32: for logging, so
    /// that each kind of refusal is rate-limited on its own.
    pub fn kind(&self) -> usize {
        match self {
            HandshakeError::Eof(_) => 0,
            HandshakeError::Timeout(_) => 1,
            HandshakeError::TooLarge(_) => 2,
            HandshakeError::Json(_) => 3,
            HandshakeError::NoFd => 4,
            HandshakeError::TooManyFds(_) => 5,
            HandshakeError::TooManyPieces(_) => 6,
            HandshakeError::Truncated => 7,
            HandshakeError::OutOfFds => 8,
            HandshakeError::Uffd(_) => 9,
            HandshakeError::NoRegions => 10,
            HandshakeError::PageSizeConflict { .. } => 11,
            HandshakeError::PageSize { .. } => 12,
            HandshakeError::NoPageSize { .. } => 13,
            HandshakeError::Regions(_) => 14,
            HandshakeError::Connect { .. } => 15,
            HandshakeError::Io(_) => 16,
        }
    }
}

impl Mapping {
    /// A mapping with both page-size fields set, as current Firecracker sends.
    pub fn new(base_host_virt_addr: u64, size: u64, offset: u64, page_size: u64) -> Mapping {
        Mapping {
            base_host_virt_addr,
            size,
            offset,
            page_size: Some(page_size),
            page_size_kib: Some(page_size),
        }
    }

    /// The page size, reconciling the two fields.
    pub fn page_size(&self, index: usize) -> Result<u64, HandshakeError> {
        match (self.page_size, self.page_size_kib) {
            (Some(a), Some(b)) if a != b => Err(HandshakeError::PageSizeConflict {
                index,
                page_size: a,
                kib: b,
            }),
            (Some(a), _) | (None, Some(a)) => Ok(a),
            (None, None) => Err(HandshakeError::NoPageSize { index }),
        }
    }
}

/// What went wrong with a handshake, on either side.
#[derive(Debug, thiserror::Error)]
pub enum HandshakeError {
    #[error("peer closed the connection before sending a complete handshake ({0} bytes received)")]
    Eof(usize),
    #[error("no complete handshake within {0:?}")]
    Timeout(Duration),
    #[error("handshake larger than {0} bytes")]
    TooLarge(usize),
    #[error("malformed JSON: {0}")]
    Json(String),
    #[error("no userfaultfd received: the message must carry one fd (SCM_RIGHTS)")]
    NoFd,
    #[error("{0} file descriptors received: exactly one (the userfaultfd) is expected")]
    TooManyFds(usize),
    #[error("the handshake came in more than {0} pieces: send it in one sendmsg")]
    TooManyPieces(usize),
    #[error("control data was truncated (too many or unexpected ancillary messages)")]
    Truncated,
    #[error(
        "the server has no file descriptor left to receive the userfaultfd (EMFILE): raise its \
         limit (LimitNOFILE= in the unit, ulimit -n)"
    )]
    OutOfFds,
    #[error("{0}")]
    Uffd(#[from] uffd::AdoptError),
    #[error("no regions in the handshake")]
    NoRegions,
    #[error("region {index}: page_size {page_size} and page_size_kib {kib} disagree")]
    PageSizeConflict {
        index: usize,
        page_size: u64,
        kib: u64,
    },
    #[error("region {index}: page size {page_size} is not 4096 or 2097152")]
    PageSize { index: usize, page_size: u64 },
    #[error("region {index}: no page_size")]
    NoPageSize { index: usize },
    #[error("{0}")]
    Regions(#[from] pager::RegionError),
    #[error("cannot connect to the page server at {path}: {source}. Is `pagewire serve --socket {path}` running?")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("socket: {0}")]
    Io(#[from] std::io::Error),
}

/// VMM side: connects to `socket` and sends `mappings` with `uffd` attached,
/// in one `sendmsg` as Firecracker does. Returns the connection, which must
/// stay open for as long as the handler should serve the VM.
pub fn send_handshake(
    socket: &Path,
    mappings: &[Mapping],
    uffd: &uffd::Uffd,
) -> Result<UnixStream, HandshakeError> {
    let body = serde_json::to_vec(mappings).map_err(|e| HandshakeError::Json(e.to_string()))?;
    let mut stream = UnixStream::connect(socket).map_err(|source| HandshakeError::Connect {
        path: socket.display().to_string(),
        source,
    })?;
    let fds = [uffd.as_fd()];
    let mut space = [MaybeUninit::<u8>::uninit(); rustix::cmsg_space!(ScmRights(1))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !control.push(SendAncillaryMessage::ScmRights(&fds)) {
        return Err(HandshakeError::Truncated);
    }
    let sent = rustix::net::sendmsg(
        &stream,
        &[IoSlice::new(&body)],
        &mut control,
        SendFlags::empty(),
    )
    .map_err(|e| HandshakeError::Io(e.into()))?;
    if sent < body.len() {
        // A stream socket may take part of a large message; the fd went with
        // the first byte, the rest follows as plain data.
        stream.write_all(&body[sent..])?;
    }
    Ok(stream)
}

/// Parses what a peer has sent so far: `Ok(None)` while the bytes are not
/// one complete JSON value yet (a `sendmsg` may arrive in pieces), the
/// mappings once they are. Anything after the value is ignored. Pure:
/// fuzzed by `fuzz/fuzz_targets/handshake.rs`.
pub fn parse_handshake(data: &[u8]) -> Result<Option<Vec<Mapping>>, HandshakeError> {
    let mut values = serde_json::Deserializer::from_slice(data).into_iter::<Vec<Mapping>>();
    match values.next() {
        Some(Ok(mappings)) => Ok(Some(mappings)),
        Some(Err(e)) if e.is_eof() => Ok(None),
        Some(Err(e)) => Err(HandshakeError::Json(e.to_string())),
        None => Ok(None), // only whitespace so far
    }
}

/// Turns Firecracker's mappings into the engine's regions, checking
/// everything a peer could get wrong: at least one region, at most
/// `max_regions` (and never more than [`pager::region::MAX_REGIONS`]), page
/// sizes, alignment, overlap in host memory or in the memory file, and
/// every region inside the file (`source_len` bytes). Pure: fuzzed with
/// `parse_handshake`.
pub fn to_regions(
    mappings: &[Mapping],
    source_len: u64,
    max_regions: usize,
) -> Result<Vec<pager::Region>, HandshakeError> {
    if mappings.is_empty() {
        return Err(HandshakeError::NoRegions);
    }
    let max = max_regions.min(pager::region::MAX_REGIONS);
    if mappings.len() > max {
        return Err(pager::RegionError::TooMany {
            count: mappings.len(),
            max,
        }
        .into());
    }
    let mut out = Vec::with_capacity(mappings.len());
    for (index, r) in mappings.iter().enumerate() {
        let page_size = r.page_size(index)?;
        let ps = pager::PageSize::from_bytes(page_size)
            .ok_or(HandshakeError::PageSize { index, page_size })?;
        out.push(pager::Region {
            host_base: r.base_host_virt_addr,
            len: r.size,
            source_offset: r.offset,
            page_size: ps,
        });
    }
    pager::region::validate(&out, source_len)?;
    Ok(out)
}

/// Whether this process has run out of file descriptors (EMFILE), which
/// the kernel reports on a `recvmsg` as truncated control data: the fd
/// it could not install is dropped.
fn out_of_fds() -> bool {
    let exhausted = [rustix::io::Errno::MFILE, rustix::io::Errno::NFILE].map(|e| e.raw_os_error());
    matches!(
        std::fs::File::open("/dev/null"),
        Err(e) if e.raw_os_error().is_some_and(|code| exhausted.contains(&code))
    )
}

/// Pieces (`recvmsg` calls with data) a handshake may arrive in. Firecracker
/// sends one `sendmsg`; a stream socket may cut a large one into a few
/// (a 1 MiB table in 64 KiB reads is 16).
pub const MAX_PIECES: usize = 64;

/// Handler side: reads one handshake, that is bytes until they form one
/// complete JSON value, and exactly one fd, which must be a userfaultfd
/// ready to serve (see [`uffd::Uffd::adopt`]), within `timeout` and `max`
/// bytes.
pub fn read_handshake(
    stream: &UnixStream,
    timeout: Duration,
    max: usize,
) -> Result<(Vec<Mapping>, uffd::Uffd), HandshakeError> {
    let deadline = Instant::now() + timeout;
    let mut data: Vec<u8> = Vec::with_capacity(4096);
    let mut fds: Vec<OwnedFd> = Vec::new();
    let mut chunk = vec![0u8; 64 * 1024];
    let mut pieces = 0usize;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(HandshakeError::Timeout(timeout));
        }
        stream.set_read_timeout(Some(left))?;
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(4))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut iov = [IoSliceMut::new(&mut chunk)];
        let msg =
            match rustix::net::recvmsg(stream, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(m) => m,
                Err(rustix::io::Errno::AGAIN) => return Err(HandshakeError::Timeout(timeout)),
                Err(rustix::io::Errno::INTR) => continue,
                Err(e) => return Err(HandshakeError::Io(e.into())),
            };
        for m in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = m {
                fds.extend(received);
            }
        }
        // One fd is the protocol. More, even spread over many messages,
        // could fill the server's fd table: refuse at once (they close as
        // `fds` drops).
        if fds.len() > 1 {
            return Err(HandshakeError::TooManyFds(fds.len()));
        }
        if msg.flags.contains(rustix::net::ReturnFlags::CTRUNC) {
            return Err(if out_of_fds() {
                HandshakeError::OutOfFds
            } else {
                HandshakeError::Truncated
            });
        }
        if msg.bytes == 0 {
            return Err(HandshakeError::Eof(data.len()));
        }
        data.extend_from_slice(&chunk[..msg.bytes]);
        if data.len() > max {
            return Err(HandshakeError::TooLarge(max));
        }
        pieces += 1;
        if pieces > MAX_PIECES {
            return Err(HandshakeError::TooManyPieces(MAX_PIECES));
        }
        // The value is an array: it can only have become complete if this
        // piece holds a ']'. Parsing only then (and the first piece, which
        // shows most malformed input at once), at most MAX_PIECES times,
        // keeps a peer that sends a byte at a time from making the server
        // parse a megabyte for each.
        if pieces > 1 && !chunk[..msg.bytes].contains(&b']') {
            continue;
        }
        if let Some(regions) = parse_handshake(&data)? {
            let fd = fds.pop().ok_or(HandshakeError::NoFd)?;
            return Ok((regions, uffd::Uffd::adopt(fd)?));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_in_pieces_and_checks_regions() {
        let json = br#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096}]"#;
        for cut in 0..json.len() {
            assert!(
                parse_handshake(&json[..cut]).expect("a prefix").is_none(),
                "{cut}"
            );
        }
        let m = parse_handshake(json).expect("valid").expect("complete");
        assert_eq!(to_regions(&m, 8192, 16).expect("regions")[0].len, 8192);
        assert!(matches!(
            to_regions(&m, 4096, 16),
            Err(HandshakeError::Regions(
                pager::RegionError::PastSource { .. }
            ))
        ));
        assert!(matches!(
            to_regions(&[], 4096, 16),
            Err(HandshakeError::NoRegions)
        ));
        let two = [m[0].clone(), Mapping::new(1 << 30, 4096, 4096, 4096)];
        // The second maps file bytes the first already has.
        assert!(matches!(
            to_regions(&two, 1 << 20, 16),
            Err(HandshakeError::Regions(
                pager::RegionError::SourceOverlap { .. }
            ))
        ));
        assert!(matches!(
            to_regions(&two, 1 << 20, 1),
            Err(HandshakeError::Regions(pager::RegionError::TooMany {
                max: 1,
                ..
            }))
        ));
        assert!(matches!(
            parse_handshake(b"[{\"base_host_virt_addr\": nope}]"),
            Err(HandshakeError::Json(_))
        ));
    }

    fn regions(json: &str) -> Result<Vec<pager::Region>, HandshakeError> {
        let m = parse_handshake(json.as_bytes())?.expect("a complete value");
        to_regions(&m, 1 << 30, pager::region::MAX_REGIONS)
    }

    #[test]
    fn accepts_firecracker_json() {
        // Captured from a real Firecracker load.
        let r = regions(r#"[{"base_host_virt_addr":139918424670208,"size":268435456,"offset":0,"page_size":4096,"page_size_kib":4096}]"#)
            .expect("valid");
        assert_eq!(r[0].len, 256 << 20);
        // Older versions: page_size_kib only; newer: page_size only; extra fields ignored.
        assert!(regions(
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096}]"#
        )
        .is_ok());
        assert!(regions(
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"new":1}]"#
        )
        .is_ok());
    }

    #[test]
    fn rejects_bad_regions() {
        assert!(matches!(regions("[]"), Err(HandshakeError::NoRegions)));
        assert!(matches!(
            regions(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":8192}]"#),
            Err(HandshakeError::PageSize { .. })
        ));
        assert!(matches!(
            regions(
                r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size":4096,"page_size_kib":4}]"#
            ),
            Err(HandshakeError::PageSizeConflict { .. })
        ));
        assert!(matches!(
            regions(r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0}]"#),
            Err(HandshakeError::NoPageSize { .. })
        ));
        assert!(matches!(
            regions(
                r#"[{"base_host_virt_addr":4096,"size":8192,"offset":0,"page_size":4096},{"base_host_virt_addr":8192,"size":4096,"offset":8192,"page_size":4096}]"#
            ),
            Err(HandshakeError::Regions(pager::RegionError::Overlap { .. }))
        ));
    }

    #[test]
    fn reads_both_page_size_fields() {
        let m: Vec<Mapping> = serde_json::from_str(
            r#"[{"base_host_virt_addr":4096,"size":4096,"offset":0,"page_size_kib":4096,"new":1}]"#,
        )
        .expect("valid");
        assert_eq!(m[0].page_size(0).expect("size"), 4096);
        let both = Mapping::new(4096, 4096, 0, 4096);
        let json = serde_json::to_string(std::slice::from_ref(&both)).expect("serialise");
        assert!(json.contains("\"page_size\":4096") && json.contains("\"page_size_kib\":4096"));
        let back: Vec<Mapping> = serde_json::from_str(&json).expect("parse");
        assert_eq!(back[0], both);
        let bad = Mapping {
            page_size_kib: Some(4),
            ..both
        };
        assert!(matches!(
            bad.page_size(3),
            Err(HandshakeError::PageSizeConflict { index: 3, .. })
        ));
    }
}
