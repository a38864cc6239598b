//! The server's error: what failed, with every cause, in one message.

/// Why the server could not start or go on. The message names what was
/// being done and every cause beneath it ("opening the memory file x: No
/// such file or directory").
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ServeError(pub(crate) String);

impl ServeError {
    pub(crate) fn msg(s: impl Into<String>) -> ServeError {
        ServeError(s.into())
    }
}

/// Every cause of `e`, outermost first, joined with ": ".
pub(crate) fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        let text = s.to_string();
        // Some errors print their source in their own message already.
        if !out.ends_with(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        cur = s.source();
    }
    out
}

/// `.context(...)` for any error: what was being done, then why it failed.
pub(crate) trait Context<T> {
    fn context(self, what: impl std::fmt::Display) -> Result<T, ServeError>;
    fn with_context<S: std::fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T, ServeError>;
}

impl<T, E: std::error::Error + 'static> Context<T> for Result<T, E> {
    fn context(self, what: impl std::fmt::Display) -> Result<T, ServeError> {
        self.map_err(|e| ServeError(format!("{what}: {}", chain(&e))))
    }
    fn with_context<S: std::fmt::Display>(self, what: impl FnOnce() -> S) -> Result<T, ServeError> {
        self.map_err(|e| ServeError(format!("{}: {}", what(), chain(&e))))
    }
}

macro_rules! bail {
    ($($t:tt)*) => {
        return Err($crate::error::ServeError::msg(format!($($t)*)))
    };
}
pub(crate) use bail;

macro_rules! from_errors {
    ($($t:ty),* $(,)?) => {$(
        impl From<$t> for ServeError {
            fn from(e: $t) -> ServeError {
                ServeError(chain(&e))
            }
        }
    )*};
}
from_errors!(
    std::io::Error,
    handoff::HandoffError,
    pager::EngineError,
    pager::PersistError,
    pager::SourceError,
    serde_json::Error,
    exporter::MetricsError,
);
