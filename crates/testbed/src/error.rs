//! The harnesses' error: what failed, in words a user can act on, with the
//! error that caused it (from the kernel, a file, the engine, a working set
//! or the handshake) as its source.

use std::fmt::Display;

/// Why a harness step failed. `Display` says what failed; the cause, if
/// any, is the `source()`. [`chain`] prints both, as `anyhow`'s `{:#}` does.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The configuration or an input file is wrong: the message names the
    /// setting (as the command line spells it) or the file, and what it
    /// accepts.
    #[error("{0}")]
    Invalid(String),
    /// Something the harness relies on did not hold (a handler exited, the
    /// kernel answered what it should not): the message says what.
    #[error("{0}")]
    Failed(String),
    /// A system call or a file operation failed.
    #[error("{what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// Another part of pagewire failed (userfaultfd, the engine, a working
    /// set, the handshake, JSON), or an earlier step of this one.
    #[error("{what}")]
    Step {
        what: String,
        #[source]
        source: Box<dyn std::error::Error + Send + Sync + 'static>,
    },
    /// Another part of pagewire failed, and its message says it all.
    #[error(transparent)]
    Other(Box<dyn std::error::Error + Send + Sync + 'static>),
}

impl Error {
    /// `e` as it is, without more words ([`Error::Other`]).
    pub fn other(e: impl std::error::Error + Send + Sync + 'static) -> Error {
        Error::Other(Box::new(e))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// `e` and its sources, joined with ": " (what `anyhow` prints for `{:#}`).
pub fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cur = e.source();
    while let Some(s) = cur {
        out.push_str(": ");
        out.push_str(&s.to_string());
        cur = s.source();
    }
    out
}

fn caused<E>(e: E, what: String) -> Error
where
    E: std::error::Error + Send + Sync + 'static,
{
    let boxed: Box<dyn std::error::Error + Send + Sync + 'static> = Box::new(e);
    let boxed = match boxed.downcast::<std::io::Error>() {
        Ok(io) => return Error::Io { what, source: *io },
        Err(b) => b,
    };
    match boxed.downcast::<rustix::io::Errno>() {
        Ok(errno) => Error::Io {
            what,
            source: (*errno).into(),
        },
        Err(source) => Error::Step { what, source },
    }
}

/// Says what was being done when an error happened (or a value was missing),
/// as `anyhow::Context` does, producing an [`Error`].
pub trait Context<T> {
    fn context<C: Display>(self, what: C) -> Result<T>;
    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T>;
}

impl<T, E> Context<T> for std::result::Result<T, E>
where
    E: std::error::Error + Send + Sync + 'static,
{
    fn context<C: Display>(self, what: C) -> Result<T> {
        self.map_err(|e| caused(e, what.to_string()))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.map_err(|e| caused(e, f().to_string()))
    }
}

impl<T> Context<T> for Option<T> {
    fn context<C: Display>(self, what: C) -> Result<T> {
        self.ok_or_else(|| Error::Failed(what.to_string()))
    }

    fn with_context<C: Display, F: FnOnce() -> C>(self, f: F) -> Result<T> {
        self.ok_or_else(|| Error::Failed(f().to_string()))
    }
}

/// Returns `Error::Failed` with a formatted message.
#[macro_export]
macro_rules! bail {
    ($($arg:tt)*) => {
        return Err($crate::Error::Failed(format!($($arg)*)))
    };
}

/// Returns `Error::Invalid` with a formatted message unless the condition
/// holds.
#[macro_export]
macro_rules! ensure {
    ($cond:expr, $($arg:tt)*) => {
        if !$cond {
            return Err($crate::Error::Invalid(format!($($arg)*)));
        }
    };
}
