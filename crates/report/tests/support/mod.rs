//! Synthetic stats lines: three VMs as `pagewire serve --stats-json` writes
//! them (shared by the tests and `examples/sample.rs`).

use serde_json::{json, Value};

/// A small deterministic generator (xorshift).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// In [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A latency histogram of `n` values, log-normal-ish around `median_us`.
fn latency(rng: &mut Rng, n: u64, median_us: f64, spread: f64) -> Value {
    let mut counts = [0u64; 28];
    let mut values = Vec::with_capacity(n as usize);
    for _ in 0..n {
        // The sum of uniforms: roughly normal in log2 space.
        let z: f64 = (0..4).map(|_| rng.unit()).sum::<f64>() - 2.0;
        let v = median_us * (z * spread).exp2() * if rng.unit() < 0.01 { 20.0 } else { 1.0 };
        values.push(v);
        let i = (v.log2().ceil().max(0.0) as usize).min(27);
        counts[i] += 1;
    }
    values.sort_by(f64::total_cmp);
    let q = |p: f64| {
        values
            .get(((values.len() as f64 * p) as usize).min(values.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0.0)
    };
    let mean = values.iter().sum::<f64>() / values.len().max(1) as f64;
    let buckets: Vec<Value> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| json!({"le_us": (i as f64).exp2(), "count": c}))
        .collect();
    json!({"count": n, "mean_us": mean, "p50_us": q(0.5), "p90_us": q(0.9), "p99_us": q(0.99),
           "max_us": values.last().copied().unwrap_or(0.0), "buckets": buckets})
}

#[allow(clippy::too_many_arguments)]
fn line(
    id: u64,
    pid: u64,
    snapshot: Option<&str>,
    duration_ms: f64,
    bucket_ms: f64,
    faults: Vec<u64>,
    causes: [Vec<u64>; 5],
    lat: Value,
) -> String {
    let [on_demand, fault_around, readahead, prefetch, background] = causes;
    let total = |v: &Vec<u64>| v.iter().sum::<u64>();
    let pages = total(&on_demand)
        + total(&fault_around)
        + total(&readahead)
        + total(&prefetch)
        + total(&background);
    let blocktime = total(&faults) as f64 * lat["mean_us"].as_f64().unwrap_or(0.0);
    let mut v = json!({
        "id": id, "name": format!("vm pid {pid}"), "pid": pid, "reason": "hung_up",
        "duration_ms": duration_ms, "regions": 1, "bytes": 268435456u64,
        "stats": {
            "faults": total(&faults), "pages_copied": pages, "pages_zeroed": 0,
            "pages_prefetched": total(&prefetch), "pages_poisoned": 0, "bytes_copied": pages * 4096,
            "pages_on_demand": total(&on_demand), "pages_fault_around": total(&fault_around),
            "pages_readahead": total(&readahead), "pages_background": total(&background),
            "blocktime_us": blocktime, "some_future_field": [1, 2, 3],
            "first_touch_latency": lat,
            "timeline": {"bucket_ms": bucket_ms, "faults": faults, "on_demand": on_demand,
                         "fault_around": fault_around, "readahead": readahead,
                         "background": background, "prefetch": prefetch}
        }
    });
    if let Some(s) = snapshot {
        v["snapshot"] = json!(s);
    }
    v.to_string()
}

/// Three VMs: a sequential-looking restore, one with prefetch, a sparse one.
pub fn three_vms() -> String {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = String::new();

    // 1. Sequential: faults all along, each followed by fault-around and
    // readahead; background population in the second half.
    let n = 800;
    let mut f = vec![0; n];
    let mut c: [Vec<u64>; 5] = std::array::from_fn(|_| vec![0; n]);
    for i in 0..n {
        let faults = if i < 500 {
            1 + rng.next() % 4
        } else {
            rng.next() % 2
        };
        f[i] = faults;
        c[0][i] = faults;
        c[1][i] = faults * 15;
        c[2][i] = if i < 500 { faults * 8 } else { 0 };
        c[4][i] = if (300..700).contains(&i) { 60 } else { 0 };
    }
    let total_f: u64 = f.iter().sum();
    let lat = latency(&mut rng, total_f, 35.0, 1.2);
    out += &line(3, 1234, Some("base"), 812.5, 1.0, f, c, lat);
    out.push('\n');

    // 2. Prefetch of a recorded working set in the first 60 ms, a few faults
    // after it.
    let n = 400;
    let mut f = vec![0; n];
    let mut c: [Vec<u64>; 5] = std::array::from_fn(|_| vec![0; n]);
    for i in 0..n {
        if i < 60 {
            c[3][i] = 700;
        }
        let faults = if i < 20 {
            rng.next() % 3
        } else if rng.unit() < 0.1 {
            1
        } else {
            0
        };
        f[i] = faults;
        c[0][i] = faults;
        c[1][i] = faults * 7;
    }
    let total_f: u64 = f.iter().sum();
    let lat = latency(&mut rng, total_f, 12.0, 0.8);
    out += &line(4, 1301, Some("web-warm"), 402.0, 1.0, f, c, lat);
    out.push('\n');

    // 3. Sparse: rare scattered faults over 3 s, no snapshot name.
    let n = 600;
    let mut f = vec![0; n];
    let mut c: [Vec<u64>; 5] = std::array::from_fn(|_| vec![0; n]);
    for i in 0..n {
        let faults = if rng.unit() < 0.15 {
            1 + rng.next() % 2
        } else {
            0
        };
        f[i] = faults;
        c[0][i] = faults;
        c[1][i] = faults * 3;
    }
    let total_f: u64 = f.iter().sum();
    let lat = latency(&mut rng, total_f, 90.0, 1.6);
    out += &line(5, 1422, None, 3050.0, 5.0, f, c, lat);
    out.push('\n');
    out
}
