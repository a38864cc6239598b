//! Rate-limited log lines: a misbehaving peer must not be able to fill a
//! disk or a log shipper through the server.
//!
//! Each call site of [`limited!`](crate::limited) has its own budget of
//! [`BURST`] lines per [`WINDOW_MS`]; lines past it are counted, not
//! written, and the first line of the next window carries
//! `suppressed = N`. The check is two atomic operations and no lock, so a
//! flood costs almost nothing. (Measured before this existed: a peer whose
//! userfaultfd never had `UFFDIO_API` made the serving threads write about
//! 370,000 identical lines a second.)

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Instant;

/// Lines one call site may write per window.
pub const BURST: u64 = 10;
/// The window, in milliseconds.
pub const WINDOW_MS: u64 = 10_000;

/// One call site's budget.
#[derive(Debug)]
pub struct RateLimit {
    /// `window index << 20 | lines written in it` (a window index is the
    /// time since the process's first limited line, in windows).
    state: AtomicU64,
    suppressed: AtomicU64,
}

impl Default for RateLimit {
    fn default() -> Self {
        Self::new()
    }
}

fn now_ms() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    START.get_or_init(Instant::now).elapsed().as_millis() as u64
}

impl RateLimit {
    pub const fn new() -> RateLimit {
        RateLimit {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
        }
    }

    /// Whether a line may be written now. `Some(n)`: yes, and `n` lines were
    /// suppressed since the last one written; `None`: no (it is counted).
    pub fn check(&self) -> Option<u64> {
        self.check_at(now_ms())
    }

    fn check_at(&self, ms: u64) -> Option<u64> {
        let window = ms / WINDOW_MS + 1;
        let allowed = self
            .state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |s| {
                let (w, n) = (s >> 20, s & 0xf_ffff);
                if w != window {
                    Some(window << 20 | 1)
                } else if n < BURST {
                    Some(s + 1)
                } else {
                    None
                }
            })
            .is_ok();
        if allowed {
            Some(self.suppressed.swap(0, Ordering::AcqRel))
        } else {
            self.suppressed.fetch_add(1, Ordering::AcqRel);
            None
        }
    }
}

/// A `tracing` event at `$level` (`error`, `warn`, `info`, `debug`), limited
/// per call site (see [`crate::ratelimit`]). The arguments are those of the
/// `tracing` macros; a line that follows suppressed ones gets a
/// `suppressed` field.
#[macro_export]
macro_rules! limited {
    ($level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::new();
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    }};
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_per_window_then_the_count_of_what_was_dropped() {
        let l = RateLimit::new();
        for _ in 0..BURST {
            assert_eq!(l.check_at(5), Some(0));
        }
        for _ in 0..1000 {
            assert_eq!(l.check_at(6), None);
        }
        assert_eq!(l.check_at(WINDOW_MS + 1), Some(1000));
        assert_eq!(l.check_at(WINDOW_MS + 2), Some(0));
    }
}
