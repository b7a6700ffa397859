//! Passing a connection through to the address it was going to, with no cluster: a capture
//! listener's unknown destinations.

use std::{
    net::{IpAddr, SocketAddr},
    sync::atomic::AtomicU64,
    time::{Duration, Instant, SystemTime},
};

use tokio::{
    io::AsyncWriteExt,
    net::{TcpSocket, TcpStream},
};

use super::copy;
use crate::config::validate::DEFAULT_CONNECT_TIMEOUT;
use crate::telemetry::{
    ListenerTelemetry,
    access_log::{Record, TcpRecord},
};

/// Connects to `destination` (from `source` when given), sends `prefix` (bytes already read from
/// `downstream`), then copies
/// both ways until both sides finish or nothing moves for `idle_timeout`. One access log line
/// when it ends, with no cluster.
pub async fn serve<D: copy::Split>(
    downstream: D,
    peer: SocketAddr,
    destination: SocketAddr,
    source: Option<IpAddr>,
    idle_timeout: Duration,
    prefix: &[u8],
    listener: &ListenerTelemetry,
) {
    let time = SystemTime::now();
    let started = Instant::now();
    let (sent, received) = (AtomicU64::new(0), AtomicU64::new(0));
    let mut moved = copy::Transferred::default();
    let error =
        match tokio::time::timeout(DEFAULT_CONNECT_TIMEOUT, connect(source, destination)).await {
            Err(_) => Some("connect-timeout"),
            Ok(Err(e)) => {
                tracing::debug!(%destination, error = %e, "passthrough connect failed");
                Some("connect-failure")
            }
            Ok(Ok(mut up)) => {
                let _ = up.set_nodelay(true);
                if !prefix.is_empty() && up.write_all(prefix).await.is_err() {
                    Some("upstream-reset")
                } else {
                    let (copied, result) =
                        copy::bidirectional(downstream, up, idle_timeout, &sent, &received).await;
                    moved = copied;
                    moved.downstream_to_upstream += prefix.len() as u64;
                    result.err().map(|e| {
                        if e.kind() == std::io::ErrorKind::TimedOut {
                            "idle-timeout"
                        } else {
                            "connection-error"
                        }
                    })
                }
            }
        };
    if let Some(log) = &listener.access_log {
        log.send(Record::Tcp(TcpRecord {
            time,
            listener: listener.name.clone(),
            cluster: None,
            downstream: peer,
            upstream: Some(destination),
            bytes_sent: moved.downstream_to_upstream,
            bytes_received: moved.upstream_to_downstream,
            duration: started.elapsed(),
            error,
        }));
    }
}

/// Connects to `destination`, from `source` (any port) when given.
async fn connect(source: Option<IpAddr>, destination: SocketAddr) -> std::io::Result<TcpStream> {
    let Some(source) = source else {
        return TcpStream::connect(destination).await;
    };
    let socket = match source {
        IpAddr::V4(_) => TcpSocket::new_v4()?,
        IpAddr::V6(_) => TcpSocket::new_v6()?,
    };
    socket.bind(SocketAddr::new(source, 0))?;
    socket.connect(destination).await
}
