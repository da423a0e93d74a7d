//! A Kubernetes API server double for the kube source tests: it speaks the
//! real list and watch protocol (JSON lists with a resourceVersion, streamed
//! watch events, 410 Gone for expired versions) for Services, EndpointSlices
//! and Nodes, and lets a test close watches, expire history, lose deletes and
//! go down. It listens inside a test namespace.
use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Write as _},
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    ops::Bound,
    path::PathBuf,
    sync::{
        Arc, Condvar, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

use serde_json::{Value, json};

use crate::{netns::Netns, unique};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    EndpointSlice,
    Node,
}

impl Kind {
    fn list_kind(self) -> &'static str {
        match self {
            Kind::Service => "ServiceList",
            Kind::EndpointSlice => "EndpointSliceList",
            Kind::Node => "NodeList",
        }
    }
    fn api_version(self) -> &'static str {
        match self {
            Kind::EndpointSlice => "discovery.k8s.io/v1",
            _ => "v1",
        }
    }
    fn of_path(path: &str) -> Option<Kind> {
        match path {
            "/api/v1/services" => Some(Kind::Service),
            "/apis/discovery.k8s.io/v1/endpointslices" => Some(Kind::EndpointSlice),
            "/api/v1/nodes" => Some(Kind::Node),
            _ => None,
        }
    }
}

#[derive(Default)]
struct State {
    rv: u64,
    objects: BTreeMap<(Kind, String), Value>,
    events: Vec<(u64, Kind, &'static str, Value)>,
    /// Watches asking for an older version get 410 Gone.
    oldest_rv: u64,
    /// Bumped to end every open watch.
    generation: u64,
    down: bool,
    lists: usize,
}

type Shared = Arc<(Mutex<State>, Condvar)>;

pub struct ApiServer {
    shared: Shared,
    stop: Arc<AtomicBool>,
    thread: Option<thread::JoinHandle<()>>,
    pub port: u16,
    kubeconfig: PathBuf,
}

fn key_of(obj: &Value) -> String {
    let m = &obj["metadata"];
    format!(
        "{}/{}",
        m["namespace"].as_str().unwrap_or(""),
        m["name"].as_str().unwrap_or("")
    )
}

fn decode(s: &str) -> String {
    s.replace("%3D", "=")
        .replace("%3d", "=")
        .replace("%2F", "/")
        .replace("%2f", "/")
}

fn matches(obj: &Value, query: &BTreeMap<String, String>) -> bool {
    if let Some(sel) = query.get("labelSelector") {
        // Existence selectors are all the agent uses.
        for label in sel.split(',') {
            if obj["metadata"]["labels"].get(label).is_none() {
                return false;
            }
        }
    }
    if let Some(sel) = query.get("fieldSelector")
        && let Some(name) = sel.strip_prefix("metadata.name=")
    {
        return obj["metadata"]["name"].as_str() == Some(name);
    }
    true
}

/// One page of a list, as the API server pages them: at most `limit`
/// items, and a `continue` token while more remain. Every page carries the
/// first page's resourceVersion, so the watch that follows starts from
/// there and replays whatever changed while the pages were read (the real
/// server serves the later pages from a snapshot; replaying the changes
/// since it comes to the same). The token is `<rv>/<last key>`.
fn list_page(st: &State, kind: Kind, query: &BTreeMap<String, String>) -> Value {
    let limit = query
        .get("limit")
        .and_then(|v| v.parse::<usize>().ok())
        .filter(|&n| n > 0)
        .unwrap_or(usize::MAX);
    let (rv, start) = match query.get("continue").and_then(|c| c.split_once('/')) {
        Some((rv, key)) => (
            rv.parse().unwrap_or(st.rv),
            Bound::Excluded((kind, key.to_string())),
        ),
        None => (st.rv, Bound::Included((kind, String::new()))),
    };
    let mut items: Vec<Value> = vec![];
    let mut more = None;
    for ((k, _), o) in st.objects.range((start, Bound::Unbounded)) {
        if *k != kind {
            break;
        }
        if !matches(o, query) {
            continue;
        }
        if items.len() == limit {
            more = items.last().map(|last| format!("{rv}/{}", key_of(last)));
            break;
        }
        items.push(o.clone());
    }
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(token) = more {
        metadata["continue"] = json!(token);
    }
    json!({
        "kind": kind.list_kind(),
        "apiVersion": kind.api_version(),
        "metadata": metadata,
        "items": items,
    })
}

fn respond(s: &mut TcpStream, status: &str, body: &str) {
    let _ = write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
}

fn handle(mut s: TcpStream, shared: Shared, stop: Arc<AtomicBool>) {
    let mut reader = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut request = String::new();
    if reader.read_line(&mut request).is_err() {
        return;
    }
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).map_or(true, |n| n == 0) || h.trim().is_empty() {
            break;
        }
    }
    let target = request.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let query: BTreeMap<String, String> = q
        .split('&')
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), decode(v))))
        .collect();
    let Some(kind) = Kind::of_path(path) else {
        respond(
            &mut s,
            "404 Not Found",
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","code":404}"#,
        );
        return;
    };
    let (lock, cv) = &*shared;
    if query.get("watch").map(String::as_str) != Some("true") {
        let mut st = lock.lock().unwrap();
        st.lists += 1;
        let body = list_page(&st, kind, &query);
        drop(st);
        respond(&mut s, "200 OK", &body.to_string());
        return;
    }
    let from: u64 = query
        .get("resourceVersion")
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    let timeout = query
        .get("timeoutSeconds")
        .and_then(|v| v.parse().ok())
        .map(Duration::from_secs)
        .unwrap_or(Duration::from_secs(300));
    let _ = write!(
        s,
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n"
    );
    let mut st = lock.lock().unwrap();
    if from < st.oldest_rv {
        let gone = json!({"type": "ERROR", "object": {
            "kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.oldest_rv),
            "reason": "Expired", "code": 410}});
        drop(st);
        let _ = writeln!(s, "{gone}");
        return;
    }
    let generation = st.generation;
    let mut sent = from;
    let deadline = Instant::now() + timeout;
    loop {
        let pending: Vec<Value> = st
            .events
            .iter()
            .filter(|(rv, k, _, o)| *rv > sent && *k == kind && matches(o, &query))
            .map(|(_, _, t, o)| json!({"type": t, "object": o}))
            .collect();
        sent = st.rv;
        drop(st);
        for e in pending {
            if writeln!(s, "{e}").is_err() {
                return;
            }
        }
        let _ = s.flush();
        st = lock.lock().unwrap();
        if st.generation != generation
            || st.down
            || stop.load(Ordering::Relaxed)
            || Instant::now() > deadline
        {
            return;
        }
        st = cv.wait_timeout(st, Duration::from_millis(100)).unwrap().0;
        if st.generation != generation || st.down || stop.load(Ordering::Relaxed) {
            return;
        }
    }
}

