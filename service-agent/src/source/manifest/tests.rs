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

/// The file reader splits documents and List items; it must give what the
/// whole-text parser gives, objects and errors alike.
#[test]
fn reading_a_file_in_pieces_gives_what_the_whole_text_gives() {
    let item = |name: &str, ip: &str| {
        format!(
            "- apiVersion: v1\n  kind: Service\n  metadata:\n    name: {name}\n    annotations:\n      note: |\n        a block scalar\n        - not an item\n  spec:\n    clusterIP: {ip}\n    ports:\n    - port: 80\n"
        )
    };
    let slice = "- apiVersion: discovery.k8s.io/v1\n  kind: EndpointSlice\n  metadata: {name: a-1, labels: {kubernetes.io/service-name: a}}\n  addressType: IPv4\n  endpoints:\n  - addresses: [10.1.0.5]\n  ports: [{port: 80}]\n";
    let indented = |t: &str| t.lines().map(|l| format!("  {l}\n")).collect::<String>();
    let kubectl = format!(
        "apiVersion: v1\nitems:\n{}{}# a comment between items\n\n{slice}kind: List\nmetadata:\n  resourceVersion: \"\"\n",
        item("a", "10.96.0.1"),
        item("b", "10.96.0.2")
    );
    let cases: Vec<(&str, String)> = vec![
        ("documents", GOOD.to_string()),
        ("kubectl list", kubectl.clone()),
        ("list and documents", format!("{GOOD}---\n{kubectl}---\n{GOOD}")),
        (
            "indented items",
            format!(
                "apiVersion: v1\nkind: List\nitems:\n{}",
                indented(&item("c", "10.96.0.3"))
            ),
        ),
        ("crlf", kubectl.replace('\n', "\r\n")),
        (
            "a bad item",
            format!(
                "apiVersion: v1\nitems:\n{}- apiVersion: v1\n  kind: Service\n  metadata: {{name: bad}}\n  spec: {{ports: [{{port: eighty}}]}}\nkind: List\n",
                item("a", "10.96.0.1")
            ),
        ),
        (
            "a bad item of another kind of list",
            "apiVersion: apps/v1\nitems:\n- {kind: Deployment}\n- apiVersion: v1\n  kind: Service\n  spec: {ports: [{port: eighty}]}\nkind: DeploymentList\n".to_string(),
        ),
        ("empty items", "apiVersion: v1\nkind: List\nitems: []\n".to_string()),
        (
            "empty documents",
            format!("# only a comment\n---\n---\n{GOOD}---\n...\n"),
        ),
        (
            "an error after empty documents",
            "---\n---\napiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {ports: [{port: x}]}\n".to_string(),
        ),
        (
            "content on the marker line",
            format!("--- {{apiVersion: v1, kind: Service, metadata: {{name: m}}}}\n{GOOD}"),
        ),
        (
            "an anchor shared by items",
            "apiVersion: v1\nkind: List\nitems:\n- &svc {apiVersion: v1, kind: Service, metadata: {name: p}}\n- *svc\n".to_string(),
        ),
        ("broken yaml in an item", format!("apiVersion: v1\nitems:\n- a: [1, 2\n{slice}kind: List\n")),
        ("items as a mapping", "apiVersion: v1\nkind: List\nitems:\n  a: b\n".to_string()),
    ];
    let dir = std::env::temp_dir().join(format!("svc-manifest-stream-{}", std::process::id()));
    fs::create_dir_all(&dir).unwrap();
    for (what, text) in &cases {
        let path = dir.join("f.yaml");
        fs::write(&path, text).unwrap();
        let name = path.display().to_string();
        let whole = parse_str(text, &name).map_err(|e| e.to_string());
        let pieces = parse_file(&path).map_err(|e| e.to_string());
        match (&whole, &pieces) {
            (Ok(a), Ok(b)) => {
                assert_eq!(a.services, b.services, "{what}");
                assert_eq!(a.endpoint_slices, b.endpoint_slices, "{what}");
                assert_eq!(a.endpoints, b.endpoints, "{what}");
                assert_eq!(a.pods, b.pods, "{what}");
            }
            _ => assert_eq!(whole.err(), pieces.err(), "{what}"),
        }
    }
    // And the splitter did the reading where it should (reading whole
    // gives the same answers, so only this tells them apart).
    let streamed = |t: &str| {
        !matches!(
            super::stream::parse_stream::<FileObjects>(t.as_bytes(), "s.yaml"),
            Err(super::stream::Stream::ReadWhole)
        )
    };
    for (what, text) in &cases {
        let whole = matches!(
            *what,
            "content on the marker line"
                | "an anchor shared by items"
                | "broken yaml in an item"
                | "items as a mapping"
        );
        assert_eq!(streamed(text), !whole, "{what}");
    }
    // The kubectl file does give its objects.
    let objs = parse_str(&kubectl, "k.yaml").unwrap();
    assert_eq!((objs.services.len(), objs.endpoint_slices.len()), (2, 1));
    fs::remove_dir_all(&dir).unwrap();
}
