//! The manifest source: parsing, the last good state, and the per-Service
//! index against the full compile.
use std::{collections::BTreeSet, fs};

use super::*;
use crate::{
    model::ServiceId,
    plan::{self, Incremental, NodeContext, Plan},
};

const GOOD: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: redis, namespace: db}
spec: {clusterIP: 10.96.0.20, selector: {app: redis}, ports: [{name: redis, port: 6379, targetPort: redis}]}
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
    let text =
        "apiVersion: v1\nkind: Service\nmetadata: {name: web}\nspec:\n  ports: [{port: eighty}]\n";
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

/// The planner fed Service by Service from the index, as the agent does.
fn incremental(md: &ManifestDir, planner: &mut Incremental, ids: &BTreeSet<ServiceId>) {
    for id in ids {
        let (services, slices) = md.objects(id);
        planner.set(id.clone(), services, slices);
    }
    planner.set_unlabeled(&md.unlabeled_slices());
    planner.commit();
}

fn full(md: &ManifestDir, previous: &Plan) -> Plan {
    let c = md.cluster();
    let node = NodeContext::default();
    let mut p = plan::compile_after(&c.services, &c.all_endpoint_slices(), &node, previous);
    p.keep_refused_from(previous);
    p
}

const WEB: &str = r#"
apiVersion: v1
kind: Service
metadata: {name: web}
spec:
  clusterIP: 10.96.0.10
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: http}]
---
apiVersion: v1
kind: Service
metadata: {name: db}
spec: {clusterIP: 10.96.0.11, ports: [{port: 5432}]}
---
apiVersion: v1
kind: Endpoints
metadata: {name: db}
subsets: [{addresses: [{ip: 10.1.0.9}], ports: [{port: 5432}]}]
"#;

fn pods(ips: &[&str]) -> String {
    ips.iter()
        .enumerate()
        .map(|(i, ip)| {
            format!(
                "apiVersion: v1\nkind: Pod\nmetadata: {{name: web-{i}, labels: {{app: web, tier: x}}}}\n\
                 spec: {{containers: [{{name: c, ports: [{{name: http, containerPort: 8080}}]}}]}}\n\
                 status: {{podIP: {ip}, conditions: [{{type: Ready, status: \"True\"}}]}}\n---\n"
            )
        })
        .collect()
}

#[test]
fn per_service_objects_give_the_full_compile_and_a_pod_edit_names_its_service() {
    let dir = std::env::temp_dir().join(format!("svc-manifest-idx-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    fs::write(dir.join("a.yaml"), WEB).unwrap();
    fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.2"])).unwrap();
    let mut md = ManifestDir::default();
    md.load_all(&dir);
    let mut planner = Incremental::default();
    let ids: BTreeSet<ServiceId> = md.ids().cloned().collect();
    incremental(&md, &mut planner, &ids);
    let expected = full(&md, &Plan::default());
    assert_eq!(planner.plan(), &expected);
    assert_eq!(expected.frontends.len(), 2, "{expected:?}");

    fs::write(dir.join("pods.yaml"), pods(&["10.1.0.1", "10.1.0.3"])).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("pods.yaml")]));
    assert_eq!(
        changes.services,
        BTreeSet::from([ServiceId::new("default", "web")])
    );
    let previous = planner.plan().clone();
    incremental(&md, &mut planner, &changes.services);
    let expected = full(&md, &previous);
    assert_eq!(planner.plan(), &expected);
    let web = expected
        .frontends
        .values()
        .find(|f| f.service == "default/web")
        .unwrap();
    assert_eq!(
        web.backends
            .iter()
            .map(|b| b.to_string())
            .collect::<Vec<_>>(),
        ["10.1.0.1:8080", "10.1.0.3:8080"]
    );

    // An unchanged rewrite names nothing; a removed file takes its objects.
    fs::write(dir.join("a.yaml"), WEB).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
    assert!(changes.services.is_empty(), "{changes:?}");
    fs::remove_file(dir.join("a.yaml")).unwrap();
    let changes = md.load_paths(&dir, &BTreeSet::from([dir.join("a.yaml")]));
    assert_eq!(changes.services.len(), 2);
    let previous = planner.plan().clone();
    incremental(&md, &mut planner, &changes.services);
    assert_eq!(planner.plan(), &full(&md, &previous));
    assert!(planner.plan().frontends.is_empty());
    fs::remove_dir_all(&dir).unwrap();
}
