//! The manifest source: kubectl-style multi-document YAML files in a
//! directory, read into the same k8s-openapi types the API server yields.
//!
//! YAML goes through `serde_yaml_ng`, the maintained fork of the deprecated
//! `serde_yaml`; `serde_path_to_error` names the field a bad value sits in.
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;

use crate::model::{
    Cluster, ServiceId, Sourced, is_selectorless, mirror_endpoints, pod_namespace, pod_selector,
    slices_from_pods,
};

/// A manifest that could not be read, with the place it came from.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ManifestError {
    pub file: PathBuf,
    /// 1-based position of the YAML document in the file.
    pub document: Option<usize>,
    /// `Kind namespace/name` when known.
    pub object: Option<String>,
    /// Dotted path of the offending field, when known.
    pub field: Option<String>,
    pub message: String,
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(d) = self.document {
            write!(f, " document {d}")?;
        }
        if let Some(o) = &self.object {
            write!(f, " ({o})")?;
        }
        if let Some(field) = &self.field {
            write!(f, ": field {field}")?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Objects read from one file.
#[derive(Clone, Debug, Default)]
pub struct FileObjects {
    pub services: Vec<Sourced<Service>>,
    pub endpoint_slices: Vec<Sourced<EndpointSlice>>,
    pub endpoints: Vec<Sourced<Endpoints>>,
    pub pods: Vec<Sourced<Pod>>,
}

fn is_manifest(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    ) && !path
        .file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

/// The manifest files of a directory, sorted, non-recursive (like `kubectl apply -f DIR`).
pub fn list_manifest_files(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut files: Vec<PathBuf> = fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file() && is_manifest(p))
        .collect();
    files.sort();
    Ok(files)
}

/// Largest manifest file read; larger ones are refused rather than buffered.
pub const MAX_FILE_BYTES: u64 = 16 * 1024 * 1024;

fn typed<T: DeserializeOwned>(
    value: serde_yaml_ng::Value,
    err: impl Fn(Option<String>, String) -> ManifestError,
) -> Result<T, ManifestError> {
    serde_path_to_error::deserialize(value).map_err(|e| {
        let path = e.path().to_string();
        let field = (path != ".").then_some(path);
        err(field, e.into_inner().to_string())
    })
}

/// Reads one file. Any error rejects the whole file, so a half-read file
/// never reaches the dataplane.
pub fn parse_file(path: &Path) -> Result<FileObjects, ManifestError> {
    let err = |document: Option<usize>,
               object: Option<String>,
               field: Option<String>,
               message: String| {
        ManifestError {
            file: path.to_path_buf(),
            document,
            object,
            field,
            message,
        }
    };
    let size = fs::metadata(path)
        .map_err(|e| err(None, None, None, e.to_string()))?
        .len();
    if size > MAX_FILE_BYTES {
        return Err(err(
            None,
            None,
            None,
            format!("file is {size} bytes, over the {MAX_FILE_BYTES}-byte limit"),
        ));
    }
    let text = fs::read_to_string(path).map_err(|e| err(None, None, None, e.to_string()))?;
    parse_str(&text, &path.display().to_string()).map_err(|mut e| {
        e.file = path.to_path_buf();
        e
    })
}

/// Reads the documents of a manifest text; `name` labels the objects' origin.
pub fn parse_str(text: &str, name: &str) -> Result<FileObjects, ManifestError> {
    let mut out = FileObjects::default();
    let mut index = 0usize;
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        index += 1;
        let value: serde_yaml_ng::Value =
            serde::Deserialize::deserialize(doc).map_err(|e| ManifestError {
                file: PathBuf::from(name),
                document: Some(index),
                object: None,
                field: None,
                message: format!("not valid YAML: {e}"),
            })?;
        add_document(&mut out, value, name, index)?;
    }
    Ok(out)
}

fn str_field<'a>(v: &'a serde_yaml_ng::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|k| k.as_str())
}

