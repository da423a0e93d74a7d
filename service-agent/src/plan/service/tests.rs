//! `externalTrafficPolicy: Local` applies to traffic from outside the
//! cluster only: the external frontends of such a Service carry a second
//! backend set, the cluster-wide one, for sources inside the cluster
//! (kube-proxy's short-circuit to its cluster policy chain).
use crate::{
    model::Cluster,
    plan::{
        BackendAddr, FrontendKey, FrontendKind, FrontendPlan, NodeContext, Plan, Protocol, compile,
    },
    source::manifest::parse_str,
};

/// A LoadBalancer Service with a NodePort, an externalIP, an ingress IP and
/// source ranges, policy `policy`; endpoints `endpoints` (YAML list items).
fn service(policy: &str, endpoints: &str) -> String {
    format!(
        r#"
apiVersion: v1
kind: Service
metadata: {{name: lb, namespace: shop}}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.40
{policy}  externalIPs: [203.0.113.7]
  loadBalancerSourceRanges: [192.0.2.0/24]
  ports: [{{name: http, port: 80, targetPort: 8080, nodePort: 30080}}]
status:
  loadBalancer:
    ingress: [{{ip: 198.51.100.20}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: lb-1, namespace: shop, labels: {{kubernetes.io/service-name: lb}}}}
addressType: IPv4
ports: [{{name: http, port: 8080}}]
endpoints:
{endpoints}"#
    )
}

const LOCAL: &str = "  externalTrafficPolicy: Local\n";

/// Ready on node-1 and node-2, not ready on node-2, serving while
/// terminating on node-1.
const MIXED: &str = "\
- {addresses: [10.244.1.5], nodeName: node-1}
- {addresses: [10.244.2.5], nodeName: node-2}
- {addresses: [10.244.2.6], nodeName: node-2, conditions: {ready: false}}
- {addresses: [10.244.1.6], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
";

fn plan_on(node: &str, yaml: &str) -> Plan {
    let o = parse_str(yaml, "t.yaml").expect("test YAML parses");
    let c = Cluster {
        services: o.services,
        endpoint_slices: o.endpoint_slices,
        endpoints: o.endpoints,
        pods: o.pods,
    };
    let ctx = NodeContext {
        name: Some(node.into()),
        external_ip_allow: vec!["203.0.113.0/24".parse().unwrap()],
        ..Default::default()
    };
    let p = compile(&c.services, &c.all_endpoint_slices(), &ctx);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    p
}

fn tcp(addr: &str, port: u16) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto: Protocol::Tcp,
    }
}

const CLUSTER_IP: (&str, u16) = ("10.96.0.40", 80);
/// NodePort, externalIP, LoadBalancer IP.
const EXTERNAL: [(&str, u16); 3] = [
    ("0.0.0.0", 30080),
    ("203.0.113.7", 80),
    ("198.51.100.20", 80),
];

fn frontend<'p>(p: &'p Plan, (addr, port): (&str, u16)) -> &'p FrontendPlan {
    let k = tcp(addr, port);
    p.frontends
        .get(&k)
        .unwrap_or_else(|| panic!("no frontend {k}: {p:#?}"))
}

fn addrs(b: &[BackendAddr]) -> Vec<String> {
    b.iter().map(|b| b.to_string()).collect()
}

fn in_cluster(p: &Plan, at: (&str, u16)) -> Option<Vec<String>> {
    frontend(p, at).in_cluster.as_deref().map(addrs)
}

#[test]
fn local_external_frontends_give_sources_inside_the_cluster_every_ready_endpoint() {
    let p = plan_on("node-1", &service(LOCAL, MIXED));
    for at in EXTERNAL {
        let f = frontend(&p, at);
        assert_eq!(addrs(&f.backends), ["10.244.1.5:8080"], "{at:?}: outside");
        assert_eq!(
            in_cluster(&p, at).unwrap(),
            ["10.244.1.5:8080", "10.244.2.5:8080"],
            "{at:?}: inside, ready ones of every node"
        );
        let local: Vec<bool> = f
            .in_cluster
            .iter()
            .flat_map(|b| b.iter())
            .map(|b| b.local)
            .collect();
        assert_eq!(local, [true, false], "{at:?}");
    }
    let c = frontend(&p, CLUSTER_IP);
    assert_eq!(c.kind, FrontendKind::ClusterIp);
    assert_eq!(c.in_cluster, None, "the ClusterIP is for everyone alike");
    assert_eq!(addrs(&c.backends), ["10.244.1.5:8080", "10.244.2.5:8080"]);
    // The LoadBalancer IP keeps its source ranges for both sets (kube-proxy
    // filters before the short-circuit).
    let lb = frontend(&p, EXTERNAL[2]);
    assert_eq!(lb.source_ranges, ["192.0.2.0/24".parse().unwrap()]);
}

