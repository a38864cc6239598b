//! The records of `pagewire serve --stats-json`, read tolerantly.
//!
//! Only the fields the report draws are kept; others are ignored. A missing
//! field, or `null`, reads as zero (or empty); a count written as a float
//! reads as its integer part, a negative one as zero.

use std::fmt;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::{Options, ReportError};

/// One line of the stats file: a session (a VM) that ended.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Session {
    #[serde(deserialize_with = "count")]
    pub id: u64,
    #[serde(deserialize_with = "text")]
    pub name: String,
    #[serde(deserialize_with = "opt_count")]
    pub pid: Option<u64>,
    #[serde(deserialize_with = "opt_text")]
    pub snapshot: Option<String>,
    /// Why it ended (`hung_up`, `stopped`, …).
    #[serde(deserialize_with = "opt_text")]
    pub reason: Option<String>,
    #[serde(deserialize_with = "real")]
    pub duration_ms: f64,
    #[serde(deserialize_with = "count")]
    pub regions: u64,
    /// Bytes of memory the session served (all its regions).
    #[serde(deserialize_with = "count")]
    pub bytes: u64,
    #[serde(deserialize_with = "or_default")]
    pub stats: Stats,
}

/// The counters of a session that the report uses.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Stats {
    #[serde(deserialize_with = "count")]
    pub faults: u64,
    #[serde(deserialize_with = "count")]
    pub pages_copied: u64,
    #[serde(deserialize_with = "count")]
    pub pages_zeroed: u64,
    #[serde(deserialize_with = "count")]
    pub pages_prefetched: u64,
    #[serde(deserialize_with = "count")]
    pub pages_poisoned: u64,
    #[serde(deserialize_with = "count")]
    pub bytes_copied: u64,
    #[serde(deserialize_with = "count")]
    pub pages_on_demand: u64,
    #[serde(deserialize_with = "count")]
    pub pages_fault_around: u64,
    #[serde(deserialize_with = "count")]
    pub pages_readahead: u64,
    #[serde(deserialize_with = "count")]
    pub pages_background: u64,
    /// Time the guest's threads spent waiting on faults, summed.
    #[serde(deserialize_with = "real")]
    pub blocktime_us: f64,
    #[serde(deserialize_with = "or_default")]
    pub first_touch_latency: Latency,
    /// `None` in records written before the timeline existed.
    #[serde(deserialize_with = "or_default")]
    pub timeline: Option<Timeline>,
}

/// From reading a fault message to the faulting page being mapped.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Latency {
    #[serde(deserialize_with = "count")]
    pub count: u64,
    #[serde(deserialize_with = "real")]
    pub mean_us: f64,
    #[serde(deserialize_with = "real")]
    pub p50_us: f64,
    #[serde(deserialize_with = "real")]
    pub p90_us: f64,
    #[serde(deserialize_with = "real")]
    pub p99_us: f64,
    #[serde(deserialize_with = "real")]
    pub max_us: f64,
    /// Non-cumulative: bucket i holds values in (previous `le_us`, `le_us`].
    #[serde(deserialize_with = "or_default")]
    pub buckets: Vec<Bucket>,
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Bucket {
    #[serde(deserialize_with = "real")]
    pub le_us: f64,
    #[serde(deserialize_with = "count")]
    pub count: u64,
}

/// Counts per time bucket from the session's start: bucket i covers
/// `[i * bucket_ms, (i + 1) * bucket_ms)`. Arrays may differ in length (the
/// shorter ones read as zeros past their end).
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct Timeline {
    #[serde(deserialize_with = "real")]
    pub bucket_ms: f64,
    /// Fault messages.
    #[serde(deserialize_with = "counts")]
    pub faults: Vec<u64>,
    /// Pages mapped by each cause.
    #[serde(deserialize_with = "counts")]
    pub on_demand: Vec<u64>,
    #[serde(deserialize_with = "counts")]
    pub fault_around: Vec<u64>,
    #[serde(deserialize_with = "counts")]
    pub readahead: Vec<u64>,
    #[serde(deserialize_with = "counts")]
    pub background: Vec<u64>,
    #[serde(deserialize_with = "counts")]
    pub prefetch: Vec<u64>,
}