fn add_document(
    out: &mut FileObjects,
    value: serde_yaml_ng::Value,
    name: &str,
    index: usize,
) -> Result<(), ManifestError> {
    if value.is_null() {
        return Ok(());
    }
    let kind = str_field(&value, "kind").map(str::to_string);
    let api_version = str_field(&value, "apiVersion").map(str::to_string);
    let meta = value.get("metadata");
    let obj_name = format!(
        "{}/{}",
        meta.and_then(|m| str_field(m, "namespace"))
            .unwrap_or("default"),
        meta.and_then(|m| str_field(m, "name"))
            .unwrap_or("<unnamed>")
    );
    let object = kind.as_ref().map(|k| format!("{k} {obj_name}"));
    let err = |field: Option<String>, message: String| ManifestError {
        file: PathBuf::from(name),
        document: Some(index),
        object: object.clone(),
        field,
        message,
    };
    let origin = format!("{name}#{index}");
    let (Some(kind), Some(api_version)) = (kind.clone(), api_version) else {
        return Err(err(
            Some(if kind.is_none() { "kind" } else { "apiVersion" }.into()),
            "missing: every document needs apiVersion and kind".into(),
        ));
    };
    match (api_version.as_str(), kind.as_str()) {
        ("v1", "List") => {
            let items = value
                .get("items")
                .and_then(|i| i.as_sequence())
                .cloned()
                .unwrap_or_default();
            for item in items {
                add_document(out, item, name, index)?;
            }
        }
        ("v1", "Service") => out.services.push(Sourced::new(origin, typed(value, err)?)),
        ("v1", "Pod") => out.pods.push(Sourced::new(origin, typed(value, err)?)),
        ("v1", "Endpoints") => out.endpoints.push(Sourced::new(origin, typed(value, err)?)),
        ("discovery.k8s.io/v1", "EndpointSlice") => out
            .endpoint_slices
            .push(Sourced::new(origin, typed(value, err)?)),
        // Deployments, ConfigMaps and the like may share a file with Services;
        // the dataplane has no use for them.
        _ => {}
    }
    Ok(())
}

/// The manifest directory, read file by file. A file that fails keeps the
/// objects it had the last time it was read (the last good state).
///
/// Indexed by Service, so that a change costs in proportion to what it
/// touches: reading one file again names the Services whose objects it
/// changed, and [`ManifestDir::objects`] gathers one Service's objects
/// (with the endpoints its selector makes of Pods) without a scan.
#[derive(Default)]
pub struct ManifestDir {
    last_good: BTreeMap<PathBuf, FileObjects>,
    /// What each file looked like when last read, and its error if any: an
    /// unchanged file is not parsed again, so one edit among thousands of
    /// files costs one parse.
    seen: BTreeMap<PathBuf, (FileStamp, Option<ManifestError>)>,
    /// The directory could not be listed at the last full read.
    dir_error: Option<ManifestError>,
    /// Service → files with its Service objects, slices or Endpoints.
    files_of: BTreeMap<ServiceId, BTreeSet<PathBuf>>,
    /// (namespace, label, value) → Pods carrying it, by file and position.
    pods: BTreeMap<LabelKey, BTreeSet<(PathBuf, usize)>>,
    /// (namespace, label, value) of the first term of a selector → the
    /// Services whose selector starts with it (counted: a file may repeat one).
    selectors: BTreeMap<LabelKey, BTreeMap<ServiceId, usize>>,
    /// Files holding slices that name no Service.
    unlabeled: BTreeSet<PathBuf>,
}

type LabelKey = (String, String, String);

/// What reading files again changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    /// Services whose objects (or selected Pods) may differ.
    pub services: BTreeSet<ServiceId>,
    /// The slices without a Service label changed.
    pub unlabeled: bool,
}

/// Size and a hash of the contents. Timestamps would be cheaper but are
/// coarse on many filesystems: two writes within a tick would look alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct FileStamp {
    len: u64,
    hash: u64,
}

fn stamp(path: &Path) -> Option<FileStamp> {
    use std::hash::{Hash as _, Hasher as _};
    let len = fs::metadata(path).ok()?.len();
    if len > MAX_FILE_BYTES {
        // Refused by parse_file without reading; the size is its stamp.
        return Some(FileStamp { len, hash: 0 });
    }
    let bytes = fs::read(path).ok()?;
    let mut h = std::hash::DefaultHasher::new();
    bytes.hash(&mut h);
    Some(FileStamp {
        len: bytes.len() as u64,
        hash: h.finish(),
    })
}

