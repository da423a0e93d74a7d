//! The API source's own store: what a kube-rs reflector store keeps,
//! driven by the same watcher events, but each object kept packed
//! (`model::packed`) rather than as a k8s-openapi struct. At 10,000
//! Services with 10-endpoint slices the structs are about 90 MiB, the
//! packed text a fifth of that; the agent reads an object only when its
//! Service changed. Beside the objects, an index of which Service each
//! belongs to, updated under the same lock, so the two never disagree.
use std::{
    collections::{HashMap, HashSet},
    sync::{Arc, RwLock, RwLockReadGuard, RwLockWriteGuard},
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::runtime::watcher;
use serde::{Serialize, de::DeserializeOwned};
use tokio::sync::watch;

use crate::model::{ServiceId, Sourced, packed::Packed};

/// The origin the objects carry (the planner names it in refusals).
const ORIGIN: &str = "api";

/// (namespace, name): what names an object of one kind. The shape of a
/// [`ServiceId`], so that a Service's key is its id and the ids handed to
/// the planner share the store's strings.
type ObjectKey = ServiceId;

fn object_key(meta: &ObjectMeta) -> ObjectKey {
    ServiceId::of(meta)
}

/// What a store keeps beside its objects, updated with them: which
/// Services an object belongs to, so that each event names the Services
/// it touches and the agent can ask for a Service's objects.
pub(super) trait Index<K>: Default {
    /// The Service the object is filed under, read before it is packed.
    fn owner(object: &K) -> Option<ServiceId>;
    /// Files the object `key` under `owner`; returns the Services touched.
    fn put(&mut self, key: &ObjectKey, owner: Option<ServiceId>) -> Vec<ServiceId>;
    /// Unfiles the object `key`; returns the Services touched.
    fn remove(&mut self, key: &ObjectKey) -> Vec<ServiceId>;
}

/// A Service's key is its id: nothing to keep.
#[derive(Default)]
pub(super) struct ServiceKeys;

impl Index<Service> for ServiceKeys {
    fn owner(_: &Service) -> Option<ServiceId> {
        None
    }

    fn put(&mut self, key: &ObjectKey, _: Option<ServiceId>) -> Vec<ServiceId> {
        vec![key.clone()]
    }

    fn remove(&mut self, key: &ObjectKey) -> Vec<ServiceId> {
        vec![key.clone()]
    }
}

/// Which Service each EndpointSlice belongs to (its
/// `kubernetes.io/service-name` label): the events say "this slice", the
/// agent asks "the slices of this Service".
#[derive(Default)]
pub(super) struct SliceIndex {
    /// (namespace, slice name) → its Service.
    owner: HashMap<ObjectKey, ServiceId>,
    /// A Service → its slices' names, sorted. A Vec: most Services have one
    /// slice, and a set's node would be ten times its size.
    by_service: HashMap<ServiceId, Vec<Arc<str>>>,
}

impl SliceIndex {
    fn unfile(&mut self, key: &ObjectKey) -> Option<ServiceId> {
        let old = self.owner.remove(key)?;
        if let Some(names) = self.by_service.get_mut(&old) {
            if let Ok(at) = names.binary_search(&key.name) {
                names.remove(at);
            }
            if names.is_empty() {
                self.by_service.remove(&old);
            }
        }
        Some(old)
    }
}

impl Index<EndpointSlice> for SliceIndex {
    fn owner(slice: &EndpointSlice) -> Option<ServiceId> {
        ServiceId::of_slice(slice)
    }

    /// The Service the slice belonged to and the one it belongs to now.
    fn put(&mut self, key: &ObjectKey, owner: Option<ServiceId>) -> Vec<ServiceId> {
        let old = self.unfile(key);
        if let Some(id) = &owner {
            let names = self.by_service.entry(id.clone()).or_default();
            if let Err(at) = names.binary_search(&key.name) {
                names.insert(at, key.name.clone());
            }
            self.owner.insert(key.clone(), id.clone());
        }
        old.into_iter().chain(owner).collect()
    }

    fn remove(&mut self, key: &ObjectKey) -> Vec<ServiceId> {
        self.unfile(key).into_iter().collect()
    }
}

/// Objects of one kind, packed, and their index.
struct Table<K, I> {
    objects: HashMap<ObjectKey, Packed<K>>,
    index: I,
    /// Each namespace once: a cluster has thousands of objects to a
    /// namespace, and every key and owner names one.
    namespaces: HashSet<Arc<str>>,
}

impl<K, I: Default> Default for Table<K, I> {
    fn default() -> Self {
        Self {
            objects: HashMap::new(),
            index: I::default(),
            namespaces: HashSet::new(),
        }
    }
}

impl<K, I: Index<K>> Table<K, I> {
    fn put(
        &mut self,
        mut key: ObjectKey,
        packed: Packed<K>,
        mut owner: Option<ServiceId>,
    ) -> Vec<ServiceId> {
        key.namespace = self.intern(&key.namespace);
        // An owner is always in its object's namespace.
        if let Some(owner) = &mut owner {
            owner.namespace = self.intern(&owner.namespace);
        }
        let touched = self.index.put(&key, owner);
        self.objects.insert(key, packed);
        touched
    }

    fn intern(&mut self, namespace: &Arc<str>) -> Arc<str> {
        if let Some(known) = self.namespaces.get(namespace) {
            return known.clone();
        }
        self.namespaces.insert(namespace.clone());
        namespace.clone()
    }

    fn remove(&mut self, key: &ObjectKey) -> Vec<ServiceId> {
        self.objects.remove(key);
        self.index.remove(key)
    }
}

/// A watcher event with its object packed, ready to be applied under the
/// store's lock (packing, the costly part, is done before taking it).
enum Step<K> {
    Init,
    Put {
        key: ObjectKey,
        packed: Packed<K>,
        owner: Option<ServiceId>,
        /// Part of a relist (InitApply) rather than a change (Apply).
        relist: bool,
    },
    Remove(ObjectKey),
    InitDone,
}

impl<K> Step<K>
where
    K: kube::Resource + Serialize + DeserializeOwned,
{
    fn of<I: Index<K>>(event: watcher::Event<K>) -> Self {
        let put = |object: K, relist| {
            let key = object_key(object.meta());
            let owner = I::owner(&object);
            Step::Put {
                key,
                packed: Packed::pack(&Sourced::new(ORIGIN, object)),
                owner,
                relist,
            }
        };
        match event {
            watcher::Event::Init => Step::Init,
            watcher::Event::InitApply(object) => put(object, true),
            watcher::Event::Apply(object) => put(object, false),
            watcher::Event::Delete(object) => Step::Remove(object_key(object.meta())),
            watcher::Event::InitDone => Step::InitDone,
        }
    }
}

/// What an event means for the agent's next sync.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Touched {
    Nothing,
    Services(Vec<ServiceId>),
    /// A relist completed: it may have missed deletes, look at everything.
    Everything,
}

