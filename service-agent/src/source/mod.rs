//! Where the cluster's objects come from. Both sources yield the same
//! k8s-openapi objects; no Kubernetes semantics are decided here.
pub mod kube;
pub mod manifest;

use std::{
    collections::BTreeSet,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::Instant,
};

use futures::future::BoxFuture;
use k8s_openapi::api::{core::v1::Service, discovery::v1::EndpointSlice};
use tokio::sync::mpsc;

use crate::{
    faults::Faults,
    model::{ServiceId, Sourced},
};

/// The Service objects of one Service id and the EndpointSlices the
/// planner should see for it.
pub type ServiceObjects = (Vec<Sourced<Service>>, Vec<Sourced<EndpointSlice>>);

/// A source of Services and endpoints, kept current by its own watchers,
/// which note in [`SharedPending`] what each event touched and wake the
/// agent.
pub trait Source: Send {
    /// Reads what changed (everything when `all`) and names the Services
    /// whose objects may differ; `None` stands for all of them.
    fn refresh(&mut self, pending: &Pending, all: bool) -> Option<BTreeSet<ServiceId>>;
    /// The periodic reread: like `refresh(pending, false)`, and a source
    /// that can miss an event (a file watch) also looks again at
    /// everything it reads, naming the Services that differ.
    fn resync(&mut self, pending: &Pending) -> BTreeSet<ServiceId> {
        self.refresh(pending, false).unwrap_or_else(|| self.ids())
    }

    /// Every Service id known (with Service objects or slices).
    fn ids(&self) -> BTreeSet<ServiceId>;

    fn objects(&self, id: &ServiceId) -> ServiceObjects;

    /// The slices that name no Service (the planner checks their addresses).
    fn unlabeled_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        vec![]
    }

    /// What could not be read, as last read.
    fn errors(&self) -> Vec<String> {
        vec![]
    }

    /// This node's zone, when the source knows the Node object.
    fn node_zone(&self) -> Option<String> {
        None
    }

    /// Resolves once the initial contents are complete: nothing is
    /// programmed from a half-read cluster.
    fn wait_until_synced(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async { Ok(()) })
    }
}

/// Where Services and endpoints come from.
#[derive(Clone, Debug)]
pub enum SourceConfig {
    /// A directory of manifests (the embedded default: no cluster needed).
    Manifests(PathBuf),
    /// The Kubernetes API, through a kubeconfig or the in-cluster account.
    Kube {
        kubeconfig: Option<PathBuf>,
        /// Replaces the server of the kubeconfig or of the in-cluster config.
        api_server: Option<http::Uri>,
    },
}

impl SourceConfig {
    /// Starts the source's watchers. `changed` gets a message after every
    /// change, and `pending` what the change touched; watch failures go to
    /// `faults`.
    pub async fn start(
        &self,
        node_name: Option<&str>,
        changed: mpsc::Sender<()>,
        pending: SharedPending,
        faults: Arc<Faults>,
    ) -> anyhow::Result<Box<dyn Source>> {
        Ok(match self {
            SourceConfig::Manifests(dir) => {
                Box::new(manifest::ManifestSource::watch(dir, changed, pending)?)
            }
            SourceConfig::Kube {
                kubeconfig,
                api_server,
            } => {
                let client = kube::client(kubeconfig.as_deref(), api_server.as_ref()).await?;
                Box::new(kube::KubeSource::start(
                    client, node_name, changed, pending, faults,
                ))
            }
        })
    }
}

/// What changed since the agent last looked, noted by the watchers as
/// events arrive. Sets, so a burst of events about one object costs one
/// recompile, and memory stays bounded however fast events come.
#[derive(Debug, Default)]
pub struct Pending {
    pub services: BTreeSet<ServiceId>,
    pub files: BTreeSet<PathBuf>,
    /// Read everything again (a relist, a lost inotify queue, the node).
    pub everything: bool,
    /// When the oldest of these changes was noted: where the time a change
    /// waits to be programmed starts (`/healthz`, the programming latency).
    pub first_noted: Option<Instant>,
}

#[derive(Clone, Debug, Default)]
pub struct SharedPending(Arc<Mutex<Pending>>);

impl SharedPending {
    pub fn note(&self, f: impl FnOnce(&mut Pending)) {
        // A poisoned lock only means a watcher thread panicked mid-note;
        // the sets are still usable.
        let mut p = self.0.lock().unwrap_or_else(|e| e.into_inner());
        p.first_noted.get_or_insert_with(Instant::now);
        f(&mut p);
    }

    /// When the oldest change not yet taken was noted.
    pub fn first_noted(&self) -> Option<Instant> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).first_noted
    }

    pub fn take(&self) -> Pending {
        std::mem::take(&mut *self.0.lock().unwrap_or_else(|e| e.into_inner()))
    }
}
