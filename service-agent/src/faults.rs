//! What is failing now, by kind: the agent's own operations (writing the
//! maps, rolling a write back, resetting counters, collecting conntrack
//! garbage, reading node addresses, watching the API) report each attempt
//! here. A failure is counted (`sync_errors_total{kind}`), logged once per
//! distinct message, kept until the next attempt of the same operation
//! succeeds, and while kept it turns `/healthz` to 503 and is listed in the
//! status file. Refusals of bad input (a manifest that does not parse, a
//! Service the planner rejects) are not faults: the operator of the node
//! cannot fix them, and they are reported on the object instead.
use std::{
    collections::BTreeMap,
    sync::Mutex,
    time::{SystemTime, UNIX_EPOCH},
};

use prometheus_client::{
    encoding::EncodeLabelSet,
    metrics::{counter::Counter, family::Family},
};
use serde::{Deserialize, Serialize};
use tracing::{error, info};

use crate::dataplane::writer::ApplyReport;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FaultKind {
    /// A frontend could not be written or removed; it keeps its previous state.
    Apply,
    /// Undoing a failed frontend write failed too.
    Rollback,
    /// Zeroing the counters of a removed frontend's svc_id failed.
    StatsReset,
    /// Removing the UDP flows of a removed backend failed.
    ConntrackFlush,
    /// Walking CONNTRACK or removing expired entries failed.
    ConntrackGc,
    /// Listing or writing the node's addresses failed; NODE_ADDRS keeps its last set.
    NodeAddrs,
    /// An API watch failed (it retries with backoff and relists).
    Watch,
    /// The status file could not be written.
    StatusFile,
    /// A healthCheckNodePort could not be served.
    HealthCheck,
    /// Host sockets of removed backends could not be ended.
    SockDestroy,
}

impl FaultKind {
    pub const ALL: [FaultKind; 10] = [
        FaultKind::Apply,
        FaultKind::Rollback,
        FaultKind::StatsReset,
        FaultKind::ConntrackFlush,
        FaultKind::ConntrackGc,
        FaultKind::NodeAddrs,
        FaultKind::Watch,
        FaultKind::StatusFile,
        FaultKind::HealthCheck,
        FaultKind::SockDestroy,
    ];

    /// The `kind` label value.
    pub fn name(self) -> &'static str {
        match self {
            FaultKind::Apply => "apply",
            FaultKind::Rollback => "rollback",
            FaultKind::StatsReset => "stats_reset",
            FaultKind::ConntrackFlush => "conntrack_flush",
            FaultKind::ConntrackGc => "conntrack_gc",
            FaultKind::NodeAddrs => "node_addrs",
            FaultKind::Watch => "watch",
            FaultKind::StatusFile => "status_file",
            FaultKind::HealthCheck => "health_check",
            FaultKind::SockDestroy => "sock_destroy",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: String,
}

/// One operation failing now, as the status file and `/healthz` show it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Failing {
    pub kind: String,
    /// What the operation was on (a watched resource, a map), or empty.
    pub subject: String,
    pub message: String,
    /// Unix time of the first failure of this run of failures.
    pub since_unix: u64,
}

/// A failure kept: its message, since when, and until when without a new
/// error (None: until the next success).
#[derive(Debug)]
struct Kept {
    message: String,
    since: SystemTime,
    until: Option<SystemTime>,
}

#[derive(Debug)]
pub struct Faults {
    counter: Family<KindLabel, Counter>,
    failing: Mutex<BTreeMap<(FaultKind, String), Kept>>,
}

impl Default for Faults {
    fn default() -> Self {
        let counter = Family::<KindLabel, Counter>::default();
        // Every kind is exported from the start, at zero: a rate over a
        // series that appears only with its first error misses that error.
        for k in FaultKind::ALL {
            drop(counter.get_or_create(&label(k)));
        }
        Self {
            counter,
            failing: Mutex::default(),
        }
    }
}

fn label(kind: FaultKind) -> KindLabel {
    KindLabel {
        kind: kind.name().into(),
    }
}

fn what(kind: FaultKind, subject: &str) -> String {
    if subject.is_empty() {
        kind.name().to_string()
    } else {
        format!("{} {subject}", kind.name())
    }
}

impl Faults {
    /// The counter family, for registering.
    pub fn counter(&self) -> Family<KindLabel, Counter> {
        self.counter.clone()
    }

    /// How many failures of `kind` were counted.
    pub fn count(&self, kind: FaultKind) -> u64 {
        self.counter.get_or_create(&label(kind)).get()
    }

    /// An attempt of `kind` on `subject` failed with `errors` (one count
    /// each); no errors: it succeeded, which ends a failure kept for it.
    pub fn record(&self, kind: FaultKind, subject: &str, errors: &[String]) {
        self.record_held(kind, subject, errors, None);
    }

