//! The deployment manifests parse as the Kubernetes types they claim to be,
//! grant no more than kube-proxy's role, and run the agent with arguments it
//! accepts and the capabilities it needs.
use std::collections::BTreeSet;

use clap::Parser as _;
use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::ServiceAccount,
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use service_agent::cli::{Cli, Command};

fn documents() -> Vec<serde_yaml_ng::Value> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/service-agent.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    serde_yaml_ng::Deserializer::from_str(&text)
        .map(|d| serde::Deserialize::deserialize(d).unwrap())
        .collect()
}

fn of_kind<T: serde::de::DeserializeOwned>(kind: &str) -> Vec<T> {
    documents()
        .into_iter()
        .filter(|d| d["kind"].as_str() == Some(kind))
        .map(|d| serde_yaml_ng::from_value(d).unwrap_or_else(|e| panic!("{kind}: {e}")))
        .collect()
}

#[test]
fn the_cluster_role_grants_what_kube_proxy_has_and_nothing_more() {
    let allowed: BTreeSet<(&str, &str, &str)> = [
        ("", "services", "list"),
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "list"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "get"),
        ("", "nodes", "list"),
        ("", "nodes", "watch"),
        ("", "events", "create"),
        ("", "events", "patch"),
        ("events.k8s.io", "events", "create"),
        ("events.k8s.io", "events", "patch"),
    ]
    .into();
    let roles: Vec<ClusterRole> = of_kind("ClusterRole");
    assert_eq!(roles.len(), 1);
    let mut granted = BTreeSet::new();
    for rule in roles[0].rules.iter().flatten() {
        assert!(rule.resource_names.is_none() && rule.non_resource_urls.is_none());
        for g in rule.api_groups.iter().flatten() {
            for r in rule.resources.iter().flatten() {
                for v in &rule.verbs {
                    granted.insert((g.clone(), r.clone(), v.clone()));
                }
            }
        }
    }
    for (g, r, v) in &granted {
        assert!(
            allowed.contains(&(g.as_str(), r.as_str(), v.as_str())),
            "grants {v} on {g}/{r}"
        );
    }
    // The agent needs the watches it makes.
    for (g, r, v) in [
        ("", "services", "watch"),
        ("discovery.k8s.io", "endpointslices", "watch"),
        ("", "nodes", "watch"),
    ] {
        assert!(granted.contains(&(g.to_string(), r.to_string(), v.to_string())));
    }
    let bindings: Vec<ClusterRoleBinding> = of_kind("ClusterRoleBinding");
    let accounts: Vec<ServiceAccount> = of_kind("ServiceAccount");
    assert_eq!(bindings[0].role_ref.name, "service-agent");
    let subject = &bindings[0].subjects.as_ref().unwrap()[0];
    assert_eq!(Some(&subject.name), accounts[0].metadata.name.as_ref());
}

#[test]
fn the_daemon_set_runs_the_agent_with_host_networking_and_named_capabilities() {
    let ds: Vec<DaemonSet> = of_kind("DaemonSet");
    let pod = ds[0].spec.template.spec.as_ref().unwrap();
    assert_eq!(pod.host_network, Some(true));
    assert_eq!(pod.service_account_name.as_deref(), Some("service-agent"));
    let c = &pod.containers[0];
    let sc = c.security_context.as_ref().unwrap();
    assert_ne!(sc.privileged, Some(true));
    let caps = sc.capabilities.as_ref().unwrap();
    assert_eq!(caps.drop.as_deref(), Some(&["ALL".to_string()][..]));
    assert_eq!(
        caps.add.as_deref().unwrap(),
        ["BPF", "NET_ADMIN", "PERFMON"]
    );
    let mounts: BTreeSet<&str> = c
        .volume_mounts
        .iter()
        .flatten()
        .map(|m| m.mount_path.as_str())
        .collect();
    assert!(
        mounts.contains("/sys/fs/bpf"),
        "pins must land on the host's bpffs"
    );
    // The arguments are ones the agent accepts.
    let mut argv = vec!["service-agent".to_string()];
    argv.extend(c.args.clone().unwrap());
    let cli = Cli::try_parse_from(&argv).unwrap_or_else(|e| panic!("{argv:?}: {e}"));
    let Command::Run(_) = cli.command else {
        panic!("the container does not run `service-agent run`");
    };
    assert!(c.env.iter().flatten().any(|e| e.name == "NODE_NAME"));
}
