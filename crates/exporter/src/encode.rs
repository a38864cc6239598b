//! The exposition: a [`Collector`] over one [`ServerSample`], in a registry
//! built per scrape, written by prometheus-client's Prometheus text encoder.

use std::borrow::Cow;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{prometheus_text, DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::{Counters, Latency, MetricsError, ServerSample};

/// Encodes `sample` in the Prometheus text exposition format (0.0.4).
pub fn encode(sample: &ServerSample) -> Result<String, MetricsError> {
    encode_owned(sample.clone())
}

/// [`encode`] without the copy, for the HTTP handler.
pub(crate) fn encode_owned(sample: ServerSample) -> Result<String, MetricsError> {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(SampleCollector(sample)));
    let mut out = String::new();
    prometheus_text::encode(&mut out, &registry)?;
    Ok(out)
}

#[derive(Debug)]
struct SampleCollector(ServerSample);

type Labels<'a> = [(&'static str, Cow<'a, str>); 4];

fn vm_labels(vm: &crate::VmSample) -> Labels<'_> {
    [
        ("vm", Cow::Owned(vm.id.to_string())),
        ("name", Cow::Borrowed(vm.name.as_str())),
        ("snapshot", Cow::Borrowed(vm.snapshot.as_str())),
        (
            "pid",
            Cow::Owned(vm.pid.map(|p| p.to_string()).unwrap_or_default()),
        ),
    ]
}

