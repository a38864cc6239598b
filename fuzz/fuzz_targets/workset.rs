//! Decoding working-set files: any bytes, sealed with the checksum a writer
//! would append (so that the fuzzer gets past it to the header and the
//! entries), decode without a panic; what decodes encodes back to the same
//! bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use workset::WorkingSet;

fuzz_target!(|data: &[u8]| {
    let mut file = data.to_vec();
    file.extend_from_slice(blake3::hash(data).as_bytes());
    if let Ok(ws) = WorkingSet::decode(&file) {
        assert_eq!(ws.encode(), file, "a decoded set encodes back to its bytes");
    }
});
