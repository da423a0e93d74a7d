//! Planner semantics, from YAML as a user would write it.
use super::*;
use crate::{model::Cluster, source::manifest::parse_str};

fn cluster(yaml: &str) -> Cluster {
    let o = parse_str(yaml, "t.yaml").expect("test YAML parses");
    Cluster {
        services: o.services,
        endpoint_slices: o.endpoint_slices,
        endpoints: o.endpoints,
        pods: o.pods,
    }
}

fn plan_for(yaml: &str, node: &NodeContext) -> Plan {
    let c = cluster(yaml);
    compile(&c.services, &c.all_endpoint_slices(), node)
}

fn plan(yaml: &str) -> Plan {
    plan_for(yaml, &NodeContext::default())
}

fn key(addr: &str, port: u16, proto: Protocol) -> FrontendKey {
    FrontendKey {
        addr: addr.parse().unwrap(),
        port,
        proto,
    }
}

fn backends(p: &Plan, k: FrontendKey) -> Vec<String> {
    p.frontends
        .get(&k)
        .unwrap_or_else(|| panic!("no frontend {k}: {p:#?}"))
        .backends
        .iter()
        .map(|b| b.to_string())
        .collect()
}

const SVC: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: http, port: 80, targetPort: 8080}]
"#;

fn slice(endpoints: &str) -> String {
    format!(
        r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-abc, namespace: shop, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: http, port: 8080, protocol: TCP}}]
endpoints:
{endpoints}"#
    )
}

#[test]
fn ready_endpoints_of_the_matching_slice_become_backends() {
    let p = plan(&format!(
        "{SVC}{}",
        slice(
            "- {addresses: [10.0.0.2]}\n- {addresses: [10.0.0.1], conditions: {ready: true}}\n- {addresses: [10.0.0.3], conditions: {ready: false}}\n"
        )
    ));
    assert_eq!(
        backends(&p, key("10.96.0.10", 80, Protocol::Tcp)),
        ["10.0.0.1:8080", "10.0.0.2:8080"],
        "nil ready counts as ready; ready false is left out; sorted"
    );
    assert!(p.problems.is_empty(), "{:?}", p.problems);
}

#[test]
fn terminating_serving_endpoints_are_a_fallback_only() {
    let eps = "- {addresses: [10.0.0.1], conditions: {ready: false, serving: true, terminating: true}}\n- {addresses: [10.0.0.2], conditions: {ready: false, serving: false, terminating: true}}\n";
    let p = plan(&format!("{SVC}{}", slice(eps)));
    assert_eq!(
        backends(&p, key("10.96.0.10", 80, Protocol::Tcp)),
        ["10.0.0.1:8080"]
    );
    let with_ready = format!("{eps}- {{addresses: [10.0.0.9]}}\n");
    let p = plan(&format!("{SVC}{}", slice(&with_ready)));
    assert_eq!(
        backends(&p, key("10.96.0.10", 80, Protocol::Tcp)),
        ["10.0.0.9:8080"]
    );
}

#[test]
fn no_usable_endpoint_leaves_a_rejecting_frontend() {
    let p = plan(SVC);
    assert!(backends(&p, key("10.96.0.10", 80, Protocol::Tcp)).is_empty());
}

#[test]
fn slice_ports_are_matched_by_name_and_protocol() {
    let p = plan(
        r#"
apiVersion: v1
kind: Service
metadata: {name: dns}
spec:
  clusterIP: 10.96.0.53
  ports:
  - {name: dns, port: 53, protocol: UDP, targetPort: 5353}
  - {name: dns-tcp, port: 53, protocol: TCP, targetPort: 5353}
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: dns-1, labels: {kubernetes.io/service-name: dns}}
addressType: IPv4
ports: [{name: dns, port: 5353, protocol: UDP}, {name: dns-tcp, port: 5354, protocol: TCP}]
endpoints: [{addresses: [10.0.0.5]}]
"#,
    );
    let udp = backends(&p, key("10.96.0.53", 53, Protocol::Udp));
    let tcp = backends(&p, key("10.96.0.53", 53, Protocol::Tcp));
    assert_eq!([udp, tcp], [["10.0.0.5:5353"], ["10.0.0.5:5354"]]);
}

#[test]
fn slices_of_another_namespace_or_service_are_ignored() {
    let other = r#"
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: x, namespace: other, labels: {kubernetes.io/service-name: web}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints: [{addresses: [10.9.9.9]}]
"#;
    let p = plan(&format!("{SVC}{other}"));
    assert!(backends(&p, key("10.96.0.10", 80, Protocol::Tcp)).is_empty());
}

