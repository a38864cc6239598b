//! Decoding userfaultfd messages: any bytes, cut into messages of the
//! kernel's size, decode without a panic; any other length is an error.
#![no_main]

use libfuzzer_sys::fuzz_target;
use uffd::{Message, MESSAGE_BYTES};

fuzz_target!(|data: &[u8]| {
    for m in data.chunks(MESSAGE_BYTES) {
        match Message::decode(m) {
            Ok(_) => assert_eq!(m.len(), MESSAGE_BYTES),
            Err(e) => assert_eq!(e.0, m.len()),
        }
    }
});
