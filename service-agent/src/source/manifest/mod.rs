//! The manifest source: kubectl-style multi-document YAML files in a
//! directory, read into the same k8s-openapi types the API server yields,
//! indexed by Service and watched for changes.
mod dir;
mod direct;
mod parse;
mod stream;
mod watch;

pub use self::{
    dir::{Changes, ManifestDir},
    parse::{
        FileObjects, MAX_FILE_BYTES, ManifestError, Sink, list_manifest_files, parse_file,
        parse_file_into, parse_str,
    },
    watch::ManifestSource,
};

#[cfg(test)]
mod tests;
