//! `snapshot`: this host as a machine file (DESIGN §7), read by the same
//! reader vfiod uses (`vfiod_host::snapshot`), so that the file describes
//! what vfiod would see.

use std::path::Path;

use vfiod_host::snapshot::{self, SnapshotError};

use crate::error::{Exit, Failure};
use crate::output::Output;

pub fn run(root: &Path, out: &Output) -> Result<Exit, Failure> {
    let (machine, warnings) = snapshot::take(root).map_err(failure)?;
    for warning in &warnings {
        out.warn(warning);
    }
    let text = snapshot::render(&machine).map_err(failure)?;
    if out.json {
        // Every field of a machine file is a plain value.
        out.print_json(&serde_json::to_value(&machine).unwrap_or_default())?;
    } else {
        out.print(&text)?;
    }
    Ok(Exit::Done)
}

fn failure(e: SnapshotError) -> Failure {
    match e {
        SnapshotError::Kernel(e) => Failure::local("Kernel", e.to_string()),
        SnapshotError::Format(_) => Failure::local("Snapshot", e.to_string()),
    }
}
