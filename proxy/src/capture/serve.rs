//! One redirected connection: its original destination, its entry, its protocol, then the HTTP
//! server, TCP proxying or passthrough.

use std::{net::SocketAddr, sync::Arc, time::Duration};

use hyper_util::{rt::TokioExecutor, server::conn::auto};
use tokio::{io::AsyncReadExt, net::TcpStream};

use super::{
    CaptureTable, Prefixed,
    detect::{self, Detection},
    original_dst::{canonical, original_destination},
};
use crate::{
    authz,
    config::{
        Store,
        model::{
            AppProtocol, CaptureDirection, EscapedSlashes, HttpConnection, InboundMtls,
            UnknownDestination,
        },
        validate::{DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT},
    },
    http::{
        forward::{ConnContext, InboundMesh},
        server,
    },
    identity::mtls::{AppProtocol as MeshProtocol, MESH_ALPN},
    l4::{
        self,
        sni::{HelloParser, MAX_HELLO, Parse},
    },
    listener::drain::DrainWatch,
    telemetry::{Detected, DetectionReason, ListenerTelemetry, Refused},
    upstream,
};

/// An accepted connection and what serving it needs.
pub struct Connection {
    pub stream: TcpStream,
    pub peer: SocketAddr,
    pub listener: Arc<ListenerTelemetry>,
    pub store: Arc<Store>,
    /// Tells HTTP/1.1 from HTTP/2 by the preface.
    pub builder: Arc<auto::Builder<TokioExecutor>>,
    /// Held until the connection is gone.
    pub drain: DrainWatch,
}

/// Serves one connection redirected to a capture listener.
pub async fn serve(conn: Connection, table: Arc<CaptureTable>) {
    let Connection {
        mut stream,
        peer,
        listener,
        store,
        builder,
        drain,
    } = conn;
    let Some((destination, source)) = original_destination(&stream) else {
        return;
    };
    let capture = &table.model;
    let idle_timeout = capture.idle_timeout;
    let _ = stream.set_nodelay(true);
    if capture.direction == CaptureDirection::Inbound {
        let index = capture.find(destination).map(|(index, _)| index);
        let local = stream.local_addr().map(canonical);
        if index.is_none() && local.is_ok_and(|local| is_self(destination, local)) {
            listener.connection_refused(Refused::Loop);
            tracing::debug!(%peer, %destination, ?source, listener = %listener.name, "connection to the capture listener itself; closing");
            return;
        }
        let at = At {
            peer,
            destination,
            index,
            listener,
            store,
            builder,
            drain,
        };
        serve_inbound(stream, at, table).await;
        return;
    }
    let Some((index, service)) = capture.find(destination) else {
        // Only a passthrough can loop: a blocked connection is closed (and counted) by
        // `pass_unknown`.
        let local = stream.local_addr().map(canonical);
        if capture.unknown_destination == UnknownDestination::Allow
            && local.is_ok_and(|local| is_self(destination, local))
        {
            listener.connection_refused(Refused::Loop);
            tracing::debug!(%peer, %destination, ?source, listener = %listener.name, "connection to the capture listener itself; closing");
            return;
        }
        // The proxy's own connection is not captured again: its user is excluded by the
        // iptables rules.
        pass_unknown(
            table,
            stream,
            &[],
            peer,
            destination,
            None,
            &listener,
            drain,
        )
        .await;
        return;
    };
    let (protocol, prefix, reason) = match service.protocol {
        AppProtocol::Tcp => (Detected::Tcp, Vec::new(), DetectionReason::Declared),
        AppProtocol::Tls => (Detected::Tls, Vec::new(), DetectionReason::Declared),
        AppProtocol::Http => (Detected::Http1, Vec::new(), DetectionReason::Declared),
        AppProtocol::Http2 => (Detected::Http2, Vec::new(), DetectionReason::Declared),
        AppProtocol::Detect => match sniff(&mut stream, capture.detection_timeout).await {
            Some(found) => found,
            None => return,
        },
    };
    table.metrics.detected(protocol, reason);
    let entry = &table.entries[index];
    match protocol {
        Detected::Http1 | Detected::Http2 => {
            let ctx = ConnContext::new(store, listener, peer.ip())
                // A sidecar is transparent: an application's own paths are forwarded as sent.
                .with_escaped_slashes(EscapedSlashes::KeepUnchanged)
                .with_local_port(Some(destination.port()))
                .with_route_table(entry.routes.clone());
            drop(table);
            let io = Prefixed::new(prefix, stream);
            server::serve(builder, io, ctx, http_connection(), drain).await;
        }
        Detected::Tls | Detected::Tcp => {
            let Some(cluster) = entry.cluster.clone() else {
                tracing::debug!(%peer, %destination, cluster = %service.cluster, "captured service's cluster is not held; closing");
                return;
            };
            drop(table);
            l4::tcp::serve(stream, peer, cluster, idle_timeout, &prefix, &listener).await;
            drop(drain);
        }
    }
}

