//! Names outside the cluster zone, sent on to the node's resolvers.
use std::{
    hash::{BuildHasher as _, Hasher as _},
    net::{IpAddr, SocketAddr},
    path::Path,
    time::{Duration, Instant},
};

use hickory_proto::op::{Message, MessageType, Query};
use tokio::{net::UdpSocket, sync::Semaphore};

/// Forwards in flight at most: past that a query gets SERVFAIL at once
/// rather than a socket and a wait.
const MAX_IN_FLIGHT: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("no upstream answered within {0:?}")]
    Timeout(Duration),
    #[error("{0} forwards in flight already")]
    Busy(usize),
    #[error("upstream {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("no upstream server")]
    NoServer,
}

pub struct Forwarder {
    servers: Vec<SocketAddr>,
    timeout: Duration,
    in_flight: Semaphore,
}

/// The `nameserver` lines of a resolv.conf, on port 53, less `exclude`
/// (this server's own addresses: forwarding to itself would loop).
pub fn resolv_conf_servers(path: &Path, exclude: &[IpAddr]) -> std::io::Result<Vec<SocketAddr>> {
    let text = std::fs::read_to_string(path)?;
    Ok(text
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next()? == "nameserver").then_some(())?;
            // A scoped IPv6 address (fe80::1%eth0) is not usable from here.
            words.next()?.parse::<IpAddr>().ok()
        })
        .filter(|ip| !exclude.contains(ip))
        .map(|ip| SocketAddr::new(ip, 53))
        .collect())
}

fn random_id() -> u16 {
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(Instant::now().elapsed().as_nanos());
    h.finish() as u16
}

impl Forwarder {
    pub fn new(servers: Vec<SocketAddr>, timeout: Duration) -> Self {
        Self {
            servers,
            timeout,
            in_flight: Semaphore::new(MAX_IN_FLIGHT),
        }
    }

    pub fn servers(&self) -> &[SocketAddr] {
        &self.servers
    }

    /// Asks the upstreams in turn, each for its share of the timeout, and
    /// returns the first answer to this very question.
    pub async fn forward(&self, query: &Query, max_payload: u16) -> Result<Message, ForwardError> {
        let _permit = self
            .in_flight
            .try_acquire()
            .map_err(|_| ForwardError::Busy(MAX_IN_FLIGHT))?;
        if self.servers.is_empty() {
            return Err(ForwardError::NoServer);
        }
        let share = self.timeout / self.servers.len() as u32;
        let mut last = ForwardError::Timeout(self.timeout);
        for server in &self.servers {
            match tokio::time::timeout(share, self.ask(*server, query, max_payload)).await {
                Ok(Ok(m)) => return Ok(m),
                Ok(Err(e)) => last = e,
                Err(_) => {}
            }
        }
        Err(last)
    }

    async fn ask(
        &self,
        server: SocketAddr,
        query: &Query,
        max_payload: u16,
    ) -> Result<Message, ForwardError> {
        let io = |e| ForwardError::Io(server, e);
        let bind: SocketAddr = if server.is_ipv4() {
            "0.0.0.0:0".parse().unwrap_or(server)
        } else {
            "[::]:0".parse().unwrap_or(server)
        };
        let sock = UdpSocket::bind(bind).await.map_err(io)?;
        sock.connect(server).await.map_err(io)?;
        let mut msg = Message::query();
        msg.metadata.id = random_id();
        msg.metadata.recursion_desired = true;
        msg.add_query(query.clone());
        let mut edns = hickory_proto::op::Edns::new();
        edns.set_max_payload(max_payload.max(512));
        msg.set_edns(edns);
        let bytes = msg
            .to_vec()
            .map_err(|e| io(std::io::Error::other(e.to_string())))?;
        sock.send(&bytes).await.map_err(io)?;
        let mut buf = vec![0u8; 65535];
        loop {
            let n = sock.recv(&mut buf).await.map_err(io)?;
            // Anything but the answer to this question (a late answer to
            // an earlier one, a forgery) is ignored.
            let Ok(reply) = Message::from_vec(&buf[..n]) else {
                continue;
            };
            if reply.metadata.id == msg.metadata.id
                && reply.metadata.message_type == MessageType::Response
                && reply.queries.first() == Some(query)
            {
                return Ok(reply);
            }
        }
    }
}
