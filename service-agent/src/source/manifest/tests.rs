//! The manifest source: parsing and the last good state. The per-Service
//! index is checked against the full compile in the planner's tests.
use std::fs;

use super::*;

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
