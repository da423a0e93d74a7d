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
use futures::{Stream, StreamExt as _, future::BoxFuture};
use k8s_openapi::api::{
    core::v1::{Node, Service},
    discovery::v1::EndpointSlice,
};
use kube::{
    Api, Client, Config, ResourceExt,
    config::{KubeConfigOptions, Kubeconfig},
    runtime::{
        PredicateConfig, WatchStreamExt as _, predicates,
        reflector::{self, Store},
        watcher,
    },
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use super::{Pending, ServiceObjects, SharedPending, Source};
use crate::{
    faults::{FaultKind, Faults},
    model::{SERVICE_NAME_LABEL, ServiceId, Sourced, trim},
};

pub use crate::model::TRIGGER_TIME_ANNOTATION;

/// The label carrying a Node's zone.
pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";

/// Builds a client from a kubeconfig file, or from the in-cluster service
/// account when `kubeconfig` is None; `api_server` replaces the server
/// either names.
pub async fn client(
    kubeconfig: Option<&Path>,
    api_server: Option<&http::Uri>,
) -> anyhow::Result<Client> {
    let mut config = match (kubeconfig, api_server) {
        (Some(path), _) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("--kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("--kubeconfig {}", path.display()))?
        }
        // The service account's token and CA, without the environment's
        // address (which names the ClusterIP): the server is set below.
        (None, Some(_)) => Config::incluster_dns()
            .context("--api-server without --kubeconfig needs the pod's service account")?,
        (None, None) => Config::incluster().context(
            "no --kubeconfig and not running in a pod (KUBERNETES_SERVICE_HOST unset); \
             set --api-server or --kubeconfig",
        )?,
    };
    if let Some(url) = api_server {
        config.cluster_url = url.clone();
    }
    Ok(Client::try_from(config)?)
}

/// Reflector stores kept current by background tasks.
pub struct KubeSource {
    services: Store<Service>,
    slices: Store<EndpointSlice>,
    node: Store<Node>,
    slice_index: Arc<Mutex<SliceIndex>>,
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

/// How long a watch counts as failing after its last error when no event
/// shows it back: a watch that reconnects yields nothing until something
/// changes. Longer than the watcher's longest wait between attempts (30 s
/// of backoff, plus up to 30 s for a connection attempt to time out).
const WATCH_HOLD: std::time::Duration = std::time::Duration::from_secs(65);

/// Wakes the agent after each event a watcher passes on, and reports the
/// watchers' failures.
#[derive(Clone)]
struct Wake(mpsc::Sender<()>, Arc<Faults>);

/// Polls `stream` in a task, calling `on_item` for each item and waking the
/// agent after it.
fn drive<T: Send + 'static>(
    stream: impl Stream<Item = Result<T, watcher::Error>> + Send + 'static,
    what: &'static str,
    wake: Wake,
    mut on_item: impl FnMut(&T) + Send + 'static,
) {
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(item) => {
                    // An item after a failure means the watch is back.
                    wake.1.succeeded(FaultKind::Watch, what);
                    // The store already holds what the item says.
                    on_item(&item);
                    // Full: a wake is already queued, and it covers this item.
                    let _ = wake.0.try_send(());
                }
                // The watcher backs off and relists by itself; the stores
                // keep their last contents meanwhile, and so do the maps.
                Err(e) => {
                    let e = crate::error_chain::error_chain(&e);
                    warn!(resource = what, "watch failed, retrying: {e}");
                    (wake.1).record_held(FaultKind::Watch, what, &[e], Some(WATCH_HOLD));
                }
            }
        }
    });
}

/// A reflector whose store keeps each object as `strip` leaves it; every
/// event is passed to `on_event` once the store holds it.
fn spawn_reflector<K>(
    api: Api<K>,
    config: watcher::Config,
    what: &'static str,
    strip: fn(&mut K),
    wake: Wake,
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
    let stream = watcher(api, config)
        .default_backoff()
        .modify(strip)
        .reflect(writer);
    let store = reader.clone();
    drive(stream, what, wake, move |event| on_event(event, &store));
    reader
}