#[test]
fn services_the_dataplane_leaves_alone_are_skipped_with_a_reason() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {clusterIP: None, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: ext}
spec: {type: ExternalName, externalName: example.com}
---
apiVersion: v1
kind: Service
metadata: {name: other, labels: {service.kubernetes.io/service-proxy-name: foo}}
spec: {clusterIP: 10.96.0.11, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: labelled, labels: {service.kubernetes.io/headless: ""}}
spec: {clusterIP: 10.96.0.12, ports: [{port: 80}]}
"#;
    let p = plan(yaml);
    assert!(p.frontends.is_empty(), "{:?}", p.frontends);
    let reasons: Vec<(&str, &str)> = p
        .skipped
        .iter()
        .map(|s| (s.service.as_str(), s.reason.as_str()))
        .collect();
    assert_eq!(reasons.len(), 4, "{reasons:?}");
    assert!(reasons.contains(&("default/headless", "clusterIP None: headless")));
    assert!(reasons.contains(&("default/ext", "type ExternalName: DNS only")));
    assert!(
        reasons
            .iter()
            .any(|(s, r)| *s == "default/other" && r.contains("another proxy"))
    );
    assert!(
        reasons
            .iter()
            .any(|(s, r)| *s == "default/labelled" && r.contains("headless"))
    );
}

#[test]
fn client_ip_affinity_defaults_to_three_hours_and_is_validated() {
    let with = |extra: &str| {
        plan(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: a}}\nspec:\n  clusterIP: 10.96.0.10\n  ports: [{{port: 80}}]\n{extra}"
        ))
    };
    let p = with("  sessionAffinity: ClientIP\n");
    let fe = &p.frontends[&key("10.96.0.10", 80, Protocol::Tcp)];
    assert_eq!(fe.affinity_timeout_s, Some(DEFAULT_AFFINITY_TIMEOUT_S));
    let p = with(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 60}}\n",
    );
    assert_eq!(
        p.frontends[&key("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout_s,
        Some(60)
    );
    let p = with("  sessionAffinity: None\n");
    assert_eq!(
        p.frontends[&key("10.96.0.10", 80, Protocol::Tcp)].affinity_timeout_s,
        None
    );
    let p = with(
        "  sessionAffinity: ClientIP\n  sessionAffinityConfig: {clientIP: {timeoutSeconds: 0}}\n",
    );
    assert!(p.frontends.is_empty());
    assert!(p.refused.contains("default/a"));
    assert_eq!(
        p.problems[0].field,
        "spec.sessionAffinityConfig.clientIP.timeoutSeconds"
    );
}

#[test]
fn two_services_on_one_frontend_refuse_the_second_and_name_the_first() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: a}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: b}
spec: {clusterIP: 10.96.0.10, ports: [{port: 80}]}
"#;
    let p = plan(yaml);
    assert_eq!(p.frontends.len(), 1);
    assert_eq!(
        p.frontends.values().next().unwrap().service.as_ref(),
        "default/a"
    );
    assert!(p.refused.contains("default/b"));
    let msg = p.problems[0].to_string();
    assert!(
        msg.contains("Service default/b") && msg.contains("already used by Service default/a"),
        "{msg}"
    );
}

#[test]
fn unsupported_protocols_and_bad_fields_are_named() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: mixed}
spec:
  clusterIP: 10.96.0.10
  ports: [{name: a, port: 80}, {name: s, port: 90, protocol: SCTP}]
"#;
    let p = plan(yaml);
    assert_eq!(p.frontends.len(), 1, "the TCP port is still served");
    assert_eq!(p.problems.len(), 1);
    assert_eq!(p.problems[0].field, "spec.ports[1].protocol");
    assert!(!p.problems[0].refuses_service);

    for (spec, field) in [
        ("{ports: [{port: 80}]}", "spec.clusterIP"),
        (
            "{clusterIP: 10.96.0.300, ports: [{port: 80}]}",
            "spec.clusterIP",
        ),
        (
            "{clusterIP: 10.96.0.10, ports: [{port: 0}]}",
            "spec.ports[0].port",
        ),
        (
            "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: 70000}]}",
            "spec.ports[0].targetPort",
        ),
        (
            "{clusterIP: 10.96.0.10, ports: [{port: 80, targetPort: \"Bad_Name\"}]}",
            "spec.ports[0].targetPort",
        ),
        (
            "{clusterIP: 10.96.0.10, ports: [{name: a, port: 80}, {name: b, port: 80}]}",
            "spec.ports[1].port",
        ),
    ] {
        let p = plan(&format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: x}}\nspec: {spec}\n"
        ));
        assert!(p.frontends.is_empty(), "{spec}");
        assert_eq!(p.problems.len(), 1, "{spec}: {:?}", p.problems);
        assert_eq!(p.problems[0].field, field, "{spec}");
        assert!(
            p.problems[0]
                .to_string()
                .contains("t.yaml#1 (Service default/x)")
        );
    }
}

const V6_SLICE: &str = "\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}
addressType: IPv6
endpoints: [{addresses: ['fd00:10:244::5']}, {addresses: ['fd00:10:244::6']}]
ports: [{port: 8080}]
";

const V4_SLICE: &str = "\
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: ds-v4, labels: {kubernetes.io/service-name: ds}}
addressType: IPv4
endpoints: [{addresses: [10.1.0.5]}]
ports: [{port: 8080}]
";

