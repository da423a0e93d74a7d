//! Reading manifest files: kubectl-style multi-document YAML into the same
//! k8s-openapi types the API server yields.
//!
//! YAML goes through `serde_yaml_ng`, the maintained fork of the deprecated
//! `serde_yaml`; `serde_path_to_error` names the field a bad value sits in.
use std::{
    fmt, fs,
    path::{Path, PathBuf},
};

use serde::de::DeserializeOwned;

use super::stream::Stream;
use k8s_openapi::api::{
    core::v1::{Endpoints, Pod, Service},
    discovery::v1::EndpointSlice,
};

use crate::model::{Cluster, Sourced, trim};

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
pub type FileObjects = Cluster;

/// Where a reader puts the objects it types, one at a time: a `Cluster`,
/// or the manifest directory's packed store.
pub trait Sink: Default + Send {
    fn service(&mut self, s: Sourced<Service>);
    fn endpoint_slice(&mut self, s: Sourced<EndpointSlice>);
    fn endpoints(&mut self, e: Sourced<Endpoints>);
    fn pod(&mut self, p: Sourced<Pod>);
    fn append(&mut self, other: Self);

    fn append_objects(&mut self, c: FileObjects) {
        c.services.into_iter().for_each(|s| self.service(s));
        c.endpoint_slices
            .into_iter()
            .for_each(|s| self.endpoint_slice(s));
        c.endpoints.into_iter().for_each(|e| self.endpoints(e));
        c.pods.into_iter().for_each(|p| self.pod(p));
    }
}

impl Sink for FileObjects {
    fn service(&mut self, s: Sourced<Service>) {
        self.services.push(s);
    }
    fn endpoint_slice(&mut self, s: Sourced<EndpointSlice>) {
        self.endpoint_slices.push(s);
    }
    fn endpoints(&mut self, e: Sourced<Endpoints>) {
        self.endpoints.push(e);
    }
    fn pod(&mut self, p: Sourced<Pod>) {
        self.pods.push(p);
    }
    fn append(&mut self, other: Self) {
        self.services.extend(other.services);
        self.endpoint_slices.extend(other.endpoint_slices);
        self.endpoints.extend(other.endpoints);
        self.pods.extend(other.pods);
    }
}

pub(super) fn is_manifest(path: &Path) -> bool {
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

/// Largest manifest file read. Files are read a piece at a time (see
/// `stream.rs`), so this bounds the time a read takes, not its memory:
/// `kubectl get -o yaml` of 100,000 Services and their slices is about
/// 500 MB.
pub const MAX_FILE_BYTES: u64 = 1 << 30;

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
    parse_file_into(path)
}

/// Reads one file into any [`Sink`]; objects reach it as they are typed.
pub fn parse_file_into<S: Sink>(path: &Path) -> Result<S, ManifestError> {
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
    let name = path.display().to_string();
    let file = fs::File::open(path).map_err(|e| err(None, None, None, e.to_string()))?;
    let read = match super::stream::parse_stream(std::io::BufReader::new(file), &name) {
        Ok(objects) => Ok(objects),
        Err(Stream::Failed(e)) => Err(e),
        Err(Stream::ReadWhole) => {
            let text =
                fs::read_to_string(path).map_err(|e| err(None, None, None, e.to_string()))?;
            parse_str(&text, &name).map(|objects| {
                let mut out = S::default();
                out.append_objects(objects);
                out
            })
        }
    };
    read.map_err(|mut e| {
        e.file = path.to_path_buf();
        e
    })
}

/// Reads the documents of a manifest text; `name` labels the objects' origin.
pub fn parse_str(text: &str, name: &str) -> Result<FileObjects, ManifestError> {
    let mut out = FileObjects::default();
    parse_documents(text, name, &mut 0, &mut out)?;
    Ok(out)
}