/// The Node matters for its labels only (the zone): its status (images,
/// conditions, heartbeats) is most of its size.
fn strip_node(node: &mut Node) {
    node.managed_fields_mut().clear();
    node.annotations_mut().clear();
    node.spec = None;
    node.status = None;
}

impl KubeSource {
    /// Starts the watchers. `changed` gets a message after every event, and
    /// `pending` what the event touched.
    pub fn start(
        client: Client,
        node_name: Option<&str>,
        changed: mpsc::Sender<()>,
        pending: SharedPending,
        faults: Arc<Faults>,
    ) -> Self {
        let wake = Wake(changed, faults);
        let p = pending.clone();
        let services = spawn_reflector(
            Api::<Service>::all(client.clone()),
            watcher::Config::default(),
            "services",
            trim::service,
            wake.clone(),
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
        let (p, index) = (pending, slice_index.clone());
        let slices = spawn_reflector(
            Api::<EndpointSlice>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            "endpointslices",
            trim::endpoint_slice,
            wake.clone(),
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
        // The agent compares the zone it reads at each sync and recompiles
        // everything when it differs; only a change of labels wakes it
        // (heartbeats would otherwise cost a sync each). A deleted Node
        // is seen at the next sync.
        let node_filter = format!("metadata.name={}", node_name.unwrap_or(""));
        let (reader, writer) = reflector::store();
        // The label filter lets few items through: the watch is known to
        // be back at any object it yields, before the filter.
        let faults = wake.1.clone();
        let stream = watcher(
            Api::<Node>::all(client),
            watcher::Config::default().fields(&node_filter),
        )
        .default_backoff()
        .modify(strip_node)
        .reflect(writer)
        .touched_objects()
        .inspect(move |item| {
            if item.is_ok() {
                faults.succeeded(FaultKind::Watch, "node");
            }
        })
        .predicate_filter(predicates::labels, PredicateConfig::default());
        drive(stream, "node", wake, |_| {});
        Self {
            services,
            slices,
            node: reader,
            slice_index,
        }
    }
}

/// The stores are current: a sync reads the Services the events named.
impl Source for KubeSource {
    fn refresh(&mut self, pending: &Pending, all: bool) -> Option<BTreeSet<ServiceId>> {
        (!all).then(|| pending.services.clone())
    }

    /// Waits until every initial list is complete (kube-proxy waits the
    /// same way).
    fn wait_until_synced(&self) -> BoxFuture<'_, anyhow::Result<()>> {
        Box::pin(async {
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
        })
    }

    /// Every Service id the stores know (Services and slices' Services).
    /// Rebuilds the slice index from the store first: at start the first
    /// full read may come before the event task has seen the initial list.
    fn ids(&self) -> BTreeSet<ServiceId> {
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
    fn objects(&self, id: &ServiceId) -> ServiceObjects {
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
    fn node_zone(&self) -> Option<String> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::TOPOLOGY_MODE_ANNOTATIONS;

    #[test]
    fn the_stores_keep_the_trigger_time_and_topology_annotations_only() {
        let mut slice = EndpointSlice::default();
        let a = slice.annotations_mut();
        a.insert(
            TRIGGER_TIME_ANNOTATION.into(),
            "2026-01-02T03:04:05Z".into(),
        );
        a.insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{}".into(),
        );
        trim::endpoint_slice(&mut slice);
        let kept: Vec<&str> = slice.annotations().keys().map(String::as_str).collect();
        assert_eq!(kept, [TRIGGER_TIME_ANNOTATION]);
        let mut svc = Service::default();
        let a = svc.annotations_mut();
        a.insert(TOPOLOGY_MODE_ANNOTATIONS[0].into(), "Auto".into());
        a.insert(
            "kubectl.kubernetes.io/last-applied-configuration".into(),
            "{}".into(),
        );
        trim::service(&mut svc);
        let kept: Vec<&str> = svc.annotations().keys().map(String::as_str).collect();
        assert_eq!(kept, [TOPOLOGY_MODE_ANNOTATIONS[0]]);
    }
}