impl ApiServer {
    /// Starts the server on 127.0.0.1 inside `ns` and writes a kubeconfig for it.
    pub fn start(ns: &Netns) -> anyhow::Result<Self> {
        let listener =
            ns.within(|| TcpListener::bind(SocketAddrV4::new(Ipv4Addr::LOCALHOST, 0)))??;
        let port = listener.local_addr()?.port();
        listener.set_nonblocking(true)?;
        let shared: Shared = Arc::new((Mutex::new(State::default()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (shared, stop) = (shared.clone(), stop.clone());
            thread::spawn(move || {
                let mut conns: Vec<thread::JoinHandle<()>> = vec![];
                while !stop.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((s, _)) => {
                            if shared.0.lock().unwrap().down {
                                drop(s); // refused mid-handshake: what a dead server looks like
                                continue;
                            }
                            let _ = s.set_nonblocking(false);
                            let (shared, stop) = (shared.clone(), stop.clone());
                            conns.push(thread::spawn(move || handle(s, shared, stop)));
                        }
                        Err(_) => thread::sleep(Duration::from_millis(5)),
                    }
                    conns.retain(|c| !c.is_finished());
                }
                shared.1.notify_all();
                for c in conns {
                    let _ = c.join();
                }
            })
        };
        let kubeconfig = std::env::temp_dir().join(format!("{}.kubeconfig", unique("kc")));
        std::fs::write(
            &kubeconfig,
            format!(
                "apiVersion: v1\nkind: Config\nclusters:\n- name: double\n  cluster: {{server: \"http://127.0.0.1:{port}\"}}\nusers:\n- name: agent\n  user: {{}}\ncontexts:\n- name: double\n  context: {{cluster: double, user: agent}}\ncurrent-context: double\n"
            ),
        )?;
        Ok(Self {
            shared,
            stop,
            thread: Some(thread),
            port,
            kubeconfig,
        })
    }

    pub fn kubeconfig(&self) -> &std::path::Path {
        &self.kubeconfig
    }

    fn with<T>(&self, f: impl FnOnce(&mut State) -> T) -> T {
        let (lock, cv) = &*self.shared;
        let r = f(&mut lock.lock().unwrap());
        cv.notify_all();
        r
    }

