//! Services and EndpointSlices read from the API server straight into the
//! fields `model::trim` keeps. Trimming after k8s-openapi has typed an
//! object comes too late for memory: the watcher types a whole list page
//! (500 objects) at once, and a typed object's `managedFields`,
//! `kubectl apply` annotation and status conditions are most of its heap.
//! Read through these types, what is not kept is skipped in the JSON
//! text and never allocated. `trim` still runs on the result, so the two
//! cannot drift apart by more than an unparsed field; a unit test holds
//! them equal on an object carrying everything a server sends.
use std::{borrow::Cow, collections::BTreeMap, fmt, marker::PhantomData};

use k8s_openapi::{
    api::{
        core::v1::{LoadBalancerStatus, Service, ServiceSpec, ServiceStatus},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time},
};
use serde::{
    Deserialize, Deserializer,
    de::{IgnoredAny, MapAccess, Visitor},
};

use crate::model::trim;

/// An object of kind `K` as the watcher reads it: `K` itself, filled from
/// the wire with only the fields the agent reads.
#[derive(Clone, Debug)]
pub(super) struct Lean<K>(pub K);

/// The API path and kind are `K`'s: the watcher lists and watches `K`.
impl<K: kube::Resource<DynamicType = ()>> kube::Resource for Lean<K> {
    type DynamicType = ();
    type Scope = K::Scope;

    fn kind(dt: &()) -> Cow<'_, str> {
        K::kind(dt)
    }

    fn group(dt: &()) -> Cow<'_, str> {
        K::group(dt)
    }

    fn version(dt: &()) -> Cow<'_, str> {
        K::version(dt)
    }

    fn plural(dt: &()) -> Cow<'_, str> {
        K::plural(dt)
    }

    fn meta(&self) -> &ObjectMeta {
        self.0.meta()
    }

    fn meta_mut(&mut self) -> &mut ObjectMeta {
        self.0.meta_mut()
    }
}

/// Which keys of a label or annotation map are read (one of `trim`'s).
trait Keep {
    const KEEP: fn(&str) -> bool;
}

#[derive(Default)]
struct ServiceLabels;
impl Keep for ServiceLabels {
    const KEEP: fn(&str) -> bool = trim::service_label;
}

#[derive(Default)]
struct ServiceAnnotations;
impl Keep for ServiceAnnotations {
    const KEEP: fn(&str) -> bool = trim::service_annotation;
}

#[derive(Default)]
struct SliceLabels;
impl Keep for SliceLabels {
    const KEEP: fn(&str) -> bool = trim::slice_label;
}

#[derive(Default)]
struct SliceAnnotations;
impl Keep for SliceAnnotations {
    const KEEP: fn(&str) -> bool = trim::slice_annotation;
}

/// A string map of which only the keys `P` keeps are read; the values of
/// the others (`last-applied-configuration` holds a whole object) are
/// skipped unread.
struct Kept<P>(BTreeMap<String, String>, PhantomData<P>);

impl<'de, P: Keep> Deserialize<'de> for Kept<P> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct KeptVisitor<P>(PhantomData<P>);
        impl<'de, P: Keep> Visitor<'de> for KeptVisitor<P> {
            type Value = Kept<P>;

            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a map of strings to strings")
            }

            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
                let mut kept = BTreeMap::new();
                while let Some(key) = map.next_key::<Cow<'de, str>>()? {
                    if P::KEEP(&key) {
                        kept.insert(key.into_owned(), map.next_value::<String>()?);
                    } else {
                        map.next_value::<IgnoredAny>()?;
                    }
                }
                Ok(Kept(kept, PhantomData))
            }
        }
        d.deserialize_map(KeptVisitor(PhantomData))
    }
}

/// The metadata `trim` keeps; `managedFields`, owner references and the
/// rest are skipped.
#[derive(Deserialize)]
#[serde(rename_all = "camelCase", bound(deserialize = "L: Keep, A: Keep"))]
struct MetaWire<L, A> {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    resource_version: Option<String>,
    #[serde(default)]
    creation_timestamp: Option<Time>,
    #[serde(default)]
    labels: Option<Kept<L>>,
    #[serde(default)]
    annotations: Option<Kept<A>>,
}

