//! Ending host UDP sockets connected (through the socket hooks) to a backend
//! that left its frontend. Such a socket has the backend's address as its
//! peer and would keep sending into the void; the kernel's SOCK_DESTROY
//! (sock_diag, what `ss -K` uses) aborts it with ECONNABORTED, and the
//! application's reconnect goes through connect() again to a live backend.
use std::{
    collections::{BTreeSet, HashMap},
    io,
    mem::size_of,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
};

use service_common::IPPROTO_UDP;

use super::tables::Tables;

const NETLINK_SOCK_DIAG: libc::c_int = 4;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
const TCP_ESTABLISHED: u32 = 1;

#[repr(C)]
#[derive(Clone, Copy, Default)]
struct SockId {
    sport: [u8; 2],
    dport: [u8; 2],
    src: [[u8; 4]; 4],
    dst: [[u8; 4]; 4],
    ifindex: u32,
    cookie: [u32; 2],
}

/// struct inet_diag_req_v2 behind its netlink header.
#[repr(C)]
#[derive(Clone, Copy, Default)]
struct Request {
    len: u32,
    type_: u16,
    flags: u16,
    seq: u32,
    pid: u32,
    family: u8,
    protocol: u8,
    ext: u8,
    _pad: u8,
    states: u32,
    id: SockId,
}

/// The head of struct inet_diag_msg.
#[repr(C)]
#[derive(Clone, Copy)]
struct DiagMsg {
    family: u8,
    state: u8,
    timer: u8,
    retrans: u8,
    id: SockId,
}

const NLMSG_HDRLEN: usize = 16;

fn diag_socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2); the descriptor is owned at once.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            NETLINK_SOCK_DIAG,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    let s = unsafe { OwnedFd::from_raw_fd(fd) };
    let tv = libc::timeval {
        tv_sec: 2,
        tv_usec: 0,
    };
    // A kernel that never answers must not stall the agent's loop.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            &tv as *const libc::timeval as *const libc::c_void,
            size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    Ok(s)
}

fn send(s: &OwnedFd, req: &Request) -> io::Result<()> {
    // SAFETY: `req` is a plain repr(C) value of the length given.
    let n = unsafe {
        libc::send(
            s.as_raw_fd(),
            req as *const Request as *const libc::c_void,
            size_of::<Request>(),
            0,
        )
    };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads netlink messages until DONE (a dump) or the first ERROR (an ack);
/// hands each payload of type `want` to `f`. Returns the ack's errno (0: ok).
fn receive(s: &OwnedFd, want: u16, mut f: impl FnMut(&[u8])) -> io::Result<i32> {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: the buffer is ours and as long as said.
        let n = unsafe {
            libc::recv(
                s.as_raw_fd(),
                buf.as_mut_ptr() as *mut libc::c_void,
                buf.len(),
                0,
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        let mut rest = &buf[..n as usize];
        while rest.len() >= NLMSG_HDRLEN {
            let len = u32::from_ne_bytes(rest[0..4].try_into().unwrap()) as usize;
            let type_ = u16::from_ne_bytes(rest[4..6].try_into().unwrap());
            if len < NLMSG_HDRLEN || len > rest.len() {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "truncated netlink message",
                ));
            }
            let payload = &rest[NLMSG_HDRLEN..len];
            match type_ as i32 {
                libc::NLMSG_DONE => return Ok(0),
                libc::NLMSG_ERROR => {
                    let errno = payload
                        .get(0..4)
                        .map_or(0, |b| i32::from_ne_bytes(b.try_into().unwrap()));
                    return Ok(-errno);
                }
                _ if type_ == want => f(payload),
                _ => {}
            }
            rest = &rest[(len + 3) & !3..];
        }
    }
}

fn request(type_: u16, flags: u16, family: u8, id: SockId) -> Request {
    Request {
        len: size_of::<Request>() as u32,
        type_,
        flags,
        seq: 1,
        family,
        protocol: IPPROTO_UDP,
        states: 1 << TCP_ESTABLISHED,
        id,
        ..Default::default()
    }
}

/// The connected UDP sockets of `family` (AF_INET, AF_INET6) in this
/// network namespace.
fn connected_udp(family: u8) -> io::Result<Vec<SockId>> {
    let s = diag_socket()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16;
    send(
        &s,
        &request(SOCK_DIAG_BY_FAMILY, flags, family, SockId::default()),
    )?;
    let mut out = vec![];
    let errno = receive(&s, SOCK_DIAG_BY_FAMILY, |p| {
        if p.len() >= size_of::<DiagMsg>() {
            // SAFETY: DiagMsg is plain bytes and the payload is long enough.
            let m: DiagMsg = unsafe { std::ptr::read_unaligned(p.as_ptr() as *const DiagMsg) };
            out.push(m.id);
        }
    })?;
    if errno != 0 {
        return Err(io::Error::from_raw_os_error(errno));
    }
    Ok(out)
}