    /// Creates or replaces an object (ADDED / MODIFIED).
    pub fn apply(&self, kind: Kind, mut obj: Value) {
        self.with(|st| {
            st.rv += 1;
            obj["metadata"]["resourceVersion"] = json!(st.rv.to_string());
            let key = (kind, key_of(&obj));
            let t = if st.objects.contains_key(&key) {
                "MODIFIED"
            } else {
                "ADDED"
            };
            st.objects.insert(key, obj.clone());
            let rv = st.rv;
            st.events.push((rv, kind, t, obj));
        });
    }

    /// Deletes an object with a DELETED event.
    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        self.with(|st| {
            if let Some(obj) = st.objects.remove(&(kind, format!("{namespace}/{name}"))) {
                st.rv += 1;
                let rv = st.rv;
                st.events.push((rv, kind, "DELETED", obj));
            }
        });
    }

    /// Deletes an object without telling any watcher, as if the event were lost.
    pub fn delete_silently(&self, kind: Kind, namespace: &str, name: &str) {
        self.with(|st| {
            st.objects.remove(&(kind, format!("{namespace}/{name}")));
            st.rv += 1;
        });
    }

    /// Ends every open watch (clients reconnect from their last version).
    pub fn close_watches(&self) {
        self.with(|st| st.generation += 1);
    }

    /// Forgets history: reconnecting watches get 410 Gone and must relist.
    pub fn expire_history(&self) {
        self.with(|st| {
            st.oldest_rv = st.rv + 1;
            st.generation += 1;
        });
    }

    pub fn set_down(&self, down: bool) {
        self.with(|st| {
            st.down = down;
            st.generation += 1;
        });
    }

    /// How many list requests were served (a relist shows here).
    pub fn lists(&self) -> usize {
        self.with(|st| st.lists)
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        self.shared.1.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let _ = std::fs::remove_file(&self.kubeconfig);
    }
}

/// A Service object as the API server returns it.
pub fn service(namespace: &str, name: &str, cluster_ip: &str, port: u16, protocol: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Service",
        "metadata": {"namespace": namespace, "name": name, "uid": format!("uid-{name}")},
        "spec": {"clusterIP": cluster_ip, "clusterIPs": [cluster_ip], "type": "ClusterIP",
                 "ports": [{"name": "p", "port": port, "protocol": protocol, "targetPort": 8080}]},
    })
}

/// An EndpointSlice for Service `service` with ready endpoints `addrs` on 8080.
pub fn endpoint_slice(
    namespace: &str,
    service: &str,
    suffix: &str,
    addrs: &[Ipv4Addr],
    protocol: &str,
) -> Value {
    json!({
        "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"namespace": namespace, "name": format!("{service}-{suffix}"),
                     "labels": {"kubernetes.io/service-name": service}},
        "addressType": "IPv4",
        "ports": [{"name": "p", "port": 8080, "protocol": protocol}],
        "endpoints": addrs.iter().map(|a| json!({"addresses": [a.to_string()], "conditions": {"ready": true}})).collect::<Vec<_>>(),
    })
}

pub fn node(name: &str, zone: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/zone": zone}},
        "status": {"addresses": [{"type": "InternalIP", "address": "192.168.77.11"}]},
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_come_in_pages_at_the_first_pages_version() {
        let mut st = State::default();
        for name in ["a", "b", "c"] {
            st.rv += 1;
            let obj = service("ns", name, "10.96.0.1", 80, "TCP");
            st.objects.insert((Kind::Service, key_of(&obj)), obj);
        }
        st.objects
            .insert((Kind::Node, "/n".into()), node("n", "zone-a"));
        let query = |q: &[(&str, &str)]| -> BTreeMap<String, String> {
            q.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        let names = |page: &Value| -> Vec<String> {
            page["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|o| o["metadata"]["name"].as_str().unwrap().to_string())
                .collect()
        };
        let first = list_page(&st, Kind::Service, &query(&[("limit", "2")]));
        assert_eq!(names(&first), ["a", "b"]);
        assert_eq!(first["metadata"]["resourceVersion"], "3");
        let token = first["metadata"]["continue"].as_str().unwrap().to_string();
        // A change between pages: the later page still names the first's version.
        st.rv += 1;
        let second = list_page(
            &st,
            Kind::Service,
            &query(&[("limit", "2"), ("continue", &token)]),
        );
        assert_eq!(names(&second), ["c"]);
        assert_eq!(second["metadata"]["resourceVersion"], "3");
        assert!(second["metadata"].get("continue").is_none());
        let all = list_page(&st, Kind::Service, &query(&[]));
        assert_eq!(names(&all), ["a", "b", "c"]);
    }
}
