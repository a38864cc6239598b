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

/// Lines one call site may write per window, unless it says otherwise.
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
    burst: u64,
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
        Self::with_burst(BURST)
    }

    /// A budget of `burst` lines per window (below 2^20).
    pub const fn with_burst(burst: u64) -> RateLimit {
        RateLimit {
            state: AtomicU64::new(0),
            suppressed: AtomicU64::new(0),
            burst,
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
                } else if n < self.burst {
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
/// `suppressed` field. `limited!(burst = N, info, ...)` allows N lines per
/// window instead of [`BURST`] (for lines each VM writes once, such as its
/// start and end: a peer can connect in a loop).
///
/// `limited!(key = K, warn, ...)` keeps a budget per value of `K % 32` at
/// that call site, so that a flood of one kind (one error variant, say)
/// does not hide lines of another kind.
#[macro_export]
macro_rules! limited {
    (key = $key:expr, $level:ident, $($arg:tt)+) => {{
        static LIMITS: [$crate::ratelimit::RateLimit; 32] =
            [const { $crate::ratelimit::RateLimit::new() }; 32];
        if let Some(suppressed) = LIMITS[($key) % 32].check() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    }};
    (burst = $burst:expr, $level:ident, $($arg:tt)+) => {{
        static LIMIT: $crate::ratelimit::RateLimit = $crate::ratelimit::RateLimit::with_burst($burst);
        if let Some(suppressed) = LIMIT.check() {
            if suppressed > 0 {
                ::tracing::$level!(suppressed, $($arg)+);
            } else {
                ::tracing::$level!($($arg)+);
            }
        }
    }};
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
        let wide = RateLimit::with_burst(100);
        assert!((0..100).all(|_| wide.check_at(1) == Some(0)));
        assert_eq!(wide.check_at(1), None);
    }
}
