//! Servers and clients that run inside test namespaces. Every server answers
//! with its own name and the source address it saw, so a test can assert on
//! which backend served and what client address reached it.
use std::{
    io::{BufRead as _, BufReader, ErrorKind, Read as _, Write as _},
    net::{IpAddr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket},
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    thread,
    time::Duration,
};

use crate::netns::Netns;

/// What a server said: its name and the client address it saw.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub server: String,
    pub seen_from: SocketAddr,
}

fn parse_reply(line: &str) -> std::io::Result<Reply> {
    // Servers append the request size; only the name and address matter here.
    let mut it = line.split_whitespace();
    let (Some(server), Some(from)) = (it.next(), it.next()) else {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("bad reply {line:?}"),
        ));
    };
    let seen_from = from
        .parse()
        .map_err(|e| std::io::Error::new(ErrorKind::InvalidData, format!("{from}: {e}")))?;
    Ok(Reply {
        server: server.to_string(),
        seen_from,
    })
}

/// A TCP and a UDP server on one address and port in a namespace; stops on drop.
pub struct Server {
    stop: Arc<AtomicBool>,
    threads: Vec<thread::JoinHandle<()>>,
}

fn serve_tcp_conn(mut s: TcpStream, name: String, stop: Arc<AtomicBool>) {
    let peer = match s.peer_addr() {
        Ok(p) => p,
        Err(_) => return,
    };
    let _ = s.set_read_timeout(Some(Duration::from_millis(200)));
    // A peer that stops taking data (a path that drops it) must not keep
    // the server's thread, and the test's teardown, waiting.
    let _ = s.set_write_timeout(Some(Duration::from_secs(5)));
    let mut reader = BufReader::new(match s.try_clone() {
        Ok(c) => c,
        Err(_) => return,
    });
    let mut line = String::new();
    while !stop.load(Ordering::Relaxed) {
        match reader.read_line(&mut line) {
            Ok(0) => return,
            Ok(_) => {
                if line.starts_with("GET ") {
                    // Read the headers out first: closing a socket with unread
                    // data sends a reset instead of the response.
                    let mut header = String::new();
                    while reader.read_line(&mut header).is_ok_and(|n| n > 0) && header.trim() != ""
                    {
                        header.clear();
                    }
                    // Enough HTTP for curl: the body is the pod name.
                    let body = format!("{name}\n");
                    let _ = write!(
                        s,
                        "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                        body.len()
                    );
                    return;
                }
                // "DATA n": n bytes after the usual line, for transfers
                // larger than a path's MTU.
                let extra: usize = (line.strip_prefix("DATA "))
                    .and_then(|n| n.trim().parse().ok())
                    .unwrap_or(0)
                    .min(64 << 20);
                if s.write_all(format!("{name} {peer}\n").as_bytes()).is_err() {
                    return;
                }
                if extra > 0 && s.write_all(&vec![b'x'; extra]).is_err() {
                    return;
                }
                line.clear();
            }
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
            Err(_) => return,
        }
    }
}