impl<L, A> Default for MetaWire<L, A> {
    fn default() -> Self {
        Self {
            name: None,
            namespace: None,
            resource_version: None,
            creation_timestamp: None,
            labels: None,
            annotations: None,
        }
    }
}

impl<L, A> From<MetaWire<L, A>> for ObjectMeta {
    fn from(m: MetaWire<L, A>) -> Self {
        ObjectMeta {
            name: m.name,
            namespace: m.namespace,
            resource_version: m.resource_version,
            creation_timestamp: m.creation_timestamp,
            labels: m.labels.map(|l| l.0),
            annotations: m.annotations.map(|a| a.0),
            ..Default::default()
        }
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ServiceStatusWire {
    #[serde(default)]
    load_balancer: Option<LoadBalancerStatus>,
}

#[derive(Deserialize)]
struct ServiceWire {
    #[serde(default)]
    metadata: Option<MetaWire<ServiceLabels, ServiceAnnotations>>,
    #[serde(default)]
    spec: Option<ServiceSpec>,
    #[serde(default)]
    status: Option<ServiceStatusWire>,
}

impl<'de> Deserialize<'de> for Lean<Service> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = ServiceWire::deserialize(d)?;
        Ok(Lean(Service {
            metadata: w.metadata.unwrap_or_default().into(),
            spec: w.spec,
            status: w
                .status
                .and_then(|s| s.load_balancer)
                .map(|lb| ServiceStatus {
                    load_balancer: Some(lb),
                    conditions: None,
                }),
        }))
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct SliceWire {
    #[serde(default)]
    metadata: Option<MetaWire<SliceLabels, SliceAnnotations>>,
    #[serde(default)]
    address_type: Option<String>,
    #[serde(default)]
    endpoints: Option<Vec<Endpoint>>,
    #[serde(default)]
    ports: Option<Vec<EndpointPort>>,
}

impl<'de> Deserialize<'de> for Lean<EndpointSlice> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let w = SliceWire::deserialize(d)?;
        Ok(Lean(EndpointSlice {
            metadata: w.metadata.unwrap_or_default().into(),
            address_type: w.address_type.unwrap_or_default(),
            endpoints: w.endpoints,
            ports: w.ports,
        }))
    }
}

