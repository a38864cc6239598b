//! Draws the report of three synthetic VMs to `target/report-sample.svg`
//! (or OUT.svg), or of the stats file given:
//! `cargo run -p report --example sample [OUT.svg [STATS.jsonl]]`.

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/../../target/report-sample.svg"
            ))
        });
    let input = match std::env::args().nth(2) {
        Some(p) => std::fs::read_to_string(p)?,
        None => support::three_vms(),
    };
    let summary = report::render_svg(&input, &out, &report::Options::default())?;
    println!("{}: {summary:?}", out.display());
    Ok(())
}