/// Adds the objects of the documents of `text` to `out`; `index` is the
/// number of documents before them, and counts these.
pub(super) fn parse_documents(
    text: &str,
    name: &str,
    index: &mut usize,
    out: &mut FileObjects,
) -> Result<(), ManifestError> {
    for doc in serde_yaml_ng::Deserializer::from_str(text) {
        *index += 1;
        let index = *index;
        let read = serde::de::DeserializeSeed::deserialize(Document { name, index }, doc).map_err(
            |e| ManifestError {
                file: PathBuf::from(name),
                document: Some(index),
                object: None,
                field: None,
                message: format!("not valid YAML: {e}"),
            },
        )?;
        match read {
            Read::Null => {}
            Read::Object(value) => add_document(out, value, name, index)?,
            Read::List { head, items } => {
                let kind = head.get("kind").and_then(|k| k.as_str());
                let api_version = head.get("apiVersion").and_then(|k| k.as_str());
                // Items of anything but a List (a DeploymentList, say) are
                // not the dataplane's, whatever they hold.
                if (api_version, kind) == (Some("v1"), Some("List")) {
                    let items = items?;
                    out.append(items);
                } else {
                    add_document(out, serde_yaml_ng::Value::Mapping(head), name, index)?;
                }
            }
        }
    }
    Ok(())
}

/// One YAML document as it streams in. The items of a list are typed one at
/// a time, so `kubectl get svc,endpointslices -A -o yaml` (one `List` of
/// every object) is never held as one YAML tree, which takes several times
/// the text's size.
struct Document<'a> {
    name: &'a str,
    index: usize,
}

enum Read {
    Null,
    Object(serde_yaml_ng::Value),
    /// A document with `items`: its other fields, and its items typed (or
    /// the first item's error).
    List {
        head: serde_yaml_ng::Mapping,
        items: Result<FileObjects, ManifestError>,
    },
}

impl<'de> serde::de::DeserializeSeed<'de> for Document<'_> {
    type Value = Read;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Read, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Document<'_> {
    type Value = Read;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a Kubernetes object")
    }

    fn visit_unit<E>(self) -> Result<Read, E> {
        Ok(Read::Null)
    }

    fn visit_none<E>(self) -> Result<Read, E> {
        Ok(Read::Null)
    }

    // Not a mapping: no kind, which add_document reports.
    fn visit_bool<E>(self, _: bool) -> Result<Read, E> {
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }
    fn visit_i64<E>(self, _: i64) -> Result<Read, E> {
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }
    fn visit_u64<E>(self, _: u64) -> Result<Read, E> {
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }
    fn visit_f64<E>(self, _: f64) -> Result<Read, E> {
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }
    fn visit_str<E>(self, _: &str) -> Result<Read, E> {
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }
    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Read, A::Error> {
        while seq.next_element::<serde::de::IgnoredAny>()?.is_some() {}
        Ok(Read::Object(serde_yaml_ng::Value::Bool(false)))
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut map: A) -> Result<Read, A::Error> {
        let mut head = serde_yaml_ng::Mapping::new();
        let mut items = None;
        while let Some(key) = map.next_key::<serde_yaml_ng::Value>()? {
            if key.as_str() == Some("items") && items.is_none() {
                items = Some(map.next_value_seed(Items {
                    name: self.name,
                    index: self.index,
                })?);
            } else {
                let value = map.next_value::<serde_yaml_ng::Value>()?;
                head.insert(key, value);
            }
        }
        Ok(match items {
            Some(items) => Read::List { head, items },
            None => Read::Object(serde_yaml_ng::Value::Mapping(head)),
        })
    }
}

/// The `items` of a list document, each typed as it is read.
struct Items<'a> {
    name: &'a str,
    index: usize,
}

