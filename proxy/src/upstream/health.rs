//! Active health checking: one task per cluster with a `health_check`, probing every endpoint
//! each interval (plus jitter). The task reads the cluster from the published config each round,
//! so endpoint and check changes apply at the next round, and it ends when the cluster or its
//! check is removed.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, atomic::Ordering},
    time::Duration,
};

use bytes::{Buf, Bytes};
use http::{Request, header};
use http_body_util::{BodyExt, Empty, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpStream,
    task::JoinHandle,
};

use super::endpoint::EndpointState;
use crate::{
    config::{
        Compiled, Store,
        model::{HealthCheck, HealthCheckKind},
    },
    tls::client::{Alpn, ClientTls},
};

/// The running checkers, by cluster name.
#[derive(Debug, Default)]
pub struct HealthCheckers {
    tasks: HashMap<Arc<str>, JoinHandle<()>>,
}

impl HealthCheckers {
    /// Starts a checker for every cluster that has a health check and none running.
    pub fn reconcile(&mut self, store: &Arc<Store>, compiled: &Compiled) {
        self.tasks.retain(|_, t| !t.is_finished());
        for (name, cluster) in &compiled.clusters {
            if cluster.health_check.is_some() && !self.tasks.contains_key(name) {
                let task = tokio::spawn(run(store.clone(), name.clone()));
                self.tasks.insert(name.clone(), task);
            }
        }
    }
}

impl Drop for HealthCheckers {
    fn drop(&mut self) {
        for t in self.tasks.values() {
            t.abort();
        }
    }
}

async fn run(store: Arc<Store>, name: Arc<str>) {
    loop {
        let Some(cluster) = store.load().and_then(|c| c.clusters.get(&name).cloned()) else {
            return;
        };
        let Some(check) = cluster.health_check.clone() else {
            return;
        };
        let mut probes = tokio::task::JoinSet::new();
        for (i, ep) in cluster.endpoints.iter().enumerate() {
            let check = check.clone();
            let address = ep.address;
            let tls = cluster.tls.clone();
            probes.spawn(async move { (i, probe(&check, address, tls.as_deref()).await) });
        }
        let mut changed = false;
        while let Some(Ok((i, result))) = probes.join_next().await {
            let ep = &cluster.endpoints[i];
            if let Err(reason) = &result {
                tracing::debug!(cluster = %name, endpoint = %ep.address, %reason, "health check failed");
            }
            if let Some(healthy) = apply_result(&ep.state, result.is_ok(), &check) {
                changed = true;
                tracing::info!(cluster = %name, endpoint = %ep.address, healthy, "endpoint health changed");
            }
        }
        if changed {
            cluster.health_changed();
        }
        drop(cluster);
        let jitter = if check.jitter.is_zero() {
            Duration::ZERO
        } else {
            Duration::from_nanos(fastrand::u64(..check.jitter.as_nanos() as u64))
        };
        tokio::time::sleep(check.interval + jitter).await;
    }
}

/// Applies one check result; returns the new health when it changed.
pub fn apply_result(state: &EndpointState, passed: bool, check: &HealthCheck) -> Option<bool> {
    if passed {
        state.check_failures.store(0, Ordering::Relaxed);
        let passes = state.check_passes.fetch_add(1, Ordering::Relaxed) + 1;
        if !state.healthy.load(Ordering::Relaxed) && passes >= check.healthy_threshold {
            state.healthy.store(true, Ordering::Relaxed);
            return Some(true);
        }
    } else {
        state.check_passes.store(0, Ordering::Relaxed);
        let failures = state.check_failures.fetch_add(1, Ordering::Relaxed) + 1;
        if state.healthy.load(Ordering::Relaxed) && failures >= check.unhealthy_threshold {
            state.healthy.store(false, Ordering::Relaxed);
            return Some(false);
        }
    }
    None
}

/// One probe of one endpoint, bounded by the check's timeout. A TLS cluster is probed over TLS,
/// as its requests go: a `tcp` check then passes only when the handshake does.
pub async fn probe(
    check: &HealthCheck,
    address: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    match tokio::time::timeout(check.timeout, probe_inner(&check.kind, address, tls)).await {
        Ok(r) => r,
        Err(_) => Err(format!("no answer within {:?}", check.timeout)),
    }
}

async fn probe_inner(
    kind: &HealthCheckKind,
    address: SocketAddr,
    tls: Option<&ClientTls>,
) -> Result<(), String> {
    let stream = TcpStream::connect(address)
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let _ = stream.set_nodelay(true);
    let Some(tls) = tls else {
        return exchange(kind, address, stream, "http").await;
    };
    let alpn = match kind {
        HealthCheckKind::Tcp => tls.alpn(),
        HealthCheckKind::Http { .. } => Alpn::Http1,
        HealthCheckKind::Grpc { .. } => Alpn::Http2,
    };
    let stream = tls
        .connect(stream, address, alpn)
        .await
        .map_err(|e| format!("TLS handshake: {e}"))?;
    exchange(kind, address, stream, "https").await
}

