mod common;

use common::{check_histograms, parse, two_vms};
use pagewire_exporter::{encode, ServerSample, VmSample};

#[test]
fn two_vms_parse_with_every_family_typed() {
    let text = encode(&two_vms()).expect("encodes");
    let exp = parse(&text).unwrap_or_else(|e| panic!("parses: {e}\n{text}"));
    let types: Vec<(&str, &str)> = vec![
        ("pagewire_vm_faults_total", "counter"),
        ("pagewire_vm_pages_total", "counter"),
        ("pagewire_vm_pages_mapped_total", "counter"),
        ("pagewire_vm_bytes_copied_total", "counter"),
        ("pagewire_vm_fault_latency_seconds", "histogram"),
        ("pagewire_vm_blocktime_seconds_total", "counter"),
        ("pagewire_vm_thread_blocktime_seconds_total", "counter"),
        ("pagewire_faults_total", "counter"),
        ("pagewire_pages_total", "counter"),
        ("pagewire_pages_mapped_total", "counter"),
        ("pagewire_bytes_copied_total", "counter"),
        ("pagewire_fault_latency_seconds", "histogram"),
        ("pagewire_blocktime_seconds_total", "counter"),
        ("pagewire_vms", "gauge"),
        ("pagewire_sessions_adopted_total", "counter"),
        ("pagewire_handshakes_rejected_total", "counter"),
        ("pagewire_uptime_seconds", "gauge"),
    ];
    for (name, t) in &types {
        let (got, help) = exp
            .families
            .get(*name)
            .unwrap_or_else(|| panic!("{name} in\n{text}"));
        assert_eq!(got, t, "{name}");
        assert!(!help.is_empty(), "{name} has help");
    }
    assert_eq!(
        exp.families.len(),
        types.len(),
        "no other families: {:?}",
        exp.families.keys()
    );

    let web = [
        ("vm", "1"),
        ("name", "web"),
        ("snapshot", "snap-1"),
        ("pid", "4242"),
    ];
    assert_eq!(exp.value("pagewire_vm_faults_total", &web), 100.0);
    assert_eq!(exp.value("pagewire_vm_faults_total", &[("vm", "2")]), 200.0);
    // No pid: an empty label, which Prometheus drops.
    assert_eq!(
        exp.value("pagewire_vm_faults_total", &[("vm", "2"), ("pid", "")]),
        200.0
    );
    assert_eq!(
        exp.value(
            "pagewire_vm_pages_total",
            &[("vm", "2"), ("action", "zeroed")]
        ),
        40.0
    );
    assert_eq!(
        exp.value(
            "pagewire_vm_pages_total",
            &[("vm", "1"), ("action", "discarded")]
        ),
        2.0
    );
    assert_eq!(exp.find("pagewire_vm_pages_total", &[("vm", "1")]).len(), 4);
    assert_eq!(
        exp.value(
            "pagewire_vm_pages_mapped_total",
            &[("vm", "1"), ("cause", "prefetch")]
        ),
        2.0
    );
    assert_eq!(
        exp.value(
            "pagewire_vm_pages_mapped_total",
            &[("vm", "2"), ("cause", "readahead")]
        ),
        10.0
    );
    assert_eq!(
        exp.find("pagewire_vm_pages_mapped_total", &[("vm", "1")])
            .len(),
        5
    );
    assert_eq!(
        exp.value("pagewire_vm_bytes_copied_total", &[("vm", "1")]),
        80.0 * 4096.0
    );
    assert_eq!(
        exp.value("pagewire_vm_blocktime_seconds_total", &[("vm", "2")]),
        3.0
    );
    assert_eq!(
        exp.value(
            "pagewire_vm_thread_blocktime_seconds_total",
            &[("vm", "1"), ("tid", "1001")]
        ),
        1.0
    );
    assert_eq!(
        exp.value(
            "pagewire_vm_thread_blocktime_seconds_total",
            &[("vm", "2"), ("tid", "2002")]
        ),
        1.0
    );

    // Server totals: live VMs plus ended ones.
    assert_eq!(exp.value("pagewire_faults_total", &[]), 307.0);
    assert_eq!(
        exp.value("pagewire_pages_total", &[("action", "copied")]),
        247.0
    );
    assert_eq!(
        exp.value("pagewire_pages_mapped_total", &[("cause", "on_demand")]),
        180.0
    );
    assert_eq!(
        exp.value("pagewire_bytes_copied_total", &[]),
        240.0 * 4096.0
    );
    assert_eq!(exp.value("pagewire_blocktime_seconds_total", &[]), 4.75);
    assert_eq!(exp.value("pagewire_vms", &[]), 2.0);
    assert_eq!(exp.value("pagewire_sessions_adopted_total", &[]), 1.0);
    assert_eq!(exp.value("pagewire_handshakes_rejected_total", &[]), 3.0);
    assert_eq!(exp.value("pagewire_uptime_seconds", &[]), 12.5);
}

