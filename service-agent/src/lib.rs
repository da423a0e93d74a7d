//! The service-agent library: sources, model, planner and dataplane writer
//! of an eBPF Kubernetes Service dataplane.
pub mod agent;
pub mod cli;
pub mod dataplane;
pub mod dns;
pub mod error_chain;
pub mod faults;
pub mod gc;
pub mod health;
pub mod metrics;
pub mod model;
pub mod plan;
pub mod report;
pub mod run_config;
pub mod source;
pub mod status;

/// The BPF object built by build.rs from the service-ebpf crate.
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/service-ebpf"));