impl ManifestDir {
    /// Reads the directory; returns the cluster and the errors of this read.
    pub fn load(&mut self, dir: &Path) -> (Cluster, Vec<ManifestError>) {
        self.load_all(dir);
        (self.cluster(), self.errors())
    }

    /// Reads every file of the directory (parsing only those that changed),
    /// and forgets files that are gone: at start and at each resync.
    pub fn load_all(&mut self, dir: &Path) -> Changes {
        let mut changes = Changes::default();
        let files = match list_manifest_files(dir) {
            Ok(f) => {
                self.dir_error = None;
                f
            }
            Err(e) => {
                self.dir_error = Some(ManifestError {
                    file: dir.to_path_buf(),
                    document: None,
                    object: None,
                    field: None,
                    message: format!("cannot read the manifest directory: {e}"),
                });
                // Keep serving what was read before.
                return changes;
            }
        };
        let present: BTreeSet<&PathBuf> = files.iter().collect();
        let gone: Vec<PathBuf> = self
            .seen
            .keys()
            .chain(self.last_good.keys())
            .filter(|p| !present.contains(p))
            .cloned()
            .collect();
        for p in gone {
            self.forget(&p, &mut changes);
        }
        for file in &files {
            self.read(file, &mut changes);
        }
        changes
    }

    /// Reads the named files again (those file events named): written ones
    /// are parsed, vanished ones forgotten, others in `dir` left alone.
    pub fn load_paths(&mut self, dir: &Path, paths: &BTreeSet<PathBuf>) -> Changes {
        let mut changes = Changes::default();
        for p in paths {
            if p.parent() != Some(dir) || !is_manifest(p) {
                continue;
            }
            if p.is_file() {
                self.read(p, &mut changes);
            } else {
                self.forget(p, &mut changes);
            }
        }
        changes
    }

    /// The errors of the files as last read, in file order.
    pub fn errors(&self) -> Vec<ManifestError> {
        self.dir_error
            .iter()
            .chain(self.seen.values().filter_map(|(_, e)| e.as_ref()))
            .cloned()
            .collect()
    }

    /// Every Service id any file mentions (Services, slices, Endpoints).
    pub fn ids(&self) -> impl Iterator<Item = &ServiceId> {
        self.files_of.keys()
    }

    /// The Service objects of `id` in file and document order, and every
    /// slice the planner should see for it: the files' own, those made of
    /// the Pods its selector picks, and those mirrored from its Endpoints —
    /// the same, in the same order, as `Cluster::all_endpoint_slices` has
    /// for it.
    pub fn objects(&self, id: &ServiceId) -> (Vec<Sourced<Service>>, Vec<Sourced<EndpointSlice>>) {
        let files: Vec<&FileObjects> = self
            .files_of
            .get(id)
            .into_iter()
            .flatten()
            .filter_map(|p| self.last_good.get(p))
            .collect();
        let services: Vec<Sourced<Service>> = files
            .iter()
            .flat_map(|f| &f.services)
            .filter(|s| ServiceId::of(&s.object.metadata) == *id)
            .cloned()
            .collect();
        let mut slices: Vec<Sourced<EndpointSlice>> = files
            .iter()
            .flat_map(|f| &f.endpoint_slices)
            .filter(|s| ServiceId::of_slice(&s.object).as_ref() == Some(id))
            .cloned()
            .collect();
        let own_slices = !slices.is_empty();
        for svc in &services {
            let Some((ns, selector)) = pod_selector(&svc.object) else {
                continue;
            };
            let Some((k, v)) = selector.iter().next() else {
                continue;
            };
            let candidates = self
                .pods
                .get(&(ns.to_string(), k.clone(), v.clone()))
                .into_iter()
                .flatten()
                .filter_map(|(p, i)| self.last_good.get(p)?.pods.get(*i));
            slices.extend(slices_from_pods(svc, candidates));
        }
        if !own_slices && services.iter().any(|s| is_selectorless(&s.object)) {
            for f in &files {
                for ep in &f.endpoints {
                    if ServiceId::of(&ep.object.metadata) == *id {
                        slices.extend(mirror_endpoints(ep));
                    }
                }
            }
        }
        (services, slices)
    }