impl<'de> serde::de::DeserializeSeed<'de> for Items<'_> {
    type Value = Result<FileObjects, ManifestError>;
    fn deserialize<D: serde::Deserializer<'de>>(self, d: D) -> Result<Self::Value, D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> serde::de::Visitor<'de> for Items<'_> {
    type Value = Result<FileObjects, ManifestError>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a list of Kubernetes objects")
    }

    fn visit_unit<E>(self) -> Result<Self::Value, E> {
        Ok(Ok(FileObjects::default()))
    }

    fn visit_seq<A: serde::de::SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        let mut out = FileObjects::default();
        let mut failed = None;
        while let Some(item) = seq.next_element::<serde_yaml_ng::Value>()? {
            // After a bad item the rest is only read through: the whole
            // file is refused anyway.
            if failed.is_none()
                && let Err(e) = add_document(&mut out, item, self.name, self.index)
            {
                failed = Some(e);
            }
        }
        Ok(match failed {
            Some(e) => Err(e),
            None => Ok(out),
        })
    }
}

fn str_field<'a>(v: &'a serde_yaml_ng::Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(|k| k.as_str())
}

pub(super) fn add_document<S: Sink>(
    out: &mut S,
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
    if (api_version.as_str(), kind.as_str()) == ("v1", "List") {
        let items = match value {
            serde_yaml_ng::Value::Mapping(mut m) => m.remove("items"),
            _ => None,
        };
        if let Some(serde_yaml_ng::Value::Sequence(items)) = items {
            for item in items {
                add_document(out, item, name, index)?;
            }
        }
        return Ok(());
    }
    if let Some(k) = Kind::of(&api_version, &kind) {
        k.put(ThroughValue { value, err }, out, origin)?;
    }
    Ok(())
}

/// The kinds of object the dataplane reads from manifests. Deployments,
/// ConfigMaps and the like may share a file with Services; the dataplane
/// has no use for them.
#[derive(Clone, Copy)]
pub(super) enum Kind {
    Service,
    EndpointSlice,
    Endpoints,
    Pod,
}

/// How an object of a known kind is typed: through a YAML Value (the
/// errors name the field), or straight from the text (`direct`).
pub(super) trait Typer {
    type Error;
    fn typed<K: DeserializeOwned>(self) -> Result<K, Self::Error>;
}

/// A document's Value, typed with the field path of any error.
struct ThroughValue<F> {
    value: serde_yaml_ng::Value,
    err: F,
}

impl<F: Fn(Option<String>, String) -> ManifestError> Typer for ThroughValue<F> {
    type Error = ManifestError;

    fn typed<K: DeserializeOwned>(self) -> Result<K, ManifestError> {
        typed(self.value, self.err)
    }
}

impl Kind {
    /// The kind an object's `apiVersion` and `kind` name, if the dataplane
    /// reads it.
    pub(super) fn of(api_version: &str, kind: &str) -> Option<Kind> {
        match (api_version, kind) {
            ("v1", "Service") => Some(Kind::Service),
            ("discovery.k8s.io/v1", "EndpointSlice") => Some(Kind::EndpointSlice),
            ("v1", "Endpoints") => Some(Kind::Endpoints),
            ("v1", "Pod") => Some(Kind::Pod),
            _ => None,
        }
    }

    /// Types the object as this kind, cuts it to what the agent reads and
    /// gives it to `out`.
    pub(super) fn put<S: Sink, T: Typer>(
        self,
        object: T,
        out: &mut S,
        origin: String,
    ) -> Result<(), T::Error> {
        match self {
            Kind::Service => {
                let mut svc = object.typed()?;
                trim::service(&mut svc);
                out.service(Sourced::new(origin, svc));
            }
            Kind::EndpointSlice => {
                let mut slice = object.typed()?;
                trim::endpoint_slice(&mut slice);
                out.endpoint_slice(Sourced::new(origin, slice));
            }
            Kind::Endpoints => {
                let mut ep = object.typed()?;
                trim::endpoints(&mut ep);
                out.endpoints(Sourced::new(origin, ep));
            }
            Kind::Pod => {
                let mut pod = object.typed()?;
                trim::pod(&mut pod);
                out.pod(Sourced::new(origin, pod));
            }
        }
        Ok(())
    }
}