/// Where an inbound connection came from and goes, with its entry (`None`: a port no Service
/// names) and what serving it needs.
struct At {
    peer: SocketAddr,
    destination: SocketAddr,
    index: Option<usize>,
    listener: Arc<ListenerTelemetry>,
    store: Arc<Store>,
    builder: Arc<auto::Builder<TokioExecutor>>,
    drain: DrainWatch,
}

/// Time allowed for a caller's whole ClientHello once its first bytes said TLS.
const HELLO_TIMEOUT: Duration = Duration::from_secs(10);

/// The inbound side of the mesh: a ClientHello offering a mesh ALPN is terminated with this
/// proxy's identity and the caller verified, on every port (a port no Service names too, so a
/// meshed caller never hands its TLS to the application). Inside, a port declared HTTP is served
/// as HTTP and a port declared TCP or TLS as bytes, whatever ALPN the caller chose (the caller's
/// choice must not decide whether its request headers are checked); a detected port follows the
/// ALPN. Anything else (plaintext, an application's own TLS) is refused in strict mode and served
/// as before in permissive mode, without a caller identity. Authorization applies to every
/// request (HTTP) or connection (TCP, passthrough).
async fn serve_inbound(mut stream: TcpStream, at: At, table: Arc<CaptureTable>) {
    let At {
        peer,
        destination,
        index,
        ref listener,
        ..
    } = at;
    let capture = &table.model;
    let strict = capture.mtls == InboundMtls::Strict;
    let mesh = table.mesh.clone().filter(|m| m.has_identity());
    let refuse = |why: &str| {
        table.metrics.plaintext_refused();
        tracing::debug!(%peer, %destination, listener = %listener.name, why, "strict mTLS: connection closed");
    };
    if strict && mesh.is_none() {
        refuse("this proxy holds no workload certificate");
        return;
    }
    let declared = match index.map(|i| capture.services[i].protocol) {
        Some(AppProtocol::Tcp | AppProtocol::Tls) => Some(Detected::Tcp),
        Some(AppProtocol::Http) => Some(Detected::Http1),
        Some(AppProtocol::Http2) => Some(Detected::Http2),
        Some(AppProtocol::Detect) => None,
        // A port no Service names is passed through as bytes.
        None => Some(Detected::Tcp),
    };
    // With an identity every connection's first bytes are read: mesh callers start with a
    // ClientHello, whatever the port's declared protocol.
    let (detected, mut prefix, reason) = match (declared, &mesh) {
        (Some(d), None) => (d, Vec::new(), DetectionReason::Declared),
        _ => match sniff(&mut stream, capture.detection_timeout).await {
            Some(found) => found,
            None => return,
        },
    };
    let mut mesh_alpn = false;
    if detected == Detected::Tls && mesh.is_some() {
        match read_hello(&mut stream, &mut prefix).await {
            Some(offers) => mesh_alpn = offers,
            None => {
                tracing::debug!(%peer, listener = %listener.name, "no whole ClientHello; closing");
                return;
            }
        }
    }
    if let (true, Some(mesh)) = (mesh_alpn, mesh) {
        let io = Prefixed::new(prefix, stream);
        // A caller that stops mid-handshake must not hold the connection (and the drain) forever.
        let (tls, caller) = match tokio::time::timeout(HELLO_TIMEOUT, mesh.accept(io)).await {
            Ok(Ok(accepted)) => accepted,
            Ok(Err(e)) => {
                tracing::info!(%peer, listener = %listener.name, error = %e, "inbound mesh mTLS handshake failed");
                return;
            }
            Err(_) => {
                tracing::info!(%peer, listener = %listener.name, "inbound mesh mTLS handshake not done in 10 s; closing");
                return;
            }
        };
        let inbound = InboundMesh {
            peer_identity: Some(caller.id),
            destination_port: destination.port(),
        };
        let protocol = declared.unwrap_or(match caller.protocol {
            MeshProtocol::Http1 => Detected::Http1,
            MeshProtocol::Http2 => Detected::Http2,
            MeshProtocol::Tcp => Detected::Tcp,
        });
        table.metrics.detected(protocol, DetectionReason::Declared);
        serve_allowed(table, tls, Vec::new(), protocol, inbound, at).await;
        return;
    }
    if strict {
        refuse(if detected == Detected::Tls {
            "TLS without the mesh ALPN"
        } else {
            "not TLS"
        });
        return;
    }
    let protocol = declared.unwrap_or(detected);
    table.metrics.detected(protocol, reason);
    let inbound = InboundMesh {
        peer_identity: None,
        destination_port: destination.port(),
    };
    serve_allowed(table, stream, prefix, protocol, inbound, at).await;
}