fn ds(spec: &str) -> String {
    format!(
        "apiVersion: v1\nkind: Service\nmetadata: {{name: ds}}\nspec: {spec}\n{V6_SLICE}{V4_SLICE}"
    )
}

#[test]
fn an_ipv6_service_is_served_by_its_ipv6_slices_only() {
    let p = plan(&ds(
        "{clusterIP: 'fd00::10', ports: [{port: 80, targetPort: 8080}]}",
    ));
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert!(p.skipped.is_empty(), "{:?}", p.skipped);
    assert_eq!(p.frontends.len(), 1, "{:?}", p.frontends.keys());
    let k = key("fd00::10", 80, Protocol::Tcp);
    assert_eq!(k.to_string(), "[fd00::10]:80/TCP");
    assert_eq!(
        backends(&p, k),
        ["[fd00:10:244::5]:8080", "[fd00:10:244::6]:8080"]
    );
}

#[test]
fn a_dual_stack_service_gets_each_family_with_that_familys_endpoints() {
    for (ips, families) in [
        ("['fd00::10', 10.96.0.44]", "[IPv6, IPv4]"),
        ("[10.96.0.44, 'fd00::10']", "[IPv4, IPv6]"),
    ] {
        let first = if ips.starts_with("[10") {
            "10.96.0.44"
        } else {
            "'fd00::10'"
        };
        let p = plan(&ds(&format!(
            "{{clusterIP: {first}, clusterIPs: {ips}, ipFamilies: {families}, \
             ipFamilyPolicy: RequireDualStack, ports: [{{port: 80, targetPort: 8080}}]}}"
        )));
        assert!(p.problems.is_empty(), "{ips}: {:?}", p.problems);
        assert_eq!(p.frontends.len(), 2, "{ips}: {:?}", p.frontends.keys());
        assert_eq!(
            backends(&p, key("10.96.0.44", 80, Protocol::Tcp)),
            ["10.1.0.5:8080"]
        );
        assert_eq!(
            backends(&p, key("fd00::10", 80, Protocol::Tcp)),
            ["[fd00:10:244::5]:8080", "[fd00:10:244::6]:8080"]
        );
    }
}

#[test]
fn a_dual_stack_service_with_one_family_unusable_still_gets_the_other() {
    // The secondary address is not one: reported, the primary served.
    let p = plan(&ds(
        "{clusterIP: 'fd00::10', clusterIPs: ['fd00::10', 255.255.255.255], ports: [{port: 80, targetPort: 8080}]}",
    ));
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].field, "spec.clusterIPs[1]");
    assert!(!p.problems[0].refuses_service);
    assert_eq!(p.frontends.len(), 1);
    assert!(
        p.frontends
            .contains_key(&key("fd00::10", 80, Protocol::Tcp))
    );
    // The primary is unusable: the secondary family is served.
    let p = plan(&ds(
        "{clusterIP: 'ff02::1', clusterIPs: ['ff02::1', 10.96.0.44], ports: [{port: 80, targetPort: 8080}]}",
    ));
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].field, "spec.clusterIP");
    assert!(p.refused.is_empty());
    assert_eq!(
        backends(&p, key("10.96.0.44", 80, Protocol::Tcp)),
        ["10.1.0.5:8080"]
    );
    // A single unusable address still refuses the Service, as before.
    let p = plan(&ds("{clusterIP: 'ff02::1', ports: [{port: 80}]}"));
    assert!(p.frontends.is_empty());
    assert_eq!(p.problems[0].field, "spec.clusterIP");
    assert!(p.problems[0].refuses_service);
}

#[test]
fn a_second_address_of_one_family_and_a_mislabelled_family_are_reported() {
    let p = plan(&ds(
        "{clusterIP: 10.96.0.44, clusterIPs: [10.96.0.44, 10.96.0.45], ipFamilies: [IPv6, IPv4], ports: [{port: 80, targetPort: 8080}]}",
    ));
    let fields: Vec<&str> = p.problems.iter().map(|x| x.field.as_str()).collect();
    assert_eq!(
        fields,
        ["spec.ipFamilies[0]", "spec.clusterIPs[1]"],
        "{:?}",
        p.problems
    );
    assert_eq!(p.frontends.len(), 1);
    assert!(
        p.frontends
            .contains_key(&key("10.96.0.44", 80, Protocol::Tcp))
    );
}

#[test]
fn a_dual_stack_node_port_has_a_frontend_per_family() {
    let p = plan(&ds(
        "{type: NodePort, clusterIP: 10.96.0.44, clusterIPs: [10.96.0.44, 'fd00::10'], ports: [{port: 80, targetPort: 8080, nodePort: 30080}]}",
    ));
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    let v4 = key("0.0.0.0", 30080, Protocol::Tcp);
    let v6 = key("::", 30080, Protocol::Tcp);
    assert_eq!(v4.to_string(), "*:30080/TCP");
    assert_eq!(v6.to_string(), "[*]:30080/TCP");
    assert_eq!(backends(&p, v4), ["10.1.0.5:8080"]);
    assert_eq!(
        backends(&p, v6),
        ["[fd00:10:244::5]:8080", "[fd00:10:244::6]:8080"]
    );
}