fn actions(c: &Counters) -> [(&'static str, u64); 4] {
    [
        ("copied", c.pages_copied),
        ("zeroed", c.pages_zeroed),
        ("poisoned", c.pages_poisoned),
        ("discarded", c.pages_discarded),
    ]
}

fn causes(c: &Counters) -> [(&'static str, u64); 5] {
    [
        ("on_demand", c.pages_on_demand),
        ("fault_around", c.pages_fault_around),
        ("readahead", c.pages_readahead),
        ("background", c.pages_background),
        ("prefetch", c.pages_prefetched),
    ]
}

fn us_to_s(us: u64) -> f64 {
    us as f64 / 1e6
}

/// Buckets in seconds, sorted, NaN bounds dropped, and a count no smaller
/// than the buckets' sum (so `+Inf` is never below the last bucket).
fn histogram(l: &Latency) -> (f64, u64, Vec<(f64, u64)>) {
    let mut buckets: Vec<(f64, u64)> = l
        .buckets
        .iter()
        .filter(|(le, _)| !le.is_nan())
        .map(|&(le, n)| (le / 1e6, n))
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let in_buckets = buckets.iter().fold(0u64, |a, (_, n)| a.saturating_add(*n));
    (l.sum_us / 1e6, l.count.max(in_buckets), buckets)
}

const VM_HELP: &str = " (one series per live VM)";

impl Collector for SampleCollector {
    fn encode(&self, mut enc: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let labels: Vec<Labels<'_>> = s.vms.iter().map(vm_labels).collect();
        let per_vm = || s.vms.iter().zip(labels.iter());

        // Per VM.
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_faults",
                &format!("Page-fault messages read{VM_HELP}."),
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                counter(m.encode_family(l)?, vm.counters.faults)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_pages",
                &format!("Pages by what was done to them: copied (UFFDIO_COPY), zeroed, poisoned, discarded (REMOVE events){VM_HELP}."),
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                for (action, n) in actions(&vm.counters) {
                    counter(m.encode_family(&(&l[..], [("action", action)]))?, n)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_pages_mapped",
                &format!("Pages mapped, by cause: on_demand (a thread faulted on it), fault_around, readahead, background, prefetch (recorded working set){VM_HELP}."),
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                for (cause, n) in causes(&vm.counters) {
                    counter(m.encode_family(&(&l[..], [("cause", cause)]))?, n)?;
                }
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_bytes_copied",
                &format!("Bytes copied into the VM's memory{VM_HELP}."),
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                counter(m.encode_family(l)?, vm.counters.bytes_copied)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_fault_latency_seconds",
                &format!("Time from reading a fault to its page being mapped{VM_HELP}."),
                None,
                MetricType::Histogram,
            )?;
            for (vm, l) in per_vm() {
                let (sum, count, buckets) = histogram(&vm.counters.latency);
                m.encode_family(l)?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_blocktime_seconds",
                &format!("Time the VM's threads spent waiting on missing pages, from the fault being read to the page mapped{VM_HELP}."),
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                counter(m.encode_family(l)?, us_to_s(vm.counters.blocktime_us))?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_vm_thread_blocktime_seconds",
                "Time one guest thread spent waiting on missing pages (one series per thread id the kernel reported).",
                None,
                MetricType::Counter,
            )?;
            for (vm, l) in per_vm() {
                for &(tid, us) in &vm.blocktime_by_thread {
                    let tid = [("tid", tid.to_string())];
                    counter(m.encode_family(&(&l[..], tid))?, us_to_s(us))?;
                }
            }
        }

        // Server-wide: live VMs plus those that ended.
        let mut all = s.ended.clone();
        for vm in &s.vms {
            all.add(&vm.counters);
        }
        const ALL: &str = ", summed over all VMs served, live and ended";
        unlabelled_counter(
            &mut enc,
            "pagewire_faults",
            &format!("Page-fault messages read{ALL}."),
            all.faults,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "pagewire_pages",
                &format!(
                    "Pages by what was done to them (copied, zeroed, poisoned, discarded){ALL}."
                ),
                None,
                MetricType::Counter,
            )?;
            for (action, n) in actions(&all) {
                counter(m.encode_family(&[("action", action)])?, n)?;
            }
        }
        {
            let mut m = enc.encode_descriptor(
                "pagewire_pages_mapped",
                &format!("Pages mapped, by cause (on_demand, fault_around, readahead, background, prefetch){ALL}."),
                None,
                MetricType::Counter,
            )?;
            for (cause, n) in causes(&all) {
                counter(m.encode_family(&[("cause", cause)])?, n)?;
            }
        }
        unlabelled_counter(
            &mut enc,
            "pagewire_bytes_copied",
            &format!("Bytes copied into VM memory{ALL}."),
            all.bytes_copied,
        )?;
        {
            let mut m = enc.encode_descriptor(
                "pagewire_fault_latency_seconds",
                &format!("Time from reading a fault to its page being mapped{ALL}."),
                None,
                MetricType::Histogram,
            )?;
            let (sum, count, buckets) = histogram(&all.latency);
            m.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        unlabelled_counter(
            &mut enc,
            "pagewire_blocktime_seconds",
            &format!("Time VM threads spent waiting on missing pages{ALL}."),
            us_to_s(all.blocktime_us),
        )?;
        enc.encode_descriptor(
            "pagewire_vms",
            "VMs being served now.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&(s.vms.len() as u64))?;
        unlabelled_counter(
            &mut enc,
            "pagewire_sessions_adopted",
            "VMs taken over from a previous server process.",
            s.sessions_adopted,
        )?;
        unlabelled_counter(
            &mut enc,
            "pagewire_handshakes_rejected",
            "Peers turned away at the handshake.",
            s.handshakes_rejected,
        )?;
        enc.encode_descriptor(
            "pagewire_uptime_seconds",
            "Seconds since the server started.",
            None,
            MetricType::Gauge,
        )?
        .encode_gauge(&s.uptime_s)?;
        Ok(())
    }
}

fn counter<V: prometheus_client::encoding::EncodeCounterValue>(
    mut m: prometheus_client::encoding::MetricEncoder<'_>,
    v: V,
) -> Result<(), std::fmt::Error> {
    m.encode_counter::<NoLabelSet, V, u64>(&v, None)
}

fn unlabelled_counter<V: prometheus_client::encoding::EncodeCounterValue>(
    enc: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    v: V,
) -> Result<(), std::fmt::Error> {
    counter(
        enc.encode_descriptor(name, help, None, MetricType::Counter)?,
        v,
    )
}
