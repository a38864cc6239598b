//! pagewire's Prometheus endpoint (`pagewire serve --metrics ADDR`).
//!
//! This crate knows nothing of the engine: the server hands it plain data
//! through a callback ([`spawn`]), called once per scrape, that returns a
//! [`ServerSample`]. [`encode`] turns a sample into the Prometheus text
//! exposition format (version 0.0.4); [`spawn`] serves it at `GET /metrics`.
//!
//! ```
//! use pagewire_exporter::{encode, ServerSample, VmSample};
//!
//! let sample = ServerSample {
//!     vms: vec![VmSample { id: 1, name: "web".into(), ..VmSample::default() }],
//!     uptime_s: 3.0,
//!     ..ServerSample::default()
//! };
//! let text = encode(&sample)?;
//! assert!(text.contains(r#"pagewire_vm_faults_total{vm="1",name="web",snapshot="",pid=""} 0"#));
//!
//! // What `pagewire serve --metrics ADDR` does, with its own callback:
//! let server = pagewire_exporter::spawn("127.0.0.1:0".parse()?, ServerSample::default)?;
//! println!("scrape http://{}/metrics", server.local_addr());
//! server.shutdown();
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```
//!
//! # Metrics
//!
//! Every per-VM series carries the labels `vm` (the session id), `name`,
//! `snapshot` and `pid` (empty when the peer's pid is unknown, which
//! Prometheus treats as no label).
//!
//! | metric | type | meaning |
//! | --- | --- | --- |
//! | `pagewire_vm_faults_total` | counter | page-fault messages read for the VM |
//! | `pagewire_vm_pages_total{action}` | counter | pages `copied` (UFFDIO_COPY), `zeroed`, `poisoned`, `discarded` (REMOVE events) |
//! | `pagewire_vm_pages_mapped_total{cause}` | counter | pages mapped, by why: `on_demand`, `fault_around`, `readahead`, `background`, `prefetch` |
//! | `pagewire_vm_bytes_copied_total` | counter | bytes copied into the VM |
//! | `pagewire_vm_fault_latency_seconds` | histogram | from reading a fault to its page being mapped |
//! | `pagewire_vm_blocktime_seconds_total` | counter | time the VM's threads spent waiting on missing pages |
//! | `pagewire_vm_thread_blocktime_seconds_total{tid}` | counter | the same, per guest thread id (when the kernel reports thread ids) |
//! | `pagewire_faults_total` | counter | faults of all VMs, live and ended |
//! | `pagewire_pages_total{action}` | counter | as per VM, all VMs, live and ended |
//! | `pagewire_pages_mapped_total{cause}` | counter | as per VM, all VMs, live and ended |
//! | `pagewire_bytes_copied_total` | counter | as per VM, all VMs, live and ended |
//! | `pagewire_fault_latency_seconds` | histogram | as per VM, all VMs, live and ended |
//! | `pagewire_blocktime_seconds_total` | counter | as per VM, all VMs, live and ended |
//! | `pagewire_vms` | gauge | VMs being served now |
//! | `pagewire_sessions_adopted_total` | counter | VMs taken over from a previous server process |
//! | `pagewire_handshakes_rejected_total` | counter | peers turned away at the handshake |
//! | `pagewire_uptime_seconds` | gauge | seconds since the server started |
//!
//! The server-wide totals add [`ServerSample::ended`], the totals of VMs
//! that already ended, to the sum over live VMs, so a VM ending never makes
//! a counter go down ([`Counters::add`] accumulates them). The server-wide
//! histogram merges buckets by their bound, so VMs should share one set of
//! bounds. `pagewire_vm_pages_total` sums to the pages touched;
//! `pagewire_vm_pages_mapped_total` splits the mapped ones (copied and
//! zeroed) by why they were mapped. Thread ids come and go: each one is a
//! series for as long as its VM lives, and should appear once per VM.
//!
//! # Encoding
//!
//! The exposition is written by `prometheus-client` (its Prometheus text
//! encoder, `encoding::prometheus_text`) through a custom
//! [`Collector`](prometheus_client::collector::Collector) registered in a
//! registry built per scrape: the VMs, and so the label sets, change from
//! one scrape to the next, which a collector expresses directly (no
//! long-lived `Family` whose stale series would have to be removed). The
//! crate escapes label values (`\\`, `"`, newline), so names that come
//! from peers cannot break the format.
//!
//! # HTTP
//!
//! The endpoint is a small HTTP/1.x responder on `std::net`, not a general
//! server: one accept thread, and one short-lived thread per connection, at
//! most [`MAX_CONNECTIONS`] at once (further ones are closed at once). A
//! request must arrive whole, at most [`MAX_REQUEST_BYTES`] of request line
//! and headers, within [`READ_DEADLINE`]; the response must be taken within
//! [`WRITE_DEADLINE`]; every response closes the connection. So a slow or
//! hostile client holds one slot for a few seconds at most and never the
//! pager. `GET` (or `HEAD`) `/metrics` answers 200 with
//! `text/plain; version=0.0.4; charset=utf-8`; another method on
//! `/metrics` 405, any other path 404. `tiny_http` was considered and left
//! out: it reads header lines without a bound, sets no socket timeouts and
//! spawns a thread per connection without a limit.
//!
//! The callback runs on the connection's thread, so it may run on several
//! threads at once when scrapes overlap; a panic in it answers 500.

