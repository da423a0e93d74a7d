//! The agent's control plane: from Kubernetes objects to written maps.
use std::{collections::BTreeMap, time::Instant};

use k8s_openapi::{
    api::{
        core::v1::{Service, ServicePort, ServiceSpec},
        discovery::v1::{Endpoint, EndpointPort, EndpointSlice},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use service_agent::{
    model::Sourced,
    plan::{self, NodeContext},
};

use crate::{BACKENDS_PER_SERVICE, backend_ip, load, vip};

pub fn service_object(i: u32) -> Sourced<Service> {
    Sourced::new(
        "bench",
        Service {
            metadata: ObjectMeta {
                name: Some(format!("svc-{i}")),
                namespace: Some("bench".into()),
                ..Default::default()
            },
            spec: Some(ServiceSpec {
                cluster_ip: Some(vip(i).to_string()),
                ports: Some(vec![ServicePort {
                    name: Some("http".into()),
                    port: 80,
                    ..Default::default()
                }]),
                ..Default::default()
            }),
            ..Default::default()
        },
    )
}

pub fn slice_object(i: u32, generation: u32) -> Sourced<EndpointSlice> {
    Sourced::new(
        "bench",
        EndpointSlice {
            metadata: ObjectMeta {
                name: Some(format!("svc-{i}-x")),
                namespace: Some("bench".into()),
                labels: Some(BTreeMap::from([(
                    "kubernetes.io/service-name".to_string(),
                    format!("svc-{i}"),
                )])),
                ..Default::default()
            },
            address_type: "IPv4".into(),
            endpoints: Some(
                (0..BACKENDS_PER_SERVICE)
                    .map(|k| Endpoint {
                        addresses: vec![
                            backend_ip(i, (k + generation) % (BACKENDS_PER_SERVICE + 1))
                                .to_string(),
                        ],
                        ..Default::default()
                    })
                    .collect(),
            ),
            ports: Some(vec![EndpointPort {
                name: Some("http".into()),
                port: Some(8080),
                ..Default::default()
            }]),
        },
    )
}

pub struct ControlPlane {
    pub services: u32,
    pub from_nothing_ms: f64,
    pub change_p50_ms: f64,
    pub change_p99_ms: f64,
    pub rss_mib: f64,
}

pub fn rss_mib() -> f64 {
    let s = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    s.lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// What the agent does per change, from Kubernetes objects to written maps:
/// compile the whole plan (level-triggered) and apply the difference.
pub fn control_plane(services: u32, changes: usize) -> ControlPlane {
    let mut l = load(services);
    let svcs: Vec<_> = (0..services).map(service_object).collect();
    let mut slices: Vec<_> = (0..services).map(|i| slice_object(i, 0)).collect();
    let node = NodeContext::default();
    let started = Instant::now();
    let mut previous = plan::compile(&svcs, &slices, &node);
    let report = l.dp.writer.apply(&mut l.dp.tables, &previous);
    let from_nothing_ms = started.elapsed().as_secs_f64() * 1e3;
    assert!(report.errors.is_empty());
    let mut lat = vec![];
    for c in 0..changes {
        let i = (c as u32 * 7919) % services;
        // Generations 1..=10 all differ from 0 (an 11-address window shifts).
        slices[i as usize] = slice_object(i, c as u32 % 10 + 1);
        let t = Instant::now();
        let plan = plan::compile_after(&svcs, &slices, &node, &previous);
        let report = l.dp.writer.apply(&mut l.dp.tables, &plan);
        lat.push(t.elapsed().as_secs_f64() * 1e3);
        assert_eq!(report.frontends_written, 1, "change {c}: {report:?}");
        previous = plan;
    }
    lat.sort_by(|a, b| a.total_cmp(b));
    let pct = |p: f64| lat[((lat.len() as f64 - 1.0) * p).round() as usize];
    ControlPlane {
        services,
        from_nothing_ms,
        change_p50_ms: pct(0.5),
        change_p99_ms: pct(0.99),
        rss_mib: rss_mib(),
    }
}
