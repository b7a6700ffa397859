//! TCP proxying: each connection goes to one endpoint of a cluster, chosen per connection.

use std::{
    net::SocketAddr,
    sync::Arc,
    sync::atomic::Ordering,
    time::{Duration, Instant, SystemTime},
};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::copy;
use crate::{
    config::model::HashKey,
    identity::mtls::AppProtocol,
    telemetry::{
        ListenerTelemetry, TimeoutKind,
        access_log::{Record, TcpRecord},
    },
    tls::client::Alpn,
    upstream::{Cluster, Endpoint, Outcome, hash::hash64},
};

/// Where a TCP listener sends its connections.
#[derive(Debug)]
pub struct TcpTarget {
    pub cluster: Arc<Cluster>,
    pub idle_timeout: Duration,
    /// Terminate TLS and proxy the cleartext.
    pub tls: Option<Arc<crate::tls::TlsServer>>,
}

/// Endpoints tried for one connection before giving up, each a different pick.
const CONNECT_ATTEMPTS: usize = 3;

/// Proxies one downstream connection. `prefix` holds bytes already read from it (a ClientHello).
/// The listener's access log, if any, gets one line when the connection ends. `downstream` is the
/// socket, or the TLS session terminated on it; the caller sets `TCP_NODELAY`.
pub async fn serve<D: copy::Split>(
    downstream: D,
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    idle_timeout: Duration,
    prefix: &[u8],
    listener: &ListenerTelemetry,
) {
    let time = SystemTime::now();
    let started = Instant::now();
    let (upstream, moved, error) = proxy(downstream, peer, &cluster, idle_timeout, prefix).await;
    if let Some(log) = &listener.access_log {
        log.send(Record::Tcp(TcpRecord {
            time,
            listener: listener.name.clone(),
            cluster: Some(cluster.name.clone()),
            downstream: peer,
            upstream,
            bytes_sent: moved.downstream_to_upstream,
            bytes_received: moved.upstream_to_downstream,
            duration: started.elapsed(),
            error,
        }));
    }
}

/// An upstream connection: plain TCP, or a TLS session the proxy originated for a TLS cluster.
enum Upstream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

/// Returns the endpoint used, the bytes moved and why the connection ended abnormally.
async fn proxy<D: copy::Split>(
    downstream: D,
    peer: SocketAddr,
    cluster: &Cluster,
    idle_timeout: Duration,
    prefix: &[u8],
) -> (Option<SocketAddr>, copy::Transferred, Option<&'static str>) {
    let mut moved = copy::Transferred::default();
    let hash = match &cluster.hash_key {
        Some(HashKey::SourceIp) => Some(hash64(peer.ip().to_string().as_bytes())),
        _ => None,
    };
    cluster
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let mut upstream = None;
    // Endpoints a connect failed on: the next attempt goes elsewhere while another can take it
    // (the balancer alone may well pick the same one again).
    let mut failed: Vec<SocketAddr> = Vec::new();
    for _ in 0..CONNECT_ATTEMPTS.min(cluster.endpoints.len().max(1)) {
        let Some(endpoint) = cluster.pick_avoiding(hash, &failed) else {
            break;
        };
        match connect(cluster, endpoint).await {
            Ok(s) => {
                cluster.record(endpoint, Outcome::Success);
                upstream = Some((s, endpoint));
                break;
            }
            Err(()) => {
                cluster.record(endpoint, Outcome::ConnectFailure);
                failed.push(endpoint.address);
            }
        }
    }
    let Some((up, endpoint)) = upstream else {
        tracing::debug!(cluster = %cluster.name, %peer, "no endpoint accepted the connection; closing");
        return (None, moved, Some("connect-failure"));
    };
    let address = Some(endpoint.address);
    let _in_flight = endpoint.state.start();
    let relayed = match up {
        Upstream::Plain(up) => relay(downstream, up, cluster, idle_timeout, prefix).await,
        Upstream::Tls(up) => relay(downstream, *up, cluster, idle_timeout, prefix).await,
    };
    let Some((copied, result)) = relayed else {
        return (address, moved, Some("upstream-reset"));
    };
    moved.downstream_to_upstream = copied.downstream_to_upstream;
    moved.upstream_to_downstream = copied.upstream_to_downstream;
    let error = result.err().map(|e| {
        tracing::debug!(cluster = %cluster.name, %peer, error = %e, "TCP connection ended");
        if e.kind() == std::io::ErrorKind::TimedOut {
            cluster.metrics.timeout(TimeoutKind::Idle);
            "idle-timeout"
        } else {
            "connection-error"
        }
    });
    (address, moved, error)
}

