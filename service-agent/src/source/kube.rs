//! The Kubernetes API source: kube-rs reflectors over Services,
//! EndpointSlices (joined to their Service by `kubernetes.io/service-name`)
//! and this node's Node object. The watchers relist on watch expiry (410
//! Gone) and disconnects with jittered exponential backoff, so deletes missed
//! while disconnected are caught by the relist. Each event names the
//! Services it touches (an EndpointSlice: the Service it belonged to and the
//! one it belongs to now), so the agent recompiles only those; a completed
//! relist asks for everything.
use std::{
    collections::{BTreeSet, HashMap},
    path::Path,
    sync::{Arc, Mutex},
    time::Instant,
};

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

use super::SharedPending;
use crate::{
    model::{Cluster, Sourced},
    plan::ServiceId,
};

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
    slice_index: Arc<Mutex<SliceIndex>>,
    /// Time of the last event seen, for the programming-latency metric.
    pub last_event: watch::Receiver<Option<Instant>>,
}

/// Which Service each EndpointSlice belongs to, kept from the events: the
/// store answers "this slice", the agent asks "the slices of this Service".
#[derive(Default)]
struct SliceIndex {
    /// (namespace, slice name) → its Service.
    owner: HashMap<(String, String), ServiceId>,
    by_service: HashMap<ServiceId, BTreeSet<String>>,
}

impl SliceIndex {
    /// Files `slice` under its Service; returns the Service it had before.
    fn put(&mut self, slice: &EndpointSlice) -> Option<ServiceId> {
        let key = slice_key(slice);
        let old = self.remove(&key);
        if let Some(id) = ServiceId::of_slice(slice) {
            self.by_service
                .entry(id.clone())
                .or_default()
                .insert(key.1.clone());
            self.owner.insert(key, id);
        }
        old
    }

    fn remove(&mut self, key: &(String, String)) -> Option<ServiceId> {
        let old = self.owner.remove(key)?;
        if let Some(names) = self.by_service.get_mut(&old) {
            names.remove(&key.1);
            if names.is_empty() {
                self.by_service.remove(&old);
            }
        }
        Some(old)
    }
}

fn slice_key(slice: &EndpointSlice) -> (String, String) {
    let m = &slice.metadata;
    (
        m.namespace.clone().unwrap_or_else(|| "default".into()),
        m.name.clone().unwrap_or_default(),
    )
}

fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    changed: mpsc::Sender<()>,
    last_event: Arc<watch::Sender<Option<Instant>>>,
    mut on_event: impl FnMut(&watcher::Event<K>, &Store<K>) + Send + 'static,
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
    let store = reader.clone();
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(event) = stream.next().await {
            match event {
                Ok(event) => {
                    // The store already holds what the event says.
                    on_event(&event, &store);
                    let _ = last_event.send(Some(Instant::now()));
                    let _ = changed.try_send(());
                }
                // The watcher backs off and relists by itself; the stores
                // keep their last contents meanwhile, and so do the maps.
                Err(e) => warn!(
                    resource = what,
                    "watch failed, retrying: {}",
                    crate::error_chain::error_chain(&e)
                ),
            }
        }
    });
    reader
}

use kube::runtime::reflector::reflector;

impl KubeSource {
    /// Starts the watchers. `changed` gets a message after every event, and
    /// `pending` what the event touched.
    pub fn start(
        client: Client,
        node_name: Option<&str>,
        changed: mpsc::Sender<()>,
        pending: SharedPending,
    ) -> Self {
        let (tx, last_event) = watch::channel(None);
        let tx = Arc::new(tx);
        let p = pending.clone();
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "services",
            changed.clone(),
            tx.clone(),
            move |event, _| match event {
                watcher::Event::Apply(s) | watcher::Event::Delete(s) => p.note(|p| {
                    p.services.insert(ServiceId::of(&s.metadata));
                }),
                // A relist may have missed deletes: look at everything.
                watcher::Event::InitDone => p.note(|p| p.everything = true),
                watcher::Event::Init | watcher::Event::InitApply(_) => {}
            },
        );
        let slice_index = Arc::new(Mutex::new(SliceIndex::default()));
        let (p, index) = (pending.clone(), slice_index.clone());
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(crate::model::SERVICE_NAME_LABEL),
            "endpointslices",
            changed.clone(),
            tx.clone(),
            move |event, store| {
                let mut index = index.lock().unwrap_or_else(|e| e.into_inner());
                match event {
                    watcher::Event::Apply(s) => {
                        let old = index.put(s);
                        p.note(|p| {
                            p.services
                                .extend(old.into_iter().chain(ServiceId::of_slice(s)))
                        });
                    }
                    watcher::Event::Delete(s) => {
                        let old = index.remove(&slice_key(s));
                        p.note(|p| p.services.extend(old));
                    }
                    watcher::Event::InitDone => {
                        *index = SliceIndex::default();
                        for s in store.state() {
                            index.put(&s);
                        }
                        p.note(|p| p.everything = true);
                    }
                    watcher::Event::Init | watcher::Event::InitApply(_) => {}
                }
            },
        );
        let node_filter = format!("metadata.name={}", node_name.unwrap_or(""));
        // The Node matters for its zone only; the agent compares the zone
        // it reads at each sync and recompiles everything when it differs.
        let node = spawn_reflector(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_filter),
            "node",
            changed,
            tx,
            |_, _| {},
        );
        Self {
            services,
            slices,
            node,
            slice_index,
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

    /// Every Service id the stores know (Services and slices' Services).
    /// Rebuilds the slice index from the store first: at start the first
    /// full read may come before the event task has seen the initial list.
    pub fn ids(&self) -> BTreeSet<ServiceId> {
        {
            let mut index = self.slice_index.lock().unwrap_or_else(|e| e.into_inner());
            *index = SliceIndex::default();
            for s in self.slices.state() {
                index.put(&s);
            }
        }
        let mut ids: BTreeSet<ServiceId> = self
            .services
            .state()
            .iter()
            .map(|s| ServiceId::of(&s.metadata))
            .collect();
        let index = self.slice_index.lock().unwrap_or_else(|e| e.into_inner());
        ids.extend(index.by_service.keys().cloned());
        ids
    }

    /// The Service `id` and its EndpointSlices, as the stores have them now.
    pub fn objects(&self, id: &ServiceId) -> (Vec<Sourced<Service>>, Vec<Sourced<EndpointSlice>>) {
        let svc = self
            .services
            .get(&reflector::ObjectRef::new(&id.name).within(&id.namespace));
        let names: Vec<String> = self
            .slice_index
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .by_service
            .get(id)
            .map(|n| n.iter().cloned().collect())
            .unwrap_or_default();
        let slices = names
            .iter()
            .filter_map(|n| {
                self.slices
                    .get(&reflector::ObjectRef::new(n).within(&id.namespace))
            })
            // The index may run ahead of or behind the store by an event;
            // the event that caused it brings this Service back anyway.
            .filter(|s| ServiceId::of_slice(s).as_ref() == Some(id))
            .map(|s| Sourced::new("api", (*s).clone()))
            .collect();
        (
            svc.into_iter()
                .map(|s| Sourced::new("api", (*s).clone()))
                .collect(),
            slices,
        )
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
