//! A strict little parser of the Prometheus text format (0.0.4), enough to
//! check what the exporter writes.
#![allow(dead_code)]

use std::collections::{BTreeMap, HashMap};

use pagewire_exporter::{Counters, Latency, ServerSample, VmSample};

#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Exposition {
    /// Family name → (type, help).
    pub families: HashMap<String, (String, String)>,
    pub samples: Vec<Sample>,
}

impl Exposition {
    /// Samples named `name` whose labels include all of `with`.
    pub fn find(&self, name: &str, with: &[(&str, &str)]) -> Vec<&Sample> {
        self.samples
            .iter()
            .filter(|s| s.name == name)
            .filter(|s| {
                with.iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
            })
            .collect()
    }

    /// The one sample named `name` with labels including `with`.
    pub fn value(&self, name: &str, with: &[(&str, &str)]) -> f64 {
        let found = self.find(name, with);
        assert_eq!(
            found.len(),
            1,
            "one sample {name} {with:?}, found {found:?}"
        );
        found[0].value
    }
}

fn family_of<'a>(name: &'a str, families: &HashMap<String, (String, String)>) -> Option<&'a str> {
    if families.contains_key(name) {
        return Some(name);
    }
    for suffix in ["_bucket", "_sum", "_count"] {
        if let Some(base) = name.strip_suffix(suffix) {
            if families.get(base).is_some_and(|(t, _)| t == "histogram") {
                return Some(base);
            }
        }
    }
    None
}

fn unescape(s: &str, help: bool) -> Result<String, String> {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('\\') => out.push('\\'),
            Some('n') => out.push('\n'),
            Some('"') if !help => out.push('"'),
            other => return Err(format!("bad escape \\{other:?} in {s:?}")),
        }
    }
    Ok(out)
}

fn parse_labels(s: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    // `s` starts after '{'.
    let mut labels = BTreeMap::new();
    let mut rest = s;
    loop {
        if let Some(r) = rest.strip_prefix('}') {
            return Ok((labels, r));
        }
        let eq = rest.find('=').ok_or("label without =")?;
        let key = &rest[..eq];
        if key.is_empty() || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Err(format!("bad label name {key:?}"));
        }
        rest = rest[eq + 1..]
            .strip_prefix('"')
            .ok_or("label value not quoted")?;
        let mut end = None;
        let mut escaped = false;
        for (i, c) in rest.char_indices() {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => {
                    end = Some(i);
                    break;
                }
                _ => {}
            }
        }
        let end = end.ok_or("unterminated label value")?;
        let value = unescape(&rest[..end], false)?;
        if labels.insert(key.to_string(), value).is_some() {
            return Err(format!("label {key} twice"));
        }
        rest = &rest[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => Ok(f64::INFINITY),
        "-Inf" => Ok(f64::NEG_INFINITY),
        "NaN" => Ok(f64::NAN),
        _ => s.parse().map_err(|e| format!("bad value {s:?}: {e}")),
    }
}

pub fn parse(text: &str) -> Result<Exposition, String> {
    let mut exp = Exposition::default();
    let mut help: HashMap<String, String> = HashMap::new();
    let mut closed: Vec<String> = Vec::new();
    let mut current: Option<String> = None;
    if !text.ends_with('\n') {
        return Err("does not end with a newline".into());
    }
    for line in text.lines() {
        if line.is_empty() {
            continue;
        }
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let (name, h) = rest.split_once(' ').ok_or("HELP without text")?;
            help.insert(name.to_string(), unescape(h, true)?);
            continue;
        }
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, t) = rest.split_once(' ').ok_or("TYPE without type")?;
            if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&t) {
                return Err(format!("bad type {t}"));
            }
            if exp.families.contains_key(name) {
                return Err(format!("family {name} twice"));
            }
            let h = help.get(name).ok_or(format!("TYPE {name} without HELP"))?;
            exp.families
                .insert(name.to_string(), (t.to_string(), h.clone()));
            if let Some(prev) = current.replace(name.to_string()) {
                closed.push(prev);
            }
            continue;
        }
        if line.starts_with('#') {
            continue;
        }
        let name_end = line.find(['{', ' ']).ok_or(format!("bad line {line:?}"))?;
        let name = &line[..name_end];
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':')
        {
            return Err(format!("bad metric name {name:?}"));
        }
        let (labels, rest) = match line[name_end..].strip_prefix('{') {
            Some(r) => parse_labels(r)?,
            None => (BTreeMap::new(), &line[name_end..]),
        };
        let value = rest
            .strip_prefix(' ')
            .ok_or(format!("no value in {line:?}"))?;
        let value = parse_value(value.split(' ').next().unwrap_or_default())?;
        let family = family_of(name, &exp.families).ok_or(format!("sample {name} without TYPE"))?;
        if current.as_deref() != Some(family) {
            return Err(format!("sample {name} outside its family's block"));
        }
        exp.samples.push(Sample {
            name: name.to_string(),
            labels,
            value,
        });
    }
    Ok(exp)
}