    /// The slices that name no Service, in file order.
    pub fn unlabeled_slices(&self) -> Vec<Sourced<EndpointSlice>> {
        self.unlabeled
            .iter()
            .filter_map(|p| self.last_good.get(p))
            .flat_map(|f| &f.endpoint_slices)
            .filter(|s| ServiceId::of_slice(&s.object).is_none())
            .cloned()
            .collect()
    }

    fn read(&mut self, file: &Path, changes: &mut Changes) {
        let now = stamp(file);
        if let (Some(now), Some((before, _))) = (now, self.seen.get(file))
            && now == *before
        {
            return;
        }
        let error = match parse_file(file) {
            Ok(objects) => {
                self.replace(file, objects, changes);
                None
            }
            Err(e) => Some(e),
        };
        match now {
            Some(now) => {
                self.seen.insert(file.to_path_buf(), (now, error));
            }
            None => {
                self.seen.remove(file);
            }
        }
    }

    fn forget(&mut self, file: &Path, changes: &mut Changes) {
        self.seen.remove(file);
        if self.last_good.contains_key(file) {
            self.replace(file, FileObjects::default(), changes);
            self.last_good.remove(file);
        }
    }

    /// Puts `new` in place of what `file` held, keeping the indexes, and
    /// notes the Services whose objects differ.
    fn replace(&mut self, file: &Path, new: FileObjects, changes: &mut Changes) {
        let old = self.last_good.remove(file).unwrap_or_default();
        // Objects compared by position: an edit in place touches one
        // Service, an inserted document shifts the origins of those after it.
        fn differing<'a, T: PartialEq>(
            old: &'a [Sourced<T>],
            new: &'a [Sourced<T>],
        ) -> impl Iterator<Item = &'a Sourced<T>> {
            let n = old.len().max(new.len());
            (0..n).flat_map(move |i| match (old.get(i), new.get(i)) {
                (Some(a), Some(b)) if a == b => vec![],
                (a, b) => a.into_iter().chain(b).collect(),
            })
        }
        for s in differing(&old.services, &new.services) {
            changes.services.insert(ServiceId::of(&s.object.metadata));
        }
        for s in differing(&old.endpoint_slices, &new.endpoint_slices) {
            match ServiceId::of_slice(&s.object) {
                Some(id) => {
                    changes.services.insert(id);
                }
                None => changes.unlabeled = true,
            }
        }
        for e in differing(&old.endpoints, &new.endpoints) {
            changes.services.insert(ServiceId::of(&e.object.metadata));
        }
        let moved_pods: Vec<&Sourced<Pod>> = differing(&old.pods, &new.pods).collect();
        // Services selecting a Pod before the change, by the old index...
        self.selecting(moved_pods.iter().copied(), &mut changes.services);
        self.index(file, &old, false);
        self.index(file, &new, true);
        // ...and after it (a Service in the same file may have changed too).
        self.selecting(moved_pods.iter().copied(), &mut changes.services);
        self.last_good.insert(file.to_path_buf(), new);
    }

    /// Services whose selector's first term is one of these Pods' labels: a
    /// superset of those selecting them.
    fn selecting<'a>(
        &self,
        pods: impl Iterator<Item = &'a Sourced<Pod>>,
        out: &mut BTreeSet<ServiceId>,
    ) {
        for pod in pods {
            let ns = pod_namespace(&pod.object);
            for (k, v) in pod.object.metadata.labels.iter().flatten() {
                if let Some(ids) = self.selectors.get(&(ns.to_string(), k.clone(), v.clone())) {
                    out.extend(ids.keys().cloned());
                }
            }
        }
    }

    /// Adds (or removes) what `objects` of `file` contribute to the indexes.
    fn index(&mut self, file: &Path, objects: &FileObjects, add: bool) {
        let mut ids: BTreeSet<ServiceId> = BTreeSet::new();
        for s in &objects.services {
            let id = ServiceId::of(&s.object.metadata);
            if let Some((ns, selector)) = pod_selector(&s.object)
                && let Some((k, v)) = selector.iter().next()
            {
                let key = (ns.to_string(), k.clone(), v.clone());
                let counts = self.selectors.entry(key.clone()).or_default();
                let n = counts.entry(id.clone()).or_default();
                if add {
                    *n += 1;
                } else {
                    *n = n.saturating_sub(1);
                    if *n == 0 {
                        counts.remove(&id);
                    }
                    if counts.is_empty() {
                        self.selectors.remove(&key);
                    }
                }
            }
            ids.insert(id);
        }
        let mut unlabeled = false;
        for s in &objects.endpoint_slices {
            match ServiceId::of_slice(&s.object) {
                Some(id) => {
                    ids.insert(id);
                }
                None => unlabeled = true,
            }
        }
        ids.extend(
            objects
                .endpoints
                .iter()
                .map(|e| ServiceId::of(&e.object.metadata)),
        );
        for id in ids {
            let files = self.files_of.entry(id.clone()).or_default();
            if add {
                files.insert(file.to_path_buf());
            } else {
                files.remove(file);
                if files.is_empty() {
                    self.files_of.remove(&id);
                }
            }
        }
        if add && unlabeled {
            self.unlabeled.insert(file.to_path_buf());
        } else if !add {
            self.unlabeled.remove(file);
        }
        for (i, pod) in objects.pods.iter().enumerate() {
            let ns = pod_namespace(&pod.object);
            for (k, v) in pod.object.metadata.labels.iter().flatten() {
                let key = (ns.to_string(), k.clone(), v.clone());
                let at = (file.to_path_buf(), i);
                if add {
                    self.pods.entry(key).or_default().insert(at);
                } else if let Some(set) = self.pods.get_mut(&key) {
                    set.remove(&at);
                    if set.is_empty() {
                        self.pods.remove(&key);
                    }
                }
            }
        }
    }

    /// Everything, as one cluster (for the full compile).
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for objs in self.last_good.values() {
            c.services.extend(objs.services.iter().cloned());
            c.endpoint_slices
                .extend(objs.endpoint_slices.iter().cloned());
            c.endpoints.extend(objs.endpoints.iter().cloned());
            c.pods.extend(objs.pods.iter().cloned());
        }
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: db}
spec:
  clusterIP: 10.96.0.20
  selector: {app: redis}
  ports: [{name: redis, port: 6379, targetPort: redis}]
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: ignored}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ext-1, labels: {kubernetes.io/service-name: ext}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.5]}]
ports: [{name: "", port: 9000, protocol: UDP}]
---
"#;

    #[test]
    fn reads_multi_document_files_and_ignores_other_kinds() {
        let objs = parse_str(GOOD, "good.yaml").unwrap();
        assert_eq!(objs.services.len(), 1);
        assert_eq!(objs.endpoint_slices.len(), 1);
        assert_eq!(objs.services[0].origin, "good.yaml#1");
        let svc = &objs.services[0].object;
        assert_eq!(
            svc.spec.as_ref().unwrap().cluster_ip.as_deref(),
            Some("10.96.0.20")
        );
    }

    #[test]
    fn a_bad_field_is_named_with_document_and_object() {
        let text = "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n";
        let e = parse_str(text, "bad.yaml").unwrap_err();
        assert_eq!(e.document, Some(1));
        assert_eq!(e.object.as_deref(), Some("Service default/web"));
        assert_eq!(e.field.as_deref(), Some("spec.ports[0].port"));
        let shown = e.to_string();
        assert!(
            shown.contains("bad.yaml document 1 (Service default/web): field spec.ports[0].port"),
            "{shown}"
        );
    }

    #[test]
    fn broken_yaml_and_missing_kind_are_errors() {
        let e = parse_str("a: [1, 2\n", "x.yaml").unwrap_err();
        assert!(e.message.contains("not valid YAML"), "{e}");
        let e = parse_str("apiVersion: v1\nmetadata: {name: x}\n", "x.yaml").unwrap_err();
        assert_eq!(e.field.as_deref(), Some("kind"));
    }

    #[test]
    fn list_kind_is_unpacked() {
        let text = "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: p}\n";
        assert_eq!(parse_str(text, "l.yaml").unwrap().pods.len(), 1);
    }

    #[test]
    fn a_failing_file_keeps_its_last_good_objects() {
        let dir = std::env::temp_dir().join(format!("svc-manifest-test-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let f = dir.join("a.yaml");
        fs::write(&f, GOOD).unwrap();
        let mut md = ManifestDir::default();
        let (c, errs) = md.load(&dir);
        assert!(errs.is_empty());
        assert_eq!(c.services.len(), 1);
        fs::write(&f, "apiVersion: v1\nkind: Service\nspec: [").unwrap();
        let (c, errs) = md.load(&dir);
        assert_eq!(errs.len(), 1);
        assert_eq!(c.services.len(), 1, "last good state kept");
        let (c, errs) = md.load(&dir);
        assert_eq!(errs.len(), 1, "an unchanged bad file is still reported");
        assert_eq!(c.services.len(), 1);
        fs::remove_file(&f).unwrap();
        let (c, errs) = md.load(&dir);
        assert!(errs.is_empty());
        assert!(
            c.services.is_empty(),
            "a deleted file takes its objects with it"
        );
        fs::remove_dir_all(&dir).unwrap();
    }

    /// The planner fed Service by Service from the index, as the agent does.
    fn incremental(
        md: &ManifestDir,
        planner: &mut crate::plan::Incremental,
        ids: &BTreeSet<ServiceId>,
    ) {
        for id in ids {
            let (services, slices) = md.objects(id);
            planner.set(id.clone(), services, slices);
        }
        planner.set_unlabeled(&md.unlabeled_slices());
        planner.commit();
    }

    fn full(md: &ManifestDir, previous: &crate::plan::Plan) -> crate::plan::Plan {
        let c = md.cluster();
        let node = crate::plan::NodeContext::default();
        let mut p =
            crate::plan::compile_after(&c.services, &c.all_endpoint_slices(), &node, previous);
        p.keep_refused_from(previous);
        p
    }

    const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets: [{addresses: [{ip: 10.1.0.9}], ports: [{port: 5432}]}]
"#;

    fn pods(ips: &[&str]) -> String {
        ips.iter()
            .enumerate()
            .map(|(i, ip)| {
                format!(
                    "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web, tier: x}}}}\n\
                     spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                     status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\n"
                )
            })
            .collect()
    }

    #[test]
    fn per_service_objects_give_the_full_compile_and_a_pod_edit_names_its_service() {
        let dir = std::env::temp_dir().join(format!("svc-manifest-idx-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("a.yaml"), WEB).unwrap();
        fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.2"])).unwrap();
        let mut md = ManifestDir::default();
        md.load_all(&dir);
        let mut planner = crate::plan::Incremental::default();
        let ids: BTreeSet<ServiceId> = md.ids().cloned().collect();
        incremental(&md, &mut planner, &ids);
        let expected = full(&md, &crate::plan::Plan::default());
        assert_eq!(planner.plan(), &expected);
        assert_eq!(expected.frontends.len(), 2, "{expected:?}");

        fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.3"])).unwrap();
        let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("pods.yaml")]));
        assert_eq!(
            changes.services,
            BTreeSet::from([ServiceId::new("default", "web")])
        );
        let previous = planner.plan().clone();
        incremental(&md, &mut planner, &changes.services);
        let expected = full(&md, &previous);
        assert_eq!(planner.plan(), &expected);
        let web = expected
            .frontends
            .values()
            .find(|f| f.service == "default/web")
            .unwrap();
        assert_eq!(
            web.backends
                .iter()
                .map(|b| b.to_string())
                .collect::<Vec<_>>(),
            ["10.1.0.1:8080", "10.1.0.3:8080"]
        );

        // An unchanged rewrite names nothing; a removed file takes its objects.
        fs::write(dir.join("a.yaml"), WEB).unwrap();
        let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
        assert!(changes.services.is_empty(), "{changes:?}");
        fs::remove_file(dir.join("a.yaml")).unwrap();
        let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
        assert_eq!(changes.services.len(), 2);
        let previous = planner.plan().clone();
        incremental(&md, &mut planner, &changes.services);
        assert_eq!(planner.plan(), &full(&md, &previous));
        assert!(planner.plan().frontends.is_empty());
        fs::remove_dir_all(&dir).unwrap();
    }
}