#[test]
fn the_external_sets_are_what_they_were_without_the_in_cluster_one() {
    for node in ["node-1", "node-2", "node-3"] {
        let p = plan_on(node, &service(LOCAL, MIXED));
        let none = plan_on(node, &service("", MIXED));
        for (k, f) in &p.frontends {
            let mut without = f.clone();
            without.in_cluster = None;
            let cluster_policy = &none.frontends[k];
            if f.kind == FrontendKind::ClusterIp {
                assert_eq!(&without, cluster_policy, "{node} {k}");
            } else {
                assert_eq!(f.in_cluster.as_ref(), Some(&cluster_policy.backends));
                assert_eq!(
                    without.affinity_timeout_s,
                    cluster_policy.affinity_timeout_s
                );
            }
        }
    }
    // Policy Cluster: no frontend has a second set.
    let p = plan_on(
        "node-1",
        &service("  externalTrafficPolicy: Cluster\n", MIXED),
    );
    assert!(p.frontends.values().all(|f| f.in_cluster.is_none()));
}

#[test]
fn without_a_local_endpoint_inside_sources_still_reach_the_service() {
    let p = plan_on("node-3", &service(LOCAL, MIXED));
    for at in EXTERNAL {
        let f = frontend(&p, at);
        assert!(f.backends.is_empty(), "{at:?}");
        assert!(!f.reject_when_empty, "{at:?}: outside, dropped");
        assert_eq!(
            in_cluster(&p, at).unwrap(),
            ["10.244.1.5:8080", "10.244.2.5:8080"]
        );
    }
    // No endpoint at all: everyone is refused alike, no second set.
    let p = plan_on("node-1", &service(LOCAL, ""));
    for at in EXTERNAL {
        let f = frontend(&p, at);
        assert!(f.reject_when_empty && f.backends.is_empty());
        assert_eq!(f.in_cluster, None, "{at:?}");
    }
}

#[test]
fn the_in_cluster_set_falls_back_to_terminating_endpoints_cluster_wide() {
    // Nothing ready anywhere: serving-and-terminating ones of every node.
    let terminating = "\
- {addresses: [10.244.1.6], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.7], nodeName: node-2, conditions: {ready: false, serving: true, terminating: true}}
- {addresses: [10.244.2.8], nodeName: node-2, conditions: {ready: false, serving: false, terminating: true}}
";
    let p = plan_on("node-1", &service(LOCAL, terminating));
    for at in EXTERNAL {
        assert_eq!(addrs(&frontend(&p, at).backends), ["10.244.1.6:8080"]);
        assert_eq!(
            in_cluster(&p, at).unwrap(),
            ["10.244.1.6:8080", "10.244.2.7:8080"]
        );
    }
    // A ready endpoint elsewhere wins over the local terminating one for
    // inside sources, while outside ones keep the local terminating one.
    let p = plan_on(
        "node-1",
        &service(
            LOCAL,
            &MIXED[MIXED.find("- {addresses: [10.244.2.5]").unwrap()..],
        ),
    );
    let np = EXTERNAL[0];
    assert_eq!(addrs(&frontend(&p, np).backends), ["10.244.1.6:8080"]);
    assert_eq!(in_cluster(&p, np).unwrap(), ["10.244.2.5:8080"]);
}

#[test]
fn internal_traffic_policy_local_does_not_narrow_the_in_cluster_set() {
    // kube-proxy short-circuits to its cluster policy chain, not to the
    // chain the ClusterIP uses.
    let both = format!("{LOCAL}  internalTrafficPolicy: Local\n");
    let p = plan_on("node-2", &service(&both, MIXED));
    assert_eq!(
        addrs(&frontend(&p, CLUSTER_IP).backends),
        ["10.244.2.5:8080"]
    );
    assert_eq!(
        in_cluster(&p, EXTERNAL[0]).unwrap(),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
}
