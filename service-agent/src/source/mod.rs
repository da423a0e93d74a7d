//! Where the cluster's objects come from. Both sources yield the same
//! k8s-openapi objects into [`crate::model::Cluster`]; no Kubernetes semantics
//! are decided here.
pub mod kube;
pub mod manifest;
