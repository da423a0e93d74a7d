//! The sample Grafana dashboard (`deploy/grafana-dashboard.json`) queries
//! only what the agent exports: a renamed metric fails here, not on a
//! user's screen.
use std::collections::BTreeSet;

use super::Metrics;

const DASHBOARD: &str = include_str!(concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/../deploy/grafana-dashboard.json"
));

/// The sample names a scrape can carry, from the `# TYPE` lines: a
/// counter's samples end in `_total`, a histogram's in `_bucket`, `_sum`
/// and `_count`.
fn exported() -> BTreeSet<String> {
    let text = Metrics::default().encode().unwrap();
    let mut names = BTreeSet::new();
    for line in text.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else {
            continue;
        };
        let (name, kind) = rest.split_once(' ').unwrap();
        match kind {
            "counter" => drop(names.insert(format!("{name}_total"))),
            "histogram" => {
                for s in ["_bucket", "_sum", "_count"] {
                    names.insert(format!("{name}{s}"));
                }
            }
            _ => drop(names.insert(name.to_string())),
        }
    }
    names
}

/// Every string in the JSON under a key named `expr`, `query` or `definition`.
fn queries(v: &serde_json::Value, out: &mut Vec<String>) {
    match v {
        serde_json::Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr" | "query" | "definition", serde_json::Value::String(s)) => {
                        out.push(s.clone())
                    }
                    _ => queries(v, out),
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|v| queries(v, out)),
        _ => {}
    }
}

fn metric_names(query: &str) -> Vec<(usize, &str)> {
    let mut out = vec![];
    let mut from = 0;
    while let Some(i) = query[from..].find("service_agent_") {
        let start = from + i;
        let len = query[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(query.len() - start);
        out.push((start, &query[start..start + len]));
        from = start + len;
    }
    out
}

#[test]
fn every_metric_the_dashboard_queries_is_exported() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    let vars = dashboard["templating"]["list"].as_array().unwrap();
    assert!(
        vars.iter()
            .any(|v| v["type"] == "datasource" && v["query"] == "prometheus"),
        "no Prometheus datasource variable"
    );
    let mut qs = vec![];
    queries(&dashboard, &mut qs);
    let exported = exported();
    let mut used = BTreeSet::new();
    for q in &qs {
        for (at, name) in metric_names(q) {
            assert!(
                exported.contains(name),
                "{name} (in {q:?}) is not exported; exported: {exported:?}"
            );
            // rate() of a gauge is meaningless: only counters and buckets.
            if q[..at].ends_with("rate(") {
                assert!(
                    name.ends_with("_total") || name.ends_with("_bucket"),
                    "rate() over {name}, which is not a counter"
                );
            }
            used.insert(name);
        }
    }
    for want in [
        "service_agent_sync_proxy_rules_duration_seconds_bucket",
        "service_agent_network_programming_duration_seconds_bucket",
        "service_agent_packets_by_reason_total",
        "service_agent_frontend_packets_total",
        "service_agent_map_entries",
        "service_agent_map_capacity",
        "service_agent_sync_errors_total",
        "service_agent_sync_proxy_rules_endpoint_changes_total",
    ] {
        assert!(used.contains(want), "the dashboard has no panel on {want}");
    }
}