/// The watcher's events for `Lean<K>`, as events for `K`.
pub(super) fn unwrap<K>(
    event: kube::runtime::watcher::Event<Lean<K>>,
) -> kube::runtime::watcher::Event<K> {
    use kube::runtime::watcher::Event;
    match event {
        Event::Apply(o) => Event::Apply(o.0),
        Event::Delete(o) => Event::Delete(o.0),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(o.0),
        Event::InitDone => Event::InitDone,
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::model::{TOPOLOGY_MODE_ANNOTATIONS, TRIGGER_TIME_ANNOTATION};

    /// What a server's list item carries beyond what the agent reads.
    fn server_meta(labels: serde_json::Value, annotations: serde_json::Value) -> serde_json::Value {
        json!({
            "name": "web",
            "namespace": "shop",
            "uid": "8c1b0b52-3f1e-4c8e-9f5e-2d7c1c2a9b10",
            "resourceVersion": "4711",
            "generation": 3,
            "creationTimestamp": "2026-01-02T03:04:05Z",
            "labels": labels,
            "annotations": annotations,
            "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": "web",
                                 "uid": "8c1b0b52-3f1e-4c8e-9f5e-2d7c1c2a9b10",
                                 "controller": true, "blockOwnerDeletion": true}],
            "finalizers": ["service.kubernetes.io/load-balancer-cleanup"],
            "managedFields": [{"manager": "kubectl", "operation": "Apply",
                               "apiVersion": "v1", "time": "2026-01-02T03:04:05Z",
                               "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:spec": {"f:ports": {"k:{\"port\":80}": {".": {}}}}}}]
        })
    }

    #[test]
    fn a_lean_service_is_what_trim_leaves_of_the_full_one() {
        let wire = json!({
            "metadata": server_meta(
                json!({"app": "web", "service.kubernetes.io/headless": ""}),
                json!({
                    TOPOLOGY_MODE_ANNOTATIONS[0]: "Auto",
                    "kubectl.kubernetes.io/last-applied-configuration": "{\"kind\":\"Service\"}",
                }),
            ),
            "spec": {"type": "LoadBalancer", "clusterIP": "10.96.0.10",
                     "ports": [{"name": "http", "port": 80, "targetPort": "http",
                                "nodePort": 30080, "protocol": "TCP"}],
                     "selector": {"app": "web"}, "sessionAffinity": "ClientIP",
                     "externalTrafficPolicy": "Local", "healthCheckNodePort": 31000},
            "status": {"loadBalancer": {"ingress": [{"ip": "192.0.2.7", "ipMode": "VIP"}]},
                       "conditions": [{"type": "Ready", "status": "True", "reason": "x",
                                       "message": "", "lastTransitionTime": "2026-01-02T03:04:05Z"}]}
        });
        let mut full: Service = serde_json::from_value(wire.clone()).unwrap();
        trim::service(&mut full);
        let lean: Lean<Service> = serde_json::from_value(wire).unwrap();
        assert_eq!(lean.0, full);
        assert!(lean.0.metadata.managed_fields.is_none());
        assert_eq!(
            lean.0.metadata.labels.unwrap().keys().collect::<Vec<_>>(),
            ["service.kubernetes.io/headless"]
        );
    }

    #[test]
    fn a_lean_endpoint_slice_is_what_trim_leaves_of_the_full_one() {
        let wire = json!({
            "kind": "EndpointSlice",
            "apiVersion": "discovery.k8s.io/v1",
            "metadata": server_meta(
                json!({"kubernetes.io/service-name": "web",
                       "endpointslice.kubernetes.io/managed-by": "endpointslice-controller.k8s.io"}),
                json!({TRIGGER_TIME_ANNOTATION: "2026-01-02T03:04:05Z"}),
            ),
            "addressType": "IPv4",
            "endpoints": [{"addresses": ["10.0.1.5"],
                           "conditions": {"ready": true, "serving": true, "terminating": false},
                           "nodeName": "node-1", "zone": "zone-a",
                           "hints": {"forZones": [{"name": "zone-a"}]},
                           "targetRef": {"kind": "Pod", "name": "web-1", "namespace": "shop",
                                         "uid": "0b7c1a2e-0000-4000-8000-000000000001"}}],
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]
        });
        let mut full: EndpointSlice = serde_json::from_value(wire.clone()).unwrap();
        trim::endpoint_slice(&mut full);
        let mut lean: Lean<EndpointSlice> = serde_json::from_value(wire).unwrap();
        // The watcher's `modify` finishes inside the endpoints.
        trim::endpoint_slice(&mut lean.0);
        assert_eq!(lean.0, full);
    }

    #[test]
    fn absent_and_null_fields_read_as_the_full_types_read_them() {
        for wire in [
            json!({}),
            json!({"metadata": null, "spec": null, "status": null}),
        ] {
            let mut full: Service = serde_json::from_value(wire.clone()).unwrap();
            trim::service(&mut full);
            let lean: Lean<Service> = serde_json::from_value(wire.clone()).unwrap();
            assert_eq!(lean.0, full, "{wire}");
        }
        let wire = json!({"metadata": {"labels": null}, "endpoints": null});
        let mut full: EndpointSlice = serde_json::from_value(wire.clone()).unwrap();
        trim::endpoint_slice(&mut full);
        let lean: Lean<EndpointSlice> = serde_json::from_value(wire).unwrap();
        assert_eq!(lean.0, full);
    }

    #[test]
    fn a_label_of_the_wrong_type_is_an_error_when_kept_and_skipped_when_not() {
        let bad = json!({"metadata": {"labels": {"kubernetes.io/service-name": 7}}});
        assert!(serde_json::from_value::<Lean<EndpointSlice>>(bad).is_err());
        let ignored = json!({"metadata": {"labels": {"other": 7}}});
        assert!(serde_json::from_value::<Lean<EndpointSlice>>(ignored).is_ok());
    }
}
