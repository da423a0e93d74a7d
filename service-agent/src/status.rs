//! What the agent knows beyond the maps (Service names, skipped Services,
//! problems), written to a JSON file beside the pins so that `list` can show
//! it without asking the agent. bpffs holds only BPF objects, hence a file
//! under the state directory.
use std::{
    fs,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

use crate::{faults::Failing, plan::Plan};

#[derive(Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Status {
    /// Frontend (as `list` prints it) → `namespace/name` and port name.
    pub frontends: Vec<FrontendStatus>,
    pub skipped: Vec<SkippedStatus>,
    pub problems: Vec<String>,
    /// The agent's own operations failing now (see `faults`); absent in
    /// files of agents before it.
    #[serde(default)]
    pub failing: Vec<Failing>,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct FrontendStatus {
    pub frontend: String,
    pub service: String,
    pub port_name: String,
}

#[derive(Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct SkippedStatus {
    pub service: String,
    pub reason: String,
}

impl Status {
    pub fn from_plan(plan: &Plan, extra_problems: &[String], failing: Vec<Failing>) -> Self {
        Self {
            frontends: plan
                .frontends
                .iter()
                .map(|(k, f)| FrontendStatus {
                    frontend: k.to_string(),
                    service: f.service.to_string(),
                    port_name: f.port_name.to_string(),
                })
                .collect(),
            skipped: plan
                .skipped
                .iter()
                .map(|s| SkippedStatus {
                    service: s.service.clone(),
                    reason: s.reason.clone(),
                })
                .collect(),
            problems: extra_problems
                .iter()
                .cloned()
                .chain(plan.problems.iter().map(|p| p.to_string()))
                .collect(),
            failing,
        }
    }
}

/// The state directory that goes with a pin directory, unless given.
pub fn default_state_dir(pin_dir: &Path) -> PathBuf {
    let tag: String = pin_dir
        .to_string_lossy()
        .trim_matches('/')
        .replace('/', "_");
    PathBuf::from("/run/service-agent").join(tag)
}

pub fn status_path(state_dir: &Path) -> PathBuf {
    state_dir.join("status.json")
}

/// Writes atomically (temp file + rename): readers never see half a file.
pub fn write(state_dir: &Path, status: &Status) -> std::io::Result<()> {
    fs::create_dir_all(state_dir)?;
    let tmp = state_dir.join(".status.json.tmp");
    // Streamed: the text for 10,000 frontends is megabytes the agent
    // need not hold.
    let mut out = std::io::BufWriter::new(fs::File::create(&tmp)?);
    serde_json::to_writer_pretty(&mut out, status)?;
    std::io::Write::flush(&mut out)?;
    drop(out);
    fs::rename(tmp, status_path(state_dir))
}

pub fn read(state_dir: &Path) -> Option<Status> {
    let bytes = fs::read(status_path(state_dir)).ok()?;
    serde_json::from_slice(&bytes).ok()
}
