//! The migration protocol's frames (`docs/protocol.md`, "Live migration").
//!
//! Every frame is a 24-byte header and a payload:
//!
//! | bytes | field |
//! |---|---|
//! | 0..4 | magic `PWMG` |
//! | 4 | kind ([`Kind`]) |
//! | 5..8 | zero |
//! | 8..12 | payload length, little-endian, at most [`Kind::max_payload`] |
//! | 12..16 | zero |
//! | 16..24 | xxh3-64 of the payload |
//!
//! A reader checks all of it before it looks at the payload, and every
//! payload is parsed into a typed value whose ranges are checked against
//! the VM's layout by the caller. Anything else is a [`FrameError`], which
//! ends the connection with a message that says what was wrong.

use std::io::{self, Read, Write};

use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

/// `PWMG`, little-endian.
pub const MAGIC: u32 = u32::from_le_bytes(*b"PWMG");
/// The protocol version this build speaks. A peer with another is refused.
pub const VERSION: u32 = 1;
pub const HEADER: usize = 24;
/// Pages (4 KiB) in one `Pages` frame at most: 1 MiB of data.
pub const MAX_PAGES_PER_FRAME: u32 = 256;
pub const PAGE: u64 = 4096;
/// Control payloads (JSON, messages) at most.
pub const MAX_CONTROL: usize = 1 << 20;
/// Range lists at most: 65,536 ranges.
pub const MAX_RANGES: usize = 65_536;
/// A page bitmap at most: 8 MiB covers 256 GiB of guest memory.
pub const MAX_BITMAP: usize = 8 << 20;

/// What a frame is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// Source to destination, first on every connection: JSON [`Hello`].
    Hello = 1,
    /// Destination to source: the hello is accepted (JSON [`Welcome`]).
    Welcome = 2,
    /// Guest pages: `u64 first page`, then whole pages of data.
    Pages = 3,
    /// Pages that read as zero now: a [`Ranges`] list.
    Zero = 4,
    /// Pages the guest gave back (a balloon): a [`Ranges`] list; the
    /// destination discards them, so they read as zero.
    Discard = 5,
    /// A pre-copy round ended: JSON [`RoundEnd`].
    RoundEnd = 6,
    /// The vCPU and device state (opaque JSON of the VMM), bounded.
    State = 7,
    /// The guest stopped on the source: a [`Switchover`].
    Switchover = 8,
    /// Destination to source: the guest runs there (JSON [`Resumed`]).
    Resumed = 9,
    /// Destination to source, urgent channel: pages a fault waits for
    /// ([`Ranges`]).
    Request = 10,
    /// Source to destination: every page has been sent.
    Done = 11,
    /// Destination to source: the migration is over (JSON [`Complete`]).
    Complete = 12,
    /// Either way: what went wrong, UTF-8; the connection ends after it.
    Error = 13,
    /// Destination to source after a resumed connection: how many post-copy
    /// `Discard` frames it applied (u64), then the pages it still needs (a
    /// page bitmap).
    Need = 14,
}

impl Kind {
    pub fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Welcome,
            3 => Kind::Pages,
            4 => Kind::Zero,
            5 => Kind::Discard,
            6 => Kind::RoundEnd,
            7 => Kind::State,
            8 => Kind::Switchover,
            9 => Kind::Resumed,
            10 => Kind::Request,
            11 => Kind::Done,
            12 => Kind::Complete,
            13 => Kind::Error,
            14 => Kind::Need,
            _ => return None,
        })
    }

    /// The largest payload a frame of this kind may have.
    pub fn max_payload(self) -> usize {
        match self {
            Kind::Pages => 8 + (MAX_PAGES_PER_FRAME as u64 * PAGE) as usize,
            Kind::Zero | Kind::Discard | Kind::Request => 12 * MAX_RANGES,
            Kind::Switchover => 8 + MAX_BITMAP,
            Kind::Need => 8 + MAX_BITMAP,
            Kind::Done => 0,
            Kind::Error => 4096,
            _ => MAX_CONTROL,
        }
    }
}

