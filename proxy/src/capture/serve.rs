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
    config::{
        Store,
        model::{AppProtocol, EscapedSlashes, HttpConnection, UnknownDestination},
        validate::{
            DEFAULT_CONNECT_TIMEOUT, DEFAULT_HEADER_READ_TIMEOUT, DEFAULT_HTTP_IDLE_TIMEOUT,
        },
    },
    http::{forward::ConnContext, server},
    l4,
    listener::drain::DrainWatch,
    telemetry::{Detected, DetectionReason, ListenerTelemetry, Refused},
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
    let Some((index, service)) = capture.find(destination) else {
        let allowed = capture.unknown_destination == UnknownDestination::Allow;
        if !allowed {
            table.metrics.unknown_destination(false);
            tracing::debug!(%peer, %destination, listener = %listener.name, "unknown destination blocked");
            return;
        }
        // Only a passthrough can loop: a blocked connection is closed (and counted) above.
        let local = stream.local_addr().map(canonical);
        if local.is_ok_and(|local| is_self(destination, local)) {
            listener.connection_refused(Refused::Loop);
            tracing::debug!(%peer, %destination, ?source, listener = %listener.name, "connection to the capture listener itself; closing");
            return;
        }
        table.metrics.unknown_destination(true);
        drop(table);
        // Both directions go where the connection was going. Inbound that is the pod's own
        // address, never loopback: a socket the application bound to 127.0.0.1 only (a debug
        // or admin endpoint) must stay out of reach from outside the pod. The proxy's own
        // connection is not captured again (its user is excluded by the iptables rules).
        l4::passthrough::serve(
            stream,
            peer,
            destination,
            DEFAULT_CONNECT_TIMEOUT,
            idle_timeout,
            &[],
            &listener,
        )
        .await;
        drop(drain);
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
