//! TCP proxying: each connection goes to one endpoint of a cluster, chosen per connection.

use std::{net::SocketAddr, sync::Arc, sync::atomic::Ordering, time::Duration};

use tokio::{io::AsyncWriteExt, net::TcpStream};

use super::copy;
use crate::{
    config::model::HashKey,
    upstream::{Cluster, Outcome, hash::hash64},
};

/// Where a TCP listener sends its connections.
#[derive(Debug)]
pub struct TcpTarget {
    pub cluster: Arc<Cluster>,
    pub idle_timeout: Duration,
}

/// Endpoints tried for one connection before giving up, each a different pick.
const CONNECT_ATTEMPTS: usize = 3;

/// Proxies one downstream connection. `prefix` holds bytes already read from it (a ClientHello).
pub async fn serve(
    downstream: TcpStream,
    peer: SocketAddr,
    cluster: Arc<Cluster>,
    idle_timeout: Duration,
    prefix: &[u8],
) {
    let _ = downstream.set_nodelay(true);
    let hash = match &cluster.hash_key {
        Some(HashKey::SourceIp) => Some(hash64(peer.ip().to_string().as_bytes())),
        _ => None,
    };
    cluster
        .stats
        .connections_total
        .fetch_add(1, Ordering::Relaxed);
    let mut upstream = None;
    for _ in 0..CONNECT_ATTEMPTS.min(cluster.endpoints.len().max(1)) {
        let Some(endpoint) = cluster.pick(hash) else {
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
            }
            Err(_) => {
                tracing::debug!(cluster = %cluster.name, endpoint = %endpoint.address, "connect timed out");
                cluster.record(endpoint, Outcome::ConnectFailure);
            }
        }
    }
    let Some((mut up, endpoint)) = upstream else {
        tracing::debug!(cluster = %cluster.name, %peer, "no endpoint accepted the connection; closing");
        return;
    };
    let _ = up.set_nodelay(true);
    let _in_flight = endpoint.state.start();
    if !prefix.is_empty() {
        if up.write_all(prefix).await.is_err() {
            return;
        }
        cluster
            .stats
            .bytes_sent
            .fetch_add(prefix.len() as u64, Ordering::Relaxed);
    }
    let result = copy::bidirectional(
        downstream,
        up,
        idle_timeout,
        &cluster.stats.bytes_sent,
        &cluster.stats.bytes_received,
    )
    .await;
    if let Err(e) = result {
        tracing::debug!(cluster = %cluster.name, %peer, error = %e, "TCP connection ended");
    }
}
