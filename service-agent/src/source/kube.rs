//! The Kubernetes API source: kube-rs watchers over Services and
//! EndpointSlices (joined to their Service by `kubernetes.io/service-name`),
//! kept packed in stores of our own (`store.rs`), and a reflector over this
//! node's Node object. The watchers relist on watch expiry (410 Gone) and
//! disconnects with jittered exponential backoff, so deletes missed while
//! disconnected are caught by the relist. Each event names the Services it
//! touches (an EndpointSlice: the Service it belonged to and the one it
//! belongs to now), so the agent recompiles only those; a completed relist
//! asks for everything.
mod lean;
mod store;

use std::{collections::BTreeSet, path::Path, sync::Arc, time::Instant};

use anyhow::Context as _;
use futures::{Stream, StreamExt as _, TryStreamExt as _, future::BoxFuture};
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
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::mpsc;
use tracing::{info, warn};

use self::lean::Lean;
use self::store::{Index, ServiceKeys, SliceIndex, Touched, Watched};
use super::{Pending, ServiceObjects, SharedPending, Source};
use crate::{
    faults::{FaultKind, Faults},
    model::{SERVICE_NAME_LABEL, ServiceId, trim},
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

/// Stores kept current by background tasks: Services and EndpointSlices
/// packed, the Node (one object, its labels only) in a reflector store.
pub struct KubeSource {
    services: Arc<Watched<Service, ServiceKeys>>,
    slices: Arc<Watched<EndpointSlice, SliceIndex>>,
    node: Store<Node>,
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
    mut on_item: impl FnMut(T) + Send + 'static,
) {
    tokio::spawn(async move {
        futures::pin_mut!(stream);
        while let Some(item) = stream.next().await {
            match item {
                Ok(item) => {
                    // An item after a failure means the watch is back.
                    wake.1.succeeded(FaultKind::Watch, what);
                    // The stores hold what the item says once this returns,
                    // and the wake comes after it.
                    on_item(item);
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

/// A watcher feeding a packed store, each object as `strip` leaves it;
/// what each event touched goes to `pending`.
fn spawn_store<K, I>(
    api: Api<Lean<K>>,
    config: watcher::Config,
    what: &'static str,
    strip: fn(&mut K),
    wake: Wake,
    pending: SharedPending,
) -> Arc<Watched<K, I>>
where
    K: kube::Resource<DynamicType = ()>
        + Clone
        + std::fmt::Debug
        + Serialize
        + DeserializeOwned
        + Send
        + Sync
        + 'static,
    Lean<K>: DeserializeOwned,
    I: Index<K> + Send + Sync + 'static,
{
    let store = Arc::new(Watched::default());
    // The watcher lists in pages and passes each object on as it reads
    // it: each is packed as it comes, so at most a page is ever held as
    // structs, even in the first list.
    let stream = watcher(api, config)
        .default_backoff()
        .map_ok(lean::unwrap)
        .modify(strip);
    let writer = store.clone();
    drive(stream, what, wake, move |event| {
        match writer.handle(event) {
            Touched::Nothing => {}
            Touched::Services(ids) => pending.note(|p| p.services.extend(ids)),
            Touched::Everything => pending.note(|p| p.everything = true),
        }
    });
    store
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
        let services = spawn_store(
            Api::<Lean<Service>>::all(client.clone()),
            watcher::Config::default(),
            "services",
            trim::service,
            wake.clone(),
            pending.clone(),
        );
        let slices = spawn_store(
            Api::<Lean<EndpointSlice>>::all(client.clone()),
            watcher::Config::default().labels(SERVICE_NAME_LABEL),
            "endpointslices",
            trim::endpoint_slice,
            wake.clone(),
            pending,
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
            self.services.wait_until_synced().await;
            self.slices.wait_until_synced().await;
            self.node.wait_until_ready().await?;
            info!(
                services = self.services.len(),
                endpointslices = self.slices.len(),
                elapsed_ms = started.elapsed().as_millis() as u64,
                "initial lists complete"
            );
            Ok(())
        })
    }

    /// Every Service id the stores know (Services and slices' Services).
    fn ids(&self) -> BTreeSet<ServiceId> {
        let mut ids: BTreeSet<ServiceId> = self.services.ids().into_iter().collect();
        ids.extend(self.slices.ids());
        ids
    }

    /// The Service `id` and its EndpointSlices, as the stores have them now.
    fn objects(&self, id: &ServiceId) -> ServiceObjects {
        (
            self.services.service(id).into_iter().collect(),
            self.slices.of_service(id),
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
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::TOPOLOGY_MODE_ANNOTATIONS;

    fn named<K: kube::Resource>(mut object: K, name: &str) -> K {
        object.meta_mut().namespace = Some("ns".into());
        object.meta_mut().name = Some(name.into());
        object
    }

    fn slice_of(name: &str, service: &str) -> EndpointSlice {
        let mut slice = named(EndpointSlice::default(), name);
        slice.metadata.labels = Some(BTreeMap::from([(
            SERVICE_NAME_LABEL.to_string(),
            service.to_string(),
        )]));
        slice
    }

    #[test]
    fn a_service_comes_with_its_slices_and_ids_name_every_service_known() {
        let source = KubeSource {
            services: Arc::default(),
            slices: Arc::default(),
            node: reflector::store().0,
        };
        source.services.handle(watcher::Event::Init);
        for name in ["a", "b"] {
            let svc = named(Service::default(), name);
            source.services.handle(watcher::Event::InitApply(svc));
        }
        source.services.handle(watcher::Event::InitDone);
        source.slices.handle(watcher::Event::Init);
        for (name, service) in [("a-2", "a"), ("a-1", "a"), ("c-1", "c")] {
            let slice = slice_of(name, service);
            source.slices.handle(watcher::Event::InitApply(slice));
        }
        source.slices.handle(watcher::Event::InitDone);
        let id = |n: &str| ServiceId::new("ns", n);
        assert_eq!(
            source.ids(),
            BTreeSet::from([id("a"), id("b"), id("c")]),
            "a slice's Service counts before its Service arrives"
        );
        let (services, slices) = source.objects(&id("a"));
        assert_eq!(services.len(), 1);
        assert_eq!(services[0].origin, "api");
        let names: Vec<_> = slices.iter().map(|s| s.object.name_any()).collect();
        assert_eq!(names, ["a-1", "a-2"]);
        let (services, slices) = source.objects(&id("c"));
        assert!(services.is_empty());
        assert_eq!(slices.len(), 1);
    }

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