/// Why a frame was refused.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("connection: {0}")]
    Io(#[from] io::Error),
    #[error("the peer closed the connection")]
    Closed,
    #[error("not a pagewire migration frame (magic {0:#010x}): is the peer a pagewire migration source or destination of this version?")]
    Magic(u32),
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("a {kind:?} frame of {len} bytes is larger than the protocol allows ({max})")]
    TooLarge { kind: Kind, len: usize, max: usize },
    #[error("reserved header bytes are not zero")]
    Reserved,
    #[error("a {0:?} frame failed its checksum: the data was damaged in transit")]
    Checksum(Kind),
    #[error("a {kind:?} frame is malformed: {why}")]
    Malformed { kind: Kind, why: String },
    #[error("expected a {want} frame, got {got:?}")]
    Unexpected { want: &'static str, got: Kind },
    #[error("the peer reported an error: {0}")]
    Peer(String),
}

impl FrameError {
    fn malformed(kind: Kind, why: impl Into<String>) -> FrameError {
        FrameError::Malformed {
            kind,
            why: why.into(),
        }
    }
}

/// Writes one frame whose payload is `parts` laid end to end.
pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<(), FrameError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > kind.max_payload() {
        return Err(FrameError::TooLarge {
            kind,
            len,
            max: kind.max_payload(),
        });
    }
    let mut h = Xxh3::new();
    for p in parts {
        h.update(p);
    }
    let mut header = [0u8; HEADER];
    header[0..4].copy_from_slice(&MAGIC.to_le_bytes());
    header[4] = kind as u8;
    header[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    header[16..24].copy_from_slice(&h.digest().to_le_bytes());
    w.write_all(&header)?;
    for p in parts {
        w.write_all(p)?;
    }
    Ok(())
}

/// Writes a frame whose payload is `value` as JSON.
pub fn write_json<T: Serialize>(
    w: &mut impl Write,
    kind: Kind,
    value: &T,
) -> Result<(), FrameError> {
    let body = serde_json::to_vec(value).map_err(|e| FrameError::malformed(kind, e.to_string()))?;
    write_frame(w, kind, &[&body])
}

/// Reads one frame into `buf` (reused between calls) and returns its kind;
/// the payload is `buf[..]` afterwards. Header, size and checksum are
/// checked first.
pub fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> Result<Kind, FrameError> {
    let mut header = [0u8; HEADER];
    read_full(r, &mut header, true)?;
    let magic = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    if magic != MAGIC {
        return Err(FrameError::Magic(magic));
    }
    let kind = Kind::from_u8(header[4]).ok_or(FrameError::Kind(header[4]))?;
    if header[5..8] != [0; 3] || header[12..16] != [0; 4] {
        return Err(FrameError::Reserved);
    }
    let len = u32::from_le_bytes([header[8], header[9], header[10], header[11]]) as usize;
    if len > kind.max_payload() {
        return Err(FrameError::TooLarge {
            kind,
            len,
            max: kind.max_payload(),
        });
    }
    // Frames of one kind mostly have one size: keep the buffer's bytes
    // rather than zeroing them again for every frame.
    if buf.len() > len {
        buf.truncate(len);
    } else {
        buf.resize(len, 0);
    }
    read_full(r, buf, false)?;
    let sum = u64::from_le_bytes(header[16..24].try_into().unwrap_or([0; 8]));
    if xxhash_rust::xxh3::xxh3_64(buf) != sum {
        return Err(FrameError::Checksum(kind));
    }
    if kind == Kind::Error {
        return Err(FrameError::Peer(String::from_utf8_lossy(buf).into_owned()));
    }
    Ok(kind)
}