/// The objects of one kind as the watcher's events describe them: the
/// state of a kube-rs reflector store, packed.
struct PackedStore<K, I> {
    live: Table<K, I>,
    /// The relist in progress (from Init to InitDone): it replaces `live`
    /// whole when complete, so objects it lacks (deleted while the watch
    /// was down) go with it, and until then `live` is served as it was.
    relist: Option<Table<K, I>>,
}

impl<K, I: Default> Default for PackedStore<K, I> {
    fn default() -> Self {
        Self {
            live: Table::default(),
            relist: None,
        }
    }
}

impl<K, I: Index<K>> PackedStore<K, I> {
    fn apply(&mut self, step: Step<K>) -> Touched {
        match step {
            // A restarted relist starts over: what an abandoned one read
            // may be stale.
            Step::Init => {
                self.relist = Some(Table::default());
                Touched::Nothing
            }
            Step::Put {
                key,
                packed,
                owner,
                relist: true,
            } => {
                let table = self.relist.get_or_insert_with(Table::default);
                table.put(key, packed, owner);
                Touched::Nothing
            }
            Step::Put {
                key,
                packed,
                owner,
                relist: false,
            } => Touched::Services(self.live.put(key, packed, owner)),
            Step::Remove(key) => Touched::Services(self.live.remove(&key)),
            Step::InitDone => {
                if let Some(table) = self.relist.take() {
                    self.live = table;
                }
                Touched::Everything
            }
        }
    }
}

/// A store shared between its watcher task (the writer) and the agent's
/// syncs (the readers), with the first complete list signalled.
pub(super) struct Watched<K, I> {
    store: RwLock<PackedStore<K, I>>,
    /// True from the first InitDone on.
    synced: watch::Sender<bool>,
}

impl<K, I: Default> Default for Watched<K, I> {
    fn default() -> Self {
        Self {
            store: RwLock::new(PackedStore::default()),
            synced: watch::Sender::new(false),
        }
    }
}

