//! The migration protocol's frames from a peer that is not trusted (either
//! end may be hostile): reading frames from a byte stream and decoding every
//! payload kind must never panic nor allocate beyond the protocol's bounds.
//!
//! Each input is read as it is, and with every frame's checksum sealed as a
//! writer would seal it, so that the fuzzer gets past the checksum to the
//! payload decoders.
#![no_main]

use libfuzzer_sys::fuzz_target;
use migrate::frame::{self, Hello, Kind, Ranges, HEADER};

fn decode_all(bytes: &[u8], pages: u64) {
    let mut r = bytes;
    let mut buf = Vec::new();
    while let Ok(k) = frame::read_frame(&mut r, &mut buf) {
        assert!(buf.len() <= k.max_payload());
        match k {
            Kind::Hello => {
                if let Ok(h) = frame::json::<Hello>(k, &buf) {
                    let _ = h.layout.check();
                }
            }
            Kind::Pages => {
                if let Ok((first, data)) = frame::decode_pages(&buf, pages) {
                    assert!(first + data.len() as u64 / frame::PAGE <= pages);
                }
            }
            Kind::Zero | Kind::Discard | Kind::Request => {
                if let Ok(rs) = Ranges::decode(k, &buf, pages) {
                    for (p, n) in rs.0 {
                        assert!(p + u64::from(n) <= pages);
                    }
                }
            }
            Kind::Switchover => {
                let _ = frame::decode_switchover(&buf, pages);
            }
            Kind::Need => {
                let _ = frame::decode_bitmap(k, &buf, pages);
            }
            Kind::RoundEnd => {
                let _ = frame::json::<frame::RoundEnd>(k, &buf);
            }
            Kind::Complete => {
                let _ = frame::json::<frame::Complete>(k, &buf);
            }
            _ => {}
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.is_empty() {
        return;
    }
    // The guest's size comes from the first byte: from one page to 4 GiB.
    let pages = 1u64 << (data[0] % 21);
    let data = &data[1..];
    decode_all(data, pages);
    // Sealed: walk the frames by their length fields and fix each checksum.
    let mut sealed = data.to_vec();
    let mut at = 0usize;
    while at + HEADER <= sealed.len() {
        let len = u32::from_le_bytes([sealed[at + 8], sealed[at + 9], sealed[at + 10], sealed[at + 11]]) as usize;
        let end = (at + HEADER).saturating_add(len).min(sealed.len());
        let sum = xxhash_rust::xxh3::xxh3_64(&sealed[at + HEADER..end]);
        sealed[at + 16..at + 24].copy_from_slice(&sum.to_le_bytes());
        at = end;
    }
    decode_all(&sealed, pages);
});
