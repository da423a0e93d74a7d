//! Which Service and EndpointSlice objects a sync found changed, counted as
//! kube-proxy counts them (`sync_proxy_rules_{service,endpoint}_changes_total`:
//! one per object added, updated or deleted), and the trigger times of the
//! changed slices, where `network_programming_duration_seconds` starts.
//! Both sources are covered alike: an object is compared with what the
//! last sync saw of it, by `resourceVersion` when it has one (the API
//! server's objects), else by its content (manifests).
use std::{
    collections::{HashMap, hash_map::DefaultHasher},
    hash::{Hash as _, Hasher as _},
    time::SystemTime,
};

use k8s_openapi::{
    api::{core::v1::Service, discovery::v1::EndpointSlice},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Serialize;

use crate::{
    model::{ServiceId, Sourced},
    source::kube::TRIGGER_TIME_ANNOTATION,
};

/// What the last sync saw of one Service id: a fingerprint of its Service
/// objects, and of each of its slices by (a hash of) its name, sorted. Kept
/// for every Service: as a map of names, a kilobyte each at 10,000.
#[derive(Default, PartialEq, Eq)]
struct Seen {
    services: Box<[u64]>,
    slices: Box<[(u64, u64)]>,
}

impl Seen {
    fn slice(&self, name: &str) -> Option<u64> {
        let k = name_hash(name);
        let i = self.slices.binary_search_by(|(n, _)| n.cmp(&k)).ok()?;
        Some(self.slices[i].1)
    }
}

fn name_hash(name: &str) -> u64 {
    let mut h = DefaultHasher::new();
    name.hash(&mut h);
    h.finish()
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Observed {
    pub service_changes: u64,
    pub endpoint_changes: u64,
    /// Trigger times of changed slices that carry one, from after `start`.
    pub triggers: Vec<SystemTime>,
}

pub struct ChangeTracker {
    seen: HashMap<ServiceId, Seen>,
    /// Trigger times before this are of changes made before the agent ran,
    /// which it never saw happen (kube-proxy ignores those too).
    start: SystemTime,
}

impl Default for ChangeTracker {
    fn default() -> Self {
        Self::new(SystemTime::now())
    }
}

fn fingerprint<T: Serialize>(meta: &ObjectMeta, object: &T) -> u64 {
    let mut h = DefaultHasher::new();
    match &meta.resource_version {
        Some(v) => v.hash(&mut h),
        None => serde_json::to_vec(object).unwrap_or_default().hash(&mut h),
    }
    h.finish()
}

/// The slice's trigger time, when it carries a valid one.
pub fn trigger_time(slice: &EndpointSlice) -> Option<SystemTime> {
    let v = slice
        .metadata
        .annotations
        .as_ref()?
        .get(TRIGGER_TIME_ANNOTATION)?;
    let t: k8s_openapi::jiff::Timestamp = v.parse().ok()?;
    Some(SystemTime::from(t))
}

impl ChangeTracker {
    pub fn new(start: SystemTime) -> Self {
        Self {
            seen: HashMap::new(),
            start,
        }
    }

    /// Compares the objects of `id` with the last sync's and remembers them.
    pub fn observe(
        &mut self,
        id: &ServiceId,
        services: &[Sourced<Service>],
        slices: &[Sourced<EndpointSlice>],
        out: &mut Observed,
    ) {
        let now = Seen {
            services: services
                .iter()
                .map(|s| fingerprint(&s.object.metadata, &s.object))
                .collect(),
            slices: {
                let mut v: Vec<(u64, u64)> = slices
                    .iter()
                    .map(|s| {
                        let m = &s.object.metadata;
                        let name = m.name.as_deref().unwrap_or_default();
                        (name_hash(name), fingerprint(m, &s.object))
                    })
                    .collect();
                v.sort_unstable();
                v.into_boxed_slice()
            },
        };
        let before = self.seen.remove(id).unwrap_or_default();
        if before.services != now.services {
            out.service_changes += 1;
        }
        for s in slices {
            let name = s.object.metadata.name.as_deref().unwrap_or_default();
            if before.slice(name) != now.slice(name) {
                out.endpoint_changes += 1;
                out.triggers
                    .extend(trigger_time(&s.object).filter(|t| *t >= self.start));
            }
        }
        let deleted = before
            .slices
            .iter()
            .filter(|(n, _)| now.slices.binary_search_by(|(m, _)| m.cmp(n)).is_err());
        out.endpoint_changes += deleted.count() as u64;
        if now != Seen::default() {
            self.seen.insert(id.clone(), now);
        }
    }

    /// After a full sync: the ids no longer known were deleted.
    pub fn forget_except(&mut self, known: &dyn Fn(&ServiceId) -> bool, out: &mut Observed) {
        self.seen.retain(|id, seen| {
            let keep = known(id);
            if !keep {
                out.service_changes += u64::from(!seen.services.is_empty());
                out.endpoint_changes += seen.slices.len() as u64;
            }
            keep
        });
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn svc(name: &str, port: i32, rv: Option<&str>) -> Sourced<Service> {
        let mut s: Service = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default"},
            "spec": {"ports": [{"port": port}]},
        }))
        .unwrap();
        s.metadata.resource_version = rv.map(str::to_string);
        Sourced::new("test", s)
    }

    fn slice(name: &str, addr: &str, trigger: Option<&str>) -> Sourced<EndpointSlice> {
        let mut s: EndpointSlice = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "default",
                         "labels": {"kubernetes.io/service-name": "web"}},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [addr]}],
        }))
        .unwrap();
        if let Some(t) = trigger {
            s.metadata.annotations = Some([(TRIGGER_TIME_ANNOTATION.to_string(), t.into())].into());
        }
        Sourced::new("test", s)
    }

    #[test]
    fn changes_are_counted_per_object_and_trigger_times_taken_from_changed_slices() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_767_225_600); // 2026-01-01
        let mut t = ChangeTracker::new(start);
        let id = ServiceId::new("default", "web");
        let mut o = Observed::default();
        let a = slice("web-a", "10.0.0.1", Some("2026-01-02T00:00:00Z"));
        let b = slice("web-b", "10.0.0.2", Some("2025-12-31T00:00:00Z"));
        t.observe(
            &id,
            &[svc("web", 80, None)],
            &[a.clone(), b.clone()],
            &mut o,
        );
        // b's trigger time is from before the start: not a sample.
        assert_eq!((o.service_changes, o.endpoint_changes), (1, 2));
        assert_eq!(o.triggers, [start + Duration::from_secs(86400)]);

        // Nothing changed: nothing counted, no sample from the old annotation.
        let mut o = Observed::default();
        t.observe(
            &id,
            &[svc("web", 80, None)],
            &[a.clone(), b.clone()],
            &mut o,
        );
        assert_eq!(o, Observed::default());

        // One slice changed, the other deleted; the Service changed.
        let mut o = Observed::default();
        let a2 = slice("web-a", "10.0.0.3", Some("2026-01-03T00:00:00+00:00"));
        t.observe(&id, &[svc("web", 81, None)], &[a2], &mut o);
        assert_eq!((o.service_changes, o.endpoint_changes), (1, 2));
        assert_eq!(o.triggers, [start + Duration::from_secs(2 * 86400)]);

        // The API server's objects are compared by resourceVersion.
        let mut o = Observed::default();
        t.observe(&id, &[svc("web", 81, Some("7"))], &[], &mut o);
        t.observe(&id, &[svc("web", 81, Some("7"))], &[], &mut o);
        assert_eq!((o.service_changes, o.endpoint_changes), (1, 1));

        let mut o = Observed::default();
        t.forget_except(&|_| false, &mut o);
        assert_eq!((o.service_changes, o.endpoint_changes), (1, 0));
    }
}
