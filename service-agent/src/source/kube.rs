//! The Kubernetes API source: kube-rs reflectors over Services,
//! EndpointSlices (joined to their Service by `kubernetes.io/service-name`)
//! and this node's Node object. The watchers relist on watch expiry (410
//! Gone) and disconnects with jittered exponential backoff, so deletes missed
//! while disconnected are caught by the relist; the agent reconciles the
//! whole state after every change (level-triggered).
use std::{path::Path, sync::Arc, time::Instant};

use anyhow::Context as _;
use futures::StreamExt as _;
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

use crate::model::{Cluster, Sourced};

/// The label carrying a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Builds a client from a kubeconfig file, or from the in-cluster service
/// account when `kubeconfig` is None.
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        None => Config::incluster()
            .context("no --kubeconfig and not running in a pod (KUBERNETES_SERVICE_HOST unset)")?,
    };
    Ok(Client::try_from(config)?)
}

/// Reflector stores kept current by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    /// Time of the last event seen, for the programming-latency metric.
    pub last_event: watch::Receiver<Option<Instant>>,
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: mpsc::Sender<()>,
    last_event: Arc<watch::Sender<Option<Instant>>>,
) -> Store<K>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + serde::de::DeserializeOwned
        + Send
        + Sync
        + 'static,
{
    let (reader, writer) = reflector::store();
    let stream = reflector(writer, watcher(api, config).default_backoff());
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(_) => {
                    let _ = last_event.send(Some(Instant::now()));
                    let _ = changed.try_send(());
                }
                // The watcher backs off and relists by itself; the stores
                // keep their last contents meanwhile, and so do the maps.
                Err(e) => warn!(resource = what, "watch failed, retrying: {e}"),
            }
        }
    });
    reader
}

use kube::runtime::reflector::reflector;

impl KubeSource {
    /// Starts the watchers. `changed` gets a message after every event.
    pub fn start(client: Client, node_name: Option<&str>, changed: mpsc::Sender<()>) -> Self {
        let (tx, last_event) = watch::channel(None);
        let tx = Arc::new(tx);
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "services",
            changed.clone(),
            tx.clone(),
        );
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(crate::model::SERVICE_NAME_LABEL),
            "endpointslices",
            changed.clone(),
            tx.clone(),
        );
        let node_filter = format!("metadata.name={}", node_name.unwrap_or(""));
        let node = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_filter),
            "node",
            changed,
            tx,
        );
        Self {
            services,
            slices,
            node,
            last_event,
        }
    }

    /// Waits until every initial list is complete: nothing is programmed
    /// from a half-listed cluster (kube-proxy waits the same way).
    pub async fn wait_until_synced(&self) -> anyhow::Result<()> {
        let started = Instant::now();
        self.services.wait_until_ready().await?;
        self.slices.wait_until_ready().await?;
        self.node.wait_until_ready().await?;
        info!(
            services = self.services.state().len(),
            endpointslices = self.slices.state().len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "initial lists complete"
        );
        Ok(())
    }

    /// The cluster as the stores have it now.
    pub fn cluster(&self) -> Cluster {
        Cluster {
            services: self
                .services
                .state()
                .iter()
                .map(|s| Sourced::new("api", (**s).clone()))
                .collect(),
            endpoint_slices: self
                .slices
                .state()
                .iter()
                .map(|s| Sourced::new("api", (**s).clone()))
                .collect(),
            endpoints: vec![],
            pods: vec![],
        }
    }

    /// This node's zone label, if the Node object has one.
    pub fn node_zone(&self) -> Option<String> {
        self.node
            .state()
            .first()?
            .metadata
            .labels
            .as_ref()?
            .get(ZONE_LABEL)
            .cloned()
    }
}