fn destroy(family: u8, id: SockId) -> io::Result<()> {
    let s = diag_socket()?;
    let flags = (libc::NLM_F_REQUEST | libc::NLM_F_ACK) as u16;
    send(&s, &request(SOCK_DESTROY, flags, family, id))?;
    match receive(&s, SOCK_DESTROY, |_| {})? {
        // Closed meanwhile: nothing left to end.
        0 | libc::ENOENT => Ok(()),
        e => Err(io::Error::from_raw_os_error(e)),
    }
}

/// What one pass did.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Destroyed {
    pub sockets: usize,
    pub errors: Vec<String>,
}

/// An address of a socket id of `family`, as sock_diag gives it.
fn id_addr(family: u8, a: &[[u8; 4]; 4]) -> IpAddr {
    if family == libc::AF_INET as u8 {
        Ipv4Addr::from(a[0]).into()
    } else {
        Ipv6Addr::from(*a.as_flattened().first_chunk::<16>().expect("16 bytes")).into()
    }
}

/// Ends the host UDP sockets whose reverse entry names a (frontend, backend)
/// pair in `removed`, and forgets those entries. A socket is ended only when
/// its cookie and its peer both match an entry: a socket the application
/// connected to the backend address directly is left alone. IPv6 sockets
/// are matched from SOCK_REVNAT6 (an IPv4 backend as its mapped address,
/// the peer sock_diag gives such a socket).
pub fn destroy_removed(t: &mut Tables, removed: &BTreeSet<(u32, u32)>) -> Destroyed {
    let mut done = Destroyed::default();
    if removed.is_empty() {
        return done;
    }
    let doomed_pair = |proto: u8, svc: u32, backend: u32| {
        proto == IPPROTO_UDP && removed.contains(&(svc, backend))
    };
    let mut doomed: HashMap<u64, Vec<(IpAddr, u16)>> = HashMap::new();
    let mut keys4 = vec![];
    for (k, v) in t.sock_revnat.iter().filter_map(Result::ok) {
        if doomed_pair(v.proto, v.svc_id, v.backend_id) {
            doomed
                .entry(k.cookie)
                .or_default()
                .push((Ipv4Addr::from(k.addr).into(), k.port));
            keys4.push(k);
        }
    }
    let mut keys6 = vec![];
    for (k, v) in t.sock_revnat6.iter().filter_map(Result::ok) {
        if doomed_pair(v.proto, v.svc_id, v.backend_id) {
            doomed
                .entry(k.cookie)
                .or_default()
                .push((Ipv6Addr::from(k.addr).into(), k.port));
            keys6.push(k);
        }
    }
    if doomed.is_empty() {
        return done;
    }
    for family in [libc::AF_INET as u8, libc::AF_INET6 as u8] {
        let ids = match connected_udp(family) {
            Ok(ids) => ids,
            Err(e) => {
                done.errors
                    .push(format!("listing UDP sockets (sock_diag): {e}"));
                continue;
            }
        };
        for id in ids {
            let cookie = id.cookie[0] as u64 | (id.cookie[1] as u64) << 32;
            let peer = (id_addr(family, &id.dst), u16::from_be_bytes(id.dport));
            let hit = doomed.get(&cookie).is_some_and(|ps| ps.contains(&peer));
            if !hit {
                continue;
            }
            match destroy(family, id) {
                Ok(()) => done.sockets += 1,
                Err(e) => done.errors.push(format!(
                    "ending the UDP socket {} -> {}: {e}",
                    std::net::SocketAddr::new(
                        id_addr(family, &id.src),
                        u16::from_be_bytes(id.sport)
                    ),
                    std::net::SocketAddr::new(peer.0, peer.1),
                )),
            }
        }
    }
    for k in &keys4 {
        let _ = t.sock_revnat.remove(k);
    }
    for k in &keys6 {
        let _ = t.sock_revnat6.remove(k);
    }
    done
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_layouts_match_the_kernel() {
        assert_eq!(size_of::<SockId>(), 48);
        assert_eq!(size_of::<Request>(), NLMSG_HDRLEN + 56);
        assert_eq!(size_of::<DiagMsg>(), 52);
    }
}
