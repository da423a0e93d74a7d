//! The manifest source: kubectl-style multi-document YAML files in a
//! directory, read into the same k8s-openapi types the API server yields.
//!
//! YAML goes through `serde_yaml_ng`, the maintained fork of the deprecated
//! `serde_yaml`; `serde_path_to_error` names the field a bad value sits in.
use std::{
    collections::BTreeMap,
    fmt, fs,
    path::{Path, PathBuf},
};

use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};
use serde::de::DeserializeOwned;

use crate::model::{Cluster, Sourced};

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
#[derive(Default)]
pub struct ManifestDir {
    last_good: BTreeMap<PathBuf, FileObjects>,
    /// What each file looked like when last read, and its error if any: an
    /// unchanged file is not parsed again, so one edit among thousands of
    /// files costs one parse.
    seen: BTreeMap<PathBuf, (FileStamp, Option<ManifestError>)>,
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
        let mut errors = vec![];
        let files = match list_manifest_files(dir) {
            Ok(f) => f,
            Err(e) => {
                errors.push(ManifestError {
                    file: dir.to_path_buf(),
                    document: None,
                    object: None,
                    field: None,
                    message: format!("cannot read the manifest directory: {e}"),
                });
                // Keep serving what was read before.
                return (self.cluster(), errors);
            }
        };
        self.last_good.retain(|p, _| files.contains(p));
        self.seen.retain(|p, _| files.contains(p));
        for file in files {
            let now = stamp(&file);
            if let (Some(now), Some((before, error))) = (now, self.seen.get(&file))
                && now == *before
            {
                errors.extend(error.clone());
                continue;
            }
            let result = parse_file(&file);
            let error = match result {
                Ok(objects) => {
                    self.last_good.insert(file.clone(), objects);
                    None
                }
                Err(e) => Some(e),
            };
            errors.extend(error.clone());
            match now {
                Some(now) => {
                    self.seen.insert(file, (now, error));
                }
                None => {
                    self.seen.remove(&file);
                }
            }
        }
        (self.cluster(), errors)
    }

    fn cluster(&self) -> Cluster {
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
}
