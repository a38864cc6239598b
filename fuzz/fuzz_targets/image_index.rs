//! Parsing an image's header and index from bytes that are not trusted (a
//! file on disk, an object in a store): nothing may panic, and an index that
//! parses can be served from without a panic.
//!
//! Each input is tried as it is, and sealed as a writer would seal it (the
//! id over the index bytes the header names, then the header's checksum),
//! so that the fuzzer gets past both checks to the tables.
#![no_main]

use image::{Index, Layers, HEADER_LEN, PAGE};
use libfuzzer_sys::fuzz_target;

fn exercise(bytes: &[u8]) {
    let _ = Index::needed(bytes, "fuzz");
    let Ok(index) = Index::parse(bytes, "fuzz") else {
        return;
    };
    let _ = index.check_len(bytes.len() as u64, "fuzz");
    if index.has_base() {
        // A base of another id is refused, never a panic.
        let _ = Layers::new(index.clone(), Some(index));
        return;
    }
    let Ok(layers) = Layers::new(index, None) else {
        return;
    };
    let len = layers.len();
    // A few pages, not all of them: a small input can describe gigabytes.
    for i in 0..16u64 {
        let at = (len / 16 * i) & !(PAGE as u64 - 1);
        if at < len {
            let _ = layers.locate(at);
            let _ = layers.blobs_for(at..(at + 64 * PAGE as u64).min(len));
        }
    }
    if len <= 1 << 30 {
        let zeros = layers.zero_ranges();
        for w in zeros.windows(2) {
            assert!(w[0].end < w[1].start, "zero ranges sorted and disjoint");
        }
    }
}

fuzz_target!(|data: &[u8]| {
    exercise(data);
    if data.len() < HEADER_LEN {
        return;
    }
    let mut sealed = data.to_vec();
    let mut end = [0u8; 8];
    end.copy_from_slice(&sealed[56..64]);
    let end = (u64::from_le_bytes(end).min(sealed.len() as u64) as usize).max(HEADER_LEN);
    let id = blake3::hash(&sealed[HEADER_LEN..end]);
    sealed[72..104].copy_from_slice(id.as_bytes());
    let sum = xxhash_rust::xxh3::xxh3_64(&sealed[..HEADER_LEN - 8]);
    sealed[HEADER_LEN - 8..HEADER_LEN].copy_from_slice(&sum.to_le_bytes());
    exercise(&sealed);
});
