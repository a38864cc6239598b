//! Draw what a restore did: one SVG from the JSON lines that
//! `pagewire serve --stats-json STATS.jsonl` appends, one a VM (a session)
//! when it ends.
//!
//! The picture has a header with totals over all the VMs, then one row a VM
//! (the first [`Options::max_vms`]):
//!
//! - a title: name, pid, snapshot, duration and why it ended, faults, pages
//!   mapped (and MiB), the time the guest's threads were blocked on faults;
//! - left: the memory mapped since the session started, cumulative, stacked
//!   by cause (on demand, fault-around, readahead, prefetch, background), in
//!   MiB, with the fault messages (cumulative) as a black line on the right
//!   axis;
//! - right: the first-touch latency (from the fault message to the page
//!   mapped) as bars over log2 buckets, with p50 and p99 marked.
//!
//! `docs/report.md` tells how to read it.
//!
//! # Example
//!
//! ```no_run
//! use std::path::Path;
//!
//! let input = std::fs::read_to_string("stats.jsonl")?;
//! let opts = report::Options {
//!     max_vms: 8,
//!     ..report::Options::default()
//! };
//! let summary = report::render_svg(&input, Path::new("report.svg"), &opts)?;
//! println!(
//!     "{} VMs, {} drawn, {} left out",
//!     summary.sessions, summary.drawn, summary.left_out
//! );
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Malformed lines
//!
//! Blank lines are skipped; unknown fields are ignored, missing ones read as
//! zero. A line that is not a JSON object of the right shape is an error that
//! names its line number ([`ReportError::Malformed`]), so a damaged file is
//! noticed; with [`Options::skip_malformed`] such lines are skipped instead
//! (say a file read while a VM's line was half written) and their numbers
//! are in [`Summary::skipped_lines`].

use std::path::{Path, PathBuf};

mod draw;
mod model;

pub use model::{parse, Bucket, Latency, Parsed, Session, Stats, Timeline};

/// How to draw.
#[derive(Debug, Clone)]
pub struct Options {
    /// At most this many VMs get a row (the first ones in the file); the
    /// header says how many were left out. At least 1.
    pub max_vms: usize,
    /// Width of the picture in pixels (at least 900).
    pub width: u32,
    /// Height of one VM's row in pixels (at least 220).
    pub row_height: u32,
    /// Skip malformed lines (counted in [`Summary::skipped_lines`]) instead
    /// of failing on the first.
    pub skip_malformed: bool,
    /// The header's first line; `None` for "pagewire restore report".
    pub title: Option<String>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            max_vms: 16,
            width: 1400,
            row_height: 340,
            skip_malformed: false,
            title: None,
        }
    }
}

/// What was drawn.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    /// Sessions (VMs) read.
    pub sessions: usize,
    /// Sessions that got a row.
    pub drawn: usize,
    /// Sessions left out by [`Options::max_vms`].
    pub left_out: usize,
    /// 1-based numbers of malformed lines skipped ([`Options::skip_malformed`]).
    pub skipped_lines: Vec<usize>,
    /// The picture's size in pixels.
    pub width: u32,
    pub height: u32,
}

/// Why there is no report.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error(
        "no sessions in the input: it is empty or only blank lines (expected one JSON object \
         a line, as `pagewire serve --stats-json` writes)"
    )]
    Empty,
    #[error("no sessions in the input: all {skipped} non-blank lines are malformed (the first is line {first})")]
    NothingValid { skipped: usize, first: usize },
    #[error("line {line}: not a session record: {message}")]
    Malformed { line: usize, message: String },
    #[error("writing {}: {source}", path.display())]
    Write {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("drawing the report: {0}")]
    Draw(String),
}

/// Reads `input` (the JSON lines of a stats file), draws the report and
/// writes it as SVG to `out`.
pub fn render_svg(input: &str, out: &Path, opts: &Options) -> Result<Summary, ReportError> {
    let (svg, summary) = render_svg_string(input, opts)?;
    std::fs::write(out, svg).map_err(|source| ReportError::Write {
        path: out.to_path_buf(),
        source,
    })?;
    Ok(summary)
}

/// Like [`render_svg`], but returns the SVG text.
pub fn render_svg_string(input: &str, opts: &Options) -> Result<(String, Summary), ReportError> {
    let parsed = parse(input, opts)?;
    draw::draw(&parsed, opts)
}