#[test]
fn an_address_of_the_wrong_family_in_a_slice_is_reported_and_left_out() {
    let yaml = "apiVersion: v1\nkind: Service\nmetadata: {name: ds}\nspec: {clusterIP: 'fd00::10', ports: [{port: 80, targetPort: 8080}]}\n\
        ---\napiVersion: discovery.k8s.io/v1\nkind: EndpointSlice\n\
        metadata: {name: ds-v6, labels: {kubernetes.io/service-name: ds}}\n\
        addressType: IPv6\nendpoints: [{addresses: [10.1.0.9]}, {addresses: ['fd00:10:244::5']}]\nports: [{port: 8080}]\n";
    let p = plan(yaml);
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].field, "endpoints[0].addresses[0]");
    assert!(p.problems[0].message.contains("not an IPv6 address"));
    assert_eq!(
        backends(&p, key("fd00::10", 80, Protocol::Tcp)),
        ["[fd00:10:244::5]:8080"]
    );
}

const NODEPORT: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: np}
spec:
  type: NodePort
  clusterIP: 10.96.0.30
  externalTrafficPolicy: Local
  externalIPs: [203.0.113.7, 198.51.100.1]
  ports: [{name: http, port: 80, targetPort: 8080, nodePort: 30080}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {name: np-1, labels: {kubernetes.io/service-name: np}}
addressType: IPv4
ports: [{name: http, port: 8080}]
endpoints:
- {addresses: [10.244.1.5], nodeName: node-1}
- {addresses: [10.244.2.5], nodeName: node-2}
"#;

#[test]
fn node_ports_and_external_ips_follow_the_external_traffic_policy() {
    let node = NodeContext {
        name: Some("node-1".into()),
        external_ip_allow: vec!["203.0.113.0/24".parse().unwrap()],
        ..Default::default()
    };
    let p = plan_for(NODEPORT, &node);
    assert_eq!(
        backends(&p, key("10.96.0.30", 80, Protocol::Tcp)),
        ["10.244.1.5:8080", "10.244.2.5:8080"],
        "the ClusterIP keeps every endpoint"
    );
    assert_eq!(
        backends(&p, key("0.0.0.0", 30080, Protocol::Tcp)),
        ["10.244.1.5:8080"]
    );
    assert_eq!(
        backends(&p, key("203.0.113.7", 80, Protocol::Tcp)),
        ["10.244.1.5:8080"]
    );
    assert!(
        !p.frontends
            .contains_key(&key("198.51.100.1", 80, Protocol::Tcp)),
        "outside the allow-list"
    );
    assert_eq!(p.problems.len(), 1);
    assert_eq!(p.problems[0].field, "spec.externalIPs[1]");
}

#[test]
fn internal_traffic_policy_local_keeps_this_nodes_endpoints() {
    let yaml = NODEPORT.replace(
        "externalTrafficPolicy: Local",
        "internalTrafficPolicy: Local",
    );
    let node = NodeContext {
        name: Some("node-2".into()),
        ..Default::default()
    };
    let p = plan_for(&yaml, &node);
    assert_eq!(
        backends(&p, key("10.96.0.30", 80, Protocol::Tcp)),
        ["10.244.2.5:8080"]
    );
    assert_eq!(
        backends(&p, key("0.0.0.0", 30080, Protocol::Tcp)),
        ["10.244.1.5:8080", "10.244.2.5:8080"]
    );
}

#[test]
fn pods_selected_by_a_service_become_endpoints_with_named_ports_resolved() {
    let pod = |name: &str, labels: &str, port: Option<u16>, ip: &str, ready: &str| {
        let ports = port
            .map(|p| format!(", ports: [{{name: client, containerPort: {p}}}]"))
            .unwrap_or_default();
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{{labels}}}}}\n\
             spec:\n  containers: [{{name: c{ports}}}]\n\
             status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"{ready}\"}}]}}\n"
        )
    };
    let yaml = [
        r#"
apiVersion: v1
kind: Service
metadata: {name: redis}
spec:
  clusterIP: 10.96.0.20
  selector: {app: redis}
  ports: [{name: redis, port: 6379, targetPort: client}]
"#
        .to_string(),
        pod(
            "r1",
            "app: redis, tier: db",
            Some(7000),
            "10.244.0.5",
            "True",
        ),
        pod("r2", "app: redis", Some(7001), "10.244.0.6", "True"),
        pod("unready", "app: redis", Some(7000), "10.244.0.7", "False"),
        pod("noport", "app: redis", None, "10.244.0.8", "True"),
        pod("other", "app: web", Some(7000), "10.244.0.9", "True"),
    ]
    .concat();
    let yaml = yaml.as_str();
    let p = plan(yaml);
    assert_eq!(
        backends(&p, key("10.96.0.20", 6379, Protocol::Tcp)),
        ["10.244.0.5:7000", "10.244.0.6:7001"]
    );
    let p = plan(&yaml.replace(
        "  selector: {app: redis}",
        "  selector: {app: redis}\n  publishNotReadyAddresses: true",
    ));
    assert_eq!(
        backends(&p, key("10.96.0.20", 6379, Protocol::Tcp)),
        ["10.244.0.5:7000", "10.244.0.6:7001", "10.244.0.7:7000"]
    );
}