impl Server {
    pub fn start(
        ns: &Netns,
        addr: impl Into<IpAddr>,
        port: u16,
        name: &str,
    ) -> anyhow::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let bind = SocketAddr::new(addr.into(), port);
        let (tcp, udp) = ns.within(move || -> std::io::Result<(TcpListener, UdpSocket)> {
            Ok((TcpListener::bind(bind)?, UdpSocket::bind(bind)?))
        })??;
        tcp.set_nonblocking(true)?;
        udp.set_read_timeout(Some(Duration::from_millis(100)))?;
        let mut threads = vec![];
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || {
                let mut conns = vec![];
                while !stop.load(Ordering::Relaxed) {
                    match tcp.accept() {
                        Ok((s, _)) => {
                            let _ = s.set_nonblocking(false);
                            let (name, stop) = (name.clone(), stop.clone());
                            conns.push(thread::spawn(move || serve_tcp_conn(s, name, stop)));
                        }
                        Err(e) if e.kind() == ErrorKind::WouldBlock => {
                            thread::sleep(Duration::from_millis(2))
                        }
                        Err(_) => thread::sleep(Duration::from_millis(10)),
                    }
                    conns.retain(|c| !c.is_finished());
                }
                for c in conns {
                    let _ = c.join();
                }
            }));
        }
        {
            let stop = stop.clone();
            let name = name.to_string();
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while !stop.load(Ordering::Relaxed) {
                    if let Ok((n, from)) = udp.recv_from(&mut buf) {
                        let mut reply = format!("{name} {from} {n}\n").into_bytes();
                        // "BIG": a reply as large as the request, so both
                        // directions are fragmented on a 1500-byte MTU.
                        if buf[..n].starts_with(b"BIG") {
                            reply.resize(n.max(reply.len()), b'x');
                        }
                        let _ = udp.send_to(&reply, from);
                    }
                }
            }));
        }
        Ok(Self { stop, threads })
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

/// One TCP request on a new connection (IPv4 or IPv6).
pub fn tcp_ask(to: impl Into<SocketAddr>, timeout: Duration) -> std::io::Result<Reply> {
    let s = TcpStream::connect_timeout(&to.into(), timeout)?;
    ask_on(s, timeout)
}

