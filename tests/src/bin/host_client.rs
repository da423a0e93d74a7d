//! A host-side client for the socket hook tests: a process of its own (cgroup
//! membership is per process), started in a node's network namespace and
//! moved into the test's cgroup before it makes any socket. It reads one
//! command a line on stdin and answers one line on stdout:
//!
//! - `tcp ADDR`: connect, ask, close: `ok SERVER SEEN_FROM PEER` or `err ERRNO MS`
//! - `hold ADDR` / `held`: open a TCP connection kept open / ask over it
//! - `loop ADDR MS`: new TCP connections for MS ms: `ok N FAILED FIRST_ERROR`
//! - `udp-sendto ADDR`: unconnected sendto/recvfrom: `ok SERVER FROM`
//! - `udp-connect ADDR` / `udp-ask`: a connected UDP socket, kept / asked
//!
//! ADDR is `a.b.c.d:port` or `[v6]:port` (an IPv4-mapped `[::ffff:a.b.c.d]:port`
//! makes an IPv6 socket). PEER is what getpeername() says; errors carry the errno and how long
//! the failing call took.
use std::{
    io::{BufRead as _, BufReader, Write as _},
    net::{SocketAddr, TcpStream, UdpSocket},
    time::{Duration, Instant},
};

const T: Duration = Duration::from_secs(3);

fn err_line(e: &std::io::Error, started: Instant) -> String {
    format!(
        "err {} {}",
        e.raw_os_error().unwrap_or(-1),
        started.elapsed().as_millis()
    )
}

fn read_line(s: &TcpStream) -> std::io::Result<String> {
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    Ok(line)
}

/// "SERVER SEEN_FROM" out of a server's reply.
fn reply_words(line: &str) -> String {
    line.split_whitespace()
        .take(2)
        .collect::<Vec<_>>()
        .join(" ")
}

fn tcp_once(to: SocketAddr) -> std::io::Result<String> {
    let mut s = TcpStream::connect_timeout(&to, T)?;
    s.set_read_timeout(Some(T))?;
    let peer = s.peer_addr()?;
    s.write_all(b"hello\n")?;
    Ok(format!("ok {} {peer}", reply_words(&read_line(&s)?)))
}

fn udp_ask(s: &UdpSocket) -> std::io::Result<String> {
    s.send(b"hello")?;
    let mut buf = [0u8; 512];
    let n = s.recv(&mut buf)?;
    let peer = s.peer_addr()?;
    Ok(format!(
        "ok {} {peer}",
        reply_words(&String::from_utf8_lossy(&buf[..n]))
    ))
}

/// The wildcard address of `to`'s family: an IPv6 address (IPv4-mapped
/// ones too) needs an IPv6 socket.
fn any_of(to: &SocketAddr) -> &'static str {
    if to.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
}

struct State {
    held: Option<TcpStream>,
    udp: Option<UdpSocket>,
}

fn run(cmd: &str, st: &mut State) -> std::io::Result<String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    let addr = |i: usize| -> std::io::Result<SocketAddr> {
        words
            .get(i)
            .and_then(|a| a.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad address in {cmd:?}")))
    };
    match words.first().copied() {
        Some("tcp") => tcp_once(addr(1)?),
        Some("hold") => {
            let s = TcpStream::connect_timeout(&addr(1)?, T)?;
            s.set_read_timeout(Some(T))?;
            let peer = s.peer_addr()?;
            st.held = Some(s);
            Ok(format!("ok {peer}"))
        }
        Some("held") => {
            let s = st
                .held
                .as_mut()
                .ok_or_else(|| std::io::Error::other("no held connection"))?;
            s.write_all(b"ping\n")?;
            // One line per request: a fresh reader sees only this reply.
            let mut b = [0u8; 256];
            let n = std::io::Read::read(s, &mut b)?;
            Ok(format!(
                "ok {}",
                reply_words(&String::from_utf8_lossy(&b[..n]))
            ))
        }
        Some("loop") => {
            let to = addr(1)?;
            let ms: u64 = words.get(2).and_then(|m| m.parse().ok()).unwrap_or(1000);
            let end = Instant::now() + Duration::from_millis(ms.min(60_000));
            let (mut n, mut failed, mut first) = (0u64, 0u64, String::from("-"));
            while Instant::now() < end {
                n += 1;
                if let Err(e) = tcp_once(to) {
                    failed += 1;
                    if first == "-" {
                        first = e.to_string().replace(' ', "_");
                    }
                }
                std::thread::sleep(Duration::from_millis(5));
            }
            Ok(format!("ok {n} {failed} {first}"))
        }
        Some("udp-sendto") => {
            let to = addr(1)?;
            let s = UdpSocket::bind(any_of(&to))?;
            s.set_read_timeout(Some(T))?;
            s.send_to(b"hello", to)?;
            let mut buf = [0u8; 512];
            let (n, from): (usize, SocketAddr) = s.recv_from(&mut buf)?;
            Ok(format!(
                "ok {} {from}",
                reply_words(&String::from_utf8_lossy(&buf[..n]))
            ))
        }
        Some("udp-connect") => {
            let to = addr(1)?;
            let s = UdpSocket::bind(any_of(&to))?;
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            s.connect(to)?;
            let peer = s.peer_addr()?;
            st.udp = Some(s);
            Ok(format!("ok {peer}"))
        }
        Some("udp-ask") => udp_ask(
            st.udp
                .as_ref()
                .ok_or_else(|| std::io::Error::other("no UDP socket"))?,
        ),
        _ => Err(std::io::Error::other(format!("unknown command {cmd:?}"))),
    }
}

fn main() {
    let mut st = State {
        held: None,
        udp: None,
    };
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    for line in stdin.lock().lines() {
        let Ok(cmd) = line else { break };
        if cmd.trim() == "quit" {
            break;
        }
        let started = Instant::now();
        let answer = run(&cmd, &mut st).unwrap_or_else(|e| err_line(&e, started));
        if writeln!(out, "{answer}")
            .and_then(|()| out.flush())
            .is_err()
        {
            break;
        }
    }
}
