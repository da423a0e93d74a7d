//! When the agent cannot reach the API server, its log names the cause a
//! person can act on, not only "client error (Connect)": nothing listening,
//! an untrusted certificate, a refusal by RBAC; and a failing watch reaches
//! `/healthz`, `/metrics` and `list` until it recovers.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    process::{Child, Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use integration_tests::{
    agent::{Agent, ManifestDir},
    apiserver::{self, ApiServer, Kind},
    netns::Netns,
    topology::Topology,
    traffic,
};

const WAIT: Duration = Duration::from_secs(20);

fn kubeconfig(dir: &ManifestDir, server: &str) -> std::path::PathBuf {
    dir.write(
        "kubeconfig",
        &format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {{server: \"{server}\"}}\nusers:\n- name: u\n  user: {{token: t}}\ncontexts:\n- name: c\n  context: {{cluster: c, user: u}}\ncurrent-context: c\n"
        ),
    )
    .unwrap();
    dir.path.join("kubeconfig")
}

/// A port nobody listens on in `ns` (a fresh namespace: nothing takes it back).
fn free_port(ns: &Netns) -> u16 {
    ns.within(|| TcpListener::bind("127.0.0.1:0").map(|l| l.local_addr().unwrap().port()))
        .unwrap()
        .unwrap()
}

fn agent_logs(node: &Netns, server: &str, what: &str) -> String {
    let dir = ManifestDir::new().unwrap();
    let kc = kubeconfig(&dir, server);
    let mut agent = Agent::start_kube(node, &kc, &["--metrics-addr", "off"]).unwrap();
    agent.wait_log_from(0, what, WAIT).unwrap();
    agent.log_text()
}

#[test]
fn a_refused_connection_is_named() {
    let topo = one_node();
    let node = &topo.nodes[0].ns;
    let port = free_port(node);
    let log = agent_logs(
        node,
        &format!("http://127.0.0.1:{port}"),
        "nothing listens at the server address",
    );
    assert!(log.contains("Connection refused"), "{log}");
}

/// `openssl s_server` with a self-signed certificate in a namespace; killed on drop.
struct TlsServer {
    child: Child,
    _dir: ManifestDir,
}

impl TlsServer {
    fn start(ns: &Netns, port: u16) -> Self {
        let dir = ManifestDir::new().unwrap();
        let (key, cert) = (dir.path.join("key.pem"), dir.path.join("cert.pem"));
        let out = Command::new("openssl")
            .args(["req", "-x509", "-newkey", "ec", "-pkeyopt"])
            .args(["ec_paramgen_curve:prime256v1", "-nodes", "-days", "1"])
            .args([
                "-subj",
                "/CN=127.0.0.1",
                "-addext",
                "subjectAltName=IP:127.0.0.1",
            ])
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let child = Command::new("nsenter")
            .arg(format!("--net={}", ns.path()))
            .args(["openssl", "s_server", "-quiet", "-www", "-accept"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-cert")
            .arg(&cert)
            .arg("-key")
            .arg(&key)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("openssl s_server");
        let s = Self { child, _dir: dir };
        let deadline = Instant::now() + Duration::from_secs(10);
        let to = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        while ns.within(move || TcpStream::connect(to).is_err()).unwrap() {
            assert!(Instant::now() < deadline, "s_server did not listen");
            thread::sleep(Duration::from_millis(50));
        }
        s
    }
}

impl Drop for TlsServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn an_untrusted_certificate_is_named() {
    let topo = one_node();
    let node = &topo.nodes[0].ns;
    let port = free_port(node);
    let _tls = TlsServer::start(node, port);
    let log = agent_logs(
        node,
        &format!("https://127.0.0.1:{port}"),
        "the API server's certificate is not accepted",
    );
    assert!(log.contains("invalid peer certificate"), "{log}");
}

/// Answers every request with 403 and a Status, as an API server does
/// when RBAC denies the account; stops on drop.
struct Forbidding {
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    port: u16,
}

impl Forbidding {
    fn start(ns: &Netns) -> Self {
        let listener = ns
            .within(|| TcpListener::bind("127.0.0.1:0"))
            .unwrap()
            .unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        let thread = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let Ok((mut c, _)) = listener.accept() else {
                    thread::sleep(Duration::from_millis(10));
                    continue;
                };
                let _ = c.set_nonblocking(false);
                let _ = c.set_read_timeout(Some(Duration::from_secs(1)));
                let mut r = BufReader::new(c.try_clone().unwrap());
                let mut line = String::new();
                while r.read_line(&mut line).is_ok_and(|n| n > 0) && line.trim() != "" {
                    line.clear();
                }
                let body = r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"services is forbidden: User \"system:serviceaccount:kube-system:service-agent\" cannot list resource \"services\"","reason":"Forbidden","code":403}"#;
                let _ = write!(
                    c,
                    "HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                );
            }
        });
        Self {
            stop,
            thread: Some(thread),
            port,
        }
    }
}