/// Connects to one endpoint within the cluster's connect timeout, and for a TLS cluster makes
/// the TLS handshake (the cluster's SNI, CAs and client certificate, no ALPN offer: the bytes
/// are opaque here) within the same deadline; a meshed endpoint gets mesh mTLS instead
/// (`trellis-mesh/1`: opaque TCP inside). A failure is counted and logged here.
async fn connect(cluster: &Cluster, endpoint: &Endpoint) -> Result<Upstream, ()> {
    let address = endpoint.address;
    let deadline = tokio::time::Instant::now() + cluster.connect_timeout;
    let tcp = match tokio::time::timeout_at(deadline, TcpStream::connect(address)).await {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => {
            tracing::debug!(cluster = %cluster.name, endpoint = %address, error = %e, "connect failed");
            // Each failed attempt, as each failed try of an HTTP request.
            cluster.metrics.error("connect-failure");
            return Err(());
        }
        Err(_) => {
            tracing::debug!(cluster = %cluster.name, endpoint = %address, "connect timed out");
            cluster.metrics.timeout(TimeoutKind::Connect);
            cluster.metrics.error("connect-timeout");
            return Err(());
        }
    };
    let _ = tcp.set_nodelay(true);
    if let (None, Some(mesh)) = (&cluster.tls, endpoint.pool.mesh()) {
        let handshake = mesh
            .tls
            .connect(tcp, address, &mesh.expected, AppProtocol::Tcp);
        return match tokio::time::timeout_at(deadline, handshake).await {
            Ok(Ok(s)) => Ok(Upstream::Tls(Box::new(s))),
            // Logged with the expected and presented identities where it failed.
            Ok(Err(_)) => {
                cluster.metrics.error("tls-handshake");
                Err(())
            }
            Err(_) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %address, "mesh handshake timed out");
                cluster.metrics.timeout(TimeoutKind::Connect);
                cluster.metrics.error("connect-timeout");
                Err(())
            }
        };
    }
    let Some(tls) = &cluster.tls else {
        return Ok(Upstream::Plain(tcp));
    };
    match tokio::time::timeout_at(deadline, tls.connect(tcp, address, Alpn::None)).await {
        Ok(Ok(s)) => Ok(Upstream::Tls(Box::new(s))),
        Ok(Err(e)) => {
            // A warning, as for HTTP clusters: a certificate, trust or protocol mismatch fails
            // every connection until it is fixed.
            tracing::warn!(
                cluster = %cluster.name,
                endpoint = %address,
                server_name = ?tls.server_name(address),
                error = %e,
                "TLS handshake with upstream failed"
            );
            cluster.metrics.error("tls-handshake");
            Err(())
        }
        Err(_) => {
            tracing::debug!(cluster = %cluster.name, endpoint = %address, "TLS handshake timed out");
            cluster.metrics.timeout(TimeoutKind::Connect);
            cluster.metrics.error("connect-timeout");
            Err(())
        }
    }
}

/// Sends `prefix`, then copies both ways until the connection ends; `None` when the upstream
/// would not take the prefix.
async fn relay<D: copy::Split, U: copy::Split + tokio::io::AsyncWrite + Unpin>(
    downstream: D,
    mut up: U,
    cluster: &Cluster,
    idle_timeout: Duration,
    prefix: &[u8],
) -> Option<(copy::Transferred, std::io::Result<()>)> {
    if !prefix.is_empty() {
        up.write_all(prefix).await.ok()?;
        cluster
            .stats
            .bytes_sent
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    let (mut copied, result) = copy::bidirectional(
        downstream,
        up,
        idle_timeout,
        &cluster.stats.bytes_sent,
        &cluster.stats.bytes_received,
    )
    .await;
    copied.downstream_to_upstream += prefix.len() as u64;
    Some((copied, result))
}
