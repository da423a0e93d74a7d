//! Conntrack garbage collection on a thread of its own, with its own
//! descriptors of the pinned maps: a pass walks the whole table (seconds of
//! syscalls at 500k flows), which on the agent's loop would hold back every
//! Service change queued behind it. The programs and the writer's UDP
//! flush change the table meanwhile; the kernel's map operations are
//! atomic per entry, and an entry gone under the walk is skipped.
use std::{path::PathBuf, sync::Arc, thread, time::Duration};

use tracing::info;

use crate::{
    dataplane::{
        tables::Tables,
        writer::{self, Lifetimes},
    },
    faults::FaultKind,
    metrics::Metrics,
};

/// The same clock as bpf_ktime_get_ns(), which stamps conntrack entries.
pub fn monotonic_ns() -> u64 {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC) {
        Ok(ts) => ts.tv_sec() as u64 * 1_000_000_000 + ts.tv_nsec() as u64,
        Err(_) => 0,
    }
}

/// Starts the GC thread: a pass every `period`, the first at once. Each
/// pass publishes CONNTRACK's entry count for `/metrics` and its outcome
/// as the `conntrack_gc` fault kind. The thread ends with the process.
pub fn spawn(
    pin_dir: PathBuf,
    lifetimes: Lifetimes,
    period: Duration,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut t = Tables::open_pinned(&pin_dir)?;
    thread::Builder::new()
        .name("conntrack-gc".into())
        .spawn(move || {
            loop {
                let pass = writer::expire_conntrack(&mut t, monotonic_ns(), &lifetimes);
                if pass.removed > 0 {
                    info!(expired = pass.removed, "conntrack entries expired");
                }
                metrics
                    .maps
                    .set_conntrack_entries(pass.entries.saturating_sub(pass.removed));
                metrics
                    .faults
                    .record(FaultKind::ConntrackGc, "", &pass.errors);
                thread::sleep(period);
            }
        })?;
    Ok(())
}