/// As the EndpointSlice controller: a Pod with `podIPs` of both families is
/// an endpoint in the slice of each family, so a dual-stack Service gets
/// both ClusterIPs served from one selector; an IPv4-only Pod only the IPv4.
#[test]
fn dual_stack_pods_become_endpoints_of_each_family() {
    let pod = |name: &str, ips: &[&str]| {
        let list: Vec<String> = ips.iter().map(|ip| format!("{{ip: '{ip}'}}")).collect();
        format!(
            "---\napiVersion: v1\nkind: Pod\nmetadata: {{name: {name}, labels: {{app: web}}}}\n\
             spec: {{containers: [{{name: c}}]}}\n\
             status: {{podIP: '{}', podIPs: [{}], conditions: [{{type: Ready, status: 'True'}}]}}\n",
            ips[0],
            list.join(", ")
        )
    };
    let yaml = [
        r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.30
  clusterIPs: [10.96.0.30, 'fd00:96::30']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8080}]
"#
        .to_string(),
        pod("a", &["10.244.0.5", "fd00:10:244::5"]),
        pod("b", &["10.244.0.6", "fd00:10:244::6"]),
        pod("v4only", &["10.244.0.7"]),
    ]
    .concat();
    let p = plan(&yaml);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(
        backends(&p, key("10.96.0.30", 80, Protocol::Tcp)),
        ["10.244.0.5:8080", "10.244.0.6:8080", "10.244.0.7:8080"]
    );
    assert_eq!(
        backends(&p, key("fd00:96::30", 80, Protocol::Tcp)),
        ["[fd00:10:244::5]:8080", "[fd00:10:244::6]:8080"]
    );
}

/// Mirrored Endpoints of both families give one slice per family.
#[test]
fn mirrored_endpoints_of_both_families_serve_each_cluster_ip() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext}
spec:
  clusterIP: 10.96.0.41
  clusterIPs: [10.96.0.41, 'fd00:96::41']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  ports: [{name: pg, port: 5432}]
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext}
subsets:
- addresses: [{ip: 192.0.2.10}, {ip: '2001:db8::10'}]
  ports: [{name: pg, port: 5433}]
"#;
    let p = plan(yaml);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    assert_eq!(
        backends(&p, key("10.96.0.41", 5432, Protocol::Tcp)),
        ["192.0.2.10:5433"]
    );
    assert_eq!(
        backends(&p, key("fd00:96::41", 5432, Protocol::Tcp)),
        ["[2001:db8::10]:5433"]
    );
}

#[test]
fn endpoints_of_a_selectorless_service_are_mirrored() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: ext-db}
spec: {clusterIP: 10.96.0.40, ports: [{name: pg, port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: ext-db}
subsets:
- addresses: [{ip: 192.0.2.10}]
  notReadyAddresses: [{ip: 192.0.2.11}]
  ports: [{name: pg, port: 5433}]
"#;
    let p = plan(yaml);
    assert_eq!(
        backends(&p, key("10.96.0.40", 5432, Protocol::Tcp)),
        ["192.0.2.10:5433"]
    );
}

#[test]
fn a_refused_service_keeps_its_previous_frontends() {
    let good = plan(&format!("{SVC}{}", slice("- {addresses: [10.0.0.1]}\n")));
    let mut bad = plan(&SVC.replace("targetPort: 8080", "targetPort: 0"));
    assert!(bad.refused.contains("shop/web"), "{bad:?}");
    assert!(bad.frontends.is_empty());
    bad.keep_refused_from(&good);
    assert_eq!(bad.frontends, good.frontends);
}

#[test]
fn load_balancer_source_ranges_apply_to_load_balancer_ips_only() {
    let yaml = r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  loadBalancerSourceRanges: [192.0.2.0/24, " 198.51.100.7/32"]
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.9}]}
"#;
    let p = plan(yaml);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    let lb = &p.frontends[&key("203.0.113.9", 443, Protocol::Tcp)];
    assert_eq!(lb.kind, FrontendKind::LoadBalancer);
    let ranges: Vec<String> = lb
        .source_ranges
        .iter()
        .map(|n| format!("{}/{}", n.addr, n.prefix))
        .collect();
    assert_eq!(ranges, ["192.0.2.0/24", "198.51.100.7/32"]);
    assert!(
        p.frontends[&key("0.0.0.0", 30443, Protocol::Tcp)]
            .source_ranges
            .is_empty()
    );
    assert!(
        p.frontends[&key("10.96.0.50", 443, Protocol::Tcp)]
            .source_ranges
            .is_empty()
    );

    let bad = plan(&yaml.replace("192.0.2.0/24", "192.0.2.0/33"));
    assert!(bad.refused.contains("default/lb"));
    assert_eq!(bad.problems[0].field, "spec.loadBalancerSourceRanges[0]");
}