/// `tcp_ask` from the local address `from`, bound with SO_REUSEADDR: a
/// client reusing one source port for connection after connection (the
/// port's earlier connections wait in TIME_WAIT, which only a socket with
/// SO_REUSEADDR may bind past).
pub fn tcp_ask_from(
    from: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<Reply> {
    use socket2::{Domain, Socket, Type};
    let (from, to) = (from.into(), to.into());
    let s = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.bind(&from.into())?;
    s.connect_timeout(&to.into(), timeout)?;
    ask_on(s.into(), timeout)
}

fn ask_on(mut s: TcpStream, timeout: Duration) -> std::io::Result<Reply> {
    s.set_read_timeout(Some(timeout))?;
    s.write_all(b"hello\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    parse_reply(&line)
}

/// A TCP connection kept open across many requests.
pub struct HeldConnection {
    stream: TcpStream,
    reader: BufReader<TcpStream>,
}

impl HeldConnection {
    pub fn open(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<Self> {
        let stream =
            ns.within(move || TcpStream::connect_timeout(&to.into(), Duration::from_secs(3)))??;
        stream.set_read_timeout(Some(Duration::from_secs(3)))?;
        let reader = BufReader::new(stream.try_clone()?);
        Ok(Self { stream, reader })
    }

    pub fn ask(&mut self) -> std::io::Result<Reply> {
        self.stream.write_all(b"ping\n")?;
        let mut line = String::new();
        self.reader.read_line(&mut line)?;
        parse_reply(&line)
    }
}

/// One UDP request from a new socket (IPv4 or IPv6).
pub fn udp_ask(
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<(Reply, SocketAddr)> {
    let to = to.into();
    let s = UdpSocket::bind(if to.is_ipv4() { "0.0.0.0:0" } else { "[::]:0" })?;
    s.connect(to)?;
    s.set_read_timeout(Some(timeout))?;
    s.send(b"hello")?;
    let mut buf = [0u8; 512];
    let (n, from) = s.recv_from(&mut buf)?;
    Ok((parse_reply(&String::from_utf8_lossy(&buf[..n]))?, from))
}

/// One UDP request from the local address `from` on an unconnected
/// socket: the answer is taken from whichever address it comes, which is
/// returned beside it (a connected socket would drop one from elsewhere).
pub fn udp_ask_from(
    from: impl Into<SocketAddr>,
    to: impl Into<SocketAddr>,
    timeout: Duration,
) -> std::io::Result<(Reply, SocketAddr)> {
    let s = UdpSocket::bind(from.into())?;
    s.set_read_timeout(Some(timeout))?;
    s.send_to(b"hello", to.into())?;
    let mut buf = [0u8; 512];
    let (n, answered_from) = s.recv_from(&mut buf)?;
    Ok((
        parse_reply(&String::from_utf8_lossy(&buf[..n]))?,
        answered_from,
    ))
}

/// A connected UDP socket that keeps its source port, like a long-lived client.
pub struct UdpFlow {
    sock: UdpSocket,
}

impl UdpFlow {
    pub fn open(ns: &Netns, to: SocketAddrV4) -> anyhow::Result<Self> {
        let sock = ns.within(move || -> std::io::Result<UdpSocket> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            s.connect(to)?;
            Ok(s)
        })??;
        sock.set_read_timeout(Some(Duration::from_millis(500)))?;
        Ok(Self { sock })
    }

    pub fn ask(&self) -> std::io::Result<Reply> {
        self.sock.send(b"hello")?;
        let mut buf = [0u8; 512];
        let n = self.sock.recv(&mut buf)?;
        parse_reply(&String::from_utf8_lossy(&buf[..n]))
    }
}

/// A TCP request for `size` bytes after the reply line: the reply and how
/// many of the bytes arrived before the connection went quiet for `timeout`.
pub fn tcp_fetch(
    to: impl Into<SocketAddr>,
    size: usize,
    timeout: Duration,
) -> std::io::Result<(Reply, usize)> {
    let mut s = TcpStream::connect_timeout(&to.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    s.write_all(format!("DATA {size}\n").as_bytes())?;
    let mut reader = BufReader::new(s);
    let mut line = String::new();
    reader.read_line(&mut line)?;
    let reply = parse_reply(&line)?;
    let mut got = 0;
    let mut buf = vec![0u8; 65536];
    while got < size {
        match std::io::Read::read(&mut reader, &mut buf) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => break,
            Err(e) => return Err(e),
        }
    }
    Ok((reply, got))
}

/// One UDP request of `size` bytes (fragmented when larger than the MTU);
/// the server answers with as many bytes. Returns the reply and its length.
pub fn udp_ask_big(
    to: impl Into<SocketAddr>,
    size: usize,
    timeout: Duration,
) -> std::io::Result<(Reply, usize)> {
    let to = to.into();
    let s = UdpSocket::bind(if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" })?;
    s.connect(to)?;
    s.set_read_timeout(Some(timeout))?;
    let mut msg = b"BIG".to_vec();
    msg.resize(size, b'y');
    s.send(&msg)?;
    let mut buf = vec![0u8; 65536];
    let n = s.recv(&mut buf)?;
    let text = String::from_utf8_lossy(&buf[..n]);
    let first = text.lines().next().unwrap_or_default();
    let mut parts = first.split_whitespace();
    let reply = parse_reply(&format!(
        "{} {}",
        parts.next().unwrap_or(""),
        parts.next().unwrap_or("")
    ))?;
    let seen: usize = parts.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    if seen != size {
        return Err(std::io::Error::new(
            ErrorKind::InvalidData,
            format!("server got {seen} of {size} bytes"),
        ));
    }
    Ok((reply, n))
}

/// The body of a GET, trimmed (for the demo's curl-like client).
pub fn http_get(to: SocketAddrV4, path: &str, timeout: Duration) -> std::io::Result<String> {
    let (_, body) = http_request(to, path, timeout)?;
    Ok(body.trim().to_string())
}

/// Sends up to `count` TCP SYNs to `to` within `limit`, each from a different
/// forged source in 10.99.0.0/16 (a raw socket, as a SYN flood would): every
/// one is a new flow for the dataplane. Returns how many were sent.
pub fn syn_flood(to: SocketAddrV4, count: u32, limit: Duration) -> std::io::Result<u32> {
    syn_flood_repeating(to, count, 1, limit)
}

/// As `syn_flood`, each forged SYN sent `times` times in a row, as a
/// flooder that retransmits does: the repeats find the flow's entry.
pub fn syn_flood_repeating(
    to: SocketAddrV4,
    count: u32,
    times: u32,
    limit: Duration,
) -> std::io::Result<u32> {
    use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let dest = libc::sockaddr_in {
        sin_family: libc::AF_INET as u16,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(to.ip().octets()),
        },
        sin_zero: [0; 8],
    };
    let deadline = std::time::Instant::now() + limit;
    let mut sent = 0;
    while sent < count && std::time::Instant::now() < deadline {
        let src = format!("10.99.{}.{}", (sent >> 8) & 0xff, sent & 0xff);
        let pkt = crate::packet::Builder::tcp(
            &src,
            20000 + (sent % 40000) as u16,
            &to.ip().to_string(),
            to.port(),
            crate::packet::SYN,
        )
        .build();
        let ip = &pkt[14..];
        for _ in 0..times.max(1) {
            let r = unsafe {
                libc::sendto(
                    fd.as_raw_fd(),
                    ip.as_ptr().cast(),
                    ip.len(),
                    0,
                    (&dest as *const libc::sockaddr_in).cast(),
                    std::mem::size_of::<libc::sockaddr_in>() as u32,
                )
            };
            if r < 0 {
                let e = std::io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::ENOBUFS) {
                    return Err(e);
                }
            }
        }
        sent += 1;
    }
    Ok(sent)
}

/// Sends up to `count` UDP datagrams to `to` as fast as it can within `limit`.
pub fn udp_flood(to: SocketAddrV4, count: u32, limit: Duration) -> std::io::Result<u32> {
    let s = UdpSocket::bind("0.0.0.0:0")?;
    s.connect(to)?;
    let deadline = std::time::Instant::now() + limit;
    let mut sent = 0;
    while sent < count && std::time::Instant::now() < deadline {
        // Refusals and full buffers are part of a flood; keep going.
        let _ = s.send(b"flood");
        sent += 1;
    }
    Ok(sent)
}

/// What a bounded request loop saw.
#[derive(Debug, Default)]
pub struct LoopOutcome {
    pub ok: usize,
    pub failed: Vec<String>,
}

impl LoopOutcome {
    /// Panics naming the first failures, unless there were none and at least `min_ok` successes.
    pub fn assert_clean(&self, min_ok: usize, what: &str) {
        assert!(
            self.ok >= min_ok,
            "{what}: only {} requests succeeded",
            self.ok
        );
        assert!(
            self.failed.is_empty(),
            "{what}: {} of {} requests failed: {:?}",
            self.failed.len(),
            self.ok + self.failed.len(),
            &self.failed[..self.failed.len().min(5)]
        );
    }
}

/// Runs requests until `limit` passes or `max` were made (bounded in time
/// and count): new TCP connections to `tcp`, and a UDP request/reply to
/// `udp` after each when given.
pub fn request_loop(
    tcp: SocketAddrV4,
    udp: Option<SocketAddrV4>,
    limit: Duration,
    max: usize,
) -> LoopOutcome {
    let deadline = std::time::Instant::now() + limit;
    let mut out = LoopOutcome::default();
    let timeout = Duration::from_secs(3);
    while std::time::Instant::now() < deadline && out.ok + out.failed.len() < max {
        let mut results = vec![tcp_ask(tcp, timeout).map(|_| ())];
        if let Some(u) = udp {
            results.push(udp_ask(u, timeout).map(|_| ()));
        }
        for r in results {
            match r {
                Ok(()) => out.ok += 1,
                Err(e) => out.failed.push(e.to_string()),
            }
        }
    }
    out
}

/// A GET over HTTP/1.1: the status code and the body.
pub fn http_request(
    to: SocketAddrV4,
    path: &str,
    timeout: Duration,
) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&to.into(), timeout)?;
    s.set_read_timeout(Some(timeout))?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {to}\r\nConnection: close\r\n\r\n"
    )?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let code = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::new(ErrorKind::InvalidData, "no status line"))?;
    let body = text
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    Ok((code, body))
}