impl Drop for Forbidding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[test]
fn a_refusal_by_rbac_is_named() {
    let topo = one_node();
    let node = &topo.nodes[0].ns;
    let api = Forbidding::start(node);
    let log = agent_logs(
        node,
        &format!("http://127.0.0.1:{}", api.port),
        "lacks RBAC permission",
    );
    assert!(log.contains("cannot list resource"), "{log}");
}

fn one_node() -> Topology {
    let mut topo = Topology::new().unwrap();
    topo.add_node().unwrap();
    topo
}

/// GET `path` on the agent's metrics address in `node`; (0, "") when it
/// does not answer.
fn http_get(node: &Netns, path: &'static str) -> (u16, String) {
    let to: SocketAddrV4 = service_agent::cli::DEFAULT_METRICS_ADDR.parse().unwrap();
    node.within(move || traffic::http_request(to, path, Duration::from_secs(3)))
        .unwrap()
        .unwrap_or_default()
}

/// Polls `path` until `pred` holds on (code, body), for at most `limit`.
fn wait_http(
    node: &Netns,
    agent: &Agent,
    path: &'static str,
    limit: Duration,
    pred: impl Fn(u16, &str) -> bool,
) -> String {
    let deadline = Instant::now() + limit;
    loop {
        let (code, body) = http_get(node, path);
        if pred(code, &body) {
            return body;
        }
        assert!(
            Instant::now() < deadline,
            "{path} still answers {code}: {body}\nlog:\n{}",
            agent.log_text()
        );
        thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_failing_watch_turns_healthz_503_until_it_recovers() {
    let topo = one_node();
    let node = &topo.nodes[0].ns;
    let api = ApiServer::start(node).unwrap();
    api.apply(Kind::Node, apiserver::node("node-1", "zone-a"));
    api.apply(
        Kind::Service,
        apiserver::service("shop", "web", "10.96.0.10", 80, "TCP"),
    );
    let mut agent = Agent::start_kube(
        node,
        api.kubeconfig(),
        &["--node-name", "node-1", "--resync-seconds", "1"],
    )
    .unwrap();
    agent
        .wait_log_from(0, "agent running", Duration::from_secs(30))
        .unwrap();
    wait_http(node, &agent, "/healthz", WAIT, |c, _| c == 200);
    assert_eq!(http_get(node, "/readyz").0, 200);

    api.set_down(true);
    let body = wait_http(node, &agent, "/healthz", WAIT, |c, b| {
        c == 503 && b.contains("watch ")
    });
    assert!(body.contains(" failing for "), "{body}");
    let (_, metrics) = http_get(node, "/metrics");
    let watch_errors: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("service_agent_sync_errors_total{kind=\"watch\"} "))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no watch errors counted:\n{metrics}"));
    assert!(watch_errors >= 1, "{metrics}");
    // The status file (rewritten at the next resync) shows it to `list`.
    agent
        .wait_list("the failing watch", |l| l.contains("failing: watch "))
        .unwrap();
    // Readiness is about the first sync, which stays done.
    assert_eq!(http_get(node, "/readyz").0, 200);

    api.set_down(false);
    // An event on each watch shows it back (a watch that reconnects to a
    // quiet API yields nothing; its failure then ends 65 s after its last
    // error, see the faults unit tests). The watchers retry with backoff.
    api.apply(
        Kind::Service,
        apiserver::service("shop", "web", "10.96.0.10", 81, "TCP"),
    );
    api.apply(
        Kind::EndpointSlice,
        apiserver::endpoint_slice("shop", "web", "a", &[Ipv4Addr::new(10, 244, 1, 9)], "TCP"),
    );
    api.apply(Kind::Node, apiserver::node("node-1", "zone-b"));
    wait_http(node, &agent, "/healthz", Duration::from_secs(60), |c, _| {
        c == 200
    });
    agent
        .wait_list("no failure", |l| !l.contains("failing:"))
        .unwrap();
}
