//! Where the cluster's objects come from. Both sources yield the same
//! k8s-openapi objects; no Kubernetes semantics are decided here.
pub mod kube;
pub mod manifest;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
};

use crate::model::ServiceId;

/// What changed since the agent last looked, noted by the watchers as
/// events arrive. Sets, so a burst of events about one object costs one
/// recompile, and memory stays bounded however fast events come.
#[derive(Debug, Default)]
pub struct Pending {
    pub services: BTreeSet<ServiceId>,
    pub files: BTreeSet<PathBuf>,
    /// Read everything again (a relist, a lost inotify queue, the node).
    pub everything: bool,
}

#[derive(Clone, Debug, Default)]
pub struct SharedPending(Arc<Mutex<Pending>>);

impl SharedPending {
    pub fn note(&self, f: impl FnOnce(&mut Pending)) {
        // A poisoned lock only means a watcher thread panicked mid-note;
        // the sets are still usable.
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        f(&mut p);
    }

    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