/// Serves an inbound connection once its caller is known: HTTP on an entry (each request
/// authorized), else bytes to the entry's cluster or, for a port no Service names, to where the
/// connection was going, once authorization allows the connection.
async fn serve_allowed<IO>(
    table: Arc<CaptureTable>,
    io: IO,
    prefix: Vec<u8>,
    protocol: Detected,
    inbound: InboundMesh,
    at: At,
) where
    IO: l4::copy::Split + tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let At {
        peer,
        destination,
        index,
        listener,
        store,
        builder,
        drain,
    } = at;
    let idle_timeout = table.model.idle_timeout;
    let Some(index) = index else {
        if !authorized(&table, &store, peer, &inbound) {
            return;
        }
        // Not captured again by the rules' inbound redirect of the proxy's own connections to
        // the pod's address.
        let source = destination
            .is_ipv4()
            .then_some(super::INBOUND_PASSTHROUGH_SOURCE.into());
        pass_unknown(
            table,
            io,
            &prefix,
            peer,
            destination,
            source,
            &listener,
            drain,
        )
        .await;
        return;
    };
    let entry = &table.entries[index];
    match protocol {
        Detected::Http1 | Detected::Http2 => {
            let ctx = inbound_context(&store, &listener, peer, destination, entry, inbound);
            drop(table);
            server::serve(
                builder,
                Prefixed::new(prefix, io),
                ctx,
                http_connection(),
                drain,
            )
            .await;
        }
        Detected::Tls | Detected::Tcp => {
            let Some(cluster) = inbound_tcp_cluster(&table, index, &store, peer, &inbound) else {
                return;
            };
            drop(table);
            l4::tcp::serve(io, peer, cluster, idle_timeout, &prefix, &listener).await;
            drop(drain);
        }
    }
}

/// A connection to a destination no entry names, in either direction: closed (counted) when the
/// listener blocks them, else passed through to where it was going, from `source` when given.
/// Inbound that is the pod's own address, never loopback: a socket the application bound to
/// 127.0.0.1 only (a debug or admin endpoint) must stay out of reach from outside the pod.
#[allow(clippy::too_many_arguments)]
async fn pass_unknown<IO: l4::copy::Split>(
    table: Arc<CaptureTable>,
    io: IO,
    prefix: &[u8],
    peer: SocketAddr,
    destination: SocketAddr,
    source: Option<std::net::IpAddr>,
    listener: &ListenerTelemetry,
    drain: DrainWatch,
) {
    if table.model.unknown_destination != UnknownDestination::Allow {
        table.metrics.unknown_destination(false);
        tracing::debug!(%peer, %destination, listener = %listener.name, "unknown destination blocked");
        return;
    }
    table.metrics.unknown_destination(true);
    let idle_timeout = table.model.idle_timeout;
    drop(table);
    l4::passthrough::serve(
        io,
        peer,
        destination,
        source,
        idle_timeout,
        prefix,
        listener,
    )
    .await;
    drop(drain);
}

/// The HTTP context of an inbound connection: the caller as the mesh knows it.
fn inbound_context(
    store: &Arc<Store>,
    listener: &Arc<ListenerTelemetry>,
    peer: SocketAddr,
    destination: SocketAddr,
    entry: &super::CaptureEntry,
    inbound: InboundMesh,
) -> ConnContext {
    ConnContext::new(store.clone(), listener.clone(), peer.ip())
        .with_escaped_slashes(EscapedSlashes::KeepUnchanged)
        .with_local_port(Some(destination.port()))
        .with_route_table(entry.routes.clone())
        .with_inbound(inbound)
}

/// The cluster an inbound TCP connection goes to, once authorization allows it; `None`: close
/// (no such cluster, or denied, counted).
fn inbound_tcp_cluster(
    table: &CaptureTable,
    index: usize,
    store: &Store,
    peer: SocketAddr,
    inbound: &InboundMesh,
) -> Option<Arc<upstream::Cluster>> {
    let service = &table.model.services[index];
    let Some(cluster) = table.entries[index].cluster.clone() else {
        tracing::debug!(%peer, cluster = %service.cluster, "captured service's cluster is not held; closing");
        return None;
    };
    authorized(table, store, peer, inbound).then_some(cluster)
}