/// Fills `buf`; a clean end of stream before the first byte is `Closed`
/// when `at_boundary` (between frames), a truncated frame otherwise.
fn read_full(r: &mut impl Read, buf: &mut [u8], at_boundary: bool) -> Result<(), FrameError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_boundary => return Err(FrameError::Closed),
            Ok(0) => {
                return Err(FrameError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    format!(
                        "the stream ended inside a frame ({got} of {} bytes)",
                        buf.len()
                    ),
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// Parses a JSON payload.
pub fn json<'a, T: Deserialize<'a>>(kind: Kind, payload: &'a [u8]) -> Result<T, FrameError> {
    serde_json::from_slice(payload).map_err(|e| FrameError::malformed(kind, e.to_string()))
}

/// Fails unless `got` is `want`.
pub fn expect(got: Kind, want: Kind) -> Result<(), FrameError> {
    if got == want {
        Ok(())
    } else {
        Err(FrameError::Unexpected {
            want: kind_name(want),
            got,
        })
    }
}

fn kind_name(k: Kind) -> &'static str {
    match k {
        Kind::Hello => "Hello",
        Kind::Welcome => "Welcome",
        Kind::Pages => "Pages",
        Kind::Zero => "Zero",
        Kind::Discard => "Discard",
        Kind::RoundEnd => "RoundEnd",
        Kind::State => "State",
        Kind::Switchover => "Switchover",
        Kind::Resumed => "Resumed",
        Kind::Request => "Request",
        Kind::Done => "Done",
        Kind::Complete => "Complete",
        Kind::Error => "Error",
        Kind::Need => "Need",
    }
}

/// The VM's shape: both ends must agree on it exactly.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Layout {
    pub mem_bytes: u64,
    pub vcpus: u32,
    /// The guest memory's backing (`anonymous`, `memfd`).
    pub backing: String,
    pub page_size: u64,
}

impl Layout {
    pub fn pages(&self) -> u64 {
        self.mem_bytes / PAGE
    }

    /// Whether this build can receive such a VM.
    pub fn check(&self) -> Result<(), String> {
        if self.page_size != PAGE {
            return Err(format!(
                "page size {} (only 4 KiB pages migrate; hugetlb guests do not)",
                self.page_size
            ));
        }
        if self.mem_bytes == 0 || !self.mem_bytes.is_multiple_of(PAGE) {
            return Err(format!(
                "memory size {:#x} is not whole pages",
                self.mem_bytes
            ));
        }
        if (self.mem_bytes / PAGE).div_ceil(64) * 8 > MAX_BITMAP as u64 {
            return Err(format!(
                "{} bytes of memory is more than the protocol carries",
                self.mem_bytes
            ));
        }
        if self.vcpus == 0 || self.vcpus > 64 {
            return Err(format!("{} vCPUs", self.vcpus));
        }
        Ok(())
    }
}

/// Which connection a hello opens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// The stream: pre-copy, state, post-copy background pages.
    Main,
    /// Post-copy requests and their pages, so they overtake the stream.
    Urgent,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Hello {
    /// Always `pagewire-migrate`.
    pub protocol: String,
    pub version: u32,
    pub role: Role,
    /// Chosen by the source; the same on every connection of one migration.
    pub session: u64,
    /// A connection that resumes a migration whose link broke.
    pub resume: bool,
    pub layout: Layout,
}