#[test]
fn health_check_node_ports_count_local_ready_endpoints_only() {
    let yaml = NODEPORT
        .replace("type: NodePort", "type: LoadBalancer\n  healthCheckNodePort: 32000")
        .replace(
            "- {addresses: [10.244.2.5], nodeName: node-2}",
            "- {addresses: [10.244.2.5], nodeName: node-2}\n- {addresses: [10.244.1.6], nodeName: node-1, conditions: {ready: false, serving: true, terminating: true}}",
        );
    let node = |n: &str| NodeContext {
        name: Some(n.into()),
        ..Default::default()
    };
    let p = plan_for(&yaml, &node("node-1"));
    assert_eq!(
        p.health_checks,
        [HealthCheck {
            port: 32000,
            service: "default/np".into(),
            local_endpoints: 1
        }]
    );
    let p = plan_for(&yaml, &node("node-3"));
    assert_eq!(p.health_checks[0].local_endpoints, 0);
    // Only terminating endpoints left on the node: the health check fails,
    // while the NodePort still serves them (KEP-1669).
    let only_terminating = yaml.replace("- {addresses: [10.244.1.5], nodeName: node-1}\n", "");
    let p = plan_for(&only_terminating, &node("node-1"));
    assert_eq!(p.health_checks[0].local_endpoints, 0);
    assert_eq!(
        backends(&p, key("0.0.0.0", 30080, Protocol::Tcp)),
        ["10.244.1.6:8080"]
    );
    // Policy Cluster: no health check.
    let p = plan_for(
        &yaml.replace(
            "externalTrafficPolicy: Local",
            "externalTrafficPolicy: Cluster",
        ),
        &node("node-1"),
    );
    assert!(p.health_checks.is_empty());
}

#[test]
fn topology_hints_narrow_endpoints_to_the_zone_when_every_endpoint_has_one() {
    let yaml = |dist: &str, hint3: &str| {
        format!(
            r#"
apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: 10.96.0.10
{dist}  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: "", port: 80}}]
endpoints:
- {{addresses: [10.0.1.1], zone: a, hints: {{forZones: [{{name: a}}]}}}}
- {{addresses: [10.0.2.1], zone: b, hints: {{forZones: [{{name: b}}]}}}}
- {{addresses: [10.0.1.2], zone: a{hint3}}}
"#
        )
    };
    let in_zone = |z: &str| NodeContext {
        zone: Some(z.into()),
        ..Default::default()
    };
    let k = key("10.96.0.10", 80, Protocol::Tcp);
    let hinted = yaml(
        "  trafficDistribution: PreferClose\n",
        ", hints: {forZones: [{name: a}]}",
    );
    assert_eq!(
        backends(&plan_for(&hinted, &in_zone("a")), k),
        ["10.0.1.1:80", "10.0.1.2:80"]
    );
    assert_eq!(
        backends(&plan_for(&hinted, &in_zone("b")), k),
        ["10.0.2.1:80"]
    );
    // No endpoint hinted for the node's zone, no zone, not asked for, or an
    // endpoint without hints: every endpoint.
    assert_eq!(backends(&plan_for(&hinted, &in_zone("c")), k).len(), 3);
    assert_eq!(
        backends(&plan_for(&hinted, &NodeContext::default()), k).len(),
        3
    );
    let not_asked = yaml("", ", hints: {forZones: [{name: a}]}");
    assert_eq!(backends(&plan_for(&not_asked, &in_zone("a")), k).len(), 3);
    let partial = yaml("  trafficDistribution: PreferClose\n", "");
    assert_eq!(backends(&plan_for(&partial, &in_zone("a")), k).len(), 3);
    let annotated = not_asked.replace(
        "metadata: {name: web}",
        "metadata: {name: web, annotations: {service.kubernetes.io/topology-mode: Auto}}",
    );
    assert_eq!(
        backends(&plan_for(&annotated, &in_zone("b")), k),
        ["10.0.2.1:80"]
    );
}