    /// As [`Faults::record`], for an operation whose success may go
    /// unseen (a watch that reconnects quietly yields nothing): the
    /// failure also ends `hold` after its last error.
    pub fn record_held(
        &self,
        kind: FaultKind,
        subject: &str,
        errors: &[String],
        hold: Option<std::time::Duration>,
    ) {
        if errors.is_empty() {
            self.succeeded(kind, subject);
            return;
        }
        let now = SystemTime::now();
        let until = hold.map(|h| now + h);
        self.counter
            .get_or_create(&label(kind))
            .inc_by(errors.len() as u64);
        let message = errors.join("; ");
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let key = (kind, subject.to_string());
        match failing.get_mut(&key) {
            Some(k) => {
                if k.message != message {
                    error!(kind = kind.name(), "{}: {message}", what(kind, subject));
                    k.message = message;
                }
                k.until = until;
            }
            None => {
                error!(kind = kind.name(), "{}: {message}", what(kind, subject));
                let since = now;
                failing.insert(
                    key,
                    Kept {
                        message,
                        since,
                        until,
                    },
                );
            }
        }
    }

    pub fn failed(&self, kind: FaultKind, subject: &str, message: impl Into<String>) {
        self.record(kind, subject, &[message.into()]);
    }

    pub fn succeeded(&self, kind: FaultKind, subject: &str) {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        if failing.remove(&(kind, subject.to_string())).is_some() {
            info!(kind = kind.name(), "{}: recovered", what(kind, subject));
        }
    }

    /// Records the outcome of one attempt.
    pub fn outcome<E: std::fmt::Display>(&self, kind: FaultKind, subject: &str, r: Result<(), E>) {
        match r {
            Ok(()) => self.succeeded(kind, subject),
            Err(e) => self.failed(kind, subject, e.to_string()),
        }
    }

    /// Records what one sync's operations met. Each sync is the next
    /// attempt of all of them: a kind without an error this time has
    /// recovered.
    pub fn record_sync(&self, report: &ApplyReport, sock_destroy: &[String], health: &[String]) {
        self.record(FaultKind::Apply, "", &report.errors);
        for kind in [
            FaultKind::Rollback,
            FaultKind::StatsReset,
            FaultKind::ConntrackFlush,
        ] {
            let errors: Vec<String> = (report.faults.iter())
                .filter(|(k, _)| *k == kind)
                .map(|(_, e)| e.clone())
                .collect();
            self.record(kind, "", &errors);
        }
        self.record(FaultKind::SockDestroy, "", sock_destroy);
        self.record(FaultKind::HealthCheck, "", health);
    }

    /// What is failing now, by kind.
    pub fn failing(&self) -> Vec<Failing> {
        let mut failing = self.failing.lock().unwrap_or_else(|e| e.into_inner());
        let now = SystemTime::now();
        failing.retain(|(kind, subject), k| {
            let keep = k.until.is_none_or(|u| u > now);
            if !keep {
                info!(
                    kind = kind.name(),
                    "{}: no error since {}s, taken as recovered",
                    what(*kind, subject),
                    now.duration_since(k.since)
                        .map(|d| d.as_secs())
                        .unwrap_or(0)
                );
            }
            keep
        });
        failing
            .iter()
            .map(|((kind, subject), k)| Failing {
                kind: kind.name().into(),
                subject: subject.clone(),
                message: k.message.clone(),
                since_unix: k
                    .since
                    .duration_since(UNIX_EPOCH)
                    .map(|d| d.as_secs())
                    .unwrap_or(0),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_is_counted_kept_and_ended_by_the_next_success() {
        let f = Faults::default();
        assert_eq!(f.count(FaultKind::ConntrackGc), 0);
        f.record(
            FaultKind::ConntrackGc,
            "",
            &["walk: EIO".into(), "remove: EIO".into()],
        );
        f.failed(FaultKind::Watch, "services", "410 Gone");
        assert_eq!(f.count(FaultKind::ConntrackGc), 2);
        assert_eq!(f.count(FaultKind::Watch), 1);
        let now: Vec<_> = f.failing().into_iter().map(|x| x.kind).collect();
        assert_eq!(now, ["conntrack_gc", "watch"]);
        // Another subject's success does not end this one's failure.
        f.succeeded(FaultKind::Watch, "endpointslices");
        assert_eq!(f.failing().len(), 2);
        f.record(FaultKind::ConntrackGc, "", &[]);
        f.outcome::<String>(FaultKind::Watch, "services", Ok(()));
        assert!(f.failing().is_empty());
        // The counts stay: they are counters.
        assert_eq!(f.count(FaultKind::ConntrackGc), 2);
    }

    #[test]
    fn a_held_failure_ends_by_itself_when_no_error_renews_it() {
        let f = Faults::default();
        let hold = Some(std::time::Duration::from_millis(100));
        f.record_held(FaultKind::Watch, "node", &["reset".into()], hold);
        std::thread::sleep(std::time::Duration::from_millis(60));
        // A new error renews the hold.
        f.record_held(FaultKind::Watch, "node", &["reset".into()], hold);
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert_eq!(f.failing().len(), 1);
        std::thread::sleep(std::time::Duration::from_millis(60));
        assert!(f.failing().is_empty());
        assert_eq!(f.count(FaultKind::Watch), 2);
    }
}