pub const PROTOCOL: &str = "pagewire-migrate";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Welcome {
    pub version: u32,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoundEnd {
    pub round: u32,
    /// Pages sent in the round.
    pub pages: u64,
    /// Pages dirtied meanwhile (to send again).
    pub dirty: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resumed {
    /// From reading the Switchover frame to the vCPUs running, µs.
    pub restore_us: u64,
}

/// The destination's final word: what the guest said once every page had
/// arrived.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Complete {
    /// The guest's own checksums held for every pass the destination ran.
    pub verified: bool,
    pub passes: u64,
    /// The error that ended the guest, if any.
    pub error: Option<String>,
    /// Time vCPUs waited on pages, µs: in all and per vCPU.
    pub blocktime_us: u64,
    pub blocktime_per_vcpu_us: Vec<u64>,
    /// Page requests the destination sent on the urgent channel.
    pub requests: u64,
    /// From the guest resuming there until every page had arrived, µs.
    pub postcopy_us: u64,
}

/// A list of page ranges `(first page, pages)`, each `u64, u32`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Ranges(pub Vec<(u64, u32)>);

impl Ranges {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.0.len() * 12);
        for (p, n) in &self.0 {
            out.extend_from_slice(&p.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
        }
        out
    }

    /// Parses and checks every range against `pages` (the guest's size).
    pub fn decode(kind: Kind, payload: &[u8], pages: u64) -> Result<Ranges, FrameError> {
        if !payload.len().is_multiple_of(12) {
            return Err(FrameError::malformed(
                kind,
                format!("{} bytes is not a list of 12-byte ranges", payload.len()),
            ));
        }
        let mut v = Vec::with_capacity(payload.len() / 12);
        for c in payload.chunks_exact(12) {
            let p = u64::from_le_bytes(c[0..8].try_into().unwrap_or([0; 8]));
            let n = u32::from_le_bytes(c[8..12].try_into().unwrap_or([0; 4]));
            if n == 0 || p.checked_add(u64::from(n)).is_none_or(|e| e > pages) {
                return Err(FrameError::malformed(
                    kind,
                    format!(
                        "range of {n} pages at page {p} lies outside the guest's {pages} pages"
                    ),
                ));
            }
            // Sorted and disjoint, so that a frame costs at most the guest's
            // size to apply, however it is built.
            if let Some(&(lp, ln)) = v.last() {
                if p < lp + u64::from(ln) {
                    return Err(FrameError::malformed(
                        kind,
                        format!("range at page {p} is not after the one before (sorted, disjoint ranges only)"),
                    ));
                }
            }
            v.push((p, n));
        }
        Ok(Ranges(v))
    }
}

/// A `Pages` payload's first page and its data, checked against `pages`.
pub fn decode_pages(payload: &[u8], pages: u64) -> Result<(u64, &[u8]), FrameError> {
    if payload.len() < 8 + PAGE as usize || !(payload.len() - 8).is_multiple_of(PAGE as usize) {
        return Err(FrameError::malformed(
            Kind::Pages,
            format!(
                "{} bytes is not a page number and whole pages",
                payload.len()
            ),
        ));
    }
    let first = u64::from_le_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    let n = ((payload.len() - 8) / PAGE as usize) as u64;
    if first.checked_add(n).is_none_or(|e| e > pages) {
        return Err(FrameError::malformed(
            Kind::Pages,
            format!("{n} pages at page {first} lie outside the guest's {pages} pages"),
        ));
    }
    Ok((first, &payload[8..]))
}

/// A `Switchover` payload: `u64 flags` (bit 0: post-copy follows), then the
/// bitmap of pages still to come (post-copy only).
pub fn decode_switchover(payload: &[u8], pages: u64) -> Result<(bool, Vec<u64>), FrameError> {
    if payload.len() < 8 {
        return Err(FrameError::malformed(
            Kind::Switchover,
            "shorter than its flags",
        ));
    }
    let flags = u64::from_le_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    if flags & !1 != 0 {
        return Err(FrameError::malformed(
            Kind::Switchover,
            format!("unknown flags {flags:#x}"),
        ));
    }
    let postcopy = flags & 1 != 0;
    let bitmap = decode_bitmap(Kind::Switchover, &payload[8..], pages)?;
    Ok((postcopy, bitmap))
}

/// A page bitmap: exactly one bit per page, rounded up to whole u64 words,
/// no bit set past the last page.
pub fn decode_bitmap(kind: Kind, b: &[u8], pages: u64) -> Result<Vec<u64>, FrameError> {
    let words = pages.div_ceil(64) as usize;
    if b.len() != words * 8 {
        return Err(FrameError::malformed(
            kind,
            format!(
                "a bitmap of {} bytes for {pages} pages (want {})",
                b.len(),
                words * 8
            ),
        ));
    }
    let v: Vec<u64> = b
        .chunks_exact(8)
        .map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8])))
        .collect();
    if !pages.is_multiple_of(64) {
        let last = v[words - 1];
        if last >> (pages % 64) != 0 {
            return Err(FrameError::malformed(kind, "bits set past the last page"));
        }
    }
    Ok(v)
}