mod encode;
mod http;

pub use encode::encode;
pub use http::{
    spawn, MetricsServer, MAX_CONNECTIONS, MAX_REQUEST_BYTES, READ_DEADLINE, WRITE_DEADLINE,
};

use std::net::SocketAddr;

/// Errors of this crate.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// The listening socket could not be bound.
    #[error("cannot listen on {addr} for metrics: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The bound socket's address could not be read.
    #[error("cannot read the metrics listener's address: {0}")]
    LocalAddr(#[source] std::io::Error),
    /// The accept thread could not be started.
    #[error("cannot start the metrics thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The exposition could not be written.
    #[error("cannot encode metrics")]
    Encode(#[from] std::fmt::Error),
}

/// A latency histogram as the pager keeps it: bucket upper bounds in
/// microseconds with non-cumulative counts, ascending (the encoder sorts
/// them anyway), plus the sum and count of all observations. Observations
/// above the last bound are counted in `count` only (the `+Inf` bucket).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Latency {
    /// `(upper bound in µs, observations in this bucket alone)`.
    pub buckets: Vec<(f64, u64)>,
    pub sum_us: f64,
    pub count: u64,
}

impl Latency {
    /// Adds `other`'s observations, bucket by bucket (bounds matched exactly;
    /// bounds only one side has are kept).
    pub fn add(&mut self, other: &Latency) {
        for &(le, n) in &other.buckets {
            match self.buckets.iter_mut().find(|(l, _)| *l == le) {
                Some((_, c)) => *c = c.saturating_add(n),
                None => self.buckets.push((le, n)),
            }
        }
        self.buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
        self.sum_us += other.sum_us;
        self.count = self.count.saturating_add(other.count);
    }
}

/// A VM's counters, all monotonic over the VM's life.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Counters {
    /// Page-fault messages read.
    pub faults: u64,
    /// Pages mapped with UFFDIO_COPY.
    pub pages_copied: u64,
    /// Pages mapped as zero.
    pub pages_zeroed: u64,
    /// Pages poisoned (data unreadable, or outside every declared region).
    pub pages_poisoned: u64,
    /// Pages discarded by REMOVE events (balloon, MADV_DONTNEED).
    pub pages_discarded: u64,
    pub bytes_copied: u64,
    /// Pages mapped because a thread faulted on them.
    pub pages_on_demand: u64,
    /// Pages mapped around a fault.
    pub pages_fault_around: u64,
    /// Pages mapped ahead of a sequential stream of faults.
    pub pages_readahead: u64,
    /// Pages mapped by background population.
    pub pages_background: u64,
    /// Pages of a recorded working set mapped before a fault asked for them.
    pub pages_prefetched: u64,
    /// Fault latency, from reading a fault to its page being mapped.
    pub latency: Latency,
    /// Time the VM's threads spent waiting on missing pages, in µs.
    pub blocktime_us: u64,
}

impl Counters {
    /// Adds `other` to `self`: how the server folds an ended VM's counters
    /// into [`ServerSample::ended`].
    pub fn add(&mut self, other: &Counters) {
        let Counters {
            faults,
            pages_copied,
            pages_zeroed,
            pages_poisoned,
            pages_discarded,
            bytes_copied,
            pages_on_demand,
            pages_fault_around,
            pages_readahead,
            pages_background,
            pages_prefetched,
            latency,
            blocktime_us,
        } = other;
        for (mine, theirs) in [
            (&mut self.faults, faults),
            (&mut self.pages_copied, pages_copied),
            (&mut self.pages_zeroed, pages_zeroed),
            (&mut self.pages_poisoned, pages_poisoned),
            (&mut self.pages_discarded, pages_discarded),
            (&mut self.bytes_copied, bytes_copied),
            (&mut self.pages_on_demand, pages_on_demand),
            (&mut self.pages_fault_around, pages_fault_around),
            (&mut self.pages_readahead, pages_readahead),
            (&mut self.pages_background, pages_background),
            (&mut self.pages_prefetched, pages_prefetched),
            (&mut self.blocktime_us, blocktime_us),
        ] {
            *mine = mine.saturating_add(*theirs);
        }
        self.latency.add(latency);
    }
}

/// One live VM at the moment of a scrape.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct VmSample {
    /// The session id (label `vm`).
    pub id: u64,
    /// The name the peer gave (label `name`).
    pub name: String,
    /// The snapshot served (label `snapshot`).
    pub snapshot: String,
    /// The peer's pid, when known (label `pid`).
    pub pid: Option<u32>,
    pub counters: Counters,
    /// Block time per guest thread id, in µs, when the kernel reports
    /// thread ids; empty otherwise.
    pub blocktime_by_thread: Vec<(u32, u64)>,
}

/// Everything one scrape shows.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerSample {
    pub vms: Vec<VmSample>,
    /// Totals of the VMs that already ended, so server totals never go down.
    pub ended: Counters,
    /// VMs taken over from a previous server process.
    pub sessions_adopted: u64,
    /// Peers turned away at the handshake.
    pub handshakes_rejected: u64,
    pub uptime_s: f64,
}
