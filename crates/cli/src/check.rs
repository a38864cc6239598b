//! `pagewire check`: the `probe` crate's report of this host's userfaultfd,
//! as text or JSON.

use std::process::ExitCode;

use anyhow::Context as _;

#[derive(clap::Args)]
pub struct CheckArgs {
    /// Print the report as JSON.
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: &CheckArgs) -> anyhow::Result<ExitCode> {
    let report = probe::collect()?;
    if args.json {
        let text = serde_json::to_string_pretty(&report).context("serialising the report")?;
        println!("{text}");
    } else {
        print!("{}", probe::Human(&report));
    }
    Ok(if report.all_required_as_expected {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}