/// Checks each histogram series of `family`: cumulative buckets ending in
/// `+Inf` equal to `_count`. Returns how many series it checked.
pub fn check_histograms(exp: &Exposition, family: &str) -> usize {
    type Labels = Vec<(String, String)>;
    let mut series: BTreeMap<Labels, Vec<(f64, f64)>> = BTreeMap::new();
    for s in exp.find(&format!("{family}_bucket"), &[]) {
        let mut key: Vec<_> = s
            .labels
            .clone()
            .into_iter()
            .filter(|(k, _)| k != "le")
            .collect();
        key.sort();
        let le = parse_value(&s.labels["le"]).expect("le parses");
        series.entry(key).or_default().push((le, s.value));
    }
    for (key, buckets) in &series {
        let with: Vec<(&str, &str)> = key.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        for w in buckets.windows(2) {
            assert!(
                w[0].0 < w[1].0,
                "{family} {key:?}: bounds ascend: {buckets:?}"
            );
            assert!(
                w[0].1 <= w[1].1,
                "{family} {key:?}: cumulative: {buckets:?}"
            );
        }
        let last = buckets.last().expect("a bucket");
        assert_eq!(last.0, f64::INFINITY, "{family} {key:?} ends with +Inf");
        let count = exp.value(&format!("{family}_count"), &with);
        assert_eq!(last.1, count, "{family} {key:?}: +Inf = count");
        exp.value(&format!("{family}_sum"), &with);
    }
    series.len()
}

pub fn two_vms() -> ServerSample {
    let vm = |id: u64, name: &str, pid: Option<u32>, k: u64| VmSample {
        id,
        name: name.to_string(),
        snapshot: format!("snap-{id}"),
        pid,
        counters: Counters {
            faults: 100 * k,
            pages_copied: 80 * k,
            pages_zeroed: 20 * k,
            pages_poisoned: k,
            pages_discarded: 2 * k,
            bytes_copied: 80 * k * 4096,
            pages_on_demand: 60 * k,
            pages_fault_around: 30 * k,
            pages_readahead: 5 * k,
            pages_background: 3 * k,
            pages_prefetched: 2 * k,
            latency: Latency {
                buckets: vec![(1.0, k), (2.0, 0), (4.0, 3 * k), (8.0, 5 * k), (16.0, 0)],
                sum_us: 50.0 * k as f64,
                // Two observations above the last bound.
                count: 9 * k + 2,
            },
            blocktime_us: 1_500_000 * k,
        },
        blocktime_by_thread: vec![
            (1000 + id as u32, 1_000_000 * k),
            (2000 + id as u32, 500_000 * k),
        ],
    };
    ServerSample {
        vms: vec![vm(1, "web", Some(4242), 1), vm(2, "db", None, 2)],
        ended: Counters {
            faults: 7,
            pages_copied: 7,
            blocktime_us: 250_000,
            latency: Latency {
                buckets: vec![(4.0, 7)],
                sum_us: 21.0,
                count: 7,
            },
            ..Counters::default()
        },
        sessions_adopted: 1,
        handshakes_rejected: 3,
        uptime_s: 12.5,
    }
}
