//! Sequential readahead: a fault where the previous cluster or window
//! ended (or on a page readahead has not reached yet) continues a stream.
//! The faulting thread gets a cluster from its page onwards in one COPY,
//! and idle serving threads map the window after it, doubling on each
//! sequential fault up to `SessionConfig::max_readahead_pages`. The window
//! grows only on proof (a fault at its frontier), so it follows what the
//! guest does: a guest that stops reading sequentially stops the stream.
//!
//! Readahead is queued work: it yields to faults (idle threads take its
//! steps between epoll waits), and a fault on a page it has not claimed yet
//! serves that page at once.

use std::sync::atomic::Ordering;

use uffd::Event;

use super::fault_around::Block;
use super::{claim_run, pages_of, with_claims, Ctx, Faults, Origin, Served, Session};
use crate::layout::RegionState;

/// The sequential stream a session follows.
#[derive(Debug, Default)]
pub(super) struct Stream {
    /// Where the next sequential fault would land (the readahead frontier).
    pub next: u64,
    /// The readahead window, in pages of the stream's region.
    pub window: usize,
    /// Readahead still to do: pages `ahead..ahead_end` of region `region`,
    /// claimed in order by idle serving threads.
    pub region: u64,
    pub ahead: usize,
    pub ahead_end: usize,
    /// Where the stream began: region id and page. Background population
    /// keeps out of its way (see `background.rs`).
    pub origin: Option<(u64, usize)>,
}

impl Stream {
    pub fn active(&self, region: u64) -> bool {
        self.region == region && self.ahead < self.ahead_end
    }
}

impl Session {
    /// The pages to map with a fault at `page`: from it onwards if it
    /// continues a stream (`true`), otherwise the block `around` gives (then
    /// a new stream may start after it; an active one is left alone:
    /// another thread's random fault must not end it). One hold of the
    /// stream's lock per fault.
    pub(super) fn follow_stream(
        &self,
        r: &RegionState,
        page: usize,
        around: impl FnOnce() -> Block,
    ) -> (Block, bool) {
        let cluster = pages_of(self.config.cluster_pages, r.region.page_size);
        let max = pages_of(self.config.max_readahead_pages, r.region.page_size);
        let addr = r.page_addr(page);
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        let active = stream.active(r.id);
        let in_window = active && page >= stream.ahead && page <= stream.ahead_end;
        let streams = cluster > 1 && max > cluster;
        if !streams || (stream.next != addr && !in_window) {
            let b = around();
            if !active {
                stream.window = cluster;
                stream.next = r.page_addr(b.end);
                stream.origin = Some((r.id, b.start));
            }
            return (b, false);
        }
        stream.window = (stream.window * 2).clamp(cluster, max);
        let end = (page + cluster).min(r.pages());
        let ahead_end = (page + stream.window).min(r.pages());
        if active {
            stream.ahead_end = stream.ahead_end.max(ahead_end);
        } else {
            stream.region = r.id;
            stream.ahead = end;
            stream.ahead_end = ahead_end;
        }
        stream.next = r.page_addr(stream.ahead_end);
        if stream.ahead < stream.ahead_end {
            self.ahead_added.store(true, Ordering::Release);
        }
        let b = Block {
            start: page,
            end,
            zero_only: false,
        };
        (b, true)
    }

    /// A fault on a page being mapped: if it is in the readahead window,
    /// the stream is as far as readahead got, so readahead goes a window
    /// further.
    pub(super) fn stream_caught_up(&self, r: &RegionState, page: usize) {
        let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
        if stream.region != r.id || page > stream.ahead_end || page < stream.ahead {
            return;
        }
        let end = (page + stream.window).min(r.pages());
        if end > stream.ahead_end {
            stream.ahead_end = end;
            stream.next = r.page_addr(end);
            self.ahead_added.store(true, Ordering::Release);
        }
    }

    /// Whether readahead work was added since the last call.
    pub(crate) fn take_ahead_added(&self) -> bool {
        self.ahead_added.swap(false, Ordering::AcqRel)
    }

    /// One readahead step: claims the next chunk of the stream's window and
    /// maps it. Returns `None` when there is no readahead to do.
    pub(crate) fn readahead_step(
        &self,
        deferred: &mut Faults,
        events: &mut Vec<Event>,
    ) -> Option<Served> {
        if self.is_ended() || self.unprompted_paused() {
            return None;
        }
        with_claims(|claims| {
            let layout = self.read_layout();
            let id = {
                let mut stream = self.stream.lock().unwrap_or_else(|e| e.into_inner());
                let Some(r) = layout.by_id(stream.region) else {
                    stream.ahead = stream.ahead_end;
                    return None;
                };
                let chunk = pages_of(self.config.readahead_chunk, r.region.page_size);
                let end = stream.ahead_end.min(r.pages());
                stream.ahead = claim_run(r, stream.ahead, end, chunk, claims);
                if claims.is_empty() {
                    return None;
                }
                r.id
            };
            let ctx = Ctx::unprompted(Origin::Readahead, self.config.quick_retries);
            Some(self.serve_claims(layout, id, claims, ctx, deferred, events))
        })
    }
}