impl Session {
    /// Pages mapped, whatever the cause (copied or zero).
    pub fn pages_mapped(&self) -> u64 {
        self.stats
            .pages_copied
            .saturating_add(self.stats.pages_zeroed)
    }

    /// Bytes in a page: from the bytes and pages copied, else 4 KiB.
    pub fn page_bytes(&self) -> f64 {
        let s = &self.stats;
        if s.pages_copied > 0 && s.bytes_copied >= s.pages_copied {
            s.bytes_copied as f64 / s.pages_copied as f64
        } else {
            4096.0
        }
    }

    /// A name to show: the record's, or `session ID`.
    pub fn label(&self) -> String {
        if self.name.trim().is_empty() {
            format!("session {}", self.id)
        } else {
            self.name.clone()
        }
    }
}

/// The sessions read from a stats file.
#[derive(Debug, Clone, Default)]
pub struct Parsed {
    pub sessions: Vec<Session>,
    /// 1-based numbers of the malformed lines skipped (only with
    /// [`Options::skip_malformed`]).
    pub skipped_lines: Vec<usize>,
}

/// Reads JSON lines: one session a line; blank lines are skipped.
///
/// A malformed line is an error naming its (1-based) number, unless
/// `opts.skip_malformed`, when it is skipped and its number kept in
/// [`Parsed::skipped_lines`]. No session at all is an error either way.
pub fn parse(input: &str, opts: &Options) -> Result<Parsed, ReportError> {
    let mut out = Parsed::default();
    for (i, raw) in input.lines().enumerate() {
        let line = raw.trim().trim_start_matches('\u{feff}');
        if line.is_empty() {
            continue;
        }
        let n = i + 1;
        let parsed = if line.starts_with('{') {
            serde_json::from_str::<Session>(line).map_err(|e| e.to_string())
        } else {
            Err("expected a JSON object (one session a line)".to_string())
        };
        match parsed {
            Ok(s) => out.sessions.push(s),
            Err(_) if opts.skip_malformed => out.skipped_lines.push(n),
            Err(message) => return Err(ReportError::Malformed { line: n, message }),
        }
    }
    if out.sessions.is_empty() {
        return Err(match out.skipped_lines.first() {
            Some(&first) => ReportError::NothingValid {
                skipped: out.skipped_lines.len(),
                first,
            },
            None => ReportError::Empty,
        });
    }
    Ok(out)
}

/// A count: an integer, a float (its integer part), negative (zero), or null.
struct Count(u64);

impl<'de> Deserialize<'de> for Count {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Count;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a count (a non-negative number) or null")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Count, E> {
                Ok(Count(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Count, E> {
                Ok(Count(u64::try_from(v).unwrap_or(0)))
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Count, E> {
                // `as` saturates, and makes NaN 0.
                Ok(Count(if v > 0.0 { v as u64 } else { 0 }))
            }
            fn visit_unit<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
            fn visit_none<E: de::Error>(self) -> Result<Count, E> {
                Ok(Count(0))
            }
        }
        d.deserialize_any(V)
    }
}

fn count<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
    Ok(Count::deserialize(d)?.0)
}

fn opt_count<'de, D: Deserializer<'de>>(d: D) -> Result<Option<u64>, D::Error> {
    Ok(Option::<Count>::deserialize(d)?.map(|c| c.0))
}

fn counts<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<u64>, D::Error> {
    Ok(Option::<Vec<Count>>::deserialize(d)?
        .unwrap_or_default()
        .into_iter()
        .map(|c| c.0)
        .collect())
}

fn real<'de, D: Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(0.0))
}

fn or_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: Deserializer<'de>,
    T: Deserialize<'de> + Default,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// Text: a string, or any other JSON value written out (null is empty).
fn opt_text<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    Ok(match serde_json::Value::deserialize(d)? {
        serde_json::Value::Null => None,
        serde_json::Value::String(s) => Some(s),
        other => Some(other.to_string()),
    })
}

fn text<'de, D: Deserializer<'de>>(d: D) -> Result<String, D::Error> {
    Ok(opt_text(d)?.unwrap_or_default())
}