/// The check's exchange over a connected stream, plain or TLS (`scheme` says which: HTTP/2
/// sends it as `:scheme`, and a gRPC server behind TLS may refuse `http`).
async fn exchange<IO>(
    kind: &HealthCheckKind,
    address: SocketAddr,
    stream: IO,
    scheme: &str,
) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    match kind {
        HealthCheckKind::Tcp => Ok(()),
        HealthCheckKind::Http {
            path,
            host,
            expected_statuses,
        } => {
            let (mut sender, conn) = http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| format!("handshake: {e}"))?;
            tokio::spawn(conn);
            let host = host
                .as_deref()
                .map_or_else(|| address.to_string(), str::to_owned);
            let req = Request::get(&**path)
                .header(header::HOST, host)
                .header(header::USER_AGENT, "trellis-health-check")
                .body(Empty::<Bytes>::new())
                .map_err(|e| e.to_string())?;
            let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
            let status = resp.status().as_u16();
            if expected_statuses
                .iter()
                .any(|(lo, hi)| (*lo..=*hi).contains(&status))
            {
                Ok(())
            } else {
                Err(format!("status {status}"))
            }
        }
        HealthCheckKind::Grpc { service } => grpc_check(stream, address, service, scheme).await,
    }
}

/// `grpc.health.v1.Health/Check`, encoded by hand: the request is one string field and the
/// reply one enum field, not worth a protobuf dependency on the data plane.
async fn grpc_check<IO>(
    stream: IO,
    address: SocketAddr,
    service: &str,
    scheme: &str,
) -> Result<(), String>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = http2::Builder::new(TokioExecutor::new())
        .timer(TokioTimer::new())
        .handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("h2 handshake: {e}"))?;
    tokio::spawn(conn);
    let mut message = Vec::with_capacity(service.len() + 2);
    if !service.is_empty() {
        message.push(0x0a); // field 1, length-delimited
        encode_varint(service.len() as u64, &mut message);
        message.extend_from_slice(service.as_bytes());
    }
    let mut frame = Vec::with_capacity(5 + message.len());
    frame.push(0); // not compressed
    frame.extend_from_slice(&(message.len() as u32).to_be_bytes());
    frame.extend_from_slice(&message);
    let req = Request::post(format!("{scheme}://{address}/grpc.health.v1.Health/Check"))
        .header(header::CONTENT_TYPE, "application/grpc")
        .header(header::TE, "trailers")
        .body(Full::new(Bytes::from(frame)))
        .map_err(|e| e.to_string())?;
    let resp = sender.send_request(req).await.map_err(|e| e.to_string())?;
    if !resp.status().is_success() {
        return Err(format!("status {}", resp.status()));
    }
    let header_status = resp.headers().get("grpc-status").cloned();
    let collected = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("body: {e}"))?;
    let trailer_status = collected
        .trailers()
        .and_then(|t| t.get("grpc-status"))
        .cloned();
    match header_status.or(trailer_status) {
        Some(s) if s == "0" => {}
        Some(s) => return Err(format!("grpc-status {}", s.to_str().unwrap_or("?"))),
        None => return Err("no grpc-status".into()),
    }
    let mut body = collected.to_bytes();
    if body.len() < 5 {
        return Err("empty reply".into());
    }
    body.advance(5);
    // HealthCheckResponse { status = 1 (enum) }: SERVING is 1.
    let mut status = 0u64;
    let mut rest = &body[..];
    while let Some((&tag, tail)) = rest.split_first() {
        let (value, tail) = decode_varint(tail).ok_or("malformed reply")?;
        if tag == 0x08 {
            status = value;
        } else if tag & 0x07 != 0 {
            return Err("unexpected field in reply".into());
        }
        rest = tail;
    }
    if status == 1 {
        Ok(())
    } else {
        Err(format!("serving status {status}"))
    }
}

fn encode_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn decode_varint(bytes: &[u8]) -> Option<(u64, &[u8])> {
    let mut v = 0u64;
    for (i, &b) in bytes.iter().enumerate().take(10) {
        v |= u64::from(b & 0x7f) << (7 * i);
        if b & 0x80 == 0 {
            return Some((v, &bytes[i + 1..]));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check(healthy: u32, unhealthy: u32) -> HealthCheck {
        HealthCheck {
            kind: HealthCheckKind::Tcp,
            interval: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            healthy_threshold: healthy,
            unhealthy_threshold: unhealthy,
            jitter: Duration::ZERO,
        }
    }

    #[test]
    fn thresholds_gate_transitions() {
        let s = EndpointState::default();
        let c = check(2, 3);
        assert_eq!(apply_result(&s, false, &c), None);
        assert_eq!(apply_result(&s, false, &c), None);
        assert_eq!(
            apply_result(&s, true, &c),
            None,
            "a pass resets the failure run"
        );
        assert_eq!(apply_result(&s, false, &c), None);
        assert_eq!(apply_result(&s, false, &c), None);
        assert_eq!(apply_result(&s, false, &c), Some(false));
        assert!(!s.is_healthy());
        assert_eq!(apply_result(&s, true, &c), None);
        assert_eq!(apply_result(&s, true, &c), Some(true));
        assert!(s.is_healthy());
    }

    #[test]
    fn varints_round_trip() {
        for v in [0u64, 1, 127, 128, 300, u64::from(u32::MAX)] {
            let mut buf = Vec::new();
            encode_varint(v, &mut buf);
            assert_eq!(decode_varint(&buf), Some((v, &[][..])));
        }
    }
}