/// `trafficDistribution` values with their upstream meaning: PreferSameZone
/// as PreferClose; PreferSameNode follows node hints (falling back to zone
/// hints without a ready endpoint for this node); a value this dataplane
/// does not know narrows nothing and is reported on its field.
#[test]
fn traffic_distribution_values_take_their_upstream_meaning() {
    let yaml = |distribution: &str| {
        format!(
            r#"apiVersion: v1
kind: Service
metadata: {{name: web}}
spec:
  clusterIP: 10.96.0.10
  trafficDistribution: {distribution}
  ports: [{{port: 80}}]
---
apiVersion: discovery.k8s.io/v1
kind: EndpointSlice
metadata: {{name: web-1, labels: {{kubernetes.io/service-name: web}}}}
addressType: IPv4
ports: [{{name: "", port: 80}}]
endpoints:
- {{addresses: [10.0.1.1], nodeName: n1, zone: a, hints: {{forZones: [{{name: a}}], forNodes: [{{name: n1}}]}}}}
- {{addresses: [10.0.1.2], nodeName: n2, zone: a, hints: {{forZones: [{{name: a}}], forNodes: [{{name: n2}}]}}}}
- {{addresses: [10.0.2.1], nodeName: n3, zone: b, hints: {{forZones: [{{name: b}}], forNodes: [{{name: n3}}]}}}}
"#
        )
    };
    let node = |name: &str, zone: &str| NodeContext {
        name: Some(name.into()),
        zone: Some(zone.into()),
        ..Default::default()
    };
    let k = key("10.96.0.10", 80, Protocol::Tcp);
    let same_zone = backends(&plan_for(&yaml("PreferSameZone"), &node("n1", "a")), k);
    assert_eq!(same_zone, ["10.0.1.1:80", "10.0.1.2:80"]);
    assert_eq!(
        backends(&plan_for(&yaml("PreferClose"), &node("n1", "a")), k),
        same_zone
    );
    assert_eq!(
        backends(&plan_for(&yaml("PreferSameNode"), &node("n2", "a")), k),
        ["10.0.1.2:80"]
    );
    // No ready endpoint for this node: the zone's.
    assert_eq!(
        backends(&plan_for(&yaml("PreferSameNode"), &node("n9", "b")), k),
        ["10.0.2.1:80"]
    );
    // Node hints are not followed for PreferSameZone.
    assert_eq!(
        backends(&plan_for(&yaml("PreferSameZone"), &node("n2", "a")), k).len(),
        2
    );
    let unknown = plan_for(&yaml("PreferSameRack"), &node("n1", "a"));
    assert_eq!(
        backends(&unknown, k).len(),
        3,
        "an unknown value narrows nothing"
    );
    let p = unknown
        .problems
        .iter()
        .find(|p| p.field == "spec.trafficDistribution")
        .expect("the unknown value is reported");
    assert!(p.message.contains("PreferSameRack"), "{p}");
    assert!(
        unknown.frontends.contains_key(&k),
        "the Service is still programmed"
    );
}

/// A dual-stack LoadBalancer with an IPv6 externalIP and ingress IP.
const DS_LB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: lb}
spec:
  type: LoadBalancer
  clusterIP: 10.96.0.50
  clusterIPs: [10.96.0.50, 'fd00:96::50']
  ipFamilies: [IPv4, IPv6]
  ipFamilyPolicy: RequireDualStack
  externalIPs: ['2001:db8:7::7', 203.0.113.7]
  loadBalancerSourceRanges: [192.0.2.0/24, '2001:db8:1::/48']
  ports: [{port: 443, nodePort: 30443}]
status:
  loadBalancer: {ingress: [{ip: 203.0.113.9}, {ip: '2001:db8:9::9'}]}
"#;

fn ranges_of(p: &Plan, k: FrontendKey) -> Vec<String> {
    p.frontends[&k]
        .source_ranges
        .iter()
        .map(|n| n.to_string())
        .collect()
}

#[test]
fn ipv6_external_and_load_balancer_ips_are_served_with_their_familys_ranges() {
    let node = NodeContext {
        external_ip_allow: vec![
            "203.0.113.0/24".parse().unwrap(),
            "2001:db8:7::/48".parse().unwrap(),
        ],
        ..Default::default()
    };
    let p = plan_for(DS_LB, &node);
    assert!(p.problems.is_empty(), "{:?}", p.problems);
    for (addr, kind) in [
        ("2001:db8:7::7", FrontendKind::ExternalIp),
        ("203.0.113.7", FrontendKind::ExternalIp),
        ("203.0.113.9", FrontendKind::LoadBalancer),
        ("2001:db8:9::9", FrontendKind::LoadBalancer),
    ] {
        assert_eq!(
            p.frontends[&key(addr, 443, Protocol::Tcp)].kind,
            kind,
            "{addr}"
        );
    }
    // Each LoadBalancer IP checks the ranges of its own family.
    let lb4 = ranges_of(&p, key("203.0.113.9", 443, Protocol::Tcp));
    assert_eq!(lb4, ["192.0.2.0/24"]);
    let lb6 = ranges_of(&p, key("2001:db8:9::9", 443, Protocol::Tcp));
    assert_eq!(lb6, ["2001:db8:1::/48"]);
    // Only IPv4 ranges: no IPv6 client passes (a range nobody is in), not all.
    let only4 = plan_for(&DS_LB.replace(", '2001:db8:1::/48'", ""), &node);
    let lb6 = ranges_of(&only4, key("2001:db8:9::9", 443, Protocol::Tcp));
    assert_eq!(lb6, ["::/128"]);
    // An IPv6 externalIP outside the allow-list is named, the rest served.
    let narrow = NodeContext {
        external_ip_allow: vec!["203.0.113.0/24".parse().unwrap()],
        ..Default::default()
    };
    let p = plan_for(DS_LB, &narrow);
    assert_eq!(p.problems.len(), 1, "{:?}", p.problems);
    assert_eq!(p.problems[0].field, "spec.externalIPs[0]");
    assert!(p.problems[0].message.contains("CVE-2020-8554"));
    assert!(
        p.frontends
            .contains_key(&key("203.0.113.7", 443, Protocol::Tcp))
    );
    // A bad IPv6 range refuses the Service, naming it.
    let bad = plan_for(&DS_LB.replace("2001:db8:1::/48", "2001:db8:1::/129"), &node);
    assert!(bad.refused.contains("default/lb"));
    assert_eq!(bad.problems[0].field, "spec.loadBalancerSourceRanges[1]");
}

