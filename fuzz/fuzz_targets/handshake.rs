//! A Firecracker handshake from a peer that is not trusted: the bytes it
//! sends (arriving in any number of pieces) and the region table they
//! describe, checked against a memory file of some size.
//!
//! Input: 8 bytes of memory-file size (little endian), then the bytes the
//! peer sends. Nothing may panic, and a table that passes must describe no
//! more memory than the file holds: that bounds what a handshake can make
//! the server allocate.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::firecracker::{parse_handshake, to_regions};

fuzz_target!(|data: &[u8]| {
    let Some((size, sent)) = data.split_first_chunk::<8>() else {
        return;
    };
    let source_len = u64::from_le_bytes(*size);
    // A prefix is either incomplete or already an answer, never a panic.
    let _ = parse_handshake(&sent[..sent.len() / 2]);
    let Ok(Some(mappings)) = parse_handshake(sent) else {
        return;
    };
    let Ok(regions) = to_regions(&mappings, source_len, pager::region::MAX_REGIONS) else {
        return;
    };
    assert!(!regions.is_empty() && regions.len() <= pager::region::MAX_REGIONS);
    let mut declared = 0u64;
    for r in &regions {
        let end = r.source_offset.checked_add(r.len).expect("inside the file");
        assert!(end <= source_len, "region past the file: {r:?}");
        assert_eq!(r.host_base % r.page_bytes(), 0);
        assert_eq!(r.len % r.page_bytes(), 0);
        declared += r.len;
    }
    assert!(
        declared <= source_len,
        "{declared} bytes declared over a {source_len}-byte file"
    );
});
