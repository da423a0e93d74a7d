//! When the agent cannot reach the API server, its log names the cause a
//! person can act on, not only "client error (Connect)": nothing listening,
//! an untrusted certificate, a refusal by RBAC.
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
    netns::Netns,
    topology::Topology,
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
