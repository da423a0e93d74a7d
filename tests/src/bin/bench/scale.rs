//! The agent binary at the sizes and in the shapes users feed it: one
//! `kubectl get svc,endpointslices -A -o yaml` file (a `List` of every
//! object, with what kubectl writes: uids, resource versions, the
//! last-applied annotation, owner references, target references), the
//! same objects in files of 20, and the same objects served by the API
//! server double (with the `managedFields` a real server adds, listed in
//! pages of 500 as kube-rs asks for them). Per run: the start (wall time,
//! the first sync's own time, CPU), peak and resident memory, and for the
//! one-file 10,000-Service case an idle window at the default resync
//! period: CPU per resync and the average share of a core.
use std::{
    collections::BTreeSet,
    fmt::Write as _,
    fs,
    io::{BufWriter, Write as _},
    net::Ipv4Addr,
    path::Path,
    thread,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use integration_tests::{
    agent::{Agent, ManifestDir},
    apiserver::{self, ApiServer, Kind},
};
use serde_json::{Value, json};
use service_agent::dataplane::tables::Tables;

use crate::{
    BACKENDS_PER_SERVICE, backend_ip,
    control_plane::{node_namespace, wait_for_backends},
    vip,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Layout {
    /// One file: `kind: List`, Services first, then slices, as kubectl
    /// writes them.
    OneList,
    /// Files of 20 Services and their slices, one document each.
    SmallFiles,
    /// The same objects listed and watched from the API server double.
    ApiServer,
}

impl Layout {
    fn describe(self) -> &'static str {
        match self {
            Layout::OneList => "one file (`kubectl get -o yaml`, a List)",
            Layout::SmallFiles => "files of 20 Services",
            Layout::ApiServer => "API server",
        }
    }
}

pub struct Idle {
    pub window_s: f64,
    pub resync_s: f64,
    pub cpu_s: f64,
}

impl Idle {
    pub fn share(&self) -> f64 {
        self.cpu_s / self.window_s
    }
    /// CPU per resync, counting everything the agent did in the window
    /// (an upper bound: its timers and the conntrack GC are in it too).
    pub fn per_resync_s(&self) -> f64 {
        self.cpu_s / (self.window_s / self.resync_s).floor().max(1.0)
    }
}

pub struct ScaleRun {
    pub layout: Layout,
    pub services: u32,
    pub file_mib: f64,
    pub result: Result<Measured, String>,
}

pub struct Measured {
    /// Process start to "agent running" (programs loaded, maps filled).
    pub start_s: f64,
    /// The first sync alone, as the agent logs it.
    pub first_sync_s: Option<f64>,
    pub start_cpu_s: f64,
    pub peak_mib: f64,
    pub rss_mib: f64,
    pub idle: Option<Idle>,
}

/// The runs of `cargo xtask bench` (`--quick`: the 10,000-Service ones,
/// with a shorter idle window).
pub fn scale(quick: bool) -> Vec<ScaleRun> {
    let idle = if quick { 90 } else { 300 };
    // The API server at 10,000 only: its double holds every object and
    // every event in this process, and the target is set at 10,000.
    let mut runs = vec![
        (Layout::OneList, 10_000, Some(idle)),
        (Layout::SmallFiles, 10_000, None),
        (Layout::ApiServer, 10_000, None),
    ];
    if !quick {
        runs.extend([
            (Layout::OneList, 100_000, None),
            (Layout::SmallFiles, 100_000, None),
        ]);
    }
    runs.into_iter()
        .map(|(layout, services, idle)| {
            eprintln!("  {} × {services} ...", layout.describe());
            let mib = |bytes: u64| bytes as f64 / (1 << 20) as f64;
            let (file_mib, result) = if layout == Layout::ApiServer {
                match run_agent_api(services) {
                    Ok((bytes, m)) => (mib(bytes), Ok(m)),
                    Err(e) => (0.0, Err(format!("{e:#}"))),
                }
            } else {
                match ManifestDir::new() {
                    Ok(dir) => {
                        let written = write_manifests(&dir.path, layout, services);
                        let file_mib = written.as_ref().map_or(0.0, |b| mib(*b));
                        let idle = idle.map(Duration::from_secs);
                        let result = written.and_then(|_| run_agent(&dir.path, services, idle));
                        (file_mib, result.map_err(|e| format!("{e:#}")))
                    }
                    Err(e) => (0.0, Err(format!("{e:#}"))),
                }
            };
            if let Ok(m) = &result {
                eprintln!(
                    "    start {:.2} s (first sync {:.2} s), {:.2} s CPU, peak {:.0} MiB{}",
                    m.start_s,
                    m.first_sync_s.unwrap_or(f64::NAN),
                    m.start_cpu_s,
                    m.peak_mib,
                    m.idle.as_ref().map_or(String::new(), |i| format!(
                        ", idle {:.2} % of a core, {:.3} s CPU a resync",
                        i.share() * 100.0,
                        i.per_resync_s()
                    ))
                );
            }
            ScaleRun {
                layout,
                services,
                file_mib,
                result,
            }
        })
        .collect()
}

/// Service `i` and its slice as kubectl prints them (block YAML, items of
/// a List: indented by two under `- `).
fn objects(i: u32) -> (String, String) {
    let ns = format!("team-{}", i % 50);
    let name = format!("svc-{i}");
    let uid = |salt: u32| format!("{:08x}-0000-4000-8000-{:012x}", i, salt);
    let svc = format!(
        "- apiVersion: v1
  kind: Service
  metadata:
    annotations:
      kubectl.kubernetes.io/last-applied-configuration: |
        {{\"apiVersion\":\"v1\",\"kind\":\"Service\",\"metadata\":{{\"annotations\":{{}},\"labels\":{{\"app\":\"{name}\"}},\"name\":\"{name}\",\"namespace\":\"{ns}\"}},\"spec\":{{\"ports\":[{{\"name\":\"http\",\"port\":80,\"targetPort\":8080}}],\"selector\":{{\"app\":\"{name}\"}}}}}}
    creationTimestamp: \"2026-11-30T10:00:00Z\"
    labels:
      app: {name}
      app.kubernetes.io/managed-by: Helm
      app.kubernetes.io/part-of: {ns}
    name: {name}
    namespace: {ns}
    resourceVersion: \"{}\"
    uid: {}
  spec:
    clusterIP: {vip}
    clusterIPs:
    - {vip}
    internalTrafficPolicy: Cluster
    ipFamilies:
    - IPv4
    ipFamilyPolicy: SingleStack
    ports:
    - name: http
      port: 80
      protocol: TCP
      targetPort: 8080
    selector:
      app: {name}
    sessionAffinity: None
    type: ClusterIP
  status:
    loadBalancer: {{}}
",
        1000 + i,
        uid(1),
        vip = vip(i)
    );
    let mut eps = String::new();
    for k in 0..BACKENDS_PER_SERVICE {
        let _ = write!(
            eps,
            "  - addresses:
    - {}
    conditions:
      ready: true
      serving: true
      terminating: false
    nodeName: node-{}
    targetRef:
      kind: Pod
      name: {name}-7d4b9c6f5-{k:05}
      namespace: {ns}
      uid: {}
    zone: zone-{}
",
            backend_ip(i, k),
            k % 3,
            uid(100 + k),
            k % 3
        );
    }
    let slice = format!(
        "- addressType: IPv4
  apiVersion: discovery.k8s.io/v1
  endpoints:
{eps}  kind: EndpointSlice
  metadata:
    annotations:
      endpoints.kubernetes.io/last-change-trigger-time: \"2026-11-30T10:00:00Z\"
    creationTimestamp: \"2026-11-30T10:00:00Z\"
    generateName: {name}-
    generation: 1
    labels:
      endpointslice.kubernetes.io/managed-by: endpointslice-controller.k8s.io
      kubernetes.io/service-name: {name}
    name: {name}-x8k2p
    namespace: {ns}
    ownerReferences:
    - apiVersion: v1
      blockOwnerDeletion: true
      controller: true
      kind: Service
      name: {name}
      uid: {}
    resourceVersion: \"{}\"
    uid: {}
  ports:
  - name: http
    port: 8080
    protocol: TCP
",
        uid(1),
        2_000_000 + i,
        uid(2)
    );
    (svc, slice)
}

/// A List item as a document of its own: the item marker and indentation
/// removed.
fn as_document(item: &str) -> String {
    let mut out = String::with_capacity(item.len());
    for line in item.lines() {
        out.push_str(line.get(2..).unwrap_or(""));
        out.push('\n');
    }
    out.push_str("---\n");
    out
}

/// Service `i` and its slice as the API server returns them: the manifest
/// rows, plus the `managedFields` the server keeps (and `kubectl get`
/// hides).
fn api_objects(i: u32) -> anyhow::Result<(Value, Value)> {
    let (svc, slice) = objects(i);
    let item = |text: &str| -> anyhow::Result<Value> {
        let mut items: Vec<Value> = serde_yaml_ng::from_str(text)?;
        items.pop().context("a manifest row holds one item")
    };
    let (mut svc, mut slice) = (item(&svc)?, item(&slice)?);
    svc["metadata"]["managedFields"] = json!([{
        "apiVersion": "v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:metadata": {
                "f:annotations": {".": {}, "f:kubectl.kubernetes.io/last-applied-configuration": {}},
                "f:labels": {".": {}, "f:app": {}, "f:app.kubernetes.io/managed-by": {},
                             "f:app.kubernetes.io/part-of": {}},
            },
            "f:spec": {
                "f:internalTrafficPolicy": {},
                "f:ports": {".": {}, "k:{\"port\":80,\"protocol\":\"TCP\"}": {
                    ".": {}, "f:name": {}, "f:port": {}, "f:protocol": {}, "f:targetPort": {}}},
                "f:selector": {},
                "f:sessionAffinity": {},
                "f:type": {},
            },
        },
        "manager": "kubectl-client-side-apply",
        "operation": "Update",
        "time": "2026-11-30T10:00:00Z",
    }]);
    let owner = slice["metadata"]["ownerReferences"][0]["uid"].clone();
    slice["metadata"]["managedFields"] = json!([{
        "apiVersion": "discovery.k8s.io/v1",
        "fieldsType": "FieldsV1",
        "fieldsV1": {
            "f:addressType": {},
            "f:endpoints": {},
            "f:metadata": {
                "f:annotations": {".": {}, "f:endpoints.kubernetes.io/last-change-trigger-time": {}},
                "f:generateName": {},
                "f:labels": {".": {}, "f:endpointslice.kubernetes.io/managed-by": {},
                             "f:kubernetes.io/service-name": {}},
                "f:ownerReferences": {".": {}, format!("k:{{\"uid\":{owner}}}"): {}},
            },
            "f:ports": {},
        },
        "manager": "kube-controller-manager",
        "operation": "Update",
        "time": "2026-11-30T10:00:00Z",
    }]);
    Ok((svc, slice))
}

/// Writes the manifests; returns their size in bytes.
fn write_manifests(dir: &Path, layout: Layout, services: u32) -> anyhow::Result<u64> {
    let mut bytes = 0u64;
    match layout {
        Layout::OneList => {
            let path = dir.join("all.yaml");
            let mut f = BufWriter::new(fs::File::create(&path)?);
            f.write_all(b"apiVersion: v1\nitems:\n")?;
            for i in 0..services {
                f.write_all(objects(i).0.as_bytes())?;
            }
            for i in 0..services {
                f.write_all(objects(i).1.as_bytes())?;
            }
            f.write_all(b"kind: List\nmetadata:\n  resourceVersion: \"\"\n")?;
            f.flush()?;
            bytes += fs::metadata(&path)?.len();
        }
        Layout::SmallFiles => {
            for first in (0..services).step_by(20) {
                let mut text = String::new();
                for i in first..(first + 20).min(services) {
                    let (s, e) = objects(i);
                    text.push_str(&as_document(&s));
                    text.push_str(&as_document(&e));
                }
                let path = dir.join(format!("svc-{first:06}.yaml"));
                fs::write(&path, &text)?;
                bytes += text.len() as u64;
            }
        }
        Layout::ApiServer => anyhow::bail!("the API server's objects are served, not written"),
    }
    Ok(bytes)
}

/// The map sizes an operator sets for `services` Services of
/// BACKENDS_PER_SERVICE endpoints, beyond what the defaults hold (65,536
/// frontends, 262,144 SERVICES entries, 131,072 backends): a frontend
/// takes a master and a slot a backend.
fn map_sizes(services: u32) -> Vec<String> {
    let frontends = services.next_power_of_two().max(65_536);
    let entries = services * (BACKENDS_PER_SERVICE + 1);
    let backends = services * BACKENDS_PER_SERVICE;
    if entries <= 262_144 && backends <= 131_072 {
        return vec![];
    }
    [
        ("--frontends-max", frontends + 1),
        ("--services-max", entries + entries / 8),
        ("--backends-max", backends + backends / 8),
    ]
    .into_iter()
    .flat_map(|(flag, n)| [flag.to_string(), n.to_string()])
    .collect()
}

fn run_agent(dir: &Path, services: u32, idle: Option<Duration>) -> anyhow::Result<Measured> {
    let ns = node_namespace()?;
    // The default resync period when idle is measured (what users run),
    // none in the middle of a start otherwise.
    let mut flags: Vec<String> = vec!["--metrics-addr".into(), "off".into()];
    if idle.is_none() {
        flags.extend(["--resync-seconds".into(), "3600".into()]);
    }
    flags.extend(map_sizes(services));
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let started = Instant::now();
    let agent = Agent::start_nowait(&ns, dir, &flags)?;
    measure(agent, started, services, idle)
}

/// The agent on the API server double holding `services` Services and
/// their slices; returns the objects' size as JSON and the measurements.
fn run_agent_api(services: u32) -> anyhow::Result<(u64, Measured)> {
    let ns = node_namespace()?;
    let api = ApiServer::start(&ns)?;
    api.apply(Kind::Node, apiserver::node("node-1", "zone-a"));
    let mut bytes = 0u64;
    for i in 0..services {
        let (svc, slice) = api_objects(i)?;
        bytes += (svc.to_string().len() + slice.to_string().len()) as u64;
        api.apply(Kind::Service, svc);
        api.apply(Kind::EndpointSlice, slice);
    }
    let flags = [
        "--node-name",
        "node-1",
        "--metrics-addr",
        "off",
        "--resync-seconds",
        "3600",
    ];
    let started = Instant::now();
    let agent = Agent::start_kube(&ns, api.kubeconfig(), &flags)?;
    // The agent goes before the server it watches.
    let measured = measure(agent, started, services, None);
    Ok((bytes, measured?))
}

/// Waits for a started agent to have every Service in the maps, then
/// measures it (and its idle CPU over `idle`).
fn measure(
    mut agent: Agent,
    started: Instant,
    services: u32,
    idle: Option<Duration>,
) -> anyhow::Result<Measured> {
    agent.wait_log_from(0, "agent running", Duration::from_secs(600))?;
    let start_s = started.elapsed().as_secs_f64();
    let start_cpu_s = agent.cpu_seconds().unwrap_or(f64::NAN);
    // It is all there, not only started.
    let tables = Tables::open_pinned(&agent.pin_dir).context("opening the agent's pinned maps")?;
    let last = services - 1;
    let want: BTreeSet<Ipv4Addr> = (0..BACKENDS_PER_SERVICE)
        .map(|k| backend_ip(last, k))
        .collect();
    wait_for_backends(&tables, last, &want, Duration::from_secs(10))?;
    let first_sync_s = first_sync(&agent.log_text());
    let idle = match idle {
        Some(window) => {
            let before = agent.cpu_seconds().unwrap_or(f64::NAN);
            thread::sleep(window);
            Some(Idle {
                window_s: window.as_secs_f64(),
                resync_s: 30.0,
                cpu_s: agent.cpu_seconds().unwrap_or(f64::NAN) - before,
            })
        }
        None => None,
    };
    Ok(Measured {
        start_s,
        first_sync_s,
        start_cpu_s,
        peak_mib: agent.status_kib("VmHWM").unwrap_or(0) as f64 / 1024.0,
        rss_mib: agent.status_kib("VmRSS").unwrap_or(0) as f64 / 1024.0,
        idle,
    })
}

/// The first "maps synced" line's `elapsed_ms`, in seconds.
fn first_sync(log: &str) -> Option<f64> {
    let line = log.lines().find(|l| l.contains("maps synced"))?;
    let v = line
        .split("elapsed_ms=")
        .nth(1)?
        .split_whitespace()
        .next()?;
    v.parse::<f64>().ok().map(|ms| ms / 1e3)
}

pub fn report(md: &mut String, runs: &[ScaleRun], targets: &mut Vec<(String, bool, String)>) {
    let _ = writeln!(
        md,
        "## The agent at scale, from manifests and from the API server\n\n\
         The agent binary on a manifest directory, {BACKENDS_PER_SERVICE} endpoints a Service, objects as \
         `kubectl get svc,endpointslices -A -o yaml` prints them (uids, resource versions, the last-applied \
         annotation, owner and target references); and on the API server double serving the same objects \
         with their `managedFields`, listed in pages of 500 and then watched (size: the objects as JSON). Start: process start to `agent running` (programs loaded, \
         every Service in the maps, checked by reading the last one back); first sync: the agent's own time for \
         it. Memory: VmHWM (peak) and VmRSS after. Idle: CPU over a window with the default 30 s resync.\n\n\
         | layout | Services | size (MiB) | start (s) | first sync (s) | start CPU (s) | peak / after (MiB) | idle share of a core | CPU a resync (s) |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|"
    );
    for r in runs {
        match &r.result {
            Err(e) => {
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | not measured: {} | | | | | |",
                    r.layout.describe(),
                    r.services,
                    r.file_mib,
                    e.replace('|', "/").lines().next().unwrap_or("")
                );
            }
            Ok(m) => {
                let (share, per) = m.idle.as_ref().map_or(("".into(), "".into()), |i| {
                    (
                        format!("{:.2} % ({:.0} s)", i.share() * 100.0, i.window_s),
                        format!("{:.3}", i.per_resync_s()),
                    )
                });
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.0} | {:.2} | {} | {:.2} | {:.0} / {:.0} | {share} | {per} |",
                    r.layout.describe(),
                    r.services,
                    r.file_mib,
                    m.start_s,
                    m.first_sync_s.map_or("n/a".into(), |s| format!("{s:.2}")),
                    m.start_cpu_s,
                    m.peak_mib,
                    m.rss_mib
                );
            }
        }
    }
    let _ = writeln!(md);
    let find = |layout, n| {
        runs.iter()
            .find(|r| r.layout == layout && r.services == n)
            .and_then(|r| r.result.as_ref().ok())
    };
    let one = find(Layout::OneList, 10_000);
    let sync = one.and_then(|m| m.first_sync_s);
    targets.push((
        "one file of 10,000 Services × 10 endpoints programmed (first sync) in < 2 s".into(),
        sync.is_some_and(|s| s < 2.0),
        sync.map_or("n/a".into(), |s| format!("{s:.2} s")),
    ));
    let idle = one.and_then(|m| m.idle.as_ref());
    targets.push((
        "periodic resync of 10,000 Services < 0.5 s CPU".into(),
        idle.is_some_and(|i| i.per_resync_s() < 0.5),
        idle.map_or("n/a".into(), |i| format!("{:.3} s", i.per_resync_s())),
    ));
    targets.push((
        "idle agent at 10,000 Services < 1 % of a core".into(),
        idle.is_some_and(|i| i.share() < 0.01),
        idle.map_or("n/a".into(), |i| format!("{:.2} %", i.share() * 100.0)),
    ));
    for layout in [Layout::OneList, Layout::SmallFiles, Layout::ApiServer] {
        let m = find(layout, 10_000);
        targets.push((
            format!(
                "agent peak memory (VmHWM) at 10,000 Services < 64 MiB, {}",
                layout.describe()
            ),
            m.is_some_and(|m| m.peak_mib < 64.0),
            m.map_or("n/a".into(), |m| format!("{:.0} MiB", m.peak_mib)),
        ));
    }
}
