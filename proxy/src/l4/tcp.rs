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
    telemetry::{
        ListenerTelemetry, TimeoutKind,
        access_log::{Record, TcpRecord},
    },
    upstream::{Cluster, Outcome, hash::hash64},
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
        match tokio::time::timeout(
            cluster.connect_timeout,
            TcpStream::connect(endpoint.address),
        )
        .await
        {
            Ok(Ok(s)) => {
                cluster.record(endpoint, Outcome::Success);
                upstream = Some((s, endpoint));
                break;
            }
            Ok(Err(e)) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, error = %e, "connect failed");
                cluster.record(endpoint, Outcome::ConnectFailure);
                // Each failed attempt, as each failed try of an HTTP request.
                cluster.metrics.error("connect-failure");
                failed.push(endpoint.address);
            }
            Err(_) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, "connect timed out");
                cluster.metrics.timeout(TimeoutKind::Connect);
                cluster.metrics.error("connect-timeout");
                cluster.record(endpoint, Outcome::ConnectFailure);
                failed.push(endpoint.address);
            }
        }
    }
    let Some((mut up, endpoint)) = upstream else {
        tracing::debug!(cluster = %cluster.name, %peer, "no endpoint accepted the connection; closing");
        return (None, moved, Some("connect-failure"));
    };
    let address = Some(endpoint.address);
    let _ = up.set_nodelay(true);
    let _in_flight = endpoint.state.start();
    if !prefix.is_empty() {
        if up.write_all(prefix).await.is_err() {
            return (address, moved, Some("upstream-reset"));
        }
        cluster
            .stats
            .bytes_sent
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
        moved.downstream_to_upstream = prefix.len() as u64;
    }
    let (copied, result) = copy::bidirectional(
        downstream,
        up,
        idle_timeout,
        &cluster.stats.bytes_sent,
        &cluster.stats.bytes_received,
    )
    .await;
    moved.downstream_to_upstream += copied.downstream_to_upstream;
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
