//! The sockets: UDP read here (rate limit and a bound on queries in flight
//! before any parsing), TCP through hickory-server's listener.
use std::{net::SocketAddr, sync::Arc, time::Duration};

use hickory_proto::{
    op::{Message, OpCode, ResponseCode},
    serialize::binary::BinEncoder,
};
use hickory_server::{
    Server,
    net::{NetError, runtime::TokioTime, xfer::Protocol},
    server::{Request, RequestHandler, ResponseHandler, ResponseInfo},
    zone_handler::MessageResponse,
};
use tokio::{
    net::{TcpListener, UdpSocket},
    sync::Semaphore,
};
use tracing::warn;

use super::{
    counters::{self, Dropped},
    handler::{Handler, Shared},
};

/// UDP queries being answered at once at most (forwarded ones wait for an
/// upstream); past that new ones are dropped, counted.
const MAX_UDP_IN_FLIGHT: usize = 1024;
/// UDP sockets on the listen address.
const UDP_SOCKETS: usize = 4;
/// Each UDP socket's receive buffer, in bytes.
const UDP_RCVBUF: usize = 4 << 20;
/// A TCP connection sending nothing this long is closed.
const TCP_IDLE: Duration = Duration::from_secs(5);

/// Sends an answer back to one UDP client, truncated to what it can take.
#[derive(Clone)]
struct UdpReply {
    socket: Arc<UdpSocket>,
    to: SocketAddr,
}

#[async_trait::async_trait]
impl ResponseHandler for UdpReply {
    async fn send_response<'a>(
        &mut self,
        response: MessageResponse<
            '_,
            'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
            impl Iterator<Item = &'a hickory_proto::rr::Record> + Send + 'a,
        >,
    ) -> Result<ResponseInfo, NetError> {
        // Without EDNS a client takes 512 bytes (RFC 1035 4.2.1).
        let max = response.edns().map_or(512, |e| e.max_payload().max(512));
        let mut buf = Vec::with_capacity(512);
        let mut encoder = BinEncoder::new(&mut buf);
        encoder.set_max_size(max);
        let info = response
            .destructive_emit(&mut encoder)
            .map_err(|e| NetError::from(e.to_string()))?;
        self.socket.send_to(&buf, self.to).await?;
        Ok(info)
    }
}

/// A FORMERR for a datagram that has a query's header but no parseable
/// body; nothing for responses (no answer loops with another server) or
/// datagrams shorter than a header.
fn formerr(bytes: &[u8]) -> Option<Vec<u8>> {
    let (&[id0, id1, flags], _) = bytes.split_first_chunk::<3>()?;
    if bytes.len() < 12 || flags & 0x80 != 0 {
        return None;
    }
    let op = OpCode::from_u8((flags >> 3) & 0x0f);
    Message::error_msg(u16::from_be_bytes([id0, id1]), op, ResponseCode::FormErr)
        .to_vec()
        .ok()
}

async fn serve_udp(socket: Arc<UdpSocket>, handler: Arc<Handler>, in_flight: Arc<Semaphore>) {
    let mut buf = vec![0u8; 65535];
    loop {
        let (n, src) = match socket.recv_from(&mut buf).await {
            Ok(r) => r,
            Err(e) => {
                warn!("DNS UDP socket: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        if !handler.admit(src.ip()) {
            continue;
        }
        let Ok(permit) = in_flight.clone().try_acquire_owned() else {
            counters::dropped(Dropped::Overloaded);
            continue;
        };
        let bytes = buf[..n].to_vec();
        let request = match Request::from_bytes(bytes, src, Protocol::Udp) {
            Ok(r) => r,
            Err(_) => {
                match formerr(&buf[..n]) {
                    Some(reply) => {
                        let _ = socket.send_to(&reply, src).await;
                        counters::answered("OTHER", "FORMERR", Duration::ZERO);
                    }
                    None => counters::dropped(Dropped::Malformed),
                }
                continue;
            }
        };
        let (handler, reply) = (
            handler.clone(),
            UdpReply {
                socket: socket.clone(),
                to: src,
            },
        );
        tokio::spawn(async move {
            Shared(handler)
                .handle_request::<_, TokioTime>(&request, reply)
                .await;
            drop(permit);
        });
    }
}

/// A UDP socket on `addr` sharing it with the others (SO_REUSEPORT), with
/// a large receive buffer.
fn udp_socket(addr: SocketAddr) -> nix::Result<UdpSocket> {
    use nix::sys::socket::{
        AddressFamily, SockFlag, SockType, SockaddrStorage, bind, setsockopt, socket, sockopt,
    };
    let family = if addr.is_ipv4() {
        AddressFamily::Inet
    } else {
        AddressFamily::Inet6
    };
    let fd = socket(
        family,
        SockType::Datagram,
        SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
        None,
    )?;
    setsockopt(&fd, sockopt::ReusePort, &true)?;
    // Room for bursts; past the system's limit only with CAP_NET_ADMIN.
    if setsockopt(&fd, sockopt::RcvBufForce, &UDP_RCVBUF).is_err() {
        setsockopt(&fd, sockopt::RcvBuf, &UDP_RCVBUF)?;
    }
    bind(
        std::os::fd::AsRawFd::as_raw_fd(&fd),
        &SockaddrStorage::from(addr),
    )?;
    UdpSocket::from_std(std::net::UdpSocket::from(fd))
        .map_err(|e| nix::Error::from_raw(e.raw_os_error().unwrap_or(libc::EINVAL)))
}

/// Binds UDP and TCP on `addr` and serves until the process ends.
///
/// UDP is read through several sockets on the one address: the kernel
/// spreads flows over them by address and port, so a flood from one source
/// fills one socket's buffer, and the other sources' queries (each from a
/// new port, retried from another) mostly land in the others.
pub async fn serve(addr: SocketAddr, handler: Arc<Handler>) -> anyhow::Result<()> {
    let in_flight = Arc::new(Semaphore::new(MAX_UDP_IN_FLIGHT));
    for _ in 0..UDP_SOCKETS {
        let udp =
            udp_socket(addr).map_err(|e| anyhow::anyhow!("--dns-listen {addr} (UDP): {e}"))?;
        tokio::spawn(serve_udp(Arc::new(udp), handler.clone(), in_flight.clone()));
    }
    let tcp = TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--dns-listen {addr} (TCP): {e}"))?;
    let mut server = Server::new(Shared(handler));
    server.register_listener(tcp, TCP_IDLE, 16);
    tokio::spawn(async move {
        if let Err(e) = server.block_until_done().await {
            warn!("DNS TCP server: {e}");
        }
    });
    Ok(())
}