impl<K, I> Watched<K, I>
where
    K: kube::Resource + Serialize + DeserializeOwned,
    I: Index<K>,
{
    pub(super) fn handle(&self, event: watcher::Event<K>) -> Touched {
        let step = Step::of::<I>(event);
        let done = matches!(step, Step::InitDone);
        let touched = self.write().apply(step);
        if done {
            self.synced.send_replace(true);
        }
        touched
    }

    fn read(&self) -> RwLockReadGuard<'_, PackedStore<K, I>> {
        // A poisoned lock only means a writer panicked between two
        // complete updates of the maps; what is there is usable.
        self.store.read().unwrap_or_else(|e| e.into_inner())
    }

    fn write(&self) -> RwLockWriteGuard<'_, PackedStore<K, I>> {
        self.store.write().unwrap_or_else(|e| e.into_inner())
    }

    pub(super) async fn wait_until_synced(&self) {
        let mut synced = self.synced.subscribe();
        // The sender lives as long as `self`: the wait ends only by a sync.
        let _ = synced.wait_for(|s| *s).await;
    }

    pub(super) fn len(&self) -> usize {
        self.read().live.objects.len()
    }
}

impl Watched<Service, ServiceKeys> {
    pub(super) fn ids(&self) -> Vec<ServiceId> {
        let store = self.read();
        store.live.objects.keys().cloned().collect()
    }

    pub(super) fn service(&self, id: &ServiceId) -> Option<Sourced<Service>> {
        self.read().live.objects.get(id).map(Packed::unpack)
    }
}

impl Watched<EndpointSlice, SliceIndex> {
    /// The Services that have slices.
    pub(super) fn ids(&self) -> Vec<ServiceId> {
        self.read().live.index.by_service.keys().cloned().collect()
    }

