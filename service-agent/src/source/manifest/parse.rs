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
pub type FileObjects = Cluster;

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
