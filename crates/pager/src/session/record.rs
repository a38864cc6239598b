//! Recording a working set: the pages a served guest touches, in the order
//! it first touches them, with the time and (where the VMM negotiated
//! `UFFD_FEATURE_THREAD_ID`) the faulting thread.
//!
//! A page is identified by its offset in the source (the snapshot's memory
//! file), not by its address: a restored VM's memory lands at another
//! address every time.
//!
//! # Only pages the guest touched
//! A page mapped by fault-around is not proof of a touch, and this kernel
//! offers no way to learn later whether a mapped page was read (pagemap has
//! no accessed bit, and idle page tracking is not built in). So while the
//! recording window is open the fault-around window is one page
//! (`fault_around.rs`): every page touched outside a sequential stream
//! faults and is recorded exactly. Sequential readahead stays on (a sweep
//! at one page per fault is forty times slower): its pages are recorded as
//! they are mapped, counted apart as `inferred`, and a stream that stops
//! early adds at most one readahead window of pages never touched.
//!
//! # The window
//! What a VM touches over its whole life is not its start-up working set.
//! Recording stops at the end of the window (a time after the session
//! started) or when the operator ends it (`Session::end_recording`), and
//! nothing touched later is recorded.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::Session;

/// What to record.
#[derive(Debug, Clone)]
pub struct RecordConfig {
    /// Stop recording this long after the session started (`None`: when
    /// the operator ends it, or the session ends).
    pub window: Option<Duration>,
    /// Record only pages the guest touched: while the window is open, no
    /// page with data is mapped around a fault, so each one touched faults
    /// (slower: see the module's documentation). Otherwise fault-around
    /// goes on as usual, and the pages it maps are recorded as inferred.
    pub exact: bool,
}

/// One page of a recording.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RecordedTouch {
    /// Byte offset of the 4 KiB page in the source.
    pub offset: u64,
    /// First touch, in microseconds since the session started.
    pub t_us: u64,
    /// The faulting thread (0: unknown, or mapped by readahead).
    pub thread: u32,
}

impl Default for RecordConfig {
    fn default() -> Self {
        RecordConfig {
            window: None,
            exact: true,
        }
    }
}

/// The pages a session recorded, in first-touch order.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Recording {
    /// The window, in milliseconds (0: ended by the operator or the session).
    pub window_ms: u64,
    /// Pages recorded because a sequential stream's readahead mapped them,
    /// not because they faulted.
    pub inferred: u64,
    pub touches: Vec<RecordedTouch>,
}

pub(super) struct Recorder {
    started: Instant,
    /// One bit per 4 KiB page of the source: recorded already.
    seen: Vec<u64>,
    recording: Recording,
}

impl Recorder {
    pub fn new(config: &RecordConfig, source_len: u64, started: Instant) -> Recorder {
        let pages = source_len.div_ceil(4096) as usize;
        Recorder {
            started,
            seen: vec![0; pages.div_ceil(64)],
            recording: Recording {
                window_ms: config.window.map_or(0, |w| w.as_millis() as u64),
                // Room for 16 MiB of pages up front (96 KiB per recording
                // VM); past it the list grows on a serving thread, which is
                // safe but for an in-process session whose process forks
                // while it is recorded (see `engine::Scratch`).
                touches: Vec::with_capacity(pages.min(1 << 12)),
                ..Recording::default()
            },
        }
    }

    /// Records the 4 KiB pages of `offset..offset + len` (first touch only).
    fn touch(&mut self, offset: u64, len: u64, thread: u32, inferred: bool, now: Instant) {
        let t_us = now.saturating_duration_since(self.started).as_micros() as u64;
        for page in offset / 4096..(offset + len).div_ceil(4096) {
            let Some(word) = self.seen.get_mut((page / 64) as usize) else {
                return;
            };
            let bit = 1u64 << (page % 64);
            if *word & bit != 0 {
                continue;
            }
            *word |= bit;
            if inferred {
                self.recording.inferred += 1;
            }
            self.recording.touches.push(RecordedTouch {
                offset: page * 4096,
                t_us,
                thread,
            });
        }
    }
}

impl Session {
    /// Whether a working set is being recorded exactly now.
    pub(super) fn recording_exactly(&self) -> bool {
        self.config.record.as_ref().is_some_and(|r| r.exact) && self.recording_window_open()
    }

    /// Whether a recording window is open now (closes it when its time is
    /// up). A load, and while recording with a window a clock read.
    pub(super) fn recording_window_open(&self) -> bool {
        if !self.recording.load(Ordering::Acquire) {
            return false;
        }
        if self.record_until.is_some_and(|end| Instant::now() >= end) {
            self.recording.store(false, Ordering::Release);
            return false;
        }
        true
    }

    /// Records a touch of the source bytes at `offset..offset + len` (a
    /// fault's page, or with `inferred` pages readahead or fault-around
    /// mapped), while the window is open.
    pub(super) fn record_touch(&self, offset: u64, len: u64, thread: u32, inferred: bool) {
        if !self.recording.load(Ordering::Acquire) {
            return;
        }
        let Some(rec) = &self.recorder else { return };
        // One clock read for the window and the touch's time.
        let now = Instant::now();
        if self.record_until.is_some_and(|end| now >= end) {
            self.recording.store(false, Ordering::Release);
            return;
        }
        let mut rec = rec.lock().unwrap_or_else(|e| e.into_inner());
        rec.touch(offset, len, thread, inferred, now);
    }

    /// Whether this session is recording now.
    pub fn recording_open(&self) -> bool {
        self.recording_window_open()
    }

    /// Ends the recording window now: nothing touched later is recorded,
    /// and fault-around goes back to its adaptive window.
    pub fn end_recording(&self) {
        self.recording.store(false, Ordering::Release);
    }

    /// What was recorded so far (`None` when the session does not record).
    pub fn recording(&self) -> Option<Recording> {
        let rec = self.recorder.as_ref()?;
        let rec = rec.lock().unwrap_or_else(|e| e.into_inner());
        Some(rec.recording.clone())
    }
}
