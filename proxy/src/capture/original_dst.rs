//! Where a redirected connection was going: `SO_ORIGINAL_DST` (IPv4) and `IP6T_SO_ORIGINAL_DST`
//! (IPv6) read the destination the kernel's NAT rewrote, through socket2 (no unsafe code here).

use std::net::SocketAddr;

use tokio::net::TcpStream;

/// How the destination was learnt.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Source {
    /// From the connection's NAT entry: iptables redirected it.
    Nat,
    /// The connection has no NAT entry (it was made to the listener itself, or conntrack is not
    /// loaded): its local address, as Envoy's original-destination listener does.
    Local,
}

/// The original destination of an accepted connection, or its local address when it has none.
pub fn original_destination(stream: &TcpStream) -> Option<(SocketAddr, Source)> {
    let local = stream.local_addr().ok()?;
    let socket = socket2::SockRef::from(stream);
    // An IPv4 connection on a dual-stack socket has an IPv4-mapped local address; its NAT entry
    // is an IPv4 one.
    let v4 = match local {
        SocketAddr::V4(_) => true,
        SocketAddr::V6(a) => a.ip().to_ipv4_mapped().is_some(),
    };
    let read = if v4 {
        socket.original_dst_v4()
    } else {
        socket.original_dst_v6()
    };
    match read.map(|a| a.as_socket()) {
        Ok(Some(dest)) => Some((canonical(dest), Source::Nat)),
        Ok(None) => Some((canonical(local), Source::Local)),
        Err(e) => {
            // ENOENT: no NAT entry; ENOPROTOOPT: conntrack not loaded. Either way the client
            // connected to this address itself.
            tracing::trace!(%local, error = %e, "no original destination; using the local address");
            Some((canonical(local), Source::Local))
        }
    }
}

/// `[::ffff:10.0.0.1]:80` → `10.0.0.1:80`, so lookups and the loop guard compare like with like.
pub fn canonical(a: SocketAddr) -> SocketAddr {
    SocketAddr::new(a.ip().to_canonical(), a.port())
}
