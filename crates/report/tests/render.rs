mod support;

use report::{render_svg, render_svg_string, Options, ReportError};

fn render(input: &str, opts: &Options) -> (String, report::Summary) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("report.svg");
    let summary = render_svg(input, &out, opts).expect("the report renders");
    let svg = std::fs::read_to_string(&out).expect("the SVG was written");
    (svg, summary)
}

#[test]
fn three_vms_render() {
    let input = support::three_vms();
    let (svg, summary) = render(&input, &Options::default());
    assert!(
        svg.trim_start().starts_with("<svg"),
        "{}",
        &svg[..svg.len().min(200)]
    );
    assert!(svg.trim_end().ends_with("</svg>"));
    for name in ["vm pid 1234", "vm pid 1301", "vm pid 1422"] {
        assert!(svg.contains(name), "{name} is missing");
    }
    for label in [
        "on demand",
        "fault-around",
        "readahead",
        "prefetch",
        "background",
        "faults (cumulative, right axis)",
        "first-touch latency",
        "p50",
        "p99",
        "snapshot base",
        "snapshot web-warm",
    ] {
        assert!(svg.contains(label), "{label:?} is missing");
    }
    assert_eq!(summary.sessions, 3);
    assert_eq!(summary.drawn, 3);
    assert_eq!(summary.left_out, 0);
    assert!(summary.skipped_lines.is_empty());
}

#[test]
fn rows_are_capped() {
    let one = support::three_vms();
    let input = one.repeat(3);
    let opts = Options {
        max_vms: 4,
        ..Options::default()
    };
    let (svg, summary) = render_svg_string(&input, &opts).expect("the report renders");
    assert_eq!(
        (summary.sessions, summary.drawn, summary.left_out),
        (9, 4, 5)
    );
    assert!(
        svg.contains("5 left out"),
        "the header says how many were left out"
    );
}

#[test]
fn old_and_odd_records_render() {
    // No timeline, no histogram, no snapshot, a null pid, floats for counts,
    // arrays of different lengths, a blank line, unknown fields.
    let input = r#"
{"id":1,"name":"old","pid":null,"reason":"stopped","duration_ms":5.0,"stats":{"faults":3,"pages_copied":3,"bytes_copied":12288,"first_touch_latency":{"count":3,"mean_us":10,"p50_us":9,"p90_us":12,"p99_us":15,"max_us":15}}}

{"id":2,"name":"","stats":{"faults":2.0,"timeline":{"bucket_ms":0,"faults":[1,1],"on_demand":[1],"fault_around":[0,0,0,4]},"first_touch_latency":{"buckets":[{"le_us":1,"count":0},{"le_us":2,"count":2}]}},"new":{"x":1}}
{"id":3}
"#;
    let (svg, summary) = render(input, &Options::default());
    assert_eq!(summary.sessions, 3);
    assert!(svg.contains("no timeline in this record"));
    assert!(svg.contains("session 2"), "an empty name shows the id");
    assert!(svg.contains("no faults served on demand"));
}

#[test]
fn malformed_line_names_its_number() {
    let mut input = support::three_vms();
    input.insert(0, '\n');
    input.push_str("{\"id\": 9, \"name\": \"half a li\n");
    let err = render_svg_string(&input, &Options::default()).expect_err("a malformed line fails");
    match &err {
        ReportError::Malformed { line, .. } => assert_eq!(*line, 5, "{err}"),
        other => panic!("wrong error: {other}"),
    }
    assert!(err.to_string().starts_with("line 5:"), "{err}");

    let err = render_svg_string("[1, 2]\n", &Options::default()).expect_err("an array fails");
    assert!(err.to_string().starts_with("line 1:"), "{err}");

    let err = render_svg_string("{\"stats\": {\"faults\": \"many\"}}", &Options::default())
        .expect_err("a count as a string fails");
    assert!(err.to_string().starts_with("line 1:"), "{err}");
}

#[test]
fn malformed_lines_can_be_skipped() {
    let mut input = support::three_vms();
    input.push_str("not json\n{\"id\":\n");
    let opts = Options {
        skip_malformed: true,
        ..Options::default()
    };
    let (_, summary) = render_svg_string(&input, &opts).expect("the report renders");
    assert_eq!(summary.sessions, 3);
    assert_eq!(summary.skipped_lines, vec![4, 5]);

    let err = render_svg_string("nope\n\n{\n", &opts).expect_err("nothing valid fails");
    assert!(
        matches!(
            err,
            ReportError::NothingValid {
                skipped: 2,
                first: 1
            }
        ),
        "{err}"
    );
}

#[test]
fn empty_input_fails() {
    for input in ["", "\n\n", "  \n\t\n"] {
        let err = render_svg_string(input, &Options::default()).expect_err("empty input fails");
        assert!(matches!(err, ReportError::Empty), "{err}");
        assert!(err.to_string().contains("empty"), "{err}");
    }
}

#[test]
fn unwritable_output_names_the_path() {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let out = dir.path().join("no/such/dir/report.svg");
    let err = render_svg(&support::three_vms(), &out, &Options::default())
        .expect_err("writing into a missing directory fails");
    assert!(err.to_string().contains("no/such/dir"), "{err}");
}

#[test]
fn extreme_values_do_not_panic() {
    let max = u64::MAX;
    let input = format!(
        r#"{{"id":{max},"name":"<&> \"quoted\"","pid":{max},"duration_ms":1e308,"bytes":{max},"stats":{{"faults":{max},"pages_copied":1,"bytes_copied":{max},"pages_on_demand":-5,"blocktime_us":1e308,"first_touch_latency":{{"count":1,"p50_us":-1,"p99_us":1e308,"buckets":[{{"le_us":1e-300,"count":{max}}},{{"le_us":1e300,"count":1}},{{"le_us":-1,"count":1}},{{"le_us":1e300,"count":1}}]}},"timeline":{{"bucket_ms":1e308,"faults":[{max},{max}],"on_demand":[{max}]}}}}}}
{{"id":2,"stats":{{"timeline":{{"bucket_ms":1e-300,"faults":[1],"prefetch":[{max},{max},{max}]}},"first_touch_latency":{{"buckets":[{{"le_us":4,"count":1}},{{"le_us":2,"count":1}}]}}}}}}
"#
    );
    let (svg, summary) = render(&input, &Options::default());
    assert_eq!(summary.sessions, 2);
    assert!(svg.contains("&lt;&amp;&gt;"), "text is escaped");
    assert!(!svg.contains("<&>"), "text is escaped");
}