#[test]
fn histograms_are_cumulative_in_seconds_and_end_with_inf_equal_to_count() {
    let text = encode(&two_vms()).expect("encodes");
    let exp = parse(&text).unwrap_or_else(|e| panic!("parses: {e}\n{text}"));
    assert_eq!(
        check_histograms(&exp, "pagewire_vm_fault_latency_seconds"),
        2
    );
    assert_eq!(check_histograms(&exp, "pagewire_fault_latency_seconds"), 1);

    let h = "pagewire_vm_fault_latency_seconds";
    // µs bounds become seconds; counts accumulate.
    assert_eq!(
        exp.value(&format!("{h}_bucket"), &[("vm", "1"), ("le", "1e-06")]),
        1.0
    );
    assert_eq!(
        exp.value(&format!("{h}_bucket"), &[("vm", "1"), ("le", "4e-06")]),
        4.0
    );
    assert_eq!(
        exp.value(&format!("{h}_bucket"), &[("vm", "1"), ("le", "1.6e-05")]),
        9.0
    );
    assert_eq!(
        exp.value(&format!("{h}_bucket"), &[("vm", "1"), ("le", "+Inf")]),
        11.0
    );
    assert_eq!(exp.value(&format!("{h}_sum"), &[("vm", "2")]), 100e-6);
    // Server-wide: buckets merged with the ended VMs'.
    let t = "pagewire_fault_latency_seconds";
    assert_eq!(
        exp.value(&format!("{t}_bucket"), &[("le", "4e-06")]),
        4.0 + 8.0 + 7.0
    );
    assert_eq!(exp.value(&format!("{t}_count"), &[]), 11.0 + 20.0 + 7.0);
}

#[test]
fn a_count_below_its_buckets_does_not_break_the_histogram() {
    let mut s = two_vms();
    s.vms[0].counters.latency.count = 0;
    s.vms[0].counters.latency.buckets.reverse();
    let text = encode(&s).expect("encodes");
    let exp = parse(&text).unwrap_or_else(|e| panic!("parses: {e}\n{text}"));
    check_histograms(&exp, "pagewire_vm_fault_latency_seconds");
    assert_eq!(
        exp.value("pagewire_vm_fault_latency_seconds_count", &[("vm", "1")]),
        9.0
    );
}

#[test]
fn label_values_from_peers_are_escaped() {
    let nasty = "we\"ird\\name\nwith } and, {x=\"1\"} λ";
    let s = ServerSample {
        vms: vec![VmSample {
            id: 7,
            name: nasty.to_string(),
            snapshot: "/snaps/\"a\"\\b\n".to_string(),
            pid: Some(1),
            ..VmSample::default()
        }],
        ..ServerSample::default()
    };
    let text = encode(&s).expect("encodes");
    assert!(
        text.contains(r#"name="we\"ird\\name\nwith } and, {x=\"1\"} λ""#),
        "escaped in\n{text}"
    );
    let exp = parse(&text).unwrap_or_else(|e| panic!("parses: {e}\n{text}"));
    let got = exp.find("pagewire_vm_faults_total", &[("vm", "7")]);
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].labels["name"], nasty);
    assert_eq!(got[0].labels["snapshot"], "/snaps/\"a\"\\b\n");
    // Every line is one sample or one comment: no raw newline leaked.
    for line in text.lines() {
        assert!(
            line.starts_with("pagewire_") || line.starts_with("# "),
            "{line:?}"
        );
    }
}

#[test]
fn no_vms_still_gives_every_server_total() {
    let text = encode(&ServerSample::default()).expect("encodes");
    let exp = parse(&text).unwrap_or_else(|e| panic!("parses: {e}\n{text}"));
    assert_eq!(exp.value("pagewire_vms", &[]), 0.0);
    assert_eq!(exp.value("pagewire_faults_total", &[]), 0.0);
    assert_eq!(
        exp.value("pagewire_fault_latency_seconds_bucket", &[("le", "+Inf")]),
        0.0
    );
    assert!(exp.find("pagewire_vm_faults_total", &[]).is_empty());
}