    /// The slices of Service `id`, in name order.
    pub(super) fn of_service(&self, id: &ServiceId) -> Vec<Sourced<EndpointSlice>> {
        let store = self.read();
        let Some(names) = store.live.index.by_service.get(id) else {
            return vec![];
        };
        names
            .iter()
            .filter_map(|name| {
                let key = ServiceId {
                    namespace: id.namespace.clone(),
                    name: name.clone(),
                };
                store.live.objects.get(&key).map(Packed::unpack)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, time::Duration};

    use k8s_openapi::api::{core::v1::ServiceSpec, discovery::v1::Endpoint};
    use watcher::Event;

    use super::*;
    use crate::model::SERVICE_NAME_LABEL;

    fn svc(name: &str, cluster_ip: &str) -> Service {
        Service {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(cluster_ip.into()),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    fn slice(name: &str, service: &str, addr: &str) -> EndpointSlice {
        EndpointSlice {
            metadata: ObjectMeta {
                namespace: Some("ns".into()),
                name: Some(name.into()),
                labels: Some(BTreeMap::from([(
                    SERVICE_NAME_LABEL.to_string(),
                    service.to_string(),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(vec![Endpoint {
                addresses: vec![addr.into()],
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    fn id(name: &str) -> ServiceId {
        ServiceId::new("ns", name)
    }

    fn touched(names: &[&str]) -> Touched {
        Touched::Services(names.iter().map(|n| id(n)).collect())
    }

    /// The Services held, by name, with their cluster IPs.
    fn services(store: &Watched<Service, ServiceKeys>) -> Vec<(String, String)> {
        let mut held: Vec<(String, String)> = store
            .ids()
            .iter()
            .map(|i| {
                let s = store.service(i).expect("an id names a held Service").object;
                (i.name.to_string(), s.spec.unwrap().cluster_ip.unwrap())
            })
            .collect();
        held.sort();
        held
    }

    /// The slices of Service `name`, by name, with their first address.
    fn slices_of(store: &Watched<EndpointSlice, SliceIndex>, name: &str) -> Vec<(String, String)> {
        store
            .of_service(&id(name))
            .into_iter()
            .map(|s| {
                let first = s.object.endpoints.unwrap()[0].addresses[0].clone();
                (s.object.metadata.name.unwrap(), first)
            })
            .collect()
    }

    fn pairs(p: &[(&str, &str)]) -> Vec<(String, String)> {
        p.iter()
            .map(|(a, b)| (a.to_string(), b.to_string()))
            .collect()
    }

    #[test]
    fn the_first_list_is_served_only_once_complete() {
        let store = Watched::<Service, ServiceKeys>::default();
        assert_eq!(store.handle(Event::Init), Touched::Nothing);
        assert_eq!(
            store.handle(Event::InitApply(svc("a", "10.96.0.1"))),
            Touched::Nothing
        );
        assert_eq!(
            store.handle(Event::InitApply(svc("b", "10.96.0.2"))),
            Touched::Nothing
        );
        assert!(services(&store).is_empty(), "half a list is not served");
        assert!(!*store.synced.borrow());
        assert_eq!(store.handle(Event::InitDone), Touched::Everything);
        assert!(*store.synced.borrow());
        assert_eq!(
            services(&store),
            pairs(&[("a", "10.96.0.1"), ("b", "10.96.0.2")])
        );
        assert_eq!(store.len(), 2);
    }

    #[test]
    fn applies_and_deletes_change_the_live_objects_and_name_their_service() {
        let store = Watched::<Service, ServiceKeys>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("a", "10.96.0.1")));
        store.handle(Event::InitDone);
        assert_eq!(
            store.handle(Event::Apply(svc("b", "10.96.0.2"))),
            touched(&["b"])
        );
        assert_eq!(
            store.handle(Event::Apply(svc("a", "10.96.0.9"))),
            touched(&["a"])
        );
        assert_eq!(
            services(&store),
            pairs(&[("a", "10.96.0.9"), ("b", "10.96.0.2")])
        );
        assert_eq!(
            store.handle(Event::Delete(svc("a", "10.96.0.9"))),
            touched(&["a"])
        );
        assert_eq!(services(&store), pairs(&[("b", "10.96.0.2")]));
        assert!(store.service(&id("a")).is_none());
    }

    #[test]
    fn a_relist_replaces_the_contents_and_drops_what_it_lacks() {
        let store = Watched::<Service, ServiceKeys>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("a", "10.96.0.1")));
        store.handle(Event::InitApply(svc("b", "10.96.0.2")));
        store.handle(Event::InitDone);
        // The watch was down: `a` was deleted and `b` changed meanwhile.
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("b", "10.96.0.7")));
        store.handle(Event::InitApply(svc("c", "10.96.0.3")));
        // Until the relist is complete, the last contents are served.
        assert_eq!(
            services(&store),
            pairs(&[("a", "10.96.0.1"), ("b", "10.96.0.2")])
        );
        assert_eq!(store.handle(Event::InitDone), Touched::Everything);
        assert_eq!(
            services(&store),
            pairs(&[("b", "10.96.0.7"), ("c", "10.96.0.3")])
        );
    }

    #[test]
    fn an_interrupted_relist_starts_over() {
        let store = Watched::<Service, ServiceKeys>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("a", "10.96.0.1")));
        // The list failed after a page; the watcher lists again.
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("b", "10.96.0.2")));
        store.handle(Event::InitDone);
        assert_eq!(services(&store), pairs(&[("b", "10.96.0.2")]));
    }

    #[test]
    fn a_slice_moving_between_services_touches_both() {
        let store = Watched::<EndpointSlice, SliceIndex>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(slice("s1", "a", "10.1.0.1")));
        store.handle(Event::InitApply(slice("s2", "a", "10.1.0.2")));
        store.handle(Event::InitDone);
        assert_eq!(
            slices_of(&store, "a"),
            pairs(&[("s1", "10.1.0.1"), ("s2", "10.1.0.2")])
        );
        assert_eq!(
            store.handle(Event::Apply(slice("s1", "b", "10.1.0.5"))),
            touched(&["a", "b"])
        );
        assert_eq!(slices_of(&store, "a"), pairs(&[("s2", "10.1.0.2")]));
        assert_eq!(slices_of(&store, "b"), pairs(&[("s1", "10.1.0.5")]));
        let mut ids = store.ids();
        ids.sort();
        assert_eq!(ids, [id("a"), id("b")]);
        // A delete names the Service the slice was filed under.
        assert_eq!(
            store.handle(Event::Delete(slice("s2", "a", "10.1.0.2"))),
            touched(&["a"])
        );
        assert!(slices_of(&store, "a").is_empty());
        assert_eq!(store.ids(), [id("b")]);
    }

    #[test]
    fn a_relist_files_the_slices_again() {
        let store = Watched::<EndpointSlice, SliceIndex>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(slice("s1", "a", "10.1.0.1")));
        store.handle(Event::InitApply(slice("s2", "a", "10.1.0.2")));
        store.handle(Event::InitDone);
        store.handle(Event::Init);
        store.handle(Event::InitApply(slice("s1", "b", "10.1.0.1")));
        assert_eq!(slices_of(&store, "a").len(), 2, "served as it was");
        store.handle(Event::InitDone);
        assert!(slices_of(&store, "a").is_empty());
        assert_eq!(slices_of(&store, "b"), pairs(&[("s1", "10.1.0.1")]));
        assert_eq!(store.ids(), [id("b")]);
    }

    #[tokio::test]
    async fn synced_waits_for_the_first_complete_list() {
        let store = Watched::<Service, ServiceKeys>::default();
        store.handle(Event::Init);
        store.handle(Event::InitApply(svc("a", "10.96.0.1")));
        let early = tokio::time::timeout(Duration::from_millis(20), store.wait_until_synced());
        assert!(early.await.is_err(), "not synced before InitDone");
        store.handle(Event::InitDone);
        let done = tokio::time::timeout(Duration::from_secs(5), store.wait_until_synced());
        assert!(done.await.is_ok());
        // A later relist does not make it unsynced.
        store.handle(Event::Init);
        let again = tokio::time::timeout(Duration::from_secs(5), store.wait_until_synced());
        assert!(again.await.is_ok());
    }
}
