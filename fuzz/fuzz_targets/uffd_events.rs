//! The engine's handling of userfaultfd messages on a layout of regions:
//! REMOVE, UNMAP and REMAP carry ranges a peer chooses (its own madvise,
//! munmap and mremap calls), faults carry addresses. After each message the
//! regions must stay sorted and disjoint, and a fault must find the page
//! that holds its address (`pager::fuzzing::apply_messages`).
//!
//! Input: one byte of region count (1-8), then 24 bytes per region (host
//! page, pages, source page; small, so that page state stays small), then
//! 32-byte messages as the kernel lays them out.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pager::{PageSize, Region};
use uffd::{Message, MESSAGE_BYTES};

const PAGE: u64 = 4096;

fuzz_target!(|data: &[u8]| {
    let Some((&n, rest)) = data.split_first() else {
        return;
    };
    let n = usize::from(n % 8) + 1;
    if rest.len() < n * 24 {
        return;
    }
    let (table, messages) = rest.split_at(n * 24);
    let word = |b: &[u8]| u64::from_le_bytes(b.try_into().expect("8 bytes"));
    let regions: Vec<Region> = table
        .chunks_exact(24)
        .map(|r| Region {
            // Low addresses, so that messages' ranges hit them often.
            host_base: (word(&r[0..8]) % (1 << 20)) * PAGE,
            len: (word(&r[8..16]) % 256 + 1) * PAGE,
            source_offset: (word(&r[16..24]) % (1 << 20)) * PAGE,
            page_size: PageSize::Base4K,
        })
        .collect();
    if pager::region::validate(&regions, 1 << 40).is_err() {
        return;
    }
    let messages: Vec<Message> = messages
        .chunks_exact(MESSAGE_BYTES)
        .filter_map(|m| Message::decode(m).ok())
        .collect();
    pager::fuzzing::apply_messages(&regions, &messages);
});