/// A `Need` payload: the post-copy Discard frames applied, and the bitmap.
pub fn decode_need(payload: &[u8], pages: u64) -> Result<(u64, Vec<u64>), FrameError> {
    if payload.len() < 8 {
        return Err(FrameError::malformed(Kind::Need, "shorter than its count"));
    }
    let applied = u64::from_le_bytes(payload[0..8].try_into().unwrap_or([0; 8]));
    Ok((applied, decode_bitmap(Kind::Need, &payload[8..], pages)?))
}

pub fn encode_bitmap(words: &[u64]) -> Vec<u8> {
    let mut out = Vec::with_capacity(words.len() * 8);
    for w in words {
        out.extend_from_slice(&w.to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hello() -> Hello {
        Hello {
            protocol: PROTOCOL.into(),
            version: VERSION,
            role: Role::Main,
            session: 42,
            resume: false,
            layout: Layout {
                mem_bytes: 64 << 20,
                vcpus: 2,
                backing: "anonymous".into(),
                page_size: PAGE,
            },
        }
    }

    /// A stream of one frame of each payload kind, as a source writes them.
    pub(crate) fn sample_stream() -> Vec<u8> {
        let mut v = Vec::new();
        write_json(&mut v, Kind::Hello, &hello()).expect("hello");
        write_frame(&mut v, Kind::Pages, &[&3u64.to_le_bytes(), &[7u8; 8192]]).expect("pages");
        write_frame(&mut v, Kind::Zero, &[&Ranges(vec![(10, 4)]).encode()]).expect("zero");
        write_frame(&mut v, Kind::Discard, &[&Ranges(vec![(20, 1)]).encode()]).expect("discard");
        write_json(
            &mut v,
            Kind::RoundEnd,
            &RoundEnd {
                round: 1,
                pages: 5,
                dirty: 2,
            },
        )
        .expect("round");
        write_frame(&mut v, Kind::State, &[b"{}"]).expect("state");
        let mut bm = vec![0u64; (16384 / 64) as usize];
        bm[0] = 0b1010;
        write_frame(
            &mut v,
            Kind::Switchover,
            &[&1u64.to_le_bytes(), &encode_bitmap(&bm)],
        )
        .expect("switch");
        write_frame(&mut v, Kind::Done, &[]).expect("done");
        v
    }

    #[test]
    fn frames_round_trip() {
        let s = sample_stream();
        let mut r = &s[..];
        let mut buf = Vec::new();
        let pages = 16384;
        let k = read_frame(&mut r, &mut buf).expect("hello");
        assert_eq!(json::<Hello>(k, &buf).expect("json"), hello());
        assert_eq!(read_frame(&mut r, &mut buf).expect("pages"), Kind::Pages);
        let (first, data) = decode_pages(&buf, pages).expect("decode");
        assert_eq!((first, data.len()), (3, 8192));
        assert_eq!(read_frame(&mut r, &mut buf).expect("zero"), Kind::Zero);
        assert_eq!(
            Ranges::decode(Kind::Zero, &buf, pages).expect("ranges").0,
            vec![(10, 4)]
        );
        assert_eq!(
            read_frame(&mut r, &mut buf).expect("discard"),
            Kind::Discard
        );
        assert_eq!(read_frame(&mut r, &mut buf).expect("round"), Kind::RoundEnd);
        assert_eq!(read_frame(&mut r, &mut buf).expect("state"), Kind::State);
        assert_eq!(
            read_frame(&mut r, &mut buf).expect("switch"),
            Kind::Switchover
        );
        let (post, bm) = decode_switchover(&buf, pages).expect("switchover");
        assert!(post);
        assert_eq!(bm[0], 0b1010);
        assert_eq!(read_frame(&mut r, &mut buf).expect("done"), Kind::Done);
        assert!(matches!(
            read_frame(&mut r, &mut buf),
            Err(FrameError::Closed)
        ));
    }

    #[test]
    fn hostile_frames_are_refused_with_reasons() {
        let mut buf = Vec::new();
        let good = sample_stream();
        // Junk.
        let e = read_frame(&mut &b"GET / HTTP/1.1\r\n\r\n......"[..], &mut buf).unwrap_err();
        assert!(
            e.to_string().contains("not a pagewire migration frame"),
            "{e}"
        );
        // Oversized: the length is refused before anything is allocated.
        let mut big = good.clone();
        big[4] = Kind::Done as u8;
        big[8..12].copy_from_slice(&1u32.to_le_bytes());
        let e = read_frame(&mut &big[..], &mut buf).unwrap_err();
        assert!(
            e.to_string().contains("larger than the protocol allows"),
            "{e}"
        );
        // Truncated.
        let e = read_frame(&mut &good[..30], &mut buf).unwrap_err();
        assert!(e.to_string().contains("ended inside a frame"), "{e}");
        // Damaged.
        let mut bad = good.clone();
        bad[30] ^= 1;
        let e = read_frame(&mut &bad[..], &mut buf).unwrap_err();
        assert!(matches!(e, FrameError::Checksum(Kind::Hello)), "{e}");
        // Unknown kind, reserved bytes.
        let mut k = good.clone();
        k[4] = 99;
        assert!(matches!(
            read_frame(&mut &k[..], &mut buf),
            Err(FrameError::Kind(99))
        ));
        let mut z = good;
        z[6] = 1;
        assert!(matches!(
            read_frame(&mut &z[..], &mut buf),
            Err(FrameError::Reserved)
        ));
        // Payloads that lie about the guest.
        let mut p = 16383u64.to_le_bytes().to_vec();
        p.extend_from_slice(&[1; 8192]);
        assert!(decode_pages(&p, 16384).is_err());
        assert!(decode_pages(&p[..100], 16384).is_err());
        assert!(Ranges::decode(Kind::Zero, &Ranges(vec![(u64::MAX, 2)]).encode(), 16384).is_err());
        assert!(Ranges::decode(Kind::Zero, &Ranges(vec![(1, 0)]).encode(), 16384).is_err());
        assert!(Ranges::decode(Kind::Zero, &[0; 11], 16384).is_err());
        // Overlapping or unsorted: a hostile peer could make one frame cost
        // the guest's size many times over.
        assert!(Ranges::decode(
            Kind::Zero,
            &Ranges(vec![(0, 100), (50, 10)]).encode(),
            16384
        )
        .is_err());
        assert!(
            Ranges::decode(Kind::Zero, &Ranges(vec![(10, 1), (5, 1)]).encode(), 16384).is_err()
        );
        assert!(
            Ranges::decode(Kind::Zero, &Ranges(vec![(0, 10), (10, 1)]).encode(), 16384).is_ok()
        );
        assert!(decode_bitmap(Kind::Need, &[0xff; 16], 100).is_err());
        assert!(decode_need(&[0; 4], 100).is_err());
        assert_eq!(
            decode_need(
                &[3, 0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                100
            )
            .ok(),
            Some((3, vec![1, 0]))
        );
        assert!(decode_bitmap(Kind::Need, &[0; 8], 100).is_err());
        assert!(decode_switchover(&2u64.to_le_bytes(), 64).is_err());
        let mut h = hello();
        h.layout.page_size = 2 << 20;
        assert!(h.layout.check().is_err());
        assert!(json::<Hello>(Kind::Hello, br#"{"protocol":"x"}"#).is_err());
    }

    #[test]
    fn fuzz_seeds() {
        // The corpus seed of fuzz/fuzz_targets/migrate_frames.rs: a byte
        // giving the guest's size (16384 pages), then a sample stream.
        let mut seed = vec![14u8];
        seed.extend_from_slice(&sample_stream());
        let dir = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../fuzz/corpus/migrate_frames"
        );
        let path = format!("{dir}/sample-stream");
        match std::fs::read(&path) {
            Ok(committed) => assert_eq!(committed, seed, "{path} is stale: delete it and rerun"),
            Err(_) => {
                let _ = std::fs::create_dir_all(dir);
                std::fs::write(&path, &seed).expect("write the seed");
            }
        }
    }
}