/// Whether the sidecar's policies let this inbound connection through as TCP; a denial is
/// counted and logged.
fn authorized(
    table: &CaptureTable,
    store: &Store,
    peer: SocketAddr,
    inbound: &InboundMesh,
) -> bool {
    let facts = authz::Facts {
        source_identity: inbound.peer_identity.as_ref(),
        source_ip: peer.ip(),
        destination_port: inbound.destination_port,
        http: None,
    };
    let decision = authz::check(store, &facts);
    if !decision.allowed {
        table.metrics.tcp_denied();
        tracing::debug!(%peer, port = inbound.destination_port, policy = ?decision.policy, rule = %decision.rule, "inbound TCP connection denied by policy");
    }
    decision.allowed
}

/// Reads the rest of a ClientHello whose first bytes are in `buf`; whether it offers a mesh
/// ALPN. `None`: the caller closed, stalled or sent something that is not a ClientHello.
async fn read_hello(stream: &mut TcpStream, buf: &mut Vec<u8>) -> Option<bool> {
    let deadline = tokio::time::Instant::now() + HELLO_TIMEOUT;
    let mut parser = HelloParser::default();
    loop {
        match parser.advance(buf) {
            Parse::Done(_) => {
                let mesh = parser
                    .alpn_protocols()
                    .iter()
                    .any(|p| p.starts_with(MESH_ALPN.as_bytes()));
                return Some(mesh);
            }
            // An application's own TLS that this parser cannot read is still not mesh traffic.
            Parse::Invalid(_) => return Some(false),
            Parse::NeedMore => {}
        }
        if buf.len() >= MAX_HELLO {
            return Some(false);
        }
        let mut chunk = [0u8; 4096];
        match tokio::time::timeout_at(deadline, stream.read(&mut chunk)).await {
            Ok(Ok(n)) if n > 0 => buf.extend_from_slice(&chunk[..n]),
            _ => return None,
        }
    }
}

/// The HTTP limits of a captured connection: the proxy's defaults.
fn http_connection() -> HttpConnection {
    HttpConnection {
        idle_timeout: DEFAULT_HTTP_IDLE_TIMEOUT,
        header_read_timeout: DEFAULT_HEADER_READ_TIMEOUT,
        max_connection_age: None,
        escaped_slashes: EscapedSlashes::KeepUnchanged,
    }
}

/// Reads a connection's first bytes until they tell its protocol, for at most `timeout`.
/// Returns the protocol, the bytes read (to be replayed) and why; `None` if the read failed.
async fn sniff(
    stream: &mut TcpStream,
    timeout: Duration,
) -> Option<(Detected, Vec<u8>, DetectionReason)> {
    let deadline = tokio::time::Instant::now() + timeout;
    let mut buf = vec![0u8; detect::MAX_PREFIX];
    let mut len = 0;
    loop {
        let found = match detect::detect(&buf[..len]) {
            Detection::Http1 => Some(Detected::Http1),
            Detection::Http2 => Some(Detected::Http2),
            Detection::Tls => Some(Detected::Tls),
            Detection::Opaque => Some(Detected::Tcp),
            Detection::NeedMore => None,
        };
        if let Some(protocol) = found {
            buf.truncate(len);
            return Some((protocol, buf, DetectionReason::Detected));
        }
        if len == buf.len() {
            // Unreachable by `detect`'s limits; opaque rather than a stuck connection.
            return Some((Detected::Tcp, buf, DetectionReason::Detected));
        }
        match tokio::time::timeout_at(deadline, stream.read(&mut buf[len..])).await {
            // Server-speaks-first, or a client that stalled mid-prefix: opaque from here on.
            Err(_) => {
                buf.truncate(len);
                return Some((Detected::Tcp, buf, DetectionReason::Timeout));
            }
            // The client finished sending: what it sent goes on as opaque bytes.
            Ok(Ok(0)) => {
                buf.truncate(len);
                return Some((Detected::Tcp, buf, DetectionReason::Detected));
            }
            Ok(Ok(n)) => len += n,
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "captured connection failed during detection");
                return None;
            }
        }
    }
}

/// Whether a destination is the capture listener itself: its own address, or its port on a
/// loopback address (which reaches it too). Passing such a connection through would connect to
/// the listener again, for ever.
fn is_self(destination: SocketAddr, local: SocketAddr) -> bool {
    destination == local
        || (destination.port() == local.port()
            && (destination.ip().is_loopback() || destination.ip() == local.ip()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_listener_itself_is_recognised() {
        let local: SocketAddr = "10.0.0.5:15001".parse().unwrap();
        let cases = [
            ("10.0.0.5:15001", true),
            ("127.0.0.1:15001", true),
            ("127.0.0.9:15001", true),
            ("[::1]:15001", true),
            ("10.0.0.6:15001", false),
            ("10.0.0.5:80", false),
            ("127.0.0.1:80", false),
        ];
        for (dest, want) in cases {
            assert_eq!(is_self(dest.parse().unwrap(), local), want, "{dest}");
        }
    }
}
