//! Between the engine's recordings and prefetch sets and the working-set
//! files of the `workset` crate: a recording becomes a file tied to its
//! snapshot, and a file becomes a prefetch set only for that snapshot.

use std::path::Path;
use std::time::Duration;

pub use server::sets::{load, save, snapshot_id};

/// The recording `serve --record` wrote into `dir` (the first one found).
pub fn find_recording(dir: &Path) -> anyhow::Result<std::path::PathBuf> {
    Ok(testbed::find_recording(dir)?)
}

/// How a working set is recorded: `serve` and `vm restore` alike.
#[derive(clap::Args, Debug, Clone)]
pub struct RecordingArgs {
    /// Stop recording this many milliseconds after the VM's session started
    /// (0: when the session ends, or when the operator ends the window:
    /// SIGUSR1 to `serve`; `vm restore` ends it when the guest has finished
    /// its passes).
    #[arg(long, default_value_t = 0)]
    pub record_window_ms: u64,
    /// `exact`: only pages the guest touched are recorded (while recording,
    /// pages with data are not mapped around faults, so each one touched
    /// faults: slower). `fast`: fault-around goes on, and the pages it maps
    /// are recorded too, touched or not.
    #[arg(long, default_value = "exact", value_parser = ["exact", "fast"])]
    pub record_mode: String,
}

impl Default for RecordingArgs {
    fn default() -> Self {
        RecordingArgs {
            record_window_ms: 0,
            record_mode: "exact".into(),
        }
    }
}

impl RecordingArgs {
    /// The engine's recording configuration.
    pub fn config(&self) -> pager::RecordConfig {
        pager::RecordConfig {
            window: (self.record_window_ms > 0)
                .then(|| Duration::from_millis(self.record_window_ms)),
            exact: self.record_mode == "exact",
        }
    }
}