#[test]
fn ipv6_cluster_ips_are_checked_against_the_ipv6_service_range() {
    let node = NodeContext {
        service_cidrs: vec![
            "10.96.0.0/16".parse().unwrap(),
            "fd00:96::/108".parse().unwrap(),
        ],
        ..Default::default()
    };
    let spec = "{clusterIP: 'fd00:96::10', ports: [{port: 80, targetPort: 8080}]}";
    assert_eq!(plan_for(&ds(spec), &node).frontends.len(), 1);
    let p = plan_for(&ds(&spec.replace("fd00:96::10", "fd00:97::10")), &node);
    assert!(p.frontends.is_empty());
    assert_eq!(p.problems[0].field, "spec.clusterIP");
    assert!(
        p.problems[0]
            .message
            .contains("outside the service range fd00:96::/108"),
        "{}",
        p.problems[0]
    );
    // Only IPv4 ranges given: IPv6 ClusterIPs are not range-checked.
    let v4_only = NodeContext {
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    assert_eq!(
        plan_for(&ds(&spec.replace("fd00:96::10", "fd00:97::10")), &v4_only)
            .frontends
            .len(),
        1
    );
}

#[test]
fn external_ips_are_refused_without_an_allow_list() {
    let p = plan(NODEPORT);
    assert!(
        !p.frontends
            .keys()
            .any(|k| k.addr == "203.0.113.7".parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(p.problems.len(), 2, "{:?}", p.problems);
    assert!(p.problems[0].message.contains("CVE-2020-8554"));
}

#[test]
fn cluster_ips_outside_the_service_range_are_refused() {
    let node = NodeContext {
        service_cidrs: vec!["10.96.0.0/16".parse().unwrap()],
        ..Default::default()
    };
    assert_eq!(plan_for(SVC, &node).frontends.len(), 1);
    let p = plan_for(&SVC.replace("10.96.0.10", "10.100.0.10"), &node);
    assert!(p.frontends.is_empty());
    assert_eq!(p.problems[0].field, "spec.clusterIP");
    assert!(
        p.problems[0]
            .message
            .contains("outside the service range 10.96.0.0/16"),
        "{}",
        p.problems[0]
    );
}

#[test]
fn the_service_already_serving_a_frontend_keeps_it() {
    let svc = |name: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{clusterIP: 10.96.0.10, ports: [{{port: 80}}]}}\n---\n"
        )
    };
    let c = cluster(&svc("zeta"));
    let before = compile(&c.services, &[], &NodeContext::default());
    let c = cluster(&(svc("alpha") + &svc("zeta")));
    let after = compile_after(&c.services, &[], &NodeContext::default(), &before);
    assert_eq!(
        after.frontends.values().next().unwrap().service.as_ref(),
        "default/zeta"
    );
    assert!(after.refused.contains("default/alpha"));
    // Without history the older Service wins, then the name.
    let dated = |name: &str, t: &str| {
        svc(name).replace(
            &format!("name: {name}}}"),
            &format!("name: {name}, creationTimestamp: \"{t}\"}}"),
        )
    };
    let c =
        cluster(&(dated("alpha", "2026-02-01T00:00:00Z") + &dated("zeta", "2026-01-01T00:00:00Z")));
    let p = compile(&c.services, &[], &NodeContext::default());
    assert_eq!(
        p.frontends.values().next().unwrap().service.as_ref(),
        "default/zeta"
    );
}

#[test]
fn two_services_claiming_one_node_port_refuse_the_second() {
    let np = |name: &str, ip: &str| {
        format!(
            "apiVersion: v1\nkind: Service\nmetadata: {{name: {name}}}\nspec: {{type: NodePort, clusterIP: {ip}, ports: [{{port: 80, nodePort: 30080}}]}}\n---\n"
        )
    };
    let p = plan(&(np("a", "10.96.0.1") + &np("b", "10.96.0.2")));
    assert!(p.refused.contains("default/b"));
    assert!(
        p.problems[0]
            .message
            .contains("*:30080/TCP is already used by Service default/a"),
        "{}",
        p.problems[0]
    );
}

#[test]
fn endpoint_slices_of_unknown_services_are_reported() {
    let p = plan(&slice("- {addresses: [10.0.0.1]}\n"));
    assert_eq!(p.problems.len(), 1);
    let shown = p.problems[0].to_string();
    assert!(
        shown.contains("EndpointSlice shop/web-abc") && shown.contains("no Service shop/web"),
        "{shown}"
    );
}
